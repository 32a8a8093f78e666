"""The proxy's first-speaker race must lose no byte when both sides have spoken at once.

SSH is the everyday case: client and server send their identification strings the moment the
connection is up, so both are often already in jfe's sockets when it looks. Real sockets
(socketpairs), the real `Proxy._serve`; only the upstream dial is replaced by a socketpair end
whose backend has already sent its banner, which makes the "both at once" case deterministic.
"""

from __future__ import annotations

import ipaddress

import pytest
import trio

from jfe.config import JfeSettings
from jfe.proxy import Address, Proxy
from tests.support.jfe_certs import TestCA, TestCertificateSource

CLIENT = (ipaddress.IPv4Address("192.0.2.10"), 40000)
ORIGINAL = (ipaddress.IPv4Address("198.51.100.5"), 2222)


class _PreDialed(Proxy):
    def __init__(self, upstream: trio.socket.SocketType, idle_timeout_s: float = 5.0) -> None:
        super().__init__(
            JfeSettings(idle_timeout_s=idle_timeout_s, handshake_timeout_s=5.0),
            TestCertificateSource(TestCA()),
        )
        self._pre = upstream

    async def _upstream(
        self,
        client: tuple[Address, int],
        original: tuple[Address, int],
        transparent: bool,
    ) -> trio.socket.SocketType:
        return self._pre


async def _read_exactly(sock: trio.socket.SocketType, n: int) -> bytes:
    out = b""
    with trio.fail_after(5):
        while len(out) < n:
            more = await sock.recv(n - len(out))
            if not more:
                break
            out += more
    return out


@pytest.mark.parametrize(
    "client_speaks,backend_speaks", [(True, True), (True, False), (False, True)]
)
async def test_no_first_bytes_are_lost(client_speaks: bool, backend_speaks: bool) -> None:
    client_side, conn = trio.socket.socketpair()
    backend_side, upstream = trio.socket.socketpair()
    client_says = b"SSH-2.0-OpenSSH_9.6 client\r\n"
    backend_says = b"SSH-2.0-OpenSSH_9.6 server\r\n"
    if client_speaks:
        await client_side.send(client_says)
    if backend_speaks:
        await backend_side.send(backend_says)
    proxy = _PreDialed(upstream)
    with client_side, backend_side, conn:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(proxy._serve, conn, CLIENT, ORIGINAL)
            if not backend_speaks:  # a client-first exchange: the banner answers the client
                await trio.sleep(0.05)
                await backend_side.send(backend_says)
            if not client_speaks:
                await trio.sleep(0.05)
                await client_side.send(client_says)
            got_by_client = await _read_exactly(client_side, len(backend_says))
            got_by_backend = await _read_exactly(backend_side, len(client_says))
            nursery.cancel_scope.cancel()
    assert got_by_client == backend_says
    assert got_by_backend == client_says


async def test_idle_pass_through_is_counted_on_its_port() -> None:
    """Review (jfe #12): pass-through idle closes were counted in the total only, so the
    per-port drops (status, metrics) did not add up to the total."""
    client_side, conn = trio.socket.socketpair()
    backend_side, upstream = trio.socket.socketpair()
    proxy = _PreDialed(upstream, idle_timeout_s=0.3)
    with client_side, backend_side, conn:
        await backend_side.send(b"220 banner\r\n")
        with trio.fail_after(5):
            await proxy._serve(conn, CLIENT, ORIGINAL)
    stats = proxy.statistics()
    assert stats.dropped == {"idle": 1}
    assert stats.ports[ORIGINAL[1]].dropped == {"idle": 1}
