"""A window's reports as columns: who's sources and the victim series of a long window.

``who`` of a destination over a whole day (the dashboard's victim view) is ~30,000 reports at
a million stored, nearly every one its own (observer, source /24) group (spoofed sources):
grouping them in SQL cost SQLite a sort of every row (~80 ms) and both backends the hand-over
of 30,000 groups of 17 sums to Python (PostgreSQL's numeric sums as ``Decimal``: ~250 ms of
this process's CPU). Read instead, once, the few stored columns the sums are made of (the
destination's covering index has them all: no table row) into numpy arrays, and add there.
The terms are the ones :mod:`overflowd.store.query`'s SQL computes per report (the same
floating-point operations: ``packets·interval/p`` in float64, over WEIGHT_CAP "huge"), the
integer sums are exact (int64 while the window's total cannot overflow it, Python integers
beyond), and the groups are ranked and merged as the SQL path's caller does it (key order,
ties by key), so ``who`` answers the same either way to the rounding of float sums added in
another order (tests compare the two over varied stores).

Bounded: the rows come from the driver :data:`CHUNK` at a time (the Python objects held at
once: each chunk's observer objects are numbered and dropped as it arrives); the arrays and
their intermediates peak at a few hundred bytes per report (a who of a whole million-report
store, no filter: 388 MB peak RSS and 3.5 s of CPU, the SQL path 647 MB and 7.9 s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from overflowd.store.models import WEIGHT_CAP

if TYPE_CHECKING:
    from overflowd.store.base import ReportFilter
    from overflowd.store.repository import Store

#: Rows taken from the driver's cursor at a time.
CHUNK = 65_536
#: A float sum of the window's |certain amounts| under this means no int64 product or partial
#: sum of them overflows (2**63 with room for the float sum's own rounding).
_INT64_SAFE = float(2**62)

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class Window:
    """The filter's reports, one array entry per report (in the index's order)."""

    #: the observers, ascending (bytes order: the SQL path's key order)
    keys: tuple[bytes, ...]
    #: each report's observer, an index into ``keys``
    observer: Ints
    last_ms: Ints
    #: p = 1 (counted as certain, its amounts added exactly)
    certain: Bools
    #: packets·interval and bytes·interval of a certain report, else 0: int64, or Python
    #: integers (object) when the window's could overflow 64 bits (forged counters)
    certain_packets: npt.NDArray[Any]
    certain_bytes: npt.NDArray[Any]
    #: the Horvitz-Thompson weights of a p < 1 report under WEIGHT_CAP, else 0.0
    packets_weight: Floats
    bytes_weight: Floats
    #: a p < 1 report whose weight is over WEIGHT_CAP (its sums are infinite)
    packets_huge: Bools
    bytes_huge: Bools
    #: with ``sources``: the first packet's time, the family and the 16-byte stored source
    #: (IPv4 mapped)
    first_ms: Ints | None = None
    ip_version: Ints | None = None
    src: npt.NDArray[np.uint8] | None = None

    def __len__(self) -> int:
        return len(self.observer)


def read_window(
    store: Store,
    flt: ReportFilter,
    *,
    sources: bool = False,
    address_first: bool | None = None,
    limit: int | None = None,
) -> Window | None:
    """The columns of ``flt``'s reports: one statement, through the index query.py's SQL path
    would take (on SQLite ``_address_first`` decides, as for who and the series; given when
    the caller has asked already). None when there are more than ``limit`` (read no further:
    the caller groups in SQL instead)."""
    from overflowd.store import query as q

    t = q._T
    columns = [
        t.c.observer_key,
        t.c.last_ms,
        t.c.packets,
        t.c.bytes,
        t.c.probability,
        t.c.sampling_interval,
    ]
    fields: list[tuple[str, str]] = [
        ("o", "O"), ("l", "i8"), ("n", "i8"), ("b", "i8"), ("p", "f8"), ("k", "i8"),
    ]  # fmt: skip
    if sources:
        columns += [t.c.first_ms, t.c.ip_version, t.c.src]
        fields += [("f", "i8"), ("v", "i8"), ("s", "S16")]
    dtype = np.dtype(fields)
    if address_first is None:
        address_first = q._address_first(store, flt)
    stmt = q._where(select(*columns), flt, address_first=address_first)
    parts = []
    observers: list[Ints] = []
    seen: dict[bytes, int] = {}  # observer -> its number in order of appearance
    with store.transaction("reading the reports", write=False) as conn:
        dbapi: Any = conn.dialect.dbapi
        try:
            binary = store.backend == "postgresql" and conn.dialect.driver == "psycopg"
            if binary:
                # psycopg's binary format: no text to parse (bytea as hex, numbers as digits),
                # 25 -> 10 ms of this process's CPU for a day's 30,000 rows of the victim
                compiled = stmt.compile(
                    dialect=conn.dialect, compile_kwargs={"render_postcompile": True}
                )
                raw: Any = conn.connection.driver_connection
                cursor = raw.cursor(binary=True)
                cursor.execute(str(compiled), compiled.params)
            else:
                cursor = conn.execute(stmt).cursor
            size = CHUNK if limit is None else max(1, min(CHUNK, limit + 1))
            try:
                while chunk := cursor.fetchmany(size):
                    # the driver's tuples straight into one structured array (in C: ~0.3 µs
                    # a row)
                    part = np.array(chunk, dtype=dtype)
                    del chunk
                    observers.append(_numbered(part, seen))
                    parts.append(part)
                    if limit is not None and sum(map(len, parts)) > limit:
                        return None
            finally:
                if binary:
                    cursor.close()  # ours (SQLAlchemy closes its own)
        except dbapi.Error as exc:  # the driver's own, from a fetch: as SQLAlchemy wraps them
            raise DBAPIError(str(stmt), None, exc) from exc
    rows = np.concatenate(parts) if parts else np.empty(0, dtype)
    keys = sorted(seen)
    # each report's observer as its rank among the window's (bytes order)
    rank = np.empty(len(keys), np.int64)
    rank[[seen[key] for key in keys]] = np.arange(len(keys), dtype=np.int64)
    numbers = np.concatenate(observers) if observers else np.empty(0, np.int64)
    return _window(rows, tuple(keys), rank[numbers], sources)


def _numbered(part: npt.NDArray[Any], seen: dict[bytes, int]) -> Ints:
    """The observer numbers of a chunk's rows (new ones numbered as they appear), and its
    observer objects dropped: the Python objects held stay one chunk's whatever the window
    (dict and map in C: a generator of setdefault calls was 10 ms of a day's 30,000)."""
    objects = part["o"].tolist()
    part["o"] = None
    if objects and type(objects[0]) is not bytes:  # a driver's memoryview
        objects = [bytes(x) for x in objects]
    for key in dict.fromkeys(objects):
        seen.setdefault(key, len(seen))
    return np.fromiter(map(seen.__getitem__, objects), np.int64, len(objects))


def _window(
    rows: npt.NDArray[Any], keys: tuple[bytes, ...], observer: Ints, sources: bool
) -> Window:
    p: Floats = rows["p"]
    n: Ints = rows["n"]
    b: Ints = rows["b"]
    k: Ints = rows["k"]
    # query._amounts: certain is p >= 1; a weight is amount·interval/p in float64 for p < 1,
    # NULL (here 0) over the cap, where the report is "huge" instead
    certain = p >= 1.0
    sampled = p < 1.0
    interval = k.astype(np.float64)
    scaled_p = n.astype(np.float64) * interval
    scaled_b = b.astype(np.float64) * interval
    cap = p * WEIGHT_CAP
    huge_p = sampled & (scaled_p > cap)
    huge_b = sampled & (scaled_b > cap)
    with np.errstate(all="ignore"):  # p > 0 for every stored report (report.py validates)
        wp = np.where(sampled & (scaled_p <= cap), scaled_p / p, 0.0)
        wb = np.where(sampled & (scaled_b <= cap), scaled_b / p, 0.0)
    cp = _exact_products(n, k, certain, scaled_p)
    cb = _exact_products(b, k, certain, scaled_b)
    src = None
    if sources:
        src = np.frombuffer(rows["s"].tobytes(), np.uint8).reshape(-1, 16)
    return Window(
        keys=keys,
        observer=observer,
        last_ms=rows["l"],
        first_ms=rows["f"] if sources else None,
        certain=certain,
        certain_packets=cp,
        certain_bytes=cb,
        packets_weight=wp,
        bytes_weight=wb,
        packets_huge=huge_p,
        bytes_huge=huge_b,
        ip_version=rows["v"] if sources else None,
        src=src,
    )


def _exact_products(
    amount: Ints, interval: Ints, certain: Bools, scaled: Floats
) -> npt.NDArray[Any]:
    """amount·interval of the certain reports (0 for the others), exactly: int64 when no sum
    of them can overflow it, else Python integers (what PostgreSQL's numeric and SQLite's
    integer sums give; SQLite's SQL path falls back to floating point there)."""
    if float(np.abs(scaled[certain]).sum()) < _INT64_SAFE:
        out = np.zeros(len(amount), np.int64)
        out[certain] = amount[certain] * interval[certain]
        return out
    wide = np.zeros(len(amount), dtype=object)
    for i in np.flatnonzero(certain):
        wide[i] = int(amount[i]) * int(interval[i])
    return wide


@dataclass(frozen=True)
class Groups:
    """A window's reports grouped by some keys: the Tally fields of each group (as query.py's
    ``_sums`` lists hold them), groups in ascending key order."""

    #: per group: its reports' positions in ``order`` start here
    starts: Ints
    #: the window's report positions sorted by the keys (stable: index order within a group)
    order: Ints
    reports: Ints
    certain_reports: Ints
    certain_packets: npt.NDArray[Any]
    certain_bytes: npt.NDArray[Any]
    packets_total: Floats
    packets_squares: Floats
    packets_max: Floats
    bytes_total: Floats
    bytes_squares: Floats
    bytes_max: Floats
    packets_huge: Ints
    bytes_huge: Ints

    def __len__(self) -> int:
        return len(self.starts)

    def first(self, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``values`` (one per report) of each group's first report."""
        return values[self.order[self.starts]]

    def reduce(self, ufunc: Any, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """``ufunc.reduceat`` of ``values`` (one per report) over each group."""
        return ufunc.reduceat(values[self.order], self.starts)  # type: ignore[no-any-return]

    def sums(self, i: int) -> list[Any]:
        """Group ``i``'s Tally fields as query._sums gives them (inf over the cap)."""
        inf = math.inf
        hp, hb = self.packets_huge[i], self.bytes_huge[i]
        return [
            int(self.reports[i]),
            int(self.certain_reports[i]),
            int(self.certain_packets[i]),
            int(self.certain_bytes[i]),
            inf if hp else float(self.packets_total[i]),
            inf if hp else float(self.packets_squares[i]),
            inf if hp else float(self.packets_max[i]),
            inf if hb else float(self.bytes_total[i]),
            inf if hb else float(self.bytes_squares[i]),
            inf if hb else float(self.bytes_max[i]),
        ]

    def added(self, lo: int, hi: int) -> list[Any]:
        """Groups ``lo`` to ``hi`` (excluded) merged, as query._added merges SQL group rows:
        the sums added left to right in key order (Python's sum), maxima kept, inf when a
        report is over the cap."""
        inf = math.inf
        p_huge = bool(self.packets_huge[lo:hi].any())
        b_huge = bool(self.bytes_huge[lo:hi].any())

        def real(values: Floats, is_max: bool) -> float:
            part = values[lo:hi]
            return float(part.max()) if is_max else sum(part.tolist())

        return [
            int(self.reports[lo:hi].sum()),
            int(self.certain_reports[lo:hi].sum()),
            _int_sum(self.certain_packets[lo:hi]),
            _int_sum(self.certain_bytes[lo:hi]),
            inf if p_huge else real(self.packets_total, False),
            inf if p_huge else real(self.packets_squares, False),
            inf if p_huge else real(self.packets_max, True),
            inf if b_huge else real(self.bytes_total, False),
            inf if b_huge else real(self.bytes_squares, False),
            inf if b_huge else real(self.bytes_max, True),
        ]


def _int_sum(values: npt.NDArray[Any]) -> int:
    return int(values.sum()) if values.dtype != object else sum(int(v) for v in values)


def group(w: Window, keys: list[npt.NDArray[Any]]) -> Groups:
    """``w``'s reports grouped by ``keys`` (arrays, one entry per report; the first is the
    most significant), every group's sums."""
    n = len(w)
    order: Ints = np.lexsort(tuple(reversed(keys))) if n else np.empty(0, np.int64)
    change = np.zeros(n, np.bool_)
    if n:
        change[0] = True
        for key in keys:
            sorted_key = key[order]
            change[1:] |= sorted_key[1:] != sorted_key[:-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], n)

    def add(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if not n:
            return np.zeros(0, values.dtype)
        return np.add.reduceat(values[order], starts)

    def most(values: Floats) -> Floats:
        if not n:
            return np.zeros(0, np.float64)
        return np.maximum.reduceat(values[order], starts)

    wp, wb = w.packets_weight, w.bytes_weight
    return Groups(
        starts=starts,
        order=order,
        reports=(ends - starts).astype(np.int64),
        certain_reports=add(w.certain.astype(np.int64)),
        certain_packets=add(w.certain_packets),
        certain_bytes=add(w.certain_bytes),
        packets_total=add(wp),
        packets_squares=add(wp * wp),
        packets_max=most(wp),
        bytes_total=add(wb),
        bytes_squares=add(wb * wb),
        bytes_max=most(wb),
        packets_huge=add(w.packets_huge.astype(np.int64)),
        bytes_huge=add(w.bytes_huge.astype(np.int64)),
    )


def prefix_words(w: Window, v4_len: int, v6_len: int) -> tuple[npt.NDArray[np.uint64], ...]:
    """Each report's source prefix as two 64-bit words of the stored 16 bytes, the bits past
    the prefix cleared (an IPv4 source is IPv4-mapped: its /v4_len is the first 96 + v4_len
    bits, as query._masked takes them): equal for one network, ordered as its bytes."""
    assert w.src is not None and w.ip_version is not None
    words = w.src.copy().view(">u8").astype(np.uint64)  # (n, 2): big-endian halves
    bits = np.where(w.ip_version == 4, 96 + v4_len, v6_len)
    out = []
    for half in (0, 1):
        keep = np.clip(bits - 64 * half, 0, 64).astype(np.uint64)
        # the top `keep` bits of the word: all ones shifted left by 64 - keep (a shift by 64
        # is undefined, so that case, keep = 0, is masked separately)
        ones = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
        shift = np.uint64(64) - keep
        mask = np.where(keep == 0, np.uint64(0), ones << np.minimum(shift, np.uint64(63)))
        mask = np.where(keep == 64, ones, mask)
        out.append(words[:, half] & mask)
    return tuple(out)


__all__ = ["CHUNK", "Groups", "Window", "group", "prefix_words", "read_window"]
