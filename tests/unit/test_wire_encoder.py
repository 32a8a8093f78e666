"""A tiny, independent encoder for NetFlow v9, IPFIX, sFlow v5 and capture files — and the
proof that it is right: tshark decodes what it builds.

The round-trip tests (test_wire_v9_ipfix.py, test_wire_sflow.py) and the fuzz tests build
their datagrams here. It is written from the RFCs, not from our decoder, so a shared
misunderstanding would have to be made twice; the tshark tests below rule out most of those.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest

from tests.support.tshark import TsharkUnavailable, cflow_records, find_values, frames_json

VARIABLE = 65535
FLOAT32_MAX = 3.4028234663852886e38

# -- information elements and values ---------------------------------------------------------


@dataclass(frozen=True)
class IE:
    id: int
    length: int
    enterprise: int = 0

    def spec_v9(self) -> bytes:
        return struct.pack("!HH", self.id, self.length)

    def spec_ipfix(self) -> bytes:
        if self.enterprise:
            return struct.pack("!HHI", self.id | 0x8000, self.length, self.enterprise)
        return struct.pack("!HH", self.id, self.length)


def encode_value(ie: IE, value: Any) -> bytes:
    if isinstance(value, IPv4Address | IPv6Address):
        raw = value.packed
    elif isinstance(value, bytes):
        raw = value
    elif isinstance(value, float):
        if ie.length == 4 and abs(value) > FLOAT32_MAX and math.isfinite(value):
            value = math.copysign(math.inf, value)  # what a C cast to float gives
        raw = struct.pack("!d" if ie.length == 8 else "!f", value)
    else:
        raw = int(value).to_bytes(ie.length if ie.length != VARIABLE else 8, "big")
    if ie.length == VARIABLE:
        if len(raw) < 255:
            return bytes([len(raw)]) + raw
        return b"\xff" + struct.pack("!H", len(raw)) + raw
    assert len(raw) == ie.length, (ie, value)
    return raw


def record(fields: Sequence[IE], values: Sequence[Any]) -> bytes:
    assert len(fields) == len(values)
    return b"".join(encode_value(ie, v) for ie, v in zip(fields, values, strict=True))


def _pad4(body: bytes) -> bytes:
    return body + b"\0" * (-len(body) % 4)


def flowset(set_id: int, body: bytes, *, pad: bool = True) -> bytes:
    body = _pad4(body) if pad else body
    return struct.pack("!HH", set_id, 4 + len(body)) + body


# -- NetFlow v9 (RFC 3954) ----------------------------------------------------------------------


def v9_template(template_id: int, fields: Sequence[IE]) -> bytes:
    return struct.pack("!HH", template_id, len(fields)) + b"".join(f.spec_v9() for f in fields)


def v9_options_template(template_id: int, scope: Sequence[IE], options: Sequence[IE]) -> bytes:
    return (
        struct.pack("!HHH", template_id, 4 * len(scope), 4 * len(options))
        + b"".join(f.spec_v9() for f in scope)
        + b"".join(f.spec_v9() for f in options)
    )


def v9_packet(
    sets: Iterable[bytes],
    *,
    uptime_ms: int = 100_000,
    unix_secs: int = 1_700_000_000,
    sequence: int = 1,
    source_id: int = 0,
    count: int = 0,
) -> bytes:
    body = b"".join(sets)
    return struct.pack("!HHIIII", 9, count, uptime_ms, unix_secs, sequence, source_id) + body


# -- IPFIX (RFC 7011) ----------------------------------------------------------------------------


def ipfix_template(template_id: int, fields: Sequence[IE]) -> bytes:
    return struct.pack("!HH", template_id, len(fields)) + b"".join(f.spec_ipfix() for f in fields)


def ipfix_options_template(template_id: int, scope: Sequence[IE], options: Sequence[IE]) -> bytes:
    fields = [*scope, *options]
    return struct.pack("!HHH", template_id, len(fields), len(scope)) + b"".join(
        f.spec_ipfix() for f in fields
    )


def ipfix_withdrawal(template_id: int) -> bytes:
    return struct.pack("!HH", template_id, 0)


def ipfix_message(
    sets: Iterable[bytes], *, export_time: int = 1_700_000_000, sequence: int = 0, domain: int = 0
) -> bytes:
    body = b"".join(sets)
    return struct.pack("!HHIII", 10, 16 + len(body), export_time, sequence, domain) + body


# -- sFlow v5 -------------------------------------------------------------------------------------


def sflow_raw_header(
    header: bytes, *, frame_length: int, stripped: int = 4, protocol: int = 1
) -> bytes:
    body = struct.pack("!IIII", protocol, frame_length, stripped, len(header)) + _pad4(header)
    return struct.pack("!II", 1, len(body)) + body


def sflow_gateway(src_as: int, path: Sequence[int]) -> bytes:
    body = struct.pack("!I4sIII", 1, bytes(4), 65000, src_as, 0)
    body += struct.pack("!I", 1 if path else 0)
    if path:
        body += struct.pack("!II", 2, len(path)) + b"".join(struct.pack("!I", a) for a in path)
    body += struct.pack("!II", 0, 100)  # no communities, local pref
    return struct.pack("!II", 1003, len(body)) + body


def sflow_unknown_record(kind: int, body: bytes) -> bytes:
    return struct.pack("!II", kind, len(body)) + _pad4(body)


def sflow_flow_sample(records: Sequence[bytes], *, rate: int, expanded: bool = False) -> bytes:
    if expanded:
        body = struct.pack("!IIIIIIIIIII", 7, 0, 3, rate, 1000, 0, 0, 3, 0, 4, len(records))
        kind = 3
    else:
        body = struct.pack("!IIIIIIII", 7, 3, rate, 1000, 0, 3, 4, len(records))
        kind = 1
    body += b"".join(records)
    return struct.pack("!II", kind, len(body)) + body


def sflow_counter_sample() -> bytes:
    body = struct.pack("!III", 1, 2, 1) + struct.pack("!II", 1, 8) + bytes(8)
    return struct.pack("!II", 2, len(body)) + body


def sflow_datagram(
    samples: Sequence[bytes], *, agent: str = "192.0.2.10", sub_agent: int = 0
) -> bytes:
    address = ip_address(agent)
    kind = 1 if address.version == 4 else 2
    head = struct.pack("!II", 5, kind) + address.packed
    head += struct.pack("!IIII", sub_agent, 1, 123456, len(samples))
    return head + b"".join(samples)


# -- packets and capture files ---------------------------------------------------------------


def ethernet(payload: bytes, ethertype: int, *, vlans: Sequence[int] = ()) -> bytes:
    head = bytes.fromhex("020000000001") + bytes.fromhex("020000000002")
    for vlan in vlans:
        head += struct.pack("!HH", 0x8100, vlan)
    return head + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, *, tos: int = 0) -> bytes:
    total = 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        tos,
        total,
        1,
        0,
        64,
        proto,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    return header + payload


def ipv6(src: str, dst: str, next_header: int, payload: bytes, *, tclass: int = 0) -> bytes:
    first = (6 << 28) | (tclass << 20)
    return (
        struct.pack("!IHBB", first, len(payload), next_header, 64)
        + IPv6Address(src).packed
        + IPv6Address(dst).packed
        + payload
    )


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(sport: int, dport: int, flags: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload


def udp_frame(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    if ip_address(src).version == 4:
        return ethernet(ipv4(src, dst, 17, udp(sport, dport, payload)), 0x0800)
    return ethernet(ipv6(src, dst, 17, udp(sport, dport, payload)), 0x86DD)


def pcap_file(
    frames: Iterable[tuple[float, bytes]],
    *,
    linktype: int = 1,
    nanos: bool = False,
    big_endian: bool = False,
) -> bytes:
    e = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    out = [struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)]
    ticks = 1_000_000_000 if nanos else 1_000_000
    for stamp, frame in frames:
        secs = int(stamp)
        frac = round((stamp - secs) * ticks)
        out.append(struct.pack(e + "IIII", secs, frac, len(frame), len(frame)) + frame)
    return b"".join(out)


def pcapng_file(
    frames: Iterable[tuple[float, bytes]], *, linktype: int = 1, tsresol: int = 6
) -> bytes:
    def block(kind: int, body: bytes) -> bytes:
        body = _pad4(body)
        return struct.pack("<II", kind, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))

    shb = block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1))
    options = struct.pack("<HHB3x", 9, 1, tsresol) + struct.pack("<HH", 0, 0)
    idb = block(1, struct.pack("<HHI", linktype, 0, 262144) + options)
    out = [shb, idb, block(5, struct.pack("<I", 0) + bytes(8))]  # + a statistics block
    for stamp, frame in frames:
        ticks = round(stamp * 10**tsresol)
        body = struct.pack("<IIIII", 0, ticks >> 32, ticks & 0xFFFFFFFF, len(frame), len(frame))
        out.append(block(6, body + frame))
    return b"".join(out)


# -- the encoder checked against tshark ------------------------------------------------------

V4_FIELDS = [
    IE(8, 4),
    IE(12, 4),
    IE(7, 2),
    IE(11, 2),
    IE(4, 1),
    IE(2, 4),
    IE(1, 4),
    IE(6, 1),
    IE(5, 1),
    IE(16, 2),
    IE(17, 2),
    IE(22, 4),
    IE(21, 4),
]
V6_FIELDS = [IE(27, 16), IE(28, 16), IE(7, 2), IE(11, 2), IE(4, 1), IE(2, 8), IE(1, 8)]


def _tshark_decode(
    tmp_path: Path, datagrams: Sequence[bytes], port: int = 2055
) -> list[dict[str, Any]]:
    frames = [
        (1.0 + i, udp_frame("192.0.2.1", "192.0.2.2", 40000, port, d))
        for i, d in enumerate(datagrams)
    ]
    path = tmp_path / "built.pcap"
    path.write_bytes(pcap_file(frames))
    try:
        return cflow_records(path, port).records
    except TsharkUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)


def test_tshark_decodes_built_v9_like_we_meant(tmp_path: Path) -> None:
    values = [
        IPv4Address("198.51.100.7"),
        IPv4Address("203.0.113.9"),
        53,
        40000,
        17,
        12,
        3456,
        0x12,
        0x20,
        64500,
        64501,
        90_000,
        99_000,
    ]
    packet = v9_packet(
        [flowset(0, v9_template(256, V4_FIELDS)), flowset(256, record(V4_FIELDS, values))],
        count=2,
    )
    records = _tshark_decode(tmp_path, [packet])
    assert len(records) == 1
    got = records[0]
    assert (got["src"], got["dst"], got["sport"], got["dport"], got["proto"]) == (
        "198.51.100.7",
        "203.0.113.9",
        53,
        40000,
        17,
    )
    assert (got["packets"], got["bytes"], got["tcp_flags"], got["tos"]) == (12, 3456, 0x12, 0x20)
    assert (got["src_as"], got["dst_as"]) == (64500, 64501)


def test_tshark_decodes_built_ipfix_v6_like_we_meant(tmp_path: Path) -> None:
    values = [IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2"), 443, 50000, 6, 7, 9000]
    message = ipfix_message(
        [flowset(2, ipfix_template(300, V6_FIELDS)), flowset(300, record(V6_FIELDS, values))],
        domain=42,
    )
    records = _tshark_decode(tmp_path, [message], port=4739)
    assert len(records) == 1
    got = records[0]
    assert (got["src"], got["dst"], got["sport"], got["dport"], got["proto"]) == (
        "2001:db8::1",
        "2001:db8::2",
        443,
        50000,
        6,
    )
    assert (got["packets"], got["bytes"]) == (7, 9000)


def test_tshark_decodes_built_sflow_like_we_meant(tmp_path: Path) -> None:
    segment = tcp(443, 51000, 0x12, b"p" * 1000)
    frame = ethernet(ipv6("2001:db8::a", "2001:db8::b", 6, segment), 0x86DD, vlans=[100, 200])
    sample = sflow_flow_sample(
        [
            sflow_raw_header(frame[:128], frame_length=len(frame) + 4),
            sflow_gateway(64500, [1, 2, 3]),
        ],
        rate=2048,
        expanded=True,
    )
    datagram = sflow_datagram([sflow_counter_sample(), sample], sub_agent=4)
    path = tmp_path / "sflow.pcap"
    path.write_bytes(pcap_file([(1.0, udp_frame("192.0.2.1", "192.0.2.2", 4000, 6343, datagram))]))
    try:
        [tree] = frames_json(path, 6343, "sflow")
    except TsharkUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    layers = tree["_source"]["layers"]
    assert "_ws.malformed" not in str(layers)
    assert find_values(layers, "sflow_245.numsamples") == ["2"]
    assert find_values(layers, "sflow_245.sub_agent_id") == ["4"]
    assert find_values(layers, "sflow.flow_sample.sampling_rate") == ["2048"]
    assert find_values(layers, "vlan.id") == ["100", "200"]
    assert find_values(layers, "ipv6.src") == ["2001:db8::a"]
    assert find_values(layers, "ipv6.dst") == ["2001:db8::b"]
    assert find_values(layers, "tcp.srcport") == ["443"]
    assert find_values(layers, "tcp.flags") == ["0x0012"]
    assert find_values(layers, "sflow_245.srcAS") == ["64500"]
    assert find_values(layers, "sflow_245.dstAS") == ["1", "2", "3"]
