"""NetFlow v5: header fields, time math, sampling field and provenance, refusal."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from overflowd.wire import DecoderState, TruncatedError, decode_datagram
from overflowd.wire.netflow_v5 import HEADER, RECORD, header_sampling
from overflowd.wire.reader import MalformedError

NOW = 1_700_000_000.0


def v5(
    records: list[dict[str, int]],
    *,
    uptime: int = 10_000_000,
    secs: int = 1_700_000_000,
    nsecs: int = 250_000_000,
    sampling: int = 0,
    engine: tuple[int, int] = (1, 2),
    count: int | None = None,
) -> bytes:
    head = struct.pack(
        "!HHIIIIBBH",
        5,
        len(records) if count is None else count,
        uptime,
        secs,
        nsecs,
        77,
        engine[0],
        engine[1],
        sampling,
    )
    body = b""
    for r in records:
        body += struct.pack(
            "!IIIHHIIIIHHBBBBHHBBH",
            r.get("src", 0xC0000201),
            r.get("dst", 0xC6336401),
            0,
            1,
            2,
            r.get("packets", 10),
            r.get("bytes", 1000),
            r.get("first", 9_999_000),
            r.get("last", 9_999_500),
            r.get("sport", 1234),
            r.get("dport", 80),
            0,
            r.get("flags", 0x1B),
            r.get("proto", 6),
            r.get("tos", 0x10),
            r.get("src_as", 64500),
            r.get("dst_as", 64501),
            24,
            16,
            0,
        )
    return head + body


def test_structs_are_the_documented_sizes() -> None:
    assert HEADER.size == 24
    assert RECORD.size == 48


def test_fields_and_absolute_times() -> None:
    [rec] = decode_datagram(v5([{}]), "192.0.2.9", DecoderState(), NOW)
    assert rec.src == IPv4Address("192.0.2.1")
    assert rec.dst == IPv4Address("198.51.100.1")
    assert (rec.sport, rec.dport, rec.proto, rec.tcp_flags, rec.tos) == (1234, 80, 6, 0x1B, 0x10)
    assert (rec.packets, rec.bytes, rec.src_as, rec.dst_as) == (10, 1000, 64500, 64501)
    export_ms = 1_700_000_000_250
    assert rec.first == export_ms - 1000
    assert rec.last == export_ms - 500
    assert rec.observation_domain == (1 << 8) | 2
    assert rec.exporter == "192.0.2.9"
    assert rec.format == "netflow-v5"
    rec.validate()


def test_uptime_wrap_keeps_times_right() -> None:
    # The exporter's 32-bit uptime wrapped between the flow's start and the export.
    datagram = v5([{"first": 0xFFFFFF00, "last": 0x10}], uptime=0x100)
    [rec] = decode_datagram(datagram, "192.0.2.9", DecoderState(), NOW)
    export_ms = 1_700_000_000_250
    assert rec.first == export_ms - (0x100 + 0x100)
    assert rec.last == export_ms - (0x100 - 0x10)


@pytest.mark.parametrize(
    ("field", "interval", "provenance"),
    [
        (0, 1, "assumed"),
        ((1 << 14) | 100, 100, "announced"),
        ((2 << 14) | 1000, 1000, "announced"),
        (64, 64, "announced"),  # interval without a mode: still what the exporter says
    ],
)
def test_header_sampling(field: int, interval: int, provenance: str) -> None:
    [rec] = decode_datagram(v5([{}], sampling=field), "192.0.2.9", DecoderState(), NOW)
    assert (rec.sampling_interval, rec.sampling_provenance) == (interval, provenance)


def test_header_sampling_split() -> None:
    assert header_sampling((1 << 14) | 0x3FFF) == (1, 0x3FFF)


def test_override_wins_over_announced() -> None:
    state = DecoderState(overrides={"192.0.2.9": 512})
    [rec] = decode_datagram(v5([{}], sampling=(1 << 14) | 100), "192.0.2.9", state, NOW)
    assert (rec.sampling_interval, rec.sampling_provenance) == (512, "overridden")
    [rec] = decode_datagram(v5([{}]), "192.0.2.10", state, NOW)
    assert rec.sampling_provenance == "assumed"


def test_override_validation_and_normalization() -> None:
    with pytest.raises(ValueError):
        DecoderState(overrides={"192.0.2.9": 0})
    state = DecoderState(overrides={"::ffff:192.0.2.9": 8})
    [rec] = decode_datagram(v5([{}]), "192.0.2.9", state, NOW)
    assert rec.sampling_interval == 8


def test_count_larger_than_the_records_is_truncation() -> None:
    state = DecoderState()
    with pytest.raises(TruncatedError) as info:
        decode_datagram(v5([{}, {}], count=3), "192.0.2.9", state, NOW)
    assert info.value.fmt == "netflow-v5"
    assert info.value.exporter == "192.0.2.9"
    assert info.value.offset == 24
    stats = state.statistics()
    assert stats.malformed == {"netflow-v5/truncated": 1}
    assert stats.exporters["192.0.2.9"].malformed == 1


def test_trailing_bytes_are_counted_not_fatal() -> None:
    state = DecoderState()
    records = decode_datagram(v5([{}]) + b"\0\0\0\0", "192.0.2.9", state, NOW)
    assert len(records) == 1
    assert state.statistics().defects == {"netflow-v5/trailing_bytes": 1}


def test_bad_nanoseconds_are_malformed() -> None:
    with pytest.raises(MalformedError):
        decode_datagram(v5([{}], nsecs=2_000_000_000), "192.0.2.9", DecoderState(), NOW)


def test_empty_datagram_is_fine() -> None:
    assert decode_datagram(v5([]), "192.0.2.9", DecoderState(), NOW) == []


def test_address_cache_is_bounded() -> None:
    from overflowd.wire.templates import Limits

    state = DecoderState(limits=Limits(address_cache_size=4))
    for i in range(20):
        decode_datagram(v5([{"src": i, "dst": i + 100}]), "192.0.2.9", state, NOW)
        assert len(state.v4_cache) <= 4 + 2 * 30
    [rec] = decode_datagram(v5([{"src": 7}]), "192.0.2.9", state, NOW)
    assert rec.src == IPv4Address(7)


def test_override_matches_ipv4_mapped_exporter_names() -> None:
    state = DecoderState(overrides={"192.0.2.9": 16})
    [rec] = decode_datagram(v5([{}]), "::ffff:192.0.2.9", state, NOW)
    assert (rec.sampling_interval, rec.sampling_provenance) == (16, "overridden")
