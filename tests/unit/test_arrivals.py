"""report_arrivals and reports.hops: every arrival counted in the storing transaction, duplicates
included; the fewest hops kept; arrivals pruned with their report. Both backends."""

from __future__ import annotations

from overflowd.identity import NodeIdentity
from overflowd.store import Store
from overflowd.store.retention import prune_older_than
from tests.support.reports import make_payload

ALICE = NodeIdentity(seed=b"\x11" * 32)
T0 = 1_800_000_000_000


def test_every_arrival_is_counted_once_per_channel_and_hops_keep_the_fewest(db_url: str) -> None:
    one, two = (ALICE.sign_report(make_payload(packets=n)) for n in (1, 2))
    with Store.open(db_url) as s:
        assert (
            s.add_reports(
                [(one, T0, "gossip")],
                channels={one.report_id: "peer:aaaa"},
                hops={one.report_id: 3},
            )
            == 1
        )
        # the same report again from the same peer (shorter path), twice in band, and a new one
        new = s.add_reports(
            [
                (one, T0 + 5, "gossip"),
                (one, T0 + 7, "udp"),
                (one, T0 + 9, "udp"),
                (two, T0, "local"),
            ],
            channels={one.report_id: "peer:aaaa"},
            hops={one.report_id: 2},
        )
        assert new == 1  # only `two`; `one` is stored once
        got = s.arrivals([one.report_id, two.report_id, "0" * 64])
        assert set(got) == {one.report_id, two.report_id}
        # every entry of a batch names one channel per report: here the peer's for `one`
        assert [(a.channel, a.count, a.first_ms, a.last_ms) for a in got[one.report_id]] == [
            ("peer:aaaa", 4, T0, T0 + 9)
        ]
        assert [(a.channel, a.count) for a in got[two.report_id]] == [("local", 1)]
        stored = s.get_report(one.report_id)
        assert stored is not None and stored.hops == 2
        s.add_reports([(one, T0 + 11, "udp")])
        assert {a.channel: a.count for a in s.arrivals([one.report_id])[one.report_id]} == {
            "peer:aaaa": 4,
            "udp": 1,
        }
        assert s.get_report(one.report_id).hops == 0  # type: ignore[union-attr]
        assert s.get_report(two.report_id).hops == 0  # type: ignore[union-attr]
        # pruned with their report
        prune_older_than(s, "received", before_ms=T0 + 1_000, limit=10)
        assert s.get_report(one.report_id) is None
        assert s.arrivals([one.report_id]) == {}
        assert s.arrivals([two.report_id]) != {}  # own reports are another kind
