"""A stolen vault database verifies no password; rotation and Argon2 upgrades need none."""

from __future__ import annotations

import resource
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, update

from overflowd.errors import SealError, VaultError
from ratelock import crypto
from ratelock.config import RatelockSettings
from ratelock.vault import Vault, t_audit, t_meta, t_users
from tests.support.ratelock import fast_settings

PASSWORD = b"correct horse battery staple"


def test_a_copy_of_the_database_without_the_secret_verifies_nothing(tmp_path: Path) -> None:
    home, thief = tmp_path / "home", tmp_path / "thief"
    with Vault.open(home, fast_settings()) as vault:
        for user in ("alice", "bob", "carol"):
            vault.enroll("app", user, PASSWORD)
        vault.put("app", "42", b"the record")
    thief.mkdir()
    for f in home.glob("ratelock.db*"):
        shutil.copy(f, thief / f.name)
    stolen = b"".join(f.read_bytes() for f in thief.glob("ratelock.db*"))
    # offline: everything an attacker can compute from the copy and the right password
    engine = create_engine(f"sqlite:///{thief / 'ratelock.db'}")
    with engine.connect() as conn:
        rows = conn.execute(select(t_users)).all()
    engine.dispose()
    assert len(rows) == 3
    for row in rows:
        params = crypto.Argon2Parameters(row.time_cost, row.memory_kib)
        guess = crypto.argon2(PASSWORD, bytes(row.salt), params)
        assert guess not in stolen  # the Argon2 output is nowhere in the copy, only sealed
        assert not crypto.same(guess, bytes(row.sealed)[:32])
    assert PASSWORD not in stolen and b"the record" not in stolen
    # online with the copy: a vault on it makes a new secret and opens nothing
    with Vault.open(thief, fast_settings()) as copy:
        for user in ("alice", "bob", "carol"):  # refused, not hashed: nothing opens
            assert copy.verify("app", user, PASSWORD).kind == "tampered"
        assert copy.tampered_rows == 3
        with pytest.raises(SealError):
            copy.get("app", "42")
    # the real vault still works
    with Vault.open(home, fast_settings()) as vault:
        assert vault.verify("app", "alice", PASSWORD).kind == "ok"


def test_rotation_reencrypts_without_passwords(db_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    url = db_url.replace("overflowd.db", "ratelock.db")
    with Vault.open(home, fast_settings(url)) as vault:
        vault.enroll("app", "alice", PASSWORD)
        vault.put("app", "42", b"record")
        old_secret = (home / "ratelock.secret").read_text()
        assert vault.rotate_secret() == 2
        assert vault.status().secret_key_id == 2
        assert vault.verify("app", "alice", PASSWORD).kind == "ok"
        assert vault.get("app", "42").data == b"record"
    new_secret = crypto.open_secret(home / "ratelock.secret")
    assert [k.key_id for k in new_secret.keys] == [2]  # the old key is gone
    # a thief holding the old secret file and the rotated database opens nothing
    (home / "ratelock.secret").write_text(old_secret)
    with Vault.open(home, fast_settings(url)) as vault, pytest.raises(SealError):
        vault.verify("app", "alice", PASSWORD)


def test_argon2_parameters_upgrade_at_next_successful_verify(db_url: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    url = db_url.replace("overflowd.db", "ratelock.db")
    with Vault.open(home, fast_settings(url)) as vault:
        vault.enroll("app", "alice", PASSWORD)
    stronger = fast_settings(url, argon2_time_cost=2, argon2_memory_kib=64)
    with Vault.open(home, stronger) as vault:
        assert vault.verify("app", "alice", b"wrong").kind == "wrong"
        with vault._engine.connect() as conn:
            row = conn.execute(select(t_users.c.time_cost, t_users.c.memory_kib)).one()
        assert (row.time_cost, row.memory_kib) == (1, 8)  # a failure upgrades nothing
        assert vault.verify("app", "alice", PASSWORD).kind == "ok"
        with vault._engine.connect() as conn:
            row = conn.execute(select(t_users.c.time_cost, t_users.c.memory_kib)).one()
        assert (row.time_cost, row.memory_kib) == (2, 64)
        assert vault.verify("app", "alice", PASSWORD).kind == "ok"
        assert vault.verify("app", "alice", b"wrong").kind == "wrong"


@pytest.mark.parametrize(
    ("time_cost", "memory_kib"),
    [(1, 4 * 1024 * 1024), (10_000, 8), (2, 8)],
    ids=["memory-bomb", "time-bomb", "within-bounds"],
)
def test_a_row_whose_parameters_were_edited_is_refused_not_hashed(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, time_cost: int, memory_kib: int
) -> None:
    """A database writer (no secret) raises alice's stored Argon2 parameters so that every
    verify of her allocates 4 GiB or runs for minutes. Out of the configured bounds, the row is
    refused before it is opened; within them, the parameters are in the sealed verifier's
    associated data and it does not open. Either way: counted, audited, never hashed."""
    home = tmp_path / "home"
    url = db_url.replace("overflowd.db", "ratelock.db")
    with Vault.open(home, fast_settings(url)) as vault:
        assert vault.enroll("app", "alice", PASSWORD).kind == "ok"
        with vault._engine.begin() as conn:
            conn.execute(update(t_users).values(time_cost=time_cost, memory_kib=memory_kib))
        hashed: list[crypto.Argon2Parameters] = []
        real = crypto.argon2
        monkeypatch.setattr(crypto, "argon2", lambda pw, salt, p: hashed.append(p) or real(
            pw, salt, p))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert vault.verify("app", "alice", PASSWORD).kind == "tampered"
        assert vault.change("app", "alice", PASSWORD, b"new").kind == "tampered"
        assert hashed == []  # neither verify nor change hashed anything
        assert vault.tampered_rows == 2
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB
        with vault._engine.connect() as conn:
            outcomes = [r.outcome for r in conn.execute(
                select(t_audit.c.outcome).where(t_audit.c.subject == "alice")
                .order_by(t_audit.c.seq))]
        assert outcomes.count("tampered") == 2
        assert vault.audit_verify().ok


def test_the_configured_parameters_must_be_within_the_bounds(tmp_path: Path) -> None:
    with pytest.raises(VaultError, match="argon2_max"):
        Vault.open(tmp_path / "h", fast_settings(argon2_time_cost=3, argon2_max_time_cost=2))
    problems = dict(RatelockSettings(argon2_max_memory_kib=1024).problems())
    assert "argon2_max_memory_kib" in problems
    assert "argon2_max_time_cost" in dict(RatelockSettings(argon2_max_time_cost=2).problems())


def test_a_schema_1_store_is_resealed_once(tmp_path: Path) -> None:
    """Before v2 a verifier's associated data held only its namespace and user. The first open
    by this version seals every one again with its parameters and salt, records schema 2 and
    audits it; the passwords still verify, and a second open reseals nothing."""
    home = tmp_path / "home"
    with Vault.open(home, fast_settings()) as vault:
        for user in ("alice", "bob"):
            assert vault.enroll("app", user, PASSWORD).kind == "ok"
        # turn the store into what schema 1 wrote: v1 associated data, schema_version 1
        key = vault._current_key()
        with vault._engine.begin() as conn:
            for r in conn.execute(select(t_users)).all():
                params = crypto.Argon2Parameters(r.time_cost, r.memory_kib)
                plain = key.open_verifier(r.namespace, r.user, r.nonce, r.sealed, params, r.salt)
                nonce, sealed = crypto._seal(
                    key._derive(crypto.PERSON_VERIFIER),
                    crypto._aad(crypto.AAD_VERIFIER_V1, r.namespace, r.user), plain)
                conn.execute(update(t_users).where(t_users.c.user == r.user)
                             .values(nonce=nonce, sealed=sealed))
            conn.execute(update(t_meta).where(t_meta.c.name == "schema_version")
                         .values(value="1"))
        assert vault.verify("app", "alice", PASSWORD).kind == "tampered"  # v1 no longer opens
    for _ in range(2):
        with Vault.open(home, fast_settings()) as vault:
            assert vault.verify("app", "alice", PASSWORD).kind == "ok"
            assert vault.verify("app", "bob", b"wrong").kind == "wrong"
            assert vault.status().schema_version == 2
            with vault._engine.connect() as conn:
                reseals = conn.execute(select(t_audit.c.subject)
                                       .where(t_audit.c.op == "schema.reseal")).all()
            assert [r.subject for r in reseals] == ["2"]  # once, two verifiers
            assert vault.audit_verify().ok


def test_secret_rotation_while_ratelockd_runs(tmp_path: Path) -> None:
    """``ratelock secret rotate`` beside a running daemon that keeps answering: the daemon
    sees the rotation record in the store before its next seal and reads the new key, and a
    row it read under the old key just before the reseal still opens. Nothing is lost: every
    verify and get during and after the rotation answers, and so does a restarted daemon."""
    import threading

    from tests.support.cli import call
    from tests.support.ratelockd import Ratelockd, add_client, make_home

    home = tmp_path / "home"
    # reads budgeted past what the busy loop can spend: on a quiet machine it read k1 more
    # than the default 60 times, and the restarted daemon's last get answered over_budget
    reads = "".join(
        f"{scope}_reads_{kind} = 1000000\n"
        for scope in ("key", "client", "global")
        for kind in ("burst", "per_hour")
    )
    make_home(home, reads)
    token = add_client(home, "app")
    d = Ratelockd(home)
    try:
        with d.client(token) as c:
            for user in ("alice", "bob"):
                assert c.enroll(user, PASSWORD).ok
            assert c.put("k1", b"first record").ok
        stop, seen, errors = threading.Event(), [], []

        def busy() -> None:
            with d.client(token) as c:
                while not stop.is_set():
                    try:
                        seen.append(c.verify("alice", PASSWORD).outcome)
                        got = c.get("k1")
                        if got.outcome != "over_budget":
                            seen.append("ok" if got.data == b"first record" else "bad-data")
                    except Exception as exc:
                        errors.append(exc)
                        return

        worker = threading.Thread(target=busy)
        worker.start()
        try:
            time.sleep(0.3)
            r = call("ratelock", "--home", str(home), "secret", "rotate")
            assert r.code == 0 and "secret rotated: 3 " in r.out, r.err
            time.sleep(0.3)
        finally:
            stop.set()
            worker.join(timeout=30)
        assert not errors and seen and set(seen) == {"ok"}, (errors, set(seen))
        assert [k.key_id for k in crypto.open_secret(home / "ratelock.secret").keys] == [2]
        with d.client(token) as c:  # new seals after the rotation: under the new key
            assert c.enroll("carol", PASSWORD).ok
            assert c.change("bob", PASSWORD, b"bob's new").ok
            assert c.put("k2", b"second record").ok
    finally:
        code, err = d.stop()
    assert code == 0, err
    with Vault.open(home, fast_settings()) as vault, vault._engine.connect() as conn:
        assert {r.key_id for r in conn.execute(select(t_users.c.key_id))} == {2}
    d = Ratelockd(home)  # a restart knows only the new key: everything still opens
    try:
        with d.client(token) as c:
            assert c.verify("alice", PASSWORD).ok and c.verify("carol", PASSWORD).ok
            assert c.verify("bob", b"bob's new").ok
            assert c.get("k1").data == b"first record" and c.get("k2").data == b"second record"
    finally:
        d.stop()
    r = call("ratelock", "--home", str(home), "audit", "verify")
    assert r.code == 0, r.err


def test_two_rotations_at_once_lose_no_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two ``ratelock secret rotate`` at once (now allowed beside a running ratelockd, so two
    operators or two cron jobs may meet) both read the file before either wrote: both made a
    key 2, each wrote its own, the second reseal found nothing to do, and the file kept the
    key the database was not sealed with: every verifier and record lost. Rotations are
    serialised on a lock beside the secret file."""
    import threading

    home = tmp_path / "home"
    settings = fast_settings()
    with Vault.open(home, settings) as vault:
        vault.enroll("app", "alice", PASSWORD)
        vault.put("app", "42", b"record")
    a, b = Vault.open(home, settings), Vault.open(home, settings)
    both_read = threading.Barrier(2, timeout=2)
    real_open = crypto.open_secret

    def open_then_meet(path: Path, *, create: bool = True) -> crypto.SecretFile:
        got = real_open(path, create=create)
        try:
            both_read.wait()  # the race, forced: each has read before the other writes
        except threading.BrokenBarrierError:
            pass  # serialised: the other rotation is not reading now
        return got

    monkeypatch.setattr(crypto, "open_secret", open_then_meet)
    errors: list[BaseException] = []

    def rotate(v: Vault) -> None:
        try:
            v.rotate_secret()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rotate, args=(v,)) for v in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    a.close()
    b.close()
    monkeypatch.setattr(crypto, "open_secret", real_open)
    assert errors == []
    with Vault.open(home, settings) as vault:
        assert vault.verify("app", "alice", PASSWORD).kind == "ok"
        assert vault.get("app", "42").data == b"record"
        assert vault.status().secret_key_id == 3
