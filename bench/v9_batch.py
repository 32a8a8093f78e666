#!/usr/bin/env python3
"""NetFlow v9 and IPFIX decode + sample, records/s: the scalar path beside the array path.

Not a test: it prints figures, all from one run so that rows compare. The shared trace's
NetFlow v5 records (2708 datagrams, 78,684 records) are re-exported here the way softflowd
exports them — NetFlow v9 with its 16-field IPv4 template and sysUpTime times, IPFIX with
millisecond times and 8-byte counters, IPFIX with sysUpTime times and
systemInitTimeMilliseconds in options data; templates re-announced every 16 datagrams, one
data set a datagram (about 29 records) — and loaded in memory once. Each candidate decodes
and samples every datagram once per run, at rate 1e-6 with a fresh ``DecoderState``; runs go
round-robin and the best of ``--runs`` is kept, in wall time and in this process's CPU time.

- ``scalar``: ``decode_datagram_rows`` + ``Sampler.sample`` per datagram (the path before);
- ``batch/B``: ``decode_template_batch`` over batches of B datagrams + ``BatchSampler.sample``
  + ``TemplateBatch.rows`` for the records sampled — the work of the daemon's decode loop.

With ``--softflowd`` (needs softflowd), real exporter output too: softflowd 1.1 exports a
generated capture (tests/support/softflowd_local.py: 40,000 TEST-NET flows, 2% ICMP) as
NetFlow v9 and as IPFIX to a socket on 127.0.0.1 — many data sets a datagram (its IPv4
and ICMP templates alternate), templates, options template and options data every 16
datagrams — rows ``softflowd-v9`` and ``softflowd-ipfix``.

Usage::

    .venv/bin/python bench/v9_batch.py [--runs 7] [--batch 256,64] [--cpu N] [--softflowd]
                                       [--json]

The goal line (#16: at least 5M records/s per core for v9/IPFIX in process) is judged on the
first batch size, in CPU time (this machine is shared; the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from overflowd.errors import DecodeError  # noqa: E402
from overflowd.flowsample import Sampler, SamplingPolicy  # noqa: E402
from overflowd.flowsample_batch import BatchSampler  # noqa: E402
from overflowd.wire import CaptureReader, DecoderState, decode_datagram_rows  # noqa: E402
from overflowd.wire.template_batch import decode_template_batch  # noqa: E402
from tests.support import softflowd_local  # noqa: E402

GOAL_RECORDS_PER_S = 5_000_000
SAMPLE_RATE = 1e-6
TRACE_NAME = "data/netflow_v5_simpleweb.pcap"

Datagram = tuple[bytes, str, float]

V5_HEADER = struct.Struct("!HHIIIIBBH")
V5_RECORD = struct.Struct("!IIIHHIIIIHHxBBBHHBBxx")
#: softflowd's NetFlow v9 IPv4 template; IPFIX with ms times; IPFIX with sysUpTime times.
FIELDS = {
    "v9": (
        (8, 4), (12, 4), (21, 4), (22, 4), (1, 4), (2, 4), (10, 4), (14, 4),
        (7, 2), (11, 2), (4, 1), (6, 1), (60, 1), (5, 1), (16, 2), (17, 2),
    ),
    "ipfix-ms": (
        (8, 4), (12, 4), (152, 8), (153, 8), (1, 8), (2, 8), (10, 4), (14, 4),
        (7, 2), (11, 2), (4, 1), (6, 2), (60, 1), (5, 1), (16, 4), (17, 4),
    ),
    "ipfix-sysup": (
        (8, 4), (12, 4), (22, 4), (21, 4), (1, 4), (2, 4), (7, 2), (11, 2), (4, 1), (6, 1),
        (195, 1), (32, 2),
    ),
}  # fmt: skip


def trace_path() -> Path:
    shared = os.environ.get("OVERFLOWD_SHARED")
    base = Path(shared) if shared else REPO.parent / "shared"
    return base / TRACE_NAME


def _set(set_id: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack("!HH", set_id, 4 + len(body)) + body


def reexport(v5: Sequence[Datagram], fmt: str) -> list[Datagram]:
    """The v5 records as softflowd would send them in ``fmt`` (see the module docstring)."""
    fields = FIELDS[fmt]
    template = struct.pack("!HH", 256, len(fields)) + b"".join(
        struct.pack("!HH", e, n) for e, n in fields
    )
    out = []
    for n, (data, exporter, now) in enumerate(v5):
        _, count, uptime, secs, nsecs, _, _, _, _ = V5_HEADER.unpack_from(data)
        boot_ms = secs * 1000 + nsecs // 1_000_000 - uptime
        records = []
        for i in range(count):
            (src, dst, _, _, _, pkts, octets, first, last, sport, dport, flags, proto, tos,
             sas, das, _, _) = V5_RECORD.unpack_from(data, 24 + 48 * i)  # fmt: skip
            values = {8: src, 12: dst, 1: octets, 2: pkts, 7: sport, 11: dport, 4: proto,
                      6: flags, 5: tos, 195: tos >> 2, 16: sas, 17: das, 22: first, 21: last,
                      152: boot_ms + first, 153: boot_ms + last, 60: 4, 10: 1, 14: 2,
                      32: dport if proto == 1 else 0}  # fmt: skip
            records.append(
                b"".join((values[e] % (1 << (8 * k))).to_bytes(k, "big") for e, k in fields)
            )
        sets = b""
        if fmt == "v9":
            if n % 16 == 0:
                sets += _set(0, template)
            sets += _set(256, b"".join(records))
            out.append((struct.pack("!HHIIII", 9, count, uptime, secs, n, 0) + sets, exporter, now))
            continue
        if n % 16 == 0:
            sets += _set(2, template)
            if fmt == "ipfix-sysup":
                sets += _set(3, struct.pack("!HHHHHHH", 257, 2, 1, 149, 4, 160, 8))
                sets += _set(257, struct.pack("!IQ", 0, boot_ms))
        sets += _set(256, b"".join(records))
        out.append((struct.pack("!HHIII", 10, 16 + len(sets), secs, n, 0) + sets, exporter, now))
    return out


def softflowd_exports(flows: int = 40_000) -> dict[str, list[Datagram]]:
    """softflowd's NetFlow v9 and IPFIX export of a generated capture (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="v9_batch-") as tmp:
        work = Path(tmp)
        capture = work / "traffic.pcap"
        softflowd_local.write_capture(capture, flows, seed=1, icmp_share=0.02)
        out = {}
        for name, version in (("softflowd-v9", 9), ("softflowd-ipfix", 10)):
            payloads = softflowd_local.export(capture, version, work)
            out[name] = [(p, "127.0.0.1", 1_700_000_000.0) for p in payloads]
        return out


def scalar_runner(datagrams: Sequence[Datagram]) -> Callable[[], int]:
    def run() -> int:
        state = DecoderState()
        sample = Sampler(SamplingPolicy(rate=SAMPLE_RATE)).sample
        n = 0
        for data, exporter, now in datagrams:
            try:
                rows = decode_datagram_rows(data, exporter, state, now)
            except DecodeError:
                continue
            n += len(rows)
            sample(rows)
        return n

    return run


def batch_runner(datagrams: Sequence[Datagram], size: int) -> Callable[[], int]:
    chunks = [datagrams[i : i + size] for i in range(0, len(datagrams), size)]

    def run() -> int:
        state = DecoderState()
        sampler = BatchSampler(SamplingPolicy(rate=SAMPLE_RATE))
        scalar = Sampler(SamplingPolicy(rate=SAMPLE_RATE)).sample
        n = 0
        for chunk in chunks:
            batch = decode_template_batch(chunk, state)
            indices, _p = sampler.sample(batch)
            batch.rows(indices)
            n += len(batch)
            for _, rows in batch.scalar:
                n += len(rows)
                scalar(rows)
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
    parser.add_argument("--runs", type=int, default=7, help="best of N runs (default 7)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the process to this core")
    parser.add_argument("--batch", default="256,64", help="datagrams per batch, comma-separated")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--softflowd", action="store_true", help="also softflowd's export of a capture"
    )
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.batch.split(",") if s]
    except ValueError:
        parser.error("--batch takes comma-separated integers")
    if not sizes or min(sizes) < 1 or args.runs < 1:
        parser.error("--runs and batch sizes must be >= 1")
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})
        except (AttributeError, OSError) as exc:
            print(f"error: cannot pin to core {args.cpu}: {exc}", file=sys.stderr)
            return 1
    path = trace_path()
    try:
        with path.open("rb") as f:
            v5 = [(d.payload, d.src, d.timestamp) for d in CaptureReader().udp_datagrams(f)]
    except OSError as exc:
        print(f"error: cannot read the trace {path}: {exc}", file=sys.stderr)
        return 1

    inputs = {fmt: reexport(v5, fmt) for fmt in FIELDS}
    if args.softflowd:
        if softflowd_local.SOFTFLOWD is None:
            print("error: --softflowd: softflowd is not installed", file=sys.stderr)
            return 1
        inputs.update(softflowd_exports())
    results: dict[str, dict[str, tuple[float, float]]] = {}
    for fmt, datagrams in inputs.items():
        candidates = [("scalar", scalar_runner(datagrams))]
        candidates += [(f"batch/{size}", batch_runner(datagrams, size)) for size in sizes]
        results[fmt] = best_rates(candidates, args.runs)
    headline = f"batch/{sizes[0]}"
    met = {fmt: best[headline][1] >= GOAL_RECORDS_PER_S for fmt, best in results.items()}
    load = os.getloadavg()
    if args.json:
        print(
            json.dumps(
                {
                    "records_per_s": {
                        fmt: {k: {"wall": w, "cpu": c} for k, (w, c) in best.items()}
                        for fmt, best in results.items()
                    },
                    "goal_records_per_s": GOAL_RECORDS_PER_S,
                    "goal_met": met,
                    "load_average": load,
                    "cpu": args.cpu,
                },
                indent=2,
            )
        )
        return 0
    print(
        f"trace {path.name} re-exported: {len(v5)} datagrams a format; rate {SAMPLE_RATE:g}; "
        f"best of {args.runs} runs; load average " + " ".join(f"{x:.2f}" for x in load)
    )
    print(f"{'format':<16}{'path':<12}{'wall rec/s':>12}{'cpu rec/s':>12}{'vs scalar':>11}")
    for fmt, best in results.items():
        base = best["scalar"][1]
        for name, (wall, cpu) in best.items():
            ratio = f"{cpu / base:.1f}x" if base else "-"
            print(f"{fmt:<16}{name:<12}{wall / 1e6:>11.2f}M{cpu / 1e6:>11.2f}M{ratio:>11}")
    for fmt, ok in met.items():
        verdict = "MET" if ok else "NOT MET"
        print(
            f"goal {fmt}: decode + sample >= {GOAL_RECORDS_PER_S / 1e6:.0f}M records/s per core "
            f"(cpu, {headline}): {results[fmt][headline][1] / 1e6:.2f}M -> {verdict}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
