"""The in-band datagram: a signed report as the payload of one UDP datagram (sans-IO).

Layout (docs/protocol.md §6, docs/notify.md)::

    0      4                                   ≤ 1200
    +------+-----------------------------------+
    | OVF1 | COSE_Sign1 bytes (docs/protocol §1) |
    +------+-----------------------------------+

The magic is the four bytes ``4f 56 46 01`` (``b"OVF\\x01"``): ``OVF`` names the protocol, the
fourth byte is the datagram version. It lets a receiver on port 65535 throw away the stray
traffic every high port gets (scans, traceroute probes) before spending a CBOR parse and an
Ed25519 verification on it, and leaves room for a version 2 that older nodes refuse cleanly.
There is no length field: UDP already delimits the datagram, and the COSE encoding delimits
itself (trailing bytes fail the canonical-encoding check of :func:`decode_unverified`).

1200 bytes is the limit because it is what fits the IPv6 minimum MTU (1280) less the IPv6 and
UDP headers with room to spare, so a datagram is never fragmented on any path; the report codec
keeps every report within 1196 bytes so that magic + report always fit.

This module must never do I/O, and never return anything but a report or raise anything but a
:class:`~overflowd.errors.DecodeError` for any input bytes.
"""

from __future__ import annotations

from overflowd import report as rpt
from overflowd.wire.reader import MalformedError, Reader, WireDecodeError

__all__ = [
    "FORMAT",
    "MAGIC",
    "MAX_DATAGRAM_BYTES",
    "BadMagicError",
    "OversizeError",
    "decode",
    "from_wire",
    "to_wire",
]

#: ``OVF`` and datagram version 1.
MAGIC = b"OVF\x01"
#: One datagram, magic included, never exceeds this (see module docstring).
MAX_DATAGRAM_BYTES = 1200
FORMAT = "inband-datagram"

assert len(MAGIC) + rpt.MAX_REPORT_BYTES == MAX_DATAGRAM_BYTES


class BadMagicError(MalformedError):
    """The datagram does not start with :data:`MAGIC`: not ours, or a version we do not know."""

    code = "bad_magic"


class OversizeError(MalformedError):
    """Longer than :data:`MAX_DATAGRAM_BYTES`; refused before any parsing."""

    code = "oversize"


def to_wire(cose: bytes) -> bytes:
    """The datagram carrying ``cose``; ValueError if the report would not fit (a caller bug)."""
    if len(cose) > rpt.MAX_REPORT_BYTES:
        raise ValueError(f"report is {len(cose)} bytes, more than {rpt.MAX_REPORT_BYTES}")
    if not cose:
        raise ValueError("empty report")
    return MAGIC + bytes(cose)


def from_wire(data: bytes | bytearray | memoryview, *, sender: str | None = None) -> bytes:
    """The COSE bytes inside a datagram, after checking its size and magic.

    Raises :class:`OversizeError`, :class:`BadMagicError` or
    :class:`~overflowd.wire.reader.TruncatedError` (all :class:`WireDecodeError`).
    """
    data = bytes(data)
    if len(data) > MAX_DATAGRAM_BYTES:
        raise OversizeError(
            f"{len(data)} bytes, more than {MAX_DATAGRAM_BYTES}",
            fmt=FORMAT,
            offset=MAX_DATAGRAM_BYTES,
            exporter=sender,
        )
    reader = Reader(data, fmt=FORMAT, exporter=sender)
    if reader.remaining() < len(MAGIC) and not MAGIC.startswith(data):
        # Shorter than the magic and not a prefix of it: not ours at all, not truncated.
        raise BadMagicError(
            "not an overflowd datagram (bad magic)", fmt=FORMAT, offset=0, exporter=sender
        )
    magic = reader.bytes(len(MAGIC))  # TruncatedError when a prefix of the magic
    if magic != MAGIC:
        raise BadMagicError(
            "not an overflowd datagram (bad magic)", fmt=FORMAT, offset=0, exporter=sender
        )
    if reader.at_end():
        raise reader.truncated("report", 1)
    return reader.bytes(reader.remaining())


def decode(
    data: bytes | bytearray | memoryview, *, sender: str | None = None
) -> rpt.UnverifiedReport:
    """Parse a datagram into a report whose signature is *not yet* checked.

    Any input either returns or raises a :class:`~overflowd.errors.DecodeError`:
    :class:`WireDecodeError` for the envelope, :class:`~overflowd.errors.ReportDecodeError`
    for the report inside.
    """
    return rpt.decode_unverified(from_wire(data, sender=sender))


def reason_of(exc: Exception) -> str:
    """A short stable counter name for a refused datagram."""
    if isinstance(exc, WireDecodeError):
        return exc.code
    return "malformed"
