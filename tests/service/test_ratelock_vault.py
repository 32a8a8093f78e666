"""The vault through its library API, on SQLite and on the real PostgreSQL fixture."""

from __future__ import annotations

from pathlib import Path

import pytest

from overflowd.identity import NodeIdentity, write_identity
from ratelock.vault import Vault
from tests.support.ratelock import fast_settings


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    write_identity(h, NodeIdentity.generate())
    return h


def _url(db_url: str) -> str:
    # the sqlite db_url points into tmp_path/home/overflowd.db: use a file of our own there
    return db_url.replace("overflowd.db", "ratelock.db")


def test_enroll_verify_change_delete(db_url: str, home: Path) -> None:
    settings = fast_settings(_url(db_url))
    with Vault.open(home, settings) as vault:
        assert vault.enroll("app", "alice", b"correct horse").kind == "ok"
        assert vault.enroll("app", "alice", b"other").kind == "exists"
        assert vault.verify("app", "alice", b"correct horse").kind == "ok"
        assert vault.verify("app", "alice", b"wrong").kind == "wrong"
        assert vault.verify("app", "bob", b"x").kind == "unknown"
        # namespaced by client: another application does not see alice
        assert vault.verify("other-app", "alice", b"correct horse").kind == "unknown"
        assert vault.change("app", "alice", b"nope", b"new").kind == "wrong"
        assert vault.change("app", "alice", b"correct horse", b"new").kind == "ok"
        assert vault.verify("app", "alice", b"correct horse").kind == "wrong"
        assert vault.verify("app", "alice", b"new").kind == "ok"
        assert vault.delete_user("app", "alice").kind == "ok"
        assert vault.verify("app", "alice", b"new").kind == "unknown"
        assert vault.delete_user("app", "alice").kind == "unknown"
        report = vault.audit_verify()
        assert report.ok and report.entries > 10


def test_over_budget_is_not_wrong_and_others_are_not_locked_out(db_url: str, home: Path) -> None:
    now = [1_000_000_000_000]
    settings = fast_settings(_url(db_url), user_failures_burst=3, user_failures_per_hour=1)
    with Vault.open(home, settings, clock_ms=lambda: now[0]) as vault:
        vault.enroll("app", "alice", b"pw")
        vault.enroll("app", "bob", b"pw")
        assert [vault.verify("app", "alice", b"x").kind for _ in range(3)] == ["wrong"] * 3
        # "at most 3" means 3: the fourth is refused, even with the right password
        out = vault.verify("app", "alice", b"pw")
        assert out.kind == "over_budget"
        assert out.retry_after_s == pytest.approx(3600 / 1)
        assert vault.verify("app", "bob", b"pw").kind == "ok"  # bob is not locked out
        now[0] += 3_600_000  # one token back after an hour
        assert vault.verify("app", "alice", b"pw").kind == "ok"


def test_records_put_get_delete(db_url: str, home: Path) -> None:
    with Vault.open(home, fast_settings(_url(db_url))) as vault:
        assert vault.put("app", "42", b"secret record").kind == "ok"
        assert vault.get("app", "42").data == b"secret record"
        assert vault.put("app", "42", b"v2").kind == "ok"
        assert vault.get("app", "42").data == b"v2"
        assert vault.get("other", "42").kind == "not_found"
        assert vault.delete_record("app", "42").kind == "ok"
        assert vault.get("app", "42").kind == "not_found"


def test_client_tokens_hashed_at_rest(db_url: str, home: Path) -> None:
    with Vault.open(home, fast_settings(_url(db_url))) as vault:
        token = vault.add_client("web")
        assert vault.authenticate(token) == "web"
        assert vault.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
        with pytest.raises(ValueError, match="exists"):
            vault.add_client("web")
        assert [c.name for c in vault.list_clients()] == ["web"]
        assert vault.revoke_client("web") is True
        assert vault.authenticate(token) is None
        assert vault.revoke_client("web") is False
    if db_url.startswith("sqlite"):
        assert token.encode() not in Path(_url(db_url).removeprefix("sqlite:///")).read_bytes()
