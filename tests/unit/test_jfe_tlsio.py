"""jfe's TLS relay (jfe.tlsio) through the real `Proxy._serve`: every byte both ways, exactly.

Real sockets (socketpairs) and a real TLS client (trio.SSLStream over the TestCA); only the
upstream dial is replaced, as in test_jfe_proxy_first_speaker. Payloads larger than the relay's
256 KiB chunk, sent in uneven pieces right after the handshake, so the paths that matter run:
records arriving with the client's Finished, a full plaintext buffer with records still
queued, partial writes to a backend that reads slowly, close_notify at the end.
"""

from __future__ import annotations

import random
import ssl

import trio

from jfe.proxy import _Drop
from jfe.tlsio import CHUNK_BYTES
from tests.support.jfe_certs import TestCA, TestCertificateSource
from tests.unit.test_jfe_proxy_first_speaker import CLIENT, ORIGINAL, _PreDialed

NAME = "relay.example"


def _proxy(upstream: trio.socket.SocketType, ca: TestCA) -> _PreDialed:
    proxy = _PreDialed(upstream)
    proxy.certificates = TestCertificateSource(ca)
    return proxy


async def test_bulk_both_ways_is_byte_exact_and_counted() -> None:
    rng = random.Random(12)
    up_bytes = rng.randbytes(3 * CHUNK_BYTES + 12345)
    down_bytes = rng.randbytes(2 * CHUNK_BYTES + 777)
    ca = TestCA()
    client_side, conn = trio.socket.socketpair()
    backend_side, upstream = trio.socket.socketpair()
    proxy = _proxy(upstream, ca)
    got_backend = bytearray()
    got_client = bytearray()

    async def client() -> None:
        tls = trio.SSLStream(
            trio.SocketStream(client_side), ca.client_context(), server_hostname=NAME
        )
        await tls.do_handshake()
        view, pos = memoryview(up_bytes), 0
        while pos < len(view):  # uneven pieces: records of every size
            step = rng.randint(1, 100_000)
            await tls.send_all(view[pos : pos + step])
            pos += step
        while chunk := await tls.receive_some(65536):  # b"" at the proxy's close_notify
            got_client.extend(chunk)
        await tls.aclose()

    async def backend() -> None:
        while len(got_backend) < len(up_bytes):
            await trio.sleep(0.001 if len(got_backend) < CHUNK_BYTES else 0)  # slow at first
            got_backend.extend(await backend_side.recv(rng.randint(1000, 300_000)))
        await backend_side.send(down_bytes[: len(down_bytes) // 3])
        rest = memoryview(down_bytes)[len(down_bytes) // 3 :]
        while rest:
            rest = rest[await backend_side.send(rest) :]
        backend_side.close()

    with client_side, conn, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy._serve, conn, CLIENT, ORIGINAL)
            nursery.start_soon(client)
            nursery.start_soon(backend)
    assert bytes(got_backend) == up_bytes
    assert bytes(got_client) == down_bytes
    stats = proxy.statistics()
    assert (stats.handshakes, stats.bytes_to_upstream) == (1, len(up_bytes))
    assert stats.bytes_to_client == len(down_bytes)
    assert stats.dropped == {}


async def test_a_client_that_refuses_the_certificate_is_a_failed_handshake() -> None:
    ca = TestCA()
    client_side, conn = trio.socket.socketpair()
    backend_side, upstream = trio.socket.socketpair()
    proxy = _proxy(upstream, ca)
    refused = TestCA().client_context()  # trusts another CA: it aborts with an alert

    async def client() -> None:
        tls = trio.SSLStream(trio.SocketStream(client_side), refused, server_hostname=NAME)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError:
            client_side.close()

    reasons: list[str] = []

    async def serve() -> None:
        try:
            await proxy._serve(conn, CLIENT, ORIGINAL)
        except _Drop as exc:
            reasons.append(exc.reason)

    with backend_side, conn, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(client)
    assert reasons == ["tls_handshake_failed"]
    assert proxy.statistics().handshakes == 0


async def test_both_directions_at_once_with_slow_readers_at_both_ends() -> None:
    """Both directions run in one task (TlsConnection.relay): a side that does not read must
    hold back only the direction towards it. Client and backend each send more than the
    socket buffers and the relay's chunk hold while reading slowly themselves: a relay that
    stalled one direction on the other's full socket would deadlock here (fail_after)."""
    rng = random.Random(34)
    up_bytes = rng.randbytes(4 * CHUNK_BYTES + 999)
    down_bytes = rng.randbytes(4 * CHUNK_BYTES + 4321)
    ca = TestCA()
    client_side, conn = trio.socket.socketpair()
    backend_side, upstream = trio.socket.socketpair()
    proxy = _proxy(upstream, ca)
    got_backend = bytearray()
    got_client = bytearray()

    async def client() -> None:
        tls = trio.SSLStream(
            trio.SocketStream(client_side), ca.client_context(), server_hostname=NAME
        )
        await tls.do_handshake()

        async def send() -> None:
            view = memoryview(up_bytes)
            for pos in range(0, len(view), 50_000):
                await tls.send_all(view[pos : pos + 50_000])

        async def receive() -> None:
            while len(got_client) < len(down_bytes):
                await trio.sleep(0.002 if len(got_client) < CHUNK_BYTES else 0)  # slow at first
                got_client.extend(await tls.receive_some(rng.randint(1000, 100_000)))

        async with trio.open_nursery() as both:
            both.start_soon(send)
            both.start_soon(receive)
        await tls.aclose()

    async def backend() -> None:
        # Bytes from the backend first would make it the first speaker (plain pass-through):
        # it starts sending once the client's first bytes are through.
        got_backend.extend(await backend_side.recv(1000))

        async def send() -> None:
            view = memoryview(down_bytes)
            while view:
                view = view[await backend_side.send(view[:70_000]) :]

        async def receive() -> None:
            while len(got_backend) < len(up_bytes):
                await trio.sleep(0.002 if len(got_backend) < CHUNK_BYTES else 0)
                got_backend.extend(await backend_side.recv(rng.randint(1000, 100_000)))

        async with trio.open_nursery() as both:
            both.start_soon(send)
            both.start_soon(receive)
        backend_side.close()

    with client_side, conn, trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy._serve, conn, CLIENT, ORIGINAL)
            nursery.start_soon(client)
            nursery.start_soon(backend)
    assert bytes(got_backend) == up_bytes
    assert bytes(got_client) == down_bytes
    stats = proxy.statistics()
    assert (stats.bytes_to_upstream, stats.bytes_to_client) == (len(up_bytes), len(down_bytes))
    assert stats.dropped == {}


async def test_the_backend_answers_after_the_clients_close_notify() -> None:
    """The client's close_notify half-closes the backend (it reads EOF) and the relay goes on
    the other way: a backend that answers only at EOF (a request ended by closing) still gets
    its whole answer to the client, then the client gets close_notify."""
    answer = random.Random(56).randbytes(CHUNK_BYTES + 100)
    ca = TestCA()
    client_side, conn = trio.socket.socketpair()
    backend_side, upstream = trio.socket.socketpair()
    proxy = _proxy(upstream, ca)
    got_client = bytearray()
    got_backend = bytearray()

    async def client() -> None:
        ctx = ca.client_context()
        tls = trio.SSLStream(trio.SocketStream(client_side), ctx, server_hostname=NAME)
        await tls.do_handshake()
        await tls.send_all(b"the whole request")
        # close_notify without closing the socket: then read the answer to the end.
        try:  # trio has no half-close for TLS: its SSLObject says close_notify ...
            tls._ssl_object.unwrap()
        except ssl.SSLWantReadError:  # ... and would wait for the proxy's
            pass
        await client_side.send(tls._outgoing.read())
        while True:  # the answer, through the same SSLObject, to the proxy's close_notify
            data = await client_side.recv(65536)
            if not data:
                break
            tls._incoming.write(data)
            while True:
                try:
                    got_client.extend(tls._ssl_object.read(65536))
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    return

    async def backend() -> None:
        while data := await backend_side.recv(65536):  # until the half-close
            got_backend.extend(data)
        await backend_side.send(answer[:1000])
        rest = memoryview(answer)[1000:]
        while rest:
            rest = rest[await backend_side.send(rest) :]
        backend_side.close()

    with client_side, conn, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy._serve, conn, CLIENT, ORIGINAL)
            nursery.start_soon(client)
            nursery.start_soon(backend)
    assert bytes(got_backend) == b"the whole request"
    assert bytes(got_client) == answer
    assert proxy.statistics().dropped == {}
