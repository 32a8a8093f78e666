"""The bounded reader: every read is checked, every failure carries format, exporter, offset."""

from __future__ import annotations

import struct

import pytest

from overflowd.errors import DecodeError
from overflowd.wire.reader import MalformedError, Reader, TruncatedError


def reader(data: bytes, **kw: object) -> Reader:
    return Reader(data, fmt="test", exporter="192.0.2.1", **kw)  # type: ignore[arg-type]


def test_scalars_big_endian() -> None:
    r = reader(bytes(range(1, 16)))
    assert r.u8() == 1
    assert r.u16() == 0x0203
    assert r.u32() == 0x04050607
    assert r.u64() == 0x08090A0B0C0D0E0F
    assert r.at_end()


def test_uint_reduced_size_and_bytes() -> None:
    r = reader(b"\x01\x02\x03abc")
    assert r.uint(3) == 0x010203
    assert r.bytes(3) == b"abc"


def test_truncation_carries_format_exporter_offset() -> None:
    r = reader(b"\x00\x01\x02")
    r.u16()
    with pytest.raises(TruncatedError) as info:
        r.u16()
    err = info.value
    assert isinstance(err, DecodeError)
    assert (err.fmt, err.exporter, err.offset, err.code) == ("test", "192.0.2.1", 2, "truncated")
    assert "at byte 2" in str(err)


def test_restrict_to_requires_exact_consumption() -> None:
    r = reader(b"\x00\x01\x00\x02\x00\x03")
    with r.restrict_to(4):
        assert r.u16() == 1
        assert r.u16() == 2
        with pytest.raises(TruncatedError):
            r.u16()  # the restriction is the end now
    assert r.u16() == 3
    r = reader(b"\x00\x01\x00\x02")
    with pytest.raises(MalformedError, match="unread"), r.restrict_to(4):
        r.u16()


def test_restrict_to_beyond_the_end_is_truncation() -> None:
    with pytest.raises(TruncatedError), reader(b"\x00\x01").restrict_to(3):
        pass


def test_sub_reader_is_bounded_and_offsets_are_absolute() -> None:
    r = reader(b"\xff\x00\x01\x00\x02\xee")
    r.u8()
    sub = r.sub(4)
    assert r.u8() == 0xEE
    assert sub.u16() == 1
    assert sub.offset == 3
    sub.u16()
    with pytest.raises(TruncatedError) as info:
        sub.u8()
    assert info.value.offset == 5


def test_unpack_many_checks_once_then_iterates_in_c() -> None:
    st = struct.Struct("!HH")
    r = reader(struct.pack("!HHHHH", 1, 2, 3, 4, 9))
    assert list(r.unpack_many(st, 2)) == [(1, 2), (3, 4)]
    assert r.remaining() == 2
    with pytest.raises(TruncatedError):
        r.unpack_many(st, 1)


def test_negative_lengths_are_refused() -> None:
    with pytest.raises(TruncatedError):
        reader(b"abc").bytes(-1)
