"""jfe.engine: the hot path below trio, through the real `Proxy.run` on a real listener.

The listener is a plain 127.0.0.1 socket handed to the proxy (no TPROXY, so no root), and every
connection is "diverted" to a backend on loopback by overriding only the upstream address, as
bench/jfe_ab.py does. Real TLS clients (trio.SSLStream over the TestCA). What the engine
carries (a whole ClientHello, a cached name) must be byte-exact, counted and within every
limit; what it hands to trio (plaintext, banners, a name to issue) must come out as before.
"""

from __future__ import annotations

import gc
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from jfe.config import JfeSettings
from jfe.engine import MAX_TASKS_SCANNED, Engine
from jfe.proxy import Address, Proxy
from jfe.tlsio import CHUNK_BYTES, TlsConnection
from tests.support.jfe_certs import TestCA, TestCertificateSource

NAME = "engine.example"
Handler = Callable[[trio.socket.SocketType], Awaitable[None]]


@pytest.fixture(autouse=True, params=[True, False], ids=["blocking", "trio-waits"])
def blocking(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every test twice: the engine blocking in its own epoll while trio is idle (the
    default), and waiting through trio (its fallback when trio's internals are not there)."""
    monkeypatch.setattr(Engine, "block_when_idle", request.param)
    return bool(request.param)


class _Diverted(Proxy):
    """`Proxy` whose every connection was "diverted" to ``backend`` (see the docstring)."""

    def __init__(
        self, settings: JfeSettings, certificates: TestCertificateSource, backend: int
    ) -> None:
        super().__init__(settings, certificates)
        self.backend = (_ip("127.0.0.1"), backend)
        self.engine: Engine | None = None

    def _dial(
        self, client: tuple[Address, int], original: tuple[Address, int], transparent: bool
    ) -> tuple[socket.socket, bool]:
        return super()._dial(client, self.backend, False)

    async def _upstream(
        self, client: tuple[Address, int], original: tuple[Address, int], transparent: bool
    ) -> trio.socket.SocketType:
        return await super()._upstream(client, self.backend, False)


def _ip(text: str) -> Address:
    import ipaddress

    return ipaddress.ip_address(text)


@asynccontextmanager
async def _running(
    handler: Handler, ca: TestCA, warm: bool = True, **settings: float
) -> AsyncIterator[tuple[_Diverted, int]]:
    """The proxy (its listener's port) in front of a backend running ``handler`` per
    connection; ``warm``: the name's context is cached before the first client."""
    source = TestCertificateSource(ca)
    if warm:
        await source.context_for(NAME, _ip("127.0.0.1"))
    async with trio.open_nursery() as nursery:
        backend = trio.socket.socket()
        await backend.bind(("127.0.0.1", 0))
        backend.listen(128)

        async def serve_backend() -> None:
            with backend:
                while True:
                    conn, _ = await backend.accept()
                    nursery.start_soon(_closing, handler, conn)

        nursery.start_soon(serve_backend)
        config = {"idle_timeout_s": 5.0, "handshake_timeout_s": 5.0, **settings}
        proxy = _Diverted(JfeSettings(**config), source, backend.getsockname()[1])  # type: ignore[arg-type]
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        listener.setblocking(False)
        proxy._bound = listener
        port = listener.getsockname()[1]
        await nursery.start(proxy.run)
        yield proxy, port
        nursery.cancel_scope.cancel()


async def _closing(handler: Handler, conn: trio.socket.SocketType) -> None:
    with conn:
        try:
            await handler(conn)
        except OSError:
            pass


async def _tls_client(port: int, ca: TestCA) -> trio.SSLStream[trio.SocketStream]:
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    tls = trio.SSLStream(trio.SocketStream(sock), ca.client_context(), server_hostname=NAME)
    await tls.do_handshake()
    return tls


async def _until_eof(tls: trio.SSLStream[trio.SocketStream]) -> bytes:
    got = bytearray()
    while chunk := await tls.receive_some(65536):  # b"" at the proxy's close_notify
        got.extend(chunk)
    return bytes(got)


async def _answer(conn: trio.socket.SocketType) -> None:
    """An HTTP/1.0-like backend: the request up to its blank line, an answer, close."""
    request = b""
    while b"\r\n\r\n" not in request:
        more = await conn.recv(65536)
        if not more:
            return
        request += more
    await conn.send(b"HTTP/1.0 200 OK\r\n\r\n" + request[: request.index(b"\r\n")])


async def _drained(proxy: Proxy) -> None:
    with trio.fail_after(5):
        while proxy.statistics().open_connections:
            await trio.sleep(0.01)


async def test_many_new_connections_are_carried_below_trio_byte_exact() -> None:
    """conn+request (the bench's workload), 40 clients at once: every answer arrives whole
    with close_notify, every handshake counted, no trio task taken, nothing left open."""
    ca = TestCA()
    async with _running(_answer, ca) as (proxy, port):
        answers: dict[int, bytes] = {}

        async def one(i: int) -> None:
            tls = await _tls_client(port, ca)
            await tls.send_all(b"GET /%d HTTP/1.0\r\n\r\n" % i)
            answers[i] = await _until_eof(tls)
            await tls.aclose()

        with trio.fail_after(20):
            async with trio.open_nursery() as clients:
                for i in range(40):
                    clients.start_soon(one, i)
        await _drained(proxy)
        stats = proxy.statistics()
    assert answers == {i: b"HTTP/1.0 200 OK\r\n\r\nGET /%d HTTP/1.0" % i for i in range(40)}
    assert (stats.accepted, stats.handshakes, stats.dropped) == (40, 40, {})
    assert engine_of(proxy).handed_over == 0


async def test_the_engine_blocks_in_its_own_epoll_with_this_trio(blocking: bool) -> None:
    """The blocking wait reads trio internals (`jfe.engine._TrioRun`): a trio upgrade that
    moves them falls back to trio waits silently; this says so loudly."""
    async with _running(_answer, TestCA()) as (proxy, _):
        assert engine_of(proxy).blocking == blocking


def engine_of(proxy: Proxy) -> Engine:
    engine = getattr(proxy, "_engine", None)
    assert isinstance(engine, Engine), "Proxy.run keeps its engine in _engine"
    return engine


async def test_bulk_both_ways_with_slow_readers_in_the_engine() -> None:
    """More than the relay's chunk both ways at once, both ends reading slowly at first:
    the engine's relay (busy connections re-run, partial writes wait in epoll) loses,
    reorders and stalls nothing."""
    rng = random.Random(78)
    up_bytes = rng.randbytes(3 * CHUNK_BYTES + 4321)
    down_bytes = rng.randbytes(3 * CHUNK_BYTES + 999)
    got_backend = bytearray()

    async def backend(conn: trio.socket.SocketType) -> None:
        async def send() -> None:
            await trio.sleep(0.05)  # after the client's first bytes: the client speaks first
            view = memoryview(down_bytes)
            while view:
                view = view[await conn.send(view[:70_000]) :]

        async with trio.open_nursery() as both:
            both.start_soon(send)
            while len(got_backend) < len(up_bytes):
                await trio.sleep(0.002 if len(got_backend) < CHUNK_BYTES else 0)
                got_backend.extend(await conn.recv(rng.randint(1000, 100_000)))

    ca = TestCA()
    got_client = bytearray()
    async with _running(backend, ca) as (proxy, port):
        with trio.fail_after(30):
            tls = await _tls_client(port, ca)

            async def send() -> None:
                view = memoryview(up_bytes)
                for pos in range(0, len(view), 50_000):
                    await tls.send_all(view[pos : pos + 50_000])

            async with trio.open_nursery() as both:
                both.start_soon(send)
                while len(got_client) < len(down_bytes):
                    await trio.sleep(0.002 if len(got_client) < CHUNK_BYTES else 0)
                    got_client.extend(await tls.receive_some(rng.randint(1000, 100_000)))
            assert await _until_eof(tls) == b""
        await _drained(proxy)
        stats = proxy.statistics()
    assert bytes(got_backend) == up_bytes
    assert bytes(got_client) == down_bytes
    assert (stats.bytes_to_upstream, stats.bytes_to_client) == (len(up_bytes), len(down_bytes))
    assert stats.dropped == {}
    assert engine_of(proxy).handed_over == 0


async def test_what_the_engine_does_not_carry_goes_on_in_trio() -> None:
    """A name not cached yet (issued on the trio path, then cached: the next one is carried),
    a plaintext client and a server-first banner: all served, each counted once."""
    ca = TestCA()

    async def backend(conn: trio.socket.SocketType) -> None:
        first = await conn.recv(65536)
        if first == b"":  # nothing from a client that waits for the banner
            return
        await conn.send(b"echo:" + first)

    async with _running(backend, ca, warm=False) as (proxy, port):
        with trio.fail_after(20):
            for _ in range(2):  # issued (trio), then cached (engine)
                tls = await _tls_client(port, ca)
                await tls.send_all(b"hello")
                assert await tls.receive_some(100) == b"echo:hello"
                await tls.aclose()
            plain = trio.socket.socket()
            with plain:
                await plain.connect(("127.0.0.1", port))
                await plain.send(b"PLAIN TEXT")
                assert await plain.recv(100) == b"echo:PLAIN TEXT"
        await _drained(proxy)
        stats = proxy.statistics()
    assert engine_of(proxy).handed_over == 2  # the name to issue, the plaintext client
    assert (stats.accepted, stats.handshakes, stats.passthroughs) == (3, 2, 1)
    assert stats.dropped == {}


async def test_banner_first_is_passed_through() -> None:
    ca = TestCA()

    async def banner(conn: trio.socket.SocketType) -> None:
        await conn.send(b"220 smtp.example ESMTP\r\n")
        await conn.send(b"got:" + await conn.recv(100))

    async with _running(banner, ca) as (proxy, port):
        plain = trio.socket.socket()
        with plain, trio.fail_after(10):
            await plain.connect(("127.0.0.1", port))
            assert await plain.recv(100) == b"220 smtp.example ESMTP\r\n"
            await plain.send(b"EHLO me\r\n")
            assert await plain.recv(100) == b"got:EHLO me\r\n"
        await _drained(proxy)
        stats = proxy.statistics()
    assert stats.ports[port].passthrough_server_first == 1
    assert engine_of(proxy).handed_over == 1


async def test_deadlines_and_budgets_hold_in_the_engine() -> None:
    """A client that never speaks (idle), one that stops after its ClientHello (tls_timeout),
    a relay with both directions quiet (idle, then close_notify), and a client over its
    per-client budget (budget_client): each dropped once, with its reason."""
    ca = TestCA()

    async def quiet(conn: trio.socket.SocketType) -> None:
        await conn.recv(100)  # the client's request, then nothing ever
        await trio.sleep(30)

    limits = {"idle_timeout_s": 0.4, "handshake_timeout_s": 0.4, "max_connections_per_client": 3}
    async with _running(quiet, ca, **limits) as (proxy, port):
        with trio.fail_after(10):
            silent = trio.socket.socket()
            await silent.connect(("127.0.0.1", port))
            hello_only = trio.socket.socket()
            await hello_only.connect(("127.0.0.1", port))
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = ca.client_context().wrap_bio(incoming, outgoing, server_hostname=NAME)
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            await hello_only.send(outgoing.read())
            tls = await _tls_client(port, ca)
            await tls.send_all(b"request")
            over = trio.socket.socket()
            await over.connect(("127.0.0.1", port))
            assert await over.recv(10) == b""  # closed at once: over budget
            assert await _until_eof(tls) == b""  # idle: close_notify
            assert await silent.recv(10) == b""
            while await hello_only.recv(65536):  # the server's flight, then the close
                pass
            for s in (silent, hello_only, over):
                s.close()
        await _drained(proxy)
        stats = proxy.statistics()
    assert stats.dropped == {"idle": 2, "tls_timeout": 1, "budget_client": 1}, stats.dropped
    assert stats.handshakes == 1
    assert engine_of(proxy).handed_over == 0


async def test_a_refused_certificate_is_a_failed_handshake_in_the_engine() -> None:
    ca, other = TestCA(), TestCA()

    async def nothing(conn: trio.socket.SocketType) -> None:
        await conn.recv(100)

    async with _running(nothing, ca) as (proxy, port):
        sock = trio.socket.socket()
        with sock, trio.fail_after(10):
            await sock.connect(("127.0.0.1", port))
            ctx = other.client_context()  # does not trust the proxy's CA
            tls = trio.SSLStream(trio.SocketStream(sock), ctx, server_hostname=NAME)
            try:
                await tls.do_handshake()
            except trio.BrokenResourceError:
                pass
        await _drained(proxy)
        stats = proxy.statistics()
    assert stats.dropped == {"tls_handshake_failed": 1}
    assert stats.handshakes == 0


async def test_an_idle_engine_spends_no_cpu_and_lets_trio_see_it_blocked() -> None:
    """Idle, the engine blocks (in its epoll or through trio, also with more trio tasks than
    it looks at before blocking): no CPU while nothing happens, and wait_all_tasks_blocked
    (which needs every task blocked in trio) returns; it serves a connection after either."""
    ca = TestCA()
    async with _running(_answer, ca) as (proxy, port):
        for extra in (0, MAX_TASKS_SCANNED + 1):
            async with trio.open_nursery() as sleepers:
                for _ in range(extra):
                    sleepers.start_soon(trio.sleep_forever)
                with trio.fail_after(5):
                    await trio.testing.wait_all_tasks_blocked()
                before = time.process_time()
                await trio.sleep(0.3)
                assert time.process_time() - before < 0.1, f"{extra} extra tasks"
                with trio.fail_after(5):
                    tls = await _tls_client(port, ca)
                    await tls.send_all(b"GET / HTTP/1.0\r\n\r\n")
                    assert await _until_eof(tls) == b"HTTP/1.0 200 OK\r\n\r\nGET / HTTP/1.0"
                sleepers.cancel_scope.cancel()
        await _drained(proxy)


async def test_a_client_hello_in_pieces_is_handed_to_trio_and_served() -> None:
    """The first read holds half a ClientHello: the engine hands the connection over with
    the bytes it read, and trio's path reads the rest and serves it (nothing lost)."""
    ca = TestCA()
    async with _running(_answer, ca) as (proxy, port):
        sock = trio.socket.socket()
        with sock, trio.fail_after(10):
            await sock.connect(("127.0.0.1", port))
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = ca.client_context().wrap_bio(incoming, outgoing, server_hostname=NAME)

            async def drive(step: Callable[[], object]) -> object:
                """Run an SSLObject call to completion over the socket."""
                while True:
                    try:
                        result = step()
                    except ssl.SSLWantReadError:
                        if outgoing.pending:
                            await sock.send(outgoing.read())
                        data = await sock.recv(65536)
                        if not data:
                            incoming.write_eof()
                        else:
                            incoming.write(data)
                        continue
                    if outgoing.pending:
                        await sock.send(outgoing.read())
                    return result

            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            hello = outgoing.read()
            await sock.send(hello[:40])
            await trio.sleep(0.1)  # the engine reads the first piece alone
            await sock.send(hello[40:])
            await drive(obj.do_handshake)
            obj.write(b"GET /pieces HTTP/1.0\r\n\r\n")
            await sock.send(outgoing.read())
            answer = b""
            while True:
                try:
                    more = bytes(await drive(lambda: obj.read(65536)))  # type: ignore[arg-type]
                except ssl.SSLZeroReturnError:  # the proxy's close_notify
                    break
                if not more:
                    break
                answer += more
        await _drained(proxy)
        stats = proxy.statistics()
    assert answer == b"HTTP/1.0 200 OK\r\n\r\nGET /pieces HTTP/1.0"
    assert (stats.handshakes, stats.dropped) == (1, {})
    assert engine_of(proxy).handed_over == 1


async def test_a_closed_connection_is_freed_without_the_garbage_collector() -> None:
    """A connection's SSLObject, BIOs and buffers go when it closes, by reference counts:
    left in a cycle, every connection's would wait for the cyclic collector."""
    ca = TestCA()
    async with _running(_answer, ca) as (proxy, port):
        gc.collect()
        gc.disable()
        try:
            with trio.fail_after(10):
                for _ in range(10):
                    tls = await _tls_client(port, ca)
                    await tls.send_all(b"GET / HTTP/1.0\r\n\r\n")
                    await _until_eof(tls)
                    await tls.aclose()
            await _drained(proxy)
            alive = sum(isinstance(o, TlsConnection) for o in gc.get_objects())
        finally:
            gc.enable()
    assert alive == 0
    assert engine_of(proxy).handed_over == 0
