"""The relabel queue (bounded, fair per sender prefix, skips counted) and Store.update_trust.

Review finding 7: labelling waited for DNS before storing, so spoofed senders whose zones
never answer held every report. Reports are now stored at once and relabelled later; these are
the pure parts of that: which reports wait, which are skipped and why, and the store's
compare-and-set relabel, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.services.inband import InbandReceived, RelabelQueue
from overflowd.store import Store
from tests.support.reports import make_payload

X = NodeIdentity(seed=b"\x61" * 32)
Y = NodeIdentity(seed=b"\x62" * 32)
_N = iter(range(1, 1_000_000))


def received(sender: str, by: NodeIdentity = Y, trust: str = "unknown") -> InbandReceived:
    report = by.sign_report(make_payload(packets=next(_N)))
    return InbandReceived(report, trust, sender, 0, relabel=True)


def offer(q: RelabelQueue, r: InbandReceived, prefix: str, priority: bool = False) -> str | None:
    reason, evicted = q.offer(r, prefix, priority=priority, now=0.0)
    assert evicted == []
    return reason


def test_one_prefix_cannot_fill_the_queue() -> None:
    q = RelabelQueue(max_reports=100, prefix_share=10)
    # 50 spoofed senders in one /24, one report each: ten wait, the rest are skipped
    reasons = [offer(q, received(f"192.0.2.{i}"), "192.0.2.0/24") for i in range(50)]
    assert reasons.count(None) == 10 and reasons.count("prefix_share") == 40
    assert len(q) == 10 and q.prefix_waiting("192.0.2.0/24") == 10
    # another prefix still gets in
    assert offer(q, received("198.51.100.1"), "198.51.100.0/24") is None


def test_full_queue_skips_dns_and_the_priority_lane_still_gets_in() -> None:
    q = RelabelQueue(max_reports=4, prefix_share=4)
    for i in range(4):
        assert offer(q, received(f"10.0.{i}.1"), f"10.0.{i}.0/24") is None
    assert offer(q, received("10.9.0.1"), "10.9.0.0/24") == "backlog"
    # a proven pair pushes out the newest stranger entry
    mine = received("192.0.2.1", by=X)
    reason, evicted = q.offer(mine, "192.0.2.0/24", priority=True, now=0.0)
    assert reason is None and [e.sender for e in evicted] == ["10.0.3.1"]
    entry, stale = q.take(now=1.0)
    assert entry is not None and entry.priority and entry.items == [mine] and stale == []
    assert [q.take(now=1.0)[0].sender for _ in range(3)] == ["10.0.0.1", "10.0.1.1", "10.0.2.1"]  # type: ignore[union-attr]
    assert q.take(now=1.0) == (None, []) and len(q) == 0


def test_reports_of_one_key_and_sender_share_one_lookup() -> None:
    q = RelabelQueue(max_reports=10, prefix_share=3)
    for _ in range(3):
        assert offer(q, received("192.0.2.1", by=X), "192.0.2.0/24") is None
    # the share counts reports, so a fourth from the same pair is skipped too
    assert offer(q, received("192.0.2.1", by=X), "192.0.2.0/24") == "prefix_share"
    entry, _ = q.take(now=0.0)
    assert entry is not None and len(entry.items) == 3
    assert q.prefix_waiting("192.0.2.0/24") == 0


def test_entries_that_waited_too_long_are_not_looked_up() -> None:
    q = RelabelQueue(max_reports=10, prefix_share=10, max_wait_s=60.0)
    q.offer(received("10.0.0.1"), "10.0.0.0/24", priority=False, now=0.0)
    q.offer(received("10.0.1.1"), "10.0.1.0/24", priority=False, now=50.0)
    entry, stale = q.take(now=100.0)
    assert [e.sender for e in stale] == ["10.0.0.1"]
    assert entry is not None and entry.sender == "10.0.1.1"


def test_clear_hands_back_everything() -> None:
    q = RelabelQueue(max_reports=10, prefix_share=10)
    offer(q, received("10.0.0.1"), "10.0.0.0/24")
    offer(q, received("10.0.0.2", by=X), "10.0.0.0/24", priority=True)
    assert sorted(e.sender for e in q.clear()) == ["10.0.0.1", "10.0.0.2"]
    assert len(q) == 0 and q.take(now=0.0) == (None, [])


def test_queue_limits_are_checked() -> None:
    with pytest.raises(ValueError):
        RelabelQueue(max_reports=0)
    with pytest.raises(ValueError):
        RelabelQueue(prefix_share=0)


def _stored(store: Store, report: rpt.SignedReport) -> str | None:
    row = store.get_report(report.report_id)
    assert row is not None
    return row.trust


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def test_update_trust_relabels_only_what_still_holds_the_expected_label(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        f"sqlite:///{tmp_path}/s.sqlite"
        if backend == "sqlite"
        else str(request.getfixturevalue("postgres_db_url"))
    )
    with Store.open(url) as store:
        a, b, c = (X.sign_report(make_payload(packets=n)) for n in (1, 2, 3))
        store.add_reports(
            [(a, 1, "udp"), (b, 1, "udp"), (c, 1, "webhook")],
            trust={a.report_id: "unknown", b.report_id: "unknown"},
        )
        changes = {
            a.report_id: ("unknown", "dns"),
            b.report_id: ("continuity", "dns"),  # it holds "unknown": left alone
            c.report_id: (None, "dns"),  # stored without a label
            "ff" * 32: ("unknown", "dns"),  # not stored: ignored
        }
        assert store.update_trust(changes) == 2
        assert (_stored(store, a), _stored(store, b), _stored(store, c)) == (
            "dns",
            "unknown",
            "dns",
        )
        assert store.update_trust({}) == 0
