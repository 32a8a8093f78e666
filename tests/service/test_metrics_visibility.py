"""What an operator sees: ``overflowd run`` as a process, its /metrics scraped over HTTP and
read with prometheus_client's parser, its warnings and stop summary read from its output.

Real UDP on loopback in (v5 datagrams from 127.x.y.z sources, spoofed by binding sockets to
them), real in-band datagrams out (to 127.x.y.z receivers of this test), a real HTTP server on
127.0.0.1 for webhooks. Every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import http.server
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from overflowd.identity import NodeIdentity
from overflowd.services.inband import LISTENER_DROP_REASONS, SEND_DROP_REASONS
from overflowd.storage_policy import REFUSAL_REASONS
from overflowd.wire import datagram
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.metrics import Scrape, reasons, scrape
from tests.support.reports import make_payload
from tests.unit.test_wire_v5 import v5

WAIT_S = 30


def ip(text: str) -> int:
    return int(IPv4Address(text))


def flows(*pairs: tuple[str, str], sport: int = 1234) -> bytes:
    """One v5 datagram, a record per (src, dst), dated now (the listener refuses stale ones)."""
    records = [{"src": ip(s), "dst": ip(d), "sport": sport + i} for i, (s, d) in enumerate(pairs)]
    return v5(records, secs=int(time.time()))


def send_from(source: str, to: tuple[str, int], *payloads: bytes) -> None:
    """Send ``payloads`` from ``source`` (any 127/8 address: a spoofed exporter) to ``to``."""
    assert source.startswith("127.") and to[0].startswith("127.")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        for data in payloads:
            sock.sendto(data, to)


def eventually(url: str, check: Callable[[Scrape], bool], timeout_s: float = WAIT_S) -> Scrape:
    """Scrape until ``check`` holds; the last scrape either way (the caller asserts on it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = scrape(url)
        if check(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


class Node(Daemon):
    """The daemon helper of test_daemon, with the in-band listener's address and stderr."""

    def __init__(self, home: Path, *args: str) -> None:
        super().__init__(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *args)
        assert self.proc.stdout is not None
        self.inband: tuple[str, int] | None = None
        line = self.proc.stdout.readline()
        if m := re.match(r"listening inband (\S+):(\d+)", line):
            self.inband = (m.group(1), int(m.group(2)))

    @property
    def url(self) -> str:
        assert self.metrics_url is not None
        return self.metrics_url

    def stop_split(self) -> tuple[int, str, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(15)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out, err


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    yield home


@pytest.fixture
def node_factory(home: Path) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def start(config: str, *args: str) -> Node:
        (home / "overflowd.toml").write_text(config)
        node = Node(home, *args)
        started.append(node)
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.communicate(timeout=30)


def receivers(*addresses: str) -> tuple[int, dict[str, socket.socket]]:
    """UDP sockets on the same free port at each 127/8 address (where in-band datagrams go)."""
    socks: dict[str, socket.socket] = {}
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    first.bind((addresses[0], 0))
    port = first.getsockname()[1]
    socks[addresses[0]] = first
    for address in addresses[1:]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
        socks[address] = sock
    return port, socks


def received_datagrams(sock: socket.socket, *, quiet_s: float = 0.3) -> list[bytes]:
    """What ``sock`` holds now, waiting up to ``quiet_s`` for each next one."""
    sock.settimeout(quiet_s)
    out = []
    while len(out) < 100:
        try:
            out.append(sock.recv(2048))
        except TimeoutError:
            break
    return out


# -- in band: one family of drops, by reason --------------------------------------------------


def test_inband_drops_are_counted_by_reason_and_summed_at_stop(
    node_factory: Callable[..., Node],
) -> None:
    """Five reports, ten targets: three sent; each of the seven others counted once under the
    reason the plan refused it for, in overflowd_send_dropped_total{channel="inband"}."""
    allowed = ("127.1.0.1", "127.1.0.2", "127.2.0.1")
    refused = ("127.1.0.3", "127.1.0.4", "127.3.0.1")
    port, socks = receivers(*allowed, *refused)
    config = (
        f'[inband]\nallowed_prefixes = ["127.0.0.0/8"]\nport = {port}\n'
        # Two per /24 and three in all, refilled only after ~1000 s: exact counts.
        "[budget]\nper_prefix_burst = 2\nper_prefix_per_s = 0.001\n"
        "burst = 3\nglobal_per_s = 0.001\n"
    )
    node = node_factory(config, "--rate", "1")
    try:
        assert node.udp is not None
        before = scrape(node.url)
        assert reasons(before, "overflowd_send_dropped_total", channel="inband") == dict.fromkeys(
            SEND_DROP_REASONS, 0
        )
        send_from(
            "127.0.0.1",
            node.udp,
            flows(
                ("127.1.0.1", "224.0.0.5"),  # sent to src; dst multicast: special
                ("192.0.2.1", "127.1.0.2"),  # src outside allowed: not_allowed; dst sent
                ("127.1.0.3", "127.1.0.4"),  # 127.1.0/24 spent its 2: prefix_budget x2
            ),
        )
        # The first flow again (same five-tuple): duplicate for 127.1.0.1, special again;
        # then a fresh /24 for src (the third and last global token) and none left for dst.
        send_from("127.0.0.1", node.udp, flows(("127.1.0.1", "224.0.0.5")))
        send_from("127.0.0.1", node.udp, flows(("127.2.0.1", "127.3.0.1")))
        s = eventually(
            node.url,
            lambda s: s.total("overflowd_send_dropped_total") >= 7
            and s.value("overflowd_inband_sent_total") >= 3,
        )
        assert s.types["overflowd_send_dropped"] == "counter"
        assert reasons(s, "overflowd_send_dropped_total", channel="inband") == {
            "not_allowed": 1,
            "special": 2,
            "duplicate": 1,
            "prefix_budget": 2,
            "global_budget": 1,
            "shed": 0,
            "send_error": 0,
        }
        assert s.value("overflowd_inband_sent_total") == 3
        assert s.value("overflowd_stored_reports_total", via="local") == 5
        for address in allowed:
            got = received_datagrams(socks[address])
            assert len(got) == 1, address
            datagram.from_wire(got[0])  # a well-formed overflowd datagram
        for address in refused:
            assert received_datagrams(socks[address], quiet_s=0.05) == [], address
    finally:
        code, out, err = node.stop_split()
        for sock in socks.values():
            sock.close()
    assert code == 0, err
    assert (
        "stopped: inband sent=3 not_sent=7 not_allowed=1 special=2 duplicate=1 prefix_budget=2 "
        "global_budget=1 unsent_at_stop=0" in out
    ), out
    assert "stopped: stored local=5 udp=0 duplicates=0 unstored_at_stop=0" in out, out


def test_a_full_sender_queue_is_counted_as_shed(node_factory: Callable[..., Node]) -> None:
    """inband.queue_reports = 1: of 20 reports committed in one batch, the sender takes what
    its queue holds and the rest are shed, counted, never blocking the store writer."""
    config = (
        '[inband]\nallowed_prefixes = ["127.0.0.0/8"]\nport = 9\nqueue_reports = 1\n'
        "[budget]\nper_prefix_burst = 1000\nburst = 1000\n"
    )
    node = node_factory(config, "--rate", "1")
    try:
        assert node.udp is not None
        pairs = [(f"127.5.0.{i}", f"127.6.0.{i}") for i in range(1, 21)]
        send_from("127.0.0.1", node.udp, flows(*pairs))
        s = eventually(
            node.url, lambda s: s.value("overflowd_stored_reports_total", via="local") == 20
        )
        assert s.value("overflowd_stored_reports_total", via="local") == 20

        def accounted(s: Scrape) -> float:
            shed = s.value("overflowd_send_dropped_total", channel="inband", reason="shed")
            return shed + s.value("overflowd_inband_sent_total") / 2

        s = eventually(node.url, lambda s: accounted(s) == 20)
        shed = s.value("overflowd_send_dropped_total", channel="inband", reason="shed")
        sent = s.value("overflowd_inband_sent_total")
        assert shed >= 1
        assert shed + sent / 2 == 20  # each report it took went to both ends
    finally:
        code, out, _err = node.stop_split()
    assert code == 0
    assert f"stopped: inband sent={int(sent)} not_sent={int(shed)} shed={int(shed)} " in out


# -- per exporter, bounded --------------------------------------------------------------------


def exporter_labels(s: Scrape) -> set[str]:
    return {
        dict(labels)["exporter"]
        for (name, labels) in s.samples
        if name.startswith("overflowd_exporter_") and name.endswith("_total")
    }


def test_per_exporter_counters_stay_bounded_under_spoofed_sources(
    node_factory: Callable[..., Node],
) -> None:
    """200 spoofed exporters: 64 labels (the default cap) and "other"; the sums stay exact,
    and an exporter labelled before the flood keeps its own series through it."""
    node = node_factory("", "--rate", "1e-6")
    try:
        assert node.udp is not None
        one = flows(("192.0.2.1", "198.51.100.1"))
        three = flows(*[("192.0.2.1", "198.51.100.1")] * 3)
        send_from("127.0.0.1", node.udp, three, three, b"\x00\x05garbage", b"\xff" * 30)
        first = eventually(node.url, lambda s: s.value("overflowd_decoder_datagrams_total") == 4)
        assert first.value("overflowd_exporter_datagrams_total", exporter="127.0.0.1") == 4
        spoofed = [f"127.77.{i // 100}.{i % 100 + 1}" for i in range(200)]
        for source in spoofed:
            send_from(source, node.udp, one)
        send_from("127.0.0.1", node.udp, one)
        # Both the decoder's total and the per-exporter table: they are two counters, and a
        # scrape between their updates saw 205 beside 4 for 127.0.0.1 (a red CI, 1 run in 3).
        s = eventually(
            node.url,
            lambda s: s.value("overflowd_decoder_datagrams_total") == 205
            and s.total("overflowd_exporter_datagrams_total") == 205,
        )
        again = scrape(node.url)
    finally:
        code, _out, err = node.stop_split()
    assert code == 0, err
    labels = exporter_labels(s)
    assert len(labels) == 65 and "other" in labels and "127.0.0.1" in labels
    assert labels <= {"127.0.0.1", "other", *spoofed}
    assert s.value("overflowd_exporter_labels") == 64
    assert exporter_labels(again) == labels  # labels are kept, not reshuffled per scrape
    assert s.value("overflowd_exporter_datagrams_total", exporter="127.0.0.1") == 5
    assert s.value("overflowd_exporter_records_total", exporter="127.0.0.1") == 7
    assert s.value("overflowd_exporter_malformed_total", exporter="127.0.0.1") == 2
    assert s.total("overflowd_exporter_datagrams_total") == 205
    assert s.total("overflowd_exporter_records_total") == 207
    assert s.total("overflowd_exporter_malformed_total") == 2
    assert s.value("overflowd_exporter_datagrams_total", exporter="other") == 200 - 63
    assert s.types["overflowd_exporter_datagrams"] == "counter"


def test_refused_exporters_are_named_once_a_minute_and_counted_per_exporter(
    node_factory: Callable[..., Node],
) -> None:
    config = (
        '[collector]\nallowed_exporters = ["127.0.0.1/32"]\n'
        "[metrics]\nmax_exporter_labels = 8\n"
    )
    node = node_factory(config, "--rate", "1e-6")
    one = flows(("192.0.2.1", "198.51.100.1"))
    try:
        assert node.udp is not None
        send_from("127.9.0.1", node.udp, *[one] * 5)
        send_from("127.9.0.2", node.udp, *[one] * 3)
        send_from("127.0.0.1", node.udp, one, one)
        s = eventually(
            node.url,
            lambda s: s.value("overflowd_collector_exporter_refused_total") == 8
            and s.value("overflowd_decoder_datagrams_total") == 2,
        )
        assert s.series("overflowd_exporter_refused_total", "exporter") == {
            "127.9.0.1": 5,
            "127.9.0.2": 3,
            "127.0.0.1": 0,
            "other": 0,
        }
        assert s.value("overflowd_exporter_datagrams_total", exporter="127.9.0.1") == 5
        assert s.value("overflowd_exporter_datagrams_total", exporter="127.0.0.1") == 2
        assert s.value("overflowd_exporter_records_total", exporter="127.9.0.1") == 0
        flood = [f"127.10.0.{i}" for i in range(1, 31)]
        for source in flood:
            send_from(source, node.udp, one)
        s = eventually(
            node.url, lambda s: s.value("overflowd_collector_exporter_refused_total") == 38
        )
    finally:
        code, out, err = node.stop_split()
    assert code == 0, err
    assert len(exporter_labels(s)) == 9 and s.value("overflowd_exporter_labels") == 8
    refused = s.series("overflowd_exporter_refused_total", "exporter")
    assert sum(refused.values()) == 38
    assert refused["other"] == 38 - 5 - 3 - 5  # five of the flood got the last labels
    # One line per exporter (none refused twice within the minute), naming it and the count.
    lines = [x for x in err.splitlines() if "collector.exporter_refused" in x]
    assert len(lines) == 32, err
    assert sum("exporter=127.9.0.1 datagrams=1 " in x for x in lines) == 1
    assert sum("exporter=127.9.0.2 datagrams=1 " in x for x in lines) == 1
    assert all("reason=not_in_allowed_exporters" in x for x in lines)
    assert "stopped: refused exporters=38 inband=0 storage_budget=0" in out, out


# -- store: budget refusals, outbox rows, size ------------------------------------------------


def test_every_storage_refusal_reason_is_exposed_and_moves(
    node_factory: Callable[..., Node],
) -> None:
    observer = NodeIdentity(seed=b"\x62" * 32)

    def report(n: int) -> bytes:
        payload = make_payload("127.0.0.1", "127.0.0.2", time_ms=int(time.time() * 1000))
        payload = dataclasses.replace(payload, flow=dataclasses.replace(payload.flow, sport=n))
        return datagram.to_wire(observer.sign_report(payload).cose)

    # Room for one received report, which a new key may take (no pool for new keys).
    node = node_factory("[storage]\nreceived_max_reports = 1\nnew_keys_max_fraction = 1.0\n")
    try:
        assert node.inband is not None
        s = scrape(node.url)
        assert reasons(s, "overflowd_storage_refused_total") == dict.fromkeys(REFUSAL_REASONS, 0)
        assert reasons(s, "overflowd_inband_refused_total") == dict.fromkeys(
            LISTENER_DROP_REASONS, 0
        )
        send_from("127.0.0.1", node.inband, report(1))
        s = eventually(
            node.url, lambda s: s.value("overflowd_stored_reports_total", via="udp") == 1
        )
        assert s.value("overflowd_stored_reports_total", via="udp") == 1
        send_from("127.0.0.1", node.inband, report(2), b"not a datagram")
        s = eventually(node.url, lambda s: s.value("overflowd_inband_received_total") == 3)
    finally:
        code, out, err = node.stop_split()
    assert code == 0, err
    assert reasons(s, "overflowd_storage_refused_total") == {
        **dict.fromkeys(REFUSAL_REASONS, 0),
        "total_reports": 1,
    }
    assert s.value("overflowd_inband_refused_total", reason="storage") == 1
    assert s.value("overflowd_inband_refused_total", reason="bad_magic") == 1
    assert "stopped: stored local=0 udp=1 " in out, out
    assert "inband=2 bad_magic=1 storage=1 storage_budget=1 total_reports=1" in out, out


class Hooks(http.server.BaseHTTPRequestHandler):
    """/ok 200, /busy 503 (retry later), /gone 410, /slow 200 once ``release`` is set."""

    release = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path == "/slow":
            self.release.wait(WAIT_S)
        status = {"/ok": 200, "/busy": 503, "/gone": 410, "/slow": 200}.get(self.path, 404)
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_outbox_rows_by_state_and_store_bytes(
    home: Path, node_factory: Callable[..., Node]
) -> None:
    Hooks.release = threading.Event()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    targets = ", ".join(
        f'{{prefix = "127.{n}.0.0/24", url = "{base}/{path}"}}'
        for n, path in ((1, "ok"), (2, "busy"), (3, "gone"), (4, "slow"))
    )
    config = (
        "[metrics]\ngauges_interval_s = 0.1\n"
        '[webhook]\nallow_prefixes = ["127.0.0.0/8"]\nrequire_https = false\n'
        f"targets = [{targets}]\npoll_interval_s = 0.1\n"
    )
    node = node_factory(config, "--rate", "1")

    def rows(s: Scrape) -> dict[str, float]:
        return s.series("overflowd_webhook_outbox_rows", "state")

    try:
        assert node.udp is not None
        s = scrape(node.url)
        assert s.types["overflowd_webhook_outbox_rows"] == "gauge"
        assert rows(s) == {"pending": 0, "in_flight": 0, "dead": 0, "delivered": 0}
        send_from(
            "127.0.0.1",
            node.udp,
            flows(*[(f"127.{n}.0.1", f"127.{n}.0.2") for n in (1, 2, 3, 4)]),
        )
        want = {"pending": 1, "in_flight": 1, "dead": 1, "delivered": 1}
        s = eventually(node.url, lambda s: rows(s) == want)
        assert rows(s) == want
        Hooks.release.set()
        want = {"pending": 1, "in_flight": 0, "dead": 1, "delivered": 2}
        s = eventually(node.url, lambda s: rows(s) == want)
        assert rows(s) == want
        db = home / "overflowd.db"

        def on_disk() -> int:
            wal = Path(f"{db}-wal")
            return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

        s = eventually(node.url, lambda s: s.value("overflowd_store_bytes") == on_disk())
        assert s.value("overflowd_store_bytes") == on_disk() > 0
        assert s.value("overflowd_store_gauge_reads_total", outcome="ok") >= 1
        assert s.value("overflowd_store_gauge_reads_total", outcome="timeout") == 0
    finally:
        Hooks.release.set()
        code, out, err = node.stop_split()
        server.shutdown()
        server.server_close()
    assert code == 0, err
    assert "stopped: webhook delivered=2 " in out, out


# -- the [metrics] settings, from a person ----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("max_exporter_labels = -1", "'metrics.max_exporter_labels' must be between 0 and 10000"),
        ("max_exporter_labels = 6.5", "'metrics.max_exporter_labels' must be an integer"),
        ("gauges_interval_s = 0", "'metrics.gauges_interval_s' must be a number of seconds in"),
        ('gauges_timeout_s = "2s"', "'metrics.gauges_timeout_s' must be a number"),
        ("gauges_timeout_s = inf", "'metrics.gauges_timeout_s' must be a number of seconds in"),
    ],
)
def test_a_bad_metrics_setting_is_one_line_naming_file_line_and_key(
    home: Path, line: str, why: str
) -> None:
    config = home / "overflowd.toml"
    config.write_text(f'[metrics]\nlisten = ""\n{line}\n')
    before = sorted(p.name for p in home.iterdir())
    result = run("overflowd", "run", "--home", str(home), "--listen", "127.0.0.1:0")
    assert result.code == 1, result.err
    assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert f"{config}:3: {why}" in result.err
    assert sorted(p.name for p in home.iterdir()) == before  # nothing created
