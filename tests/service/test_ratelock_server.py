"""``ratelockd --home`` as a process on a Unix socket: budgets through HTTP, refusals signed.

One daemon per module for the read-only checks; the budget tests start their own (a budget
spent is state). The client library talks to it the way an application does.
"""

from __future__ import annotations

import base64
import grp
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ratelock.client import Answer, Client, read_public_key
from tests.support.cli import run
from tests.support.ratelockd import Ratelockd, add_client, make_home

#: Budgets small enough to reach in a test, refilling so slowly (1 an hour) that no token comes
#: back while it runs: the exact count of successes is then the burst.
READS = (
    "client_reads_burst = 7\nclient_reads_per_hour = 1\n"
    "key_reads_burst = 100\nkey_reads_per_hour = 100\n"
)
FAILURES = "user_failures_burst = 3\nuser_failures_per_hour = 1\n"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Ratelockd, str]]:
    home = tmp_path_factory.mktemp("rl") / "home"
    make_home(home, "audit_sign_interval_s = 0.3\n")
    token = add_client(home, "app")
    d = Ratelockd(home)
    try:
        yield d, token
    finally:
        d.stop()


def _raw(d: Ratelockd, method: str, path: str, **kw: object) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(d.socket_path)),
                      base_url="http://ratelockd", timeout=10) as http:
        return http.request(method, path, **kw)  # type: ignore[arg-type]


def _nonce() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()


def test_socket_is_0660_in_the_home_and_serves_health_metrics(
    daemon: tuple[Ratelockd, str],
) -> None:
    d, _ = daemon
    st = d.socket_path.stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert d.socket_path.parent == d.home
    assert st.st_gid == os.getgid()
    assert _raw(d, "GET", "/healthz").text == "ok\n"
    text = _raw(d, "GET", "/metrics").text
    assert "ratelock_refused_total" in text or "# TYPE ratelock_refused counter" in text


def test_enroll_verify_change_delete_through_the_socket(daemon: tuple[Ratelockd, str]) -> None:
    d, token = daemon
    with d.client(token) as c:
        assert c.enroll("carol", b"pw-1").outcome == "ok"
        assert c.enroll("carol", b"pw-1").outcome == "exists"
        assert c.verify("carol", b"pw-1").ok
        assert c.verify("carol", b"nope").outcome == "wrong"
        assert c.change("carol", b"pw-1", b"pw-2").ok
        assert c.verify("carol", b"pw-2").ok
        assert c.verify("nobody", b"x").outcome == "unknown"
        assert c.delete_user("carol").ok
        assert c.verify("carol", b"pw-2").outcome == "unknown"
        assert c.put("k/1", b"\x00\xffrecord").ok
        got = c.get("k/1")
        assert got.ok and got.data == b"\x00\xffrecord"
        assert c.delete_record("k/1").ok
        assert c.get("k/1").outcome == "not_found"
        status = c.status()
        assert status["users"] >= 0 and status["argon2_memory_kib"] == 8
    # the daemon's timer signs the audit head once there are new entries
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = _raw(d, "GET", "/metrics").text
        signed = re.search(r"^ratelock_audit_heads_signed_total (\S+)$", text, re.M)
        if signed and float(signed.group(1)) >= 1:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("ratelockd signed no audit head")
    # the operator's status shows the signed head (a client's status shows its own view only)
    from ratelock.config import load_ratelock
    from ratelock.vault import Vault

    with Vault.open(d.home, load_ratelock(d.home)) as vault:
        assert vault.status().audit_signed_seq > 0


def test_refusals_are_bounded_and_signed(daemon: tuple[Ratelockd, str]) -> None:
    d, token = daemon
    # No nonce: nothing to bind a verdict to, so a plain 400 that names what is missing.
    r = _raw(d, "POST", "/v1/users/a/verify", headers={"authorization": f"Bearer {token}"},
             json={"password": "eA"})
    assert r.status_code == 400 and r.json() == {"error": "no_nonce"}
    # A short nonce is refused the same way (16 bytes at least).
    r = _raw(d, "POST", "/v1/users/a/verify", json={"password": "eA"},
             headers={"authorization": f"Bearer {token}", "ratelock-nonce": "AAAA"})
    assert r.status_code == 400 and r.json() == {"error": "bad_nonce"}
    # A bad token gets a signed verdict (the client library reads it: "unauthorized").
    with d.client("not-a-token") as c:
        assert c.verify("a", b"x").outcome == "unauthorized"
    # A body over the bound is refused before it is read in full, with a signed verdict.
    r = _raw(d, "PUT", "/v1/records/big", content=b"x" * (64 * 1024 + 1),
             headers={"authorization": f"Bearer {token}", "ratelock-nonce": _nonce()})
    assert r.status_code == 413
    assert "ratelock-verdict" in r.headers
    with d.client(token) as c:
        assert c.put("big", b"x" * (64 * 1024 + 1)).outcome == "too_large"
        assert c.put("big", b"x" * (64 * 1024)).ok
        assert c.verify("a" * 300, b"x").outcome == "bad_request"
    text = _raw(d, "GET", "/metrics").text
    for reason in ("no_nonce", "bad_nonce", "bad_token", "too_large", "bad_name"):
        assert re.search(rf'ratelock_refused_total{{reason="{reason}"}} [1-9]', text), reason


def test_record_reads_stop_at_the_client_budget_however_it_asks(tmp_path: Path) -> None:
    """7 reads an hour: parallel gets, many keys, put-then-get, found or not: 7 answers, then
    429 with Retry-After, and a restart keeps the count."""
    home = tmp_path / "home"
    make_home(home, READS)
    token = add_client(home, "app")
    d = Ratelockd(home)
    try:
        answers: list[Answer] = []
        lock = threading.Lock()
        with d.client(token) as c:
            for i in range(5):
                assert c.put(f"key-{i}", f"secret {i}".encode()).ok  # puts are not reads

            def reader(n: int) -> None:
                with d.client(token) as mine:
                    for j in range(4):
                        key = f"key-{(n + j) % 5}" if j % 2 else f"absent-{n}-{j}"
                        a = mine.get(key)
                        with lock:
                            answers.append(a)

            threads = [threading.Thread(target=reader, args=(n,)) for n in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert len(answers) == 24
            decided = [a for a in answers if a.outcome in ("ok", "not_found")]
            refused = [a for a in answers if a.outcome == "over_budget"]
            assert len(decided) == 7, [a.outcome for a in answers]
            assert len(refused) == 17
            assert all(a.retry_after_s and a.retry_after_s > 0 for a in refused)
            # put-then-get does not read around the budget either
            assert c.put("fresh", b"new").ok
            assert c.get("fresh").outcome == "over_budget"
            r = _raw(d, "GET", "/v1/records/fresh",
                     headers={"authorization": f"Bearer {token}", "ratelock-nonce": _nonce()})
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        code, err = d.stop()
        assert code == 0, err
        assert not d.socket_path.exists()
        d = Ratelockd(home)
        with d.client(token) as c:
            assert c.get("key-0").outcome == "over_budget"
    finally:
        d.stop()


def test_over_budget_is_not_wrong_password_and_survives_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home, FAILURES)
    token = add_client(home, "app")
    d = Ratelockd(home)
    try:
        with d.client(token) as c:
            assert c.enroll("alice", b"right").ok
            assert c.enroll("bob", b"bobs").ok
            assert [c.verify("alice", b"guess").outcome for _ in range(3)] == ["wrong"] * 3
            over = c.verify("alice", b"guess")
            assert over.outcome == "over_budget" and over.retry_after_s
            # even the right password is refused, not judged, while over budget
            assert c.verify("alice", b"right").outcome == "over_budget"
            assert c.verify("bob", b"bobs").ok  # one noisy user does not lock out another
        d.stop()
        d = Ratelockd(home)
        with d.client(token) as c:
            assert c.verify("alice", b"right").outcome == "over_budget"
    finally:
        d.stop()


def test_socket_group_and_a_second_daemon_refused(tmp_path: Path) -> None:
    groups = [g for g in os.getgroups() if g != os.getgid()]
    home = tmp_path / "home"
    if groups:
        name = grp.getgrgid(groups[0]).gr_name
        make_home(home, f'socket_group = "{name}"\nsocket_mode = "0640"\n')
    else:  # root in CI: every group is ours to give
        name = grp.getgrall()[-1].gr_name
        make_home(home, f'socket_group = "{name}"\nsocket_mode = "0640"\n')
    d = Ratelockd(home)
    try:
        st = d.socket_path.stat()
        assert st.st_gid == grp.getgrnam(name).gr_gid
        assert stat.S_IMODE(st.st_mode) == 0o640
        second = run("ratelockd", "--home", str(home), timeout=30)
        assert second.code == 1
        # The home lock refuses it before the socket is touched, naming the holder.
        assert f"ratelockd already runs there (PID {d.proc.pid} holds" in second.err, second.err
        assert str(home / "ratelockd.lock") in second.err
        # Another home on the same socket: the socket check still refuses it.
        other = tmp_path / "other"
        make_home(other)
        third = run("ratelockd", "--home", str(other), "--listen", f"unix:{d.socket_path}",
                    timeout=30)
        assert third.code == 1
        assert "another ratelockd answers there" in third.err, third.err
        assert str(d.socket_path) in third.err
        assert d.socket_path.exists()
    finally:
        d.stop()


def test_tcp_listen_on_loopback(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    token = add_client(home, "app")
    d = Ratelockd(home, "--listen", "tcp:127.0.0.1:0")
    try:
        assert d.where.startswith("http://127.0.0.1:")
        key = read_public_key(home / "ratelock.pub")
        with Client(token=token, public_key=key, url=d.where) as c:
            assert c.enroll("tess", b"pw").ok
            assert c.verify("tess", b"pw").ok
    finally:
        d.stop()
