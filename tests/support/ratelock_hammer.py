"""Worker processes for tests/service/test_ratelock_budget_race.py.

:func:`hammer` runs in a forked process (forking the test process skips seconds of imports
per worker on a loaded machine); ``python -m tests.support.ratelock_hammer hammer URL HOME GO
THREADS ROUNDS`` runs the same standalone: it: opens its own Vault on the shared store, prints
``ready``, waits for the file GO, then THREADS threads each run, phase by phase (a barrier
between phases so each phase is one concurrent burst):

1. the naive check-then-update for user alice, every thread at once;
2. ``vault.verify("one", "alice", wrong)``, every thread at once, same budget;
3. ``vault.verify("many", user_i, wrong)`` ROUNDS times, over MANY_USERS users.

It prints one JSON line of counts: how many attempts got past each budget check.

``verify URL HOME USER``: one verify of a wrong password, printing ``done`` after it (the
kill -9 test kills it mid-hash, so ``done`` must never appear).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Column, Integer, MetaData, String, Table, select, update

from ratelock import crypto
from ratelock.config import RatelockSettings
from ratelock.vault import Vault
from tests.support.ratelock import fast_settings

ONE_USER_BURST = 10
MANY_USERS = 16
MANY_USER_BURST = 4
MANY_CLIENT_BURST = 40
#: the naive limiter hashes between its check and its update, as a real one does: Argon2 at
#: 1 MiB takes a millisecond or two, the window the race needs (no sleep)
NAIVE_ARGON2 = crypto.Argon2Parameters(time_cost=1, memory_kib=1024)

naive_metadata = MetaData()
naive_failures = Table(
    "naive_failures",
    naive_metadata,
    Column("user", String(64), primary_key=True),
    Column("count", Integer, nullable=False),
)


def hammer_settings(url: str, one_user: bool) -> RatelockSettings:
    if one_user:
        return fast_settings(url, user_failures_burst=ONE_USER_BURST, user_failures_per_hour=1)
    return fast_settings(
        url,
        user_failures_burst=MANY_USER_BURST,
        user_failures_per_hour=1,
        client_failures_burst=MANY_CLIENT_BURST,
        client_failures_per_hour=1,
    )


def naive_verify(vault: Vault, user: str, password: bytes) -> bool:
    """The 2016 shape: read the count, decide, hash, then count. True = passed the check."""
    engine = vault._engine  # the same database, its own table
    with engine.connect() as conn:
        count = conn.execute(
            select(naive_failures.c.count).where(naive_failures.c.user == user)
        ).scalar_one()
        conn.rollback()
    if count >= ONE_USER_BURST:
        return False
    crypto.argon2(password, b"s" * 16, NAIVE_ARGON2)  # the answer is computed...
    with engine.begin() as conn:  # ...and only then is the failure counted
        conn.execute(
            update(naive_failures)
            .where(naive_failures.c.user == user)
            .values(count=naive_failures.c.count + 1)
        )
    return True


def hammer(
    url: str, home: Path, threads: int, rounds: int, ready: Callable[[], None]
) -> dict[str, int]:
    """One worker process's share; ``ready()`` returns when every process may start."""
    one = Vault.open(home, hammer_settings(url, True))
    many = Vault.open(home, hammer_settings(url, False))
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    ready()

    barrier = threading.Barrier(threads)

    def work(index: int) -> None:
        local: Counter[str] = Counter()
        # phase 1, the naive limiter: every thread at once, as an attacker would
        barrier.wait(timeout=60)
        local["naive." + ("passed" if naive_verify(one, "alice", b"wrong") else "refused")] += 1
        # phase 2, the vault, one user: every thread at once again
        barrier.wait(timeout=60)
        local["one." + one.verify("one", "alice", b"wrong").kind] += 1
        # phase 3, the vault, many users of one client
        barrier.wait(timeout=60)
        for r in range(rounds):
            user = f"user{(index * rounds + r) % MANY_USERS}"
            kind = many.verify("many", user, b"wrong").kind
            local["many." + kind] += 1
            if kind == "wrong":
                local[f"many.{user}"] += 1
        with lock:
            counts.update(local)

    started = time.monotonic()
    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    counts["elapsed_ms"] = int((time.monotonic() - started) * 1000)
    one.close()
    many.close()
    return dict(counts)


def hammer_main(url: str, home: Path, go: Path, threads: int, rounds: int) -> None:
    def ready() -> None:
        print("ready", flush=True)
        deadline = time.monotonic() + 60
        while not go.exists():
            if time.monotonic() > deadline:
                raise SystemExit("no go file within 60 s")
            time.sleep(0.005)

    print(json.dumps(hammer(url, home, threads, rounds, ready)), flush=True)


def verify_once(url: str, home: Path, user: str) -> None:
    # the victim's verifier asks 50 passes (a long hash to kill): within this raised bound
    vault = Vault.open(home, fast_settings(url, user_failures_burst=1, user_failures_per_hour=1,
                                           argon2_max_time_cost=50))
    print("started", flush=True)
    vault.verify("app", user, b"wrong")
    print("done", flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "hammer":
        hammer_main(args[0], Path(args[1]), Path(args[2]), int(args[3]), int(args[4]))
    elif mode == "verify":
        verify_once(args[0], Path(args[1]), args[2])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
