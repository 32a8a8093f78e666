#!/usr/bin/env python3
"""`overflowd run`'s CPU per record on real NetFlow v9 at a fixed datagram rate.

Not a test: it prints figures. softflowd exports a generated capture (40,000 TEST-NET flows,
tests/support/softflowd_local.py) as NetFlow v9 to 127.0.0.1; the daemon (``overflowd run``
in a fresh home, rate 1e-6, pinned to core 0) is fed those datagrams in a loop from this
process (core 1) at ``--rate`` datagrams/s for ``--seconds``, after its templates. CPU is the
daemon's utime + stime from /proc over the run, records its decoder's counter; kernel drops
from /proc/net/udp. ``--tree DIR`` runs the daemon from another checkout (PYTHONPATH=DIR):
compare branches in the same run, alternating. Sends only to 127.0.0.1. Linux only.

    .venv/bin/python bench/v9_daemon_cpu.py [--rate 4000] [--seconds 10] [--tree DIR ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.request import urlopen

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import softflowd_local  # noqa: E402

DAEMON_CPU, SENDER_CPU = 0, 1


def _pin(cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})


def measure(tree: Path, payloads: Sequence[bytes], rate: float, seconds: float) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(prefix="v9-daemon-cpu-"))
    home = work / "home"
    env = dict(os.environ, PYTHONPATH=str(tree))
    exe = [
        sys.executable,
        "-c",
        "import sys; from overflowd.cli.node import main; sys.exit(main())",
    ]
    subprocess.run(
        [*exe, "init", "--home", str(home)], check=True, capture_output=True, timeout=60, env=env
    )
    log_path = work / "run.log"
    log = log_path.open("w+")
    argv = [*exe, "run", "--home", str(home), "--listen", "127.0.0.1:0"]
    argv += ["--metrics", "127.0.0.1:0", "--rate", "1e-6"]
    proc = subprocess.Popen(
        argv, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=lambda: _pin(DAEMON_CPU)
    )
    try:
        port = metrics = None
        deadline = time.monotonic() + 60
        while port is None or metrics is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("overflowd run did not start: " + log_path.read_text()[-400:])
            time.sleep(0.1)
            text = log_path.read_text(errors="replace")
            m = re.search(r"listening udp 127\.0\.0\.1:(\d+)", text)
            port = int(m.group(1)) if m else None
            m = re.search(r"metrics (http://\S+)", text)
            metrics = m.group(1) if m else None

        def records() -> int:
            with urlopen(metrics, timeout=5) as r:
                page = r.read().decode()
            m = re.search(r"^overflowd_decoder_records_total (\S+)$", page, re.M)
            return int(float(m.group(1))) if m else 0

        def cpu() -> float:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        def drops() -> int:
            for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
                parts = line.split()
                if parts[1].endswith(f":{port:04X}"):
                    return int(parts[-1])
            return 0

        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        target = ("127.0.0.1", port)
        for p in payloads[:16]:  # templates and the first data
            sock.sendto(p, target)
        time.sleep(2)
        r0, c0, w0, k0 = records(), cpu(), time.monotonic(), drops()
        sent, i, t0 = 0, 16, time.monotonic()
        while (now := time.monotonic() - t0) < seconds:
            while sent < int(now * rate):
                sock.sendto(payloads[i], target)
                i = i + 1 if i + 1 < len(payloads) else 16
                sent += 1
            time.sleep(0.001)
        last = -1
        for _ in range(40):  # until the daemon has caught up
            time.sleep(0.25)
            if (r := records()) == last:
                break
            last = r
        r1, c1, w1, k1 = records(), cpu(), time.monotonic(), drops()
        sock.close()
        n = r1 - r0
        return {
            "datagrams": sent,
            "records": n,
            "cpu_s": c1 - c0,
            "us_per_record": (c1 - c0) / n * 1e6 if n else float("nan"),
            "core": (c1 - c0) / (w1 - w0),
            "kernel_drops": k1 - k0,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=4000.0, help="datagrams/s (default 4000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per run (default 10)")
    parser.add_argument("--runs", type=int, default=2, help="runs per tree, alternating")
    parser.add_argument("--tree", action="append", type=Path, help="checkout(s) to run")
    args = parser.parse_args(argv)
    if softflowd_local.SOFTFLOWD is None or sys.platform != "linux":
        print("error: needs Linux and softflowd", file=sys.stderr)
        return 1
    trees = args.tree or [REPO]
    _pin(SENDER_CPU)
    with tempfile.TemporaryDirectory(prefix="v9-daemon-cpu-") as tmp:
        capture = Path(tmp, "traffic.pcap")
        softflowd_local.write_capture(capture, 40_000, seed=1, icmp_share=0.02)
        payloads = softflowd_local.export(capture, 9, Path(tmp))
    print(
        f"softflowd v9: {len(payloads)} datagrams; {args.rate:g} datagrams/s for "
        f"{args.seconds:g} s a run; load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    for run in range(args.runs):
        for tree in trees:
            m = measure(tree, payloads, args.rate, args.seconds)
            print(
                f"  {tree!s:<32} run {run + 1}: {m['records']:>9} records "
                f"{m['us_per_record']:6.2f} us/record  {100 * m['core']:5.1f}% of a core  "
                f"kernel drops {m['kernel_drops']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
