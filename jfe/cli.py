"""``jfe``: run the proxy, show/apply/remove its rules, read the running one's status.

``jfe run`` removes leftovers of a killed run (its own table, rule and route only), applies
its rules, serves, and removes them again on SIGTERM/SIGINT. It writes
``<home>/jfe/status.json`` (read by ``jfe status``) and ``<home>/jfe/metrics.prom`` every
``status_interval_s``. Exit codes: 0 success, 1 our error in one line, 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from jfe import rules
from jfe.config import JfeSettings, load_jfe
from jfe.proxy import CertificateSource, Proxy
from overflowd import logformat
from overflowd.config import key_origin
from overflowd.errors import JfeError, OverflowdError, ProxyError
from overflowd.homelock import acquire
from overflowd.sandbox import check as check_sandbox
from overflowd.sandbox import confine

log = logging.getLogger("jfe")

#: ``jfe status`` calls a status older than this many intervals stale (the process is hung).
STALE_INTERVALS = 5


def _home(args: argparse.Namespace) -> Path:
    if getattr(args, "home", None):
        return Path(args.home)
    env = os.environ.get("OVERFLOWD_HOME")
    return Path(env) if env else Path.home() / ".overflowd"


def status_path(home: Path) -> Path:
    return home / "jfe" / "status.json"


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _status_document(proxy: Proxy, certificates: CertificateSource, state: str) -> dict[str, Any]:
    stats = proxy.statistics()
    doc: dict[str, Any] = dataclasses.asdict(stats)
    doc["ports"] = {str(k): v for k, v in doc["ports"].items()}
    per = stats.cpu_seconds / stats.accepted if stats.accepted else None
    doc["cpu_us_per_connection"] = None if per is None else round(per * 1e6, 1)
    stats_fn = getattr(certificates, "statistics", None)
    if stats_fn is not None:
        cert = stats_fn()
        is_record = dataclasses.is_dataclass(cert) and not isinstance(cert, type)
        doc["certificates"] = dataclasses.asdict(cert) if is_record else cert
    doc["state"] = state
    doc["pid"] = os.getpid()
    doc["written_unix"] = time.time()
    return doc


async def serve(home: Path, settings: JfeSettings, certificates: CertificateSource) -> None:
    """Listener bound, leftovers out, rules in, proxy up; rules out again however it ends
    (but SIGKILL)."""
    proxy = Proxy(settings, certificates)
    # The listener first: a busy port (another jfe running) fails here, before the
    # "leftovers" of that running jfe are removed and its interception switched off.
    try:
        proxy.listen()
    except ProxyError as exc:  # name the config key (FILE:LINE), as every daemon's listen error
        raise ProxyError(f"{key_origin(home, 'jfe', 'listen_port')}: {exc}") from None
    try:
        await _serve_listening(home, settings, certificates, proxy)
    finally:
        proxy.close()


async def _serve_listening(
    home: Path, settings: JfeSettings, certificates: CertificateSource, proxy: Proxy
) -> None:
    from jfe.metrics import exposition

    found = rules.remove(settings)
    if found.any:
        log.warning(
            "removed leftovers of an earlier run table=%s rule=%s route=%s",
            found.table,
            found.ip_rule,
            found.ip_route,
        )
    try:
        rules.apply(settings)
        async with trio.open_nursery() as nursery:
            # The source's own service (renewals, issuance outliving a handshake), if it has one.
            source_service = getattr(certificates, "run", None)
            if source_service is not None:
                await nursery.start(source_service)
            address = await nursery.start(proxy.run)

            async def report(state: str = "running") -> None:
                doc = _status_document(proxy, certificates, state)
                _write_atomic(status_path(home), json.dumps(doc, default=str).encode())
                cert = getattr(certificates, "statistics", lambda: None)()
                _write_atomic(home / "jfe" / "metrics.prom", exposition(proxy.statistics(), cert))

            await report()
            log.info(
                "jfe running listen=%s:%d ports=%s", address[0], address[1], list(settings.ports)
            )
            print(f"jfe running listen={address[0]}:{address[1]}", file=sys.stderr, flush=True)

            async def reporter() -> None:
                while True:
                    await trio.sleep(settings.status_interval_s)
                    await report()

            nursery.start_soon(reporter)
            confine("jfe", home)  # seccomp from here on (docs/deploy.md)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("jfe stopping signal=%s", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
        with contextlib.suppress(OSError):
            doc = _status_document(proxy, certificates, "stopped")
            _write_atomic(status_path(home), json.dumps(doc, default=str).encode())
    finally:
        rules.remove(settings)
        print("jfe stopped, rules removed", file=sys.stderr, flush=True)


def _open_certificates(home: Path) -> CertificateSource:
    """The product's certificate source (jfe.certs): the local CA rooted in the node identity,
    ACME where configured. Opened inside trio: its clock is trio's."""
    from jfe import certs
    from overflowd.identity import load_identity

    config = load_jfe(home)
    source: CertificateSource = certs.open_certificate_source(
        home, config.certificates, load_identity(home)
    )
    return source


async def _run(home: Path, settings: JfeSettings) -> None:
    await serve(home, settings, _open_certificates(home))


def _status(home: Path, as_json: bool) -> int:
    path = status_path(home)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JfeError(f"{path}: no status (jfe has not run with this home)") from None
    except (OSError, ValueError) as exc:
        raise JfeError(f"{path}: unreadable status: {exc}") from None
    settings = load_jfe(home).proxy
    alive = True
    try:
        os.kill(int(doc.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError):
        alive = False
    except PermissionError:
        pass
    age = time.time() - float(doc.get("written_unix", 0))
    if doc.get("state") == "running" and (
        not alive or age > STALE_INTERVALS * settings.status_interval_s
    ):
        doc["state"] = "gone" if not alive else "stale"
    doc["age_s"] = round(age, 1)
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"state {doc['state']} (pid {doc.get('pid')}, {doc['age_s']} s ago)")
    print(
        f"connections open {doc['open_connections']}, accepted {doc['accepted']}, "
        f"handshakes {doc['handshakes']}, pass-throughs {doc['passthroughs']}"
    )
    for port, p in sorted(doc.get("ports", {}).items(), key=lambda kv: int(kv[0])):
        dropped = ", ".join(f"{k} {v}" for k, v in sorted(p["dropped"].items())) or "none"
        print(
            f"  port {port}: accepted {p['accepted']}, tls {p['tls']}, "
            f"plain (client first) {p['passthrough_client_first']}, "
            f"plain (server first) {p['passthrough_server_first']}, dropped {dropped}"
        )
    if doc.get("dropped"):
        print("dropped " + ", ".join(f"{k} {v}" for k, v in sorted(doc["dropped"].items())))
    if "certificates" in doc:
        print(f"certificates {json.dumps(doc['certificates'], sort_keys=True)}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jfe", description="Jump to Full Encryption")
    parser.add_argument("--home", metavar="DIR", help="node home (default: $OVERFLOWD_HOME)")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("--log-format", choices=logformat.FORMATS, default="plain")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="apply the rules and serve until SIGTERM")
    rules_p = sub.add_parser("rules", help="jfe's nftables table and policy routing")
    rules_p.add_argument("action", choices=["show", "apply", "remove"])
    status_p = sub.add_parser("status", help="the running jfe's counters")
    status_p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logformat.configure(
        logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        args.log_format,
    )
    home = _home(args)
    try:
        if args.command == "status":
            return _status(home, args.json)
        settings = load_jfe(home).proxy
        if args.command == "rules":
            if args.action == "show":
                print(rules.plan(settings).describe(), end="")
                now = rules.installed(settings)
                print(f"# installed: table={now.table} rule={now.ip_rule} route={now.ip_route}")
            elif args.action == "apply":
                rules.apply(settings)
            else:
                found = rules.remove(settings)
                print("removed" if found.any else "nothing to remove")
            return 0
        check_sandbox(home)  # its errors here, not from inside the proxy's nursery
        lock = acquire(home, "jfe")  # one jfe per home; held until exit
        try:
            trio.run(_run, home, settings)
        finally:
            lock.release()
        return 0
    except OverflowdError as exc:
        print(f"jfe: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
