"""``overflowd-query contact ADDR|NAME``: who to talk to about an address or a domain, and why.

Prints the keys published in DNS (the ``_overflowd`` record found by the walk-up from the
address's longest reverse-zone prefix, or at the domain), the contacts, webhook URL and boost
asked, the abuse-zone contacts, and for each key its trust level and where every piece came
from: the DNS name that answered, the abuse zone, the operator's pins, or the reports we hold
from that key (in band). The store is read only if it already exists; nothing is written.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from overflowd.cli.common import Context, Parser, UsageError, common_options, context, run_main
from overflowd.errors import ConfigError, DiscoveryError
from overflowd.registry import RegistrySettings
from overflowd.report import iso_ms, key_fingerprint

if TYPE_CHECKING:  # the DNS service pulls in trio and dnspython: only `contact` needs them
    from overflowd.services.dns import Discovery
    from overflowd.trust import TrustBook

PROG = "overflowd-query"


def register(
    subparsers: Any,
    common_parent: argparse.ArgumentParser,
) -> None:
    """Add ``contact`` to overflowd-query's subcommands."""
    p = subparsers.add_parser(
        "contact",
        parents=[common_parent],
        help="keys, contacts, webhook and trust for an address or domain (DNS + in band)",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("target", metavar="ADDR|NAME", help="an IPv4/IPv6 address or a domain name")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.add_argument(
        "--resolver",
        action="append",
        metavar="ADDR:PORT",
        help="ask this DNS resolver instead of registry.nameservers (repeatable)",
    )
    p.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="per question (registry.timeout_s)"
    )
    p.add_argument(
        "--abuse-zone",
        action="append",
        metavar="ZONE",
        help="abuse-contacts zone to ask, instead of registry.abuse_zones (repeatable)",
    )
    p.set_defaults(func=cmd_contact)


def registry_settings(ctx: Context, args: argparse.Namespace) -> RegistrySettings:
    """``[registry]`` from the config (defaults until it is wired in), flags on top."""
    settings = getattr(ctx.settings, "registry", None)
    if not isinstance(settings, RegistrySettings):
        settings = RegistrySettings()
    changes: dict[str, Any] = {}
    flags: tuple[tuple[str, str, Any], ...] = (
        ("--resolver", "nameservers", tuple(args.resolver or ())),
        ("--timeout", "timeout_s", args.timeout),
        ("--abuse-zone", "abuse_zones", tuple(args.abuse_zone or ())),
    )
    for flag, key, value in flags:
        if value is None or value == ():
            continue
        try:  # one flag at a time, so that the error names it
            one: dict[str, Any] = {key: value}
            dataclasses.replace(settings, **one)
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
        changes[key] = value
    try:
        return dataclasses.replace(settings, **changes) if changes else settings
    except ValueError as exc:
        raise ConfigError(f"{PROG} contact: {exc}") from None


def _in_band_book(ctx: Context, settings: RegistrySettings) -> tuple[TrustBook, bool]:
    from overflowd.trust import KeyHistory, TrustBook

    """The trust book with pins and the history of every observer in the store, if any."""
    book = TrustBook(settings.pinned_keys(), settings.continuity_policy())
    url = ctx.store_url()
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return book, False  # no store yet: never create one just to read it
    store = ctx.open_store(create=False)
    try:
        rows = store.observers()
    finally:
        store.close()
    for row in rows:
        # The store does not yet keep the networks a key was seen from, so continuity from
        # the store alone cannot be established here (see docs/registry.md).
        book.load(
            KeyHistory(
                key=row.key,
                contacts=tuple(row.contacts),
                first_seen_ms=row.first_seen_ms,
                last_seen_ms=row.last_seen_ms,
                contacts_since_ms=row.first_seen_ms,
                reports=row.reports,
            )
        )
    return book, True


def describe(discovery: Discovery, book: TrustBook, now_ms: int, target: str) -> dict[str, Any]:
    """The JSON document ``contact --json`` prints (and the text output is rendered from)."""
    keys: list[bytes] = list(discovery.keys)
    for pin in book.pinned():
        if (
            pin.label
            and pin.label.lower().rstrip(".") == target.lower().rstrip(".")
            and (pin.key not in keys)
        ):
            keys.append(pin.key)
    out_keys = []
    contacts: list[dict[str, str]] = []
    seen_contacts: set[str] = set()

    def add_contact(uri: str, source: str) -> None:
        if uri not in seen_contacts:
            seen_contacts.add(uri)
            contacts.append({"uri": uri, "source": source})

    for found in discovery.records:
        for uri in found.record.contacts:
            add_contact(uri, f"dns: {found.name}")
    for key in keys:
        trust = book.assess(key, dns=discovery.records, now_ms=now_ms)
        sources = [f"dns: {f.name}" for f in discovery.records if f.record.public_key == key]
        sources += [
            f"pinned{': ' + p.label if p.label else ''}" for p in book.pinned() if p.key == key
        ]
        history = book.history(key)
        in_band = None
        if history is not None:
            sources.append("in-band")
            in_band = {
                "reports": history.reports,
                "first_seen": iso_ms(history.first_seen_ms),
                "last_seen": iso_ms(history.last_seen_ms),
                "contacts": list(history.contacts),
            }
            for uri in history.contacts:
                add_contact(uri, f"in-band: {key_fingerprint(key)}")
        out_keys.append(
            {
                "key": base64.b64encode(key).decode("ascii"),
                "fingerprint": key_fingerprint(key),
                "trust": str(trust.level),
                "trust_source": trust.source,
                "sources": sources,
                "in_band": in_band,
            }
        )
    for item in discovery.abuse:
        for uri in item.contacts:
            add_contact(uri, f"abuse-zone: {item.name}")
    webhook = next(
        (
            {"url": f.record.webhook_url, "source": f"dns: {f.name}"}
            for f in discovery.records
            if f.record.webhook_url
        ),
        None,
    )
    boost = next(
        (
            {"value": f.record.boost, "source": f"dns: {f.name}"}
            for f in discovery.records
            if f.record.boost
        ),
        None,
    )
    return {
        "query": discovery.query,
        "keys": out_keys,
        "revoked_at": sorted({f.name for f in discovery.records if f.record.public_key is None}),
        "contacts": contacts,
        "webhook_url": webhook,
        "boost": boost,
        "errors": list(discovery.errors),
    }


def render_text(doc: dict[str, Any]) -> str:
    lines = [f"{doc['query']}"]
    if not doc["keys"]:
        lines.append("  keys: none published" + (" (lookup failed)" if doc["errors"] else ""))
    for k in doc["keys"]:
        lines.append(f"  key {k['fingerprint']}  trust {k['trust']} ({k['trust_source']})")
        lines.append(f"      {k['key']}")
        lines.append(f"      from {', '.join(k['sources'])}")
    for name in doc["revoked_at"]:
        lines.append(f"  revoked (empty p=) at {name}")
    for c in doc["contacts"]:
        lines.append(f"  contact {c['uri']}  ({c['source']})")
    if doc["webhook_url"]:
        lines.append(f"  webhook {doc['webhook_url']['url']}  ({doc['webhook_url']['source']})")
    if doc["boost"]:
        lines.append(f"  boost asked {doc['boost']['value']:g}  ({doc['boost']['source']})")
    return "\n".join(lines)


def cmd_contact(args: argparse.Namespace) -> int:
    import trio

    from overflowd.services.dns import DnsRegistry
    ctx = context(args)
    settings = registry_settings(ctx, args)
    target = args.target.strip()
    book, _have_store = _in_band_book(ctx, settings)
    registry = DnsRegistry(settings)

    async def lookup() -> Discovery:
        return await registry.discover(target, abuse=True)

    try:
        discovery = trio.run(lookup)
    except ValueError:
        raise ConfigError(f"'{target}' is neither an IP address nor a domain name") from None
    doc = describe(discovery, book, int(time.time() * 1000), target)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(render_text(doc))
    for error in discovery.errors:
        print(f"{PROG}: warning: {error}", file=sys.stderr)
    if discovery.errors and not doc["keys"] and not doc["contacts"]:
        raise DiscoveryError(f"nothing found for {target}: {discovery.errors[0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A parser with only ``contact``, so it runs before overflowd-query registers it."""
    common = common_options()
    parser = Parser(prog=PROG, parents=[common])
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
