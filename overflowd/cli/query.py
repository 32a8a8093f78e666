"""``overflowd-query``: what abuse desks ask of a node's store, and checking any report."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from overflowd import report as rpt
from overflowd.answers import (
    DEFAULT_TOP_N,
    DEFAULT_V4_LEN,
    FILTER_PARAMS,
    MAX_TOP_N,
    PROTOCOLS,
    TRUST_LEVELS,
    V6_EXTRA_BITS,
    WHO_TOP_SOURCES,
    count_line,
    make_filter,
    prefix_lengths,
    report_json,
    top_json,
    who_json,
)
from overflowd.cli import cmd_contact, cmd_outbox, cmd_peers, render
from overflowd.cli.common import (
    Context,
    Parser,
    UsageError,
    common_options,
    context,
    int_flag,
    now_ms,
    parse_since,
    run_main,
)
from overflowd.errors import ConfigError, OverflowdError
from overflowd.estimate import GROUP_BY

if TYPE_CHECKING:
    from overflowd.cli.remote import Remote
    from overflowd.registry import RegistrySettings
    from overflowd.store.query import ReportFilter, WhoRow
    from overflowd.store.repository import Store

PROG = "overflowd-query"
#: --limit's ceiling: every row is decoded and printed, so a million is minutes of output;
#: more is a typo (1e23), and SQLite refuses a LIMIT beyond 2^63-1 anyway.
MAX_LIMIT = 1_000_000
#: --follow asks the store (or the node) for new reports this often by default, and
#: --poll-interval is bounded: under 0.1 s is a busy loop on the database, over a minute is not
#: following.
FOLLOW_POLL_S = 1.0
MIN_POLL_S, MAX_POLL_S = 0.1, 60.0
#: Reports per page when following or paging a node's API (its MAX_PAGE).
PAGE = 1000
FORMATS = ("table", "json", "csv", "xarf", "stix")


def _poll_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not MIN_POLL_S <= value <= MAX_POLL_S:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not a number of seconds in {MIN_POLL_S:g}-{MAX_POLL_S:g}"
        )
    return value


def _output_format(args: argparse.Namespace, allowed: Sequence[str]) -> str:
    chosen = [f for f, on in (("json", args.json), ("csv", args.csv)) if on]
    if args.format is not None:
        chosen.append(args.format)
    if len(set(chosen)) > 1:
        raise UsageError(f"--json, --csv and --format ask for different outputs: {chosen}")
    fmt = chosen[0] if chosen else "table"
    if fmt not in allowed:
        raise UsageError(f"--format {fmt}: this command prints {', '.join(allowed)}")
    return fmt


def _filter_text(args: argparse.Namespace) -> dict[str, str | None]:
    return {name: getattr(args, name, None) for name in FILTER_PARAMS}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _local_filter(args: argparse.Namespace, store: Store) -> ReportFilter:
    from overflowd.store.query import resolve_observer

    try:
        return make_filter(
            _filter_text(args),
            now_ms=now_ms(),
            observers=lambda text: resolve_observer(store, text),
            flag=_flag,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_filter_syntax(args: argparse.Namespace) -> None:
    """Refuse a bad value before any store or node is asked (the observer is resolved there)."""
    try:
        make_filter(_filter_text(args), now_ms=now_ms(), observers=lambda t: (), flag=_flag)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _remote_params(args: argparse.Namespace) -> dict[str, str | int | None]:
    return dict(_filter_text(args))


def cmd_reports(args: argparse.Namespace) -> int:
    fmt = _output_format(args, FORMATS)
    _check_filter_syntax(args)
    if args.follow and fmt in ("xarf", "stix"):
        raise UsageError(f"--follow prints reports one by one: not as one {fmt} document")
    if fmt != "xarf" and (args.reporter_contact or args.reporter_name):
        raise UsageError("--reporter-contact and --reporter-name are for --format xarf")
    if fmt == "xarf":
        from overflowd.formats import FormatError, xarf_reports

        try:  # the reporter is checked before any report is read
            xarf_reports([], reporter_contact=args.reporter_contact,
                         reporter_name=args.reporter_name)
        except FormatError as exc:
            raise UsageError(f"--reporter-contact/--reporter-name: {exc}") from None
    if args.remote:
        from overflowd.cli.remote import Remote  # httpx: a third of a second, only for this

        with Remote(args.remote) as remote:
            objects, total, cursor = _remote_reports(remote, args)
            _print_reports(objects, total, fmt, args)
            if args.follow:
                seen = {o["report"]["id"] for o in objects}
                return _follow(lambda after: _remote_page(remote, args, after), cursor, seen,
                               fmt, args.poll_interval)
        return 0
    ctx = context(args)
    if not args.follow and _fast_reports(ctx, args, fmt):
        return 0
    store = ctx.open_store(create=False)
    try:
        flt = _local_filter(args, store)
        from overflowd.store.query import count_reports, find_reports, page_reports

        cursor = store.last_seq()  # before the answer: --follow goes on from here
        rows = find_reports(store, flt, limit=args.limit)
        total = count_reports(store, flt) if args.limit is not None else len(rows)
        objects = [report_json(r) for r in rows]
        _print_reports(objects, max(total, len(objects)), fmt, args)
        if args.follow:
            seen = {o["report"]["id"] for o in objects}

            def page(after: int) -> tuple[list[dict[str, Any]], int]:
                got, nxt = page_reports(store, flt, after=after, limit=PAGE)
                return [report_json(r) for r in got], nxt

            return _follow(page, cursor, seen, fmt, args.poll_interval)
    finally:
        store.close()
    return 0


def _fast_reports(ctx: Context, args: argparse.Namespace, fmt: str) -> bool:
    """The answer from a SQLite store through stdlib sqlite3 (overflowd.store.fastread: the
    same statements, no SQLAlchemy to import); False where the Store must answer instead (not
    a plain SQLite file at the current schema, or a database error: said the Store's way)."""
    import sqlite3

    from overflowd.store.fastread import Reader

    try:
        reader = Reader.open(ctx.store_url())
        if reader is None:
            return False
        with reader:
            try:
                flt = make_filter(
                    _filter_text(args),
                    now_ms=now_ms(),
                    observers=reader.resolve_observer,
                    flag=_flag,
                )
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            objects = reader.find_reports(flt, limit=args.limit)
            total = reader.count_reports(flt) if args.limit is not None else len(objects)
    except sqlite3.Error:
        return False
    _print_reports(objects, max(total, len(objects)), fmt, args)
    return True


def _order_key(obj: dict[str, Any]) -> tuple[int, int]:
    """find_reports' order: the newest flow first (last seen), then the newest stored."""
    return (-int(obj["report"]["flow"]["last_ms"]), -int(obj["seq"]))


#: A node's facts about a report that are not signed, as this node writes them: a time
#: (rpt.iso_ms), how it arrived, a trust word. Anything else is not printed.
_RECEIVED = re.compile(r"\d[0-9T:.Z-]{0,31}")
_VIA = re.compile(r"[a-z][a-z0-9:-]{0,31}")


#: the largest hop count a store holds (a 32-bit column); a remote answering more is not a node
MAX_HOPS_SHOWN = 2**31 - 1

def _int(value: Any, what: str, remote: Remote) -> int:
    from overflowd.cli.remote import RemoteError

    if type(value) is not int or value < 0:
        raise RemoteError(f"{remote.base}/reports: the answer's {what} is not a count")
    return value


def _verified(rows: Any, remote: Remote, after: int | None, nxt: int) -> list[dict[str, Any]]:
    """A node's report objects rebuilt from their observers' COSE bytes, signatures checked:
    the table, CSV and JSON print what the observer signed, never the node's rendering of it
    (a node can claim any src). In cursor order (``after`` given), each seq in (after, nxt]."""
    from overflowd.cli.remote import RemoteError
    from overflowd.identity import verify_report  # PyNaCl (cffi): only where a check is made

    if not isinstance(rows, list):
        raise RemoteError(f"{remote.base}/reports: the answer has no list of reports")
    out = []
    for obj in rows:
        try:
            seq, received, via, trust = obj["seq"], obj["received"], obj["via"], obj["trust"]
            hops = obj.get("hops", 0)  # a node from before hops were served: none counted
            cose = obj["report"]["cose"]
            if not (
                type(seq) is int and isinstance(cose, str) and isinstance(received, str)
                and _RECEIVED.fullmatch(received) and isinstance(via, str)
                and _VIA.fullmatch(via) and (trust is None or trust in TRUST_LEVELS)
                and type(hops) is int and 0 <= hops <= MAX_HOPS_SHOWN
            ):  # fmt: skip
                raise TypeError("a field of the wrong type")
            if after is not None and not after < seq <= nxt:
                raise ValueError(f"seq {seq} is not after {after} up to next {nxt}")
            signed = verify_report(rpt.b64url_decode(cose))
        except (KeyError, TypeError, ValueError, OverflowdError) as exc:
            raise RemoteError(
                f"{remote.base}/reports: a report that does not check out: {str(exc)[:120]}"
            ) from None
        out.append(
            {"seq": seq, "received": received, "via": via, "trust": trust, "hops": hops,
             "report": rpt.to_json(signed)}
        )  # fmt: skip
    return out


def _remote_reports(
    remote: Remote, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], int, int]:
    """The same answer as a local store gives: a node's newest flows (one request when the
    limit fits a page), else every match paged by cursor and ordered here."""
    params = _remote_params(args)
    if args.limit is not None and args.limit <= PAGE:
        doc = remote.get("reports", {**params, "order": "flow", "limit": args.limit})
        nxt = _int(doc.get("next"), "next", remote)
        rows = _verified(doc.get("reports"), remote, None, nxt)
        return rows, _int(doc.get("total"), "total", remote), nxt
    from overflowd.cli.remote import RemoteError

    got: list[dict[str, Any]] = []
    after = 0
    while True:
        page, after = _remote_page(remote, args, after)
        got.extend(page)
        if len(page) < PAGE:
            break
        if len(got) > MAX_LIMIT:  # what --limit allows: a node's endless pages are not held
            raise RemoteError(f"{remote.base}/reports: more than {MAX_LIMIT} reports; "
                              "ask with --limit or narrower filters")
    got.sort(key=_order_key)
    total = len(got)
    return (got if args.limit is None else got[: args.limit]), total, after


def _remote_page(
    remote: Remote, args: argparse.Namespace, after: int
) -> tuple[list[dict[str, Any]], int]:
    from overflowd.cli.remote import RemoteError

    doc = remote.get("reports", {**_remote_params(args), "after": after, "limit": PAGE})
    nxt = _int(doc.get("next"), "next", remote)
    rows = _verified(doc.get("reports"), remote, after, nxt)
    # a cursor that does not move under a full page repeats that page forever (a busy loop
    # in --follow, memory without end in 'reports')
    if nxt < after or (rows and nxt == after):
        raise RemoteError(f"{remote.base}/reports: next {nxt} does not advance from {after}")
    return rows, nxt


def _print_reports(
    objects: list[dict[str, Any]], total: int, fmt: str, args: argparse.Namespace
) -> None:
    if fmt == "json":
        render.json_lines(objects)
    elif fmt == "csv":
        render.reports_csv(objects)
    elif fmt in ("xarf", "stix"):
        _print_document(objects, fmt, args)
    else:
        render.reports_table(objects)
    print(count_line(len(objects), total, "report"), file=sys.stderr)


def _print_document(objects: list[dict[str, Any]], fmt: str, args: argparse.Namespace) -> None:
    """XARF (one document per line: each goes to its source's abuse desk) or one STIX bundle.

    Each report is rebuilt from its own COSE bytes and its signature checked here, so a
    document made from a node's answer (--remote) carries only what the observers signed.
    """
    from overflowd.formats import FormatError, stix_bundle, xarf_reports
    from overflowd.identity import verify_report

    signed = []
    for obj in objects:
        try:
            signed.append(verify_report(rpt.b64url_decode(obj["report"]["cose"])))
        except (OverflowdError, ValueError) as exc:
            raise OverflowdError(f"report {str(obj['report'].get('id'))[:64]}: {exc}") from None
    try:
        if fmt == "stix":
            print(json.dumps(stix_bundle(signed)))
            return
        docs = xarf_reports(
            signed,
            reporter_contact=args.reporter_contact,
            reporter_name=args.reporter_name,
            skip_unfit=True,
        )
    except FormatError as exc:
        raise OverflowdError(f"--format {fmt}: {exc}") from None
    render.json_lines(docs)
    left_out = len({s.report_id for s in signed}) - sum(len(d["evidence"]) for d in docs)
    if left_out:
        print(f"{left_out} reports left out: XARF cannot express them (protocol or source "
              "port 0; see docs/formats.md)", file=sys.stderr)


def _follow(
    page: Callable[[int], tuple[list[dict[str, Any]], int]],
    cursor: int,
    seen: set[str],
    fmt: str,
    interval_s: float,
) -> int:
    """Print reports as they are stored, by the store's sequence cursor: none is skipped or
    repeated (``page_reports``' rule), whatever arrives meanwhile. Ctrl-C ends it (exit 0)."""
    try:
        while True:
            rows, cursor = page(cursor)
            new = [o for o in rows if o["report"]["id"] not in seen]
            seen.difference_update(o["report"]["id"] for o in rows)  # only the first page
            if new:
                if fmt == "json":
                    render.json_lines(new)
                elif fmt == "csv":
                    render.reports_csv_rows(new)
                else:
                    for obj in new:
                        print(render.report_line(obj), flush=True)
            if len(rows) < PAGE:
                time.sleep(interval_s)
    except KeyboardInterrupt:
        return 0


@contextlib.contextmanager
def _shape(args: argparse.Namespace, what: str) -> Iterator[None]:
    """A --remote answer (who, top: a node's sums, nothing signed to check) that lacks a field
    or has one of the wrong type is the node's fault: one line naming it, exit 1."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        if not args.remote:
            raise
        from overflowd.cli.remote import RemoteError, base_url

        raise RemoteError(
            f"{base_url(args.remote)}/{what}: the answer has the wrong shape "
            f"({type(exc).__name__}: {str(exc)[:80]})"
        ) from None


def cmd_who(args: argparse.Namespace) -> int:
    fmt = _output_format(args, ("table", "json", "csv"))
    _check_filter_syntax(args)
    v4_len, v6_len = prefix_lengths(args.prefix_len)
    if args.remote:
        from overflowd.cli.remote import Remote  # httpx: a third of a second, only for this

        with Remote(args.remote) as remote:
            doc = remote.get("who", {**_remote_params(args), "prefix_len": args.prefix_len,
                                     "dns": "false" if args.no_dns else None})
        with _shape(args, "who"):
            objects = list(doc["observers"])
            reports = int(doc["reports"])
    else:
        from overflowd.store.query import who

        ctx = context(args)
        store = ctx.open_store(create=False)
        try:
            rows = who(store, _local_filter(args, store), top_sources=WHO_TOP_SOURCES,
                       v4_len=v4_len, v6_len=v6_len)
            objects = _with_registry(ctx.settings.registry, store, rows, args.no_dns)
        finally:
            store.close()
        reports = sum(r.reports for r in rows)
    with _shape(args, "who"):
        if fmt == "json":
            render.json_lines(objects)
        elif fmt == "csv":
            render.who_csv(objects)
        else:
            render.who_table(objects)
    print(f"{count_line(len(objects), len(objects), 'observer')}, "
          f"{count_line(reports, reports, 'report')}", file=sys.stderr)
    return 0


def _with_registry(
    settings: RegistrySettings, store: Store, rows: Sequence[WhoRow], no_dns: bool
) -> list[dict[str, Any]]:
    """The rows as JSON, with the contacts DNS gives for their networks when DNS is configured
    (the same lookups as the API's /v1/who: services/who_dns.py)."""
    from overflowd.services.who_dns import dns_configured

    if no_dns or not dns_configured(settings):
        return [who_json(r) for r in rows]
    import trio  # with dnspython, a quarter second: only when DNS is asked

    from overflowd.services.who_dns import registry_contacts, wanted, who_objects, who_registry

    registry = who_registry(settings, None)
    if registry is None:
        return [who_json(r) for r in rows]
    want = wanted(store, rows)
    found = trio.run(registry_contacts, registry, want)
    return who_objects(rows, found)


def cmd_top(args: argparse.Namespace) -> int:
    fmt = _output_format(args, ("table", "json", "csv"))
    _check_filter_syntax(args)
    measure: Literal["packets", "bytes"] = "bytes" if args.bytes else "packets"
    if args.remote:
        from overflowd.cli.remote import Remote  # httpx: a third of a second, only for this

        with Remote(args.remote) as remote:
            doc = remote.get("top", {**_remote_params(args), "by": args.by, "n": args.n,
                                     "prefix_len": args.prefix_len, "measure": measure})
        with _shape(args, "top"):
            objects, groups = list(doc["rows"]), int(doc["groups"])
    else:
        from overflowd.store.query import top

        v4_len, v6_len = prefix_lengths(args.prefix_len)
        store = context(args).open_store(create=False)
        try:
            result = top(store, _local_filter(args, store), by=args.by, n=args.n,
                         v4_len=v4_len, v6_len=v6_len, measure=measure)
        finally:
            store.close()
        objects, groups = top_json(result, by=args.by), result.groups
    with _shape(args, "top"):
        if fmt == "json":
            render.json_lines(objects)
        elif fmt == "csv":
            render.top_csv(objects)
        else:
            render.top_table(objects)
        shown = sum(1 for o in objects if o["rank"] is not None)
    print(count_line(shown, groups, "group") + f" by {args.by}, ranked by {measure}",
          file=sys.stderr)
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    from overflowd.store.events import list_events

    ctx = context(args)
    since_ms = parse_since(args.since) if args.since else None
    store = ctx.open_store(create=False)
    try:
        events = list_events(store, since_ms=since_ms, limit=args.limit)
    finally:
        store.close()
    if args.json:
        for e in events:
            out = {
                "at": rpt.iso_ms(e.at_ms),
                "kind": e.kind,
                "key": base64.b64encode(e.key).decode("ascii"),
                "fingerprint": rpt.key_fingerprint(e.key),
                "pinned": e.pinned,
                "old_contacts": list(e.old_contacts),
                "new_contacts": list(e.new_contacts),
                "sender": e.sender,
                "detail": e.detail,
            }
            print(json.dumps(out))
        return 0
    lines = [("AT", "KIND", "KEY", "PINNED", "SENDER", "CONTACTS", "DETAIL")]
    for e in events:
        lines.append(
            (
                rpt.iso_ms(e.at_ms)[:19].replace("T", " "),
                e.kind,
                rpt.key_fingerprint(e.key),
                "yes" if e.pinned else "no",
                e.sender or "-",
                f"{','.join(e.old_contacts) or '-'} -> {','.join(e.new_contacts) or '-'}",
                e.detail or "",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    print(f"{len(events)} event{'s' if len(events) != 1 else ''}", file=sys.stderr)
    return 0


#: verify reads at most this much: a JSON line of the largest report (base64url, with its
#: rendering beside it) is a few kB; more is not one report.
MAX_VERIFY_INPUT_BYTES = 64 * 1024


def read_report_input(source: str) -> bytes:
    """Raw COSE bytes, base64url text of them (webhooks), or one JSON line with a ``cose``
    field (what ``overflowd-receive`` writes) or a ``report.cose`` (``overflowd-query reports
    --json`` and the API)."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_VERIFY_INPUT_BYTES + 1)
        else:
            with open(source, "rb") as f:
                data = f.read(MAX_VERIFY_INPUT_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    if len(data) > MAX_VERIFY_INPUT_BYTES:
        raise ConfigError(f"{source}: more than {MAX_VERIFY_INPUT_BYTES} bytes, not one report")
    if data[:1] == b"\xd2":  # CBOR tag 18: a raw COSE_Sign1
        return data
    if data.lstrip()[:1] == b"{":
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError):
            raise ConfigError(f"{source}: not one JSON object (one report per input)") from None
        if isinstance(doc, dict) and isinstance(doc.get("report"), dict):
            doc = doc["report"]  # a line of `reports --json` or of the API
        cose = doc.get("cose") if isinstance(doc, dict) else None
        if not isinstance(cose, str):
            raise ConfigError(f"{source}: JSON without a 'cose' field (base64url of the report)")
        data = cose.encode("ascii", "replace")
    try:
        return rpt.b64url_decode(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return data  # let the report parser say what is wrong with it


def cmd_verify(args: argparse.Namespace) -> int:
    from overflowd.identity import verify_report

    data = read_report_input(args.file)
    try:
        signed = verify_report(data)
    except OverflowdError as exc:
        print(f"{PROG}: invalid report: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(rpt.to_json(signed), indent=2))
    return 0


def _filter_options() -> Parser:
    p = Parser(add_help=False)
    g = p.add_argument_group("filters (all must match; times are the flow's own)")
    when = "15m, 1h, 2d, 1w ago, 'now', or an RFC 3339 time"
    g.add_argument("--since", metavar="WHEN", help=f"flow last seen at or after WHEN ({when})")
    g.add_argument("--until", metavar="WHEN", help="flow first seen at or before WHEN")
    g.add_argument("--received-since", metavar="WHEN", help="stored here at or after WHEN")
    g.add_argument("--received-until", metavar="WHEN", help="stored here at or before WHEN")
    g.add_argument("--src", metavar="ADDR|PREFIX", help="source in it")
    g.add_argument("--dst", metavar="ADDR|PREFIX", help="destination in it")
    g.add_argument("--prefix", metavar="ADDR|PREFIX", help="source or destination in it")
    g.add_argument("--proto", metavar="P", help=f"{'|'.join(PROTOCOLS)} or a number")
    g.add_argument("--port", metavar="N", help="source or destination port")
    g.add_argument("--sport", metavar="N", help="source port")
    g.add_argument("--dport", metavar="N", help="destination port")
    g.add_argument("--kind", metavar="K", help="report kind (flow-seen, ...)")
    g.add_argument("--observer", metavar="KEY|FINGERPRINT",
                   help="reports of this observer (base64 key, or a fingerprint prefix)")
    g.add_argument("--min-trust", metavar="LEVEL",
                   help=f"observer trust at least LEVEL ({' < '.join(TRUST_LEVELS)}); "
                   "this node's own reports always pass")
    g.add_argument("--remote", metavar="URL",
                   help="ask this node's API (http://host:port/) instead of the local store")
    return p


def _output_options() -> Parser:
    p = Parser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true",
                   help="one JSON object per line (the API's objects)")
    g.add_argument("--csv", action="store_true", help="CSV with a header line")
    g.add_argument("--format", choices=FORMATS, default=None,
                   help="table (default), json, csv; xarf or stix (reports only)")
    return p


def _prefix_len_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-len", type=int_flag("--prefix-len", 0, 32), metavar="N",
                   default=None,
                   help=f"group addresses by /N for IPv4 (default {DEFAULT_V4_LEN}) and "
                   f"/N+{V6_EXTRA_BITS} for IPv6")


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = Parser(
        prog=PROG, description="Query a node's reports; verify any report.", parents=[common]
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    filters = _filter_options()
    output = _output_options()
    p = sub.add_parser("reports", parents=[common, filters, output],
                       help="stored reports, newest flow first",
                       description="Stored reports that match every filter given, the newest "
                       "flow first. Times are the flow's (first and last seen), not arrival.")
    p.add_argument("--limit", type=int_flag("--limit", 1, MAX_LIMIT), metavar="N",
                   help=f"at most N (1-{MAX_LIMIT}); the footer says 'N of M reports'")
    p.add_argument("--follow", action="store_true",
                   help="then print new reports as they are stored, until Ctrl-C")
    p.add_argument("--poll-interval", type=_poll_interval, default=FOLLOW_POLL_S, metavar="S",
                   help=f"--follow asks for new reports every S seconds (default "
                   f"{FOLLOW_POLL_S:g}, {MIN_POLL_S:g}-{MAX_POLL_S:g})")
    p.add_argument("--reporter-contact", metavar="EMAIL",
                   help="--format xarf: who files the reports (default: each observer)")
    p.add_argument("--reporter-name", metavar="NAME", help="--format xarf: the reporter's org")
    p.set_defaults(func=cmd_reports)
    p = sub.add_parser("who", parents=[common, filters, output],
                       help="whom to call: the observers behind traffic, by estimated size",
                       description="Per observer of the matching reports: trust, contacts, "
                       "reports, estimated packets and bytes (Horvitz-Thompson, 95%% interval), "
                       "first and last seen, top source prefixes; with DNS configured, the "
                       "contacts the networks its reports came from publish. Largest first.")
    _prefix_len_option(p)
    p.add_argument("--no-dns", action="store_true",
                   help="do not look up the contacts the observers' networks publish in DNS "
                   "(asked only with [registry] nameservers or abuse_zones)")
    p.set_defaults(func=cmd_who)
    p = sub.add_parser("top", parents=[common, filters, output],
                       help="top N by estimated packets or bytes, the rest as 'other'")
    p.add_argument("--by", required=True, choices=GROUP_BY, help="what to group by")
    p.add_argument("-n", type=int_flag("-n", 1, MAX_TOP_N), default=DEFAULT_TOP_N, metavar="N",
                   help=f"rows before 'other' (default {DEFAULT_TOP_N}, at most {MAX_TOP_N})")
    p.add_argument("--bytes", action="store_true", help="rank by bytes, not packets")
    _prefix_len_option(p)
    p.set_defaults(func=cmd_top)
    p = sub.add_parser(
        "events", parents=[common], help="new keys for known observers, changed contacts"
    )
    p.add_argument("--since", metavar="WHEN", help="15m, 1h, 2d, or an ISO 8601 time")
    p.add_argument("--limit", type=int_flag("--limit", 1, MAX_LIMIT), metavar="N",
                   help=f"at most N, 1-{MAX_LIMIT}")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_events)
    p = sub.add_parser(
        "verify",
        parents=[common],
        help="verify a report (raw COSE, base64url, or a JSON line with 'cose')",
    )
    p.add_argument("file", metavar="FILE|-")
    p.set_defaults(func=cmd_verify)
    cmd_contact.register(sub, common)
    cmd_outbox.register_query(sub, common)
    cmd_peers.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
