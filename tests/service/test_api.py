"""The node API through HTTP, served by a real ``overflowd run`` on loopback."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from overflowd.identity import NodeIdentity, load_identity, verify_report
from overflowd.report import b64url_decode
from overflowd.services.api import OPENAPI_FILE, ApiContext, create_app, openapi_text
from overflowd.store import Store
from overflowd.store.repository import default_url
from tests.service.test_daemon import Daemon
from tests.service.test_node_hardening import v9_one_record
from tests.support.cli import run
from tests.support.reports import make_payload

SEEDED = 250


def _api_url(daemon: Daemon) -> str:
    return daemon.line("api ").split()[1].rstrip("/")


def _init(home: Path) -> Path:
    result = run("overflowd", "init", "--home", str(home), "--contact", "mailto:a@example.net")
    assert result.code == 0, result.err
    return home


@contextlib.contextmanager
def _running(home: Path) -> Iterator[tuple[Daemon, str]]:
    other = NodeIdentity.generate()
    now_ms = int(time.time() * 1000)  # received now: older received reports are pruned
    with Store.open(default_url(home)) as store:
        store.add_reports(
            [(other.sign_report(make_payload()), now_ms, "udp") for _ in range(SEEDED)]
        )
    daemon = Daemon(
        home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--api", "127.0.0.1:0",
        "--rate", "1",
    )  # fmt: skip
    try:
        yield daemon, _api_url(daemon)
    finally:
        code, output = daemon.stop()
        assert code == 0, output


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return _init(tmp_path / "node")


@pytest.fixture
def node(home: Path) -> Iterator[tuple[Daemon, str]]:
    """A daemon of its own (the test stores reports)."""
    with _running(home) as running:
        yield running


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Daemon, str]]:
    """One daemon for the tests that only read (a daemon start is seconds of the suite)."""
    home = _init(tmp_path_factory.mktemp("api") / "node")
    with _running(home) as (daemon, url):
        yield home, daemon, url


def _page_all(
    client: httpx.Client, url: str, after: int, **params: object
) -> tuple[list[dict[str, object]], int]:
    got: list[dict[str, object]] = []
    while True:
        answer = client.get(f"{url}/reports", params={"after": after, "limit": 50, **params})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        if not body["reports"]:
            return got, after
        got.extend(body["reports"])
        assert body["next"] > after
        after = body["next"]


def test_identity_is_the_node_key_and_the_record_to_publish(
    shared: tuple[Path, Daemon, str],
) -> None:
    home, _, url = shared
    identity = httpx.get(f"{url}/identity", timeout=5).json()
    key = load_identity(home)
    assert identity["key"] == key.public_key_b64 and identity["fingerprint"] == key.fingerprint
    assert identity["contacts"] == ["mailto:a@example.net"]
    record = run("overflowd", "key", "dns-record", "--home", str(home)).out
    assert f'"{identity["dns_record"]["text"]}"' in record


def test_reports_page_by_cursor_and_pick_up_what_is_stored_meanwhile(
    node: tuple[Daemon, str],
) -> None:
    daemon, url = node
    with httpx.Client(timeout=10) as client:
        first, cursor = _page_all(client, url, 0)
        assert len(first) == SEEDED == len({r["report"]["id"] for r in first})
        seqs = [r["seq"] for r in first]
        assert seqs == sorted(seqs)
        # Thirty flows reach the daemon; its own reports come after the cursor, and only they.
        assert daemon.udp is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as exporter:
            for i in range(30):
                flow = v9_one_record(f"203.0.113.{i + 1}", "198.51.100.7", 10, sport=3000 + i)
                exporter.sendto(flow, daemon.udp)
        assert daemon.wait_for("overflowd_reports_stored_total", 30) == 30
        later, _ = _page_all(client, url, cursor)
        assert len(later) == 30 and {r["via"] for r in later} == {"local"}
        assert not {r["report"]["id"] for r in later} & {r["report"]["id"] for r in first}
        # Every report verifies from its own COSE bytes: the API is not trusted for them.
        for item in later[:3]:
            cose = b64url_decode(item["report"]["cose"])  # type: ignore[index]
            assert verify_report(cose).report_id == item["report"]["id"]  # type: ignore[index]
        mine, _ = _page_all(client, url, 0, prefix="203.0.113.0/24")
        assert len(mine) == 30


@pytest.mark.parametrize(
    ("params", "status", "names"),
    [
        ({"limit": 0}, 422, "limit"),
        ({"limit": 1001}, 422, "limit"),
        ({"after": -1}, 422, "after"),
        ({"after": "x"}, 422, "after"),
        # past the 64-bit column: was an OverflowError out of the store, a 500 and a traceback
        ({"after": 2**64}, 422, "after"),
        # a cursor this store never gave (its database was recreated or restored from an older
        # copy): an empty page with next=after hid every report numbered below it, for good
        ({"after": 10**6}, 409, "after"),
        ({"prefix": "nope"}, 400, "prefix"),
        ({"src": "10.0.0.0/33"}, 400, "src"),
    ],
)
def test_bad_query_parameters_are_refused_naming_them(
    shared: tuple[Path, Daemon, str], params: dict[str, object], status: int, names: str
) -> None:
    _, daemon, url = shared
    answer = httpx.get(f"{url}/reports", params=params, timeout=5)
    assert answer.status_code == status
    assert names in answer.text
    assert daemon.proc.poll() is None


def test_openapi_metrics_and_health(shared: tuple[Path, Daemon, str]) -> None:
    _, _, url = shared
    served = httpx.get(f"{url}/openapi.json", timeout=5).json()
    assert served == json.loads(OPENAPI_FILE.read_text())
    assert {"/v1/reports", "/v1/identity", "/healthz", "/metrics"} <= set(served["paths"])
    base = url.removesuffix("/v1")
    assert httpx.get(f"{base}/healthz", timeout=5).text == "ok"
    assert "overflowd_reports_stored_total" in httpx.get(f"{base}/metrics", timeout=5).text


def test_the_shipped_openapi_document_is_the_one_the_code_generates() -> None:
    app = create_app(
        ApiContext(identity=NodeIdentity.generate(), contacts=(), observation_point="", store=None)  # type: ignore[arg-type]
    )
    assert OPENAPI_FILE.read_text() == openapi_text(app), (
        "regenerate: .venv/bin/python -m overflowd.services.api > overflowd/openapi.json"
    )


def test_a_busy_api_port_is_one_line_naming_the_flag(home: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(
            "overflowd", "run", "--home", str(home), "--listen", "127.0.0.1:0", "--metrics", "",
            "--inband-listen", "127.0.0.1:0", "--api", f"127.0.0.1:{port}", timeout=60,
        )  # fmt: skip
    assert result.code == 1, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and f"--api 127.0.0.1:{port}: cannot listen" in lines[0], result.err
