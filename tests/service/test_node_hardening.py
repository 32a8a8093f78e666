"""The node's per-input boundary and its store path, attacked through the sockets they read.

Review findings reproduced here (issue "Hardening"):
- one IPFIX datagram with samplingProbability 5e-324 made a decoder raise OverflowError and
  the daemon exit (its decode loop caught DecodeError only);
- a store error dropped the batch (reports neither stored nor queued for webhooks) although
  their in-band datagrams had gone out: sending came before storing.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import sqlite3
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.config import Settings
from overflowd.identity import NodeIdentity
from overflowd.notify import BudgetSettings, InbandSettings, WebhookSettings
from overflowd.services.node import NodeService
from overflowd.store import Store, outbox, repository
from overflowd.wire import datagram
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.trace import send_udp, trace_payloads
from tests.unit.test_wire_encoder import (
    IE,
    flowset,
    ipfix_message,
    ipfix_template,
    record,
    sflow_datagram,
    sflow_flow_sample,
    sflow_raw_header,
    udp_frame,
    v9_packet,
    v9_template,
)

IPFIX_FIELDS = [IE(8, 4), IE(12, 4), IE(2, 8), IE(1, 8), IE(4, 1), IE(311, 8)]


def ipfix_with_probability(p: float, *, src: str = "192.0.2.1", dst: str = "198.51.100.2") -> bytes:
    """One template and one record whose samplingProbability (IE 311, float64) is ``p``."""
    values = [IPv4Address(src), IPv4Address(dst), 10, 1000, 17, p]
    return ipfix_message(
        [
            flowset(2, ipfix_template(256, IPFIX_FIELDS)),
            flowset(256, record(IPFIX_FIELDS, values)),
        ]
    )


def v9_one_record(src: str, dst: str, packets: int, *, sport: int = 4000) -> bytes:
    fields = [IE(8, 4), IE(12, 4), IE(2, 4), IE(1, 4), IE(4, 1), IE(7, 2), IE(11, 2)]
    values = [IPv4Address(src), IPv4Address(dst), packets, packets * 100, 17, sport, 53]
    return v9_packet([flowset(0, v9_template(300, fields)), flowset(300, record(fields, values))])


# -- the daemon as a process: one datagram must not stop it -----------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    yield home


def test_a_tiny_sampling_probability_does_not_stop_the_daemon(home: Path) -> None:
    """Review finding: IE 311 = 5e-324 passed isfinite, round(1/p) overflowed, the daemon
    exited. Now the datagram costs itself at most, and what follows is decoded."""
    payloads = trace_payloads()[:20]
    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "1e-3")
    try:
        assert daemon.udp is not None
        send_udp([ipfix_with_probability(5e-324)] * 3, daemon.udp)
        send_udp(payloads, daemon.udp)
        seen = daemon.wait_for("overflowd_decoder_datagrams_total", 23)
        assert seen == 23
        assert daemon.proc.poll() is None, "the daemon died of one datagram"
    finally:
        code, output = daemon.stop()
    assert code == 0, output


# -- property: any datagram, a running node survives it and counts it -------------------------


def _corpus() -> list[bytes]:
    frame = udp_frame("192.0.2.7", "198.51.100.9", 4000, 53, b"x" * 20)
    return [
        *trace_payloads()[:2],
        ipfix_with_probability(0.01),
        v9_one_record("192.0.2.1", "198.51.100.2", 10),
        sflow_datagram(
            [sflow_flow_sample([sflow_raw_header(frame, frame_length=len(frame))], rate=100)]
        ),
    ]


CORPUS = _corpus()


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid datagram of each format with bytes flipped, cut or spliced."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=1500))
    data = bytearray(draw(st.sampled_from(CORPUS)))
    for _ in range(draw(st.integers(0, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


class RunningNode:
    """A NodeService in a thread of its own, for a hypothesis test that is not async."""

    def __init__(self, store: Store) -> None:
        self.node = NodeService(
            NodeIdentity.generate(),
            Settings(),
            store,
            listen=["127.0.0.1:0"],
            inband_listen="127.0.0.1:0",
            rate=1e-6,
        )
        self.address: tuple[str, int] | None = None
        self.error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "node did not start"
        assert self.address is not None, self.error

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(self.node.run)
                self.address = bound[0]
                self._ready.set()

        try:
            trio.run(main)
        except BaseException as exc:  # reported by the test, which is the point
            self.error = exc
            self._ready.set()

    def processed(self) -> int:
        """Datagrams the decode task counted (decoded, refused, or dropped after a bug)."""
        return self.node.statistics().decoder.datagrams

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            trio.from_thread.run_sync(self.node.stop, trio_token=self._token)
        self._thread.join(30)


@pytest.fixture(scope="module")
def running_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    path = tmp_path_factory.mktemp("fuzz-node") / "node.db"
    with Store.open(f"sqlite:///{path}") as store:
        node = RunningNode(store)
        try:
            yield node
        finally:
            node.stop()
    assert node.error is None, repr(node.error)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(datagrams(), min_size=1, max_size=8))
@example([ipfix_with_probability(5e-324)])
@example([ipfix_with_probability(float("inf")), ipfix_with_probability(-0.0)])
def test_any_datagram_leaves_the_decode_task_running_and_counted(
    running_node: RunningNode, batch: list[bytes]
) -> None:
    assert running_node.address is not None
    before = running_node.processed()
    canary = v9_one_record("192.0.2.3", "198.51.100.4", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for data in [*batch, canary]:
            sock.sendto(data, running_node.address)
    want = before + len(batch) + 1
    for _ in range(3000):
        if running_node.processed() >= want or running_node.error is not None:
            break
        threading.Event().wait(0.002)
    assert running_node.error is None, repr(running_node.error)
    # Every datagram reached the decode task and was counted, the canary last: it survived.
    assert running_node.processed() == want


# -- store failures: retried, and nothing leaves before it is stored ---------------------------


def _flow_rows_settings(port: int, hook: str) -> Settings:
    return dataclasses.replace(
        Settings(),
        inband=InbandSettings(port=port, allowed_prefixes=("127.0.0.0/8",)),
        webhook=WebhookSettings(
            targets=(("127.0.0.0/8", hook),),
            allow_prefixes=("127.0.0.0/8",),
            require_https=False,
        ),
        budget=BudgetSettings(per_prefix_burst=1000, per_prefix_per_s=1000.0),
    )


async def test_a_locked_store_delays_reports_and_loses_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: with the database locked past the busy timeout, 5 of 15 reports were
    neither stored nor enqueued, though their in-band datagrams went out. Now the batch waits
    and is tried again; nothing is sent in band before it is committed."""
    monkeypatch.setattr(repository, "SQLITE_BUSY_TIMEOUT_MS", 100)
    path = tmp_path / "node.db"
    inbox = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await inbox.bind(("127.0.0.1", 0))
    port = inbox.getsockname()[1]
    # A URL nobody serves: outbox rows are what is checked, not deliveries.
    hook = "http://127.0.0.1:9/hook"
    with Store.open(f"sqlite:///{path}") as store:
        s = _flow_rows_settings(port, hook)
        node = NodeService(
            NodeIdentity.generate(),
            s,
            store,
            listen=["127.0.0.1:0"],
            inband_listen="127.0.0.1:0",
            rate=1.0,
        )
        node.webhook = None  # outbox rows are checked, nothing delivers them
        lock = sqlite3.connect(path, isolation_level=None)
        got: list[bytes] = []
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(node.run)
                lock.execute("BEGIN EXCLUSIVE")
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                    for i in range(15):
                        out.sendto(
                            v9_one_record("127.0.0.2", "127.0.0.1", 1, sport=1000 + i), bound[0]
                        )
                while node.statistics().store_errors < 2:
                    await trio.sleep(0.05)
                # Locked: tried and failed, and nothing went out in band.
                with trio.move_on_after(0.3):
                    got.append(await inbox.recv(2048))
                assert got == []
                assert node.statistics().reports_signed == 15
                lock.execute("ROLLBACK")
                while node.statistics().reports_stored < 15:
                    await trio.sleep(0.05)
                with trio.move_on_after(5):
                    while len(got) < 15:
                        got.append(await inbox.recv(2048))
                node.stop()
        lock.close()
        inbox.close()
        stats = node.statistics()
        assert stats.reports_stored == 15 and stats.store_retried_batches >= 1
        stored = {r.report_id for r in store.query_reports(limit=100)}
        assert len(stored) == 15
        rows = outbox.entries(store, limit=100)
        assert {e.report_id for e in rows} == stored
        sent = {datagram.from_wire(d) for d in got}
        assert len(sent) == 15  # to 127.0.0.1; the copies to 127.0.0.2 go unheard
        assert {rpt.report_id(c) for c in sent} == stored


# -- kill -9 while flows arrive: whatever was delivered is in the node's own store -----------


class HookServer:
    """A plain HTTP endpoint on 127.0.0.1 that records the report ids each delivery carries
    (one report's webhook-id, or the ids of a batch: {"reports": [...]}, since #9)."""

    def __init__(self) -> None:
        import http.server

        seen = self.seen = set[str]()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                doc = json.loads(self.rfile.read(length))
                if "reports" in doc:
                    seen.update(str(r["id"]) for r in doc["reports"])
                else:
                    seen.add(self.headers.get("webhook-id", ""))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_kill_9_while_flows_arrive_delivers_only_what_was_stored(home: Path) -> None:
    """Review finding: after kill -9 while flows arrive, reports had been delivered (in band
    and by webhook) that the node's own store never got (4-82 per run): in-band sending came
    before storing, and outbox rows and reports were two transactions."""
    import signal
    import time

    hook = HookServer()
    inbox = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inbox.bind(("127.0.0.1", 0))
    inbox.settimeout(0.01)
    port = inbox.getsockname()[1]
    (home / "overflowd.toml").write_text(
        f'[inband]\nport = {port}\nallowed_prefixes = ["127.0.0.0/8"]\n'
        "[budget]\nglobal_per_s = 100000.0\nburst = 100000\n"
        "per_prefix_per_s = 100000.0\nper_prefix_burst = 100000\n"
        "[webhook]\n"
        f'targets = [{{ prefix = "127.0.0.0/8", url = "{hook.url}" }}]\n'
        'allow_prefixes = ["127.0.0.0/8"]\nrequire_https = false\npoll_interval_s = 0.05\n'
    )
    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "1")
    inband: set[str] = set()
    try:
        assert daemon.udp is not None
        deadline = time.monotonic() + 30
        i = 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
            # Flows keep arriving until well after the first deliveries, then kill -9 at once.
            while time.monotonic() < deadline and (len(inband) < 200 or len(hook.seen) < 50):
                for _ in range(20):
                    i += 1
                    src = f"127.0.{1 + i % 200}.{1 + i // 200 % 250}"
                    record = v9_one_record(src, "127.0.0.1", 1, sport=1024 + i % 60000)
                    out.sendto(record, daemon.udp)
                try:
                    while True:
                        inband.add(rpt.report_id(datagram.from_wire(inbox.recv(2048))))
                except TimeoutError:
                    pass
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait(10)
        try:
            while True:
                inband.add(rpt.report_id(datagram.from_wire(inbox.recv(2048))))
        except TimeoutError:
            pass
    finally:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
        daemon.proc.communicate(timeout=10)
        hook.close()
        inbox.close()
    assert len(inband) >= 200 and len(hook.seen) >= 50, (len(inband), len(hook.seen))
    with Store.open(f"sqlite:///{home / 'overflowd.db'}") as store:
        stored = {r.report_id for r in store.query_reports()}
    assert inband - stored == set(), f"{len(inband - stored)} sent in band but never stored"
    assert hook.seen - stored == set(), f"{len(hook.seen - stored)} delivered but never stored"


async def test_reports_stored_while_draining_are_sent_in_band(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: the in-band sender was cancelled the moment the store writer ended, so
    the reports committed during the drain (the last batch) were never sent, uncounted."""
    monkeypatch.setattr(repository, "SQLITE_BUSY_TIMEOUT_MS", 100)
    path = tmp_path / "node.db"
    inbox = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await inbox.bind(("127.0.0.1", 0))
    port = inbox.getsockname()[1]
    with Store.open(f"sqlite:///{path}") as store:
        s = _flow_rows_settings(port, "http://127.0.0.1:9/hook")
        node = NodeService(
            NodeIdentity.generate(),
            s,
            store,
            listen=["127.0.0.1:0"],
            inband_listen="127.0.0.1:0",
            rate=1.0,
        )
        node.webhook = None
        lock = sqlite3.connect(path, isolation_level=None)
        got: list[bytes] = []
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(node.run)
                lock.execute("BEGIN EXCLUSIVE")
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                    for i in range(15):
                        record = v9_one_record("127.0.0.2", "127.0.0.1", 1, sport=1000 + i)
                        out.sendto(record, bound[0])
                while node.statistics().store_errors < 1:
                    await trio.sleep(0.05)
                node.stop()  # the batch is still waiting for the store: it drains now
                await trio.sleep(0.2)
                lock.execute("ROLLBACK")  # well inside drain_timeout_s

                async def collect() -> None:
                    with trio.move_on_after(3):
                        while len(got) < 15:
                            got.append(await inbox.recv(2048))

                nursery.start_soon(collect)
        lock.close()
        inbox.close()
        stats = node.statistics()
        assert stats.reports_stored == 15  # committed during the drain, and sent
        assert len(got) == 15 and stats.inband_unsent_at_stop == 0
