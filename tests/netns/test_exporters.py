"""Real exporters, real datagrams: overflowd decodes what softflowd and pmacct send exactly as
tshark does, and the flows we generated are all there.

One lab run (tests/netns/conftest.py) produces every exporter's datagrams from the same
traffic; each test here reads the capture. tshark is the independent decoder; overflowd's side
goes through the same path a capture file takes in production (overflowd.wire.pcap, then
overflowd.wire.dispatch.decode_datagram).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.support import exporters, netns
from tests.support.exporters import PORTS, Collection, Decoded, FlowSpec

pytestmark = pytest.mark.netns

EXPORTERS = list(PORTS)

FORMAT = {
    "softflowd-v5": "netflow-v5",
    "softflowd-v9": "netflow-v9",
    "softflowd-ipfix": "ipfix",
    "pmacct-v9": "netflow-v9",
    "pmacct-ipfix": "ipfix",
    "pmacct-sflow": "sflow-v5",
}


def carries(exporter: str, flow: FlowSpec) -> bool:
    """NetFlow v5 has no room for IPv6 addresses: softflowd leaves those flows out."""
    return not (exporter == "softflowd-v5" and flow.version == 6)


def totals(records: list[Decoded]) -> tuple[Counter[exporters.Key], Counter[exporters.Key]]:
    """Packets and bytes per 5-tuple (an exporter may split a flow over several records)."""
    packets: Counter[exporters.Key] = Counter()
    octets: Counter[exporters.Key] = Counter()
    for record in records:
        packets[record.key()] += record.packets
        octets[record.key()] += record.bytes
    return packets, octets


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_overflowd_decodes_what_tshark_decodes(exporter_run: Collection, exporter: str) -> None:
    port = PORTS[exporter]
    theirs = exporters.tshark_records(exporter_run.exports, port, exporters.DISSECTOR[exporter])
    assert theirs, f"{exporter} exported nothing tshark could decode\n{exporter_run.log}"
    records = exporters.overflowd_records(exporter_run.exports, port)
    ours = [exporters.reduce(record) for record in records]
    # Record for record: same multiset of (addresses, ports, proto, packets, bytes).
    missing = sorted((Counter(theirs) - Counter(ours)).elements())
    extra = sorted((Counter(ours) - Counter(theirs)).elements())
    assert not missing and not extra, (
        f"{exporter}: {len(ours)} records from overflowd, {len(theirs)} from tshark\n"
        f"only tshark: {missing}\nonly overflowd: {extra}"
    )
    assert {r.format for r in records} == {FORMAT[exporter]}
    assert {r.exporter for r in records} == {exporters.EXPORT_SRC}
    assert {r.sampling_interval for r in records} == {1}


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_generated_flows_are_present(exporter_run: Collection, exporter: str) -> None:
    records = exporters.overflowd_records(exporter_run.exports, PORTS[exporter])
    packets, octets = totals([exporters.reduce(r) for r in records])
    for flow in exporter_run.flows:
        if not carries(exporter, flow):
            continue
        key = flow.key()
        if flow.proto == "udp":
            # Exact: the client sent `count` datagrams and nothing answers UDP here.
            assert (packets[key], octets[key]) == (
                flow.count,
                flow.count * flow.ip_packet_bytes,
            ), f"{exporter}: {flow}"
        else:
            # TCP: ACK counts vary with timing; the handshake, the payload and the close
            # do not: at least SYN + data + FIN one way, SYN-ACK + FIN the other.
            reverse = (flow.dst, flow.src, flow.dport, flow.sport, 6)
            assert packets[key] >= 3, f"{exporter}: {flow}"
            assert octets[key] >= flow.count * flow.size, f"{exporter}: {flow}"
            assert packets[reverse] >= 2, f"{exporter}: reverse of {flow}"


def test_every_exporter_saw_the_same_udp_traffic(exporter_run: Collection) -> None:
    """Cross-check between exporters (and so between our four decoders)."""
    seen = {}
    for exporter in EXPORTERS:
        records = exporters.overflowd_records(exporter_run.exports, PORTS[exporter])
        packets, octets = totals([exporters.reduce(r) for r in records])
        seen[exporter] = {
            flow.key(): (packets[flow.key()], octets[flow.key()])
            for flow in exporter_run.flows
            if flow.proto == "udp" and flow.version == 4
        }
    assert all(v == seen["softflowd-v5"] for v in seen.values()), seen


def test_lab_leaves_nothing_behind(tmp_path: Path) -> None:
    """A failing test inside the lab still takes namespaces, veths and processes down."""
    before = set(netns.list_namespaces())
    sleeper: netns.Process | None = None
    names: list[str] = []
    devices: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), exporters.lab(tmp_path) as the_lab:
        names = [the_lab.client.name, the_lab.router.name, the_lab.collector.name]
        for link in (the_lab.client_link, the_lab.export_link):
            devices += [link.a_dev, link.b_dev]
        sleeper = the_lab.router.spawn(["sleep", "30"])
        # The lab works: the client reaches the router over IPv4 and IPv6 (TCP connects).
        exporters.generate_traffic(
            the_lab,
            [
                FlowSpec("tcp", exporters.CLIENT_V4, exporters.ROUTER_V4, 41100, 6100, 1, 10),
                FlowSpec("tcp", exporters.CLIENT_V6, exporters.ROUTER_V6, 41101, 6101, 1, 10),
            ],
        )
        assert the_lab.collector.run(["ip", "-6", "address"]).stdout.strip() == ""
        raise RuntimeError("boom")
    assert sleeper is not None
    assert sleeper.popen.poll() is not None, "process left running"
    assert sleeper.popen.returncode == -signal.SIGTERM
    after = set(netns.list_namespaces())
    assert not set(names) & after
    assert after <= before | {n for n in after if not netns.created_here(n)}
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    assert devices
    assert not [dev for dev in devices if dev in links.stdout]


def test_stale_namespaces_are_swept(tmp_path: Path) -> None:
    """A namespace whose creating process died is removed; a live one's is not touched."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{netns.PREFIX}-{dead.pid}-abcdef"
    live = f"{netns.PREFIX}-1-abcdef"  # pid 1 is alive
    for name in (stale, live):
        netns.run(["ip", "netns", "add", name])
    try:
        time.sleep(0.05)
        removed = netns.sweep_stale()
        assert stale in removed
        assert live not in removed
        assert live in netns.list_namespaces()
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
