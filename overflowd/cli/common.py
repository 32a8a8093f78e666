"""What every CLI shares: --home/--db, logging set-up, error-to-exit-code mapping."""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from overflowd.config import Settings, load_settings, resolve_home
from overflowd.errors import ConfigError, OverflowdError

if TYPE_CHECKING:
    from overflowd.store.repository import Store

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(ConfigError):
    """Bad command-line input found after parsing (exit 2, like argparse's own)."""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the usage itself is one ``--help`` away).

    A script or an operator reads the one line that names the flag; argparse's default
    prints the whole usage first, and for ``choices=range(...)`` every choice.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_flag(flag: str, lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: a decimal integer in lo..hi, refused in one line naming ``flag``."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer in {lo}-{hi}")
        return value

    parse.__name__ = flag  # argparse names the type in its message; the flag is named anyway
    return parse


def common_options() -> Parser:
    """A parent parser so --home and --db work before or after the subcommand."""
    parent = Parser(add_help=False)
    parent.add_argument(
        "--home",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="node home (default: $OVERFLOWD_HOME, else ~/.overflowd)",
    )
    parent.add_argument(
        "--db",
        metavar="URL",
        default=argparse.SUPPRESS,
        help="database URL, overrides store.url (sqlite:///..., postgresql+psycopg://...)",
    )
    parent.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more log output"
    )
    parent.add_argument(
        "--log-format",
        choices=("plain", "json"),
        default=argparse.SUPPRESS,
        help="log lines on stderr: plain (default) or JSON lines (journald, log shippers)",
    )
    return parent


@dataclass(frozen=True)
class Context:
    home: Path
    db_url: str | None
    _settings: list[Settings]

    @property
    def settings(self) -> Settings:
        if not self._settings:
            self._settings.append(load_settings(self.home))
        return self._settings[0]

    def store_url(self) -> str:
        from overflowd.store.base import default_url

        return self.db_url or self.settings.store.url or default_url(self.home)

    def open_store(self, *, create: bool = True) -> Store:
        """The store; ``create=False`` (read-only commands) opens an existing one only."""
        from overflowd.store.repository import Store

        return Store.open(self.store_url(), create=create)


def context(args: argparse.Namespace) -> Context:
    return Context(
        home=resolve_home(getattr(args, "home", None)),
        db_url=getattr(args, "db", None),
        _settings=[],
    )


def configure_logging(verbosity: int, fmt: str = "plain") -> None:
    from overflowd.logformat import configure

    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    configure(level, fmt, sys.stderr)


def run_main(
    prog: str,
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
) -> int:
    """Parse, dispatch to ``args.func``, map our errors to one line and exit code 1."""
    args = parser.parse_args(argv)
    configure_logging(getattr(args, "verbose", 0) or 0, getattr(args, "log_format", "plain"))
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: a command is required", file=sys.stderr)
        return 2
    try:
        return func(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OverflowdError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `overflowd-query reports | head`
        return 0
    except KeyboardInterrupt:
        return 130


def parse_since(text: str, now_s: float | None = None) -> int:
    """'90s', '15m', '1h', '2d', '1w' ago, or an ISO 8601 time; returns Unix milliseconds."""
    import datetime as dt

    now_s = time.time() if now_s is None else now_s
    m = _DURATION.match(text.strip())
    if m:
        return int((now_s - float(m.group(1)) * _UNITS[m.group(2)]) * 1000)
    try:
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected a duration like 15m, 1h, 2d or an ISO 8601 time"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp() * 1000)


def run_trio(main: Callable[[], Awaitable[None]]) -> None:
    """trio.run, with a lone error out of a nursery's exception group raised on its own.

    Nurseries wrap errors in groups; a CLI wants the one line that says what went wrong.
    """
    import trio

    try:
        trio.run(main)
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], OverflowdError | OSError):
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def now_ms() -> int:
    return int(time.time() * 1000)
