"""``overflowd replay FILE``: decode, sample, sign and store a capture, sending nothing.

The offline twin of ``overflowd run``: the same decoders, sampler and report maker over a pcap
or pcapng file, so an operator can see what a node would have reported (and a test can check
the statistics) without a single packet leaving the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from overflowd import report as rpt
from overflowd.cli.cmd_decode import _overrides, _port
from overflowd.cli.common import UsageError, context, now_ms
from overflowd.errors import DecodeError, OverflowdError
from overflowd.identity import load_identity

if TYPE_CHECKING:
    from overflowd.store.repository import Store

#: Reports are written to the store in batches of this many (one transaction each).
STORE_BATCH = 500


def register(subparsers: Any, common: argparse.ArgumentParser) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "replay",
        parents=[common],
        help="decode, sample, sign and store a capture file (sends nothing)",
    )
    p.add_argument("file", metavar="FILE", help="pcap or pcapng file of flow export datagrams")
    p.add_argument("--rate", type=float, metavar="R", help="sampling rate (default: config)")
    p.add_argument("--port", type=_port, metavar="N", help="only datagrams to this UDP port")
    p.add_argument("--sampling-override", action="append", default=[], metavar="EXPORTER=N")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--no-store", action="store_true", help="sign but do not store")
    p.set_defaults(func=run)


@dataclass
class ReplaySummary:
    datagrams: int = 0
    records: int = 0
    malformed: int = 0
    truncated_frames: int = 0
    sampled: int = 0
    expected_sampled: float = 0.0
    reports_new: int = 0
    reports_duplicate: int = 0
    seconds: float = 0.0


class _Progress:
    """A one-line progress bar on a terminal; silent otherwise."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total, self.stream = max(total, 1), stream
        self.enabled = stream.isatty()
        self._last = 0.0

    def update(self, done: int, summary: ReplaySummary, *, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self._last < 0.2):
            return
        self._last = now
        width = 30
        filled = int(width * min(done, self.total) / self.total)
        self.stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * done // self.total:3d}% "
            f"records={summary.records} sampled={summary.sampled}" + ("\n" if final else "")
        )
        self.stream.flush()


def run(args: argparse.Namespace) -> int:
    # The decoders and the sampler load only for `replay`: every other command starts faster.
    from overflowd.flowsample import Sampler
    from overflowd.pipeline import ReportMaker, policy_from_settings
    from overflowd.wire import CaptureReader, DecoderState, decode_datagram_rows

    ctx = context(args)
    identity = load_identity(ctx.home)
    settings = ctx.settings
    if args.rate is not None and not 0 < args.rate <= 1:
        raise UsageError("--rate must be in (0, 1]")
    policy = policy_from_settings(settings, args.rate)
    sampler = Sampler(policy)
    maker = ReportMaker.for_node(identity, settings, policy)
    state = DecoderState(overrides=_overrides(args.sampling_override))
    capture = CaptureReader()
    summary = ReplaySummary()
    store: Store | None = None
    started = time.monotonic()
    pending: list[rpt.SignedReport] = []

    def flush() -> None:
        nonlocal store
        if pending and not args.no_store and store is None:
            store = ctx.open_store()  # opened (and created) only once there is a report for it
        if store is not None and pending:
            received = now_ms()
            new = store.add_reports([(r, received, "import") for r in pending])
            summary.reports_new += new
            summary.reports_duplicate += len(pending) - new
        pending.clear()

    try:
        with open(args.file, "rb") as source:
            size = source.seek(0, 2)
            source.seek(0)
            progress = _Progress(size, sys.stderr)
            for datagram in capture.udp_datagrams(source, port=args.port):
                summary.datagrams += 1
                try:
                    records = decode_datagram_rows(
                        datagram.payload, datagram.src, state, datagram.timestamp
                    )
                except DecodeError:
                    summary.malformed += 1
                    continue
                summary.records += len(records)
                sampled = sampler.sample(records)
                if sampled:
                    pending.extend(maker.make_all(sampled, now_ms()))
                    summary.sampled += len(sampled)
                    if len(pending) >= STORE_BATCH:
                        flush()
                progress.update(source.tell(), summary)
            flush()
            progress.update(size, summary, final=True)
    except OSError as exc:
        raise OverflowdError(
            f"cannot read {args.file}: {exc.strerror or exc}{_stored(summary, args.no_store)}"
        ) from None
    except DecodeError as exc:  # the capture itself is corrupt (a frame is, not a datagram)
        flush()  # what was decoded before the corrupt frame is kept, and said
        raise OverflowdError(f"{args.file}: {exc}{_stored(summary, args.no_store)}") from None
    finally:
        if store is not None:
            store.close()
    summary.truncated_frames = capture.statistics().truncated_frames
    summary.expected_sampled = sampler.statistics().expected_sampled
    summary.seconds = time.monotonic() - started
    _print_summary(summary, args.json)
    return 0


def _stored(summary: ReplaySummary, no_store: bool) -> str:
    if summary.datagrams == 0:
        return ""
    if no_store:
        return f"; cut short after {summary.datagrams} datagrams (--no-store: nothing stored)"
    return (
        f"; cut short after {summary.datagrams} datagrams, {summary.reports_new} reports "
        f"stored ({summary.reports_duplicate} duplicates)"
    )


def _print_summary(summary: ReplaySummary, as_json: bool) -> None:
    fields = dict(vars(summary))
    fields["expected_sampled"] = round(summary.expected_sampled, 3)
    fields["seconds"] = round(summary.seconds, 3)
    if as_json:
        print(json.dumps(fields))
        return
    print(
        f"datagrams {summary.datagrams}  records {summary.records}  malformed "
        f"{summary.malformed}  truncated frames {summary.truncated_frames}\n"
        f"sampled {summary.sampled} (expected {summary.expected_sampled:.1f})  reports stored "
        f"{summary.reports_new} new, {summary.reports_duplicate} duplicate  "
        f"in {summary.seconds:.2f} s; nothing was sent"
    )
