#!/usr/bin/env python3
"""Template-state benchmark: what NetFlow v9 / IPFIX templates cost in work and memory.

Not a test: it prints figures, all from the same run so that rows compare.

1. **Decode MB/s, one core**: the shared trace's NetFlow v5 datagrams (the reference) beside
   datagrams of *tiny templates* (one field each, 8 bytes a template record, about 1400 bytes a
   datagram) — identical re-announcements (what a real exporter sends), churn from one
   exporter (every datagram changes every template), and churn from 256 spoofed exporters.
   Arrival times advance 1 ms per datagram (1000 datagrams/s of simulated time). Each state
   is fed the datagrams once untimed first (templates learned, burst allowances spent: the
   steady state of a flood), then timed. Also: templates compiled (learned + updated) per
   simulated second per exporter while timed.
2. **Bytes held by a full template cache** (tracemalloc: what is freed when the cache's
   templates go) after a flood of ``max_templates`` + 256 distinct templates from as many
   spoofed exporters, for 15-field flow templates and for templates of
   ``max_template_fields`` fields, beside the cache's byte cap and its own estimate (where the
   decoder has them), and apart from them the per-exporter learning buckets (bounded by
   ``max_template_exporters``, not by the byte cap).
3. **A real exporter beside a churning second source**: the real one announces 20 flow
   templates every 30 s and sends data for one of them every 50 ms (each used once a
   second); the other sends 20 new templates per datagram at 250 datagrams/s. Records the
   real exporter got decoded, of those it sent.

Usage::

    .venv/bin/python bench/templates.py           # several minutes
    .venv/bin/python bench/templates.py --quick   # about 3 minutes (8 on the old decoder)

Written against the decoder's public interface (``decode_datagram``, ``DecoderState``,
``Limits``; the cache's byte estimate and bucket table only where they exist) so the same
script runs on older code for a before/after: ``PYTHONPATH=<old tree>``. Datagrams are built
here from RFC 3954 / RFC 7011, not by our encoder. Sends nothing anywhere. The trace is
``<repo>/../shared/data/netflow_v5_simpleweb.pcap``; ``OVERFLOWD_SHARED`` overrides ``shared``.
"""

from __future__ import annotations

import argparse
import gc
import os
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRACE_NAME = "data/netflow_v5_simpleweb.pcap"
EXPORTER = "192.0.2.1"
ATTACKER = "198.51.100.66"
T0 = 1_700_000_000.0
DATAGRAM_BYTES = 1400
MiB = 1024 * 1024

V9_HEADER = struct.Struct("!HHIIII")
IPFIX_HEADER = struct.Struct("!HHIII")

#: A 15-field IPv4 flow template (softflowd/pmacct-like).
FLOW_FIELDS = (
    (8, 4),
    (12, 4),
    (7, 2),
    (11, 2),
    (4, 1),
    (2, 4),
    (1, 4),
    (6, 1),
    (5, 1),
    (16, 4),
    (17, 4),
    (22, 4),
    (21, 4),
    (10, 2),
    (14, 2),
)


def trace_path() -> Path:
    shared = os.environ.get("OVERFLOWD_SHARED")
    base = Path(shared) if shared else REPO.parent / "shared"
    return base / TRACE_NAME


def load_v5(path: Path) -> list[bytes]:
    from overflowd.wire import CaptureReader

    with path.open("rb") as f:
        return [d.payload for d in CaptureReader().udp_datagrams(f)]


# -- datagrams, from the RFCs -------------------------------------------------------------------


def _set(set_id: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack("!HH", set_id, 4 + len(body)) + body


def _template(template_id: int, fields: Sequence[tuple[int, int]]) -> bytes:
    return struct.pack("!HH", template_id, len(fields)) + b"".join(
        struct.pack("!HH", e, n) for e, n in fields
    )


def v9(sets: bytes, *, sequence: int = 0, source_id: int = 0) -> bytes:
    return V9_HEADER.pack(9, 0, 100_000, int(T0), sequence, source_id) + sets


def ipfix(sets: bytes, *, sequence: int = 0, domain: int = 0) -> bytes:
    return IPFIX_HEADER.pack(10, 16 + len(sets), int(T0), sequence, domain) + sets


def tiny_templates(fmt: str, datagrams: int, *, churn: bool) -> list[bytes]:
    """Datagrams that fill ~1400 bytes with one-field templates. Without churn every datagram
    re-announces the same templates; with churn each one changes the element of every
    template and moves on through the id space."""
    head = V9_HEADER.size if fmt == "v9" else IPFIX_HEADER.size
    per_datagram = (DATAGRAM_BYTES - head - 4) // 8
    out = []
    for d in range(datagrams):
        base = d * per_datagram if churn else 0
        element = 1 + d % 2 if churn else 1
        body = b"".join(
            _template(256 + (base + k) % 65280, [(element, 4)]) for k in range(per_datagram)
        )
        build = v9 if fmt == "v9" else ipfix
        out.append(build(_set(0 if fmt == "v9" else 2, body), sequence=d))
    return out


def flow_record(i: int) -> bytes:
    values = {
        8: 0x0A000000 + i,
        12: 0xC0000201,
        7: 1024 + i % 60000,
        11: 443,
        4: 6,
        2: 3,
        1: 1500,
        6: 0x1B,
        5: 0,
        16: 64500,
        17: 64501,
        22: 90_000,
        21: 95_000,
        10: 1,
        14: 2,
    }
    return b"".join(values[e].to_bytes(n, "big") for e, n in FLOW_FIELDS)


# -- runners --------------------------------------------------------------------------------------


def best_rates(
    cands: Sequence[tuple[str, Callable[[], tuple[int, float]]]], runs: int
) -> dict[str, float]:
    """Units/s of each candidate's fastest run (a run returns units and the seconds they
    took), round-robin so that load from elsewhere hits every candidate alike."""
    best = {name: 0.0 for name, _ in cands}
    for _ in range(runs):
        for name, run in cands:
            n, dt = run()
            if n and dt > 0:
                best[name] = max(best[name], n / dt)
    return best


def decoder_runner(
    datagrams: Sequence[bytes], exporters: Sequence[str], repeat: int, compiled: list[float]
) -> Callable[[], tuple[int, float]]:
    """A fresh state is fed the datagrams once untimed (templates learned, buckets spent:
    the steady state of a flood), then ``repeat`` times timed; returns (bytes, seconds).
    ``compiled`` gets the templates compiled per simulated second per exporter while timed.
    """
    from overflowd.errors import DecodeError
    from overflowd.wire import DecoderState, decode_datagram

    def run() -> tuple[int, float]:
        state = DecoderState()
        now = T0
        n = 0
        exporter_count = len(exporters)

        def feed(passes: int) -> int:
            nonlocal now
            size = 0
            for _ in range(passes):
                for i, data in enumerate(datagrams):
                    now += 0.001
                    try:
                        decode_datagram(data, exporters[i % exporter_count], state, now)
                    except DecodeError:
                        pass
                    size += len(data)
            return size

        feed(1)
        before = state.statistics()
        start_now = now
        t0 = time.perf_counter()
        n = feed(repeat)
        dt = time.perf_counter() - t0
        after = state.statistics()
        learned = after.templates_learned + after.templates_updated
        learned -= before.templates_learned + before.templates_updated
        compiled[:] = [learned / (now - start_now) / exporter_count]
        return n, dt

    return run


def part1(v5: list[bytes], *, quick: bool) -> None:
    n_dg, repeat, runs = (200, 1, 2) if quick else (500, 2, 5)
    print(f"\n== 1. decode MB/s, one core ({n_dg} datagrams x{repeat} per run, best of {runs}) ==")
    spoofed = [f"10.0.{i // 256}.{i % 256}" for i in range(256)]
    cases: list[tuple[str, list[bytes], list[str], str]] = [
        ("NetFlow v5, shared trace", v5, [EXPORTER], "reference"),
        (
            "v9 tiny templates, re-announced",
            tiny_templates("v9", n_dg, churn=False),
            [EXPORTER],
            "a real exporter's refresh",
        ),
        (
            "v9 tiny templates, churn",
            tiny_templates("v9", n_dg, churn=True),
            [EXPORTER],
            "one source",
        ),
        (
            "v9 tiny templates, churn x256",
            tiny_templates("v9", n_dg, churn=True),
            spoofed,
            "256 spoofed sources",
        ),
        (
            "IPFIX tiny templates, re-announced",
            tiny_templates("ipfix", n_dg, churn=False),
            [EXPORTER],
            "a real exporter's refresh",
        ),
        (
            "IPFIX tiny templates, churn",
            tiny_templates("ipfix", n_dg, churn=True),
            [EXPORTER],
            "one source",
        ),
    ]
    compiled: dict[str, list[float]] = {name: [0.0] for name, *_ in cases}
    cands = [
        (
            name,
            decoder_runner(dgs, exps, repeat, compiled[name]),
        )
        for name, dgs, exps, _ in cases
    ]
    got = best_rates(cands, runs)
    ref = got[cases[0][0]]
    print(f"  {'datagrams':36} {'MB/s':>8} {'x v5':>7} {'compiled/s/exporter':>20}  note")
    for name, _dgs, _exps, note in cases:
        rate = got[name]
        per_s = "-" if name.startswith("NetFlow") else f"{compiled[name][0]:.0f}"
        print(f"  {name:36} {rate / 1e6:>8.2f} {rate / ref:>7.3f} {per_s:>20}  {note}")


def _held_by_cache(
    datagrams: Sequence[tuple[bytes, str]],
) -> tuple[int, int, int | None, int | None]:
    """Feed the datagrams (one simulated second apart); return (templates held, bytes freed
    when the cache's templates go, bytes of its per-exporter learning state, the cache's own
    estimate or None)."""
    from overflowd.errors import DecodeError
    from overflowd.wire import DecoderState, decode_datagram

    gc.collect()
    tracemalloc.start()
    try:
        state = DecoderState()
        now = T0
        for data, exporter in datagrams:
            now += 1.0
            try:
                decode_datagram(data, exporter, state, now)
            except DecodeError:
                pass
        held = state.statistics().templates
        cache = state.templates
        estimate = getattr(cache, "bytes", None)
        state.templates = None  # type: ignore[assignment]
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        buckets = getattr(cache, "_buckets", None)
        has_buckets = buckets is not None
        if buckets is not None:  # learning state (bounded by max_template_exporters)
            buckets.clear()
            gc.collect()
        middle = tracemalloc.get_traced_memory()[0]
        del cache, buckets
        gc.collect()
        end = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return held, middle - end, start - middle if has_buckets else None, estimate


def part2() -> None:
    from overflowd.wire import Limits

    limits = Limits()
    n = limits.max_templates + 256
    cap = getattr(limits, "max_template_bytes", None)
    print(
        f"\n== 2. bytes held by a full template cache: {n} distinct templates from {n} spoofed "
        f"exporters (default Limits: max_templates {limits.max_templates}, byte cap "
        f"{'none' if cap is None else f'{cap / MiB:.1f} MiB'}) =="
    )
    print(
        f"  {'templates':26} {'held':>6} {'MiB (tracemalloc)':>18} {'cap MiB':>8} "
        f"{'estimate MiB':>13} {'B/template':>11} {'buckets MiB':>12}"
    )
    wide = [(1 + i % 400, 4) for i in range(limits.max_template_fields)]
    for name, fields in (
        (f"{len(FLOW_FIELDS)}-field flow template", list(FLOW_FIELDS)),
        (f"{len(wide)}-field template", wide),
    ):
        datagrams = [
            (
                v9(_set(0, _template(256 + i % 65280, fields))),
                f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}",
            )
            for i in range(n)
        ]
        held, freed, buckets, estimate = _held_by_cache(datagrams)
        est = "-" if estimate is None else f"{estimate / MiB:.2f}"
        capm = "-" if cap is None else f"{cap / MiB:.1f}"
        per = freed // held if held else 0
        print(
            f"  {name:26} {held:>6} {freed / MiB:>18.2f} {capm:>8} {est:>13} {per:>11} "
            f"{'-' if buckets is None else f'{buckets / MiB:.2f}':>12}"
        )


def churn_datagram(n: int) -> bytes:
    """The n-th datagram of a churning source: 20 templates, never seen before in that form
    (ids move through the id space, layouts change between passes)."""
    fields = FLOW_FIELDS[: 4 + n % 7]
    body = b"".join(_template(256 + (n * 20 + k) % 65280, fields) for k in range(20))
    return v9(_set(0, body), sequence=n)


def part3(*, quick: bool) -> None:
    from overflowd.errors import DecodeError
    from overflowd.wire import DecoderState, decode_datagram

    seconds = 40 if quick else 120
    print(
        f"\n== 3. a real exporter ({EXPORTER}: 20 templates every 30 s; data for one of them "
        f"every 50 ms, so each is used once a second) beside a churning second source "
        f"({ATTACKER}: 20 new templates per datagram, 250 datagrams/s), {seconds} simulated "
        f"seconds =="
    )
    templates = v9(_set(0, b"".join(_template(256 + k, FLOW_FIELDS) for k in range(20))))
    data = [
        v9(_set(256 + k, b"".join(flow_record(k * 5 + j) for j in range(5))), sequence=k)
        for k in range(20)
    ]
    for with_churn in (False, True):
        state = DecoderState()
        sent = got = 0
        n = 0
        t0 = time.perf_counter()
        for tick in range(seconds * 250):  # 4 ms
            now = T0 + tick * 0.004
            try:
                if tick % 7500 == 0:
                    got += len(decode_datagram(templates, EXPORTER, state, now))
                if tick % 12 == 0:
                    sent += 5
                    got += len(decode_datagram(data[tick // 12 % 20], EXPORTER, state, now))
                if with_churn:
                    decode_datagram(churn_datagram(n), ATTACKER, state, now)
                    n += 1
            except DecodeError:
                pass
        # What is still held for a template may yet be rescued; count it apart.
        wall = time.perf_counter() - t0
        stats = state.statistics()
        compiled = stats.templates_learned + stats.templates_updated
        label = "with churn" if with_churn else "alone"
        print(
            f"  {label:11} records decoded {got}/{sent} ({100 * got / sent:.1f}%, lost "
            f"{100 - 100 * got / sent:.1f}%); held for a template {stats.pending_sets} sets; "
            f"templates compiled {compiled} ({compiled / seconds:.0f}/simulated s); evicted "
            f"{stats.templates_evicted}; wall {wall:.1f} s"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer datagrams, rougher figures")
    args = parser.parse_args(argv)
    path = trace_path()
    if not path.exists():
        print(f"trace not found: {path} (set OVERFLOWD_SHARED)", file=sys.stderr)
        return 1
    started = time.monotonic()
    print(
        f"bench/templates.py{' --quick' if args.quick else ''}: "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print("note: figures are noisy when the machine is shared; compare rows of the same run.")
    part1(load_v5(path), quick=args.quick)
    part2()
    part3(quick=args.quick)
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
