"""jfe.engine against hostile clients and backends (review s10/rev10), through the real
`Proxy.run` on a loopback listener as tests/unit/test_jfe_engine.py runs it: resets and
closes at every stage of a connection, a refusing backend, half-open connections in every
state the engine holds. Each must be counted, give back its budget slot and its
descriptors, leave the engine serving others, and cost no CPU while it waits."""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time

import trio

from tests.support.jfe_certs import TestCA
from tests.unit.test_jfe_engine import (
    NAME,
    _answer,
    _drained,
    _ip,
    _running,
    _tls_client,
    _until_eof,
    blocking,
    engine_of,
)

__all__ = ["blocking"]  # the autouse fixture: every test with and without the blocking wait

STAGES = [
    "rst_at_once",
    "fin_at_once",
    "hello_then_rst",
    "hello_then_fin",
    "flight_then_rst",
    "handshake_then_rst",
    "request_then_rst",
    "half_hello_then_rst",
    "garbage_then_rst",
]


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _client_hello(ca: TestCA) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO, bytes]:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ca.client_context().wrap_bio(incoming, outgoing, server_hostname=NAME)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return obj, incoming, outgoing, outgoing.read()


async def _handshaken(
    port: int, ca: TestCA
) -> tuple[trio.socket.SocketType, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """A TLS client over memory BIOs, through its handshake: it sends exactly what it is
    told to (close_notify without closing the socket, say)."""
    sock = trio.socket.socket()
    await sock.connect(("127.0.0.1", port))
    obj, incoming, outgoing, hello = _client_hello(ca)
    await sock.send(hello)
    while True:
        incoming.write(await sock.recv(65536))
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            pass
    await sock.send(outgoing.read())
    return sock, obj, incoming, outgoing


async def _attack(port: int, ca: TestCA, stage: str) -> None:
    s = trio.socket.socket()
    await s.connect(("127.0.0.1", port))
    raw = s._sock  # the stdlib socket, for SO_LINGER resets
    if stage in ("rst_at_once", "fin_at_once"):
        _reset(raw) if stage == "rst_at_once" else s.close()
        return
    obj, incoming, outgoing, hello = _client_hello(ca)
    if stage == "garbage_then_rst":
        await s.send(b"\x16\x03\x01\xff\xff" + os.urandom(300))
    elif stage == "half_hello_then_rst":
        await s.send(hello[: len(hello) // 2])
    else:
        await s.send(hello)
    if stage == "hello_then_fin":
        s.close()
        return
    if stage in ("flight_then_rst", "handshake_then_rst", "request_then_rst"):
        incoming.write(await s.recv(65536))
        if stage != "flight_then_rst":
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            if stage == "request_then_rst":
                obj.write(b"GET / HTTP/1.0\r\n")  # no blank line: the backend waits
            await s.send(outgoing.read())
    await trio.sleep(0.005)
    _reset(raw)


async def test_every_failure_stage_gives_back_its_slot_and_descriptors() -> None:
    ca = TestCA()
    async with _running(_answer, ca, idle_timeout_s=1.0, handshake_timeout_s=1.0) as (proxy, port):
        with trio.fail_after(20):
            tls = await _tls_client(port, ca)  # warm: the name is cached, fds settle
            await tls.send_all(b"GET / HTTP/1.0\r\n\r\n")
            await _until_eof(tls)
            await tls.aclose()
            await _drained(proxy)
            fds = len(os.listdir("/proc/self/fd"))
            for stage in STAGES:
                for _ in range(5):
                    await _attack(port, ca, stage)
            # A refusing backend, from the engine's connect.
            backend = proxy.backend
            with socket.socket() as dead:
                dead.bind(("127.0.0.1", 0))
                proxy.backend = (_ip("127.0.0.1"), dead.getsockname()[1])
            for _ in range(5):
                await _attack(port, ca, "hello_then_fin")
            proxy.backend = backend
            await _drained(proxy)
            await trio.sleep(0.05)  # the lingering tasks' closes
            assert len(os.listdir("/proc/self/fd")) == fds
            assert proxy._per_client == {}
            tls = await _tls_client(port, ca)  # and the engine still serves
            await tls.send_all(b"GET /after HTTP/1.0\r\n\r\n")
            assert await _until_eof(tls) == b"HTTP/1.0 200 OK\r\n\r\nGET /after HTTP/1.0"
        stats = proxy.statistics()
    assert stats.dropped.get("upstream_refused") == 5
    assert stats.accepted == 2 + 5 * len(STAGES) + 5
    assert stats.open_connections == 0


async def test_half_open_connections_in_every_state_cost_no_cpu_while_waiting() -> None:
    """Silent, a ClientHello and nothing more (handshake), a relay whose backend is quiet,
    a client that sent close_notify and keeps its socket open, one that reads nothing while its
    backend streams: the process idles at ~0 CPU with all of them open, and serves."""
    ca = TestCA()

    async def backend(conn: trio.socket.SocketType) -> None:
        first = await conn.recv(100)
        if first == b"stream":
            while True:
                await conn.send(b"x" * 65536)
        await trio.sleep(30)

    async with _running(backend, ca, idle_timeout_s=30, handshake_timeout_s=30) as (proxy, port):
        with trio.fail_after(20):
            silent = trio.socket.socket()
            await silent.connect(("127.0.0.1", port))
            hello_only = trio.socket.socket()
            await hello_only.connect(("127.0.0.1", port))
            await hello_only.send(_client_hello(ca)[3])
            quiet = await _tls_client(port, ca)
            await quiet.send_all(b"quiet")
            notified, obj, _, outgoing = await _handshaken(port, ca)
            obj.write(b"bye")
            try:
                obj.unwrap()  # close_notify, then the socket stays open, unread
            except ssl.SSLWantReadError:
                pass
            await notified.send(outgoing.read())
            stream = await _tls_client(port, ca)
            await stream.send_all(b"stream")
            await trio.sleep(0.3)  # the streaming backend fills every buffer
            assert engine_of(proxy).handed_over == 0  # all five held by the engine itself
            assert proxy.statistics().open_connections == 5
            before = time.process_time()
            await trio.sleep(0.5)
            assert time.process_time() - before < 0.1
            tls = await _tls_client(port, ca)
            await tls.send_all(b"late")
            assert proxy.statistics().open_connections == 6
        for s in (silent, hello_only, notified):
            s.close()
