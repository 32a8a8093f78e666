"""jfe's TLS relay: one `ssl.SSLObject` over MemoryBIOs, driven by raw non-blocking syscalls.

Why not `trio.SSLStream`: profiled in bench/jfe.py (py-spy), its generic machinery cost more
than the crypto. Each ``receive_some`` returned one TLS record (16 KiB) and each record became
one ``send`` to the backend, with trio's conflict detectors, a lock, and two checkpoints per
call around every syscall: jfe reached half of haproxy's bulk rate at twice its CPU per MB.

Here each direction moves up to `CHUNK_BYTES` per wakeup, both in the connection's one task
(`TlsConnection.relay`: an epoll set of the two sockets, one trio wait per wakeup):

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
their connection until sent: at most one chunk per direction; while they wait, that direction
stops reading and the other goes on. Records leave in the order they were made: the
backend's data and the records `SSLObject.read` produced itself (a TLS 1.3 KeyUpdate answer)
queue in the one outgoing BIO. (`_send_lock` orders the handshake's and close_notify's
flushes, the only writers that wait inside an await.)
"""

from __future__ import annotations

import contextlib
import os
import select
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


#: Chunks a connection moves in a row before it yields to the others (when its sockets never
#: run dry: a connection that drained them yields in its wait).
MAX_UNYIELDED = 4

#: SSLObject.read with a buffer returns a count (typeshed says bytes either way); named once
#: here: ``Callable[...]`` subscripted in the relay built a new alias object on every call.
_ReadInto = Callable[[int, memoryview], int]

#: `TlsConnection.relay_step`'s answers.
WAITING, PROGRESSED, FULL, DONE = range(4)


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
        self._needs_client = False  # the client's direction waits for client bytes
        self._upstream = -1  # the backend's socket once the relay starts
        # Sides known to have nothing to read until the next wakeup (see `woke`).
        self._client_dry = self._up_dry = False

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

    def handshake_step(self) -> bool:
        """`handshake` without waiting (jfe.engine): True once complete, False while it waits
        for the client (`events` says for what). TlsClosed if the client went away,
        ssl.SSLError if bad, OSError if the socket broke while writing."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                flight = self._outgoing.pending
                self._write_now()
                if flight:
                    # The client answers what was just sent: it cannot have yet, so wait for
                    # it rather than read (the read would say EAGAIN: a syscall and an
                    # exception per handshake).
                    self._needs_client = True
                    return False
                try:
                    n = _read_into(self._fd, self._received[:HANDSHAKE_READ_BYTES])
                except OSError:
                    raise TlsClosed from None
                if n is None:
                    self._needs_client = True
                    return False
                if n == 0:
                    raise TlsClosed from None
                self._incoming.write(self._received[:n])
                continue
            except ssl.SSLEOFError:
                raise TlsClosed from None
            self._write_now()  # what the socket does not take now, the relay sends first
            self._needs_client = False
            return True

    def start_relay(
        self,
        upstream: int,
        count_up: Callable[[int], None],
        count_down: Callable[[int], None],
        client_done: Callable[[], None],
    ) -> None:
        """Set up `relay_step` (the callbacks as in `relay`)."""
        self._upstream = upstream
        self._count_up, self._count_down, self._client_done = count_up, count_down, client_done
        self._up_rest: memoryview | bytes = b""  # plaintext the backend has not taken yet
        self._client_reading = True  # until the client's close_notify (then client_done)
        self._client_eof = False  # close_notify seen; client_done once up_rest is gone
        self._backend_eof = False

    def woke(self, client: bool = True, upstream: bool = True) -> None:
        """A new wakeup: which sides may have bytes to read. In one wakeup a side that said
        EAGAIN (or, the client, gave a short read) is not read again: with level-triggered
        epoll, bytes that arrive meanwhile wake the connection again, so a second read could
        only say EAGAIN once more (a syscall and an exception, ~3 us). The engine also says
        which of the sockets registered for reading epoll did not report (no bytes then)."""
        self._client_dry, self._up_dry = not client, not upstream

    def relay_step(self) -> int:
        """One pass of both directions, never waiting: `DONE` (the backend's EOF, all of it
        sent to the client), `FULL` (moved a whole chunk: more is likely there), `PROGRESSED`
        or `WAITING` (nothing moved: wait for `events`). See `relay` and `woke`."""
        # With a buffer, read returns a count (typeshed says bytes either way).
        read = cast(_ReadInto, self._tls.read)
        fd, upstream, plain, received = self._fd, self._upstream, self._plain, self._received
        progressed = full = False
        # client -> backend
        if self._up_rest:
            self._up_rest = self._up_rest[_write(upstream, self._up_rest) :]
            progressed = not self._up_rest
        if self._client_eof and not self._up_rest:
            self._client_eof = self._client_reading = False
            self._client_done()
        self._needs_client = False
        if self._client_reading and not self._up_rest:
            got, n = 0, -1
            while got < CHUNK_BYTES:
                try:
                    n = read(CHUNK_BYTES - got, plain[got:])
                except ssl.SSLWantReadError:
                    n = -1
                except ssl.SSLZeroReturnError:
                    n = 0
                if n <= 0:
                    break
                got += n
            if got:
                self._count_up(got)
                sent = _write(upstream, plain[:got])
                if sent < got:
                    self._up_rest = bytes(plain[sent:got])  # the buffer is shared: own it
                progressed = True
                full = got == CHUNK_BYTES
            if n == 0:
                self._client_eof, progressed = True, True
            elif n < 0 and not self._up_rest:
                r = None if self._client_dry else _read_into(fd, received)
                if r is None:
                    self._needs_client = self._client_dry = True
                elif r == 0:
                    self._incoming.write_eof()  # the next read ends or raises
                    progressed = True
                else:
                    self._incoming.write(received[:r])
                    progressed = True
                    if r == CHUNK_BYTES:
                        full = True
                    else:  # drained (a client's EOF after its last bytes is rare)
                        self._client_dry = True
        # backend -> client (and records the client's direction made: KeyUpdate)
        if self._rest or self._outgoing.pending:
            before = len(self._rest)
            self._write_now()
            progressed = progressed or len(self._rest) < before
        if not self._rest and not self._backend_eof:
            r = None if self._up_dry else _read_into(upstream, received)
            if r is None:
                self._up_dry = True
            elif r == 0:
                self._backend_eof = progressed = True
            else:
                self._count_down(r)
                view = received[:r]
                while view:  # a memory BIO takes everything: one pass in practice
                    view = view[self._tls.write(view) :]
                self._write_now()
                progressed = True
                full = full or r == CHUNK_BYTES
        if self._backend_eof and not self._rest and not self._outgoing.pending:
            return DONE
        if full:
            return FULL
        return PROGRESSED if progressed else WAITING

    def events(self) -> tuple[int, int]:
        """What a connection that is `WAITING` waits for: (client's, backend's) epoll events.
        During the handshake the backend waits: its bytes stay in its socket until then."""
        client = (select.EPOLLIN if self._needs_client else 0) | (
            select.EPOLLOUT if self._rest else 0
        )
        if self._upstream < 0:  # still in the handshake
            return client, 0
        upstream = (select.EPOLLIN if not self._rest and not self._backend_eof else 0) | (
            select.EPOLLOUT if self._up_rest else 0
        )
        return client, upstream

    async def relay(
        self,
        upstream: int,
        count_up: Callable[[int], None],
        count_down: Callable[[int], None],
        client_done: Callable[[], None],
    ) -> None:
        """Both directions in this one task until the backend's EOF (and every byte of it
        sent to the client): `client_to` and `to_client` in one loop over an epoll set of the
        two sockets, so a connection costs one task and one trio wait per wakeup, not a
        nursery, a second task and a cancellation at the end.

        The directions stay independent: a backend that does not read stops only the client's
        direction, a client that does not read only the backend's. ``client_done`` runs once
        the client's close_notify ended its direction and the backend took every byte before
        it (the proxy half-closes the backend then). ssl.SSLError if the client's stream is bad
        or cut short, OSError if a socket breaks.
        """
        self.start_relay(upstream, count_up, count_down, client_done)
        self.woke()
        fd = self._fd
        unyielded = 0
        either = select.epoll(2)
        wanted = {fd: 0, upstream: 0}
        try:
            while True:
                step = self.relay_step()
                if step == DONE:
                    return
                if step != WAITING:
                    # One yield per few chunks: a busy connection never starves the others
                    # (the wait below is the yield of a connection that drained its sockets).
                    unyielded += 1
                    if step == FULL or unyielded >= MAX_UNYIELDED:
                        unyielded = 0
                        await trio.lowlevel.checkpoint()
                        self.woke()
                    continue
                for sock, events in zip((fd, upstream), self.events(), strict=True):
                    if events != wanted[sock]:
                        if not wanted[sock]:
                            either.register(sock, events)
                        elif events:
                            either.modify(sock, events)
                        else:
                            either.unregister(sock)
                        wanted[sock] = events
                unyielded = 0
                await trio.lowlevel.wait_readable(either)
                self.woke()
        finally:
            trio.lowlevel.notify_closing(either)
            either.close()

    def close_notify_now(self) -> bool:
        """Say close_notify without waiting: True if nothing is left to send (or the socket
        broke), False if the client's socket is full (then `close_notify` can wait)."""
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        try:
            self._write_now()
        except OSError:
            return True
        return not self._rest

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


__all__ = [
    "CHUNK_BYTES",
    "DONE",
    "FULL",
    "PROGRESSED",
    "WAITING",
    "TlsClosed",
    "TlsConnection",
    "receive_into",
]
