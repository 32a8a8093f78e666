"""Self-sandboxing: once a daemon has started, the kernel lets it make only the calls it needs.

The Autoclave idea: a program that needs few system calls should be allowed only those. Each
daemon (``overflowd run``, ``jfe run``, ``ratelockd``) calls :func:`confine` once its sockets
are bound, its files open and its threads started; from then on every other system call fails
with EPERM in every thread (the filter is synchronised to all threads with TSYNC and inherited
by children). The lists below were recorded with ``strace -f`` through each daemon's end-to-end
tests (tests/service/test_sandbox.py keeps them honest) plus a margin for error paths; the
start-up calls (``execve``, ``bind``, ``mount``-like set-up, ``ptrace``...) are not on them.

libseccomp (Debian's libseccomp2, which systemd itself depends on) is driven through ctypes:
the same C library that Debian's python3-seccomp wraps, without that module's tie to the
system interpreter (a venv on another build of Python 3.11 cannot import it without a symlink).

Never: confine before start-up is done (a later ``bind`` would fail), or swallow a failure to
confine when it was asked for (a daemon that believes it is sandboxed and is not is worse).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from overflowd.errors import OverflowdError

log = logging.getLogger("overflowd.sandbox")

#: Environment override: "1" confines whatever the config says, "0" never (tests, debugging);
#: "record" loads a filter that allows everything, so that ``strace -f`` shows where the
#: confinement would begin (its ``seccomp(`` line) and every call made after it: the lists
#: below are derived that way, and tests/service/test_sandbox.py checks them so.
ENV = "OVERFLOWD_SECCOMP"
#: Test hook: after confining, attempt these calls (comma-separated, from PROBES) and log the
#: answer, so a test sees a forbidden call refused from inside the running daemon.
PROBE_ENV = "OVERFLOWD_SECCOMP_PROBE"


@dataclass(frozen=True)
class SandboxSettings:
    """``[sandbox]`` of the home's overflowd.toml, read by each of the three daemons."""

    seccomp: bool = False

    def problems(self) -> list[tuple[str, str]]:
        return []


# -- the allow-lists ---------------------------------------------------------------------------
# What a trio program on CPython calls in steady state: its event loop (epoll, the wakeup
# socketpair), threads for to_thread (clone3/clone, futex, rseq, madvise on stack reuse), memory,
# files it opens and renames (the store, status files, SQLite's locks and journal), time and
# signals. Calls recorded through the end-to-end tests, plus a margin for the paths those tests
# do not take (outgoing connections to peers, webhooks, DNS and PostgreSQL; retention; error
# paths). Names glibc 2.36 never issues on x86_64 (open, stat, select: it calls openat,
# newfstatat, pselect6) are left out.
_COMMON = frozenset({
    # memory
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise",
    # threads and their synchronisation (trio.to_thread, the metrics thread, SQLite)
    "clone", "clone3", "futex", "set_robust_list", "rseq", "sched_yield", "sched_getaffinity",
    "gettid", "getpid", "getppid", "tgkill", "exit", "exit_group", "restart_syscall",
    # signals (trio's wakeup fd, SIGTERM handling)
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sigaltstack", "kill",
    # the event loop
    "epoll_create1", "epoll_ctl", "epoll_wait", "poll", "ppoll", "pselect6", "eventfd2", "pipe2",
    # files: the store, status and metrics files, SQLite's journal and locks, reading config
    "read", "write", "readv", "writev", "pread64", "pwrite64", "lseek", "close", "openat",
    "newfstatat", "statx", "fstatfs", "statfs", "fcntl",
    "ioctl", "fsync", "fdatasync", "ftruncate", "rename", "renameat", "renameat2", "unlink",
    "unlinkat", "mkdir", "mkdirat", "getdents64", "access", "faccessat", "faccessat2",
    "readlink", "readlinkat", "getcwd", "fchmod", "flock", "dup", "dup2", "dup3",
    "umask", "chmod", "fchmodat", "utimensat",
    # SQLite run as root gives a new journal or WAL the database's owner (fchown; recorded in
    # tests/service/test_peer_push.py). Under the units (not root) it never comes, and their
    # SystemCallFilter= (@privileged) would refuse it anyway.
    "fchown",
    # numpy loads after confinement (on the first batch, to keep an idle node small): its
    # OpenBLAS fstat()s fds 0-2 (libgfortran's units) at load (mbind: REFUSED_AT_NO_COST).
    "fstat",
    # sockets already bound; connections out (peers, webhooks, PostgreSQL, DNS) and in
    "socket", "connect", "accept", "accept4", "recvfrom", "recvmsg", "recvmmsg", "sendto",
    "sendmsg", "sendmmsg", "shutdown", "getsockname", "getpeername", "getsockopt",
    "setsockopt", "socketpair",
    # time, randomness, identity
    "clock_gettime", "clock_getres", "clock_nanosleep", "nanosleep",
    "getrandom", "uname", "getuid", "geteuid", "getgid", "getegid", "getgroups", "getrusage",
    "getrlimit", "prlimit64", "sysinfo", "times", "prctl", "arch_prctl", "set_tid_address",
    "wait4", "waitid",
})

#: Calls a daemon makes that its filter refuses (EPERM) at no cost, as the units' @resources
#: deny does: numpy's OpenBLAS asks a NUMA policy for its buffers when it loads (on the first
#: batch, after confinement) and carries on without one.
REFUSED_AT_NO_COST = frozenset({"mbind"})

#: Per daemon: the common list plus what that daemon alone needs.
ALLOWED: dict[str, frozenset[str]] = {
    "overflowd": _COMMON,
    "ratelockd": _COMMON,
    # jfe also splices/moves bytes between sockets and, when it stops, runs nft and ip to take
    # its rules out (fork + execve, netlink sockets; the children inherit this filter).
    "jfe": _COMMON | {
        "splice", "sendfile", "execve", "vfork", "setsid", "setpgid", "getpgid", "getsid",
        "bind", "listen", "close_range", "chdir", "fchdir",
    },
}

#: The calls a probe may try (PROBE_ENV): on no list but jfe's (execve), and each answered
#: otherwise than EPERM for root without a filter (ptrace ESRCH, mount ENOENT, execve runs).
PROBES = ("ptrace", "mount", "execve")

# libseccomp's constants (seccomp.h)
_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_FLTATR_CTL_TSYNC = 4


def _scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0x0000FFFF)


def _libseccomp() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise OverflowdError(
            f"sandbox: seccomp asked for but libseccomp is missing ({exc}): "
            "apt-get install libseccomp2, or set [sandbox] seccomp = false"
        ) from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add.restype = ctypes.c_int
    lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_attr_set.restype = ctypes.c_int
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_load.restype = ctypes.c_int
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.restype = None
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def load_settings(home: Path) -> SandboxSettings:
    from overflowd.config import load_section

    return load_section(home, "sandbox", SandboxSettings)


def wanted(settings: SandboxSettings) -> str:
    """"on", "off" or "record": the environment's word first (tests force it), then the
    config's."""
    forced = os.environ.get(ENV, "")
    if forced in ("0", "1"):
        return "on" if forced == "1" else "off"
    if forced == "record":
        return forced
    return "on" if settings.seccomp else "off"


def install(allowed: frozenset[str] | None) -> int:
    """Load an allow-list filter into every thread of this process; returns the rules added.

    Names this kernel or libseccomp does not know (``clone3`` on an old one) are skipped.
    ``None`` loads a filter allowing everything (the "record" mode).
    """
    lib = _libseccomp()
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW if allowed is None else _scmp_act_errno(errno.EPERM))
    if not ctx:
        raise OverflowdError("sandbox: seccomp_init failed")
    try:
        if lib.seccomp_attr_set(ctx, _SCMP_FLTATR_CTL_TSYNC, 1) != 0:
            raise OverflowdError("sandbox: this kernel cannot filter all threads (TSYNC)")
        count = 0
        for name in sorted(allowed or ()):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue
            rc = lib.seccomp_rule_add(ctx, _SCMP_ACT_ALLOW, nr, 0)
            if rc != 0:
                raise OverflowdError(f"sandbox: cannot allow {name}: {os.strerror(-rc)}")
            count += 1
        rc = lib.seccomp_load(ctx)
        if rc != 0:
            raise OverflowdError(f"sandbox: seccomp_load failed: {os.strerror(-rc)}")
        return count
    finally:
        lib.seccomp_release(ctx)


def probe(name: str) -> int:
    """Attempt one forbidden call; its errno (0 if it was let through)."""
    libc = ctypes.CDLL(None, use_errno=True)
    ctypes.set_errno(0)
    if name == "ptrace":  # PTRACE_PEEKUSER on our parent: harmless, allowed to root
        rc = libc.ptrace(3, os.getppid(), 0, 0)
    elif name == "mount":  # a tmpfs on a directory that does not exist: EPERM beats ENOENT
        rc = libc.mount(b"none", b"/nonexistent-overflowd-probe", b"tmpfs", 0, None)
    elif name == "execve":
        rc = libc.execve(b"/bin/true", None, None)
    else:
        raise ValueError(f"unknown probe {name!r}")
    return ctypes.get_errno() if rc == -1 else 0


def check(home: Path) -> str:
    """The mode :func:`confine` will take, with its errors (a bad ``[sandbox]``, no
    libseccomp) raised now: for a daemon that would otherwise meet them inside its nursery."""
    mode = wanted(load_settings(home))
    if mode != "off":
        _libseccomp()
    return mode


def confine(daemon: str, home: Path | None) -> int:
    """Install ``daemon``'s allow-list if asked for (config or OVERFLOWD_SECCOMP); returns how
    many calls it allows, 0 when not asked. Call once, after start-up."""
    settings = load_settings(home) if home is not None else SandboxSettings()
    mode = wanted(settings)
    if mode == "off":
        log.debug("sandbox.off daemon=%s", daemon)
        return 0
    if mode == "record":
        install(None)
        print(f"{daemon}: sandbox seccomp recording", file=sys.stderr, flush=True)
        return 0
    count = install(ALLOWED[daemon])
    log.info("sandbox.seccomp daemon=%s allowed_calls=%d", daemon, count)
    # An announcement like "listening ...": whatever the log level, the operator sees it.
    print(f"{daemon}: sandbox seccomp on, {count} system calls allowed", file=sys.stderr,
          flush=True)
    for name in filter(None, os.environ.get(PROBE_ENV, "").split(",")):
        code = probe(name)
        log.warning(
            "sandbox.probe call=%s refused=%s errno=%s",
            name, code == errno.EPERM, errno.errorcode.get(code, code),
        )
    return count


__all__ = [
    "ALLOWED", "ENV", "PROBES", "PROBE_ENV", "SandboxSettings", "check", "confine", "install",
]
