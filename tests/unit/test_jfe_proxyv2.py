"""PROXY v2 headers: the spec's layout byte for byte, TLVs, and a bounded decoder."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from jfe import proxyv2

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def test_ipv4_layout_by_hand() -> None:
    wire = proxyv2.encode(
        (V4("192.0.2.10"), 40000), (V4("198.51.100.1"), 443), authority="www.example", alpn="h2"
    )
    expected = (
        b"\r\n\r\n\x00\r\nQUIT\n"  # signature (proxy-protocol.txt 2.2)
        + b"\x21\x11"  # v2 PROXY, TCP over IPv4
        + (12 + 5 + 14).to_bytes(2, "big")
        + bytes([192, 0, 2, 10, 198, 51, 100, 1])
        + (40000).to_bytes(2, "big")
        + (443).to_bytes(2, "big")
        + b"\x01\x00\x02h2"  # PP2_TYPE_ALPN
        + b"\x02\x00\x0bwww.example"  # PP2_TYPE_AUTHORITY
    )
    assert wire == expected


def test_ipv6_and_no_tlvs() -> None:
    wire = proxyv2.encode((V6("2001:db8::1"), 1), (V6("2001:db8::2"), 25))
    assert wire[12:16] == b"\x21\x21\x00\x24"
    header = proxyv2.decode(wire + b"EHLO")
    assert header is not None
    assert header.source == (V6("2001:db8::1"), 1) and header.authority is None
    assert header.length == len(wire)


def test_mixed_families_are_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        proxyv2.encode((V4("192.0.2.1"), 1), (V6("2001:db8::2"), 2))


def test_local() -> None:
    header = proxyv2.decode(proxyv2.encode_local())
    assert header is not None and header.source is None


@pytest.mark.parametrize(
    "wire",
    [
        b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
        b"\r\n\r\n\x00\r\nQUIT\n\x22\x11\x00\x00",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x31\x00\x00",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x04abcd",
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0e" + b"\x00" * 12 + b"\x02\x00",
    ],
)
def test_garbage_raises(wire: bytes) -> None:
    with pytest.raises(proxyv2.ProxyV2Error):
        proxyv2.decode(wire)


addresses = st.integers(0, 2**32 - 1).map(V4)
ports = st.integers(0, 65535)
tlv_text = st.none() | st.text(
    alphabet="abcdefghijklmnopqrstuvwxyz.-0123456789", min_size=1, max_size=253
)


@given(addresses, ports, addresses, ports, tlv_text, tlv_text)
def test_round_trip_and_prefixes(
    src: V4, sport: int, dst: V4, dport: int, authority: str | None, alpn: str | None
) -> None:
    wire = proxyv2.encode((src, sport), (dst, dport), authority=authority, alpn=alpn)
    header = proxyv2.decode(wire)
    assert header == proxyv2.ProxyHeader((src, sport), (dst, dport), authority, alpn, len(wire))
    for cut in range(len(wire)):
        assert proxyv2.decode(wire[:cut]) is None


@given(st.binary(max_size=300))
def test_any_bytes_behind_the_signature(data: bytes) -> None:
    try:
        proxyv2.decode(proxyv2.SIGNATURE + data)
    except proxyv2.ProxyV2Error:
        pass
