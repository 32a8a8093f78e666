"""ratelock.crypto: the secret file, sealing, domain separation, token digests."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from overflowd.errors import SealError, SecretError
from ratelock import crypto

FAST = crypto.Argon2Parameters(time_cost=1, memory_kib=8)


def test_secret_created_0600_on_first_open_and_stable(tmp_path: Path) -> None:
    path = tmp_path / "home" / "ratelock.secret"
    first = crypto.open_secret(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = crypto.open_secret(path)
    assert again.current.secret == first.current.secret and first.current.key_id == 1
    assert "secret=" not in repr(first.current) and first.current.secret.hex() not in repr(first)


def test_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ratelock.secret"
    crypto.open_secret(path)
    os.chmod(path, 0o640)
    with pytest.raises(SecretError, match="too open"):
        crypto.open_secret(path)


def test_secret_garbage_and_absence(tmp_path: Path) -> None:
    path = tmp_path / "ratelock.secret"
    with pytest.raises(SecretError, match="no vault secret"):
        crypto.open_secret(path, create=False)
    assert not path.exists()  # nothing created on failure
    path.write_text("1:not-base64!\n")
    os.chmod(path, 0o600)
    with pytest.raises(SecretError, match=":1: not a ratelock vault key"):
        crypto.open_secret(path)


def test_sealed_verifier_is_bound_to_its_user_and_purpose(tmp_path: Path) -> None:
    key = crypto.open_secret(tmp_path / "s").current
    verifier = crypto.argon2(b"pw", crypto.new_salt(), FAST)
    salt = b"s" * 16
    nonce, sealed = key.seal_verifier("app", "alice", verifier, FAST, salt)
    assert key.open_verifier("app", "alice", nonce, sealed, FAST, salt) == verifier
    with pytest.raises(SealError):
        key.open_verifier("app", "bob", nonce, sealed, FAST, salt)  # moved to another user
    with pytest.raises(SealError):
        key.open_verifier("ap", "palice", nonce, sealed, FAST, salt)  # namespace/user boundary
    with pytest.raises(SealError):
        key.open_record("app", "alice", nonce, sealed)  # a verifier is not a record
    other = crypto.open_secret(tmp_path / "other").current
    with pytest.raises(SealError):
        other.open_verifier("app", "alice", nonce, sealed, FAST, salt)  # another vault's secret
    flipped = bytes([sealed[0] ^ 1]) + sealed[1:]
    with pytest.raises(SealError):
        key.open_verifier("app", "alice", nonce, flipped, FAST, salt)
    # the parameters and salt are associated data: edited ones do not open (v2)
    for params in (crypto.Argon2Parameters(FAST.time_cost + 1, FAST.memory_kib),
                   crypto.Argon2Parameters(FAST.time_cost, FAST.memory_kib * 1024)):
        with pytest.raises(SealError):
            key.open_verifier("app", "alice", nonce, sealed, params, salt)
    with pytest.raises(SealError):
        key.open_verifier("app", "alice", nonce, sealed, FAST, b"t" * 16)
    # a v1 verifier (namespace and user only) opens only with open_verifier_v1
    with pytest.raises(SealError):
        key.open_verifier_v1("app", "alice", nonce, sealed)


def test_argon2_is_deterministic_per_salt_and_params() -> None:
    salt = b"s" * 16
    assert crypto.argon2(b"pw", salt, FAST) == crypto.argon2(b"pw", salt, FAST)
    assert crypto.argon2(b"pw", salt, FAST) != crypto.argon2(b"pw", b"t" * 16, FAST)
    assert crypto.argon2(b"pw", salt, FAST) != crypto.argon2(
        b"pw", salt, crypto.Argon2Parameters(2, 8)
    )


def test_tokens_are_random_and_digested() -> None:
    a, b = crypto.new_token(), crypto.new_token()
    assert a != b and a.startswith("rl1_") and len(a) == 47
    assert crypto.token_digest(a) != crypto.token_digest(b)
    assert len(crypto.token_digest(a)) == 32
