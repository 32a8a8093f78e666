"""Capture files: pcap (µs/ns, both byte orders), pcapng, link types, UDP extraction, and a
truncated last frame that is counted, not fatal."""

from __future__ import annotations

import io
import struct

import pytest

from overflowd.wire import CaptureReader, MalformedError, UnsupportedError, WireDecodeError
from overflowd.wire.pcap import Frame, udp_from_frame
from tests.unit.test_wire_encoder import (
    ethernet,
    ipv4,
    ipv6,
    pcap_file,
    pcapng_file,
    tcp,
    udp,
    udp_frame,
)

FRAMES = [
    (1_700_000_000.25, udp_frame("192.0.2.1", "192.0.2.2", 40000, 2055, b"first")),
    (1_700_000_001.5, udp_frame("2001:db8::1", "2001:db8::2", 40001, 4739, b"second" * 100)),
    (1_700_000_002.0, ethernet(ipv4("192.0.2.1", "192.0.2.2", 6, tcp(1, 2, 2)), 0x0800)),
]


def datagrams(data: bytes, **kw: object) -> tuple[list[tuple[object, ...]], CaptureReader]:
    reader = CaptureReader()
    out = [tuple(d) for d in reader.udp_datagrams(data, **kw)]  # type: ignore[arg-type]
    return out, reader


@pytest.mark.parametrize(
    "capture",
    [
        pcap_file(FRAMES),
        pcap_file(FRAMES, big_endian=True),
        pcap_file(FRAMES, nanos=True),
        pcapng_file(FRAMES),
        pcapng_file(FRAMES, tsresol=9),
    ],
    ids=["pcap-le-us", "pcap-be-us", "pcap-ns", "pcapng-us", "pcapng-ns"],
)
def test_formats_give_the_same_udp_datagrams(capture: bytes) -> None:
    got, reader = datagrams(capture)
    assert got == [
        (pytest.approx(1_700_000_000.25), "192.0.2.1", 40000, 2055, b"first", "192.0.2.2"),
        (
            pytest.approx(1_700_000_001.5),
            "2001:db8::1",
            40001,
            4739,
            b"second" * 100,
            "2001:db8::2",
        ),
    ]
    stats = reader.statistics()
    assert (stats.frames, stats.udp_datagrams, stats.not_udp, stats.truncated_frames) == (
        3,
        2,
        1,
        0,
    )


def test_file_object_and_byte_by_byte_feeding_agree() -> None:
    capture = pcapng_file(FRAMES)
    whole, _ = datagrams(capture)
    reader = CaptureReader()
    assert [tuple(d) for d in reader.udp_datagrams(io.BytesIO(capture))] == whole
    reader = CaptureReader()
    frames = []
    for i in range(len(capture)):
        reader.receive_data(capture[i : i + 1])
        while (frame := reader.next_frame()) is not None:
            frames.append(frame)
    reader.end_of_input()
    assert len(frames) == 3
    assert reader.statistics().truncated_frames == 0


@pytest.mark.parametrize("make", [pcap_file, pcapng_file], ids=["pcap", "pcapng"])
def test_truncated_last_frame_is_counted_not_fatal(make: object) -> None:
    capture = make(FRAMES[:2])  # type: ignore[operator]
    for cut in (1, 10, 100):
        got, reader = datagrams(capture[:-cut])
        assert len(got) == 1
        stats = reader.statistics()
        assert stats.truncated_frames == 1
        assert stats.truncated_bytes > 0


def test_port_filter_and_skips_are_counted() -> None:
    got, reader = datagrams(pcap_file(FRAMES), port=4739)
    assert [d[3] for d in got] == [4739]
    assert reader.statistics().other_port == 1


def test_fragments_and_snaplen_cuts_are_incomplete() -> None:
    whole = ipv4("192.0.2.1", "192.0.2.2", 17, udp(1, 2, b"x" * 100))
    fragment = bytearray(whole)
    fragment[6:8] = struct.pack("!H", 0x2000)  # more fragments, offset 0 — but cut short
    frames = [(1.0, ethernet(bytes(fragment[:60]), 0x0800)), (2.0, ethernet(whole, 0x0800)[:50])]
    got, reader = datagrams(pcap_file(frames))
    assert got == []
    assert reader.statistics().udp_incomplete == 2


@pytest.mark.parametrize(
    ("linktype", "frame"),
    [
        (101, ipv4("192.0.2.1", "192.0.2.2", 17, udp(7, 8, b"raw"))),
        (229, ipv6("2001:db8::1", "2001:db8::2", 17, udp(7, 8, b"raw"))),
        (113, bytes(14) + b"\x08\x00" + ipv4("192.0.2.1", "192.0.2.2", 17, udp(7, 8, b"raw"))),
        (276, b"\x86\xdd" + bytes(18) + ipv6("2001:db8::1", "2001:db8::2", 17, udp(7, 8, b"raw"))),
        (0, b"\x02\x00\x00\x00" + ipv4("192.0.2.1", "192.0.2.2", 17, udp(7, 8, b"raw"))),
        (1, ethernet(ipv4("192.0.2.1", "192.0.2.2", 17, udp(7, 8, b"raw")), 0x0800, vlans=[5])),
    ],
)
def test_link_types(linktype: int, frame: bytes) -> None:
    got, _ = datagrams(pcap_file([(1.0, frame)], linktype=linktype))
    assert [(d[2], d[3], d[4]) for d in got] == [(7, 8, b"raw")]


def test_unknown_link_type_is_skipped() -> None:
    got, reader = datagrams(pcap_file([(1.0, b"\0" * 40)], linktype=147))
    assert got == [] and reader.statistics().not_ip == 1


def test_not_a_capture_and_empty_input_are_errors() -> None:
    with pytest.raises(UnsupportedError) as info:
        datagrams(b"hello, world, this is text")
    assert info.value.offset == 0
    with pytest.raises(WireDecodeError):
        datagrams(b"")


def test_corrupt_pcapng_block_is_malformed_with_offset() -> None:
    capture = bytearray(pcapng_file(FRAMES))
    shb_length = struct.unpack_from("<I", capture, 4)[0]
    struct.pack_into("<I", capture, shb_length + 4, 13)  # IDB length not a multiple of 4
    with pytest.raises(MalformedError) as info:
        datagrams(bytes(capture))
    assert info.value.offset == shb_length + 4
    assert info.value.fmt == "pcapng"


def test_absurd_record_length_is_refused_not_buffered() -> None:
    capture = pcap_file([]) + struct.pack("<IIII", 0, 0, 1 << 30, 1 << 30)
    with pytest.raises(MalformedError):
        datagrams(capture)


def test_udp_from_frame_on_ip_garbage_raises_our_error() -> None:
    with pytest.raises(WireDecodeError):
        udp_from_frame(Frame(0.0, 101, b"\x4f" + bytes(10), 11))
