"""Review of the node side of #9, as an attacker or a careless operator meets it.

``overflowd run`` as a process, spoofed v5 datagrams on loopback in, a real HTTP server on
127.0.0.1 as the webhook endpoint, /metrics scraped and the stop summary read. Every wait is
bounded.
"""

from __future__ import annotations

import http.server
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.test_metrics_visibility import (
    Node,
    eventually,
    flows,
    home,
    node_factory,
    send_from,
)
from tests.support.cli import run
from tests.support.metrics import Scrape

__all__ = ["home", "node_factory"]  # fixtures, re-used


class Hooks(http.server.BaseHTTPRequestHandler):
    """/gone answers 410 Gone, /busy 503 (try later): the endpoints a flood is aimed past."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response({"/gone": 410, "/busy": 503}.get(self.path, 404))
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hooks() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _config(url: str, *, per_url: int, total: int) -> str:
    return (
        "[metrics]\ngauges_interval_s = 0.1\n"
        '[webhook]\nallow_prefixes = ["127.0.0.0/8"]\nrequire_https = false\n'
        f'targets = [{{prefix = "127.9.0.0/24", url = "{url}"}}]\npoll_interval_s = 0.1\n'
        f"max_pending_per_url = {per_url}\nmax_pending = {total}\n"
    )


def _rows(s: Scrape) -> dict[str, float]:
    return s.series("overflowd_webhook_outbox_rows", "state")


def _flood(node: Node, n: int, sport: int) -> None:
    """``n`` distinct spoofed flows toward 127.9.0.2 (the endpoint's prefix), one datagram."""
    assert node.udp is not None
    send_from("127.0.0.1", node.udp, flows(*[("127.9.0.1", "127.9.0.2")] * n, sport=sport))


def test_stop_summary_says_what_the_webhook_plan_shed(
    hooks: str, node_factory: Callable[..., Node]
) -> None:
    """Five flows to an endpoint that says 503 with room for two pending rows: three are shed
    ``outbox_full``. /metrics says so; the stop summary, the operator's one look at a run,
    must too (it listed delivery outcomes only, so a run that shed reports looked clean)."""
    node = node_factory(_config(f"{hooks}/busy", per_url=2, total=100), "--rate", "1")
    try:
        _flood(node, 5, sport=1000)
        s = eventually(
            node.url,
            lambda s: s.value("overflowd_webhook_dropped_total", reason="outbox_full") == 3,
        )
        assert s.value("overflowd_webhook_dropped_total", reason="outbox_full") == 3
    finally:
        code, out, err = node.stop_split()
    assert code == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("stopped: webhook ")]
    assert " not_enqueued=3 outbox_full=3 deferred=0" in line, line


def test_flood_toward_a_gone_endpoint_is_held_to_the_outbox_caps(
    hooks: str, node_factory: Callable[..., Node]
) -> None:
    """Review finding: the endpoint answers 410 once and is disabled; every new row for it was
    written straight away as dead, outside ``max_pending_per_url`` and ``max_pending``, and dead
    rows were never pruned, so a spoofed flood added a row with a copy of the COSE per report,
    for ever. Now dead letters count against the caps (and go after ``keep_dead_s``)."""
    node = node_factory(_config(f"{hooks}/gone", per_url=3, total=3), "--rate", "1")
    try:
        _flood(node, 1, sport=1000)
        eventually(node.url, lambda s: _rows(s).get("dead") == 1)
        _flood(node, 20, sport=2000)
        s = eventually(
            node.url,
            lambda s: (
                s.value("overflowd_stored_reports_total", via="local") == 21
                and _rows(s).get("dead", 0)
                + s.value("overflowd_webhook_dropped_total", reason="outbox_full")
                == 21
            ),
        )
        assert s.value("overflowd_stored_reports_total", via="local") == 21
        assert _rows(s)["dead"] <= 3, _rows(s)
    finally:
        node.stop_split()


def test_host_bits_in_send_allowed_prefixes_name_the_key(home: Path) -> None:
    """``send.allowed_prefixes = ["192.0.2.1/24"]`` passed the config check (strict=False) and
    failed at start in Confinement (strict=True) with a line naming neither file nor key."""
    (home / "overflowd.toml").write_text(
        '[send]\nto_flow_addresses = true\nallowed_prefixes = ["192.0.2.1/24"]\n'
    )
    result = run(
        "overflowd", "--home", str(home), "run", "--listen", "127.0.0.1:0",
        "--inband-listen", "127.0.0.1:0", "--api", "", "--metrics", "", timeout=30,
    )  # fmt: skip
    assert result.code == 1, result
    assert "send.allowed_prefixes" in result.err and "overflowd.toml" in result.err, result.err
    assert "Traceback" not in result.err
