"""The durable webhook outbox on SQLite and PostgreSQL, and the delivery policy's pure parts."""

from __future__ import annotations

import email.utils
import ipaddress
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from overflowd import report as rpt
from overflowd.errors import ConfigError
from overflowd.identity import NodeIdentity
from overflowd.services import webhook as svc
from overflowd.store import Store
from overflowd.store import outbox as ob
from tests.support.reports import make_payload
from tests.support.stores import sqlite_at_head

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
URL_A = "https://a.example.net/hook"
URL_B = "https://b.example.net/hook"
T0 = 1_700_000_000_000


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = sqlite_at_head(tmp_path / "o.db")
    else:
        url = request.getfixturevalue("postgres_db_url")
    with Store.open(url) as s:
        yield s


@pytest.fixture(scope="module")
def identity() -> NodeIdentity:
    return NodeIdentity(seed=bytes(range(32)))


def report(identity: NodeIdentity, dst: str = "198.51.100.2") -> rpt.SignedReport:
    return identity.sign_report(make_payload(dst=dst))


def test_enqueue_is_idempotent(store: Store, identity: NodeIdentity) -> None:
    r = report(identity)
    assert ob.enqueue(store, r, [URL_A, URL_B, URL_A], now_ms=T0) == 2
    assert ob.enqueue(store, r, [URL_A], now_ms=T0 + 5) == 0
    rows = ob.entries(store)
    assert [(e.url, e.state, e.attempts) for e in rows] == [
        (URL_A, "pending", 0),
        (URL_B, "pending", 0),
    ]
    assert rows[0].cose == r.cose and rows[0].report_id == r.report_id
    assert ob.counts(store) == {"pending": 2, "delivered": 0, "dead": 0}


def test_claim_leases_and_counts_attempts(store: Store, identity: NodeIdentity) -> None:
    for i in range(5):
        ob.enqueue(store, report(identity), [URL_A], now_ms=T0 + i)
    first = ob.claim_due(store, now_ms=T0 + 10, lease_ms=1000, limit=3)
    assert len(first) == 3 and all(e.attempts == 1 for e in first)
    second = ob.claim_due(store, now_ms=T0 + 10, lease_ms=1000, limit=10)
    assert len(second) == 2
    assert not {e.id for e in first} & {e.id for e in second}
    assert ob.claim_due(store, now_ms=T0 + 500, lease_ms=1000, limit=10) == []
    # A crashed worker's rows come back when the lease runs out.
    again = ob.claim_due(store, now_ms=T0 + 1010, lease_ms=1000, limit=10)
    assert len(again) == 5 and all(e.attempts == 2 for e in again)


def test_not_yet_due_rows_wait(store: Store, identity: NodeIdentity) -> None:
    ob.enqueue(store, report(identity), [URL_A], now_ms=T0 + 1000)
    assert ob.claim_due(store, now_ms=T0, lease_ms=10, limit=5) == []
    assert ob.next_due_ms(store) == T0 + 1000


def test_outcomes(store: Store, identity: NodeIdentity) -> None:
    for _ in range(3):
        ob.enqueue(store, report(identity), [URL_A], now_ms=T0)
    a, b, c = ob.claim_due(store, now_ms=T0, lease_ms=60_000, limit=3)
    assert ob.mark_delivered(store, a.id, now_ms=T0 + 1, status=204)
    assert ob.mark_dead(store, b.id, now_ms=T0 + 1, error="HTTP 400: nope", status=400)
    assert ob.reschedule(store, c.id, now_ms=T0 + 1, next_attempt_ms=T0 + 99, error="HTTP 503")
    # A finished row is not changed by a late second worker.
    assert not ob.mark_dead(store, a.id, now_ms=T0 + 2, error="late")
    assert ob.counts(store) == {"pending": 1, "delivered": 1, "dead": 1}
    (dead,) = ob.entries(store, state="dead")
    assert (dead.last_status, dead.last_error) == (400, "HTTP 400: nope")
    (pending,) = ob.entries(store, state="pending")
    assert pending.next_attempt_ms == T0 + 99 and pending.last_error == "HTTP 503"
    with pytest.raises(ValueError):
        ob.entries(store, state="lost")


def test_prune_keeps_dead_letters(store: Store, identity: NodeIdentity) -> None:
    for _ in range(3):
        ob.enqueue(store, report(identity), [URL_A], now_ms=T0)
    a, b, c = ob.claim_due(store, now_ms=T0, lease_ms=1, limit=3)
    ob.mark_delivered(store, a.id, now_ms=T0 + 1, status=204)
    ob.mark_delivered(store, b.id, now_ms=T0 + 100, status=204)
    ob.mark_dead(store, c.id, now_ms=T0 + 1, error="HTTP 400")
    assert ob.prune_delivered(store, before_ms=T0 + 50) == 1
    assert ob.counts(store) == {"pending": 0, "delivered": 1, "dead": 1}


def test_disable_endpoint_kills_pending_and_future_rows(
    store: Store, identity: NodeIdentity
) -> None:
    ob.enqueue(store, report(identity), [URL_A, URL_B], now_ms=T0)
    assert ob.disable_endpoint(store, URL_A, now_ms=T0 + 1, reason="HTTP 410") == 1
    assert ob.enqueue(store, report(identity), [URL_A], now_ms=T0 + 2) == 1
    dead = ob.entries(store, state="dead")
    assert [e.url for e in dead] == [URL_A, URL_A]
    assert "disabled" in (dead[1].last_error or "")
    claimed = ob.claim_due(store, now_ms=T0 + 5, lease_ms=10, limit=10)
    assert [e.url for e in claimed] == [URL_B]
    (endpoint,) = [e for e in ob.endpoints(store) if e.url == URL_A]
    assert endpoint.disabled_ms == T0 + 1
    ob.enable_endpoint(store, URL_A, now_ms=T0 + 6)
    assert ob.enqueue(store, report(identity), [URL_A], now_ms=T0 + 7) == 1
    assert ob.counts(store)["pending"] == 2


def test_held_endpoint_is_skipped_until_its_time(store: Store, identity: NodeIdentity) -> None:
    ob.enqueue(store, report(identity), [URL_A, URL_B], now_ms=T0)
    ob.hold_endpoint(store, URL_A, now_ms=T0, until_ms=T0 + 5000)
    ob.hold_endpoint(store, URL_A, now_ms=T0, until_ms=T0 + 10)  # never shortens a hold
    assert [e.url for e in ob.claim_due(store, now_ms=T0 + 1, lease_ms=1, limit=9)] == [URL_B]
    assert ob.claim_due(store, now_ms=T0 + 4999, lease_ms=1, limit=9) != []
    assert {e.url for e in ob.claim_due(store, now_ms=T0 + 5000, lease_ms=1, limit=9)} == {
        URL_A,
        URL_B,
    }


def test_concurrent_claimers_never_share_a_row(store: Store, identity: NodeIdentity) -> None:
    for _ in range(40):
        ob.enqueue(store, report(identity), [URL_A], now_ms=T0)
    got: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while True:
            batch = ob.claim_due(store, now_ms=T0, lease_ms=60_000, limit=3)
            if not batch:
                return
            with lock:
                got.extend(e.id for e in batch)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(got) == 40 and len(set(got)) == 40


def test_rebase_clock_after_a_step_back(store: Store, identity: NodeIdentity) -> None:
    hour = 3_600_000
    ob.enqueue(store, report(identity), [URL_A, URL_B], now_ms=T0)
    a, b = ob.claim_due(store, now_ms=T0, lease_ms=60_000, limit=2)
    ob.reschedule(store, a.id, now_ms=T0 + 10, next_attempt_ms=T0 + 10 + 5_000, error="HTTP 500")
    ob.hold_endpoint(store, URL_A, now_ms=T0 + 10, until_ms=T0 + 10 + 2_000)
    ob.enqueue(store, report(identity), [URL_A], now_ms=T0 + 20)  # due at once
    # The clock goes back 6 h: nothing is due for 6 h, unless re-based.
    back = T0 - 6 * hour
    assert ob.claim_due(store, now_ms=back + 5_000, lease_ms=1, limit=9) == []
    moved = ob.rebase_clock(store, now_ms=back, max_delay_ms=6 * hour, tolerance_ms=1000)
    assert moved == 4  # three rows and one hold
    rows = {e.id: e for e in ob.entries(store)}
    assert rows[a.id].next_attempt_ms == back + 5_000  # its delay, counted from now
    assert rows[b.id].next_attempt_ms == back + 60_000  # the lease, likewise
    assert [e.next_attempt_ms for e in rows.values() if e.attempts == 0] == [back]
    assert all(e.updated_ms == back for e in rows.values())
    (hold,) = [e for e in ob.endpoints(store) if e.url == URL_A]
    assert hold.not_before_ms == back + 2_000
    # Idempotent; and within the tolerance, nothing is rewritten.
    assert ob.rebase_clock(store, now_ms=back, max_delay_ms=6 * hour, tolerance_ms=1000) == 0
    assert ob.rebase_clock(store, now_ms=back - 999, max_delay_ms=6 * hour, tolerance_ms=1000) == 0
    assert {e.id for e in ob.claim_due(store, now_ms=back + 5_000, lease_ms=1, limit=9)} == {
        a.id,
        max(rows),
    }


def test_rebase_clock_clamps_due_times_beyond_the_longest_delay(
    store: Store, identity: NodeIdentity
) -> None:
    ob.enqueue(store, report(identity), [URL_A], now_ms=T0)
    (a,) = ob.claim_due(store, now_ms=T0, lease_ms=1, limit=1)
    ob.reschedule(store, a.id, now_ms=T0, next_attempt_ms=T0 + 10**9, error="bogus")
    ob.hold_endpoint(store, URL_A, now_ms=T0, until_ms=T0 + 10**9)
    assert ob.rebase_clock(store, now_ms=T0, max_delay_ms=1000) == 2
    (row,) = ob.entries(store)
    assert row.next_attempt_ms == T0 + 1000
    assert ob.endpoints(store)[0].not_before_ms == T0 + 1000
    with pytest.raises(ValueError):
        ob.rebase_clock(store, now_ms=T0, max_delay_ms=-1)


# -- pure policy -------------------------------------------------------------------------------


def test_webhook_targets_match_src_and_dst(identity: NodeIdentity) -> None:
    r = identity.sign_report(make_payload(src="192.0.2.1", dst="198.51.100.2"))
    mapping = [
        ("198.51.100.0/24", URL_A),
        ("192.0.2.0/25", URL_B),
        ("192.0.2.0/24", URL_A),  # the same URL once
        ("2001:db8::/32", "https://v6.example.net/"),
        ("203.0.113.0/24", "https://other.example.net/"),
    ]
    assert svc.webhook_targets(r, mapping) == [URL_A, URL_B]
    assert svc.webhook_targets(r, []) == []
    v6 = identity.sign_report(make_payload(src="2001:db8::1", dst="2001:db8:1::2"))
    assert svc.webhook_targets(v6, mapping) == ["https://v6.example.net/"]
    assert svc.webhook_targets(v6, [("::/0", URL_A), ("0.0.0.0/0", URL_B)]) == [URL_A]


def test_classify() -> None:
    assert [svc.classify(s) for s in (200, 202, 204)] == ["delivered"] * 3
    assert svc.classify(410) == "gone"
    assert [svc.classify(s) for s in (429, 502, 503, 504)] == ["slow-down"] * 4
    assert [svc.classify(s) for s in (408, 500, 501)] == ["retry"] * 3
    assert [svc.classify(s) for s in (301, 400, 401, 403, 404, 413)] == ["dead"] * 6


def test_retry_after() -> None:
    now = 1_700_000_000.0
    assert svc.parse_retry_after("120", now=now) == 120
    assert svc.parse_retry_after(None, now=now) is None
    assert svc.parse_retry_after("soon", now=now) is None
    date = email.utils.formatdate(now + 90, usegmt=True)
    assert svc.parse_retry_after(date, now=now) == pytest.approx(90, abs=1)
    past = email.utils.formatdate(now - 90, usegmt=True)
    assert svc.parse_retry_after(past, now=now) == 0
    # Digits that str.isdigit() knows but int() refuses, and other scripts' digits.
    for odd in ("²", "¹²", "١٢", "12\u00b2", "", " "):
        assert svc.parse_retry_after(odd, now=now) is None


def test_retry_budget_burst_then_rate() -> None:
    budget = svc.RetryBudget(svc.RetryLimits(per_url_per_s=0.5, per_url_burst=3))
    for _ in range(3):
        assert budget.charge(URL_A, "a.example.net", 100.0) is None
    which, wait, interval = budget.charge(URL_A, "a.example.net", 100.0) or ("", 0, 0)
    assert (which, wait, interval) == ("url", pytest.approx(2.0), pytest.approx(2.0))
    assert budget.charge(URL_A, "a.example.net", 101.9) is not None
    assert budget.charge(URL_A, "a.example.net", 102.0) is None
    # Another URL has its own bucket; a clock going back refills nothing.
    assert budget.charge(URL_B, "b.example.net", 102.0) is None
    assert budget.charge(URL_A, "a.example.net", 50.0) is not None


def test_retry_budget_host_is_shared_and_nothing_is_charged_on_refusal() -> None:
    limits = svc.RetryLimits(
        per_url_per_s=0.001, per_url_burst=1, per_host_per_s=0.1, per_host_burst=3
    )
    budget = svc.RetryBudget(limits)
    urls = [f"https://h.example.net/{i}" for i in range(4)]
    results = [budget.charge(u, "h.example.net", 0.0) for u in urls]
    assert results[:3] == [None, None, None]
    assert results[3] == ("host", pytest.approx(10.0), pytest.approx(10.0))
    # The refused URL was not charged: once the host has a token again, so has the URL.
    assert budget.charge(urls[3], "h.example.net", 10.0) is None
    assert budget.charge(urls[3], "h.example.net", 30.0) == (
        "url",
        pytest.approx(980.0),
        pytest.approx(1000.0),
    )


def test_retry_budget_is_bounded_and_forgetting_never_refills() -> None:
    budget = svc.RetryBudget(svc.RetryLimits(per_url_per_s=0.001, per_url_burst=1, max_tracked=8))
    assert budget.charge(URL_A, "a", 0.0) is None
    assert budget.charge(URL_A, "a", 0.0) is not None
    for i in range(1000):  # an attacker's many URLs (and hosts) push URL_A out of the table
        budget.charge(f"https://x{i}.example/", f"x{i}", 1.0)
    urls, hosts = budget.tracked()
    assert urls <= 8 and hosts <= 8
    assert budget.charge(URL_A, "a", 2.0) is not None  # evicted, yet no fresh token


def test_retry_limits_are_checked() -> None:
    for bad in (
        {"per_url_per_s": 0},
        {"per_host_per_s": float("inf")},
        {"per_url_burst": 0},
        {"max_tracked": True},
    ):
        with pytest.raises(ValueError):
            svc.RetryLimits(**bad)
    assert svc.RetryLimits(per_url_per_s=0.25, per_host_per_s=0.5).longest_wait_s == 4.0


def test_backoff_grows_with_jitter_up_to_the_cap() -> None:
    rng = random.Random(1)
    delays = [svc.backoff_s(n, base_s=1, cap_s=60, rng=rng) for n in range(1, 12)]
    for n, d in enumerate(delays, start=1):
        full = min(60, 2 ** (n - 1))
        assert full / 2 <= d <= full
    assert svc.backoff_s(10_000, base_s=1, cap_s=60, rng=rng) <= 60


def test_settings_from_toml() -> None:
    s = svc.WebhookSettings.from_toml(
        {
            "targets": [{"prefix": "198.51.100.0/24", "url": URL_A}],
            "allow_prefixes": ["127.0.0.0/8"],
            "max_attempts": 3,
            "backoff_base_s": 1,
        }
    )
    assert s.targets == (("198.51.100.0/24", URL_A),)
    assert s.allowed_networks == (ipaddress.ip_network("127.0.0.0/8"),)
    assert s.backoff_base_s == 1.0
    for bad in (
        {"nope": 1},
        {"targets": [{"prefix": "x", "url": URL_A}]},
        {"targets": [{"prefix": "10.0.0.0/8"}]},
        {"targets": [{"prefix": "10.0.0.0/8", "url": "http://insecure/"}]},
        {"max_attempts": 0},
        {"max_attempts": True},
        {"lease_s": -1},
        {"allow_prefixes": ["bad"]},
    ):
        with pytest.raises(ConfigError):
            svc.WebhookSettings.from_toml(bad)
