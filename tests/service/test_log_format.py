"""``--log-format json``: every stderr line of a real daemon is one JSON object with an RFC 3339
time, level, logger and message, and the event's key=value pairs as fields; plain by default."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from overflowd.logformat import JsonFormatter
from tests.support.cli import BIN, call
from tests.support.ratelockd import Ratelockd, make_home

#: inband.allowed_prefixes is a deprecated key: the daemon warns about it at start.
CONFIG = """\
[collector]
listen = ["127.0.0.1:0"]
[inband]
listen = "127.0.0.1:0"
allowed_prefixes = []
[api]
listen = ""
[metrics]
listen = ""
"""


def _run_and_stop(home: Path, *flags: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"}
    proc = subprocess.Popen(
        [str(BIN / "overflowd"), "run", "--home", str(home), "-v", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line or line.startswith("listening inband"):
            break
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err
    return err.splitlines()


def _check_json_lines(lines: list[str]) -> list[dict[str, object]]:
    assert lines
    docs = []
    for line in lines:
        doc = json.loads(line)  # every line, not only ours
        assert isinstance(doc, dict), line
        assert {"time", "level", "logger", "message"} <= set(doc), line
        assert isinstance(doc["time"], str) and doc["time"].endswith("Z"), line
        when = dt.datetime.fromisoformat(doc["time"])
        assert when.tzinfo is not None
        assert abs(when.timestamp() - time.time()) < 300
        assert doc["level"] in {"debug", "info", "warning", "error", "critical"}
        docs.append(doc)
    return docs


def test_overflowd_run_json_lines(tmp_path: Path) -> None:
    home = tmp_path / "node"
    assert call("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(CONFIG)
    docs = _check_json_lines(_run_and_stop(home, "--log-format", "json"))
    events = {d.get("event"): d for d in docs}
    assert events["config.deprecated"]["level"] == "warning"
    assert events["config.deprecated"]["logger"] == "overflowd.daemon"
    stopping = events["daemon.stopping"]
    assert stopping["signal"] == "SIGTERM" and stopping["level"] == "info"


def test_plain_is_the_default(tmp_path: Path) -> None:
    home = tmp_path / "node"
    assert call("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(CONFIG)
    lines = _run_and_stop(home)
    for line in lines:
        assert not line.startswith("{"), line
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    plain = stamp + r" INFO overflowd.daemon daemon.stopping signal=SIGTERM$"
    assert any(re.match(plain, line) for line in lines), lines


def test_ratelockd_json_lines(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    d = Ratelockd(home, "--log-format", "json", "--log-level", "debug")
    code, err = d.stop()
    assert code == 0, err
    _check_json_lines(err.splitlines())


def test_a_forged_newline_stays_in_one_line() -> None:
    record = logging.LogRecord(
        "overflowd.inband", logging.WARNING, __file__, 1,
        "inband.refused sender=%s", ("192.0.2.1\n{\"level\": \"critical\"}",), None,
    )
    record.peer = "198.51.100.7"  # an extra= field
    line = JsonFormatter().format(record)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "warning" and doc["event"] == "inband.refused"
    assert doc["sender"] == "192.0.2.1" and doc["peer"] == "198.51.100.7"
