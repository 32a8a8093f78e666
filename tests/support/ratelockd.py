"""``ratelockd --home`` as a real process on a Unix socket in a temporary home, for tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from overflowd.identity import NodeIdentity, write_identity
from ratelock.client import Client, read_public_key
from tests.support.cli import BIN, call

#: Argon2id at libsodium's floor (t=1, 8 KiB): tests are about budgets, not hashing cost.
FAST_ARGON2 = "argon2_time_cost = 1\nargon2_memory_kib = 8\n"
START_TIMEOUT_S = 30


def make_home(home: Path, ratelock_toml: str = "", *, store_url: str = "") -> NodeIdentity:
    """A node home with an identity and ``[ratelock]`` (fast Argon2id plus ``ratelock_toml``)."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = NodeIdentity.generate()
    write_identity(home, identity)
    text = "[ratelock]\n" + FAST_ARGON2 + ratelock_toml
    if store_url:
        text += f"store_url = {json.dumps(store_url)}\n"
    (home / "overflowd.toml").write_text(text, encoding="utf-8")
    return identity


def add_client(home: Path, name: str) -> str:
    """A token from ``ratelock clients add NAME --json`` (the operator's way, in process:
    tests/service/test_ratelock_cli.py runs the console script as a process)."""
    r = call("ratelock", "--home", str(home), "--json", "clients", "add", name)
    assert r.code == 0, r.err
    token: str = json.loads(r.out)["token"]
    return token


class Ratelockd:
    """The daemon process; ``stop()`` sends SIGTERM and returns (exit code, stderr)."""

    def __init__(self, home: Path, *args: str) -> None:
        self.home = home
        env = {k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"}
        self.proc = subprocess.Popen(
            [str(BIN / "ratelockd"), "--home", str(home), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        self.where = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if m := re.match(r"ratelockd listening (\S+)", line):
                self.where = m.group(1)
                break
        if not self.where:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise AssertionError(f"ratelockd did not start: {err}")

    @property
    def socket_path(self) -> Path:
        assert self.where.startswith("unix:"), self.where
        return Path(self.where[5:])

    @property
    def public_key(self) -> bytes:
        return read_public_key(self.socket_path.parent / "ratelock.pub")

    def client(self, token: str, **kw: object) -> Client:
        return Client(token=token, public_key=self.public_key, socket_path=self.socket_path,
                      **kw)  # type: ignore[arg-type]

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=10)
