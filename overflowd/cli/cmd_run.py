"""``overflowd run``: the daemon, from the node's config, until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from overflowd.cli.common import Context, UsageError, context, run_trio
from overflowd.config import key_origin, parse_listen
from overflowd.errors import ConfigError, OverflowdError
from overflowd.homelock import acquire
from overflowd.identity import load_identity
from overflowd.sandbox import confine

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from overflowd.services.api import ApiService

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
    p.add_argument(
        "--api", metavar="ADDR:PORT", help="node HTTP API ('' disables; default: config)"
    )
    p.add_argument("--rate", type=float, metavar="R", help="sampling rate (default: config)")
    p.set_defaults(func=run)


#: Migrates the SQLite store named on stdin with the daemon's own sys.path (the same overflowd
#: and migrations, however it was started), in a child process (_migrate_apart).
_MIGRATE = (
    "import json, sys; job = json.loads(sys.stdin.read()); sys.path[:] = job['path']; "
    "from overflowd.store import Store; Store.open(job['url']).close()"
)
#: A migration of a large store can take minutes; past this the daemon migrates itself.
MIGRATE_TIMEOUT_S = 15 * 60


def _migrate_apart(url: str) -> None:
    """Bring a SQLite store that is new or behind the schema to it in a short-lived child, so
    that Alembic (~11 MB of modules, needed once) is never loaded into the daemon that then
    runs for months (issue #16: idle memory). A store already at the schema is read with
    stdlib sqlite3 only. A child that fails is said in one warning (the daemon then carries
    Alembic after all); the daemon's own Store.open that follows migrates (or fails) as it
    always did, and says why."""
    from overflowd.store.fastread import Reader, sqlite_path

    if sqlite_path(url) is None:
        return  # PostgreSQL or a URL with options: the daemon's own Store.open migrates
    try:
        reader = Reader.open(url)
    except Exception:  # sqlite3.Error, OSError: Store.open says what it is
        return
    if reader is not None:
        reader.close()
        return
    import json
    import subprocess
    import sys

    try:
        # the URL on stdin, not in argv (a process list shows argv to every user); -I: the
        # path is this process's, not the working directory's or PYTHON* variables'
        done = subprocess.run(
            [sys.executable, "-I", "-c", _MIGRATE],
            input=json.dumps({"url": url, "path": sys.path}), text=True, capture_output=True,
            timeout=MIGRATE_TIMEOUT_S, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        # said, so that a daemon that carries Alembic after all (idle memory) shows why
        log.warning("store.migrate_child_failed error=%s", type(exc).__name__)
        return
    if done.returncode != 0:
        last = (done.stderr or "").strip().splitlines()[-1:] or [""]
        log.warning("store.migrate_child_failed exit=%d error=%r", done.returncode, last[0][:200])


def _check_flag(flag: str, value: str) -> None:
    """A listen flag is ADDR:PORT with an IP address (a daemon binds no name lookup)."""
    try:
        host, _port = parse_listen(value)
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"{flag} {value}: expected ADDR:PORT, ADDR an IP address") from None


def _sockets(ctx: Context, args: argparse.Namespace) -> dict[str, str]:
    """'host:port' as the services name a socket that failed -> the flag or key it came from."""
    named: dict[str, str] = {}

    def add(text: str, origin: str) -> None:
        with contextlib.suppress(ValueError):
            host, port = parse_listen(text)
            named.setdefault(f"{host}:{port}", f"{origin} {text}")

    if args.inband_listen:
        add(args.inband_listen, "--inband-listen")
    else:
        add(ctx.settings.inband.listen, key_origin(ctx.home, "inband", "listen"))
    for text in args.listen or ctx.settings.collector.listen:
        add(text, "--listen" if args.listen else key_origin(ctx.home, "collector", "listen"))
    if args.api:
        add(args.api, "--api")
    elif args.api is None and ctx.settings.api.listen:
        add(ctx.settings.api.listen, key_origin(ctx.home, "api", "listen"))
    return named


def _listen_error(exc: OSError, named: dict[str, str], fallback: str) -> OverflowdError:
    where = named.get(str(exc.filename), fallback) if exc.filename else fallback
    why = exc.strerror or str(exc)
    return OverflowdError(f"{where}: cannot listen: {why}")


def release_start_up_memory() -> None:
    """Once started: collect start-up's garbage, freeze what is left (the collector then never
    walks the modules' objects again) and hand the allocator's free pages back to the kernel
    (glibc's ``malloc_trim``: ~2 MB of an idle node, issue #16). Before the sandbox: no new
    system call is needed later."""
    import ctypes
    import gc

    gc.collect()
    gc.freeze()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to trim
        pass


def run(args: argparse.Namespace) -> int:
    import trio

    from overflowd.services.api import ApiContext, ApiService
    from overflowd.services.metrics import NodeCollector, serve_metrics
    from overflowd.services.node import NodeService
    from overflowd.services.summary import stop_summary

    for flag, values in (
        ("--listen", args.listen or []),
        ("--inband-listen", [args.inband_listen] if args.inband_listen else []),
        ("--metrics", [args.metrics] if args.metrics else []),
        ("--api", [args.api] if args.api else []),
    ):
        for value in values:
            _check_flag(flag, value)
    ctx = context(args)
    identity = load_identity(ctx.home)
    settings = ctx.settings
    if args.rate is not None and not 0 < args.rate <= 1:
        raise UsageError("--rate must be in (0, 1]")
    for line in settings.deprecations:
        log.warning("config.deprecated %s", line)
    named = _sockets(ctx, args)
    home_lock = acquire(ctx.home, "overflowd")  # one daemon per home; held until exit
    try:
        _migrate_apart(ctx.store_url())
        store = ctx.open_store()
    except BaseException:
        home_lock.release()
        raise
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
        home_lock.release()
        raise ConfigError(str(exc)) from None
    # One collector for both /metrics endpoints: an exporter keeps the label it got first.
    collector = NodeCollector(
        node.statistics, max_exporter_labels=settings.metrics.max_exporter_labels
    )
    # Peers, push half (docs/peers.md "Push"): the inbox behind the API, and the push service.
    from overflowd.services.api_peers import PeerEvents, PeerInbox

    # -- peers: scores and bans (docs/peers.md "Scores and bans"), shared by inbox and pull --
    from overflowd.services.peer_policy import PeerPolicy, PeerPolicyCollector
    from overflowd.services.peer_push import PeerCollector, PeerPush

    policy = PeerPolicy(store, settings.peers) if settings.peers else None
    # -- end scores and bans ------------------------------------------------------------------
    peer_events = PeerEvents()
    inbox = PeerInbox(
        store,
        settings.peers,
        settings.peering,
        node_key=identity.public_key,
        events=peer_events,
        policy=policy,
        trust_of=lambda key: str(node.trust_book.assess(key, now_ms=int(time.time() * 1000)).level),
    )
    # -- peers: subscriptions (docs/peers.md "Subscriptions") ----------------------------------
    from overflowd.errors import DiscoveryError
    from overflowd.services.api_subscriptions import SubscriptionDesk, SubscriptionIndex
    from overflowd.services.dns import DnsRegistry

    sub_index = SubscriptionIndex()
    desk: SubscriptionDesk | None = None
    if settings.peers:
        sub_index.load(store)
        try:
            sub_registry: DnsRegistry | None = node.registry or DnsRegistry(settings.registry)
        except DiscoveryError:
            sub_registry = None  # every prefix is refused with that reason
        desk = SubscriptionDesk(
            store,
            settings.peers,
            sub_registry,
            node_key=identity.public_key,
            policy=policy,
            index=sub_index,
        )
    # -- end subscriptions --------------------------------------------------------------------
    push = PeerPush(
        identity,
        store,
        settings.peers,
        settings.peering,
        events=peer_events,
        subscribed=sub_index.covers if settings.peers else None,
        subscribes=sub_index.subscribes if settings.peers else None,
    )
    peer_collector = PeerCollector(push, inbox, peer_events)
    push_scope = trio.CancelScope()

    async def run_push(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with push_scope:
            await push.run(task_status=task_status)

    api_listen = settings.api.listen if args.api is None else args.api
    # -- peers: pull from each [[peers]] with pull = true (docs/peers.md) -----------------------
    from overflowd.services.peer_pull import PeerPull, PeerPullCollector

    peer_pull: PeerPull | None = None
    peer_collectors: list[Collector] = []
    if any(p.pull for p in settings.peers):
        peer_pull = PeerPull(
            settings.peers,
            settings.peering,
            store,
            trust_of=lambda key: str(
                node.trust_book.assess(key, now_ms=int(time.time() * 1000)).level
            ),
            admit=node.storage_policy.admit,
            refund=node.storage_policy.refund,
            record_arrivals=None,  # arrivals: Store.add_new_reports(channels=) (peer_pull)
            policy=policy,
            own_key=identity.public_key,
        )
        peer_collectors.append(PeerPullCollector(peer_pull.statistics, peer_pull))
    if policy is not None:
        peer_collectors.append(PeerPolicyCollector(policy))
    # -- end peers --------------------------------------------------------------------------
    # The counters' last hour, for the dashboard's Node page (docs/dashboard.md).
    from overflowd.dashboard.history import CounterHistory
    from overflowd.services.who_dns import who_registry

    history = CounterHistory(node.statistics)
    api: ApiService | None = None
    if api_listen:
        try:
            api = ApiService(
                dataclasses.replace(settings.api, listen=api_listen),
                ApiContext(
                    identity=identity,
                    contacts=settings.node.contacts,
                    observation_point=settings.node.observation_point,
                    store=store,
                    collectors=(collector, peer_collector, *peer_collectors),
                    inbox=inbox if settings.peers else None,
                    subscriptions=desk,
                    endpoint=settings.peering.endpoint(api_listen),
                    registry=who_registry(settings.registry, node.registry),  # /v1/who
                    history=history,
                ),
            )
        except ConfigError:
            store.close()
            home_lock.release()
            raise

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                if policy is not None:  # stored bans hold before the inbox or a pull runs
                    await nursery.start(policy.run)
                bound = await nursery.start(node.run)
                for host, port in bound:
                    # One line on stdout so supervisors and tests learn the bound ports.
                    print(f"listening udp {host}:{port}", flush=True)
                if node.inband_bound is not None:
                    host, port = node.inband_bound
                    print(f"listening inband {host}:{port}", flush=True)
                if api is not None:
                    await nursery.start(history.run)
                    host, port = await nursery.start(api.run)
                    shown = f"[{host}]" if ":" in host else host
                    scheme = "https" if api.settings.tls_certificate_file else "http"
                    print(f"api {scheme}://{shown}:{port}/v1/", flush=True)
                if peer_pull is not None:
                    await nursery.start(peer_pull.run)
                await nursery.start(run_push)
                release_start_up_memory()
                confine("overflowd", ctx.home)  # seccomp from here on (docs/deploy.md)
                async for signum in signals:
                    log.info("daemon.stopping signal=%s", signal.Signals(signum).name)
                    push_scope.cancel()
                    node.stop()
                    if api is not None:
                        api.stop()
                        history.stop()
                    if peer_pull is not None:
                        peer_pull.stop()
                    if policy is not None:
                        policy.stop()
                    break

    metrics_listen = settings.metrics.listen if args.metrics is None else args.metrics
    metrics_origin = (
        key_origin(ctx.home, "metrics", "listen") if args.metrics is None else "--metrics"
    )
    try:
        with contextlib.ExitStack() as stack:
            try:
                server = stack.enter_context(
                    serve_metrics(
                        metrics_listen,
                        node.statistics,
                        collector=collector,
                        extra_collectors=(
                            *peer_collectors,
                            peer_collector,
                            *([api.limits.collector()] if api is not None else []),
                        ),
                    )
                )
            except (OSError, ValueError) as exc:
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise OverflowdError(
                    f"{metrics_origin} {metrics_listen}: cannot listen: {why}"
                ) from None
            if server is not None:
                host, port = server.server_address[:2]
                print(f"metrics http://{host}:{port}/metrics", flush=True)
            run_trio(main)
    except OSError as exc:
        raise _listen_error(exc, named, "a listening socket") from None
    finally:
        store.close()
        home_lock.release()
    # What it took in, stored from every source, sent and refused (services/summary.py).
    print("\n".join(stop_summary(node.statistics())), flush=True)
    return 0
