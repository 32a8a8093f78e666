"""Operations (issue #15): one daemon per home, and every "cannot listen" names the socket and
the config key (FILE:LINE key) in one line. Real console scripts as processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from overflowd.homelock import acquire
from tests.service.test_cli_bad_input import one_line
from tests.support.cli import BIN, call, run
from tests.support.ratelockd import FAST_ARGON2, Ratelockd, make_home

START_TIMEOUT_S = 30

#: Every socket on loopback, port 0, nothing else the daemon would bind.
QUIET = """\
[collector]
listen = ["127.0.0.1:0"]
[inband]
listen = "127.0.0.1:0"
[api]
listen = "127.0.0.1:0"
[metrics]
listen = ""
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    assert call("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(QUIET)
    return home


def start_run(home: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"}
    proc = subprocess.Popen(
        [str(BIN / "overflowd"), "run", "--home", str(home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line or line.startswith("api "):
            break
    if proc.poll() is not None:
        raise AssertionError(f"overflowd run did not start: {proc.communicate(timeout=10)}")
    return proc


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


# -- one daemon per home ---------------------------------------------------------------------


def test_a_second_run_on_the_same_home_refuses_and_names_the_first(home: Path) -> None:
    first = start_run(home)
    try:
        second = run("overflowd", "run", "--home", str(home), timeout=30)
        one_line(
            second, 1,
            f"home {home} is in use", f"PID {first.pid}", str(home / "overflowd.lock"),
        )
        assert first.poll() is None  # the first runs on, untouched
    finally:
        assert stop(first) == 0
    # The kernel dropped the lock with the process: the next start may take it.
    acquire(home, "overflowd").release()


def test_a_run_that_fails_to_start_lets_go_of_the_lock(home: Path) -> None:
    """In one process (``call``), a start that fails after taking the lock releases it: the
    second try fails for the same reason, not 'in use'."""
    with socket.socket() as closed:  # bound, never listening: connection refused
        closed.bind(("127.0.0.1", 0))
        url = f"postgresql+psycopg://nobody@127.0.0.1:{closed.getsockname()[1]}/x"
        (home / "overflowd.toml").write_text(f'{QUIET}[store]\nurl = "{url}"\n')
        for _ in range(2):
            result = call("overflowd", "run", "--home", str(home))
            assert result.code == 1 and "database" in result.err, result.err
            assert "in use" not in result.err
    acquire(home, "overflowd").release()


def test_jfe_run_refuses_a_home_whose_lock_is_held(tmp_path: Path) -> None:
    assert call("overflowd", "init", "--home", str(tmp_path)).code == 0
    held = acquire(tmp_path, "jfe")  # this process is "the running jfe"
    try:
        result = run("jfe", "--home", str(tmp_path), "run", timeout=30)
        one_line(result, 1, "jfe already runs there", f"PID {os.getpid()}",
                 str(tmp_path / "jfe.lock"))
    finally:
        held.release()
    # overflowd's lock is another file: jfe and overflowd share a home.
    acquire(tmp_path, "overflowd").release()


def test_a_second_ratelockd_on_the_same_home_refuses(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    d = Ratelockd(home)
    try:
        result = run("ratelockd", "--home", str(home), timeout=30)
        one_line(result, 1, f"PID {d.proc.pid}", str(home / "ratelockd.lock"))
    finally:
        d.stop()


# -- cannot listen: the address and FILE:LINE key --------------------------------------------


def _busy(kind: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        s.listen(1)
    return s


@pytest.mark.parametrize(
    ("section", "kind"),
    [
        ("collector", socket.SOCK_DGRAM),
        ("inband", socket.SOCK_DGRAM),
        ("api", socket.SOCK_STREAM),
        ("metrics", socket.SOCK_STREAM),
    ],
)
def test_run_names_the_config_key_of_a_socket_in_use(home: Path, section: str, kind: int) -> None:
    with _busy(kind) as busy:
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        text = QUIET
        old = re.search(rf"\[{section}\]\nlisten = (.*)\n", text)
        assert old is not None
        value = f'["{addr}"]' if section == "collector" else f'"{addr}"'
        text = text.replace(old.group(0), f"[{section}]\nlisten = {value}\n")
        (home / "overflowd.toml").write_text(text)
        line = text.splitlines().index(f"listen = {value}") + 1
        result = run("overflowd", "run", "--home", str(home), timeout=30)
    one_line(
        result, 1,
        f"{home / 'overflowd.toml'}:{line} {section}.listen", addr,
        "cannot listen: Address already in use",
    )


def test_jfe_names_its_listen_key(tmp_path: Path) -> None:
    assert call("overflowd", "init", "--home", str(tmp_path)).code == 0
    config = tmp_path / "overflowd.toml"
    with _busy(socket.SOCK_STREAM) as busy:
        port = busy.getsockname()[1]
        config.write_text(f"[jfe]\nports = [80]\nlisten_port = {port}\n")
        result = run("jfe", "--home", str(tmp_path), "run", timeout=30)
    one_line(result, 1, f"{config}:3 jfe.listen_port", f"127.0.0.1:{port}",
             "Address already in use")


def test_ratelockd_names_its_listen_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    make_home(home)
    config = home / "overflowd.toml"
    with _busy(socket.SOCK_STREAM) as busy:
        port = busy.getsockname()[1]
        config.write_text(f'[ratelock]\n{FAST_ARGON2}listen = "tcp:127.0.0.1:{port}"\n')
        result = run("ratelockd", "--home", str(home), timeout=30)
    one_line(result, 1, f"{config}:4 ratelock.listen", f"127.0.0.1:{port}",
             "cannot listen: Address already in use")


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_kept(home: Path) -> None:
    """The lock was opened following symlinks and truncated for the PID: a HOME/overflowd.lock
    pointing at identity.key (a mistaken ln, or anyone who may write the home) emptied the
    node's key at the next start."""
    from overflowd.homelock import HomeLocked

    key = (home / "identity.key").read_bytes()
    (home / "overflowd.lock").symlink_to(home / "identity.key")
    with pytest.raises(HomeLocked, match="not a regular file"):
        acquire(home, "overflowd")
    assert (home / "identity.key").read_bytes() == key


def test_a_lock_file_that_is_a_fifo_is_refused_not_a_traceback(home: Path) -> None:
    from overflowd.homelock import HomeLocked

    os.mkfifo(home / "overflowd.lock")
    with pytest.raises(HomeLocked, match="not a regular file"):
        acquire(home, "overflowd")
