"""Live capture from a local interface, sampled 1 in N by the kernel before Python sees it.

A packet socket (``AF_PACKET``, ``SOCK_DGRAM``, all protocols) bound to one interface carries
the classic BPF program of `overflowd.wire.bpf.sampling_program`: the kernel draws a random
number for every packet and copies only about one in ``one_in`` (its first ``snaplen`` bytes
from the IP header on) into the socket. Each sampled packet becomes one flow record —
``packets`` 1, ``bytes`` its IP length, ``sampling_interval`` N, provenance ``announced`` (the
kernel did the sampling, at a rate we know exactly) — the same shape as an sFlow sample.

Why ``SOCK_DGRAM`` ("cooked") rather than ``SOCK_RAW``: the kernel strips the link-layer
header and hands us the ethertype, so one code path serves Ethernet, VLANs (already untagged
by the kernel), loopback, and tunnels without a link header (WireGuard, tun); with
``SOCK_RAW`` a WireGuard interface would need its own decoder. The filter reads only
ancillary data, so it is the same either way.

The filter is attached before the socket is bound to the interface, so not one unfiltered
packet is ever queued. Each wakeup reads what the kernel has queued (up to ``RECV_BATCH``
packets) and puts their rows into ``out`` as one list, without waiting: when ``out`` is full
the list is dropped and its rows counted, as the UDP collector does with datagrams. The
kernel's own counters (packets that passed the filter, and those dropped because our receive
buffer was full) come from ``PACKET_STATISTICS``; the kernel resets them on every read, so
they are accumulated here.

This is the one module that talks to packet sockets: opening one (no such interface, no
``CAP_NET_RAW``) fails with `ConfigError`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import socket
import struct
import time
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

import trio

from overflowd.errors import ConfigError, DecodeError
from overflowd.flows import FlowRow, make_row
from overflowd.wire import bpf
from overflowd.wire.packet import decode_ethertype

__all__ = ["CAPTURE_FORMAT", "CaptureStatistics", "KernelSampledCapture"]

log = logging.getLogger(__name__)

#: The ``format`` of the records this source makes.
CAPTURE_FORMAT = "capture"
#: Unexpected exception types counted by name, then "other" (bounded labels).
MAX_ERROR_TYPES = 32

# <linux/if_ether.h>, <linux/if_packet.h>, <asm-generic/socket.h>: not all are in `socket`.
ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23  # Linux 4.20
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
SO_TIMESTAMPNS = 35  # also the SCM type of the control message
#: ``struct tpacket_stats { unsigned int tp_packets, tp_drops; }``.
_TPACKET_STATS = struct.Struct("=II")
#: ``struct timespec`` as SO_TIMESTAMPNS delivers it (``long`` seconds and nanoseconds).
_TIMESPEC = struct.Struct("@ll")
_ANCILLARY_SPACE = socket.CMSG_SPACE(_TIMESPEC.size)

#: Default receive buffer: at the sampled rate, seconds of packets; the kernel counts overflow.
DEFAULT_RCVBUF_BYTES = 4 * 1024 * 1024
#: Packets read per wakeup before yielding to other tasks (bounds the time one turn takes).
RECV_BATCH = 64
#: One warning about undecodable packets per this many seconds; the rest are only counted.
UNDECODABLE_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class CaptureStatistics:
    interface: str
    one_in: int
    #: Sampled packets Python received.
    packets: int
    #: Of those: became a flow record (sent to ``out`` or dropped there).
    decoded: int
    #: Of those: not IPv4/IPv6 (only when the filter lets other ethertypes through).
    not_ip: int
    #: Of those: an IP header we could not decode.
    undecodable: int
    #: Records dropped because ``out`` was full.
    dropped_queue_full: int
    #: Packets the filter kept (``tp_packets``): what the kernel queued for us, or dropped.
    kernel_packets: int
    #: Packets the filter kept but the kernel dropped: our receive buffer was full.
    kernel_drops: int
    #: Times the socket reported the interface going down (``ENETDOWN``).
    interface_down: int
    rcvbuf_bytes: int
    #: Of the packets: dropped after an exception no decoder expected (a bug some packet
    #: reaches), by type; the capture goes on.
    input_errors: Mapping[str, int] = field(default_factory=dict)


class KernelSampledCapture:
    """Sample 1 in ``one_in`` packets arriving on ``interface`` into flow rows on ``out``.

    ``out`` carries lists of `FlowRow` (1 to ``RECV_BATCH`` rows, one per sampled packet, in
    arrival order), the shape `overflowd.wire.decode_datagram_rows` returns for a datagram.

    ``snaplen``: bytes kept per packet from the IP header on (128 holds IPv6 with a few
    extension headers and the transport ports). ``families``: IP versions sampled (``None``:
    every ethertype goes into the draw, non-IP frames are counted as ``not_ip``).
    ``outgoing``: also sample packets this host sends; off by default, so that capturing on
    every interface of a router sees each forwarded packet once, where it arrives.
    """

    def __init__(
        self,
        interface: str,
        one_in: int,
        out: trio.MemorySendChannel[list[FlowRow]],
        *,
        snaplen: int = 128,
        families: Collection[int] | None = (4, 6),
        outgoing: bool = False,
        rcvbuf_bytes: int = DEFAULT_RCVBUF_BYTES,
    ) -> None:
        if not interface or len(interface.encode()) >= 16 or "/" in interface:
            raise ValueError(f"{interface!r} is not an interface name")
        self.interface = interface
        self.one_in = one_in
        self.snaplen = snaplen
        self.outgoing = outgoing
        # Built (and checked) now: a bad one_in or snaplen is the caller's bug, found early.
        self.program = bpf.sampling_program(
            one_in, snaplen=snaplen, families=families, outgoing=outgoing
        )
        self.exporter = f"capture:{interface}"
        self._out = out
        self._rcvbuf_requested = rcvbuf_bytes
        self._rcvbuf = 0
        self._sock: socket.socket | None = None
        self._packets = 0
        self._decoded = 0
        self._not_ip = 0
        self._undecodable = 0
        self._input_errors: Counter[str] = Counter()
        self._dropped = 0
        self._kernel_packets = 0
        self._kernel_drops = 0
        self._down = 0
        self._last_undecodable_log = -UNDECODABLE_LOG_INTERVAL_S
        self._undecodable_unlogged = 0

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        # Closing our clone of the channel when we stop (or fail to start) lets the consumer
        # drain and finish.
        with self._out:
            sock, ifindex = self._open()
            with sock:
                self._sock = sock
                try:
                    log.info(
                        "capture.listening interface=%s one_in=%d snaplen=%d outgoing=%s rcvbuf=%d",
                        self.interface,
                        self.one_in,
                        self.snaplen,
                        self.outgoing,
                        self._rcvbuf,
                    )
                    task_status.started(self.interface)
                    await self._receive(sock, ifindex)
                finally:
                    self._poll_kernel()  # the last counts, while the socket is still open
                    self._sock = None

    def _open(self) -> tuple[socket.socket, int]:
        """The socket, filtered, then bound; OS refusals become `ConfigError` here."""
        where = f"capture interface {self.interface!r}"
        try:
            ifindex = socket.if_nametoindex(self.interface)
        except OSError as exc:
            raise ConfigError(f"{where}: no such interface") from exc
        try:
            # Protocol 0: the socket receives nothing until bound with ETH_P_ALL below, by
            # which time the filter is in place.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot open a packet socket: {exc.strerror}") from exc
        opened = False
        try:
            code = bpf.to_bytes(self.program)
            # struct sock_fprog { unsigned short len; struct sock_filter *filter; }: the
            # kernel copies the program during setsockopt; `filter_buffer` outlives the call.
            filter_buffer = ctypes.create_string_buffer(code, len(code))
            fprog = struct.pack("@HP", len(self.program), ctypes.addressof(filter_buffer))
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            if not self.outgoing:
                # The filter drops them too; this spares the kernel cloning them for us.
                try:
                    sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
                except OSError:
                    pass  # before Linux 4.20: the filter alone does it
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self._rcvbuf_requested)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._rcvbuf_requested)
            self._rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.bind((self.interface, ETH_P_ALL))  # no name lookup: never blocks
            sock.setblocking(False)
            opened = True
        except OSError as exc:
            raise ConfigError(f"{where}: {exc.strerror or exc}") from exc
        finally:
            if not opened:
                sock.close()
        return sock, ifindex

    async def _receive(self, sock: socket.socket, ifindex: int) -> None:
        recvmsg = sock.recvmsg
        handle = self._packet
        snaplen = self.snaplen
        while True:
            # One wakeup, then up to RECV_BATCH packets without yielding, handed on as one
            # list: per packet, a trip through trio's scheduler (ours, and the consumer's)
            # would cost more than decoding the packet does.
            await trio.lowlevel.wait_readable(sock)
            batch: list[FlowRow] = []
            for _ in range(RECV_BATCH):
                try:
                    data, ancillary, _flags, address = recvmsg(snaplen, _ANCILLARY_SPACE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno != errno.ENETDOWN:
                        raise
                    # The interface went down; the kernel resumes delivery when it is back up.
                    self._down += 1
                    log.warning("capture.interface_down interface=%s", self.interface)
                    break
                # AF_PACKET address: (ifname, ethertype, pkttype, hatype, hwaddr).
                row = handle(data, address[1], _arrival_ms(ancillary), ifindex)
                if row is not None:
                    batch.append(row)
            if batch:
                try:
                    self._out.send_nowait(batch)
                except trio.WouldBlock:
                    self._dropped += len(batch)

    def _packet(self, data: bytes, ethertype: int, arrival_ms: int, ifindex: int) -> FlowRow | None:
        """One sampled packet: its flow row, or None (counted) when it is not a flow."""
        self._packets += 1
        try:
            summary = decode_ethertype(data, ethertype, offset=0, exporter=self.exporter)
        except DecodeError as exc:
            self._undecodable += 1
            self._log_undecodable(exc)
            return None
        except Exception as exc:  # the per-packet boundary: one packet, never the capture
            name = type(exc).__name__
            if name not in self._input_errors and len(self._input_errors) >= MAX_ERROR_TYPES:
                name = "other"
            self._input_errors[name] += 1
            self._log_undecodable(exc)
            return None
        if summary is None:
            self._not_ip += 1
            return None
        self._decoded += 1
        return make_row(
            summary.src,
            summary.dst,
            summary.sport,
            summary.dport,
            summary.proto,
            1,
            summary.ip_length,
            arrival_ms,
            arrival_ms,
            summary.tcp_flags,
            summary.tos,
            None,
            None,
            self.exporter,
            ifindex,
            CAPTURE_FORMAT,
            self.one_in,
            "announced",
        )

    def _log_undecodable(self, exc: Exception) -> None:
        now = trio.current_time()
        if now - self._last_undecodable_log < UNDECODABLE_LOG_INTERVAL_S:
            self._undecodable_unlogged += 1
            return
        log.warning(
            "capture.undecodable interface=%s reason=%s suppressed_since_last=%d",
            self.interface,
            exc,
            self._undecodable_unlogged,
        )
        self._last_undecodable_log = now
        self._undecodable_unlogged = 0

    def _poll_kernel(self) -> None:
        """Add the kernel's counters since the last read (reading them resets them)."""
        if self._sock is None:
            return
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, _TPACKET_STATS.size)
        except OSError:
            return
        packets, drops = _TPACKET_STATS.unpack(raw)
        self._kernel_packets += packets
        self._kernel_drops += drops

    def statistics(self) -> CaptureStatistics:
        self._poll_kernel()
        return CaptureStatistics(
            interface=self.interface,
            one_in=self.one_in,
            packets=self._packets,
            decoded=self._decoded,
            not_ip=self._not_ip,
            undecodable=self._undecodable,
            input_errors=dict(self._input_errors),
            dropped_queue_full=self._dropped,
            kernel_packets=self._kernel_packets,
            kernel_drops=self._kernel_drops,
            interface_down=self._down,
            rcvbuf_bytes=self._rcvbuf,
        )


def _arrival_ms(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The kernel's receive timestamp (SO_TIMESTAMPNS) in Unix ms; our clock if it is missing.

    The kernel stamps the packet when it arrives, so a backlog in the socket does not shift
    ``first``/``last``.
    """
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            seconds: int
            nanoseconds: int
            seconds, nanoseconds = _TIMESPEC.unpack_from(data)
            return seconds * 1000 + nanoseconds // 1_000_000
    return int(time.time() * 1000)
