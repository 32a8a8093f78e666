"""``ratelock`` and ``ratelockd`` as a person runs them: stdin, exit codes, one line.

``ratelock`` runs in this process (tests.support.cli.call: the same main, parser and exit code,
without a Python start per command, ~3 s each under load); the first test runs the installed
console script as a process for what only a process shows (argv, env, binary stdout, exit
status), and ``ratelockd`` is always a real process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import Result, call, run
from tests.support.ratelockd import Ratelockd, add_client, make_home


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Ratelockd, str]]:
    home = tmp_path_factory.mktemp("rlcli") / "home"
    make_home(home)
    token = add_client(home, "app")
    d = Ratelockd(home)
    try:
        yield d, token
    finally:
        d.stop()


def rl(d: Ratelockd, token: str, *argv: str, stdin: bytes | None = None,
       process: bool = False) -> Result:
    how = run if process else call
    return how("ratelock", "--home", str(d.home), *argv, stdin=stdin,
               env={"RATELOCK_TOKEN": token})


def test_add_check_put_get_as_the_demo_does(daemon: tuple[Ratelockd, str]) -> None:
    d, token = daemon
    # the console script as a process: token from the environment, stdin, exit status
    r = rl(d, token, "add", "alice", stdin=b"correct horse\n", process=True)
    assert (r.code, r.out) == (0, "alice: enrolled\n"), r.err
    r = rl(d, token, "check", "alice", stdin=b"correct horse\n")
    assert (r.code, r.out) == (0, "alice: password ok\n"), r.err
    r = rl(d, token, "check", "alice", stdin=b"battery staple\n", process=True)
    assert r.code == 1 and r.err == "ratelock: alice: wrong password\n"
    r = rl(d, token, "add", "alice", stdin=b"again\n")
    assert r.code == 1 and "already exists" in r.err
    r = rl(d, token, "--json", "check", "nobody", stdin=b"x\n")
    assert r.code == 1 and json.loads(r.out)["outcome"] == "unknown"
    record = bytes(range(256)) * 3
    r = rl(d, token, "put", "doc/42", stdin=record)
    assert (r.code, r.out) == (0, "doc/42: stored\n"), r.err
    r = rl(d, token, "get", "doc/42")
    assert r.code == 0 and r.raw == record
    r = rl(d, token, "get", "doc/42", process=True)  # binary stdout of a real process
    assert r.code == 0 and r.raw == record
    r = rl(d, token, "get", "doc/43")
    assert r.code == 1 and r.err == "ratelock: doc/43: no such record\n"
    r = rl(d, token, "change", "alice", stdin=b"correct horse\nnew horse\n")
    assert r.code == 0, r.err
    assert rl(d, token, "check", "alice", stdin=b"new horse\n").code == 0


def test_operator_commands(daemon: tuple[Ratelockd, str]) -> None:
    d, token = daemon
    home = str(d.home)
    other = add_client(d.home, "other-app")
    r = call("ratelock", "--home", home, "--json", "clients", "list")
    assert r.code == 0
    names = {c["name"]: c for c in json.loads(r.out)}
    assert {"app", "other-app"} <= set(names) and names["app"]["revoked_ms"] is None
    assert token not in r.out and other not in r.out  # tokens are shown once, never again
    r = call("ratelock", "--home", home, "clients", "add", "other-app")
    assert r.code == 1 and "other-app" in r.err and len(r.err.splitlines()) == 1
    r = call("ratelock", "--home", home, "clients", "revoke", "other-app")
    assert r.code == 0
    r = rl(d, other, "check", "alice", stdin=b"x\n")
    assert r.code == 1 and "refused the token" in r.err
    r = call("ratelock", "--home", home, "clients", "revoke", "ghost")
    assert r.code == 1 and r.err == "ratelock: clients revoke: no client named 'ghost'\n"
    r = call("ratelock", "--home", home, "--json", "status")
    assert r.code == 0 and json.loads(r.out)["clients"] >= 2
    # rotation runs beside the daemon (tests/service/test_ratelock_crypto.py has it answering)
    r = call("ratelock", "--home", home, "secret", "rotate")
    assert r.code == 0 and r.out.startswith("secret rotated:"), r.err
    r = call("ratelock", "--home", home, "audit", "verify")
    assert r.code == 0 and r.out.startswith("audit ok:"), r.err


def test_bad_input_is_one_line_naming_what(daemon: tuple[Ratelockd, str], tmp_path: Path) -> None:
    d, token = daemon
    home = str(d.home)
    r = call("ratelock", "--home", home, "check", "alice", stdin=b"x\n")
    assert r.code == 2 and "RATELOCK_TOKEN" in r.err and len(r.err.splitlines()) == 1
    r = call("ratelock", "--home", home, "--token-file", str(tmp_path / "nope"), "check", "a",
            stdin=b"x\n")
    assert r.code == 2 and r.err.startswith("ratelock: --token-file:") and "nope" in r.err
    r = rl(d, token, "--socket", str(tmp_path / "gone.sock"), "check", "alice", stdin=b"x\n")
    assert r.code == 1 and "gone.sock" in r.err and len(r.err.splitlines()) == 1
    r = rl(d, token, "check", "alice", stdin=b"")
    assert r.code == 2 and r.err.startswith("ratelock: stdin:")
    r = rl(d, token, "--url", "ftp://x", "check", "alice", stdin=b"x\n")
    assert r.code == 2 and "--url" in r.err
    r = call("ratelock", "--home", home, "frobnicate")
    assert r.code == 2 and "Traceback" not in r.err
    r = rl(d, token, "--public-key-file", str(tmp_path / "k.pub"), "check", "a", stdin=b"x\n")
    assert r.code == 1 and "--public-key-file" in r.err and "k.pub" in r.err


def test_ratelockd_refuses_bad_flags_and_config_before_it_creates_anything(
    tmp_path: Path,
) -> None:
    home = tmp_path / "home"
    make_home(home, "frobs = 3\n")
    r = run("ratelockd", "--home", str(home), timeout=30)
    assert r.code == 1 and "frobs" in r.err and "overflowd.toml" in r.err
    assert len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err
    assert not (home / "ratelock.db").exists() and not (home / "ratelock.secret").exists()
    (home / "overflowd.toml").write_text("[ratelock]\n", encoding="utf-8")
    r = run("ratelockd", "--home", str(home), "--listen", "nowhere", timeout=30)
    assert r.code == 2 and r.err.startswith("ratelockd: --listen:")
    assert not (home / "ratelock.db").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("ratelockd", "--home", str(empty), timeout=30)
    assert r.code == 1 and "identity" in r.err and "overflowd init" in r.err
    assert list(empty.iterdir()) == []
