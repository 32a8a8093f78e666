"""A stolen vault database verifies no password; rotation and Argon2 upgrades need none."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select

from overflowd.errors import SealError
from ratelock import crypto
from ratelock.vault import Vault, t_users
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
        for user in ("alice", "bob", "carol"):
            with pytest.raises(SealError):
                copy.verify("app", user, PASSWORD)
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
