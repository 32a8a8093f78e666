"""Small overflowd nodes for the netns tests, run inside a namespace with ``ip netns exec``.

Run by path (it imports only the installed ``overflowd`` package)::

    python tests/support/netns_nodes.py listen --db URL [--listen ADDR:PORT]
        prints "listening ADDR PORT" once bound; on SIGTERM drains, prints "stats {json}", exits 0

    python tests/support/netns_nodes.py send --seed HEX --port P --allow PREFIX ... \\
        --flow SRC,DST,PROTO,SPORT,DPORT ...
        signs one report per flow, sends each through InbandSender (confinement: --allow only),
        prints one JSON line {"report_ids": [...], "sent": N, "sender": {...}} and exits 0

The test reads the stores (SQLite files) from the host: namespaces share the filesystem.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import signal
import sys
import time
from typing import Any

import trio

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.services.inband import InbandListener, InbandSender, InbandSettings
from overflowd.store import Store


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if hasattr(obj, "items"):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, tuple | list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, int | float | str | bool) or obj is None:
        return obj
    return str(obj)


async def _listen(args: argparse.Namespace) -> int:
    with Store.open(args.db) as store:
        settings = InbandSettings(listen=args.listen)
        listener = InbandListener(settings, store)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(listener.run)
            print(f"listening {host} {port}", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    listener.stop()
                    break
        print("stats " + json.dumps(_jsonable(listener.statistics())), flush=True)
    return 0


def _flow(text: str, now_ms: int) -> rpt.Flow:
    src, dst, proto, sport, dport = text.split(",")
    return rpt.Flow(
        src=ipaddress.ip_address(src),
        dst=ipaddress.ip_address(dst),
        sport=int(sport),
        dport=int(dport),
        proto=int(proto),
        packets=1000,
        bytes=512_000,
        first=now_ms - 10_000,
        last=now_ms - 1,
    )


async def _send(args: argparse.Namespace) -> int:
    identity = NodeIdentity(seed=bytes.fromhex(args.seed))
    settings = InbandSettings(port=args.port, allowed_prefixes=tuple(args.allow))
    sender = InbandSender(settings)
    ids, sent = [], 0
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        for text in args.flow:
            now_ms = int(time.time() * 1000)
            payload = rpt.Payload(
                kind="flow-seen",
                nonce=os.urandom(rpt.NONCE_BYTES),
                time=now_ms,
                observer=rpt.Observer(contacts=("mailto:abuse@example.net",), point="netns-a"),
                flow=_flow(text, now_ms),
                sampling=rpt.Sampling(probability=1.0, format="manual"),
            )
            report = identity.sign_report(payload)
            ids.append(report.report_id)
            sent += await sender.send_report(report)
        nursery.cancel_scope.cancel()
    out = {"report_ids": ids, "sent": sent, "sender": _jsonable(sender.statistics())}
    print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netns_nodes")
    sub = parser.add_subparsers(dest="command", required=True)
    listen = sub.add_parser("listen")
    listen.add_argument("--db", required=True)
    listen.add_argument("--listen", default="[::]:65535")
    send = sub.add_parser("send")
    send.add_argument("--seed", required=True)
    send.add_argument("--port", type=int, default=65535)
    send.add_argument("--allow", action="append", default=[])
    send.add_argument("--flow", action="append", default=[])
    args = parser.parse_args(argv)
    return trio.run(_listen if args.command == "listen" else _send, args)


if __name__ == "__main__":
    sys.exit(main())
