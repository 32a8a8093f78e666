"""The node API's limits through real HTTP on loopback: a request's deadline, the cap on one
client's requests in flight, and hypercorn's own bounds against connections that trickle.

The API service runs in this test's trio loop (``ApiService.run``) over a real SQLite store;
slow routes are added to its application as a route would be slow in the field: a sync
handler blocked in its worker thread (as a store read is) and an async one awaiting.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import trio

from overflowd.config import ApiSettings, load_settings
from overflowd.errors import ConfigError
from overflowd.identity import NodeIdentity
from overflowd.services.api import ApiContext, ApiService
from overflowd.store import Store
from overflowd.store.repository import default_url


def _refused(metrics: str, reason: str) -> int:
    m = re.search(rf'^overflowd_api_refused_total{{reason="{reason}"}} (\S+)$', metrics, re.M)
    assert m, metrics
    return int(float(m.group(1)))


@dataclasses.dataclass
class Api:
    url: str
    service: ApiService


async def _serve(
    nursery: trio.Nursery, tmp: Path, settings: ApiSettings, add: Callable[[ApiService], None]
) -> Api:
    store = Store.open(default_url(tmp))
    ctx = ApiContext(
        identity=NodeIdentity.generate(), contacts=(), observation_point="t", store=store
    )
    service = ApiService(dataclasses.replace(settings, listen="127.0.0.1:0"), ctx)
    add(service)
    host, port = await nursery.start(service.run)
    return Api(f"http://{host}:{port}", service)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def test_a_route_over_its_deadline_gets_503_while_others_are_answered(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    release = threading.Event()

    def add(service: ApiService) -> None:
        def slow_sync() -> str:  # in a worker thread, as a store read: cannot be interrupted
            release.wait(10)
            return "late"

        async def slow_async() -> str:
            await trio.sleep(30)
            return "late"

        service.app.add_api_route("/slow-sync", slow_sync)
        service.app.add_api_route("/slow-async", slow_async)

    api = await _serve(nursery, tmp_path, ApiSettings(request_timeout_s=0.5), add)
    async with httpx.AsyncClient(base_url=api.url, timeout=10, trust_env=False) as client:
        for path in ("/slow-sync", "/slow-async"):
            t0 = time.monotonic()
            r = await client.get(path)
            took = time.monotonic() - t0
            assert r.status_code == 503, (path, r.text)
            assert r.headers["retry-after"] == "5"
            assert r.json() == {"detail": "the answer took too long"}
            assert 0.4 < took < 3.0, (path, took)  # at the deadline, not when the route ends
        # The thread still runs, its answer to be dropped; others are answered meanwhile.
        assert (await client.get("/healthz")).text == "ok"
        assert (await client.get("/v1/identity")).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert _refused(metrics, "deadline") == 2
        assert _refused(metrics, "per_client") == 0
        assert "overflowd_api_abandoned 1.0" in metrics  # the thread, still blocked
        release.set()
        with trio.fail_after(10):
            while api.service.limits.statistics().abandoned:
                await trio.sleep(0.05)
        assert api.service.limits.statistics().in_flight == 0
    api.service.stop()


async def test_one_client_over_its_requests_in_flight_gets_429_others_do_not(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    gate = trio.Event()
    holding = [0]

    def add(service: ApiService) -> None:
        async def hold() -> str:
            holding[0] += 1
            await gate.wait()
            return "done"

        service.app.add_api_route("/hold", hold)

    settings = ApiSettings(max_requests_per_client=2, request_timeout_s=20)
    api = await _serve(nursery, tmp_path, settings, add)
    other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")  # another client address
    async with (
        httpx.AsyncClient(base_url=api.url, timeout=10, trust_env=False) as client,
        httpx.AsyncClient(
            base_url=api.url, timeout=10, trust_env=False, transport=other
        ) as neighbour,
    ):
        answers: list[int] = []

        async def held() -> None:
            answers.append((await client.get("/hold")).status_code)

        async with trio.open_nursery() as inner:
            inner.start_soon(held)
            inner.start_soon(held)
            with trio.fail_after(10):
                while holding[0] < 2:
                    await trio.sleep(0.01)
            over = await client.get("/healthz")
            assert over.status_code == 429 and over.headers["retry-after"] == "1", over.text
            assert (await neighbour.get("/healthz")).text == "ok"  # its own cap
            gate.set()
        assert answers == [200, 200]
        # A request holds its place until its route returns, just after its answer is sent.
        with trio.fail_after(10):
            while api.service.limits.statistics().in_flight:
                await trio.sleep(0.01)
        assert (await client.get("/healthz")).text == "ok"  # its requests ended: room again
        metrics = (await client.get("/metrics")).text
        assert _refused(metrics, "per_client") == 1
        assert _refused(metrics, "deadline") == 0
    api.service.stop()


async def test_trickling_connections_are_closed_at_the_headers_deadline(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Slowloris: connections that send a request head a byte at a time. hypercorn's timer
    closes each at keep_alive_s from its start; honest requests meanwhile get answers; a head
    over max_header_bytes is refused."""
    settings = ApiSettings(keep_alive_s=0.5, max_header_bytes=2048)
    api = await _serve(nursery, tmp_path, settings, lambda service: None)
    host, port = api.url.removeprefix("http://").split(":")
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    closed_after: list[float] = []

    async def trickle() -> None:
        stream = await trio.open_tcp_stream(host, int(port))
        t0 = time.monotonic()
        with trio.fail_after(10):
            try:
                for byte in head:
                    await stream.send_all(bytes([byte]))
                    await trio.sleep(0.05)  # 10 s for the whole head, were it not closed
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            else:
                # the server may have answered 408 or just closed: read to the end
                while await stream.receive_some(4096):
                    pass
        closed_after.append(time.monotonic() - t0)
        await stream.aclose()

    answered: list[float] = []
    async with httpx.AsyncClient(base_url=api.url, timeout=5, trust_env=False) as client:
        async with trio.open_nursery() as inner:
            for _ in range(20):
                inner.start_soon(trickle)
            await trio.sleep(0.1)
            for _ in range(10):
                t0 = time.monotonic()
                assert (await client.get("/healthz")).text == "ok"
                answered.append(time.monotonic() - t0)
                await trio.sleep(0.05)
        assert len(closed_after) == 20
        assert max(closed_after) < 5.0, closed_after  # ~0.5 s each, far under the 10 s trickle
        assert max(answered) < 2.0, answered
        # A head over max_header_bytes: refused, not buffered.
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096)
        got = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                got += chunk
        await stream.aclose()
        assert not got or got.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), got[:80]
        assert b"ok" not in got
    api.service.stop()


async def test_the_first_connections_may_be_reset_garbage_or_trickling(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """hypercorn starts when the first connection waits on the listening socket: that one
    reset before it is accepted, the next a TLS hello on the plain port, the next trickling,
    and the service still answers whoever comes next, and the garbage gets its 400."""
    settings = ApiSettings(keep_alive_s=2.0)
    api = await _serve(nursery, tmp_path, settings, lambda service: None)
    host, port = api.url.removeprefix("http://").split(":")
    reset = socket.create_connection((host, int(port)))
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset.close()  # an RST, queued before anything accepted it
    garbage = await trio.open_tcp_stream(host, int(port))
    await garbage.send_all(
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40) + b"\r\n\r\n"
    )
    slow = await trio.open_tcp_stream(host, int(port))
    await slow.send_all(b"GET /hea")
    async with httpx.AsyncClient(base_url=api.url, timeout=5, trust_env=False) as client:
        for _ in range(5):
            assert (await client.get("/healthz")).text == "ok"
    with trio.fail_after(5):
        answer = await garbage.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    for stream in (garbage, slow):
        await stream.aclose()
    api.service.stop()


async def test_tls_files_changed_after_start_do_not_stop_the_service_at_its_first_connection(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """hypercorn starts on the first connection; the certificate and key were read at start, so
    a key file half rewritten since (a renewal) is not read then: the service goes on."""
    from tests.support.jfe_certs import TestCA

    ca = TestCA()
    chain, key = ca.leaf("127.0.0.1")
    settings = ApiSettings(tls_certificate_file=str(chain), tls_key_file=str(key))
    api = await _serve(nursery, tmp_path, settings, lambda service: None)
    key.write_text("-----BEGIN PRIVATE KEY-----\n", encoding="utf-8")
    url = api.url.replace("http://", "https://")
    async with httpx.AsyncClient(base_url=url, timeout=5, verify=ca.client_context()) as client:
        for _ in range(2):
            assert (await client.get("/healthz")).text == "ok"
    api.service.stop()


def test_the_tls_context_is_the_one_hypercorn_would_make(tmp_path: Path) -> None:
    from hypercorn.config import Config

    from overflowd.services import api as api_module
    from tests.support.jfe_certs import TestCA

    ca = TestCA()
    chain, key = ca.leaf("127.0.0.1")
    settings = ApiSettings(
        tls_certificate_file=str(chain), tls_key_file=str(key), client_ca_file=str(ca.ca_file)
    )
    config = Config()
    config.alpn_protocols = ["http/1.1"]
    config.certfile, config.keyfile, config.ca_certs = str(chain), str(key), str(ca.ca_file)
    config.verify_mode = ssl.CERT_REQUIRED
    theirs = config.create_ssl_context()
    ours = api_module._server_tls_context(settings)
    assert ours is not None and theirs is not None
    for name in ("options", "minimum_version", "maximum_version", "verify_mode", "verify_flags"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.get_ciphers() == theirs.get_ciphers()
    assert ours.get_ca_certs() == theirs.get_ca_certs()


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("request_timeout_s = 0", "'api.request_timeout_s' must be a positive number of seconds"),
        ("read_timeout_s = -1.0", "'api.read_timeout_s' must be a positive number of seconds"),
        ("max_header_bytes = 100", "'api.max_header_bytes' must be within 1024..1048576"),
        ("max_requests_per_client = 0", "'api.max_requests_per_client' must be at least 1"),
        ('request_timeout_s = "10"', "api.request_timeout_s"),
    ],
)
def test_limit_settings_are_parsed_strictly(tmp_path: Path, line: str, why: str) -> None:
    (tmp_path / "overflowd.toml").write_text(f"[api]\n{line}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path)
    assert why in str(info.value) and "overflowd.toml:2" in str(info.value), str(info.value)


def test_the_limits_metric_families_are_documented() -> None:
    from overflowd.services.api import RequestLimits

    doc = Path(__file__).resolve().parents[2] / "docs" / "daemon.md"
    section = doc.read_text(encoding="utf-8").split("## What the metrics say", 1)[1]
    families = list(RequestLimits(ApiSettings()).collector().collect())
    assert len(families) == 4
    for m in families:
        name = m.name + ("_total" if m.type == "counter" else "")
        row = next((x for x in section.splitlines() if f"`{name}`" in x), None)
        assert row, f"{name} is not in {doc.name}"
        for label in {k for sample in m.samples for k in sample.labels}:
            assert f"`{label}`" in row, f"{name}: label {label} is not in its row"
