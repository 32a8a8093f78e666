"""Five nodes in network namespaces: a victim whose link drops in-band reports hears of every
report about its prefix through peers, verified, stored once, with each observer's own trust.

    src ──(NetFlow v5)──> rx ──┐                  ┌── victim 198.51.100.1/24
    src ──(NetFlow v5)──> ry ──┴── hub (router) ──┘   (nftables drops UDP 65535 in)

``src`` plays the routers' exporters: it sends NetFlow v5 datagrams (UDP flows built here,
TEST-NET addresses only) to the collectors of ``rx`` and ``ry``. Those are real daemons
(``overflowd run``, sampling rate 1: every flow a report) that send in band to the flow ends in
198.51.100.0/24 (routed through ``hub``) and push everything they store to ``hub``'s inbox.
``hub`` routes between them and pushes what it holds to ``victim``; ``victim`` also pulls from
``hub`` every second, so each report reaches it on two paths and must still be stored once.
The victim's link drops every inbound UDP datagram to port 65535 (an nftables rule
that counts them): whatever it knows, it knows from its peer.

Trust: the victim pins ``rx``'s key and not ``ry``'s; ``hub`` is a pinned peer. A peer carries,
it does not vouch: ``rx``'s reports are ``pinned`` at the victim, ``ry``'s ``unknown``.

Spoofing: ``rx`` sees a flow whose source is 198.51.100.7, an address of the victim's network;
the victim gets the report saying so, ``src`` = its address, observer ``rx``.
"""

from __future__ import annotations

import base64
import ipaddress
import re
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from overflowd.identity import load_identity, verify_report
from overflowd.peers import peer_channel
from overflowd.store import Store
from overflowd.store.repository import Arrival, StoredReport
from tests.support import netns
from tests.support.cli import BIN, run

pytestmark = pytest.mark.netns

VICTIM_NET = ipaddress.ip_network("198.51.100.0/24")
VICTIM, HUB_V = "198.51.100.1", "198.51.100.254"  # the victim's network, hub's leg on it
RX, HUB_X = "192.0.2.1", "192.0.2.2"  # rx – hub /30
RY, HUB_Y = "192.0.2.5", "192.0.2.6"  # ry – hub /30
SRC_X, RX_C = "192.0.2.9", "192.0.2.10"  # src – rx /30 (the exporter's side)
SRC_Y, RY_C = "192.0.2.13", "192.0.2.14"  # src – ry /30
VICTIM_HOST = "198.51.100.2"  # another host of the victim's network
SPOOFED = "198.51.100.7"  # a victim address used as a source, seen at rx
API_PORT, COLLECTOR_PORT = 9591, 2055
STEP_TIMEOUT_S = 30.0
#: A daemon starts in about a second on an idle machine; under a load of 15 on two cores,
#: importing and opening its store was seen to take 20 s.
START_TIMEOUT_S = 90.0
POLL_S = 0.1

#: Flows each router's exporter reports (src, dst, sport): towards the victim, the spoofed
#: one at rx, and one per router that is nobody's business at the victim.
FLOWS = {
    "rx": [*((f"203.0.113.{i}", VICTIM, 40000 + i) for i in range(1, 5)),
           (SPOOFED, "203.0.113.9", 40009),
           ("203.0.113.5", "192.0.2.200", 40005)],
    "ry": [*((f"203.0.113.{i}", VICTIM_HOST, 41000 + i) for i in range(11, 15)),
           ("203.0.113.15", "192.0.2.201", 41015)],
}

#: The victim's namespace drops every in-band overflowd datagram (UDP to port 65535) it is
#: sent, and counts them.
DROP_INBAND = (
    "add table inet ovft; add counter inet ovft inband; "
    "add chain inet ovft input { type filter hook input priority 0; policy accept; }; "
    "add rule inet ovft input udp dport 65535 counter name inband drop"
)

#: Run inside src: send one NetFlow v5 datagram (hex) to a collector.
SEND = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(bytes.fromhex(sys.argv[1]), (sys.argv[2], int(sys.argv[3])))
"""


def v5_datagram(flows: list[tuple[str, str, int]]) -> bytes:
    """One NetFlow v5 export of UDP flows (10 packets each, dport 53), dated now."""
    now = int(time.time())
    header = struct.pack(">HHIIIIBBH", 5, len(flows), 100_000, now, 0, 0, 0, 0, 0)
    records = b"".join(
        struct.pack(
            ">IIIHHIIIIHHBBBBHHBBH",
            int(ipaddress.IPv4Address(src)), int(ipaddress.IPv4Address(dst)),
            0, 0, 0, 10, 1000, 99_000, 99_500, sport, 53, 0, 0, 17, 0, 0, 0, 0, 0, 0,
        )
        for src, dst, sport in flows
    )
    return header + records


@dataclass
class Node:
    name: str
    ns: netns.Namespace | None
    home: Path
    db: str
    process: netns.Process | None = None

    @property
    def key(self) -> bytes:
        return load_identity(self.home).public_key

    def spawn(self) -> None:
        assert self.ns is not None
        self.process = self.ns.spawn(
            [str(BIN / "overflowd"), "run", "--home", str(self.home)], label=self.name
        )

    def wait_started(self) -> None:
        assert self.process is not None
        self.process.wait_for_output(r"api http://\S+", START_TIMEOUT_S)

    def wait_stopped(self) -> None:
        """After TERM: a clean exit within the step timeout (the namespace KILLs it after)."""
        assert self.process is not None
        code = self.process.wait(STEP_TIMEOUT_S)  # not stop(): a second TERM ends it at once
        assert code == 0, self.process.output()[-3000:]

    def arrivals(self, ids: set[str]) -> dict[str, list[Arrival]]:
        with Store.open(self.db) as store:
            got = store.arrivals(sorted(ids))
        return {i: got.get(i, []) for i in ids}

    def reports(self) -> dict[str, StoredReport]:
        with Store.open(self.db) as store:
            page, _ = store.reports_after(0, 1000)
        return {r.report_id: r for r in page}


def _about_victim(r: StoredReport) -> bool:
    return ipaddress.ip_address(r.src) in VICTIM_NET or ipaddress.ip_address(r.dst) in VICTIM_NET


def _peer(name: str, url: str, key: bytes, *, push: bool, pull: bool) -> str:
    return (f'[[peers]]\nname = "{name}"\nurl = "{url}"\n'
            f'key = "{base64.b64encode(key).decode()}"\ntrust = "pinned"\n'
            f"push = {str(push).lower()}\npull = {str(pull).lower()}\npull_interval_s = 1.0\n")


def _wait(what: str, check: Callable[[], bool], timeout: float = STEP_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(POLL_S)


def _dropped(ns: netns.Namespace) -> int:
    """Packets the victim's nftables rule dropped (its counter)."""
    out = ns.run(["nft", "list", "counter", "inet", "ovft", "inband"]).stdout
    m = re.search(r"packets (\d+)", out)
    assert m, out
    return int(m.group(1))


def test_victim_hears_of_its_prefix_through_peers_only(tmp_path: Path) -> None:
    try:
        netns.require("ip", "ethtool", "sysctl", "nft")
        netns.run(["ip", "netns", "list"])
    except (netns.NetnsUnavailable, RuntimeError, OSError) as exc:
        pytest.skip(f"peer topology netns test cannot run: {exc}")
    netns.sweep_stale()
    nodes: dict[str, Node] = {}
    for name in ("rx", "ry", "hub", "victim"):
        home = tmp_path / name
        assert run("overflowd", "init", "--home", str(home)).code == 0
        nodes[name] = Node(name, None, home, f"sqlite:///{home / 'store.sqlite'}")
    rx, ry, hub, victim = nodes["rx"], nodes["ry"], nodes["hub"], nodes["victim"]
    common = '[metrics]\nlisten = ""\n[registry]\nnameservers = ["127.0.0.1:53"]\ntimeout_s = 0.5\n'
    for router, addr, collector, exporter in ((rx, RX, RX_C, SRC_X), (ry, RY, RY_C, SRC_Y)):
        hub_addr = HUB_X if router is rx else HUB_Y
        (router.home / "overflowd.toml").write_text(
            f'[node]\nobservation_point = "{router.name}"\n'
            f'[store]\nurl = "{router.db}"\n{common}'
            f"[sampling]\nrate = 1.0\n"
            f'[collector]\nlisten = ["{collector}:{COLLECTOR_PORT}"]\n'
            f'allowed_exporters = ["{exporter}"]\n'
            f'[api]\nlisten = "{addr}:{API_PORT}"\n'
            f'[send]\nto_flow_addresses = true\nallowed_prefixes = ["{VICTIM_NET}"]\n'
            f'[inband]\nlisten = "{addr}:65535"\n'
            f"[budget]\nper_prefix_burst = 100\n"
            + _peer("hub", f"http://{hub_addr}:{API_PORT}/", hub.key, push=True, pull=False)
        )
    (hub.home / "overflowd.toml").write_text(
        f'[node]\nobservation_point = "hub"\n[store]\nurl = "{hub.db}"\n{common}'
        '[collector]\nlisten = ["127.0.0.1:0"]\n'
        f'[api]\nlisten = "0.0.0.0:{API_PORT}"\n'
        f'[peering]\napi_url = "http://{HUB_V}:{API_PORT}/"\n'
        "[inband]\nenabled = false\n"
        + _peer("rx", f"http://{RX}:{API_PORT}/", rx.key, push=False, pull=False)
        + _peer("ry", f"http://{RY}:{API_PORT}/", ry.key, push=False, pull=False)
        + _peer("victim", f"http://{VICTIM}:{API_PORT}/", victim.key, push=True, pull=False)
    )
    (victim.home / "overflowd.toml").write_text(
        f'[node]\nobservation_point = "victim"\n[store]\nurl = "{victim.db}"\n'
        '[metrics]\nlisten = ""\n'
        f'[registry]\nnameservers = ["127.0.0.1:53"]\ntimeout_s = 0.5\n'
        f'pinned = ["rx={base64.b64encode(rx.key).decode()}"]\n'
        '[collector]\nlisten = ["127.0.0.1:0"]\n'
        f'[api]\nlisten = "{VICTIM}:{API_PORT}"\n'
        f'[inband]\nlisten = "{VICTIM}:65535"\n'
        + _peer("hub", f"http://{HUB_V}:{API_PORT}/", hub.key, push=False, pull=True)
    )
    for node in nodes.values():  # the schema before the daemons start
        Store.open(node.db).close()

    with (
        netns.namespace(tmp_path) as ns_src,
        netns.namespace(tmp_path) as ns_rx,
        netns.namespace(tmp_path) as ns_ry,
        netns.namespace(tmp_path) as ns_hub,
        netns.namespace(tmp_path) as ns_victim,
    ):
        rx.ns, ry.ns, hub.ns, victim.ns = ns_rx, ns_ry, ns_hub, ns_victim
        netns.veth(ns_src, ns_rx, [f"{SRC_X}/30"], [f"{RX_C}/30"])
        netns.veth(ns_src, ns_ry, [f"{SRC_Y}/30"], [f"{RY_C}/30"])
        netns.veth(ns_rx, ns_hub, [f"{RX}/30"], [f"{HUB_X}/30"])
        netns.veth(ns_ry, ns_hub, [f"{RY}/30"], [f"{HUB_Y}/30"])
        # The victim's network: its node's address, a host that flows go to, and one spoofed.
        netns.veth(ns_hub, ns_victim, [f"{HUB_V}/24"],
                   [f"{VICTIM}/24", f"{VICTIM_HOST}/24", f"{SPOOFED}/24"])
        ns_hub.sysctl("net.ipv4.ip_forward", 1)
        for ns, via in ((ns_rx, HUB_X), (ns_ry, HUB_Y)):
            ns.run(["ip", "route", "add", str(VICTIM_NET), "via", via])
        ns_victim.run(["ip", "route", "add", "192.0.2.0/24", "via", HUB_V])
        # The victim's link drops in-band overflowd datagrams (UDP to port 65535), counted.
        ns_victim.run(["nft", DROP_INBAND])

        for node in (victim, hub, rx, ry):  # all at once: each takes seconds to import
            node.spawn()
        for node in (victim, hub, rx, ry):
            node.wait_started()
        for router, collector in ((rx, RX_C), (ry, RY_C)):
            datagram = v5_datagram(FLOWS[router.name])
            ns_src.run([sys.executable, "-c", SEND, datagram.hex(), collector,
                        str(COLLECTOR_PORT)])

        # Each router made one report per flow; every one about the victim's prefix reaches it.
        _wait("the routers' reports",
              lambda: len(rx.reports()) == len(FLOWS["rx"])
              and len(ry.reports()) == len(FLOWS["ry"]))
        made = {**rx.reports(), **ry.reports()}
        expected = {i for i, r in made.items() if _about_victim(r)}
        assert len(expected) == 4 + 1 + 4
        _wait("the victim's reports", lambda: expected <= set(victim.reports()))
        # Push and pull both bring each one (two arrivals through the hub), stored once.
        _wait("push and pull arrivals", lambda: all(
            sum(a.count for a in arr) >= 2 for arr in victim.arrivals(expected).values()))
        # In band, the routers told the victim's addresses: one datagram per flow end there.
        _wait("the in-band datagrams", lambda: _dropped(ns_victim) >= len(expected))
        time.sleep(1.0)  # nothing more comes (bounded: the budget's dedup, one per flow)
        dropped = _dropped(ns_victim)
        for node in (ry, rx, hub, victim):  # TERM to all, then wait for each
            assert node.process is not None
            node.process.send_signal(signal.SIGTERM)
        for node in (ry, rx, hub, victim):
            node.wait_stopped()

    # Its link dropped every in-band datagram (nothing stored via udp, below).
    assert dropped == len(expected), dropped
    at_victim = victim.reports()
    with Store.open(victim.db) as store:
        arrivals = store.arrivals(sorted(at_victim))
        assert store.count_reports() == len(at_victim)
    about = {i for i, r in at_victim.items() if _about_victim(r)}
    assert about == expected  # every report about its prefix, and no other about it
    # ... and nothing that was not a router's (the hub made none of its own).
    assert set(at_victim) <= set(made)
    hub_channel = peer_channel(hub.key)
    for report_id in expected:
        stored = at_victim[report_id]
        verified = verify_report(stored.cose)  # again, independently of the daemon
        assert verified.report_id == report_id
        observer = rx if verified.observer_key == rx.key else ry
        assert verified.observer_key == observer.key
        assert report_id in (rx.reports() if observer is rx else ry.reports())
        assert stored.via == "gossip"
        # Pushed over two hops (router, hub) and pulled from the hub, whose lean page says
        # the one hop it had made there: two either way (pulls used to count one).
        assert stored.hops == 2
        assert stored.trust == ("pinned" if observer is rx else "unknown"), stored
        channels = {a.channel: a.count for a in arrivals[report_id]}
        assert set(channels) == {hub_channel}, channels  # never in band
        assert channels[hub_channel] >= 2  # pushed and pulled
        assert verified.payload.observer.point == observer.name

    spoofed = [r for r in at_victim.values() if str(r.src) == SPOOFED]
    assert len(spoofed) == 1
    assert spoofed[0].observer_key == rx.key and str(spoofed[0].dst) == "203.0.113.9"
