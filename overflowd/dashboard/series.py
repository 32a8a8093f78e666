"""The victim view's time series: estimated packets and bytes per second, per observer, per
time bucket, from ONE grouped query (bucket, observer) over the filter's reports.

The sums and estimates are the ones ``who`` and ``top`` use (overflowd.store.query's SQL sums,
:class:`~overflowd.estimate.Tally`, each observer's own units), so a bucket's numbers added
over the whole span are what ``overflowd-query who`` says for the same filter. A report falls
in the bucket of its flow's last packet (what ``--since`` compares). One more statement first
finds the span (MIN and MAX of last_ms through the same index) when the filter gives none.
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


def victim_series(store: Store, flt: ReportFilter, *, now_ms: int | None = None) -> Series:
    """The series of ``flt``'s reports. The axis runs from ``since`` (else the earliest flow
    end) to ``until`` (else the latest flow end, but never past ``now_ms`` when given): a
    report whose flow ends beyond it is counted in ``outside_*``, not drawn."""
    t = q._T
    # a victim's day through its destination's index, not the day's (who does the same)
    address_first = q._address_first(store, flt)
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
    hi_ms = max(hi_ms, lo_ms)
    bucket = bucket_for(hi_ms - lo_ms)
    first = lo_ms // bucket
    count = hi_ms // bucket - first + 1
    key = (t.c.last_ms // bucket).label("bucket")
    rows = q._run_sums(
        store,
        lambda cols: q._where(
            select(key, t.c.observer_key, *cols), flt, address_first=address_first
        ).group_by(key, t.c.observer_key),
        "drawing the victim's traffic",
    )
    units = q._observer_units(store, sorted({bytes(r[1]) for r in rows}))
    # Point estimates per (bucket, observer) straight from the sums (certain + Σ weights, what
    # Tally.estimate's point is); one interval per bucket, of all its observers' sums merged,
    # with the largest of their units (as `top` does across observers): 60 intervals, not one
    # per observer and bucket (a tenth of a millisecond each).
    per: dict[bytes, dict[int, tuple[float, float]]] = {}
    merged: dict[int, list[Any]] = {}
    totals: dict[bytes, float] = {}
    reports = 0
    outside = [0, 0.0, 0.0]
    for row in rows:
        index = int(row[0]) - first
        sums = q._sums(row, 2)
        packets = _finite(float(sums[2]) + sums[4])
        byte_count = _finite(float(sums[3]) + sums[7])
        if not 0 <= index < count:
            # a flow ending past `until` (its first packet was before it) or past now
            outside[0] += int(sums[0])
            outside[1] += packets
            outside[2] += byte_count
            continue
        observer = bytes(row[1])
        per.setdefault(observer, {})[index] = (packets, byte_count)
        totals[observer] = totals.get(observer, 0.0) + packets
        reports += int(sums[0])
        if index in merged:
            q._merge(merged[index], sums)
        else:
            merged[index] = list(sums)
    unit = q._max_unit(u for u, _ in units.values())
    byte_unit = q._max_unit(b for _, b in units.values())
    seconds = bucket / 1000
    pl, bl = [0.0] * count, [0.0] * count
    ph: list[float | None] = [0.0] * count
    bh: list[float | None] = [0.0] * count
    for index, sums in merged.items():
        e = q._from(sums).estimate(unit=unit, byte_unit=byte_unit)
        pl[index], bl[index] = e.packets.low / seconds, e.bytes.low / seconds
        ph[index] = e.packets.high / seconds if math.isfinite(e.packets.high) else None
        bh[index] = e.bytes.high / seconds if math.isfinite(e.bytes.high) else None
    order = sorted(per, key=lambda k: (-totals[k], k))
    stacks: list[tuple[str, list[float], list[float]]] = []
    for rank, observer in enumerate(order):
        if rank < MAX_STACKS:
            stacks.append((rpt.key_fingerprint(observer), [0.0] * count, [0.0] * count))
        elif rank == MAX_STACKS:
            stacks.append(("other", [0.0] * count, [0.0] * count))
        _, packet_rates, byte_rates = stacks[-1]
        for i, (packets, byte_count) in per[observer].items():
            packet_rates[i] += packets / seconds
            byte_rates[i] += byte_count / seconds
    return Series(
        bucket_ms=bucket,
        starts=tuple((first + i) * bucket for i in range(count)),
        stacks=tuple((name, tuple(p), tuple(b)) for name, p, b in stacks),
        band_packets=(tuple(pl), tuple(ph)),
        band_bytes=(tuple(bl), tuple(bh)),
        reports=reports,
        outside_reports=int(outside[0]),
        outside_packets=float(outside[1]),
        outside_bytes=float(outside[2]),
    )


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


__all__ = ["Series", "bucket_for", "victim_series"]
