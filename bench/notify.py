#!/usr/bin/env python3
"""Notify benchmark: signed reports made and delivered per second, beside raw PyNaCl signing.

Not a test: it prints figures, all from one run so that they can be compared.

1. **Raw signing rate**: ``nacl.signing.SigningKey.sign`` over 300-byte messages (about the
   size of a report's COSE ``Sig_structure``). This is the budget: a report costs at least
   one signature.
2. **Reports made per second**: ``ReportMaker.make`` (record → payload → canonical CBOR →
   COSE_Sign1, one signature) on FlowRows decoded from the shared trace. The *envelope* cost
   of a report is ``1/made - 1/sign``.
3. **In band**: reports made and sent as UDP datagrams (``InbandSender.send_report`` →
   ``plan_inband`` → ``datagram.to_wire`` → ``sendto``), two per report (the flow's source
   and destination), to two local sinks on 127.0.0.2 and 127.0.0.1 (a separate process that
   counts, and verifies a sample). The flows' addresses are rewritten to those two, the
   confinement allows only 127.0.0.0/8, and the budget is set so high that it never limits
   (its drop counters are printed to prove it). Sending pre-made reports is timed too, and
   the daemon's own path: ``make_all`` per batch of 64 rows, ``submit``, the sender's ``run``.
4. **Webhooks**: pre-made reports enqueued in the durable outbox (SQLite in a temp dir, one
   transaction per report, as ``services.webhook.enqueue`` does) and delivered by
   ``WebhookDelivery.drain`` (httpx on trio, default concurrency 8, batches of 64) to
   ``python -m overflowd.cli.receive --listen 127.0.0.1:0`` (a separate process, which
   verifies each delivery and fsyncs one JSON line per report before answering). Every line
   of its output file is verified again here and must match the reports sent, once each.
   End-to-end rate = reports / (enqueue + drain) wall time; the node's own cost is the CPU
   time of this process (the receiver's work is not the sender's).

Then a table (rate, µs per report, cost in signatures) and the goal line: envelope +
delivery ≤ 0.5 × the signing cost, i.e. a report made and delivered costs at most 1.5
signatures, judged separately for the in-band and the webhook path.

Timed candidates of parts 1-3 run round-robin (a, b, c, a, b, c...) and each keeps its best
run, so that load from other work on the machine hits them alike. This process is pinned to
core 0 and the sinks/receiver to core 1 where the machine allows it.

Usage::

    .venv/bin/python bench/notify.py            # about 1-2 minutes
    .venv/bin/python bench/notify.py --quick    # under 30 seconds, rougher
    .venv/bin/python bench/notify.py --profile  # also print where the time of make/send goes
    .venv/bin/python bench/notify.py --compare main  # main and this tree, alternately, one run

Only ever sends to 127.0.0.1 and 127.0.0.2 (loopback). The trace is
``<repo>/../shared/data/netflow_v5_simpleweb.pcap``; ``OVERFLOWD_SHARED`` overrides ``shared``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import logging
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRACE_NAME = "data/netflow_v5_simpleweb.pcap"
MESSAGE_BYTES = 300
GOAL_EXTRA_FRACTION = 0.5  # envelope + delivery ≤ this × one signature
SRC_SINK = "127.0.0.2"
DST_SINK = "127.0.0.1"
NODE_CPU = 0
SINK_CPU = 1
WEBHOOK_TIMEOUT_S = 120.0

if sys.path[0] != str(REPO):  # run as a file: make `overflowd` importable without install
    sys.path.insert(1, str(REPO))
# --tree PATH (what --compare runs): import `overflowd` from another checkout (e.g. main,
# exported by --compare), so that one run measures both trees with this same bench code.
if "--tree" in sys.argv[:-1]:
    sys.path.insert(0, sys.argv[sys.argv.index("--tree") + 1])

from overflowd import report as rpt  # noqa: E402
from overflowd.flows import FlowRow  # noqa: E402
from overflowd.identity import NodeIdentity  # noqa: E402


def trace_path() -> Path:
    shared = os.environ.get("OVERFLOWD_SHARED")
    base = Path(shared) if shared else REPO.parent / "shared"
    return base / TRACE_NAME


def load_rows(path: Path, limit: int) -> list[FlowRow]:
    """Up to ``limit`` FlowRows decoded from the trace's datagrams, in order."""
    from overflowd.errors import DecodeError
    from overflowd.wire import CaptureReader, DecoderState, decode_datagram_rows

    state = DecoderState()
    rows: list[FlowRow] = []
    with path.open("rb") as f:
        for d in CaptureReader().udp_datagrams(f):
            try:
                rows.extend(decode_datagram_rows(d.payload, d.src, state, d.timestamp))
            except DecodeError:
                continue
            if len(rows) >= limit:
                break
    return rows[:limit]


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    """Run this process on one core for the block (if the machine has it)."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        yield
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        yield
        return
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pin_child(cpu: int) -> Callable[[], None] | None:
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return None

    def pin() -> None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {cpu})

    return pin


def stop_process(proc: subprocess.Popen[str] | subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s: never leave a child behind."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# ============================================================================================
# Timed candidates, round-robin
# ============================================================================================

#: A candidate runs once and says how many reports (or signatures) it made, and in how long.
Candidate = Callable[[], tuple[int, float]]


#: CPU seconds per item of this process in each candidate's best (lowest) run, by name.
CPU_PER_ITEM: dict[str, float] = {}


def best_rates(candidates: Sequence[tuple[str, Candidate]], runs: int) -> dict[str, float]:
    best = {name: 0.0 for name, _ in candidates}
    for _ in range(runs):
        for name, run_once in candidates:
            c0 = time.process_time()
            n, dt = run_once()
            cpu = time.process_time() - c0  # includes the candidate's set-up: an upper bound
            if n and dt > 0:
                best[name] = max(best[name], n / dt)
                CPU_PER_ITEM[name] = min(CPU_PER_ITEM.get(name, float("inf")), cpu / n)
    return best


def sign_candidate(count: int, size: int = MESSAGE_BYTES) -> Candidate:
    import nacl.signing

    key = nacl.signing.SigningKey(os.urandom(32))
    messages = [os.urandom(size) for _ in range(256)]
    rounds = max(1, count // len(messages))

    def run() -> tuple[int, float]:
        sign = key.sign
        t0 = time.perf_counter()
        for _ in range(rounds):
            for m in messages:
                sign(m)
        return rounds * len(messages), time.perf_counter() - t0

    return run


def make_maker(identity: NodeIdentity) -> object:
    from overflowd.flowsample import SamplingPolicy
    from overflowd.pipeline import ReportMaker

    observer = rpt.Observer(contacts=("mailto:noc@example.net",), point="bench-router ge-0/0/0")
    return ReportMaker(identity=identity, observer=observer, policy=SamplingPolicy())


def make_candidate(identity: NodeIdentity, rows: Sequence[FlowRow]) -> Candidate:
    from overflowd.pipeline import ReportMaker

    maker = make_maker(identity)
    assert isinstance(maker, ReportMaker)

    def run() -> tuple[int, float]:
        make = maker.make
        now_ms = int(time.time() * 1000)
        t0 = time.perf_counter()
        for row in rows:
            make(row, 0.001, now_ms)
        return len(rows), time.perf_counter() - t0

    return run


# ============================================================================================
# In band: a UDP sink process on 127.0.0.2 and 127.0.0.1, and the sender here
# ============================================================================================


def udp_sink_main(port_hint: int, verify_every: int) -> int:
    """The sink (run as a child): bind both loopback addresses on one port, count datagrams.

    Prints ``{"port": P}`` once bound. Reads commands on stdin: ``count`` prints the counts so
    far, ``stop`` verifies the kept sample and prints the final counts, then exits.
    """
    from overflowd.errors import DecodeError, SignatureError
    from overflowd.identity import verify_report
    from overflowd.wire import datagram

    socks: list[socket.socket] = []
    port = port_hint
    for _attempt in range(20):
        for s in socks:
            s.close()
        socks = []
        try:
            for host in (DST_SINK, SRC_SINK):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                s.bind((host, port))
                port = s.getsockname()[1]
            break
        except OSError:
            port = 0
    else:
        print(json.dumps({"error": "cannot bind the sinks"}), flush=True)
        return 1
    for s in socks:
        s.setblocking(False)
    print(json.dumps({"port": port}), flush=True)
    counts = {DST_SINK: 0, SRC_SINK: 0}
    kept: list[bytes] = []
    seen = 0
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ, s)
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.data is None:
                command = sys.stdin.readline().strip()
                if command == "count":
                    print(json.dumps({"counts": counts}), flush=True)
                    continue
                ok = bad = 0
                for data in kept:
                    try:
                        verify_report(datagram.from_wire(data))
                        ok += 1
                    except (DecodeError, SignatureError):
                        bad += 1
                print(json.dumps({"counts": counts, "verified": ok, "failed": bad}), flush=True)
                return 0
            s = key.data
            host = s.getsockname()[0]
            while True:
                try:
                    data = s.recv(2048)
                except BlockingIOError:
                    break
                counts[host] += 1
                seen += 1
                if (seen - 1) % verify_every == 0 and len(kept) < 20_000:
                    kept.append(data)


class UdpSink:
    def __init__(self, verify_every: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--udp-sink", str(verify_every)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=pin_child(SINK_CPU),
        )
        try:
            first = self._read()
            if "port" not in first:
                raise RuntimeError(f"UDP sink failed: {first}")
        except BaseException:
            stop_process(self.proc)
            raise
        self.port = int(first["port"])

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("UDP sink ended")
        doc = json.loads(line)
        assert isinstance(doc, dict)
        return doc

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def total(self) -> int:
        counts: dict[str, int] = self.ask("count")["counts"]
        return sum(counts.values())

    def settle(self, expected: int, timeout_s: float = 3.0) -> int:
        """Wait until the sink has counted ``expected`` datagrams or stopped counting."""
        deadline = time.monotonic() + timeout_s
        last = -1
        while True:
            got = self.total()
            if got >= expected or time.monotonic() > deadline or got == last:
                return got
            last = got
            time.sleep(0.05)

    def close(self) -> dict[str, Any]:
        try:
            return self.ask("stop")
        finally:
            stop_process(self.proc)


def loopback_rows(rows: Sequence[FlowRow]) -> list[FlowRow]:
    """The trace's flows with their source and destination moved to the two loopback sinks."""
    src, dst = ipaddress.IPv4Address(SRC_SINK), ipaddress.IPv4Address(DST_SINK)
    return [row._replace(src=src, dst=dst) for row in rows]


@dataclass
class InbandTotals:
    reports: int = 0
    datagrams: int = 0
    budget_drops: int = 0
    send_errors: int = 0


def inband_candidate(
    identity: NodeIdentity,
    rows: Sequence[FlowRow],
    port: int,
    totals: InbandTotals,
    *,
    premade: bool,
) -> Candidate:
    """Make (unless ``premade``) and send one report per row; time the loop only."""
    import trio

    from overflowd.notify import Budget, BudgetSettings, InbandSettings
    from overflowd.pipeline import ReportMaker
    from overflowd.services.inband import InbandSender

    maker = make_maker(identity)
    assert isinstance(maker, ReportMaker)
    now_ms = int(time.time() * 1000)
    reports = [maker.make(row, 0.001, now_ms) for row in rows] if premade else []
    settings = InbandSettings(port=port, allowed_prefixes=("127.0.0.0/8",))
    # Far above anything this loop can reach: the budget must not limit (drops are counted).
    budget_settings = BudgetSettings(
        global_per_s=1e6,
        burst=10**6,
        per_prefix_per_s=1e6,
        per_prefix_burst=10**6,
        dedup_window_s=0,
    )

    async def run_async() -> tuple[int, float]:
        # The sender's own sockets (what the daemon uses): run() opens them, then we call
        # send_report directly so the figure is the send path alone, not the queue hop.
        sender = InbandSender(settings, Budget(budget_settings))
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            send = sender.send_report
            t0 = time.perf_counter()
            if premade:
                for report in reports:
                    await send(report)
            else:
                make = maker.make
                now = int(time.time() * 1000)
                for row in rows:
                    await send(make(row, 0.001, now))
            dt = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        stats = sender.statistics()
        totals.reports += stats.reports
        totals.datagrams += stats.datagrams_sent
        totals.send_errors += stats.send_errors
        totals.budget_drops += sum(stats.budget.dropped.values())
        return stats.reports, dt

    def run() -> tuple[int, float]:
        return trio.run(run_async)

    return run


#: Reports made and submitted per batch in the daemon-path candidate: the node signs what one
#: decode batch sampled (make_all), stores it, then submits the batch to the sender.
DAEMON_BATCH = 64


def daemon_path_candidate(
    identity: NodeIdentity, rows: Sequence[FlowRow], port: int, totals: InbandTotals
) -> Candidate:
    """The daemon's path: ``make_all`` per batch of rows, ``submit`` each report, the sender's
    ``run`` sends them; timed until the sender has planned every report."""
    import trio

    from overflowd.notify import Budget, BudgetSettings, InbandSettings
    from overflowd.pipeline import ReportMaker
    from overflowd.services.inband import InbandSender

    maker = make_maker(identity)
    assert isinstance(maker, ReportMaker)
    settings = InbandSettings(port=port, allowed_prefixes=("127.0.0.0/8",), queue_reports=10**6)
    budget_settings = BudgetSettings(
        global_per_s=1e6,
        burst=10**6,
        per_prefix_per_s=1e6,
        per_prefix_burst=10**6,
        dedup_window_s=0,
    )
    step = DAEMON_BATCH
    batches = [[(r, 0.001) for r in rows[i : i + step]] for i in range(0, len(rows), step)]

    async def run_async() -> tuple[int, float]:
        sender = InbandSender(settings, Budget(budget_settings))
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            stats = sender.statistics
            submit = sender.submit
            done = 0
            t0 = time.perf_counter()
            for batch in batches:
                for report in maker.make_all(batch, int(time.time() * 1000)):
                    submit(report)
                done += len(batch)
                while stats().reports < done:  # the sender's turn (as after a store write)
                    await trio.lowlevel.checkpoint()
            dt = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
        s = sender.statistics()
        totals.reports += s.reports
        totals.datagrams += s.datagrams_sent
        totals.send_errors += s.send_errors
        totals.budget_drops += sum(s.budget.dropped.values())
        return s.reports, dt

    def run() -> tuple[int, float]:
        return trio.run(run_async)

    return run


def sendto_floor_candidate(
    identity: NodeIdentity, rows: Sequence[FlowRow], port: int, totals: InbandTotals
) -> Candidate:
    """The floor of the in-band send: the same two datagrams per report to the same sinks,
    from a plain blocking socket, with no plan, no budget and no event loop."""
    from overflowd.pipeline import ReportMaker
    from overflowd.wire import datagram

    maker = make_maker(identity)
    assert isinstance(maker, ReportMaker)
    data = [datagram.to_wire(maker.make(row, 0.001, 0).cose) for row in rows]
    src, dst = (SRC_SINK, port), (DST_SINK, port)

    def run() -> tuple[int, float]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", 0))
            sendto = sock.sendto
            t0 = time.perf_counter()
            for d in data:
                sendto(d, src)
                sendto(d, dst)
            dt = time.perf_counter() - t0
        totals.reports += len(data)
        totals.datagrams += 2 * len(data)
        return len(data), dt

    return run


# ============================================================================================
# Webhooks: outbox in SQLite, WebhookDelivery, overflowd.cli.receive in a child process
# ============================================================================================


@dataclass
class WebhookResult:
    reports: int
    enqueue_wall_s: float
    enqueue_cpu_s: float
    drain_wall_s: float
    drain_cpu_s: float
    counts: dict[str, int]
    lines: int
    verified_lines: int
    matched: bool
    connections: int

    @property
    def wall_per_report_s(self) -> float:
        return (self.enqueue_wall_s + self.drain_wall_s) / self.reports

    @property
    def cpu_per_report_s(self) -> float:
        return (self.enqueue_cpu_s + self.drain_cpu_s) / self.reports


class _ConnectionCounter(logging.Handler):
    """Counts httpcore's ``connect_tcp.started`` debug events: TCP connections opened."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("connect_tcp.started"):
            self.count += 1


@contextlib.contextmanager
def count_connections() -> Iterator[_ConnectionCounter]:
    logger = logging.getLogger("httpcore.connection")
    counter = _ConnectionCounter()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
        logger.propagate = propagate


def start_receiver(tmp: Path, out: Path, trust: str) -> tuple[subprocess.Popen[bytes], int]:
    log_path = tmp / "receiver.stderr"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "overflowd.cli.receive",
                "--listen",
                "127.0.0.1:0",
                "--out",
                str(out),
                # trusted: without it the receiver's per-key caps (1/s) would be the figure
                "--trust",
                trust,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            preexec_fn=pin_child(SINK_CPU),
        )
    deadline = time.monotonic() + 20
    marker = "listening on http://127.0.0.1:"
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if marker in text:
            port = int(text.split(marker, 1)[1].split()[0].strip("/"))
            return proc, port
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"receiver did not start: {log_path.read_text(errors='replace')[-500:]}")


def run_webhooks(identity: NodeIdentity, rows: Sequence[FlowRow]) -> WebhookResult:
    import trio

    from overflowd.identity import verify_report
    from overflowd.notify import WebhookSettings
    from overflowd.pipeline import ReportMaker
    from overflowd.services.webhook import WebhookDelivery, enqueue
    from overflowd.store import Store

    maker = make_maker(identity)
    assert isinstance(maker, ReportMaker)
    now_ms = int(time.time() * 1000)
    reports = [maker.make(row, 0.001, now_ms) for row in loopback_rows(rows)]
    sent_ids = {r.report_id for r in reports}
    tmp = Path(tempfile.mkdtemp(prefix="overflowd-bench-notify-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        out = tmp / "received.jsonl"
        proc, port = start_receiver(tmp, out, identity.public_key_b64)
        url = f"http://127.0.0.1:{port}/"
        settings = WebhookSettings(
            targets=(("127.0.0.0/8", url),),
            allow_prefixes=("127.0.0.0/8",),
            require_https=False,
        )
        with Store.open(f"sqlite:///{tmp / 'outbox.db'}") as store:
            w0, c0 = time.perf_counter(), time.process_time()
            for report in reports:
                enqueue(store, report, [url])
            w1, c1 = time.perf_counter(), time.process_time()
            delivery = WebhookDelivery(store, identity, settings)
            with count_connections() as connections:
                counts = trio.run(functools.partial(delivery.drain, timeout_s=WEBHOOK_TIMEOUT_S))
            w2, c2 = time.perf_counter(), time.process_time()
        lines = verified = 0
        got: list[str] = []
        key = identity.public_key
        for line in out.read_bytes().splitlines():
            if not line.strip():
                continue
            lines += 1
            doc = json.loads(line)
            try:
                report = verify_report(rpt.b64url_decode(doc["cose"]))
            except Exception:  # counted, not raised: this is the check
                continue
            if report.observer_key == key:
                verified += 1
                got.append(report.report_id)
        matched = len(got) == len(set(got)) == len(sent_ids) and set(got) == sent_ids
        return WebhookResult(
            reports=len(reports),
            enqueue_wall_s=w1 - w0,
            enqueue_cpu_s=c1 - c0,
            drain_wall_s=w2 - w1,
            drain_cpu_s=c2 - c1,
            counts=counts,
            lines=lines,
            verified_lines=verified,
            matched=matched,
            connections=connections.count,
        )
    finally:
        if proc is not None:
            stop_process(proc)
        shutil.rmtree(tmp, ignore_errors=True)


# Breakdown (--profile): where does a report's time go?
# ============================================================================================


def per_item_us(items: Sequence[object], run: Callable[[], object], runs: int = 5) -> float:
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best / max(1, len(items)) * 1e6


def check_all(payloads: Sequence[rpt.Payload]) -> None:
    for p in payloads:
        rpt._check_payload(p)


def breakdown(identity: NodeIdentity, rows: Sequence[FlowRow], port: int) -> None:
    """Stage by stage timings of make and of the in-band send (best of 5, µs per report)."""
    import cbor2
    import trio

    from overflowd.notify import Budget, BudgetSettings, InbandSettings, plan_inband
    from overflowd.pipeline import ReportMaker, report_payload
    from overflowd.receiver import encode_body
    from overflowd.wire import datagram
    from overflowd.wire import webhook as wh

    maker = make_maker(identity)
    assert isinstance(maker, ReportMaker)
    observer, key = maker.observer, identity.public_key
    protected = rpt.protected_header(key)
    sign = identity.signer()
    nonce = os.urandom(rpt.NONCE_BYTES)
    payloads = [report_payload(r, 0.001, observer=observer, nonce=nonce, now_ms=1) for r in rows]
    maps = [rpt.payload_to_map(p) for p in payloads]
    encoded = [rpt.encode_payload(p) for p in payloads]
    structures = [rpt.sig_structure(protected, b) for b in encoded]
    reports = [maker.make(r, 0.001, int(time.time() * 1000)) for r in loopback_rows(rows)]
    stages: list[tuple[str, Callable[[], object]]] = [
        ("make, whole", lambda: [maker.make(r, 0.001, 1) for r in rows]),
        ("  os.urandom nonce", lambda: [os.urandom(rpt.NONCE_BYTES) for _ in rows]),
        ("  kind_of (policy.explain)", lambda: [maker.kind_of(r) for r in rows]),
        (
            "  report_payload (dataclasses)",
            lambda: [
                report_payload(r, 0.001, observer=observer, nonce=nonce, now_ms=1) for r in rows
            ],
        ),
        ("  _check_payload (field checks)", functools.partial(check_all, payloads)),
        ("  payload_to_map", lambda: [rpt.payload_to_map(p) for p in payloads]),
        ("  cbor2.dumps canonical=True", lambda: [cbor2.dumps(m, canonical=True) for m in maps]),
        ("  (cbor2.dumps not canonical)", lambda: [cbor2.dumps(m) for m in maps]),
        ("  sign Sig_structure", lambda: [sign(x) for x in structures]),
        (
            "  encode_signed, whole",
            lambda: [rpt.encode_signed(p, key, sign, protected=protected) for p in payloads],
        ),
        ("  report_id (SHA-256)", lambda: [rpt.report_id(r.cose) for r in reports]),
    ]
    if hasattr(rpt, "Envelope"):  # (--compare runs this bench on trees without it)
        envelope = rpt.Envelope(key, sign, observer)
        stages += [
            (
                "  Envelope.encode_payload (make's)",
                lambda: [envelope.encode_payload(p) for p in payloads],
            ),
            ("  Envelope.sign, whole", lambda: [envelope.sign(p) for p in payloads]),
        ]
    confinement = InbandSettings(allowed_prefixes=("127.0.0.0/8",)).confinement()
    budget = Budget(
        BudgetSettings(
            global_per_s=1e6,
            burst=10**6,
            per_prefix_per_s=1e6,
            per_prefix_burst=10**6,
            dedup_window_s=0,
        )
    )
    clock = time.monotonic
    stages += [
        (
            "in band: plan_inband (2 targets)",
            lambda: [plan_inband(r, budget, clock(), confinement) for r in reports],
        ),
        (
            "  Confinement.refuse x2",
            lambda: [
                (confinement.refuse(r.payload.flow.src), confinement.refuse(r.payload.flow.dst))
                for r in reports
            ],
        ),
        ("  datagram.to_wire", lambda: [datagram.to_wire(r.cose) for r in reports]),
        ("webhook: encode_body (JSON, per attempt)", lambda: [encode_body(r) for r in reports]),
        (
            "webhook: decode_unverified (per attempt)",
            lambda: [rpt.decode_unverified(r.cose) for r in reports],
        ),
        (
            "webhook: wh.sign (2nd Ed25519 signature)",
            lambda: [wh.sign(r.report_id, 1, b"{}", sign) for r in reports],
        ),
    ]
    print("\nBreakdown, µs per report (best of 5; stages overlap, indented lines are parts):")
    for name, run in stages:
        print(f"  {name:<40} {per_item_us(rows, run):8.1f}")

    data = [datagram.to_wire(r.cose) for r in reports]

    async def trio_sends() -> float:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            best = float("inf")
            for _ in range(5):
                t0 = time.perf_counter()
                for d in data:
                    await sock.sendto(d, (SRC_SINK, port))
                    await sock.sendto(d, (DST_SINK, port))
                best = min(best, time.perf_counter() - t0)
        return best / len(data) * 1e6

    print(f"  {'in band: trio socket.sendto x2 (sinks)':<40} {trio.run(trio_sends):8.1f}")
    for name, value in webhook_breakdown(identity, reports[:500]):
        print(f"  {name:<40} {value:8.1f}")


def webhook_breakdown(
    identity: NodeIdentity, reports: Sequence[rpt.SignedReport]
) -> list[tuple[str, float]]:
    """Outbox transactions alone, and a drain whose HTTP client answers 204 in process (no
    TCP, no receiver): what the delivery machinery costs the sender, in µs of CPU per report."""
    import httpx
    import trio

    from overflowd.notify import WebhookSettings
    from overflowd.services.webhook import WebhookDelivery, enqueue
    from overflowd.store import Store, outbox

    url = "http://127.0.0.1:9/"  # never connected to: the mock transport answers
    settings = WebhookSettings(allow_prefixes=("127.0.0.0/8",), require_https=False)

    class EmptyBody(httpx.AsyncByteStream):
        # A Response built with bytes counts as already read, and the delivery streams its
        # answer (``aiter_raw``): an unread stream is what a real connection gives it.
        async def __aiter__(self) -> AsyncIterator[bytes]:
            return
            yield b""

    def factory(s: WebhookSettings) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.MockTransport(lambda _: httpx.Response(204, stream=EmptyBody()))
        )

    n = len(reports)
    tmp = Path(tempfile.mkdtemp(prefix="overflowd-bench-notify-"))
    try:
        with Store.open(f"sqlite:///{tmp / 'outbox.db'}") as store:
            c0 = time.process_time()
            for report in reports:
                enqueue(store, report, [url])
            c1 = time.process_time()
            ids = [e.id for e in outbox.entries(store)]
            for i in ids:
                outbox.reschedule(store, i, now_ms=0, next_attempt_ms=0, error="bench")
            c2 = time.process_time()
            delivery = WebhookDelivery(store, identity, settings, factory)
            counts = trio.run(functools.partial(delivery.drain, timeout_s=WEBHOOK_TIMEOUT_S))
            c3 = time.process_time()
            assert counts[outbox.DELIVERED] == n, counts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [
        ("webhook: enqueue, CPU", (c1 - c0) / n * 1e6),
        ("webhook: one outbox UPDATE transaction", (c2 - c1) / n * 1e6),
        ("webhook: drain, mock HTTP 204, CPU", (c3 - c2) / n * 1e6),
    ]


# ============================================================================================
# Main
# ============================================================================================


COMPARED = (
    ("sign-sig", "PyNaCl SigningKey.sign, Sig_structure size"),
    ("make", "ReportMaker.make"),
    ("make+inband", "make + send_report, one report at a time"),
    ("daemon path", f"make_all + submit + run, batches of {DAEMON_BATCH}"),
    ("inband send", "send only, pre-made reports"),
    ("floor", "floor: 2 plain sendto"),
)


def compare(args: argparse.Namespace) -> int:
    """Measure git ``args.compare`` and this tree alternately in child runs of this bench."""
    tmp = Path(tempfile.mkdtemp(prefix="overflowd-bench-notify-ref-"))
    try:
        archive = subprocess.run(
            # OVERFLOWD_GIT: the repository to take REF from when this tree is an export
            ["git", "-C", os.environ.get("OVERFLOWD_GIT", str(REPO)), "archive", args.compare],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp), "overflowd"], input=archive, check=True)
        trees = {args.compare: tmp, "this tree": REPO}
        best: dict[str, dict[str, dict[str, float]]] = {t: {} for t in trees}
        loads, lossless, shortfalls = [], True, []
        w0, u0 = time.monotonic(), os.times()
        for _ in range(args.rounds):
            for label, tree in trees.items():
                cmd = [sys.executable, str(Path(__file__).resolve()), "--json", "--skip-webhook"]
                cmd += ["--runs", str(args.runs or 3), "--tree", str(tree)]
                if args.quick:
                    cmd.append("--quick")
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                doc = json.loads(out.strip().splitlines()[-1])  # after the header lines
                loads.append(doc["load"])
                ok = doc["sent"] == doc["received"] and not doc["failed"]
                ok &= doc["budget_drops"] == 0
                if not ok:  # say which run and what: a sink behind under load, or a real fault
                    shortfalls.append(
                        f"{label}: sent {doc['sent']}, counted {doc['received']}, verify "
                        f"failures {doc['failed']}, budget drops {doc['budget_drops']}"
                    )
                lossless &= ok
                for kind in ("us", "cpu_us"):
                    for name, value in doc[kind].items():
                        slot = best[label].setdefault(kind + name, value)
                        best[label][kind + name] = min(slot, value)
        print(
            f"notify bench, {args.compare} vs this tree, {args.rounds} alternating rounds of "
            f"{args.runs or 3} runs each, best of all; load average {min(loads):.2f}-"
            f"{max(loads):.2f} on {os.cpu_count()} cores; every datagram counted and every "
            f"sampled one verified by the sinks, no budget drop: {'yes' if lossless else 'NO'}"
        )
        for line in shortfalls:
            print(f"  not lossless: {line}")
        head = f"| {'what (µs per report; × one signature)':<48}"
        print(head + "".join(f" | {t + ' wall':>16} | {t + ' cpu':>16}" for t in trees) + " |")
        for name, title in COMPARED:
            cells = []
            for label in trees:
                us, cpu = best[label]["us" + name], best[label].get("cpu_us" + name, 0.0)
                ratio = us / best[label]["ussign-sig"]
                cpu_ratio = cpu / best[label]["cpu_ussign-sig"]
                cells.append(f" | {us:7.1f} ({ratio:5.2f}x) | {cpu:7.1f} ({cpu_ratio:5.2f}x)")
            print(f"| {title:<48}" + "".join(cells) + " |")
        t = os.times()
        print(
            f"(ratios: against the signature measured in the same child run; cpu: this "
            f"process, set-up included; {time.monotonic() - w0:.0f} s wall, "
            f"{t.children_user + t.children_system - u0.children_user - u0.children_system:.0f}"
            " s CPU in the children)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="under 30 seconds, rougher")
    p.add_argument("--profile", action="store_true", help="also print a stage-by-stage breakdown")
    p.add_argument("--skip-webhook", action="store_true")
    p.add_argument("--runs", type=int, help="timed runs per candidate (default 8, quick 4)")
    p.add_argument("--json", action="store_true", help="print the in-band figures as JSON only")
    p.add_argument("--tree", help="import overflowd from this checkout (see --compare)")
    p.add_argument(
        "--compare",
        metavar="REF",
        help="also measure git REF (e.g. main) in the same run: both trees alternately, "
        "this bench code, the best of each (in-band figures only)",
    )
    p.add_argument("--rounds", type=int, default=3, help="alternations with --compare")
    p.add_argument("--udp-sink", type=int, metavar="N", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.udp_sink is not None:
        return udp_sink_main(0, max(1, args.udp_sink))
    if args.compare:
        return compare(args)

    t_start = time.monotonic()
    quick = args.quick
    per_pass = 2_000 if quick else 6_000
    runs = args.runs or (4 if quick else 8)
    webhook_reports = 400 if quick else 2_000
    path = trace_path()
    if not path.exists():
        print(f"trace not found: {path}", file=sys.stderr)
        return 2
    rows = load_rows(path, per_pass)
    identity = NodeIdentity.generate()
    from overflowd.pipeline import ReportMaker

    maker = make_maker(identity)
    assert isinstance(maker, ReportMaker)
    example = maker.make(rows[0], 0.001, int(time.time() * 1000))
    sizes = [len(maker.make(r, 0.001, 0).cose) for r in rows[:200]]
    signed: list[bytes] = []

    def capture(message: bytes) -> bytes:
        signed.append(message)
        return identity.sign(message)

    rpt.encode_signed(example.payload, identity.public_key, capture)
    sig_bytes = len(signed[0])

    print(f"overflowd notify benchmark ({'quick' if quick else 'full'}), {time.strftime('%F %T')}")
    print(
        f"trace: {path.name}, {len(rows)} flow records; COSE report {min(sizes)}-{max(sizes)} "
        f"bytes (Sig_structure signed: {sig_bytes} bytes); load average "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (shared machine)"
    )

    sink = UdpSink(verify_every=1 if quick else 10)
    totals = {
        name: InbandTotals() for name in ("make+inband", "daemon path", "inband send", "floor")
    }
    try:
        lo_rows = loopback_rows(rows)
        candidates: list[tuple[str, Candidate]] = [
            ("sign", sign_candidate(per_pass)),
            ("sign-sig", sign_candidate(per_pass, sig_bytes)),
            ("make", make_candidate(identity, rows)),
            (
                "make+inband",
                inband_candidate(
                    identity, lo_rows, sink.port, totals["make+inband"], premade=False
                ),
            ),
            (
                "daemon path",
                daemon_path_candidate(identity, lo_rows, sink.port, totals["daemon path"]),
            ),
            (
                "inband send",
                inband_candidate(identity, lo_rows, sink.port, totals["inband send"], premade=True),
            ),
            ("floor", sendto_floor_candidate(identity, lo_rows, sink.port, totals["floor"])),
        ]
        with pinned(NODE_CPU):
            rates = best_rates(candidates, runs)
        sent = sum(t.datagrams for t in totals.values())
        received = sink.settle(sent)
        sink_final = sink.close()
    finally:
        stop_process(sink.proc)
    if args.json:
        print(json.dumps({
            "us": {name: 1e6 / rate for name, rate in rates.items()},
            "cpu_us": {name: cpu * 1e6 for name, cpu in CPU_PER_ITEM.items()},
            "sent": sent, "received": received, "verified": sink_final.get("verified"),
            "failed": sink_final.get("failed"),
            "budget_drops": sum(t.budget_drops for t in totals.values()),
            "load": os.getloadavg()[0],
        }))  # fmt: skip
        return 0

    webhook: WebhookResult | None = None
    webhook_error = ""
    if not args.skip_webhook:
        try:
            with pinned(NODE_CPU):
                webhook = run_webhooks(identity, rows[:webhook_reports])
        except Exception as exc:  # reported; the rest still prints
            webhook_error = f"{type(exc).__name__}: {exc}"

    # ---- table -------------------------------------------------------------------------------
    t_sign = 1 / rates["sign"]
    t_make = 1 / rates["make"]
    t_make_send = 1 / rates["make+inband"]
    t_send = 1 / rates["inband send"]

    def row(name: str, per_report_s: float, note: str = "") -> None:
        print(
            f"| {name:<46} | {fmt_rate(1 / per_report_s):>9} | {per_report_s * 1e6:>8.1f} | "
            f"{per_report_s / t_sign:>6.2f} | {note}"
        )

    print()
    title = f"what (best of {runs} runs, one core)"
    print(f"| {title:<46} | {'per s':>9} | {'µs/rep':>8} | {'× sig':>6} | note")
    print(f"|{'-' * 48}|{'-' * 11}|{'-' * 10}|{'-' * 8}|------")
    # (CPU µs per report of this process, best run, set-up included: printed after the table)
    row(f"PyNaCl SigningKey.sign, {MESSAGE_BYTES}-byte message", t_sign, "the budget")
    row(
        f"PyNaCl SigningKey.sign, {sig_bytes}-byte message",
        1 / rates["sign-sig"],
        "a report's real Sig_structure",
    )
    row("ReportMaker.make (payload+CBOR+COSE+sign)", t_make)
    row("  envelope = make - sign", t_make - t_sign)
    row("in band: make + send (2 datagrams/report)", t_make_send)
    row(
        "in band, daemon path: make_all + submit + run",
        1 / rates["daemon path"],
        f"batches of {DAEMON_BATCH}",
    )
    row("  send only, pre-made reports", t_send, "plan_inband + to_wire + 2 sendto (own sockets)")
    row("  floor: 2 plain sendto, no plan, no trio", 1 / rates["floor"], "same datagrams, sinks")
    row("  envelope + delivery = make+send - sign", t_make_send - t_sign)
    wh_extra: float | None = None
    wh_extra_wall: float | None = None
    if webhook is not None:
        n = webhook.reports
        per_cpu = webhook.cpu_per_report_s
        per_wall = webhook.wall_per_report_s
        row("webhook: enqueue + deliver, end to end (wall)", per_wall, "receiver fsyncs per line")
        row("  enqueue, 1 SQLite transaction/report (wall)", webhook.enqueue_wall_s / n)
        row("  drain to the receiver (wall)", webhook.drain_wall_s / n)
        row("  enqueue, sender CPU", webhook.enqueue_cpu_s / n)
        row("  drain, sender CPU (all threads)", webhook.drain_cpu_s / n)
        wh_extra = (t_make - t_sign) + per_cpu
        wh_extra_wall = (t_make - t_sign) + per_wall
        row("  envelope + delivery (sender CPU)", wh_extra)
        row("  make + enqueue + deliver (sender CPU)", t_make + per_cpu)

    # ---- checks ------------------------------------------------------------------------------
    print()
    drops = sum(t.budget_drops for t in totals.values())
    errors = sum(t.send_errors for t in totals.values())
    reports_sent = sum(t.reports for t in totals.values())
    print(
        f"in band: {sent} datagrams sent ({reports_sent} reports, 2 datagrams each), "
        f"{received} counted by the sinks on {DST_SINK} and {SRC_SINK} "
        f"({'none lost' if received == sent else f'{sent - received} missing'}); "
        f"budget drops {drops}, send errors {errors}; verified by the sink: "
        f"{sink_final.get('verified')} ok, {sink_final.get('failed')} failed "
        f"({'every' if quick else 'every 10th'} datagram, at most 20,000)"
    )
    if webhook is not None:
        e2e = webhook.reports / (webhook.enqueue_wall_s + webhook.drain_wall_s)
        print(
            f"webhook: {webhook.reports} reports, outbox {webhook.counts}, receiver wrote "
            f"{webhook.lines} lines, {webhook.verified_lines} verify here under the node key: "
            f"{'each sent report exactly once' if webhook.matched else 'MISMATCH'}; "
            f"{e2e:.0f} deliveries/s end to end; {webhook.connections} TCP connections opened "
            f"for {webhook.reports} deliveries"
        )
    elif webhook_error:
        print(f"webhook: FAILED: {webhook_error}")

    # ---- goal --------------------------------------------------------------------------------
    print()
    print(
        f"Goal: envelope + delivery ≤ {GOAL_EXTRA_FRACTION} × signing cost "
        f"({GOAL_EXTRA_FRACTION * t_sign * 1e6:.1f} µs here), i.e. a report made and delivered "
        f"≤ {(1 + GOAL_EXTRA_FRACTION) * t_sign * 1e6:.1f} µs"
    )
    print(f"  envelope alone:  {(t_make - t_sign) / t_sign:.2f} × signing cost")
    inband_ratio = (t_make_send - t_sign) / t_sign
    print(
        f"  in band:  {inband_ratio:.2f} × signing cost -> "
        f"{'MET' if inband_ratio <= GOAL_EXTRA_FRACTION else 'NOT MET'}"
        f" ({t_make_send / t_sign:.2f} signatures' time per report)"
    )
    if wh_extra is not None and wh_extra_wall is not None:
        r_cpu, r_wall = wh_extra / t_sign, wh_extra_wall / t_sign
        print(
            f"  webhook:  {r_cpu:.2f} × signing cost in sender CPU ({r_wall:.2f} × in wall time) "
            f"-> {'MET' if r_cpu <= GOAL_EXTRA_FRACTION else 'NOT MET'}"
        )
    else:
        print("  webhook:  not measured")

    if args.profile:
        psink = UdpSink(verify_every=1000)
        try:
            with pinned(NODE_CPU):
                breakdown(identity, rows[:2000], psink.port)
        finally:
            psink.close()
    print(f"\n(took {time.monotonic() - t_start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
