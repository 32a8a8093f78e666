"""``overflowd key rotate`` against a real Knot zone: during the overlap a peer verifies reports
signed by the old key and by the new one, both as published by the records rotate printed.

Node A signs a report, rotates, signs another. The lines ``key rotate`` printed go, as printed,
into the zone ``0.0.127.in-addr.arpa`` of a real Knot server (tests/support/knot.py). Node B, a
real ``overflowd run`` asking that server, takes both reports in-band from 127.0.0.1 and labels
each ``dns``; a report by a key published nowhere (the control) stays ``unknown``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from overflowd.identity import load_identity, load_previous_public
from overflowd.wire import datagram
from tests.support.cli import BIN, call, run
from tests.support.knot import running_knot, soa_zone

WAIT_S = 30


def sign(home: Path, out: Path) -> str:
    r = call("overflowd", "report", "--home", str(home), "--src", "192.0.2.1",
             "--dst", "198.51.100.7", "--no-store", "--out", str(out))
    assert r.code == 0, r.err
    return r.out.strip()


def test_rotate_keeps_the_previous_key_and_both_verify_during_the_overlap(tmp_path: Path) -> None:
    a, stranger = tmp_path / "a", tmp_path / "stranger"
    for home in (a, stranger):
        assert call("overflowd", "init", "--home", str(home)).code == 0
    old_key = load_identity(a).public_key
    old_id = sign(a, tmp_path / "old.cose")
    rotated = run("overflowd", "key", "rotate", "--home", str(a), "--name", "127.0.0.1/32",
                  "--contact", "mailto:noc@example.net", "--ttl", "60")
    assert rotated.code == 0, rotated.err
    new_key = load_identity(a).public_key
    assert new_key != old_key and load_previous_public(a) == old_key
    assert oct((a / "identity.key").stat().st_mode & 0o777) == "0o600"
    shown = json.loads(call("overflowd", "key", "show", "--home", str(a), "--json").out)
    assert shown["previous_public_key"] == base64.b64encode(old_key).decode()
    new_id = sign(a, tmp_path / "new.cose")
    stranger_id = sign(stranger, tmp_path / "stranger.cose")
    # dns-record --with-previous prints the same two records rotate did.
    again = call("overflowd", "key", "dns-record", "--home", str(a), "--with-previous",
                 "--name", "127.0.0.1/32", "--contact", "mailto:noc@example.net", "--ttl", "60")
    records = [line for line in rotated.out.splitlines() if not line.startswith(";")]
    assert again.out.splitlines() == records and len(records) == 2
    zone = soa_zone("0.0.127.in-addr.arpa", rotated.out, negative_ttl=60)  # ';' are comments
    zones = {"0.0.127.in-addr.arpa": zone, "127.in-addr.arpa": soa_zone("127.in-addr.arpa", "")}

    with running_knot(zones) as knot:
        b = tmp_path / "b"
        assert call("overflowd", "init", "--home", str(b)).code == 0
        (b / "overflowd.toml").write_text(
            f'[registry]\nnameservers = ["{knot.address}"]\ntimeout_s = 2.0\n'
            '[collector]\nlisten = ["127.0.0.1:0"]\n[inband]\nlisten = "127.0.0.1:0"\n'
            '[api]\nlisten = ""\n[metrics]\nlisten = ""\n'
        )
        env = {k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"}
        proc = subprocess.Popen([str(BIN / "overflowd"), "run", "--home", str(b)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stdout is not None
            port = 0
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline and not port:
                line = proc.stdout.readline()
                if not line:
                    break
                if line.startswith("listening inband "):
                    port = int(line.rsplit(":", 1)[1])
            assert port, proc.stderr.read() if proc.poll() is not None else "no inband line"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", 0))
                for name in ("old", "new", "stranger"):
                    cose = (tmp_path / f"{name}.cose").read_bytes()
                    s.sendto(datagram.to_wire(cose), ("127.0.0.1", port))
            trust: dict[str, str | None] = {}
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                got = call("overflowd-query", "reports", "--home", str(b), "--json")
                rows = [json.loads(x) for x in got.out.splitlines() if x.startswith("{")]
                trust = {r["report"]["id"]: r["trust"] for r in rows}
                if len(trust) == 3 and all(v not in (None, "pending") for v in trust.values()):
                    break
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)
    assert trust.get(old_id) == "dns", trust
    assert trust.get(new_id) == "dns", trust
    assert trust.get(stranger_id) == "unknown", trust
