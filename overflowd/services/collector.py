"""The flow collector: one UDP socket takes NetFlow v5/v9, IPFIX and sFlow v5.

It only receives, in batches: it drains up to ``BATCH_DATAGRAMS`` datagrams with one
``recvmmsg(2)`` call (:class:`~overflowd.services.recvmmsg.BatchReceiver`: ctypes, buffers
allocated once, no Python bytecode per datagram; a ``recvfrom`` loop where there is no
recvmmsg) and hands them on as one list (a trio ``await`` per datagram costs ~25 µs, more
than decoding a whole v5 datagram). It drains at most every ``coalesce_s`` (10 ms): woken
sooner, it first waits for more to arrive. Each batch costs a fixed ~0.2-0.3 ms (trio, the
decoder's numpy calls), so on a quiet machine at 20k datagrams/s a wake-up per datagram or two
took the daemon a whole core where nfcapd takes a fifth of one; the wait holds batches to 100
a second whatever the rate, and while they come full there is no wait at all. The kernel
buffer holds what arrives meanwhile: the wait is also bounded so that, at the byte rate of the
last batch, at most an eighth of the receive buffer fills, and there is none on a buffer below
``COALESCE_MIN_RCVBUF``. Receiving a 1.4 KB v5 datagram costs ~2.6 µs of CPU with
``recvfrom`` (kernel included), ~1.5-2.1 µs with the recvmmsg receiver, of which ~0.9 µs is
the call and the kernel's copy and most of the rest the ``bytes`` object per datagram
(bench/recv_micro.py). So a drain whose datagrams all fit their compact slots is handed on
as a :class:`DatagramBatch` holding one copy of those slots, the ``bytes`` of a datagram
made only when it is asked for: NetFlow v5 is decoded in the slots (node.py).

Batches go into a channel whose bound is counted in datagrams (a :class:`Backlog` shared with
the consumer), so memory is bounded however the datagrams are batched; when the decoder falls
behind, the newest batch is dropped and its datagrams counted (``dropped_queue_full``). The
kernel's own drops on the socket (receive buffer full) are read from ``/proc/net/udp`` so an
operator can tell our drops from the kernel's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple, overload

import trio

from overflowd.config import parse_listen
from overflowd.services.recvmmsg import BatchReceiver, Received

__all__ = [
    "Backlog",
    "CollectorStatistics",
    "Datagram",
    "DatagramBatch",
    "RefusedExporters",
    "UdpCollector",
    "kernel_drops",
    "open_socket",
    "parse_listen",
]

log = logging.getLogger(__name__)

#: A flow datagram never exceeds a UDP payload (65507 bytes over IPv4).
MAX_DATAGRAM_BYTES = 65535
#: Datagrams read per wake-up at most, so one busy socket cannot starve the other tasks.
BATCH_DATAGRAMS = 256
#: Drains are at least this far apart (seconds), unless batches come full: the latency added
#: to a datagram, in exchange for at most 1/COALESCE_S batches a second. Flow records are
#: minutes old when exported; 10 ms against 4 ms cut the daemon's CPU per v5 record at 5k
#: datagrams/s by another 15%.
COALESCE_S = 0.010
#: No waiting on smaller receive buffers (as granted, bytes): they hold too little to wait on.
COALESCE_MIN_RCVBUF = 1024 * 1024


class Datagram(NamedTuple):
    """One datagram as received. A NamedTuple: built per datagram, it costs half a frozen
    dataclass (~0.13 µs against ~0.26 µs here)."""

    data: bytes
    exporter: str
    received: float  # Unix seconds


class DatagramBatch(Sequence[Datagram]):
    """One drain's datagrams, handed on as one object: a sequence of :class:`Datagram`.

    Its payloads may still sit in one copy of the receiver's compact slots (``block``:
    datagram ``i`` is ``block[i * stride : i * stride + lengths[i]]``, the rest of a slot
    stale): a decoder that reads them in place (``decode_v5_batch(slots=...)``) makes no
    ``bytes`` per datagram; indexing or iterating makes the ``Datagram`` asked for, which
    each stay whole and separate, so the per-datagram boundary is the same as a list's.
    """

    __slots__ = ("_datagrams", "block", "exporters", "held_bytes", "lengths", "received", "stride")

    def __init__(self, got: Received, received: float) -> None:
        self.exporters = got.exporters
        self.received = received
        self.block = got.block
        self.stride = got.stride
        self.lengths = got.lengths
        self._datagrams: list[Datagram] | None = None
        if got.block is None:
            self._datagrams = list(map(_make, zip(got.payloads, got.exporters, repeat(received))))
        #: What the batch holds in memory while queued: the slots' copy, or the payloads.
        self.held_bytes = len(got.block) if got.block is not None else got.nbytes

    def datagrams(self) -> list[Datagram]:
        """Every datagram as a ``Datagram`` (made once, by ``map`` in C)."""
        if self._datagrams is None:
            block, stride, lengths = self.block, self.stride, self.lengths
            assert block is not None and lengths is not None
            starts = range(0, len(lengths) * stride, stride)
            payloads = map(
                block.__getitem__, map(slice, starts, map(operator.add, starts, lengths))
            )
            self._datagrams = list(map(_make, zip(payloads, self.exporters, repeat(self.received))))
        return self._datagrams

    def __len__(self) -> int:
        return len(self.exporters)

    @overload
    def __getitem__(self, i: int) -> Datagram: ...
    @overload
    def __getitem__(self, i: slice) -> list[Datagram]: ...
    def __getitem__(self, i: int | slice) -> Datagram | list[Datagram]:
        if self._datagrams is not None or isinstance(i, slice):
            return self.datagrams()[i]
        n = len(self.exporters)
        if not -n <= i < n:
            raise IndexError("datagram index out of range")
        i %= n
        assert self.block is not None and self.lengths is not None
        at = i * self.stride
        return Datagram(self.block[at : at + self.lengths[i]], self.exporters[i], self.received)

    def __iter__(self) -> Iterator[Datagram]:
        return iter(self.datagrams())

    def may_hold_v5(self) -> bool:
        """Whether some datagram begins with NetFlow v5's version (C-level, no bytes made;
        a short datagram's stale bytes may say yes: the decoder checks lengths)."""
        if self.block is None or self.stride % 2:
            return b"\x00\x05" in [d.data[:2] for d in self.datagrams()]
        firsts = memoryview(self.block).cast("H")[:: self.stride // 2]
        return _V5_WORD in firsts.tolist()


#: NetFlow v5's version field as the first 16-bit word of a datagram in native order.
_V5_WORD = int.from_bytes(b"\x00\x05", sys.byteorder)
_make = functools.partial(tuple.__new__, Datagram)


#: Bytes of datagrams waiting for the decoder at most: 10,000 large (fragmented, spoofed)
#: datagrams would otherwise hold ~650 MB.
BACKLOG_MAX_BYTES = 64 * 1024 * 1024


class Backlog:
    """Datagrams handed on and not yet consumed, bounded in count and in bytes.

    Collectors add what they queue; the consumer calls :meth:`done` for what it finished. One
    trio thread touches it, so no lock is needed.
    """

    def __init__(self, limit: int, max_bytes: int = BACKLOG_MAX_BYTES) -> None:
        if limit < 1 or max_bytes < MAX_DATAGRAM_BYTES:
            raise ValueError("backlog limits must hold at least one datagram")
        self.limit = limit
        self.max_bytes = max_bytes
        self.queued = 0
        self.queued_bytes = 0

    def admit(self, n: int, nbytes: int) -> bool:
        if self.queued + n > self.limit or self.queued_bytes + nbytes > self.max_bytes:
            return False
        self.queued += n
        self.queued_bytes += nbytes
        return True

    def done(self, n: int, nbytes: int) -> None:
        self.queued -= n
        self.queued_bytes -= nbytes


@dataclass(frozen=True)
class CollectorStatistics:
    datagrams: int
    bytes: int
    dropped_queue_full: int
    kernel_drops: int | None
    rcvbuf_bytes: int
    batches: int = 0  # handed on (or dropped whole): datagrams / batches is the batch size
    #: datagrams larger than MAX_DATAGRAM_BYTES, dropped (none over UDP: a guard, counted)
    truncated: int = 0
    #: receiving with recvmmsg (False: the recvfrom fallback; None: not started)
    recvmmsg: bool | None = None


class UdpCollector:
    """Receive datagrams on ``listen`` and hand them to ``out`` without ever blocking on it."""

    def __init__(
        self,
        listen: tuple[str, int],
        out: trio.MemorySendChannel[DatagramBatch],
        backlog: Backlog,
        *,
        rcvbuf_bytes: int = 4 * 1024 * 1024,
        coalesce_s: float = COALESCE_S,
        sock: socket.socket | None = None,
        native: bool | None = None,
    ) -> None:
        """``sock``: an already bound socket to read (a receiver process's, see
        :mod:`overflowd.services.receivers`); it is not closed here, and ``rcvbuf_bytes``
        is its owner's business. ``native``: recvmmsg where there is one (None), the
        recvfrom loop (False), or recvmmsg or fail (True); see :class:`BatchReceiver`."""
        self.listen = listen
        self._given = sock
        self._out = out
        self._backlog = backlog
        self._rcvbuf_requested = rcvbuf_bytes
        self._coalesce_s = coalesce_s
        self._batches = 0
        self._rcvbuf = 0
        self._datagrams = 0
        self._bytes = 0
        self._dropped = 0
        self._truncated = 0
        self._native = native
        self._native_used: bool | None = None
        self._inode: int | None = None
        self._family = socket.AF_INET

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # Closing our clone of the channel when we stop lets the decoder drain and finish.
        with contextlib.ExitStack() as owned, self._out:
            if self._given is not None:
                sock = self._given
                sock.setblocking(False)
            else:
                sock = owned.enter_context(open_socket(self.listen, self._rcvbuf_requested))
            self._family = sock.family
            self._rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            self._inode = os.fstat(sock.fileno()).st_ino
            bound = sock.getsockname()
            log.info(
                "collector.listening addr=%s port=%s rcvbuf=%d", bound[0], bound[1], self._rcvbuf
            )
            receiver = BatchReceiver(sock, BATCH_DATAGRAMS, MAX_DATAGRAM_BYTES, native=self._native)
            owned.callback(receiver.close)
            self._native_used = receiver.native
            task_status.started((bound[0], bound[1]))
            send_nowait = self._out.send_nowait
            receive = receiver.receive
            coalesce = self._coalesce_s if self._rcvbuf >= COALESCE_MIN_RCVBUF else 0.0
            # At the byte rate of the last batch, waiting this long fills an eighth of the
            # buffer at most (a datagram takes up to twice its size there).
            fill_limit = self._rcvbuf / 8
            full = False
            last_drain = time.monotonic()
            last_bytes = 0
            while True:
                if full:
                    await trio.lowlevel.checkpoint()  # more is queued: drain again, no wait
                else:
                    await trio.lowlevel.wait_readable(sock)
                    if coalesce:
                        # Drains at most every `coalesce` seconds: the time the last batch
                        # took to decode counts (waiting on top of it would cap the rate at
                        # BATCH_DATAGRAMS per interval before batches came full).
                        elapsed = time.monotonic() - last_drain
                        wait = coalesce - elapsed
                        if last_bytes and elapsed > 0:
                            wait = min(wait, fill_limit * elapsed / (2 * last_bytes))
                        if wait > 0:
                            await trio.sleep(wait)
                got = receive(as_block=True)
                # No Python bytecode per datagram: the payloads stay in one copy of the
                # slots, or a list of Datagram is made by map() in C.
                batch = DatagramBatch(got, time.time())
                batch_bytes = got.nbytes
                self._truncated += got.truncated
                full = len(batch) + got.truncated == BATCH_DATAGRAMS
                last_drain = time.monotonic()
                last_bytes = batch_bytes
                self._datagrams += len(batch)
                self._bytes += batch_bytes
                if not batch:
                    continue
                self._batches += 1
                if not self._backlog.admit(len(batch), batch.held_bytes):
                    self._dropped += len(batch)
                    continue
                try:
                    send_nowait(batch)
                except trio.WouldBlock:  # the channel holds limit items: cannot happen; be safe
                    self._backlog.done(len(batch), batch.held_bytes)
                    self._dropped += len(batch)

    def statistics(self) -> CollectorStatistics:
        return CollectorStatistics(
            datagrams=self._datagrams,
            bytes=self._bytes,
            dropped_queue_full=self._dropped,
            kernel_drops=kernel_drops(self._inode, self._family),
            rcvbuf_bytes=self._rcvbuf,
            batches=self._batches,
            truncated=self._truncated,
            recvmmsg=self._native_used,
        )


def open_socket(
    listen: tuple[str, int], rcvbuf_bytes: int, *, reuseport: bool = False
) -> socket.socket:
    """A non-blocking UDP socket bound to ``listen`` (an IPv6 one takes IPv4 too).

    ``reuseport``: SO_REUSEPORT, so that several sockets share the address and the kernel
    spreads datagrams over them by a hash of source and destination address and port."""
    host, port = listen
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # A plain socket: we wait for readability with trio, then drain it without awaiting.
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        _set_rcvbuf(sock, rcvbuf_bytes)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            exc.filename = f"{host}:{port}"  # which socket: the CLI names its flag
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def _set_rcvbuf(sock: socket.socket, size: int) -> None:
    """Ask for ``size``; as root SO_RCVBUFFORCE passes net.core.rmem_max, as nfcapd -B does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def kernel_drops(inode: int | None, family: int) -> int | None:
    """The 'drops' column of /proc/net/udp{,6} for our socket, or None where unavailable."""
    if inode is None:
        return None
    table = Path("/proc/net/udp6" if family == socket.AF_INET6 else "/proc/net/udp")
    try:
        lines = table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) >= 13 and cols[9] == str(inode):
            return int(cols[12])
    return None


# ---------------------------------------------------------------------------------------------
# Exporters refused by collector.allowed_exporters

#: At most one warning per refused exporter per this many seconds: a router left out of
#: ``collector.allowed_exporters`` is named within a minute of its first datagram, and a
#: steady exporter costs one line a minute, not one per datagram.
REFUSED_LOG_INTERVAL_S = 60.0
#: Refused exporters counted one by one (their totals and their warnings' rate limit). Sources
#: are spoofable: past this many addresses the rest share one entry, ``other``, whose warning
#: is rate-limited like one exporter's, so a flood of spoofed sources costs at most this many
#: entries (~200 B each) and one line a minute.
REFUSED_EXPORTERS_TRACKED = 1024
#: The shared entry's name: not an address, so no exporter can take it.
OTHER = "other"


class _Refused:
    __slots__ = ("logged_at", "total", "unlogged")

    def __init__(self) -> None:
        self.total = 0
        self.unlogged = 0
        self.logged_at: float | None = None


class RefusedExporters:
    """Datagrams from exporters outside ``collector.allowed_exporters``: counted per exporter
    (bounded) and warned about, one line per exporter per ``interval_s`` naming it and the
    datagrams refused since its last line. The line for a new count is written with the next
    refused datagram after the interval (a refused exporter that goes quiet leaves its last
    few uncounted in the log, never in :meth:`totals`). No clock of its own: ``now`` is passed.
    """

    def __init__(
        self,
        *,
        max_tracked: int = REFUSED_EXPORTERS_TRACKED,
        interval_s: float = REFUSED_LOG_INTERVAL_S,
    ) -> None:
        if max_tracked < 1 or interval_s < 0:
            raise ValueError("max_tracked must be at least 1 and interval_s not negative")
        self._max = max_tracked
        self._interval = interval_s
        self._table: dict[str, _Refused] = {}
        self.lines = 0

    def refused(self, exporter: str, now: float) -> None:
        """Count one refused datagram from ``exporter``; warn if its interval has passed."""
        name = exporter
        entry = self._table.get(name)
        if entry is None:
            if len(self._table) >= self._max:
                name = OTHER
                entry = self._table.get(name)
            if entry is None:
                entry = self._table[name] = _Refused()
        entry.total += 1
        entry.unlogged += 1
        if entry.logged_at is not None and now - entry.logged_at < self._interval:
            return
        log.warning(
            "collector.exporter_refused exporter=%s%s datagrams=%d interval_s=%g "
            "reason=not_in_allowed_exporters",
            name,
            f" last={exporter}" if name == OTHER else "",
            entry.unlogged,
            self._interval,
        )
        self.lines += 1
        entry.logged_at = now
        entry.unlogged = 0

    def totals(self) -> Mapping[str, int]:
        """Datagrams refused per exporter, in the order they were first refused (``other``:
        those past the table's size)."""
        # list() copies in one C call: a scrape reads this from the metrics server's thread
        # while the decode task may add an entry; a Python-level loop over the dict could fail.
        return MappingProxyType({k: v.total for k, v in list(self._table.items())})
