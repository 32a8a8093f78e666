"""``overflowd``: the node's own command (identity, keys, reports, decoding, the daemon)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import secrets
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from overflowd import __version__
from overflowd import report as rpt
from overflowd.cli import cmd_decode, cmd_replay, cmd_run
from overflowd.cli.common import common_options, context, now_ms, run_main
from overflowd.config import CONFIG_FILE, DEFAULT_CONFIG_TEXT
from overflowd.errors import ConfigError, IdentityError
from overflowd.identity import NodeIdentity, identity_path, load_identity, write_identity
from overflowd.registry import format_record, zone_line

PROG = "overflowd"


def cmd_init(args: argparse.Namespace) -> int:
    ctx = context(args)
    path = identity_path(ctx.home)
    if path.exists() and not args.force:
        raise IdentityError(f"{path} exists; refusing to overwrite a node identity without --force")
    try:
        ctx.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = NodeIdentity.generate()
        write_identity(ctx.home, identity, force=args.force)
        config = ctx.home / CONFIG_FILE
        if not config.exists():
            config.write_text(DEFAULT_CONFIG_TEXT, encoding="utf-8")
    except OSError as exc:
        raise IdentityError(f"cannot create node home {ctx.home}: {exc.strerror}") from None
    print(f"node home   {ctx.home}")
    print(f"identity    {path} (mode 0600)")
    print(f"public key  {identity.public_key_b64}")
    print(f"fingerprint {identity.fingerprint}")
    return 0


def cmd_key_show(args: argparse.Namespace) -> int:
    identity = load_identity(context(args).home)
    if args.json:
        print(
            json.dumps({"public_key": identity.public_key_b64, "fingerprint": identity.fingerprint})
        )
    else:
        print(f"public key  {identity.public_key_b64}")
        print(f"fingerprint {identity.fingerprint}")
    return 0


def cmd_key_dns_record(args: argparse.Namespace) -> int:
    ctx = context(args)
    identity = load_identity(ctx.home)
    contacts = args.contact if args.contact else list(ctx.settings.node.contacts)
    try:
        text = format_record(identity.public_key, contacts, args.url, args.boost)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(zone_line(text, args.name, args.ttl))
    return 0


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
        raise ConfigError("--src and --dst must be the same address family")
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
        Path(args.out).write_bytes(signed.cose)
    if args.json:
        print(json.dumps(rpt.to_json(signed)))
    else:
        print(signed.report_id)
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="overflowd node: sample flows, sign reports, tell the flow's ends.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="create the node home and identity")
    p.add_argument("--force", action="store_true", help="replace an existing identity")
    p.set_defaults(func=cmd_init)

    key = sub.add_parser("key", parents=[common], help="show the node key and its DNS record")
    key_sub = key.add_subparsers(title="key commands", metavar="KEYCOMMAND")
    p = key_sub.add_parser("show", parents=[common], help="print the public key and fingerprint")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_key_show)
    p = key_sub.add_parser(
        "dns-record", parents=[common], help="print the _overflowd TXT record to publish"
    )
    p.add_argument("--contact", action="append", metavar="URI", help="contact URI (repeatable)")
    p.add_argument("--url", metavar="URL", help="webhook URL for reports about your addresses")
    p.add_argument("--boost", type=float, metavar="R", help="ask observers to report R times more")
    p.add_argument("--name", metavar="NAME", help="owner: a domain or reverse-zone name")
    p.add_argument("--ttl", type=int, default=3600, metavar="S")
    p.set_defaults(func=cmd_key_dns_record)

    p = sub.add_parser("report", parents=[common], help="sign and store one report by hand")
    p.add_argument("--src", type=_address, required=True, metavar="ADDR")
    p.add_argument("--dst", type=_address, required=True, metavar="ADDR")
    p.add_argument("--proto", type=_proto, default=17, metavar="P", help="tcp, udp, icmp or 0-255")
    p.add_argument("--sport", type=int, default=0, choices=range(65536), metavar="PORT")
    p.add_argument("--dport", type=int, default=0, choices=range(65536), metavar="PORT")
    p.add_argument("--packets", type=int, default=1, metavar="N")
    p.add_argument("--bytes", type=int, default=0, metavar="N")
    p.add_argument("--duration-ms", type=int, default=0, metavar="MS")
    p.add_argument("--kind", default="flow-seen", help="flow-seen (default), flow-suspect, ...")
    p.add_argument(
        "--out", metavar="FILE", help="also write the COSE bytes here ('-': stdout only)"
    )
    p.add_argument("--no-store", action="store_true", help="do not store it in the node's store")
    p.add_argument("--json", action="store_true", help="print the JSON rendering")
    p.set_defaults(func=cmd_report)

    cmd_decode.register(sub)
    cmd_replay.register(sub, common)
    cmd_run.register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(PROG, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
