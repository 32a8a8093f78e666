"""``overflowd-query``: what abuse desks ask of a node's store, and checking any report."""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import sys
from collections.abc import Sequence

from overflowd import report as rpt
from overflowd.cli import cmd_contact, cmd_outbox, cmd_peers
from overflowd.cli.common import Parser, common_options, context, int_flag, parse_since, run_main
from overflowd.errors import ConfigError, OverflowdError
from overflowd.identity import verify_report

PROG = "overflowd-query"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 47: "gre", 50: "esp"}
#: --limit's ceiling: every row is verified and printed, so a million is minutes of output;
#: more is a typo (1e23), and SQLite refuses a LIMIT beyond 2^63-1 anyway.
MAX_LIMIT = 1_000_000


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address or prefix") from None


def cmd_reports(args: argparse.Namespace) -> int:
    ctx = context(args)
    since_ms = parse_since(args.since) if args.since else None
    store = ctx.open_store(create=False)
    try:
        rows = store.query_reports(src=args.src, dst=args.dst, since_ms=since_ms, limit=args.limit)
    finally:
        store.close()
    if args.json:
        for row in rows:
            signed = verify_report(row.cose)
            out = rpt.to_json(signed)
            out["received"] = rpt.iso_ms(row.received_ms)
            out["via"] = row.via
            out["trust"] = row.trust
            print(json.dumps(out, sort_keys=False))
        return 0
    _print_table(rows)
    return 0


def _print_table(rows: Sequence[object]) -> None:
    header = (
        "RECEIVED",
        "SRC",
        "SPORT",
        "DST",
        "DPORT",
        "PROTO",
        "PACKETS",
        "BYTES",
        "P",
        "OBSERVER",
        "TRUST",
        "ID",
    )
    lines = [header]
    for row in rows:
        signed = verify_report(row.cose)  # type: ignore[attr-defined]
        fl = signed.payload.flow
        lines.append(
            (
                rpt.iso_ms(row.received_ms)[:19].replace("T", " "),  # type: ignore[attr-defined]
                str(fl.src),
                str(fl.sport),
                str(fl.dst),
                str(fl.dport),
                PROTO_NAMES.get(fl.proto, str(fl.proto)),
                str(fl.packets),
                str(fl.bytes),
                f"{signed.payload.sampling.probability:.3g}",
                rpt.key_fingerprint(signed.observer_key),
                row.trust or "-",  # type: ignore[attr-defined]
                signed.report_id[:12],
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    print(f"{len(rows)} report{'s' if len(rows) != 1 else ''}", file=sys.stderr)


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
    field (what ``overflowd-query reports --json`` and ``overflowd-receive`` write)."""
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
        cose = doc.get("cose") if isinstance(doc, dict) else None
        if not isinstance(cose, str):
            raise ConfigError(f"{source}: JSON without a 'cose' field (base64url of the report)")
        data = cose.encode("ascii", "replace")
    try:
        return rpt.b64url_decode(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return data  # let the report parser say what is wrong with it


def cmd_verify(args: argparse.Namespace) -> int:
    data = read_report_input(args.file)
    try:
        signed = verify_report(data)
    except OverflowdError as exc:
        print(f"{PROG}: invalid report: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(rpt.to_json(signed), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = Parser(
        prog=PROG, description="Query a node's reports; verify any report.", parents=[common]
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    p = sub.add_parser("reports", parents=[common], help="list stored reports")
    p.add_argument("--dst", type=_network, metavar="ADDR|PREFIX")
    p.add_argument("--src", type=_network, metavar="ADDR|PREFIX")
    p.add_argument("--since", metavar="WHEN", help="15m, 1h, 2d, or an ISO 8601 time")
    p.add_argument("--limit", type=int_flag("--limit", 1, MAX_LIMIT), metavar="N",
                   help=f"at most N, 1-{MAX_LIMIT}")
    p.add_argument("--json", action="store_true", help="one JSON object per line, with 'cose'")
    p.set_defaults(func=cmd_reports)
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
