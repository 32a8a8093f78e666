"""The daemon's nursery: collector → decode and sample → sign → store, and metrics.

Every queue between tasks is bounded. The collector never waits (full queue: drop, count);
the decoder waits for the store (backpressure), so a slow database shows up as counted
collector drops, never as memory growth. On shutdown the collectors stop first, then what is
queued drains within ``drain_timeout_s``.

Received reports are stored at once with their observer's trust from the
:class:`~overflowd.trust.TrustBook` alone (pinned, continuity, unknown: ``_label``), and
relabelled ``dns`` afterwards when the key is published at the reverse zone of the address the
datagram came from (:func:`overflowd.services.dns.observer_trust`, ``_relabel``), by the
listener's relabel workers: a DNS lookup never holds a report back from the store. Events the
book raises (a new key for a known observer, changed contacts) are logged (rate-limited),
counted and stored (bounded) for ``overflowd-query events``. In-band sightings never count
toward continuity (``_label(..., authenticated=False)``): a UDP source can be forged.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import trio
from sqlalchemy import Connection

from overflowd import report as rpt
from overflowd import ssrf
from overflowd.config import Settings, parse_listen
from overflowd.errors import DeliveryError, DiscoveryError, StoreError
from overflowd.flows import FlowRow
from overflowd.flowsample import BOOST_REASONS, Sampler, SamplerStatistics, SamplingPolicy
from overflowd.identity import NodeIdentity
from overflowd.notify import Budget, WebhookBudget, flow_key, normalize
from overflowd.pipeline import ReportMaker, policy_from_settings
from overflowd.services.capture import CaptureStatistics, KernelSampledCapture
from overflowd.services.collector import (
    Backlog,
    CollectorStatistics,
    Datagram,
    DatagramBatch,
    RefusedExporters,
    UdpCollector,
)
from overflowd.services.dns import (
    DnsRegistry,
    DnsStatistics,
    HintStatistics,
    RegistryHints,
    observer_trust,
)
from overflowd.services.gauges import StoreGauges, StoreGaugeStatistics
from overflowd.services.inband import (
    InbandListener,
    InbandListenerStatistics,
    InbandSender,
    InbandSenderStatistics,
)
from overflowd.services.retention import RetentionService, RetentionStatistics
from overflowd.services.storing import PersistentWrite
from overflowd.services.webhook import WebhookDelivery, WebhookStatistics
from overflowd.storage_policy import StoragePolicy
from overflowd.store import Store, outbox
from overflowd.store.continuity import batch_from, read_histories, save_continuity
from overflowd.store.events import ObserverEvent, add_events
from overflowd.store.outbox import Planned
from overflowd.trust import (
    ContinuityJournal,
    NewKey,
    TrustBook,
    TrustEvent,
    TrustStatistics,
    event_kind,
    network_of,
)
from overflowd.wire import DecoderState, DecoderStatistics

if TYPE_CHECKING:
    # numpy's modules: imported when the first batch of datagrams is decoded (_decode_batch),
    # not at start: an idle node holds no numpy (~14 MB RSS, issue #16).
    from overflowd.flowsample_batch import BatchSampler
    from overflowd.wire.sflow_batch import SFlowBatch, decode_sflow_batch
    from overflowd.wire.template_batch import TemplateBatch, decode_template_batch
    from overflowd.wire.v5_batch import V5Batch, decode_v5_batch

log = logging.getLogger(__name__)

_BATCH_DECODERS = ("decode_v5_batch", "decode_sflow_batch", "decode_template_batch")


def _load_batch_decoders() -> None:
    """Import the array decoders (numpy) into this module's globals, once: the first batch of
    datagrams does, so an idle node has no numpy. Module globals, so tests can replace them."""
    g = globals()
    if "decode_template_batch" in g:
        return
    from overflowd.wire import sflow_batch, template_batch, v5_batch

    for name, module in zip(_BATCH_DECODERS, (v5_batch, sflow_batch, template_batch), strict=True):
        g.setdefault(name, getattr(module, name))


def __getattr__(name: str) -> Any:
    """The array decoders, loaded when first asked for (:func:`_load_batch_decoders`)."""
    if name in _BATCH_DECODERS:
        _load_batch_decoders()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Reports written per store transaction, and the longest a report waits for its batch. The
#: wait is short because every hop to a victim adds it (peers push what is stored): under load
#: batches fill by themselves while the previous transaction runs, so the wait buys little.
STORE_BATCH = 500
STORE_BATCH_WAIT_S = 0.02
#: Signed reports waiting for the store; when full, the decoder waits (backpressure).
REPORT_QUEUE = 5_000
#: Batches of kernel-sampled packets waiting to be sampled and signed.
CAPTURE_QUEUE = 1_000
#: At most one warning about malformed datagrams per this many seconds (the rest are counted).
MALFORMED_LOG_INTERVAL_S = 10.0
#: Observer events: at most this many warnings in a burst, then one per 10 s (the rest are
#: counted and named in the next line). A stranger can raise events at will (a fresh key that
#: copies a known observer's contacts), so neither the log nor the table may grow with them.
EVENT_LOG_BURST, EVENT_LOG_PER_S = 10, 0.1
#: ... and at most this many stored in a burst, then one per second; the rest only counted.
EVENT_STORE_BURST, EVENT_STORE_PER_S = 100, 1.0
#: The trust book's continuity (networks per key, since when contacts are unchanged) is saved
#: in one batch this often, and at stop; at most CONTINUITY_PENDING sightings wait between
#: saves (the rest are dropped and counted: they only delay continuity). A separate write from
#: the listener's report batches: the book is fed by the labellers, after the receive loop.
CONTINUITY_SAVE_S, CONTINUITY_PENDING = 5.0, 10_000
#: Unexpected exceptions at the per-datagram boundary are counted by type name; a decoder bug
#: that raises a new type per input must not grow the table (or Prometheus' label set), so
#: past this many names the rest count as "other".
MAX_ERROR_TYPES = 32


class _Bucket:
    """A token bucket on trio's clock: ``take()`` is True while tokens are left."""

    def __init__(self, burst: int, per_s: float) -> None:
        self._burst, self._per_s = float(burst), per_s
        self._tokens = float(burst)
        self._at: float | None = None

    def take(self) -> bool:
        now = trio.current_time()
        if self._at is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._per_s)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


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
    exporters_refused: int = 0
    reports_shed: int = 0
    #: of ``reports_shed``: sampled records the signing budget left out at random, the kept
    #: ones signed with their probability scaled to match (NodeService._thin); today every
    #: shed record is, so it equals ``reports_shed``
    reports_thinned: int = 0
    captures: tuple[CaptureStatistics, ...] = ()
    inband_sender: InbandSenderStatistics | None = None
    inband_listener: InbandListenerStatistics | None = None
    webhook: WebhookStatistics | None = None
    #: observer events raised, by kind ('new_key', 'contacts_changed')
    registry_events: Mapping[str, int] = field(default_factory=dict)
    #: events counted but not stored (over the storing budget, or the store failed)
    registry_events_unstored: int = 0
    trust: TrustStatistics | None = None
    dns: DnsStatistics | None = None
    hints: HintStatistics | None = None
    #: webhook deliveries to URLs published in DNS (``u=``) that the webhook plan let through
    #: (the outbox may still shed them: ``outbox_full``, counted with the other drops)
    webhooks_from_dns: int = 0
    #: inputs (datagrams, capture batches) dropped at the per-input boundary after an
    #: exception no decoder or policy expected, by exception type (a bug, reported and survived)
    input_errors: Mapping[str, int] = field(default_factory=dict)
    #: store batches written after one or more failed tries
    store_retried_batches: int = 0
    #: reports signed but never stored: still queued when the drain deadline passed at stop
    #: (nothing was sent for them: sending happens only after the store commits)
    reports_unstored_at_stop: int = 0
    #: reports stored and handed to the in-band sender but not sent by the drain deadline
    inband_unsent_at_stop: int = 0
    storage: RetentionStatistics | None = None
    # -- visibility (docs/daemon.md "What the metrics say") --
    #: datagrams refused by collector.allowed_exporters, per exporter (bounded: "other")
    exporters_refused_by: Mapping[str, int] = field(default_factory=dict)
    #: reports this daemon newly stored, by how they came (the store's ``via``)
    stored_by_via: Mapping[str, int] = field(default_factory=dict)
    #: outbox rows by state and the store's size, as of the gauges' last read
    gauges: StoreGaugeStatistics | None = None


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

    In-band sending goes through one :class:`~overflowd.notify.Budget` and the in-band
    confinement (``[send]``, off by default: nothing is sent to a flow's ends until
    configured); webhooks through their own :class:`~overflowd.notify.WebhookBudget` at
    enqueue and the delivery's per-endpoint POST budget (docs/webhooks.md).
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
        registry: DnsRegistry | None = None,
    ) -> None:
        """``registry`` overrides the DNS registry built from ``settings.registry``."""
        self.settings = settings
        self.store = store
        self._listen = [parse_listen(x) for x in (listen or settings.collector.listen)]
        policy = policy_from_settings(settings, rate)
        self.registry = registry
        # DNS for the in-band listener's senders, and for the hints ([send] on: asked boosts
        # and u= webhooks, which do not need in band: docs/notify.md's rule has no `enabled`).
        if self.registry is None and (settings.inband.enabled or settings.inband.allowed_prefixes):
            self.registry = _registry_from(settings)
        # Who may be told anything (in band, or by a webhook found in DNS): inband's confinement.
        self.confinement = settings.inband.confinement()
        # Asked boosts (r=) and webhooks (u=) only for flow ends we may notify: with the default
        # (nothing allowed) DNS is never asked for them. The samplers start without an asked
        # boost (their fast paths: a per-record lookup costs the scalar sampler ~4x) and take
        # it on once some address has asked for one (_use_asked_boost).
        self.hints: RegistryHints | None = None
        self._asked_policy: SamplingPolicy | None = None
        if self.registry is not None and settings.inband.allowed_prefixes:
            self.hints = RegistryHints(self.registry)
            self._asked_policy = dataclasses.replace(policy, asked_boost=self.hints.boost)
        self._retired_batch: SamplerStatistics | None = None
        self._webhooks_from_dns = 0
        self.sampler = Sampler(policy)
        # Made on the first batch (numpy with it); until then its statistics are zeros.
        self._batch_policy = policy
        self._batch_sampler: BatchSampler | None = None
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
        # A refused batch is tried again (overflowd.services.storing): the report queue fills,
        # the decoder waits, and the collectors shed datagrams (counted), no signed report lost.
        self._writer = PersistentWrite("store.write_failed")
        self._unstored_at_stop = 0
        self._inband_unsent_at_stop = 0
        self._input_errors: Counter[str] = Counter()
        self._stop = trio.Event()
        self._last_malformed_log = -MALFORMED_LOG_INTERVAL_S
        self._malformed_unlogged = 0
        self.budget = Budget(settings.budget)
        for warning in settings.budget.warnings():
            log.warning("budget.config %s", warning)
        rs = settings.registry
        self.trust_book = TrustBook(rs.pinned_keys(), rs.continuity_policy())
        self._journal = ContinuityJournal(CONTINUITY_PENDING)
        self._continuity_retried: set[bytes] = set()
        self._continuity_scope = trio.CancelScope()
        self._events: Counter[str] = Counter()
        self._events_unstored = 0
        self._event_log = _Bucket(EVENT_LOG_BURST, EVENT_LOG_PER_S)
        self._event_store = _Bucket(EVENT_STORE_BURST, EVENT_STORE_PER_S)
        self._events_unlogged = 0
        self.inband_sender: InbandSender | None = None
        self.inband_listener: InbandListener | None = None
        self.inband_bound: tuple[str, int] | None = None
        self.webhook: WebhookDelivery | None = None
        #: static endpoints with their prefixes parsed once (targets are the short form)
        self._webhook_endpoints = [
            (e, ssrf.parse_prefixes(e.prefixes)) for e in settings.webhook.all_endpoints()
        ]
        #: what the webhook plan enqueues (de-duplication, per-prefix deferral), the node's
        #: own: apart from the in-band budget
        self.webhook_budget = WebhookBudget(settings.webhook)
        if self._webhook_endpoints or self.hints is not None:
            self.webhook = WebhookDelivery(
                store, identity, settings.webhook, planner=self.webhook_budget
            )
        self._sending_scope = trio.CancelScope()
        self._webhook_scope = trio.CancelScope()
        self._hints_scope = trio.CancelScope()
        self._allowed_exporters = tuple(
            ipaddress.ip_network(x, strict=False) for x in settings.collector.allowed_exporters
        )
        self._exporter_verdicts: dict[str, bool] = {}
        self._exporters_refused = 0
        self._refused_exporters = RefusedExporters()
        ms = settings.metrics
        self.gauges = StoreGauges(
            store,
            interval_s=ms.gauges_interval_s,
            timeout_s=ms.gauges_timeout_s,
            in_flight=lambda: self.webhook.statistics().in_flight if self.webhook else 0,
        )
        self._gauges_scope = trio.CancelScope()
        self._sign_tokens = float(settings.sampling.max_reports_burst)
        self._sign_refilled = 0.0
        self._shed = 0
        # Which sampled records a flood over the signing budget keeps (:meth:`_thin`): not
        # guessable from outside, so a flooder cannot steer which of its records survive.
        self._thin_rng = random.Random(os.urandom(32))
        # Storage budgets: received reports are admitted by the policy, which the retention
        # service seeds from the store and keeps in step with what it prunes (docs/storage.md).
        self.storage_policy = StoragePolicy(settings.storage)
        self.retention = RetentionService(
            store,
            settings.storage,
            policy=self.storage_policy,
            in_flight=settings.inband.queue_reports + settings.inband.store_batch,
        )
        self._retention_scope = trio.CancelScope()
        if settings.inband.enabled:
            self.inband_sender = InbandSender(settings.inband, self.budget)
            listen_at = parse_listen(inband_listen) if inband_listen else None
            self.inband_listener = InbandListener(
                settings.inband,
                store,
                listen=listen_at,
                trust_of=self._trust_of,
                label=self._label,
                relabel=self._relabel,
                wants_relabel=self._wants_relabel,
                admit=self.storage_policy.admit,
                refund=self.storage_policy.refund,
            )

    def stop(self) -> None:
        """Stop receiving and drain (see module docstring)."""
        self._stop.set()
        if self.inband_listener is not None:
            self.inband_listener.stop()

    def _trust_of(self, key: bytes) -> str:
        # At receive time, from the book alone; the label the report keeps is _label's.
        return str(self.trust_book.assess(key, now_ms=int(time.time() * 1000)).level)

    def _may_ask_dns(self, sender: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Ask DNS about ``sender``'s reverse zone? Always with the operator's own resolvers
        (``registry.nameservers``, which may serve private zones); with /etc/resolv.conf's
        only for globally routable addresses: a reverse name of 10/8, 127/8 or TEST-NET is
        nobody's business upstream (RFC 6303), and would only cost a question."""
        if self.registry is None:
            return False
        if self.registry.settings.nameservers:
            return True
        try:
            address = ipaddress.ip_address(sender) if isinstance(sender, str) else sender
        except ValueError:
            return False
        return address.is_global

    async def _label(
        self, report: rpt.SignedReport, sender: str, *, authenticated: bool = False
    ) -> str:
        """The trust a received report is stored with; learns from it and raises events.

        ``authenticated``: the report came over a path that proves ``sender`` is where it came
        from (a TCP connection: a webhook, a peer, the API). Only such a sighting adds
        ``sender``'s network to the key's continuity. The in-band listener never passes it: a
        UDP source address is anyone's to forge, so in band alone never grants continuity.
        """
        now_ms = int(time.time() * 1000)
        key = report.observer_key
        try:
            network: str | None = network_of(sender)
        except ValueError:
            network = None
        events = self.trust_book.observe(
            key,
            report.payload.observer.contacts,
            now_ms=now_ms,
            network=network,
            authenticated=authenticated,
        )
        self._journal.note(key, network, now_ms, authenticated=authenticated)
        if events:
            await self._record_events(events, report, sender)
        # From the book alone: the report is stored at once with it, whatever DNS does;
        # _relabel asks DNS afterwards (InbandListener's relabel queue).
        return str(self.trust_book.assess(key, now_ms=now_ms).level)

    def _wants_relabel(self, report: rpt.SignedReport, sender: str, label: str) -> bool:
        """Is DNS worth asking about this stored report? Not for a pinned key (nothing is
        stronger), nor for a sender whose reverse zone we do not ask (:meth:`_may_ask_dns`)."""
        return label != "pinned" and self._may_ask_dns(sender)

    async def _relabel(self, report: rpt.SignedReport, sender: str) -> str:
        """The label DNS gives a stored report: ``dns`` when the key is published at the
        sender's reverse zone, else the book's. The listener writes it only when it is
        stronger than the stored label, and proves the (key, prefix) pair only for ``dns``:
        a failed lookup is no evidence, and the book may have forgotten the key since."""
        now_ms = int(time.time() * 1000)
        key = report.observer_key
        if self.registry is None:
            return str(self.trust_book.assess(key, now_ms=now_ms).level)
        trust = await observer_trust(
            self.registry, self.trust_book, key, now_ms=now_ms, address=sender
        )
        return str(trust.level)

    async def _record_events(
        self, events: list[TrustEvent], report: rpt.SignedReport, sender: str
    ) -> None:
        rows: list[ObserverEvent] = []
        for event in events:
            kind = event_kind(event)
            self._events[kind] += 1
            fingerprint = rpt.key_fingerprint(event.key)
            if isinstance(event, NewKey):
                old: list[str] = []
                for previous in event.previous_keys:
                    history = self.trust_book.history(previous)
                    for contact in history.contacts if history else ():
                        if contact not in old:
                            old.append(contact)
                previous_fps = ", ".join(rpt.key_fingerprint(k) for k in event.previous_keys[:4])
                detail = f"{event.why}; previous key {previous_fps}"
                old_contacts = tuple(old)
                new_contacts = tuple(report.payload.observer.contacts)
            else:
                detail = None
                old_contacts, new_contacts = event.old, event.new
            if self._event_log.take():
                log.warning(
                    "registry.event kind=%s key=%s pinned=%s sender=%s detail=%s "
                    "suppressed_since_last=%d",
                    kind,
                    fingerprint,
                    event.pinned,
                    sender,
                    detail or f"{len(old_contacts)} contacts -> {len(new_contacts)}",
                    self._events_unlogged,
                )
                self._events_unlogged = 0
            else:
                self._events_unlogged += 1
            if not self._event_store.take():
                self._events_unstored += 1
                continue
            rows.append(
                ObserverEvent(
                    kind=kind,
                    key=event.key,
                    old_contacts=old_contacts,
                    new_contacts=new_contacts,
                    pinned=event.pinned,
                    at_ms=event.at_ms,
                    sender=sender,
                    detail=detail,
                )
            )
        if not rows:
            return
        try:
            await trio.to_thread.run_sync(add_events, self.store, rows)
        except StoreError as exc:
            self._events_unstored += len(rows)
            log.warning("store.events_failed events=%d error=%s", len(rows), exc)

    async def _load_trust_book(self) -> None:
        """Seed the trust book from the store: contacts, first and last sighting and report
        count per key (``observers``), since when the contacts are unchanged and the networks
        seen (``observer_networks``), so that continuity resumes where it was and a new key for
        an observer seen before a restart still raises its event.

        A key whose contacts were not dated yet (saved every ``CONTINUITY_SAVE_S``) restarts its
        continuity clock at its last sighting: a restart may delay ``continuity``, never grant it.
        """
        policy = self.trust_book.policy
        try:
            histories = await trio.to_thread.run_sync(
                functools.partial(
                    read_histories,
                    self.store,
                    max_keys=policy.max_keys,
                    max_networks_per_key=policy.max_networks_per_key,
                    policy=policy,  # established keys first: a flood of fresh ones is recent
                )
            )
        except StoreError as exc:
            log.warning("registry.trust_book_not_loaded error=%s", exc)
            return
        for history in histories:  # least recently seen first (LRU order)
            self.trust_book.load(history)
        log.info(
            "registry.trust_book_loaded keys=%d networks=%d",
            len(histories),
            sum(len(h.networks) for h in histories),
        )

    async def _save_continuity(self) -> None:
        """Write what the book learned since the last save, in one transaction."""
        if not len(self._journal):
            return
        sightings, dated = batch_from(self.trust_book, self._journal)
        try:
            unwritten = await trio.to_thread.run_sync(save_continuity, self.store, sightings, dated)
        except StoreError as exc:
            log.warning(
                "registry.continuity_not_saved networks=%d keys=%d error=%s",
                len(sightings),
                len(dated),
                exc,
            )
            return
        # A key whose report is not stored yet is tried once more with the next batch.
        retry = [k for k in unwritten if k not in self._continuity_retried]
        self._continuity_retried = set(retry)
        self._journal.again(retry)

    async def _run_continuity(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with self._continuity_scope:
            task_status.started()
            while True:
                await trio.sleep(CONTINUITY_SAVE_S)
                await self._save_continuity()

    async def _start_inband(self, nursery: trio.Nursery) -> tuple[str, int] | None:
        """Start the in-band sender (cancellable alone) and listener; the listener's address."""
        if self.inband_sender is not None:
            await nursery.start(self._run_sender)
        if self.inband_listener is not None:
            bound: tuple[str, int] = await nursery.start(self.inband_listener.run)
            return bound
        return None

    async def _run_hints(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.hints is not None
        with self._hints_scope:
            await self.hints.run(task_status=task_status)

    async def _run_webhooks(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.webhook is not None
        with self._webhook_scope:
            await self.webhook.run(task_status=task_status)

    async def _run_retention(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with self._retention_scope:
            await self.retention.run(task_status=task_status)

    async def _run_gauges(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with self._gauges_scope:
            await self.gauges.run(task_status=task_status)

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
        self._sign_refilled = trio.current_time()
        dgram_send, dgram_recv = trio.open_memory_channel[DatagramBatch](cs.queue_datagrams)
        report_send, report_recv = trio.open_memory_channel[rpt.SignedReport](REPORT_QUEUE)
        if self.inband_listener is not None:
            await self._load_trust_book()
        async with trio.open_nursery() as services:
            # Retention first: the admission policy is seeded before anything is received.
            await services.start(self._run_retention)
            await services.start(self._run_gauges)
            # In band: the listener stops with stop() and drains itself; the sender is
            # cancelled once the reports it could still be handed have been made.
            self.inband_bound = await self._start_inband(services)
            if self.inband_listener is not None:
                await services.start(self._run_continuity)
            if self.webhook is not None:
                await services.start(self._run_webhooks)
            if self.hints is not None:
                await services.start(self._run_hints)
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
                drain_deadline = trio.current_time() + cs.drain_timeout_s
                outer.cancel_scope.deadline = drain_deadline
            if self.inband_sender is not None:
                # The last batches were committed and handed over: send them, within what is
                # left of the drain deadline; what is still queued then is counted.
                with trio.move_on_at(drain_deadline):
                    await self.inband_sender.wait_idle()
                self._inband_unsent_at_stop = self.inband_sender.unsent()
            self._sending_scope.cancel()
            # Webhook deliveries still pending stay in the durable outbox for the next start.
            self._webhook_scope.cancel()
            # Hint lookups only warm a cache: nothing is lost by stopping them now.
            self._hints_scope.cancel()
            # Pruning can stop anywhere: every batch is its own transaction.
            self._retention_scope.cancel()
            # The gauges only read.
            self._gauges_scope.cancel()
            # The periodic save stops; the last one runs once the listener has drained.
            self._continuity_scope.cancel()
            services.cancel_scope.deadline = trio.current_time() + cs.drain_timeout_s
        if self.inband_listener is not None:
            await self._save_continuity()

    async def _decode_loop(
        self,
        batches: trio.MemoryReceiveChannel[DatagramBatch],
        reports: trio.MemorySendChannel[rpt.SignedReport],
    ) -> None:
        async with batches, reports:
            async for batch in batches:
                # (plain lists too: bench/decode_loop.py feeds this loop directly)
                held = (
                    batch.held_bytes
                    if isinstance(batch, DatagramBatch)
                    else sum(len(d.data) for d in batch)
                )
                self._backlog.done(len(batch), held)
                datagrams: Sequence[Datagram] = batch
                if self._allowed_exporters:
                    datagrams = [d for d in batch if self._exporter_allowed(d.exporter)]
                if self._asked_policy is not None:
                    self._use_asked_boost()  # same Sampler object: `sample` stays bound
                for signed in self._decode_batch(datagrams):
                    for report in signed:
                        await reports.send(report)

    @property
    def batch_sampler(self) -> BatchSampler:
        """The array sampler (numpy), made when first needed."""
        if self._batch_sampler is None:
            from overflowd.flowsample_batch import BatchSampler

            self._batch_sampler = BatchSampler(self._batch_policy)
        return self._batch_sampler

    @batch_sampler.setter
    def batch_sampler(self, sampler: BatchSampler) -> None:
        self._batch_policy = sampler.policy
        self._batch_sampler = sampler

    def _batch_statistics(self) -> SamplerStatistics:
        """The array sampler's counts, zeros (as a new one has) while none was made."""
        if self._batch_sampler is not None:
            return self._batch_sampler.statistics()
        return SamplerStatistics(
            records_seen=0,
            records_sampled=0,
            expected_sampled=0.0,
            variance_sampled=0.0,
            packets_seen=0,
            packets_sampled=0,
            certain=0,
            boost_capped=0,
            boosts=MappingProxyType(dict.fromkeys(BOOST_REASONS, 0)),
            reseeds=0,
        )

    def _decode_batch(self, batch: Sequence[Datagram]) -> Iterator[list[rpt.SignedReport]]:
        """Decode, sample and sign ``batch``, yielding the reports of each step as it is made.

        The per-datagram boundary is here: a :class:`DecodeError` is a counted malformed
        datagram, and any other exception (a decoder or policy bug that some input reaches) is
        counted by type, logged rate-limited with the exporter, and costs that one datagram,
        never the daemon. Cancellation is no ``Exception`` and passes through.
        """
        # NetFlow v5 in one vectorized pass (decode and sample), only when the batch holds
        # some (the numpy calls cost ~40 µs a batch); then everything else through
        # decode_template_batch, which decodes the data sets of fixed-length v9/IPFIX
        # templates into arrays (sampled the same way) and the rest datagram by datagram.
        # Records become FlowRows only for what was sampled, except on the scalar path.
        _load_batch_decoders()
        rest: Sequence[int] = range(len(batch))
        signed: list[rpt.SignedReport] = []
        # The collector's batches may keep their payloads in its receive slots: v5 is then
        # read there in place, and only what is passed on becomes bytes (batch[i]).
        slotted = batch if isinstance(batch, DatagramBatch) and batch.block is not None else None
        if slotted is not None:
            has_v5 = slotted.may_hold_v5()
        else:
            has_v5 = b"\x00\x05" in [d.data[:2] for d in batch]
        if has_v5:
            try:
                if slotted is not None and slotted.block is not None:
                    from overflowd.wire.v5_batch import Slots  # numpy is loaded by now

                    slots = Slots(
                        slotted.block, slotted.stride, slotted.lengths or [],
                        slotted.exporters, slotted.received,
                    )  # fmt: skip
                    v5 = decode_v5_batch((), self.decoder, slots=slots)
                else:
                    v5 = decode_v5_batch(
                        [(d.data, d.exporter, d.received) for d in batch], self.decoder
                    )
                for index, exc in v5.errors:
                    self._malformed += 1
                    self._log_malformed(batch[index].exporter, exc)
                rest = v5.passed
                if len(v5):
                    signed = self._sample_batch(v5)
            except Exception as exc:  # the batch path failed: each datagram goes the scalar way
                self._input_error(batch[0].exporter if batch else "-", exc)
                signed = []
            yield signed
        if not rest:
            return
        if slotted is not None:
            batch = slotted.datagrams()  # the rest as bytes, each made once
        if b"\x00\x00\x00\x05" in [batch[i].data[:4] for i in rest]:
            # sFlow v5 likewise: flow samples with raw Ethernet/IP headers into arrays, odd
            # datagrams the scalar way (sflow_batch.py); what is not sFlow is passed on.
            candidates = [batch[i] for i in rest]
            try:
                sf = decode_sflow_batch(
                    [(d.data, d.exporter, d.received) for d in candidates], self.decoder
                )
            except Exception as exc:  # the batch path failed: the scalar way for all
                self._input_error(candidates[0].exporter, exc)
            else:
                yield from self._sample_sflow(sf, candidates)
                rest = [rest[i] for i in sf.passed]
                if not rest:
                    return
        others = [batch[i] for i in rest]
        templated = decode_template_batch(
            [(d.data, d.exporter, d.received) for d in others], self.decoder
        )
        for index, decode_error in templated.errors:
            self._malformed += 1
            self._log_malformed(others[index].exporter, decode_error)
        for index, failure in templated.failures:
            self._input_error(others[index].exporter, failure)
        if len(templated):
            try:
                signed = self._sample_batch(templated)
            except Exception as exc:
                self._input_error(templated.exporters[0], exc)
                signed = []
            yield signed
        for index, records in templated.scalar:
            try:
                signed = self._sign(self.sampler.sample(records))
            except Exception as exc:
                self._input_error(others[index].exporter, exc)
                continue
            yield signed

    def _sample_sflow(
        self, sf: SFlowBatch, datagrams: list[Datagram]
    ) -> Iterator[list[rpt.SignedReport]]:
        """Account for and sample what :func:`decode_sflow_batch` made of ``datagrams``."""
        for index, decode_error in sf.errors:
            self._malformed += 1
            self._log_malformed(datagrams[index].exporter, decode_error)
        for index, failure in sf.failures:
            self._input_error(datagrams[index].exporter, failure)
        if len(sf):
            try:
                if sf.needs_scalar_ipv6(self.batch_sampler.policy):
                    # The batch sampler's prefixes and asked boosts read IPv4 addresses.
                    yield self._sample_batch(sf.ipv4())
                    yield self._sign(self.sampler.sample(sf.ipv6_rows()))
                else:
                    yield self._sample_batch(sf)
            except Exception as exc:
                self._input_error(sf.exporters[0], exc)
        for index, records in sf.scalar:
            try:
                signed = self._sign(self.sampler.sample(records))
            except Exception as exc:
                self._input_error(datagrams[index].exporter, exc)
                continue
            yield signed

    def _sample_batch(
        self, columns: V5Batch | TemplateBatch | SFlowBatch
    ) -> list[rpt.SignedReport]:
        """Sample a batch's arrays; FlowRows and reports only for the records chosen."""
        indices, probabilities = self.batch_sampler.sample(columns)
        if not len(indices):
            return []
        rows = columns.rows(indices)
        return self._sign(list(zip(rows, probabilities.tolist(), strict=True)))

    def _input_error(self, source: str, exc: Exception) -> None:
        """Count an input dropped at a per-input boundary; warn, rate-limited, naming it."""
        name = type(exc).__name__
        if name not in self._input_errors and len(self._input_errors) >= MAX_ERROR_TYPES:
            name = "other"
        self._input_errors[name] += 1
        self._log_malformed(source, exc, unexpected=True)

    def _use_asked_boost(self) -> None:
        """Switch both samplers to the policy with the asked boost, once one is asked for.

        One way: the scalar sampler's policy is replaced (it reads it per call); the batch
        sampler precomputes from its policy, so a new one takes over and the old one's counts
        are kept for :meth:`statistics`.
        """
        if self._asked_policy is None or self.hints is None or not self.hints.boosts_seen:
            return
        policy, self._asked_policy = self._asked_policy, None
        self.sampler.policy = policy
        self._retired_batch = self._batch_statistics()
        self._batch_policy, self._batch_sampler = policy, None  # made on the next batch
        log.info("sampler.asked_boost_on")

    async def _capture_loop(
        self,
        batches: trio.MemoryReceiveChannel[list[FlowRow]],
        reports: trio.MemorySendChannel[rpt.SignedReport],
    ) -> None:
        """Packets the kernel sampled become records like any exporter's, and are sampled again."""
        async with batches, reports:
            async for rows in batches:
                if self._asked_policy is not None:
                    self._use_asked_boost()
                try:
                    signed = self._sign(self.sampler.sample(rows))
                except Exception as exc:  # the per-input boundary, as in _decode_batch
                    self._input_error(f"capture:{len(rows)} rows", exc)
                    continue
                for report in signed:
                    await reports.send(report)

    def _exporter_allowed(self, exporter: str) -> bool:
        """Whether datagrams from ``exporter`` are decoded (collector.allowed_exporters)."""
        if not self._allowed_exporters:
            return True
        verdict = self._exporter_verdicts.get(exporter)
        if verdict is None:
            try:
                address = ipaddress.ip_address(exporter)
            except ValueError:
                verdict = False
            else:
                verdict = any(
                    address.version == net.version and address in net
                    for net in self._allowed_exporters
                )
            if len(self._exporter_verdicts) >= 4096:  # spoofed sources: bounded memory
                self._exporter_verdicts.clear()
            self._exporter_verdicts[exporter] = verdict
        if not verdict:
            self._exporters_refused += 1
            self._refused_exporters.refused(exporter, trio.current_time())
        return verdict

    def _signing_allowance(self, wanted: int) -> float:
        """How many of ``wanted`` sampled records the signing budget covers now, as a real
        number: a flood's steady refill is a fraction of a token per batch, and rounding it
        down would drop whole batches (see :meth:`_thin`)."""
        sm = self.settings.sampling
        now = trio.current_time()
        self._sign_tokens = min(
            float(sm.max_reports_burst),
            self._sign_tokens + (now - self._sign_refilled) * sm.max_reports_per_s,
        )
        self._sign_refilled = now
        allowed = min(float(wanted), self._sign_tokens)
        self._sign_tokens -= allowed
        return allowed

    def _thin(self, sampled: list[tuple[FlowRow, float]]) -> list[tuple[FlowRow, float]]:
        """What the signing budget keeps of ``sampled``, with probabilities that stay true.

        Over budget, the records kept are a uniform random subset whose expected size is the
        allowance ``t`` (``floor(t)`` records, one more with probability ``t - floor(t)``),
        and each kept record is signed with ``p * t / wanted``: the probability that it was
        both sampled and kept. Estimates (sum of n/p) therefore stay unbiased under a flood,
        where taking the first records of a batch (biased to whatever a batch starts with)
        or rounding each batch's fraction of a token down to none (a steady flood signed at
        a fraction of its rate, weighted as if it were all) made them low. The budget is
        charged the expectation ``t``, so it holds on average; the count signed in any
        interval may exceed it by its binomial spread, at most one report per batch.
        """
        wanted = len(sampled)
        allowed = self._signing_allowance(wanted)
        if allowed >= wanted:
            return sampled
        whole = int(allowed)
        keep = whole + (self._thin_rng.random() < allowed - whole)
        self._shed += wanted - keep
        q = allowed / wanted
        chosen = sorted(self._thin_rng.sample(range(wanted), keep))
        return [(sampled[i][0], sampled[i][1] * q) for i in chosen if sampled[i][1] * q > 0.0]

    def _sign(self, sampled: list[tuple[FlowRow, float]]) -> list[rpt.SignedReport]:
        """Sign what the signing budget lets through of ``sampled`` (:meth:`_thin`). Sending
        waits for the store: a report goes out in band only once it is committed (see
        :meth:`_write`)."""
        sampled = self._thin(sampled) if sampled else sampled
        if not sampled:
            return []
        signed = self.maker.make_all(sampled, int(time.time() * 1000))
        for report in signed:
            self._signed += 1
            if self.hints is not None:
                self._warm(report)
            if self._on_report is not None:
                self._on_report(report)
        return signed

    def _log_malformed(self, exporter: str, exc: Exception, *, unexpected: bool = False) -> None:
        """A warning naming the exporter, rate-limited: a flood of garbage must not flood logs."""
        now = trio.current_time()
        if now - self._last_malformed_log < MALFORMED_LOG_INTERVAL_S:
            self._malformed_unlogged += 1
            return
        log.warning(
            "collector.%s exporter=%s reason=%s suppressed_since_last=%d",
            "input_error" if unexpected else "malformed",
            exporter,
            f"{type(exc).__name__}: {str(exc)[:200]}" if unexpected else exc,
            self._malformed_unlogged,
            exc_info=exc if unexpected and log.isEnabledFor(logging.DEBUG) else None,
        )
        self._last_malformed_log = now
        self._malformed_unlogged = 0

    async def _store_writer(self, reports: trio.MemoryReceiveChannel[rpt.SignedReport]) -> None:
        async with reports:
            try:
                while True:
                    try:
                        first = await reports.receive()
                    except trio.EndOfChannel:
                        return
                    batch = [first]
                    try:
                        with trio.move_on_after(STORE_BATCH_WAIT_S):
                            while len(batch) < STORE_BATCH:
                                try:
                                    batch.append(await reports.receive())
                                except trio.EndOfChannel:
                                    break
                    except trio.Cancelled:
                        self._unstored_at_stop += len(batch)
                        raise
                    await self._write(batch)
            except trio.Cancelled:
                # Past the drain deadline: what is still queued was never stored nor sent.
                self._unstored_at_stop += reports.statistics().current_buffer_used
                raise

    def _warm(self, report: rpt.SignedReport) -> None:
        """Look up hints for the ends of a flow we reported (report rate, never per record)."""
        assert self.hints is not None
        flow = report.payload.flow
        for address in (flow.src, flow.dst):
            if self.confinement.refuse(address) is None and self._may_ask_dns(address):
                self.hints.warm(address)

    def _webhook_plan(self, report: rpt.SignedReport, now: float, now_ms: int) -> list[Planned]:
        """The webhook deliveries of ``report``, each with when its first attempt is due.

        URLs the flow's ends publish in DNS (``u=``), for ends inside the confinement and
        already in the hints table, then static endpoints (``webhook.targets`` and
        ``[[webhook.endpoints]]``, by prefix; the operator's own, not governed by the
        confinement). A DNS URL meets the same checks as a static one: its syntax here, and
        the SSRF policy (internal addresses refused) when it is delivered. Webhooks have their
        own budgets (notify.WebhookBudget), not the in-band one: de-duplication per URL and a
        per-prefix bucket that defers the first attempt rather than refusing it. Every
        refusal is counted by reason in the webhook statistics.
        """
        planner = self.webhook_budget
        flow = report.payload.flow
        key = flow_key(flow)
        chosen: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        ws = self.settings.webhook
        if self.hints is not None:
            for address in (flow.src, flow.dst):
                url = self.hints.webhook_url(address)
                if url is None or url in chosen:
                    continue
                refused = self.confinement.refuse(address)
                if refused is not None:
                    planner.drop(refused)
                    continue
                try:
                    if len(url) > outbox.MAX_URL_CHARS:
                        raise DeliveryError("URL too long")
                    target = ssrf.parse_target(url, require_https=ws.require_https)
                    if target.literal is not None:  # a name is checked when it is resolved
                        ssrf.check_address(target.literal, ws.allowed_networks)
                except ssrf.AddressRefused as exc:
                    log.debug("webhook.dns_url_refused url=%s error=%s", url[:200], exc)
                    planner.drop("ssrf")
                    continue
                except DeliveryError as exc:
                    log.debug("webhook.dns_url_refused url=%s error=%s", url[:200], exc)
                    planner.drop("bad_url")
                    continue
                chosen[url] = address
        from_dns = set(chosen)  # counted once planned (the plan may drop them)
        # An IPv4-mapped end is its IPv4 host, as for the confinement and the budgets.
        ends = (normalize(flow.src), normalize(flow.dst))
        for endpoint, nets in self._webhook_endpoints:
            if endpoint.url in chosen:
                continue
            for address in ends:
                if any(address.version == n.version and address in n for n in nets):
                    chosen[endpoint.url] = address
                    break
        planned = []
        for url, address in chosen.items():
            defer_s = planner.plan(url, address, key, now)
            if defer_s is not None:
                planned.append(Planned(report, url, now_ms + math.ceil(defer_s * 1000)))
                self._webhooks_from_dns += url in from_dns
        return planned

    def _count_outbox_full(self, full: Mapping[str, int]) -> None:
        if not full:
            return
        self.webhook_budget.drop("outbox_full", sum(full.values()))
        if self.webhook is None:
            return
        ws = self.settings.webhook
        for url, n in full.items():
            self.webhook.warn_outbox_full(url, n, ws.max_pending_per_url, ws.max_pending)

    async def _write(self, batch: list[rpt.SignedReport]) -> None:
        """Store ``batch`` and its outbox rows in one transaction, then send it in band.

        Nothing leaves the node before its report is committed, so whatever a crash cuts, a
        report that was sent (in band or by webhook) is in the node's own store. A failed
        write is tried again with backoff for as long as it takes: the queue behind it fills,
        the decoder waits, and the collectors shed datagrams, counted. The drain deadline at
        stop is the only thing that gives a batch up (counted, and nothing of it was sent).
        """
        received = int(time.time() * 1000)
        rows = [(r, received, "local") for r in batch]
        now = trio.current_time()
        planned = [p for r in batch for p in self._webhook_plan(r, now, received)]
        ws = self.settings.webhook
        full: dict[str, int] = {}

        def alongside(conn: Connection) -> None:
            full.clear()  # a retried write counts again from scratch
            result = outbox.enqueue_planned_in(
                conn,
                self.store,
                planned,
                now_ms=received,
                max_pending_per_url=ws.max_pending_per_url,
                max_pending=ws.max_pending,
            )
            full.update(result.outbox_full)

        def write() -> int:
            return self.store.add_reports(rows, alongside=alongside if planned else None)

        try:
            new = await self._writer.write(write, reports=len(batch))
        except trio.Cancelled:
            self._unstored_at_stop += len(batch)
            raise
        self._stored += new
        self._duplicate += len(batch) - new
        self._count_outbox_full(full)
        if self.inband_sender is not None:
            for report in batch:
                self.inband_sender.submit(report)  # never blocks; full: counted
        if planned and self.webhook is not None:
            self.webhook.wake()

    def statistics(self) -> NodeStatistics:
        listener = self.inband_listener.statistics() if self.inband_listener else None
        return NodeStatistics(
            collectors=tuple(c.statistics() for c in self.collectors),
            decoder=self.decoder.statistics(),
            sampler=merge_sampler_statistics(
                self.sampler.statistics(),
                merge_sampler_statistics(self._retired_batch, self._batch_statistics())
                if self._retired_batch is not None
                else self._batch_statistics(),
            ),
            malformed_datagrams=self._malformed,
            reports_signed=self._signed,
            reports_stored=self._stored,
            reports_duplicate=self._duplicate,
            store_errors=self._writer.errors,
            exporters_refused=self._exporters_refused,
            reports_shed=self._shed,
            reports_thinned=self._shed,  # every shed record is thinned now (see _thin)
            captures=tuple(c.statistics() for c in self.captures),
            inband_sender=self.inband_sender.statistics() if self.inband_sender else None,
            webhook=self.webhook.statistics() if self.webhook else None,
            inband_listener=listener,
            registry_events=dict(self._events),
            registry_events_unstored=self._events_unstored,
            trust=self.trust_book.statistics(),
            dns=self.registry.statistics() if self.registry else None,
            hints=self.hints.statistics() if self.hints else None,
            webhooks_from_dns=self._webhooks_from_dns,
            input_errors=dict(self._input_errors),
            store_retried_batches=self._writer.retried,
            reports_unstored_at_stop=self._unstored_at_stop,
            inband_unsent_at_stop=self._inband_unsent_at_stop,
            storage=self.retention.statistics(),
            exporters_refused_by=self._refused_exporters.totals(),
            stored_by_via=self._stored_by_via(listener),
            gauges=self.gauges.statistics(),
        )

    def _stored_by_via(self, listener: InbandListenerStatistics | None) -> dict[str, int]:
        """What this daemon newly stored, by ``via``: its own reports, and what it received."""
        via = {"local": self._stored}
        if listener is not None:
            via["udp"] = listener.stored
        return via


def _registry_from(settings: Settings) -> DnsRegistry | None:
    """A DNS registry from ``[registry]``; None (no DNS evidence) when there is no resolver."""
    try:
        return DnsRegistry(settings.registry)
    except DiscoveryError as exc:
        log.warning("registry.no_dns error=%s (received reports get no dns trust)", exc)
        return None
