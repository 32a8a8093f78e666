"""Budgets that cannot be exceeded: 8 processes x 8 threads against one store, on SQLite and on
the real PostgreSQL fixture, with a naive check-then-update limiter beside the vault in the
same processes (it overshoots; the vault does not); restarts and ``kill -9`` refund nothing."""

from __future__ import annotations

import multiprocessing
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from ratelock import crypto
from ratelock.vault import Vault, t_audit, t_users
from tests.support import ratelock_hammer as hm
from tests.support.ratelock import fast_settings

ROOT = Path(__file__).resolve().parents[2]
PROCESSES = 8
THREADS = 8
ROUNDS = 2  # phase 3 only: 128 attempts over 16 users, cap 40
TIMEOUT_S = 120


def _url(db_url: str) -> str:
    return db_url.replace("overflowd.db", "ratelock.db")


def _spawn(*args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.ratelock_hammer", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _worker(url: str, home: Path, start: Any, results: Any) -> None:
    try:
        results.put(hm.hammer(url, home, THREADS, ROUNDS, lambda: start.wait(timeout=TIMEOUT_S)))
    except BaseException as exc:  # report to the test, which fails with it
        results.put({"error": repr(exc)})
        raise


def test_no_overshoot_under_8_processes_x_8_threads(db_url: str, tmp_path: Path) -> None:
    url, home = _url(db_url), tmp_path / "home"
    with Vault.open(home, hm.hammer_settings(url, True)) as vault:
        vault.enroll("one", "alice", b"right")
        for i in range(hm.MANY_USERS):
            vault.enroll("many", f"user{i}", b"right")
        with vault._engine.begin() as conn:
            hm.naive_metadata.create_all(conn)
            conn.execute(insert(hm.naive_failures).values(user="alice", count=0))
    # fork: the workers share nothing with this process but the store and the secret file
    # (the Vault above is closed); each opens its own engine
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(PROCESSES + 1)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(url, home, start, results), daemon=True)
        for _ in range(PROCESSES)
    ]
    counts: Counter[str] = Counter()
    slowest_ms = 0
    t0 = time.monotonic()
    try:
        for p in procs:
            p.start()
        start.wait(timeout=TIMEOUT_S)  # every worker has its vault open
        t_ready = time.monotonic() - t0
        for _ in procs:
            result = results.get(timeout=TIMEOUT_S)
            assert "error" not in result, result
            slowest_ms = max(slowest_ms, result.pop("elapsed_ms"))
            counts.update(result)
        for p in procs:
            p.join(timeout=TIMEOUT_S)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    attempts = PROCESSES * THREADS
    print(
        f"\n{db_url.split(':')[0]}: ready in {t_ready:.1f} s, hammer {slowest_ms} ms, "
        f"attempts={attempts} counts={dict(sorted(counts.items()))}"
    )
    # one user: exactly the burst got past the check, never one more, the rest told to wait
    assert counts["one.wrong"] == hm.ONE_USER_BURST
    assert counts["one.over_budget"] == attempts - hm.ONE_USER_BURST
    # the naive limiter in the same processes, same budget, same hash: it overshoots
    assert counts["naive.passed"] > hm.ONE_USER_BURST, counts
    # many users: the client's shared bucket caps the total exactly; no user above its own
    assert counts["many.wrong"] == hm.MANY_CLIENT_BURST
    assert counts["many.over_budget"] == attempts * ROUNDS - hm.MANY_CLIENT_BURST
    for i in range(hm.MANY_USERS):
        assert counts[f"many.user{i}"] <= hm.MANY_USER_BURST
    # a restart (a new process, a new Vault) does not reset the budget: even the right password
    # is refused as over budget, never answered "wrong"
    with Vault.open(home, hm.hammer_settings(url, True)) as vault:
        assert vault.verify("one", "alice", b"right").kind == "over_budget"
        assert vault.audit_verify().ok


def test_kill_9_mid_hash_keeps_the_charge(db_url: str, tmp_path: Path) -> None:
    url, home = _url(db_url), tmp_path / "home"
    settings = fast_settings(url, user_failures_burst=1, user_failures_per_hour=1,
                             argon2_max_time_cost=50)
    with Vault.open(home, settings) as vault:
        # a verifier whose hash takes many seconds (50 passes over 64 MiB, within the raised
        # bound): the child is surely inside it when killed; the sealed value is random
        key = vault._current_key()
        nonce, sealed = key.seal_verifier("app", "carol", secrets.token_bytes(32),
                                          crypto.Argon2Parameters(50, 65536), b"\x00" * 16)
        with vault._engine.begin() as conn:
            conn.execute(
                insert(t_users).values(
                    namespace="app",
                    user="carol",
                    salt=b"\x00" * 16,
                    time_cost=50,
                    memory_kib=65536,
                    key_id=key.key_id,
                    nonce=nonce,
                    sealed=sealed,
                    updated_ms=0,
                )
            )
        child = _spawn("verify", url, str(home), "carol")
        try:
            deadline = time.monotonic() + 30
            charged = None
            while charged is None:
                assert time.monotonic() < deadline, "the child never took the charge"
                assert child.poll() is None, child.communicate()
                with vault._engine.connect() as conn:
                    charged = conn.execute(
                        select(t_audit.c.seq).where(
                            t_audit.c.subject == "carol", t_audit.c.outcome == "charged"
                        )
                    ).first()
                time.sleep(0.02)
            child.send_signal(signal.SIGKILL)
            out, _ = child.communicate(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL
        assert "done" not in out  # it died mid-hash, before any answer
        # the charge survived the kill: carol's one attempt is spent
        assert vault.verify("app", "carol", b"anything").kind == "over_budget"
        assert vault.audit_verify().ok


@pytest.mark.parametrize("backend", ["sqlite"])
def test_budget_survives_reopen(tmp_path: Path, backend: str) -> None:
    home = tmp_path / "home"
    settings = fast_settings(user_failures_burst=2, user_failures_per_hour=1)
    with Vault.open(home, settings) as vault:
        vault.enroll("app", "dave", b"pw")
        assert [vault.verify("app", "dave", b"x").kind for _ in range(2)] == ["wrong", "wrong"]
    with Vault.open(home, settings) as vault:
        out = vault.verify("app", "dave", b"pw")
        assert out.kind == "over_budget" and out.retry_after_s is not None
