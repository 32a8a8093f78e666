"""Retention on SQLite and PostgreSQL: by age (injected clock), by size, and for headroom.

Real databases through the ``store`` fixture (tests/conftest.py). Free space is either a
stand-in filesystem whose size we choose (the probe is injectable: no test can fill a real
disk), or a real small limit: ``max_database_bytes`` against the SQLite file's pages in use or
PostgreSQL's ``pg_database_size()``.
"""

from __future__ import annotations

import dataclasses
import ipaddress

import trio

from overflowd import report as rpt
from overflowd.config import StorageSettings
from overflowd.identity import NodeIdentity
from overflowd.services.retention import RetentionService
from overflowd.storage_policy import StoragePolicy
from overflowd.store import Store, outbox
from overflowd.store import retention as ret
from tests.support.reports import make_payload

T0_MS = 1_800_000_000_000
DAY_MS = 86_400_000
OBSERVER = NodeIdentity(seed=b"\x31" * 32)
OWN_NODE = NodeIdentity(seed=b"\x32" * 32)
TIMEOUT_S = 60


def report(by: NodeIdentity = OBSERVER, n: int = 0) -> rpt.SignedReport:
    payload = make_payload("192.0.2.1", "198.51.100.2", time_ms=T0_MS)
    flow = dataclasses.replace(payload.flow, sport=1 + n % 60000, packets=1 + n)
    return by.sign_report(dataclasses.replace(payload, flow=flow))


def put(store: Store, via: str, ages_days: list[float], by: NodeIdentity = OBSERVER) -> list[str]:
    """Store one report per age (days before T0); their ids, oldest first."""
    rows = [(report(by, i), T0_MS - int(age * DAY_MS), via) for i, age in enumerate(ages_days)]
    senders = {r.report_id: "192.0.2.0/24" for r, _, _ in rows} if via != "local" else None
    assert store.add_reports(rows, senders=senders) == len(rows)
    return [r.report_id for r, _, _ in sorted(rows, key=lambda x: x[1])]


def ids(store: Store, kind: str) -> set[str]:
    return {r.report_id for r in store.query_reports() if (r.via == "local") == (kind == ret.OWN)}


def service(store: Store, **kw: object) -> RetentionService:
    probe = kw.pop("probe", None)
    settings = dataclasses.replace(StorageSettings(), **kw)  # type: ignore[arg-type]
    return RetentionService(
        store,
        settings,
        wall_clock=lambda: T0_MS / 1000,
        probe=probe,  # type: ignore[arg-type]
    )


async def test_prune_by_age_with_an_injected_clock(store: Store) -> None:
    received = put(store, "udp", [40, 31, 29, 1])
    own = put(store, "local", [400, 366, 364, 0], by=OWN_NODE)
    svc = service(store, received_max_age_days=30.0, own_max_age_days=365.0, prune_batch_rows=1)
    pruned = await svc.prune()
    assert pruned == {"received_age": 2, "own_age": 2}
    assert ids(store, ret.RECEIVED) == set(received[2:])
    assert ids(store, ret.OWN) == set(own[2:])
    # The observer's count follows what is stored.
    counts = {o.key: o.reports for o in store.observers()}
    assert counts[OBSERVER.public_key] == 2 and counts[OWN_NODE.public_key] == 2
    stats = svc.statistics()
    assert stats.pruned["received_age"] == 2 and stats.reports == {"own": 2, "received": 2}
    assert await svc.prune() == {}  # nothing more: the clock did not move


async def test_prune_by_size_oldest_first_each_kind_on_its_own(store: Store) -> None:
    received = put(store, "udp", [9, 8, 7, 6, 5, 4, 3, 2, 1, 0])
    own = put(store, "local", [5, 4, 3, 2, 1, 0], by=OWN_NODE)
    row = ret.usage(store)[ret.OWN].bytes // 6
    svc = service(store, received_max_reports=4, own_max_bytes=3 * row + row // 2)
    pruned = await svc.prune()
    assert pruned == {"received_size": 6, "own_size": 3}
    assert ids(store, ret.RECEIVED) == set(received[-4:])
    assert ids(store, ret.OWN) == set(own[-3:])
    u = ret.usage(store)
    assert u[ret.OWN].bytes <= 3 * row + row // 2 and u[ret.RECEIVED].reports == 4
    assert svc.policy.statistics().received_reports == 4  # resynced from the store


async def test_a_report_a_pending_delivery_needs_is_never_pruned(store: Store) -> None:
    """Our own report, a year and a day old, waits for its webhook: kept until delivered."""
    old = report(OWN_NODE, 1)
    assert outbox.enqueue(store, old, ["https://example.net/hook"], now_ms=T0_MS) == 1
    store.add_reports([(old, T0_MS - 366 * DAY_MS, "local")])
    put(store, "local", [400, 399], by=OWN_NODE)
    svc = service(store, own_max_age_days=365.0)
    assert await svc.prune() == {"own_age": 2}
    assert ids(store, ret.OWN) == {old.report_id}
    # ...nor to make room
    svc = service(store, own_max_bytes=1, own_max_age_days=1000.0)
    assert await svc.prune() == {}
    (entry,) = outbox.entries(store)
    outbox.mark_delivered(store, entry.id, now_ms=T0_MS, status=200)
    assert await svc.prune() == {"own_size": 1}
    assert ids(store, ret.OWN) == set()
    assert len(outbox.entries(store)) == 1  # the outbox row itself is the outbox's to prune


class Disk:
    """A stand-in filesystem of ``capacity`` bytes holding the store and ``other`` bytes."""

    def __init__(self, store: Store, capacity: int, other: int = 0) -> None:
        self.store, self.capacity, self.other = store, capacity, other

    def probe(self) -> ret.Headroom:
        used = sum(u.bytes for u in ret.usage(self.store).values())
        return ret.Headroom(self.capacity - self.other - used, self.capacity)


async def test_headroom_short_sheds_received_first_own_and_outbox_still_written(
    store: Store,
) -> None:
    received = put(store, "udp", [float(30 - i) / 10 for i in range(30)])
    row = ret.usage(store)[ret.RECEIVED].bytes // 30
    disk = Disk(store, capacity=100 * row)
    policy = StoragePolicy(StorageSettings())
    svc = RetentionService(
        store,
        StorageSettings(min_free_bytes=20 * row, min_free_fraction=0.0),
        policy=policy,
        wall_clock=lambda: T0_MS / 1000,
        probe=disk.probe,
    )
    assert not await svc.check_headroom()  # 70 rows' worth free
    # Something else fills the disk: 55 rows' worth. 15 free < 20: short.
    disk.other = 55 * row
    assert await svc.check_headroom() is False  # short, pruned back above 22 (with the margin)
    left = ids(store, ret.RECEIVED)
    assert left == set(received[-len(left) :])  # the oldest went first
    # just enough: 15 free + 7 or 8 rows pruned reaches 22 (row sizes vary by a few bytes)
    assert 30 - 8 <= len(left) <= 30 - 7 and svc.statistics().pruned["headroom"] == 30 - len(left)
    # The disk fills further: nothing received is admitted, own reports and outbox rows are.
    disk.other = 90 * row
    assert await svc.check_headroom() is True  # every received report is gone, still short
    assert ids(store, ret.RECEIVED) == set()
    assert svc.statistics().headroom_exhausted == 1
    assert policy.admit(OBSERVER.public_key, "192.0.2.1", 600, T0_MS / 1000) == "headroom"
    for i in range(20):
        own = report(OWN_NODE, 100 + i)
        assert outbox.enqueue(store, own, ["https://example.net/hook"], now_ms=T0_MS) == 1
        assert store.add_reports([(own, T0_MS, "local")]) == 1
    assert len(ids(store, ret.OWN)) == 20 and len(outbox.entries(store)) == 20
    stats = svc.statistics()
    assert stats.headroom_short and stats.refused["headroom"] == 1
    assert stats.free_bytes is not None and stats.reserve_bytes == 20 * row
    # Room again: received reports are admitted again.
    disk.other = 0
    assert not await svc.check_headroom()
    assert policy.admit(OBSERVER.public_key, "192.0.2.1", 600, T0_MS / 1000) is None


async def test_a_real_small_database_limit(store: Store) -> None:
    """``max_database_bytes`` a little under what the store takes plus the reserve: the real
    measurement (SQLite pages in use, PostgreSQL's pg_database_size) says short, received
    reports are pruned oldest first until the margin is back, own reports are untouched."""
    received = put(store, "udp", [float(200 - i) / 100 for i in range(200)])
    own = put(store, "local", [1.0, 0.5], by=OWN_NODE)
    used = ret.database_bytes(store)
    reserve = 16 * 8192
    settings = StorageSettings(
        # four pages short: a few bytes of background change (autovacuum) cannot hide it
        min_free_bytes=reserve,
        min_free_fraction=0.0,
        max_database_bytes=used + reserve - 4 * 8192,
    )
    svc = RetentionService(store, settings, wall_clock=lambda: T0_MS / 1000)
    with trio.fail_after(TIMEOUT_S):
        assert await svc.check_headroom() is False
    left = ids(store, ret.RECEIVED)
    assert 0 < len(left) < 200 and left == set(received[-len(left) :])
    assert ids(store, ret.OWN) == set(own)
    stats = svc.statistics()
    assert stats.pruned["headroom"] == 200 - len(left) and not stats.headroom_short
    assert stats.free_bytes is not None and stats.free_bytes >= reserve * 1.1
    if store.backend == "sqlite":
        h = ret.headroom(store, max_database_bytes=settings.max_database_bytes)
        assert h is not None and h.free_bytes >= reserve * 1.1  # the pages are free for reuse


async def test_headroom_of_an_in_memory_store_is_not_measured() -> None:
    with Store.open("sqlite://") as store:
        assert ret.headroom(store) is None
        svc = RetentionService(store, StorageSettings())
        assert not await svc.check_headroom()


def test_usage_and_seed_by_key_and_sender(store: Store) -> None:
    put(store, "udp", [3, 2, 1])
    put(store, "gossip", [1], by=OWN_NODE)
    put(store, "local", [1, 1], by=NodeIdentity(seed=b"\x33" * 32))
    u = ret.usage(store)
    assert (u[ret.RECEIVED].reports, u[ret.OWN].reports) == (4, 2)
    seed = ret.received_seed(store, max_keys=10, max_senders=10)
    assert seed.usage == u[ret.RECEIVED]
    by_key = {k.key: k for k in seed.keys}
    assert by_key[OBSERVER.public_key].reports == 3
    assert by_key[OBSERVER.public_key].first_ms == T0_MS - 3 * DAY_MS
    assert seed.senders == [("192.0.2.0/24", 4)]
    assert ipaddress.ip_network(seed.senders[0][0])
