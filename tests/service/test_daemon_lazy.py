"""An idle ``overflowd run`` holds neither the API's FastAPI/pydantic nor numpy (issue #16):
the API app is built on the first request, numpy loaded with the first batch of datagrams.

Through what an operator touches: the daemon as a process, its API over HTTP, its collector
over UDP, its metrics. What is loaded is read from the process's memory map (the extension
modules' shared objects), not from the code's own say-so.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from overflowd import sandbox
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.jfe_certs import TestCA
from tests.unit.test_wire_v5 import v5

#: one shared object each, mapped as soon as the package is imported
PYDANTIC = "pydantic_core/_pydantic_core"
NUMPY = "_multiarray_umath.cpython"


def mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.fixture(params=["off", "seccomp"])
def daemon(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Daemon]:
    """A fresh node's daemon; also under its seccomp filter (as deploy/overflowd.service runs
    it): the app and numpy are then imported after the filter is on, so every call their
    imports make must be on the list."""
    monkeypatch.setenv(sandbox.ENV, "1" if request.param == "seccomp" else "0")
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    d = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "1")
    try:
        yield d
    finally:
        code, out = d.stop()
        assert code == 0, out[-2000:]
        assert ("sandbox seccomp on" in out) == (request.param == "seccomp"), out[-2000:]


def test_the_api_is_built_on_its_first_request_and_answers_it(daemon: Daemon) -> None:
    api = daemon.line("api ").split(" ", 1)[1]  # http://127.0.0.1:PORT/v1/
    maps = mapped(daemon.proc.pid)
    assert PYDANTIC not in maps and NUMPY not in maps
    # the daemon's own metrics server needs no app
    assert daemon.metric("overflowd_decoder_records_total") == 0
    assert PYDANTIC not in mapped(daemon.proc.pid)

    # Several first requests at once: each waits for the one app and is answered.
    with ThreadPoolExecutor(4) as pool:
        firsts = list(pool.map(lambda _: httpx.get(api + "identity", timeout=30), range(4)))
    assert [r.status_code for r in firsts] == [200] * 4, firsts[0].text
    identity = firsts[0].json()
    # (the node record in it is signed per request, with the time: compare the rest)
    stable = ("key", "fingerprint", "dns_record")
    assert identity["key"] and identity["fingerprint"] and identity["dns_record"]["text"]
    assert all({k: r.json()[k] for k in stable} == {k: identity[k] for k in stable} for r in firsts)
    assert PYDANTIC in mapped(daemon.proc.pid)
    with httpx.Client(timeout=30) as client:
        assert client.get(api + "identity").json()["key"] == identity["key"]
        assert client.get(api.removesuffix("v1/") + "healthz").text == "ok"
        page = client.get(api + "reports", params={"after": 0})
        assert page.status_code == 200 and page.json()["reports"] == []
        bad = client.get(api + "reports", params={"limit": 0})
        assert bad.status_code == 422 and "limit" in bad.text  # FastAPI's validation, as before
        metrics = client.get(api.removesuffix("v1/") + "metrics")
        assert metrics.status_code == 200
        assert "overflowd_decoder_records_total" in metrics.text
    assert NUMPY not in mapped(daemon.proc.pid)  # the API needed no numpy either


def test_numpy_comes_with_the_first_batch_and_the_records_are_counted(daemon: Daemon) -> None:
    assert daemon.udp is not None
    assert NUMPY not in mapped(daemon.proc.pid)
    src, dst = int(ipaddress.IPv4Address("192.0.2.1")), int(ipaddress.IPv4Address("198.51.100.9"))
    records = [{"src": src, "dst": dst, "sport": 1000 + i} for i in range(3)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(v5(records, secs=int(time.time())), daemon.udp)
    assert daemon.wait_for("overflowd_decoder_records_total", 3) == 3
    assert NUMPY in mapped(daemon.proc.pid)
    # --rate 1: every record is reported, signed and stored by the array path
    assert daemon.wait_for("overflowd_stored_reports_total", 1) >= 1


def test_the_api_over_tls_with_client_certificates_is_served_from_its_first_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hypercorn starts on the first connection, after the seccomp filter is on, with the
    listening socket made at start: TLS and the client CA are still applied to it."""
    monkeypatch.setenv(sandbox.ENV, "1")
    ca = TestCA()
    chain, key = ca.leaf("127.0.0.1")
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(
        f'[api]\ntls_certificate_file = "{chain}"\ntls_key_file = "{key}"\n'
        f'client_ca_file = "{ca.ca_file}"\n',
        encoding="utf-8",
    )
    d = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
    try:
        api = d.line("api ").split(" ", 1)[1]
        assert api.startswith("https://127.0.0.1:"), api
        anonymous = ca.client_context()
        with pytest.raises(httpx.HTTPError):  # no client certificate: no handshake
            httpx.get(api + "identity", verify=anonymous, timeout=30)
        client = ca.client_context()
        client.load_cert_chain(*ca.leaf("client.example.test"))
        answer = httpx.get(api + "identity", verify=client, timeout=30)
        assert answer.status_code == 200 and answer.json()["key"], answer.text
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is no answer
            httpx.get(api.replace("https://", "http://") + "identity", timeout=10)
    finally:
        code, out = d.stop()
    assert code == 0, out[-2000:]
    assert "sandbox seccomp on" in out, out[-2000:]
