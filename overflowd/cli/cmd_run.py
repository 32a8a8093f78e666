"""``overflowd run``: the daemon, from the node's config, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
import signal
from typing import Any

import trio

from overflowd.cli.common import context, run_trio
from overflowd.errors import ConfigError, OverflowdError
from overflowd.identity import load_identity

log = logging.getLogger("overflowd.daemon")


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "run", parents=[common], help="run the node: collect, sample, sign, store"
    )
    p.add_argument(
        "--listen", action="append", metavar="ADDR:PORT", help="collector socket (repeatable)"
    )
    p.add_argument("--metrics", metavar="ADDR:PORT", help="Prometheus endpoint ('' disables)")
    p.add_argument(
        "--inband-listen", metavar="ADDR:PORT", help="in-band report listener (default: config)"
    )
    p.add_argument("--rate", type=float, metavar="R", help="sampling rate (default: config)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from overflowd.services.metrics import serve_metrics
    from overflowd.services.node import NodeService

    ctx = context(args)
    identity = load_identity(ctx.home)
    settings = ctx.settings
    if args.rate is not None and not 0 < args.rate <= 1:
        raise ConfigError("--rate must be in (0, 1]")
    store = ctx.open_store()
    try:
        node = NodeService(
            identity,
            settings,
            store,
            listen=args.listen,
            inband_listen=args.inband_listen,
            rate=args.rate,
        )
    except ValueError as exc:
        store.close()
        raise ConfigError(str(exc)) from None

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(node.run)
                for host, port in bound:
                    # One line on stdout so supervisors and tests learn the bound ports.
                    print(f"listening udp {host}:{port}", flush=True)
                if node.inband_bound is not None:
                    host, port = node.inband_bound
                    print(f"listening inband {host}:{port}", flush=True)
                async for signum in signals:
                    log.info("daemon.stopping signal=%s", signal.Signals(signum).name)
                    node.stop()
                    break

    metrics_listen = settings.metrics.listen if args.metrics is None else args.metrics
    try:
        with serve_metrics(metrics_listen, node.statistics) as server:
            if server is not None:
                host, port = server.server_address[:2]
                print(f"metrics http://{host}:{port}/metrics", flush=True)
            run_trio(main)
    except OSError as exc:
        raise OverflowdError(f"cannot listen: {exc.strerror or exc}") from None
    finally:
        store.close()
    stats = node.statistics()
    print(
        f"stopped: datagrams {sum(c.datagrams for c in stats.collectors)} "
        f"records {stats.decoder.records} malformed {stats.malformed_datagrams} "
        f"sampled {stats.sampler.records_sampled} stored {stats.reports_stored}",
        flush=True,
    )
    return 0
