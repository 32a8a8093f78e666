"""Self-sandboxing (overflowd.sandbox, docs/deploy.md "Sandbox"): each daemon's end-to-end test
run twice, once under ``strace -f`` with a record-only filter (every call made after start-up
must be on that daemon's list) and once with the allow-list on (the test passes unchanged, and
forbidden calls attempted from inside the daemon are refused with EPERM)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from overflowd import sandbox
from tests.service import test_daemon, test_ratelock_server
from tests.support import ratelockd as ratelockd_support

STRACE = shutil.which("strace")
_CALL = re.compile(r"^(?:\d+\s+)?(?:<\.\.\. (\w+) resumed>|(\w+)\()")
_MARK = re.compile(r"^(?:\d+\s+)?(?:seccomp\(SECCOMP_SET_MODE_FILTER|prctl\(PR_SET_SECCOMP)")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed (make deps-test)")


class Recorder:
    """``strace -f -qq -p PID -o FILE``: one process with its threads and children."""

    def __init__(self, pid: int, out: Path) -> None:
        assert STRACE is not None
        self.out = out
        self.proc = subprocess.Popen(
            [STRACE, "-f", "-qq", "-o", str(out), "-p", str(pid)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # Attached once strace wrote its first line: every daemon's loop wakes at least each
        # second or two (trio's epoll_wait, the status and audit timers).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (out.exists() and out.stat().st_size):
            time.sleep(0.02)

    def calls(self, timeout_s: float = 30) -> set[str]:
        """The calls made after confinement began (all, if strace attached only after it);
        waits for strace to end with the process."""
        self.proc.wait(timeout=timeout_s)
        names: list[str] = []
        for line in self.out.read_text(errors="replace").splitlines():
            if _MARK.match(line):
                names.clear()  # start-up, which the filter is not meant to cover
                continue
            if m := _CALL.match(line):
                names.append(m.group(1) or m.group(2))
        return set(names)


def recorded(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, out: Path) -> list[Recorder]:
    """Replace ``module.name`` (a daemon class taking its process in ``self.proc``) by one that
    attaches a Recorder as soon as the process is up."""
    base = getattr(module, name)
    recorders: list[Recorder] = []

    class Traced(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kw: object) -> None:
            super().__init__(*args, **kw)
            recorders.append(Recorder(self.proc.pid, out.with_suffix(f".{len(recorders)}")))

    monkeypatch.setattr(module, name, Traced)
    return recorders


def captured(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[str]:
    """What each ``stop()`` of ``module.name`` returned as output."""
    base = getattr(module, name)
    outputs: list[str] = []

    class Kept(base):  # type: ignore[misc, valid-type]
        def stop(self, *args: object, **kw: object) -> tuple[int, str]:
            code, output = super().stop(*args, **kw)
            outputs.append(output)
            return code, output

    monkeypatch.setattr(module, name, Kept)
    return outputs


def check_recorded(daemon: str, calls: set[str]) -> None:
    print(f"\nRECORDED {daemon} {len(calls)}: {sorted(calls)}")
    assert len(calls) > 20, calls  # strace saw the daemon at work, not an empty trace
    missing = calls - sandbox.ALLOWED[daemon] - sandbox.REFUSED_AT_NO_COST
    assert not missing, f"{daemon} made calls not on its list: {sorted(missing)}"


def check_refused(daemon: str, output: str, probes: tuple[str, ...]) -> None:
    m = re.search(rf"{daemon}: sandbox seccomp on, (\d+) system calls allowed", output)
    assert m and int(m.group(1)) >= len(sandbox.ALLOWED[daemon]) - 5, output
    for call in probes:
        assert f"sandbox.probe call={call} refused=True errno=EPERM" in output, output


# -- overflowd run -------------------------------------------------------------------------------

def _overflowd_e2e(home_parent: Path) -> None:
    home = home_parent / "node"
    assert test_daemon.run("overflowd", "init", "--home", str(home)).code == 0
    test_daemon.test_daemon_collects_samples_signs_and_stores(home)


@needs_strace
def test_overflowd_calls_are_on_its_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(sandbox.ENV, "record")
    recorders = recorded(monkeypatch, test_daemon, "Daemon", tmp_path / "strace")
    _overflowd_e2e(tmp_path)
    assert len(recorders) == 1
    check_recorded("overflowd", recorders[0].calls())


def test_overflowd_e2e_under_its_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sandbox.ENV, "1")
    monkeypatch.setenv(sandbox.PROBE_ENV, "ptrace,mount,execve")
    outputs = captured(monkeypatch, test_daemon, "Daemon")
    _overflowd_e2e(tmp_path)
    check_refused("overflowd", outputs[0], ("ptrace", "mount", "execve"))


# -- ratelockd -----------------------------------------------------------------------------------

def _ratelockd_e2e(tmp_path: Path) -> None:
    home = tmp_path / "rl"
    ratelockd_support.make_home(home, "audit_sign_interval_s = 0.3\n")
    token = ratelockd_support.add_client(home, "app")
    d = test_ratelock_server.Ratelockd(home)
    try:
        test_ratelock_server.test_enroll_verify_change_delete_through_the_socket((d, token))
        time.sleep(0.4)  # one audit head signed (a thread: trio.to_thread)
    finally:
        code, _ = d.stop()
    assert code == 0


@needs_strace
def test_ratelockd_calls_are_on_its_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(sandbox.ENV, "record")
    recorders = recorded(monkeypatch, test_ratelock_server, "Ratelockd", tmp_path / "strace")
    _ratelockd_e2e(tmp_path)
    check_recorded("ratelockd", recorders[0].calls())


def test_ratelockd_e2e_under_its_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(sandbox.ENV, "1")
    monkeypatch.setenv(sandbox.PROBE_ENV, "ptrace,mount,execve")
    outputs = captured(monkeypatch, test_ratelock_server, "Ratelockd")
    _ratelockd_e2e(tmp_path)
    check_refused("ratelockd", outputs[0], ("ptrace", "mount", "execve"))


# -- the filter itself -----------------------------------------------------------------------------

CHILD = """
import errno, os, sys, threading
from overflowd import sandbox
ready, go = threading.Event(), threading.Event()
def other():  # a thread started before the filter is filtered too (TSYNC)
    ready.set(); go.wait()
    try:
        os.setuid(0)
        print("thread setuid allowed")
    except PermissionError:
        print("thread setuid EPERM")
t = threading.Thread(target=other); t.start(); ready.wait()
n = sandbox.confine(sys.argv[1], None)
print("allowed", n)
for call in sandbox.PROBES[:2]:
    print(call, errno.errorcode.get(sandbox.probe(call), "ok"))
if "execve" not in sandbox.ALLOWED[sys.argv[1]]:
    try:
        os.execv("/bin/true", ["true"])
    except PermissionError:
        print("execve EPERM")
go.set(); t.join()
print("still running", os.getpid() > 0)
"""


@pytest.mark.parametrize("daemon", sorted(sandbox.ALLOWED))
def test_calls_off_the_list_are_refused_in_every_thread(daemon: str) -> None:
    env = {**os.environ, sandbox.ENV: "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, daemon], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"allowed {len(sandbox.ALLOWED[daemon])}" in lines
    assert "ptrace EPERM" in lines and "mount EPERM" in lines
    assert "thread setuid EPERM" in lines
    assert "still running True" in lines
    # jfe alone may exec (nft and ip, to take its rules out when it stops)
    assert ("execve EPERM" in lines) == (daemon != "jfe")
    assert ("execve" in sandbox.ALLOWED[daemon]) == (daemon == "jfe")


def test_off_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sandbox.ENV, raising=False)
    assert sandbox.wanted(sandbox.load_settings(tmp_path)) == "off"
    (tmp_path / "overflowd.toml").write_text("[sandbox]\nseccomp = true\n")
    assert sandbox.wanted(sandbox.load_settings(tmp_path)) == "on"
    monkeypatch.setenv(sandbox.ENV, "0")
    assert sandbox.wanted(sandbox.load_settings(tmp_path)) == "off"
    (tmp_path / "overflowd.toml").write_text("[sandbox]\nsecomp = true\n")
    with pytest.raises(sandbox.OverflowdError, match=r"unknown key 'sandbox\.secomp'"):
        sandbox.load_settings(tmp_path)




def test_probes_are_not_refused_without_the_filter() -> None:
    """The EPERM the probes get under the filter is the filter's: without it, root gets
    another answer (execve is not tried here: it would replace the test process)."""
    if os.geteuid() != 0:
        pytest.skip("mount answers EPERM to a user without the filter too: run as root")
    assert sandbox.probe("ptrace") == errno.ESRCH  # no tracee attached
    assert sandbox.probe("mount") == errno.ENOENT  # no such mount point


MDWE_CHILD = """
import ctypes, errno, importlib, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux 6.3)
    print("no mdwe", errno.errorcode.get(ctypes.get_errno())); sys.exit(0)
importlib.reload(ctypes)  # what `import ctypes` does under the unit: a callback made at import
from overflowd import sandbox
print("allowed", sandbox.confine("overflowd", None))
"""


def test_the_filter_loads_under_memory_deny_write_execute() -> None:
    """The units set MemoryDenyWriteExecute=yes: ctypes (its import makes a libffi closure)
    and libseccomp must work without writable-executable memory. The kernel's own MDWE
    (prctl, Linux 6.3) stands in for systemd's."""
    env = {**os.environ, sandbox.ENV: "1"}
    done = subprocess.run(
        [sys.executable, "-c", MDWE_CHILD], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 0, done.stderr
    if done.stdout.startswith("no mdwe"):
        pytest.skip(f"this kernel has no PR_SET_MDWE ({done.stdout.strip()})")
    assert f"allowed {len(sandbox.ALLOWED['overflowd'])}" in done.stdout, done.stdout


def test_jfe_refuses_a_bad_sandbox_section_before_it_starts(tmp_path: Path) -> None:
    """One clear line and exit 1, before any listener or rule (not a traceback out of trio)."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare: a jfe that did start would touch the host's nft")
    (tmp_path / "overflowd.toml").write_text("[sandbox]\nseccomp = 1\n")
    done = subprocess.run(  # in a network namespace of its own, should it start after all
        [unshare, "--net", str(Path(sys.executable).parent / "jfe"), "--home", str(tmp_path),
         "run"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("jfe: ") and "sandbox.seccomp" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
