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

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
URL_A = "https://a.example.net/hook"
URL_B = "https://b.example.net/hook"
T0 = 1_700_000_000_000


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'o.db'}"
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
