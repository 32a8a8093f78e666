"""jfe's transparent proxy (trio): TLS for clients that ask, byte-exact pass-through otherwise.

One listener with ``IP_TRANSPARENT`` receives the connections jfe's nftables rules TPROXY to it.
For each accepted connection:

1. budgets first (all connections, per client address): over budget is closed and counted;
2. the upstream connection to the ORIGINAL destination (``getsockname()`` of the accepted
   socket: TPROXY keeps it) is opened at once — transparent ports bind it to the client's own
   address (``IP_TRANSPARENT`` + ``SO_MARK``, port 0), so the backend sees the real client;
3. then whichever side speaks first decides, with no timer in between:
   - a TLS ClientHello from the client (`jfe.sniff`, bounded in bytes and time) -> TLS with a
     context from the `CertificateSource`; bytes the backend sent meanwhile wait in its socket
     and go inside TLS;
   - the backend first (SMTP, FTP, SSH banners) -> plain pass-through; the banner is forwarded
     the moment it arrives;
   - anything else from the client -> plain pass-through, byte-exact, buffered bytes first;
4. pass-through copies with ``os.splice`` through a pipe (no copy through Python), falling back
   to large buffers; TLS copies through `jfe.tlsio` (one SSLObject, 256 KiB per wakeup, both
   directions in the connection's one task).

Every connection's failure is its own: counted by reason and dropped, never the listener's.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import logging
import math
import os
import resource
import select
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import trio

from jfe import proxyv2
from jfe.config import JfeSettings
from jfe.sniff import (
    MAX_CLIENT_HELLO_BYTES,
    ClientHello,
    HelloBuffer,
    NotTls,
    looks_like_tls,
)
from jfe.tlsio import TlsClosed, TlsConnection

if TYPE_CHECKING:
    from jfe.engine import Engine
from overflowd.errors import ProxyError

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Linux values (not all are in Python's socket module).
IP_TRANSPARENT = 19
SO_MARK = 36
#: One read of a pass-through or TLS stream: large enough to keep bulk copies cheap per byte.
CHUNK_BYTES = 256 * 1024
#: Pipe capacity for splice (F_SETPIPE_SZ); the default 64 KiB halves bulk throughput.
PIPE_BYTES = 1024 * 1024
F_SETPIPE_SZ = 1031
#: Accept backlog: the kernel holds at most this many not-yet-accepted connections.
BACKLOG = 1024
#: The first read from either side; a ClientHello larger than one read is reassembled.
FIRST_READ_BYTES = 16 * 1024


class CertificateSource(Protocol):
    """jfe.certs's seam (S5-DESIGN.md); only what the proxy calls."""

    def cached(self, server_name: str | None) -> ssl.SSLContext | None: ...

    async def context_for(self, server_name: str | None, client: Address) -> ssl.SSLContext: ...


@dataclass
class PortCounters:
    accepted: int = 0
    tls: int = 0
    passthrough_client_first: int = 0
    passthrough_server_first: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class PortStatistics:
    accepted: int
    tls: int
    passthrough_client_first: int
    passthrough_server_first: int
    dropped: dict[str, int]


@dataclass(frozen=True)
class ProxyStatistics:
    open_connections: int
    accepted: int
    handshakes: int
    passthroughs: int
    dropped: dict[str, int]
    bytes_to_upstream: int
    bytes_to_client: int
    cpu_seconds: float
    ports: dict[int, PortStatistics]
    acme_challenges: int = 0


@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> Address:
    """A socket's numeric address as an ip_address, cached: a client comes back with many
    connections, and parsing costs ~3 us of each connection's two addresses."""
    return ipaddress.ip_address(text)


def _address(sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> tuple[Address, int]:
    return _ip(sockaddr[0]), int(sockaddr[1])


class _Drop(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class Proxy:
    """The listener and every connection; `run` is a trio service (CONVENTIONS.md 4)."""

    def __init__(self, settings: JfeSettings, certificates: CertificateSource) -> None:
        self.settings = settings
        self.certificates = certificates
        self._open = 0
        #: Open connections per client address, keyed by its text as accept returned it: an
        #: ip_address hashes in Python (~2 us), and each connection took and gave back its slot
        #: with ~8 hashes.
        self._per_client: dict[str, int] = {}
        self._ports: dict[int, PortCounters] = {}
        self._dropped: Counter[str] = Counter()
        self._bytes_up = 0
        self._bytes_down = 0
        self._challenges = 0
        self._cpu_start = time.process_time()
        self._bound: socket.socket | None = None
        self._engine: Engine | None = None  # while run runs

    # -- statistics -------------------------------------------------------------------------
    def statistics(self) -> ProxyStatistics:
        ports = {
            port: PortStatistics(
                c.accepted,
                c.tls,
                c.passthrough_client_first,
                c.passthrough_server_first,
                dict(c.dropped),
            )
            for port, c in sorted(self._ports.items())
        }
        return ProxyStatistics(
            open_connections=self._open,
            accepted=sum(p.accepted for p in ports.values()),
            handshakes=sum(p.tls for p in ports.values()),
            passthroughs=sum(
                p.passthrough_client_first + p.passthrough_server_first for p in ports.values()
            ),
            dropped=dict(self._dropped),
            bytes_to_upstream=self._bytes_up,
            bytes_to_client=self._bytes_down,
            cpu_seconds=time.process_time() - self._cpu_start,
            ports=ports,
            acme_challenges=self._challenges,
        )

    def _drop(self, port: int, reason: str) -> None:
        self._dropped[reason] += 1
        self._port(port).dropped[reason] += 1

    def _port(self, port: int) -> PortCounters:
        counters = self._ports.get(port)
        if counters is None:
            counters = self._ports[port] = PortCounters()
        return counters

    # -- the listener -----------------------------------------------------------------------
    def _listen_socket(self) -> socket.socket:
        s = self.settings
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((s.listen_address, s.listen_port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise ProxyError(
                f"cannot listen on {s.listen_address}:{s.listen_port} with IP_TRANSPARENT "
                f"(needs CAP_NET_ADMIN): {exc.strerror or exc}"
            ) from None
        sock.setblocking(False)
        return sock

    def listen(self) -> None:
        """Bind the listener now (ProxyError if the port is busy), before any rule is
        touched: a second jfe started by mistake must fail without changing the first's rules.
        `run` uses this socket; `close` closes it if `run` never does."""
        if self._bound is None:
            self._bound = self._listen_socket()

    def close(self) -> None:
        if self._bound is not None:
            self._bound.close()
            self._bound = None

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        _raise_nofile_limit()
        bound, self._bound = self._bound, None
        listener = bound or self._listen_socket()
        with listener:
            task_status.started(listener.getsockname())
            async with trio.open_nursery() as nursery:
                # Accepts and every connection it can carry below trio (jfe.engine); the
                # others go on in a task of this nursery (`_resume`).
                from jfe.engine import Engine  # it builds on this module

                self._engine = Engine(self, listener, nursery)
                await self._engine.run()

    def _admit(self, key: str, original: tuple[Address, int]) -> bool:
        """Count an accepted connection from the client whose address text is ``key`` and
        apply the budgets: False if it must be closed (counted), True if it was admitted
        (then `_release` once it is closed)."""
        s = self.settings
        port = original[1]
        self._port(port).accepted += 1
        if port == s.listen_port:
            # Connected to the listener itself, not diverted: "forwarding" would loop to us.
            # The port decides, not the address: a wildcard listen_address accepts the listen
            # port on every local address, and TPROXY never diverts it (config keeps
            # listen_port out of ports), so comparing addresses let such a connection dial
            # the listener again and again until the per-client budget stopped the loop.
            self._drop(port, "not_diverted")
            return False
        if self._open >= s.max_connections:
            self._drop(port, "budget_total")
            return False
        held = self._per_client.get(key, 0)
        if held >= s.max_connections_per_client:
            self._drop(port, "budget_client")
            return False
        self._open += 1
        self._per_client[key] = held + 1
        return True

    def _release(self, key: str) -> None:
        self._open -= 1
        held = self._per_client[key] - 1
        if held:
            self._per_client[key] = held
        else:
            del self._per_client[key]

    def _failed(self, port: int, exc: Exception) -> None:
        # One connection's failure is counted and dropped, never the listener's. Errors
        # from the copy tasks arrive wrapped in ExceptionGroups (trio's nurseries).
        reason = _reason(exc)
        if reason == "internal_error":
            log.exception("jfe connection failed unexpectedly port=%d", port, exc_info=exc)
        self._drop(port, reason)

    async def _resume(
        self,
        raw: socket.socket,
        key: str,
        client: tuple[Address, int],
        original: tuple[Address, int],
        dialed: tuple[socket.socket, bool] | None = None,
        first: tuple[str, bytes, bytes] | None = None,
    ) -> None:
        """An admitted connection (``key`` as in `_admit`) the engine hands over, served in
        this task from where the engine stopped (see `_serve`); closed and released here."""
        conn = trio.socket.from_stdlib_socket(raw)
        try:
            await self._serve(conn, client, original, dialed, first)
        except Exception as exc:  # Cancelled is a BaseException: it propagates
            self._failed(original[1], exc)
        finally:
            conn.close()
            self._release(key)

    def _dial(
        self, client: tuple[Address, int], original: tuple[Address, int], transparent: bool
    ) -> tuple[socket.socket, bool]:
        """Start the upstream connection: (the non-blocking socket, whether it is established
        already); _Drop("upstream_refused") if it failed at once. No waiting: the trio path
        and the engine both start here."""
        # The stdlib socket and numeric addresses: trio's bind and connect would resolve each
        # address through getaddrinfo (twice per connection) before the syscall.
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            # The mark keeps jfe's upstream packets (and, through conntrack, the backend's
            # replies) on the policy route; jfe's rules never TPROXY marked or lo traffic.
            raw.setsockopt(socket.SOL_SOCKET, SO_MARK, self.settings.fwmark)
            if transparent:
                raw.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                # Port 0: reusing the client's port collides with the client's own 4-tuple
                # when backend and jfe share the host.
                raw.bind((str(client[0]), 0))
            code = raw.connect_ex((str(original[0]), original[1]))
            if code == errno.EINPROGRESS:
                return raw, _connected(raw)
            if code:
                raise OSError(code, os.strerror(code))
        except OSError:
            raw.close()
            raise _Drop("upstream_refused") from None
        return raw, True

    async def _upstream(
        self, client: tuple[Address, int], original: tuple[Address, int], transparent: bool
    ) -> trio.socket.SocketType:
        raw, connected = self._dial(client, original, transparent)
        return await self._established(raw, connected)

    async def _established(self, raw: socket.socket, connected: bool) -> trio.socket.SocketType:
        """The upstream socket once its connect is through (connect_timeout_s at most)."""
        try:
            if not connected:
                with trio.fail_after(self.settings.connect_timeout_s):
                    await trio.lowlevel.wait_writable(raw)
                code = raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
        except trio.TooSlowError:
            raw.close()
            raise _Drop("upstream_timeout") from None
        except OSError:
            raw.close()
            raise _Drop("upstream_refused") from None
        except BaseException:  # cancelled while connecting
            raw.close()
            raise
        return trio.socket.from_stdlib_socket(raw)

    async def _serve(
        self,
        conn: trio.socket.SocketType,
        client: tuple[Address, int],
        original: tuple[Address, int],
        dialed: tuple[socket.socket, bool] | None = None,
        first_speaker: tuple[str, bytes, bytes] | None = None,
    ) -> None:
        """The whole connection in this task, or its rest from where jfe.engine handed it
        over: ``dialed``, the upstream socket it started (and whether it is established),
        ``first_speaker``, `_first_speaker`'s answer it read (never on proxy_v2 ports)."""
        s = self.settings
        port = original[1]
        proxy_v2 = s.mode(port) == "proxy_v2"
        if dialed is None:
            upstream = await self._upstream(client, original, transparent=not proxy_v2)
        else:
            upstream = await self._established(*dialed)
        with upstream:
            if first_speaker is not None:
                first, data, early = first_speaker
            elif proxy_v2:
                # The backend waits for the header, so nobody else can speak first: give the
                # client handshake_timeout_s, then send an address-only header and pass through.
                with trio.move_on_after(s.handshake_timeout_s) as quiet:
                    data = await conn.recv(FIRST_READ_BYTES)
                if quiet.cancelled_caught:
                    self._port(port).passthrough_server_first += 1
                    await _send_all(upstream, proxyv2.encode(client, original))
                    await self._splice_both(conn, upstream, b"", port)
                    return
                first, early = "client", b""
            else:
                first, data, early = await self._first_speaker(conn, upstream)
            if first == "upstream":
                self._port(port).passthrough_server_first += 1
                if not data:
                    return  # the backend closed at once
                await _send_all(conn, data)
                self._bytes_down += len(data)
                await self._splice_both(conn, upstream, early, port)
                return
            if not data:
                return  # the client closed without a word
            hello_or_bytes = await self._read_hello(conn, data)
            if isinstance(hello_or_bytes, bytes):
                self._port(port).passthrough_client_first += 1
                if proxy_v2:
                    await _send_all(upstream, proxyv2.encode(client, original))
                await self._splice_both(conn, upstream, hello_or_bytes, port)
                return
            hello, buffered = hello_or_bytes
            await self._tls(
                conn, upstream, client, original, hello.server_name, hello.alpn, buffered, proxy_v2
            )

    async def _first_speaker(
        self, conn: trio.socket.SocketType, upstream: trio.socket.SocketType
    ) -> tuple[str, bytes, bytes]:
        """Whoever sends first: (side, its bytes, the client's bytes read in the same moment).

        Both reads can succeed: trio's recv tries the syscall before it ever waits, so when
        both sockets are already readable (SSH: both sides send their identification string
        at once) the losing read returns data too, and dropping it lost the banner or the
        client's first bytes. When both spoke, the backend counts as first (a server-first
        protocol) and the client's bytes go to it first; nothing read is ever dropped.
        """
        got: dict[str, bytes] = {}
        # Usually the client's first bytes are already here once the upstream is connected:
        # one read per side decides, with no nursery and no tasks.
        for side, sock in (("client", conn), ("upstream", upstream)):
            try:
                got[side] = os.read(sock.fileno(), FIRST_READ_BYTES)
            except BlockingIOError:
                pass
        if got:
            return _decide(got)
        # Neither has spoken yet: wait for either in this one task. An epoll set of the two
        # sockets is readable when either is, so one trio wait covers both (two reader tasks
        # in a nursery, and cancelling the loser, cost ~100 us of CPU per connection).
        either = select.epoll(2)
        try:
            either.register(conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            either.register(upstream.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            with trio.move_on_after(self.settings.idle_timeout_s):
                while not got:
                    await trio.lowlevel.wait_readable(either)
                    for side, sock in (("client", conn), ("upstream", upstream)):
                        try:
                            got[side] = os.read(sock.fileno(), FIRST_READ_BYTES)
                        except BlockingIOError:
                            pass
        finally:
            trio.lowlevel.notify_closing(either)
            either.close()
        if not got:
            raise _Drop("idle")
        return _decide(got)

    async def _read_hello(
        self, conn: trio.socket.SocketType, data: bytes
    ) -> bytes | tuple[ClientHello, bytes]:
        """A ClientHello (and the bytes read), or the bytes read when this is not TLS."""
        if looks_like_tls(data[:3]) is False:
            return data
        # HelloBuffer, not parse_client_hello on the growing buffer: re-parsing after every
        # read is quadratic in a client's trickled records (see jfe.sniff.HelloBuffer).
        buffered = HelloBuffer()
        try:
            hello = buffered.feed(data)
        except NotTls:
            return buffered.data
        if hello is not None:  # the usual case: all of it in the first read, no timer needed
            return hello, buffered.data
        with trio.move_on_after(self.settings.handshake_timeout_s):
            while True:
                more = await conn.recv(MAX_CLIENT_HELLO_BYTES - len(buffered) + 5)
                if not more:
                    return buffered.data
                try:
                    hello = buffered.feed(more)
                except NotTls:
                    return buffered.data
                if hello is not None:
                    return hello, buffered.data
        raise _Drop("hello_timeout")

    async def _tls(
        self,
        conn: trio.socket.SocketType,
        upstream: trio.socket.SocketType,
        client: tuple[Address, int],
        original: tuple[Address, int],
        server_name: str | None,
        alpn: tuple[str, ...],
        buffered: bytes,
        proxy_v2: bool,
    ) -> None:
        port = original[1]
        with trio.move_on_after(self.settings.handshake_timeout_s) as deadline:
            # ACME tls-alpn-01 (RFC 8737): a pending order's challenge certificate answers a
            # validator offering acme-tls/1; that handshake is the whole connection.
            challenge = getattr(self.certificates, "challenge_context", None)
            context = challenge(server_name, alpn) if challenge is not None else None
            if context is not None:
                tls = TlsConnection(conn.fileno(), context, buffered)
                try:
                    await tls.handshake()
                except (TlsClosed, ssl.SSLError, OSError):
                    raise _Drop("acme_challenge_failed") from None
                self._challenges += 1
                await tls.close_notify(1.0)
                return
            context = self.certificates.cached(server_name)
            if context is None:
                context = await self.certificates.context_for(server_name, client[0])
            tls = TlsConnection(conn.fileno(), context, buffered)
            try:
                await tls.handshake()
            except (TlsClosed, ssl.SSLError, OSError):
                raise _Drop("tls_handshake_failed") from None
        if deadline.cancelled_caught:
            raise _Drop("tls_timeout")
        self._port(port).tls += 1
        if proxy_v2:
            header = proxyv2.encode(
                client, original, authority=server_name, alpn=tls.selected_alpn_protocol()
            )
            await _send_all(upstream, header)
        up = upstream.fileno()
        idle = _Idle(self.settings.idle_timeout_s)

        def counted_up(n: int) -> None:
            idle.touch()
            self._bytes_up += n

        def counted_down(n: int) -> None:
            idle.touch()
            self._bytes_down += n

        def half_close() -> None:  # the client's close_notify: the backend reads its EOF
            with contextlib.suppress(OSError):
                upstream.shutdown(socket.SHUT_WR)

        async def relay(copies: trio.CancelScope) -> None:
            await tls.relay(up, counted_up, counted_down, half_close)

        await idle.run(relay)
        if idle.expired:
            self._drop(port, "idle")
        # Upstream done: say close_notify, but never wait long for a client that does not read.
        await tls.close_notify(1.0)

    async def _splice_both(
        self,
        conn: trio.socket.SocketType,
        upstream: trio.socket.SocketType,
        first: bytes,
        port: int,
    ) -> None:
        if first:
            await _send_all(upstream, first)
            self._bytes_up += len(first)
        idle = _Idle(self.settings.idle_timeout_s)

        def one(src: trio.socket.SocketType, dst: trio.socket.SocketType, up: bool) -> _Task:
            count = self._count_up if up else self._count_down

            def counted(n: int) -> None:
                idle.touch()
                count(n)

            async def copy(copies: trio.CancelScope) -> None:
                await _copy(src, dst, counted)
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

            return copy

        await idle.run(one(conn, upstream, True), one(upstream, conn, False))
        if idle.expired:
            self._drop(port, "idle")  # per port too, as the TLS path: the ports sum to the total

    def _count_up(self, n: int) -> None:
        self._bytes_up += n

    def _count_down(self, n: int) -> None:
        self._bytes_down += n


_Task = Callable[[trio.CancelScope], Awaitable[None]]


class _Idle:
    """Idle means BOTH directions quiet: a long download with a silent client is not idle.

    `run` runs the copy tasks (the first in the calling task, the others in a nursery; one
    task alone, the TLS relay, gets a cancel scope and no nursery) and registers with the
    run's one `_Sweeper`, which cancels them all once nothing moved for ``limit`` seconds
    (``expired`` then says so): no watchdog task or timer per connection. Each task is given
    the cancel scope around them all.
    """

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.last = trio.current_time()
        self.expired = False
        self.scope: trio.CancelScope | None = None

    def touch(self) -> None:
        self.last = trio.current_time()

    async def run(self, first: _Task, *others: _Task) -> None:
        sweeper = _Sweeper.current()
        if not others:  # one task (the TLS relay): a cancel scope, no nursery
            with trio.CancelScope() as scope:
                self.scope = scope
                sweeper.add(self)
                try:
                    await first(scope)
                finally:
                    sweeper.idles.discard(self)
            return
        async with trio.open_nursery() as copies:
            self.scope = copies.cancel_scope
            sweeper.add(self)
            try:
                for task in others:
                    copies.start_soon(task, copies.cancel_scope)
                await first(copies.cancel_scope)
            finally:
                sweeper.idles.discard(self)


class _Sweeper:
    """One system task per trio run that expires idle connections (see `_Idle`).

    It wakes at the earliest possible expiry and at least once a second while connections
    are open (O(connections) work each time: ~1 ms per 2,000), but never more often than 16
    times per idle limit, so an expiry comes at most ``limit / 16`` late.
    """

    _current: trio.lowlevel.RunVar[_Sweeper] = trio.lowlevel.RunVar("jfe_idle_sweeper")

    def __init__(self) -> None:
        self.idles: set[_Idle] = set()
        self._wake = trio.Event()
        self._next = math.inf  # when the sweeper wakes next

    @classmethod
    def current(cls) -> _Sweeper:
        try:
            return cls._current.get()
        except LookupError:
            sweeper = cls()
            cls._current.set(sweeper)
            trio.lowlevel.spawn_system_task(sweeper._run, name="jfe idle sweeper")
            return sweeper

    def add(self, idle: _Idle) -> None:
        self.idles.add(idle)
        if idle.last + idle.limit < self._next:  # rare: a first or shorter limit
            self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake = trio.Event()
            now = trio.current_time()
            self._next = math.inf if not self.idles else now + 1.0
            for idle in list(self.idles):
                deadline = idle.last + idle.limit
                if deadline <= now:
                    idle.expired = True
                    self.idles.discard(idle)
                    if idle.scope is not None:
                        idle.scope.cancel()
                else:
                    self._next = min(self._next, max(deadline, now + idle.limit / 16))
            with trio.move_on_at(self._next):
                await self._wake.wait()


def _connected(sock: socket.socket) -> bool:
    """Whether a non-blocking connect that said EINPROGRESS is already established.

    A backend on this host (or in a namespace beside it) answers the SYN inside the connect
    call itself (the loopback and veth paths run the handshake in the caller's softirq), so
    the socket is usually established by the time connect returns: asking (getpeername, one
    syscall) skips a trip through trio's scheduler and two epoll_ctl calls per connection.
    Still connecting, or refused, is ENOTCONN: then wait and read SO_ERROR as before.
    """
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def _decide(got: dict[str, bytes]) -> tuple[str, bytes, bytes]:
    """`Proxy._first_speaker`'s answer from the reads that returned (EOF is b"")."""
    if got.get("upstream") or "client" not in got:
        return "upstream", got.get("upstream", b""), got.get("client", b"")
    return "client", got["client"], b""


def _reason(exc: BaseException) -> str:
    """The drop reason for what ended a connection; the first leaf of a group decides."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, _Drop):
        return exc.reason
    if isinstance(exc, ssl.SSLError) or isinstance(exc.__cause__, ssl.SSLError):
        return "tls_error"
    if isinstance(exc, OSError | trio.BrokenResourceError | trio.ClosedResourceError):
        return "reset"
    return "internal_error"


async def _send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await sock.send(view)
        view = view[sent:]


async def _copy(
    src: trio.socket.SocketType,
    dst: trio.socket.SocketType,
    counted: Callable[[int], None],
) -> None:
    """src -> dst until EOF: splice through a pipe, or large buffers where splice is refused."""
    try:
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        await _copy_buffers(src, dst, counted)
        return
    try:
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_BYTES)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        while True:
            try:
                # As much as the pipe holds: one wakeup moves all the socket has queued.
                n = os.splice(src.fileno(), write_fd, PIPE_BYTES, flags=flags)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src)
                continue
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    await _copy_buffers(src, dst, counted)
                    return
                raise
            if n == 0:
                return
            counted(n)
            left = n
            while left:
                try:
                    left -= os.splice(read_fd, dst.fileno(), left, flags=flags)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst)
    finally:
        os.close(read_fd)
        os.close(write_fd)


async def _copy_buffers(
    src: trio.socket.SocketType,
    dst: trio.socket.SocketType,
    counted: Callable[[int], None],
) -> None:
    buffer = bytearray(CHUNK_BYTES)
    while True:
        n = await src.recv_into(buffer)
        if n == 0:
            return
        counted(n)
        await _send_all(dst, bytes(buffer[:n]))


def _raise_nofile_limit() -> None:
    """Each connection holds up to six descriptors; the soft limit (often 1,024) is raised to
    the hard one so budgets, not descriptors, decide how many connections fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


__all__ = ["CertificateSource", "Proxy", "ProxyStatistics"]
