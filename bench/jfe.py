"""jfe beside haproxy and a direct connection, in one run (issue #12's bench Show item).

    sudo .venv/bin/python bench/jfe.py [--bulk-mb 512] [--seconds 5] [--idle 1000]

Two network namespaces (``jfb-*``, TEST-NET 198.51.100.0/24): a client, and a host running
a plaintext discard/reply backend, jfe (TPROXY, its real rules) and haproxy 2.6 (Debian) in
``mode tcp`` terminating TLS with the SAME certificate and key; both negotiate with the same
OpenSSL, so the same cipher (printed). Measured, each side in turn:

- bulk MB/s: one TLS connection uploads ``--bulk-mb`` MiB to the discard backend;
- new TLS connections/s: ``openssl s_time -new`` for ``--seconds``;
- proxy CPU µs per handshake: the proxy process's utime+stime over that s_time run;
- plaintext pass-through MB/s through jfe vs direct to the backend;
- RSS of the proxy with ``--idle`` idle TLS connections open.

Goals (issue #12): bulk >= 80% of haproxy's, connections/s >= 70% at equal CPU (handshakes per
proxy CPU-second), pass-through >= 90% of direct, 1,000 idle connections in under 200 MB. It
prints one row per phase: jfe, the reference, the ratio, the goal, met or not, and each proxy's
CPU (user+sys) per MB or per handshake. ``--profile DIR`` samples jfe with py-spy (if
installed) during each phase. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import netns
from tests.support.jfe_certs import TestCA

HOST = "198.51.100.1"
CLIENT = "198.51.100.2"
JFE_PORT = 6001  # intercepted: the backend listens here too (jfe forwards to it)
DIRECT_PORT = 5001  # not intercepted: haproxy's backend and the direct baseline
HAPROXY_PORT = 7001
NAME = "bench.example"
PY = sys.executable
PHASES = ("bulk", "handshakes", "requests", "passthrough", "idle")

BACKEND = textwrap.dedent(
    """
    import socket, sys, threading
    def serve(c):
        with c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            buf = bytearray(1 << 20)
            total = 0
            while n := c.recv_into(buf):
                total += n
                if buf[n - 1:n] == b"\\n" and total < 200:  # a request: answer it
                    c.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
                    return
    for port in sys.argv[2:]:
        s = socket.create_server((sys.argv[1], int(port)), backlog=4096)
        def loop(s=s):
            while True:
                c, _ = s.accept()
                threading.Thread(target=serve, args=(c,), daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()
    threading.Event().wait()
    """
)

CLIENT_SCRIPT = textwrap.dedent(
    """
    import json, resource, socket, ssl, sys, time
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def tls_ctx():
        ctx = ssl.create_default_context(cafile=sys.argv[4])
        return ctx
    if mode in ("bulk_tls", "bulk_plain"):
        total = int(sys.argv[5]) << 20
        chunk = b"x" * (1 << 20)
        raw = socket.create_connection((host, port), timeout=30)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        conn = tls_ctx().wrap_socket(raw, server_hostname="@NAME@") if mode == "bulk_tls" else raw
        info = conn.cipher() if mode == "bulk_tls" else None
        start = time.perf_counter()
        sent = 0
        while sent < total:
            conn.sendall(chunk)
            sent += len(chunk)
        conn.close()
        print(json.dumps({"mb_s": sent / (time.perf_counter() - start) / 1e6, "cipher": info}))
    elif mode == "idle_tls":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        ctx = tls_ctx()
        held = []
        for _ in range(int(sys.argv[5])):
            raw = socket.create_connection((host, port), timeout=30)
            held.append(ctx.wrap_socket(raw, server_hostname="@NAME@"))
        print(json.dumps({"open": len(held)}), flush=True)
        sys.stdin.readline()
    """
).replace("@NAME@", NAME)


def _cpu(pid: int) -> tuple[float, float]:
    """(user, sys) CPU seconds of ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


class _Profile:
    """``--profile DIR``: py-spy (if installed) samples jfe during each of its phases."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self.spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(PY).parent))
        if directory is not None and self.spy is None:
            print("--profile: no py-spy (pip install py-spy): not profiling", file=sys.stderr)

    @contextlib.contextmanager
    def phase(self, side: str, name: str, pid: int) -> Iterator[None]:
        if self.directory is None or self.spy is None or side != "jfe":
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        out = self.directory / f"jfe-{name}.txt"
        spy = subprocess.Popen(
            [self.spy, "record", "--nonblocking", "--format", "raw", "--rate", "250",
             "-o", str(out), "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attaches
        try:
            yield
        finally:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
            print(f"profile {name}: {out} (top: {_top(out)})", file=sys.stderr)


@contextlib.contextmanager
def _trace(args: argparse.Namespace, side: str, workload: str, pid: int) -> Iterator[None]:
    """``--perf DIR`` records a proxy with ``perf record -g`` during each connection workload,
    ``--strace DIR`` counts its system calls (``strace -c``); never both in one run (ptrace
    stops would fill perf's profile and inflate the CPU figures)."""
    if args.perf is not None and shutil.which("perf"):
        out = args.perf / f"{side}-{workload}.perf.data"
        argv = ["perf", "record", "-q", "-F", "2000", "-g", "-o", str(out), "-p", str(pid)]
        directory = args.perf
    elif args.strace is not None and shutil.which("strace"):
        out = args.strace / f"{side}-{workload}.strace.txt"
        argv = ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)]
        directory = args.strace
    else:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    tool = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    try:
        yield
    finally:
        tool.send_signal(signal.SIGINT)
        try:
            tool.wait(timeout=60)
        except subprocess.TimeoutExpired:
            tool.kill()
            tool.wait()
        print(f"{argv[0]} {side} {workload}: {out}", file=sys.stderr)


def _top(raw: Path, n: int = 3) -> str:
    """The ``n`` functions with the most self samples in a py-spy raw (collapsed) file."""
    own: Counter[str] = Counter()
    with contextlib.suppress(OSError):
        for line in raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                own[stack.rsplit(";", 1)[-1]] += int(count)
    total = sum(own.values()) or 1
    return ", ".join(f"{name} {c * 100 // total}%" for name, c in own.most_common(n))


def _verdict(value: float | None, goal: float, higher: bool = True) -> str:
    if value is None:
        return "not measured"
    return "met" if (value >= goal if higher else value <= goal) else "NOT met"


def _table(results: dict[str, dict[str, Any]], idle: int) -> str:
    """The per-phase comparison: jfe, the reference, ratio, goal, verdict, CPU for both."""
    j, h, d = results["jfe"], results["haproxy"], results["direct"]

    def ratio(a: Any, b: Any) -> float | None:
        return round(float(a) / float(b), 2) if a and b else None

    def cpu(side: dict[str, Any], key: str) -> str:
        user, system = side.get(f"{key}_user_us"), side.get(f"{key}_sys_us")
        if user is None or system is None:
            return "-"
        return f"{user + system:,.0f} ({user:,.0f}u+{system:,.0f}s)"

    bulk = ratio(j.get("bulk_tls_mb_s"), h.get("bulk_tls_mb_s"))
    conn = ratio(j.get("tls_conn_s"), h.get("tls_conn_s"))
    # "At equal CPU": handshakes per proxy CPU-second, jfe's over haproxy's.
    per_cpu = ratio(h.get("cpu_us_per_handshake"), j.get("cpu_us_per_handshake"))
    req = ratio(j.get("req_tls_conn_s"), h.get("req_tls_conn_s"))
    req_cpu = ratio(h.get("req_cpu_us_per_handshake"), j.get("req_cpu_us_per_handshake"))
    plain = ratio(j.get("passthrough_mb_s"), d.get("plain_mb_s"))
    rss = j.get(f"rss_mb_{idle}_idle_tls")
    rows = [
        ("bulk TLS MB/s", j.get("bulk_tls_mb_s"), h.get("bulk_tls_mb_s"), bulk, ">= 0.8x",
         _verdict(bulk, 0.8), cpu(j, "bulk_cpu_per_mb"), cpu(h, "bulk_cpu_per_mb")),
        ("new TLS conn/s", j.get("tls_conn_s"), h.get("tls_conn_s"), conn, "(raw rate)",
         "", cpu(j, "cpu_per_handshake"), cpu(h, "cpu_per_handshake")),
        ("conn/s at equal CPU", j.get("handshakes_per_cpu_s"), h.get("handshakes_per_cpu_s"),
         per_cpu, ">= 0.7x", _verdict(per_cpu, 0.7), "", ""),
        ("new TLS conn+request/s", j.get("req_tls_conn_s"), h.get("req_tls_conn_s"), req,
         "(raw rate)", "", cpu(j, "req_cpu_per_handshake"), cpu(h, "req_cpu_per_handshake")),
        ("conn+request at equal CPU", j.get("req_handshakes_per_cpu_s"),
         h.get("req_handshakes_per_cpu_s"), req_cpu, ">= 0.7x", _verdict(req_cpu, 0.7), "", ""),
        ("pass-through MB/s", j.get("passthrough_mb_s"), d.get("plain_mb_s"), plain,
         ">= 0.9x direct", _verdict(plain, 0.9), cpu(j, "plain_cpu_per_mb"), "(no proxy)"),
        (f"RSS MB, {idle} idle TLS", rss, h.get(f"rss_mb_{idle}_idle_tls"), None, "< 200 MB",
         _verdict(rss, 200.0, higher=False) if idle == 1000 else "", "", ""),
    ]  # fmt: skip
    head = ("phase", "jfe", "haproxy/direct", "ratio", "goal", "verdict",
            "jfe CPU us/unit", "ref CPU us/unit")  # fmt: skip
    lines = [head] + [tuple("-" if v is None else str(v) for v in row) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    text.append("CPU us/unit: per MB (bulk, pass-through) or per handshake; u = user, s = sys.")
    text.append(
        "new TLS conn: s_time -new (the client resets before the server's tickets: haproxy "
        "never dials its backend, jfe dials at accept); conn+request: s_time -new -www / "
        "(one request through the backend per connection, like for like)."
    )
    return "\n".join(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bulk-mb", type=int, default=512)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument(
        "--phases", default=",".join(PHASES),
        help=f"comma-separated phases to run (default all: {','.join(PHASES)})",
    )  # fmt: skip
    parser.add_argument("--profile", type=Path, help="write py-spy profiles of jfe's phases here")
    parser.add_argument("--json", action="store_true", help="print the raw figures as JSON too")
    parser.add_argument(
        "--perf",
        type=Path,
        help="record each proxy with perf during the connection workloads (perf report -i ...)",
    )
    parser.add_argument(
        "--strace", type=Path,
        help="count each proxy's system calls (strace -c) during the connection workloads "
        "(its CPU figures are then not comparable: not with --perf)",
    )  # fmt: skip
    parser.add_argument(
        "--netns-prefix", default="jfb",
        help="name the bench's namespaces PREFIX-<pid>-<random> (stale ones of PREFIX are "
        "swept first)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.perf is not None and args.strace is not None:
        parser.error("--perf and --strace: one at a time (ptrace stops fill perf's profile)")
    profile = _Profile(args.profile)
    netns.require("ip", "nft", "haproxy", "openssl")
    netns.sweep_stale(args.netns_prefix)
    workdir = Path(tempfile.mkdtemp(prefix="jfe-bench-"))
    ca = TestCA()
    chain, key = ca.leaf(NAME)
    combined = workdir / "haproxy.pem"
    combined.write_bytes(chain.read_bytes() + key.read_bytes())
    home = workdir / "home"
    home.mkdir()
    (home / "overflowd.toml").write_text(
        f"[jfe]\nports = [{JFE_PORT}]\nmax_connections_per_client = {args.idle + 100}\n"
    )
    (workdir / "haproxy.cfg").write_text(
        textwrap.dedent(
            f"""
            global
                maxconn 4000
                nbthread 1
            defaults
                mode tcp
                timeout connect 5s
                timeout client 60s
                timeout server 60s
            frontend fe
                bind {HOST}:{HAPROXY_PORT} ssl crt {combined}
                default_backend be
            backend be
                server s {HOST}:{DIRECT_PORT}
            """
        )
    )
    results: dict[str, dict[str, Any]] = {"jfe": {}, "haproxy": {}, "direct": {}}
    load = os.getloadavg()
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)  # last out: after the namespaces
        host = stack.enter_context(netns.namespace(workdir, prefix=args.netns_prefix))
        client = stack.enter_context(netns.namespace(workdir, prefix=args.netns_prefix))
        link = netns.veth(client, host, [f"{CLIENT}/24"], [f"{HOST}/24"])
        # netns.veth turns offloads off for exact captures; a throughput bench wants them on.
        for ns, dev in ((client, link.a_dev), (host, link.b_dev)):
            ns.run(["ethtool", "-K", dev, "tso", "on", "gso", "on", "gro", "on"], check=False)
        host.spawn([PY, "-c", BACKEND, HOST, str(JFE_PORT), str(DIRECT_PORT)], label="backend")
        haproxy = host.spawn(
            ["haproxy", "-db", "-f", str(workdir / "haproxy.cfg")], label="haproxy"
        )
        jfe = host.spawn(
            [PY, "-m", "tests.support.jfe_certs", str(home), str(chain), str(key)], label="jfe"
        )
        jfe.wait_for_output(r"jfe running listen=", timeout=30)
        time.sleep(1.0)
        # `ip netns exec` execs its command and `haproxy -db` does not fork: these PIDs are the
        # proxies themselves.
        pids = {"jfe": jfe.pid, "haproxy": haproxy.pid}
        ports = {"jfe": JFE_PORT, "haproxy": HAPROXY_PORT}

        def client_json(*argv: str, timeout: float = 300) -> dict[str, Any]:
            done = client.run([PY, "-c", CLIENT_SCRIPT, *argv], timeout=timeout)
            out: dict[str, Any] = json.loads(done.stdout)
            return out

        def charge(side: str, key: str, before: tuple[float, float], units: float) -> None:
            """The proxy's CPU since ``before``, in us per unit (MB or handshake)."""
            after = _cpu(pids[side])
            if units:
                results[side][f"{key}_user_us"] = round((after[0] - before[0]) / units * 1e6, 1)
                results[side][f"{key}_sys_us"] = round((after[1] - before[1]) / units * 1e6, 1)

        phases = set(args.phases.split(","))
        for side in ("jfe", "haproxy") if "bulk" in phases else ():
            port = str(ports[side])
            with profile.phase(side, "bulk", pids[side]):
                cpu0 = _cpu(pids[side])
                bulk = client_json("bulk_tls", HOST, port, str(ca.ca_file), str(args.bulk_mb))
                charge(side, "bulk_cpu_per_mb", cpu0, args.bulk_mb * (1 << 20) / 1e6)
            results[side]["bulk_tls_mb_s"] = round(float(bulk["mb_s"]), 1)
            results[side]["cipher"] = bulk["cipher"]
        # Two workloads of new connections. "handshakes": s_time -new, the client hangs up
        # right after its Finished, so the server's session tickets meet a reset and haproxy
        # (which dials its backend only after the handshake) never dials it at all, while jfe
        # dials at accept (it must, to see who speaks first): not like for like. "requests":
        # s_time -new -www /, one HTTP/1.0 request answered by the backend per connection,
        # so both proxies complete the handshake and dial and relay to the backend. Each
        # workload runs jfe then haproxy back to back: the machine's load drifts less between.
        workloads = [("handshakes", [], ""), ("requests", ["-www", "/"], "req_")]
        for workload, extra, key in workloads:
            for side in ("jfe", "haproxy") if workload in phases else ():
                port = str(ports[side])
                with (
                    profile.phase(side, workload, pids[side]),
                    _trace(args, side, workload, pids[side]),
                ):
                    cpu0 = _cpu(pids[side])
                    wall0 = time.monotonic()
                    done = client.run(
                        ["openssl", "s_time", "-connect", f"{HOST}:{port}", "-new", *extra,
                         "-time", str(args.seconds), "-CAfile", str(ca.ca_file)],
                        timeout=args.seconds + 60,
                        check=False,
                    )  # fmt: skip
                    cpu1 = _cpu(pids[side])
                if done.returncode != 0:
                    print(
                        f"{side}: s_time: {done.stdout[-800:]} {done.stderr[-800:]}",
                        file=sys.stderr,
                    )
                # s_time's "N connections in Xs" is the CLIENT's CPU time; the rate is per wall
                # second of the run (its "in N real seconds" line, which it rounds: ours instead).
                wall = time.monotonic() - wall0
                match = re.search(r"(\d+) connections in \d+ real seconds", done.stdout)
                if match and int(match.group(1)):
                    n, secs = int(match.group(1)), min(wall, args.seconds + 1.0)
                    used = cpu1[0] - cpu0[0] + cpu1[1] - cpu0[1]
                    r = results[side]
                    r[f"{key}tls_conn_s"] = round(n / secs, 1)
                    r[f"{key}cpu_us_per_handshake"] = round(used / n * 1e6, 1)
                    r[f"{key}cpu_per_handshake_user_us"] = round((cpu1[0] - cpu0[0]) / n * 1e6)
                    r[f"{key}cpu_per_handshake_sys_us"] = round((cpu1[1] - cpu0[1]) / n * 1e6)
                    r[f"{key}handshakes_per_cpu_s"] = round(n / used) if used else None
                    r[f"{key}cpu_share"] = round(used / secs, 2)
        if "passthrough" in phases:
            with profile.phase("jfe", "passthrough", pids["jfe"]):
                cpu0 = _cpu(pids["jfe"])
                plain = client_json("bulk_plain", HOST, str(JFE_PORT), "-", str(args.bulk_mb))
                charge("jfe", "plain_cpu_per_mb", cpu0, args.bulk_mb * (1 << 20) / 1e6)
            results["jfe"]["passthrough_mb_s"] = round(float(plain["mb_s"]), 1)
            direct = client_json("bulk_plain", HOST, str(DIRECT_PORT), "-", str(args.bulk_mb))
            results["direct"]["plain_mb_s"] = round(float(direct["mb_s"]), 1)
        for side in ("jfe", "haproxy") if "idle" in phases else ():
            idle = client.spawn(
                [PY, "-c", CLIENT_SCRIPT, "idle_tls", HOST, str(ports[side]), str(ca.ca_file),
                 str(args.idle)],
                label=f"idle-{side}",
            )  # fmt: skip
            idle.wait_for_output(r'"open"', timeout=300)
            time.sleep(1.0)
            results[side][f"rss_mb_{args.idle}_idle_tls"] = round(_rss_mb(pids[side]), 1)
            idle.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    cipher = results["jfe"].get("cipher"), results["haproxy"].get("cipher")
    after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in load)}; after: {after}")
    print(f"ciphers jfe/haproxy: {cipher}")
    print(_table(results, args.idle))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
