"""jfe's TLS relay: one `ssl.SSLObject` over MemoryBIOs, driven by raw non-blocking syscalls.

Why not `trio.SSLStream`: profiled in bench/jfe.py (py-spy), its generic machinery cost more
than the crypto. Each ``receive_some`` returned one TLS record (16 KiB) and each record became
one ``send`` to the backend, with trio's conflict detectors, a lock, and two checkpoints per
call around every syscall: jfe reached half of haproxy's bulk rate at twice its CPU per MB.

Here each direction moves up to `CHUNK_BYTES` per wakeup:

- client -> backend: one ``readv`` of up to 256 KiB of records into the incoming BIO, then
  `SSLObject.read` into a plaintext buffer until the BIO runs dry or the buffer is full, then
  one ``write`` of the whole plaintext to the backend;
- backend -> client: one ``readv`` of up to 256 KiB of plaintext, one `SSLObject.write` (several
  records), one ``write`` of the ciphertext.

An ``ssl.SSLSocket`` over the real socket would skip the BIO copy, but OpenSSL then reads each
record with two ``read`` calls (header, body; Python's ssl offers no read-ahead) and the
ClientHello jfe already read to choose TLS could not be replayed into it.

The receive and plaintext buffers are shared by every connection of a thread (trio runs one
task at a time and nothing awaits while they hold data), so an idle connection holds only its
SSLObject and two empty BIOs. Bytes a socket did not take at once are copied out and kept by
their connection until sent: at most one chunk per direction. Two tasks may write the client
socket: the backend -> client copy, or the other direction flushing the records
`SSLObject.read` produced itself (a TLS 1.3 KeyUpdate answer). Writes that the socket takes at
once need no lock; `_send_lock` is held only by a task waiting for the socket, and whoever
comes next queues behind it, so records leave in the order they were made.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import threading
from collections.abc import Callable
from typing import cast

import trio

#: One read of a TLS stream: 16 TLS records of plaintext per wakeup.
CHUNK_BYTES = 256 * 1024
#: One read while the handshake runs: the client's flight after its ClientHello is a Finished
#: (and at most a few records more), so a client that is not through the handshake yet can
#: never park more than this in its incoming BIO.
HANDSHAKE_READ_BYTES = 32 * 1024


class _Buffers(threading.local):
    """The shared buffers, one pair per thread: each trio run (one per thread) owns its own."""

    def __init__(self) -> None:
        self.received = memoryview(bytearray(CHUNK_BYTES))
        self.plain = memoryview(bytearray(CHUNK_BYTES))


_BUFFERS = _Buffers()


class TlsClosed(Exception):
    """The client closed (or broke) the connection during the handshake."""


def _read_into(fd: int, view: memoryview) -> int | None:
    """One non-blocking read into ``view``: bytes read (0 at EOF), None if nothing is there."""
    try:
        return os.readv(fd, [view])
    except BlockingIOError:
        return None


def _write(fd: int, data: bytes | memoryview) -> int:
    """One non-blocking write: bytes taken (0 when the socket is full)."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return 0


async def receive_into(fd: int, view: memoryview) -> int:
    """Read at least one byte (or EOF: 0) into ``view``, waiting only when nothing is there."""
    while True:
        n = _read_into(fd, view)
        if n is not None:
            return n
        await trio.lowlevel.wait_readable(fd)


async def send_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data``; the part the socket does not take at once is copied and kept."""
    try:
        sent = os.write(fd, data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    rest = memoryview(bytes(data[sent:]))  # ``data`` may be a shared buffer: own the rest
    while rest:
        await trio.lowlevel.wait_writable(fd)
        try:
            rest = rest[os.write(fd, rest) :]
        except BlockingIOError:
            continue


class _Pace:
    """When a copy loop yields to the other tasks between two chunks.

    A read that came back short drained the socket: the next one almost surely finds nothing
    and waits, and that wait is the yield, so a checkpoint before it would be a second trip
    through trio's scheduler for nothing (two per chunk of a short exchange). A full read, or
    `MAX_UNYIELDED` reads in a row that found data, checkpoint first: a sender that keeps the
    socket busy can never starve the other connections. (The yield comes before the read:
    the receive buffer is shared, nothing may await while it holds data.)
    """

    MAX_UNYIELDED = 4

    __slots__ = ("_unyielded", "due")

    def __init__(self) -> None:
        self.due = False
        self._unyielded = 0

    def before_read(self, last: int, size: int) -> None:
        self._unyielded += 1
        self.due = last >= size or self._unyielded >= self.MAX_UNYIELDED

    async def checkpoint(self) -> None:
        self._unyielded = 0
        await trio.lowlevel.checkpoint()


class TlsConnection:
    """The server side of one TLS connection on the client socket ``fd``."""

    def __init__(self, fd: int, context: ssl.SSLContext, received: bytes) -> None:
        self._fd = fd
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        if received:  # the ClientHello (and anything after it) that jfe read to choose TLS
            self._incoming.write(received)
        self._received, self._plain = _BUFFERS.received, _BUFFERS.plain
        self._send_lock = trio.Lock()  # held only by a task that waits for the socket
        self._rest: memoryview | bytes = b""  # records the client's socket has not taken yet
        self._last_fill = 0  # bytes the last `_fill` read (see `_yield_before_read`)

    def selected_alpn_protocol(self) -> str | None:
        return self._tls.selected_alpn_protocol()

    def _write_now(self) -> None:
        """Write queued records without waiting; what the socket refuses stays in `_rest`."""
        fd = self._fd
        if self._rest:
            self._rest = self._rest[_write(fd, self._rest) :]
        while not self._rest and self._outgoing.pending:
            data = self._outgoing.read()
            sent = _write(fd, data)
            if sent < len(data):
                self._rest = memoryview(data)[sent:]

    async def _flush(self) -> None:
        """Send every queued record, in order; waits only while the client's socket is full."""
        if not self._send_lock.locked():  # no task is waiting to send: write right now
            self._write_now()
            if not self._rest:
                return
        async with self._send_lock:
            while True:
                self._write_now()
                if not self._rest:
                    return
                await trio.lowlevel.wait_writable(self._fd)

    async def _fill(self, limit: int = CHUNK_BYTES) -> bool:
        """Client bytes into the incoming BIO; False at EOF (the BIO is then at EOF too)."""
        n = await receive_into(self._fd, self._received[:limit])
        self._last_fill = n
        if n == 0:
            self._incoming.write_eof()
            return False
        self._incoming.write(self._received[:n])
        return True

    async def handshake(self) -> None:
        """Complete the handshake (TlsClosed if the client went away, ssl.SSLError if bad)."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                try:
                    if not await self._fill(HANDSHAKE_READ_BYTES):
                        raise TlsClosed from None
                except OSError:
                    raise TlsClosed from None
                continue
            except ssl.SSLEOFError:
                raise TlsClosed from None
            await self._flush()  # the server's last flight and TLS 1.3 session tickets
            return

    async def client_to(self, upstream: int, count: Callable[[int], None]) -> None:
        """Decrypted client bytes to the backend socket ``upstream`` until the client's
        close_notify ends its direction; ssl.SSLError if the stream is bad or cut short."""
        # With a buffer, read returns a count (typeshed says bytes either way).
        read = cast(Callable[[int, memoryview], int], self._tls.read)
        size, got, plain = CHUNK_BYTES, 0, self._plain
        pace = _Pace()
        while True:
            # Records already in the BIO first: the handshake's last read may hold data.
            try:
                n = read(size - got, plain[got:])
            except ssl.SSLWantReadError:
                n = -1
            except ssl.SSLZeroReturnError:
                n = 0
            if n > 0:
                got += n
                if got < size:
                    continue
            if got:
                # send_all takes or copies the shared buffer before it ever awaits.
                count(got)
                await send_all(upstream, plain[:got])
                got = 0
            if self._outgoing.pending:
                await self._flush()
            if n == 0:
                return
            if n < 0:
                pace.before_read(self._last_fill, CHUNK_BYTES)
                if pace.due:
                    await pace.checkpoint()
                await self._fill()  # at EOF the next read raises (SSLEOFError) or ends

    async def to_client(self, upstream: int, count: Callable[[int], None]) -> None:
        """Backend bytes from ``upstream``, encrypted, to the client until the backend's EOF."""
        tls, received = self._tls, self._received
        pace = _Pace()
        while True:
            n = await receive_into(upstream, received)
            if n == 0:
                return
            count(n)
            view = received[:n]
            while view:  # a memory BIO takes everything: one pass in practice
                view = view[tls.write(view) :]
            await self._flush()
            pace.before_read(n, CHUNK_BYTES)
            if pace.due:
                await pace.checkpoint()

    async def close_notify(self, timeout: float) -> None:
        """Say close_notify; never wait for the client's own (it may not read at all), and
        wait at most ``timeout`` for a client whose socket is full."""
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        with contextlib.suppress(OSError):
            if not self._send_lock.locked():
                self._write_now()  # the usual case: sent at once, no timer needed
                if not self._rest:
                    return
            with trio.move_on_after(timeout):
                await self._flush()


__all__ = ["CHUNK_BYTES", "TlsClosed", "TlsConnection", "receive_into", "send_all"]
