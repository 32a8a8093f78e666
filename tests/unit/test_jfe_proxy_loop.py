"""A connection straight to jfe's listener must never be "forwarded" back to the listener.

With ``listen_address = "0.0.0.0"`` (the config accepts it) a client reaching the listen port
on any other local address was not recognised as undiverted: jfe dialled that address and port,
reached its own listener, and again, until the per-client budget stopped the loop — one
connection held ``max_connections_per_client`` slots (and twice as many descriptors) for the
idle timeout. Real listener (root: IP_TRANSPARENT), loopback addresses only.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio

from jfe.config import JfeSettings
from jfe.proxy import Proxy
from tests.support.jfe_certs import TestCA, TestCertificateSource

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="IP_TRANSPARENT needs CAP_NET_ADMIN")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_direct_connection_to_a_wildcard_listener_does_not_loop() -> None:
    port = _free_port()
    settings = JfeSettings(
        listen_address="0.0.0.0",
        listen_port=port,
        max_connections_per_client=20,
        idle_timeout_s=5.0,
        handshake_timeout_s=2.0,
    )
    proxy = Proxy(settings, TestCertificateSource(TestCA()))
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        client = trio.socket.socket()
        with client:
            await client.connect(("127.0.0.2", port))
            with trio.move_on_after(5):
                while not proxy.statistics().dropped:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)
            stats = proxy.statistics()
        nursery.cancel_scope.cancel()
    assert stats.dropped == {"not_diverted": 1}, stats.dropped
    assert stats.accepted == 1
