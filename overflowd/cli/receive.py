"""overflowd-receive: an HTTP server that verifies webhook deliveries and appends reports.

    overflowd-receive --listen 127.0.0.1:8080 --out reports.jsonl [--trust KEY|KEYFILE ...]

Each verified report is written once, as one JSON line, flushed and fsynced before the sender
is answered. ``--trust`` takes a base64 public key (what ``overflowd key show`` prints) or a
file with one such key per line; without it any key whose signatures verify is accepted (the
key is in every line, to decide on later). The bound address is printed on stderr as
``listening on http://HOST:PORT`` (useful with port 0). SIGTERM or SIGINT stop it cleanly.
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
from overflowd.receiver import DEFAULT_SEEN_IDS, MAX_BODY_BYTES
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--listen", required=True, metavar="ADDR:PORT", help="address to serve on")
    p.add_argument("--out", required=True, metavar="FILE|-", help="JSON lines file, - for stdout")
    p.add_argument(
        "--trust",
        action="append",
        default=[],
        metavar="PUBKEY|KEYFILE",
        help="accept only reports signed by these keys (repeatable)",
    )
    p.add_argument("--tolerance-s", type=float, default=DEFAULT_TOLERANCE_S, metavar="S")
    p.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, metavar="N")
    p.add_argument("--max-in-flight", type=int, default=ReceiverLimits.max_in_flight, metavar="N")
    p.add_argument("--seen-ids", type=int, default=DEFAULT_SEEN_IDS, metavar="N")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    return p


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
    configure_logging(args.verbose)
    try:
        listen = parse_listen(args.listen)
        trusted = parse_trust(args.trust)
        if args.tolerance_s <= 0 or args.max_body_bytes < 1024 or args.max_in_flight < 1:
            raise ConfigError("--tolerance-s must be positive, --max-body-bytes at least 1024")
        limits = ReceiverLimits(
            max_body_bytes=args.max_body_bytes,
            max_in_flight=args.max_in_flight,
            tolerance_s=args.tolerance_s,
            seen_ids=max(1, args.seen_ids),
        )
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
        print(f"{PROG}: error: --listen {args.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
