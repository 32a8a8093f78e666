"""Capture files, sans-IO: pcap (µs and ns, either byte order) and pcapng (any number of
sections and interfaces), to frames, and frames to UDP datagrams.

:class:`CaptureReader` is a push parser in the h11 style: feed it bytes with
:meth:`~CaptureReader.receive_data`, take frames with :meth:`~CaptureReader.next_frame`
until it says it needs more, and call :meth:`~CaptureReader.end_of_input` at the end. The
helpers :meth:`~CaptureReader.frames` and :meth:`~CaptureReader.udp_datagrams` do the reading
loop over bytes or a binary file object the caller opened.

A capture cut short in its last frame (a full disk, a killed tcpdump) is normal: the partial
frame is counted in ``truncated_frames`` and dropped, never fatal. A file that is not a
capture, or whose structure is inconsistent (a block length that contradicts itself), raises
:class:`~overflowd.wire.reader.WireDecodeError` with format ``pcap``/``pcapng`` and the byte
offset in the file.

Link types: Ethernet (1), raw IP (101, 12, 14, 228, 229), Linux cooked v1/v2 (113, 276),
BSD null/loop (0, 108). IP fragments are not reassembled: a UDP datagram that is not whole in
one frame is counted (``udp_incomplete``) and skipped.

Pure: the caller does the reading; this module opens nothing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple

from overflowd.errors import DecodeError
from overflowd.wire import packet
from overflowd.wire.reader import MalformedError, TruncatedError, UnsupportedError

__all__ = [
    "CaptureReader",
    "CaptureStatistics",
    "Frame",
    "UdpDatagram",
    "udp_from_frame",
]

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
RAW_IP_LINKTYPES = frozenset({LINKTYPE_RAW, 12, 14, LINKTYPE_IPV4, LINKTYPE_IPV6})

#: Largest block or record we buffer. Real captures use snaplen 262144 at most; a length
#: beyond this is a corrupt file, not a frame to wait for.
MAX_BLOCK_BYTES = 16 * 1024 * 1024
CHUNK_BYTES = 1 << 20

_PCAP_MAGICS = {
    b"\xa1\xb2\xc3\xd4": (">", 1_000_000),
    b"\xd4\xc3\xb2\xa1": ("<", 1_000_000),
    b"\xa1\xb2\x3c\x4d": (">", 1_000_000_000),
    b"\x4d\x3c\xb2\xa1": ("<", 1_000_000_000),
}
_PCAPNG_SHB = 0x0A0D0D0A
_PCAPNG_BYTE_ORDER = 0x1A2B3C4D
_BLOCK_IDB = 1
_BLOCK_OPB = 2
_BLOCK_SPB = 3
_BLOCK_EPB = 6


class Frame(NamedTuple):
    #: Capture time, Unix seconds.
    timestamp: float
    linktype: int
    data: bytes
    #: Length on the wire (``len(data)`` may be less: snaplen).
    original_length: int


class UdpDatagram(NamedTuple):
    timestamp: float
    src: str
    sport: int
    dport: int
    payload: bytes
    dst: str


@dataclass(frozen=True, slots=True)
class CaptureStatistics:
    frames: int
    #: A frame (or header) cut short by the end of the input; dropped.
    truncated_frames: int
    truncated_bytes: int
    udp_datagrams: int
    #: Frames skipped on the way to UDP.
    not_ip: int
    not_udp: int
    other_port: int
    #: UDP datagrams not whole in their frame (IP fragments, snaplen) or malformed headers.
    udp_incomplete: int
    undecodable: int
    #: pcapng blocks skipped (statistics, name resolution, custom...).
    blocks_skipped: int


class _Interface(NamedTuple):
    linktype: int
    snaplen: int
    ticks_per_second: int
    offset_s: int


class CaptureReader:
    """Push parser for one capture file (pcap or pcapng, recognised by its magic)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0  # parse position in _buf
        self._consumed = 0  # bytes of the file before _buf[0]
        self._kind: str | None = None  # "pcap" or "pcapng"
        self._endian = "<"
        # pcap
        self._linktype = 0
        self._ticks = 1_000_000
        # pcapng
        self._interfaces: list[_Interface] = []
        self._frames = 0
        self._truncated = 0
        self._truncated_bytes = 0
        self._udp = 0
        self._not_ip = 0
        self._not_udp = 0
        self._other_port = 0
        self._udp_incomplete = 0
        self._undecodable = 0
        self._blocks_skipped = 0
        self._ended = False

    @property
    def format(self) -> str | None:
        return self._kind

    # -- sans-IO interface -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self._ended:
            raise RuntimeError("receive_data after end_of_input")
        if self._pos > CHUNK_BYTES:
            del self._buf[: self._pos]
            self._consumed += self._pos
            self._pos = 0
        self._buf += data

    def end_of_input(self) -> None:
        """No more bytes: whatever is left over is a truncated frame (counted, not fatal)."""
        if self._ended:
            return
        self._ended = True
        left = len(self._buf) - self._pos
        if self._kind is None and left == 0 and self._consumed == 0:
            raise TruncatedError("empty file, not a capture", fmt="pcap", offset=0)
        if left:
            self._truncated += 1
            self._truncated_bytes += left
            self._pos = len(self._buf)

    def next_frame(self) -> Frame | None:
        """The next frame, or None when more input is needed (or the input has ended)."""
        while True:
            if self._kind is None and not self._file_header():
                return None
            if self._kind == "pcap":
                return self._pcap_record()
            step = self._pcapng_block()
            if step is None:
                return None
            if isinstance(step, Frame):
                return step

    def statistics(self) -> CaptureStatistics:
        return CaptureStatistics(
            frames=self._frames,
            truncated_frames=self._truncated,
            truncated_bytes=self._truncated_bytes,
            udp_datagrams=self._udp,
            not_ip=self._not_ip,
            not_udp=self._not_udp,
            other_port=self._other_port,
            udp_incomplete=self._udp_incomplete,
            undecodable=self._undecodable,
            blocks_skipped=self._blocks_skipped,
        )

    # -- convenience loops over a source the caller opened ---------------------------------

    def frames(self, source: bytes | BinaryIO, *, chunk_size: int = CHUNK_BYTES) -> Iterator[Frame]:
        """All frames of ``source`` (bytes, or a binary file object read in chunks)."""
        if isinstance(source, bytes | bytearray | memoryview):
            self.receive_data(bytes(source))
            yield from self._drain()
        else:
            while chunk := source.read(chunk_size):
                self.receive_data(chunk)
                yield from self._drain()
        self.end_of_input()

    def udp_datagrams(
        self, source: bytes | BinaryIO, *, port: int | None = None
    ) -> Iterator[UdpDatagram]:
        """UDP datagrams in ``source``; with ``port``, only those sent to that port."""
        for frame in self.frames(source):
            datagram = self._udp_of(frame)
            if datagram is None:
                continue
            if port is not None and datagram.dport != port:
                self._other_port += 1
                continue
            self._udp += 1
            yield datagram

    def _drain(self) -> Iterator[Frame]:
        while (frame := self.next_frame()) is not None:
            yield frame

    def _udp_of(self, frame: Frame) -> UdpDatagram | None:
        try:
            datagram, reason = _udp(frame)
        except DecodeError:
            self._undecodable += 1
            return None
        if datagram is None:
            if reason == "not_ip":
                self._not_ip += 1
            elif reason == "not_udp":
                self._not_udp += 1
            else:
                self._udp_incomplete += 1
        return datagram

    # -- parsing ---------------------------------------------------------------------------

    def _have(self, n: int) -> bool:
        return len(self._buf) - self._pos >= n

    def _error(self, cls: type[DecodeError], reason: str, at: int) -> DecodeError:
        return cls(reason, fmt=self._kind or "pcap", offset=self._consumed + at)

    def _file_header(self) -> bool:
        if not self._have(4):
            return False
        magic = bytes(self._buf[self._pos : self._pos + 4])
        if magic in _PCAP_MAGICS:
            if not self._have(24):
                return False
            self._kind = "pcap"
            self._endian, self._ticks = _PCAP_MAGICS[magic]
            _maj, _min, _zone, _sig, _snap, network = struct.unpack_from(
                self._endian + "HHiIII", self._buf, self._pos + 4
            )
            # The upper bits may carry FCS information (pcap spec, LinkType field).
            self._linktype = network & 0xFFFF
            self._pos += 24
            return True
        if struct.unpack_from("<I", magic)[0] == _PCAPNG_SHB:
            self._kind = "pcapng"
            return True
        raise self._error(UnsupportedError, "not a pcap or pcapng file", self._pos)

    def _pcap_record(self) -> Frame | None:
        if not self._have(16):
            return None
        start = self._pos
        secs, frac, incl, orig = struct.unpack_from(self._endian + "IIII", self._buf, start)
        if incl > MAX_BLOCK_BYTES:
            raise self._error(MalformedError, f"record of {incl} bytes", start + 8)
        if not self._have(16 + incl):
            return None
        data = bytes(self._buf[start + 16 : start + 16 + incl])
        self._pos = start + 16 + incl
        self._frames += 1
        return Frame(secs + frac / self._ticks, self._linktype, data, orig)

    def _pcapng_block(self) -> Frame | bool | None:
        """One block: a Frame, True for a block that was not a frame, None for more input."""
        if not self._have(12):
            return None
        start = self._pos
        buf = self._buf
        raw_type = struct.unpack_from("<I", buf, start)[0]
        if raw_type == _PCAPNG_SHB:
            # A new section: its byte-order magic decides how everything after it reads.
            order = struct.unpack_from("<I", buf, start + 8)[0]
            if order == _PCAPNG_BYTE_ORDER:
                self._endian = "<"
            elif order == 0x4D3C2B1A:
                self._endian = ">"
            else:
                raise self._error(MalformedError, "bad byte-order magic", start + 8)
            self._interfaces = []
        e = self._endian
        block_type, length = struct.unpack_from(e + "II", buf, start)
        if length < 12 or length % 4 or length > MAX_BLOCK_BYTES:
            raise self._error(MalformedError, f"block length {length}", start + 4)
        if not self._have(length):
            return None
        trailer = struct.unpack_from(e + "I", buf, start + length - 4)[0]
        if trailer != length:
            raise self._error(
                MalformedError, f"block length {length} but trailer says {trailer}", start
            )
        self._pos = start + length
        body = start + 8
        body_end = start + length - 4
        if block_type == _BLOCK_IDB:
            self._interfaces.append(self._interface(body, body_end))
            return True
        if block_type in (_BLOCK_EPB, _BLOCK_OPB):
            if body_end - body < 20:
                raise self._error(MalformedError, "short packet block", start)
            if block_type == _BLOCK_EPB:
                ifc, hi, lo, cap, orig = struct.unpack_from(e + "IIIII", buf, body)
            else:
                ifc, _drops, hi, lo, cap, orig = struct.unpack_from(e + "HHIIII", buf, body)
            data_at = body + 20
            if data_at + cap > body_end:
                raise self._error(MalformedError, f"captured length {cap} beyond block", start)
            interface = self._interface_at(ifc, start)
            ticks = (hi << 32) | lo
            stamp = interface.offset_s + ticks / interface.ticks_per_second
            self._frames += 1
            return Frame(stamp, interface.linktype, bytes(buf[data_at : data_at + cap]), orig)
        if block_type == _BLOCK_SPB:
            interface = self._interface_at(0, start)
            if body_end - body < 4:
                raise self._error(MalformedError, "short simple packet block", start)
            orig = struct.unpack_from(e + "I", buf, body)[0]
            cap = min(orig, body_end - body - 4)
            if interface.snaplen:
                cap = min(cap, interface.snaplen)
            self._frames += 1
            return Frame(0.0, interface.linktype, bytes(buf[body + 4 : body + 4 + cap]), orig)
        if block_type != _PCAPNG_SHB:
            self._blocks_skipped += 1
        return True

    def _interface_at(self, index: int, at: int) -> _Interface:
        if index >= len(self._interfaces):
            raise self._error(MalformedError, f"packet for undeclared interface {index}", at)
        return self._interfaces[index]

    def _interface(self, body: int, end: int) -> _Interface:
        e = self._endian
        buf = self._buf
        if end - body < 8:
            raise self._error(MalformedError, "short interface block", body)
        linktype, _reserved, snaplen = struct.unpack_from(e + "HHI", buf, body)
        ticks = 1_000_000
        offset_s = 0
        at = body + 8
        # Options: code, length, value padded to 4 bytes; code 0 ends the list.
        while at + 4 <= end:
            code, size = struct.unpack_from(e + "HH", buf, at)
            value = at + 4
            if code == 0:
                break
            if value + size > end:
                raise self._error(MalformedError, "interface option beyond its block", at)
            if code == 9 and size >= 1:  # if_tsresol
                resolution = buf[value]
                exponent = resolution & 0x7F
                if exponent > 30 if resolution & 0x80 else exponent > 18:
                    raise self._error(MalformedError, "absurd timestamp resolution", value)
                ticks = 2**exponent if resolution & 0x80 else 10**exponent
            elif code == 14 and size >= 8:  # if_tsoffset, seconds
                offset_s = struct.unpack_from(e + "q", buf, value)[0]
            at = value + size + (-size % 4)
        return _Interface(linktype, snaplen, ticks, offset_s)


def udp_from_frame(frame: Frame) -> UdpDatagram | None:
    """The UDP datagram a frame carries, or None (not IP, not UDP, incomplete).

    Raises a DecodeError for an IP header that does not parse.
    """
    return _udp(frame)[0]


def _udp(frame: Frame) -> tuple[UdpDatagram | None, str]:
    data = frame.data
    linktype = frame.linktype
    summary: packet.PacketSummary | None
    if linktype == LINKTYPE_ETHERNET:
        summary = packet.decode_ethernet(data)
    elif linktype in RAW_IP_LINKTYPES:
        summary = packet.decode_ip(data)
    elif linktype == LINKTYPE_LINUX_SLL:
        if len(data) < 16:
            return None, "not_ip"
        summary = packet.decode_ethertype(data, int.from_bytes(data[14:16]), offset=16)
    elif linktype == LINKTYPE_LINUX_SLL2:
        if len(data) < 20:
            return None, "not_ip"
        summary = packet.decode_ethertype(data, int.from_bytes(data[0:2]), offset=20)
    elif linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        # A 4-byte address family in the capturing host's byte order: trust the IP version
        # nibble instead of guessing the host.
        if len(data) < 5 or data[4] >> 4 not in (4, 6):
            return None, "not_ip"
        summary = packet.decode_ip(data, offset=4)
    else:
        return None, "not_ip"
    if summary is None:
        return None, "not_ip"
    if summary.proto != 17:
        return None, "not_udp"
    l4, end = summary.l4_offset, summary.l4_end
    if summary.fragment or end - l4 < 8:
        return None, "udp_incomplete"
    sport, dport, length = struct.unpack_from("!HHH", data, l4)
    if length == 0 and summary.src.version == 6:
        length = end - l4  # RFC 2675 jumbogram
    if length < 8 or l4 + length > end:
        return None, "udp_incomplete"
    payload = data[l4 + 8 : l4 + length]
    return (
        UdpDatagram(frame.timestamp, str(summary.src), sport, dport, payload, str(summary.dst)),
        "",
    )
