"""Review: a received batch the store refuses once (SQLite locked past busy_timeout: the own
writer's or retention's transaction, disk full) is dropped -- InbandListener._write has no
retry, unlike NodeService._write -- and its ids stay in the de-duplication cache, so the same
datagrams sent again are refused ``duplicate``: verified reports lost for a transient failure.

Over real UDP on loopback.
"""

from __future__ import annotations

import dataclasses
import socket
import sqlite3
import time
from pathlib import Path

import pytest
import trio

from overflowd.identity import NodeIdentity
from overflowd.services.inband import InbandListener, InbandSettings
from overflowd.store import Store, repository
from overflowd.wire import datagram
from tests.support.reports import make_payload

PEER = NodeIdentity(seed=b"\x42" * 32)


async def test_a_briefly_locked_store_loses_no_received_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(repository, "SQLITE_BUSY_TIMEOUT_MS", 100)
    path = tmp_path / "node.db"
    reports = []
    for n in range(5):
        p = make_payload("127.0.0.1", "127.0.0.2", time_ms=int(time.time() * 1000))
        reports.append(
            PEER.sign_report(dataclasses.replace(p, flow=dataclasses.replace(p.flow, sport=1 + n)))
        )
    with Store.open(f"sqlite:///{path}") as store:
        listener = InbandListener(InbandSettings(), store, listen=("127.0.0.1", 0))
        lock = sqlite3.connect(path, isolation_level=None)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(listener.run)
                lock.execute("BEGIN EXCLUSIVE")
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                    for r in reports:
                        out.sendto(datagram.to_wire(r.cose), addr)
                    while listener.statistics().store_errors < 1:
                        await trio.sleep(0.02)
                    lock.execute("ROLLBACK")  # the lock is gone 0.1 s later
                    for r in reports:  # and the sender even sends them again
                        out.sendto(datagram.to_wire(r.cose), addr)
                    with trio.move_on_after(2):
                        while listener.statistics().datagrams < 10:
                            await trio.sleep(0.02)
                await trio.sleep(0.5)
                listener.stop()
        lock.close()
        stored = [r for r in reports if store.get_report(r.report_id) is not None]
        stats = listener.statistics()
        assert len(stored) == 5, (
            f"{5 - len(stored)} verified reports lost; store_errors={stats.store_errors} "
            f"dropped={dict(stats.dropped)}"
        )
