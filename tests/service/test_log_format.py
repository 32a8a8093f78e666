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
    # the field is the whole argument (a value, never more fields)
    assert doc["sender"] == "192.0.2.1\n{\"level\": \"critical\"}"
    assert doc["peer"] == "198.51.100.7"


def _record(msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord("overflowd.peers", logging.WARNING, __file__, 1, msg, args, None)


def test_a_network_string_cannot_forge_or_shadow_a_json_field() -> None:
    """Fields were parsed out of the formatted message: a peer's error text holding
    ' peer=evil level=critical' became a field, and, the first occurrence winning, hid the real
    peer that followed; a message starting with an argument could forge its event."""
    line = JsonFormatter().format(_record(
        "peer.pull_failed error=%s peer=%s took=%.1fms",
        "bad page peer=evil.example origin=forged", "good.example", 12.34,
    ))
    doc = json.loads(line)
    assert doc["event"] == "peer.pull_failed"
    assert doc["peer"] == "good.example"
    assert doc["error"] == "bad page peer=evil.example origin=forged"
    assert doc["took"] == "12.3ms"
    assert "origin" not in doc
    forged = json.loads(JsonFormatter().format(_record("%s", "admin.login user=root")))
    assert "event" not in forged and "user" not in forged


def test_a_forged_newline_stays_in_one_plain_line() -> None:
    """The plain format wrote a network string's newline as is: a second, forged log line."""
    from overflowd.logformat import PLAIN, PlainFormatter

    record = _record("inband.refused sender=%s", "192.0.2.1\n2026-01-01 00:00:00,000 "
                     "CRITICAL overflowd.daemon daemon.compromised\r\u2028x")
    line = PlainFormatter(PLAIN).format(record)
    assert "\n" not in line and "\r" not in line and "\u2028" not in line
    assert line.endswith("inband.refused sender=192.0.2.1\\n2026-01-01 00:00:00,000 CRITICAL "
                         "overflowd.daemon daemon.compromised\\r\\u2028x")
