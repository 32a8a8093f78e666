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


def test_records_a_client_reads_at_most_its_budget_however_it_asks(db_url: str, home: Path) -> None:
    """Same key, other keys, missing keys, threads at once, over three hours of clock: never
    more than burst + per_hour x hours reads, counted per client."""
    import threading

    burst, per_hour = 20, 20
    now = [1_900_000_000_000]
    settings = fast_settings(_url(db_url), client_reads_burst=burst, client_reads_per_hour=per_hour)
    with Vault.open(home, settings, clock_ms=lambda: now[0]) as vault:
        for i in range(10):
            vault.put("app", f"k{i}", f"record {i}".encode())
        served: list[int] = []  # clock of each read that returned data or not_found
        lock = threading.Lock()

        def ask(keys: list[str]) -> None:
            for key in keys:
                out = vault.get("app", key)
                if out.kind in ("ok", "not_found"):
                    with lock:
                        served.append(now[0])
                else:
                    assert out.kind == "over_budget" and out.retry_after_s

        # at once, from 8 threads, a mix of one key, many keys and missing keys
        patterns = [["k0"] * 4, [f"k{i}" for i in range(4)], [f"nope{i}" for i in range(4)]]
        threads = [threading.Thread(target=ask, args=(patterns[i % 3],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(served) == burst  # exactly the burst, 32 asked
        for step in range(12):  # three hours in 15-minute steps, asking for more than refills
            now[0] += 900_000
            ask([f"k{(step + i) % 10}" for i in range(7)])
        assert len(served) == burst + 3 * per_hour
        for i, t0 in enumerate(served):  # any window of an hour: at most burst + per_hour
            assert sum(1 for t in served[i:] if t - t0 <= 3_600_000) <= burst + per_hour
        # another client is not charged for this one's reads
        vault.put("other", "k0", b"x")
        assert vault.get("other", "k0").kind == "ok"


def test_config_section_is_strict(tmp_path: Path) -> None:
    from overflowd.config import parse_section
    from overflowd.errors import ConfigError
    from ratelock.config import RatelockSettings, load_ratelock

    assert load_ratelock(tmp_path) == RatelockSettings()
    text = "[ratelock]\nuser_failures_burst = 3\nstore_url = 'sqlite:////tmp/x.db'\n"
    s = parse_section(text, "ratelock", RatelockSettings, "f.toml")
    assert s.user_failures_burst == 3 and s.store_url_for(tmp_path) == "sqlite:////tmp/x.db"
    assert RatelockSettings().store_url_for(tmp_path) == f"sqlite:///{tmp_path / 'ratelock.db'}"
    for bad, match in (
        (
            "[ratelock]\nuser_failures_bust = 3\n",
            "f.toml:2: unknown key 'ratelock.user_failures_bust'",
        ),
        ("[ratelock]\nuser_failures_burst = 0\n", "user_failures_burst' must be at least 1"),
        ("[ratelock]\nlisten = 'here'\n", "unix:PATH or tcp:HOST:PORT"),
        ("[ratelock]\nsocket_mode = '999'\n", "octal"),
        ("[ratelock]\nargon2_memory_kib = 1\n", "argon2_memory_kib"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_section(bad, "ratelock", RatelockSettings, "f.toml")


def test_bad_input_is_invalid_not_an_error(home: Path) -> None:
    settings = fast_settings(max_password_bytes=16, max_name_bytes=8)
    with Vault.open(home, settings) as vault:
        assert vault.enroll("app", "x" * 9, b"pw").kind == "invalid"
        assert vault.enroll("app", "a\nb", b"pw").kind == "invalid"
        assert vault.verify("app", "alice", b"p" * 17).kind == "invalid"
        assert vault.put("app", "", b"").kind == "invalid"
        assert vault.status().audit_entries == 0  # refused before anything is charged


def test_concurrent_hashes_are_bounded(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """max_concurrent_hashes Argon2 calls at once per vault, however many threads ask (the
    real hash runs; the wrapper only counts who is inside it)."""
    import threading

    from ratelock import crypto

    real, inside, peak = crypto.argon2, [0], [0]
    lock = threading.Lock()

    def counting(password: bytes, salt: bytes, params: crypto.Argon2Parameters) -> bytes:
        with lock:
            inside[0] += 1
            peak[0] = max(peak[0], inside[0])
        try:
            return real(
                password, salt, crypto.Argon2Parameters(1, 16384)
            )  # tens of ms: they overlap
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(crypto, "argon2", counting)
    settings = fast_settings(max_concurrent_hashes=1, user_failures_burst=1000)
    with Vault.open(home, settings) as vault:
        vault.enroll("app", "alice", b"pw")
        threads = [
            threading.Thread(target=lambda: [vault.verify("app", "alice", b"x") for _ in range(2)])
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert peak[0] == 1  # without the bound, 2-4 of them overlap here
