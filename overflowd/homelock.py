"""One daemon per home: an advisory lock file each long-running program holds while it runs.

Two ``overflowd run`` on one home would both sign with one key, both prune one store and both
write one status file: the second one must refuse to start, naming who holds the home. The lock
is ``flock(2)`` on ``HOME/PROGRAM.lock`` (overflowd, jfe and ratelockd share a home, each has its
own lock): the kernel drops it when the process dies however it dies, so a stale file never
blocks a restart, and the file is never removed (removing it would let two holders lock two
different inodes). The holder writes its PID into the file for the message.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from overflowd.errors import OverflowdError

#: Bytes of the lock file read for the holder's PID (a PID and a newline; bounded anyway).
_MAX_PID_BYTES = 32


class HomeLocked(OverflowdError):
    """Another process holds this program's lock on the home."""


@dataclass
class HomeLock:
    """A held lock; :meth:`release` (or the process ending) lets the next start go."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = -1


def lock_path(home: Path, program: str) -> Path:
    return home / f"{program}.lock"


def holder_pid(path: Path) -> int | None:
    """The PID the holder wrote, or None if the file is empty, unreadable or garbage."""
    try:
        with path.open("rb") as f:
            text = f.read(_MAX_PID_BYTES).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def acquire(home: Path, program: str) -> HomeLock:
    """Take ``HOME/PROGRAM.lock`` or raise :class:`HomeLocked` naming the home, file and PID."""
    path = lock_path(home, program)
    try:
        # never through a symlink (the PID write truncates: a link to identity.key emptied it)
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644
        )
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise HomeLocked(f"the lock file {path} is not a regular file (a symlink)") from None
        raise HomeLocked(f"cannot open the lock file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise HomeLocked(f"the lock file {path} is not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = holder_pid(path)
        who = f"PID {pid}" if pid is not None else "a process whose PID is not written yet"
        raise HomeLocked(
            f"home {home} is in use: {program} already runs there ({who} holds {path})"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise HomeLocked(f"cannot lock {path}: {exc.strerror}") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except OSError as exc:  # a full disk: refused, not a traceback with the lock held
        os.close(fd)
        raise HomeLocked(f"cannot write {path}: {exc.strerror}") from None
    return HomeLock(path=path, fd=fd)
