"""The operability issue's scenario, as a new user runs it: two nodes and a webhook receiver on
loopback, 30 flows toward one address.

Node A (the router's node) is told by its config to send to the flows' ends inside
127.0.0.2/32 only, and to POST reports about 127.0.0.2 to a webhook receiver
(``overflowd-receive``). Node B (the victim's node) listens for in-band reports on 127.0.0.2.
The 30 flows come from 30 TEST-NET-3 sources, so their source ends are outside the
confinement. In band, the per-/24 budget (burst 10) lets 10 datagrams through and refuses 20;
by webhook, every one of the 30 reports must arrive, in fewer POSTs than reports; and A's
metrics must say both.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from tests.service.test_daemon import Daemon
from tests.service.test_node_hardening import v9_one_record
from tests.service.test_receiver import start_receiver, stop
from tests.support.cli import run
from tests.support.metrics import reasons, scrape

FLOWS = 30
VICTIM = "127.0.0.2"
TIMEOUT_S = 60.0


def _lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_thirty_flows_reach_the_webhook_as_thirty_reports_and_the_metrics_say_why(
    tmp_path: Path,
) -> None:
    victim_home, router_home = tmp_path / "victim", tmp_path / "router"
    for home in (victim_home, router_home):
        assert run("overflowd", "init", "--home", str(home)).code == 0
    out = tmp_path / "hook.jsonl"
    receiver, base = start_receiver(out)
    victim = router = None
    try:
        victim = Daemon(
            victim_home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
            "--inband-listen", f"{VICTIM}:0",
        )  # fmt: skip
        port = int(victim.line("listening inband ").rsplit(":", 1)[1])
        (router_home / "overflowd.toml").write_text(
            f"""
[sampling]
rate = 1.0
[send]
to_flow_addresses = true
allowed_prefixes = ["{VICTIM}/32"]
[inband]
port = {port}
[webhook]
targets = [{{ prefix = "{VICTIM}/32", url = "{base}/hook" }}]
allow_prefixes = ["127.0.0.0/8"]
require_https = false
""",
            encoding="utf-8",
        )
        router = Daemon(router_home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
        assert router.udp is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as exporter:
            for i in range(FLOWS):
                datagram = v9_one_record(f"203.0.113.{i + 1}", VICTIM, 1000, sport=2000 + i)
                exporter.sendto(datagram, router.udp)
        assert router.wait_for("overflowd_reports_stored_total", FLOWS, TIMEOUT_S) == FLOWS

        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and len(_lines(out)) < FLOWS:
            time.sleep(0.1)
        delivered = _lines(out)
        assert len(delivered) == FLOWS
        assert len({d["id"] for d in delivered}) == FLOWS
        assert {d["flow"]["dst"] for d in delivered} == {VICTIM}  # type: ignore[index]
        posts = scrape(f"{base}/metrics").value("overflowd_receiver_requests_total")
        assert 1 <= posts < FLOWS, f"{posts} POSTs for {FLOWS} reports: not batched"

        # In band: 10 datagrams to the victim (the /24's burst), 20 refused by that budget,
        # and the 30 sources outside the confinement; the victim's node stored the 10.
        assert router.wait_for("overflowd_inband_sent_total", 10, TIMEOUT_S) == 10
        metrics = scrape(router.metrics_url or "")
        dropped = reasons(metrics, "overflowd_send_dropped_total", channel="inband")
        assert dropped["prefix_budget"] == 20 and dropped["not_allowed"] == FLOWS
        assert victim.wait_for("overflowd_inband_stored_total", 10, TIMEOUT_S) == 10
        assert metrics.value("overflowd_webhook_dropped_total", reason="duplicate") == 0
    finally:
        for node in (router, victim):
            if node is not None:
                code, output = node.stop()
                assert code == 0, output
        stop(receiver)
