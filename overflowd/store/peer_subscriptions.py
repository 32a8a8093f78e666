"""Subscriptions in the store: table ``peer_subscriptions`` (subscriber key, prefix, endpoint).

Bounded: :data:`MAX_PREFIXES_PER_SUBSCRIBER` per subscriber (subscribers are configured peers,
at most 256 of them, so the table is bounded too). Sync, like the Store.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import Table, func, select

from overflowd.store.models import Base
from overflowd.store.repository import Store

#: Prefixes one subscriber may hold: a network operator's own address space is a few dozen
#: prefixes; more is a mistake or an attempt to make every push a table scan.
MAX_PREFIXES_PER_SUBSCRIBER = 256

_SUBS: Table = Base.metadata.tables["peer_subscriptions"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Subscription:
    subscriber: bytes
    prefix: Network
    endpoint: str
    created_ms: int
    updated_ms: int


def add_subscriptions(
    store: Store, subscriber: bytes, prefixes: Iterable[Network], endpoint: str, *, now_ms: int
) -> list[tuple[Network, str]]:
    """Store the prefixes (an existing one gets the new endpoint); the ones refused because
    the subscriber would hold more than MAX_PREFIXES_PER_SUBSCRIBER, with that reason."""
    t = _SUBS
    refused: list[tuple[Network, str]] = []
    with store.transaction("storing subscriptions", write=True) as conn:
        held = {
            str(p) for (p,) in conn.execute(select(t.c.prefix).where(t.c.subscriber == subscriber))
        }
        for net in prefixes:
            text = str(net)
            if text in held:
                conn.execute(
                    t.update()
                    .where(t.c.subscriber == subscriber, t.c.prefix == text)
                    .values(endpoint=endpoint, updated_ms=now_ms)
                )
                continue
            if len(held) >= MAX_PREFIXES_PER_SUBSCRIBER:
                refused.append((net, f"more than {MAX_PREFIXES_PER_SUBSCRIBER} prefixes"))
                continue
            conn.execute(
                t.insert().values(
                    subscriber=subscriber,
                    prefix=text,
                    endpoint=endpoint,
                    created_ms=now_ms,
                    updated_ms=now_ms,
                )
            )
            held.add(text)
    return refused


def list_subscriptions(store: Store, subscriber: bytes | None = None) -> list[Subscription]:
    t = _SUBS
    stmt = select(t).order_by(t.c.subscriber, t.c.prefix)
    if subscriber is not None:
        stmt = stmt.where(t.c.subscriber == subscriber)
    with store.transaction("reading subscriptions", write=False) as conn:
        return [
            Subscription(
                bytes(r.subscriber),
                ipaddress.ip_network(str(r.prefix)),
                str(r.endpoint),
                int(r.created_ms),
                int(r.updated_ms),
            )
            for r in conn.execute(stmt)
        ]


def count_subscriptions(store: Store) -> int:
    with store.transaction("counting subscriptions", write=False) as conn:
        return int(conn.execute(select(func.count()).select_from(_SUBS)).scalar_one())
