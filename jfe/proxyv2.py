"""Sans-IO PROXY protocol version 2 headers (haproxy's proxy-protocol.txt, section 2.2).

A backend that cannot see the client's address through a transparent bind (another host, a
container, a service that wants the TLS name) asks for a PROXY v2 header before the first
byte of the stream. jfe sends the client's and the original destination's addresses with
the TLS server name (``PP2_TYPE_AUTHORITY``) and the negotiated protocol (``PP2_TYPE_ALPN``).

`encode` is what jfe sends; `decode` exists so tests and tools read the same bytes back
through one bounded parser (the netns test also checks haproxy accepts them). No I/O here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from overflowd.errors import JfeError

__all__ = ["SIGNATURE", "ProxyHeader", "ProxyV2Error", "decode", "encode"]

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_VERSION_PROXY = 0x21  # version 2, command PROXY
_VERSION_LOCAL = 0x20  # version 2, command LOCAL
_TCP4 = 0x11
_TCP6 = 0x21
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
#: The header's length field is 16 bits; a TLV's value is too. An SNI is at most 253 bytes and
#: an ALPN id 255, so a header jfe sends is always far below either bound.
_MAX_U16 = 0xFFFF

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProxyV2Error(JfeError):
    """Bytes that are not a PROXY v2 header (only `decode` raises it)."""


@dataclass(frozen=True)
class ProxyHeader:
    source: tuple[Address, int] | None  # None for a LOCAL header
    destination: tuple[Address, int] | None
    authority: str | None = None
    alpn: str | None = None
    length: int = 0  # bytes the header took on the wire


def _tlv(kind: int, value: bytes) -> bytes:
    if len(value) > _MAX_U16:
        raise ValueError(f"TLV {kind} value of {len(value)} bytes")
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def encode(
    source: tuple[Address, int],
    destination: tuple[Address, int],
    *,
    authority: str | None = None,
    alpn: str | None = None,
) -> bytes:
    """The header for one proxied TCP connection. Both addresses must be of one family."""
    src, sport = source
    dst, dport = destination
    if src.version != dst.version:
        raise ValueError("source and destination of different address families")
    family = _TCP4 if src.version == 4 else _TCP6
    body = src.packed + dst.packed + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    if alpn:
        body += _tlv(PP2_TYPE_ALPN, alpn.encode("latin-1"))
    if authority:
        body += _tlv(PP2_TYPE_AUTHORITY, authority.encode("ascii"))
    return SIGNATURE + bytes([_VERSION_PROXY, family]) + len(body).to_bytes(2, "big") + body


def encode_local() -> bytes:
    """A LOCAL header (health checks: no addresses)."""
    return SIGNATURE + bytes([_VERSION_LOCAL, 0]) + b"\x00\x00"


def decode(data: bytes) -> ProxyHeader | None:
    """Parse a header at the start of ``data``; None when more bytes are needed."""
    head = min(len(data), len(SIGNATURE))
    if data[:head] != SIGNATURE[:head]:
        raise ProxyV2Error("no PROXY v2 signature")
    if len(data) < 16:
        return None
    version, family = data[12], data[13]
    length = int.from_bytes(data[14:16], "big")
    if len(data) < 16 + length:
        return None
    body = data[16 : 16 + length]
    if version == _VERSION_LOCAL:
        return ProxyHeader(None, None, length=16 + length)
    if version != _VERSION_PROXY:
        raise ProxyV2Error(f"version/command byte {version:#x}")
    if family == _TCP4:
        size = 4
    elif family == _TCP6:
        size = 16
    else:
        raise ProxyV2Error(f"family byte {family:#x}")
    fixed = 2 * size + 4
    if length < fixed:
        raise ProxyV2Error("address block shorter than its family")
    addr = ipaddress.ip_address
    src = addr(body[:size])
    dst = addr(body[size : 2 * size])
    sport = int.from_bytes(body[2 * size : 2 * size + 2], "big")
    dport = int.from_bytes(body[2 * size + 2 : fixed], "big")
    authority: str | None = None
    alpn: str | None = None
    pos = fixed
    while pos < length:
        if pos + 3 > length:
            raise ProxyV2Error("truncated TLV header")
        kind = body[pos]
        n = int.from_bytes(body[pos + 1 : pos + 3], "big")
        if pos + 3 + n > length:
            raise ProxyV2Error("TLV overruns the header")
        value = body[pos + 3 : pos + 3 + n]
        if kind == PP2_TYPE_AUTHORITY:
            try:
                authority = value.decode("ascii")
            except UnicodeDecodeError:
                raise ProxyV2Error("AUTHORITY is not ASCII") from None
        elif kind == PP2_TYPE_ALPN:
            alpn = value.decode("latin-1")
        pos += 3 + n
    return ProxyHeader((src, sport), (dst, dport), authority, alpn, 16 + length)
