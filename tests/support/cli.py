"""Run the installed console scripts the way a user does: a process, argv, exit code."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str
    raw: bytes


def run(
    *argv: str,
    home: Path | None = None,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> Result:
    full_env = {k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"}
    if home is not None:
        full_env["OVERFLOWD_HOME"] = str(home)
    full_env.update(env or {})
    script = BIN / argv[0]
    proc = subprocess.run(
        [str(script), *argv[1:]], input=stdin, capture_output=True, env=full_env, timeout=timeout
    )
    return Result(
        code=proc.returncode,
        out=proc.stdout.decode("utf-8", "replace"),
        err=proc.stderr.decode("utf-8", "replace"),
        raw=proc.stdout,
    )


class CallTimeout(AssertionError):
    """A command run by :func:`call` did not return within its timeout."""


def call(
    *argv: str,
    home: Path | None = None,
    stdin: bytes | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> Result:
    """Run a console script's ``main(argv)`` in this process: the same parser, dispatch and
    exit code as :func:`run` without a Python start and its imports (~0.5 s each). For tests
    of a command's logic; tests of the process itself (exit status, streams, environment)
    use :func:`run`, and each command keeps at least one of those. Bounded like :func:`run`:
    after ``timeout`` seconds a SIGALRM raises :class:`CallTimeout` in the command."""
    import contextlib
    import io
    import signal
    import threading
    from collections.abc import Callable
    from types import FrameType

    from overflowd.cli import node, query, receive
    from ratelock import cli as ratelock_cli

    mains: dict[str, Callable[[list[str]], int]] = {
        "overflowd": node.main,
        "overflowd-query": query.main,
        "overflowd-receive": receive.main,
        "ratelock": ratelock_cli.main,
    }
    out, err = io.BytesIO(), io.StringIO()
    stdout = io.TextIOWrapper(out, encoding="utf-8", newline="\n", write_through=True)
    stdin_stream = io.TextIOWrapper(io.BytesIO(stdin or b""), encoding="utf-8")

    def expired(signum: int, frame: FrameType | None) -> None:
        raise CallTimeout(f"{' '.join(argv)} did not return within {timeout} s")

    alarm = threading.current_thread() is threading.main_thread()
    if alarm:
        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    saved_home = os.environ.pop("OVERFLOWD_HOME", None)
    if home is not None:
        os.environ["OVERFLOWD_HOME"] = str(home)
    saved_env = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    saved_stdin = sys.stdin
    sys.stdin = stdin_stream
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
            try:
                code = mains[argv[0]](list(argv[1:]))
            except SystemExit as exc:  # argparse: usage errors and --help
                code = exc.code if isinstance(exc.code, int) else 1
            stdout.flush()
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        sys.stdin = saved_stdin
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.environ.pop("OVERFLOWD_HOME", None)
        if saved_home is not None:
            os.environ["OVERFLOWD_HOME"] = saved_home
    raw = out.getvalue()
    return Result(code=code, out=raw.decode("utf-8", "replace"), err=err.getvalue(), raw=raw)
