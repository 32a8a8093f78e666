#!/usr/bin/env python3
"""NetFlow v5 decode + sample, records/s: the scalar path beside the numpy batch path.

Not a test: it prints figures. The shared trace (real NetFlow v5, 2708 datagrams, 78,684
records) is loaded in memory once with ``CaptureReader().udp_datagrams``; each candidate
decodes and samples it ``--repeat`` times per run, runs go round-robin (so a burst of load
from other work on the machine hurts every candidate alike) and the best of ``--runs`` is
kept, in wall time and, separately, in this process's CPU time (``time.process_time``: what
one core spent, less sensitive to a shared machine than wall time). The garbage collector
is on, as in a daemon.

Candidates, all at rate 1e-6 with a fresh ``DecoderState`` per run:

- ``scalar``: ``decode_datagram_rows`` + ``Sampler.sample`` per datagram (today's path);
- ``batch/B``: ``decode_v5_batch`` over batches of B datagrams + ``BatchSampler.sample`` +
  ``V5Batch.rows`` for the records sampled (FlowRows built only for those) — the whole
  work a daemon's decode loop does, B being how many datagrams it takes from its channel
  at once;
- ``batch/B +policy``: the same with operator prefixes and an asked-boost lookup (a dict
  get, standing in for the DNS cache) configured: the two-stage thinning path.

Usage::

    .venv/bin/python bench/v5_batch.py [--runs 15] [--repeat 1] [--batch 256,2708,64]
                                       [--cpu N] [--json]

The goal line is judged on the first batch size (default 256 datagrams, about 7,400
records: the arrays of a batch stay in the CPU's L2 cache; a whole-trace batch of 78,684
records does not, and is slower), in wall time. ``--cpu N`` pins the process to core N.
The load average is printed: on a shared machine, read the CPU-time column too.

The trace is ``<repo>/../shared/data/netflow_v5_simpleweb.pcap``; ``OVERFLOWD_SHARED``
overrides the ``shared`` directory.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from overflowd.errors import DecodeError  # noqa: E402
from overflowd.flowsample import IPAddress, Sampler, SamplingPolicy  # noqa: E402
from overflowd.flowsample_batch import BatchSampler  # noqa: E402
from overflowd.wire import CaptureReader, DecoderState, decode_datagram_rows  # noqa: E402
from overflowd.wire.v5_batch import decode_v5_batch  # noqa: E402

GOAL_RECORDS_PER_S = 5_000_000
SAMPLE_RATE = 1e-6
TRACE_NAME = "data/netflow_v5_simpleweb.pcap"

Datagram = tuple[bytes, str, float]


def trace_path() -> Path:
    shared = os.environ.get("OVERFLOWD_SHARED")
    base = Path(shared) if shared else REPO.parent / "shared"
    return base / TRACE_NAME


def load_trace(path: Path) -> list[Datagram]:
    with path.open("rb") as f:
        return [(d.payload, d.src, d.timestamp) for d in CaptureReader().udp_datagrams(f)]


def scalar_runner(datagrams: Sequence[Datagram], repeat: int) -> Callable[[], int]:
    def run() -> int:
        state = DecoderState()
        sample = Sampler(SamplingPolicy(rate=SAMPLE_RATE)).sample
        n = 0
        for _ in range(repeat):
            for data, exporter, now in datagrams:
                try:
                    rows = decode_datagram_rows(data, exporter, state, now)
                except DecodeError:
                    continue
                n += len(rows)
                sample(rows)
        return n

    return run


def _asked_table() -> Callable[[IPAddress], float | None]:
    table: dict[IPAddress, float] = {ipaddress.IPv4Address("122.166.1.1"): 10.0}
    return table.get


def busy_policy() -> SamplingPolicy:
    return SamplingPolicy(
        rate=SAMPLE_RATE,
        operator_prefixes=[
            (ipaddress.ip_network("10.0.0.0/8"), 0.1),
            (ipaddress.ip_network("122.166.0.0/16"), 2.0),
            (ipaddress.ip_network("192.0.2.0/24"), 50.0),
        ],
        asked_boost=_asked_table(),
    )


def batch_runner(
    datagrams: Sequence[Datagram], repeat: int, size: int, policy: SamplingPolicy
) -> Callable[[], int]:
    chunks = [datagrams[i : i + size] for i in range(0, len(datagrams), size)]

    def run() -> int:
        state = DecoderState()
        sampler = BatchSampler(policy)
        n = 0
        kept = 0
        for _ in range(repeat):
            for chunk in chunks:
                batch = decode_v5_batch(chunk, state)
                indices, _p = sampler.sample(batch)
                kept += len(batch.rows(indices))
                n += len(batch)
        return n

    return run


def best_rates(
    candidates: Sequence[tuple[str, Callable[[], int]]], runs: int
) -> dict[str, tuple[float, float]]:
    """(wall, cpu) records/s of each candidate's fastest run, runs round-robin."""
    best = {name: (0.0, 0.0) for name, _ in candidates}
    for _ in range(runs):
        for name, run_once in candidates:
            w0, c0 = time.perf_counter(), time.process_time()
            n = run_once()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            old_w, old_c = best[name]
            best[name] = (
                max(old_w, n / wall if wall > 0 else 0.0),
                max(old_c, n / cpu if cpu > 0 else 0.0),
            )
    return best


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=15, help="best of N runs (default 15)")
    parser.add_argument("--repeat", type=int, default=1, help="trace passes per run")
    parser.add_argument("--cpu", type=int, default=None, help="pin the process to this core")
    parser.add_argument(
        "--batch", default="256,2708,64", help="datagrams per batch, comma-separated"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.batch.split(",") if s]
    except ValueError:
        parser.error("--batch takes comma-separated integers")
    if not sizes or min(sizes) < 1 or args.runs < 1 or args.repeat < 1:
        parser.error("--runs, --repeat and batch sizes must be >= 1")

    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})
        except (AttributeError, OSError) as exc:
            print(f"error: cannot pin to core {args.cpu}: {exc}", file=sys.stderr)
            return 1

    path = trace_path()
    try:
        datagrams = load_trace(path)
    except OSError as exc:
        print(f"error: cannot read the trace {path}: {exc}", file=sys.stderr)
        return 1
    records = sum(len(b) for b in [decode_v5_batch(datagrams, DecoderState())])

    candidates: list[tuple[str, Callable[[], int]]] = [
        ("scalar", scalar_runner(datagrams, args.repeat))
    ]
    for size in sizes:
        candidates.append(
            (f"batch/{size}", batch_runner(datagrams, args.repeat, size, SamplingPolicy()))
        )
    for size in sizes:
        candidates.append(
            (f"batch/{size} +policy", batch_runner(datagrams, args.repeat, size, busy_policy()))
        )
    best = best_rates(candidates, args.runs)
    headline = f"batch/{sizes[0]}"
    met = best[headline][0] >= GOAL_RECORDS_PER_S

    if args.json:
        out = {
            "trace": str(path),
            "datagrams": len(datagrams),
            "records": records,
            "runs": args.runs,
            "repeat": args.repeat,
            "rate": SAMPLE_RATE,
            "records_per_s": {k: {"wall": w, "cpu": c} for k, (w, c) in best.items()},
            "goal_records_per_s": GOAL_RECORDS_PER_S,
            "goal_measured_on": headline,
            "goal_met": met,
            "load_average": os.getloadavg(),
            "cpu": args.cpu,
        }
        print(json.dumps(out, indent=2))
        return 0

    print(
        f"trace {path.name}: {len(datagrams)} datagrams, {records} records; "
        f"rate {SAMPLE_RATE:g}; best of {args.runs} runs x {args.repeat} passes; one core"
        f"{'' if args.cpu is None else f' (pinned to {args.cpu})'}; load average "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    print(f"{'path':<24}{'wall rec/s':>14}{'cpu rec/s':>14}{'vs scalar':>11}")
    base = best["scalar"][0]
    for name, (wall, cpu) in best.items():
        ratio = f"{wall / base:.1f}x" if base else "-"
        print(f"{name:<24}{wall / 1e6:>13.2f}M{cpu / 1e6:>13.2f}M{ratio:>11}")
    verdict = "MET" if met else "NOT MET"
    print(
        f"goal: decode + sample >= {GOAL_RECORDS_PER_S / 1e6:.0f}M NetFlow v5 records/s per "
        f"core (wall, {headline}): {best[headline][0] / 1e6:.2f}M -> {verdict}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
