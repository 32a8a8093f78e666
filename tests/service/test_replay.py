"""``overflowd replay`` on the shared trace: the numbers add up and nothing touches the network."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from overflowd.store import Store, default_url
from tests.support.cli import BIN, run
from tests.support.trace import netflow_v5_trace


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    return home


def _decoded_records() -> int:
    result = run("overflowd", "decode", str(netflow_v5_trace()), "--json")
    assert result.code == 0, result.err
    return len(result.out.splitlines())


def test_replay_summary_agrees_with_decode_and_the_store(home: Path) -> None:
    result = run(
        "overflowd",
        "replay",
        str(netflow_v5_trace()),
        "--home",
        str(home),
        "--rate",
        "1e-3",
        "--json",
    )
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert summary["records"] == _decoded_records()
    assert summary["truncated_frames"] == 1  # the file's last frame is cut short
    assert summary["malformed"] == 0
    sigma = summary["expected_sampled"] ** 0.5
    assert abs(summary["sampled"] - summary["expected_sampled"]) < 4 * sigma
    assert summary["reports_new"] == summary["sampled"]
    store = Store.open(default_url(home))
    try:
        rows = store.query_reports()
        assert len(rows) == summary["sampled"]
        assert {r.via for r in rows} == {"import"}
        assert {r.sampling_format for r in rows} == {"netflow-v5"}
    finally:
        store.close()


def test_replay_makes_no_network_system_call(home: Path, tmp_path: Path) -> None:
    """Thousands of reports are made and not one socket is opened."""
    strace = shutil.which("strace")
    assert strace, "strace is needed (Debian package strace; make test installs it)"
    log = tmp_path / "strace.log"
    proc = subprocess.run(
        [
            strace,
            "-f",
            "-qq",
            "-e",
            "trace=socket,connect,sendto,sendmsg,sendmmsg",
            "-o",
            str(log),
            str(BIN / "overflowd"),
            "replay",
            str(netflow_v5_trace()),
            "--home",
            str(home),
            "--rate",
            "0.01",
            "--no-store",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["sampled"] > 1000
    calls = [line for line in log.read_text().splitlines() if "(" in line]
    # Python may open AF_UNIX sockets for nothing here; an AF_INET/AF_INET6 one is a failure.
    inet = [c for c in calls if "AF_INET" in c or "sin_port" in c or "sin6_port" in c]
    assert inet == [], inet[:5]


def test_replay_of_a_missing_file_is_one_line(home: Path) -> None:
    result = run("overflowd", "replay", "/nonexistent.pcap", "--home", str(home))
    assert result.code == 1 and result.err.count("\n") == 1
