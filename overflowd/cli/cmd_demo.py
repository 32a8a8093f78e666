"""``overflowd demo``: the whole idea on loopback, in seconds, touching no other machine.

A router's node and a victim's node start on the embedded defaults (each home's config holds
only what differs, printed). The shared NetFlow v5 trace is replayed into the router's UDP
collector with its busiest destination rewritten to the victim's address (127.0.0.2); the
router samples, signs and stores reports, and tells the victim in band (UDP) and by webhook
(an ``overflowd-receive`` on loopback). At the end the victim's store holds the reports, each
verified, and ``overflowd-query`` shows who reported what about 127.0.0.2 and whom to call.

What keeps everything on this machine, and what the demo prints to show it:

- the router's ``[send] allowed_prefixes = ["127.0.0.2/32"]``: every other flow end (the
  trace's real public addresses) is refused in band, counted as
  ``overflowd_send_dropped_total{reason="not_allowed"}``; the datagrams the router says it
  sent equal those the victim says it received, so none went anywhere else;
- the only webhook target is the receiver on 127.0.0.1;
- both nodes ask DNS only at ``registry.nameservers`` = a loopback port nothing listens on
  (a question fails at once, none reaches a resolver); the victim pins the router's key
  instead of looking it up (docs/demo.md says why pinning and not a local DNS server).

Every process it starts is stopped at its end, on error and on Ctrl-C alike. It must never
send to an address outside 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import ipaddress
import json
import os
import queue
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from overflowd.cli.common import UsageError
from overflowd.errors import OverflowdError

#: The victim's address: loopback, so the in-band datagrams and the confinement stay here.
VICTIM = "127.0.0.2"
#: Where the router, the receiver and every HTTP endpoint listen.
LOCAL = "127.0.0.1"
#: Reports per packet. The trace's busiest destination takes 315,537 packets in 450 flows:
#: p = min(1, rate x packets) gives ~46 reports about it at 1e-2 (a few dozen: enough for
#: estimates with intervals, few enough for the webhook's default budgets to deliver them in
#: a couple of POSTs), and ~7,900 in all.
DEMO_RATE = 1e-2
#: The router's sampling.max_reports_burst (default 5000): the replay squeezes the trace into a
#: second or two, faster than the default 5000 + 1000/s lets through, and the signing budget
#: would shed the rest — among them reports about the victim, biasing its estimate low (the
#: demo's test saw 20% low one run in three). Every one of the trace's ~7,900 fits in this.
DEMO_SIGNING_BURST = 20_000
#: The whole demo's deadline once the nodes are up: every wait below is bounded by it.
DEMO_TIMEOUT_S = 60.0
#: How long a started process may take to print the line that says it is listening.
START_TIMEOUT_S = 30.0
#: How long a process may take to stop after SIGTERM before it is killed.
STOP_TIMEOUT_S = 15.0
#: A counter that has not moved for this long (once it reached what we wait for, or once the
#: trace is through) is final.
SETTLE_S = 1.0
#: Datagrams sent back to back before a 1 ms pause: the collector's socket buffer keeps up.
PACE_DATAGRAMS = 50
#: The synthetic flood, when the shared trace is missing: datagrams of 30 records, two of them
#: a reflector's answers toward the victim (NTP, DNS, chargen: boosted 100 times, so p = 1)
#: and 28 small web flows between others. 40 reports about the victim, as many as the trace
#: gives, and under the webhook's per-/24 burst (webhook.prefix_reports_burst = 60), which
#: lets them go in one or two POSTs.
SYNTHETIC_DATAGRAMS = 20
SYNTHETIC_SOURCES = 40
TRACE_NAME = "netflow_v5_simpleweb.pcap"
ROUTER_CONTACT = "mailto:abuse@router.example"
ROUTER_LABEL = "router.example"

_V5_HEADER = struct.Struct(">HHIIIIBBH")
_V5_RECORD_BYTES = 48
_V5_DSTADDR = 4  # offset of dstaddr inside a v5 record (srcaddr is at 0)


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "demo",
        parents=[common],
        help="two nodes on loopback: a replayed flood, reports in band and by webhook",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument(
        "--trace",
        metavar="PCAP",
        help="NetFlow capture to replay (default: $OVERFLOWD_SHARED/data/"
        f"{TRACE_NAME}, OVERFLOWD_SHARED defaulting to ../shared); missing: a synthetic flood",
    )
    p.add_argument(
        "--synthetic", action="store_true", help="replay a synthetic flood, not the trace"
    )
    p.add_argument(
        "--rate",
        type=float,
        default=DEMO_RATE,
        metavar="R",
        help=f"the router's sampling rate, reports per packet (default {DEMO_RATE:g})",
    )
    p.add_argument(
        "--dir",
        metavar="DIR",
        help="put the nodes' homes here (a new or empty directory; default: a new temporary "
        "one, printed and kept for you to explore)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEMO_TIMEOUT_S,
        metavar="S",
        help=f"give up after this many seconds of waiting (default {DEMO_TIMEOUT_S:g})",
    )
    p.set_defaults(func=run)


# --- the flood: pure functions over datagram bytes ---------------------------------------


def busiest_destination(payloads: list[bytes], exporter: str) -> tuple[str, int, int, int]:
    """The destination with most packets, by overflowd's own decoder: (addr, packets, flows,
    sources). Datagrams that do not decode are skipped (the collector will count them)."""
    from overflowd.errors import DecodeError
    from overflowd.wire import DecoderState, decode_datagram_rows

    state = DecoderState()
    packets: collections.Counter[str] = collections.Counter()
    flows: collections.Counter[str] = collections.Counter()
    sources: dict[str, set[str]] = collections.defaultdict(set)
    for payload in payloads:
        try:
            rows = decode_datagram_rows(payload, exporter, state, time.time())
        except DecodeError:
            continue
        for row in rows:
            dst = str(row.dst)
            packets[dst] += row.packets
            flows[dst] += 1
            sources[dst].add(str(row.src))
    if not packets:
        raise OverflowdError("the capture holds no flow records to replay")
    dst, count = packets.most_common(1)[0]
    return dst, count, flows[dst], len(sources[dst])


def remap_v5(payloads: list[bytes], old: str, new: str, *, now_s: int) -> tuple[list[bytes], int]:
    """NetFlow v5 datagrams with every record's dstaddr ``old`` rewritten to ``new``, and the
    export times moved so that the last datagram is exported at ``now_s`` (the trace's flows
    then end as the demo starts: ``--since 1h`` finds them, and none lies in the future).
    Other formats pass as they are. Returns the datagrams and how many records were
    rewritten."""
    before, after = ipaddress.IPv4Address(old).packed, ipaddress.IPv4Address(new).packed
    v5 = [p for p in payloads if len(p) >= _V5_HEADER.size and p[:2] == b"\x00\x05"]
    shift = now_s - max((_V5_HEADER.unpack_from(p)[3] for p in v5), default=now_s)
    out: list[bytes] = []
    rewritten = 0
    for payload in payloads:
        if len(payload) < _V5_HEADER.size or payload[:2] != b"\x00\x05":
            out.append(payload)
            continue
        data = bytearray(payload)
        fields = list(_V5_HEADER.unpack_from(data))
        count = fields[1]
        fields[3] = max(0, min(0xFFFFFFFF, fields[3] + shift))
        _V5_HEADER.pack_into(data, 0, *fields)
        for i in range(count):
            at = _V5_HEADER.size + i * _V5_RECORD_BYTES + _V5_DSTADDR
            if at + 4 > len(data):
                break  # a truncated datagram: the decoder refuses it, counted
            if data[at : at + 4] == before:
                data[at : at + 4] = after
                rewritten += 1
        out.append(bytes(data))
    return out, rewritten


def synthetic_flood(victim: str, *, now_s: int, seed: int = 11) -> list[bytes]:
    """NetFlow v5 datagrams of a UDP flood toward ``victim`` from documentation-range
    sources (TEST-NET-2 and -3), with some background traffic between them; deterministic."""
    rng = random.Random(seed)
    sources = [f"{net}.{i}" for net in ("198.51.100", "203.0.113") for i in range(1, 255)]
    attackers = rng.sample(sources, SYNTHETIC_SOURCES)
    dst_packed = ipaddress.IPv4Address(victim).packed
    record = struct.Struct(">4s4s4sHHIIIIHHBBBBHHBBH")
    out = []
    for n in range(SYNTHETIC_DATAGRAMS):
        uptime = 3_600_000 + n * 100
        records = []
        for i in range(30):
            if i % 15 == 0:  # the flood: one reflector's answers
                reflector = attackers[(2 * n + i // 15) % len(attackers)]
                src, dst = ipaddress.IPv4Address(reflector).packed, dst_packed
                pkts, sport, dport = rng.randint(500, 5000), rng.choice((123, 53, 19)), 0
            else:
                a, b = rng.sample(sources, 2)
                src, dst = ipaddress.IPv4Address(a).packed, ipaddress.IPv4Address(b).packed
                pkts, sport, dport = rng.randint(1, 20), rng.randint(1024, 65535), 443
            dport = dport or rng.randint(1024, 65535)
            proto = 17 if dport != 443 else 6
            records.append(
                record.pack(
                    src,
                    dst,
                    b"\0" * 4,
                    0,
                    0,
                    pkts,
                    pkts * 468,
                    uptime - 1000,
                    uptime,
                    sport,
                    dport,
                    0,
                    0,
                    proto,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                )
            )
        header = _V5_HEADER.pack(5, len(records), uptime, now_s, 0, n * 30, 0, 0, 0)
        out.append(header + b"".join(records))
    return out


# --- installing -------------------------------------------------------------------------

#: Imported inside functions (so not by importing overflowd's modules) by the demo's processes.
_LAZY_IMPORTS = (
    "alembic.command",
    "alembic.config",
    "httpx",
    "rich.box",
    "rich.console",
    "rich.table",
    "rich.text",
    "sqlalchemy.dialects.sqlite",
)


def precompile() -> int:
    """Import every overflowd module and what they import lazily, writing .pyc files: called
    by scripts/venv-runtime after uv installs (uv writes none), so the demo's three processes,
    started at once, do not each compile sqlalchemy, fastapi and pydantic again. A module that
    does not import (an optional dependency missing) is skipped. Returns the modules loaded."""
    import importlib
    import pkgutil

    import overflowd

    names = [m.name for m in pkgutil.walk_packages(overflowd.__path__, "overflowd.")]
    for name in [n for n in names if ".migrations" not in n] + list(_LAZY_IMPORTS):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    return len(sys.modules)


# --- processes ---------------------------------------------------------------------------


class Proc:
    """A process the demo started: its output lines gathered by threads, stopped by SIGTERM."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            start_new_session=True,  # Ctrl-C reaches the demo only: it stops them in order
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._terminated = False
        self.output: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.proc.stdout, self.proc.stderr)
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None
        for line in stream:
            self.output.append(line.rstrip("\n"))
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, pattern: str, deadline: float) -> re.Match[str]:
        """The first line (stdout or stderr) matching ``pattern``, before ``deadline``."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                break
            try:
                line = self.lines.get(timeout=min(left, 0.2))
            except queue.Empty:
                continue
            if m := re.search(pattern, line):
                return m
        tail = "; ".join(self.output[-3:]) or "no output"
        raise OverflowdError(f"{self.name} did not start ({tail})")

    def terminate(self) -> None:
        """SIGTERM, once: a daemon draining after the first takes a second one's default
        action (it dies mid-drain), so the demo never sends two."""
        if not self._terminated and self.proc.poll() is None:
            self._terminated = True
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT_S)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; the exit code (joins the readers)."""
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(STOP_TIMEOUT_S)
        for thread in self._threads:
            thread.join(STOP_TIMEOUT_S)
        return self.proc.returncode


def _tools() -> dict[str, list[str]]:
    """The commands, run by this interpreter (the venv that runs the demo, whatever PATH)."""
    py = sys.executable
    return {
        "overflowd": [py, "-m", "overflowd.cli.node"],
        "overflowd-query": [py, "-m", "overflowd.cli.query"],
        "overflowd-receive": [py, "-m", "overflowd.cli.receive"],
    }


def _env() -> dict[str, str]:
    # No proxy for loopback, and no OVERFLOWD_HOME: every command names its --home.
    drop = {"OVERFLOWD_HOME", "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["NO_PROXY"] = env["no_proxy"] = "*"
    return env


def _scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A Prometheus text page: (name, labels) -> value. Loopback only, no proxy."""
    import httpx

    assert url.startswith(f"http://{LOCAL}:"), url
    text = httpx.get(url, timeout=5, trust_env=False).text
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(
    page: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> int:
    """The sum of ``name`` over the series that carry ``labels``."""
    want = set(labels.items())
    return int(sum(v for (n, ls), v in page.items() if n == name and want <= ls))


@dataclass
class Counts:
    """The counters the demo waits on and prints, read from the three /metrics pages."""

    records: int = 0
    stored: int = 0
    inband_sent: int = 0
    not_allowed: int = 0
    prefix_budget: int = 0
    webhook_delivered: int = 0
    webhook_dropped: int = 0  # not enqueued by the webhook plan (the same flow again...)
    inband_duplicate: int = 0
    victim_received: int = 0
    victim_stored: int = 0
    receiver_accepted: int = 0
    about_victim: int = 0  # reports about VICTIM in the router's store

    @classmethod
    def read(cls, router: str, victim: str, receiver: str) -> Counts:
        r, v, h = _scrape(router), _scrape(victim), _scrape(receiver)
        dropped = "overflowd_send_dropped_total"
        return cls(
            records=metric(r, "overflowd_decoder_records_total"),
            stored=metric(r, "overflowd_reports_stored_total"),
            inband_sent=metric(r, "overflowd_inband_sent_total"),
            not_allowed=metric(r, dropped, channel="inband", reason="not_allowed"),
            prefix_budget=metric(r, dropped, channel="inband", reason="prefix_budget"),
            webhook_delivered=metric(r, "overflowd_webhook_deliveries_total", outcome="delivered"),
            webhook_dropped=metric(r, "overflowd_webhook_dropped_total"),
            inband_duplicate=metric(r, dropped, channel="inband", reason="duplicate"),
            victim_received=metric(v, "overflowd_inband_received_total"),
            victim_stored=metric(v, "overflowd_inband_stored_total"),
            receiver_accepted=metric(h, "overflowd_receiver_accepted_total"),
        )


# --- the demo ----------------------------------------------------------------------------


_T0 = [time.monotonic()]


def _say(text: str) -> None:
    print(f"\n== {text}  [{time.monotonic() - _T0[0]:.1f} s]", flush=True)


def _show(argv: list[str]) -> None:
    """A command as a person would type it (the demo runs it with this interpreter)."""
    print("$ " + " ".join(a if a and " " not in a else repr(a) for a in argv), flush=True)


def _closed_port() -> int:
    """A loopback UDP port nothing listens on (bound, then closed): DNS asked there fails at
    once with a refusal, and never reaches a resolver on another machine."""
    return _free_port(socket.SOCK_DGRAM, LOCAL)


def _free_port(kind: socket.SocketKind, host: str) -> int:
    """A port free on ``host`` now (bound, then closed), for a process started next to bind.

    Chosen ahead so that the receiver, the victim and the router start at once (the router's
    config names the victim's in-band port and the receiver's URL): an interpreter start is
    a second or more, and waiting for one before the next was most of the demo's start-up.
    Another process's port-0 bind meanwhile lands on it with a chance of about one in the
    ephemeral range (~28,000); a process that cannot bind says so and the demo stops, in one
    line."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _workdir(text: str | None) -> Path:
    if text is None:
        return Path(tempfile.mkdtemp(prefix="overflowd-demo."))
    path = Path(text)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--dir {text}: not a new or empty directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _default_trace() -> Path:
    return Path(os.environ.get("OVERFLOWD_SHARED", "../shared")) / "data" / TRACE_NAME


def _flood(args: argparse.Namespace) -> tuple[list[bytes], str, int]:
    """The datagrams to replay, the busiest destination mapped onto VICTIM, where they came
    from and the packets toward it (the truth the estimates are compared with); said."""
    from overflowd.wire import CaptureReader

    now_s = int(time.time())
    trace = Path(args.trace) if args.trace else _default_trace()
    if args.synthetic or not trace.is_file():
        if not args.synthetic:
            print(
                f"the shared trace is not at {trace} (set OVERFLOWD_SHARED or --trace): "
                "replaying a synthetic flood instead"
            )
        payloads = synthetic_flood(VICTIM, now_s=now_s)
        dst, packets, flows, sources = busiest_destination(payloads, LOCAL)
        print(
            f"synthetic flood: {len(payloads)} NetFlow v5 datagrams; toward {dst}: "
            f"{packets} packets in {flows} flows from {sources} sources"
        )
        return payloads, "synthetic", packets
    try:
        with open(trace, "rb") as fh:
            payloads = [d.payload for d in CaptureReader().udp_datagrams(fh)]
    except OSError as exc:
        raise OverflowdError(f"--trace {trace}: {exc.strerror or exc}") from None
    dst, packets, flows, sources = busiest_destination(payloads, LOCAL)
    if ipaddress.ip_address(dst).version != 4:
        raise OverflowdError(f"{trace}: the busiest destination {dst} is not IPv4")
    payloads, rewritten = remap_v5(payloads, dst, VICTIM, now_s=now_s)
    if not rewritten:
        raise OverflowdError(f"{trace}: not NetFlow v5: cannot map {dst} onto {VICTIM}")
    print(f"trace {trace}: {len(payloads)} datagrams")
    print(
        f"busiest destination {dst}: {packets} packets in {flows} flows from {sources} "
        f"sources; its {rewritten} records now say dst {VICTIM}"
    )
    return payloads, str(trace), packets


def _send(payloads: list[bytes], addr: tuple[str, int], deadline: float) -> int:
    assert ipaddress.ip_address(addr[0]).is_loopback, addr  # the demo sends to loopback only
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i, data in enumerate(payloads):
            if time.monotonic() > deadline:
                raise OverflowdError(f"replay cut short at {sent} datagrams: out of time")
            sock.sendto(data, addr)
            sent += 1
            if i % PACE_DATAGRAMS == PACE_DATAGRAMS - 1:
                time.sleep(0.001)
    return sent


def _settle(
    read: Callable[[], Counts], done: Callable[[Counts], bool], deadline: float, what: str
) -> Counts:
    """Poll ``read()`` until ``done(counts)`` holds and the counts stop moving for SETTLE_S."""
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        counts = read()
        if counts != last:
            last, since = counts, time.monotonic()
        elif done(counts) and time.monotonic() - since >= SETTLE_S:
            return counts
        time.sleep(0.1)
    raise OverflowdError(f"out of time waiting for {what} (last counts: {last})")


def _victim_config(port: int, router_key: str) -> str:
    return f"""\
# The victim's node: only what differs from the embedded defaults.
[node]
observation_point = "demo-victim"
[registry]
# The router's key, vouched for by hand (instead of its _overflowd DNS record).
pinned = ["{ROUTER_LABEL}={router_key}"]
# DNS only at a loopback port nothing listens on: no question leaves the machine.
nameservers = ["{LOCAL}:{port}"]
timeout_s = 0.5
"""


def _router_config(rate: float, dns_port: int, inband_port: int, hook_url: str) -> str:
    return f"""\
# The router's node: only what differs from the embedded defaults.
[node]
contacts = ["{ROUTER_CONTACT}"]
observation_point = "demo-router"
[sampling]
rate = {rate!r}
# The replay takes a second or two, not the trace's hour: a burst that holds all its ~7,900
# reports, so the signing budget sheds none (a shed report would bias the estimate shown).
max_reports_burst = {DEMO_SIGNING_BURST}
[send]
# Tell the flows' ends, but only inside the victim's address: the trace's real sources
# are refused (overflowd_send_dropped_total{{reason="not_allowed"}}).
to_flow_addresses = true
allowed_prefixes = ["{VICTIM}/32"]
[inband]
port = {inband_port}
[webhook]
targets = [{{ prefix = "{VICTIM}/32", url = "{hook_url}" }}]
allow_prefixes = ["127.0.0.0/8"]
require_https = false
[registry]
nameservers = ["{LOCAL}:{dns_port}"]
timeout_s = 0.5
"""


def _import_webhook(jsonl: Path, victim_home: Path) -> tuple[int, int]:
    """The receiver's verified reports into the victim's store, ``via="webhook"``.

    overflowd-receive writes JSON lines, not a store; each line carries the report's COSE
    bytes, verified again here (a store takes verified reports only). Returns (lines, new):
    a report that came in band too is stored once."""
    from overflowd import report as rpt
    from overflowd.config import load_settings
    from overflowd.identity import verify_report
    from overflowd.store import Store, default_url
    from overflowd.trust import TrustBook

    reports = []
    for line in jsonl.read_text(encoding="utf-8").splitlines() if jsonl.exists() else []:
        if line.strip():
            reports.append(verify_report(rpt.b64url_decode(json.loads(line)["cose"])))
    # Labelled as the victim's node labels what it receives: its trust book (the pin).
    pins = load_settings(victim_home).registry
    book = TrustBook(pins.pinned_keys(), pins.continuity_policy())
    now = int(time.time() * 1000)
    trust = {r.report_id: str(book.assess(r.observer_key, now_ms=now).level) for r in reports}
    store = Store.open(default_url(victim_home))
    try:
        new = store.add_reports([(r, now, "webhook") for r in reports], trust=trust)
    finally:
        store.close()
    return len(reports), new


def _about_victim(store: Any) -> list[Any]:
    """Every report about VICTIM in a node's store (read while the node runs: SQLite WAL)."""
    rows, after, net = [], 0, ipaddress.ip_network(f"{VICTIM}/32")
    while True:
        page, after = store.reports_after(after, 500, dst=net)
        rows.extend(page)
        if len(page) < 500:
            return rows


@contextlib.contextmanager
def _open_store(home: Path) -> Iterator[Any]:
    from overflowd.store import Store, default_url

    store = Store.open(default_url(home), create=False)
    try:
        yield store
    finally:
        store.close()


def _victim_holds(victim_home: Path) -> tuple[int, int, dict[str, int]]:
    """Reports about VICTIM in the victim's store: (held, verified again, by channel)."""
    from overflowd.identity import verify_report

    with _open_store(victim_home) as store:
        rows = _about_victim(store)
    verified = 0
    for row in rows:
        with contextlib.suppress(OverflowdError):
            verified += verify_report(row.cose).report_id == row.report_id
    return len(rows), verified, dict(collections.Counter(row.via for row in rows))


def _run_shown(argv: list[str]) -> None:
    """An overflowd-query command, shown and run in this process: two interpreter starts
    (and their imports) were seconds of the demo's end on a loaded machine."""
    from overflowd.cli import query

    _show(argv)
    sys.stdout.flush()
    code = query.main(argv[1:])
    sys.stdout.flush()
    if code != 0:
        raise OverflowdError(f"{argv[0]} {argv[1]} failed (exit {code})")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.rate <= 1:
        raise UsageError("--rate must be in (0, 1]")
    if not args.timeout > 0:
        raise UsageError("--timeout must be positive")
    started = _T0[0] = time.monotonic()
    work = _workdir(args.dir)
    print(f"demo directory {work}")
    procs: list[Proc] = []
    try:
        code = _demo(args, work, procs, started)
    finally:
        _stop_all(procs)
    return code


def _stop_all(procs: list[Proc]) -> None:
    """Stop every process started, all at once; a second Ctrl-C kills those still draining."""
    for proc in procs:
        proc.terminate()
    try:
        for proc in procs:
            proc.stop()
    except KeyboardInterrupt:
        for proc in procs:
            proc.kill()
        raise


def _in_process(argv: list[str]) -> None:
    """A quick overflowd command run in this process (saves an interpreter start), shown."""
    from overflowd.cli import node

    _show(argv)
    code = node.main(argv[1:])
    if code != 0:
        raise OverflowdError(f"{' '.join(argv[:2])} failed (exit {code})")


def _start_node(home: Path, listen: str, inband: str) -> list[str]:
    return [
        *_tools()["overflowd"],
        "run",
        "--home",
        str(home),
        "--listen",
        f"{listen}:0",
        "--inband-listen",
        inband,
        "--metrics",
        f"{LOCAL}:0",
        "--api",
        f"{LOCAL}:0",
    ]


def _demo(args: argparse.Namespace, work: Path, procs: list[Proc], started: float) -> int:
    from overflowd.identity import load_identity
    from overflowd.report import key_fingerprint

    tools, env = _tools(), _env()
    router_home, victim_home = work / "router", work / "victim"
    hook_out = work / "webhook.jsonl"
    dns_port = _closed_port()

    _say(f"the flood, its busiest destination mapped onto {VICTIM}")
    payloads, source, truth = _flood(args)
    ends = (
        "the synthetic flood's sources" if source == "synthetic" else "the trace's real addresses"
    )

    _say("two nodes, each with its own identity (keys are mode 0600)")
    _in_process(["overflowd", "init", "--home", str(router_home), "--contact", ROUTER_CONTACT])
    _in_process(["overflowd", "init", "--home", str(victim_home)])
    # The router's contact goes in its config below, with the demo's other settings.
    (router_home / "overflowd.toml").unlink()
    router_key = load_identity(router_home).public_key_b64
    _in_process(
        [
            "overflowd",
            "key",
            "dns-record",
            "--home",
            str(router_home),
            "--contact",
            ROUTER_CONTACT,
            "--name",
            ROUTER_LABEL,
        ]
    )
    print("(the record the router's operator would publish; the victim pins the key instead)")

    _say("the victim's webhook receiver and node, and the router's node")
    # All three start at once (an interpreter start is a second or more, and none needs
    # another to be up): the router's config names ports chosen here for the other two.
    inband_port = _free_port(socket.SOCK_DGRAM, VICTIM)
    hook_base = f"http://{LOCAL}:{_free_port(socket.SOCK_STREAM, LOCAL)}"
    (victim_home / "overflowd.toml").write_text(
        _victim_config(dns_port, router_key), encoding="utf-8"
    )
    (router_home / "overflowd.toml").write_text(
        _router_config(args.rate, dns_port, inband_port, f"{hook_base}/hook"), encoding="utf-8"
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    receiver = Proc(
        "overflowd-receive",
        [
            *tools["overflowd-receive"],
            "--listen",
            hook_base.removeprefix("http://"),
            "--out",
            str(hook_out),
            "--trust",
            router_key,
        ],
        env,
    )
    procs.append(receiver)
    victim = Proc(
        "the victim's node", _start_node(victim_home, VICTIM, f"{VICTIM}:{inband_port}"), env
    )
    procs.append(victim)
    router = Proc("the router's node", _start_node(router_home, LOCAL, f"{LOCAL}:0"), env)
    procs.append(router)
    receiver.wait_line(rf"listening on {re.escape(hook_base)}$", deadline)
    victim_metrics = victim.wait_line(r"^metrics (\S+)", deadline).group(1)
    victim.wait_line(rf"^listening inband {re.escape(VICTIM)}:{inband_port}$", deadline)
    print(f"overflowd-receive {hook_base} -> {hook_out} (trusts only the router's key)")
    print(f"victim node: in band on {VICTIM}:{inband_port}, metrics {victim_metrics}")
    print((victim_home / "overflowd.toml").read_text(encoding="utf-8").rstrip())
    router_metrics = router.wait_line(r"^metrics (\S+)", deadline).group(1)
    m = router.wait_line(r"^listening udp ([\d.]+):(\d+)", deadline)
    collector = (m.group(1), int(m.group(2)))
    print(f"router node: collector udp {collector[0]}:{collector[1]}, metrics {router_metrics}")
    print((router_home / "overflowd.toml").read_text(encoding="utf-8").rstrip())

    _say(f"replay into the router's collector (sampling rate {args.rate:g})")
    deadline = time.monotonic() + args.timeout
    t0 = time.monotonic()
    sent = _send(payloads, collector, deadline)
    print(
        f"sent {sent} datagrams to {collector[0]}:{collector[1]} in {time.monotonic() - t0:.1f} s"
    )
    with _open_store(router_home) as router_store:

        def read() -> Counts:
            counts = Counts.read(router_metrics, victim_metrics, f"{hook_base}/metrics")
            counts.about_victim = len(_about_victim(router_store))
            return counts

        # Done when every datagram the router sent in band was received and every report it
        # holds about the victim reached the receiver (but those its webhook plan dropped: the
        # same flow twice in dedup_window_s); then nothing moves for SETTLE_S.
        counts = _settle(
            read,
            lambda c: (
                c.records > 0
                and c.about_victim > 0
                and c.victim_received >= c.inband_sent
                and c.receiver_accepted + c.webhook_dropped >= c.about_victim
            ),
            deadline,
            "the reports to arrive",
        )
    print(
        f"router: {counts.records} flow records decoded, {counts.stored} reports signed "
        f"and stored, {counts.about_victim} of them about {VICTIM}"
    )

    _say("stop the nodes (their stop summaries)")
    _stop_all([router, victim, receiver])  # all at once; each drains on its own
    for proc in (router, victim, receiver):
        code = proc.stop()  # already stopped: its exit code
        for line in proc.output:
            if line.startswith("stopped:"):
                print(f"{proc.name}: {line}")
        if code != 0:
            raise OverflowdError(f"{proc.name} exited {code}: {'; '.join(proc.output[-3:])}")

    _say("the webhook's reports into the victim's store")
    lines, new = _import_webhook(hook_out, victim_home)
    print(
        f"{lines} verified reports in {hook_out.name}: {new} new in the victim's store, "
        f"{lines - new} already there (they came in band too)"
    )

    _say(f"who reported {VICTIM}, and whom to call")
    home = ["--home", str(victim_home)]
    _run_shown(["overflowd-query", "who", "--dst", VICTIM, *home])
    print(f"(the flood held {truth} packets toward {VICTIM}: compare the PACKETS estimate)")
    _run_shown(["overflowd-query", "top", "--by", "src", "--dst", VICTIM, "-n", "10", *home])
    fingerprint = key_fingerprint(base64.b64decode(router_key))
    print(
        f"contact to call: {ROUTER_CONTACT} (in every report of key {fingerprint}; the "
        f"victim pins that key as {ROUTER_LABEL}: trust 'pinned')"
    )

    _say("what happened, from the counters")
    held, verified, by_via = _victim_holds(victim_home)
    channels = " ".join(f"{via}={n}" for via, n in sorted(by_via.items()))
    print(
        f"victim store: {held} reports about {VICTIM}, {verified} verified again "
        f"(signature and id), by channel {channels}"
    )
    print(
        f"in band: router sent {counts.inband_sent} datagrams, victim received "
        f"{counts.victim_received} and stored {counts.victim_stored}; refused by the "
        f"/24 budget {counts.prefix_budget}, as the same flow again "
        f"{counts.inband_duplicate}"
    )
    print(
        f"webhook: router delivered {counts.webhook_delivered} reports about {VICTIM}, "
        f"receiver accepted {counts.receiver_accepted}; not enqueued (the same flow "
        f"again) {counts.webhook_dropped}"
    )
    print(
        f"confinement: {counts.not_allowed} flow ends outside {VICTIM}/32 refused "
        f"({ends}): nothing sent to them"
    )
    elsewhere = counts.inband_sent - counts.victim_received
    print(
        f"sent elsewhere: {elsewhere} (every datagram sent reached {VICTIM}; the one "
        f"webhook URL is on {LOCAL}; DNS only at {LOCAL}:{dns_port}, where nothing listens)"
    )
    print(f"\ndone in {time.monotonic() - started:.1f} s; the nodes' homes stay in {work}")
    print(f"  explore: overflowd-query reports --home {victim_home} --dst {VICTIM}")
    print(f"  clean up: rm -rf {work}")
    ok = held > 0 and verified == held and counts.victim_stored > 0 and elsewhere == 0
    return 0 if ok else 1
