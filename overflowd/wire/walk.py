"""One datagram's walk over its parts: NetFlow v9 flowsets, IPFIX sets, sFlow samples.

Real exporters send datagrams a strict reading refuses — zero padding after the last v9
flowset (Palo Alto PAN-OS, Cisco ACI), bytes after the last sFlow sample, a flowset whose
body is wrong — while every other part decodes. Refusing the datagram would lose those good
records for a defect that hides nothing, so the walk is liberal where nothing is lost:

* a part that fails to decode loses only itself when its own length let the walk step over
  it (``<part>_<code>``, e.g. ``flowset_malformed``);
* a tail that is not a part ends the walk: all zeros is ``trailing_padding``, anything else
  ``trailing_bytes`` or ``<part>_truncated``;
* those defects are counted by kind in ``DecoderStatistics.defects`` (``<format>/<kind>``)
  once the walk ends — if anything in the datagram decoded. A datagram in which nothing
  decoded is refused with its first error, exactly as a strict decoder would, so garbage
  still shows up under ``malformed``.

Pure: no I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from overflowd.wire.reader import WireDecodeError

if TYPE_CHECKING:
    from overflowd.wire.dispatch import DecoderState

__all__ = ["Walk"]


class Walk:
    """What one datagram's walk kept, and the defects it tolerated meanwhile."""

    __slots__ = ("error", "fmt", "kept", "noted")

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        #: Parts decoded without error (template, data, counter samples, skipped ones alike).
        self.kept = 0
        #: The first error, raised by :meth:`finish` if nothing was kept.
        self.error: WireDecodeError | None = None
        self.noted: list[str] = []

    def failed(self, part: str, exc: WireDecodeError) -> None:
        """A part (its length known, the walk goes on) that did not decode."""
        if self.error is None:
            self.error = exc
        self.noted.append(f"{part}_{exc.code}")

    def tail(self, data: bytes, start: int, end: int, kind: str, exc: WireDecodeError) -> None:
        """``data[start:end]`` ends the datagram and is no part: padding if all zeros (not an
        error whatever else happened), else — or if empty: parts announced and missing — the
        defect ``kind`` whose strict reading is ``exc``."""
        if start < end and not any(data[start:end]):
            self.noted.append("trailing_padding")
            return
        if self.error is None:
            self.error = exc
        self.noted.append(kind)

    def finish(self, state: DecoderState, records: list[Any]) -> None:
        """Refuse the datagram if nothing in it decoded and something failed; else count."""
        if self.error is not None and not self.kept and not records:
            raise self.error
        for kind in self.noted:
            state.defect(self.fmt, kind)
