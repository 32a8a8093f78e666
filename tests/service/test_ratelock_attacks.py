"""Review attacks on ratelock: a compromised application holding a valid token, a man in the
middle between the application and ratelockd. Each test failed on the code it was written
against (lead/s5 26ead81); see the commit that fixed it, or the xfail's reason."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from overflowd.errors import VerdictError
from overflowd.identity import NodeIdentity, write_identity
from ratelock.vault import Vault
from tests.support.ratelock import fast_settings
from tests.support.ratelockd import Ratelockd, add_client, make_home


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    write_identity(h, NodeIdentity.generate())
    return h


def test_enroll_of_an_existing_user_is_no_free_existence_oracle(home: Path) -> None:
    """docs/ratelock-design.md: "probing for names costs the same budget as guessing". A verify
    of a missing user is charged; an enroll of an existing one answered ``exists`` for free, so
    a compromised application could test any number of names for existence at no cost."""
    now = [1_000_000_000_000]
    settings = fast_settings(client_failures_burst=3, client_failures_per_hour=1)
    with Vault.open(home, settings, clock_ms=lambda: now[0]) as vault:
        names = [f"user{i}" for i in range(5)]
        # honest enrolments of new users are not failures and cost nothing
        assert [vault.enroll("app", n, b"pw").kind for n in names] == ["ok"] * 5
        probes = [vault.enroll("app", n, b"guess").kind for n in names]
        assert probes == ["exists"] * 3 + ["over_budget"] * 2
        # and the probes were charged to the same budget a verify probe draws on
        assert vault.verify("app", "nobody", b"x").kind == "over_budget"
        # over budget, "over_budget" for a name that exists and "ok" for one that does not
        # would be the same free oracle again: a new name is refused alike until the budget
        # refills (and was not created)
        assert vault.enroll("app", "newcomer", b"pw").kind == "over_budget"
        now[0] += 3_600_000  # one token back
        assert vault.enroll("app", "newcomer", b"pw").kind == "ok"
        assert vault.enroll("app", "newcomer2", b"pw").kind == "ok"  # a new name costs nothing
        assert vault.audit_verify().ok


@pytest.fixture(scope="module")
def two_clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Ratelockd, str, str]]:
    home = tmp_path_factory.mktemp("rla") / "home"
    make_home(home)
    app, evil = add_client(home, "app"), add_client(home, "evil")
    d = Ratelockd(home)
    try:
        yield d, app, evil
    finally:
        d.stop()


def test_a_verdict_for_another_clients_namespace_is_refused(
    two_clients: tuple[Ratelockd, str, str],
) -> None:
    """A man in the middle who holds any other client's token (a second, compromised
    application on the same ratelockd) enrolls ``alice`` in its own namespace, then re-addresses
    the application's verify of alice with its own token and password. The verdict is signed
    by ratelockd, binds the application's nonce, op ``verify`` and subject ``alice``: the
    application's client library believed an ``ok`` for a password alice never had."""
    d, app_token, evil_token = two_clients
    with d.client(app_token) as app:
        assert app.enroll("alice", b"alice's real password").ok
    with d.client(evil_token) as evil:
        assert evil.enroll("alice", b"chosen by the attacker").ok

    def rewrite(request: httpx.Request) -> None:
        request.headers["authorization"] = f"Bearer {evil_token}"
        body = json.dumps({"password": base64.urlsafe_b64encode(b"chosen by the attacker")
                           .rstrip(b"=").decode()}).encode()
        request.headers["content-length"] = str(len(body))
        request.stream = httpx.ByteStream(body)
        request._content = body

    with d.client(app_token) as app:
        app._http.event_hooks["request"] = [rewrite]
        with pytest.raises(VerdictError):
            answer = app.verify("alice", b"not alice's password")
            assert answer.outcome == "ok"  # what the application believed


def _rewrite_body(body: bytes) -> object:
    def hook(request: httpx.Request) -> None:
        request.headers["content-length"] = str(len(body))
        request.stream = httpx.ByteStream(body)
        request._content = body

    return hook


def test_an_altered_put_body_is_refused_by_the_client(
    two_clients: tuple[Ratelockd, str, str],
) -> None:
    """A man in the middle swaps a ``put``'s data for its own (same token, nonce, key): the
    daemon stores the swapped data and signs ``ok``, but the verdict binds the SHA-256 of the
    body it read, so the application learns its write was not the one stored."""
    d, app_token, _ = two_clients
    with d.client(app_token) as app:
        app._http.event_hooks["request"] = [_rewrite_body(b"the attacker's data")]
        with pytest.raises(VerdictError):
            app.put("record-1", b"the application's data")
        app._http.event_hooks["request"] = []
        assert app.put("record-2", b"the application's data").ok  # an honest put still passes


def test_an_altered_change_password_is_refused_by_the_client(
    two_clients: tuple[Ratelockd, str, str],
) -> None:
    """The same for ``change``: the new password re-written in transit (old one kept, so the
    daemon says ``ok``) is refused by the library; the application is not told its password
    was changed to the one it chose."""
    d, app_token, _ = two_clients
    with d.client(app_token) as app:
        assert app.enroll("bob", b"bob's first").ok
        body = json.dumps({
            k: base64.urlsafe_b64encode(v).rstrip(b"=").decode()
            for k, v in (("old", b"bob's first"), ("new", b"the attacker's choice"))
        }).encode()
        app._http.event_hooks["request"] = [_rewrite_body(body)]
        with pytest.raises(VerdictError):
            app.change("bob", b"bob's first", b"bob's second")
        app._http.event_hooks["request"] = []
        # the change did happen on the daemon: the library's refusal is what tells the caller
        assert app.verify("bob", b"the attacker's choice").ok


def test_audit_chain_rebuilt_with_its_signed_heads_deleted_is_caught(home: Path) -> None:
    """Someone editing the audit log (the database, not the node key) changes a ``wrong`` into
    an ``ok``, rehashes the chain (SHA-256, keyless) and deletes the signed heads that would no
    longer match, resetting the tail row too. The chain links and no head contradicts it:
    audit_verify said ok, though the vault signs a head at least every
    audit_sign_every_entries entries and there was none for the whole log."""
    from sqlalchemy import delete, select, update

    from ratelock import audit
    from ratelock.vault import t_audit, t_audit_heads, t_audit_tail

    settings = fast_settings(audit_sign_every_entries=5)
    with Vault.open(home, settings) as vault:
        vault.enroll("app", "alice", b"pw")
        for _ in range(6):
            vault.verify("app", "alice", b"x")
        assert vault.audit_verify().ok and vault.audit_verify().signed_seq >= 10

    with Vault.open(home, settings) as vault:
        with vault._engine.begin() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(t_audit).order_by(t_audit.c.seq))]
            prev = audit.GENESIS
            for r in rows:
                if r["outcome"] == "wrong":
                    r["outcome"] = "ok"
                e = audit.make_entry(
                    prev, r["seq"], r["time_ms"], r["client"], r["op"], r["subject"], r["outcome"]
                )
                conn.execute(
                    update(t_audit).where(t_audit.c.seq == r["seq"])
                    .values(outcome=e.outcome, prev=e.prev, hash=e.hash)
                )
                prev = e.hash
            conn.execute(delete(t_audit_heads))
            conn.execute(update(t_audit_tail).values(hash=prev, signed_seq=0))
        report = vault.audit_verify()
    assert not report.ok, report
    assert any("no signed head" in p for p in report.problems), report.problems


def test_deeply_nested_json_body_is_a_signed_bad_request(
    two_clients: tuple[Ratelockd, str, str],
) -> None:
    """A 4 KiB body of ``[`` (within MAX_PASSWORD_BODY_BYTES) made json.loads raise
    RecursionError, which _json did not catch: a 500 with no verdict and no refusal counted,
    and a traceback in the daemon's log per request."""
    d, token, _ = two_clients
    nonce = base64.urlsafe_b64encode(b"n" * 16).rstrip(b"=").decode()
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://ratelockd", timeout=10) as http:
        r = http.post("/v1/users/alice/verify", content=b"[" * 4000, headers={
            "authorization": f"Bearer {token}", "ratelock-nonce": nonce,
            "content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert "ratelock-verdict" in r.headers
        assert http.get("/healthz").text == "ok\n"


def test_a_rotation_by_another_process_loses_no_verifier_or_record(home: Path) -> None:
    """ratelockd (vault A) keeps running while another process rotates the secret (the CLI's
    running-daemon guard only probes the configured Unix socket: a daemon on TCP, another
    socket or another host on the same PostgreSQL passes it). A kept sealing new verifiers and
    records under the key the rotation dropped: after a restart they no longer open."""
    settings = fast_settings()
    with Vault.open(home, settings) as daemon:
        assert daemon.enroll("app", "alice", b"pw-a").kind == "ok"
        with Vault.open(home, settings) as operator:
            operator.rotate_secret()
        assert daemon.enroll("app", "bob", b"pw-b").kind == "ok"
        assert daemon.change("app", "alice", b"pw-a", b"pw-a2").kind == "ok"
        assert daemon.put("app", "k", b"record").kind == "ok"
    with Vault.open(home, settings) as restarted:
        assert restarted.verify("app", "bob", b"pw-b").kind == "ok"
        assert restarted.verify("app", "alice", b"pw-a2").kind == "ok"
        got = restarted.get("app", "k")
        assert got.kind == "ok" and got.data == b"record"


def test_limits_the_wire_cannot_carry_are_refused_at_start(tmp_path: Path) -> None:
    """max_name_bytes above what a verdict (and the users/records columns) can carry, 1024,
    was accepted: names between 1025 bytes and the setting were then refused as empty (the
    server does not echo a subject a verdict cannot name) or broke the PostgreSQL column, so the
    documented setting silently meant something else. A password limit the server's body bound
    cannot carry (a change sends two) silently answered 413 below the setting."""
    from overflowd.errors import ConfigError
    from tests.support.cli import run

    for text, key in (("max_name_bytes = 2000\n", "max_name_bytes"),
                      ("max_password_bytes = 8192\n", "max_password_bytes")):
        home = tmp_path / key
        make_home(home, text)
        with pytest.raises(ConfigError, match=key):
            from ratelock.config import load_ratelock

            load_ratelock(home)
        r = run("ratelockd", "--home", str(home), timeout=30)
        assert r.code == 1 and key in r.err and "Traceback" not in r.err, r


def test_audit_verify_memory_does_not_grow_with_the_log() -> None:
    """The log grows by one entry per request for the life of the vault; verify_chain kept
    every entry's hash in a dict (about 100 bytes each: a gigabyte at ten million requests) to
    look up the few that signed heads name. Streamed entries must verify in bounded memory."""
    import tracemalloc

    from ratelock import audit

    count = 10_000  # ~1.4 MB held before the fix; a few KB after

    def entries() -> Iterator[audit.Entry]:
        prev = audit.GENESIS
        for seq in range(1, count + 1):
            e = audit.make_entry(prev, seq, 1_000 + seq, "app", "verify", "alice", "wrong")
            prev = e.hash
            yield e

    tracemalloc.start()
    try:
        report = audit.verify_chain(entries(), [], lambda k, m, s: None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok and report.entries == count
    assert peak < 300_000, f"peak {peak} bytes for {count} entries"


def test_status_shows_only_the_calling_clients_own_counts(
    two_clients: tuple[Ratelockd, str, str],
) -> None:
    """``/v1/status`` once counted users, records, clients and audit entries across every
    client: one application learnt how busy the others were. Now it is the caller's own
    counts and budget levels, plus configured limits that say nothing about anyone else."""
    d, app_token, evil_token = two_clients
    with d.client(app_token) as app, d.client(evil_token) as evil:
        before = app.status()
        assert before["client"] == "app"
        assert not {"clients", "audit_entries", "audit_signed_seq", "store"} & set(before)
        # another client's activity, successes and failures alike, does not move our view
        for i in range(3):
            assert evil.enroll(f"status-probe-{i}", b"pw").ok
            assert evil.put(f"status-probe-{i}", b"x").ok
        assert evil.verify("status-probe-0", b"wrong").outcome == "wrong"
        assert app.status() == before
        assert evil.status()["users"] >= 3 and evil.status()["records"] >= 3
        # our own failure is ours to see
        assert app.enroll("status-own", b"pw").ok
        assert app.verify("status-own", b"wrong").outcome == "wrong"
        after = app.status()
        assert after["users"] == before["users"] + 1
        assert after["failures_available"] == before["failures_available"] - 1
