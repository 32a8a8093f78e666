"""Start-up and memory (issue #16): each CLI command as a whole process, and the idle daemon.

On a SQLite store of ``--reports`` (1,000,000) reports built by bench/query.py's builder (or an
existing one: ``--db``), runs each command ``--runs`` times as a new process, its output into a
pipe, and prints the median and minimum of wall time and of the process's CPU time (user +
system, from ``wait4``): wall grows with the machine's load, CPU much less. Then the idle
daemon: a fresh home (``overflowd init``), ``overflowd run`` with every socket on 127.0.0.1
port 0, and after ``--idle`` seconds its RSS (VmRSS, VmHWM); then ``--traffic`` seconds of
NetFlow v5 (TEST-NET flows, ``--rate`` datagrams a second, to its loopback port) and its RSS
``--idle`` seconds later, then after one API request (the app is built on the first: issue
#16), and that first request's and a second one's wall time and the daemon's CPU time
meanwhile (what the laziness costs); medians of ``--daemon-runs`` daemons per tree.
``--daemon-only`` skips the store and the CLI runs.
Then ``python -X importtime`` of ``reports --dst ADDR`` and of the daemon: the largest
top-level imports.

``--against DIR`` runs the same in the same run with another checkout's code (e.g. main:
``git archive main | tar -x -C /tmp/base``), interleaved run by run, so both see the same load.
Each tree is launched the same way (a ``-c`` launcher that puts the tree first on ``sys.path``
and drops the editable install's finder), so the comparison is fair; the last column is this
venv's real ``overflowd-query`` entry point.

    .venv/bin/python bench/startup.py                          # builds 1M reports: ~3 min
    .venv/bin/python bench/startup.py --keep /tmp/q1m          # ... and keeps the store
    .venv/bin/python bench/startup.py --db sqlite:////tmp/q1m/overflowd.db --against /tmp/base
    .venv/bin/python bench/startup.py --daemon-only --against /tmp/base --daemon-runs 3  # ~2 min

Nothing is sent anywhere else: the daemon binds 127.0.0.1 only; its traffic is loopback.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VICTIM_ADDRESS = "203.0.113.7"
HOUR_MS = 3_600_000

#: Runs module argv[2] of the tree argv[1] as __main__, the editable install's finder removed
#: from sys.meta_path so that the tree's own code is imported (the finder still costs its
#: import in site, in every tree alike).
LAUNCH = (
    "import runpy, sys\n"
    "tree, module = sys.argv[1], sys.argv[2]\n"
    "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
    "sys.path.insert(0, tree)\n"
    "sys.argv = [module] + sys.argv[3:]\n"
    "runpy.run_module(module, run_name='__main__', alter_sys=True)\n"
)


def launch(tree: Path, module: str, *argv: str) -> list[str]:
    return [sys.executable, "-c", LAUNCH, str(tree), module, *argv]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system of the child) and exit status of ``cmd``."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    while proc.stdout.read(1 << 16):  # a pipe, as `| less` or `| grep`
        pass
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    return wall, usage.ru_utime + usage.ru_stime, proc.returncode


def commands(db: str, now_ms: int) -> dict[str, list[str]]:
    since = (
        datetime.datetime.fromtimestamp((now_ms - HOUR_MS) / 1000, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
    return {
        f"reports --dst {VICTIM_ADDRESS}": ["reports", "--db", db, "--dst", VICTIM_ADDRESS],
        f"reports --dst {VICTIM_ADDRESS} --json": [
            "reports", "--db", db, "--dst", VICTIM_ADDRESS, "--json",
        ],
        "who --dst 203.0.113.0/24 --since 1h": [
            "who", "--db", db, "--dst", "203.0.113.0/24", "--since", since,
        ],
        "top --by src --since 1h": ["top", "--db", db, "--by", "src", "--since", since],
        "--help": ["--help"],
    }  # fmt: skip


def stats(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1000:5.0f} ({min(samples) * 1000:4.0f})"


def importtime(cmd: list[str], env: dict[str, str], top: int, *, daemon: bool = False) -> str:
    """The ``top`` largest imports directly under the entry point (cumulative ms)."""
    cmd = [cmd[0], "-X", "importtime", *cmd[1:]]
    if daemon:
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True)
            _wait_ready(proc)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            err.seek(0)
            text = err.read().decode(errors="replace")
    else:
        text = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False).stderr
    rows = []
    for line in text.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( +)(\S+)", line)
        if m and len(m.group(3)) <= 3:  # the launcher's imports and theirs: depth 1-2
            rows.append((int(m.group(2)), m.group(4)))
    rows.sort(reverse=True)
    total = sum(1 for line in text.splitlines() if line.startswith("import time:")) - 1
    shown = ", ".join(f"{name} {us / 1000:.0f}" for us, name in rows[:top])
    return f"{total} modules; {shown}"


def _wait_ready(proc: subprocess.Popen[str], timeout_s: float = 60.0) -> dict[str, str]:
    """Until the daemon prints its API's address (the last thing it binds): its announcements
    ("listening udp" -> "127.0.0.1:PORT", "api" -> its URL)."""
    assert proc.stdout is not None
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"overflowd run exited ({proc.wait()}) before it was ready")
        if line.startswith("listening udp "):
            seen.setdefault("udp", line.split()[2])
        if line.startswith("api "):
            seen["api"] = line.split()[1]
            return seen
    raise RuntimeError("overflowd run not ready in time")


def v5_datagram(now_s: int, serial: int) -> bytes:
    """A NetFlow v5 datagram of 30 TEST-NET flows (192.0.2.0/24 -> 198.51.100.0/24), dated
    now: what an exporter sends, to a daemon on loopback only."""
    head = struct.pack("!HHIIIIBBH", 5, 30, 10_000_000, now_s, 0, serial, 1, 2, 0)
    rest = (10, 1000, 9_999_000, 9_999_500)  # packets, bytes, first and last (uptime ms)
    tail = (80, 0, 0x1B, 6, 0, 64500, 64501, 24, 24, 0)  # dport ... masks, pad
    body = b"".join(
        struct.pack(
            "!IIIHHIIIIHHBBBBHHBBH",
            *(0xC0000200 | (i + serial) % 250 + 1, 0xC6336400 | i % 8 + 1, 0, 1, 2),
            *rest,
            1024 + i,
            *tail,
        )
        for i in range(30)
    )
    return head + body


def send_traffic(udp: str, seconds: float, rate: float) -> int:
    """v5 datagrams at ``rate`` a second for ``seconds`` to ``udp`` (127.0.0.1:PORT)."""
    host, port = udp.rsplit(":", 1)
    assert ipaddress.ip_address(host).is_loopback, udp
    sent = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        start = time.monotonic()
        while (elapsed := time.monotonic() - start) < seconds:
            while sent < elapsed * rate:
                sock.sendto(v5_datagram(int(time.time()), sent), (host, int(port)))
                sent += 1
            time.sleep(0.005)
    return sent


def _rss(pid: int) -> tuple[int, int, int]:
    status = Path(f"/proc/{pid}/status").read_text()

    def field(name: str) -> int:
        m = re.search(rf"^{name}:\s+(\d+)", status, re.M)
        return int(m.group(1)) if m else -1

    return field("VmRSS"), field("VmHWM"), field("Threads")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _api_request(url: str, pid: int) -> tuple[float, float]:
    """Wall ms of GET ``url`` and the daemon's CPU ms meanwhile."""
    cpu, started = _cpu_s(pid), time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as answer:
        assert answer.status == 200
        answer.read()
    return (time.perf_counter() - started) * 1000, (_cpu_s(pid) - cpu) * 1000


def idle_daemon(
    tree: Path,
    env: dict[str, str],
    idle_s: float,
    traffic_s: float = 0.0,
    rate: float = 2000,
    requests: dict[str, tuple[float, float]] | None = None,
) -> dict[str, tuple[int, int, int]]:
    """(VmRSS kB, VmHWM kB, threads) of a fresh node's ``overflowd run``: after ``idle_s`` at
    start; with ``traffic_s``, again ``idle_s`` after that long of v5 traffic at ``rate``
    datagrams a second, and after one API request (GET /v1/identity). ``requests`` gets the
    (wall ms, daemon CPU ms) of that first request and of a second one, after the RSS."""
    home = Path(tempfile.mkdtemp(prefix="s8startup-home-"))
    out: dict[str, tuple[int, int, int]] = {}
    try:
        init = subprocess.run(
            launch(tree, "overflowd.cli.node", "--home", str(home), "init"),
            capture_output=True, env=env, check=False,
        )  # fmt: skip
        if init.returncode != 0:
            raise RuntimeError(f"overflowd init: {init.stderr.decode()[-300:]}")
        proc = subprocess.Popen(
            daemon_cmd(tree, home), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, text=True,
        )  # fmt: skip
        try:
            seen = _wait_ready(proc)
            time.sleep(idle_s)
            out["idle at start"] = _rss(proc.pid)
            if traffic_s > 0:
                send_traffic(seen["udp"], traffic_s, rate)
                time.sleep(idle_s)
                out[f"idle after {traffic_s:g} s of traffic"] = _rss(proc.pid)
                first = _api_request(seen["api"] + "identity", proc.pid)
                time.sleep(1.0)
                out["after one API request"] = _rss(proc.pid)
                if requests is not None:
                    requests["first API request"] = first
                    requests["second API request"] = _api_request(
                        seen["api"] + "identity", proc.pid
                    )
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return out
    finally:
        shutil.rmtree(home, ignore_errors=True)


def daemon_cmd(tree: Path, home: Path) -> list[str]:
    loop = "127.0.0.1:0"
    return launch(
        tree, "overflowd.cli.node", "--home", str(home), "run", "--listen", loop,
        "--inband-listen", loop, "--metrics", loop, "--api", loop,
    )  # fmt: skip


def build_store(directory: Path, n: int) -> tuple[str, int]:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(ROOT))
    import query as bench_query  # bench/query.py: its data and its loader

    from overflowd.store import Store

    now_ms = int(time.time() * 1000)
    print(f"generating {n:,} reports (bench/query.py)", file=sys.stderr)
    data = bench_query.Data(n, now_ms)
    url = f"sqlite:///{directory / 'overflowd.db'}"
    with Store.open(url) as store:
        bench_query.build(store, data)
    return url, now_ms


def newest_ms(db: str) -> int:
    import sqlite3

    path = db.removeprefix("sqlite:///")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        (value,) = conn.execute("SELECT MAX(last_ms) FROM reports").fetchone()
    conn.close()
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=1_000_000)
    parser.add_argument("--db", help="an existing SQLite store built by bench/query.py: its URL")
    parser.add_argument("--keep", type=Path, help="build the store here and leave it")
    parser.add_argument("--against", type=Path, help="another checkout to compare with")
    parser.add_argument("--runs", type=int, default=10, help="runs per command and tree")
    parser.add_argument("--idle", type=float, default=3.0, help="daemon idle seconds")
    parser.add_argument("--top", type=int, default=8, help="imports shown per -X importtime")
    parser.add_argument(
        "--daemon-only",
        action="store_true",
        help="only the idle daemon (no store, no overflowd-query runs)",
    )
    parser.add_argument(
        "--traffic",
        type=float,
        default=10.0,
        help="seconds of v5 traffic before the second idle figure (0: none)",
    )
    parser.add_argument("--rate", type=float, default=2000, help="datagrams/s of that traffic")
    parser.add_argument("--daemon-runs", type=int, default=1, help="idle daemons per tree")
    args = parser.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERFLOWD")}
    # bytecode as an installed CLI has it: compiled once, not in every process
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    tmp: Path | None = None
    if args.daemon_only:
        db, now_ms = "", 0
    elif args.db:
        db = args.db
        now_ms = newest_ms(db)
    else:
        directory = args.keep or Path(tempfile.mkdtemp(prefix="s8startup-store-"))
        directory.mkdir(parents=True, exist_ok=True)
        tmp = None if args.keep else directory
        db, now_ms = build_store(directory, args.reports)
    trees = {"this tree": ROOT}
    if args.against:
        trees = {"against": args.against.resolve(), **trees}
    entry = str(Path(sys.executable).with_name("overflowd-query"))
    try:
        cmds = commands(db, now_ms)
        if args.daemon_only:
            cmds = {}
        for tree in trees.values():  # warm: bytecode written, page cache filled
            for argv in cmds.values():
                timed(launch(tree, "overflowd.cli.query", *argv), env)
        load_before = os.getloadavg()
        results: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
        for _ in range(args.runs):
            for name, argv in cmds.items():
                for label, tree in trees.items():
                    w, c, code = timed(launch(tree, "overflowd.cli.query", *argv), env)
                    if code != 0:
                        raise RuntimeError(f"{label}: overflowd-query {name}: exit {code}")
                    walls, cpus = results.setdefault((label, name), ([], []))
                    walls.append(w)
                    cpus.append(c)
                if os.access(entry, os.X_OK):
                    w, c, _ = timed([entry, *argv], env)
                    walls, cpus = results.setdefault(("entry point", name), ([], []))
                    walls.append(w)
                    cpus.append(c)
        if cmds:  # not --daemon-only
            load_after = os.getloadavg()
            print(
                f"\noverflowd-query as a whole process, {args.runs} runs each, interleaved; "
                f"store {db} ({now_ms}); load average {load_before[0]:.1f} -> {load_after[0]:.1f} "
                f"on {os.cpu_count()} cpus"
            )
            labels = [*trees, *(["entry point"] if ("entry point", "--help") in results else [])]
            print(f"  {'command':44}" + "".join(f"{lab + ' CPU | wall ms p50 (min)':>42}"
                                                for lab in labels))  # fmt: skip
            for name in cmds:
                cells = []
                for lab in labels:
                    walls, cpus = results[(lab, name)]
                    cells.append(f"{stats(cpus)} | {stats(walls)}")
                print(f"  {name:44}" + "".join(f"{c:>42}" for c in cells))

        print(
            f"\nidle `overflowd run` (fresh home, every socket on loopback, {args.idle:g} s idle; "
            f"traffic: v5, 30 TEST-NET flows a datagram, {args.rate:g}/s), "
            f"{args.daemon_runs} run(s) per tree, interleaved; load {os.getloadavg()[0]:.1f}"
        )
        figures: dict[tuple[str, str], list[tuple[int, int, int]]] = {}
        timings: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(args.daemon_runs):
            for label, tree in trees.items():
                requests: dict[str, tuple[float, float]] = {}
                for state, value in idle_daemon(tree, env, args.idle, args.traffic,
                                                args.rate, requests).items():  # fmt: skip
                    figures.setdefault((state, label), []).append(value)
                for what, took in requests.items():
                    timings.setdefault((what, label), []).append(took)
        for (state, label), values in figures.items():
            rss = statistics.median(v[0] for v in values) / 1024
            hwm = statistics.median(v[1] for v in values) / 1024
            print(f"  {state:30} {label:10} VmRSS {rss:6.1f} MB  VmHWM {hwm:6.1f} MB  "
                  f"threads {values[0][2]}")  # fmt: skip
        # What laziness costs: the first request builds the app (and starts the server).
        for (what, label), took in timings.items():
            wall = statistics.median(t[0] for t in took)
            cpu = statistics.median(t[1] for t in took)
            print(f"  {what:30} {label:10} wall {wall:6.0f} ms  daemon CPU {cpu:5.0f} ms")

        print("\n-X importtime, largest imports (cumulative ms; load makes them noisy)")
        for label, tree in trees.items():
            if not args.daemon_only:
                q = launch(tree, "overflowd.cli.query", *cmds[f"reports --dst {VICTIM_ADDRESS}"])
                print(f"  {label:12} reports --dst: {importtime(q, env, args.top)}")
            home = Path(tempfile.mkdtemp(prefix="s8startup-home-"))
            try:
                subprocess.run(launch(tree, "overflowd.cli.node", "--home", str(home), "init"),
                               capture_output=True, env=env, check=True)  # fmt: skip
                text = importtime(daemon_cmd(tree, home), env, args.top, daemon=True)
                print(f"  {label:12} run: {text}")
            finally:
                shutil.rmtree(home, ignore_errors=True)
        print(f"\n(python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f})")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
