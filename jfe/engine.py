"""jfe's hot path below trio: one epoll loop that accepts and carries connections to their end.

Why (issue #12): a new TLS connection through trio cost ~220 us of CPU more than the same work
in a plain epoll loop (bench/jfe_ab.py ``--floor``): a task per connection, three or four trio
waits (each a trip through the scheduler and an epoll_ctl in trio's epoll), cancel scopes for
the deadlines. Here the listener and every connection the engine carries are registered in
one epoll set of its own, and the engine is one trio task that waits on that set: one trio
wait per batch of events, however many connections it carries, and none at all while the
engine is busy and trio has nothing to run (it blocks in its own epoll then: `_TrioRun`).

The engine carries the usual case from accept to close: a client that speaks first with a
whole TLS ClientHello in its first read, a name whose context `CertificateSource.cached`
has, a transparent port and a backend whose connect is through at once (a backend on this
host: connect() completes in the call). The ClientHello is sniffed with `jfe.sniff`, the
handshake and the relay run in `jfe.tlsio.TlsConnection` (`handshake_step`, `relay_step`:
the same code the trio path awaits), and close_notify closes it.

Everything else is handed over, as it stands, to a trio task of the proxy's nursery
(`Proxy._resume` -> `Proxy._serve` from where the engine stopped): PROXY v2 ports, a connect
still in progress, the backend first (banners), plaintext, a ClientHello in pieces, a name
without a cached context (issuance, the SNI gate, the fallback), ACME's tls-alpn-01, and a
close_notify the client's full socket does not take. Its limits are the trio path's: the
budgets are taken at accept (`Proxy._admit`), and the deadlines (idle_timeout_s before the
first bytes and while relaying, both directions quiet; handshake_timeout_s for the handshake)
are enforced by one sweep task, at most 1/16 of the limit (and 1 s) late, with the same drop
reasons. It must never block: every syscall here is non-blocking, and whatever would wait is
an epoll registration or a trio task.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import socket
import ssl
from typing import TYPE_CHECKING, Any

import trio

from jfe.proxy import FIRST_READ_BYTES, _address, _decide, _Drop
from jfe.sniff import NotTls, parse_client_hello
from jfe.tlsio import DONE, FULL, MAX_UNYIELDED, WAITING, TlsClosed, TlsConnection

if TYPE_CHECKING:
    from jfe.proxy import Address, Proxy

log = logging.getLogger(__name__)

#: Connections accepted per listener event (the listener is level-triggered: the next batch
#: accepts more), so a flood of connects never starves the connections already open.
ACCEPT_BATCH = 16
#: Events taken per wakeup: the engine yields to trio's other tasks between batches.
MAX_EVENTS = 64
#: After an accept error (EMFILE and friends) the listener rests this long: counted, never fatal.
ACCEPT_PAUSE_S = 0.05
#: The ALPN name of ACME's tls-alpn-01 validators (RFC 8737): such hellos go to trio's path.
ACME_TLS_ALPN = "acme-tls/1"

#: The longest the engine blocks in its own epoll while trio is idle (it wakes sooner for
#: trio's next deadline and for anything in trio's own epoll).
MAX_BLOCK_S = 1.0
#: After its last event of its own, the engine keeps blocking in its epoll this long (new
#: connections come in bursts), then waits through trio (see `Engine.run`).
BUSY_S = 0.1
#: Trio runs with more tasks than this (connections handed to trio) wait through trio: the
#: engine would look at every task before each wait (`_TrioRun.idle_for`).
MAX_TASKS_SCANNED = 64

_IN, _OUT, _RDHUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP
_FIRST, _HANDSHAKE, _RELAY = range(3)


class _Conn:
    """One connection the engine carries: its two sockets, its state and its deadline."""

    __slots__ = (
        "client",
        "conn",
        "deadline",
        "engine",
        "fd",
        "key",
        "last",
        "original",
        "seen",
        "state",
        "tls",
        "ufd",
        "up",
        "want",
        "want_up",
    )

    def __init__(
        self,
        engine: Engine,
        conn: socket.socket,
        up: socket.socket,
        key: str,
        client: tuple[Address, int],
        original: tuple[Address, int],
    ) -> None:
        self.engine = engine
        self.key = key  # the client's address as accept gave it (Proxy._admit)
        self.conn, self.up = conn, up
        self.fd, self.ufd = conn.fileno(), up.fileno()
        self.client, self.original = client, original
        self.state = _FIRST
        self.tls: TlsConnection | None = None
        self.deadline = engine.now + engine.proxy.settings.idle_timeout_s
        self.last = engine.now
        self.want = self.want_up = 0  # the epoll events registered for each socket
        self.seen = -1  # the batch that last handled this connection

    def count_up(self, n: int) -> None:
        self.last = self.engine.now
        self.engine.proxy._bytes_up += n

    def count_down(self, n: int) -> None:
        self.last = self.engine.now
        self.engine.proxy._bytes_down += n

    def half_close(self) -> None:  # the client's close_notify: the backend reads its EOF
        with contextlib.suppress(OSError):
            self.up.shutdown(socket.SHUT_WR)


class _TrioRun:
    """This thread's trio run, as far as the engine's own blocking wait needs to see it.

    A trio wait per batch of events cost ~40 us of CPU per wakeup here (trio's scheduler
    pass, the epoll_ctl that re-arms its one-shot registration, a second epoll_wait), and
    the bench's client opens one connection at a time: ~4 wakeups per connection, one event
    each. So while trio has nothing to run (no runnable task, no wait_all_tasks_blocked) the
    engine blocks in an epoll of its own that holds both the engine's epoll and trio's,
    until trio's next deadline at most: anything trio waits for (sockets, its wakeup socket
    for threads and signals) wakes the engine, which then yields to trio at once. (Trio's
    epoll never leaves the engine's own set: trio keeps the engine's epoll registered in its
    own once it has waited on it, and epoll refuses loops.)

    This reads trio internals (the runner's run queue, deadlines and epoll; trio 0.35): if
    any is missing, or the clock is not trio's SystemClock (MockClock's autojump), `current`
    says None and the engine waits through trio as before (tests/unit/test_jfe_engine.py
    checks that this trio still has them).
    """

    def __init__(self, runner: Any, fd: int) -> None:
        self._runner = runner
        self.fd = fd

    @classmethod
    def current(cls) -> _TrioRun | None:
        try:
            from trio._core import _run

            runner = _run.GLOBAL_RUN_CONTEXT.runner
            epoll = runner.io_manager._epoll
            runner.runq, runner.waiting_for_idle, runner.deadlines.next_deadline  # noqa: B018
            for task in runner.tasks:
                task._next_send_fn  # noqa: B018
            system_clock = type(runner.clock) is _run.SystemClock
        except (AttributeError, ImportError):
            return None
        if not system_clock or not isinstance(epoll, select.epoll):
            return None
        return cls(runner, epoll.fileno())

    def idle_for(self) -> float | None:
        """How long the engine may block now: 0 when trio has work to do (a task in its run
        queue, or one still to run in the batch the engine runs in: trio takes each batch
        out of the queue, and a task is scheduled while its ``_next_send_fn`` is set); None
        when the engine must wait through trio (a wait_all_tasks_blocked waits for it to
        block there; more tasks than are worth looking at before each wait)."""
        runner = self._runner
        if runner.waiting_for_idle or len(runner.tasks) > MAX_TASKS_SCANNED:
            return None
        if runner.runq:
            return 0.0
        for task in runner.tasks:
            if task._next_send_fn is not None:
                return 0.0
        left: float = runner.clock.deadline_to_sleep_time(runner.deadlines.next_deadline())
        return min(max(left, 0.0), MAX_BLOCK_S)


class Engine:
    """The listener and the connections it carries, in one trio task (`run`)."""

    #: Block in the engine's epoll while trio is idle (`_TrioRun`); False: always trio waits.
    block_when_idle = True

    def __init__(self, proxy: Proxy, listener: socket.socket, nursery: trio.Nursery) -> None:
        self.proxy = proxy
        self.listener = listener
        self.nursery = nursery
        self.now = trio.current_time()
        self._epoll = select.epoll()
        self._by_fd: dict[int, _Conn] = {}
        self._conns: set[_Conn] = set()
        self._runnable: list[_Conn] = []  # moved whole chunks: more without waiting
        self._batch = 0
        self.blocking = False  # whether run blocks in its epoll while trio is idle
        self._ready: dict[int, int] = {}  # this batch's events by descriptor
        self.handed_over = 0  # connections handed to trio tasks (tests read it)

    async def run(self) -> None:
        listen_fd = self.listener.fileno()
        self._epoll.register(listen_fd, _IN)
        self.nursery.start_soon(self._sweep)
        trio_run = _TrioRun.current() if self.block_when_idle else None
        trio_fd = -1
        block = select.epoll(2)  # the engine's epoll and trio's (see _TrioRun)
        if trio_run is not None:
            trio_fd = trio_run.fd
            block.register(trio_fd, _IN)
            block.register(self._epoll.fileno(), _IN)
        self.blocking = trio_run is not None
        trio_ready = False
        busy_until = -math.inf  # the engine's own events keep it blocking until then
        try:
            while True:
                wait = None if trio_run is None else 0.0
                if trio_run is not None and not self._runnable and not trio_ready:
                    # Quiet (no connection of its own, no event of its own for a while), the
                    # engine waits through trio: its blocking wait would only put itself
                    # between trio and trio's own wakeups (pass-through copies: ~20 us more
                    # latency each, less throughput).
                    quiet = not self._conns and self.now >= busy_until
                    wait = None if quiet else trio_run.idle_for()
                if wait is None:
                    if self._runnable:
                        await trio.lowlevel.checkpoint()
                    else:
                        await trio.lowlevel.wait_readable(self._epoll)
                    trio_ready = False
                elif not wait:
                    await trio.lowlevel.checkpoint()
                    trio_ready = False
                else:
                    woke = block.poll(wait, 2)
                    # Nothing (trio's deadline is due) or trio's epoll ready: trio's turn next.
                    trio_ready = not woke or woke[0][0] == trio_fd or len(woke) > 1
                events = self._epoll.poll(0, MAX_EVENTS)
                self.now = trio.current_time()
                if events:
                    busy_until = self.now + BUSY_S
                self._batch += 1
                self._ready = dict(events)
                runnable, self._runnable = self._runnable, []
                for busy in runnable:
                    if busy in self._conns:
                        busy.seen = self._batch
                        self._relay(busy)
                for fd, _ in events:
                    if fd == listen_fd:
                        self._accept()
                        continue
                    c = self._by_fd.get(fd)
                    if c is None or c.seen == self._batch:
                        continue  # closed meanwhile, or both of its sockets were ready
                    c.seen = self._batch
                    self._step(c)
        finally:
            for c in list(self._conns):
                self._close(c)
            block.close()
            trio.lowlevel.notify_closing(self._epoll)
            self._epoll.close()

    # -- accept -----------------------------------------------------------------------------
    def _accept(self) -> None:
        proxy = self.proxy
        for _ in range(ACCEPT_BATCH):
            try:
                raw, peer = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # EMFILE and friends: count, breathe, go on (the listener must live).
                name = errno.errorcode.get(exc.errno or 0, "error")
                proxy._dropped[f"accept_{name}"] += 1
                self._epoll.unregister(self.listener.fileno())
                self.nursery.start_soon(self._resume_accepting)
                return
            try:
                client = _address(peer)
                original = _address(raw.getsockname())
            except OSError:
                raw.close()
                proxy._dropped["gone_at_accept"] += 1
                continue
            if not proxy._admit(peer[0], original):
                raw.close()
                continue
            self._start(raw, peer[0], client, original)

    async def _resume_accepting(self) -> None:
        await trio.sleep(ACCEPT_PAUSE_S)
        with contextlib.suppress(ValueError, OSError):  # the listener closed meanwhile
            self._epoll.register(self.listener.fileno(), _IN)

    def _start(
        self,
        raw: socket.socket,
        key: str,
        client: tuple[Address, int],
        original: tuple[Address, int],
    ) -> None:
        proxy = self.proxy
        if proxy.settings.mode(original[1]) == "proxy_v2":
            self._hand_over(raw, key, client, original)
            return
        try:
            raw.setblocking(False)
            up, established = proxy._dial(client, original, transparent=True)
        except _Drop as drop:
            self._closed_early(raw, key, original, drop.reason)
            return
        except OSError:
            self._closed_early(raw, key, original, "reset")
            return
        if not established:
            self._hand_over(raw, key, client, original, (up, False))
            return
        c = _Conn(self, raw, up, key, client, original)
        self._conns.add(c)
        self._by_fd[c.fd] = self._by_fd[c.ufd] = c
        c.seen = self._batch
        self._first(c)

    # -- the states -------------------------------------------------------------------------
    def _step(self, c: _Conn) -> None:
        if c.state == _RELAY:
            # A socket registered for reading that epoll did not report has nothing to read
            # (level-triggered: what arrives since wakes it in the next batch).
            ready = self._ready
            self._relay(c, not c.want & _IN or c.fd in ready, not c.want_up & _IN or c.ufd in ready)
        elif c.state == _HANDSHAKE:
            self._handshake(c)
        else:
            self._first(c)

    def _first(self, c: _Conn) -> None:
        """`Proxy._first_speaker` without waiting: one read per side decides (of the sides
        registered, only those epoll reported: the others would say EAGAIN)."""
        got: dict[str, bytes] = {}
        ready = self._ready if c.want else None
        try:
            for side, fd in (("client", c.fd), ("upstream", c.ufd)):
                if ready is not None and fd not in ready:
                    continue
                try:
                    got[side] = os.read(fd, FIRST_READ_BYTES)
                except BlockingIOError:
                    pass
        except OSError as exc:
            self._fail(c, exc)
            return
        if not got:
            self._want(c, _IN | _RDHUP, _IN | _RDHUP)
            return
        first, data, early = _decide(got)
        context = None
        if first == "client" and data:
            # One read: parse_client_hello itself (HelloBuffer's verdicts are its verdicts on
            # the bytes so far; its bookkeeping is for hellos that come in pieces, in trio).
            try:
                hello = parse_client_hello(data)
            except NotTls:
                hello = None
            # A validator's hello (RFC 8737) goes to trio's path, which asks for the challenge:
            # asking here too would count each challenge twice.
            if hello is not None and ACME_TLS_ALPN not in hello.alpn:
                context = self.proxy.certificates.cached(hello.server_name)
        if context is None:
            self._hand_over_carried(c, (first, data, early))
            return
        c.state = _HANDSHAKE
        c.deadline = self.now + self.proxy.settings.handshake_timeout_s
        c.tls = TlsConnection(c.fd, context, data)
        self._handshake(c)

    def _handshake(self, c: _Conn) -> None:
        tls = c.tls
        assert tls is not None
        try:
            done = tls.handshake_step()
        except (TlsClosed, ssl.SSLError, OSError):
            self._drop(c, "tls_handshake_failed")
            return
        if not done:
            self._want(c, *tls.events())
            return
        self.proxy._port(c.original[1]).tls += 1
        tls.start_relay(c.ufd, c.count_up, c.count_down, c.half_close)
        c.state = _RELAY
        c.last = self.now
        # The handshake's last read drained the client; the backend was never asked yet.
        self._relay(c, False, True)

    def _relay(self, c: _Conn, client: bool = True, upstream: bool = True) -> None:
        tls = c.tls
        assert tls is not None
        tls.woke(client, upstream)
        try:
            for _ in range(MAX_UNYIELDED):
                step = tls.relay_step()
                if step == DONE:
                    self._close_notify(c)
                    return
                if step == WAITING:
                    self._want(c, *tls.events())
                    return
                if step == FULL:
                    break
        except Exception as exc:  # ssl.SSLError, OSError: the trio path's reasons
            self._fail(c, exc)
            return
        self._runnable.append(c)  # a busy connection goes on after the others had a turn

    def _close_notify(self, c: _Conn) -> None:
        """The backend is done: close_notify, never waiting long for a client that does not
        read (a full socket: the rest in a trio task, `TlsConnection.close_notify`)."""
        tls = c.tls
        assert tls is not None
        if tls.close_notify_now():
            self._close(c)
            return
        self._forget(c)
        c.up.close()
        c.tls = None  # as in _close
        self.nursery.start_soon(self._linger, c.conn, c.key, tls)

    async def _linger(self, conn: socket.socket, key: str, tls: TlsConnection) -> None:
        try:
            with contextlib.suppress(OSError):
                await tls.close_notify(1.0)
        finally:
            trio.lowlevel.notify_closing(conn)
            conn.close()
            self.proxy._release(key)

    # -- epoll, closing, hand-over ----------------------------------------------------------
    def _want(self, c: _Conn, client_events: int, upstream_events: int) -> None:
        """Register what the connection waits for (level-triggered; 0 = nothing)."""
        if client_events != c.want:
            self._set_events(c.fd, c.want, client_events)
            c.want = client_events
        if upstream_events != c.want_up:
            self._set_events(c.ufd, c.want_up, upstream_events)
            c.want_up = upstream_events

    def _set_events(self, fd: int, old: int, new: int) -> None:
        """One socket's registration from ``old`` to ``new`` events (0 = not registered)."""
        if not old:
            self._epoll.register(fd, new)
        elif new:
            self._epoll.modify(fd, new)
        else:
            self._epoll.unregister(fd)

    def _forget(self, c: _Conn) -> None:
        """No longer the engine's: out of its maps and its epoll set (the sockets stay open)."""
        self._want(c, 0, 0)
        self._conns.discard(c)
        if self._by_fd.get(c.fd) is c:
            del self._by_fd[c.fd]
        if self._by_fd.get(c.ufd) is c:
            del self._by_fd[c.ufd]

    def _close(self, c: _Conn) -> None:
        # Closing a socket takes it out of the epoll set: no epoll_ctl for it.
        c.want = c.want_up = 0
        self._conns.discard(c)
        if self._by_fd.get(c.fd) is c:
            del self._by_fd[c.fd]
        if self._by_fd.get(c.ufd) is c:
            del self._by_fd[c.ufd]
        c.up.close()
        c.conn.close()
        # The relay holds the connection's bound methods: without this the pair is a cycle,
        # and its SSLObject and BIOs wait for the garbage collector.
        c.tls = None
        self.proxy._release(c.key)

    def _drop(self, c: _Conn, reason: str) -> None:
        self.proxy._drop(c.original[1], reason)
        self._close(c)

    def _fail(self, c: _Conn, exc: Exception) -> None:
        self.proxy._failed(c.original[1], exc)
        self._close(c)

    def _closed_early(
        self, raw: socket.socket, key: str, original: tuple[Address, int], reason: str
    ) -> None:
        self.proxy._drop(original[1], reason)
        raw.close()
        self.proxy._release(key)

    def _hand_over(
        self,
        raw: socket.socket,
        key: str,
        client: tuple[Address, int],
        original: tuple[Address, int],
        dialed: tuple[socket.socket, bool] | None = None,
        first: tuple[str, bytes, bytes] | None = None,
    ) -> None:
        self.handed_over += 1
        self.nursery.start_soon(self.proxy._resume, raw, key, client, original, dialed, first)

    def _hand_over_carried(self, c: _Conn, first: tuple[str, bytes, bytes]) -> None:
        self._forget(c)
        self._hand_over(c.conn, c.key, c.client, c.original, (c.up, True), first)

    # -- deadlines --------------------------------------------------------------------------
    async def _sweep(self) -> None:
        """Expire what waited too long (`_Conn.deadline`; idle relays by their last byte)."""
        s = self.proxy.settings
        period = max(0.01, min(1.0, s.idle_timeout_s / 16, s.handshake_timeout_s / 16))
        while True:
            await trio.sleep(period)
            now = self.now = trio.current_time()
            for c in list(self._conns):
                if c.state == _RELAY:
                    if c.last + s.idle_timeout_s <= now:
                        self.proxy._drop(c.original[1], "idle")
                        self._close_notify(c)
                elif c.deadline <= now:
                    self._drop(c, "idle" if c.state == _FIRST else "tls_timeout")


__all__ = ["Engine"]
