"""The audit log: every request chained; an edited, deleted or reordered row is caught, and so
is a truncated tail (against the last signed head) or a chain rebuilt without the node key."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Connection, delete, select, update

from overflowd.identity import NodeIdentity, write_identity
from ratelock import audit
from ratelock.vault import Vault, t_audit, t_audit_heads, t_audit_tail
from tests.support.cli import call
from tests.support.ratelock import fast_settings

SIGN_EVERY = 5


def _vault(home: Path) -> Vault:
    return Vault.open(home, fast_settings(audit_sign_every_entries=SIGN_EVERY))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    write_identity(h, NodeIdentity.generate())
    with _vault(h) as vault:
        vault.enroll("app", "alice", b"pw")  # 1
        for _ in range(4):
            vault.verify("app", "alice", b"x")  # 2 entries each: charged, wrong
        vault.put("app", "k", b"v")  # 10
        vault.get("app", "k")  # 11
        vault.get("app", "missing")  # 12
        report = vault.audit_verify()
    assert report.ok and report.entries == 12 and report.signed_seq == 10, report
    return h


def _tamper(home: Path, change: Callable[[Connection], None]) -> audit.AuditReport:
    with _vault(home) as vault:
        with vault._engine.begin() as conn:
            change(conn)
        return vault.audit_verify()


def _row(conn: Connection, seq: int) -> dict[str, object]:
    return dict(conn.execute(select(t_audit).where(t_audit.c.seq == seq)).one()._mapping)


def test_every_request_is_logged(home: Path) -> None:
    with _vault(home) as vault, vault._engine.connect() as conn:
        ops = [
            (r.op, r.subject, r.outcome)
            for r in conn.execute(select(t_audit).order_by(t_audit.c.seq))
        ]
    assert ops[0] == ("enroll", "alice", "ok")
    assert ops[1:3] == [("verify", "alice", "charged"), ("verify", "alice", "wrong")]
    assert ops[-1] == ("get", "missing", "not_found")


def test_edited_row(home: Path) -> None:
    report = _tamper(
        home, lambda c: c.execute(update(t_audit).where(t_audit.c.seq == 3).values(outcome="ok"))
    )
    assert not report.ok and any("entry 3" in p and "edited" in p for p in report.problems)


def test_deleted_row(home: Path) -> None:
    report = _tamper(home, lambda c: c.execute(delete(t_audit).where(t_audit.c.seq == 4)))
    assert not report.ok and any("entry 5" in p for p in report.problems), report.problems


def test_reordered_rows(home: Path) -> None:
    def swap(conn: Connection) -> None:
        a, b = _row(conn, 6), _row(conn, 7)
        for seq, other in ((6, b), (7, a)):
            values = {k: v for k, v in other.items() if k != "seq"}
            conn.execute(update(t_audit).where(t_audit.c.seq == seq).values(**values))

    report = _tamper(home, swap)
    assert not report.ok and any("entry 6" in p for p in report.problems), report.problems


def test_truncated_tail_against_the_signed_head(home: Path) -> None:
    def truncate(conn: Connection) -> None:
        conn.execute(delete(t_audit).where(t_audit.c.seq > 8))
        last = _row(conn, 8)
        conn.execute(update(t_audit_tail).values(seq=8, hash=last["hash"]))

    report = _tamper(home, truncate)
    assert not report.ok and any("truncated" in p for p in report.problems), report.problems


def test_chain_rebuilt_without_the_node_key(home: Path) -> None:
    """An attacker with the database but not identity.key edits a row and rehashes the chain:
    it links again, but no longer matches the signed head."""

    def rebuild(conn: Connection) -> None:
        rows = [dict(r._mapping) for r in conn.execute(select(t_audit).order_by(t_audit.c.seq))]
        prev = audit.GENESIS
        for r in rows:
            if r["seq"] == 2:
                r["outcome"] = "ok"
            e = audit.make_entry(
                prev, r["seq"], r["time_ms"], r["client"], r["op"], r["subject"], r["outcome"]
            )
            conn.execute(
                update(t_audit)
                .where(t_audit.c.seq == r["seq"])
                .values(outcome=e.outcome, prev=e.prev, hash=e.hash)
            )
            prev = e.hash

    report = _tamper(home, rebuild)
    assert not report.ok and any("head 5" in p for p in report.problems), report.problems


def test_forged_head_signature(home: Path) -> None:
    report = _tamper(
        home,
        lambda c: c.execute(
            update(t_audit_heads).where(t_audit_heads.c.seq == 5).values(signature=b"\x00" * 64)
        ),
    )
    assert not report.ok and any("head 5: signature" in p for p in report.problems)


def test_sign_audit_head_on_demand(home: Path) -> None:
    with _vault(home) as vault:
        assert vault.sign_audit_head() == 12
        assert vault.sign_audit_head() is None  # nothing new since
        assert vault.audit_verify().signed_seq == 12


def test_a_flood_of_bad_requests_is_audited_in_counted_rows(tmp_path: Path) -> None:
    """Refusals before the vault (bad or unknown tokens, a malformed body, wrong method) land
    in the audit log as a few counted rows per window, not one per request: the log grows by
    a handful of rows for a flood of 300, and ``ratelock audit verify`` still walks the chain."""
    import base64
    import re
    import secrets

    import httpx

    from tests.support.cli import call
    from tests.support.ratelockd import Ratelockd, add_client, make_home

    home = tmp_path / "home"
    make_home(home, "audit_refusal_window_s = 0.3\n")
    token = add_client(home, "app")
    d = Ratelockd(home)
    try:
        def nonce() -> str:
            return base64.urlsafe_b64encode(secrets.token_bytes(16)).decode()

        with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                          base_url="http://ratelockd", timeout=10) as http:
            for i in range(300):
                bad = f"rl1_{secrets.token_urlsafe(32)}" if i % 2 else "garbage"
                r = http.post("/v1/users/alice/verify", json={"password": "eA"},
                              headers={"authorization": f"Bearer {bad}", "ratelock-nonce": nonce()})
                assert r.status_code == 401
            for _ in range(5):  # an authenticated client's malformed bodies
                r = http.post("/v1/users/alice/verify", content=b"{not json",
                              headers={"authorization": f"Bearer {token}",
                                       "ratelock-nonce": nonce()})
                assert r.status_code == 400
            assert http.get("/v1/users/alice/verify").status_code == 405
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                text = http.get("/metrics").text
                m = re.search(r"^ratelock_refusal_audit_requests_total (\S+)$", text, re.M)
                if m and float(m.group(1)) >= 306:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError(f"refusals not audited:\n{text}")
    finally:
        code, err = d.stop()
    assert code == 0, err
    with Vault.open(home, fast_settings()) as vault, vault._engine.connect() as conn:
        rows = [(r.client, r.op, r.subject, r.outcome)
                for r in conn.execute(select(t_audit).where(t_audit.c.outcome.like("refused:%")))]
    counts: dict[tuple[str, str, str], int] = {}
    for client, op, subject, outcome in rows:
        counts[(client, op, subject)] = counts.get((client, op, subject), 0) + int(outcome[8:])
    assert counts == {
        (audit.ANONYMOUS, "verify", "bad_token"): 300,
        ("app", "verify", "bad_body"): 5,
        (audit.ANONYMOUS, "-", "wrong_method"): 1,
    }
    assert len(rows) <= 3 * 20  # a few windows' worth of rows, not one per request
    r = call("ratelock", "--home", str(home), "audit", "verify")
    assert r.code == 0 and "audit ok" in r.out, r.err


def test_heads_signed_before_a_key_rotation_still_verify(home: Path) -> None:
    """Found by the ops helper: after ``overflowd key rotate``, ``ratelock audit verify`` said
    the heads were "signed by a key that is not the node's". The key the rotation kept as
    previous is trusted too; a key the node never had is not."""
    assert call("overflowd", "key", "rotate", "--home", str(home)).code == 0
    verified = call("ratelock", "--home", str(home), "audit", "verify")
    assert verified.code == 0, verified.err
    with _vault(home) as vault:
        vault.verify("app", "alice", b"pw")  # heads go on under the new key
        assert vault.audit_verify().ok
    # A previous key that never signed these heads (a stranger's) does not stand in.
    (home / "identity.previous.pub").write_text(
        base64.b64encode(NodeIdentity.generate().public_key).decode() + "\n"
    )
    assert call("ratelock", "--home", str(home), "audit", "verify").code != 0


def test_the_previous_key_vouches_for_no_head_after_the_new_key_signed(home: Path) -> None:
    """The key a rotation retires (often because it leaked) was trusted for every head: a
    holder of it re-signing a head after the new key had taken over, to cover a rewritten
    tail, passed ``ratelock audit verify``. A previous key's heads must come before the
    current key's first."""
    from overflowd.identity import load_identity

    old = load_identity(home)
    assert call("overflowd", "key", "rotate", "--home", str(home)).code == 0
    with _vault(home) as vault:
        for _ in range(5):
            vault.verify("app", "alice", b"x")  # heads at 15 and 20, under the new key
        assert vault.audit_verify().ok
        with vault._engine.begin() as conn:
            last = conn.execute(select(t_audit_heads).order_by(t_audit_heads.c.seq.desc())).first()
            assert last is not None and last.seq == 20
            message = audit.head_message(int(last.seq), bytes(last.hash), int(last.time_ms))
            conn.execute(
                update(t_audit_heads).where(t_audit_heads.c.seq == last.seq)
                .values(public_key=old.public_key, signature=old.signer()(message))
            )
    r = call("ratelock", "--home", str(home), "audit", "verify")
    assert r.code != 0 and "head 20" in r.out + r.err, (r.out, r.err)
