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

import base64
import binascii
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
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
)
from sqlalchemy.exc import OperationalError

from overflowd.estimate import (
    GROUP_BY,
    Estimate,
    GroupKey,
    Tally,
    TopResult,
)
from overflowd.store.models import BIGINT_MAX, Base
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
    "find_reports",
    "page_reports",
    "resolve_observer",
    "top",
    "who",
]

#: Trust labels from low to high. ``min_trust`` keeps reports that arrived with that label or a
#: higher one; our own reports (``via = 'local'``, no label) pass any. ``unknown`` is the lowest,
#: so ``min_trust='unknown'`` keeps everything, also reports stored before labels existed.
TRUST_ORDER = ("unknown", "continuity", "dns", "pinned")

#: A report whose weight n·k/p (or b·k/p) is above this counts as unbounded (its estimate is
#: infinite) instead of entering the sums: PostgreSQL raises on a float8 overflow where SQLite
#: and Python give inf, and Σw² of a few weights near 1e154 would overflow. 1e140 keeps Σw² of
#: 1e20 reports finite; a real flow weighs 1/rate (1e4 at the default rate), so only an
#: observer claiming p < 1e-112 for an ordinary flow ever reaches it.
WEIGHT_CAP = 1e140

#: The longest fingerprint prefix people type: the whole fingerprint (16 hex digits and dashes).
_FINGERPRINT = re.compile(r"[0-9a-f]{1,4}(-[0-9a-f]{1,4}){0,3}")
#: The shortest fingerprint prefix accepted: fewer digits match too many keys to mean one.
MIN_FINGERPRINT_DIGITS = 4
#: Observer keys in one filter: each is a bound parameter (SQLite allows 32,766 per statement).
MAX_FILTER_OBSERVERS = 1000

_T = Base.metadata.tables["reports"]
_O = Base.metadata.tables["observers"]


# ---------------------------------------------------------------------------------------------
# The filter


@dataclass(frozen=True)
class ReportFilter:
    """Which reports a question is about; every field left at its default matches all."""

    #: the flow's last packet at or after this (ms since the epoch): "traffic since"
    since_ms: int | None = None
    #: the flow's first packet at or before this
    until_ms: int | None = None
    #: arrival at this node (``received_ms``), at or after / at or before
    received_since_ms: int | None = None
    received_until_ms: int | None = None
    src: Network | None = None
    dst: Network | None = None
    #: source or destination in it (a network's own view; peers)
    either: Network | None = None
    proto: int | None = None
    #: source or destination port
    port: int | None = None
    sport: int | None = None
    dport: int | None = None
    kind: str | None = None
    #: 32-byte observer keys; empty: any observer
    observers: tuple[bytes, ...] = ()
    #: one of TRUST_ORDER
    min_trust: str | None = None

    def __post_init__(self) -> None:
        for name in ("since_ms", "until_ms", "received_since_ms", "received_until_ms"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= BIGINT_MAX:
                raise ValueError(f"{name} must be 0 to {BIGINT_MAX}, not {value}")
        for name, top_value in (
            ("proto", 255),
            ("port", 65535),
            ("sport", 65535),
            ("dport", 65535),
        ):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= top_value:
                raise ValueError(f"{name} must be 0 to {top_value}, not {value}")
        for name in ("src", "dst", "either"):
            net = getattr(self, name)
            if net is not None and not isinstance(
                net, ipaddress.IPv4Network | ipaddress.IPv6Network
            ):
                raise TypeError(f"{name} must be an IPv4Network or IPv6Network")
        if len(self.observers) > MAX_FILTER_OBSERVERS:
            raise ValueError(f"at most {MAX_FILTER_OBSERVERS} observers in one filter")
        for key in self.observers:
            if len(key) != 32:
                raise ValueError(f"an observer key is 32 bytes, not {len(key)}")
        if self.min_trust is not None and self.min_trust not in TRUST_ORDER:
            raise ValueError(f"min_trust must be one of {', '.join(TRUST_ORDER)}")


def _in(column: Any, net: Network) -> ColumnElement[bool]:
    lo, hi = network_range(net)
    # ip_version: an IPv6 prefix never returns IPv4 reports (models.py)
    return and_(column >= lo, column <= hi, _T.c.ip_version == net.version)


def conditions(flt: ReportFilter) -> list[ColumnElement[bool]]:
    """The filter as SQL conditions on the reports table (empty: every report)."""
    t = _T
    out: list[ColumnElement[bool]] = []
    if flt.since_ms is not None:
        out.append(t.c.last_ms >= flt.since_ms)
    if flt.until_ms is not None:
        out.append(t.c.first_ms <= flt.until_ms)
    if flt.received_since_ms is not None:
        out.append(t.c.received_ms >= flt.received_since_ms)
    if flt.received_until_ms is not None:
        out.append(t.c.received_ms <= flt.received_until_ms)
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


def _where(stmt: Select[Any], flt: ReportFilter) -> Select[Any]:
    conds = conditions(flt)
    return stmt.where(*conds) if conds else stmt


# ---------------------------------------------------------------------------------------------
# Observers


def resolve_observer(store: Store, text: str) -> tuple[bytes, ...]:
    """The observer keys ``text`` names: a key in base64 (standard or url-safe, 32 bytes) or a
    fingerprint (``1a2b-3c4d-...``), whole or a prefix of at least 4 digits naming one key.

    ValueError with a message for people when it names none, or a prefix names several.
    """
    text = text.strip()
    key = _decode_key(text)
    if key is not None:
        return (key,)
    wanted = text.lower()
    if not _FINGERPRINT.fullmatch(wanted):
        raise ValueError(
            f"observer {text!r}: neither a base64 key (32 bytes) nor a fingerprint like 1a2b-3c4d"
        )
    digits = wanted.replace("-", "")
    if len(digits) < MIN_FINGERPRINT_DIGITS:
        raise ValueError(
            f"observer {text!r}: a fingerprint prefix needs at least "
            f"{MIN_FINGERPRINT_DIGITS} digits"
        )
    # LIKE on the stored form; the prefix is hex and dashes only, so nothing needs escaping.
    stmt = (
        select(_O.c.key, _O.c.fingerprint)
        .where(_O.c.fingerprint.like(wanted + "%"))
        .order_by(_O.c.fingerprint, _O.c.key)
        .limit(MAX_FILTER_OBSERVERS + 1)
    )
    with store.transaction("resolving an observer", write=False) as conn:
        rows = [(bytes(r.key), str(r.fingerprint)) for r in conn.execute(stmt)]
    if not rows:
        raise ValueError(f"observer {text!r}: no observer with that fingerprint in {store.name}")
    fingerprints = sorted({fp for _, fp in rows})
    if len(fingerprints) > 1:
        shown = ", ".join(fingerprints[:5]) + (", ..." if len(fingerprints) > 5 else "")
        raise ValueError(
            f"observer {text!r}: the prefix matches {len(fingerprints)} observers ({shown}); "
            "give more of the fingerprint"
        )
    return tuple(k for k, _ in rows[:MAX_FILTER_OBSERVERS])


def _decode_key(text: str) -> bytes | None:
    if len(text) < 43 or not re.fullmatch(r"[A-Za-z0-9+/_-]+={0,2}", text):
        return None
    padded = text + "=" * (-len(text) % 4)
    try:
        if "+" in text or "/" in text:
            key = base64.b64decode(padded, validate=True)
        else:
            key = base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError):
        return None
    return key if len(key) == 32 else None


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


def _sum_columns(store: Store, *, real_certain: bool = False) -> list[ColumnElement[Any]]:
    """The Tally fields as SQL aggregates (labels = from_sums arguments, plus the two counts
    of reports over WEIGHT_CAP)."""
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
        # SQLite's integer SUM is exact and raises on overflow; _run_sums then asks again in
        # floating point (only forged counters near 2**63 get there).
        cp = t.c.packets * t.c.sampling_interval
        cb = t.c.bytes * t.c.sampling_interval
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
        try:
            return list(conn.execute(build(_sum_columns(store))))
        except OperationalError as exc:
            if store.backend != "sqlite" or "overflow" not in str(exc.orig):
                raise
        return list(conn.execute(build(_sum_columns(store, real_certain=True))))


def _number(value: Any) -> int:
    if isinstance(value, Decimal | float):
        return int(value) if math.isfinite(value) else BIGINT_MAX
    return int(value)


def _tally(row: Any) -> Tally:
    m = row._mapping
    inf = math.inf
    p_huge, b_huge = int(m["packets_huge"]), int(m["bytes_huge"])
    return Tally.from_sums(
        reports=int(m["reports"]),
        certain_reports=int(m["certain_reports"]),
        certain_packets=_number(m["certain_packets"]),
        certain_bytes=_number(m["certain_bytes"]),
        packets_total=inf if p_huge else float(m["packets_total"]),
        packets_squares=inf if p_huge else float(m["packets_squares"]),
        packets_max=inf if p_huge else float(m["packets_max"]),
        bytes_total=inf if b_huge else float(m["bytes_total"]),
        bytes_squares=inf if b_huge else float(m["bytes_squares"]),
        bytes_max=inf if b_huge else float(m["bytes_max"]),
    )


Units = tuple[float | None, float | None]


def _rank(
    groups: Sequence[tuple[Any, Tally, Units]],
    n: int,
    measure: Literal["packets", "bytes"],
) -> TopResult[Any]:
    """The ``n`` largest groups by point estimate, the rest merged into "other" (exact).

    What :meth:`TopN.result` gives for the same groups (ties by order in ``groups``), but the
    intervals (a tenth of a millisecond each) are computed for the rows shown only, not for
    every group: a top-10 of the sources of an hour may rank tens of thousands.
    """

    def point(item: tuple[Any, Tally, Units]) -> float:
        t = item[1]
        if measure == "packets":
            return -(float(t.certain_packets) + t.packets_total)
        return -(float(t.certain_bytes) + t.bytes_total)

    ranked = sorted(groups, key=point)  # stable: ties keep their order
    shown = [
        (key, tally.estimate(unit=units[0], byte_unit=units[1])) for key, tally, units in ranked[:n]
    ]
    rest = Tally()
    rest_unit: float | None = None
    rest_byte_unit: float | None = None
    for _, tally, (unit, byte_unit) in ranked[n:]:
        rest.merge(tally)
        rest_unit = _larger(rest_unit, unit)
        rest_byte_unit = _larger(rest_byte_unit, byte_unit)
    other = rest.estimate(unit=rest_unit, byte_unit=rest_byte_unit) if rest.reports else None
    return TopResult(top=tuple(shown), other=other, groups=len(groups), folded=0, max_folded=0.0)


def _larger(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _observer_units(store: Store, keys: Sequence[bytes] = ()) -> dict[bytes, Units]:
    """Each observer's unit (observers.packets_unit/bytes_unit, kept by every insert): the
    largest weight among all its p < 1 reports, what a report it did not send could have
    weighed. ``keys``: only those (else every observer)."""
    stmt = select(_O.c.key, _O.c.packets_unit, _O.c.bytes_unit)
    out: dict[bytes, Units] = {}
    with store.transaction("reading observer units", write=False) as conn:
        chunks: list[list[bytes] | None] = [
            list(keys[i : i + MAX_FILTER_OBSERVERS])
            for i in range(0, len(keys), MAX_FILTER_OBSERVERS)
        ]
        for chunk in chunks or [None]:
            part = stmt if chunk is None else stmt.where(_O.c.key.in_(chunk))
            for r in conn.execute(part):
                out[bytes(r.key)] = (
                    None if r.packets_unit is None else float(r.packets_unit),
                    None if r.bytes_unit is None else float(r.bytes_unit),
                )
    return out


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


def _check_lengths(v4_len: int, v6_len: int) -> None:
    if not (0 <= v4_len <= 32 and 0 <= v6_len <= 128):
        raise ValueError(f"prefix lengths must be 0..32 and 0..128, not {v4_len}, {v6_len}")


# ---------------------------------------------------------------------------------------------
# who


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
    """
    _check_lengths(v4_len, v6_len)
    if top_sources < 0:
        raise ValueError("top_sources must not be negative")
    t = _T
    groups = _run_sums(
        store,
        lambda cols: _where(
            select(
                t.c.observer_key,
                func.min(t.c.first_ms).label("first_ms"),
                func.max(t.c.last_ms).label("last_ms"),
                *cols,
            ),
            flt,
        ).group_by(t.c.observer_key),
        "asking who reports",
    )
    if not groups:
        return []
    keys = sorted(bytes(r.observer_key) for r in groups)
    info = _observer_info(store, keys)
    sources: dict[bytes, list[tuple[Network, Tally]]] = {}
    if top_sources:
        prefix = _prefix_column(t.c.src, v4_len, v6_len).label("prefix")
        by_prefix = _run_sums(
            store,
            lambda cols: _where(
                select(t.c.observer_key, t.c.ip_version, prefix, *cols), flt
            ).group_by(t.c.observer_key, t.c.ip_version, prefix),
            "asking who reports",
        )
        # In key order, so that ties rank the same on both backends whatever order GROUP BY
        # returns (TopN breaks ties by first appearance).
        by_prefix.sort(key=lambda r: (int(r.ip_version), bytes(r.prefix)))
        merged: dict[tuple[bytes, Network], Tally] = {}
        for row in by_prefix:
            # a prefix of whole bytes is one SQL group; a /20 gathers several here
            net = _network(int(row.ip_version), bytes(row.prefix), v4_len, v6_len)
            at = (bytes(row.observer_key), net)
            if at in merged:
                merged[at].merge(_tally(row))
            else:
                merged[at] = _tally(row)
                sources.setdefault(at[0], []).append((net, merged[at]))
    rows: list[WhoRow] = []
    for row in groups:
        key = bytes(row.observer_key)
        fingerprint, contacts, point, trust, (unit, byte_unit) = info.get(
            key, ("", (), "", None, (None, None))
        )
        tally = _tally(row)
        top_list: list[tuple[Network, Estimate]] = []
        if key in sources:
            units = (unit, byte_unit)
            ranked = _rank([(k, t, units) for k, t in sources[key]], top_sources, "packets")
            top_list = list(ranked.top)
        rows.append(
            WhoRow(
                observer_key=key,
                fingerprint=fingerprint,
                trust=trust,
                contacts=contacts,
                point=point,
                reports=tally.reports,
                estimate=tally.estimate(unit=unit, byte_unit=byte_unit),
                first_ms=int(row.first_ms),
                last_ms=int(row.last_ms),
                top_sources=top_list,
            )
        )
    rows.sort(key=lambda r: (-r.estimate.packets.estimate, r.fingerprint, r.observer_key))
    return rows


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
    t = _T
    keys: list[Any]
    if by in ("src", "dst"):
        keys = [t.c.ip_version, _prefix_column(t.c[by], v4_len, v6_len).label("k")]
    else:
        column = {
            "observer": t.c.observer_key,
            "srcport": t.c.sport,
            "dstport": t.c.dport,
            "proto": t.c.proto,
        }[by]
        keys = [column.label("k")]
    rows = _run_sums(
        store,
        lambda cols: _where(select(*keys, *cols), flt).group_by(*keys),
        "asking for the top",
    )
    if by in ("src", "dst"):
        rows.sort(key=lambda r: (int(r.ip_version), bytes(r.k)))
    elif by == "observer":
        rows.sort(key=lambda r: bytes(r.k))
    else:
        rows.sort(key=lambda r: int(r.k))
    tallies: list[tuple[GroupKey, Tally]] = []
    for row in rows:
        key: GroupKey
        if by in ("src", "dst"):
            key = _network(int(row.ip_version), bytes(row.k), v4_len, v6_len)
        elif by == "observer":
            key = bytes(row.k)
        else:
            key = int(row.k)
        if tallies and tallies[-1][0] == key:  # a prefix of part of a byte: several SQL groups
            tallies[-1][1].merge(_tally(row))
        else:
            tallies.append((key, _tally(row)))
    if by == "observer":
        units = _observer_units(store, [k for k, _ in tallies if isinstance(k, bytes)])
        return _rank([(k, t, units.get(k, (None, None))) for k, t in tallies], n, measure)  # type: ignore[arg-type]
    every = _observer_units(store, flt.observers).values()
    unit = _max_unit(u for u, _ in every)
    byte_unit = _max_unit(b for _, b in every)
    return _rank([(k, t, (unit, byte_unit)) for k, t in tallies], n, measure)


def _max_unit(values: Iterable[float | None]) -> float | None:
    out: float | None = None
    for v in values:
        out = _larger(out, v)
    return out
