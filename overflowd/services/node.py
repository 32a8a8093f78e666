"""The daemon's nursery: collector → decode and sample → sign → store, and metrics.

Every queue between tasks is bounded. The collector never waits (full queue: drop, count);
the decoder waits for the store (backpressure), so a slow database shows up as counted
collector drops, never as memory growth. On shutdown the collectors stop first, then what is
queued drains within ``drain_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from overflowd import report as rpt
from overflowd.config import Settings
from overflowd.errors import DecodeError, StoreError
from overflowd.flowsample import Sampler, SamplerStatistics
from overflowd.identity import NodeIdentity
from overflowd.pipeline import ReportMaker, policy_from_settings
from overflowd.services.collector import (
    CollectorStatistics,
    Datagram,
    UdpCollector,
    parse_listen,
)
from overflowd.store import Store
from overflowd.wire import DecoderState, DecoderStatistics, decode_datagram_rows

log = logging.getLogger(__name__)

#: Reports written per store transaction, and the longest a report waits for its batch.
STORE_BATCH = 500
STORE_BATCH_WAIT_S = 0.2
#: Signed reports waiting for the store; when full, the decoder waits (backpressure).
REPORT_QUEUE = 5_000
#: At most one warning about malformed datagrams per this many seconds (the rest are counted).
MALFORMED_LOG_INTERVAL_S = 10.0


@dataclass(frozen=True)
class NodeStatistics:
    collectors: tuple[CollectorStatistics, ...]
    decoder: DecoderStatistics
    sampler: SamplerStatistics
    malformed_datagrams: int
    reports_signed: int
    reports_stored: int
    reports_duplicate: int
    store_errors: int


def sampling_overrides(items: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        exporter, _, value = item.partition("=")
        out[exporter] = int(value)
    return out


class NodeService:
    """One node: listens, samples, signs, stores. Sends nothing yet (notify comes next)."""

    def __init__(
        self,
        identity: NodeIdentity,
        settings: Settings,
        store: Store,
        *,
        listen: Sequence[str] | None = None,
        rate: float | None = None,
        on_report: Callable[[rpt.SignedReport], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._listen = [parse_listen(x) for x in (listen or settings.collector.listen)]
        policy = policy_from_settings(settings, rate)
        self.sampler = Sampler(policy)
        self.maker = ReportMaker.for_node(identity, settings, policy)
        self.decoder = DecoderState(
            overrides=sampling_overrides(settings.collector.sampling_overrides)
        )
        self.collectors: list[UdpCollector] = []
        self._on_report = on_report
        self._malformed = 0
        self._signed = 0
        self._stored = 0
        self._duplicate = 0
        self._store_errors = 0
        self._stop = trio.Event()
        self._last_malformed_log = -MALFORMED_LOG_INTERVAL_S
        self._malformed_unlogged = 0

    def stop(self) -> None:
        """Stop receiving and drain (see module docstring)."""
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cs = self.settings.collector
        dgram_send, dgram_recv = trio.open_memory_channel[Datagram](cs.queue_datagrams)
        report_send, report_recv = trio.open_memory_channel[rpt.SignedReport](REPORT_QUEUE)
        async with trio.open_nursery() as outer:
            # The store writer and decoder live outside the collectors' scope so they can drain.
            outer.start_soon(self._store_writer, report_recv)
            outer.start_soon(self._decode_loop, dgram_recv, report_send)
            with trio.CancelScope() as collecting:
                async with trio.open_nursery() as inner:
                    bound = []
                    for listen in self._listen:
                        collector = UdpCollector(
                            listen, dgram_send.clone(), rcvbuf_bytes=cs.rcvbuf_bytes
                        )
                        self.collectors.append(collector)
                        bound.append(await inner.start(collector.run))
                    await dgram_send.aclose()
                    task_status.started(bound)
                    await self._stop.wait()
                    collecting.cancel()
            # Collectors are gone and their channel clones closed: the decoder drains, then the
            # store writer. Past the deadline, what is left is dropped (and counted by the store).
            outer.cancel_scope.deadline = trio.current_time() + cs.drain_timeout_s

    async def _decode_loop(
        self,
        datagrams: trio.MemoryReceiveChannel[Datagram],
        reports: trio.MemorySendChannel[rpt.SignedReport],
    ) -> None:
        sample = self.sampler.sample
        make_all = self.maker.make_all
        async with datagrams, reports:
            async for dg in datagrams:
                try:
                    records = decode_datagram_rows(dg.data, dg.exporter, self.decoder, dg.received)
                except DecodeError as exc:
                    self._malformed += 1
                    self._log_malformed(dg.exporter, exc)
                    continue
                sampled = sample(records)
                if not sampled:
                    continue
                for report in make_all(sampled, int(time.time() * 1000)):
                    self._signed += 1
                    if self._on_report is not None:
                        self._on_report(report)
                    await reports.send(report)

    def _log_malformed(self, exporter: str, exc: DecodeError) -> None:
        """A warning naming the exporter, rate-limited: a flood of garbage must not flood logs."""
        now = trio.current_time()
        if now - self._last_malformed_log < MALFORMED_LOG_INTERVAL_S:
            self._malformed_unlogged += 1
            return
        log.warning(
            "collector.malformed exporter=%s reason=%s suppressed_since_last=%d",
            exporter,
            exc,
            self._malformed_unlogged,
        )
        self._last_malformed_log = now
        self._malformed_unlogged = 0

    async def _store_writer(self, reports: trio.MemoryReceiveChannel[rpt.SignedReport]) -> None:
        async with reports:
            while True:
                try:
                    first = await reports.receive()
                except trio.EndOfChannel:
                    return
                batch = [first]
                with trio.move_on_after(STORE_BATCH_WAIT_S):
                    while len(batch) < STORE_BATCH:
                        try:
                            batch.append(await reports.receive())
                        except trio.EndOfChannel:
                            break
                await self._write(batch)

    async def _write(self, batch: list[rpt.SignedReport]) -> None:
        received = int(time.time() * 1000)
        rows = [(r, received, "local") for r in batch]
        try:
            new = await trio.to_thread.run_sync(self.store.add_reports, rows)
        except StoreError as exc:
            self._store_errors += 1
            log.warning("store.write_failed reports=%d error=%s", len(batch), exc)
            return
        self._stored += new
        self._duplicate += len(batch) - new

    def statistics(self) -> NodeStatistics:
        return NodeStatistics(
            collectors=tuple(c.statistics() for c in self.collectors),
            decoder=self.decoder.statistics(),
            sampler=self.sampler.statistics(),
            malformed_datagrams=self._malformed,
            reports_signed=self._signed,
            reports_stored=self._stored,
            reports_duplicate=self._duplicate,
            store_errors=self._store_errors,
        )
