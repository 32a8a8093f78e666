"""The one bounded reader every wire decoder reads bytes through.

Modelled on dnspython's ``wire.Parser``: a position over an immutable buffer, big-endian
integer readers, ``restrict_to(n)`` for length-prefixed structures (it fails unless exactly
``n`` bytes were consumed inside it) and ``sub(n)`` for a child reader over the next ``n``
bytes. A decoder never slices raw bytes on trust: every length it learns from the wire is
checked here, and every failure raises a :class:`~overflowd.errors.DecodeError` subclass that
carries the format, the exporter and the absolute byte offset where decoding stopped.

Fast paths (NetFlow v5 records, fixed-length v9/IPFIX templates) ask the reader for a checked
block with :meth:`Reader.unpack_many` and run ``struct.Struct.iter_unpack`` over it, so the
length checks stay here while the per-field work happens in C.

This module must never do I/O or import anything beyond the standard library.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from overflowd.errors import DecodeError

__all__ = [
    "MalformedError",
    "Reader",
    "TruncatedError",
    "UnsupportedError",
    "WireDecodeError",
]


class WireDecodeError(DecodeError):
    """A flow datagram (or capture file) we refuse; ``code`` is a short stable reason.

    ``code`` is what statistics count by (``truncated``, ``malformed``, ``unsupported``),
    so it never carries numbers from the input; the message does.
    """

    code = "malformed"


class TruncatedError(WireDecodeError):
    """The input ended before a structure it announced."""

    code = "truncated"


class MalformedError(WireDecodeError):
    """Lengths or values that contradict each other or the specification."""

    code = "malformed"


class UnsupportedError(WireDecodeError):
    """Well-formed as far as we can tell, but a version or type we do not decode."""

    code = "unsupported"


_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")


class Reader:
    """A cursor over ``data[start:end]`` that refuses to read past ``end``.

    Offsets reported in errors are absolute positions in ``data`` (the datagram), so a
    message points at the byte a person can find in a hex dump or in Wireshark.
    """

    __slots__ = ("_data", "_end", "_pos", "exporter", "fmt")

    def __init__(
        self,
        data: bytes | bytearray | memoryview,
        *,
        fmt: str,
        exporter: str | None = None,
        start: int = 0,
        end: int | None = None,
    ) -> None:
        if isinstance(data, memoryview | bytearray):
            data = bytes(data)
        self._data: bytes = data
        self._pos = start
        self._end = len(data) if end is None else end
        if not 0 <= start <= self._end <= len(data):
            raise ValueError("reader bounds outside the buffer")
        self.fmt = fmt
        self.exporter = exporter

    # -- errors ---------------------------------------------------------------------------

    def truncated(self, what: str, need: int) -> TruncatedError:
        return TruncatedError(
            f"{what}: need {need} bytes, {self.remaining()} left",
            fmt=self.fmt,
            offset=self._pos,
            exporter=self.exporter,
        )

    def malformed(self, reason: str, *, offset: int | None = None) -> MalformedError:
        return MalformedError(
            reason,
            fmt=self.fmt,
            offset=self._pos if offset is None else offset,
            exporter=self.exporter,
        )

    def unsupported(self, reason: str, *, offset: int | None = None) -> UnsupportedError:
        return UnsupportedError(
            reason,
            fmt=self.fmt,
            offset=self._pos if offset is None else offset,
            exporter=self.exporter,
        )

    # -- position -------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Absolute position of the next byte to read."""
        return self._pos

    @property
    def data(self) -> bytes:
        """The whole underlying buffer (for ``iter_unpack`` over a checked range)."""
        return self._data

    def remaining(self) -> int:
        return self._end - self._pos

    def at_end(self) -> bool:
        return self._pos >= self._end

    def _need(self, n: int, what: str) -> int:
        pos = self._pos
        if n < 0 or pos + n > self._end:
            raise self.truncated(what, n)
        self._pos = pos + n
        return pos

    # -- scalars --------------------------------------------------------------------------

    def u8(self) -> int:
        pos = self._need(1, "u8")
        return self._data[pos]

    def u16(self) -> int:
        pos = self._need(2, "u16")
        return int(_U16.unpack_from(self._data, pos)[0])

    def u32(self) -> int:
        pos = self._need(4, "u32")
        return int(_U32.unpack_from(self._data, pos)[0])

    def u64(self) -> int:
        pos = self._need(8, "u64")
        return int(_U64.unpack_from(self._data, pos)[0])

    def uint(self, n: int) -> int:
        """An unsigned big-endian integer of ``n`` bytes (IPFIX reduced-size encoding)."""
        pos = self._need(n, f"u{8 * n}")
        return int.from_bytes(self._data[pos : pos + n], "big")

    def bytes(self, n: int) -> bytes:
        pos = self._need(n, f"{n} bytes")
        return self._data[pos : pos + n]

    def skip(self, n: int, what: str = "skipped bytes") -> None:
        self._need(n, what)

    def peek_u16(self) -> int:
        if self._pos + 2 > self._end:
            raise self.truncated("u16", 2)
        return int(_U16.unpack_from(self._data, self._pos)[0])

    def peek_u32(self) -> int:
        if self._pos + 4 > self._end:
            raise self.truncated("u32", 4)
        return int(_U32.unpack_from(self._data, self._pos)[0])

    # -- structures -----------------------------------------------------------------------

    def unpack(self, st: struct.Struct, what: str = "structure") -> tuple[Any, ...]:
        """One fixed-size structure, checked against the bound first."""
        pos = self._need(st.size, what)
        return st.unpack_from(self._data, pos)

    def unpack_many(
        self, st: struct.Struct, count: int, what: str = "records"
    ) -> Iterator[tuple[Any, ...]]:
        """``count`` consecutive structures, bounds-checked once, unpacked in C.

        Returns ``struct.iter_unpack`` over exactly ``count * st.size`` bytes; the reader
        has already moved past them.
        """
        size = st.size * count
        pos = self._need(size, what)
        if pos == 0 and size == len(self._data):
            return st.iter_unpack(self._data)
        return st.iter_unpack(memoryview(self._data)[pos : pos + size])

    @contextmanager
    def restrict_to(self, n: int, what: str = "structure") -> Iterator[None]:
        """Within the block the reader ends ``n`` bytes from here; exactly ``n`` must be read.

        An announced length that exceeds what is left raises :class:`TruncatedError` before
        the block runs; a block that reads fewer bytes than announced raises
        :class:`MalformedError` (trailing garbage inside a structure is not padding).
        """
        if n < 0 or self._pos + n > self._end:
            raise self.truncated(what, n)
        saved_end = self._end
        end = self._pos + n
        self._end = end
        try:
            yield
        finally:
            self._end = saved_end
        if self._pos != end:
            raise self.malformed(f"{what}: {end - self._pos} unread bytes inside its length")

    def sub(self, n: int, what: str = "structure") -> Reader:
        """A child reader over the next ``n`` bytes; this reader moves past them."""
        pos = self._need(n, what)
        return Reader(self._data, fmt=self.fmt, exporter=self.exporter, start=pos, end=pos + n)
