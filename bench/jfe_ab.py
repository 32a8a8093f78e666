"""jfe A/B: two source trees of jfe, the same connections, alternating runs, CPU per connection.

    .venv/bin/python bench/jfe_ab.py BASE_TREE [--rounds 6] [--seconds 2] [--new-only | --bulk-mb N]
    .venv/bin/python bench/jfe_ab.py --floor epoll|trio [--rounds 6] [--seconds 2] [--new-only]

On a shared, loaded machine the per-connection CPU of one bench run moves by 10-20% with the
load; this compares two versions of jfe (``BASE_TREE``: e.g. ``git archive main jfe overflowd
tests | tar -x -C /tmp/base``; the other is this checkout) in alternating ``openssl s_time``
runs, so both see the same load. Each side runs `jfe.proxy.Proxy.run` (accept loop, budgets
and the connection's whole path) on a plain 127.0.0.1 listener (no TPROXY, no namespaces: no
root needed), every connection "diverted" to bench/jfe.py's backend; the workload is
``s_time -new -www /`` (one request through the backend per connection) or, with
``--new-only``, ``s_time -new``; ``--bulk-mb N``: one TLS upload of N MB per round instead.
Prints CPU (user+sys) per connection (or MB) per side, and per round.

``--floor epoll`` puts in place of ``BASE_TREE`` the floor: the same per-connection work as jfe's
TLS path (accept, dial the backend, sniff the ClientHello with `jfe.sniff`, one SSLObject over
MemoryBIOs, relay the request and the answer, close_notify) in one plain ``select.epoll``
loop, no trio, none of jfe's budgets, timeouts or partial-write handling. What jfe costs
above it is the price of trio and jfe's per-connection machinery: what an epoll loop below
trio could at best win back (issue #12). ``--floor trio`` is the same code as one trio task
per connection with trio waits: between the two floors, trio's own price; between it and jfe,
jfe's per-connection code.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
BACKEND_PORT, PORTS = 7901, {"base": 7911, "work": 7912}

SERVE = textwrap.dedent(
    """
    import ipaddress, socket, ssl, sys
    sys.path.insert(0, sys.argv[1])
    import trio
    import jfe.proxy as P
    from jfe.config import JfeSettings
    port, backend = int(sys.argv[2]), int(sys.argv[3])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    LOCAL = ipaddress.ip_address("127.0.0.1")
    class Source:
        def cached(self, name): return ctx
        async def context_for(self, name, client): return ctx
    class Proxy(P.Proxy):
        # Every connection "diverted" to the backend (no TPROXY here): the trio path's dial
        # (every tree) and the engine's (trees that have one).
        async def _upstream(self, client, original, transparent):
            return await super()._upstream(client, (LOCAL, backend), False)
        def _dial(self, client, original, transparent):
            return super()._dial(client, (LOCAL, backend), False)
    async def main():
        proxy = Proxy(JfeSettings(), Source())
        # The whole of Proxy.run (accept loop, budgets, the connection's path) on a plain
        # listener: no IP_TRANSPARENT, so no root.
        listener = socket.create_server(("127.0.0.1", port), backlog=1024)
        listener.setblocking(False)
        proxy._bound = listener
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.run)
            print("ready", flush=True)
    trio.run(main)
    """
)


#: The floor (``--floor``): jfe's TLS work per connection in one epoll loop, no trio. Run as
#: ``python -c FLOOR SRC_TREE PORT BACKEND_PORT CHAIN KEY``, like SERVE.
FLOOR = textwrap.dedent(
    """
    import os, select, socket, ssl, sys
    sys.path.insert(0, sys.argv[1])
    from jfe.sniff import HelloBuffer
    port, backend = int(sys.argv[2]), int(sys.argv[3])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    lst = socket.create_server(("127.0.0.1", port), backlog=1024); lst.setblocking(False)
    ep = select.epoll(); ep.register(lst.fileno(), select.EPOLLIN)
    IN = select.EPOLLIN
    conns = {}  # fd -> Conn
    buf = bytearray(256 * 1024); view = memoryview(buf)
    class Conn:
        __slots__ = ("c", "u", "state", "inc", "out", "tls")
    def flush(k):
        while k.out.pending:
            os.write(k.c.fileno(), k.out.read())
    def close(k):
        for s in (k.c, k.u):
            conns.pop(s.fileno(), None); s.close()
    print("ready", flush=True)
    while True:
        for fd, ev in ep.poll():
            if fd == lst.fileno():
                while True:
                    try: c, _ = lst.accept()
                    except BlockingIOError: break
                    c.setblocking(False)
                    c.getpeername(); c.getsockname()
                    u = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                    u.connect_ex(("127.0.0.1", backend)); u.getpeername()
                    k = Conn(); k.c, k.u, k.state = c, u, 0
                    conns[c.fileno()] = k; conns[u.fileno()] = k
                    ep.register(c.fileno(), IN); ep.register(u.fileno(), IN)
                continue
            k = conns.get(fd)
            if k is None: continue
            try:
                if fd == k.c.fileno():
                    n = os.readv(fd, [view])
                    if k.state == 0:
                        hb = HelloBuffer(); hello = hb.feed(bytes(view[:n]))
                        k.inc, k.out = ssl.MemoryBIO(), ssl.MemoryBIO()
                        k.tls = ctx.wrap_bio(k.inc, k.out, server_side=True); k.inc.write(hb.data)
                        try: k.tls.do_handshake()
                        except ssl.SSLWantReadError: pass
                        flush(k); k.state = 1
                        continue
                    if n == 0: k.inc.write_eof()
                    else: k.inc.write(view[:n])
                    if k.state == 1:
                        try: k.tls.do_handshake()
                        except ssl.SSLWantReadError: flush(k); continue
                        flush(k); k.state = 2
                    while True:
                        try: data = k.tls.read(256 * 1024)
                        except ssl.SSLWantReadError: break
                        except ssl.SSLZeroReturnError: data = b""
                        if not data:
                            k.u.shutdown(socket.SHUT_WR); ep.unregister(fd); break
                        os.write(k.u.fileno(), data)
                else:
                    n = os.readv(fd, [view])
                    if n == 0:
                        try: k.tls.unwrap()
                        except ssl.SSLError: pass
                        try: flush(k)
                        except OSError: pass
                        close(k); continue
                    k.tls.write(view[:n]); flush(k)
            except (OSError, ssl.SSLError):
                close(k)
    """
)


#: ``--floor trio``: the same work and structure as FLOOR, but one trio task per connection
#: and trio waits (how much of jfe's cost above FLOOR is trio itself, how much jfe's code).
FLOOR_TRIO = textwrap.dedent(
    """
    import os, select, socket, ssl, sys
    sys.path.insert(0, sys.argv[1])
    import trio
    from jfe.sniff import HelloBuffer
    port, backend = int(sys.argv[2]), int(sys.argv[3])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[4], sys.argv[5])
    buf = bytearray(256 * 1024); view = memoryview(buf)
    wait = trio.lowlevel.wait_readable
    def flush(fd, out):
        while out.pending:
            os.write(fd, out.read())
    async def read(fd):
        while True:
            try: return os.readv(fd, [view])
            except BlockingIOError: await wait(fd)
    async def serve(c):
        u = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            c.getpeername(); c.getsockname()
            u.connect_ex(("127.0.0.1", backend)); u.getpeername()
            cf, uf = c.fileno(), u.fileno()
            n = await read(cf)
            hb = HelloBuffer(); hb.feed(bytes(view[:n]))
            inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = ctx.wrap_bio(inc, out, server_side=True); inc.write(hb.data)
            while True:
                try:
                    tls.do_handshake(); break
                except ssl.SSLWantReadError:
                    flush(cf, out)
                    n = await read(cf)
                    if n == 0: return
                    inc.write(view[:n])
            flush(cf, out)
            ep = select.epoll(2); ep.register(cf, select.EPOLLIN); ep.register(uf, select.EPOLLIN)
            try:
                while True:
                    while True:
                        try: data = tls.read(256 * 1024)
                        except ssl.SSLWantReadError: data = None
                        except ssl.SSLZeroReturnError: data = b""
                        if data is None: break
                        if not data:
                            u.shutdown(socket.SHUT_WR); ep.unregister(cf); break
                        os.write(uf, data)
                    try:
                        n = os.readv(cf, [view])
                        if n == 0: inc.write_eof()
                        else: inc.write(view[:n])
                        continue
                    except BlockingIOError: pass
                    try:
                        n = os.readv(uf, [view])
                        if n == 0:
                            try: tls.unwrap()
                            except ssl.SSLError: pass
                            flush(cf, out); return
                        tls.write(view[:n]); flush(cf, out); continue
                    except BlockingIOError: pass
                    await wait(ep)
            finally:
                trio.lowlevel.notify_closing(ep); ep.close()
        except (OSError, ssl.SSLError):
            pass
        finally:
            u.close(); c.close()
    async def main():
        lst = socket.create_server(("127.0.0.1", port), backlog=1024); lst.setblocking(False)
        print("ready", flush=True)
        async with trio.open_nursery() as nursery:
            while True:
                await wait(lst)
                while True:
                    try: c, _ = lst.accept()
                    except BlockingIOError: break
                    c.setblocking(False)
                    nursery.start_soon(serve, c)
    trio.run(main)
    """
)


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "base", type=Path, nargs="?", help="the other source tree (jfe/, overflowd/)"
    )
    parser.add_argument(
        "--floor", choices=("epoll", "trio"),
        help="compare with a floor instead of a source tree: epoll (one plain epoll loop, "
        "no trio) or trio (the same work, a trio task per connection)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=int, default=2)
    parser.add_argument("--new-only", action="store_true", help="s_time -new, no request")
    parser.add_argument(
        "--bulk-mb", type=int, default=0,
        help="instead of s_time: one TLS upload of this many MB per round (bench/jfe.py's "
        "bulk client), CPU us per MB",
    )  # fmt: skip
    args = parser.parse_args()
    if (args.base is None) == (args.floor is None):
        parser.error("give BASE_TREE or --floor (one of them)")
    sys.path.insert(0, str(ROOT))
    from tests.support.jfe_certs import TestCA

    # bench/jfe.py's backend, loaded by path: its module name is the jfe package's.
    spec = importlib.util.spec_from_file_location("jfe_bench", HERE / "jfe.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    backend: str = bench.BACKEND
    client_script: str = bench.CLIENT_SCRIPT

    ca = TestCA()
    chain, key = ca.leaf("bench.example")
    workdir = Path(tempfile.mkdtemp(prefix="jfe-ab-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        argv = [PY, "-c", backend, "127.0.0.1", str(BACKEND_PORT)]
        procs.append(subprocess.Popen(argv, text=True))
        trees = {"base": ROOT if args.floor else args.base.resolve(), "work": ROOT}
        sides: dict[str, subprocess.Popen[str]] = {}
        for name, tree in trees.items():
            floors = {"epoll": FLOOR, "trio": FLOOR_TRIO}
            code = floors[args.floor] if args.floor and name == "base" else SERVE
            serve = [PY, "-c", code, str(tree), str(PORTS[name]), str(BACKEND_PORT)]
            side = subprocess.Popen(
                [*serve, str(chain), str(key)], stdout=subprocess.PIPE, text=True
            )
            procs.append(side)
            assert side.stdout is not None
            side.stdout.readline()  # "ready"
            sides[name] = side
        time.sleep(0.5)
        extra = [] if args.new_only else ["-www", "/"]
        per: dict[str, list[tuple[float, int]]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name in ("base", "work") if r % 2 == 0 else ("work", "base"):
                before = _cpu(sides[name].pid)
                if args.bulk_mb:
                    subprocess.run(
                        [PY, "-c", client_script, "bulk_tls", "127.0.0.1", str(PORTS[name]),
                         str(ca.ca_file), str(args.bulk_mb)],
                        capture_output=True, text=True, check=True, timeout=300,
                    )  # fmt: skip
                    time.sleep(0.2)  # the proxy's last bytes
                    per[name].append((_cpu(sides[name].pid) - before, args.bulk_mb))
                    continue
                out = subprocess.run(
                    ["openssl", "s_time", "-connect", f"127.0.0.1:{PORTS[name]}", "-new",
                     *extra, "-time", str(args.seconds), "-CAfile", str(ca.ca_file)],
                    capture_output=True, text=True, check=False,
                ).stdout  # fmt: skip
                used = _cpu(sides[name].pid) - before
                match = re.search(r"(\d+) connections in \d+ real seconds", out)
                per[name].append((used, int(match.group(1)) if match else 0))
        for name, runs in per.items():
            used, n = sum(u for u, _ in runs), sum(c for _, c in runs)
            rounds = [round(u / c * 1e6) for u, c in runs if c]
            label = f"floor ({args.floor})" if args.floor and name == "base" else name
            unit, units = ("MB", "MB") if args.bulk_mb else ("connection", "connections")
            print(f"{label}: {used / max(n, 1) * 1e6:,.0f} us CPU per {unit} over {n} "
                  f"{units}; per round {rounds}")  # fmt: skip
        print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
