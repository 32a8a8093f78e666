"""Real flow exporters (softflowd, pmacctd) run on generated traffic in network namespaces.

The lab, three namespaces joined by veths, nothing routed anywhere else::

    client ──────────────── router ──────────────── collector
    192.0.2.1/24            192.0.2.2/24            198.51.100.2/24
    2001:db8:a::1/64        2001:db8:a::2/64
                            198.51.100.1/24

The client sends a fixed, bounded set of UDP and TCP flows (IPv4 and IPv6) to servers in the
router namespace. In the router:

- ``tcpdump`` writes the traffic to a pcap, which ``softflowd -r`` then exports as NetFlow v5,
  v9 and IPFIX (softflowd on a live, quiet veth never sees packets: Debian's libpcap only
  wakes it when a 256 KiB ring block fills; see NETLAB.md);
- ``pmacctd`` captures the same traffic live and exports it with nfprobe (v9 and IPFIX) and
  sfprobe (sFlow v5, one sample per packet), flushed by short ``nfprobe_timeouts`` and a
  SIGINT a few seconds after the traffic.

In the collector namespace ``tcpdump`` writes every exported datagram to one pcap; each
exporter has its own UDP port (`PORTS`). That pcap is what the tests decode twice: with
overflowd and with tshark.

Every wait here is bounded; every process is stopped by PID (see `tests.support.netns`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from overflowd.flows import FlowRecord
from tests.support import netns

CLIENT_V4, ROUTER_V4 = "192.0.2.1", "192.0.2.2"
CLIENT_V6, ROUTER_V6 = "2001:db8:a::1", "2001:db8:a::2"
EXPORT_SRC, COLLECTOR = "198.51.100.1", "198.51.100.2"

#: One collector port per exporter and format, so one capture holds them all, told apart.
PORTS: Mapping[str, int] = {
    "softflowd-v5": 9995,
    "softflowd-v9": 9996,
    "softflowd-ipfix": 9997,
    "pmacct-v9": 9998,
    "pmacct-ipfix": 9999,
    "pmacct-sflow": 6343,
}
#: tshark's dissector for each exporter's datagrams.
DISSECTOR: Mapping[str, str] = {
    name: ("sflow" if name.endswith("sflow") else "cflow") for name in PORTS
}

TOOLS = ("ip", "ethtool", "sysctl", "tcpdump", "tshark", "softflowd", "pmacctd")

#: Bounds on every wait (seconds).
READY_TIMEOUT_S = 10.0
TRAFFIC_TIMEOUT_S = 20.0
EXPORT_TIMEOUT_S = 15.0
#: pmacct exports about 3 s after the traffic with these timeouts; SIGINT after that.
PMACCT_FLUSH_S = 4.0
PMACCT_TIMEOUTS = "tcp=1:tcp.rst=1:tcp.fin=1:udp=1:icmp=1:general=1:maxlife=2:expint=1"


@dataclass(frozen=True)
class FlowSpec:
    """One generated flow: UDP sends ``count`` datagrams of ``size`` bytes of payload; TCP
    opens one connection and sends ``count * size`` bytes, then closes."""

    proto: str  # "udp" or "tcp"
    src: str
    dst: str
    sport: int
    dport: int
    count: int
    size: int

    @property
    def proto_number(self) -> int:
        return 6 if self.proto == "tcp" else 17

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.src).version

    @property
    def ip_packet_bytes(self) -> int:
        """For UDP: bytes of one IP packet of this flow (IP + UDP headers + payload)."""
        return (20 if self.version == 4 else 40) + 8 + self.size

    def key(self) -> tuple[str, str, int, int, int]:
        return (self.src, self.dst, self.sport, self.dport, self.proto_number)


def default_flows() -> list[FlowSpec]:
    """A bounded mix: 18 UDP and 4 TCP flows, IPv4 and IPv6, one from DNS's port."""
    flows = [
        FlowSpec("udp", CLIENT_V4, ROUTER_V4, 40001, 5001, 10, 100),
        FlowSpec("udp", CLIENT_V4, ROUTER_V4, 40002, 5002, 3, 1000),
        FlowSpec("udp", CLIENT_V4, ROUTER_V4, 53, 40053, 4, 512),
        FlowSpec("tcp", CLIENT_V4, ROUTER_V4, 41001, 6001, 5, 1000),
        FlowSpec("tcp", CLIENT_V4, ROUTER_V4, 41002, 6002, 1, 200),
        FlowSpec("udp", CLIENT_V6, ROUTER_V6, 40003, 5003, 7, 200),
        FlowSpec("udp", CLIENT_V6, ROUTER_V6, 40004, 5004, 2, 1200),
        FlowSpec("tcp", CLIENT_V6, ROUTER_V6, 41003, 6003, 3, 1000),
        FlowSpec("tcp", CLIENT_V6, ROUTER_V6, 41004, 6004, 1, 300),
    ]
    # Enough small flows that every export datagram carries several records.
    flows += [
        FlowSpec("udp", CLIENT_V4, ROUTER_V4, 42000 + i, 7000 + i, 1 + i % 5, 50 + 10 * i)
        for i in range(13)
    ]
    return flows


# The traffic script runs inside the namespaces with this same interpreter; it only uses the
# standard library. Bounded: the server exits after its deadline, the client after its
# flows (each socket with a timeout).
TRAFFIC_SCRIPT = r"""
import json, socket, sys, time, select

role, spec_json, deadline_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
flows = json.loads(spec_json)
deadline = time.monotonic() + deadline_s

def family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET

if role == "server":
    socks = {}
    for f in flows:
        if f["proto"] == "udp":
            s = socket.socket(family(f["dst"]), socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind((f["dst"], f["dport"]))
        else:
            s = socket.socket(family(f["dst"]), socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((f["dst"], f["dport"]))
            s.listen(4)
        s.setblocking(False)
        socks[s] = f["proto"]
    print("ready", flush=True)
    conns = {}
    received = 0
    while time.monotonic() < deadline:
        ready, _, _ = select.select(list(socks) + list(conns), [], [], 0.1)
        for s in ready:
            if s in conns:
                data = s.recv(65536)
                received += len(data)
                if not data:
                    s.close()
                    del conns[s]
            elif socks[s] == "udp":
                while True:
                    try:
                        received += len(s.recv(65536))
                    except BlockingIOError:
                        break
            else:
                c, _ = s.accept()
                c.setblocking(False)
                conns[c] = True
    print("received", received, flush=True)
else:
    for f in flows:
        fam = family(f["src"])
        if f["proto"] == "udp":
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind((f["src"], f["sport"]))
            for _ in range(f["count"]):
                s.sendto(b"u" * f["size"], (f["dst"], f["dport"]))
                time.sleep(0.002)
            s.close()
        else:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.bind((f["src"], f["sport"]))
            s.connect((f["dst"], f["dport"]))
            for _ in range(f["count"]):
                s.sendall(b"t" * f["size"])
                time.sleep(0.002)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):  # wait for the server's FIN: a complete connection
                pass
            s.close()
        if time.monotonic() > deadline:
            sys.exit("client: out of time")
    print("sent", len(flows), flush=True)
"""


@dataclass
class Lab:
    client: netns.Namespace
    router: netns.Namespace
    collector: netns.Namespace
    client_link: netns.Link  # a_dev in client, b_dev in router
    export_link: netns.Link  # a_dev in router, b_dev in collector
    workdir: Path

    @property
    def traffic_dev(self) -> str:
        """The router's end of the client link: where the exporters look."""
        return self.client_link.b_dev


@contextlib.contextmanager
def lab(workdir: Path) -> Iterator[Lab]:
    """The three namespaces, linked and addressed; all of it gone afterwards."""
    netns.require(*TOOLS)
    with (
        netns.namespace(workdir, ipv6=True) as client,
        netns.namespace(workdir, ipv6=True) as router,
        netns.namespace(workdir, ipv6=False) as collector,
    ):
        client_link = netns.veth(
            client,
            router,
            [f"{CLIENT_V4}/24", f"{CLIENT_V6}/64"],
            [f"{ROUTER_V4}/24", f"{ROUTER_V6}/64"],
        )
        export_link = netns.veth(router, collector, [f"{EXPORT_SRC}/24"], [f"{COLLECTOR}/24"])
        yield Lab(client, router, collector, client_link, export_link, workdir)


def start_capture(
    ns: netns.Namespace, dev: str, path: Path, bpf: Sequence[str] = ()
) -> netns.Process:
    """tcpdump on ``dev`` to ``path``, returned once it is capturing."""
    proc = ns.spawn(
        [
            "tcpdump",
            "-Z",
            "root",
            "-i",
            dev,
            "-n",
            "-s",
            "0",
            "-U",
            "--immediate-mode",
            "-w",
            str(path),
            *bpf,
        ],
        label=f"tcpdump-{path.stem}",
    )
    proc.wait_for_output(r"listening on", READY_TIMEOUT_S)
    return proc


def stop_capture(proc: netns.Process) -> None:
    """Stop tcpdump; on TERM it flushes its file and reports its counts before exiting."""
    status = proc.stop(signal.SIGTERM)
    if status != 0 or "packets captured" not in proc.output():
        raise RuntimeError(f"tcpdump did not finish cleanly ({status}): {proc.output()}")


def generate_traffic(the_lab: Lab, flows: Sequence[FlowSpec]) -> None:
    """Run the flows client → router, servers first; bounded by `TRAFFIC_TIMEOUT_S`."""
    spec = json.dumps([dataclasses.asdict(flow) for flow in flows])
    script = the_lab.workdir / "traffic.py"
    script.write_text(TRAFFIC_SCRIPT)
    server = the_lab.router.spawn(
        [sys.executable, str(script), "server", spec, str(TRAFFIC_TIMEOUT_S)], label="server"
    )
    server.wait_for_output(r"ready", READY_TIMEOUT_S)
    done = the_lab.client.run(
        [sys.executable, str(script), "client", spec, str(TRAFFIC_TIMEOUT_S)],
        timeout=TRAFFIC_TIMEOUT_S + 5,
        check=True,
    )
    assert "sent" in done.stdout, done.stdout + done.stderr
    server.stop()


def softflowd_export(
    the_lab: Lab, traffic: Path, version: int, port: int
) -> subprocess.CompletedProcess[str]:
    """``softflowd -r traffic -v version`` in the router, exporting to the collector."""
    name = f"softflowd-v{version}"
    argv = [
        "softflowd",
        "-d",  # foreground
        "-r",
        str(traffic),
        "-v",
        str(version),
        "-n",
        f"{COLLECTOR}:{port}",
        "-6",  # IPv6 flows too, where the format carries them
        "-p",
        str(the_lab.workdir / f"{name}.pid"),
    ]
    # No -c with -r: softflowd then waits forever on its control socket (NETLAB.md).
    return the_lab.router.run(argv, timeout=EXPORT_TIMEOUT_S)


def pmacctd_config(the_lab: Lab) -> Path:
    path = the_lab.workdir / "pmacctd.conf"
    timeouts = PMACCT_TIMEOUTS
    path.write_text(
        "\n".join(
            [
                "daemonize: false",
                f"pcap_interface: {the_lab.traffic_dev}",
                f"pidfile: {the_lab.workdir / 'pmacctd.pid'}",
                "plugins: nfprobe[v9], nfprobe[ipfix], sfprobe[sf]",
                "aggregate[v9]: src_host, dst_host, src_port, dst_port, proto, tos, tcpflags",
                "aggregate[ipfix]: src_host, dst_host, src_port, dst_port, proto, tos, tcpflags",
                f"nfprobe_receiver[v9]: {COLLECTOR}:{PORTS['pmacct-v9']}",
                "nfprobe_version[v9]: 9",
                f"nfprobe_timeouts[v9]: {timeouts}",
                f"nfprobe_source_ip[v9]: {EXPORT_SRC}",
                f"nfprobe_receiver[ipfix]: {COLLECTOR}:{PORTS['pmacct-ipfix']}",
                "nfprobe_version[ipfix]: 10",
                f"nfprobe_timeouts[ipfix]: {timeouts}",
                f"nfprobe_source_ip[ipfix]: {EXPORT_SRC}",
                f"sfprobe_receiver[sf]: {COLLECTOR}:{PORTS['pmacct-sflow']}",
                f"sfprobe_agentip[sf]: {EXPORT_SRC}",
                f"sfprobe_source_ip[sf]: {EXPORT_SRC}",
                "sampling_rate[sf]: 1",
                "",
            ]
        )
    )
    return path


@dataclass(frozen=True)
class Collection:
    """What one lab run produced: the exported datagrams and the traffic behind them."""

    exports: Path  # every exporter's datagrams, told apart by `PORTS`
    traffic: Path  # the generated traffic as the router saw it
    flows: tuple[FlowSpec, ...]
    log: str  # exporters' output, for failure messages


def collect(workdir: Path, flows: Sequence[FlowSpec] | None = None) -> Collection:
    """Build the lab, run the traffic and every exporter, and return the captures."""
    flows = tuple(flows if flows is not None else default_flows())
    exports = workdir / "exports.pcap"
    traffic = workdir / "traffic.pcap"
    log: list[str] = []
    with lab(workdir) as the_lab:
        exports_cap = start_capture(the_lab.collector, the_lab.export_link.b_dev, exports, ["udp"])
        traffic_cap = start_capture(the_lab.router, the_lab.traffic_dev, traffic)
        pmacctd = the_lab.router.spawn(["pmacctd", "-f", str(pmacctd_config(the_lab))])
        # Ready when the core has opened the interface and each plugin has its receiver
        # (packets captured before a plugin is up wait in the core's pipe to it).
        pmacctd.wait_for_output(r"link type is", READY_TIMEOUT_S)
        for name in ("pmacct-v9", "pmacct-ipfix", "pmacct-sflow"):
            pmacctd.wait_for_output(
                rf"Exporting flows to \[{COLLECTOR}\]:{PORTS[name]}", READY_TIMEOUT_S
            )
        time.sleep(0.2)
        generate_traffic(the_lab, flows)
        traffic_done = time.monotonic()
        time.sleep(0.3)  # let the last FIN/ACK reach the capture
        stop_capture(traffic_cap)
        for version in (5, 9, 10):
            name = {5: "softflowd-v5", 9: "softflowd-v9", 10: "softflowd-ipfix"}[version]
            done = softflowd_export(the_lab, traffic, version, PORTS[name])
            log.append(f"--- {name}\n{done.stdout}{done.stderr}")
        # pmacct flushes on SIGINT only after its timeouts ran (NETLAB.md).
        time.sleep(max(0.0, PMACCT_FLUSH_S - (time.monotonic() - traffic_done)))
        pmacctd.send_signal(signal.SIGINT)
        try:
            pmacctd.wait(EXPORT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pmacctd.stop()
        log.append(f"--- pmacctd\n{pmacctd.output()}")
        time.sleep(0.3)
        stop_capture(exports_cap)
        log.append(f"--- tcpdump\n{exports_cap.output()}{traffic_cap.output()}")
    return Collection(exports=exports, traffic=traffic, flows=flows, log="\n".join(log))


# -- decoding the captures -----------------------------------------------------------------

#: The fields compared between decoders.
Key = tuple[str, str, int, int, int]


@dataclass(frozen=True, order=True)
class Decoded:
    """One flow record reduced to what both decoders must agree on."""

    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    packets: int
    bytes: int

    def key(self) -> Key:
        return (self.src, self.dst, self.sport, self.dport, self.proto)


def tshark_json(pcap: Path, port: int, dissector: str) -> list[dict[str, Any]]:
    """tshark's decoding of the datagrams to ``port`` (``-T json``), one dict per frame."""
    done = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-n",
            "-d",
            f"udp.port=={port},{dissector}",
            "-Y",
            f"udp.dstport=={port}",
            "-T",
            "json",
            "--no-duplicate-keys",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"tshark failed ({done.returncode}): {done.stderr.strip()}")
    frames: list[dict[str, Any]] = json.loads(done.stdout or "[]")
    return frames


def _walk(node: Any, context: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Every dict in a tshark JSON tree, with the nearest enclosing values seen on the way."""
    if isinstance(node, dict):
        inner = {**context, **{k: v for k, v in node.items() if isinstance(v, str)}}
        yield node, inner
        for value in node.values():
            yield from _walk(value, inner)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value, context)


def _one(value: Any) -> str:
    """A tshark JSON value that may be a list when a field repeats: its first occurrence."""
    return str(value[0] if isinstance(value, list) else value)


def _icmp_port(record: Mapping[str, Any], prefix: str) -> int | None:
    """ICMP type and code as NetFlow carries them in the destination port: type × 256 + code."""
    for kind in ("icmp_type", "icmp_ipv6_type"):
        if f"{prefix}{kind}" in record:
            code = record.get(f"{prefix}{kind.replace('type', 'code')}", "0")
            return int(_one(record[f"{prefix}{kind}"])) * 256 + int(_one(code))
    return None


def _cflow_record(rec: Mapping[str, Any]) -> Decoded:
    src = rec.get("cflow.srcaddr") or rec.get("cflow.srcaddrv6") or rec.get("cflow.srcaddr_v6")
    dst = rec.get("cflow.dstaddr") or rec.get("cflow.dstaddrv6") or rec.get("cflow.dstaddr_v6")
    packets = rec.get("cflow.packets", rec.get("cflow.packets64"))
    octets = rec.get("cflow.octets", rec.get("cflow.octets64"))
    proto = int(_one(rec["cflow.protocol"]))
    sport = int(_one(rec.get("cflow.srcport", "0")))
    dport = int(_one(rec.get("cflow.dstport", "0")))
    if proto in (1, 58) and "cflow.dstport" not in rec:
        dport = _icmp_port(rec, "cflow.") or 0
    return Decoded(
        src=str(ipaddress.ip_address(_one(src))),
        dst=str(ipaddress.ip_address(_one(dst))),
        sport=sport,
        dport=dport,
        proto=proto,
        packets=int(_one(packets)),
        bytes=int(_one(octets)),
    )


_L4 = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}


def _sflow_record(header_tree: Mapping[str, Any], rate: int) -> Decoded | None:
    """A sampled packet header as one flow record of ``rate`` packets (sFlow's weighting)."""
    if "ip" in header_tree:
        ip = header_tree["ip"]
        src, dst = _one(ip["ip.src"]), _one(ip["ip.dst"])
        length = int(_one(ip["ip.len"]))
        proto = int(_one(ip["ip.proto"]))
    elif "ipv6" in header_tree:
        ip = header_tree["ipv6"]
        src, dst = _one(ip["ipv6.src"]), _one(ip["ipv6.dst"])
        length = 40 + int(_one(ip["ipv6.plen"]))
        proto = int(_one(ip["ipv6.nxt"]))
    else:
        return None  # not IP (ARP...): no flow record
    sport = dport = 0
    for layer, number in _L4.items():
        if layer in header_tree:
            proto = number  # past any IPv6 extension headers
            fields = header_tree[layer]
            if layer in ("tcp", "udp"):
                sport = int(_one(fields[f"{layer}.srcport"]))
                dport = int(_one(fields[f"{layer}.dstport"]))
            else:
                dport = int(_one(fields[f"{layer}.type"])) * 256 + int(
                    _one(fields[f"{layer}.code"])
                )
    return Decoded(
        src=str(ipaddress.ip_address(src)),
        dst=str(ipaddress.ip_address(dst)),
        sport=sport,
        dport=dport,
        proto=proto,
        packets=rate,
        bytes=length * rate,
    )


def tshark_records(pcap: Path, port: int, dissector: str) -> list[Decoded]:
    """Every flow record tshark decodes from the datagrams to ``port``, in capture order."""
    out: list[Decoded] = []
    for frame in tshark_json(pcap, port, dissector):
        layers = frame["_source"]["layers"]
        if dissector not in layers:
            raise AssertionError(f"tshark did not decode frame {layers['frame']} as {dissector}")
        for node, context in _walk(layers[dissector], {}):
            if dissector == "cflow" and any(k.startswith("cflow.srcaddr") for k in node):
                out.append(_cflow_record(node))
            elif dissector == "sflow" and "sflow_245.header_tree" in node:
                rate = context.get("sflow.flow_sample.sampling_rate") or context.get(
                    "sflow_245.flow_sample.sampling_rate", "1"
                )
                record = _sflow_record(node["sflow_245.header_tree"], int(rate))
                if record is not None:
                    out.append(record)
    return out


def overflowd_records(pcap: Path, port: int) -> list[FlowRecord]:
    """Every flow record overflowd decodes from the datagrams to ``port``, in capture order.

    The path a capture takes in production: overflowd.wire.pcap finds the UDP datagrams,
    overflowd.wire.dispatch decodes each one with one decoder state for the whole file.
    A datagram overflowd refuses fails the test: these come from real exporters.
    """
    from overflowd.wire.dispatch import DecoderState, decode_datagram
    from overflowd.wire.pcap import CaptureReader

    state = DecoderState()
    records: list[FlowRecord] = []
    with open(pcap, "rb") as source:
        for datagram in CaptureReader().udp_datagrams(source, port=port):
            records += decode_datagram(datagram.payload, datagram.src, state, datagram.timestamp)
    return records


def reduce(record: FlowRecord) -> Decoded:
    """The fields both decoders are compared on."""
    return Decoded(
        src=str(record.src),
        dst=str(record.dst),
        sport=record.sport,
        dport=record.dport,
        proto=record.proto,
        packets=record.packets,
        bytes=record.bytes,
    )
