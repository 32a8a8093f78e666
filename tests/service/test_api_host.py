"""DNS rebinding against a node API on loopback, through real HTTP: ``/v1/`` and ``/metrics``
answer a loopback ``Host`` only, as the dashboard does; the dashboard's operator token keeps
its own rules; an API beyond loopback does not look at Host.

A rebinding page's requests reach 127.0.0.1 with the page's own name as Host: httpx sends
that header here to the server that ``ApiService.run`` serves on a port of 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from overflowd.config import ApiSettings
from overflowd.identity import NodeIdentity
from overflowd.services.api import ApiContext, ApiService
from overflowd.store import Store
from overflowd.store.repository import default_url

TOKEN = "a-long-operator-token-0123456789"
REBOUND = "rebound.example"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[str]:
    store = Store.open(default_url(tmp_path))
    ctx = ApiContext(
        identity=NodeIdentity.generate(), contacts=(), observation_point="t", store=store
    )
    service = ApiService(ApiSettings(listen="127.0.0.1:0", dashboard_token=TOKEN), ctx)
    try:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(service.run)
            yield f"http://{host}:{port}"
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_rebinding_host_is_refused_and_a_loopback_host_answered(api: str) -> None:
    port = api.rsplit(":", 1)[1]
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=api, timeout=10, trust_env=False) as client:
            for path in ("/v1/identity", "/v1/reports?after=0", "/v1/who", "/metrics"):
                refused = await client.get(path, headers={"host": f"{REBOUND}:{port}"})
                assert refused.status_code == 403, (path, refused.text)
                assert "loopback Host" in refused.json()["detail"]
                for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
                    answer = await client.get(path, headers={"host": host})
                    assert answer.status_code == 200, (path, host, answer.text)
            # nothing to read there: liveness stays open
            assert (await client.get("/healthz", headers={"host": REBOUND})).status_code == 200
            # the dashboard's token path is its own, as before: with the token set it is
            # asked whatever the Host, and given it answers whatever the Host
            bearer = {"authorization": f"Bearer {TOKEN}"}
            assert (await client.get("/", headers={"host": REBOUND})).status_code == 401
            answer = await client.get("/", headers={"host": REBOUND, **bearer})
            assert answer.status_code == 200
            # ... but the token is the dashboard's: it opens no /v1/ route to another Host
            answer = await client.get("/v1/identity", headers={"host": REBOUND, **bearer})
            assert answer.status_code == 403


async def test_beyond_loopback_the_host_is_not_looked_at(tmp_path: Path) -> None:
    """A server on a routable address is named by peers as they like (their own DNS name,
    an address): the Host rule is loopback's only. Its application over ASGI (this test
    binds nothing beyond loopback)."""
    store = Store.open(default_url(tmp_path))
    ctx = ApiContext(
        identity=NodeIdentity.generate(), contacts=(), observation_point="t", store=store
    )
    service = ApiService(ApiSettings(listen="192.0.2.1:9591"), ctx)
    transport = httpx.ASGITransport(app=service.app, client=("198.51.100.7", 4000))  # type: ignore[arg-type]
    try:
        with trio.fail_after(30):
            async with httpx.AsyncClient(
                transport=transport, base_url="http://node.example:9591"
            ) as client:
                answer = await client.get("/v1/identity")
                assert answer.status_code == 200, answer.text
    finally:
        store.close()
