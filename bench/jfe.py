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

Goals (issue #12): bulk >= 80% of haproxy's, connections/s >= 70% at equal CPU, pass-through
>= 90% of direct, 1,000 idle connections in under 200 MB. Needs root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
import textwrap
import time
from pathlib import Path

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


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\\n")[0])
    parser.add_argument("--bulk-mb", type=int, default=512)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()
    netns.require("ip", "nft", "haproxy", "openssl")
    netns.sweep_stale("jfb")
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
    results: dict[str, dict[str, object]] = {"jfe": {}, "haproxy": {}, "direct": {}}
    with contextlib.ExitStack() as stack:
        host = stack.enter_context(netns.namespace(workdir, prefix="jfb"))
        client = stack.enter_context(netns.namespace(workdir, prefix="jfb"))
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

        def client_json(*argv: str, timeout: float = 300) -> dict[str, object]:
            done = client.run([PY, "-c", CLIENT_SCRIPT, *argv], timeout=timeout)
            out: dict[str, object] = json.loads(done.stdout)
            return out

        for side in ("jfe", "haproxy"):
            port = str(ports[side])
            bulk = client_json("bulk_tls", HOST, port, str(ca.ca_file), str(args.bulk_mb))
            results[side]["bulk_tls_mb_s"] = round(float(bulk["mb_s"]), 1)  # type: ignore[arg-type]
            results[side]["cipher"] = bulk["cipher"]
            cpu0 = _cpu_s(pids[side])
            wall0 = time.monotonic()
            done = client.run(
                ["openssl", "s_time", "-connect", f"{HOST}:{port}", "-new",
                 "-time", str(args.seconds), "-CAfile", str(ca.ca_file)],
                timeout=args.seconds + 60,
                check=False,
            )  # fmt: skip
            if done.returncode != 0:
                print(f"{side}: s_time: {done.stdout[-800:]} {done.stderr[-800:]}", file=sys.stderr)
            cpu = _cpu_s(pids[side]) - cpu0
            # s_time's "N connections in Xs" is the CLIENT's CPU time; the rate is per wall
            # second of the run (its "in N real seconds" line, which it rounds: ours instead).
            wall = time.monotonic() - wall0
            match = re.search(r"(\d+) connections in \d+ real seconds", done.stdout)
            if match:
                n, secs = int(match.group(1)), min(wall, args.seconds + 1.0)
                results[side]["tls_conn_s"] = round(n / secs, 1)
                results[side]["cpu_us_per_handshake"] = round(cpu / n * 1e6, 1) if n else None
                results[side]["cpu_share"] = round(cpu / secs, 2)
        plain = client_json("bulk_plain", HOST, str(JFE_PORT), "-", str(args.bulk_mb))
        results["jfe"]["passthrough_mb_s"] = round(float(plain["mb_s"]), 1)  # type: ignore[arg-type]
        direct = client_json("bulk_plain", HOST, str(DIRECT_PORT), "-", str(args.bulk_mb))
        results["direct"]["plain_mb_s"] = round(float(direct["mb_s"]), 1)  # type: ignore[arg-type]
        for side in ("jfe", "haproxy"):
            idle = client.spawn(
                [PY, "-c", CLIENT_SCRIPT, "idle_tls", HOST, str(ports[side]), str(ca.ca_file),
                 str(args.idle)],
                label=f"idle-{side}",
            )  # fmt: skip
            idle.wait_for_output(r'"open"', timeout=300)
            time.sleep(1.0)
            results[side][f"rss_mb_{args.idle}_idle_tls"] = round(_rss_mb(pids[side]), 1)
            idle.stop()
    j, h, d = results["jfe"], results["haproxy"], results["direct"]

    def ratio(a: object, b: object) -> float | None:
        return round(float(a) / float(b), 2) if a and b else None  # type: ignore[arg-type]

    results["ratios"] = {
        "bulk_jfe_over_haproxy": ratio(j.get("bulk_tls_mb_s"), h.get("bulk_tls_mb_s")),
        "conn_jfe_over_haproxy": ratio(j.get("tls_conn_s"), h.get("tls_conn_s")),
        "passthrough_over_direct": ratio(j.get("passthrough_mb_s"), d.get("plain_mb_s")),
    }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
