"""Many datagrams per system call, with no Python bytecode run per datagram.

:class:`BatchReceiver` reads up to ``slots`` datagrams from a non-blocking UDP socket with
one ``recvmmsg(2)`` call through ctypes, into one buffer allocated once. Each datagram has a
compact slot of ``INLINE_BYTES`` (2 KiB: what flow exporters send fits) and, for the rest of
a larger one, a spill slot of its own up to ``slot_bytes`` in all; the ``mmsghdr``, ``iovec``
and ``sockaddr`` arrays pointing into the buffer are built once at construction. What a call
returns is read back without a Python loop: lengths and source addresses are strided
``memoryview`` casts over those arrays (``.tolist()`` in C), the payloads are ``bytes``
slices of the buffer made by ``map`` in C, exporter names come from a small cache keyed by
the raw address. An earlier ctypes attempt cost ~1.4 µs a datagram because it built ctypes
structures and bytes per message in Python. Left per datagram: the ``bytes`` object (~0.5
µs for 1.4 KB here, its malloc and memcpy; none with ``receive(as_block=True)``, which
hands over one copy of the slots) and list slots; per call, ~2 µs (ctypes and the system
call), i.e. ~0.01 µs a datagram in full batches (bench/recv_micro.py).

The per-datagram boundary is kept: each datagram stays its own ``bytes``; one that does not
fit ``slot_bytes`` (``MSG_TRUNC``: the kernel reports its real length) is dropped and
counted, never handed on cut. Memory is bounded: ``slots * slot_bytes`` of anonymous
``mmap``, whose pages are only backed once the kernel writes into them (256 slots: 512 KiB
compact, 16 MiB of spill address space that costs what large datagrams use), the exporter
cache capped at ``max(NAME_CACHE, slots)`` names.

Where ``recvmmsg`` is missing (not Linux, no such symbol in libc, ``ENOSYS``, or refused
with ``EPERM`` by a seccomp filter), the same interface is served by a ``recvfrom`` loop
(:attr:`BatchReceiver.native` is False).

No trio here: the caller waits for readability and calls :meth:`BatchReceiver.receive`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import operator
import socket
import sys
from collections.abc import Callable
from itertools import repeat
from typing import Any

__all__ = ["INLINE_BYTES", "NAME_CACHE", "BatchReceiver", "Received"]

log = logging.getLogger(__name__)

#: Exporter names remembered by raw address. Sources are spoofable: past this many the cache
#: starts over, so a flood of addresses costs at most this many short strings.
NAME_CACHE = 4096

#: Bytes of each datagram kept in its compact slot; the rest of a larger one spills into a
#: slot of its own. Flow exporters keep datagrams below the path MTU: v5 is at most 1464
#: bytes, softflowd's v9/IPFIX and hsflowd's sFlow stay under 1500.
INLINE_BYTES = 2048

MSG_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0x40)
MSG_TRUNC = getattr(socket, "MSG_TRUNC", 0x20)


class _Iovec(ctypes.Structure):
    _fields_ = (("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t))


class _Msghdr(ctypes.Structure):
    _fields_ = (
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.c_void_p),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    )


class _Mmsghdr(ctypes.Structure):
    _fields_ = (("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint))


def _recvmmsg() -> Any:
    """libc's recvmmsg with its signature set, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.recvmmsg
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


_RECVMMSG = _recvmmsg()
#: sockaddr_in is 16 bytes (address at 4), sockaddr_in6 28 (address at 8, scope id at 24).
_NAME_BYTES = {socket.AF_INET: 16, socket.AF_INET6: 28}


class Received:
    """One call's datagrams, in arrival order, and what was dropped.

    Either as ``bytes`` per datagram (:attr:`payloads`), or, from
    ``receive(as_block=True)`` when every datagram fit its compact slot, as one copy of
    the slots in use: datagram ``i`` is ``block[i * stride : i * stride + lengths[i]]``
    (the rest of its slot is stale), and :attr:`payloads` is made from it when asked.
    """

    __slots__ = ("_payloads", "block", "exporters", "lengths", "nbytes", "stride", "truncated")

    def __init__(
        self,
        payloads: list[bytes] | None,
        exporters: list[str],
        nbytes: int,
        truncated: int,
        *,
        block: bytes | None = None,
        stride: int = 0,
        lengths: list[int] | None = None,
    ) -> None:
        self._payloads = payloads
        self.exporters = exporters
        self.nbytes = nbytes  # of the datagrams kept
        self.truncated = truncated  # datagrams larger than a slot, dropped
        self.block = block
        self.stride = stride
        self.lengths = lengths

    @property
    def payloads(self) -> list[bytes]:
        if self._payloads is None:
            assert self.block is not None and self.lengths is not None
            starts = range(0, len(self.lengths) * self.stride, self.stride)
            ends = map(operator.add, starts, self.lengths)
            self._payloads = list(map(self.block.__getitem__, map(slice, starts, ends)))
        return self._payloads

    def __len__(self) -> int:
        return len(self.exporters)


class BatchReceiver:
    """Up to ``slots`` datagrams of ``sock`` per :meth:`receive`, one system call each."""

    def __init__(
        self,
        sock: socket.socket,
        slots: int,
        slot_bytes: int = 65535,
        *,
        native: bool | None = None,
    ) -> None:
        """``native``: None uses recvmmsg where there is one; False forces the recvfrom
        loop (the fallback); True demands recvmmsg (RuntimeError where missing)."""
        if slots < 1 or slot_bytes < 1:
            raise ValueError("slots and slot_bytes must be at least 1")
        if sock.family not in _NAME_BYTES:
            raise ValueError(f"not an IP socket: {sock.family!r}")
        if native and _RECVMMSG is None:
            raise RuntimeError("recvmmsg is not available here")
        self.sock = sock
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.native = _RECVMMSG is not None if native is None else native
        self._family = sock.family
        self._names: dict[object, str] = {}
        if not self.native:
            return
        self._fd = sock.fileno()
        name_bytes = _NAME_BYTES[sock.family]
        # Each datagram lands in a compact slot of `inline` bytes, its rest (if any) in a
        # spill slot of its own. Copying payloads out of compact slots costs ~0.55 µs a 1.4 KB
        # datagram either way (malloc and memcpy of the bytes object); the spill slots keep a
        # 64 KiB datagram whole without 64 KiB strides through memory for the common case.
        inline = min(slot_bytes, INLINE_BYTES)
        spill = slot_bytes - inline
        self._inline = inline
        names_at = slots * inline
        spill_at = names_at + slots * name_bytes
        # One anonymous mapping, only backed where the kernel writes: the spill slots of
        # datagrams that never came cost no memory.
        self._buf = mmap.mmap(-1, spill_at + slots * spill)
        self._anchor = ctypes.c_char.from_buffer(self._buf)  # holds the buffer's address
        base = ctypes.addressof(self._anchor)
        per = 2 if spill else 1
        self._iov = (_Iovec * (per * slots))()
        self._hdrs = (_Mmsghdr * slots)()
        for i in range(slots):
            self._iov[per * i].iov_base = base + i * inline
            self._iov[per * i].iov_len = inline
            if spill:
                self._iov[per * i + 1].iov_base = base + spill_at + i * spill
                self._iov[per * i + 1].iov_len = spill
            h = self._hdrs[i].msg_hdr
            h.msg_name = base + names_at + i * name_bytes
            h.msg_namelen = name_bytes
            h.msg_iov = ctypes.addressof(self._iov[per * i])
            h.msg_iovlen = per
        self._spill_at, self._spill = spill_at, spill
        # Strided uint32 views over the arrays the kernel writes: read with .tolist() (C).
        size = ctypes.sizeof(_Mmsghdr)
        if size % 4 or _Mmsghdr.msg_len.offset % 4 or _Msghdr.msg_namelen.offset % 4:
            raise RuntimeError("unexpected mmsghdr layout")  # pragma: no cover
        words = memoryview(self._hdrs).cast("B").cast("I")
        step = size // 4
        self._lengths = words[_Mmsghdr.msg_len.offset // 4 :: step]
        self._namelens = words[_Msghdr.msg_namelen.offset // 4 :: step]
        self._namelen_fill = memoryview(bytearray(4 * slots)).cast("I")
        for i in range(slots):
            self._namelen_fill[i] = name_bytes
        addr_words = memoryview(self._buf)[names_at:spill_at].cast("I")
        nstep = name_bytes // 4
        self._addr: tuple[memoryview, ...]
        if sock.family == socket.AF_INET:
            self._addr = (addr_words[1::nstep],)
        else:
            self._addr = tuple(addr_words[k::nstep] for k in (2, 3, 4, 5))
        self._call_args = (self._fd, ctypes.addressof(self._hdrs))
        self._starts = range(0, slots * inline, inline)

    def close(self) -> None:
        """Release the buffer (the socket is the caller's)."""
        if self.native and not self._buf.closed:
            # The headers still point into the buffer: no descriptor, so no receive after
            # this lets the kernel write into whatever is mapped there next.
            self._call_args = (-1, self._call_args[1])
            for view in (self._lengths, self._namelens, *self._addr):
                view.release()
            del self._anchor
            self._buf.close()

    def receive(self, *, as_block: bool = False) -> Received:
        """What is queued, up to ``slots`` datagrams; empty when nothing is (never blocks).
        ``as_block``: hand the payloads over as one copy of the compact slots where they
        all fit there (see :class:`Received`), no ``bytes`` per datagram.

        OSError other than "nothing queued" (EAGAIN) and a queued ICMP error (refused,
        reset: skipped) propagate.
        """
        if not self.native:
            return self._receive_fallback()
        fd, hdrs = self._call_args
        if self.sock.fileno() != fd:
            # The socket was closed (its number may be another socket's now), or this was.
            raise OSError(errno.EBADF, "recvmmsg: the socket or the receiver is closed")
        while True:
            n = _RECVMMSG(fd, hdrs, self.slots, MSG_DONTWAIT | MSG_TRUNC, None)
            if n > 0:
                break
            if n == 0:
                return Received([], [], 0, 0)
            err = ctypes.get_errno()
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return Received([], [], 0, 0)
            if err in (errno.EINTR, errno.ECONNREFUSED, errno.ECONNRESET):
                continue  # interrupted, or a queued ICMP error: not a datagram
            if err in (errno.ENOSYS, errno.EPERM):
                # A kernel without it, or a seccomp filter (a unit's SystemCallFilter=) that
                # refuses it: the recvfrom loop from now on, rather than a stopped collector.
                log.warning("collector.recvmmsg_unavailable errno=%s fallback=recvfrom", err)
                self.native = False
                return self._receive_fallback()
            raise OSError(err, f"recvmmsg: {errno.errorcode.get(err, err)}")
        # The kernel shrinks msg_namelen to what it wrote: put the room back for next time.
        self._namelens[:n] = self._namelen_fill[:n]
        lengths = self._lengths[:n].tolist()
        keys = self._keys(n)
        starts = self._starts
        if max(lengths) <= self._inline:  # the common case: no Python per datagram
            if as_block:
                block = self._buf[: n * self._inline]
                return Received(
                    None,
                    self._exporters(keys),
                    sum(lengths),
                    0,
                    block=block,
                    stride=self._inline,
                    lengths=lengths,
                )
            get = self._buf.__getitem__
            payloads = list(map(get, map(slice, starts, map(operator.add, starts, lengths))))
            return Received(payloads, self._exporters(keys), sum(lengths), 0)
        # Some spilled past their compact slot, or did not fit at all (MSG_TRUNC: msg_len is
        # the datagram's real size): those one by one.
        payloads, kept, nbytes, truncated = [], [], 0, 0
        buf, inline, spill_at, spill = self._buf, self._inline, self._spill_at, self._spill
        for i, length in enumerate(lengths):
            if length > self.slot_bytes:
                truncated += 1
                continue
            at = starts[i]
            if length <= inline:
                payloads.append(buf[at : at + length])
            else:
                rest = spill_at + i * spill
                payloads.append(buf[at : at + inline] + buf[rest : rest + length - inline])
            kept.append(keys[i])
            nbytes += length
        return Received(payloads, self._exporters(kept), nbytes, truncated)

    def _keys(self, n: int) -> list[Any]:
        """The raw source address of each datagram, hashable (C-level: no loop here)."""
        if len(self._addr) == 1:
            return self._addr[0][:n].tolist()
        return list(zip(*(view[:n].tolist() for view in self._addr), strict=True))

    def _exporters(self, keys: list[Any]) -> list[str]:
        names = list(map(self._names.get, keys))
        if None not in names:
            return names  # type: ignore[return-value]
        missing = set(keys).difference(self._names)
        if len(self._names) + len(missing) > NAME_CACHE:
            # Starts over, but never in the middle of a batch: the cache holds at most
            # max(NAME_CACHE, slots) names.
            self._names.clear()
            missing = set(keys)
        for key in missing:
            self._names[key] = self._name(key)
        return list(map(self._names.__getitem__, keys))

    def _name(self, key: Any) -> str:
        """Exporter text as recvfrom gives it (an IPv4-mapped address as plain IPv4)."""
        if self._family == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, key.to_bytes(4, sys.byteorder))
        raw = b"".join(w.to_bytes(4, sys.byteorder) for w in key[:4])
        if raw[:12] == b"\0" * 10 + b"\xff\xff":
            return socket.inet_ntop(socket.AF_INET, raw[12:])
        return socket.inet_ntop(socket.AF_INET6, raw)

    def _receive_fallback(self) -> Received:
        """The same, one ``recvfrom`` per datagram (Python per datagram: ~1.3 µs each)."""
        payloads: list[bytes] = []
        exporters: list[str] = []
        nbytes = truncated = 0
        recvfrom: Callable[..., tuple[bytes, Any]] = self.sock.recvfrom
        # One byte more than a slot: a datagram that fills it was cut (recvfrom truncates
        # silently), so it is dropped and counted as recvmmsg's MSG_TRUNC makes it.
        room = self.slot_bytes + 1
        for _ in repeat(None, self.slots):
            try:
                data, addr = recvfrom(room)
            except BlockingIOError:
                break
            except (ConnectionRefusedError, ConnectionResetError, InterruptedError):
                continue
            if len(data) == room:
                truncated += 1
                continue
            exporter = addr[0]
            if exporter.startswith("::ffff:"):
                exporter = exporter[7:]
            payloads.append(data)
            exporters.append(exporter)
            nbytes += len(data)
        return Received(payloads, exporters, nbytes, truncated)
