"""Questions to the report store: filtered reports, who reports a network, top-N by traffic.

The library layer under ``overflowd-query reports|who|top`` and the API's ``/v1/reports``,
``/v1/who`` and ``/v1/top``: a :class:`ReportFilter` is turned into one SQL condition, the same
on SQLite and PostgreSQL, and every filter is served by an index (migration ``0007_query``;
docs/storage.md "Queries" says which). Aggregations are one ``GROUP BY`` per question whose sums
feed :meth:`overflowd.estimate.Tally.from_sums`: the database adds, Python only computes the
intervals of the groups it returns. A test streams every report through ``Tally``/``TopN`` and
compares.

Time is the flow's own (``since``: its last packet at or after; ``until``: its first at or
before), so "the last hour" means traffic of the last hour whenever the report arrived;
``received_since``/``received_until`` ask about arrival at this node instead.

Like :mod:`overflowd.store.repository`, it talks to SQLAlchemy only through the store's own
transactions, so backend errors leave as :class:`~overflowd.errors.StoreError`. It must never
write.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import json
import math
import operator
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    Connection,
    Double,
    Numeric,
    Select,
    and_,
    case,
    cast,
    func,
    literal,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.exc import DataError, DBAPIError, OperationalError

from overflowd.estimate import (
    GROUP_BY,
    Estimate,
    GroupKey,
    Tally,
    TopResult,
    larger,
)
from overflowd.store.base import (
    MAX_FILTER_OBSERVERS,
    TRUST_ORDER,
    ReportFilter,
    resolve_observer_with,
)
from overflowd.store.models import BIGINT_MAX, V6_KEY_BASE, WEIGHT_CAP, Base
from overflowd.store.repository import (
    Network,
    Store,
    StoredReport,
    _stored_report,
    network_range,
)

__all__ = [
    "TRUST_ORDER",
    "WEIGHT_CAP",
    "ReportFilter",
    "WhoRow",
    "count_reports",
    "count_reports_capped",
    "find_reports",
    "page_reports",
    "resolve_observer",
    "top",
    "who",
]


#: PostgreSQL's memory for one aggregation (SET LOCAL work_mem, its transaction only): an
#: hour of a spoofed flood is ~40,000 groups whose numeric sums take ~40 MB in a hash table,
#: and at the server's default 4 MB the groups and their ranking sort spill to disk. It is a
#: ceiling per sort or hash of this transaction (freed at its end), not an allocation.
AGGREGATE_WORK_MEM_MB = 64


_T = Base.metadata.tables["reports"]
_O = Base.metadata.tables["observers"]


# ---------------------------------------------------------------------------------------------
# The filter


def _in(column: Any, net: Network) -> ColumnElement[bool]:
    lo, hi = network_range(net)
    # ip_version: an IPv6 prefix never returns IPv4 reports (models.py)
    return and_(column >= lo, column <= hi, _T.c.ip_version == net.version)


def conditions(flt: ReportFilter, *, address_first: bool = False) -> list[ColumnElement[bool]]:
    """The filter as SQL conditions on the reports table (empty: every report).

    ``address_first``: the flow-time ranges are written on ``last_ms + 0`` and ``first_ms +
    0`` (the same values, but no index serves an expression), so that SQLite takes the
    destination's index instead of the time's (:func:`_address_first` says when)."""
    t = _T
    out: list[ColumnElement[bool]] = []
    last: Any = t.c.last_ms + 0 if address_first else t.c.last_ms
    first: Any = t.c.first_ms + 0 if address_first else t.c.first_ms
    # Each time range is written with both ends (the other one the column's own bound, always
    # true): SQLite without statistics guesses a one-sided range keeps 1/4 of the rows and
    # would rather scan the newest-first order's index whole; a two-sided one, 1/64, and it
    # uses the range's index. PostgreSQL plans from its statistics either way.
    if flt.since_ms is not None:
        out.append(last.between(flt.since_ms, BIGINT_MAX))
    if flt.until_ms is not None:
        out.append(first.between(0, flt.until_ms))
    if flt.received_since_ms is not None or flt.received_until_ms is not None:
        first = 0 if flt.received_since_ms is None else flt.received_since_ms
        last = BIGINT_MAX if flt.received_until_ms is None else flt.received_until_ms
        out.append(t.c.received_ms.between(first, last))
    if flt.src is not None:
        out.append(_in(t.c.src, flt.src))
    if flt.dst is not None:
        out.append(_in(t.c.dst, flt.dst))
    if flt.either is not None:
        lo, hi = network_range(flt.either)
        out.append(
            and_(
                t.c.ip_version == flt.either.version,
                or_(and_(t.c.src >= lo, t.c.src <= hi), and_(t.c.dst >= lo, t.c.dst <= hi)),
            )
        )
    if flt.proto is not None:
        out.append(t.c.proto == flt.proto)
    if flt.port is not None:
        out.append(or_(t.c.sport == flt.port, t.c.dport == flt.port))
    if flt.sport is not None:
        out.append(t.c.sport == flt.sport)
    if flt.dport is not None:
        out.append(t.c.dport == flt.dport)
    if flt.kind is not None:
        out.append(t.c.kind == flt.kind)
    if flt.observers:
        out.append(t.c.observer_key.in_(sorted(set(flt.observers))))
    if flt.min_trust is not None:
        level = TRUST_ORDER.index(flt.min_trust)
        if level > 0:
            out.append(or_(t.c.trust.in_(TRUST_ORDER[level:]), t.c.via == "local"))
    return out


def _where(stmt: Select[Any], flt: ReportFilter, *, address_first: bool = False) -> Select[Any]:
    conds = conditions(flt, address_first=address_first)
    return stmt.where(*conds) if conds else stmt


# ---------------------------------------------------------------------------------------------
# Observers


def resolve_observer(store: Store, text: str) -> tuple[bytes, ...]:
    """The observer keys ``text`` names (:func:`overflowd.store.base.resolve_observer_with`:
    a base64 key, or a fingerprint or a prefix of it naming one key); ValueError otherwise."""
    return resolve_observer_with(
        text, lambda prefix, limit: _observers_like(store, prefix, limit), store.name
    )


def observers_like_statement(prefix: str, limit: int) -> Select[Any]:
    """The observers whose fingerprint starts with ``prefix`` (hex and dashes only, so nothing
    in it needs escaping for LIKE), by fingerprint then key."""
    return (
        select(_O.c.key, _O.c.fingerprint)
        .where(_O.c.fingerprint.like(prefix + "%"))
        .order_by(_O.c.fingerprint, _O.c.key)
        .limit(limit)
    )


def _observers_like(store: Store, prefix: str, limit: int) -> list[tuple[bytes, str]]:
    with store.transaction("resolving an observer", write=False) as conn:
        return [
            (bytes(r.key), str(r.fingerprint))
            for r in conn.execute(observers_like_statement(prefix, limit))
        ]


# ---------------------------------------------------------------------------------------------
# Reports


def find_reports(
    store: Store, flt: ReportFilter, *, limit: int | None = None
) -> list[StoredReport]:
    """The reports that match, newest flow first (last packet, then this node's number)."""
    if limit is not None and limit < 0:
        raise ValueError("limit must not be negative")
    stmt = _where(select(_T), flt).order_by(_T.c.last_ms.desc(), _T.c.seq.desc())
    if limit is not None:
        stmt = stmt.limit(limit)
    with store.transaction("querying reports", write=False) as conn:
        return [_stored_report(row._mapping) for row in conn.execute(stmt)]


def count_reports(store: Store, flt: ReportFilter) -> int:
    """How many reports match (the footer's "N of M")."""
    stmt = _where(select(func.count()).select_from(_T), flt)
    with store.transaction("counting reports", write=False) as conn:
        return int(conn.execute(stmt).scalar_one())


#: Matching reports the Reports page's footer counts at most ("50 of more than 10,000"): an
#: exact count of a million rows costs PostgreSQL ~200 ms (a scan; ~100 ms after VACUUM sets the
#: visibility map), a capped one ~5 ms; ``count_reports`` (CLI, API) still counts them all.
FOOTER_COUNT_CAP = 10_000


def count_reports_capped(store: Store, flt: ReportFilter, cap: int | None = None) -> int:
    """How many reports match, counting at most ``cap + 1`` (default FOOTER_COUNT_CAP): a
    result above ``cap`` means "more than ``cap``" (exact otherwise). Reads at most cap + 1
    matching rows' index entries or rows."""
    cap = FOOTER_COUNT_CAP if cap is None else cap
    if cap < 0:
        raise ValueError("cap must not be negative")
    inner = _where(select(literal(1)).select_from(_T), flt).limit(cap + 1).subquery()
    stmt = select(func.count()).select_from(inner)
    with store.transaction("counting reports", write=False) as conn:
        return int(conn.execute(stmt).scalar_one())


def page_reports(
    store: Store, flt: ReportFilter, *, after: int, limit: int
) -> tuple[list[StoredReport], int]:
    """:meth:`Store.reports_after` with any filter: number order, never a report skipped or
    repeated, a short page's cursor jumps to the committed counter, CursorAhead for a cursor
    this store never gave."""
    conds = conditions(flt)
    return store.reports_after(after, limit, where=and_(*conds) if conds else None)


# ---------------------------------------------------------------------------------------------
# The sums behind an estimate


def _weight(amount: Any) -> tuple[ColumnElement[Any], ColumnElement[bool]]:
    """``amount·k/p`` for p < 1 reports under the cap (NULL otherwise), and "over the cap"."""
    p = _T.c.probability
    scaled: ColumnElement[float] = cast(amount, Double()) * cast(_T.c.sampling_interval, Double())
    # amount·k/p > cap, without dividing: p·cap cannot overflow (p < 1).
    huge = and_(p < 1.0, scaled > p * WEIGHT_CAP)
    w = case((and_(p < 1.0, scaled <= p * WEIGHT_CAP), scaled / p), else_=None)
    return w, huge


def _amounts(store: Store, real_certain: bool) -> tuple[Any, ...]:
    """The per-report terms every sum is built of: whether the report is certain (p = 1), the
    packet and byte weights with their over-the-cap flags, and the certain amounts (n times the
    sampling interval) in the type the backend sums exactly."""
    t = _T
    certain = t.c.probability >= 1.0
    wp, huge_p = _weight(t.c.packets)
    wb, huge_b = _weight(t.c.bytes)
    if store.backend == "postgresql":
        # bigint × bigint may overflow (an error on PostgreSQL); numeric sums are exact.
        cp: Any = cast(t.c.packets, Numeric()) * t.c.sampling_interval
        cb: Any = cast(t.c.bytes, Numeric()) * t.c.sampling_interval
    elif real_certain:
        cp = cast(t.c.packets, Double()) * t.c.sampling_interval
        cb = cast(t.c.bytes, Double()) * t.c.sampling_interval
    else:
        # SQLite's integer SUM is exact and raises on overflow; the callers then ask again in
        # floating point (only forged counters near 2**63 get there).
        cp = t.c.packets * t.c.sampling_interval
        cb = t.c.bytes * t.c.sampling_interval
    return certain, wp, huge_p, wb, huge_b, cp, cb


def _weighed(
    store: Store,
    flt: ReportFilter,
    columns: Sequence[Any],
    *,
    real_certain: bool = False,
    address_first: bool = False,
) -> Any:
    """The filter's reports as a subquery: the ``columns`` the groups need (names of the
    reports table's, or labelled expressions on it, such as a group key: also computed once),
    and each report's weights and certain amounts, computed once per report.

    The sums read each weight three times (Σw, Σw², max w) and SQLite evaluates an expression
    as often as it is written: summing this subquery's columns costs half as much CPU as
    writing the weights into every aggregate (an hour of the million reports: 52 → 24 ms for
    one ungrouped total). ``LIMIT -1`` (no limit) keeps SQLite from flattening it back into
    the aggregate. PostgreSQL plans it as the same scan. ``columns`` should stay inside
    ``ix_reports_last_ms_covering`` so that a time window never reads a table row.
    """
    t = _T
    certain, wp, huge_p, wb, huge_b, cp, cb = _amounts(store, real_certain)
    stmt = _where(
        select(
            *(t.c[c] if isinstance(c, str) else c for c in columns),
            case((certain, 1), else_=0).label("w_certain"),
            case((certain, cp), else_=None).label("w_cp"),
            case((certain, cb), else_=None).label("w_cb"),
            wp.label("w_p"),
            wb.label("w_b"),
            case((huge_p, 1), else_=0).label("w_hp"),
            case((huge_b, 1), else_=0).label("w_hb"),
        ),
        flt,
        address_first=address_first,
    )
    if store.backend == "sqlite":
        stmt = stmt.limit(-1)
    return stmt.subquery("w")


def _weighed_sums(w: Any) -> list[ColumnElement[Any]]:
    """The Tally fields as SQL aggregates over a :func:`_weighed` subquery (labels =
    from_sums arguments, plus the two counts of reports over WEIGHT_CAP)."""
    zero = literal(0)
    return [
        func.count().label("reports"),
        func.coalesce(func.sum(w.c.w_certain), zero).label("certain_reports"),
        func.coalesce(func.sum(w.c.w_cp), zero).label("certain_packets"),
        func.coalesce(func.sum(w.c.w_cb), zero).label("certain_bytes"),
        func.coalesce(func.sum(w.c.w_p), 0.0).label("packets_total"),
        func.coalesce(func.sum(w.c.w_p * w.c.w_p), 0.0).label("packets_squares"),
        func.coalesce(func.max(w.c.w_p), 0.0).label("packets_max"),
        func.coalesce(func.sum(w.c.w_b), 0.0).label("bytes_total"),
        func.coalesce(func.sum(w.c.w_b * w.c.w_b), 0.0).label("bytes_squares"),
        func.coalesce(func.max(w.c.w_b), 0.0).label("bytes_max"),
        func.coalesce(func.sum(w.c.w_hp), zero).label("packets_huge"),
        func.coalesce(func.sum(w.c.w_hb), zero).label("bytes_huge"),
    ]


def _run_weighed(
    store: Store,
    flt: ReportFilter,
    columns: Sequence[Any],
    build: Any,
    doing: str,
    *,
    address_first: bool = False,
    plain: bool = False,
) -> list[Any]:
    """Run ``build(w, sum_columns)`` over the filter's weighed reports (:func:`_weighed` of
    ``columns``) and return its rows; on SQLite's integer overflow, again with floating-point
    certain sums. ``address_first``: as :func:`conditions`. ``plain``: the driver's own
    tuples (its types: bytes, int, float, Decimal), not SQLAlchemy rows, which cost ~1.5 µs
    each to make (a day of a victim's sources: 30,000 groups)."""

    def fetch(stmt: Select[Any]) -> list[Any]:
        result = conn.execute(stmt)
        if not plain:
            return list(result.all())
        try:
            return list(result.cursor.fetchall())
        except sqlite3.OperationalError as exc:
            # SQLite adds a group's sums as it steps to it: an overflow in a group after the
            # first is raised here, by the driver itself, not by execute (wrapped as it would)
            raise OperationalError(str(stmt), None, exc) from exc

    with store.transaction(doing, write=False) as conn:
        if store.backend == "postgresql":
            # One round trip for all (set_config(..., true) is SET LOCAL). An hour is tens
            # of thousands of index entries: parallel workers' start and the gather-merge of
            # their partial numeric sums cost more than they save (measured: the merge alone
            # took 4x the workers' scans on a busy 2-core machine). No JIT: as _run_stored.
            conn.execute(
                select(
                    func.set_config("work_mem", f"{AGGREGATE_WORK_MEM_MB}MB", True),
                    func.set_config("max_parallel_workers_per_gather", "0", True),
                    func.set_config("jit", "off", True),
                )
            )
        w = _weighed(store, flt, columns, address_first=address_first)
        try:
            # all at once, not a fetchone per row (a day of a victim's sources is ~30,000
            # groups: 100 ms of fetchone calls)
            return fetch(build(w, _weighed_sums(w)))
        except OperationalError as exc:
            if store.backend != "sqlite" or "overflow" not in str(exc.orig):
                raise
        w = _weighed(store, flt, columns, real_certain=True, address_first=address_first)
        return fetch(build(w, _weighed_sums(w)))


# The sums over the reports table itself, each weight written into every aggregate: what
# callers outside this module build on (overflowd/dashboard/series.py); this module's own
# questions use _run_weighed.


def _sum_columns(store: Store, *, real_certain: bool = False) -> list[ColumnElement[Any]]:
    """The Tally fields as SQL aggregates (labels = from_sums arguments, plus the two counts
    of reports over WEIGHT_CAP)."""
    certain, wp, huge_p, wb, huge_b, cp, cb = _amounts(store, real_certain)
    zero = literal(0)
    return [
        func.count().label("reports"),
        func.coalesce(func.sum(case((certain, 1), else_=0)), zero).label("certain_reports"),
        func.coalesce(func.sum(case((certain, cp), else_=None)), zero).label("certain_packets"),
        func.coalesce(func.sum(case((certain, cb), else_=None)), zero).label("certain_bytes"),
        func.coalesce(func.sum(wp), 0.0).label("packets_total"),
        func.coalesce(func.sum(wp * wp), 0.0).label("packets_squares"),
        func.coalesce(func.max(wp), 0.0).label("packets_max"),
        func.coalesce(func.sum(wb), 0.0).label("bytes_total"),
        func.coalesce(func.sum(wb * wb), 0.0).label("bytes_squares"),
        func.coalesce(func.max(wb), 0.0).label("bytes_max"),
        func.coalesce(func.sum(case((huge_p, 1), else_=0)), zero).label("packets_huge"),
        func.coalesce(func.sum(case((huge_b, 1), else_=0)), zero).label("bytes_huge"),
    ]


def _run_sums(store: Store, build: Any, doing: str) -> list[Any]:
    """Run ``build(sum_columns)`` and return its rows; on SQLite's integer overflow, again with
    floating-point certain sums."""
    with store.transaction(doing, write=False) as conn:
        if store.backend == "postgresql":
            # One round trip for both (set_config(..., true) is SET LOCAL). An hour is tens
            # of thousands of index entries: parallel workers' start and the gather-merge of
            # their partial numeric sums cost more than they save (measured: the merge alone
            # took 4x the workers' scans on a busy 2-core machine).
            conn.execute(
                select(
                    func.set_config("work_mem", f"{AGGREGATE_WORK_MEM_MB}MB", True),
                    func.set_config("max_parallel_workers_per_gather", "0", True),
                )
            )
        try:
            return list(conn.execute(build(_sum_columns(store))).all())
        except OperationalError as exc:
            if store.backend != "sqlite" or "overflow" not in str(exc.orig):
                raise
        return list(conn.execute(build(_sum_columns(store, real_certain=True))).all())


def _number(value: Any) -> int:
    if isinstance(value, Decimal | float):
        return int(value) if math.isfinite(value) else BIGINT_MAX
    return int(value)


Units = tuple[float | None, float | None]

#: The Tally fields in the order of _sum_columns (then packets_huge, bytes_huge), as a list per
#: group: ranking thousands of groups must not build a Tally (or an interval) for each.
_FIELDS = (
    "reports",
    "certain_reports",
    "certain_packets",
    "certain_bytes",
    "packets_total",
    "packets_squares",
    "packets_max",
    "bytes_total",
    "bytes_squares",
    "bytes_max",
)
_MAXES = (6, 9)


def _sums(row: Any, at: int) -> list[Any]:
    """The group's Tally fields from a result row whose sums start at column ``at``."""
    v = row[at : at + 12]
    inf = math.inf
    p_huge, b_huge = v[10], v[11]
    certain_packets, certain_bytes = v[2], v[3]
    return [
        int(v[0]),
        int(v[1]),
        certain_packets if type(certain_packets) is int else _number(certain_packets),
        certain_bytes if type(certain_bytes) is int else _number(certain_bytes),
        inf if p_huge else float(v[4]),
        inf if p_huge else float(v[5]),
        inf if p_huge else float(v[6]),
        inf if b_huge else float(v[7]),
        inf if b_huge else float(v[8]),
        inf if b_huge else float(v[9]),
    ]


def _merge(into: list[Any], more: list[Any]) -> None:
    for i, value in enumerate(more):
        into[i] = max(into[i], value) if i in _MAXES else into[i] + value


def _from(sums: list[Any]) -> Tally:
    return Tally.from_sums(**dict(zip(_FIELDS, sums, strict=True)))


def _rank(
    groups: Sequence[tuple[Any, list[Any], Units]],
    n: int,
    measure: Literal["packets", "bytes"],
    key_of: Any = None,
) -> TopResult[Any]:
    """The ``n`` largest groups by point estimate, the rest merged into "other" (exact).

    What :meth:`TopN.result` gives for the same groups (ties by order in ``groups``), but the
    tallies, intervals (a tenth of a millisecond each) and keys (``key_of(raw)``) are made for
    the rows shown only: a top-10 of the sources of an hour may rank tens of thousands.
    """
    certain, total = (2, 4) if measure == "packets" else (3, 7)
    ranked = sorted(groups, key=lambda g: -(float(g[1][certain]) + g[1][total]))  # stable
    shown = [
        (key if key_of is None else key_of(key), _from(sums).estimate(unit=u[0], byte_unit=u[1]))
        for key, sums, u in ranked[:n]
    ]
    rest_groups = ranked[n:]
    other = None
    if rest_groups:
        # field by field in C (sum, max) rather than group by group in Python: "other" of an
        # hour of spoofed sources is tens of thousands of groups; sum() adds left to right, as
        # Tally.merge would
        columns = list(zip(*(sums for _, sums, _ in rest_groups), strict=True))
        rest = [max(c) if i in _MAXES else sum(c) for i, c in enumerate(columns)]
        distinct = {u for _, _, u in rest_groups}
        rest_unit = _max_unit(u for u, _ in distinct)
        rest_byte_unit = _max_unit(b for _, b in distinct)
        other = _from(rest).estimate(unit=rest_unit, byte_unit=rest_byte_unit)
    return TopResult(top=tuple(shown), other=other, groups=len(groups), folded=0, max_folded=0.0)


def _whole_bytes(v4_len: int, v6_len: int) -> bool:
    """Whether both prefix lengths end on a byte: then SQL groups by exactly the network (a
    /20 is several 3-byte groups that Python merges)."""
    return v4_len % 8 == 0 and v6_len % 8 == 0


#: The sums of a group that _sums reads, in its order: what the ranking queries carry along.
_SUM_LABELS = (*_FIELDS, "packets_huge", "bytes_huge")


def _rank_order(g: Any, keys: Sequence[str], measure: Literal["packets", "bytes"]) -> list[Any]:
    """ORDER BY of groups ``g`` (a subquery of _sum_columns sums), busiest first, as _rank
    sorts them: the point estimate (certain + Σ weights), any report over WEIGHT_CAP making it
    infinite (those first, among themselves by key), ties by key ascending (bytes compare as
    memcmp on both backends, like Python's bytes)."""
    certain, total, huge = (
        ("certain_packets", "packets_total", "packets_huge")
        if measure == "packets"
        else ("certain_bytes", "bytes_total", "bytes_huge")
    )
    unbounded = g.c[huge] > 0
    estimate: ColumnElement[float] = cast(g.c[certain], Double()) + cast(g.c[total], Double())
    return [
        case((unbounded, 1), else_=0).desc(),
        case((unbounded, 0.0), else_=estimate).desc(),
        *(g.c[k].asc() for k in keys),
    ]


def _top_rows(
    store: Store,
    flt: ReportFilter,
    columns: Sequence[Any],
    keys_of: Callable[[Any], list[Any]],
    n: int,
    measure: Literal["packets", "bytes"],
    doing: str,
    units: Units = (None, None),
) -> tuple[list[tuple[tuple[Any, ...], list[Any]]], list[Any] | None, int]:
    """The ``n`` busiest groups by ``keys`` ranked in SQL, and the sums of all the others
    added in SQL: only n + 1 rows reach Python, however many groups an hour of spoofed sources
    makes. Returns ``[(key values, sums)]`` busiest first, the rest's sums (None: no rest)
    and the number of groups. ``keys_of(source)``: the group keys on the reports table or a
    :func:`_weighed` subquery of its ``columns``.

    One statement, most often. It groups, counts the groups and adds all their sums
    (one pass over the groups, no sort) and keeps the first n in
    _rank_order with ``ORDER BY ... LIMIT n`` (a top-N sort: n rows held, not every group
    sorted). "Other" is then all the groups' sums less the n shown (:func:`_rest_by_difference`,
    ``units``: the units its interval will use) when that subtraction loses nothing that
    shows. Otherwise a second statement, only when there are more groups than n, is "other":
    one aggregate without GROUP BY over the filter's reports whose key is none of the n. Its
    sums are the rest's reports' sums, what TopN's merge of the rest gives up to the order
    floating-point sums are added in; maxima are exact. Numbering every group with
    ROW_NUMBER() and grouping again by "its number or n + 1" (the previous way) sorted all
    the groups, then grouped them again: two more passes over tens of thousands of rows.
    """
    names = [k.name for k in keys_of(_T)]

    def build(w: Any, cols: list[ColumnElement[Any]]) -> Select[Any]:
        keys = keys_of(w)
        # used twice, so both backends materialize it (SQLite 3.35+, PostgreSQL 12+): the
        # groups are made once, then read for the count and every group's sums (a: one row)
        # and for the top-N sort. The same sums as window aggregates over the groups (OVER ())
        # cost SQLite a quarter more.
        g = select(*keys, *cols).group_by(*keys).cte("g")
        every = select(
            func.count().label("groups"),
            *(
                (func.max if i in _MAXES else func.sum)(g.c[f]).label("all_" + f)
                for i, f in enumerate(_SUM_LABELS)
            ),
        ).cte("a")
        return (
            select(
                *(g.c[k] for k in names),
                *(g.c[f] for f in _SUM_LABELS),
                every.c.groups,
                *(every.c["all_" + f] for f in _SUM_LABELS),
            )
            .select_from(g.join(every, true()))
            .order_by(*_rank_order(g, names, measure))
            .limit(n)
        )

    shown = _run_weighed(store, flt, columns, build, doing) if n else []
    at = len(names)
    if shown:
        groups = int(shown[0][at + len(_SUM_LABELS)])
    else:
        keys = keys_of(_T)
        counted = _where(select(*keys), flt).group_by(*keys).subquery("c")
        with store.transaction(doing, write=False) as conn:
            groups = int(conn.execute(select(func.count()).select_from(counted)).scalar_one())
    shown_rows = [(tuple(row[:at]), _sums(row, at)) for row in shown]
    rest: list[Any] | None = None
    if groups > len(shown_rows) and shown:
        rest = _rest_by_difference(shown, at, units)
    if groups > len(shown_rows) and rest is None:
        taken = [values for values, _ in shown_rows]

        def other(w: Any, cols: list[ColumnElement[Any]]) -> Select[Any]:
            stmt = select(*cols)
            if not taken:
                return stmt
            # the n shown keys: a row value IN on both backends (SQLite 3.15+)
            return stmt.where(~tuple_(*keys_of(w)).in_(taken))

        (row,) = _run_weighed(store, flt, columns, other, doing)
        rest = _sums(row, 0)
    return shown_rows, rest, groups


def _certain_amounts(store: Store, wide: bool) -> tuple[Any, Any]:
    """packets·interval and bytes·interval of a report as the sums add them: 64-bit integers
    (PostgreSQL's sum(bigint) adds them in 128 bits and returns numeric, exact), or when a
    product or SQLite's sum overflowed (forged counters near 2**63), ``wide``: numeric on
    PostgreSQL (exact), floating point on SQLite (as _amounts)."""
    t = _T
    if not wide:
        return t.c.packets * t.c.sampling_interval, t.c.bytes * t.c.sampling_interval
    wide_type: Any = Numeric() if store.backend == "postgresql" else Double()
    return (
        cast(t.c.packets, wide_type) * t.c.sampling_interval,
        cast(t.c.bytes, wide_type) * t.c.sampling_interval,
    )


def _stored_sums(store: Store, wide: bool) -> list[ColumnElement[Any]]:
    """The Tally fields (labels as _weighed_sums', in _SUM_LABELS order) as aggregates over
    the reports table's stored weights (revision 0010_top_keys): nothing computed per report
    but the certain amounts of p = 1 reports. A report over WEIGHT_CAP weighs +inf, so its
    group's sums are infinite by themselves (the two counts over the cap are 0 here: _sums
    reads the infinite sums as they are)."""
    t = _T
    certain = t.c.probability >= 1.0
    cp, cb = _certain_amounts(store, wide)
    return _sums_of(
        case((certain, cp), else_=None),
        case((certain, cb), else_=None),
        t.c.packets_weight,
        t.c.bytes_weight,
    )


def _sums_of(cp: Any, cb: Any, pw: Any, bw: Any) -> list[ColumnElement[Any]]:
    """_stored_sums of the certain amounts (NULL unless p = 1) and weights (NULL at p = 1)."""
    zero = literal(0)
    return [
        func.count().label("reports"),
        # the weights are NULL exactly for the p = 1 reports
        (func.count() - func.count(pw)).label("certain_reports"),
        func.coalesce(func.sum(cp), zero).label("certain_packets"),
        func.coalesce(func.sum(cb), zero).label("certain_bytes"),
        func.coalesce(func.sum(pw), 0.0).label("packets_total"),
        func.coalesce(func.sum(pw * pw), 0.0).label("packets_squares"),
        func.coalesce(func.max(pw), 0.0).label("packets_max"),
        func.coalesce(func.sum(bw), 0.0).label("bytes_total"),
        func.coalesce(func.sum(bw * bw), 0.0).label("bytes_squares"),
        func.coalesce(func.max(bw), 0.0).label("bytes_max"),
        zero.label("packets_huge"),
        zero.label("bytes_huge"),
    ]


class _Overflow(Exception):
    """A 64-bit product or sum overflowed: ask again with wide certain amounts."""


def _overflowed(exc: DBAPIError) -> bool:
    text = str(exc.orig)
    return "overflow" in text or "out of range" in text


#: Below this, every partial sum of certain amounts (integers) is exact in floating point.
_FLOAT_EXACT = 2**53


def _run_stored(
    store: Store,
    doing: str,
    stmt: Select[Any],
    before: Callable[[Connection], object] | None = None,
) -> list[Any]:
    """Run a statement of _top_stored in a transaction of its own (an error aborts a
    PostgreSQL transaction: the wide retry needs a new one); ``before(conn)`` first, in the
    same transaction (a transaction less: three round trips, each a wait for the server's
    process on a busy machine)."""
    with store.transaction(doing, write=False) as conn:
        if before is not None:
            before(conn)
        if store.backend == "postgresql":
            # as _run_weighed, JIT off too: a window a little bigger than the bench's hour
            # passes jit_above_cost (100,000; that hour's 41,500 reports cost 71,000 while
            # their pages are not all-visible), and compiling the expressions costs more than
            # running them once (that hour with jit_above_cost = 0: 378 ms against 40)
            conn.execute(
                select(
                    func.set_config("work_mem", f"{AGGREGATE_WORK_MEM_MB}MB", True),
                    func.set_config("max_parallel_workers_per_gather", "0", True),
                    func.set_config("jit", "off", True),
                )
            )
        try:
            return list(conn.execute(stmt))
        except (OperationalError, DataError) as exc:
            if not _overflowed(exc):
                raise
            raise _Overflow from exc


def _top_stored(
    store: Store,
    flt: ReportFilter,
    key: Any,
    n: int,
    measure: Literal["packets", "bytes"],
    doing: str,
) -> tuple[list[tuple[Any, list[Any]]], list[Any] | None, int, Units]:
    """_top_rows on an integer key column (``src_key``, ``dst_key``, a port, the protocol)
    and the stored weights: the groups are ranked by the two sums the point estimate needs
    (the certain amount and the weights of ``measure``) only, and the full sums are added
    for the n shown groups alone and, ungrouped, for the whole window; "other" is the
    window's less the shown (_rest_by_difference), else added up again.

    One statement, so one snapshot on both backends: the groups (g, materialized: read for
    their count and for the top-N sort), the n first (t), their sums (s: the window's reports
    whose key is one of them) and the window's sums (a). An hour of spoofed sources is ~40,000
    groups of ~1 report: what the GROUP BY carries per group is what costs, and it carries two
    sums instead of twelve. On PostgreSQL the groups' certain amounts are ranked as floating-
    point sums (a bigint or numeric sum per group costs more than the rest of the statement):
    exactly the same ranking when the window's certain amount, known exactly from a, is under
    2**53 (then every partial sum is an exactly represented integer); otherwise it is asked
    again with exact sums. Returns ``[(key, sums)]`` busiest first, the rest's sums (None: no
    rest), the number of groups and the units of every group (the largest of the filter's
    observers', or of all: read in the first statement's transaction).
    """
    t = _T
    conds = conditions(flt)
    read: list[Units] = []

    def units_of(conn: Connection) -> None:
        if not read:
            read.append(_largest_units(_units_on(conn, flt.observers).values()))

    weight = t.c.packets_weight if measure == "packets" else t.c.bytes_weight
    # SQLite would probe a port's (sport, last_ms) index for "key IN (the n shown)" and read
    # every matching row of the table; +0 keeps it on the window's covering index
    probe = key + 0 if store.backend == "sqlite" else key

    def build(wide: bool, float_rank: bool) -> Select[Any]:
        cp, cb = _certain_amounts(store, wide)
        amount: Any = cp if measure == "packets" else cb
        if float_rank:
            amount = cast(t.c.packets if measure == "packets" else t.c.bytes, Double())
            amount = amount * t.c.sampling_interval
        certain = t.c.probability >= 1.0
        if store.backend == "postgresql":
            # The window read once (a materialized CTE) rather than by each of the three
            # aggregates: its newest pages are seldom all-visible yet (vacuum has not come by),
            # and then each index-only scan fetches every row from the table.
            w = (
                select(
                    key.label("k"),
                    case((certain, amount), else_=None).label("rc"),
                    case((certain, cp), else_=None).label("cp"),
                    case((certain, cb), else_=None).label("cb"),
                    t.c.packets_weight.label("pw"),
                    t.c.bytes_weight.label("bw"),
                )
                .where(*conds)
                .cte("w")
                .prefix_with("MATERIALIZED")
            )
            sums = _sums_of(w.c.cp, w.c.cb, w.c.pw, w.c.bw)
            g = (
                select(
                    w.c.k,
                    func.sum(w.c.rc).label("c"),
                    func.sum(w.c.pw if measure == "packets" else w.c.bw).label("w"),
                )
                .group_by(w.c.k)
                .cte("g")
            )
        else:
            sums = _stored_sums(store, wide)
            g = (
                select(
                    key.label("k"),
                    func.sum(case((certain, amount), else_=None)).label("c"),
                    func.sum(weight).label("w"),
                )
                .where(*conds)
                .group_by(key)
                .cte("g")
            )
        counted = select(func.count().label("groups")).select_from(g).cte("n")

        def rank(r: Any) -> list[Any]:
            # as _rank_order: the point estimate (an infinite weight makes it +inf; those
            # first, among themselves by key), ties by key ascending
            point: ColumnElement[float] = cast(
                func.coalesce(r.c.c, literal(0)), Double()
            ) + func.coalesce(r.c.w, 0.0)
            return [point.desc(), r.c.k.asc()]

        first = select(g.c.k, g.c.c, g.c.w).order_by(*rank(g)).limit(n).cte("t")
        if store.backend == "postgresql":
            shown = (
                select(w.c.k, *sums).where(w.c.k.in_(select(first.c.k))).group_by(w.c.k).cte("s")
            )
            every = select(*sums).select_from(w).cte("a")
        else:
            shown = (
                select(key.label("k"), *sums)
                .where(*conds, probe.in_(select(first.c.k)))
                .group_by(key)
                .cte("s")
            )
            every = select(*sums).where(*conds).cte("a")
        return (
            select(
                first.c.k,
                *(shown.c[f] for f in _SUM_LABELS),
                counted.c.groups,
                *(every.c[f] for f in _SUM_LABELS),
            )
            .select_from(
                every.join(counted, true()).outerjoin(
                    first.join(shown, shown.c.k == first.c.k), true()
                )
            )
            .order_by(*rank(first))
        )

    width = len(_SUM_LABELS)
    float_rank = store.backend == "postgresql"
    try:
        wide = False
        rows = _run_stored(store, doing, build(wide, float_rank), units_of)
    except _Overflow:
        wide = True
        rows = _run_stored(store, doing, build(wide, float_rank), units_of)
    (units,) = read
    certain_at = 2 + width + (2 if measure == "packets" else 3)
    if float_rank and not rows[0][certain_at] < _FLOAT_EXACT:
        rows = _run_stored(store, doing, build(wide, False))
    groups = int(rows[0][1 + width])
    shown = [row for row in rows if row[0] is not None]
    shown_rows = [(row[0], _sums(row, 1)) for row in shown]
    rest: list[Any] | None = None
    if groups > len(shown_rows):
        # nothing shown (n = 0): the rest is the window
        rest = _rest_by_difference(shown, 1, units) if shown else _sums(rows[0], 2 + width)
        if rest is None:
            taken = [k for k, _ in shown_rows]

            def other(wide: bool) -> Select[Any]:
                return select(*_stored_sums(store, wide)).where(*conds, ~probe.in_(taken))

            try:
                (row,) = _run_stored(store, doing, other(wide))
            except _Overflow:
                (row,) = _run_stored(store, doing, other(True))
            rest = _sums(row, 0)
    return shown_rows, rest, groups, units


def _key_network(key: int) -> Network:
    """The /24 or /48 of a src_key/dst_key value (models.prefix_key)."""
    if key >= V6_KEY_BASE:
        return ipaddress.IPv6Network(((key - V6_KEY_BASE) << 80, 48))
    return ipaddress.IPv4Network((key << 8, 24))


#: "Other" by difference (all the groups' sums less the shown ones) is taken only when each
#: floating-point sum of the rest is at least this share of all the groups' one: the
#: difference's rounding error is then at most 1/share times the sum's own (a few 1e-16 per
#: term), far under what the tests compare (1e-9); when the shown groups hold nearly everything
#: the rest is added up again instead.
_DIFFERENCE_MIN_SHARE = 1e-2


def _rest_by_difference(shown: Sequence[Any], at: int, units: Units) -> list[Any] | None:
    """The sums of the groups not in ``shown`` (rows of _top_rows' statement, the group's sums
    at ``at``, every group's at ``at + 13``), as _sums gives them; None when the difference
    would not be what adding the rest gives.

    Counts and certain amounts (integers; numeric on PostgreSQL) subtract exactly. A maximum
    cannot be subtracted: the rest's is taken as every group's, which leaves its interval as it
    is when the interval's unit is at least that (the unit is the larger of the two,
    Tally.estimate) — so only when the unit is known and that large, or the rest has no p < 1
    report. The sums over WEIGHT_CAP are counts (exact).
    """
    width = len(_SUM_LABELS)
    every = shown[0][at + width + 1 : at + 2 * width + 1]
    rest: list[Any] = list(every)
    for row in shown:
        for i in range(width):
            if i not in _MAXES:
                rest[i] -= row[at + i]
    for i in range(width):
        if i in _MAXES:
            continue
        value, whole = rest[i], every[i]
        if isinstance(whole, float) and not (
            math.isfinite(whole) and value >= _DIFFERENCE_MIN_SHARE * whole
        ):
            if whole == 0.0 and value == 0.0:
                continue
            return None
    sampled = rest[0] > rest[1]
    if sampled:
        for unit, i in zip(units, _MAXES, strict=True):
            if unit is None or not unit >= float(every[i]):
                return None
    return _sums(rest, 0)


def _observer_units(store: Store, keys: Sequence[bytes] = ()) -> dict[bytes, Units]:
    """Each observer's unit (observers.packets_unit/bytes_unit, kept by every insert): the
    largest weight among all its p < 1 reports, what a report it did not send could have
    weighed. ``keys``: only those (else every observer)."""
    with store.transaction("reading observer units", write=False) as conn:
        return _units_on(conn, keys)


def _units_on(conn: Connection, keys: Sequence[bytes] = ()) -> dict[bytes, Units]:
    """:func:`_observer_units` in a transaction the caller has open."""
    stmt = select(_O.c.key, _O.c.packets_unit, _O.c.bytes_unit)
    out: dict[bytes, Units] = {}
    chunks: list[list[bytes] | None] = [
        list(keys[i : i + MAX_FILTER_OBSERVERS]) for i in range(0, len(keys), MAX_FILTER_OBSERVERS)
    ]
    for chunk in chunks or [None]:
        part = stmt if chunk is None else stmt.where(_O.c.key.in_(chunk))
        for r in conn.execute(part):
            out[bytes(r.key)] = (
                None if r.packets_unit is None else float(r.packets_unit),
                None if r.bytes_unit is None else float(r.bytes_unit),
            )
    return out


def _largest_units(units: Iterable[Units]) -> Units:
    """The largest packet and byte units of several observers (groups that mix them)."""
    every = list(units)
    return _max_unit(u for u, _ in every), _max_unit(b for _, b in every)


# ---------------------------------------------------------------------------------------------
# Grouping by address prefix


def _prefix_column(column: Any, v4_len: int, v6_len: int) -> ColumnElement[Any]:
    """The bytes of ``column`` that hold its /v4_len or /v6_len (rounded up to whole bytes):
    IPv4 is IPv4-mapped, so its prefix is the 12 mapping bytes and then its own."""
    v4_bytes = 12 + (v4_len + 7) // 8
    v6_bytes = (v6_len + 7) // 8
    return case(
        (_T.c.ip_version == 4, func.substr(column, 1, v4_bytes)),
        else_=func.substr(column, 1, v6_bytes),
    )


def _network(version: int, prefix: bytes, v4_len: int, v6_len: int) -> Network:
    """The network of a grouped prefix; lengths that are not whole bytes are masked here."""
    full = prefix.ljust(16, b"\0")
    if version == 4:
        value = int.from_bytes(full[12:16], "big")
        return ipaddress.IPv4Network((value >> (32 - v4_len) << (32 - v4_len), v4_len))
    value = int.from_bytes(full, "big")
    return ipaddress.IPv6Network((value >> (128 - v6_len) << (128 - v6_len), v6_len))


def _masked(version: int, prefix: bytes, v4_len: int, v6_len: int) -> tuple[int, bytes]:
    """The grouped prefix bytes with the bits past the prefix length cleared (a /20 from the
    3 bytes SQL grouped by): equal for every group of one network, and cheap to compare."""
    bits = (96 + v4_len) if version == 4 else v6_len
    whole, rest = divmod(bits, 8)
    if not rest:
        return version, prefix[:whole]
    return version, prefix[:whole] + bytes([prefix[whole] & (0xFF << (8 - rest)) & 0xFF])


def _check_lengths(v4_len: int, v6_len: int) -> None:
    if not (0 <= v4_len <= 32 and 0 <= v6_len <= 128):
        raise ValueError(f"prefix lengths must be 0..32 and 0..128, not {v4_len}, {v6_len}")


# ---------------------------------------------------------------------------------------------
# who

#: Destination index entries :func:`_address_first` counts at most: a victim's day of reports
#: (~30,000 at a million stored) in ~3 ms; a destination with more is left to the time index.
ADDRESS_PROBE_CAP = 100_000


def _address_first(store: Store, flt: ReportFilter) -> bool:
    """Whether a filter of a destination and a flow time reads fewer index entries through
    the destination's index (ix_reports_dst_covering, covering what who and the victim series
    read) than through the time's: SQLite only.

    SQLite without statistics (and with them: no STAT4 in Debian's build, so ranges are
    guessed) rates both two-sided ranges alike and takes the time's index, so a whole day of
    one /24 scanned a million entries for 30,000 (an hour of it is ~1/24 of the store, which
    may still be more than the /24's whole history). Two capped counts decide, each reading
    at most as many index entries as the smaller side has: the destination's, then the
    time's up to one more than that. PostgreSQL plans from its statistics.
    """
    if store.backend != "sqlite" or flt.dst is None:
        return False
    times = conditions(ReportFilter(since_ms=flt.since_ms, until_ms=flt.until_ms))
    if not times:
        return False

    def capped(where: Sequence[ColumnElement[bool]], cap: int) -> Select[Any]:
        inner = select(literal(1)).select_from(_T).where(*where).limit(cap).subquery()
        return select(func.count()).select_from(inner)

    with store.transaction("choosing an index", write=False) as conn:
        by_address = int(
            conn.execute(capped([_in(_T.c.dst, flt.dst)], ADDRESS_PROBE_CAP)).scalar_one()
        )
        if by_address >= ADDRESS_PROBE_CAP:
            return False
        by_time = int(conn.execute(capped(times, by_address + 1)).scalar_one())
    return by_time > by_address


@dataclass(frozen=True)
class WhoRow:
    """One observer's reports about the filter's traffic, and the traffic behind them."""

    observer_key: bytes
    fingerprint: str
    #: the label its most recently received report arrived with (None: our own reports)
    trust: str | None
    #: from the observer's latest report (observers table)
    contacts: tuple[str, ...]
    point: str
    reports: int
    #: packets and bytes with 95% intervals
    estimate: Estimate
    #: flow time span of its reports: first packet of the earliest, last of the latest
    first_ms: int
    last_ms: int
    #: its top source prefixes (/24 and /48 by default), busiest first
    top_sources: list[tuple[Network, Estimate]]


def who(
    store: Store,
    flt: ReportFilter,
    *,
    top_sources: int = 3,
    v4_len: int = 24,
    v6_len: int = 48,
) -> list[WhoRow]:
    """Every observer with reports that match, busiest (estimated packets) first.

    The unit of each observer's intervals (what a report it did not send could have weighed)
    is its largest weight among all its p < 1 reports stored (``observers.packets_unit``), as
    docs/estimates.md asks for.

    With top sources and from :data:`WHO_ARRAYS_FROM` matching reports, the window's rows are
    grouped in numpy (:func:`_who_by_arrays`) rather than by SQL: the same answer, to the
    rounding of floating-point sums added in another order.
    """
    _check_lengths(v4_len, v6_len)
    if top_sources < 0:
        raise ValueError("top_sources must not be negative")
    # One scan: the groups are (observer, source prefix) when sources are asked for, and each
    # observer's own sums are its groups' sums merged here (sums added, maxima kept, spans
    # widened), as Tally.merge would. A second GROUP BY per observer would read the window's
    # rows again for numbers this one already has; an observer has at most as many groups
    # as reports, and the filter's reports are what who is about.
    per_observer: dict[bytes, list[Any]] = {}
    spans: dict[bytes, list[int]] = {}
    sources: dict[bytes, list[tuple[tuple[int, bytes], list[Any]]]] = {}
    columns: list[Any] = ["observer_key", "ip_version", "first_ms", "last_ms"]
    address_first = _address_first(store, flt)
    if top_sources and _at_least(store, flt, WHO_ARRAYS_FROM, address_first):
        per_observer, spans, sources = _who_by_arrays(
            store, flt, top_sources, v4_len, v6_len, address_first
        )
    elif top_sources:

        def by_source(w: Any, cols: list[ColumnElement[Any]]) -> Select[Any]:
            first = func.min(w.c.first_ms).label("first_ms")
            last = func.max(w.c.last_ms).label("last_ms")
            keys = (w.c.observer_key, w.c.ip_version, w.c.prefix)
            return select(*keys, first, last, *cols).group_by(*keys)

        prefix = _prefix_column(_T.c.src, v4_len, v6_len).label("prefix")
        rows = _run_weighed(
            store,
            flt,
            [*columns, prefix],
            by_source,
            "asking who reports",
            address_first=address_first,
            plain=True,
        )
        # In key order, so that ties rank the same on both backends whatever order GROUP BY
        # returns (TopN breaks ties by first appearance).
        keys_are_bytes = bool(rows) and type(rows[0][0]) is bytes and type(rows[0][2]) is bytes
        if keys_are_bytes:  # both drivers give bytes: the key in C (~30 ms for 30,000 rows)
            rows.sort(key=operator.itemgetter(0, 1, 2))
        else:
            rows.sort(key=lambda r: (bytes(r[0]), int(r[1]), bytes(r[2])))
        if _whole_bytes(v4_len, v6_len):
            # Each SQL group is one source network: per observer, its totals are its groups'
            # sums added column by column (in C, in key order: the additions Tally.merge
            # would make, in the same order) and its top sources the busiest of its groups.
            # A day of a victim's spoofed sources is ~30,000 groups; adding them a group at a
            # time in Python took ~250 ms.
            observer_of = operator.itemgetter(0) if keys_are_bytes else lambda r: bytes(r[0])
            for key, group in itertools.groupby(rows, key=observer_of):
                mine = list(group)
                cols = list(zip(*mine, strict=True))
                per_observer[key] = _added(cols, 5)
                spans[key] = [int(min(cols[3])), int(max(cols[4]))]
                busiest = heapq.nsmallest(top_sources, mine, key=_busiest_first)  # stable
                sources[key] = [((int(r[1]), bytes(r[2])), _sums(r, 5)) for r in busiest]
        else:
            merged: dict[tuple[bytes, tuple[int, bytes]], list[Any]] = {}
            for row in rows:
                key = bytes(row[0])
                sums = _sums(row, 5)
                if key in per_observer:
                    _merge(per_observer[key], sums)
                    span = spans[key]
                    span[0] = min(span[0], int(row[3]))
                    span[1] = max(span[1], int(row[4]))
                else:
                    per_observer[key] = list(sums)
                    spans[key] = [int(row[3]), int(row[4])]
                # a /20 gathers several SQL groups (3-byte prefixes) here
                at = (key, _masked(int(row[1]), bytes(row[2]), v4_len, v6_len))
                if at in merged:
                    _merge(merged[at], sums)
                else:
                    merged[at] = sums
                    sources.setdefault(key, []).append((at[1], sums))
    else:

        def by_observer(w: Any, cols: list[ColumnElement[Any]]) -> Select[Any]:
            first = func.min(w.c.first_ms).label("first_ms")
            last = func.max(w.c.last_ms).label("last_ms")
            return select(w.c.observer_key, first, last, *cols).group_by(w.c.observer_key)

        for row in _run_weighed(
            store, flt, columns, by_observer, "asking who reports", address_first=address_first
        ):
            key = bytes(row[0])
            per_observer[key] = _sums(row, 3)
            spans[key] = [int(row[1]), int(row[2])]
    if not per_observer:
        return []
    info = _observer_info(store, sorted(per_observer))
    out: list[WhoRow] = []
    for key, totals in per_observer.items():
        fingerprint, contacts, point, trust, (unit, byte_unit) = info.get(
            key, ("", (), "", None, (None, None))
        )
        tally = _from(totals)
        top_list: list[tuple[Network, Estimate]] = []
        if key in sources:
            units = (unit, byte_unit)
            ranked = _rank(
                [(k, sums, units) for k, sums in sources[key]],
                top_sources,
                "packets",
                lambda k: _network(k[0], k[1], v4_len, v6_len),
            )
            top_list = list(ranked.top)
        out.append(
            WhoRow(
                observer_key=key,
                fingerprint=fingerprint,
                trust=trust,
                contacts=contacts,
                point=point,
                reports=tally.reports,
                estimate=tally.estimate(unit=unit, byte_unit=byte_unit),
                first_ms=spans[key][0],
                last_ms=spans[key][1],
                top_sources=top_list,
            )
        )
    out.sort(key=lambda r: (-r.estimate.packets.estimate, r.fingerprint, r.observer_key))
    return out


#: Matching reports from which who (with top sources) reads the window's rows into arrays
#: and groups them there (overflowd/store/window.py) instead of grouping in SQL: a day of a
#: victim's spoofed sources is ~30,000 groups of one report each, which SQLite sorts and both
#: backends hand over as 30,000 rows of sums (the dashboard's whole-day view: 175 ms of CPU
#: on SQLite, 250 ms on PostgreSQL, at a million stored). Below it the SQL path is as quick
#: and a short ``overflowd-query who`` does not import numpy (~60 ms).
WHO_ARRAYS_FROM = 4096


def _at_least(store: Store, flt: ReportFilter, n: int, address_first: bool) -> bool:
    """Whether ``flt`` matches ``n`` reports or more (reads at most n index entries)."""
    inner = _where(select(literal(1)).select_from(_T), flt, address_first=address_first)
    counted = select(func.count()).select_from(inner.limit(n).subquery())
    with store.transaction("counting reports", write=False) as conn:
        return int(conn.execute(counted).scalar_one()) >= n


def _who_by_arrays(
    store: Store,
    flt: ReportFilter,
    top_sources: int,
    v4_len: int,
    v6_len: int,
    address_first: bool,
) -> tuple[
    dict[bytes, list[Any]],
    dict[bytes, list[int]],
    dict[bytes, list[tuple[tuple[int, bytes], list[Any]]]],
]:
    """who's per-observer sums, spans and top source groups (already the busiest
    ``top_sources``, busiest first: their key is the family and a source of the group, which
    :func:`_network` masks) from the window's rows grouped in numpy by (observer, family,
    source prefix): what the SQL path's GROUP BY and merging give."""
    import numpy as np

    from overflowd.store import window as wnd

    w = wnd.read_window(store, flt, sources=True, address_first=address_first)
    assert w is not None  # no limit
    assert w.first_ms is not None and w.ip_version is not None and w.src is not None
    hi, lo = wnd.prefix_words(w, v4_len, v6_len)
    g = wnd.group(w, [w.observer, w.ip_version, hi, lo])
    observer = g.first(w.observer)
    version = g.first(w.ip_version)
    source = g.first(w.src)
    first_ms = g.reduce(np.minimum, w.first_ms)
    last_ms = g.reduce(np.maximum, w.last_ms)
    # the ranking of _busiest_first: minus the point estimate, inf over the cap; ties in key
    # order (lexsort is stable)
    point = g.certain_packets.astype(np.float64) + np.where(
        g.packets_huge > 0, np.inf, g.packets_total
    )
    ranked = np.lexsort((-point, observer))
    bounds = [*np.flatnonzero(np.diff(observer, prepend=-1)).tolist(), len(g)]
    per_observer: dict[bytes, list[Any]] = {}
    spans: dict[bytes, list[int]] = {}
    sources: dict[bytes, list[tuple[tuple[int, bytes], list[Any]]]] = {}
    for lo_i, hi_i in itertools.pairwise(bounds):
        key = w.keys[int(observer[lo_i])]
        per_observer[key] = g.added(lo_i, hi_i)
        spans[key] = [int(first_ms[lo_i:hi_i].min()), int(last_ms[lo_i:hi_i].max())]
        busiest = ranked[lo_i : min(hi_i, lo_i + top_sources)].tolist()
        sources[key] = [((int(version[i]), source[i].tobytes()), g.sums(i)) for i in busiest]
    return per_observer, spans, sources


def _added(columns: Sequence[Sequence[Any]], at: int) -> list[Any]:
    """The Tally fields of a group of result rows, given as their columns (sums from column
    ``at``), added together: what _sums of each row and then _merge of them one by one give,
    in the same order of additions (sum() adds left to right, and 0 + x is x), a field at a
    time in C. A column's values are all of one type (the backend's for that sum)."""
    v = columns[at : at + 12]
    inf = math.inf
    p_huge, b_huge = sum(v[10]), sum(v[11])

    def exact(col: Sequence[Any]) -> int:
        # SQLite's integers as they are; PostgreSQL's numeric (or SQLite's floating-point
        # retry) converted a value at a time, as _sums does
        return sum(col) if type(col[0]) is int else sum(_number(x) for x in col)

    def real(i: int) -> float:
        col = v[i] if type(v[i][0]) is float else [float(x) for x in v[i]]
        return max(col) if i in _MAXES else sum(col)

    return [
        exact(v[0]),
        exact(v[1]),
        exact(v[2]),
        exact(v[3]),
        *(inf if p_huge else real(i) for i in (4, 5, 6)),
        *(inf if b_huge else real(i) for i in (7, 8, 9)),
    ]


def _busiest_first(row: Any) -> float:
    """who's ranking of a (observer, source) group row (sums from column 5) as _rank's:
    minus the point estimate of packets, infinite when a report is over WEIGHT_CAP."""
    certain = row[7] if type(row[7]) is int else _number(row[7])
    return -(float(certain) + (math.inf if row[15] else float(row[9])))


Info = tuple[str, tuple[str, ...], str, str | None, Units]


def _observer_info(store: Store, keys: Sequence[bytes]) -> dict[bytes, Info]:
    """Fingerprint, contacts, point and units (observers table) and the trust label of each
    key's most recently received report (one index probe each: observer_key, received_ms)."""
    t = _T
    latest_trust = (
        select(t.c.trust)
        .where(t.c.observer_key == _O.c.key)
        # received_ms alone: the index's own order, one probe (same-millisecond ties: any)
        .order_by(t.c.received_ms.desc())
        .limit(1)
        .correlate(_O)
        .scalar_subquery()
    )
    out: dict[bytes, Info] = {}
    with store.transaction("reading observers", write=False) as conn:
        for i in range(0, len(keys), MAX_FILTER_OBSERVERS):
            chunk = list(keys[i : i + MAX_FILTER_OBSERVERS])
            stmt = select(
                _O.c.key,
                _O.c.fingerprint,
                _O.c.contacts,
                _O.c.point,
                _O.c.packets_unit,
                _O.c.bytes_unit,
                latest_trust.label("trust"),
            ).where(_O.c.key.in_(chunk))
            for r in conn.execute(stmt):
                out[bytes(r.key)] = (
                    str(r.fingerprint),
                    tuple(json.loads(r.contacts)),
                    str(r.point),
                    None if r.trust is None else str(r.trust),
                    (
                        None if r.packets_unit is None else float(r.packets_unit),
                        None if r.bytes_unit is None else float(r.bytes_unit),
                    ),
                )
    return out


# ---------------------------------------------------------------------------------------------
# top


def top(
    store: Store,
    flt: ReportFilter,
    *,
    by: str,
    n: int = 10,
    v4_len: int = 24,
    v6_len: int = 48,
    measure: Literal["packets", "bytes"] = "packets",
) -> TopResult[GroupKey]:
    """The ``n`` busiest groups ``by`` one of GROUP_BY (addresses by /v4_len, /v6_len), the rest
    as "other" (exact: tallies merge exactly).

    Keys are as :func:`overflowd.estimate.group_key` gives them: an observer key, a network, a
    port or a protocol number. Units: each observer's own for ``by='observer'``; otherwise the
    largest of every observer's (of ``flt.observers`` if given), which may only widen an
    interval.
    """
    if by not in GROUP_BY:
        raise ValueError(f"cannot group by {by!r}: one of {', '.join(GROUP_BY)}")
    if measure not in ("packets", "bytes"):
        raise ValueError(f"measure must be 'packets' or 'bytes', not {measure!r}")
    if n < 0:
        raise ValueError("n must be >= 0")
    _check_lengths(v4_len, v6_len)
    if by != "observer" and (by not in ("src", "dst") or (v4_len, v6_len) == (24, 48)):
        # the common case: an integer key column and the stored weights, ranked in SQL;
        # every group has the same units (first: it needs none of the expressions below,
        # whose building alone cost 0.4 ms a call)
        column = {
            "src": "src_key",
            "dst": "dst_key",
            "srcport": "sport",
            "dstport": "dport",
            "proto": "proto",
        }[by]
        found, rest, count, same = _top_stored(
            store, flt, _T.c[column], n, measure, "asking for the top"
        )
        top_list = []
        for value, sums in found:
            shown_key: Any = _key_network(int(value)) if by in ("src", "dst") else int(value)
            top_list.append((shown_key, _from(sums).estimate(unit=same[0], byte_unit=same[1])))
        other = None if rest is None else _from(rest).estimate(unit=same[0], byte_unit=same[1])
        return TopResult(top=tuple(top_list), other=other, groups=count, folded=0, max_folded=0.0)
    columns: tuple[Any, ...]
    if by in ("src", "dst"):
        prefix = _prefix_column(_T.c[by], v4_len, v6_len).label("k")
        # the prefix is computed in the weighed subquery, once per report
        columns = ("ip_version", prefix)

        def keys_of(r: Any) -> list[Any]:
            return [r.c.ip_version, prefix if r is _T else r.c.k]

    else:
        name = {"observer": "observer_key", "srcport": "sport", "dstport": "dport"}.get(by, by)
        columns = (name,)

        def keys_of(r: Any) -> list[Any]:
            return [r.c[name].label("k")]

    if by != "observer" and (by not in ("src", "dst") or _whole_bytes(v4_len, v6_len)):
        # other whole-byte prefix lengths, ranked in SQL: every group has the same units
        every = _observer_units(store, flt.observers).values()
        same = (_max_unit(u for u, _ in every), _max_unit(b for _, b in every))
        shown, rest, count = _top_rows(
            store, flt, columns, keys_of, n, measure, "asking for the top", same
        )
        top_list = []
        for values, sums in shown:
            if by in ("src", "dst"):
                key: Any = _network(int(values[0]), bytes(values[1]), v4_len, v6_len)
            else:
                key = int(values[0])
            top_list.append((key, _from(sums).estimate(unit=same[0], byte_unit=same[1])))
        other = None if rest is None else _from(rest).estimate(unit=same[0], byte_unit=same[1])
        return TopResult(top=tuple(top_list), other=other, groups=count, folded=0, max_folded=0.0)

    # By observer (each its own units) or a prefix of part of a byte: grouped in SQL, merged
    # and ranked here.
    def grouped(w: Any, cols: list[ColumnElement[Any]]) -> Select[Any]:
        keys = keys_of(w)  # the same objects in both: PostgreSQL matches their parameters
        return select(*keys, *cols).group_by(*keys)

    rows = _run_weighed(store, flt, columns, grouped, "asking for the top")
    if by in ("src", "dst"):
        rows.sort(key=lambda r: (int(r[0]), bytes(r[1])))
    elif by == "observer":
        rows.sort(key=lambda r: bytes(r[0]))
    else:
        rows.sort(key=lambda r: int(r[0]))
    at = 2 if by in ("src", "dst") else 1
    groups: list[tuple[Any, list[Any]]] = []
    for row in rows:
        raw: Any
        if by in ("src", "dst"):
            raw = _masked(int(row[0]), bytes(row[1]), v4_len, v6_len)
        elif by == "observer":
            raw = bytes(row[0])
        else:
            raw = int(row[0])
        if groups and groups[-1][0] == raw:  # a prefix of part of a byte: several SQL groups
            _merge(groups[-1][1], _sums(row, at))
        else:
            groups.append((raw, _sums(row, at)))
    key_of = (lambda k: _network(k[0], k[1], v4_len, v6_len)) if by in ("src", "dst") else None
    if by == "observer":
        units = _observer_units(store, [k for k, _ in groups])
        return _rank([(k, sums, units.get(k, (None, None))) for k, sums in groups], n, measure)
    every = _observer_units(store, flt.observers).values()
    unit = _max_unit(u for u, _ in every)
    byte_unit = _max_unit(b for _, b in every)
    return _rank([(k, sums, (unit, byte_unit)) for k, sums in groups], n, measure, key_of)


def _max_unit(values: Iterable[float | None]) -> float | None:
    out: float | None = None
    for v in values:
        out = larger(out, v)
    return out
