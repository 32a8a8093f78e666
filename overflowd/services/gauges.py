"""Store gauges for the metrics: webhook outbox rows by state and the store's size on disk.

Reading them costs a query (a count over the outbox, ``pg_database_size()``), so they are
never read per datagram nor per scrape: a periodic task reads them in a worker thread, each
read bounded by a timeout, and :meth:`StoreGauges.statistics` hands out the last values. A
read past its timeout is abandoned (its thread finishes on its own) and counted; no new read
starts while it is still running, so a slow database holds at most one thread here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import trio
from sqlalchemy import text

from overflowd.errors import StoreError
from overflowd.store import Store, outbox

log = logging.getLogger(__name__)

__all__ = ["OUTBOX_GAUGE_STATES", "StoreGaugeStatistics", "StoreGauges", "store_bytes"]

#: The states of ``overflowd_webhook_outbox_rows``: the store's three, with ``in_flight``
#: taken out of ``pending`` (rows this node's delivery service is sending right now).
OUTBOX_GAUGE_STATES = ("pending", "in_flight", "dead", "delivered")
#: At most one warning per this many seconds about a failed or slow read (all are counted).
ERROR_LOG_INTERVAL_S = 300.0


def store_bytes(store: Store) -> int | None:
    """Bytes the store takes: SQLite's database file plus its write-ahead log (what the disk
    holds), PostgreSQL's ``pg_database_size()``; None for an in-memory SQLite database."""
    if store.backend == "sqlite":
        with store.transaction("measuring the store", write=False) as conn:
            files = {str(r[1]): str(r[2]) for r in conn.execute(text("PRAGMA database_list"))}
        path = files.get("main", "")
        if not path:
            return None
        total = 0
        for name in (path, path + "-wal"):
            try:
                total += os.stat(name).st_size
            except FileNotFoundError:  # no WAL right after a checkpoint that removed it
                continue
            except OSError as exc:
                why = exc.strerror or exc
                raise StoreError(f"database {store.name}: measuring {name}: {why}") from exc
        return total
    with store.transaction("measuring the store", write=False) as conn:
        return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())


@dataclass(frozen=True)
class StoreGaugeStatistics:
    #: outbox rows by OUTBOX_GAUGE_STATES as of the last read; None before the first one
    outbox: Mapping[str, int] | None = None
    #: bytes the store takes (see :func:`store_bytes`) as of the last read
    store_bytes: int | None = None
    #: reads that finished, failed (StoreError), were abandoned past the timeout, or were not
    #: started because the previous (abandoned) one was still running
    reads: int = 0
    errors: int = 0
    timeouts: int = 0
    skipped: int = 0


class StoreGauges:
    """Read the outbox counts and the store size every ``interval_s``, each within
    ``timeout_s``. ``in_flight`` tells how many pending rows the delivery service is sending
    now (its own count: the store cannot tell a leased row from one waiting for a retry)."""

    def __init__(
        self,
        store: Store,
        *,
        interval_s: float,
        timeout_s: float,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be positive")
        self._store = store
        self._interval = interval_s
        self._timeout = timeout_s
        self._in_flight = in_flight
        # One token: an abandoned read keeps it until its thread ends, so reads never pile up.
        self._limiter = trio.CapacityLimiter(1)
        self._outbox: Mapping[str, int] | None = None
        self._bytes: int | None = None
        self._reads = self._errors = self._timeouts = self._skipped = 0
        self._last_log = -ERROR_LOG_INTERVAL_S

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.refresh()
            await trio.sleep(self._interval)

    def _read(self) -> tuple[dict[str, int], int | None]:
        return outbox.counts(self._store), store_bytes(self._store)

    async def refresh(self) -> None:
        """One read, bounded by the timeout; the gauges keep their last values if it fails."""
        if self._limiter.borrowed_tokens:  # the abandoned read still runs: do not pile up
            self._skipped += 1
            return
        result: tuple[dict[str, int], int | None] | None = None
        with trio.move_on_after(self._timeout):
            try:
                result = await trio.to_thread.run_sync(
                    self._read, abandon_on_cancel=True, limiter=self._limiter
                )
            except StoreError as exc:
                self._errors += 1
                self._warn(f"error={exc}")
                return
        if result is None:
            self._timeouts += 1
            self._warn(f"error=read took longer than {self._timeout:g} s (abandoned)")
            return
        counts, size = result
        self._reads += 1
        self._bytes = size
        # The service's count, taken now (it may have moved since the read: never above it).
        pending = counts.get(outbox.PENDING, 0)
        in_flight = min(self._in_flight() if self._in_flight is not None else 0, pending)
        self._outbox = MappingProxyType(
            {
                "pending": pending - in_flight,
                "in_flight": in_flight,
                "dead": counts.get(outbox.DEAD, 0),
                "delivered": counts.get(outbox.DELIVERED, 0),
            }
        )

    def _warn(self, what: str) -> None:
        now = trio.current_time()
        if now - self._last_log < ERROR_LOG_INTERVAL_S:
            return
        self._last_log = now
        log.warning("gauges.read_failed %s (gauges keep their last values)", what)

    def statistics(self) -> StoreGaugeStatistics:
        return StoreGaugeStatistics(
            outbox=self._outbox,
            store_bytes=self._bytes,
            reads=self._reads,
            errors=self._errors,
            timeouts=self._timeouts,
            skipped=self._skipped,
        )
