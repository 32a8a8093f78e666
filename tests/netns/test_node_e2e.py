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
from tests.support.trace import trace_payloads

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

    def metric_text(self) -> str:
        url = re.search(r"metrics (http://\S+)", self.process.output() if self.process else "")
        assert url, "no metrics line"
        code = f"import httpx; print(httpx.get({url.group(1)!r}, timeout=5).text)"
        text = self.ns.run([sys.executable, "-c", code]).stdout
        return "\n".join(line for line in text.splitlines() if "inband" in line or "budget" in line)

    def settled_metric(self, name: str, quiet_s: float = 1.5) -> float:
        """The value once it has stopped changing for ``quiet_s`` (bounded by the step timeout)."""
        deadline = time.monotonic() + STEP_TIMEOUT_S
        value, since = self.metric(name), time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
            time.sleep(0.2)
            if (now := self.metric(name)) != value:
                value, since = now, time.monotonic()
        return value

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
[send]
to_flow_addresses = true
allowed_prefixes = ["192.0.2.0/24", "198.51.100.0/24"]
[inband]
listen = "{A4}:65535"
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
    listed_rows = [json.loads(line) for line in listed.out.splitlines()]
    rows = [r for r in listed_rows if _ours(r["report"])]
    assert len(rows) == FLOWS
    sports = set()
    for row in rows:
        report = verify_report(b64url_decode(row["report"]["cose"]))
        assert report.observer_key == key_a
        assert row["via"] == "udp"
        assert (row["report"]["flow"]["src"], row["report"]["flow"]["dst"]) == (B4, A4)
        assert row["report"]["sampling"]["format"] == "capture"
        assert row["report"]["observer"]["contacts"] == ["mailto:abuse@a.example"]
        sports.add(row["report"]["flow"]["sport"])
    assert sports == {41000 + i for i in range(FLOWS)}


def _rewrite_v5(payload: bytes, i: int) -> bytes:
    """The same NetFlow v5 datagram with every flow from 203.0.113.x to node B (TEST-NET)."""
    data = bytearray(payload)
    count = int.from_bytes(data[2:4], "big")
    for r in range(count):
        at = 24 + 48 * r
        data[at : at + 4] = bytes([203, 0, 113, 1 + (i + r) % 250])
        data[at + 4 : at + 8] = bytes([198, 51, 100, 1])
    return bytes(data)


def test_exported_trace_rewritten_to_test_net_reaches_the_destination_node(
    lab: tuple[Node, Node, netns.Link], tmp_path: Path
) -> None:
    """A router's NetFlow export (the shared trace, addresses rewritten to TEST-NET) reaches
    A's collector; B, the destination of every flow, hears of them in band. The sources
    (203.0.113.0/24) are outside A's confinement: nothing is sent there."""
    node_a, node_b, _ = lab
    # Only the exporter's flows this time: no live capture (which would also see the ICMP and
    # TCP answers to A's own sending, and report those), no webhooks.
    config = (node_a.home / "overflowd.toml").read_text()
    config = re.sub(r"(?ms)^\[capture\].*?(?=^\[)", "", config)
    config = re.sub(r"(?ms)^\[webhook\].*", "", config)
    (node_a.home / "overflowd.toml").write_text(config)
    assert "[capture]" not in config and "[webhook]" not in config and "[inband]" in config
    payloads = [_rewrite_v5(p, i) for i, p in enumerate(trace_payloads()[:40])]
    blob = tmp_path / "datagrams.bin"
    blob.write_bytes(b"".join(len(p).to_bytes(2, "big") + p for p in payloads))
    # Resolve B's link-layer address first: while ARP is pending the kernel keeps only a few
    # packets per neighbour, and in-band delivery is plain UDP (lossy by design, exact here).
    node_a.ns.run([sys.executable, "-c", "import socket, time; s = socket.socket(socket.AF_INET,"
                   f" socket.SOCK_DGRAM); s.sendto(b'', ({B4!r}, 9)); time.sleep(0.5)"])
    start(node_b)
    start(node_a)
    assert node_a.process is not None
    m = re.search(r"listening udp 127\.0\.0\.1:(\d+)", node_a.process.output())
    assert m, node_a.process.output()
    sender = (
        "import socket, sys\n"
        "data = open(sys.argv[1], 'rb').read()\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "i = 0\n"
        "while i < len(data):\n"
        "    n = int.from_bytes(data[i:i+2], 'big')\n"
        "    s.sendto(data[i+2:i+2+n], ('127.0.0.1', int(sys.argv[2])))\n"
        "    i += 2 + n\n"
    )
    node_a.ns.run([sys.executable, "-c", sender, str(blob), m.group(1)], timeout=STEP_TIMEOUT_S)
    records = sum(int.from_bytes(p[2:4], "big") for p in payloads)
    assert node_a.wait_metric("overflowd_decoder_records_total", records) == records
    sent = node_a.settled_metric("overflowd_inband_sent_total")
    node_b.wait_metric("overflowd_inband_stored_total", sent)
    stored = node_b.settled_metric("overflowd_inband_stored_total")
    sent = node_a.metric("overflowd_inband_sent_total")
    # Every datagram A sent went to B (the only allowed destination among the flows' ends),
    # as many as the budget allowed: its per-prefix burst plus its rate over the run.
    assert 1 <= sent == stored, node_b.metric_text() + node_a.metric_text()
    assert node_b.metric("overflowd_inband_refused_total") == 0
    for node in (node_b, node_a):
        assert node.process is not None
        assert node.process.stop(grace=STEP_TIMEOUT_S) == 0, node.process.output()[-2000:]
    listed = run("overflowd-query", "reports", "--json", "--home", str(node_b.home))
    rows = [json.loads(line)["report"] for line in listed.out.splitlines()]
    from_trace = [r for r in rows if r["sampling"]["format"] == "netflow-v5"]
    assert from_trace and all(r["flow"]["dst"] == B4 for r in from_trace)
    assert all(r["flow"]["src"].startswith("203.0.113.") for r in from_trace)
