"""``overflowd decode FILE``: print the flow records in a capture file, one per line.

For people (one readable line per record) and for scripts and differential tests
(``--json``: one JSON object per line with the keys of
:meth:`overflowd.flows.FlowRecord.to_json`, times as RFC 3339 like every command's JSON:
``first``/``last`` are RFC 3339 UTC, ``first_ms``/``last_ms`` the Unix milliseconds, as in
a report's JSON). A summary goes to stderr. Malformed datagrams
and a truncated last frame are counted in the summary, not errors; an unreadable file or one
that is not a capture is (exit 1, one line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from overflowd.errors import DecodeError, OverflowdError
from overflowd.flows import FlowRecord
from overflowd.wire import CaptureReader, DecoderState, decode_datagram

__all__ = ["format_record", "main", "record_json", "register", "run"]

PROG = "overflowd"
_PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 47: "gre", 50: "esp", 58: "icmp6", 132: "sctp"}
_FLAG_LETTERS = "CEUAPRSF"  # CWR ECE URG ACK PSH RST SYN FIN, high bit first


def register(
    subparsers: Any, common: argparse.ArgumentParser | None = None
) -> argparse.ArgumentParser:
    """Add the ``decode`` subcommand to an ``argparse`` subparsers object.

    The parser's ``func`` default is :func:`run`. ``common`` (--home, --db, -v) is accepted,
    like every command's, though decoding reads neither the home nor the store.
    """
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "decode",
        parents=[common] if common is not None else [],
        help="print the flow records in a pcap/pcapng file",
        description=(
            "Decode NetFlow v5/v9, IPFIX and sFlow v5 datagrams found in a pcap or pcapng "
            "file and print one normalized flow record per line."
        ),
    )
    _arguments(parser)
    parser.set_defaults(func=run)
    return parser


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="pcap or pcapng capture file")
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per record (keys of FlowRecord; times RFC 3339, and *_ms)",
    )
    parser.add_argument(
        "--port",
        type=_port,
        default=None,
        metavar="N",
        help="only UDP datagrams to this destination port (default: all UDP)",
    )
    parser.add_argument(
        "--sampling-override",
        action="append",
        default=[],
        metavar="EXPORTER=N",
        help="treat EXPORTER as sampling 1 in N whatever it announces (repeatable)",
    )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def _overrides(items: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        exporter, sep, value = item.partition("=")
        try:
            interval = int(value)
        except ValueError:
            interval = 0
        if not sep or not exporter or interval < 1:
            raise OverflowdError(f"--sampling-override {item!r}: expected EXPORTER=N, N >= 1")
        out[exporter] = interval
    return out


def run(
    args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run ``decode`` with parsed arguments; returns the exit status."""
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    try:
        return _decode(args, out, err)
    except BrokenPipeError:
        # `overflowd decode f | head`: the reader left; that is not our error.
        _silence_stdout()
        return 0
    except (OverflowdError, OSError) as exc:
        print(f"{PROG}: error: {_describe(exc, args.file)}", file=err)
        return 1


def _describe(exc: Exception, path: str) -> str:
    if isinstance(exc, OSError):
        return f"cannot read {path}: {exc.strerror or exc}"
    if isinstance(exc, DecodeError):
        return f"{path}: {exc}"
    return str(exc)


def _decode(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    state = DecoderState(overrides=_overrides(args.sampling_override))
    capture = CaptureReader()
    datagrams = records = malformed = 0
    write = out.write
    as_json: bool = args.json
    with open(args.file, "rb") as source:
        for datagram in capture.udp_datagrams(source, port=args.port):
            datagrams += 1
            try:
                flows = decode_datagram(datagram.payload, datagram.src, state, datagram.timestamp)
            except DecodeError:
                malformed += 1
                continue
            records += len(flows)
            if as_json:
                for flow in flows:
                    write(json.dumps(record_json(flow), separators=(",", ":")))
                    write("\n")
            else:
                for flow in flows:
                    write(format_record(flow))
                    write("\n")
    out.flush()
    cap = capture.statistics()
    stats = state.statistics()
    parts = [
        f"frames={cap.frames}",
        f"datagrams={datagrams}",
        f"records={records}",
        f"malformed={malformed}",
        f"truncated_frames={cap.truncated_frames}",
    ]
    skipped = cap.not_ip + cap.not_udp + cap.other_port + cap.udp_incomplete + cap.undecodable
    if skipped:
        parts.append(f"frames_skipped={skipped}")
    if stats.templates_learned:
        parts.append(f"templates={stats.templates_learned}")
    if stats.pending_sets or stats.pending_dropped:
        parts.append(f"data_without_template={stats.pending_sets + stats.pending_dropped}")
    for reason, count in sorted(stats.malformed.items()):
        parts.append(f"malformed[{reason}]={count}")
    print(f"{PROG}: decode: {' '.join(parts)}", file=err)
    return 0


def record_json(flow: FlowRecord) -> dict[str, Any]:
    """``--json``'s object: the record's keys, times in RFC 3339 with the milliseconds beside
    them (``first_ms``/``last_ms``, as in a report's JSON)."""
    out: dict[str, Any] = {}
    for key, value in flow.to_json().items():
        if key in ("first", "last"):
            out[key] = _iso_ms(value)
            out[f"{key}_ms"] = value
        else:
            out[key] = value
    return out


def _iso_ms(ms: int) -> str:
    try:
        t = datetime.fromtimestamp(ms / 1000, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return str(ms)  # beyond year 9999: the number, not a made-up date
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def format_record(flow: FlowRecord) -> str:
    """One readable line: time, endpoints, protocol, counters, where it came from."""
    start = datetime.fromtimestamp(flow.first / 1000, tz=UTC)
    when = start.strftime("%Y-%m-%dT%H:%M:%S.") + f"{flow.first % 1000:03d}Z"
    proto = _PROTOCOLS.get(flow.proto, str(flow.proto))
    flags = ""
    if flow.proto == 6:
        bits = flow.tcp_flags & 0xFF
        flags = " " + "".join(
            letter if bits & (0x80 >> i) else "." for i, letter in enumerate(_FLAG_LETTERS)
        )
    as_part = ""
    if flow.src_as is not None or flow.dst_as is not None:
        as_part = f" as={_as(flow.src_as)}>{_as(flow.dst_as)}"
    return (
        f"{when} {_endpoint(flow.src, flow.sport)} > {_endpoint(flow.dst, flow.dport)} "
        f"{proto}{flags} pkts={flow.packets} bytes={flow.bytes} tos={flow.tos}{as_part} "
        f"dur={(flow.last - flow.first) / 1000:.3f}s {flow.format} "
        f"{flow.exporter}/{flow.observation_domain} "
        f"1:{flow.sampling_interval}({flow.sampling_provenance})"
    )


def _as(value: int | None) -> str:
    return "-" if value is None else str(value)


def _endpoint(address: Any, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would raise again; point it at /dev/null.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m overflowd.cli.cmd_decode FILE [--json]``."""
    parser = argparse.ArgumentParser(prog=f"{PROG} decode")
    _arguments(parser)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
