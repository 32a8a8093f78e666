"""Two daemons in network namespaces: live capture on A; reports reach B in band and by webhook.

Namespace A holds node A (192.0.2.1), namespace B node B (198.51.100.1), joined by one veth
with on-link routes. B sends UDP flows to A; A's kernel samples every packet (one_in = 1),
A signs one report per packet and sends it in band to the flow's two ends, within its budget
and confinement (TEST-NET prefixes only). B's `overflowd run` verifies and stores them. Both
daemons are real processes started with `overflowd run` inside their namespaces. A also
POSTs each report about B's prefix to B's `overflowd-receive` (Standard Webhooks, signed with
A's key), through its durable outbox.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from overflowd.identity import load_identity, verify_report
from overflowd.report import b64url_decode
from tests.support import netns
from tests.support.cli import BIN, run
from tests.support.netns_capture import send_argv

pytestmark = pytest.mark.netns

A4, B4 = "192.0.2.1", "198.51.100.1"
FLOWS = 5
PACKETS_PER_FLOW = 20
STEP_TIMEOUT_S = 30.0


@dataclass
class Node:
    ns: netns.Namespace
    home: Path
    process: netns.Process | None = None

    def metric(self, name: str) -> float:
        url = re.search(r"metrics (http://\S+)", self.process.output() if self.process else "")
        assert url, "no metrics line"
        done = self.ns.run([sys.executable, "-c",
                            f"import httpx; print(httpx.get({url.group(1)!r}, timeout=5).text)"])
        return sum(float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines()
                   if line.startswith(name + " ") or line.startswith(name + "{"))

    def wait_metric(self, name: str, at_least: float, timeout: float = STEP_TIMEOUT_S) -> float:
        deadline = time.monotonic() + timeout
        while (value := self.metric(name)) < at_least and time.monotonic() < deadline:
            time.sleep(0.2)
        return value


def make_home(path: Path, config: str) -> Path:
    assert run("overflowd", "init", "--home", str(path)).code == 0
    (path / "overflowd.toml").write_text(config)
    return path


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Node, Node, netns.Link]]:
    try:
        netns.require("ip", "ethtool", "sysctl")
    except netns.NetnsUnavailable as exc:
        pytest.fail(f"node netns tests cannot run: {exc}", pytrace=False)
    netns.sweep_stale()
    with netns.namespace(tmp_path) as a, netns.namespace(tmp_path) as b:
        link = netns.veth(a, b, [f"{A4}/24"], [f"{B4}/24"])
        a.run(["ip", "route", "add", "198.51.100.0/24", "dev", link.a_dev])
        b.run(["ip", "route", "add", "192.0.2.0/24", "dev", link.b_dev])
        node_a = Node(a, make_home(tmp_path / "a", f"""
[node]
contacts = ["mailto:abuse@a.example"]
observation_point = "node-a"
[sampling]
rate = 1.0
[collector]
listen = ["127.0.0.1:0"]
[metrics]
listen = "127.0.0.1:0"
[capture]
interfaces = ["{link.a_dev}"]
one_in = 1
[inband]
listen = "{A4}:65535"
allowed_prefixes = ["192.0.2.0/24", "198.51.100.0/24"]
[budget]
# The webhooks' own TCP packets are captured and reported too (each POST a new flow, which
# asks for another POST): the budget bounds that loop; give the test's flows room before it.
per_prefix_burst = 100
[webhook]
targets = [{{ prefix = "198.51.100.0/24", url = "http://{B4}:8080/overflowd" }}]
allow_prefixes = ["198.51.100.0/24"]
require_https = false
"""))
        node_b = Node(b, make_home(tmp_path / "b", f"""
[collector]
listen = ["127.0.0.1:0"]
[metrics]
listen = "127.0.0.1:0"
[inband]
listen = "{B4}:65535"
"""))
        yield node_a, node_b, link


def _ours(report: dict[str, Any]) -> bool:
    """One of the test's UDP flows (B → A, source ports 41000...)."""
    flow = report["flow"]
    return bool(flow["proto"] == 17 and 41000 <= flow["sport"] < 41000 + FLOWS)


def _udp_flows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if _ours(r)]


def start(node: Node) -> None:
    node.process = node.ns.spawn([str(BIN / "overflowd"), "run", "--home", str(node.home)],
                                 label="overflowd")
    node.process.wait_for_output(r"listening inband \S+", STEP_TIMEOUT_S)


def test_live_capture_reports_reach_the_other_node_in_band(
    lab: tuple[Node, Node, netns.Link],
) -> None:
    node_a, node_b, _ = lab
    received = node_b.home / "received.jsonl"
    key_a = load_identity(node_a.home).public_key
    receiver = node_b.ns.spawn(
        [str(BIN / "overflowd-receive"), "--listen", f"{B4}:8080", "--out", str(received),
         "--trust", base64.b64encode(key_a).decode()],
        label="receive",
    )
    receiver.wait_for_output(r"(?i)listening", STEP_TIMEOUT_S)
    start(node_b)
    start(node_a)
    for i in range(FLOWS):
        done = node_b.ns.run(send_argv(sys.executable, A4, 9000, PACKETS_PER_FLOW,
                                       sport=41000 + i, burst=PACKETS_PER_FLOW, pause_s=0.001),
                             timeout=STEP_TIMEOUT_S)
        assert done.stdout.strip() == f"sent {PACKETS_PER_FLOW}"
    # Every packet was captured and reported; the budget de-duplicates each flow per target.
    # (The webhook's own TCP packets are captured and reported too: counts are lower bounds,
    # and the exact checks below look at our UDP flows only.)
    signed = node_a.wait_metric("overflowd_reports_signed_total", FLOWS * PACKETS_PER_FLOW)
    assert signed >= FLOWS * PACKETS_PER_FLOW
    assert node_a.wait_metric("overflowd_inband_sent_total", 2 * FLOWS) >= 2 * FLOWS
    assert node_b.wait_metric("overflowd_inband_stored_total", FLOWS) >= FLOWS
    assert node_b.metric("overflowd_inband_refused_total") == 0
    # Webhooks: one per UDP flow (the budget de-duplicates the flow's packets per endpoint).
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while time.monotonic() < deadline and len(_udp_flows(received)) < FLOWS:
        time.sleep(0.2)
    time.sleep(0.5)
    hooks = _udp_flows(received)
    assert len(hooks) == FLOWS
    for hook in hooks:
        report = verify_report(b64url_decode(hook["cose"]))
        assert report.observer_key == key_a and report.report_id == hook["id"]
    assert {h["flow"]["sport"] for h in hooks} == {41000 + i for i in range(FLOWS)}
    assert node_a.metric('overflowd_webhook_deliveries_total{outcome="dead"}') == 0
    assert receiver.stop(grace=STEP_TIMEOUT_S) == 0, receiver.output()[-2000:]
    for node in (node_b, node_a):
        assert node.process is not None
        assert node.process.stop(grace=STEP_TIMEOUT_S) == 0, node.process.output()[-2000:]

    listed = run("overflowd-query", "reports", "--json", "--home", str(node_b.home))
    assert listed.code == 0, listed.err
    rows = [r for r in map(json.loads, listed.out.splitlines()) if _ours(r)]
    assert len(rows) == FLOWS
    sports = set()
    for row in rows:
        report = verify_report(b64url_decode(row["cose"]))
        assert report.observer_key == key_a
        assert row["via"] == "udp"
        assert (row["flow"]["src"], row["flow"]["dst"]) == (B4, A4)
        assert row["sampling"]["format"] == "capture"
        assert row["observer"]["contacts"] == ["mailto:abuse@a.example"]
        sports.add(row["flow"]["sport"])
    assert sports == {41000 + i for i in range(FLOWS)}
