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
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from overflowd import report as rpt
from overflowd.store import query as q

if TYPE_CHECKING:
    from overflowd.estimate import Estimate
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
    #: the 95% band of the total per bucket: packets low/high, bytes low/high (per second;
    #: high None: unbounded), the sums of the observers' bounds
    band_packets: tuple[tuple[float, ...], tuple[float | None, ...]]
    band_bytes: tuple[tuple[float, ...], tuple[float | None, ...]]
    reports: int


def bucket_for(span_ms: int) -> int:
    want = max(1, span_ms) / TARGET_BUCKETS
    for step in BUCKET_STEPS_MS:
        if step >= want:
            return step
    return BUCKET_STEPS_MS[-1] * math.ceil(want / BUCKET_STEPS_MS[-1])


def victim_series(store: Store, flt: ReportFilter) -> Series:
    t = q._T
    lo_ms, hi_ms = flt.since_ms, flt.until_ms
    if lo_ms is None or hi_ms is None:
        with store.transaction("finding the span", write=False) as conn:
            found = conn.execute(
                q._where(select(func.min(t.c.last_ms), func.max(t.c.last_ms)), flt)
            ).one()
        if found[0] is None:
            return Series(1000, (), (), ((), ()), ((), ()), 0)
        lo_ms = int(found[0]) if lo_ms is None else lo_ms
        hi_ms = int(found[1]) if hi_ms is None else hi_ms
    hi_ms = max(hi_ms, lo_ms)
    bucket = bucket_for(hi_ms - lo_ms)
    first = lo_ms // bucket
    count = hi_ms // bucket - first + 1
    key = (t.c.last_ms // bucket).label("bucket")
    rows = q._run_sums(
        store,
        lambda cols: q._where(select(key, t.c.observer_key, *cols), flt).group_by(
            key, t.c.observer_key
        ),
        "drawing the victim's traffic",
    )
    units = q._observer_units(store, sorted({bytes(r[1]) for r in rows}))
    per: dict[bytes, dict[int, Estimate]] = {}
    totals: dict[bytes, float] = {}
    reports = 0
    for row in rows:
        index = int(row[0]) - first
        if not 0 <= index < count:
            continue  # a flow ending past `until` (its first packet was before it)
        observer = bytes(row[1])
        unit, byte_unit = units.get(observer, (None, None))
        estimate = q._from(q._sums(row, 2)).estimate(unit=unit, byte_unit=byte_unit)
        per.setdefault(observer, {})[index] = estimate
        totals[observer] = totals.get(observer, 0.0) + estimate.packets.estimate
        reports += estimate.reports
    order = sorted(per, key=lambda k: (-totals[k], k))
    seconds = bucket / 1000
    stacks: list[tuple[str, list[float], list[float]]] = []
    pl, ph, bl, bh = ([0.0] * count for _ in range(4))
    ph_inf, bh_inf = [False] * count, [False] * count
    for rank, observer in enumerate(order):
        if rank < MAX_STACKS:
            stacks.append((rpt.key_fingerprint(observer), [0.0] * count, [0.0] * count))
        elif rank == MAX_STACKS:
            stacks.append(("other", [0.0] * count, [0.0] * count))
        _, packets, bytes_ = stacks[-1]
        for i, e in per[observer].items():
            packets[i] += _finite(e.packets.estimate) / seconds
            bytes_[i] += _finite(e.bytes.estimate) / seconds
            pl[i] += e.packets.low / seconds
            bl[i] += e.bytes.low / seconds
            ph_inf[i] |= not math.isfinite(e.packets.high)
            bh_inf[i] |= not math.isfinite(e.bytes.high)
            ph[i] += _finite(e.packets.high) / seconds
            bh[i] += _finite(e.bytes.high) / seconds
    return Series(
        bucket_ms=bucket,
        starts=tuple((first + i) * bucket for i in range(count)),
        stacks=tuple((name, tuple(p), tuple(b)) for name, p, b in stacks),
        band_packets=(tuple(pl), tuple(None if ph_inf[i] else v for i, v in enumerate(ph))),
        band_bytes=(tuple(bl), tuple(None if bh_inf[i] else v for i, v in enumerate(bh))),
        reports=reports,
    )


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


__all__ = ["Series", "bucket_for", "victim_series"]
