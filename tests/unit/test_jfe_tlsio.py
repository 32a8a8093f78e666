"""jfe's TLS relay (jfe.tlsio) through the real `Proxy._serve`: every byte both ways, exactly.

Real sockets (socketpairs) and a real TLS client (trio.SSLStream over the TestCA); only the
upstream dial is replaced, as in test_jfe_proxy_first_speaker. Payloads larger than the relay's
256 KiB chunk, sent in uneven pieces right after the handshake, so the paths that matter run:
records arriving with the client's Finished, a full plaintext buffer with records still
queued, partial writes to a backend that reads slowly, close_notify at the end.
"""

from __future__ import annotations

import random

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
