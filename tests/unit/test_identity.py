"""The node key file: created private, refused when others can read it, never overwritten."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from overflowd.errors import IdentityError, SignatureError
from overflowd.identity import (
    NodeIdentity,
    check_signature,
    identity_path,
    load_identity,
    write_identity,
)


def test_written_key_is_owner_only_and_loads_back(tmp_path: Path) -> None:
    identity = NodeIdentity.generate()
    path = write_identity(tmp_path / "home", identity)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "home").stat().st_mode) == 0o700
    assert load_identity(tmp_path / "home") == identity


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o700 | 0o004])
def test_key_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    write_identity(tmp_path, NodeIdentity.generate())
    os.chmod(identity_path(tmp_path), mode)
    with pytest.raises(IdentityError, match="too open"):
        load_identity(tmp_path)


def test_existing_key_is_not_overwritten_without_force(tmp_path: Path) -> None:
    first = NodeIdentity.generate()
    write_identity(tmp_path, first)
    with pytest.raises(IdentityError, match="--force"):
        write_identity(tmp_path, NodeIdentity.generate())
    assert load_identity(tmp_path) == first
    second = NodeIdentity.generate()
    write_identity(tmp_path, second, force=True)
    assert load_identity(tmp_path) == second


def test_missing_and_garbage_key_files_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="overflowd init"):
        load_identity(tmp_path)
    path = identity_path(tmp_path)
    path.write_text("ed25519-seed:not base64!\n")
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="not an overflowd identity"):
        load_identity(tmp_path)


def test_repr_never_shows_the_seed() -> None:
    identity = NodeIdentity(seed=b"\x01" * 32)
    assert "\\x01" not in repr(identity) and identity.fingerprint in repr(identity)


def test_check_signature_maps_every_failure() -> None:
    identity = NodeIdentity.generate()
    sig = identity.sign(b"hello")
    check_signature(identity.public_key, b"hello", sig)
    for key, msg, s in [
        (identity.public_key, b"hellO", sig),
        (identity.public_key, b"hello", sig[:-1] + bytes([sig[-1] ^ 1])),
        (b"short", b"hello", sig),
        (identity.public_key, b"hello", b"short"),
        (bytes(32), b"hello", sig),  # a small-order point is not a key
    ]:
        with pytest.raises(SignatureError):
            check_signature(key, msg, s)
