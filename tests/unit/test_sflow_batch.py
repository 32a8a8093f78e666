"""sFlow v5 in batches (overflowd.wire.sflow_batch): the array path gives what the scalar
decoder gives — rows in order, refusals, state, probabilities — and takes the common case."""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from overflowd.errors import DecodeError
from overflowd.flows import PROVENANCES, FlowRow
from overflowd.flowsample import SamplingPolicy, probability
from overflowd.flowsample_batch import BatchSampler
from overflowd.wire import DecoderState, decode_datagram_rows
from overflowd.wire.sflow_batch import MAX_FAST_SAMPLES, SFlowBatch, decode_sflow_batch
from tests.unit.test_wire_encoder import (
    ethernet,
    ipv4,
    ipv6,
    sflow_counter_sample,
    sflow_datagram,
    sflow_flow_sample,
    sflow_gateway,
    sflow_raw_header,
    sflow_unknown_record,
    tcp,
    udp,
    v9_packet,
)

Datagram = tuple[bytes, str, float]
EXPORTER = "192.0.2.77"
NOW = 1_700_000_000.123


def scalar(datagrams: Sequence[Datagram], state: DecoderState) -> tuple[list[FlowRow], list]:
    rows: list[FlowRow] = []
    errors: list[tuple[int, DecodeError]] = []
    for i, (data, exporter, now) in enumerate(datagrams):
        try:
            rows.extend(decode_datagram_rows(data, exporter, state, now))
        except DecodeError as exc:
            errors.append((i, exc))
    return rows, errors


def assert_equivalent(
    datagrams: Sequence[Datagram], batch_size: int = 256, state: DecoderState | None = None
) -> list[SFlowBatch]:
    """Scalar and array paths over ``datagrams`` (in batches): same rows, errors, state.

    Non-sFlow datagrams passed over by the batch are decoded the scalar way after it, as the
    node does with what it passes on."""
    scalar_state = DecoderState() if state is None else state
    batch_state = DecoderState()
    expected, expected_errors = scalar(datagrams, scalar_state)
    rows: list[FlowRow] = []
    errors: list[tuple[int, DecodeError]] = []
    batches = []
    for start in range(0, max(1, len(datagrams)), batch_size):
        chunk = datagrams[start : start + batch_size]
        batch = decode_sflow_batch(chunk, batch_state)
        assert batch.failures == ()
        by_datagram: dict[int, list[FlowRow]] = {}
        arrays = batch.rows(np.arange(len(batch)))
        for i, row in zip(batch.datagram.tolist(), arrays, strict=True):
            by_datagram.setdefault(i, []).append(row)
        for i, got in batch.scalar:
            by_datagram[i] = got
        for i, exc in batch.errors:
            errors.append((start + i, exc))
        for i in batch.passed:
            data, exporter, now = chunk[i]
            try:
                by_datagram[i] = decode_datagram_rows(data, exporter, batch_state, now)
            except DecodeError as exc:
                errors.append((start + i, exc))
        assert batch.all_rows_in_order() == [
            r for i in sorted(by_datagram) if i not in batch.passed for r in by_datagram[i]
        ]
        rows.extend(r for i in sorted(by_datagram) for r in by_datagram[i])
        batches.append(batch)
    assert rows == expected
    errors.sort(key=lambda e: e[0])
    assert [(i, type(e), str(e), e.offset, e.exporter) for i, e in errors] == [
        (i, type(e), str(e), e.offset, e.exporter) for i, e in expected_errors
    ]
    assert batch_state.statistics() == scalar_state.statistics()
    return batches


def raw(frame: bytes, *, keep: int = 128, extra: int = 4, protocol: int = 1) -> bytes:
    return sflow_raw_header(frame[:keep], frame_length=len(frame) + extra, protocol=protocol)


def flow(*records: bytes, rate: int = 1000, expanded: bool = False) -> bytes:
    return sflow_flow_sample(list(records), rate=rate, expanded=expanded)


V4_TCP = ethernet(ipv4("198.51.100.1", "203.0.113.9", 6, tcp(443, 40001, 0x02, b"x" * 900)), 0x0800)
V4_UDP = ethernet(
    ipv4("198.51.100.2", "203.0.113.9", 17, udp(53, 40002, b"d" * 500), tos=0xB8), 0x0800
)
V6_TCP = ethernet(
    ipv6("2001:db8::1", "2001:db8:1::2", 6, tcp(80, 50000, 0x18, b"w" * 1200), tclass=0x2E),
    0x86DD,
)
V4_ICMP = ethernet(ipv4("192.0.2.1", "192.0.2.2", 1, bytes([8, 0]) + b"\0" * 30), 0x0800)
V6_ICMP = ethernet(ipv6("2001:db8::1", "2001:db8::2", 58, bytes([128, 0]) + b"\0" * 30), 0x86DD)
QINQ = ethernet(ipv4("192.0.2.3", "192.0.2.4", 17, udp(123, 9, b"n" * 40)), 0x0800, vlans=[10, 20])
VLAN6 = ethernet(ipv6("2001:db8::5", "2001:db8::6", 17, udp(1, 2, b"")), 0x86DD, vlans=[7])


def ipv4_options() -> bytes:
    packet = bytearray(ipv4("192.0.2.7", "192.0.2.8", 6, tcp(1, 2, 0x11)))
    packet[0] = 0x46  # IHL 6: one word of options
    return ethernet(bytes(packet[:20]) + b"\x01\x01\x01\x00" + bytes(packet[20:]), 0x0800)


def fragment() -> bytes:
    packet = bytearray(ipv4("192.0.2.9", "192.0.2.10", 17, udp(53, 53, b"f" * 20)))
    packet[6:8] = struct.pack("!H", 0x0010)  # fragment offset 16: no UDP header in it
    return ethernet(bytes(packet), 0x0800)


def tso() -> bytes:
    packet = bytearray(ipv4("192.0.2.11", "192.0.2.12", 6, tcp(22, 2222, 0x10, b"t" * 100)))
    packet[2:4] = b"\0\0"  # total length 0 (segmentation offload): the frame length counts
    return ethernet(bytes(packet), 0x0800)


def tso6() -> bytes:
    packet = bytearray(ipv6("2001:db8::7", "2001:db8::8", 6, tcp(22, 2222, 0x10, b"t" * 100)))
    packet[4:6] = b"\0\0"  # payload length 0 (offload, or a jumbogram): the frame counts
    return ethernet(bytes(packet), 0x86DD)


def short_total() -> bytes:
    """A 20-byte IPv4 datagram (total length 20) in a frame padded with non-zero bytes: the
    IP length, not the frame, says where the transport would be."""
    return ethernet(ipv4("192.0.2.13", "192.0.2.14", 6, b"")[:20] + tcp(7, 8, 0x02), 0x0800)


def raw_overlong(frame: bytes, keep: int) -> bytes:
    """A raw header record whose header length is ``keep`` but whose body goes on with the
    rest of the frame: bytes past the header length are the record's padding, never read."""
    tail = frame[:140]
    body = struct.pack("!IIII", 1, len(frame) + 4, 4, keep) + tail + bytes(-len(tail) % 4)
    if keep > len(tail):
        body += bytes(keep - len(tail) + (-keep % 4))
    return struct.pack("!II", 1, len(body)) + body


COMMON = [
    flow(raw(V4_TCP)),
    flow(sflow_unknown_record(1001, bytes(16)), raw(V4_UDP), rate=0),
    flow(raw(V6_TCP), rate=4096, expanded=True),
    flow(raw(V4_ICMP)),
    flow(raw(V6_ICMP)),
    flow(raw(QINQ)),
    flow(raw(VLAN6)),
    flow(raw(ipv4_options())),
    flow(raw(fragment())),
    flow(raw(tso(), keep=60)),
    flow(raw(short_total())),
    flow(raw(tso6(), keep=80)),
    flow(raw(V4_TCP, keep=40)),  # cut inside TCP: ports, no flags
    flow(raw(V4_TCP, keep=36)),  # cut after the IP header: no ports
    flow(raw(V4_TCP[14:], protocol=11)),  # bare IPv4
    flow(raw(V6_TCP[14:], protocol=12)),  # bare IPv6
    flow(raw(V4_TCP), raw(V6_TCP)),  # the first description counts
    flow(sflow_unknown_record(1002, bytes(8))),  # no description: counted
    sflow_counter_sample(),
    struct.pack("!II", (9 << 12) | 1, 4) + b"\0\0\0\0",  # enterprise 9: unknown
]


def test_the_common_case_goes_the_array_way_and_equals_the_scalar_path() -> None:
    datagrams = [
        (sflow_datagram(COMMON[k : k + 6], sub_agent=k, agent=agent), exporter, NOW + k)
        for k in range(0, len(COMMON), 3)
        for agent, exporter in (("192.0.2.10", EXPORTER), ("2001:db8::10", "2001:db8::77"))
    ]
    [batch] = assert_equivalent(datagrams)
    assert batch.scalar == () and batch.errors == () and batch.passed == ()
    rows = batch.rows(np.arange(len(batch)))
    assert len(rows) == 2 * sum(
        len(COMMON[k : k + 6]) - sum(s in COMMON[-3:] for s in COMMON[k : k + 6])
        for k in range(0, len(COMMON), 3)
    )
    # Spot checks against the scalar decoder's own tests (test_wire_sflow.py).
    r = rows[0]
    assert (r.src, r.dst, r.sport, r.dport, r.proto, r.tcp_flags, r.bytes) == (
        ipaddress.ip_address("198.51.100.1"),
        ipaddress.ip_address("203.0.113.9"),
        443,
        40001,
        6,
        0x02,
        20 + 20 + 900,
    )
    v6 = [r for r in rows if r.src.version == 6]
    assert v6 and all(r.format == "sflow-v5" and r.src_as is None for r in v6)


def test_odd_datagrams_go_the_scalar_way_whole_and_agree() -> None:
    arp = ethernet(bytes(28), 0x0806)
    mpls = ethernet(struct.pack("!I", 0x100) + V4_TCP[14:], 0x8847)
    hop = ipv6("2001:db8::1", "2001:db8::2", 0, bytes([17, 0]) + bytes(6) + udp(1, 2, b""))
    sampled_v4 = struct.pack(
        "!II4s4sIIII", 84, 1, bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]), 0, 0x0800, 0, 0
    )
    odd = [
        flow(raw(V4_TCP), sflow_gateway(64500, [1, 2])),  # AS numbers: scalar
        flow(sflow_unknown_record(3, sampled_v4)),
        flow(raw(arp), raw(V4_TCP)),  # non-IP first: the next description is tried
        flow(raw(mpls)),
        flow(raw(ethernet(hop, 0x86DD))),
        flow(raw(V4_TCP, keep=20)),  # cut inside the IP header: undecodable
        flow(raw(V4_TCP, protocol=7)),  # unsupported header protocol
        flow(raw(ethernet(ipv4("192.0.2.1", "192.0.2.2", 6, b""), 0x0800), keep=16)),
        flow(raw(V4_TCP, keep=13)),  # shorter than an Ethernet header
        # A header length past the record's end (by less than the record's own 16 bytes).
        flow(sflow_unknown_record(1, struct.pack("!IIII", 1, 1000, 4, 50) + V4_TCP[:40])),
    ]
    good = sflow_datagram([flow(raw(V4_UDP))])
    datagrams = [(good, EXPORTER, NOW)]
    datagrams += [(sflow_datagram([flow(raw(V4_TCP)), s]), EXPORTER, NOW) for s in odd]
    datagrams += [
        (good + b"\0\0\0\0", EXPORTER, NOW),  # trailing padding
        (good + b"\1\0\0\0", EXPORTER, NOW),  # trailing bytes
        (good[:-4], EXPORTER, NOW),  # truncated
        (good + b"\0", EXPORTER, NOW),  # not a multiple of 4
        (sflow_datagram([]), EXPORTER, NOW),
        (sflow_datagram([flow(raw(V4_UDP))] * (MAX_FAST_SAMPLES + 1)), EXPORTER, NOW),
        (struct.pack("!II", 5, 7) + bytes(40), EXPORTER, NOW),  # agent address type 7
        (b"\0\0\0\5", EXPORTER, NOW),
        (b"\0\0\0\6" + bytes(40), EXPORTER, NOW),  # not sFlow v5: passed on
        (b"\0\x05" + bytes(22), EXPORTER, NOW),  # NetFlow v5 header: passed on
    ]
    [batch] = assert_equivalent(datagrams)
    assert batch.datagram.tolist() == [0] and len(batch) == 1
    assert {i for i, _ in batch.scalar} >= set(range(1, len(odd) + 1))
    assert batch.passed == (len(datagrams) - 2, len(datagrams) - 1)


def test_state_across_batches_exporters_overrides_and_the_exporter_cap() -> None:
    from overflowd.wire.templates import Limits

    datagrams = []
    for k in range(40):
        samples = [COMMON[(k + j) % len(COMMON)] for j in range(k % 5)]
        if k % 7 == 3:
            samples.append(flow(raw(V4_TCP), sflow_gateway(1, [2])))
        datagrams.append((sflow_datagram(samples, sub_agent=k % 3), f"192.0.2.{k % 9}", NOW + k))
    overrides = {"192.0.2.3": 64}
    limits = Limits(max_exporters_tracked=4)
    for size in (1, 5, 256):
        scalar_state = DecoderState(overrides=overrides, limits=limits)
        batch_state = DecoderState(overrides=overrides, limits=limits)
        expected, _ = scalar(datagrams, scalar_state)
        rows: list[FlowRow] = []
        for start in range(0, len(datagrams), size):
            rows.extend(
                decode_sflow_batch(datagrams[start : start + size], batch_state).all_rows_in_order()
            )
        assert rows == expected
        assert batch_state.statistics() == scalar_state.statistics()
        assert "other" in batch_state.statistics().exporters
        assert {r.sampling_provenance for r in rows} == {"announced", "overridden", "assumed"}


def test_held_v9_data_expires_by_each_datagrams_arrival_as_on_the_scalar_path() -> None:
    """With v9 data held for a template, every sFlow datagram (array way or not) expires it
    by its own arrival time, in arrival order (the clock goes back and forth; one datagram
    on the array way, at +6 s, is past the 5 s limit of the oldest held set, and no other
    datagram is); the exporter cap falls on the same exporters."""
    from overflowd.wire.templates import Limits

    held = [
        (v9_packet([struct.pack("!HH", 300 + k, 12) + bytes(8)], source_id=k), t)
        for k, t in enumerate((NOW, NOW + 3, NOW - 2))
    ]
    good = [sflow_datagram(COMMON[k : k + 4], sub_agent=k) for k in range(0, 12, 3)]
    odd = [good[0][:-1], good[1][:-8], sflow_datagram([flow(raw(V4_TCP), sflow_gateway(1, [2]))])]
    offsets = [1, -1, 2, 0, 1, 0, 2, 4, 6, 1]  # k % 7 >= 4: odd, the scalar way
    stream = [
        ((good + odd)[k % 7], f"192.0.2.{k % 3}", NOW + offset) for k, offset in enumerate(offsets)
    ]
    for size in (1, 3, 10):
        for cap in (2, 100):
            limits = Limits(pending_max_age_s=5.0, max_exporters_tracked=cap)
            states = DecoderState(limits=limits), DecoderState(limits=limits)
            for s in states:
                for k, (data, t) in enumerate(held):
                    decode_datagram_rows(data, f"198.51.100.{k}", s, t)
            expected, _ = scalar(stream, states[0])
            rows: list[FlowRow] = []
            for start in range(0, len(stream), size):
                batch = decode_sflow_batch(stream[start : start + size], states[1])
                rows.extend(batch.all_rows_in_order())
            assert rows == expected
            assert states[1].statistics() == states[0].statistics()
            assert states[1].statistics().pending_dropped_by_reason["expired"] == 1


def test_empty_and_non_sflow_batches() -> None:
    state = DecoderState()
    batch = decode_sflow_batch([], state)
    assert len(batch) == 0 and batch.passed == ()
    batch = decode_sflow_batch([(b"\0\x09" + bytes(18), EXPORTER, NOW)], state)
    assert len(batch) == 0 and batch.passed == (0,)
    assert state.statistics() == DecoderState().statistics()


def test_p_of_every_record_is_flowsample_probability() -> None:
    datagrams = [(sflow_datagram(COMMON[k : k + 8]), EXPORTER, NOW) for k in range(len(COMMON))]
    batch = decode_sflow_batch(datagrams, DecoderState())
    rows = batch.rows(np.arange(len(batch)))
    assert any(r.src.version == 6 for r in rows)
    address_free = SamplingPolicy(rate=1e-3)
    assert not batch.needs_scalar_ipv6(address_free)
    expected = np.array([probability(r, address_free) for r in rows])
    got = BatchSampler(address_free, np.random.default_rng(0)).probabilities(batch)
    assert np.array_equal(got, expected)
    prefixes = (
        (ipaddress.ip_network("198.51.100.0/24"), 3.0),
        (ipaddress.ip_network("0.0.0.0/0"), 0.5),  # must not touch IPv6 records
        (ipaddress.ip_network("2001:db8::/48"), 5.0),
    )
    for policy in (
        SamplingPolicy(rate=1e-2, operator_prefixes=prefixes, boost_cap=20.0),
        SamplingPolicy(rate=1e-3, asked_boost=lambda a: 2.0 if int(a) % 3 == 0 else None),
    ):
        assert batch.needs_scalar_ipv6(policy)
        v4 = batch.ipv4()
        assert len(v4) + len(batch.ipv6_rows()) == len(batch)
        v4_rows = v4.rows(np.arange(len(v4)))
        assert v4_rows == [r for r in rows if r.src.version == 4]
        assert batch.ipv6_rows() == [r for r in rows if r.src.version == 6]
        expected = np.array([probability(r, policy) for r in v4_rows])
        got = BatchSampler(policy, np.random.default_rng(0)).probabilities(v4)
        assert np.array_equal(got, expected)


def assert_columns_are_the_rows(batch: SFlowBatch) -> None:
    """Every column read as an array (the ones decoded with the batch and the ones decoded
    when first asked for) says what the rows say."""
    rows = batch.rows(np.arange(len(batch)))
    assert len(rows) == len(batch)
    v6 = [r.src.version == 6 for r in rows]
    assert batch.v6_slot.tolist() == [sum(v6[:i]) if is6 else -1 for i, is6 in enumerate(v6)]
    for i, r in enumerate(rows):
        slot = int(batch.v6_slot[i])
        if slot >= 0:
            assert (bytes(batch.src6[slot]), bytes(batch.dst6[slot])) == (
                r.src.packed,
                r.dst.packed,
            )
            assert int(batch.src[i]) == int(batch.dst[i]) == 0
        else:
            assert (int(batch.src[i]), int(batch.dst[i])) == (int(r.src), int(r.dst))
    columns = {
        "sport": [r.sport for r in rows],
        "dport": [r.dport for r in rows],
        "proto": [r.proto for r in rows],
        "packets": [r.packets for r in rows],
        "bytes": [r.bytes for r in rows],
        "first": [r.first for r in rows],
        "last": [r.last for r in rows],
        "tcp_flags": [r.tcp_flags for r in rows],
        "tos": [r.tos for r in rows],
        "interval": [r.sampling_interval for r in rows],
        "domain": [r.observation_domain for r in rows],
    }
    for name, expected in columns.items():
        assert getattr(batch, name).tolist() == expected, name
    assert [batch.exporters[e] for e in batch.exporter.tolist()] == [r.exporter for r in rows]
    assert [PROVENANCES[k] for k in batch.provenance.tolist()] == [
        r.sampling_provenance for r in rows
    ]


def test_every_column_read_as_an_array_is_what_the_rows_say() -> None:
    mixed = [
        flow(raw(V4_TCP), rate=512),
        flow(raw(V6_TCP), rate=4096, expanded=True),
        flow(raw(tso(), keep=60)),
        flow(raw(tso6(), keep=80)),
        flow(raw(V4_ICMP)),
        flow(raw(V6_ICMP)),
        flow(raw(QINQ)),
        flow(raw(fragment())),
    ]
    datagrams = [
        (sflow_datagram(mixed[k:] + mixed[:k], sub_agent=k), f"192.0.2.{k % 3}", NOW + k / 7)
        for k in range(len(mixed))
    ]
    # A datagram that is not sFlow among them: the sFlow ones are walked as a subset, and
    # their indices in the input are kept.
    datagrams.insert(3, (b"\0\x09" + bytes(18), EXPORTER, NOW))
    [batch] = assert_equivalent(datagrams)
    assert batch.passed == (3,)
    assert 3 not in batch.datagram.tolist() and max(batch.datagram.tolist()) == len(mixed)
    assert_columns_are_the_rows(batch)
    # A selection reads its columns from the same datagrams.
    some = np.zeros(len(batch), dtype=bool)
    some[::3] = True
    part = batch.select(some)
    assert part.rows(np.arange(len(part))) == batch.rows(np.flatnonzero(some))
    assert part.datagram.tolist() == batch.datagram[some].tolist()
    assert_columns_are_the_rows(part)
    assert_columns_are_the_rows(batch.ipv4())
    # The same datagrams all sFlow (joined and walked at once) give the same columns.
    del datagrams[3]
    [whole] = assert_equivalent(datagrams)
    assert_columns_are_the_rows(whole)
    assert whole.rows(np.arange(len(whole))) == batch.rows(np.arange(len(batch)))
    # Arrival times past 2**62 ms (but inside int64): int() per datagram, not the cast.
    far_now = 6.9e15
    [far] = assert_equivalent([(d, e, far_now + k) for k, (d, e, _) in enumerate(datagrams)])
    assert_columns_are_the_rows(far)
    assert far.first.tolist()[0] == int(far_now * 1000)


def test_samples_described_alike_and_one_that_is_not() -> None:
    """The records of every flow sample laid out as the first one's (checked at once, not
    walked) and, one at a time, a sample that differs from them in one way."""
    switch = sflow_unknown_record(1001, bytes(16))
    alike = [flow(switch, raw(frame, keep=64)) for frame in (V4_TCP, V4_UDP, V6_TCP, QINQ)]
    same_length = sflow_unknown_record(1002, bytes(16))  # another kind, same length
    short = bytearray(flow(switch, raw(V4_TCP, keep=64)))
    short[4:8] = struct.pack("!I", len(short) - 8 - 4)  # the sample ends before its records
    odd = [
        flow(same_length, raw(V4_UDP, keep=64)),  # a kind differs: not a description
        flow(raw(V4_UDP, keep=64), switch),  # the same records in another order
        flow(switch, raw(V4_UDP, keep=60)),  # a length differs
        flow(switch, raw(V4_UDP, keep=64), switch),  # one more record
        flow(switch, sflow_gateway(1, [2])),  # an extended gateway: the scalar way
        bytes(short[:-4]),  # its records run past its end
        flow(switch, raw(V4_UDP, keep=64), rate=7, expanded=True),  # alike, expanded
        flow(switch, switch),  # no description in any of them
    ]
    for sample in [None, *odd]:
        samples = alike if sample is None else [*alike[:2], sample, *alike[2:]]
        datagrams = [
            (sflow_datagram(samples[k:] + samples[:k]), EXPORTER, NOW + k)
            for k in range(len(samples))
        ]
        [batch] = assert_equivalent(datagrams)
        assert_columns_are_the_rows(batch)
    # Three records: the middle one's length moves the last; the last one's, nothing.
    three = [flow(switch, raw(frame, keep=64), switch) for frame in (V4_TCP, V6_TCP, QINQ)]
    misaligned = bytearray(flow(switch, raw(V4_UDP, keep=64), switch))
    misaligned[-20:-16] = struct.pack("!I", 15)  # the last record's length
    for sample in (
        flow(switch, raw(V4_UDP, keep=60), switch),
        flow(switch, raw(V4_UDP, keep=64), sflow_unknown_record(1001, bytes(40))),
        bytes(misaligned),  # the last record's length is not whole words
    ):
        stream = [sflow_datagram([*three, sample, *three])]
        [batch] = assert_equivalent([(d, EXPORTER, NOW) for d in stream])
        assert_columns_are_the_rows(batch)
    # Every sample alike, none describing its packet; all with the gateway record.
    for samples in ([flow(switch, switch)] * 3, [flow(raw(V4_TCP), sflow_gateway(1, [2]))] * 3):
        assert_equivalent([(sflow_datagram(samples), EXPORTER, NOW)])


def test_datagrams_laid_out_alike_and_one_that_is_not() -> None:
    """Datagrams whose samples have the first one's lengths (checked at once, not walked),
    and among them, one at a time, a datagram that differs in one way."""
    samples = [flow(raw(V4_TCP, keep=64)), flow(raw(V6_TCP, keep=64)), sflow_counter_sample()]
    good = sflow_datagram(samples)
    other = sflow_datagram([samples[0], flow(raw(V6_TCP, keep=60)), samples[2]])
    misaligned = bytearray(good)
    at = len(sflow_datagram([])) + len(samples[0]) + 4
    misaligned[at : at + 4] = struct.pack("!I", len(samples[1]) - 8 - 2)  # not whole words
    odd = [
        other,  # a sample of another length
        good + b"\0\0\0\0",  # bytes after the last sample
        good[:-4],  # the last sample cut short
        bytes(misaligned),
        sflow_datagram(samples, agent="2001:db8::10"),  # a longer header: alike after it
        sflow_datagram(samples[:2]),  # one sample fewer
    ]
    for datagram in [None, *odd]:
        stream = [good] * 4 if datagram is None else [good, good, datagram, good]
        [batch] = assert_equivalent([(d, EXPORTER, NOW + k) for k, d in enumerate(stream)])
        assert_columns_are_the_rows(batch)
        assert set(batch.datagram.tolist()) >= {0, 1, 3}
    # The first datagram the odd one.
    for first in (other, good + b"\0\0\0\0"):
        assert_equivalent([(d, EXPORTER, NOW) for d in (first, good, good)])


# -- generated datagrams -----------------------------------------------------------------------

FRAMES = [
    V4_TCP,
    V4_UDP,
    V6_TCP,
    V4_ICMP,
    V6_ICMP,
    QINQ,
    VLAN6,
    ipv4_options(),
    fragment(),
    tso(),
    tso6(),
    short_total(),
]


@st.composite
def samples(draw: st.DrawFn) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return sflow_counter_sample()
    if kind == 1:
        return struct.pack("!II", draw(st.sampled_from([5, (9 << 12) | 1])), 4) + bytes(4)
    records = []
    for _ in range(draw(st.integers(0, 4))):
        what = draw(st.integers(0, 6))
        if what <= 3:
            frame = draw(st.sampled_from(FRAMES))
            keep = draw(st.integers(0, 140))
            protocol = 1
            if draw(st.integers(0, 9)) == 0:
                frame, protocol = frame[18 if frame[12:14] == b"\x81\x00" else 14 :], 11
            records.append(
                raw(frame, keep=keep, extra=draw(st.integers(-100, 8)) % 2**16, protocol=protocol)
            )
        elif what == 4:
            records.append(
                sflow_unknown_record(draw(st.sampled_from([1001, 1002, 2001])), bytes(8))
            )
        elif what == 5:
            records.append(sflow_gateway(64500, [1]))
        else:
            records.append(sflow_unknown_record(4, bytes(40)))
    return flow(*records, rate=draw(st.sampled_from([0, 1, 512])), expanded=draw(st.booleans()))


@st.composite
def streams(draw: st.DrawFn) -> list[Datagram]:
    out: list[Datagram] = []
    for k in range(draw(st.integers(1, 6))):
        data = bytearray(
            sflow_datagram(
                draw(st.lists(samples(), max_size=6)),
                agent=draw(st.sampled_from(["192.0.2.10", "2001:db8::10"])),
                sub_agent=draw(st.integers(0, 3)),
            )
        )
        for _ in range(draw(st.sampled_from([0, 0, 1, 3]))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        if draw(st.integers(0, 5)) == 0:
            data = data[: draw(st.integers(0, len(data)))]
        exporter = draw(st.sampled_from(["192.0.2.1", "192.0.2.2"]))
        out.append((bytes(data), exporter, NOW + k))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), st.integers(1, 4))
@example([(sflow_datagram([flow(raw(V4_TCP, keep=34))]), EXPORTER, NOW)], 1)
def test_generated_streams_decode_the_same_either_way(stream: list[Datagram], size: int) -> None:
    assert_equivalent(stream, batch_size=size)


@pytest.mark.parametrize("frame", FRAMES, ids=range(len(FRAMES)))
def test_every_header_length_of_every_frame(frame: bytes) -> None:
    datagrams = [
        (sflow_datagram([flow(raw(frame, keep=keep, extra=extra))]), EXPORTER, NOW)
        for keep in range(0, min(len(frame), 140) + 1)
        for extra in (4, -len(frame))
    ]
    datagrams += [
        (sflow_datagram([flow(raw_overlong(frame, keep))]), EXPORTER, NOW)
        for keep in range(0, min(len(frame), 140) + 1)
    ]
    [batch] = assert_equivalent(datagrams, batch_size=len(datagrams))
    # The whole header (either frame length), and the overlong record: the array way.
    cut = min(len(frame), 140)
    whole = {2 * cut, 2 * cut + 1, len(datagrams) - 1}
    assert whole <= set(batch.datagram.tolist())
