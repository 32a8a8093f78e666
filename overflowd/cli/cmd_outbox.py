"""The webhook outbox for operators: ``overflowd-query outbox``, ``overflowd outbox retry|enable``.

A delivery that failed for good (a 4xx, 410 Gone, attempts exhausted) is a dead row, kept with
its last status and error; an endpoint that answered 410 Gone is disabled, and new rows for it
are dead at once. These commands show the rows, put dead ones back to pending (due now,
attempts counted afresh) and clear a 410 disable. They run beside the daemon, in another
process (SQLite in WAL mode, or PostgreSQL): the daemon reads the rows and the endpoint state
from the store at every look at the outbox, so a retry is sent within its poll interval.

The query opens the store read-only and never creates one. A retry or enable that is refused
(an unknown id or URL, a row that is not dead, a disabled endpoint) changes nothing: each is
one transaction, all or nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overflowd.cli.common import Context, UsageError, context, int_flag, now_ms
from overflowd.errors import ConfigError, StoreError
from overflowd.report import iso_ms

if TYPE_CHECKING:
    from overflowd.store import outbox as ob
    from overflowd.store.repository import Store

#: --limit's ceiling, as for the other queries: more rows than this is a typo, not a look.
MAX_LIMIT = 1_000_000
#: Rows (and endpoints) listed when --limit is not given: "N of M" says when there are more.
DEFAULT_LIMIT = 100
#: Ids named in one refusal at most; the rest are counted ("and 12 more").
MAX_IDS_SHOWN = 5
#: The longest URL the outbox holds (overflowd.store.outbox.MAX_URL_CHARS; not imported, so
#: that --help does not load SQLAlchemy).
MAX_URL_CHARS = 2048
#: The largest row id (a signed 64-bit column).
MAX_ID = 2**63 - 1


# ---------------------------------------------------------------------------------------------
# Registration


def register_query(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``outbox`` to overflowd-query's subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "outbox",
        parents=[common],
        help="webhook deliveries: pending, delivered, dead; endpoints disabled or held",
        description="List webhook outbox rows, newest first, and the endpoints that hold "
        "deliveries back (410 Gone: disabled; 429/503: held). Reads only.",
    )
    p.add_argument("--dead", action="store_true", help="only dead rows (failed for good)")
    p.add_argument("--url", type=_url("--url"), metavar="URL", help="only this URL (exact)")
    p.add_argument(
        "--limit",
        type=int_flag("--limit", 1, MAX_LIMIT),
        default=DEFAULT_LIMIT,
        metavar="N",
        help=f"at most N rows and N endpoints, 1-{MAX_LIMIT} (default {DEFAULT_LIMIT})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line: rows ("type": "row"), then endpoints ("type": "endpoint")',
    )
    p.set_defaults(func=cmd_list)


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``outbox retry`` and ``outbox enable`` to overflowd's subcommands."""
    outbox: argparse.ArgumentParser = subparsers.add_parser(
        "outbox", parents=[common], help="retry dead webhook deliveries, enable an endpoint"
    )
    sub = outbox.add_subparsers(title="outbox commands", metavar="OUTBOXCOMMAND")
    p: argparse.ArgumentParser = sub.add_parser(
        "retry",
        parents=[common],
        help="dead rows back to pending, due now, attempts reset (overflowd-query outbox --dead)",
    )
    p.add_argument(
        "ids", nargs="*", type=int_flag("ID", 1, MAX_ID), metavar="ID", help="outbox row ids"
    )
    p.add_argument(
        "--all", action="store_true", help="every dead row (except of disabled endpoints)"
    )
    p.add_argument("--url", type=_url("--url"), metavar="URL", help="with --all: of this URL only")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    p.set_defaults(func=cmd_retry)
    p = sub.add_parser(
        "enable", parents=[common], help="clear a 410 Gone disable (dead rows stay dead)"
    )
    p.add_argument("url", type=_url("URL"), metavar="URL", help="the endpoint's URL (exact)")
    p.add_argument("--json", action="store_true", help="print the outcome as one JSON object")
    p.set_defaults(func=cmd_enable)


def _url(flag: str) -> Any:
    def parse(text: str) -> str:
        if not 1 <= len(text) <= MAX_URL_CHARS:
            raise argparse.ArgumentTypeError(f"a URL of 1-{MAX_URL_CHARS} characters")
        return text

    parse.__name__ = flag
    return parse


# ---------------------------------------------------------------------------------------------
# overflowd-query outbox


def cmd_list(args: argparse.Namespace) -> int:
    from overflowd.store import outbox as ob

    ctx = context(args)
    store = ctx.open_store(create=False)
    try:
        listing = ob.list_outbox(
            store,
            now_ms=now_ms(),
            limit=args.limit,
            state=ob.DEAD if args.dead else None,
            url=args.url,
        )
    finally:
        store.close()
    if args.json:
        for row in listing.rows:
            print(json.dumps(_row_json(row)))
        for endpoint in listing.endpoints:
            print(json.dumps(_endpoint_json(endpoint)))
        return 0
    _print_listing(listing, args)
    return 0


def _time(ms: int | None) -> str | None:
    return None if ms is None else iso_ms(ms)


def _row_json(row: ob.OutboxRow) -> dict[str, Any]:
    return {
        "type": "row",
        "id": row.id,
        "state": row.state,
        "url": row.url,
        "report_id": row.report_id,
        "attempts": row.attempts,
        # Only a pending row has a next attempt; a dead or delivered one is done.
        "next_attempt": _time(row.next_attempt_ms) if row.state == "pending" else None,
        "created": iso_ms(row.created_ms),
        "updated": iso_ms(row.updated_ms),
        "last_status": row.last_status,
        "last_error": row.last_error,
    }


def _endpoint_json(endpoint: ob.EndpointView) -> dict[str, Any]:
    return {
        "type": "endpoint",
        "url": endpoint.url,
        "disabled": _time(endpoint.disabled_ms),
        "disabled_reason": endpoint.disabled_reason,
        "held_until": _time(endpoint.not_before_ms) if endpoint.disabled_ms is None else None,
        "dead": endpoint.dead,
    }


def _cell(text: str) -> str:
    """Text for a terminal: URLs come from DNS and errors from endpoints (anybody's), so a
    control character is shown escaped, never sent to the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _second(ms: int) -> str:
    # RFC 3339 to the second: a table column, not a timestamp to compute with (--json has ms).
    return iso_ms(ms)[:19] + "Z"


def _table(lines: list[tuple[str, ...]]) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def _print_listing(listing: ob.OutboxListing, args: argparse.Namespace) -> None:
    lines: list[tuple[str, ...]] = [
        ("ID", "STATE", "URL", "REPORT", "ATTEMPTS", "NEXT ATTEMPT", "UPDATED", "STATUS", "ERROR")
    ]
    for row in listing.rows:
        lines.append(
            (
                str(row.id),
                row.state,
                _cell(row.url),
                row.report_id[:12],
                str(row.attempts),
                _second(row.next_attempt_ms) if row.state == "pending" else "-",
                _second(row.updated_ms),
                "-" if row.last_status is None else str(row.last_status),
                _cell(row.last_error or ""),
            )
        )
    _table(lines)
    if listing.endpoints:
        print()
        ends: list[tuple[str, ...]] = [("ENDPOINT", "STATE", "SINCE/UNTIL", "DEAD", "REASON")]
        for e in listing.endpoints:
            disabled = e.disabled_ms is not None
            ends.append(
                (
                    _cell(e.url),
                    "disabled" if disabled else "held",
                    _second(e.disabled_ms if e.disabled_ms is not None else e.not_before_ms),
                    str(e.dead),
                    _cell(e.disabled_reason or "") if disabled else "asked us to wait",
                )
            )
        _table(ends)
    c = listing.counts
    footer = (
        f"{len(listing.rows)} of {listing.matching} rows"
        f" (pending {c['pending']}, delivered {c['delivered']}, dead {c['dead']}"
        + (f" for {_cell(args.url)}" if args.url else "")
        + ")"
    )
    if args.url and not any(c.values()):
        footer += "; no row has this URL (URLs match exactly)"
    if listing.endpoints_matching:
        footer += (
            f"; {len(listing.endpoints)} of {listing.endpoints_matching} endpoints disabled or "
            "held (overflowd outbox enable URL clears a disable)"
        )
    print(footer, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# overflowd outbox retry | enable


@contextlib.contextmanager
def _writable_store(ctx: Context, command: str) -> Iterator[Store]:
    """The store for writing, if it exists: a missing one is "no store at PATH", as for the
    queries, never a new empty store (it would have nothing to retry or enable). A read-only
    SQLite store is said to be one: SQLite itself only says "unable to open database file"
    or "attempt to write a readonly database"."""
    ctx.open_store(create=False).close()
    try:
        with ctx.open_store() as store:
            yield store
    except StoreError as exc:
        path = _sqlite_path(ctx.store_url())
        if path is not None and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
            raise StoreError(
                f"{exc}: {path} is read-only; {command} writes to the store "
                "(overflowd-query outbox only reads)"
            ) from None
        raise


def _sqlite_path(url: str) -> Path | None:
    """The file of a plain ``sqlite:///PATH`` URL (the default store), else None."""
    if not url.startswith("sqlite:///") or url.startswith("sqlite:///file:"):
        return None
    return Path(url[len("sqlite:///") :].split("?", 1)[0]).expanduser()


def _ids(ids: Sequence[int]) -> str:
    shown = ", ".join(map(str, ids[:MAX_IDS_SHOWN]))
    more = len(ids) - MAX_IDS_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _refusal(result: ob.RetryResult) -> str:
    parts = []
    if result.unknown:
        n = len(result.unknown)
        parts.append(f"no outbox row{'s' if n > 1 else ''} {_ids(result.unknown)}")
    if result.not_dead:
        by_state: dict[str, list[int]] = {}
        for i, state in result.not_dead:
            by_state.setdefault(state, []).append(i)
        for state, ids in sorted(by_state.items()):
            parts.append(f"row{'s' if len(ids) > 1 else ''} {_ids(ids)} {state}, not dead")
    if result.disabled:
        urls: dict[str, list[int]] = {}
        for i, url in result.disabled:
            urls.setdefault(url, []).append(i)
        url, ids = next(iter(sorted(urls.items())))
        others = f" (and {len(urls) - 1} more endpoints)" if len(urls) > 1 else ""
        parts.append(
            f"row{'s' if len(ids) > 1 else ''} {_ids(ids)} for a disabled endpoint{others}: "
            f"run `overflowd outbox enable {shlex.quote(_cell(url))}` first"
        )
    return "; ".join(parts) + "; nothing retried"


def cmd_retry(args: argparse.Namespace) -> int:
    from overflowd.store import outbox as ob

    if args.all and args.ids:
        raise UsageError("give row ids or --all, not both")
    if not args.all and not args.ids:
        raise UsageError("give the row ids to retry, or --all (see overflowd-query outbox --dead)")
    if args.url is not None and not args.all:
        raise UsageError("--url goes with --all (row ids name their rows already)")
    if len(set(args.ids)) > ob.MAX_RETRY_IDS:
        raise UsageError(f"at most {ob.MAX_RETRY_IDS} ids at once; use --all [--url URL]")
    ctx = context(args)
    with _writable_store(ctx, "overflowd outbox retry") as store:
        if args.ids:
            result = ob.retry_dead(store, args.ids, now_ms=now_ms())
            if result.refused:
                raise ConfigError(_refusal(result))
        else:
            if args.url is not None:
                _check_url_retryable(ob.url_summary(store, args.url), args.url)
            result = ob.retry_all_dead(store, now_ms=now_ms(), url=args.url)
    if args.json:
        print(
            json.dumps(
                {
                    "retried": result.retried,
                    "skipped_disabled": result.skipped_disabled,
                    "skipped_endpoints": result.skipped_endpoints,
                }
            )
        )
        return 0
    where = f" for {_cell(args.url)}" if args.url else ""
    if result.retried == 0 and not result.skipped_disabled:
        print(f"no dead rows{where}: nothing to retry")
        return 0
    rows = f"{result.retried} dead row{'s' if result.retried != 1 else ''}"
    line = f"{rows}{where} pending again, due now"
    if result.skipped_disabled:
        line += (
            f"; {result.skipped_disabled} dead rows of {result.skipped_endpoints} disabled "
            "endpoints left (overflowd-query outbox lists them; overflowd outbox enable URL first)"
        )
    print(line)
    return 0


def _check_url_retryable(summary: ob.UrlSummary | None, url: str) -> None:
    if summary is None:
        raise ConfigError(
            f"no outbox row or endpoint has the URL {_cell(url)} (URLs match exactly; "
            "overflowd-query outbox lists them); nothing retried"
        )
    if summary.disabled_ms is not None:
        raise ConfigError(
            f"{_cell(url)} is disabled ({_cell(summary.disabled_reason or '410 Gone')}, since "
            f"{_second(summary.disabled_ms)}): run `overflowd outbox enable "
            f"{shlex.quote(_cell(url))}` first; nothing retried"
        )


def cmd_enable(args: argparse.Namespace) -> int:
    from overflowd.store import outbox as ob

    ctx = context(args)
    with _writable_store(ctx, "overflowd outbox enable") as store:
        before = ob.enable_url(store, args.url, now_ms=now_ms())
    url = _cell(args.url)
    if before is None:
        raise ConfigError(
            f"no outbox row or endpoint has the URL {url} (URLs match exactly; "
            "overflowd-query outbox lists them); nothing enabled"
        )
    dead = before.counts[ob.DEAD]
    if args.json:
        print(
            json.dumps(
                {
                    "url": args.url,
                    "was_disabled": _time(before.disabled_ms),
                    "dead": dead,
                }
            )
        )
        return 0
    if before.disabled_ms is not None:
        head = (
            f"enabled {url} (disabled since {_second(before.disabled_ms)}: "
            f"{_cell(before.disabled_reason or '410 Gone')})"
        )
    else:
        head = f"{url} was not disabled"
    if dead:
        tail = (
            f"; it has {dead} dead row{'s' if dead != 1 else ''}: "
            f"`overflowd outbox retry --all --url {shlex.quote(url)}` sends them"
        )
    else:
        tail = "; it has no dead rows"
    print(head + tail)
    return 0
