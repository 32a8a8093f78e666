"""Wire codecs, sans-IO: bytes in, values out; no sockets, no clocks, no global state.

Flow export formats (NetFlow v5, NetFlow v9, IPFIX, sFlow v5) come in through one entry
point, :func:`decode_datagram`, which sniffs the version and keeps what must be remembered
between datagrams (templates, held data, announced sampling, counters) in a bounded
:class:`DecoderState`. Capture files are read by :class:`CaptureReader`. Every length check
goes through :class:`~overflowd.wire.reader.Reader`; every refusal is a
:class:`~overflowd.errors.DecodeError` (subclasses in :mod:`overflowd.wire.reader`).

Nothing under ``overflowd.wire`` may import trio, socket, httpx, sqlalchemy or nacl.
"""

from overflowd.flows import FlowRecord, FlowRow
from overflowd.wire.dispatch import (
    DecoderState,
    DecoderStatistics,
    ExporterStatistics,
    decode_datagram,
    decode_datagram_rows,
    sniff_format,
)
from overflowd.wire.pcap import CaptureReader, CaptureStatistics, Frame, UdpDatagram
from overflowd.wire.reader import (
    MalformedError,
    Reader,
    TruncatedError,
    UnsupportedError,
    WireDecodeError,
)
from overflowd.wire.templates import Limits

__all__ = [
    "CaptureReader",
    "CaptureStatistics",
    "DecoderState",
    "DecoderStatistics",
    "ExporterStatistics",
    "FlowRecord",
    "FlowRow",
    "Frame",
    "Limits",
    "MalformedError",
    "Reader",
    "TruncatedError",
    "UdpDatagram",
    "UnsupportedError",
    "WireDecodeError",
    "decode_datagram",
    "decode_datagram_rows",
    "sniff_format",
]
