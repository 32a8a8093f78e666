"""Observer events in the store: new keys for known observers, and changed contacts.

:class:`~overflowd.trust.TrustBook` raises the events (sans-IO); the daemon logs and counts
them and keeps them here so that ``overflowd-query events`` shows them after the log has
rotated. Rows are only ever added, never changed; the daemon bounds how many it adds (see
``overflowd.services.node``), so a flood of fresh keys cannot fill the disk.

Sync, like :class:`~overflowd.store.Store`: services call in through ``trio.to_thread``. All
database errors leave as :class:`~overflowd.errors.StoreError` (via ``Store.transaction``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Table, insert, select

from overflowd.store.models import Base
from overflowd.store.repository import Store

NEW_KEY, CONTACTS_CHANGED = "new_key", "contacts_changed"
#: a peer learned from another peer's signed node record (services/peer_pull.py)
NEW_PEER = "new_peer"
KINDS = (NEW_KEY, CONTACTS_CHANGED, NEW_PEER)
MAX_DETAIL_CHARS = 400
MAX_SENDER_CHARS = 64

_EVENTS: Table = Base.metadata.tables["observer_events"]


@dataclass(frozen=True, slots=True)
class ObserverEvent:
    """One event as stored; ``id`` is 0 until it is."""

    kind: str
    key: bytes
    old_contacts: tuple[str, ...]
    new_contacts: tuple[str, ...]
    pinned: bool
    at_ms: int
    sender: str | None = None
    detail: str | None = None
    id: int = 0


def add_events(store: Store, events: Sequence[ObserverEvent]) -> None:
    """Store ``events`` in one transaction."""
    for e in events:
        if e.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {e.kind!r}")
    if not events:
        return
    rows = [
        {
            "kind": e.kind,
            "key": e.key,
            "old_contacts": json.dumps(list(e.old_contacts)),
            "new_contacts": json.dumps(list(e.new_contacts)),
            "pinned": e.pinned,
            "at_ms": e.at_ms,
            "sender": None if e.sender is None else e.sender[:MAX_SENDER_CHARS],
            "detail": None if e.detail is None else e.detail[:MAX_DETAIL_CHARS],
        }
        for e in events
    ]
    with store.transaction("storing observer events", write=True) as conn:
        conn.execute(insert(_EVENTS), rows)


def list_events(
    store: Store, *, since_ms: int | None = None, limit: int | None = None
) -> list[ObserverEvent]:
    """Events newest first; ``since_ms`` keeps those at or after that time."""
    t = _EVENTS
    stmt = select(t)
    if since_ms is not None:
        stmt = stmt.where(t.c.at_ms >= since_ms)
    stmt = stmt.order_by(t.c.at_ms.desc(), t.c.id.desc())
    if limit is not None:
        if limit < 0:
            raise ValueError("limit must not be negative")
        stmt = stmt.limit(limit)
    with store.transaction("reading observer events", write=False) as conn:
        return [
            ObserverEvent(
                kind=str(m["kind"]),
                key=bytes(m["key"]),
                old_contacts=tuple(json.loads(m["old_contacts"])),
                new_contacts=tuple(json.loads(m["new_contacts"])),
                pinned=bool(m["pinned"]),
                at_ms=int(m["at_ms"]),
                sender=None if m["sender"] is None else str(m["sender"]),
                detail=None if m["detail"] is None else str(m["detail"]),
                id=int(m["id"]),
            )
            for m in (row._mapping for row in conn.execute(stmt))
        ]
