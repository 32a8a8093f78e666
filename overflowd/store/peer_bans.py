"""Peer scores and bans in the store: the ``peer_state`` columns ``score``,
``banned_until_ms``, ``ban_count`` and ``ban_reason`` (the table is peer-state's,
overflowd/store/peers.py; the decisions are :mod:`overflowd.peerscore`'s).

Only these four columns are written here, so the pull and push services' writes to the same
rows (cursors, counts) never race with a score write over a column. A ban outlives a restart:
the daemon loads every row's ban at start (:func:`load_scores`) and writes changes back within
a second (:func:`save_scores`, called by :class:`overflowd.services.peer_policy.PeerPolicy`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Table, select

from overflowd.peerscore import PeerScore
from overflowd.store.models import Base
from overflowd.store.peers import MAX_ERROR_CHARS, ensure_peer_in
from overflowd.store.repository import Store

_PEERS: Table = Base.metadata.tables["peer_state"]


@dataclass(frozen=True, slots=True)
class ScoreRow:
    """What :func:`save_scores` writes for one peer (its row is created if it has none)."""

    key: bytes
    name: str
    url: str
    score: PeerScore


def load_scores(store: Store, *, now_ms: int) -> dict[bytes, PeerScore]:
    """Every stored peer's score and ban, as of ``now_ms`` (scores decay from there)."""
    t = _PEERS
    stmt = select(t.c.key, t.c.score, t.c.banned_until_ms, t.c.ban_count, t.c.ban_reason)
    out: dict[bytes, PeerScore] = {}
    with store.transaction("reading peer scores", write=False) as conn:
        for key, score, until, count, reason in conn.execute(stmt):
            out[bytes(key)] = PeerScore(
                score=min(0.0, float(score)),
                updated_ms=now_ms,
                banned_until_ms=None if until is None else int(until),
                ban_count=max(0, int(count)),
                ban_reason=None if reason is None else str(reason),
                credit_ms=now_ms,
            )
    return out


def save_scores(store: Store, rows: Iterable[ScoreRow], *, now_ms: int) -> int:
    """Write the rows' scores and bans in one transaction; the number written."""
    t = _PEERS
    n = 0
    with store.transaction("storing peer scores", write=True) as conn:
        for row in rows:
            ensure_peer_in(conn, row.key, name=row.name, url=row.url, now_ms=now_ms)
            s = row.score
            conn.execute(
                t.update()
                .where(t.c.key == row.key)
                .values(
                    score=s.score,
                    banned_until_ms=s.banned_until_ms,
                    ban_count=s.ban_count,
                    ban_reason=None if s.ban_reason is None else s.ban_reason[:MAX_ERROR_CHARS],
                    updated_ms=now_ms,
                )
            )
            n += 1
    return n
