"""Trust continuity in the store: the networks each observer key was seen from, and since when
its contacts are unchanged, so that ``continuity`` survives a restart of the daemon.

:class:`~overflowd.trust.TrustBook` (sans-IO) keeps them in memory; the daemon saves what it
learned in batches (:func:`save_continuity`, every few seconds and at stop) and loads them back
at start (:func:`load_continuity`). Tables: ``observer_networks`` (key, network, first and last
sighting, reports; at most :data:`MAX_NETWORKS_PER_KEY` rows per key, the least recently seen
deleted first, so a flood of spoofed sources cannot grow it without limit) and the
``observers.contacts_since_ms`` column.

``contacts_since_ms`` is written only onto an ``observers`` row holding the same contacts the
book dated; a newer report with other contacts sets it back to NULL (``Store.add_reports``),
and a NULL loads as "since the last sighting": a crash between the two writes can delay
``continuity``, never grant it sooner.

Sync, like :class:`~overflowd.store.Store`: services call in through ``trio.to_thread``. All
database errors leave as :class:`~overflowd.errors.StoreError` (via ``Store.transaction``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Table, bindparam, delete, func, select, update

from overflowd.store.models import Base
from overflowd.store.repository import Store, dialect_insert
from overflowd.trust import (
    ContinuityJournal,
    ContinuityPolicy,
    KeyHistory,
    NetworkSighting,
    TrustBook,
    continuity_holds,
)

#: Network rows kept per key (the trust book itself remembers at most 32).
MAX_NETWORKS_PER_KEY = 64
#: The ``network`` column's width: "ffff:ffff:ffff::/48" and the like fit easily.
MAX_NETWORK_CHARS = 43

_NETWORKS: Table = Base.metadata.tables["observer_networks"]
_OBSERVERS: Table = Base.metadata.tables["observers"]


@dataclass(frozen=True, slots=True)
class ContactsSince:
    """A key's contacts and since when the trust book has seen them unchanged."""

    key: bytes
    contacts: tuple[str, ...]
    since_ms: int


@dataclass(frozen=True, slots=True)
class StoredContinuity:
    """What the store holds for one key: its networks (most recently seen first)."""

    key: bytes
    networks: tuple[NetworkSighting, ...]


def _contacts_json(contacts: Sequence[str]) -> str:
    # The same serialization as Store.add_reports writes into observers.contacts.
    return json.dumps(list(contacts))


def save_continuity(
    store: Store,
    sightings: Sequence[NetworkSighting],
    contacts_since: Sequence[ContactsSince] = (),
    *,
    max_networks_per_key: int = MAX_NETWORKS_PER_KEY,
) -> list[bytes]:
    """Merge ``sightings`` into ``observer_networks`` and date ``contacts_since``, in one
    transaction; prune each key touched to its ``max_networks_per_key`` most recently seen
    networks.

    Returns the keys whose ``contacts_since_ms`` was not written: no ``observers`` row yet (its
    report is still on the way to the store) or one with other contacts.
    """
    if max_networks_per_key < 1:
        raise ValueError("max_networks_per_key must be at least 1")
    merged: dict[tuple[bytes, str], NetworkSighting] = {}
    for s in sightings:
        if len(s.network) > MAX_NETWORK_CHARS:
            raise ValueError(f"network {s.network[:60]!r} is longer than {MAX_NETWORK_CHARS}")
        old = merged.get((s.key, s.network))
        merged[(s.key, s.network)] = (
            s
            if old is None
            else NetworkSighting(
                s.key,
                s.network,
                min(old.first_seen_ms, s.first_seen_ms),
                max(old.last_seen_ms, s.last_seen_ms),
                old.reports + s.reports,
            )
        )
    dated = {c.key: c for c in contacts_since}
    if not merged and not dated:
        return []
    # Sorted, so that concurrent writers on PostgreSQL lock rows in the same order.
    rows = [
        {
            "key": s.key,
            "network": s.network,
            "first_seen_ms": s.first_seen_ms,
            "last_seen_ms": s.last_seen_ms,
            "reports": s.reports,
        }
        for _, s in sorted(merged.items())
    ]
    insert = dialect_insert(store.backend == "sqlite")
    t = _NETWORKS
    stmt = insert(t)
    new = stmt.excluded
    upsert = stmt.on_conflict_do_update(
        index_elements=[t.c.key, t.c.network],
        set_={
            "first_seen_ms": func.min(new.first_seen_ms, t.c.first_seen_ms)
            if store.backend == "sqlite"
            else func.least(new.first_seen_ms, t.c.first_seen_ms),
            "last_seen_ms": func.max(new.last_seen_ms, t.c.last_seen_ms)
            if store.backend == "sqlite"
            else func.greatest(new.last_seen_ms, t.c.last_seen_ms),
            "reports": t.c.reports + new.reports,
        },
    )
    unwritten: list[bytes] = []
    with store.transaction("storing trust continuity", write=True) as conn:
        if rows:
            conn.execute(upsert, rows)
            touched = sorted({s.key for s in merged.values()})
            over = conn.execute(
                select(t.c.key)
                .where(t.c.key.in_(touched))
                .group_by(t.c.key)
                .having(func.count() > max_networks_per_key)
            ).scalars()
            for key in list(over):
                stale = (
                    conn.execute(
                        select(t.c.network)
                        .where(t.c.key == key)
                        .order_by(t.c.last_seen_ms.desc(), t.c.first_seen_ms.desc(), t.c.network)
                        .offset(max_networks_per_key)
                    )
                    .scalars()
                    .all()
                )
                if stale:
                    conn.execute(delete(t).where(t.c.key == key, t.c.network.in_(stale)))
        if dated:
            o = _OBSERVERS
            current = {
                bytes(k): str(c)
                for k, c in conn.execute(
                    select(o.c.key, o.c.contacts).where(o.c.key.in_(sorted(dated)))
                )
            }
            params = []
            for key in sorted(dated):
                c = dated[key]
                if current.get(key) == _contacts_json(c.contacts):
                    params.append({"k": key, "since": c.since_ms})
                else:
                    unwritten.append(key)
            if params:
                conn.execute(
                    update(o)
                    .where(o.c.key == bindparam("k"))
                    .values(contacts_since_ms=bindparam("since")),
                    params,
                )
    return unwritten


def load_continuity(
    store: Store, *, max_networks_per_key: int = MAX_NETWORKS_PER_KEY
) -> dict[bytes, StoredContinuity]:
    """Every key's stored networks, at most ``max_networks_per_key`` most recently seen each."""
    t = _NETWORKS
    stmt = select(t).order_by(t.c.key, t.c.last_seen_ms.desc(), t.c.first_seen_ms.desc())
    found: dict[bytes, list[NetworkSighting]] = {}
    with store.transaction("reading trust continuity", write=False) as conn:
        for row in conn.execute(stmt):
            m = row._mapping
            key = bytes(m["key"])
            networks = found.setdefault(key, [])
            if len(networks) < max_networks_per_key:
                networks.append(
                    NetworkSighting(
                        key,
                        str(m["network"]),
                        int(m["first_seen_ms"]),
                        int(m["last_seen_ms"]),
                        int(m["reports"]),
                    )
                )
    return {k: StoredContinuity(k, tuple(v)) for k, v in found.items()}


def batch_from(
    book: TrustBook, journal: ContinuityJournal
) -> tuple[list[NetworkSighting], list[ContactsSince]]:
    """Take what ``journal`` gathered, with each key's contacts as ``book`` has them now, for
    :func:`save_continuity` (no I/O: call it in the task that feeds the book)."""
    sightings, keys = journal.take()
    dated = []
    for key in keys:
        history = book.history(key)
        if history is not None:
            dated.append(ContactsSince(key, history.contacts, history.contacts_since_ms))
    return sightings, dated


def read_histories(
    store: Store,
    *,
    max_keys: int,
    max_networks_per_key: int,
    policy: ContinuityPolicy | None = None,
) -> list[KeyHistory]:
    """Key histories for :meth:`TrustBook.load` from ``observers`` and ``observer_networks``,
    least recently seen first (the book's LRU order), each with its ``max_networks_per_key``
    most recently seen networks.

    Which keys: the ``max_keys`` most recently seen that hold continuity under ``policy`` (the
    book's established table), then the ``policy.max_new_keys`` most recently seen of the rest.
    Established keys first: a burst of throwaway keys just before a restart is the most
    recently seen, and must not take the place of the observers that earned continuity.
    Without ``policy``, the ``max_keys`` most recently seen keys, whatever they hold.

    A key without ``contacts_since_ms`` gets its last sighting (continuity starts over for it).
    """
    rows = store.observers()  # most recently seen first
    stored = load_continuity(store, max_networks_per_key=max_networks_per_key)
    established: list[KeyHistory] = []
    new: list[KeyHistory] = []
    max_new = policy.max_new_keys if policy is not None else 0
    for row in rows:
        if len(established) >= max_keys and len(new) >= max_new:
            break
        since = row.contacts_since_ms
        if since is None or since > row.last_seen_ms:
            since = row.last_seen_ms
        found = stored.get(row.key)
        history = KeyHistory(
            key=row.key,
            contacts=row.contacts,
            first_seen_ms=row.first_seen_ms,
            last_seen_ms=row.last_seen_ms,
            contacts_since_ms=max(since, row.first_seen_ms),
            reports=row.reports,
            networks=frozenset(n.network for n in found.networks) if found else frozenset(),
        )
        if policy is None or continuity_holds(history, policy, row.last_seen_ms):
            if len(established) < max_keys:
                established.append(history)
        elif len(new) < max_new:
            new.append(history)
    # Both lists are most recently seen first; merged, least recently seen first.
    histories = established + new
    histories.sort(key=lambda h: (h.last_seen_ms, h.key))
    return histories
