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
