"""Sans-IO TLS ClientHello sniffer: is this connection TLS, and for which name and protocols?

jfe reads a client's first bytes itself (no ``sni_callback``) so that it can choose a
certificate, decide TLS versus pass-through, and hand SNI/ALPN to a PROXY v2 header before any
TLS state exists. The bytes come from anyone on the network, so:

- every length is checked by one bounded reader (`_Reader`), never by slicing on trust;
- the whole ClientHello, across as many TLS records as it spans, is bounded by
  `MAX_CLIENT_HELLO_BYTES` (16 KiB: real ClientHellos are 200-2,000 bytes, post-quantum key
  shares ~1,800; one TLS record's plaintext is at most 2**14 bytes, RFC 8446 5.1, so one
  record's worth is generous and stops a client that trickles an endless handshake);
- ``None`` means "need more bytes", `NotTls` means "this is not a ClientHello we answer" — the
  proxy then passes the connection through byte-exact. Nothing else is ever raised.

This module must never import sockets, trio or ssl: a unit test walks its imports.
"""

from __future__ import annotations

from dataclasses import dataclass

from overflowd.errors import NotTls

__all__ = [
    "MAX_CLIENT_HELLO_BYTES",
    "ClientHello",
    "HelloBuffer",
    "NotTls",
    "looks_like_tls",
    "parse_client_hello",
]

#: Bound on the ClientHello's records together (headers included); see the module docstring.
MAX_CLIENT_HELLO_BYTES = 16 * 1024
#: RFC 8446 5.1: a record's plaintext fragment is at most 2**14 bytes.
_MAX_RECORD_BYTES = 2**14
_RECORD_HEADER = 5
_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_SNI_HOST_NAME = 0
#: RFC 1035 2.3.4: a name is at most 253 characters in text form.
_MAX_NAME = 253
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._")


@dataclass(frozen=True)
class ClientHello:
    """What jfe needs from a ClientHello. ``server_name`` is lower-cased, without a final dot.

    ``record_bytes`` is how many bytes of the stream the ClientHello's records took: the TLS
    layer is then fed exactly the buffered bytes (jfe never consumes them itself).
    """

    server_name: str | None
    alpn: tuple[str, ...]
    legacy_version: int
    #: From the supported_versions extension (TLS 1.3 clients), else empty.
    supported_versions: tuple[int, ...]
    cipher_suites: int
    record_bytes: int


class _Reader:
    """The one bounded reader: every read checks its length; `restrict_to` checks it is all used.

    Sub-readers (`vector`) share the parent's bytes with a narrower end instead of copying
    them, and the integer reads index the bytes directly: one ClientHello costs a few dozen
    reads, so their overhead is most of the parse (measured: 36 -> 18 us per ClientHello).
    """

    __slots__ = ("_base", "_data", "_end", "_pos")

    def __init__(self, data: bytes, base: int = 0, pos: int = 0, end: int | None = None) -> None:
        self._data = data
        self._pos = pos
        self._end = len(data) if end is None else end
        self._base = base  # offset of data[0] in the connection's bytes (for messages)

    @property
    def offset(self) -> int:
        return self._base + self._pos

    def remaining(self) -> int:
        return self._end - self._pos

    def _advance(self, n: int) -> int:
        pos = self._pos
        if n < 0 or pos + n > self._end:
            raise NotTls(f"field of {n} bytes overruns its container", offset=self.offset)
        self._pos = pos + n
        return pos

    def take(self, n: int) -> bytes:
        pos = self._advance(n)
        return self._data[pos : pos + n]

    def u8(self) -> int:
        return self._data[self._advance(1)]

    def u16(self) -> int:
        pos, data = self._advance(2), self._data
        return data[pos] << 8 | data[pos + 1]

    def u24(self) -> int:
        pos, data = self._advance(3), self._data
        return data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]

    def vector(self, length_bytes: int, *, minimum: int = 0) -> _Reader:
        """A sub-reader over a length-prefixed vector (RFC 8446 3.4)."""
        n = self.u8() if length_bytes == 1 else self.u16() if length_bytes == 2 else self.u24()
        if n < minimum:
            raise NotTls(f"vector of {n} bytes, minimum {minimum}", offset=self.offset)
        start = self._advance(n)
        return _Reader(self._data, self._base, start, start + n)

    def entries(self) -> list[tuple[int, int, int]]:
        """The rest as (u16 type, u16-length vector) entries, RFC 8446 4.2's extensions: a
        (type, start, end) per entry, each bounds-checked here as `u16` and `vector` would
        (same errors), without a sub-reader per entry; `at` makes one for those that matter.
        A ClientHello has ~20 extensions and jfe reads three: the walk was most of the parse."""
        data, pos, end = self._data, self._pos, self._end
        out = []
        while pos < end:
            if pos + 4 > end:
                at = pos if pos + 2 > end else pos + 2
                self._pos = at
                raise NotTls("field of 2 bytes overruns its container", offset=self.offset)
            n = data[pos + 2] << 8 | data[pos + 3]
            start = pos + 4
            if start + n > end:
                self._pos = start
                raise NotTls(f"field of {n} bytes overruns its container", offset=self.offset)
            out.append((data[pos] << 8 | data[pos + 1], start, start + n))
            pos = start + n
        self._pos = pos
        return out

    def at(self, start: int, end: int) -> _Reader:
        """A sub-reader over ``data[start:end]`` of an entry `entries` returned."""
        return _Reader(self._data, self._base, start, end)

    def done(self) -> None:
        if self._pos != self._end:
            raise NotTls(f"{self._end - self._pos} trailing bytes", offset=self.offset)


def looks_like_tls(data: bytes) -> bool | None:
    """Cheap verdict on the first bytes: True/False, or None when fewer than 3 bytes arrived.

    A handshake record whose version major is 3 (SSL 3.0 .. TLS 1.3 all use 0x03xx on the
    record layer, RFC 8446 5.1 and appendix D) is worth buffering a ClientHello for.
    """
    if not data:
        return None
    if data[0] != _HANDSHAKE:
        return False
    if len(data) < 2:
        return None
    if data[1] != 3:
        return False
    if len(data) < 3:
        return None
    return data[2] <= 4


def _handshake_bytes(data: bytes) -> tuple[bytes, int] | None:
    """Reassemble the first handshake message from its records; (message, bytes used) or None."""
    pos = 0
    fragments: list[bytes] = []
    have = 0
    need: int | None = None
    while True:
        if pos + _RECORD_HEADER > len(data):
            if len(data) >= MAX_CLIENT_HELLO_BYTES:
                raise NotTls("ClientHello larger than the bound", offset=pos)
            return None
        header = _Reader(data[pos : pos + _RECORD_HEADER], pos)
        kind, major, minor, length = header.u8(), header.u8(), header.u8(), header.u16()
        if kind != _HANDSHAKE:
            raise NotTls(f"record type {kind}, expected handshake", offset=pos)
        if major != 3 or minor > 4:
            raise NotTls(f"record version {major}.{minor}", offset=pos + 1)
        if length == 0 or length > _MAX_RECORD_BYTES:
            raise NotTls(f"record length {length}", offset=pos + 3)
        if pos + _RECORD_HEADER + length > MAX_CLIENT_HELLO_BYTES:
            raise NotTls("ClientHello larger than the bound", offset=pos + 3)
        if pos + _RECORD_HEADER + length > len(data):
            return None
        fragments.append(data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length])
        have += length
        pos += _RECORD_HEADER + length
        if need is None and have >= 4:
            head = b"".join(fragments)
            if head[0] != _CLIENT_HELLO:
                raise NotTls(f"handshake type {head[0]}, expected client_hello", offset=5)
            need = 4 + int.from_bytes(head[1:4], "big")
            if need + _RECORD_HEADER > MAX_CLIENT_HELLO_BYTES:
                raise NotTls(f"ClientHello of {need} bytes, over the bound", offset=6)
        if need is not None and have >= need:
            message = b"".join(fragments)
            # Bytes after the ClientHello in its last record would be a second handshake
            # message in the client's first flight: clients never send one (RFC 8446 4.1.2).
            if have != need:
                raise NotTls("bytes after the ClientHello in its record", offset=pos)
            return message, pos


class HelloBuffer:
    """`parse_client_hello` for a stream that arrives in pieces, in work linear in its bytes.

    Re-parsing the whole buffer after every read is quadratic: a client trickling a 16 KiB
    ClientHello as one-byte records, one per segment, made jfe walk ~2,700 records ~2,700
    times (11 s of CPU on the event loop, every other connection stalled). This walks each
    record header once and calls `parse_client_hello` only when the records it has seen could
    give an answer (a complete message, or anything `parse_client_hello` would refuse), so its
    verdicts are exactly `parse_client_hello`'s on the bytes fed so far.
    """

    __slots__ = ("_data", "_have", "_head", "_need", "_pos")

    def __init__(self) -> None:
        self._data = bytearray()
        self._pos = 0  # next record header not walked yet
        self._have = 0  # handshake bytes in the records walked
        self._head = bytearray()  # the handshake message's first 4 bytes
        self._need: int | None = None

    @property
    def data(self) -> bytes:
        return bytes(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, more: bytes) -> ClientHello | None:
        """Add bytes; the ClientHello, None (need more), or `NotTls` as `parse_client_hello`."""
        self._data += more
        if self._incomplete():
            return None
        return parse_client_hello(bytes(self._data))

    def _incomplete(self) -> bool:
        """True only when `parse_client_hello` would certainly answer None on the data."""
        data = self._data
        if len(data) < 3:
            return looks_like_tls(bytes(data)) is None
        if looks_like_tls(bytes(data[:3])) is False:
            return False
        while True:
            pos = self._pos
            if pos + _RECORD_HEADER > len(data):
                return len(data) < MAX_CLIENT_HELLO_BYTES
            kind, major, minor = data[pos], data[pos + 1], data[pos + 2]
            length = int.from_bytes(data[pos + 3 : pos + 5], "big")
            if kind != _HANDSHAKE or major != 3 or minor > 4:
                return False
            if length == 0 or length > _MAX_RECORD_BYTES:
                return False
            end = pos + _RECORD_HEADER + length
            if end > MAX_CLIENT_HELLO_BYTES:
                return False
            if end > len(data):
                return True
            if len(self._head) < 4:
                start = pos + _RECORD_HEADER
                self._head += data[start : min(end, start + 4 - len(self._head))]
            self._have += length
            self._pos = end
            if self._need is None and len(self._head) >= 4:
                if self._head[0] != _CLIENT_HELLO:
                    return False
                self._need = 4 + int.from_bytes(self._head[1:4], "big")
                if self._need + _RECORD_HEADER > MAX_CLIENT_HELLO_BYTES:
                    return False
            if self._need is not None and self._have >= self._need:
                return False


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the first bytes of a connection: a ClientHello, None (need more), or NotTls."""
    verdict = looks_like_tls(data[:3])
    if verdict is False:
        raise NotTls("first bytes are not a TLS handshake record", offset=0)
    if verdict is None:
        return None
    found = _handshake_bytes(data)
    if found is None:
        return None
    message, used = found
    outer = _Reader(message)
    outer.u8()
    body = _Reader(outer.take(outer.u24()), 4)
    outer.done()
    legacy_version = body.u16()
    body.take(32)  # random
    session_id = body.vector(1)
    if session_id.remaining() > 32:
        raise NotTls("session id over 32 bytes", offset=session_id.offset)
    suites = body.vector(2, minimum=2)
    if suites.remaining() % 2:
        raise NotTls("odd cipher_suites length", offset=suites.offset)
    cipher_suites = suites.remaining() // 2
    body.vector(1, minimum=1)  # compression methods
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    versions: tuple[int, ...] = ()
    if body.remaining():  # extensions are optional before TLS 1.2 (RFC 5246 7.4.1.2)
        extensions = body.vector(2)
        seen: set[int] = set()
        for kind, start, end in extensions.entries():
            if kind in seen:  # RFC 8446 4.2: at most one extension of each type
                raise NotTls(f"extension {kind} twice", offset=extensions.at(start, end).offset)
            seen.add(kind)
            if kind == _EXT_SERVER_NAME:
                server_name = _server_name(extensions.at(start, end))
            elif kind == _EXT_ALPN:
                alpn = _alpn(extensions.at(start, end))
            elif kind == _EXT_SUPPORTED_VERSIONS:
                versions = _versions(extensions.at(start, end))
    body.done()
    return ClientHello(
        server_name=server_name,
        alpn=alpn,
        legacy_version=legacy_version,
        supported_versions=versions,
        cipher_suites=cipher_suites,
        record_bytes=used,
    )


def _server_name(ext: _Reader) -> str | None:
    """RFC 6066 3: one host_name, ASCII (A-labels), no trailing dot."""
    names = ext.vector(2, minimum=1)
    ext.done()
    found: str | None = None
    while names.remaining():
        kind = names.u8()
        raw = names.vector(2, minimum=1)
        value = raw.take(raw.remaining())
        if kind != _SNI_HOST_NAME:
            continue  # unknown name types are skipped, as RFC 6066 lets servers do
        if found is not None:
            raise NotTls("two host_name entries", offset=raw.offset)
        try:
            text = value.decode("ascii").lower()
        except UnicodeDecodeError:
            raise NotTls("host_name is not ASCII", offset=raw.offset) from None
        if text.endswith("."):
            text = text[:-1]
        if not text or len(text) > _MAX_NAME or not set(text) <= _NAME_CHARS:
            raise NotTls("host_name is not a DNS name", offset=raw.offset)
        if any(not label or len(label) > 63 for label in text.split(".")):
            raise NotTls("host_name has an empty or over-long label", offset=raw.offset)
        found = text
    return found


def _alpn(ext: _Reader) -> tuple[str, ...]:
    """RFC 7301 3.1: a non-empty list of non-empty protocol names."""
    names = ext.vector(2, minimum=2)
    ext.done()
    out: list[str] = []
    while names.remaining():
        raw = names.vector(1, minimum=1)
        value = raw.take(raw.remaining())
        # Protocol ids are opaque bytes; the registered ones are ASCII. Keep others visible
        # but unambiguous (latin-1 maps each byte to one code point).
        out.append(value.decode("latin-1"))
    return tuple(out)


def _versions(ext: _Reader) -> tuple[int, ...]:
    """RFC 8446 4.2.1: ClientHello form, a 1-byte length then 2-byte versions."""
    versions = ext.vector(1, minimum=2)
    ext.done()
    if versions.remaining() % 2:
        raise NotTls("odd supported_versions length", offset=versions.offset)
    out = []
    while versions.remaining():
        out.append(versions.u16())
    return tuple(out)
