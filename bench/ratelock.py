"""How fast ratelockd verifies, and that no concurrency gets past a budget (issue #13).

Everything goes through the real path: a ``ratelockd`` process on a Unix socket, the client
library (fresh nonce, every verdict verified) in this process's threads. For each backend
(SQLite in the home, and PostgreSQL: a throwaway cluster, tests/support/postgres.py) it prints:

* **one Argon2id hash** at the chosen parameters (default t=3, 64 MiB, the daemon's defaults),
  timed in this process: the floor a verify cannot go below;
* **verify, budget far away**: sequential verifies of the right password, p50/p99; the ratio of
  p50 to the hash's p50 is the goal's figure (within 1.2x);
* **verify, at the budget**: the user's failure budget spent, so every verify is refused before
  any hash (over_budget): p50/p99;
* **throughput**: ``--threads`` clients verifying many users at once, verifies/s (bounded by
  max_concurrent_hashes hashes in parallel on the cores this machine has);
* **overshoot**: ``--threads`` clients hammering one user with wrong passwords: how many
  "wrong" answers (charges granted) beyond the burst. Beside it, the naive baseline the issue
  describes: check the failure count, hash, then update (two transactions, as the 2016
  prototype and many rate limiters do) on the same database and threads;
* **memory**: ratelockd's peak RSS (VmHWM) after the concurrent runs, beside the bound
  max_concurrent_hashes x argon2_memory_kib.

    .venv/bin/python bench/ratelock.py                     # both backends, a few minutes
    .venv/bin/python bench/ratelock.py --backend sqlite --runs 20
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, String, Table, create_engine, select, update

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ratelock import crypto  # noqa: E402
from ratelock.client import Client  # noqa: E402
from tests.support.ratelockd import Ratelockd, add_client, make_home  # noqa: E402

BURST = 10  # the failure budget hammered in the overshoot runs


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def ms(x: float) -> str:
    return f"{x * 1000:8.1f} ms"


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def hammer(threads: int, per_thread: int, fn: Callable[[int], str]) -> tuple[list[str], float]:
    answers: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker(n: int) -> None:
        start.wait()
        for _ in range(per_thread):
            try:
                a = fn(n)
            except Exception as exc:  # counted: a failed request is a figure, not a crash
                a = f"error: {type(exc).__name__}"
            with lock:
                answers.append(a)

    ts = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return answers, time.perf_counter() - t0


def naive_overshoot(url: str, threads: int, per_thread: int,
                    params: crypto.Argon2Parameters) -> int:
    """Check-then-update: read the failure count, hash, then add one, in separate steps."""
    engine = create_engine(url, pool_size=threads + 2) if url.startswith("postgresql") \
        else create_engine(url, connect_args={"timeout": 60})
    md = MetaData()
    t = Table(f"naive_{secrets.token_hex(4)}", md, Column("user", String, primary_key=True),
              Column("failures", Integer, nullable=False))
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(t.insert().values(user="alice", failures=0))
    salt = crypto.new_salt()
    granted = 0
    lock = threading.Lock()

    def attempt(n: int) -> str:
        nonlocal granted
        with engine.connect() as conn:
            failures = conn.execute(select(t.c.failures).where(t.c.user == "alice")).scalar_one()
            conn.rollback()
        if failures >= BURST:
            return "over_budget"
        crypto.argon2(b"a wrong guess", salt, params)  # the check takes a hash's time
        with engine.begin() as conn:
            conn.execute(update(t).where(t.c.user == "alice").values(failures=t.c.failures + 1))
        with lock:
            granted += 1
        return "wrong"

    hammer(threads, per_thread, attempt)
    md.drop_all(engine)
    engine.dispose()
    return max(0, granted - BURST)


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@contextmanager
def backends(which: str) -> Iterator[list[tuple[str, str]]]:
    out: list[tuple[str, str]] = []
    server = None
    if which in ("sqlite", "both"):
        out.append(("sqlite", ""))
    if which in ("postgresql", "both"):
        from tests.support.postgres import PostgresServer

        server = PostgresServer()
        server.start()
        name = server.create_database("ratelock_bench")
        out.append(("postgresql", server.url(name)))
    try:
        yield out
    finally:
        if server is not None:
            server.stop()


def run_backend(name: str, url: str, args: argparse.Namespace) -> dict[str, float]:
    params = crypto.Argon2Parameters(args.time_cost, args.memory_kib)
    salt = crypto.new_salt()
    crypto.argon2(b"warm", salt, params)
    home = Path(tempfile.mkdtemp(prefix="ratelock-bench-")) / "home"
    make_home(home, store_url=url)
    # make_home writes the test cost; the bench measures the chosen one
    text = (home / "overflowd.toml").read_text()
    text = text.replace("argon2_time_cost = 1\nargon2_memory_kib = 8\n",
                        f"argon2_time_cost = {args.time_cost}\n"
                        f"argon2_memory_kib = {args.memory_kib}\n"
                        f"max_concurrent_hashes = {args.hashes}\n"
                        f"user_failures_burst = {BURST}\nuser_failures_per_hour = 1\n"
                        "client_failures_burst = 100000\nclient_failures_per_hour = 100000\n"
                        "global_failures_burst = 100000\nglobal_failures_per_hour = 100000\n")
    (home / "overflowd.toml").write_text(text)
    token = add_client(home, "bench")
    d = Ratelockd(home)
    try:
        clients = [d.client(token) for _ in range(args.threads)]
        c = clients[0]
        users = [f"user-{i}" for i in range(args.threads)]
        for u in [*users, "alice", "hammered"]:
            assert c.enroll(u, b"correct horse").ok
        c.verify("alice", b"correct horse")
        # Interleaved, one hash then one verify: the machine's load drifts, and the ratio must
        # compare the two under the same load.
        hash_t: list[float] = []
        far: list[float] = []
        for _ in range(args.runs):
            hash_t += timed(lambda: crypto.argon2(b"correct horse", salt, params), 1)
            far += timed(lambda: c.verify("alice", b"correct horse"), 1)
        for _ in range(BURST):
            c.verify("spent", b"x")  # unknown user: failures are charged all the same
        assert c.enroll("spent2", b"pw").ok
        for _ in range(BURST):
            c.verify("spent2", b"guess")
        assert c.verify("spent2", b"guess").outcome == "over_budget"
        at = timed(lambda: c.verify("spent2", b"pw"), args.runs)

        per = max(1, args.runs // 2)
        answers, took = hammer(args.threads, per,
                               lambda n: clients[n].verify(users[n], b"correct horse").outcome)
        errors = sum(a != "ok" for a in answers)
        throughput = (len(answers) - errors) / took
        answers, _ = hammer(args.threads, 2 * BURST // args.threads + 2,
                            lambda n: clients[n].verify("hammered", b"guess").outcome)
        granted = answers.count("wrong")
        overshoot = max(0, granted - BURST)
        assert granted <= BURST, (granted, BURST)
        rss = peak_rss_kib(d.proc.pid)
        for cl in clients:
            cl.close()
    finally:
        d.stop()
    naive_url = url or f"sqlite:///{home / 'naive.db'}"
    naive = naive_overshoot(naive_url, args.threads, 2 * BURST // args.threads + 2, params)
    h50, f50 = statistics.median(hash_t), statistics.median(far)
    print(f"\n== {name}: Argon2id t={args.time_cost} m={args.memory_kib} KiB, "
          f"{args.hashes} hashes at once, {args.threads} client threads, {os.cpu_count()} cores")
    print(f"  one Argon2id hash (in process)      p50 {ms(h50)}  p99 {ms(pct(hash_t, .99))}")
    print(f"  verify, budget far away             p50 {ms(f50)}  p99 {ms(pct(far, .99))}"
          f"   = {f50 / h50:.2f}x the hash (goal <= 1.2x)")
    print(f"  verify, at the budget (refused)     p50 {ms(statistics.median(at))}  "
          f"p99 {ms(pct(at, .99))}")
    print(f"  throughput, {args.threads} threads, many users   {throughput:8.1f} verifies/s"
          f"  ({errors} not ok of {len(answers)})")
    print(f"  overshoot, {len(answers)} wrong guesses at burst {BURST}: ratelockd "
          f"{overshoot} (granted {granted})   naive check-then-update {naive}  (goal 0)")
    load = os.getloadavg()[0]
    print(f"  load average during the run: {load:.1f} on {os.cpu_count()} cores")
    print(f"  ratelockd peak RSS {rss / 1024:8.1f} MiB   bound on hash memory "
          f"{args.hashes * args.memory_kib / 1024:.0f} MiB (+ interpreter)")
    return {"ratio": f50 / h50, "overshoot": overshoot, "naive": naive}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    p.add_argument("--runs", type=int, default=30, help="samples per latency figure")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--hashes", type=int, default=4, help="max_concurrent_hashes")
    p.add_argument("--time-cost", type=int, default=3)
    p.add_argument("--memory-kib", type=int, default=65536)
    args = p.parse_args()
    results = {}
    with backends(args.backend) as todo:
        for name, url in todo:
            results[name] = run_backend(name, url, args)
    print("\n== summary")
    for name, r in results.items():
        ok = r["ratio"] <= 1.2 and r["overshoot"] == 0
        print(f"  {name:10s} verify/hash {r['ratio']:.2f}x  overshoot {r['overshoot']:.0f} "
              f"(naive {r['naive']:.0f})  {'goal met' if ok else 'GOAL MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Client", "main"]
