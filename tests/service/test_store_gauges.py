"""The store gauges (outbox rows by state, store size) read from a real store, SQLite and
PostgreSQL, by the periodic service the daemon runs; a read the database holds up is abandoned
at its timeout, counted, and never piled up behind (a table lock on the real PostgreSQL)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import sqlalchemy
import trio

from overflowd.identity import NodeIdentity
from overflowd.services.gauges import StoreGauges, store_bytes
from overflowd.store import Store, outbox
from tests.support.reports import make_payload

TIMEOUT_S = 30
URL = "https://receiver.example/hook"


def enqueue(store: Store, n: int) -> None:
    identity = NodeIdentity(seed=b"\x63" * 32)
    for _ in range(n):
        outbox.enqueue(store, identity.sign_report(make_payload()), [URL], now_ms=1_000)


async def test_gauges_count_rows_by_state_and_measure_the_store(store: Store) -> None:
    enqueue(store, 4)
    now = int(time.time() * 1000)
    a, b = outbox.claim_due(store, now_ms=now, lease_ms=60_000, limit=2)
    assert outbox.mark_delivered(store, a.id, now_ms=now, status=200)
    assert outbox.mark_dead(store, b.id, now_ms=now, error="410")
    sending = 1  # what the delivery service says it has in flight (one of the 2 pending)
    gauges = StoreGauges(store, interval_s=0.05, timeout_s=10, in_flight=lambda: sending)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(gauges.run)
            while gauges.statistics().reads < 1:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    g = gauges.statistics()
    assert g.outbox == {"pending": 1, "in_flight": 1, "dead": 1, "delivered": 1}
    assert (g.errors, g.timeouts, g.skipped) == (0, 0, 0)
    assert g.store_bytes is not None and g.store_bytes > 0
    if store.backend == "sqlite":
        with store.transaction("test", write=False) as conn:
            path = conn.execute(sqlalchemy.text("PRAGMA database_list")).fetchall()[0][2]
        wal = Path(f"{path}-wal")
        assert g.store_bytes == os.stat(path).st_size + (wal.stat().st_size if wal.exists() else 0)
    else:
        assert g.store_bytes == store_bytes(store)


@pytest.mark.postgres
async def test_a_read_held_up_by_a_lock_is_abandoned_and_counted(postgres_db_url: str) -> None:
    with Store.open(postgres_db_url) as store:
        enqueue(store, 2)
        gauges = StoreGauges(store, interval_s=1, timeout_s=0.3)
        await gauges.refresh()
        assert gauges.statistics().outbox == {
            "pending": 2, "in_flight": 0, "dead": 0, "delivered": 0
        }  # fmt: skip
        engine = sqlalchemy.create_engine(postgres_db_url)
        try:
            with engine.connect() as conn, trio.fail_after(TIMEOUT_S):
                conn.execute(sqlalchemy.text("LOCK TABLE webhook_outbox IN ACCESS EXCLUSIVE MODE"))
                await gauges.refresh()  # held up by the lock: abandoned at 0.3 s
                await gauges.refresh()  # the abandoned read still runs: not a second one
                g = gauges.statistics()
                assert (g.reads, g.timeouts, g.skipped) == (1, 1, 1)
                assert g.outbox is not None and g.outbox["pending"] == 2  # the last values
                conn.rollback()  # the lock goes; the abandoned read ends
            with trio.fail_after(TIMEOUT_S):
                while gauges.statistics().reads < 2:
                    await trio.sleep(0.05)
                    await gauges.refresh()
        finally:
            engine.dispose()
        assert gauges.statistics().errors == 0
