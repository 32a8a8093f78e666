"""``overflowd``: the node's own command (identity, keys, reports, decoding, the daemon)."""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import os
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from overflowd import __version__
from overflowd import report as rpt
from overflowd.cli import (
    cmd_config,
    cmd_decode,
    cmd_demo,
    cmd_outbox,
    cmd_replay,
    cmd_run,
    cmd_webhook_secret,
)
from overflowd.cli.common import (
    Context,
    Parser,
    UsageError,
    common_options,
    context,
    int_flag,
    now_ms,
    run_main,
)
from overflowd.config import CONFIG_FILE, DEFAULT_CONFIG_TEXT, parse_settings
from overflowd.errors import ConfigError, IdentityError
from overflowd.identity import (
    NodeIdentity,
    identity_path,
    load_identity,
    load_previous_public,
    previous_public_path,
    rotate_identity,
    write_identity,
)
from overflowd.registry import check_domain, format_record, reverse_name, walk_prefixes, zone_line

#: A TTL is an unsigned 32-bit field whose high bit RFC 2181 §8 says to treat as zero.
MAX_TTL_S = 2**31 - 1

PROG = "overflowd"


def initial_config(contacts: list[str], exporters: list[str], *, send: bool) -> str:
    """The commented default config with what ``init``'s flags say filled in.

    Each flag replaces one line of the default text, so the file stays the documented one and
    a person reading it sees what was chosen. The result is parsed before it is written: a bad
    value is refused naming its flag, and nothing is created.
    """
    text = DEFAULT_CONFIG_TEXT
    lines = {
        "--contact": (
            '# contacts = ["mailto:abuse@example.net", "https://example.net/abuse"]\n',
            contacts,
            "contacts",
        ),
        "--exporter": ("allowed_exporters = []\n", exporters, "allowed_exporters"),
    }
    for flag, (line, values, key) in lines.items():
        if not values:
            continue
        assert line in text, line  # the default text is ours: a test keeps them in step
        text = text.replace(line, f"{key} = {json.dumps(values)}\n", 1)
        try:
            parse_settings(text, "<init>")
        except ConfigError as exc:
            why = str(exc).split(": ", 2)[-1]
            raise UsageError(f"{flag}: {why}") from None
    if send:
        line = "to_flow_addresses = false\n"
        assert line in text, line
        text = text.replace(line, "to_flow_addresses = true\n", 1)
    return text


def cmd_init(args: argparse.Namespace) -> int:
    ctx = context(args)
    path = identity_path(ctx.home)
    text = initial_config(args.contact or [], args.exporter or [], send=args.send)
    if (args.contact or args.exporter or args.send) and (ctx.home / CONFIG_FILE).exists():
        raise UsageError(
            f"{ctx.home / CONFIG_FILE} exists: --contact, --exporter and --send only write a new "
            "config; edit that file instead"
        )
    if path.exists() and not args.force:
        raise IdentityError(f"{path} exists; refusing to overwrite a node identity without --force")
    try:
        ctx.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = NodeIdentity.generate()
        write_identity(ctx.home, identity, force=args.force)
        config = ctx.home / CONFIG_FILE
        if not config.exists():
            config.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise IdentityError(f"cannot create node home {ctx.home}: {exc.strerror}") from None
    print(f"node home   {ctx.home}")
    print(f"identity    {path} (mode 0600)")
    print(f"public key  {identity.public_key_b64}")
    print(f"fingerprint {identity.fingerprint}")
    return 0


def cmd_key_show(args: argparse.Namespace) -> int:
    home = context(args).home
    identity = load_identity(home)
    previous = load_previous_public(home)  # kept by the last 'key rotate', if any
    if args.json:
        doc = {"public_key": identity.public_key_b64, "fingerprint": identity.fingerprint}
        if previous is not None:
            doc["previous_public_key"] = base64.b64encode(previous).decode("ascii")
            doc["previous_fingerprint"] = rpt.key_fingerprint(previous)
        print(json.dumps(doc))
    else:
        print(f"public key  {identity.public_key_b64}")
        print(f"fingerprint {identity.fingerprint}")
        if previous is not None:
            print(f"previous    {base64.b64encode(previous).decode('ascii')} "
                  f"({rpt.key_fingerprint(previous)}, until its DNS record is removed)")
    return 0


def cmd_key_dns_record(args: argparse.Namespace) -> int:
    ctx = context(args)
    identity = load_identity(ctx.home)
    keys = [identity.public_key]
    if args.with_previous:
        previous = load_previous_public(ctx.home)
        if previous is None:
            raise IdentityError(
                f"no previous key at {previous_public_path(ctx.home)}: 'overflowd key rotate' "
                "keeps one"
            )
        keys.append(previous)
    _print_records(ctx, args, keys)
    return 0


def cmd_key_rotate(args: argparse.Namespace) -> int:
    """A new identity; the old public key stays published beside it until every report it
    signed has been read (docs/operations.md "Key rotation")."""
    ctx = context(args)
    _print_records(ctx, args, [load_identity(ctx.home).public_key], dry_run=True)  # flags first
    old, new = rotate_identity(ctx.home)
    print(f"; new key      {new.public_key_b64} (fingerprint {new.fingerprint})")
    print(f"; previous key {old.public_key_b64} (kept in {previous_public_path(ctx.home)})")
    print("; publish both records below, then restart overflowd, jfe and ratelockd; once the")
    print("; previous key's reports are read, remove its record")
    _print_records(ctx, args, [new.public_key, old.public_key])
    return 0


def _print_records(
    ctx: Context, args: argparse.Namespace, keys: list[bytes], *, dry_run: bool = False
) -> None:
    """One zone line per key, with the same contacts, URL and boost (two TXT records at one
    name: a lookup accepts each key it finds, registry.valid_keys)."""
    contacts = args.contact if args.contact else list(ctx.settings.node.contacts)
    origin = "--contact" if args.contact else f"node.contacts in {ctx.home / CONFIG_FILE}"
    key = keys[0]
    # Each part on its own first, so that the error names the flag (or key) it came from.
    parts: tuple[tuple[str, list[str], str | None, float | None], ...] = (
        (origin, contacts, None, None),
        ("--url", [], args.url, None),
        ("--boost", [], None, args.boost),
    )
    for flag, only_contacts, url, boost in parts:
        try:
            format_record(key, only_contacts, url, boost)
        except ValueError as exc:
            error = ConfigError if flag == origin and not args.contact else UsageError
            raise error(f"{flag}: {exc}") from None
    if dry_run:
        return
    for key in keys:
        print(zone_line(format_record(key, contacts, args.url, args.boost), args.name, args.ttl))


def _owner_name(text: str) -> str:
    """--name: a domain, or an address or prefix turned into the reverse name looked up."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        try:
            return check_domain(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{exc}, nor an address or prefix") from None
    lengths = walk_prefixes(net.network_address)
    if net.prefixlen not in lengths:
        raise argparse.ArgumentTypeError(
            f"{text!r}: lookups ask only /{', /'.join(map(str, lengths))} for IPv{net.version}"
        )
    return reverse_name(net.network_address, net.prefixlen)


def _kind(text: str) -> str:
    if len(text.encode()) > rpt.MAX_KIND_BYTES or not rpt.KIND_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r}: lowercase letters, digits and '-', at most {rpt.MAX_KIND_BYTES} bytes"
        )
    return text


def _duration_ms(text: str) -> int:
    # The flow's first packet is now - duration: it may not precede the Unix epoch.
    return int_flag("--duration-ms", 0, now_ms())(text)


def _check_out(out: str | None) -> None:
    """Refuse an --out that cannot be written before anything is signed or stored."""
    if not out or out == "-":
        return
    path = Path(out)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"--out {out}: is a directory")
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ConfigError(f"--out {out}: not writable")


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _proto(text: str) -> int:
    named = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP, "icmp": socket.IPPROTO_ICMP}
    if text.lower() in named:
        return int(named[text.lower()])
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a protocol (tcp, udp, icmp, 0-255)"
        ) from None
    if not 0 <= value <= 255:
        raise argparse.ArgumentTypeError("protocol must be 0-255")
    return value


def cmd_report(args: argparse.Namespace) -> int:
    """Sign one report by hand (for tests, demos and operators reporting what they saw)."""
    ctx = context(args)
    identity = load_identity(ctx.home)
    if args.src.version != args.dst.version:
        raise UsageError("--src and --dst must be the same address family")
    _check_out(args.out)
    now = now_ms()
    payload = rpt.Payload(
        kind=args.kind,
        nonce=secrets.token_bytes(rpt.NONCE_BYTES),
        time=now,
        observer=rpt.Observer(
            contacts=ctx.settings.node.contacts, point=ctx.settings.node.observation_point
        ),
        flow=rpt.Flow(
            src=args.src,
            dst=args.dst,
            sport=args.sport,
            dport=args.dport,
            proto=args.proto,
            packets=args.packets,
            bytes=args.bytes,
            first=now - args.duration_ms,
            last=now,
        ),
        sampling=rpt.Sampling(probability=1.0, format="manual", interval=1, provenance="assumed"),
    )
    try:
        signed = identity.sign_report(payload)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not args.no_store:
        store = ctx.open_store()
        try:
            store.add_report(signed, received_ms=now, via="local")
        finally:
            store.close()
    if args.out == "-":
        sys.stdout.buffer.write(signed.cose)
        sys.stdout.buffer.flush()
        return 0
    if args.out:
        try:
            Path(args.out).write_bytes(signed.cose)
        except OSError as exc:  # checked above; a race or a full disk
            raise ConfigError(f"--out {args.out}: cannot write: {exc.strerror}") from None
    if args.json:
        print(json.dumps(rpt.to_json(signed)))
    else:
        print(signed.report_id)
    return 0


def _record_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a DNS record: ``key dns-record`` and ``key rotate``."""
    p.add_argument("--contact", action="append", metavar="URI", help="contact URI (repeatable)")
    p.add_argument("--url", metavar="URL", help="webhook URL for reports about your addresses")
    p.add_argument("--boost", type=float, metavar="R", help="ask observers to report R times more")
    p.add_argument(
        "--name",
        type=_owner_name,
        metavar="NAME",
        help="owner: a domain, or an address or prefix (/8, /16, /24, /32; IPv6 /32, /48, /64, "
        "/128) printed as its reverse name, e.g. 192.0.2.0/24 -> 2.0.192.in-addr.arpa",
    )
    p.add_argument(
        "--ttl", type=int_flag("--ttl", 0, MAX_TTL_S), default=3600, metavar="S",
        help=f"seconds, 0-{MAX_TTL_S} (default 3600)",
    )


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = Parser(
        prog=PROG,
        description="overflowd node: sample flows, sign reports, tell the flow's ends.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create the node home and identity")
    p.add_argument("--force", action="store_true", help="replace an existing identity")
    p.add_argument(
        "--contact",
        action="append",
        metavar="URI",
        help="node.contacts in the new config: mailto:, https: or tel: (repeatable)",
    )
    p.add_argument(
        "--exporter",
        action="append",
        metavar="ADDR|PREFIX",
        help="collector.allowed_exporters in the new config: your routers (repeatable)",
    )
    p.add_argument(
        "--send",
        action="store_true",
        help="send.to_flow_addresses = true in the new config: tell the flows' ends",
    )
    p.set_defaults(func=cmd_init)

    key = sub.add_parser("key", parents=[common], help="show the node key and its DNS record")
    key_sub = key.add_subparsers(title="key commands", metavar="KEYCOMMAND")
    p = key_sub.add_parser("show", parents=[common], help="print the public key and fingerprint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_key_show)
    p = key_sub.add_parser(
        "dns-record", parents=[common], help="print the _overflowd TXT record to publish"
    )
    p.add_argument(
        "--with-previous",
        action="store_true",
        help="also the record of the key before the last 'key rotate' (the overlap)",
    )
    _record_flags(p)
    p.set_defaults(func=cmd_key_dns_record)
    p = key_sub.add_parser(
        "rotate",
        parents=[common],
        help="make a new identity, keep the old public key, print the records for both",
    )
    _record_flags(p)
    p.set_defaults(func=cmd_key_rotate)
    cmd_webhook_secret.register(key_sub, common)

    p = sub.add_parser("report", parents=[common], help="sign and store one report by hand")
    p.add_argument("--src", type=_address, required=True, metavar="ADDR")
    p.add_argument("--dst", type=_address, required=True, metavar="ADDR")
    p.add_argument("--proto", type=_proto, default=17, metavar="P", help="tcp, udp, icmp or 0-255")
    port = int_flag("--sport", 0, 0xFFFF)
    p.add_argument("--sport", type=port, default=0, metavar="PORT", help="0-65535")
    p.add_argument("--dport", type=port, default=0, metavar="PORT", help="0-65535")
    count = int_flag("--packets", 0, rpt.U64)  # the report's fields are unsigned 64-bit
    p.add_argument("--packets", type=count, default=1, metavar="N", help="0-2^64-1")
    p.add_argument("--bytes", type=count, default=0, metavar="N", help="0-2^64-1")
    p.add_argument(
        "--duration-ms", type=_duration_ms, default=0, metavar="MS",
        help="first to last packet, 0 up to now since the epoch",
    )
    p.add_argument(
        "--kind", type=_kind, default="flow-seen", help="flow-seen (default), flow-suspect, ..."
    )
    p.add_argument(
        "--out", metavar="FILE",
        help="also write the COSE bytes here ('-': stdout only); checked before anything is "
        "signed or stored",
    )
    p.add_argument("--no-store", action="store_true", help="do not store it in the node's store")
    p.add_argument("--json", action="store_true", help="print the JSON rendering")
    p.set_defaults(func=cmd_report)

    cmd_decode.register(sub, common)
    cmd_replay.register(sub, common)
    cmd_run.register(sub, common)
    cmd_outbox.register(sub, common)
    cmd_demo.register(sub, common)
    cmd_config.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
