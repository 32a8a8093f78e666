"""``make screenshots``: the dashboard's pages as PNGs in docs/dashboard/, from a real node.

A throwaway node on loopback (nothing sent to a flow's addresses), pulling from a second one
(its peer, so that the Peers page has a row: counters and latency), is fed the shared trace a
few times, ten seconds apart, so that the Node page's counter history (one sample per 10 s)
has lines to draw; then headless Chromium (tests/support/chromium.py) takes each page.
About a minute. Run: ``.venv/bin/python -m tests.dashboard_screenshots docs/dashboard``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.service.test_daemon import Daemon
from tests.support.chromium import Chromium
from tests.support.cli import run
from tests.support.trace import send_udp, trace_payloads

ROUNDS = 5
ROUND_S = 10.5


def main(argv: list[str]) -> int:
    out = Path(argv[0] if argv else "docs/dashboard")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dash-shots-") as tmp:
        # a second node on loopback that this one pulls from: the Peers page's row (its
        # counters and latency) comes from a real peer
        peer_home = Path(tmp) / "peer"
        assert run("overflowd", "init", "--home", str(peer_home)).code == 0
        peer = Daemon(peer_home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
        peer_base = peer.line("api ").split()[1].removesuffix("/v1/")
        peer_key = httpx.get(f"{peer_base}/v1/identity", timeout=10).json()["key"]
        home = Path(tmp) / "node"
        assert run("overflowd", "init", "--home", str(home)).code == 0
        (home / "overflowd.toml").write_text(
            '[node]\ncontacts = ["mailto:abuse@example.net"]\nobservation_point = "edge-1"\n'
            "[storage]\nreceived_max_age_days = 36500.0\nown_max_age_days = 36500.0\n"
            f'[[peers]]\nname = "edge-2"\nurl = "{peer_base}/"\nkey = "{peer_key}"\n'
            'trust = "pinned"\npush = false\npull = true\npull_interval_s = 5.0\n'
        )
        daemon = Daemon(
            home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "0.02"
        )
        try:
            base = daemon.line("api ").split()[1].removesuffix("/v1/")
            payloads = trace_payloads()
            assert daemon.udp is not None
            for i in range(ROUNDS):
                started = time.monotonic()
                # each round a different share of the trace, so the lines move
                send_udp(payloads[: len(payloads) * (i + 2) // (ROUNDS + 1)], daemon.udp)
                time.sleep(max(0.0, ROUND_S - (time.monotonic() - started)))
                print(f"round {i + 1}/{ROUNDS}", flush=True)
            top = httpx.get(f"{base}/v1/top", params={"by": "dst", "n": 1}, timeout=10).json()
            dst = top["rows"][0]["key"]
            with Chromium() as browser:
                page = browser.page()
                for name, path in (
                    ("node", "/"),
                    ("victim", f"/victim?dst={dst}&since=2007-07-27T16:48:00Z"),
                    ("reports", "/reports?limit=25"),
                    ("peers", "/peers"),
                ):
                    page.goto(base + path)
                    time.sleep(0.3)
                    page.screenshot(out / f"{name}.png")
                    print(f"{out / name}.png", flush=True)
                errors = page.errors()
                assert not errors, errors
        finally:
            daemon.stop()
            peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
