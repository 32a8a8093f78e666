"""Packet headers: Ethernet (with 802.1Q/802.1ad VLAN tags, LLC/SNAP, MPLS), IPv4, IPv6
(with extension headers), TCP, UDP, SCTP/DCCP/UDP-Lite ports, ICMP and ICMPv6.

Used for the raw packet headers inside sFlow flow samples (usually the first 128 bytes of a
frame) and by the capture-file reader to find UDP datagrams. Only what a flow record needs is
decoded: addresses, protocol, ports (ICMP type/code as the destination port, as NetFlow does),
TCP flags, ToS/traffic class and the IP datagram length from the header.

A sampled header is often cut short on purpose, so a missing *layer-4* header is not an error
(ports and flags stay 0); a missing or malformed *IP* header is, because then there is no
flow to speak of. Non-IP frames (ARP, LLDP...) return ``None``.

Pure: no I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from overflowd.wire.reader import Reader

__all__ = [
    "ETHERTYPE_IPV4",
    "ETHERTYPE_IPV6",
    "PacketSummary",
    "decode_ethernet",
    "decode_ethertype",
    "decode_ip",
]

FORMAT = "packet"

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_MPLS = (0x8847, 0x8848)
VLAN_ETHERTYPES = (0x8100, 0x88A8, 0x9100, 0x9200)

#: Nested VLAN tags and MPLS labels followed: QinQ is 2, stacking more is unusual; the cap
#: only bounds work on hostile input.
MAX_TAGS = 8
#: IPv6 extension headers followed before giving up on finding the transport header.
MAX_IPV6_EXTENSIONS = 8

PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})  # TCP, UDP, DCCP, SCTP, UDP-Lite
ICMP_PROTOCOLS = frozenset({1, 58})
IPV6_EXTENSIONS = frozenset({0, 43, 60, 135, 139, 140})  # length in 8-octet units
IPV6_FRAGMENT = 44
IPV6_AH = 51
IPV6_CHAIN = IPV6_EXTENSIONS | {IPV6_FRAGMENT, IPV6_AH}

AddressFactory = Callable[[bytes], IPv4Address | IPv6Address]

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")


class PacketSummary(NamedTuple):
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    proto: int
    sport: int
    dport: int
    tcp_flags: int
    tos: int
    #: The IP datagram's length from its header (IPv4 total length, IPv6 40 + payload).
    ip_length: int
    #: Where the IP header starts and the transport header starts in the buffer.
    l3_offset: int
    l4_offset: int
    #: End of the IP datagram within the buffer (bounded by what was captured).
    l4_end: int
    #: A non-first fragment: no transport header.
    fragment: bool


def decode_ethernet(
    data: bytes,
    *,
    offset: int = 0,
    exporter: str | None = None,
    address: AddressFactory | None = None,
) -> PacketSummary | None:
    """An Ethernet frame (no preamble, FCS optional) from ``offset``.

    ``address`` turns 4 or 16 raw bytes into an address object (a cache, say); by default
    ``ipaddress`` builds a new one.
    """
    r = Reader(data, fmt=FORMAT, exporter=exporter, start=offset)
    r.skip(12, "Ethernet addresses")
    ethertype = r.u16()
    tags = 0
    while ethertype in VLAN_ETHERTYPES:
        tags += 1
        if tags > MAX_TAGS:
            raise r.malformed("too many VLAN tags")
        r.skip(2, "VLAN tag")
        ethertype = r.u16()
    if ethertype <= 1500:
        # IEEE 802.3 length field: only LLC/SNAP carries an ethertype we can follow.
        if r.remaining() >= 8 and r.bytes(3) == b"\xaa\xaa\x03":
            r.skip(3, "SNAP OUI")
            ethertype = r.u16()
        else:
            return None
    return decode_ethertype(data, ethertype, offset=r.offset, exporter=exporter, address=address)


def decode_ethertype(
    data: bytes,
    ethertype: int,
    *,
    offset: int,
    exporter: str | None = None,
    address: AddressFactory | None = None,
) -> PacketSummary | None:
    """The payload of a frame whose ethertype is known (Ethernet, Linux cooked capture)."""
    if ethertype in ETHERTYPE_MPLS:
        r = Reader(data, fmt=FORMAT, exporter=exporter, start=offset)
        for _ in range(MAX_TAGS):
            if r.u32() & 0x100:  # bottom of stack
                return decode_ip(data, offset=r.offset, exporter=exporter, address=address)
        raise r.malformed("too many MPLS labels")
    if ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6):
        return decode_ip(data, offset=offset, exporter=exporter, address=address)
    return None


def decode_ip(
    data: bytes,
    *,
    offset: int = 0,
    exporter: str | None = None,
    address: AddressFactory | None = None,
) -> PacketSummary:
    """An IPv4 or IPv6 packet (by its version nibble) from ``offset``."""
    r = Reader(data, fmt=FORMAT, exporter=exporter, start=offset)
    if r.remaining() < 1:
        raise r.truncated("IP header", 1)
    version = data[offset] >> 4
    if version == 4:
        return _ipv4(r, address or IPv4Address)
    if version == 6:
        return _ipv6(r, address or IPv6Address)
    raise r.malformed(f"IP version {version}")


def _ipv4(r: Reader, address: AddressFactory) -> PacketSummary:
    l3 = r.offset
    ver_ihl, tos, total, _ident, frag, _ttl, proto, _csum, src, dst = r.unpack(_IPV4, "IPv4 header")
    header_length = (ver_ihl & 0x0F) * 4
    if header_length < 20:
        raise r.malformed(f"IPv4 header length {header_length}", offset=l3)
    r.skip(header_length - 20, "IPv4 options")
    fragment = (frag & 0x1FFF) != 0
    end = r.offset + r.remaining()
    if total >= header_length:
        # Ethernet pads short frames; the IP length says where the datagram ends. A total of
        # 0 (TCP segmentation offload) or less than the header says nothing: keep the frame.
        end = min(end, l3 + total)
    return _transport(r, address(src), address(dst), proto, tos, total, l3, end, fragment)


def _ipv6(r: Reader, address: AddressFactory) -> PacketSummary:
    l3 = r.offset
    first, payload, next_header, _hops, src, dst = r.unpack(_IPV6, "IPv6 header")
    tclass = (first >> 20) & 0xFF
    fragment = False
    reachable = True  # is the transport header within what we have?
    for _ in range(MAX_IPV6_EXTENSIONS):
        if next_header in IPV6_CHAIN:
            if r.remaining() < 2:
                reachable = False
                break
            start = r.offset
            nh, units = r.data[start], r.data[start + 1]
            if next_header == IPV6_FRAGMENT:
                length = 8
            elif next_header == IPV6_AH:
                length = (units + 2) * 4
            else:
                length = (units + 1) * 8
            if r.remaining() < length:
                # A sampled header cut inside the extension chain: the protocol is known,
                # the ports are not.
                next_header, reachable = nh, False
                break
            if next_header == IPV6_FRAGMENT:
                fragment = fragment or (int.from_bytes(r.data[start + 2 : start + 4]) >> 3) != 0
            r.skip(length, "IPv6 extension header")
            next_header = nh
        else:
            break
    else:
        reachable = next_header not in IPV6_CHAIN
    end = r.offset + r.remaining()
    if payload:
        end = min(end, l3 + 40 + payload)
    return _transport(
        r,
        address(src),
        address(dst),
        next_header,
        tclass,
        40 + payload,
        l3,
        end,
        fragment,
        reachable=reachable,
    )


def _transport(
    r: Reader,
    src: IPv4Address | IPv6Address,
    dst: IPv4Address | IPv6Address,
    proto: int,
    tos: int,
    ip_length: int,
    l3: int,
    end: int,
    fragment: bool,
    *,
    reachable: bool = True,
) -> PacketSummary:
    l4 = r.offset
    sport = dport = flags = 0
    available = max(0, min(end, l4 + r.remaining()) - l4)
    if not fragment and reachable:
        data = r.data
        if proto in PORT_PROTOCOLS and available >= 4:
            sport, dport = struct.unpack_from("!HH", data, l4)
            if proto == 6 and available >= 14:
                flags = data[l4 + 13]
        elif proto in ICMP_PROTOCOLS and available >= 2:
            dport = (data[l4] << 8) | data[l4 + 1]
    return PacketSummary(
        src, dst, proto, sport, dport, flags, tos, ip_length, l3, l4, max(l4, end), fragment
    )
