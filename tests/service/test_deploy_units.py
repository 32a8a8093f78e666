"""``make install`` into a temporary root (DESTDIR), then the installed units checked the way
the issue asks: ``systemd-analyze verify`` clean and ``systemd-analyze security --offline=yes``
at most 2.0 ("OK") for each; the console scripts of the installed wheel run; the sysusers.d file
creates the users and the group (docs/deploy.md)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ANALYZE = shutil.which("systemd-analyze")
UNITS = ("overflowd", "overflowd-identity", "jfe", "ratelockd")
COMMANDS = ("overflowd", "overflowd-query", "overflowd-receive", "jfe", "ratelock", "ratelockd")
MAX_EXPOSURE = 2.0  # the goal: "OK" or better for every unit
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd)"
)


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    # In /tmp itself, 0755: the installed venv must be reachable by an unprivileged user
    # (pytest's own temporary directories are root's alone).
    root = Path(tempfile.mkdtemp(prefix="units-sysroot-"))
    root.chmod(0o755)
    try:
        yield from _installed(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _installed(root: Path) -> Iterator[Path]:
    done = subprocess.run(
        ["make", "-C", str(ROOT), "--no-print-directory", "install", f"DESTDIR={root}"],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # What a Debian system under the root has and systemd-analyze looks up there: the
    # distribution's units (sysinit.target...) and /bin/ln of the units' ExecStartPre=.
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/ln", root / "usr/bin/ln")
    (root / "bin").symlink_to("usr/bin")
    yield root


def test_the_wheel_is_installed_not_a_checkout_and_every_command_runs(root: Path) -> None:
    venv = root / "opt/overflowd/venv"
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import overflowd, jfe, ratelock; "
         "print(overflowd.__file__, jfe.__file__, ratelock.__file__)"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    for path in where.stdout.split():
        assert Path(path).is_relative_to(venv / "lib"), path  # not this checkout (editable)
    assert not list(venv.glob("lib/python*/site-packages/__editable__*"))
    for command in COMMANDS:
        link = root / "usr/local/bin" / command
        assert link.is_symlink() and str(link.readlink()) == f"/opt/overflowd/venv/bin/{command}"
        done = subprocess.run(
            [str(venv / "bin" / command), "--help"], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0 and "usage:" in done.stdout, (command, done.stderr)


@needs_analyze
def test_units_verify_clean(root: Path) -> None:
    assert ANALYZE is not None
    done = subprocess.run(
        [ANALYZE, "verify", f"--root={root}", *(f"{u}.service" for u in UNITS)],
        capture_output=True, text=True, timeout=60,
    )
    # Unknown keys and missing commands are warnings only: any output at all is a failure.
    assert done.returncode == 0 and not done.stdout + done.stderr, done.stdout + done.stderr


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_at_most_two(root: Path, unit: str) -> None:
    assert ANALYZE is not None
    assert (root / f"etc/systemd/system/{unit}.service").is_file()
    done = subprocess.run(
        [ANALYZE, "security", "--offline=yes", f"--root={root}",
         f"--threshold={int(MAX_EXPOSURE * 10)}", f"{unit}.service"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    m = re.search(rf"Overall exposure level for {unit}\.service: (\d+\.\d)", done.stdout)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE and done.returncode == 0, done.stdout


def test_sysusers_creates_the_users_and_the_group(root: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.skip("systemd-sysusers is not installed (Debian package systemd)")
    (root / "etc").mkdir(exist_ok=True)
    done = subprocess.run(
        [sysusers, f"--root={root}", "overflowd.conf"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    passwd = {line.split(":")[0]: line.split(":") for line in
              (root / "etc/passwd").read_text().splitlines()}
    for user in ("overflowd", "jfe", "ratelock"):
        assert passwd[user][5] == f"/var/lib/{user}" and passwd[user][6] == "/usr/sbin/nologin"
        assert int(passwd[user][2]) < 1000  # a system user
    groups = {line.split(":")[0]: line.split(":") for line in
              (root / "etc/group").read_text().splitlines()}
    assert groups["ratelock-clients"][3].split(",") == ["ratelock"]
    # No group shares the node key: each service gets it as a credential (LoadCredential=).
    units = {u: (root / f"etc/systemd/system/{u}.service").read_text() for u in UNITS}
    for unit in ("jfe", "ratelockd"):
        assert "LoadCredential=identity.key:/var/lib/overflowd/identity.key" in units[unit]
        assert "User=overflowd" not in units[unit]
    assert "Environment=OVERFLOWD_SECCOMP=1" in units["overflowd"]


def _filter_group(name: str) -> set[str]:
    """The calls in a systemd syscall group (``@system-service``...), nested groups expanded."""
    assert ANALYZE is not None
    out = subprocess.run(
        [ANALYZE, "syscall-filter", name], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    calls: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip().split(" ")[0]
        if word.startswith("@"):
            calls |= _filter_group(word)
        elif word and not word.startswith("#"):
            calls.add(word)
    return calls


@needs_analyze
@pytest.mark.parametrize(("unit", "daemon"), [("overflowd", "overflowd"), ("jfe", "jfe"),
                                              ("ratelockd", "ratelockd")])
def test_daemon_allow_list_within_its_unit_filter(root: Path, unit: str, daemon: str) -> None:
    """The daemon's own list (overflowd.sandbox) inside the unit's SystemCallFilter=: a call on
    the first but not the second would be refused by systemd, whatever the daemon allows."""
    from overflowd import sandbox

    allowed: set[str] = set()
    for line in (root / f"etc/systemd/system/{unit}.service").read_text().splitlines():
        if line.startswith("SystemCallFilter="):
            words = line.split("=", 1)[1].split()
            deny = words[0].startswith("~")
            names = set().union(*(_filter_group(w.lstrip("~")) if w.lstrip("~").startswith("@")
                                  else {w.lstrip("~")} for w in words))
            allowed = allowed - names if deny else allowed | names
    assert len(allowed) > 100
    root_only = {"fchown"}  # SQLite's, as root only (overflowd/sandbox.py): not under a unit
    outside = sandbox.ALLOWED[daemon] - allowed - root_only
    assert not outside, sorted(outside)


NOBODY = 65534
SETPRIV = shutil.which("setpriv")


def _as_nobody(root: Path, argv: list[str], home: Path) -> subprocess.Popen[str]:
    """A command of the installed venv as an unprivileged user without capabilities, with the
    seccomp filter forced on: what the units do, less the rest of systemd's confinement."""
    assert SETPRIV is not None
    env = {"PATH": "/usr/bin:/bin", "OVERFLOWD_HOME": str(home), "OVERFLOWD_SECCOMP": "1"}
    return subprocess.Popen(
        [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
         str(root / "opt/overflowd/venv/bin" / argv[0]), *argv[1:]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd="/",
    )  # fmt: skip


def _until(proc: subprocess.Popen[str], *patterns: str, timeout_s: float = 60) -> str:
    """Output up to the line where every pattern has been seen, in any order (killed if not
    within the timeout: a silent process must not hang the test in readline)."""
    assert proc.stdout is not None
    watchdog = threading.Timer(timeout_s, proc.kill)
    watchdog.start()
    seen, wanted = "", set(patterns)
    try:
        while wanted:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            wanted -= {p for p in wanted if re.search(p, line)}
    finally:
        watchdog.cancel()
    if wanted:
        proc.kill()
        raise AssertionError(f"no {sorted(wanted)} in: {seen}")
    return seen


@pytest.mark.skipif(SETPRIV is None, reason="setpriv is not installed (util-linux)")
def test_installed_daemons_run_unprivileged_confined_with_the_identity_as_a_credential(
    root: Path,
) -> None:
    """overflowd and ratelockd from the installed venv as an unprivileged user, seccomp on;
    ratelockd's identity is a symlink to a 0400 file of its own, as LoadCredential= and the
    unit's ExecStartPre= leave it (docs/deploy.md "Users, homes and the identity")."""
    base = Path(tempfile.mkdtemp(prefix="units-homes-"))
    try:
        base.chmod(0o755)
        node = base / "overflowd"
        init = subprocess.run(
            [str(root / "opt/overflowd/venv/bin/overflowd"), "init", "--home", str(node)],
            capture_output=True, text=True, timeout=60,
        )
        assert init.returncode == 0, init.stderr
        credentials = base / "credentials"
        credentials.mkdir(mode=0o700)
        shutil.copy(node / "identity.key", credentials / "identity.key")
        (credentials / "identity.key").chmod(0o400)
        rl = base / "ratelock"
        rl.mkdir(mode=0o700)
        (rl / "identity.key").symlink_to(credentials / "identity.key")
        (rl / "overflowd.toml").write_text("[ratelock]\nargon2_time_cost = 1\n"
                                          "argon2_memory_kib = 8\n")
        for path in (node, *node.iterdir(), credentials, credentials / "identity.key", rl,
                     *rl.iterdir()):
            os.chown(path, NOBODY, NOBODY, follow_symlinks=False)
        daemons = [
            (_as_nobody(root, ["overflowd", "run", "--home", str(node), "--listen",
                               "127.0.0.1:0", "--api", "", "--metrics", ""], node),
             "overflowd", r"^listening udp 127\.0\.0\.1:\d+"),
            (_as_nobody(root, ["ratelockd", "--home", str(rl), "--listen",
                               f"unix:{rl}/ratelockd.sock"], rl),
             "ratelockd", r"^ratelockd listening unix:"),
        ]  # fmt: skip
        for proc, name, started in daemons:
            out = _until(proc, started, rf"^{name}: sandbox seccomp on, \d+ system calls allowed")
            assert proc.poll() is None, out
        for proc, name, _ in daemons:
            proc.send_signal(signal.SIGTERM)
            rest, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0, (name, rest)
        assert os.stat(rl / "ratelock.pub").st_uid == NOBODY  # written by ratelockd itself
    finally:
        shutil.rmtree(base, ignore_errors=True)
