"""``overflowd demo`` as a new user runs it: a process, bounded, whose every claim is checked.

What it prints is read back and compared with what is on disk: the victim's store holds the
reports about 127.0.0.2, each verifying; both channels brought some; the confinement refused
the trace's real addresses and nothing went elsewhere; every process it started is gone at
its end (also after Ctrl-C). Once on the shared trace, once on the synthetic flood it falls
back to when the trace is missing.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from overflowd.identity import verify_report
from overflowd.store import Store, default_url
from tests.support.cli import BIN, run
from tests.support.trace import netflow_v5_trace

VICTIM = "127.0.0.2"
#: The demo gives itself 60 s of waiting once the nodes are up; starting them is seconds.
TIMEOUT_S = 120.0


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"}


def _demo(work: Path, *args: str) -> str:
    done = subprocess.run(
        [str(BIN / "overflowd"), "demo", "--dir", str(work), *args],
        capture_output=True, text=True, env=_env(), timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not _left_running(work), "a process the demo started is still running"
    return done.stdout


def _left_running(work: Path, demo_pid: int = 0) -> list[str]:
    """Processes whose command line names the demo's directory (the nodes, the receiver),
    the demo's own but ``demo_pid``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == demo_pid:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(work) in cmdline:
            found.append(f"{pid} {cmdline}")
    return found


def _number(pattern: str, text: str) -> tuple[int, ...]:
    m = re.search(pattern, text)
    assert m, f"no line matching {pattern!r} in:\n{text}"
    return tuple(int(g) for g in m.groups())


def _check(out: str, work: Path) -> dict[str, int]:
    """Every counter the demo prints, against the victim's store and the receiver's file."""
    store = Store.open(default_url(work / "victim"), create=False)
    try:
        rows, after = [], 0
        while True:
            page, after = store.reports_after(after, 500, dst=ipaddress.ip_network(VICTIM))
            rows.extend(page)
            if len(page) < 500:
                break
    finally:
        store.close()
    held, verified = _number(r"victim store: (\d+) reports about 127\.0\.0\.2, (\d+) verified", out)
    assert held == verified == len(rows) > 0
    for row in rows:  # each one verifies, on its own bytes, as from the router's key
        assert verify_report(row.cose).report_id == row.report_id
    assert len({row.observer_key for row in rows}) == 1
    by_via = collections.Counter(row.via for row in rows)
    udp, webhook = _number(r"by channel udp=(\d+) webhook=(\d+)", out)
    assert (udp, webhook) == (by_via["udp"], by_via["webhook"]) and udp > 0 and webhook > 0
    assert {row.trust for row in rows} == {"pinned"}

    sent, received, stored = _number(
        r"router sent (\d+) datagrams, victim received (\d+) and stored (\d+)", out
    )
    assert sent == received == stored == udp
    delivered, accepted = _number(r"router delivered (\d+) reports .*receiver accepted (\d+)", out)
    lines = (work / "webhook.jsonl").read_text().splitlines()
    assert delivered == accepted == len(lines) > 0
    # Every report the receiver wrote is in the victim's store (once: in band or webhook).
    assert {r.report_id for r in rows} >= {re.search(r'"id":"(\w+)"', x).group(1) for x in lines}  # type: ignore[union-attr]
    (refused,) = _number(r"confinement: (\d+) flow ends outside 127\.0\.0\.2/32 refused", out)
    assert refused > 0
    assert _number(r"sent elsewhere: (\d+)", out) == (0,)
    # The router's stop summary says the same: its refusals, and no send errors.
    (not_allowed,) = _number(r"the router's node: stopped: inband .*not_allowed=(\d+)", out)
    assert not_allowed == refused and "send_error" not in out
    return {"held": held, "udp": udp, "webhook": webhook, "refused": refused}


def test_demo_on_the_shared_trace_shows_reports_in_band_and_by_webhook(tmp_path: Path) -> None:
    trace = netflow_v5_trace()
    work = tmp_path / "demo"
    out = _demo(work, "--trace", str(trace))
    assert "busiest destination 122.166.14.93: 315537 packets in 450 flows" in out
    assert "its 450 records now say dst 127.0.0.2" in out
    counts = _check(out, work)
    assert 20 <= counts["held"] <= 80  # a few dozen at the demo's rate (expected ~46)
    # The signing budget shed nothing: a shed report about the victim biases its estimate low.
    assert _number(r"the router's node: stopped: stored .* shed=(\d+)", out) == (0,)
    assert "contact to call: mailto:abuse@router.example" in out
    # who, as the demo showed it: one observer, the router, pinned, with its contact
    (shown,) = _number(r"demo-router\s+pinned\s+mailto:abuse@router\.example\s+(\d+)", out)
    assert shown == counts["held"]
    assert "(the flood held 315537 packets toward 127.0.0.2" in out
    # ... and asked again: the flows were moved to now (--since 1h finds them all), and the
    # estimate of the packets toward the victim is the trace's within a few sd (~0.3%).
    who = run("overflowd-query", "who", "--dst", VICTIM, "--since", "1h", "--json",
              "--home", str(work / "victim"))  # fmt: skip
    assert who.code == 0, who.err
    (row,) = [json.loads(line) for line in who.out.splitlines() if line.startswith("{")]
    assert row["reports"] == counts["held"] and row["trust"] == "pinned"
    assert abs(row["packets"]["estimate"] - 315537) < 0.02 * 315537


def test_without_the_trace_it_says_so_and_floods_synthetically(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    missing = tmp_path / "nowhere" / "netflow_v5_simpleweb.pcap"
    out = _demo(work, "--trace", str(missing))
    assert f"the shared trace is not at {missing}" in out
    assert "synthetic flood: 20 NetFlow v5 datagrams; toward 127.0.0.2:" in out
    counts = _check(out, work)
    assert counts["held"] == 40  # one report per reflector record (p = 1)


def test_ctrl_c_stops_everything_it_started(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.Popen(
        [str(BIN / "overflowd"), "demo", "--dir", str(work), "--synthetic"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_env(), text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for line in proc.stdout:  # until both nodes run: the most there is to stop
            seen.append(line)
            if line.startswith("router node: collector") or time.monotonic() > deadline:
                break
        assert any(x.startswith("router node: collector") for x in seen), "".join(seen)
        assert len(_left_running(work, proc.pid)) == 3  # receiver, victim, router
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert not _left_running(work)



def test_bad_flags_are_one_line_and_start_nothing(tmp_path: Path) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep").write_text("mine")
    for args, why in (
        (["--dir", str(busy)], f"--dir {busy}: not a new or empty directory"),
        (["--dir", str(tmp_path / "new"), "--rate", "0"], "--rate must be in (0, 1]"),
    ):
        done = run("overflowd", "demo", *args)
        assert done.code == 2 and done.err == f"overflowd: error: {why}\n", done.err
    assert sorted(p.name for p in busy.iterdir()) == ["keep"]
    assert not (tmp_path / "new").exists()
