"""Peer state in the store: one row per peer, what the pull and push services remember.

A row holds the peer's two cursors — ``pull_cursor``, the peer's own report number up to which
every report it served is stored here, and ``push_cursor``, our report number up to which
ours were queued for its inbox — when it last answered and how it last failed, how many
reports came from it (new and duplicate) and went to it, and its score and ban (kept for the
scoring work; nothing here decides them).

Cursors move forward only (:func:`advance_pull_cursor` and :func:`advance_push_cursor` never
lower one), so two writers racing, or a page stored twice after a crash, cannot move a cursor
back and make a peer's reports be asked again and again; :func:`reset_pull_cursor` is the one
way back, for a peer whose store was reset (it answers 409 to our cursor).

The ``*_in`` functions take an open connection, so a service can write the cursor in the
transaction that stores the page it covers (``Store.add_new_reports(..., alongside=...)``):
the cursor then never runs ahead of what is stored, and a crash between the two is no longer
possible. Sync, like :class:`~overflowd.store.Store`: services call in through
``trio.to_thread``. Database errors leave as :class:`~overflowd.errors.StoreError` (via
``Store.transaction``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Connection, Table, case, func, select

from overflowd import report as rpt
from overflowd.store.models import BIGINT_MAX, Base
from overflowd.store.outbox import KIND_PEER, PENDING, retarget_pending_in
from overflowd.store.repository import Store
from overflowd.wire.peering import INBOX_PATH

#: Text columns are cut to their size (an error is a peer's words, or an exception's).
MAX_ERROR_CHARS = 400
MAX_NAME_CHARS = 64
MAX_URL_CHARS = 2048

_PEERS: Table = Base.metadata.tables["peer_state"]
_OUTBOX: Table = Base.metadata.tables["webhook_outbox"]
_RECORDS: Table = Base.metadata.tables["peer_records"]


@dataclass(frozen=True, slots=True)
class PeerRow:
    """One peer's durable state, as stored."""

    key: bytes
    name: str
    url: str
    pull_cursor: int
    push_cursor: int
    last_contact_ms: int | None
    last_error: str | None
    last_error_ms: int | None
    reports_in: int
    reports_out: int
    duplicates: int
    score: float
    banned_until_ms: int | None
    ban_count: int
    ban_reason: str | None
    learned: bool
    created_ms: int
    updated_ms: int

    @property
    def fingerprint(self) -> str:
        return rpt.key_fingerprint(self.key)


def _row(m: object) -> PeerRow:
    r = m._mapping  # type: ignore[attr-defined]

    def opt(name: str) -> int | None:
        return None if r[name] is None else int(r[name])

    return PeerRow(
        key=bytes(r["key"]),
        name=str(r["name"]),
        url=str(r["url"]),
        pull_cursor=int(r["pull_cursor"]),
        push_cursor=int(r["push_cursor"]),
        last_contact_ms=opt("last_contact_ms"),
        last_error=None if r["last_error"] is None else str(r["last_error"]),
        last_error_ms=opt("last_error_ms"),
        reports_in=int(r["reports_in"]),
        reports_out=int(r["reports_out"]),
        duplicates=int(r["duplicates"]),
        score=float(r["score"]),
        banned_until_ms=opt("banned_until_ms"),
        ban_count=int(r["ban_count"]),
        ban_reason=None if r["ban_reason"] is None else str(r["ban_reason"]),
        learned=bool(r["learned"]),
        created_ms=int(r["created_ms"]),
        updated_ms=int(r["updated_ms"]),
    )


def _check_key(key: bytes) -> None:
    if len(key) != 32:
        raise ValueError("a peer key is the 32-byte Ed25519 public key")


def _check_cursor(cursor: int) -> None:
    if not 0 <= cursor <= BIGINT_MAX:
        raise ValueError(f"a cursor is 0 to {BIGINT_MAX}")


# -- rows -----------------------------------------------------------------------------------


def ensure_peer_in(
    conn: Connection, key: bytes, *, name: str, url: str, now_ms: int, learned: bool = False
) -> PeerRow:
    """The peer's row, created with both cursors at 0 if it has none; name and URL updated.

    A configured peer (``learned=False``) stays configured: a row first learned becomes
    configured when the operator lists it; a configured row never turns learned.
    """
    _check_key(key)
    t = _PEERS
    name, url = name[:MAX_NAME_CHARS], url[:MAX_URL_CHARS]
    found = conn.execute(select(t).where(t.c.key == key)).first()
    if found is None:
        conn.execute(
            t.insert().values(
                key=key,
                name=name,
                url=url,
                pull_cursor=0,
                push_cursor=0,
                last_contact_ms=None,
                last_error=None,
                last_error_ms=None,
                reports_in=0,
                reports_out=0,
                duplicates=0,
                score=0.0,
                banned_until_ms=None,
                ban_count=0,
                ban_reason=None,
                learned=learned,
                created_ms=now_ms,
                updated_ms=now_ms,
            )
        )
    else:
        current = _row(found)
        still_learned = current.learned and learned
        if current.url != url:
            # The operator moved the peer (same key): what its outbox held for the old inbox
            # goes to the new one, in this transaction (the push cursor is past it).
            inbox = INBOX_PATH.lstrip("/")  # as PeerSettings.endpoint makes it
            retarget_pending_in(
                conn, current.url + inbox, url + inbox, now_ms=now_ms, kind=KIND_PEER
            )
        if (current.name, current.url, current.learned) != (name, url, still_learned):
            conn.execute(
                t.update()
                .where(t.c.key == key)
                .values(name=name, url=url, learned=still_learned, updated_ms=now_ms)
            )
    row = conn.execute(select(t).where(t.c.key == key)).one()
    return _row(row)


def ensure_peer(
    store: Store, key: bytes, *, name: str, url: str, now_ms: int, learned: bool = False
) -> PeerRow:
    """:func:`ensure_peer_in` in its own transaction (the write lock taken at BEGIN, so two
    services creating one peer's row at once cannot both insert it)."""
    with store.transaction("storing a peer", write=True) as conn:
        return ensure_peer_in(conn, key, name=name, url=url, now_ms=now_ms, learned=learned)


def get_peer(store: Store, key: bytes) -> PeerRow | None:
    t = _PEERS
    with store.transaction("reading a peer", write=False) as conn:
        row = conn.execute(select(t).where(t.c.key == key)).first()
    return None if row is None else _row(row)


def list_peers(store: Store) -> list[PeerRow]:
    """Every peer with a row, configured first, then by name."""
    t = _PEERS
    stmt = select(t).order_by(t.c.learned, t.c.name, t.c.key)
    with store.transaction("reading peers", write=False) as conn:
        return [_row(r) for r in conn.execute(stmt)]


# -- cursors and counts ---------------------------------------------------------------------


def advance_pull_cursor_in(
    conn: Connection,
    key: bytes,
    cursor: int,
    *,
    now_ms: int,
    reports_in: int = 0,
    duplicates: int = 0,
) -> None:
    """Move the pull cursor up to ``cursor`` (never down), count the page, note the contact."""
    _check_cursor(cursor)
    t = _PEERS
    conn.execute(
        t.update()
        .where(t.c.key == key)
        .values(
            pull_cursor=case((t.c.pull_cursor < cursor, cursor), else_=t.c.pull_cursor),
            reports_in=t.c.reports_in + reports_in,
            duplicates=t.c.duplicates + duplicates,
            last_contact_ms=now_ms,
            updated_ms=now_ms,
        )
    )


def advance_pull_cursor(
    store: Store,
    key: bytes,
    cursor: int,
    *,
    now_ms: int,
    reports_in: int = 0,
    duplicates: int = 0,
) -> None:
    with store.transaction("advancing a pull cursor", write=True) as conn:
        advance_pull_cursor_in(
            conn, key, cursor, now_ms=now_ms, reports_in=reports_in, duplicates=duplicates
        )


def reset_pull_cursor(
    store: Store, key: bytes, *, reason: str, now_ms: int, cursor: int = 0
) -> None:
    """Set the pull cursor to ``cursor`` (0: from the start), saying why in ``last_error``."""
    _check_cursor(cursor)
    t = _PEERS
    with store.transaction("resetting a pull cursor", write=True) as conn:
        conn.execute(
            t.update()
            .where(t.c.key == key)
            .values(
                pull_cursor=cursor,
                last_error=reason[:MAX_ERROR_CHARS],
                last_error_ms=now_ms,
                updated_ms=now_ms,
            )
        )


def advance_push_cursor_in(
    conn: Connection, key: bytes, cursor: int, *, now_ms: int, reports_out: int = 0
) -> None:
    """Move the push cursor up to ``cursor`` (never down) and count ``reports_out``."""
    _check_cursor(cursor)
    t = _PEERS
    conn.execute(
        t.update()
        .where(t.c.key == key)
        .values(
            push_cursor=case((t.c.push_cursor < cursor, cursor), else_=t.c.push_cursor),
            reports_out=t.c.reports_out + reports_out,
            updated_ms=now_ms,
        )
    )


def advance_push_cursor(
    store: Store, key: bytes, cursor: int, *, now_ms: int, reports_out: int = 0
) -> None:
    with store.transaction("advancing a push cursor", write=True) as conn:
        advance_push_cursor_in(conn, key, cursor, now_ms=now_ms, reports_out=reports_out)


def add_counts_in(
    conn: Connection,
    key: bytes,
    *,
    now_ms: int,
    reports_in: int = 0,
    reports_out: int = 0,
    duplicates: int = 0,
) -> None:
    """Add to the peer's counters (its inbox pushes, our deliveries to it)."""
    t = _PEERS
    conn.execute(
        t.update()
        .where(t.c.key == key)
        .values(
            reports_in=t.c.reports_in + reports_in,
            reports_out=t.c.reports_out + reports_out,
            duplicates=t.c.duplicates + duplicates,
            updated_ms=now_ms,
        )
    )


def add_counts(
    store: Store,
    key: bytes,
    *,
    now_ms: int,
    reports_in: int = 0,
    reports_out: int = 0,
    duplicates: int = 0,
) -> None:
    with store.transaction("counting a peer's reports", write=True) as conn:
        add_counts_in(
            conn,
            key,
            now_ms=now_ms,
            reports_in=reports_in,
            reports_out=reports_out,
            duplicates=duplicates,
        )


def record_contact(store: Store, key: bytes, *, now_ms: int) -> None:
    """The peer answered (a page, an accepted delivery, an inbox request it signed)."""
    with store.transaction("noting a peer's contact", write=True) as conn:
        record_contact_in(conn, key, now_ms=now_ms)


def record_contact_in(conn: Connection, key: bytes, *, now_ms: int) -> None:
    """:func:`record_contact` inside the caller's transaction."""
    t = _PEERS
    conn.execute(t.update().where(t.c.key == key).values(last_contact_ms=now_ms, updated_ms=now_ms))


def record_error(store: Store, key: bytes, error: str, *, now_ms: int) -> None:
    """How the last exchange with the peer failed (one line, cut to the column)."""
    t = _PEERS
    with store.transaction("noting a peer's error", write=True) as conn:
        conn.execute(
            t.update()
            .where(t.c.key == key)
            .values(
                last_error=" ".join(error.split())[:MAX_ERROR_CHARS],
                last_error_ms=now_ms,
                updated_ms=now_ms,
            )
        )


def outbox_depth(store: Store, urls: Iterable[str]) -> dict[str, int]:
    """Pending webhook-outbox rows for each of ``urls`` (a peer's inbox URL), 0 for none."""
    wanted = sorted(set(urls))
    out = dict.fromkeys(wanted, 0)
    if not wanted:
        return out
    t = _OUTBOX
    stmt = (
        select(t.c.url, func.count())
        .where(t.c.state == PENDING, t.c.url.in_(wanted))
        .group_by(t.c.url)
    )
    with store.transaction("counting peer outboxes", write=False) as conn:
        for url, n in conn.execute(stmt):
            out[str(url)] = int(n)
    return out


# -- node records (GET /v1/peers) -----------------------------------------------------------


def put_record(store: Store, key: bytes, record: bytes, *, record_ms: int, now_ms: int) -> None:
    """Keep ``record`` (verified by the caller: signed by ``key``) as the peer's latest one.

    An older record never replaces a newer one (a peer that serves a replay keeps its word).
    """
    _check_key(key)
    if len(record) > 4096:
        raise ValueError("a node record is at most 4096 bytes")
    t = _RECORDS
    with store.transaction("storing a peer's node record", write=True) as conn:
        found = conn.execute(select(t.c.record_ms).where(t.c.key == key)).first()
        if found is None:
            conn.execute(
                t.insert().values(key=key, record=record, record_ms=record_ms, fetched_ms=now_ms)
            )
        elif int(found[0]) <= record_ms:
            conn.execute(
                t.update()
                .where(t.c.key == key)
                .values(record=record, record_ms=record_ms, fetched_ms=now_ms)
            )


def list_records(store: Store, *, limit: int) -> list[bytes]:
    """The stored node records, newest first, at most ``limit``."""
    t = _RECORDS
    stmt = select(t.c.record).order_by(t.c.record_ms.desc(), t.c.key).limit(limit)
    with store.transaction("reading peers' node records", write=False) as conn:
        return [bytes(r[0]) for r in conn.execute(stmt)]


def count_learned(store: Store) -> int:
    t = _PEERS
    with store.transaction("counting learned peers", write=False) as conn:
        return int(conn.execute(select(func.count()).where(t.c.learned.is_(True))).scalar_one())
