"""How fast the query layer answers on a store of a million reports (issue #11).

Builds a store of ``--reports`` (1,000,000) reports on SQLite and on PostgreSQL (a throwaway
cluster, tests/support/postgres.py, ``fsync=off``), then times, interleaved, ``--runs`` times
each:

* ``who --dst 203.0.113.0/24 --since 1h`` (:func:`overflowd.store.query.who`),
* ``top --by src --since 1h`` (:func:`overflowd.store.query.top`),
* ``reports --dst 203.0.113.7`` (:func:`overflowd.store.query.find_reports`, every match),

in process (the library call: SQL and the intervals) and as whole ``overflowd-query``
processes (``--cli-runs`` times; start-up, opening the store and printing included), and prints
p50 and p99 of each, and the bytes on disk per report. Goal: p99 under 100 ms in process.

    .venv/bin/python bench/query.py                      # both backends, ~10 min
    .venv/bin/python bench/query.py --backend sqlite --reports 200000

The data. One day of flows ending now: ``last_ms`` uniform over the last 24 h (so an hour holds
about 1/24 of the reports), durations up to 5 minutes, arrival a few seconds later, stored in
arrival order (as a node stores them). 20
observers (one is this node: via 'local'), sampling rates 1e-3 and 1e-4, about 10% of reports
with p = 1, exporter intervals 1 or 1000. Destinations: 60% spread over 16,384 IPv4 /24s
(100.64.0.0/10), 10% over IPv6 /48s, 30% on ten attacked /24s, the first of which,
203.0.113.0/24, gets a tenth of those (3% of all: ~1,250 reports an hour, ~118 per address).
Sources: random IPv4 addresses (spoofed floods) and 50,000 /24s. Seeded.

The rows are inserted directly through the store's engine (SQLAlchemy Core, batches of 10,000),
not through ``add_reports``: signing a million reports costs ~10 minutes here. Every row's
``cose`` is a real signed report (of the row's observer, from a pool of 500 per observer) and
its indexed columns (and those computed from them: top's keys and weights) are the row's own;
ids are unique. So the store has the real row size and
every index, and output that decodes ``cose`` does the same work, but a row's decoded payload
is its pool report's, not the row's. SQLite is measured as a node leaves it (no ANALYZE).

PostgreSQL is measured as a live node's store stands between two of autovacuum's visits
(revision 0011_q10_visibility: every 1,000 inserted reports, checked every minute): all but
the newest ``--unvacuumed`` reports (2,000: the last ~3 minutes) VACUUMed, so that the
visibility map marks their pages all-visible and an index-only scan of the hour reads no table
row but the newest ones', then ``ANALYZE``. Autovacuum is off for the table meanwhile, so the
state holds still through the runs (it came by ~75 s after loading and changed the figures in
the middle of a run). ``--unvacuumed`` at least ``--reports``: nothing vacuumed, every row of
the hour fetched from the table, as on a store under PostgreSQL's default insert threshold
(20% of the table's rows: 200,000 reports here, ~5 hours).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import ipaddress
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nacl.signing
from sqlalchemy import event, insert, text

from overflowd import report as rpt
from overflowd.store import Store, address_to_key
from overflowd.store.models import Base, derived_columns
from overflowd.store.query import ReportFilter, find_reports, top, who
from overflowd.store.repository import _report_row

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
OBSERVERS = 20
POOL_PER_OBSERVER = 500
BATCH = 10_000
#: page cache of the loading connection (SQLite's default is 2 MB): the primary key's random
#: ids are inserted into a B-tree that outgrows it at once
SQLITE_BENCH_CACHE_KB = 512 * 1024
VICTIM = ipaddress.ip_network("203.0.113.0/24")
VICTIM_ADDRESS = "203.0.113.7"
ATTACKED = [VICTIM] + [ipaddress.ip_network(f"198.18.{i}.0/24") for i in range(9)]
PORTS = (53, 80, 123, 443, 1900, 11211)


# ---------------------------------------------------------------------------------------------
# The store


class Observer:
    def __init__(self, rng: random.Random, index: int) -> None:
        self.signing = nacl.signing.SigningKey(rng.randbytes(32))
        self.key = bytes(self.signing.verify_key)
        self.rate = 1e-3 if index % 2 else 1e-4
        self.via = "local" if index == 0 else ("udp", "webhook")[index % 2]
        self.trust = None if index == 0 else ("unknown", "continuity", "dns", "pinned")[index % 4]
        self.contacts = (f"mailto:abuse@observer{index}.example",)
        self.point = f"edge-{index}"
        self.pool: list[bytes] = []

    def sign_pool(self, rng: random.Random, now_ms: int) -> None:
        for _ in range(POOL_PER_OBSERVER):
            payload = rpt.Payload(
                kind="flow-seen",
                nonce=rng.randbytes(rpt.NONCE_BYTES),
                time=now_ms,
                observer=rpt.Observer(contacts=self.contacts, point=self.point),
                flow=rpt.Flow(
                    src=ipaddress.IPv4Address(rng.getrandbits(32)),
                    dst=ipaddress.IPv4Address(int(VICTIM.network_address) + rng.randrange(256)),
                    sport=rng.choice(PORTS),
                    dport=rng.randrange(1024, 65536),
                    proto=17,
                    packets=rng.randrange(1, 100_000),
                    bytes=rng.randrange(1, 100_000) * 500,
                    first=now_ms - 60_000,
                    last=now_ms,
                    tcp_flags=0,
                    tos=0,
                ),
                sampling=rpt.Sampling(probability=0.01, format="netflow-v9", interval=1000),
            )
            self.pool.append(
                rpt.encode_signed(payload, self.key, lambda m: self.signing.sign(m).signature)
            )


def _dst(rng: random.Random) -> tuple[int, bytes]:
    u = rng.random()
    if u < 0.6:  # background IPv4: 100.64.0.0/10
        return 4, address_to_key(ipaddress.IPv4Address(0x64400000 + rng.getrandbits(22)))
    if u < 0.7:  # background IPv6: 2001:db8:xxxx::/48, 65,536 of them
        return 6, bytes.fromhex("20010db8") + rng.randbytes(2) + bytes(8) + rng.randbytes(2)
    net = VICTIM if u < 0.73 else rng.choice(ATTACKED[1:])
    host = rng.randrange(1, 255)
    return 4, address_to_key(ipaddress.IPv4Address(int(net.network_address) + host))


def _src(rng: random.Random, version: int) -> bytes:
    if version == 6:
        return bytes.fromhex("2a00") + rng.randbytes(14)
    if rng.random() < 0.5:  # spoofed: anywhere
        return address_to_key(ipaddress.IPv4Address(rng.getrandbits(32)))
    net = rng.randrange(50_000)
    return address_to_key(ipaddress.IPv4Address(0x0B000000 + (net << 8) + rng.randrange(256)))


def rows(n: int, observers: list[Observer], now_ms: int, seed: int) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    template = _report_row(
        rpt.SignedReport(
            cose=observers[0].pool[0],
            observer_key=observers[0].key,
            payload=rpt.decode_unverified(observers[0].pool[0]).payload,
        ),
        now_ms,
        "udp",
    )
    for i in range(n):
        o = observers[rng.randrange(OBSERVERS)]
        version, dst = _dst(rng)
        # in arrival order, as a node stores them: the table's rows of an hour are neighbours
        last = now_ms - DAY_MS + (i * DAY_MS) // n - rng.randrange(30_000)
        packets = int(10 ** rng.uniform(0, 5))
        interval = rng.choice((1, 1000))
        if rng.random() < 0.1:
            p = 1.0
        else:
            p = min(1.0, o.rate * packets * interval * rng.choice((1, 1, 1, 10)))
        cose = o.pool[i % POOL_PER_OBSERVER]
        row = dict(template)
        row.update(
            id=hashlib.sha256(cose + i.to_bytes(8, "big")).hexdigest(),
            cose=cose,
            observer_key=o.key,
            kind="flow-seen" if rng.random() < 0.95 else "ddos-suspect",
            ip_version=version,
            src=_src(rng, version),
            dst=dst,
            proto=rng.choices((17, 6, 1), (70, 25, 5))[0],
            sport=rng.choice(PORTS),
            dport=rng.randrange(1024, 65536),
            packets=packets,
            bytes=packets * rng.randrange(60, 1500),
            first_ms=last - int(rng.expovariate(1 / 30_000)) % 300_000,
            last_ms=last,
            report_time_ms=last + 1_000,
            probability=p,
            sampling_interval=interval,
            received_ms=min(now_ms, last + rng.randrange(1_000, 20_000)),
            via=o.via,
            trust=o.trust,
            sender_net=None,
            seq=i + 1,
            hops=0,
        )
        # the columns computed from the ones just set (top's keys and weights), as an insert
        yield derived_columns(row)


class Data:
    """The reports of the bench, generated once and loaded into each backend."""

    def __init__(self, n: int, now_ms: int, seed: int = 1) -> None:
        started = time.perf_counter()
        rng = random.Random(seed)
        self.n = n
        self.now_ms = now_ms
        self.observers = [Observer(rng, i) for i in range(OBSERVERS)]
        for o in self.observers:
            o.sign_pool(rng, now_ms)
        self.columns = [c.name for c in Base.metadata.tables["reports"].columns]
        # each observer's unit, as add_reports keeps it in the observers table
        units: dict[bytes, list[float]] = {o.key: [-1.0, -1.0] for o in self.observers}
        self.rows: list[tuple[Any, ...]] = []
        for row in rows(n, self.observers, now_ms, seed):
            if row["probability"] < 1.0:
                u = units[row["observer_key"]]
                k_p = row["sampling_interval"] / row["probability"]
                u[0] = max(u[0], row["packets"] * k_p)
                u[1] = max(u[1], row["bytes"] * k_p)
            self.rows.append(tuple(row[c] for c in self.columns))
            if len(self.rows) % 50_000 == 0:
                print(f"\r  generated {len(self.rows):,} reports", end="", file=sys.stderr)
        print(file=sys.stderr)
        self.units = units
        self.seconds = time.perf_counter() - started


#: PostgreSQL: the newest reports left unvacuumed (module docstring): autovacuum comes by every
#: 1,000 inserts and every minute, so up to ~2 minutes' reports wait for it; 2,000 is 173 s of
#: this bench's day
UNVACUUMED = 2_000


def build(store: Store, data: Data, *, unvacuumed: int | None = None) -> float:
    """Load ``data`` into ``store``; returns the seconds it took. ``unvacuumed`` (PostgreSQL):
    VACUUM all but that many newest reports and keep autovacuum off the table (module
    docstring); None: no VACUUM, autovacuum left on (bench/dashboard.py's store)."""
    started = time.perf_counter()
    n, now_ms = data.n, data.now_ms
    reports = Base.metadata.tables["reports"]
    # Secondary indexes are built after the load (a sort each) rather than maintained row by
    # row: the same store at the end, in a fraction of the time.
    indexes = [ix for ix in reports.indexes if ix.name]
    names = ", ".join(data.columns)
    still = store.backend == "postgresql" and unvacuumed is not None  # autovacuum off
    # all loaded before indexing unless some are vacuumed: nothing vacuumed needs no VACUUM
    vacuumed = n - unvacuumed if still and unvacuumed is not None and unvacuumed < n else n
    vacuum = still and vacuumed < n
    with store.transaction("bench: loading", write=True) as conn:
        if store.backend == "sqlite":
            conn.exec_driver_sql(f"PRAGMA cache_size = -{SQLITE_BENCH_CACHE_KB}")
        if still:
            conn.exec_driver_sql("ALTER TABLE reports SET (autovacuum_enabled = off)")
        for ix in indexes:
            ix.drop(conn)

    def load(start: int, stop: int) -> None:
        for at in range(start, stop, BATCH):
            batch = data.rows[at : min(stop, at + BATCH)]
            with store.transaction("bench: loading", write=True) as conn:
                if store.backend == "sqlite":
                    marks = ", ".join("?" * len(data.columns))
                    conn.exec_driver_sql(f"INSERT INTO reports ({names}) VALUES ({marks})", batch)
                else:  # COPY: the PostgreSQL way to load many rows
                    raw: Any = conn.connection.driver_connection
                    copy = f"COPY reports ({names}) FROM STDIN"
                    with raw.cursor() as cur, cur.copy(copy) as cp:
                        for r in batch:
                            cp.write_row(r)
            print(f"\r  loaded {at + len(batch):,} reports", end="", file=sys.stderr, flush=True)

    load(0, vacuumed)
    with store.transaction("bench: loading", write=True) as conn:
        conn.execute(text("UPDATE report_sequence SET last = :n"), {"n": n})
        conn.execute(
            insert(Base.metadata.tables["observers"]),
            [
                {
                    "key": o.key,
                    "fingerprint": rpt.key_fingerprint(o.key),
                    "contacts": json.dumps(list(o.contacts)),
                    "point": o.point,
                    "first_seen_ms": now_ms - DAY_MS,
                    "last_seen_ms": now_ms,
                    "reports": n // OBSERVERS,
                    "contacts_since_ms": None,
                    "packets_unit": data.units[o.key][0] if data.units[o.key][0] >= 0 else None,
                    "bytes_unit": data.units[o.key][1] if data.units[o.key][1] >= 0 else None,
                }
                for o in data.observers
            ],
        )
        print("\n  indexing", file=sys.stderr)
        for ix in indexes:
            ix.create(conn)
    if vacuum:
        print(f"  VACUUM, then the newest {n - vacuumed:,} reports", file=sys.stderr)
        with store._engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM reports")
        load(vacuumed, n)  # into the indexed table, as a node inserts them
        print(file=sys.stderr)
    if store.backend == "postgresql":
        with store.transaction("bench: analyze", write=False) as conn:
            conn.execute(text("ANALYZE"))
    return time.perf_counter() - started


def bytes_per_report(store: Store, n: int, sqlite_path: Path | None) -> float:
    if sqlite_path is not None:
        with store.transaction("bench: checkpoint", write=False) as conn:
            conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
        size = sum(
            p.stat().st_size
            for p in sqlite_path.parent.iterdir()
            if p.name.startswith(sqlite_path.name)
        )
        return size / n
    with store.transaction("bench: size", write=False) as conn:
        size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
    return int(size) / n


# ---------------------------------------------------------------------------------------------
# Timing


def percentiles(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, max(0, round(0.99 * (len(s) - 1))))]
    return statistics.median(s), p99


Timings = dict[str, tuple[list[float], list[float], str]]


def questions_of(store: Store, now_ms: int) -> dict[str, Callable[[], str]]:
    since = now_ms - HOUR_MS
    victim_host = ipaddress.ip_network(VICTIM_ADDRESS + "/32")
    questions: dict[str, Callable[[], str]] = {
        "who --dst 203.0.113.0/24 --since 1h": lambda: (
            f"{len(who(store, ReportFilter(dst=VICTIM, since_ms=since)))} observers"
        ),
        "top --by src --since 1h": lambda: (
            f"{top(store, ReportFilter(since_ms=since), by='src').groups} groups"
        ),
        f"reports --dst {VICTIM_ADDRESS}": lambda: (
            f"{len(find_reports(store, ReportFilter(dst=victim_host)))} reports"
        ),
    }
    return questions


def server_clock(store: Store) -> Callable[[], float] | None:
    """The CPU time (seconds) the PostgreSQL server's processes have run, when the server is
    on this machine and /proc can be read (the throwaway cluster; None otherwise): the
    children of the postmaster of the store's connection, as they are now (the pool's
    backends, opened by the warm-up runs, and the background processes), from
    ``/proc/PID/schedstat`` (nanoseconds on a CPU). On a busy machine a statement's wall time
    (EXPLAIN ANALYZE's included) grows with the load; its CPU time much less."""
    if store.backend != "postgresql":
        return None
    with store.transaction("bench: server pid", write=False) as conn:
        pid = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        postmaster = next(ln.split()[1] for ln in status.splitlines() if ln.startswith("PPid:"))
        children = [
            p.name
            for p in Path("/proc").iterdir()
            if p.name.isdigit() and _parent(p.name) == postmaster
        ]
    except (OSError, StopIteration):
        return None  # another machine's server, or no /proc

    def clock() -> float:
        total = 0
        for child in children:
            try:
                total += int(Path(f"/proc/{child}/schedstat").read_text().split()[0])
            except OSError:
                pass  # exited (a backend whose connection the pool closed)
        return total / 1e9

    return clock


def _parent(pid: str) -> str | None:
    try:
        # the fields after the command's closing parenthesis: state, then the parent's pid
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
    except (OSError, IndexError):
        return None


def time_in_process(
    store: Store, now_ms: int, runs: int
) -> tuple[Timings, dict[str, list[float]] | None]:
    """Wall time and this process's CPU time (``time.process_time``: SQLite runs in it) of each
    question, ``runs`` times, interleaved, and on a local PostgreSQL the server's CPU time
    (:func:`server_clock`; read outside the timed part). On a busy machine the wall time grows
    with the load and the CPU times much less: all are printed."""
    questions = questions_of(store, now_ms)
    out: Timings = {}
    # The million generated reports this process holds (for both backends) are no part of a
    # node answering a query, but a full collection walks them: ~100 ms, landing in whichever
    # run it falls on (its p99). Frozen, collections see only what the questions allocate.
    gc.collect()
    gc.freeze()
    for name, ask in questions.items():  # warm the caches once each
        out[name] = ([], [], ask())
    clock = server_clock(store)
    served: dict[str, list[float]] = {name: [] for name in questions}
    for _ in range(runs):
        for name, ask in questions.items():
            s = clock() if clock else 0.0
            t, c = time.perf_counter(), time.process_time()
            ask()
            out[name][0].append(time.perf_counter() - t)
            out[name][1].append(time.process_time() - c)
            if clock:
                served[name].append(clock() - s)
    return out, (served if clock else None)


def server_times(store: Store, now_ms: int, tries: int = 5) -> dict[str, float]:
    """PostgreSQL's own execution time of each question (its statements' EXPLAIN ANALYZE
    "Execution Time" added up, best of ``tries``, in seconds): what the server spends,
    whatever the load does to the client and the round trips."""
    engine = store._engine
    out: dict[str, float] = {}
    for name, ask in questions_of(store, now_ms).items():
        sent: list[tuple[str, Any]] = []

        def capture(
            _c: Any, _cur: Any, statement: str, params: Any, *_: Any, sent: Any = sent
        ) -> None:
            sent.append((statement, params))

        event.listen(engine, "before_cursor_execute", capture)
        try:
            ask()
        finally:
            event.remove(engine, "before_cursor_execute", capture)
        best = math.inf
        for _ in range(tries):
            total = 0.0
            # one transaction, in order: the SET LOCALs (set_config) apply to what follows
            with engine.connect() as conn, conn.begin():
                for statement, params in sent:
                    if "FROM reports" not in statement:
                        conn.exec_driver_sql(statement, params)
                        continue
                    (plan,) = conn.exec_driver_sql(
                        "EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params
                    ).one()
                    doc = json.loads(plan) if isinstance(plan, str) else plan
                    total += float(doc[0]["Execution Time"]) / 1000
            best = min(best, total)
        out[name] = best
    return out


def cli_available(cli: str) -> bool:
    try:
        result = subprocess.run(
            [cli, "who", "--help"], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def time_cli(cli: str, url: str, runs: int, now_ms: int) -> dict[str, list[float] | str]:
    # the hour before the data's end, as RFC 3339: "1h" would be relative to the clock, which
    # has moved on since the data was made
    since = (
        datetime.datetime.fromtimestamp((now_ms - HOUR_MS) / 1000, datetime.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )
    commands = {
        "who --dst 203.0.113.0/24 --since 1h": ["who", "--dst", str(VICTIM), "--since", since],
        "top --by src --since 1h": ["top", "--by", "src", "--since", since],
        f"reports --dst {VICTIM_ADDRESS}": ["reports", "--dst", VICTIM_ADDRESS, "--json"],
    }
    out: dict[str, list[float] | str] = {}
    for name, argv in commands.items():
        samples: list[float] = []
        for _ in range(runs):
            t = time.perf_counter()
            result = subprocess.run(
                [cli, "--db", url, *argv], capture_output=True, timeout=120, check=False
            )
            samples.append(time.perf_counter() - t)
            if result.returncode != 0:
                out[name] = (
                    f"failed (exit {result.returncode}): "
                    + result.stderr.decode(errors="replace").strip().splitlines()[-1:][0]
                    if result.stderr
                    else "failed"
                )
                break
        else:
            out[name] = samples
    return out


def show(
    backend: str,
    inproc: Timings,
    cli: dict[str, list[float] | str] | None,
    per_report: float,
    load_s: float,
    n: int,
    server: dict[str, float] | None = None,
    served: dict[str, list[float]] | None = None,
) -> None:
    print(
        f"\n{backend}: {n:,} reports, loaded in {load_s:.0f} s, "
        f"{per_report:.0f} bytes on disk per report, load average {os.getloadavg()[0]:.1f}"
    )
    cpu_title = (
        "CPU p50/p99 ms"
        + (" | server CPU p50/p99" if served else "")
        + (" | server best" if server else "")
    )
    print(
        f"  {'question':42} {'in process p50/p99 ms':>24}   {cpu_title:>26}"
        f"   {'CLI process p50/p99 ms':>24}"
    )
    for name, (samples, cpu, answer) in inproc.items():
        p50, p99 = percentiles(samples)
        c50, c99 = percentiles(cpu)
        cpu_text = f"{c50 * 1000:.1f} / {c99 * 1000:.1f}"
        if served:
            s50, s99 = percentiles(served[name])
            cpu_text += f" | {s50 * 1000:.1f} / {s99 * 1000:.1f}"
        if server:
            cpu_text += f" | {server[name] * 1000:.1f}"
        flag = "" if p99 < 0.1 else "  (over the 100 ms goal)"
        if cli is None:
            cli_text = "not available"
        elif isinstance(cli[name], str):
            cli_text = str(cli[name])
        else:
            l50, l99 = percentiles(cli[name])  # type: ignore[arg-type]
            cli_text = f"{l50 * 1000:.0f} / {l99 * 1000:.0f}"
        print(
            f"  {name:42} {p50 * 1000:11.1f} / {p99 * 1000:<10.1f}   {cpu_text:>26}"
            f"   {cli_text:>24}   [{answer}]{flag}"
        )


@contextmanager
def sqlite_store(directory: Path) -> Iterator[tuple[Store, str, Path]]:
    path = directory / "overflowd.db"
    url = f"sqlite:///{path}"
    with Store.open(url) as store:
        yield store, url, path


@contextmanager
def postgres_store() -> Iterator[tuple[Store, str, None]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.support.postgres import PostgresServer

    with PostgresServer() as server:
        server.createdb("bench")
        url = server.url("bench")
        with Store.open(url) as store:
            yield store, url, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=200, help="in-process runs per question")
    parser.add_argument("--cli-runs", type=int, default=20, help="CLI runs per question")
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument(
        "--cli",
        default=str(Path(sys.executable).with_name("overflowd-query")),
        help="the overflowd-query to time (default: this venv's)",
    )
    parser.add_argument(
        "--db",
        help="time an existing store built by this script (no loading): its URL",
    )
    parser.add_argument(
        "--unvacuumed",
        type=int,
        default=UNVACUUMED,
        help="PostgreSQL: the newest reports left out of the VACUUM after loading (default "
        f"{UNVACUUMED:,}; at least --reports: nothing vacuumed)",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="build the SQLite store in this directory and leave it there (time it again "
        "with --db sqlite:///DIR/overflowd.db)",
    )
    args = parser.parse_args(argv)
    have_cli = cli_available(args.cli)
    if not have_cli:
        print(
            f"{args.cli} has no 'who' command here: CLI rows are 'not available'", file=sys.stderr
        )
    if args.db:
        with Store.open(args.db, create=False) as store:
            with store.transaction("bench: reading", write=False) as conn:
                now_ms = int(conn.execute(text("SELECT MAX(last_ms) FROM reports")).scalar_one())
            n = store.count_reports()
            inproc, served = time_in_process(store, now_ms, args.runs)
            server = server_times(store, now_ms) if store.backend == "postgresql" else None
        cli = time_cli(args.cli, args.db, args.cli_runs, now_ms) if have_cli else None
        show(store.backend, inproc, cli, float("nan"), float("nan"), n, server, served)
        return 0
    backends = ("sqlite", "postgresql") if args.backend == "both" else (args.backend,)
    now_ms = int(time.time() * 1000)
    print(f"generating {args.reports:,} reports", file=sys.stderr)
    data = Data(args.reports, now_ms)
    print(f"  in {data.seconds:.0f} s", file=sys.stderr)
    for backend in backends:
        keep = args.keep is not None and backend == "sqlite"
        if keep:
            args.keep.mkdir(parents=True, exist_ok=True)
        tmp = args.keep if keep else Path(tempfile.mkdtemp(prefix="overflowd-bench-query-"))
        try:
            ctx = sqlite_store(tmp) if backend == "sqlite" else postgres_store()
            with ctx as (store, url, path):
                print(f"{backend}: loading {args.reports:,} reports", file=sys.stderr)
                load_s = build(store, data, unvacuumed=args.unvacuumed)
                if backend == "postgresql":
                    tail = min(args.unvacuumed, args.reports)
                    print(
                        f"postgresql: the newest {tail:,} reports not vacuumed, the rest vacuumed"
                    )
                per_report = bytes_per_report(store, args.reports, path)
                inproc, served = time_in_process(store, now_ms, args.runs)
                server = server_times(store, now_ms) if backend == "postgresql" else None
                cli = time_cli(args.cli, url, args.cli_runs, now_ms) if have_cli else None
                show(backend, inproc, cli, per_report, load_s, args.reports, server, served)
        finally:
            if not keep:
                shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\n(python {sys.version.split()[0]}, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
