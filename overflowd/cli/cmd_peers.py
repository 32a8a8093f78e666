"""``overflowd-query peers``: each peer's state, as the config names it and the store remembers.

One line (or JSON object) per peer: configured peers in config order, then peers with a row
in the store that the config no longer lists (``removed``) or that were learned. Reads only.

Latency (push round trip, report age at delivery, pull page round trip) is the running node's
memory, not the store's: it is read from that node's ``GET /v1/peers`` (``--api``, default
``http://<api.listen>/``); when no node answers, the latency fields are null.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from dataclasses import dataclass
from typing import Any

from overflowd import report as rpt
from overflowd.cli.common import context, now_ms
from overflowd.peers import PeerSettings

#: The inbox path under a peer's API base, where our pushes wait in the webhook outbox.
INBOX_PATH = "v1/inbox"
#: Latency fields of each peer (seconds, or None: no sample, or no node answered).
LATENCY_FIELDS = tuple(
    f"{k}_{q}" for k in ("push_rtt", "delivery_age", "pull_rtt") for q in ("p50", "max")
)
#: A node that does not answer its own loopback API within this long is not waited for.
LATENCY_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class PeerView:
    """What the command shows of one peer."""

    name: str
    url: str
    key: bytes
    configured: bool
    state: str
    fields: dict[str, Any]


def _state(row: Any, now: int, configured: bool) -> str:
    """``banned``, ``removed``, ``new`` (never answered), ``failing`` (the last exchange
    failed after its last contact) or ``ok``."""
    if row is not None and row.banned_until_ms is not None and row.banned_until_ms > now:
        return "banned"
    if not configured and not (row is not None and row.learned):
        return "removed"
    if row is None or row.last_contact_ms is None:
        return "failing" if row is not None and row.last_error_ms is not None else "new"
    if row.last_error_ms is not None and row.last_error_ms > row.last_contact_ms:
        return "failing"
    return "ok"


def _iso(ms: int | None) -> str | None:
    return None if ms is None else rpt.iso_ms(ms)


def collect(
    configured: tuple[PeerSettings, ...],
    rows: list[Any],
    depth: dict[str, int],
    now: int,
    latency: dict[str, Any] | None = None,
) -> list[PeerView]:
    by_key = {r.key: r for r in rows}
    views: list[PeerView] = []
    seen: set[bytes] = set()
    entries: list[tuple[str, str, bytes, PeerSettings | None]] = [
        (p.name, p.url, p.key, p) for p in configured
    ]
    entries += [
        (r.name, r.url, r.key, None) for r in rows if r.key not in {p.key for p in configured}
    ]
    for name, url, key, peer in entries:
        if key in seen:
            continue
        seen.add(key)
        row = by_key.get(key)
        fields: dict[str, Any] = {
            "name": name,
            "url": url,
            "key": base64.b64encode(key).decode("ascii"),
            "fingerprint": rpt.key_fingerprint(key),
            "state": _state(row, now, peer is not None),
            "configured": peer is not None,
            "learned": bool(row.learned) if row is not None else False,
            "trust": peer.trust if peer is not None else None,
            "push": peer.push if peer is not None else False,
            "pull": peer.pull if peer is not None else False,
            "last_contact": _iso(row.last_contact_ms) if row else None,
            "pull_cursor": row.pull_cursor if row else 0,
            "push_cursor": row.push_cursor if row else 0,
            "reports_in": row.reports_in if row else 0,
            "reports_out": row.reports_out if row else 0,
            "duplicates": row.duplicates if row else 0,
            "outbox": depth.get(url + INBOX_PATH, 0),
            "score": row.score if row else 0.0,
            "banned_until": _iso(row.banned_until_ms) if row else None,
            "ban_count": row.ban_count if row else 0,
            "ban_reason": row.ban_reason if row else None,
            "last_error": row.last_error if row else None,
            "last_error_at": _iso(row.last_error_ms) if row else None,
        }
        lat = (latency or {}).get(name)
        for k in LATENCY_FIELDS:
            v = lat.get(k) if isinstance(lat, dict) else None
            fields[k] = float(v) if isinstance(v, int | float) and v >= 0 else None
        views.append(PeerView(name, url, key, peer is not None, fields["state"], fields))
    return views


def _node_latency(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """The running node's latency per peer name, from its ``GET /v1/peers``; {} when no
    node answers (it is not running, or its API is elsewhere or needs TLS)."""
    url = args.api
    if url is None:
        listen = settings.api.listen
        if not listen or "," in listen or getattr(settings.api, "tls_certificate_file", None):
            return {}
        url = f"http://{listen}/"
    if not url:
        return {}
    from overflowd.cli.common import UsageError
    from overflowd.cli.remote import Remote, RemoteError  # httpx: only when asked
    from overflowd.errors import OverflowdError

    try:
        with Remote(url, timeout_s=LATENCY_TIMEOUT_S) as remote:
            doc = remote.get("peers", {})
    except (RemoteError, UsageError, OverflowdError):
        print(f"latency: no node answered at {url[:80]}", file=sys.stderr)
        return {}
    latency = doc.get("latency")
    return latency if isinstance(latency, dict) else {}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def cmd_peers(args: argparse.Namespace) -> int:
    from overflowd.store import peers as peer_store

    ctx = context(args)
    configured = ctx.settings.peers
    store = ctx.open_store(create=False)
    try:
        rows = peer_store.list_peers(store)
        urls = {p.url + INBOX_PATH for p in configured} | {r.url + INBOX_PATH for r in rows}
        depth = peer_store.outbox_depth(store, urls)
    finally:
        store.close()
    views = collect(configured, rows, depth, now_ms(), _node_latency(args, ctx.settings))
    if args.json:
        for v in views:
            print(json.dumps(v.fields))
        return 0
    header = ("NAME", "STATE", "KEY", "LEARNED", "LAST CONTACT", "CURSOR", "IN", "OUT", "DUP",
              "OUTBOX", "SCORE", "RTT MS", "AGE MS", "BAN")  # fmt: skip
    lines = [header]
    for v in views:
        f = v.fields
        ban = "-"
        if f["banned_until"]:
            ban = f"until {f['banned_until'][:19].replace('T', ' ')}: {f['ban_reason'] or '?'}"
        lines.append(
            (
                f["name"],
                f["state"],
                f["fingerprint"],
                "yes" if f["learned"] else "no",
                (f["last_contact"] or "never")[:19].replace("T", " "),
                f"{f['pull_cursor']}/{f['push_cursor']}",
                str(f["reports_in"]),
                str(f["reports_out"]),
                str(f["duplicates"]),
                str(f["outbox"]),
                f"{f['score']:g}",
                f"{_ms(f['push_rtt_p50'])}/{_ms(f['push_rtt_max'])}",
                _ms(f["delivery_age_p50"]),
                ban,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    for v in views:
        if v.state == "failing" and v.fields["last_error"]:
            print(f"{v.name}: {v.fields['last_error']}", file=sys.stderr)
    print(
        f"{len(views)} peer{'s' if len(views) != 1 else ''} (CURSOR: pull/push; "
        "RTT MS: push round trip p50/max; AGE MS: report age at delivery p50)",
        file=sys.stderr,
    )
    return 0


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Add ``peers`` to overflowd-query's subcommands."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "peers",
        parents=[common],
        help="each peer: state, key, last contact, cursors, counts, outbox, score, ban",
        description="Each peer's state as the config names it and the store remembers it: "
        "key fingerprint, last contact, pull and push cursors, reports in and out, "
        "duplicates, outbox depth, score and ban, and the running node's latency to each "
        "(push round trip, report age at delivery, pull page round trip). Reads only.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per peer per line")
    p.add_argument(
        "--api",
        metavar="URL",
        default=None,
        help="the running node's API to read latency from (default: "
        "http://<api.listen>/; '' for none)",
    )
    p.set_defaults(func=cmd_peers)
