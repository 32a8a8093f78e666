#!/usr/bin/env python3
"""sFlow v5 decode + sample, records/s: the scalar path beside the numpy batch path.

Not a test: it prints figures. Each data set is loaded in memory once; each candidate
decodes and samples it ``--repeat`` times per run, runs go round-robin (a burst of load from
other work on the machine hurts every candidate alike) and the best of ``--runs`` is kept,
in wall time and, separately, in this process's CPU time (``time.process_time``). The
garbage collector is on, as in a daemon.

Data sets:

- ``sfprobe``: real exporter data — pmacct's ``pmacctd`` with its sfprobe plugin exporting the
  shared trace (tests/support/sfprobe.py: 1 in 1, about 450 datagrams of 6 samples, each a
  raw header of an Ethernet/IPv4/UDP frame and an extended switch record), cycled to 512
  datagrams so that every batch is full; skipped, and said, without pmacctd;
- ``switch-like``: written here as a switch or hsflowd exports: expanded flow samples of a
  128-byte raw header (IPv4 and IPv6, TCP and UDP, a quarter of them 802.1Q-tagged) and an
  extended switch record, 7 to a datagram, a counter sample every datagram, 1 in 2048;
- ``ingest-synthetic``: bench/ingest.py part 2's datagrams (10 compact samples of 64-byte
  IPv4 headers).

Candidates, at rate 1e-6 with a fresh ``DecoderState`` per run (the samplers are made once,
as a daemon makes them):

- ``scalar``: ``decode_datagram_rows`` + ``Sampler.sample`` per datagram (the path before);
- ``batch/B``: ``decode_sflow_batch`` over batches of B datagrams + ``BatchSampler.sample`` +
  ``SFlowBatch.rows`` for the records sampled (and the scalar sampler for datagrams that went
  the scalar way) — what the daemon's decode loop does, B being how many datagrams it takes
  at once (the collector's BATCH_DATAGRAMS is 256);
- ``old/B`` with ``--compare FILE``: the same with the ``decode_sflow_batch`` of another
  sflow_batch.py (another tree's, e.g. ``git show main:overflowd/wire/sflow_batch.py``),
  loaded beside this one, so that old and new are timed in the same run.

Usage::

    .venv/bin/python bench/sflow_batch.py [--runs 7] [--repeat 5] [--batch 256,64]
                                          [--cpu N] [--compare FILE] [--json]
    .venv/bin/python bench/sflow_batch.py --daemon [--daemon-tree DIR] [--runs 6]

``--daemon``: the daemon's sFlow CPU per record instead, end to end: ``overflowd run`` from
this checkout (and from ``--daemon-tree DIR``, e.g. ``git archive main overflowd | tar -x -C
DIR``) and sfacctd, each fed bench/ingest.py's sfprobe datagrams at its fixed sFlow rate
(``CPU_RATE``) by its C sender, in 2 s steps that go round-robin ``--runs`` times (the
order reversed every other round), CPU time of each receiver's process tree over the
sending; median and best. bench/ingest.py measures the same once per receiver.

The sfprobe set reads the shared trace from ``$OVERFLOWD_SHARED`` (default: the directory
``shared`` beside the checkout; from a worktree under /work/wt, set it to /work/shared).

The goal (issue #16: in-process decode + sample of sFlow >= 2M records/s per core) is judged
on the first batch size, in CPU time and wall time, on each data set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from overflowd.errors import DecodeError  # noqa: E402
from overflowd.flowsample import Sampler, SamplingPolicy  # noqa: E402
from overflowd.flowsample_batch import BatchSampler  # noqa: E402
from overflowd.wire import DecoderState, decode_datagram_rows  # noqa: E402
from overflowd.wire.sflow_batch import SFlowBatch, decode_sflow_batch  # noqa: E402

GOAL_RECORDS_PER_S = 2_000_000
SAMPLE_RATE = 1e-6
EXPORTER = "192.0.2.1"
NOW = 1_700_000_000.0

Datagram = tuple[bytes, str, float]


# -- data sets --------------------------------------------------------------------------------


def _frame(i: int) -> bytes:
    """A 1000-byte-ish frame's first 128 bytes: IPv4 or IPv6, TCP or UDP, some 802.1Q."""
    tcp = i % 3 != 0
    sport, dport = 1024 + i % 50000, (443, 53, 80, 123)[i % 4]
    if tcp:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, i, 0, 0x50, 0x18, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", sport, dport, 900, 0)
    if i % 5 == 4:
        src = (IPv6Address("2001:db8::") + i % 65536).packed
        dst = (IPv6Address("2001:db8:1::") + i % 251).packed
        ip = struct.pack("!IHBB", 6 << 28, 900 + 20, 6 if tcp else 17, 64) + src + dst
        ethertype = 0x86DD
    else:
        src = (IPv4Address("10.0.0.0") + i % 65536).packed
        dst = (IPv4Address("192.0.2.0") + i % 251).packed
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 940, i & 0xFFFF, 0, 64, 6 if tcp else 17, 0,
                         src, dst)  # fmt: skip
        ethertype = 0x0800
    head = bytes.fromhex("020000000001020000000002")
    if i % 4 == 1:
        head += struct.pack("!HH", 0x8100, 100 + i % 10)
    frame = head + struct.pack("!H", ethertype) + ip + l4
    return (frame + bytes(128))[:128]


def switch_like(datagrams: int) -> list[Datagram]:
    out = []
    for d in range(datagrams):
        samples = []
        for k in range(7):
            header = _frame(d * 7 + k)
            raw = struct.pack("!IIII", 1, 1018, 4, len(header)) + header
            switch = struct.pack("!IIII", 100, 0, 100, 0)
            records = struct.pack("!II", 1, len(raw)) + raw
            records += struct.pack("!II", 1001, len(switch)) + switch
            body = struct.pack("!11I", d, 0, 3, 2048, 2048 * d, 0, 0, 3, 0, 4, 2) + records
            samples.append(struct.pack("!II", 3, len(body)) + body)
        counters = struct.pack("!III", d, 0, 3) + struct.pack("!II", 1, 88) + bytes(88)
        samples.append(struct.pack("!II", 4, len(counters) + 4) + struct.pack("!I", 0) + counters)
        head = struct.pack(
            "!II4sIIII", 5, 1, IPv4Address("192.0.2.10").packed, 0, d, 123456, len(samples)
        )
        out.append((head + b"".join(samples), EXPORTER, NOW + d / 1000))
    return out


def ingest_synthetic(datagrams: int) -> list[Datagram]:
    from bench.ingest import synthetic_sflow

    return [(d, EXPORTER, NOW + i / 1000) for i, d in enumerate(synthetic_sflow(datagrams))]


def sfprobe_export() -> list[Datagram] | str:
    from tests.support import sfprobe
    from tests.support.trace import shared_dir

    if not sfprobe.available():
        return "pmacctd not installed (Debian package pmacct)"
    trace = shared_dir() / "data" / "netflow_v5_simpleweb.pcap"
    if not trace.exists():  # pmacctd exits quietly on a missing file: say which
        return f"no shared trace at {trace} (set OVERFLOWD_SHARED)"
    datagrams = sfprobe.sfprobe_export()
    if not datagrams:
        return "pmacctd exported nothing"
    # Cycled to a multiple of 512 datagrams, so that every batch is full, as at line rate
    # (a last batch of a few datagrams would measure the per-batch cost, not the rate).
    whole = -(-len(datagrams) // 512) * 512
    cycled = [datagrams[i % len(datagrams)] for i in range(whole)]
    return [(d, "127.0.0.1", NOW + i / 1000) for i, d in enumerate(cycled)]


# -- candidates -------------------------------------------------------------------------------


def scalar_runner(datagrams: Sequence[Datagram], repeat: int) -> Callable[[], int]:
    sample = Sampler(SamplingPolicy(rate=SAMPLE_RATE)).sample  # made once, as in a daemon

    def run() -> int:
        state = DecoderState()
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


def batch_runner(
    datagrams: Sequence[Datagram],
    repeat: int,
    size: int,
    decode: Callable[[Sequence[Datagram], DecoderState], SFlowBatch] = decode_sflow_batch,
) -> Callable[[], int]:
    chunks = [datagrams[i : i + size] for i in range(0, len(datagrams), size)]

    policy = SamplingPolicy(rate=SAMPLE_RATE)
    sampler = BatchSampler(policy)  # made once, as in a daemon
    scalar_sample = Sampler(policy).sample

    def run() -> int:
        state = DecoderState()
        n = 0
        for _ in range(repeat):
            for chunk in chunks:
                batch = decode(chunk, state)
                indices, _p = sampler.sample(batch)
                batch.rows(indices)
                n += len(batch)
                for _, rows in batch.scalar:
                    n += len(rows)
                    scalar_sample(rows)
        return n

    return run


def load_decoder(path: Path) -> Callable[[Sequence[Datagram], DecoderState], SFlowBatch]:
    """``decode_sflow_batch`` of another sflow_batch.py, as a module of its own (it imports
    the rest of overflowd from this tree)."""
    spec = importlib.util.spec_from_file_location("_compared_sflow_batch", path)
    if spec is None or spec.loader is None:
        raise OSError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    decode: Callable[[Sequence[Datagram], DecoderState], SFlowBatch] = module.decode_sflow_batch
    return decode


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


def daemon_cpu(runs: int, tree: Path | None, as_json: bool) -> int:
    """``--daemon``: µs of CPU per sFlow record at the fixed rate, receivers round-robin."""
    import shutil
    import statistics
    import tempfile

    from bench import ingest

    path = ingest.trace_path()
    if not path.exists():
        print(f"error: trace not found: {path} (set OVERFLOWD_SHARED)", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="bench-sflow-daemon-"))
    tools = ingest.build_tools(workdir)
    if isinstance(tools, str):
        print(f"error: {tools}", file=sys.stderr)
        return 1
    ds = ingest.datasets(ingest.load_trace(path), workdir, ["sflow"]).get("sflow")
    if ds is None:
        print("error: no sFlow datagrams (pmacctd missing?)", file=sys.stderr)
        return 1
    rate = ingest.CPU_RATE["sflow"]
    sender = ingest.CSender(tools["sender"], ds.write(workdir / "sflow.bin"))
    rcvbuf = 4 << 20
    receivers: list[ingest.Receiver] = []
    load_before = os.getloadavg()
    try:
        receivers.append(ingest.DaemonReceiver(rcvbuf))
        if tree is not None:
            receivers.append(ingest.DaemonReceiver(rcvbuf, tree))
        if shutil.which("sfacctd"):
            receivers.append(ingest.PmacctReceiver("sfacctd", rcvbuf))
        us: dict[str, list[float]] = {rx.name: [] for rx in receivers}
        for rx in receivers:  # warm-up
            ingest.run_step(rx, sender, rate, 0.3, 0.5)
        for k in range(runs):
            for rx in receivers if k % 2 == 0 else receivers[::-1]:
                step = ingest.run_step(rx, sender, rate, 2.0, 0.2)
                if step.sent_records:
                    us[rx.name].append(step.cpu_s / step.sent_records * 1e6)
    finally:
        for rx in receivers:
            rx.close()
        shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()
    out: dict[str, dict[str, float]] = {
        name: {"median_us": statistics.median(v), "best_us": min(v)} for name, v in us.items() if v
    }
    if as_json:
        print(json.dumps({"rate_datagrams_per_s": rate, "receivers": out,
                          "load_average": {"before": load_before, "after": load_after}},
                         indent=2))  # fmt: skip
        return 0
    print(
        f"sFlow CPU per record at {rate:.0f} datagrams/s ({rate * ds.records_per_datagram:.0f}"
        f" records/s), {runs} x 2 s steps each, round-robin; load average "
        + " ".join(f"{x:.2f}" for x in load_before)
        + " before, "
        + " ".join(f"{x:.2f}" for x in load_after)
        + " after"
    )
    reference = out.get("sfacctd", {}).get("median_us")
    for name, r in out.items():
        ratio = f"  {r['median_us'] / reference:.2f}x sfacctd" if reference else ""
        print(f"  {name:28} median {r['median_us']:7.3f} µs, best {r['best_us']:7.3f}{ratio}")
        print(f"  {'':28} steps: " + " ".join(f"{x:.2f}" for x in us[name]))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=7, help="best of N runs (default 7)")
    parser.add_argument("--repeat", type=int, default=5, help="data set passes per run (default 5)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the process to this core")
    parser.add_argument("--batch", default="256,64", help="datagrams per batch, comma-separated")
    parser.add_argument(
        "--compare", type=Path, default=None, help="another sflow_batch.py, timed as old/B"
    )
    parser.add_argument(
        "--daemon", action="store_true", help="the daemon's CPU per record, beside sfacctd"
    )
    parser.add_argument(
        "--daemon-tree", type=Path, default=None, help="with --daemon: also this tree's daemon"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s) for s in args.batch.split(",") if s]
    except ValueError:
        parser.error("--batch takes comma-separated integers")
    if not sizes or min(sizes) < 1 or args.runs < 1 or args.repeat < 1:
        parser.error("--runs, --repeat and batch sizes must be >= 1")
    if args.daemon:
        return daemon_cpu(args.runs, args.daemon_tree, args.json)
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})
        except (AttributeError, OSError) as exc:
            print(f"error: cannot pin to core {args.cpu}: {exc}", file=sys.stderr)
            return 1

    old = None
    if args.compare is not None:
        try:
            old = load_decoder(args.compare)
        except (OSError, ImportError, AttributeError, SyntaxError) as exc:
            print(f"error: cannot load {args.compare}: {exc}", file=sys.stderr)
            return 1
    sets: dict[str, list[Datagram] | str] = {
        "sfprobe": sfprobe_export(),
        "switch-like": switch_like(1024),
        "ingest-synthetic": ingest_synthetic(1024),
    }
    results: dict[str, object] = {}
    headline = f"batch/{sizes[0]}"
    all_met = True
    load_before = os.getloadavg()
    for name, data in sets.items():
        if isinstance(data, str):
            results[name] = {"skipped": data}
            continue
        state = DecoderState()
        check = decode_sflow_batch(data, state)
        records = state.statistics().records
        candidates = [("scalar", scalar_runner(data, args.repeat))]
        for s in sizes:
            candidates.append((f"batch/{s}", batch_runner(data, args.repeat, s)))
            if old is not None:
                candidates.append((f"old/{s}", batch_runner(data, args.repeat, s, old)))
        best = best_rates(candidates, args.runs)
        met = min(best[headline]) >= GOAL_RECORDS_PER_S
        all_met &= met
        results[name] = {
            "datagrams": len(data),
            "records": records,
            "array_path_records": len(check),
            "records_per_s": {k: {"wall": w, "cpu": c} for k, (w, c) in best.items()},
            "goal_met": met,
        }
    load_after = os.getloadavg()

    if args.json:
        out = {
            "runs": args.runs,
            "repeat": args.repeat,
            "rate": SAMPLE_RATE,
            "sets": results,
            "goal_records_per_s": GOAL_RECORDS_PER_S,
            "goal_measured_on": headline,
            "goal_met": all_met,
            "load_average": {"before": load_before, "after": load_after},
            "cpu": args.cpu,
        }
        print(json.dumps(out, indent=2))
        return 0

    print(
        f"sFlow v5 decode + sample, rate {SAMPLE_RATE:g}; best of {args.runs} runs x "
        f"{args.repeat} passes; one core"
        f"{'' if args.cpu is None else f' (pinned to {args.cpu})'}; load average "
        + " ".join(f"{x:.2f}" for x in load_before)
        + " before, "
        + " ".join(f"{x:.2f}" for x in load_after)
        + " after"
    )
    for name, result in results.items():
        assert isinstance(result, dict)
        if "skipped" in result:
            print(f"\n{name}: skipped ({result['skipped']})")
            continue
        print(
            f"\n{name}: {result['datagrams']} datagrams, {result['records']} records "
            f"({result['array_path_records']} on the array path)"
        )
        print(f"  {'path':<14}{'wall rec/s':>12}{'cpu rec/s':>12}{'vs scalar':>11}")
        rates = result["records_per_s"]
        base = rates["scalar"]["cpu"]
        for path, r in rates.items():
            ratio = f"{r['cpu'] / base:.1f}x" if base else "-"
            print(f"  {path:<14}{r['wall'] / 1e6:>11.2f}M{r['cpu'] / 1e6:>11.2f}M{ratio:>11}")
    verdict = "MET" if all_met else "NOT MET"
    print(
        f"\ngoal: decode + sample >= {GOAL_RECORDS_PER_S / 1e6:.0f}M sFlow records/s per core "
        f"({headline}, wall and cpu, every data set): {verdict}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
