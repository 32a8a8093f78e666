"""The victim view's time series: estimated packets and bytes per second, per observer, per
time bucket, from ONE read of the filter's reports (their stored columns, into numpy arrays:
overflowd/store/window.py), grouped there by (observer, bucket).

The sums and estimates are the ones ``who`` and ``top`` use (the per-report terms of
overflowd.store.query's SQL sums, :class:`~overflowd.estimate.Tally`, each observer's own
units), so a bucket's numbers added over the whole span are what ``overflowd-query who`` says
for the same filter. A report falls in the bucket of its flow's last packet (what
``--since`` compares). The span, when the filter gives none, is the reports' own first and
last flow end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from overflowd import report as rpt
from overflowd.store import query as q

if TYPE_CHECKING:
    from overflowd.store.query import ReportFilter
    from overflowd.store.repository import Store

#: About this many buckets across the span, each a round length from this list.
TARGET_BUCKETS = 60
BUCKET_STEPS_MS = tuple(
    s * 1000
    for s in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
)
#: Observers with a stack of their own; the rest add into "other" (the chart stays legible).
MAX_STACKS = 8


@dataclass(frozen=True)
class Series:
    bucket_ms: int
    #: each bucket's start (ms), ascending, every bucket of the span (empty ones too)
    starts: tuple[int, ...]
    #: (observer fingerprint, packets/s, bytes/s per bucket), busiest first
    stacks: tuple[tuple[str, tuple[float, ...], tuple[float, ...]], ...]
    #: the 95% interval of the total per bucket: packets low/high, bytes low/high (per
    #: second; high None: unbounded), of all the bucket's reports with the largest unit
    band_packets: tuple[tuple[float, ...], tuple[float | None, ...]]
    band_bytes: tuple[tuple[float, ...], tuple[float | None, ...]]
    #: reports drawn (in a bucket of the axis)
    reports: int
    #: reports whose flow ends outside the axis (after ``until`` or, without one, after now:
    #: the observer's word, and anyone can sign a flow ending in year 292 million), and their
    #: point estimates of packets and bytes: not drawn, so that they cannot stretch the axis,
    #: but counted, so that drawn + outside is what ``who`` says
    outside_reports: int = 0
    outside_packets: float = 0.0
    outside_bytes: float = 0.0


def bucket_for(span_ms: int) -> int:
    want = max(1, span_ms) / TARGET_BUCKETS
    for step in BUCKET_STEPS_MS:
        if step >= want:
            return step
    return BUCKET_STEPS_MS[-1] * math.ceil(want / BUCKET_STEPS_MS[-1])


def victim_series(store: Store, flt: ReportFilter, *, now_ms: int | None = None) -> Series:
    """The series of ``flt``'s reports. The axis runs from ``since`` (else the earliest flow
    end) to ``until`` (else the latest flow end, but never past ``now_ms`` when given): a
    report whose flow ends beyond it is counted in ``outside_*``, not drawn."""
    import numpy as np

    from overflowd.store import window as wnd

    # The window's rows once (a victim's day through its destination's covering index, as
    # who reads it), grouped by (observer, bucket) in numpy: the span is their first and last
    # flow end, no statement of its own. A GROUP BY (bucket, observer) in SQL evaluated the
    # weights in every aggregate and sorted every row (SQLite: 80 ms of a day's 30,000).
    w = wnd.read_window(store, flt)
    lo_ms, hi_ms = flt.since_ms, flt.until_ms
    if lo_ms is None or hi_ms is None:
        if not len(w):
            return Series(1000, (), (), ((), ()), ((), ()), 0)
        lo_ms = int(w.last_ms.min()) if lo_ms is None else lo_ms
        if hi_ms is None:
            latest = int(w.last_ms.max())
            hi_ms = latest if now_ms is None else min(latest, now_ms)
    hi_ms = max(hi_ms, lo_ms)
    bucket = bucket_for(hi_ms - lo_ms)
    first = lo_ms // bucket
    count = hi_ms // bucket - first + 1
    index = w.last_ms // bucket - first  # flow ends are >= 0: floor is SQL's integer division
    g = wnd.group(w, [w.observer, index])
    units = q._observer_units(store, w.keys)
    # Point estimates per (observer, bucket) straight from the sums (certain + Σ weights, what
    # Tally.estimate's point is; 0 where a report is over the cap); one interval per bucket,
    # of all its observers' sums merged, with the largest of their units (as `top` does
    # across observers): 60 intervals, not one per observer and bucket (0.1 ms each).
    packets = g.certain_packets.astype(np.float64) + np.where(
        g.packets_huge > 0, np.inf, g.packets_total
    )
    byte_counts = g.certain_bytes.astype(np.float64) + np.where(
        g.bytes_huge > 0, np.inf, g.bytes_total
    )
    packets = np.where(np.isfinite(packets), packets, 0.0)
    byte_counts = np.where(np.isfinite(byte_counts), byte_counts, 0.0)
    observer = g.first(w.observer)
    at = g.first(index)
    inside = (at >= 0) & (at < count)
    outside = ~inside
    per: dict[int, dict[int, tuple[float, float]]] = {}
    totals: dict[int, float] = {}
    for o, i, pk, bc in zip(
        observer[inside].tolist(),
        at[inside].tolist(),
        packets[inside].tolist(),
        byte_counts[inside].tolist(),
        strict=True,
    ):
        per.setdefault(o, {})[i] = (pk, bc)
        totals[o] = totals.get(o, 0.0) + pk
    # each bucket's sums, all its observers' reports together (a group per bucket: 60 sums
    # made, not 1,200 merged)
    buckets = wnd.group(w, [index])
    starts = buckets.first(index)
    merged = {
        int(starts[b]): buckets.sums(b)
        for b in np.flatnonzero((starts >= 0) & (starts < count)).tolist()
    }
    unit = q._max_unit(u for u, _ in units.values())
    byte_unit = q._max_unit(b for _, b in units.values())
    seconds = bucket / 1000
    pl, bl = [0.0] * count, [0.0] * count
    ph: list[float | None] = [0.0] * count
    bh: list[float | None] = [0.0] * count
    for i, sums in merged.items():
        e = q._from(sums).estimate(unit=unit, byte_unit=byte_unit)
        pl[i], bl[i] = e.packets.low / seconds, e.bytes.low / seconds
        ph[i] = e.packets.high / seconds if math.isfinite(e.packets.high) else None
        bh[i] = e.bytes.high / seconds if math.isfinite(e.bytes.high) else None
    order = sorted(per, key=lambda o: (-totals[o], w.keys[o]))
    stacks: list[tuple[str, list[float], list[float]]] = []
    for rank, o in enumerate(order):
        if rank < MAX_STACKS:
            stacks.append((rpt.key_fingerprint(w.keys[o]), [0.0] * count, [0.0] * count))
        elif rank == MAX_STACKS:
            stacks.append(("other", [0.0] * count, [0.0] * count))
        _, packet_rates, byte_rates = stacks[-1]
        for i, (pk, bc) in per[o].items():
            packet_rates[i] += pk / seconds
            byte_rates[i] += bc / seconds
    return Series(
        bucket_ms=bucket,
        starts=tuple((first + i) * bucket for i in range(count)),
        stacks=tuple((name, tuple(p), tuple(b)) for name, p, b in stacks),
        band_packets=(tuple(pl), tuple(ph)),
        band_bytes=(tuple(bl), tuple(bh)),
        reports=int(g.reports[inside].sum()),
        outside_reports=int(g.reports[outside].sum()),
        outside_packets=sum(packets[outside].tolist()),
        outside_bytes=sum(byte_counts[outside].tolist()),
    )


__all__ = ["Series", "bucket_for", "victim_series"]
