"""Kernel-sampled capture inside a namespace: a capture process and a UDP sender.

Python 3.11 has no ``os.setns``, and a packet socket sees the interfaces of the namespace it
was opened in, so the capture runs in its own process under ``ip netns exec`` (through
`tests.support.netns.Namespace.spawn`, which stops it by PID). This file is both the helper the
tests import and the script those processes run::

    python netns_capture.py capture IFACE ONE_IN [--outgoing]
        prints "ready" once the filter is attached and the socket bound; on SIGTERM waits until
        nothing has arrived for QUIET_S, then prints one JSON line (`CaptureResult`)
    python netns_capture.py send DST PORT COUNT --sport P [--burst B --pause S --size N]
        sends COUNT UDP datagrams from a plain socket, paced, then prints "sent N"

Only overflowd and the standard library are imported by the script side, so it runs by path.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
#: After SIGTERM, the capture keeps reading until the socket has been idle this long.
QUIET_S = 0.3
#: A flow's identity in the capture's summary, plus the fields every record must agree on.
KEY_FIELDS = ("src", "dst", "sport", "dport", "proto", "bytes", "packets")


@dataclass(frozen=True)
class CaptureResult:
    stats: dict[str, Any]
    #: Records per (src, dst, sport, dport, proto, bytes, packets).
    flows: Counter[tuple[Any, ...]]
    formats: set[str]
    exporters: set[str]
    intervals: set[int]
    provenances: set[str]
    domains: set[int]
    first_ms: int | None
    last_ms: int | None
    first_equals_last: bool

    @classmethod
    def from_json(cls, text: str) -> CaptureResult:
        data = json.loads(text)
        return cls(
            stats=data["stats"],
            flows=Counter({tuple(key): n for key, n in data["flows"]}),
            formats=set(data["formats"]),
            exporters=set(data["exporters"]),
            intervals=set(data["intervals"]),
            provenances=set(data["provenances"]),
            domains=set(data["domains"]),
            first_ms=data["first_ms"],
            last_ms=data["last_ms"],
            first_equals_last=data["first_equals_last"],
        )

    def count(self, src: str, dst: str, sport: int, dport: int) -> int:
        return sum(n for key, n in self.flows.items() if key[:4] == (src, dst, sport, dport))

    def matching(self, src: str, dst: str, sport: int, dport: int) -> set[tuple[Any, ...]]:
        return {key for key in self.flows if key[:4] == (src, dst, sport, dport)}


def capture_argv(python: str, interface: str, one_in: int, *, outgoing: bool = False) -> list[str]:
    argv = [python, str(SCRIPT), "capture", interface, str(one_in)]
    return [*argv, "--outgoing"] if outgoing else argv


def send_argv(
    python: str,
    dst: str,
    port: int,
    count: int,
    *,
    sport: int,
    burst: int = 200,
    pause_s: float = 0.002,
    size: int = 32,
) -> list[str]:
    return [
        python,
        str(SCRIPT),
        "send",
        dst,
        str(port),
        str(count),
        "--sport",
        str(sport),
        "--burst",
        str(burst),
        "--pause",
        str(pause_s),
        "--size",
        str(size),
    ]


def parse_output(stdout: str) -> CaptureResult:
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return CaptureResult.from_json(line)
    raise AssertionError(f"the capture printed no result:\n{stdout[-2000:]}")


# ---- the script side --------------------------------------------------------------------


async def _capture(interface: str, one_in: int, outgoing: bool) -> dict[str, Any]:
    import trio

    from overflowd.flows import FlowRow
    from overflowd.services.capture import KernelSampledCapture

    send, receive = trio.open_memory_channel[list[FlowRow]](100_000)
    capture = KernelSampledCapture(interface, one_in, send, outgoing=outgoing)
    flows: Counter[tuple[Any, ...]] = Counter()
    seen: dict[str, set[Any]] = {
        "formats": set(),
        "exporters": set(),
        "intervals": set(),
        "provenances": set(),
        "domains": set(),
    }
    times: dict[str, Any] = {"first_ms": None, "last_ms": None, "first_equals_last": True}

    def take(row: FlowRow) -> None:
        row.to_record().validate()  # every field in its documented range, format known
        flows[tuple(str(x) if i < 2 else x for i, x in enumerate(_key(row)))] += 1
        seen["formats"].add(row.format)
        seen["exporters"].add(row.exporter)
        seen["intervals"].add(row.sampling_interval)
        seen["provenances"].add(row.sampling_provenance)
        seen["domains"].add(row.observation_domain)
        first = times["first_ms"]
        times["first_ms"] = row.first if first is None else min(int(first), row.first)
        last = times["last_ms"]
        times["last_ms"] = row.last if last is None else max(int(last), row.last)
        if row.first != row.last:
            times["first_equals_last"] = False

    async def consume() -> None:
        async for rows in receive:
            for row in rows:
                take(row)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(capture.run)
            nursery.start_soon(consume)
            print("ready", flush=True)
            async for _ in signals:
                break
            # Let what the kernel has queued arrive before stopping.
            while True:
                before = capture.statistics().packets
                await trio.sleep(QUIET_S)
                if capture.statistics().packets == before:
                    break
            nursery.cancel_scope.cancel()
    while True:
        try:
            for row in receive.receive_nowait():
                take(row)
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    stats = capture.statistics()
    return {
        "stats": {k: v for k, v in vars(stats).items()},
        "flows": [[list(key), n] for key, n in flows.items()],
        **{name: sorted(values) for name, values in seen.items()},
        **times,
    }


def _key(row: Any) -> tuple[Any, ...]:
    return tuple(getattr(row, name) for name in KEY_FIELDS)


def _send(args: argparse.Namespace) -> None:
    family = socket.AF_INET6 if ":" in args.dst else socket.AF_INET
    payload = b"o" * args.size
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", args.sport))
        sent = 0
        while sent < args.count:
            for _ in range(min(args.burst, args.count - sent)):
                sock.sendto(payload, (args.dst, args.port))
                sent += 1
            time.sleep(args.pause)
    print(f"sent {sent}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    cap = commands.add_parser("capture")
    cap.add_argument("interface")
    cap.add_argument("one_in", type=int)
    cap.add_argument("--outgoing", action="store_true")
    snd = commands.add_parser("send")
    snd.add_argument("dst")
    snd.add_argument("port", type=int)
    snd.add_argument("count", type=int)
    snd.add_argument("--sport", type=int, required=True)
    snd.add_argument("--burst", type=int, default=200)
    snd.add_argument("--pause", type=float, default=0.002)
    snd.add_argument("--size", type=int, default=32)
    args = parser.parse_args(argv)
    if args.command == "send":
        _send(args)
        return 0
    import trio

    result = trio.run(_capture, args.interface, args.one_in, args.outgoing)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
