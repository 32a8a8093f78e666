"""overflowd-receive: an HTTP server that verifies webhook deliveries and appends reports.

    overflowd-receive --listen 127.0.0.1:8080 --out reports.jsonl [--trust KEY|KEYFILE ...]

A POST carries one report or several (``{"reports": [...]}``, overflowd's batches). Each
verified report is written once, as one JSON line, flushed and fsynced before the sender
is answered. ``--trust`` takes a base64 public key (what ``overflowd key show`` prints) or a
file with one such key per line; without it any key whose signatures verify is accepted (the
key is in every line, to decide on later) within per-key rate and byte caps. Every limit is a
flag (``--help`` lists them with their defaults; docs/webhooks.md gives the reasons). The
server speaks HTTP/1.1 only, as overflowd's sender does (docs/webhooks.md says why). The
bound address is printed on stderr as ``listening on http://HOST:PORT`` (useful with port 0).
SIGTERM or SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import functools
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from overflowd.cli.common import configure_logging
from overflowd.errors import ConfigError, OverflowdError
from overflowd.receiver import DEFAULT_SEEN_IDS, MAX_BATCH_REPORTS, MAX_BODY_BYTES, KeyCaps
from overflowd.services.receive_http import JsonLinesSink, ReceiverLimits, WebhookReceiver
from overflowd.wire.webhook import DEFAULT_TOLERANCE_S

PROG = "overflowd-receive"


def parse_listen(text: str) -> tuple[str, int]:
    """``127.0.0.1:8080``, ``[::1]:8080``, ``:8080`` (all IPv4 interfaces)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--listen {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:8080")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _decode_key(text: str) -> bytes | None:
    text = text.strip()
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(raw) == 32:
            return raw
    return None


def parse_trust(values: Sequence[str]) -> set[bytes] | None:
    """Keys from ``--trust`` values: base64 keys, or files of base64 keys (one per line)."""
    if not values:
        return None
    keys: set[bytes] = set()
    for value in values:
        key = _decode_key(value) if len(value.strip()) in (43, 44) else None
        if key is not None:
            keys.add(key)
            continue
        path = Path(value)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"--trust {value!r}: neither a base64 Ed25519 public key nor a readable file "
                f"({exc})"
            ) from None
        found = 0
        for number, line in enumerate(lines, start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            key = _decode_key(line)
            if key is None:
                raise ConfigError(f"{path}:{number}: not a base64 Ed25519 public key")
            keys.add(key)
            found += 1
        if not found:
            raise ConfigError(f"{path}: no keys in the file")
    return keys


#: Every limit flag: (flag, type, default, smallest allowed, help). Reasons for each default are
#: beside the field in ReceiverLimits / KeyCaps and in docs/webhooks.md (receiver limits).
_D, _K = ReceiverLimits(), KeyCaps()
LIMIT_FLAGS: tuple[tuple[str, type, float, float, str], ...] = (
    ("--tolerance-s", float, DEFAULT_TOLERANCE_S, 1, "webhook-timestamp window, both ways"),
    ("--max-body-bytes", int, MAX_BODY_BYTES, 1024, "larger bodies get 413 unread"),
    ("--max-batch-reports", int, MAX_BATCH_REPORTS, 1, "reports one POST may carry, else 400"),
    ("--seen-ids", int, DEFAULT_SEEN_IDS, 1, "delivered ids remembered for de-duplication"),
    ("--body-timeout-s", float, _D.body_timeout_s, 0.1, "a whole body within this, or 408"),
    ("--header-timeout-s", float, _D.header_timeout_s, 0.1, "whole headers, and idle keep-alive"),
    ("--read-timeout-s", float, _D.read_timeout_s, 1, "longest wait for any next bytes"),
    ("--max-in-flight", int, _D.max_in_flight, 1, "requests verified/written at once, then 503"),
    ("--max-reading", int, _D.max_reading, 1, "requests reading their body at once, then 503"),
    ("--max-reading-per-client", int, _D.max_reading_per_client, 1, "... per client, then 429"),
    ("--max-connections", int, _D.max_connections, 1, "open connections; more are closed"),
    ("--max-connections-per-client", int, _D.max_connections_per_client, 1, "... per client"),
    ("--max-connections-per-network", int, _D.max_connections_per_network, 1, "... per IPv6 /48"),
    ("--key-rate-per-s", float, _K.rate_per_s, 1e-6, "no --trust: reports/s per key, then 429"),
    ("--key-burst", int, _K.burst, 1, "no --trust: burst of reports per key"),
    ("--key-max-bytes", int, _K.max_bytes, 1, "no --trust: bytes per key per window, then 429"),
    ("--key-window-s", float, _K.window_s, 1, "no --trust: the window of --key-max-bytes"),
    ("--new-keys-per-s", float, _K.new_keys_per_s, 1e-6, "no --trust: keys not seen before /s"),
    ("--new-keys-burst", int, _K.new_keys_burst, 1, "no --trust: burst of new keys"),
    ("--all-keys-max-bytes", int, _K.all_keys_max_bytes, 1, "no --trust: all keys, per window"),
    ("--max-keys", int, _K.max_keys, 1, "no --trust: keys whose budgets are remembered"),
    ("--max-out-bytes", int, _D.max_out_bytes, 0, "output file cap, then 507; 0: none"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="A client is an IPv4 address or an IPv6 /64. HTTP/1.1 only (no HTTP/2). "
        "Limits: docs/webhooks.md.",
    )
    p.add_argument("--listen", required=True, metavar="ADDR:PORT", help="address to serve on")
    p.add_argument("--out", required=True, metavar="FILE|-", help="JSON lines file, - for stdout")
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="PUBKEY|KEYFILE",
        help="accept only reports signed by these keys (repeatable); without it any key is "
        "accepted within the --key-* and --new-keys-* caps",
    )
    limits = p.add_argument_group("limits (defaults in brackets)")
    for flag, kind, default, _, text in LIMIT_FLAGS:
        limits.add_argument(
            flag,
            type=kind,
            default=default,
            metavar="R" if flag.endswith("-per-s") else "S" if flag.endswith("-s") else "N",
            help=f"{text} [{default:g}]" if kind is float else f"{text} [{int(default)}]",
        )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("--log-format", choices=("plain", "json"), default="plain", help="log lines")
    return p


def limits_from(args: argparse.Namespace) -> ReceiverLimits:
    """The limits the flags ask for; ConfigError naming the first flag out of range."""
    for flag, _, _, least, _ in LIMIT_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if not value >= least:  # also refuses NaN
            raise ConfigError(f"{flag} {value}: must be at least {least:g}")
    a = args
    keys = KeyCaps(
        rate_per_s=a.key_rate_per_s,
        burst=a.key_burst,
        max_bytes=a.key_max_bytes,
        window_s=a.key_window_s,
        new_keys_per_s=a.new_keys_per_s,
        new_keys_burst=a.new_keys_burst,
        all_keys_max_bytes=a.all_keys_max_bytes,
        max_keys=a.max_keys,
    )
    return ReceiverLimits(
        max_body_bytes=a.max_body_bytes,
        max_batch_reports=a.max_batch_reports,
        max_in_flight=a.max_in_flight,
        tolerance_s=a.tolerance_s,
        seen_ids=a.seen_ids,
        body_timeout_s=a.body_timeout_s,
        header_timeout_s=a.header_timeout_s,
        read_timeout_s=a.read_timeout_s,
        max_reading=a.max_reading,
        max_reading_per_client=a.max_reading_per_client,
        max_connections=a.max_connections,
        max_connections_per_client=a.max_connections_per_client,
        max_connections_per_network=a.max_connections_per_network,
        keys=keys,
        max_out_bytes=a.max_out_bytes,
    )


async def _serve(receiver: WebhookReceiver, listen: tuple[str, int]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(functools.partial(receiver.run, listen))
            shown = f"[{host}]" if ":" in host else host
            print(f"{PROG}: listening on http://{shown}:{port}", file=sys.stderr, flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one error inside nested nurseries' groups (a busy port), or the group itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.verbose, args.log_format)
    try:
        listen = parse_listen(args.listen)
        trusted = parse_trust(args.trust)
        limits = limits_from(args)
        try:
            sink = JsonLinesSink(args.out)
        except OSError as exc:
            raise ConfigError(f"--out {args.out}: {exc.strerror or exc}") from None
        try:
            receiver = WebhookReceiver(sink, trusted_keys=trusted, limits=limits)
            try:
                trio.run(_serve, receiver, listen)
            except BaseExceptionGroup as group:
                raise _single(group) from None
        finally:
            sink.close()
    except OverflowdError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # binding the address failed
        why = exc.strerror or exc
        print(f"{PROG}: error: --listen {args.listen}: cannot listen: {why}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
