"""The daemon's nursery: collector → decode and sample → sign → store, and metrics.

Every queue between tasks is bounded. The collector never waits (full queue: drop, count);
the decoder waits for the store (backpressure), so a slow database shows up as counted
collector drops, never as memory growth. On shutdown the collectors stop first, then what is
queued drains within ``drain_timeout_s``.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from overflowd import report as rpt
from overflowd.config import Settings, parse_listen
from overflowd.errors import DecodeError, StoreError
from overflowd.flows import FlowRow
from overflowd.flowsample import Sampler, SamplerStatistics
from overflowd.flowsample_batch import BatchSampler
from overflowd.identity import NodeIdentity
from overflowd.notify import Budget, flow_key
from overflowd.pipeline import ReportMaker, policy_from_settings
from overflowd.services.capture import CaptureStatistics, KernelSampledCapture
from overflowd.services.collector import (
    Backlog,
    CollectorStatistics,
    Datagram,
    UdpCollector,
)
from overflowd.services.inband import (
    InbandListener,
    InbandListenerStatistics,
    InbandSender,
    InbandSenderStatistics,
)
from overflowd.services.webhook import WebhookDelivery, WebhookStatistics, enqueue
from overflowd.store import Store
from overflowd.trust import TrustBook, parse_pinned
from overflowd.wire import DecoderState, DecoderStatistics, decode_datagram_rows
from overflowd.wire.v5_batch import decode_v5_batch

log = logging.getLogger(__name__)

#: Reports written per store transaction, and the longest a report waits for its batch.
STORE_BATCH = 500
STORE_BATCH_WAIT_S = 0.2
#: Signed reports waiting for the store; when full, the decoder waits (backpressure).
REPORT_QUEUE = 5_000
#: Batches of kernel-sampled packets waiting to be sampled and signed.
CAPTURE_QUEUE = 1_000
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
    captures: tuple[CaptureStatistics, ...] = ()
    inband_sender: InbandSenderStatistics | None = None
    inband_listener: InbandListenerStatistics | None = None
    webhook: WebhookStatistics | None = None


def merge_sampler_statistics(a: SamplerStatistics, b: SamplerStatistics) -> SamplerStatistics:
    """One view of the scalar and the vectorized sampler (they see disjoint records)."""
    boosts = dict(a.boosts)
    for reason, n in b.boosts.items():
        boosts[reason] = boosts.get(reason, 0) + n
    return SamplerStatistics(
        records_seen=a.records_seen + b.records_seen,
        records_sampled=a.records_sampled + b.records_sampled,
        expected_sampled=a.expected_sampled + b.expected_sampled,
        variance_sampled=a.variance_sampled + b.variance_sampled,
        packets_seen=a.packets_seen + b.packets_seen,
        packets_sampled=a.packets_sampled + b.packets_sampled,
        certain=a.certain + b.certain,
        boost_capped=a.boost_capped + b.boost_capped,
        boosts=boosts,
        reseeds=a.reseeds + b.reseeds,
    )


def sampling_overrides(items: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        exporter, _, value = item.partition("=")
        out[exporter] = int(value)
    return out


class NodeService:
    """One node: collects, samples, signs, stores; sends reports in band; hears other nodes'.

    Sending goes through one :class:`~overflowd.notify.Budget` and the in-band confinement
    (``inband.allowed_prefixes``, empty by default: nothing is sent until configured).
    """

    def __init__(
        self,
        identity: NodeIdentity,
        settings: Settings,
        store: Store,
        *,
        listen: Sequence[str] | None = None,
        inband_listen: str | None = None,
        rate: float | None = None,
        on_report: Callable[[rpt.SignedReport], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._listen = [parse_listen(x) for x in (listen or settings.collector.listen)]
        policy = policy_from_settings(settings, rate)
        self.sampler = Sampler(policy)
        self.batch_sampler = BatchSampler(policy)
        self.maker = ReportMaker.for_node(identity, settings, policy)
        self.decoder = DecoderState(
            overrides=sampling_overrides(settings.collector.sampling_overrides)
        )
        self.collectors: list[UdpCollector] = []
        self.captures: list[KernelSampledCapture] = []
        self._on_report = on_report
        self._malformed = 0
        self._signed = 0
        self._stored = 0
        self._duplicate = 0
        self._store_errors = 0
        self._stop = trio.Event()
        self._last_malformed_log = -MALFORMED_LOG_INTERVAL_S
        self._malformed_unlogged = 0
        self.budget = Budget(settings.budget)
        for warning in settings.budget.warnings():
            log.warning("budget.config %s", warning)
        self.trust_book = TrustBook([parse_pinned(p) for p in settings.registry.pinned])
        self.inband_sender: InbandSender | None = None
        self.inband_listener: InbandListener | None = None
        self.inband_bound: tuple[str, int] | None = None
        self.webhook: WebhookDelivery | None = None
        if settings.webhook.targets:
            self.webhook = WebhookDelivery(store, identity, settings.webhook)
        self._sending_scope = trio.CancelScope()
        self._webhook_scope = trio.CancelScope()
        if settings.inband.enabled:
            self.inband_sender = InbandSender(settings.inband, self.budget)
            listen_at = parse_listen(inband_listen) if inband_listen else None
            self.inband_listener = InbandListener(
                settings.inband, store, listen=listen_at, trust_of=self._trust_of
            )

    def stop(self) -> None:
        """Stop receiving and drain (see module docstring)."""
        self._stop.set()
        if self.inband_listener is not None:
            self.inband_listener.stop()

    def _trust_of(self, key: bytes) -> str:
        # Pinned and continuity from the trust book; DNS evidence is wired with the registry.
        return str(self.trust_book.assess(key, now_ms=int(time.time() * 1000)).level)

    async def _start_inband(self, nursery: trio.Nursery) -> tuple[str, int] | None:
        """Start the in-band sender (cancellable alone) and listener; the listener's address."""
        if self.inband_sender is not None:
            await nursery.start(self._run_sender)
        if self.inband_listener is not None:
            bound: tuple[str, int] = await nursery.start(self.inband_listener.run)
            return bound
        return None

    async def _run_webhooks(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.webhook is not None
        with self._webhook_scope:
            await self.webhook.run(task_status=task_status)

    async def _run_sender(
        self, *, task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.inband_sender is not None
        with self._sending_scope:
            await self.inband_sender.run(task_status=task_status)

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cs = self.settings.collector
        # Batches of datagrams; the bound is counted in datagrams by the backlog (each batch
        # holds at least one, so the channel itself never fills first).
        self._backlog = Backlog(cs.queue_datagrams)
        dgram_send, dgram_recv = trio.open_memory_channel[list[Datagram]](cs.queue_datagrams)
        report_send, report_recv = trio.open_memory_channel[rpt.SignedReport](REPORT_QUEUE)
        async with trio.open_nursery() as services:
            # In band: the listener stops with stop() and drains itself; the sender is
            # cancelled once the reports it could still be handed have been made.
            self.inband_bound = await self._start_inband(services)
            if self.webhook is not None:
                await services.start(self._run_webhooks)
            async with trio.open_nursery() as outer:
                # Store writer and decoder live outside the collectors' scope, to drain.
                outer.start_soon(self._store_writer, report_recv)
                rows_send, rows_recv = trio.open_memory_channel[list[FlowRow]](CAPTURE_QUEUE)
                outer.start_soon(self._capture_loop, rows_recv, report_send.clone())
                outer.start_soon(self._decode_loop, dgram_recv, report_send)
                with trio.CancelScope() as collecting:
                    async with trio.open_nursery() as inner:
                        bound = []
                        for listen in self._listen:
                            collector = UdpCollector(
                                listen,
                                dgram_send.clone(),
                                self._backlog,
                                rcvbuf_bytes=cs.rcvbuf_bytes,
                            )
                            self.collectors.append(collector)
                            bound.append(await inner.start(collector.run))
                        await dgram_send.aclose()
                        cap = self.settings.capture
                        for interface in cap.interfaces:
                            capture = KernelSampledCapture(
                                interface,
                                cap.one_in,
                                rows_send.clone(),
                                snaplen=cap.snaplen_bytes,
                                outgoing=cap.outgoing,
                                rcvbuf_bytes=cap.rcvbuf_bytes,
                            )
                            self.captures.append(capture)
                            await inner.start(capture.run)
                        await rows_send.aclose()
                        task_status.started(bound)
                        await self._stop.wait()
                        collecting.cancel()
                # Collectors are gone and their channel clones closed: the decoder drains, then
                # the store writer. Past the deadline what is left is dropped (and counted).
                outer.cancel_scope.deadline = trio.current_time() + cs.drain_timeout_s
            self._sending_scope.cancel()
            # Webhook deliveries still pending stay in the durable outbox for the next start.
            self._webhook_scope.cancel()
            services.cancel_scope.deadline = trio.current_time() + cs.drain_timeout_s

    async def _decode_loop(
        self,
        batches: trio.MemoryReceiveChannel[list[Datagram]],
        reports: trio.MemorySendChannel[rpt.SignedReport],
    ) -> None:
        sample = self.sampler.sample
        async with batches, reports:
            async for batch in batches:
                self._backlog.done(len(batch))
                # NetFlow v5 in one vectorized pass (decode and sample); everything else, and
                # the v5 datagrams' FlowRows only for what was sampled, one by one.
                v5 = decode_v5_batch(
                    [(d.data, d.exporter, d.received) for d in batch], self.decoder
                )
                for index, exc in v5.errors:
                    self._malformed += 1
                    self._log_malformed(batch[index].exporter, exc)
                if len(v5):
                    indices, probabilities = self.batch_sampler.sample(v5)
                    if len(indices):
                        rows = v5.rows(indices)
                        await self._report(
                            list(zip(rows, probabilities.tolist(), strict=True)), reports
                        )
                for index in v5.passed:
                    dg = batch[index]
                    try:
                        records = decode_datagram_rows(
                            dg.data, dg.exporter, self.decoder, dg.received
                        )
                    except DecodeError as exc:
                        self._malformed += 1
                        self._log_malformed(dg.exporter, exc)
                        continue
                    await self._report(sample(records), reports)

    async def _capture_loop(
        self,
        batches: trio.MemoryReceiveChannel[list[FlowRow]],
        reports: trio.MemorySendChannel[rpt.SignedReport],
    ) -> None:
        """Packets the kernel sampled become records like any exporter's, and are sampled again."""
        async with batches, reports:
            async for rows in batches:
                await self._report(self.sampler.sample(rows), reports)

    async def _report(
        self,
        sampled: list[tuple[FlowRow, float]],
        reports: trio.MemorySendChannel[rpt.SignedReport],
    ) -> None:
        if not sampled:
            return
        for report in self.maker.make_all(sampled, int(time.time() * 1000)):
            self._signed += 1
            if self._on_report is not None:
                self._on_report(report)
            if self.inband_sender is not None:
                self.inband_sender.submit(report)  # never blocks; full: counted
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

    def _webhook_plan(self, report: rpt.SignedReport, now: float) -> list[str]:
        """Webhook URLs for ``report`` that the budget lets through (counted when it does not)."""
        flow = report.payload.flow
        key = flow_key(flow)
        urls: list[str] = []
        for prefix, url in self.settings.webhook.targets:
            net = ipaddress.ip_network(prefix, strict=False)
            for address in (flow.src, flow.dst):
                if address.version == net.version and address in net and url not in urls:
                    if self.budget.allow(address, key, now, channel=f"webhook {url}"):
                        urls.append(url)
                    break
        return urls

    async def _write(self, batch: list[rpt.SignedReport]) -> None:
        received = int(time.time() * 1000)
        rows = [(r, received, "local") for r in batch]
        now = trio.current_time()
        deliveries = [(r, urls) for r in batch if (urls := self._webhook_plan(r, now))]

        def write() -> int:
            # Outbox rows first: each carries its COSE bytes, so a crash between the two writes
            # loses no delivery (the report itself is stored again from the outbox's copy).
            for report, urls in deliveries:
                enqueue(self.store, report, urls, now_ms=received)
            return self.store.add_reports(rows)

        try:
            new = await trio.to_thread.run_sync(write)
        except StoreError as exc:
            self._store_errors += 1
            log.warning("store.write_failed reports=%d error=%s", len(batch), exc)
            return
        self._stored += new
        self._duplicate += len(batch) - new
        if deliveries and self.webhook is not None:
            self.webhook.wake()

    def statistics(self) -> NodeStatistics:
        return NodeStatistics(
            collectors=tuple(c.statistics() for c in self.collectors),
            decoder=self.decoder.statistics(),
            sampler=merge_sampler_statistics(
                self.sampler.statistics(), self.batch_sampler.statistics()
            ),
            malformed_datagrams=self._malformed,
            reports_signed=self._signed,
            reports_stored=self._stored,
            reports_duplicate=self._duplicate,
            store_errors=self._store_errors,
            captures=tuple(c.statistics() for c in self.captures),
            inband_sender=self.inband_sender.statistics() if self.inband_sender else None,
            webhook=self.webhook.statistics() if self.webhook else None,
            inband_listener=(self.inband_listener.statistics() if self.inband_listener else None),
        )
