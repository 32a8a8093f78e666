"""How fast the dashboard's pages answer on a store of a million reports (issue #14).

Builds bench/query.py's store (``--reports``, 1,000,000: a day of reports, 20 observers, the
attacked 203.0.113.0/24 getting ~3% of them; see that file) on SQLite and on PostgreSQL (a
throwaway cluster, tests/support/postgres.py, as bench/query.py starts it; ``--backend`` for
one), then asks each page ``--runs`` times, interleaved, through the node API's ASGI
application (the same routes, limits and rendering as ``overflowd run`` serves; no socket:
httpx's ASGI transport, so the figure is the server's, not the network's), and prints p50 and
p99 of wall time per page and this process's CPU time per request (p50), and on PostgreSQL its
server's CPU per request (p50: the run time of the cluster's processes, from /proc). The Node
page's counter history holds its full hour (360 samples). Goal: every page under 200 ms (p99).

    .venv/bin/python bench/dashboard.py                     # both backends, ~6 minutes
    .venv/bin/python bench/dashboard.py --backend sqlite --reports 100000 --runs 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.query import HOUR_MS, VICTIM, Data, build, percentiles, postgres_store, sqlite_store
from overflowd import report as rpt
from overflowd.config import ApiSettings
from overflowd.dashboard.history import CounterHistory
from overflowd.identity import NodeIdentity
from overflowd.services.api import ApiContext, ApiService
from overflowd.store import Store


def pages(now_ms: int, last_seq: int) -> dict[str, str]:
    hour = rpt.iso_ms(now_ms - HOUR_MS)
    day = rpt.iso_ms(now_ms - 24 * HOUR_MS)
    return {
        "Node /": "/",
        "Node chart (ingest)": "/dashboard/chart/node/ingest.svg",
        "Victim, the last hour (as by default)": f"/victim?dst={VICTIM}&since={hour}",
        "Victim chart, the last hour": f"/dashboard/chart/victim.svg?dst={VICTIM}&since={hour}",
        "Victim, the whole day": f"/victim?dst={VICTIM}&since={day}",
        "Victim chart, the whole day": f"/dashboard/chart/victim.svg?dst={VICTIM}&since={day}",
        "Reports (newest 50 of all)": "/reports",
        "Reports, one /24, the last hour": f"/reports?dst={VICTIM}&since={hour}",
        "Reports live poll (100 new)": f"/dashboard/reports/rows?after={max(0, last_seq - 100)}",
        "Peers": "/peers",
    }


def full_history() -> CounterHistory:
    history = CounterHistory(lambda: None)  # type: ignore[arg-type,return-value]
    now = time.time()
    for i in range(360):
        sample = {f"records:192.0.2.{e}": float(i * 1000 * (e + 1)) for e in range(8)}
        sample.update(
            {"malformed": i, "refused": 0, "sampled": i * 50, "signed": i * 40, "drop:shed": i,
             "sent:inband": i * 30, "sent:webhook": i, "outbox:pending": i % 7, "outbox:dead": 1,
             "dns:lookups": i * 10, "dns:queries": i * 2, "dns:cache_hits": i * 8}
        )  # fmt: skip
        history.ring.add(now - (360 - i) * 10, sample)
    history.now = lambda: history.ring.latest()[1]  # type: ignore[method-assign,index]
    return history


#: per page: wall seconds, this process's CPU seconds, the answer's size, and PostgreSQL's
#: server CPU seconds per request (its backends' run time; empty on SQLite)
Timings = dict[str, tuple[list[float], list[float], int, list[float]]]


def server_cpu(store: Store) -> Callable[[], float] | None:
    """PostgreSQL: a function giving the CPU seconds its cluster's processes have run so far
    (the children of our backend's postmaster, /proc/PID/schedstat's nanoseconds), read
    around each request: this process's CPU is only the client's share of a PostgreSQL page.
    None on SQLite, or when /proc does not tell (another host, another user's namespace)."""
    if store.backend != "postgresql":
        return None
    engine = store._engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        backend = int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
    try:
        postmaster = int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None

    def total() -> float:
        ns = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) != postmaster:
                    continue
                ns += int(Path(entry.path, "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
        return ns / 1e9

    return total


async def time_pages(store: Store, now_ms: int, runs: int) -> Timings:
    ctx = ApiContext(
        identity=NodeIdentity.generate(),
        contacts=("mailto:abuse@example.net",),
        observation_point="bench",
        store=store,
        history=full_history(),
    )
    service = ApiService(ApiSettings(listen="127.0.0.1:0"), ctx)
    app = service.limits.wrap(service.app)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))  # type: ignore[arg-type]
    out: Timings = {}
    server = server_cpu(store)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
        wanted = pages(now_ms, store.last_seq())
        for name, path in wanted.items():  # warm once each; every page must answer
            answer = await client.get(path)
            assert answer.status_code == 200, (path, answer.status_code, answer.text[:300])
            out[name] = ([], [], len(answer.content), [])
        for _ in range(runs):
            for name, path in wanted.items():
                before = server() if server else 0.0  # outside the timed part
                t, cpu = time.perf_counter(), time.process_time()
                answer = await client.get(path)
                out[name][0].append(time.perf_counter() - t)
                out[name][1].append(time.process_time() - cpu)
                if server:
                    out[name][3].append(max(0.0, server() - before))
    return out


def show(backend: str, n: int, results: Timings) -> bool:
    served = any(server for *_, server in results.values())
    print(
        f"\n{backend}, {n:,} reports: page              wall p50 ms / p99 ms   cpu p50 ms     bytes"
        + ("   server cpu p50 ms" if served else "")
    )
    ok = True
    for name, (samples, cpu, size, server) in results.items():
        p50, p99 = percentiles(samples)
        cpu50, _ = percentiles(cpu)
        flag = "" if p99 < 0.2 else "   over 200 ms"
        ok = ok and not flag
        theirs = f" {percentiles(server)[0] * 1000:14.1f}" if server else ""
        print(
            f"  {name:38} {p50 * 1000:8.1f} / {p99 * 1000:<8.1f} {cpu50 * 1000:8.1f}"
            f" {size:>11,}{theirs}{flag}"
        )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=50, help="requests per page")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--db", help="an existing store built by this script or bench/query.py")
    parser.add_argument(
        "--keep", type=Path, help="build the SQLite store in this directory and leave it there"
    )
    parser.add_argument(
        "--vacuum",
        action="store_true",
        help="PostgreSQL: VACUUM the loaded table (what autovacuum does to a table that got "
        "many inserts): its visibility map lets an index-only scan skip the rows",
    )
    args = parser.parse_args(argv)
    if args.db:
        with Store.open(args.db, create=False) as store:
            now_ms = max(r.last_ms for r in store_latest(store))
            results = trio.run(time_pages, store, now_ms, args.runs)
            show(store.backend, store.count_reports(), results)
    else:
        now_ms = int(time.time() * 1000)
        print(f"generating {args.reports:,} reports", file=sys.stderr)
        data = Data(args.reports, now_ms)
        backends = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
        for backend in backends:
            keep = args.keep is not None and backend == "sqlite"
            if keep:
                args.keep.mkdir(parents=True, exist_ok=True)
            tmp = args.keep if keep else Path(tempfile.mkdtemp(prefix="overflowd-bench-dash-"))
            try:
                ctx = sqlite_store(tmp) if backend == "sqlite" else postgres_store()
                with ctx as (store, _url, _path):
                    print(f"{backend}: loading", file=sys.stderr)
                    build(store, data)
                    if backend == "postgresql" and args.vacuum:
                        vacuum(store)
                    results = trio.run(time_pages, store, now_ms, args.runs)
                    show(store.backend, args.reports, results)
            finally:
                if not keep:
                    shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n(python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    return 0


def vacuum(store: Store) -> None:
    print("postgresql: VACUUM (ANALYZE) reports", file=sys.stderr)
    engine = store._engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(
            "VACUUM (ANALYZE) reports"
        )


def store_latest(store: Store) -> list[Any]:
    from overflowd.store.query import ReportFilter, find_reports

    return find_reports(store, ReportFilter(), limit=1)


if __name__ == "__main__":
    sys.exit(main())
