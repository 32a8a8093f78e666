"""Held data (data sets that arrived before their template) is bounded per exporter and
replayed within a per-datagram budget, through the library call a collector makes.

Reviewer's finding: one 44-byte IPFIX template datagram replayed every data set held for it
(up to max_pending_bytes = 4 MiB, from any source): 163,840 records decoded for one datagram,
0.4-0.9 s of the trio thread during which no socket is read. Counts records, no timing.
"""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from overflowd.errors import DecodeError
from overflowd.wire import DecoderState, Limits, decode_datagram, decode_datagram_rows
from tests.unit.test_wire_encoder import (
    IE,
    flowset,
    ipfix_message,
    ipfix_options_template,
    ipfix_template,
    ipfix_withdrawal,
    record,
)

F = [IE(8, 4), IE(12, 4), IE(2, 8), IE(1, 8), IE(4, 1)]
REC = record(F, [IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2"), 10, 1000, 6])
PER_SET = 4000 // len(REC)  # 160 records of 25 bytes
DATA = ipfix_message([flowset(256, REC * PER_SET)])
TEMPLATE = ipfix_message([flowset(2, ipfix_template(256, F))])
NOW = 1_700_000_000.0
SPOOFED = "198.51.100.7"


def _hold(state: DecoderState, exporter: str, n: int, data: bytes = DATA) -> None:
    for _ in range(n):  # no template yet: held
        try:
            decode_datagram_rows(data, exporter, state, NOW)
        except DecodeError:
            pass


def test_one_template_datagram_does_not_replay_megabytes() -> None:
    state = DecoderState()
    _hold(state, SPOOFED, 2000)
    rows = decode_datagram_rows(TEMPLATE, SPOOFED, state, NOW)
    assert len(rows) <= 65_535 // len(REC), (
        f"{len(rows)} records from one {len(TEMPLATE)}-byte datagram"
    )


def test_replay_budget_leaves_the_rest_held_for_the_exporters_next_datagrams() -> None:
    limits = Limits()
    state = DecoderState(limits=limits)
    _hold(state, SPOOFED, 40)  # 6400 records, within the exporter's share
    assert state.pending.exporter_sets(SPOOFED) == 40
    replayed = [len(decode_datagram_rows(TEMPLATE, SPOOFED, state, NOW))]
    # Another exporter's datagrams never spend this exporter's held data.
    assert decode_datagram_rows(TEMPLATE, "192.0.2.1", state, NOW) == []
    assert state.pending.exporter_sets(SPOOFED) == 40 - replayed[0] // PER_SET
    while state.pending.exporter_sets(SPOOFED):
        replayed.append(len(decode_datagram_rows(TEMPLATE, SPOOFED, state, NOW)))
        assert len(replayed) < 10
    assert all(0 < n <= limits.max_replayed_records_per_datagram for n in replayed)
    assert sum(replayed) == 40 * PER_SET  # nothing lost, nothing twice
    stats = state.statistics()
    assert stats.pending_replayed == 40 and stats.pending_dropped == 0
    assert stats.counters["pending.replay_postponed"] > 0
    # Data for a known template is decoded at once, besides the budget.
    assert len(decode_datagram_rows(DATA, SPOOFED, state, NOW)) == PER_SET


def test_one_source_cannot_fill_the_buffer_for_everyone() -> None:
    limits = Limits()
    state = DecoderState(limits=limits)
    legit = "192.0.2.1"
    _hold(state, legit, 10)
    _hold(state, SPOOFED, 2000)  # 8 MB: twice the whole buffer
    assert state.pending.exporter_sets(SPOOFED) <= limits.max_pending_sets_per_exporter
    assert state.pending.exporter_bytes(SPOOFED) <= limits.max_pending_bytes_per_exporter
    stats = state.statistics()
    assert stats.pending_dropped_by_reason["exporter_cap"] == 2000 - state.pending.exporter_sets(
        SPOOFED
    )
    assert stats.pending_dropped_by_reason["evicted"] == 0
    # The legitimate exporter's data survived the flood and comes back with its template.
    assert len(decode_datagram_rows(TEMPLATE, legit, state, NOW)) == 10 * PER_SET


def test_held_set_bigger_than_the_budget_is_not_stuck() -> None:
    state = DecoderState(limits=Limits(max_replayed_records_per_datagram=10))
    _hold(state, SPOOFED, 3)
    replayed = [len(decode_datagram_rows(TEMPLATE, SPOOFED, state, NOW)) for _ in range(4)]
    assert replayed == [PER_SET, PER_SET, PER_SET, 0]  # one set a datagram


def test_ready_data_whose_template_went_waits_for_it_again() -> None:
    state = DecoderState(limits=Limits(max_replayed_records_per_datagram=PER_SET))
    _hold(state, SPOOFED, 3)
    assert len(decode_datagram_rows(TEMPLATE, SPOOFED, state, NOW)) == PER_SET
    withdraw = ipfix_message([flowset(2, ipfix_withdrawal(256))])
    assert decode_datagram_rows(withdraw, SPOOFED, state, NOW) == []
    assert state.statistics().pending_sets == 2  # held, not lost
    assert len(decode_datagram_rows(TEMPLATE, SPOOFED, state, NOW)) == PER_SET
    assert len(decode_datagram_rows(TEMPLATE, SPOOFED, state, NOW)) == PER_SET
    assert state.statistics().pending_sets == 0


def test_refused_datagram_does_not_spend_ready_data() -> None:
    state = DecoderState(limits=Limits(max_replayed_records_per_datagram=PER_SET))
    _hold(state, SPOOFED, 2)
    assert len(decode_datagram_rows(TEMPLATE, SPOOFED, state, NOW)) == PER_SET
    garbage = ipfix_message([flowset(2, b"\x00\x01\x00\x01")])  # template id 1: refused
    with pytest.raises(DecodeError):
        decode_datagram_rows(garbage, SPOOFED, state, NOW)
    assert state.statistics().pending_sets == 1
    assert len(decode_datagram_rows(TEMPLATE, SPOOFED, state, NOW)) == PER_SET


def test_held_options_data_over_the_budget_is_dropped_and_counted() -> None:
    scope, options = [IE(149, 4)], [IE(34, 4)]
    option_record = record([*scope, *options], [0, 100])  # 8 bytes: 1 in 100
    opt_data = ipfix_message([flowset(257, option_record * 100)])
    state = DecoderState(limits=Limits(max_replayed_records_per_datagram=150))
    _hold(state, SPOOFED, 3, opt_data)
    opt_template = ipfix_message([flowset(3, ipfix_options_template(257, scope, options))])
    decode_datagram_rows(opt_template, SPOOFED, state, NOW)
    stats = state.statistics()
    # The first set fits, the others would overrun the budget; options replayed late would
    # undo newer announcements, so they go.
    assert stats.counters["options_records"] == 100
    assert stats.pending_dropped_by_reason["replay_cap"] == 2
    assert stats.pending_sets == 0
    flows = decode_datagram(
        ipfix_message([flowset(2, ipfix_template(256, F)), flowset(256, REC)]), SPOOFED, state, NOW
    )
    assert [f.sampling_interval for f in flows] == [100]
