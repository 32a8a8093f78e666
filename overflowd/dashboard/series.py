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
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

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


#: Reports from which the series is grouped in SQL instead of in arrays: the arrays hold a few
#: hundred bytes per report while they are made, the SQL groups (buckets × observers) do not
#: grow with the window (a chart of a /8 over a week must not take gigabytes).
ARRAYS_UP_TO = 262_144


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
    address_first = q._address_first(store, flt)
    w = wnd.read_window(store, flt, address_first=address_first, limit=ARRAYS_UP_TO)
    if w is None:
        return _grouped_series(store, flt, now_ms, address_first)
    lo_ms, hi_ms = flt.since_ms, flt.until_ms
    if lo_ms is None or hi_ms is None:
        if not len(w):
            return Series(1000, (), (), ((), ()), ((), ()), 0)
        lo_ms = int(w.last_ms.min()) if lo_ms is None else lo_ms
        if hi_ms is None:
            latest = int(w.last_ms.max())
            hi_ms = latest if now_ms is None else min(latest, now_ms)
    axis = _Axis(lo_ms, max(hi_ms, lo_ms))
    index = w.last_ms // axis.bucket - axis.first  # flow ends >= 0: SQL's integer division
    g = wnd.group(w, [w.observer, index])
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
    inside = (at >= 0) & (at < axis.count)
    outside = ~inside
    parts = _Parts()
    for o, i, pk, bc in zip(
        observer[inside].tolist(),
        at[inside].tolist(),
        packets[inside].tolist(),
        byte_counts[inside].tolist(),
        strict=True,
    ):
        parts.add(w.keys[o], i, pk, bc)
    # each bucket's sums, all its observers' reports together (a group per bucket: 60 sums
    # made, not 1,200 merged)
    buckets = wnd.group(w, [index])
    starts = buckets.first(index)
    for b in np.flatnonzero((starts >= 0) & (starts < axis.count)).tolist():
        parts.merged[int(starts[b])] = buckets.sums(b)
    parts.reports = int(g.reports[inside].sum())
    parts.outside = [
        int(g.reports[outside].sum()),
        sum(packets[outside].tolist()),
        sum(byte_counts[outside].tolist()),
    ]
    return _assemble(axis, parts, q._observer_units(store, w.keys))


def _grouped_series(
    store: Store, flt: ReportFilter, now_ms: int | None, address_first: bool
) -> Series:
    """victim_series of a window too large for arrays: one GROUP BY (bucket, observer) in SQL
    (and first the span, when the filter gives none)."""
    t = q._T
    lo_ms, hi_ms = flt.since_ms, flt.until_ms
    if lo_ms is None or hi_ms is None:
        with store.transaction("finding the span", write=False) as conn:
            span = select(func.min(t.c.last_ms), func.max(t.c.last_ms))
            found = conn.execute(q._where(span, flt, address_first=address_first)).one()
        if found[0] is None:
            return Series(1000, (), (), ((), ()), ((), ()), 0)
        lo_ms = int(found[0]) if lo_ms is None else lo_ms
        if hi_ms is None:
            hi_ms = int(found[1]) if now_ms is None else min(int(found[1]), now_ms)
    axis = _Axis(lo_ms, max(hi_ms, lo_ms))
    key = (t.c.last_ms // axis.bucket).label("bucket")
    rows = q._run_sums(
        store,
        lambda cols: q._where(
            select(key, t.c.observer_key, *cols), flt, address_first=address_first
        ).group_by(key, t.c.observer_key),
        "drawing the victim's traffic",
    )
    parts = _Parts()
    for row in rows:
        index = int(row[0]) - axis.first
        sums = q._sums(row, 2)
        packets = _finite(float(sums[2]) + sums[4])
        byte_count = _finite(float(sums[3]) + sums[7])
        if not 0 <= index < axis.count:
            # a flow ending past `until` (its first packet was before it) or past now
            parts.outside[0] += int(sums[0])
            parts.outside[1] += packets
            parts.outside[2] += byte_count
            continue
        parts.add(bytes(row[1]), index, packets, byte_count)
        parts.reports += int(sums[0])
        if index in parts.merged:
            q._merge(parts.merged[index], sums)
        else:
            parts.merged[index] = list(sums)
    units = q._observer_units(store, sorted({bytes(r[1]) for r in rows}))
    return _assemble(axis, parts, units)


class _Axis:
    """About TARGET_BUCKETS buckets of a round length from ``lo_ms`` to ``hi_ms``."""

    def __init__(self, lo_ms: int, hi_ms: int) -> None:
        self.bucket = bucket_for(hi_ms - lo_ms)
        self.first = lo_ms // self.bucket
        self.count = hi_ms // self.bucket - self.first + 1


class _Parts:
    """What both ways of grouping give the chart: per observer its (packets, bytes) point
    estimates per bucket, each bucket's sums (all observers merged), the reports drawn, and
    the reports, packets and bytes outside the axis."""

    def __init__(self) -> None:
        self.per: dict[bytes, dict[int, tuple[float, float]]] = {}
        self.totals: dict[bytes, float] = {}
        self.merged: dict[int, list[Any]] = {}
        self.reports = 0
        self.outside: list[Any] = [0, 0.0, 0.0]

    def add(self, observer: bytes, index: int, packets: float, byte_count: float) -> None:
        self.per.setdefault(observer, {})[index] = (packets, byte_count)
        self.totals[observer] = self.totals.get(observer, 0.0) + packets


def _assemble(axis: _Axis, parts: _Parts, units: dict[bytes, q.Units]) -> Series:
    # Point estimates per (bucket, observer) straight from the sums (certain + Σ weights, what
    # Tally.estimate's point is); one interval per bucket, of all its observers' sums merged,
    # with the largest of their units (as `top` does across observers): 60 intervals, not one
    # per observer and bucket (a tenth of a millisecond each).
    count, bucket = axis.count, axis.bucket
    unit = q._max_unit(u for u, _ in units.values())
    byte_unit = q._max_unit(b for _, b in units.values())
    seconds = bucket / 1000
    pl, bl = [0.0] * count, [0.0] * count
    ph: list[float | None] = [0.0] * count
    bh: list[float | None] = [0.0] * count
    for index, sums in parts.merged.items():
        e = q._from(sums).estimate(unit=unit, byte_unit=byte_unit)
        pl[index], bl[index] = e.packets.low / seconds, e.bytes.low / seconds
        ph[index] = e.packets.high / seconds if math.isfinite(e.packets.high) else None
        bh[index] = e.bytes.high / seconds if math.isfinite(e.bytes.high) else None
    order = sorted(parts.per, key=lambda k: (-parts.totals[k], k))
    stacks: list[tuple[str, list[float], list[float]]] = []
    for rank, observer in enumerate(order):
        if rank < MAX_STACKS:
            stacks.append((rpt.key_fingerprint(observer), [0.0] * count, [0.0] * count))
        elif rank == MAX_STACKS:
            stacks.append(("other", [0.0] * count, [0.0] * count))
        _, packet_rates, byte_rates = stacks[-1]
        for i, (packets, byte_count) in parts.per[observer].items():
            packet_rates[i] += packets / seconds
            byte_rates[i] += byte_count / seconds
    return Series(
        bucket_ms=bucket,
        starts=tuple((axis.first + i) * bucket for i in range(count)),
        stacks=tuple((name, tuple(p), tuple(b)) for name, p, b in stacks),
        band_packets=(tuple(pl), tuple(ph)),
        band_bytes=(tuple(bl), tuple(bh)),
        reports=parts.reports,
        outside_reports=int(parts.outside[0]),
        outside_packets=float(parts.outside[1]),
        outside_bytes=float(parts.outside[2]),
    )


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


__all__ = ["Series", "bucket_for", "victim_series"]
