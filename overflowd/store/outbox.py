"""The durable webhook outbox: deliveries waiting, done, and dead, in the report store.

Each row is one report to one URL; one POST may carry several rows of one URL
(:func:`claim_batches`), and its outcome is written for each. The life of a row::

    enqueue ──▶ pending ──claim──▶ (in flight, leased) ──2xx──▶ delivered
                   ▲                     │
                   └──── retry later ────┤ 429/5xx/timeout, attempts left
                                         └──▶ dead   (4xx, 410 Gone, attempts exhausted)

Claiming increments ``attempts`` and pushes ``next_attempt_ms`` one lease into the future in
the same transaction, so two workers never send the same row at once and a worker killed after
sending but before marking only causes a re-send when the lease runs out (the receiver
de-duplicates by ``webhook-id``). A crash loop still ends: attempts are counted at claim time.

Times are wall-clock milliseconds, like :func:`enqueue`'s ``now_ms``, so that every worker
and every restart reads them alike. A wall clock set back would leave due times far ahead:
:func:`rebase_clock` brings them back (a row written "in the future" keeps its delay, counted
from now) and clamps any due time to the longest delay a worker writes; the delivery service
calls it at start-up and whenever it sees the clock step.

Dead rows are kept (the dead letters) with the last status and error, for the operator.
``webhook_endpoints`` remembers URLs that answered 410 Gone (disabled: every pending row for
them goes dead, new ones are enqueued dead) and URLs that asked us to wait (``not_before_ms``).

Sync, like :class:`~overflowd.store.Store`: services call in through ``trio.to_thread``. All
database errors leave as :class:`~overflowd.errors.StoreError` (via ``Store.transaction``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import (
    ColumnElement,
    Connection,
    Executable,
    Table,
    case,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)

from overflowd import report as rpt
from overflowd.store.models import Base
from overflowd.store.repository import Store, dialect_insert

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql as pg_dialect
    from sqlalchemy.dialects import sqlite as sqlite_dialect

PENDING, DELIVERED, DEAD = "pending", "delivered", "dead"
#: Who a row is for: a webhook endpoint (:mod:`overflowd.services.webhook`) or a peer's inbox
#: (:mod:`overflowd.services.peer_push`). Each worker claims only its own kind.
KIND_WEBHOOK, KIND_PEER = "webhook", "peer"
KINDS = (KIND_WEBHOOK, KIND_PEER)
STATES = (PENDING, DELIVERED, DEAD)
#: Error text is cut to the column's size.
MAX_ERROR_CHARS = 400
MAX_URL_CHARS = 2048

_OUTBOX: Table = Base.metadata.tables["webhook_outbox"]
_ENDPOINTS: Table = Base.metadata.tables["webhook_endpoints"]


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One delivery as stored. ``attempts`` counts claims, including the current one."""

    id: int
    report_id: str
    url: str
    cose: bytes
    state: str
    attempts: int
    next_attempt_ms: int
    created_ms: int
    updated_ms: int
    last_status: int | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    disabled_ms: int | None
    disabled_reason: str | None
    not_before_ms: int


def _insert(store: Store, table: Table) -> sqlite_dialect.Insert | pg_dialect.Insert:
    # The dialect's own INSERT, for ON CONFLICT (the same SQL on both backends otherwise).
    return dialect_insert(store.backend == "sqlite")(table)


def _cut(text: str | None) -> str | None:
    return None if text is None else text[:MAX_ERROR_CHARS]


def _fields(m: object) -> dict[str, object]:
    """Every column of an outbox row but ``cose``, typed (rows and listings alike)."""
    r = m._mapping  # type: ignore[attr-defined]
    return {
        "id": int(r["id"]),
        "report_id": str(r["report_id"]),
        "url": str(r["url"]),
        "state": str(r["state"]),
        "attempts": int(r["attempts"]),
        "next_attempt_ms": int(r["next_attempt_ms"]),
        "created_ms": int(r["created_ms"]),
        "updated_ms": int(r["updated_ms"]),
        "last_status": None if r["last_status"] is None else int(r["last_status"]),
        "last_error": None if r["last_error"] is None else str(r["last_error"]),
    }


def _entry(m: object) -> OutboxEntry:
    return OutboxEntry(cose=bytes(m._mapping["cose"]), **_fields(m))  # type: ignore[arg-type,attr-defined]


def enqueue(store: Store, report: rpt.SignedReport, urls: Iterable[str], *, now_ms: int) -> int:
    """Add a pending delivery of ``report`` to each URL; return how many rows are new.

    Idempotent: a (report, URL) pair already in the outbox, in any state, is left alone. A URL
    disabled by 410 Gone gets its row straight away as dead, so the record says why nothing
    was sent. The row carries the COSE bytes and does not need the ``reports`` row; the daemon
    writes both in one transaction (:func:`enqueue_in` inside ``Store.add_reports``).
    """
    wanted = _checked(urls)
    if not wanted:
        return 0
    with store.transaction("enqueueing webhooks", write=True) as conn:
        return enqueue_in(conn, store, report, wanted, now_ms=now_ms)


def _checked(urls: Iterable[str]) -> list[str]:
    wanted = list(dict.fromkeys(urls))
    for url in wanted:
        if not url or len(url) > MAX_URL_CHARS:
            raise ValueError(f"a webhook URL must be 1-{MAX_URL_CHARS} characters")
    return wanted


def enqueue_in(
    conn: Connection, store: Store, report: rpt.SignedReport, urls: Iterable[str], *, now_ms: int
) -> int:
    """:func:`enqueue` inside the caller's transaction ``conn`` (its errors are the caller's)."""
    wanted = _checked(urls)
    if not wanted:
        return 0
    disabled = {
        str(u)
        for u in conn.execute(
            select(_ENDPOINTS.c.url).where(
                _ENDPOINTS.c.url.in_(wanted), _ENDPOINTS.c.disabled_ms.is_not(None)
            )
        ).scalars()
    }
    rows = [
        {
            "report_id": report.report_id,
            "url": url,
            "cose": report.cose,
            "state": DEAD if url in disabled else PENDING,
            "attempts": 0,
            "next_attempt_ms": now_ms,
            "created_ms": now_ms,
            "updated_ms": now_ms,
            "last_status": None,
            "last_error": "endpoint disabled (410 Gone)" if url in disabled else None,
        }
        for url in wanted
    ]
    stmt = (
        _insert(store, _OUTBOX)
        .on_conflict_do_nothing(index_elements=[_OUTBOX.c.report_id, _OUTBOX.c.url])
        .returning(_OUTBOX.c.id)
    )
    return len(list(conn.execute(stmt, rows).scalars()))


@dataclass(frozen=True, slots=True)
class Queued:
    """A report as the outbox keeps it: its id and verbatim bytes (no decoded payload)."""

    report_id: str
    cose: bytes


@dataclass(frozen=True, slots=True)
class Planned:
    """One delivery the node's webhook plan chose: ``report`` to ``url``, first attempt at
    ``due_ms`` (later than now when the prefix budget deferred it). Only the report's id and
    bytes are read: a stored report is enqueued without decoding it again (peer push)."""

    report: rpt.SignedReport | Queued
    url: str
    due_ms: int


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    #: rows new in the outbox
    new: int
    #: deliveries shed because their URL had max_pending_per_url pending rows, or the outbox
    #: max_pending in all (per URL, for the warning)
    outbox_full: dict[str, int]


def enqueue_planned_in(
    conn: Connection,
    store: Store,
    planned: Sequence[Planned],
    *,
    now_ms: int,
    max_pending_per_url: int,
    max_pending: int,
    kind: str = KIND_WEBHOOK,
) -> EnqueueResult:
    """Enqueue ``planned`` inside the caller's transaction, within the pending caps.

    Pending rows are counted once per call (per URL among the ones named, and in all), then
    the new rows are admitted in order while their URL and the total are under the caps; the
    rest are shed and returned by URL (the caller counts ``outbox_full`` and warns). A row
    already in the outbox (same report and URL) stays as it is and costs nothing.
    """
    if not planned:
        return EnqueueResult(0, {})
    for p in planned:
        _checked([p.url])
    o = _OUTBOX
    urls = sorted({p.url for p in planned})
    # Rows kept, pending or dead: dead letters are kept for the operator (until keep_dead_s),
    # so they count too, or a flood toward an endpoint that answers 410 or 4xx would grow the
    # outbox by one dead row per report for ever (review finding).
    kept = o.c.state.in_((PENDING, DEAD))  # an index range, where != would scan
    per_url = {
        str(u): int(n)
        for u, n in conn.execute(
            select(o.c.url, func.count()).where(kept, o.c.url.in_(urls)).group_by(o.c.url)
        )
    }
    total = int(conn.execute(select(func.count()).where(kept)).scalar() or 0)
    # Rows already there (a report written twice) are not new and must not count twice.
    existing = {
        (str(r), str(u))
        for r, u in conn.execute(
            select(o.c.report_id, o.c.url).where(
                o.c.report_id.in_(sorted({p.report.report_id for p in planned})),
                o.c.url.in_(urls),
            )
        )
    }
    disabled = {
        str(u)
        for u in conn.execute(
            select(_ENDPOINTS.c.url).where(
                _ENDPOINTS.c.url.in_(urls), _ENDPOINTS.c.disabled_ms.is_not(None)
            )
        ).scalars()
    }
    rows: list[dict[str, object]] = []
    full: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    for p in planned:
        pair = (p.report.report_id, p.url)
        if pair in existing or pair in seen:
            continue
        seen.add(pair)
        dead = p.url in disabled
        if per_url.get(p.url, 0) >= max_pending_per_url or total >= max_pending:
            full[p.url] = full.get(p.url, 0) + 1
            continue
        per_url[p.url] = per_url.get(p.url, 0) + 1
        total += 1
        rows.append(
            {
                "report_id": p.report.report_id,
                "url": p.url,
                "cose": p.report.cose,
                "state": DEAD if dead else PENDING,
                "attempts": 0,
                "next_attempt_ms": max(now_ms, p.due_ms),
                "created_ms": now_ms,
                "updated_ms": now_ms,
                "last_status": None,
                "last_error": "endpoint disabled (410 Gone)" if dead else None,
                "kind": kind,
            }
        )
    new = 0
    if rows:
        stmt = (
            _insert(store, o)
            .on_conflict_do_nothing(index_elements=[o.c.report_id, o.c.url])
            .returning(o.c.id)
        )
        new = len(list(conn.execute(stmt, rows).scalars()))
    return EnqueueResult(new, full)


#: URLs one claim may be told to skip at most (the worker passes the URLs of its busy hosts,
#: at most its max_concurrency of them); bounds the size of the NOT IN list.
MAX_SKIP_URLS = 1024


def _due(
    now_ms: int, skip_urls: Iterable[str], kind: str = KIND_WEBHOOK, url: str | None = None
) -> list[ColumnElement[bool]]:
    """What makes a row claimable: pending, due, its endpoint neither held nor disabled, its
    URL not among ``skip_urls`` (at most MAX_SKIP_URLS), of the worker's ``kind`` (and
    ``url``, for a worker of one peer)."""
    skip = sorted(set(skip_urls))
    if len(skip) > MAX_SKIP_URLS:
        raise ValueError(f"at most {MAX_SKIP_URLS} URLs can be skipped")
    o, e = _OUTBOX, _ENDPOINTS
    held_back = exists().where(
        e.c.url == o.c.url, or_(e.c.disabled_ms.is_not(None), e.c.not_before_ms > now_ms)
    )
    where = [o.c.state == PENDING, o.c.next_attempt_ms <= now_ms, ~held_back, o.c.kind == kind]
    if url is not None:
        where.append(o.c.url == url)
    if skip:
        where.append(o.c.url.not_in(skip))
    return where


def claim_due(
    store: Store, *, now_ms: int, lease_ms: int, limit: int, skip_urls: Sequence[str] = ()
) -> list[OutboxEntry]:
    """Take up to ``limit`` pending rows that are due, oldest first, and lease them.

    Rows of endpoints that asked us to wait (``not_before_ms`` in the future) or are disabled
    are skipped, and so are rows for ``skip_urls`` (the worker's busy hosts' URLs: claiming
    them would only mean giving them back, and the oldest rows of one slow host would be
    claimed again and again ahead of everybody else's). On PostgreSQL, ``FOR UPDATE SKIP
    LOCKED`` lets several workers claim side by side; on SQLite the write transaction (BEGIN
    IMMEDIATE) serialises them.
    """
    if limit < 1 or lease_ms < 0:
        raise ValueError("limit must be at least 1 and lease_ms not negative")
    o = _OUTBOX
    where = _due(now_ms, skip_urls)
    stmt = (
        select(o)
        .where(*where)
        .order_by(o.c.next_attempt_ms, o.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=o)
    )
    with store.transaction("claiming webhooks", write=True) as conn:
        claimed = [_entry(row) for row in conn.execute(stmt)]
        if not claimed:
            return []
        conn.execute(
            update(o)
            .where(o.c.id.in_([c.id for c in claimed]))
            .values(
                attempts=o.c.attempts + 1,
                next_attempt_ms=now_ms + lease_ms,
                updated_ms=now_ms,
            )
        )
    return [
        OutboxEntry(
            id=c.id,
            report_id=c.report_id,
            url=c.url,
            cose=c.cose,
            state=c.state,
            attempts=c.attempts + 1,
            next_attempt_ms=now_ms + lease_ms,
            created_ms=c.created_ms,
            updated_ms=now_ms,
            last_status=c.last_status,
            last_error=c.last_error,
        )
        for c in claimed
    ]


#: Due rows read to find the URLs of one claim: max_urls times this many.
URL_SCAN_FACTOR = 8


def claim_batches(
    store: Store,
    *,
    now_ms: int,
    lease_ms: int,
    max_urls: int,
    max_reports: int,
    skip_urls: Sequence[str] = (),
    kind: str = KIND_WEBHOOK,
    url: str | None = None,
) -> list[list[OutboxEntry]]:
    """Lease the due rows of up to ``max_urls`` URLs, up to ``max_reports`` rows each.

    One list per URL (the rows one POST carries), oldest first; the URLs whose oldest due row
    is oldest come first. The same rows are skipped as by :func:`claim_due` (held, disabled,
    ``skip_urls``: the worker's busy URLs and those out of POST budget). Each row's claim
    counts an attempt and leases it, as in :func:`claim_due`; rows the worker then does not
    send (over the body cap) go back with :func:`release`. ``kind`` and ``url`` restrict the
    claim to one kind of row (and one URL: a peer's worker claims only its peer's rows).
    """
    if max_urls < 1 or max_reports < 1 or lease_ms < 0:
        raise ValueError("max_urls and max_reports must be at least 1, lease_ms not negative")
    o = _OUTBOX
    where = _due(now_ms, skip_urls, kind, url)
    # The URLs of the oldest due rows, read along the (state, next_attempt_ms) index with a
    # LIMIT: a GROUP BY would read every due row at every claim (measured: 20 ms a claim with
    # 2 000 pending). Fewer URLs than max_urls when old rows crowd one URL: the next claim
    # tops up (that URL is then in flight and skipped).
    urls_stmt = (
        select(o.c.url)
        .where(*where)
        .order_by(o.c.next_attempt_ms, o.c.id)
        .limit(max_urls * URL_SCAN_FACTOR)
    )
    out: list[list[OutboxEntry]] = []
    with store.transaction("claiming webhooks", write=True) as conn:
        urls = list(dict.fromkeys(str(u) for u in conn.execute(urls_stmt).scalars()))
        for url in urls[:max_urls]:
            rows_stmt = (
                select(o)
                .where(*where, o.c.url == url)
                .order_by(o.c.next_attempt_ms, o.c.id)
                .limit(max_reports)
                .with_for_update(skip_locked=True, of=o)
            )
            # Built once, already as claimed (dataclasses.replace per row was a third of a
            # 500-row claim's time).
            lease = {"next_attempt_ms": now_ms + lease_ms, "updated_ms": now_ms}
            claimed = [
                OutboxEntry(
                    cose=bytes(row._mapping["cose"]),
                    **{**_fields(row), "attempts": int(row._mapping["attempts"]) + 1, **lease},  # type: ignore[arg-type]
                )
                for row in conn.execute(rows_stmt)
            ]
            if not claimed:
                continue  # another worker holds them (PostgreSQL, SKIP LOCKED)
            conn.execute(
                update(o)
                .where(o.c.id.in_([c.id for c in claimed]))
                .values(
                    attempts=o.c.attempts + 1,
                    next_attempt_ms=now_ms + lease_ms,
                    updated_ms=now_ms,
                )
            )
            out.append(claimed)
    return out


def _finished_values(
    state: str, now_ms: int, status: int | None, error: str | None, next_attempt_ms: int | None
) -> dict[str, object]:
    """The columns an attempt's outcome sets on its row (the due time only when it has one)."""
    values: dict[str, object] = {
        "state": state,
        "updated_ms": now_ms,
        "last_status": status,
        "last_error": _cut(error),
    }
    if next_attempt_ms is not None:
        values["next_attempt_ms"] = next_attempt_ms
    return values


def _finish(
    store: Store,
    entry_id: int,
    *,
    state: str,
    now_ms: int,
    next_attempt_ms: int | None = None,
    status: int | None = None,
    error: str | None = None,
) -> bool:
    values = _finished_values(state, now_ms, status, error, next_attempt_ms)
    # Only a pending row changes: a row another worker finished meanwhile stays as it is.
    stmt = update(_OUTBOX).where(_OUTBOX.c.id == entry_id, _OUTBOX.c.state == PENDING)
    with store.transaction("updating a webhook delivery", write=True) as conn:
        return bool(conn.execute(stmt.values(**values)).rowcount)


def mark_delivered(store: Store, entry_id: int, *, now_ms: int, status: int) -> bool:
    return _finish(store, entry_id, state=DELIVERED, now_ms=now_ms, status=status)


def mark_delivered_many(store: Store, entry_ids: Sequence[int], *, now_ms: int, status: int) -> int:
    """:func:`mark_delivered` for every row one POST carried, in one transaction."""
    if not entry_ids:
        return 0
    with store.transaction("updating webhook deliveries", write=True) as conn:
        return mark_delivered_in(conn, entry_ids, now_ms=now_ms, status=status)


def mark_delivered_in(
    conn: Connection, entry_ids: Sequence[int], *, now_ms: int, status: int
) -> int:
    """:func:`mark_delivered_many` inside the caller's transaction (a peer delivery writes its
    rows, the refused ones and the peer's counters in one commit)."""
    if not entry_ids:
        return 0
    o = _OUTBOX
    stmt = (
        update(o)
        .where(o.c.id.in_(list(entry_ids)), o.c.state == PENDING)
        .values(state=DELIVERED, updated_ms=now_ms, last_status=status, last_error=None)
    )
    return int(conn.execute(stmt).rowcount)


def mark_dead(
    store: Store, entry_id: int, *, now_ms: int, error: str, status: int | None = None
) -> bool:
    return _finish(store, entry_id, state=DEAD, now_ms=now_ms, status=status, error=error)


def reschedule(
    store: Store,
    entry_id: int,
    *,
    now_ms: int,
    next_attempt_ms: int,
    error: str,
    status: int | None = None,
) -> bool:
    return _finish(
        store,
        entry_id,
        state=PENDING,
        now_ms=now_ms,
        next_attempt_ms=next_attempt_ms,
        status=status,
        error=error,
    )


def release(store: Store, entry_id: int, *, now_ms: int, next_attempt_ms: int) -> bool:
    """Give a claimed row back unsent, to be tried at ``next_attempt_ms``; the claim's attempt
    is not counted (the worker held it back because its endpoint asked us to wait)."""
    o = _OUTBOX
    stmt = (
        update(o)
        .where(o.c.id == entry_id, o.c.state == PENDING, o.c.attempts > 0)
        .values(attempts=o.c.attempts - 1, next_attempt_ms=next_attempt_ms, updated_ms=now_ms)
    )
    with store.transaction("releasing a webhook delivery", write=True) as conn:
        return bool(conn.execute(stmt).rowcount)


def retarget_pending_in(
    conn: Connection, old_url: str, new_url: str, *, now_ms: int, kind: str
) -> int:
    """Move the pending rows of ``kind`` from ``old_url`` to ``new_url``; returns how many.

    A peer's rows are keyed by its inbox URL, and its push cursor has passed what they hold:
    when the operator changes the peer's ``url`` (same key), rows left at the old URL would
    never be claimed again (:func:`overflowd.store.peers.ensure_peer_in` calls this in the
    transaction that stores the new URL). A row whose report is already at the new URL stays
    (that row's duplicate). Due at once, attempts kept.
    """
    if old_url == new_url:
        return 0
    o = _OUTBOX
    there = o.alias("there")
    taken = select(there.c.id).where(there.c.url == new_url, there.c.report_id == o.c.report_id)
    stmt = (
        update(o)
        .where(o.c.url == old_url, o.c.kind == kind, o.c.state == PENDING, ~taken.exists())
        .values(url=new_url, next_attempt_ms=now_ms, updated_ms=now_ms)
    )
    return int(conn.execute(stmt).rowcount)


def release_many(
    store: Store, entry_ids: Sequence[int], *, now_ms: int, next_attempt_ms: int
) -> int:
    """:func:`release` for the rows of one POST at once (one transaction); returns how many."""
    if not entry_ids:
        return 0
    o = _OUTBOX
    stmt = (
        update(o)
        .where(o.c.id.in_(list(entry_ids)), o.c.state == PENDING, o.c.attempts > 0)
        .values(attempts=o.c.attempts - 1, next_attempt_ms=next_attempt_ms, updated_ms=now_ms)
    )
    with store.transaction("releasing webhook deliveries", write=True) as conn:
        return int(conn.execute(stmt).rowcount)


def prune_unserved_peer_rows(store: Store, served_urls: Iterable[str]) -> int:
    """Delete the pending peer rows whose URL is none of ``served_urls`` (the inboxes of the
    peers this node pushes to now): a peer removed from the configuration leaves rows nobody
    would ever deliver, counted in the outbox depth for ever. Returns how many went."""
    o = _OUTBOX
    served = sorted(set(served_urls))
    stmt = delete(o).where(o.c.kind == KIND_PEER, o.c.state == PENDING)
    if served:
        stmt = stmt.where(o.c.url.not_in(served))
    with store.transaction("pruning rows of removed peers", write=True) as conn:
        return int(conn.execute(stmt).rowcount)


def rebase_clock(store: Store, *, now_ms: int, max_delay_ms: int, tolerance_ms: int = 0) -> int:
    """Bring due times written under a clock that has since stepped back into the present.

    Due times are wall-clock milliseconds. A row (or endpoint hold) last written at
    ``updated_ms`` later than ``now_ms + tolerance_ms`` was written before the clock was set
    back; its due time keeps the delay it was given, counted again from now
    (``next = now + (next - updated)``), so it waits at most that delay more instead of the
    size of the step. Then no due time may lie more than ``max_delay_ms`` ahead (the longest
    backoff, Retry-After or lease a worker writes): anything further is clamped to that.
    Call at start-up (the clock may have stepped while nothing ran) and whenever the clock is
    seen to step. Returns how many rows and endpoint holds moved.
    """
    if max_delay_ms < 0 or tolerance_ms < 0:
        raise ValueError("max_delay_ms and tolerance_ms must not be negative")
    o, e = _OUTBOX, _ENDPOINTS
    ahead, horizon = now_ms + tolerance_ms, now_ms + max_delay_ms
    moved = 0
    with store.transaction("re-basing webhook due times", write=True) as conn:
        moved += conn.execute(
            update(o)
            .where(o.c.state == PENDING, o.c.updated_ms > ahead)
            .values(
                next_attempt_ms=case(
                    (
                        o.c.next_attempt_ms > o.c.updated_ms,
                        o.c.next_attempt_ms - o.c.updated_ms + now_ms,
                    ),
                    else_=now_ms,
                ),
                updated_ms=now_ms,
            )
        ).rowcount
        moved += conn.execute(
            update(o)
            .where(o.c.state == PENDING, o.c.next_attempt_ms > horizon)
            .values(next_attempt_ms=horizon, updated_ms=now_ms)
        ).rowcount
        moved += conn.execute(
            update(e)
            .where(e.c.updated_ms > ahead, e.c.not_before_ms > now_ms)
            .values(
                not_before_ms=case(
                    (
                        e.c.not_before_ms > e.c.updated_ms,
                        e.c.not_before_ms - e.c.updated_ms + now_ms,
                    ),
                    else_=now_ms,
                ),
                updated_ms=now_ms,
            )
        ).rowcount
        moved += conn.execute(
            update(e)
            .where(e.c.not_before_ms > horizon)
            .values(not_before_ms=horizon, updated_ms=now_ms)
        ).rowcount
    return int(moved)


def prune_delivered(store: Store, *, before_ms: int, dead_before_ms: int | None = None) -> int:
    """Delete delivered rows last updated before ``before_ms`` and, with ``dead_before_ms``,
    dead letters last updated before that (kept that long for the operator)."""
    o = _OUTBOX
    old = (o.c.state == DELIVERED) & (o.c.updated_ms < before_ms)
    if dead_before_ms is not None:
        old = old | ((o.c.state == DEAD) & (o.c.updated_ms < dead_before_ms))
    with store.transaction("pruning the webhook outbox", write=True) as conn:
        return int(conn.execute(delete(o).where(old)).rowcount)


def _upsert_endpoint(store: Store, url: str, now_ms: int, **values: object) -> Executable:
    stmt = _insert(store, _ENDPOINTS).values(
        url=url,
        disabled_ms=values.get("disabled_ms"),
        disabled_reason=values.get("disabled_reason"),
        not_before_ms=values.get("not_before_ms", 0),
        updated_ms=now_ms,
    )
    return stmt.on_conflict_do_update(
        index_elements=[_ENDPOINTS.c.url], set_={**values, "updated_ms": now_ms}
    )


def disable_endpoint(store: Store, url: str, *, now_ms: int, reason: str) -> int:
    """Record that ``url`` is gone; every pending row for it goes dead. Returns that count."""
    with store.transaction("disabling a webhook endpoint", write=True) as conn:
        conn.execute(
            _upsert_endpoint(store, url, now_ms, disabled_ms=now_ms, disabled_reason=_cut(reason))
        )
        result = conn.execute(
            update(_OUTBOX)
            .where(_OUTBOX.c.url == url, _OUTBOX.c.state == PENDING)
            .values(
                state=DEAD,
                updated_ms=now_ms,
                last_error=_cut(f"endpoint disabled: {reason}"),
            )
        )
        return int(result.rowcount)


def enable_endpoint(store: Store, url: str, *, now_ms: int) -> None:
    """Undo :func:`disable_endpoint` (operator action); dead rows stay dead."""
    with store.transaction("enabling a webhook endpoint", write=True) as conn:
        conn.execute(
            update(_ENDPOINTS)
            .where(_ENDPOINTS.c.url == url)
            .values(disabled_ms=None, disabled_reason=None, updated_ms=now_ms)
        )


def hold_endpoint(store: Store, url: str, *, now_ms: int, until_ms: int) -> None:
    """No request to ``url`` before ``until_ms`` (it said 429/503, maybe with Retry-After)."""
    with store.transaction("slowing a webhook endpoint down", write=True) as conn:
        _hold_in(conn, store, url, now_ms=now_ms, until_ms=until_ms)


def _hold_in(conn: Connection, store: Store, url: str, *, now_ms: int, until_ms: int) -> None:
    e = _ENDPOINTS
    current = conn.execute(select(e.c.not_before_ms).where(e.c.url == url)).scalar()
    if current is not None and int(current) >= until_ms:
        return
    conn.execute(_upsert_endpoint(store, url, now_ms, not_before_ms=until_ms))


def endpoints(store: Store) -> list[Endpoint]:
    e = _ENDPOINTS
    with store.transaction("reading webhook endpoints", write=False) as conn:
        return [
            Endpoint(
                url=str(r.url),
                disabled_ms=None if r.disabled_ms is None else int(r.disabled_ms),
                disabled_reason=r.disabled_reason,
                not_before_ms=int(r.not_before_ms),
            )
            for r in conn.execute(select(e).order_by(e.c.url))
        ]


def entries(
    store: Store, *, state: str | None = None, limit: int | None = None
) -> list[OutboxEntry]:
    """Outbox rows, oldest first; ``state`` picks pending, delivered or dead."""
    if state is not None and state not in STATES:
        raise ValueError(f"state must be one of {STATES}")
    o = _OUTBOX
    stmt = select(o).order_by(o.c.id)
    if state is not None:
        stmt = stmt.where(o.c.state == state)
    if limit is not None:
        stmt = stmt.limit(limit)
    with store.transaction("reading the webhook outbox", write=False) as conn:
        return [_entry(r) for r in conn.execute(stmt)]


def counts(store: Store) -> dict[str, int]:
    """How many rows are in each state (every state present, zero when empty)."""
    o = _OUTBOX
    stmt = select(o.c.state, func.count()).group_by(o.c.state)
    with store.transaction("counting the webhook outbox", write=False) as conn:
        found = {str(s): int(n) for s, n in conn.execute(stmt)}
    return {s: found.get(s, 0) for s in STATES}


def next_due_ms(
    store: Store, *, now_ms: int | None = None, kind: str = KIND_WEBHOOK, url: str | None = None
) -> int | None:
    """When the earliest pending row comes due, or None.

    Without ``now_ms``, endpoint holds are ignored. With it, as :func:`claim_batches` sees the
    outbox at ``now_ms``: a row whose endpoint is held (429/503, maybe an hour or more) or
    disabled is not due, and a hold ends at its ``not_before_ms`` (taken over every held
    endpoint, rows or not: at worst one early look). A worker that waited for the held rows'
    own due times would find them due, claim nothing, and look again at once, for as long as
    the endpoint holds it off. ``kind`` and ``url`` as for :func:`claim_batches`.
    """
    o, e = _OUTBOX, _ENDPOINTS
    mine = [o.c.kind == kind] + ([] if url is None else [o.c.url == url])
    if now_ms is None:
        stmt = select(func.min(o.c.next_attempt_ms)).where(o.c.state == PENDING, *mine)
        with store.transaction("reading the webhook outbox", write=False) as conn:
            value = conn.execute(stmt).scalar()
        return None if value is None else int(value)
    held_back = exists().where(
        e.c.url == o.c.url, or_(e.c.disabled_ms.is_not(None), e.c.not_before_ms > now_ms)
    )
    free = select(func.min(o.c.next_attempt_ms)).where(o.c.state == PENDING, ~held_back, *mine)
    hold_ends = select(func.min(e.c.not_before_ms)).where(
        e.c.disabled_ms.is_(None),
        e.c.not_before_ms > now_ms,
        *([] if url is None else [e.c.url == url]),
    )
    with store.transaction("reading the webhook outbox", write=False) as conn:
        values = [conn.execute(free).scalar(), conn.execute(hold_ends).scalar()]
    due = [int(v) for v in values if v is not None]
    return min(due) if due else None


def pending_urls(store: Store) -> Sequence[str]:
    o = _OUTBOX
    stmt = select(o.c.url).where(o.c.state == PENDING).distinct()
    with store.transaction("reading the webhook outbox", write=False) as conn:
        return [str(u) for u in conn.execute(stmt).scalars()]


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What one row of a POST becomes: ``state`` PENDING (rescheduled to ``next_attempt_ms``)
    or DEAD, with the answer's status and the error kept for the operator."""

    entry_id: int
    state: str
    error: str
    status: int | None = None
    next_attempt_ms: int | None = None


def finish_many(
    store: Store,
    outcomes: Sequence[RowOutcome],
    *,
    now_ms: int,
    hold: tuple[str, int] | None = None,
) -> int:
    """The failed outcome of one POST for every row it carried, and the endpoint's hold
    (``(url, until_ms)``: it said 429/503), in one transaction: a POST's outcome costs one
    commit however many rows it carried (:func:`mark_delivered_many` for a 2xx). Only pending
    rows change, as in :func:`reschedule` and :func:`mark_dead`; returns how many did."""
    with store.transaction("updating webhook deliveries", write=True) as conn:
        if hold is not None:
            _hold_in(conn, store, hold[0], now_ms=now_ms, until_ms=hold[1])
        return finish_in(conn, outcomes, now_ms=now_ms)


def finish_in(conn: Connection, outcomes: Sequence[RowOutcome], *, now_ms: int) -> int:
    """:func:`finish_many` (without a hold) inside the caller's transaction."""
    o = _OUTBOX
    changed = 0
    # Rows of one POST mostly end alike: one UPDATE per distinct outcome, not per row.
    alike: dict[tuple[str, str, int | None, int | None], list[int]] = {}
    for row in outcomes:
        if row.state not in (PENDING, DEAD):
            raise ValueError(f"a failed POST leaves a row pending or dead, not {row.state}")
        key = (row.state, row.error, row.status, row.next_attempt_ms)
        alike.setdefault(key, []).append(row.entry_id)
    for (state, error, status, next_attempt_ms), ids in alike.items():
        values = _finished_values(state, now_ms, status, error, next_attempt_ms)
        stmt = update(o).where(o.c.id.in_(ids), o.c.state == PENDING).values(**values)
        changed += conn.execute(stmt).rowcount
    return changed


__all__ = [
    "DEAD",
    "DELIVERED",
    "KINDS",
    "KIND_PEER",
    "KIND_WEBHOOK",
    "PENDING",
    "STATES",
    "Endpoint",
    "EnqueueResult",
    "OutboxEntry",
    "Planned",
    "RowOutcome",
    "claim_batches",
    "claim_due",
    "counts",
    "disable_endpoint",
    "enable_endpoint",
    "endpoints",
    "enqueue",
    "enqueue_planned_in",
    "entries",
    "finish_in",
    "finish_many",
    "hold_endpoint",
    "mark_dead",
    "mark_delivered",
    "mark_delivered_in",
    "mark_delivered_many",
    "next_due_ms",
    "pending_urls",
    "prune_delivered",
    "prune_unserved_peer_rows",
    "rebase_clock",
    "release",
    "release_many",
    "reschedule",
]


# ---------------------------------------------------------------------------------------------
# The operator's view and hands: ``overflowd-query outbox``, ``overflowd outbox retry|enable``.
# They run in another process than the daemon (SQLite WAL, PostgreSQL); each is one
# transaction, and a refused request writes nothing.

#: Ids one retry may name at most: they go into one IN list, far under SQLite's 32,766 bound
#: parameters; more than this on a command line is a job for ``--all``.
MAX_RETRY_IDS = 10_000


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """An outbox row as the operator sees it: :class:`OutboxEntry` without the COSE bytes
    (a listing of a million rows need not read half a gigabyte of reports)."""

    id: int
    report_id: str
    url: str
    state: str
    attempts: int
    next_attempt_ms: int
    created_ms: int
    updated_ms: int
    last_status: int | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class EndpointView:
    """An endpoint that holds deliveries back: disabled (410 Gone) or asked us to wait."""

    url: str
    disabled_ms: int | None
    disabled_reason: str | None
    not_before_ms: int
    #: its dead rows (what ``overflowd outbox retry --all --url`` would send)
    dead: int


@dataclass(frozen=True, slots=True)
class OutboxListing:
    """What ``overflowd-query outbox`` prints: rows newest first, and how many there were."""

    rows: tuple[OutboxRow, ...]
    #: rows the filter selects (``rows`` holds at most ``limit`` of them)
    matching: int
    #: rows per state, of the URL when one was given, else of the whole outbox
    counts: dict[str, int]
    #: endpoints disabled or held now (of the URL when given), most recently changed first
    endpoints: tuple[EndpointView, ...]
    endpoints_matching: int


@dataclass(frozen=True, slots=True)
class UrlSummary:
    """One URL's rows per state and its endpoint state (``disabled_ms`` None: enabled)."""

    url: str
    counts: dict[str, int]
    disabled_ms: int | None
    disabled_reason: str | None
    not_before_ms: int


@dataclass(frozen=True, slots=True)
class RetryResult:
    """The outcome of a retry. When ``refused``, nothing was changed (all or nothing)."""

    retried: int
    #: named ids with no row
    unknown: tuple[int, ...] = ()
    #: named rows that are not dead, with their state
    not_dead: tuple[tuple[int, str], ...] = ()
    #: named dead rows whose endpoint is disabled, with its URL
    disabled: tuple[tuple[int, str], ...] = ()
    #: ``--all``: dead rows left as they are because their endpoint is disabled, and how many
    #: endpoints those are
    skipped_disabled: int = 0
    skipped_endpoints: int = 0

    @property
    def refused(self) -> bool:
        return bool(self.unknown or self.not_dead or self.disabled)


_ROW_COLUMNS = tuple(c for c in _OUTBOX.c if c.name != "cose")


def _row(r: object) -> OutboxRow:
    return OutboxRow(**_fields(r))  # type: ignore[arg-type]


def _state_counts(conn: Connection, url: str | None) -> dict[str, int]:
    o = _OUTBOX
    stmt = select(o.c.state, func.count()).group_by(o.c.state)
    if url is not None:
        stmt = stmt.where(o.c.url == url)
    found = {str(s): int(n) for s, n in conn.execute(stmt)}
    return {s: found.get(s, 0) for s in STATES}


def list_outbox(
    store: Store, *, now_ms: int, limit: int, state: str | None = None, url: str | None = None
) -> OutboxListing:
    """Rows newest first (``state``/``url`` select), at most ``limit``, with the counts and the
    endpoints holding deliveries back. Reads only (``Store.open(create=False)`` will do)."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    if state is not None and state not in STATES:
        raise ValueError(f"state must be one of {STATES}")
    o, e = _OUTBOX, _ENDPOINTS
    where = []
    if state is not None:
        where.append(o.c.state == state)
    if url is not None:
        where.append(o.c.url == url)
    held = [or_(e.c.disabled_ms.is_not(None), e.c.not_before_ms > now_ms)]
    if url is not None:
        held.append(e.c.url == url)
    dead = (
        select(func.count())
        .where(o.c.url == e.c.url, o.c.state == DEAD)
        .correlate(e)
        .scalar_subquery()
    )
    with store.transaction("reading the webhook outbox", write=False) as conn:
        rows = tuple(
            _row(r)
            for r in conn.execute(
                select(*_ROW_COLUMNS).where(*where).order_by(o.c.id.desc()).limit(limit)
            )
        )
        matching = int(conn.execute(select(func.count()).select_from(o).where(*where)).scalar_one())
        counts = _state_counts(conn, url)
        views = tuple(
            EndpointView(
                url=str(r.url),
                disabled_ms=None if r.disabled_ms is None else int(r.disabled_ms),
                disabled_reason=r.disabled_reason,
                not_before_ms=int(r.not_before_ms),
                dead=int(r.dead),
            )
            for r in conn.execute(
                select(e, dead.label("dead"))
                .where(*held)
                .order_by(e.c.updated_ms.desc(), e.c.url)
                .limit(limit)
            )
        )
        held_count = conn.execute(select(func.count()).select_from(e).where(*held)).scalar_one()
    return OutboxListing(
        rows=rows,
        matching=matching,
        counts=counts,
        endpoints=views,
        endpoints_matching=int(held_count),
    )


def _summary(conn: Connection, url: str) -> UrlSummary | None:
    e = _ENDPOINTS
    counts = _state_counts(conn, url)
    endpoint = conn.execute(select(e).where(e.c.url == url)).first()
    if endpoint is None and not any(counts.values()):
        return None
    if endpoint is None:
        return UrlSummary(url, counts, disabled_ms=None, disabled_reason=None, not_before_ms=0)
    return UrlSummary(
        url=url,
        counts=counts,
        disabled_ms=None if endpoint.disabled_ms is None else int(endpoint.disabled_ms),
        disabled_reason=endpoint.disabled_reason,
        not_before_ms=int(endpoint.not_before_ms),
    )


def url_summary(store: Store, url: str) -> UrlSummary | None:
    """``url``'s rows and endpoint state; None when no row and no endpoint has that URL."""
    with store.transaction("reading the webhook outbox", write=False) as conn:
        return _summary(conn, url)


def _requeue(now_ms: int) -> dict[str, object]:
    # Due now, with its attempts counted afresh (max_attempts again). The last status and
    # error stay, saying what happened before, until the next attempt writes its own.
    return {"state": PENDING, "attempts": 0, "next_attempt_ms": now_ms, "updated_ms": now_ms}


def retry_dead(store: Store, ids: Sequence[int], *, now_ms: int) -> RetryResult:
    """Put the dead rows ``ids`` back to pending, due now, attempts reset: all of them, or
    none (a named id that is unknown, not dead, or of a disabled endpoint refuses the lot)."""
    wanted = sorted(set(ids))
    if not wanted or len(wanted) > MAX_RETRY_IDS:
        raise ValueError(f"name 1-{MAX_RETRY_IDS} ids")
    o, e = _OUTBOX, _ENDPOINTS
    with store.transaction("retrying webhook deliveries", write=True) as conn:
        # FOR UPDATE (PostgreSQL; SQLite's BEGIN IMMEDIATE already holds the write lock): no
        # worker changes these rows between the checks and the update.
        found = {
            int(r.id): (str(r.state), str(r.url))
            for r in conn.execute(
                select(o.c.id, o.c.state, o.c.url).where(o.c.id.in_(wanted)).with_for_update(of=o)
            )
        }
        urls = sorted({url for _, url in found.values()})
        disabled: set[str] = set()
        if urls:
            gone = select(e.c.url).where(e.c.url.in_(urls), e.c.disabled_ms.is_not(None))
            disabled = {str(u) for u in conn.execute(gone).scalars()}
        result = RetryResult(
            retried=0,
            unknown=tuple(i for i in wanted if i not in found),
            not_dead=tuple((i, s) for i, (s, _) in sorted(found.items()) if s != DEAD),
            disabled=tuple(
                (i, u) for i, (s, u) in sorted(found.items()) if s == DEAD and u in disabled
            ),
        )
        if result.refused:
            return result
        changed = conn.execute(
            update(o).where(o.c.id.in_(wanted), o.c.state == DEAD).values(**_requeue(now_ms))
        ).rowcount
    return RetryResult(retried=int(changed))


def retry_all_dead(store: Store, *, now_ms: int, url: str | None = None) -> RetryResult:
    """Put every dead row (of ``url``) back to pending, due now, attempts reset, except those
    of disabled endpoints: they are left, and counted (``overflowd outbox enable URL`` first)."""
    o, e = _OUTBOX, _ENDPOINTS
    gone = exists().where(e.c.url == o.c.url, e.c.disabled_ms.is_not(None))
    where = [o.c.state == DEAD]
    if url is not None:
        where.append(o.c.url == url)
    with store.transaction("retrying webhook deliveries", write=True) as conn:
        changed = conn.execute(update(o).where(*where, ~gone).values(**_requeue(now_ms))).rowcount
        skipped, endpoints_skipped = conn.execute(
            select(func.count(), func.count(o.c.url.distinct())).where(*where, gone)
        ).one()
    return RetryResult(
        retried=int(changed),
        skipped_disabled=int(skipped),
        skipped_endpoints=int(endpoints_skipped),
    )


def enable_url(store: Store, url: str, *, now_ms: int) -> UrlSummary | None:
    """Clear a 410 Gone disable of ``url`` (operator action); dead rows stay dead. Returns the
    URL's summary as it was before (``disabled_ms`` says whether it was disabled), or None,
    changing nothing, when no row and no endpoint has that URL."""
    e = _ENDPOINTS
    with store.transaction("enabling a webhook endpoint", write=True) as conn:
        before = _summary(conn, url)
        if before is not None and before.disabled_ms is not None:
            conn.execute(
                update(e)
                .where(e.c.url == url)
                .values(disabled_ms=None, disabled_reason=None, updated_ms=now_ms)
            )
    return before


__all__ += [
    "MAX_RETRY_IDS",
    "EndpointView",
    "OutboxListing",
    "OutboxRow",
    "RetryResult",
    "UrlSummary",
    "enable_url",
    "list_outbox",
    "retry_all_dead",
    "retry_dead",
    "url_summary",
]
