"""Storage retention on trio: keep the store inside its budgets, and the disk from filling.

:class:`RetentionService` seeds the admission policy (:mod:`overflowd.storage_policy`) from
the store, then loops: every ``headroom_interval_s`` it measures free space
(:func:`overflowd.store.retention.headroom`), and every ``prune_interval_s`` it prunes by age
and size. When free space falls below the reserve (the larger of ``min_free_bytes`` and
``min_free_fraction`` of the filesystem or of ``max_database_bytes``), the policy refuses every
received report and received reports are pruned, oldest first, until free space is back above
the reserve plus a margin (:data:`HEADROOM_HYSTERESIS`). Own reports and outbox rows are never
refused nor pruned for headroom: they are what the room is kept for. With no received report
left to prune, the shortage is counted (``headroom_exhausted``) and logged, and the operator
must act.

Every database call runs in a worker thread, one bounded batch per transaction. It must never
delete a report a pending webhook delivery refers to (the store functions see to it).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import trio

from overflowd.config import StorageSettings
from overflowd.errors import StoreError
from overflowd.storage_policy import PrunedRow, StoragePolicy, row_bytes
from overflowd.store import Store
from overflowd.store import retention as ret

log = logging.getLogger(__name__)

#: Leave the shortage only with this much more than the reserve free (10%), so the node does
#: not flap between refusing and admitting at every check.
HEADROOM_HYSTERESIS = 0.1
#: Batches pruned for headroom in one check at most; the next check goes on. Bounds one check's
#: work (1000 rows a batch: about a million rows, a few hundred megabytes, per check).
MAX_HEADROOM_BATCHES = 1000

#: Admitted reports that may be between the policy and the store at once, by default: the
#: in-band listener's queue and one store batch (InbandSettings' defaults, 1000 + 200).
IN_FLIGHT_REPORTS = 1200
#: The largest a stored report can count (a 1200-byte datagram's report, plus the row).
MAX_ROW_BYTES = row_bytes(1200)

PRUNE_REASONS = ("received_age", "received_size", "own_age", "own_size", "headroom")

#: A stand-in for :func:`overflowd.store.retention.headroom` (tests: a filesystem of any size).
HeadroomProbe = Callable[[], "ret.Headroom | None"]


@dataclass(frozen=True)
class RetentionStatistics:
    #: rows and bytes of own and received reports, as of the last measurement
    reports: Mapping[str, int]
    bytes: Mapping[str, int]
    #: rows pruned (and their bytes) by reason, see PRUNE_REASONS
    pruned: Mapping[str, int]
    pruned_bytes: Mapping[str, int]
    #: received reports refused by the admission policy, by reason (REFUSAL_REASONS)
    refused: Mapping[str, int] = field(default_factory=dict)
    admitted: int = 0
    headroom_short: bool = False
    free_bytes: int | None = None
    reserve_bytes: int | None = None
    #: checks that found headroom short with no received report left to prune
    headroom_exhausted: int = 0
    passes: int = 0
    errors: int = 0


class RetentionService:
    """Prunes by age, size and headroom; tells the admission policy what it sees."""

    def __init__(
        self,
        store: Store,
        settings: StorageSettings,
        *,
        policy: StoragePolicy | None = None,
        wall_clock: Callable[[], float] = time.time,
        probe: HeadroomProbe | None = None,
        statvfs: ret.StatVfs = os.statvfs,
        in_flight: int = IN_FLIGHT_REPORTS,
    ) -> None:
        """``policy`` is seeded and kept in step (the in-band listener's admission hook);
        ``probe`` replaces the free-space measurement, ``statvfs`` only the filesystem's.
        ``in_flight`` is how many admitted reports may be on their way to the store at once
        (the listener's queue and batch): the policy's count is corrected only beyond it."""
        self.store = store
        self.settings = settings
        self.policy = policy if policy is not None else StoragePolicy(settings)
        self._clock = wall_clock
        self._probe = probe or self._measure
        self._statvfs = statvfs
        self._in_flight = in_flight
        self._usage = {k: ret.Usage(0, 0) for k in ret.KINDS}
        self._pruned: Counter[str] = Counter()
        self._pruned_bytes: Counter[str] = Counter()
        self._free: int | None = None
        self._reserve: int | None = None
        # What pruning freed that the probe cannot see yet (PostgreSQL: the database size
        # falls only after VACUUM); growth seen by the probe uses it up.
        self._credit = 0
        self._last_free: int | None = None
        self._exhausted = 0
        self._passes = 0
        self._errors = 0

    def _measure(self) -> ret.Headroom | None:
        return ret.headroom(
            self.store,
            max_database_bytes=self.settings.max_database_bytes,
            statvfs=self._statvfs,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        await self.seed()
        await self.check_headroom()  # before anything is admitted
        task_status.started()
        next_prune = trio.current_time()
        while True:
            if trio.current_time() >= next_prune:
                await self.prune()
                next_prune = trio.current_time() + s.prune_interval_s
            await trio.sleep(s.headroom_interval_s)
            await self.check_headroom()

    async def _call(self, doing: str, fn: Callable[[], object]) -> object | None:
        try:
            return await trio.to_thread.run_sync(fn)
        except StoreError as exc:
            self._errors += 1
            log.warning("retention.store_failed doing=%s error=%s", doing, exc)
            return None
        except Exception as exc:  # a bug in one check costs that check, never the node
            self._errors += 1
            log.warning(
                "retention.check_failed doing=%s error=%s: %s", doing, type(exc).__name__, exc
            )
            return None

    async def seed(self) -> None:
        """Start the policy from what the store holds (counts per key, per sender, totals)."""
        s = self.settings
        seed = await self._call(
            "seeding",
            lambda: ret.received_seed(
                self.store, max_keys=s.max_tracked_keys, max_senders=s.max_tracked_senders
            ),
        )
        if not isinstance(seed, ret.ReceivedSeed):
            return
        self.policy.seed(
            reports=seed.usage.reports,
            bytes_=seed.usage.bytes,
            keys=seed.keys,
            senders=seed.senders,
            now=self._clock(),
        )
        self._usage[ret.RECEIVED] = seed.usage
        log.info(
            "retention.seeded received_reports=%d received_bytes=%d keys=%d senders=%d",
            seed.usage.reports,
            seed.usage.bytes,
            len(seed.keys),
            len(seed.senders),
        )

    # -- headroom ------------------------------------------------------------------------------

    async def _measure_free(self) -> tuple[int, int] | None:
        """(free bytes with the credit, reserve), or None when there is nothing to measure."""
        h = await self._call("measuring headroom", self._probe)
        if not isinstance(h, ret.Headroom):
            return None
        if h.visible:
            self._credit = 0
        elif self._last_free is not None and h.free_bytes < self._last_free:
            self._credit = max(0, self._credit - (self._last_free - h.free_bytes))
        self._last_free = h.free_bytes
        s = self.settings
        reserve = max(s.min_free_bytes, int(s.min_free_fraction * h.capacity_bytes))
        return h.free_bytes + self._credit, reserve

    async def check_headroom(self) -> bool:
        """Measure; when short, refuse received reports and prune them until it is not."""
        measured = await self._measure_free()
        if measured is None:
            self._free, self._reserve = None, None
            self.policy.set_headroom_short(False)
            return False
        free, reserve = measured
        self._free, self._reserve = free, reserve
        short = self.policy.headroom_short or free < reserve
        if not short:
            return False
        if not self.policy.headroom_short:
            log.warning("retention.headroom_short free_bytes=%d reserve_bytes=%d", free, reserve)
        self.policy.set_headroom_short(True)
        target = reserve + int(reserve * HEADROOM_HYSTERESIS)
        for _ in range(MAX_HEADROOM_BATCHES):
            if free >= target:
                break
            # No more rows than the shortfall needs, counting each at the largest a row can be,
            # so headroom never prunes more than a row's worth past the target.
            need = max(1, (target - free) // MAX_ROW_BYTES)
            rows = await self._prune_batch("headroom", ret.RECEIVED, None, need)
            if rows is None:
                break
            if not rows:
                self._exhausted += 1
                log.warning(
                    "retention.headroom_exhausted free_bytes=%d reserve_bytes=%d "
                    "(no received report left to prune)",
                    free,
                    reserve,
                )
                break
            self._credit += sum(r.bytes for r in rows)
            measured = await self._measure_free()
            if measured is None:
                break
            free, reserve = measured
            self._free, self._reserve = free, reserve
        if free >= target:
            self.policy.set_headroom_short(False)
            log.info("retention.headroom_ok free_bytes=%d reserve_bytes=%d", free, reserve)
            return False
        return True

    # -- age and size --------------------------------------------------------------------------

    async def _prune_batch(
        self, reason: str, kind: str, before_ms: int | None, limit: int | None = None
    ) -> list[PrunedRow] | None:
        n = min(limit or self.settings.prune_batch_rows, self.settings.prune_batch_rows)
        if before_ms is None:
            fn: Callable[[], list[PrunedRow]] = lambda: ret.prune_oldest(self.store, kind, limit=n)  # noqa: E731
        else:
            b = before_ms
            fn = lambda: ret.prune_older_than(self.store, kind, before_ms=b, limit=n)  # noqa: E731
        rows = await self._call("pruning", fn)
        if not isinstance(rows, list):
            return None
        if rows:
            self._pruned[reason] += len(rows)
            freed = sum(r.bytes for r in rows)
            self._pruned_bytes[reason] += freed
            if kind == ret.RECEIVED:
                self.policy.forget(rows)
            u = self._usage[kind]
            self._usage[kind] = ret.Usage(max(0, u.reports - len(rows)), max(0, u.bytes - freed))
        return rows

    async def prune(self) -> Mapping[str, int]:
        """One pass: by age, then by size, each kind; then the totals again. What it pruned."""
        s = self.settings
        before = Counter(self._pruned)
        now_ms = int(self._clock() * 1000)
        batch = s.prune_batch_rows
        for kind, days in ((ret.RECEIVED, s.received_max_age_days), (ret.OWN, s.own_max_age_days)):
            cutoff = now_ms - int(days * 86_400_000)
            while True:
                rows = await self._prune_batch(f"{kind}_age", kind, cutoff)
                if rows is None or len(rows) < batch:
                    break
        measured = await self._call("measuring the store", lambda: ret.usage(self.store))
        if isinstance(measured, dict):
            self._usage = dict(measured)
            budgets = (
                (ret.RECEIVED, s.received_max_reports, s.received_max_bytes),
                (ret.OWN, None, s.own_max_bytes),
            )
            for kind, max_reports, max_bytes in budgets:
                while True:
                    u = self._usage[kind]
                    over_rows = u.reports - max_reports if max_reports is not None else 0
                    over_bytes = u.bytes - max_bytes
                    if over_rows <= 0 and over_bytes <= 0:
                        break
                    # Enough rows to cover the excess (by the smallest a row can be), one batch.
                    want = max(over_rows, 1, over_bytes // max(1, u.bytes // max(1, u.reports)))
                    rows = await self._prune_batch(
                        f"{kind}_size", kind, None, min(batch, max(1, want))
                    )
                    if not rows:
                        break  # nothing prunable left (pending deliveries), or an error
            mark = self.policy.mark()
            measured = await self._call("measuring the store", lambda: ret.usage(self.store))
            if isinstance(measured, dict):
                self._usage = dict(measured)
                got = self._usage[ret.RECEIVED]
                self.policy.resync(
                    reports=got.reports, bytes_=got.bytes, since=mark, in_flight=self._in_flight
                )
        self._passes += 1
        done = {
            r: self._pruned[r] - before[r] for r in PRUNE_REASONS if self._pruned[r] > before[r]
        }
        if done:
            log.info("retention.pruned %s", " ".join(f"{r}={n}" for r, n in sorted(done.items())))
        return done

    def statistics(self) -> RetentionStatistics:
        p = self.policy.statistics()
        return RetentionStatistics(
            reports=MappingProxyType({k: u.reports for k, u in self._usage.items()}),
            bytes=MappingProxyType({k: u.bytes for k, u in self._usage.items()}),
            pruned=MappingProxyType({r: self._pruned[r] for r in PRUNE_REASONS}),
            pruned_bytes=MappingProxyType({r: self._pruned_bytes[r] for r in PRUNE_REASONS}),
            refused=p.refused,
            admitted=p.admitted,
            headroom_short=p.headroom_short,
            free_bytes=self._free,
            reserve_bytes=self._reserve,
            headroom_exhausted=self._exhausted,
            passes=self._passes,
            errors=self._errors,
        )


__all__ = ["PRUNE_REASONS", "RetentionService", "RetentionStatistics"]
