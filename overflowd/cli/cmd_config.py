"""``overflowd config check``: every problem of a node's config file, each with file:line.

The daemons stop at the first bad key (they must not start on a half-read config); an operator
editing the file wants the whole list at once, before a restart. The same strict parser decides,
so what ``check`` passes, ``overflowd run``, jfe and ratelockd load.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from overflowd.cli.common import context
from overflowd.config import CONFIG_FILE, OtherSections, check_text
from overflowd.errors import ConfigError

_WHERE = re.compile(r"^(?P<file>.*?):(?P<line>\d+): (?P<message>.*)$", re.S)


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    config = subparsers.add_parser("config", parents=[common], help="check the node's config")
    sub = config.add_subparsers(title="config commands", metavar="CONFIGCOMMAND")
    p = sub.add_parser(
        "check",
        parents=[common],
        help="validate the whole config (all sections, jfe's and ratelock's too); exit 1 if bad",
    )
    p.add_argument(
        "--file", metavar="FILE", help=f"the file to check (default: HOME/{CONFIG_FILE})"
    )
    p.add_argument("--json", action="store_true", help="one JSON document: {ok, file, problems}")
    p.set_defaults(func=cmd_check)


def other_sections() -> OtherSections:
    """jfe's, ratelock's and the sandbox's sections, checked with their own dataclasses."""
    from jfe.certconfig import CertificateSettings
    from jfe.config import JfeSettings
    from overflowd.sandbox import SandboxSettings
    from ratelock.config import RatelockSettings

    return {
        "jfe": (JfeSettings, ("certificates",)),
        "jfe.certificates": (CertificateSettings, ()),
        "ratelock": (RatelockSettings, ()),
        "sandbox": (SandboxSettings, ()),
    }


def cmd_check(args: argparse.Namespace) -> int:
    path = Path(args.file) if args.file else context(args).home / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if args.file:
            raise ConfigError(f"{path}: no such file") from None
        text = ""  # no file: the defaults, which are valid
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{path}: cannot read: {why}") from None
    problems = check_text(text, str(path), other_sections())
    if args.json:
        rows = []
        for problem in problems:
            m = _WHERE.match(problem)
            rows.append(
                {"file": m["file"], "line": int(m["line"]), "message": m["message"]}
                if m
                else {"file": str(path), "line": None, "message": problem.split(": ", 1)[-1]}
            )
        print(json.dumps({"ok": not problems, "file": str(path), "problems": rows}))
    else:
        for problem in problems:
            print(problem)
        print(f"{path}: {len(problems)} problem(s)" if problems else f"{path}: ok")
    return 1 if problems else 0
