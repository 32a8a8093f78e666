"""Any bytes given to the ClientHello sniffer give a ClientHello, None or NotTls; nothing else.

Properties: (1) arbitrary bytes, and bytes behind a plausible record header, never raise
anything but NotTls; (2) a ClientHello built from drawn fields parses back to those fields and
every strict prefix asks for more; (3) mutations keep the invariant.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jfe.sniff import MAX_CLIENT_HELLO_BYTES, ClientHello, NotTls, parse_client_hello

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def sniff(data: bytes) -> ClientHello | None:
    try:
        out = parse_client_hello(data)
    except NotTls:
        return None
    if out is not None:
        assert out.record_bytes <= min(len(data), MAX_CLIENT_HELLO_BYTES)
    return out


def _vec(n: int, body: bytes) -> bytes:
    return len(body).to_bytes(n, "big") + body


labels = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
names = st.lists(labels, min_size=1, max_size=5).map(".".join)
alpn_ids = st.lists(
    st.text(alphabet="abcdefghijklmnop/.0123456789", min_size=1, max_size=12), max_size=4
)


def build(name: str | None, alpn: list[str], record_size: int, padding: int) -> bytes:
    exts = b""
    if name is not None:
        exts += b"\x00\x00" + _vec(2, _vec(2, b"\x00" + _vec(2, name.encode())))
    if alpn:
        exts += b"\x00\x10" + _vec(2, _vec(2, b"".join(_vec(1, a.encode()) for a in alpn)))
    exts += b"\x00\x15" + _vec(2, b"\x00" * padding)  # padding extension (RFC 7685)
    body = b"\x03\x03" + b"\x11" * 32 + _vec(1, b"") + _vec(2, b"\x13\x01\x13\x02")
    body += _vec(1, b"\x00") + _vec(2, exts)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    out = b""
    for i in range(0, len(message), record_size):
        chunk = message[i : i + record_size]
        out += b"\x16\x03\x01" + _vec(2, chunk)
    return out


@SETTINGS
@given(st.binary(max_size=2000))
def test_any_bytes(data: bytes) -> None:
    sniff(data)


@SETTINGS
@given(st.integers(0, 4), st.binary(max_size=1500))
def test_any_bytes_behind_a_handshake_header(minor: int, data: bytes) -> None:
    sniff(b"\x16\x03" + bytes([minor]) + _vec(2, data[:1400]) + data[1400:])
    sniff(b"\x16\x03" + bytes([minor]) + _vec(2, b"\x01" + _vec(3, data[:1000])))


@SETTINGS
@given(st.none() | names, alpn_ids, st.integers(1, 400), st.integers(0, 600))
def test_built_hellos_parse_back_and_prefixes_need_more(
    name: str | None, alpn: list[str], record_size: int, padding: int
) -> None:
    wire = build(name, alpn, record_size, padding)
    parsed = parse_client_hello(wire)
    assert parsed is not None
    assert parsed.server_name == name and parsed.alpn == tuple(alpn)
    assert parsed.record_bytes == len(wire)
    for cut in range(0, len(wire), max(1, len(wire) // 60)):
        assert parse_client_hello(wire[:cut]) is None


@SETTINGS
@given(names, alpn_ids, st.data())
def test_mutated_hellos_keep_the_invariant(name: str, alpn: list[str], data: st.DataObject) -> None:
    wire = bytearray(build(name, alpn, 300, 10))
    for _ in range(data.draw(st.integers(1, 4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    sniff(bytes(wire))
    for cut in range(0, len(wire), 7):
        sniff(bytes(wire[:cut]))
