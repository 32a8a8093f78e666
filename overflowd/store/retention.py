"""What the store holds, by kind, and pruning it: by age, by size, for headroom.

Two kinds of report: **own** (``via = 'local'``, signed by this node) and **received**
(every other ``via``: other nodes' reports, over UDP, webhooks, imports or gossip). Each has
its own budget (:class:`~overflowd.config.StorageSettings`); the retention service
(:mod:`overflowd.services.retention`) calls these functions from a worker thread.

Every prune deletes one bounded batch (``limit`` rows, oldest received first) in one short
transaction and returns what it deleted, so the caller loops, and no prune ever holds SQLite's
write lock (or PostgreSQL row locks) for longer than one batch takes. A report that a pending
webhook delivery refers to is never deleted, whatever its age or kind: the outbox row carries
its own copy of the COSE bytes, but the report is what the operator looks up when a delivery
comes back. The observers' report counts follow in the same transaction.

Sync, like :class:`~overflowd.store.Store`; database errors leave as
:class:`~overflowd.errors.StoreError` (via ``Store.transaction``). It must never log report
bodies.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Table, delete, exists, func, select, text, update

from overflowd.errors import StoreError
from overflowd.storage_policy import ROW_OVERHEAD_BYTES, KeyUsage, PrunedRow
from overflowd.store.models import Base
from overflowd.store.outbox import PENDING
from overflowd.store.repository import Store

OWN, RECEIVED = "own", "received"
KINDS = (OWN, RECEIVED)

_REPORTS: Table = Base.metadata.tables["reports"]
_ARRIVALS: Table = Base.metadata.tables["report_arrivals"]
_OBSERVERS: Table = Base.metadata.tables["observers"]
_OUTBOX: Table = Base.metadata.tables["webhook_outbox"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Rows and bytes (COSE bytes plus :data:`ROW_OVERHEAD_BYTES` a row) of one kind."""

    reports: int
    bytes: int


@dataclass(frozen=True, slots=True)
class Headroom:
    """Free space for the store to grow into, and the size it is a fraction of.

    ``free_bytes`` counts what the database can reuse (SQLite's free pages) as free: deleting
    rows does not shrink a SQLite file, but the pages it frees are written again first.
    ``visible`` is False where deletes cannot be seen at all until a VACUUM (PostgreSQL's
    ``pg_database_size``); the caller then credits what it pruned.
    """

    free_bytes: int
    capacity_bytes: int
    visible: bool = True


def _kind(kind: str) -> ColumnElement[bool]:
    if kind == OWN:
        return _REPORTS.c.via == "local"
    if kind == RECEIVED:
        return _REPORTS.c.via != "local"
    raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def _row_size() -> ColumnElement[int]:
    return func.length(_REPORTS.c.cose) + ROW_OVERHEAD_BYTES


def usage(store: Store) -> dict[str, Usage]:
    """Rows and bytes of own and received reports (one scan of the table)."""
    t = _REPORTS
    own = t.c.via == "local"
    total = func.coalesce(func.sum(_row_size()), 0)
    stmt = select(own.label("own"), func.count(), total).group_by(own)
    with store.transaction("measuring the store", write=False) as conn:
        found = {bool(o): Usage(int(n), int(b)) for o, n, b in conn.execute(stmt)}
    return {OWN: found.get(True, Usage(0, 0)), RECEIVED: found.get(False, Usage(0, 0))}


@dataclass(frozen=True, slots=True)
class ReceivedSeed:
    """What the admission policy starts from (:meth:`StoragePolicy.seed`)."""

    usage: Usage
    keys: list[KeyUsage]  # least recently received first
    senders: list[tuple[str, int]]  # least recently received first


def received_seed(store: Store, *, max_keys: int, max_senders: int) -> ReceivedSeed:
    """Received reports per observer key and per sender network: the ``max_keys`` and
    ``max_senders`` most recently heard from, oldest of those first."""
    t = _REPORTS
    received = _kind(RECEIVED)
    last = func.max(t.c.received_ms)
    keys = (
        select(t.c.observer_key, func.count(), func.sum(_row_size()), func.min(t.c.received_ms))
        .where(received)
        .group_by(t.c.observer_key)
        .order_by(last.desc())
        .limit(max_keys)
    )
    senders = (
        select(t.c.sender_net, func.count())
        .where(received, t.c.sender_net.is_not(None))
        .group_by(t.c.sender_net)
        .order_by(last.desc())
        .limit(max_senders)
    )
    with store.transaction("reading storage budgets", write=False) as conn:
        key_rows = [
            KeyUsage(bytes(k), int(n), int(b), int(first)) for k, n, b, first in conn.execute(keys)
        ]
        sender_rows = [(str(s), int(n)) for s, n in conn.execute(senders)]
    return ReceivedSeed(usage(store)[RECEIVED], key_rows[::-1], sender_rows[::-1])


def _prune(
    store: Store, kind: str, where: ColumnElement[bool] | None, limit: int
) -> list[PrunedRow]:
    """Delete up to ``limit`` of the oldest ``kind`` reports matching ``where``; what went."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    t, o = _REPORTS, _OUTBOX
    needed = exists().where(o.c.report_id == t.c.id, o.c.state == PENDING)
    stmt = select(t.c.id, t.c.observer_key, t.c.sender_net, _row_size()).where(_kind(kind), ~needed)
    if where is not None:
        stmt = stmt.where(where)
    stmt = stmt.order_by(t.c.received_ms, t.c.id).limit(limit)
    with store.transaction("pruning reports", write=True) as conn:
        found = list(conn.execute(stmt))
        if not found:
            return []
        gone = [r[0] for r in found]
        conn.execute(delete(t).where(t.c.id.in_(gone)))
        # A report's arrivals go with it (report_arrivals would otherwise grow for ever).
        conn.execute(delete(_ARRIVALS).where(_ARRIVALS.c.report_id.in_(gone)))
        per_key = Counter(bytes(r[1]) for r in found)
        for key in sorted(per_key):  # one order, so concurrent prunes cannot deadlock
            ob = _OBSERVERS
            conn.execute(
                update(ob)
                .where(ob.c.key == key)
                .values(
                    reports=func.max(ob.c.reports - per_key[key], 0)
                    if store.backend == "sqlite"
                    else func.greatest(ob.c.reports - per_key[key], 0)
                )
            )
    return [PrunedRow(bytes(k), None if s is None else str(s), int(b)) for _, k, s, b in found]


def prune_older_than(store: Store, kind: str, *, before_ms: int, limit: int) -> list[PrunedRow]:
    """One batch of ``kind`` reports received before ``before_ms``, oldest first."""
    return _prune(store, kind, _REPORTS.c.received_ms < before_ms, limit)


def prune_oldest(store: Store, kind: str, *, limit: int) -> list[PrunedRow]:
    """One batch of the oldest ``kind`` reports, whatever their age (size, headroom)."""
    return _prune(store, kind, None, limit)


# ---------------------------------------------------------------------------------------------
# Headroom

#: ``os.statvfs``'s shape, so tests can stand in a filesystem of any size.
StatVfs = Callable[[str], os.statvfs_result]


def _sqlite_pages(store: Store) -> tuple[int, int, str]:
    """(bytes in use, bytes of free pages, the database file's path or "" in memory)."""
    with store.transaction("measuring headroom", write=False) as conn:
        page_size = int(conn.execute(text("PRAGMA page_size")).scalar_one())
        pages = int(conn.execute(text("PRAGMA page_count")).scalar_one())
        free_pages = int(conn.execute(text("PRAGMA freelist_count")).scalar_one())
        files = {str(r[1]): str(r[2]) for r in conn.execute(text("PRAGMA database_list"))}
    return (pages - free_pages) * page_size, free_pages * page_size, files.get("main", "")


def database_bytes(store: Store) -> int:
    """What the database takes: SQLite's pages in use (free pages are reused before the file
    grows), PostgreSQL's ``pg_database_size()`` (which falls only after a VACUUM)."""
    if store.backend == "sqlite":
        return _sqlite_pages(store)[0]
    with store.transaction("measuring headroom", write=False) as conn:
        return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


def headroom(
    store: Store, *, max_database_bytes: int = 0, statvfs: StatVfs = os.statvfs
) -> Headroom | None:
    """Free space for the store, or None when there is nothing to measure.

    SQLite: the filesystem of the database file (``statvfs``) plus the file's free pages, and,
    when ``max_database_bytes`` is set, no more than that limit less the pages in use.
    PostgreSQL: ``max_database_bytes`` less ``pg_database_size()`` (the disk is the server's;
    without a limit there is nothing to measure).
    """
    if store.backend == "sqlite":
        used, reusable, path = _sqlite_pages(store)
        answers: list[Headroom] = []
        if path:  # "" is an in-memory database: no file, no disk
            directory = os.path.dirname(path) or "."
            try:
                st = statvfs(directory)
            except OSError as exc:  # a failing or stale mount: the caller counts and retries
                raise StoreError(
                    f"database {store.name}: measuring free space in {directory}: "
                    f"{exc.strerror or exc}"
                ) from exc
            answers.append(
                Headroom(st.f_bavail * st.f_frsize + reusable, st.f_blocks * st.f_frsize)
            )
        if max_database_bytes:
            answers.append(Headroom(max_database_bytes - used, max_database_bytes))
        return min(answers, key=lambda h: h.free_bytes) if answers else None
    if not max_database_bytes:
        return None
    size = database_bytes(store)
    return Headroom(max_database_bytes - size, max_database_bytes, visible=False)


__all__ = [
    "KINDS",
    "OWN",
    "RECEIVED",
    "Headroom",
    "ReceivedSeed",
    "Usage",
    "database_bytes",
    "headroom",
    "prune_older_than",
    "prune_oldest",
    "received_seed",
    "usage",
]
