"""sFlow v5 round trips (datagrams from the independent encoder) and raw packet headers."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest

from overflowd.wire import DecoderState, MalformedError, TruncatedError, decode_datagram, packet
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
)

EXPORTER = "192.0.2.77"
NOW = 1_700_000_000.5


def v6_tcp_frame() -> bytes:
    segment = tcp(443, 51000, 0x12, b"p" * 1000)  # SYN+ACK with data
    return ethernet(
        ipv6("2001:db8::a", "2001:db8::b", 6, segment, tclass=0x2E), 0x86DD, vlans=[100, 200]
    )


def test_expanded_sample_with_ethernet_vlan_ipv6_tcp() -> None:
    frame = v6_tcp_frame()
    header = frame[:128]  # agents send the first 128 bytes
    sample = sflow_flow_sample(
        [sflow_raw_header(header, frame_length=len(frame) + 4), sflow_gateway(64500, [1, 2, 3])],
        rate=2048,
        expanded=True,
    )
    state = DecoderState()
    [r] = decode_datagram(sflow_datagram([sample], sub_agent=4), EXPORTER, state, NOW)
    r.validate()
    assert r.src == IPv6Address("2001:db8::a") and r.dst == IPv6Address("2001:db8::b")
    assert (r.sport, r.dport, r.proto, r.tcp_flags, r.tos) == (443, 51000, 6, 0x12, 0x2E)
    # One sampled packet standing for 1 in 2048: the IP length from the header, not the frame.
    assert (r.packets, r.bytes) == (1, 40 + 20 + 1000)
    assert (r.sampling_interval, r.sampling_provenance) == (2048, "announced")
    assert (r.src_as, r.dst_as) == (64500, 3)
    assert r.first == r.last == 1_700_000_000_500
    assert (r.exporter, r.observation_domain, r.format) == (EXPORTER, 4, "sflow-v5")


def test_compact_sample_ipv4_udp_and_counters_and_unknowns_skipped() -> None:
    frame = ethernet(
        ipv4("198.51.100.1", "203.0.113.5", 17, udp(123, 40000, b"n" * 400), tos=0xB8), 0x0800
    )
    flow = sflow_flow_sample(
        [
            sflow_unknown_record(1001, b"\0" * 16),  # extended switch: not needed
            sflow_raw_header(frame, frame_length=len(frame) + 4),
        ],
        rate=0,  # nothing announced
    )
    unknown_sample = struct.pack("!II", (9 << 12) | 1, 4) + b"\0\0\0\0"  # enterprise 9
    datagram = sflow_datagram([sflow_counter_sample(), flow, unknown_sample], agent="2001:db8::99")
    state = DecoderState(overrides={"192.0.2.78": 10})
    [r] = decode_datagram(datagram, EXPORTER, state, NOW)
    assert (r.src, r.dst) == (IPv4Address("198.51.100.1"), IPv4Address("203.0.113.5"))
    assert (r.sport, r.dport, r.proto, r.tos, r.bytes) == (123, 40000, 17, 0xB8, 20 + 8 + 400)
    assert (r.sampling_interval, r.sampling_provenance) == (1, "assumed")
    assert r.src_as is None
    counters = state.statistics().counters
    assert counters["sflow.counter_samples"] == 1
    assert counters["sflow.unknown_samples"] == 1
    assert counters["sflow.flow_records_skipped"] == 1
    [r] = decode_datagram(datagram, "192.0.2.78", state, NOW)
    assert (r.sampling_interval, r.sampling_provenance) == (10, "overridden")


def test_sampled_ipv4_record_and_icmp() -> None:
    body = struct.pack(
        "!II4s4sIIII",
        84,
        1,
        IPv4Address("192.0.2.1").packed,
        IPv4Address("192.0.2.2").packed,
        0,
        0x0800,
        0,
        0,
    )
    sample = sflow_flow_sample([sflow_unknown_record(3, body)], rate=100)
    [r] = decode_datagram(sflow_datagram([sample]), EXPORTER, DecoderState(), NOW)
    assert (r.proto, r.dport, r.bytes, r.sampling_interval) == (1, 0x0800, 84, 100)


def test_non_ip_and_garbled_headers_lose_only_their_sample() -> None:
    arp = ethernet(b"\0" * 28, 0x0806)
    garbled = ethernet(b"\x45\x00", 0x0800)  # IPv4 header cut at 2 bytes
    good = ethernet(ipv4("192.0.2.1", "192.0.2.2", 6, tcp(1, 2, 0x02)), 0x0800)
    samples = [
        sflow_flow_sample([sflow_raw_header(h, frame_length=64)], rate=10)
        for h in (arp, garbled, good)
    ]
    state = DecoderState()
    [r] = decode_datagram(sflow_datagram(samples), EXPORTER, state, NOW)
    assert (r.tcp_flags, r.sport, r.dport) == (0x02, 1, 2)
    counters = state.statistics().counters
    assert counters["sflow.headers_not_ip"] == 1
    assert counters["sflow.headers_undecodable"] == 1


def test_structural_errors_refuse_a_datagram_with_nothing_decodable() -> None:
    good = sflow_datagram([sflow_flow_sample([], rate=1)])
    # Bytes after the last sample lose nothing: counted (test_wire_quirks.py), not refused.
    state = DecoderState()
    assert decode_datagram(good + b"\1\0\0\0", EXPORTER, state, NOW) == []
    assert state.statistics().defects == {"sflow-v5/trailing_bytes": 1}
    with pytest.raises(MalformedError, match="after the last sample"):
        decode_datagram(sflow_datagram([]) + b"\1\0\0\0", EXPORTER, DecoderState(), NOW)
    head = good[: -4 - len(sflow_flow_sample([], rate=1))]
    with pytest.raises(TruncatedError):
        decode_datagram(head + struct.pack("!I", 100), EXPORTER, DecoderState(), NOW)
    with pytest.raises(MalformedError, match="at most"):
        decode_datagram(head + struct.pack("!I", 10**6), EXPORTER, DecoderState(), NOW)
    bad_agent = struct.pack("!II", 5, 7) + bytes(40)
    with pytest.raises(MalformedError, match="address type"):
        decode_datagram(bad_agent, EXPORTER, DecoderState(), NOW)


# -- packet headers -----------------------------------------------------------------------------


def test_packet_ipv6_extension_headers_and_fragments() -> None:
    hop_by_hop = bytes([44, 0]) + bytes(6)  # next: fragment
    fragment_first = bytes([17, 0]) + struct.pack("!HI", 0x0001, 7)  # offset 0, more
    payload = hop_by_hop + fragment_first + udp(53, 1053, b"q")
    s = packet.decode_ip(ipv6("2001:db8::1", "2001:db8::2", 0, payload))
    assert (s.proto, s.sport, s.dport, s.fragment) == (17, 53, 1053, False)
    later = bytes([17, 0]) + struct.pack("!HI", 0x0100, 7)  # offset 32: no UDP header
    s = packet.decode_ip(ipv6("2001:db8::1", "2001:db8::2", 44, later + b"\0" * 8))
    assert (s.proto, s.sport, s.dport, s.fragment) == (17, 0, 0, True)


def test_packet_header_cut_inside_the_transport_keeps_addresses() -> None:
    whole = ipv4("192.0.2.1", "192.0.2.2", 6, tcp(80, 8080, 0x11))
    s = packet.decode_ip(whole[: 20 + 6])
    assert (s.sport, s.dport, s.tcp_flags) == (80, 8080, 0)
    s = packet.decode_ip(whole[: 20 + 2])
    assert (s.sport, s.dport) == (0, 0)


def test_packet_ipv4_options_and_padding() -> None:
    body = udp(1, 2, b"x")
    header = (
        struct.pack("!BBHHHBBH4s4s", 0x46, 0, 24 + len(body), 0, 0, 64, 17, 0, bytes(4), bytes(4))
        + b"\x01\x01\x01\x00"
    )
    s = packet.decode_ethernet(ethernet(header + body + b"\0" * 20, 0x0800))
    assert s is not None
    assert (s.sport, s.dport, s.ip_length, s.l4_end - s.l4_offset) == (1, 2, 24 + 9, 9)


def test_packet_mpls_and_snap() -> None:
    inner = ipv4("192.0.2.1", "192.0.2.2", 17, udp(5, 6, b""))
    labels = struct.pack("!II", 100 << 12, (200 << 12) | 0x100 | 64)
    s = packet.decode_ethernet(ethernet(labels + inner, 0x8847))
    assert s is not None and s.dport == 6
    snap = b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + inner
    s = packet.decode_ethernet(ethernet(snap, len(snap)))
    assert s is not None and s.sport == 5
    assert packet.decode_ethernet(ethernet(b"\xfe\xfe\x03" + bytes(40), 43)) is None


def test_packet_refuses_bad_ip() -> None:
    with pytest.raises(MalformedError):
        packet.decode_ip(b"\x55" + bytes(30))
    with pytest.raises(MalformedError):
        packet.decode_ip(b"\x43" + bytes(30))  # IHL 3
    with pytest.raises(TruncatedError):
        packet.decode_ip(b"")
