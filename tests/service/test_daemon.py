"""``overflowd run`` as a process: real UDP on loopback in, reports in the store, metrics out."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from overflowd.store import Store, default_url
from overflowd.wire import DecoderState, decode_datagram
from tests.support.cli import BIN, run
from tests.support.trace import send_udp, trace_payloads


class Daemon:
    def __init__(self, home: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"}
        self.proc = subprocess.Popen(
            [str(BIN / "overflowd"), "run", "--home", str(home), "--inband-listen", "127.0.0.1:0",
             "--api", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.udp: tuple[str, int] | None = None
        self.metrics_url: str | None = None
        deadline = time.monotonic() + 30
        assert self.proc.stdout is not None
        while time.monotonic() < deadline and (self.udp is None or self.metrics_url is None):
            line = self.proc.stdout.readline()
            if not line:
                break
            if m := re.match(r"listening udp (\S+):(\d+)", line):
                self.udp = (m.group(1), int(m.group(2)))
            if m := re.match(r"metrics (\S+)", line):
                self.metrics_url = m.group(1)
        if self.udp is None or self.metrics_url is None:
            self.proc.kill()
            raise AssertionError(f"daemon did not start: {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def line(self, prefix: str, timeout_s: float = 30) -> str:
        """The next line on stdout starting with ``prefix`` (the daemon's own announcements,
        such as "listening inband" and "api", printed after the ones read at start)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(prefix):
                return line.rstrip("\n")
            if not line:
                break
        raise AssertionError(f"the daemon printed no line starting {prefix!r}")

    def metric(self, name: str) -> float:
        text = httpx.get(self.metrics_url or "", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_for(self, name: str, value: float, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.metric(name)
            if got >= value:
                return got
            time.sleep(0.1)
        return self.metric(name)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=30)
        return self.proc.returncode, out + err


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    yield home


def test_daemon_collects_samples_signs_and_stores(home: Path) -> None:
    payloads = trace_payloads()
    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "1e-3")
    try:
        assert daemon.udp is not None
        sent = send_udp(payloads, daemon.udp)
        send_udp([b"\x00\x05garbage", b"", b"\xff" * 40], daemon.udp)
        records = daemon.wait_for("overflowd_decoder_records_total", 78684)
        assert records == 78684  # every record of every datagram (no loss on loopback)
        assert daemon.wait_for("overflowd_decoder_malformed_total", 3) == 3
        assert daemon.metric("overflowd_collector_datagrams_total") == sent + 3
        sampled = daemon.metric("overflowd_sampler_sampled_total")
        expected = daemon.metric("overflowd_sampler_expected_total")
        assert abs(sampled - expected) < 4 * expected**0.5 + 1
        stored = daemon.wait_for("overflowd_reports_stored_total", sampled, timeout=20)
    finally:
        code, output = daemon.stop()
    assert code == 0, output
    assert stored == sampled
    assert f"stored {int(sampled)}" in output
    # Three malformed datagrams, one rate-limited warning naming the exporter.
    assert output.count("collector.malformed exporter=127.0.0.1") == 1
    store = Store.open(default_url(home))
    try:
        assert store.count_reports() == sampled
    finally:
        store.close()
    listed = run("overflowd-query", "reports", "--json", "--home", str(home), "--limit", "3")
    assert listed.code == 0 and len(listed.out.splitlines()) == 3


def test_one_socket_takes_ipv6_exporters_too(home: Path) -> None:
    daemon = Daemon(home, "--listen", "[::1]:0", "--metrics", "127.0.0.1:0", "--rate", "1")
    try:
        assert daemon.udp is not None and daemon.udp[0] == "::1"
        payloads = trace_payloads()[:20]
        expected = sum(len(decode_datagram(p, "::1", DecoderState(), 0)) for p in payloads)
        send_udp(payloads, daemon.udp)
        assert daemon.wait_for("overflowd_decoder_records_total", expected) == expected
        # rate 1: every record is reported
        assert daemon.wait_for("overflowd_reports_stored_total", expected) == expected
    finally:
        code, output = daemon.stop()
    assert code == 0, output


def test_hostile_datagrams_do_not_stop_the_daemon(home: Path) -> None:
    """A v5 record whose times fall before 1970 (uptime > now) and whose packet count makes
    p = 1, from any source: the daemon reports it (clamped) and keeps running (review finding)."""
    import ipaddress
    import struct

    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "1")
    try:
        assert daemon.udp is not None
        header = struct.pack(">HHIIIIBBH", 5, 1, 100_000, 0, 0, 0, 0, 0, 0)
        record = struct.pack(
            ">IIIHHIIIIHHBBBBHHBBH",
            int(ipaddress.IPv4Address("192.0.2.1")), int(ipaddress.IPv4Address("198.51.100.1")),
            0, 0, 0, 0xFFFFFFFF, 1000, 0, 0, 1234, 80, 0, 2, 6, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
        send_udp([header + record] * 3, daemon.udp)
        assert daemon.wait_for("overflowd_reports_stored_total", 3, timeout=20) == 3
        assert daemon.proc.poll() is None
    finally:
        code, output = daemon.stop()
    assert code == 0, output


def test_unlisted_exporters_are_refused_and_signing_is_budgeted(home: Path) -> None:
    """collector.allowed_exporters drops spoofable sources before decoding; the signing budget
    caps reports however many records come with p = 1."""
    payloads = trace_payloads()[:20]
    records = sum(len(decode_datagram(p, "127.0.0.1", DecoderState(), 0)) for p in payloads)
    (home / "overflowd.toml").write_text(
        '[collector]\nallowed_exporters = ["192.0.2.0/24"]\n'
        "[sampling]\nmax_reports_per_s = 1.0\nmax_reports_burst = 100\n"
    )
    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "1")
    try:
        assert daemon.udp is not None
        send_udp(payloads, daemon.udp)
        refused = daemon.wait_for("overflowd_collector_exporter_refused_total", len(payloads))
        assert refused == len(payloads)
        assert daemon.metric("overflowd_decoder_records_total") == 0
    finally:
        daemon.stop()
    (home / "overflowd.toml").write_text(
        '[collector]\nallowed_exporters = ["127.0.0.0/8"]\n'
        "[sampling]\nmax_reports_per_s = 1.0\nmax_reports_burst = 100\n"
    )
    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "1")
    try:
        assert daemon.udp is not None
        send_udp(payloads, daemon.udp)
        assert daemon.wait_for("overflowd_decoder_records_total", records) == records
        shed = daemon.wait_for("overflowd_reports_shed_total", records - 110)
        signed = daemon.metric("overflowd_reports_signed_total")
        assert 100 <= signed <= 110 and signed + shed == records
    finally:
        code, output = daemon.stop()
    assert code == 0, output


def test_bad_listen_address_is_a_clear_error(home: Path) -> None:
    result = run(
        "overflowd", "run", "--home", str(home), "--listen", "192.0.2.1:9", "--metrics", "",
        "--api", "",
    )  # fmt: skip
    assert result.code == 1
    assert result.err.startswith("overflowd: error: --listen 192.0.2.1:9: cannot listen")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
