"""Review: an OSError from statvfs (the database's directory on a failing or stale mount: EIO,
ESTALE, ENOENT) escapes RetentionService: ``_call`` catches StoreError only, and
``store.retention.headroom`` calls statvfs outside the store's error boundary. The retention
task dies, and with it NodeService's services nursery: the node stops.

Expected: counted (``errors``), logged, tried again at the next check.
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from overflowd.config import StorageSettings
from overflowd.services.retention import RetentionService
from overflowd.store import Store


async def test_a_failing_statvfs_does_not_stop_retention(tmp_path: Path) -> None:
    calls = 0

    def statvfs(path: str) -> os.statvfs_result:
        nonlocal calls
        calls += 1
        if calls >= 2:
            raise OSError(116, "Stale file handle")
        return os.statvfs(path)

    settings = StorageSettings(headroom_interval_s=0.05)
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        retention = RetentionService(store, settings, statvfs=statvfs)
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(retention.run)
                while calls < 4:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
        assert retention.statistics().errors >= 2
