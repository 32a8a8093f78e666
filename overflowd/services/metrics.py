"""Prometheus exposition of the node's counters, read from ``statistics()`` snapshots.

Nothing is counted twice: services keep their own counters and this module only renders
snapshots when scraped. prometheus-client serves HTTP from its own thread; :func:`serve_metrics`
shuts that server down when the daemon's nursery ends, so it never outlives the node. A scrape
does no I/O: the store gauges (outbox rows, store size) come from the last read of the periodic
:class:`~overflowd.services.gauges.StoreGauges`. Every family is listed, with its labels, in
docs/daemon.md "What the metrics say" (a unit test holds the two together).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from overflowd.services.collector import OTHER, parse_listen
from overflowd.services.gauges import OUTBOX_GAUGE_STATES
from overflowd.services.inband import LISTENER_DROP_REASONS, SEND_DROP_REASONS
from overflowd.services.node import NodeStatistics
from overflowd.services.retention import RetentionStatistics


class NodeCollector(Collector):
    def __init__(
        self, snapshot: Callable[[], NodeStatistics], *, max_exporter_labels: int = 64
    ) -> None:
        self._snapshot = snapshot
        self._labels = ExporterLabels(max_exporter_labels)

    def collect(self) -> Iterable[Metric]:
        s = self._snapshot()
        yield from node_metrics(s)
        yield from visibility_metrics(s, self._labels)


def _counter(name: str, doc: str, value: float, labels: dict[str, str] | None = None) -> Metric:
    m = CounterMetricFamily(name, doc, labels=list(labels or {}))
    m.add_metric(list((labels or {}).values()), value)
    return m


def _counters_by(name: str, doc: str, label: str, counts: Mapping[str, float]) -> Metric:
    """One counter family with a sample per key of ``counts`` (sorted, for stable output)."""
    m = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(counts.items()):
        m.add_metric([key], value)
    return m


def node_metrics(s: NodeStatistics) -> Iterator[Metric]:
    datagrams = CounterMetricFamily(
        "overflowd_collector_datagrams", "Datagrams received", labels=["socket"]
    )
    dropped = CounterMetricFamily(
        "overflowd_collector_dropped", "Datagrams dropped", labels=["socket", "where"]
    )
    for i, c in enumerate(s.collectors):
        datagrams.add_metric([str(i)], c.datagrams)
        dropped.add_metric([str(i), "queue_full"], c.dropped_queue_full)
        if c.kernel_drops is not None:
            dropped.add_metric([str(i), "kernel"], c.kernel_drops)
        if c.truncated:
            dropped.add_metric([str(i), "truncated"], c.truncated)
    yield datagrams
    yield dropped
    captured = CounterMetricFamily(
        "overflowd_capture_packets", "Packets the kernel sampled and we read", labels=["interface"]
    )
    capture_dropped = CounterMetricFamily(
        "overflowd_capture_dropped", "Sampled packets dropped", labels=["interface", "where"]
    )
    for cap in s.captures:
        captured.add_metric([cap.interface], cap.packets)
        capture_dropped.add_metric([cap.interface, "queue_full"], cap.dropped_queue_full)
        capture_dropped.add_metric([cap.interface, "kernel"], cap.kernel_drops)
        capture_dropped.add_metric([cap.interface, "input_error"], sum(cap.input_errors.values()))
    yield captured
    yield capture_dropped
    d = s.decoder
    yield _counter(
        "overflowd_decoder_datagrams", "Datagrams decoded or refused by the decoder", d.datagrams
    )
    yield _counter("overflowd_decoder_records", "Flow records decoded", d.records)
    yield _counters_by(
        "overflowd_decoder_malformed", "Datagrams refused by the decoder", "reason", d.malformed
    )
    yield _counters_by(
        "overflowd_decoder_defects",
        "Exporter quirks tolerated in datagrams otherwise decoded",
        "reason",
        d.defects,
    )
    yield GaugeMetricFamily("overflowd_decoder_templates", "Templates held", value=d.templates)
    yield GaugeMetricFamily(
        "overflowd_decoder_template_bytes",
        "Estimated bytes of templates held",
        value=d.template_bytes,
    )
    yield _counters_by(
        "overflowd_decoder_templates_dropped",
        "Template announcements not learned",
        "reason",
        d.templates_dropped_by_reason,
    )
    yield _counters_by(
        "overflowd_decoder_templates_evicted",
        "Templates evicted",
        "reason",
        d.templates_evicted_by_reason,
    )
    yield _counters_by(
        "overflowd_decoder_pending_dropped",
        "Data sets dropped waiting for a template, by reason",
        "reason",
        d.pending_dropped_by_reason,
    )
    sm = s.sampler
    yield _counter("overflowd_sampler_records", "Records offered to the sampler", sm.records_seen)
    yield _counter("overflowd_sampler_sampled", "Records sampled for a report", sm.records_sampled)
    yield _counter(
        "overflowd_sampler_expected", "Sum of p: the expected number sampled", sm.expected_sampled
    )
    yield _counter("overflowd_reports_signed", "Reports signed", s.reports_signed)
    yield _counter("overflowd_reports_stored", "Reports newly stored", s.reports_stored)
    yield _counter(
        "overflowd_store_errors", "Store writes that failed (tried again)", s.store_errors
    )
    yield _counter(
        "overflowd_store_retried_batches",
        "Report batches stored after one or more failed tries",
        s.store_retried_batches,
    )
    yield _counter(
        "overflowd_reports_unstored_at_stop",
        "Reports signed but still queued at the drain deadline (neither stored nor sent)",
        s.reports_unstored_at_stop,
    )
    yield _counter(
        "overflowd_inband_unsent_at_stop",
        "Reports stored but not yet sent in band when the drain deadline passed",
        s.inband_unsent_at_stop,
    )
    yield _counters_by(
        "overflowd_input_errors",
        "Inputs dropped after an unexpected exception (a bug some input reaches)",
        "type",
        s.input_errors,
    )
    yield _counter(
        "overflowd_collector_exporter_refused",
        "Datagrams from exporters outside collector.allowed_exporters",
        s.exporters_refused,
    )
    yield _counter(
        "overflowd_reports_shed",
        "Sampled records not signed: over sampling.max_reports_per_s",
        s.reports_shed,
    )
    yield _counter(
        "overflowd_reports_thinned",
        "Of the shed: left out at random, the kept ones signed with a matching probability",
        s.reports_thinned,
    )
    if s.inband_sender is not None:
        yield _counter(
            "overflowd_inband_sent", "Report datagrams sent", s.inband_sender.datagrams_sent
        )
    if s.webhook is not None:
        w = s.webhook
        outcomes = CounterMetricFamily(
            "overflowd_webhook_deliveries", "Webhook delivery outcomes", labels=["outcome"]
        )
        for outcome in (
            "delivered",
            "retried",
            "dead",
            "gone",
            "refused",
            "network_errors",
            "bad_answers",
        ):
            outcomes.add_metric([outcome], getattr(w, outcome))
        yield outcomes
        yield _counter(
            "overflowd_webhook_answers_cut",
            "Webhook answers whose body was over the cap (reading stopped)",
            w.answers_cut,
        )
        waits = CounterMetricFamily(
            "overflowd_webhook_retry_budget_waits",
            "Webhook retries held back: the URL's or host's retry budget was spent",
            labels=["budget"],
        )
        waits.add_metric(["url"], w.retry_budget_url)
        waits.add_metric(["host"], w.retry_budget_host)
        yield waits
        yield _counter(
            "overflowd_webhook_host_busy",
            "Webhook rows given back unsent: their server had max_concurrency_per_host in flight",
            w.host_busy,
        )
        yield _counter(
            "overflowd_webhook_clock_steps",
            "Wall-clock steps seen by webhook delivery",
            w.clock_steps,
        )
        yield _counters_by(
            "overflowd_webhook_unexpected_errors",
            "Unexpected errors delivering one webhook row (each a failed attempt)",
            "type",
            w.unexpected_errors,
        )
        # Webhook batching and its own budgets (#9; webhook-batch's block).
        yield _counter("overflowd_webhook_posts", "Webhook POSTs sent", w.posts)
        yield _counter(
            "overflowd_webhook_batched_reports",
            "Reports carried in webhook POSTs of more than one report",
            w.batched_reports,
        )
        yield _counter(
            "overflowd_webhook_deferred",
            "Webhook deliveries whose first attempt the prefix budget deferred",
            w.deferred,
        )
        yield _counters_by(
            "overflowd_webhook_dropped",
            "Webhook deliveries not enqueued, by reason",
            "reason",
            w.dropped,
        )
        yield _counter(
            "overflowd_webhook_batches_refused",
            "Batches an endpoint refused with a 4xx (it gets one report per POST since)",
            w.batches_refused,
        )
    events = CounterMetricFamily(
        "overflowd_registry_events",
        "Observer events: a new key for a known observer, changed contacts",
        labels=["kind"],
    )
    for kind in ("new_key", "contacts_changed"):
        events.add_metric([kind], s.registry_events.get(kind, 0))
    yield events
    if s.dns is not None:
        yield _counter("overflowd_dns_queries", "DNS questions sent", s.dns.queries)
        yield _counter("overflowd_dns_failures", "DNS questions that failed", s.dns.failures)
        dns_dropped = CounterMetricFamily(
            "overflowd_dns_dropped", "DNS answers or questions not kept", labels=["reason"]
        )
        dns_dropped.add_metric(["answer_too_large"], s.dns.cache.too_large)
        dns_dropped.add_metric(["record_oversized"], s.dns.records_oversized)
        dns_dropped.add_metric(["inflight_refused"], s.dns.inflight_refused)
        yield dns_dropped
        cache_bytes = GaugeMetricFamily(
            "overflowd_dns_cache_bytes", "Estimated bytes the DNS cache holds", labels=["table"]
        )
        cache_bytes.add_metric(["positive"], s.dns.cache.positive_bytes)
        cache_bytes.add_metric(["negative"], s.dns.cache.negative_bytes)
        yield cache_bytes
    if s.inband_listener is not None:
        li = s.inband_listener
        yield _counter("overflowd_inband_received", "Report datagrams received", li.datagrams)
        yield _counter("overflowd_inband_stored", "Received reports newly stored", li.stored)
        yield _counter(
            "overflowd_inband_store_errors",
            "Store writes of received reports that failed (tried again)",
            li.store_errors,
        )
        yield _counter(
            "overflowd_inband_store_retried",
            "Batches of received reports stored after a failed write",
            li.store_retried,
        )
        yield _counter(
            "overflowd_inband_unstored_at_stop",
            "Received reports still unstored at the drain deadline (their budget refunded)",
            li.unstored_at_stop,
        )
        yield _counters_by(
            "overflowd_inband_refused",
            "Received datagrams refused",
            "reason",
            {**dict.fromkeys(LISTENER_DROP_REASONS, 0), **li.dropped},
        )
        yield _counters_by(
            "overflowd_inband_trust", "Received reports by observer trust", "trust", li.trust
        )
        yield _counters_by(
            "overflowd_inband_errors",
            "Unexpected exceptions at the per-datagram boundary (datagram dropped)",
            "type",
            li.errors,
        )
        rl = li.relabel
        yield _counters_by(
            "overflowd_inband_relabelled",
            "Stored reports relabelled after DNS",
            "trust",
            rl.relabelled,
        )
        yield _counters_by(
            "overflowd_inband_relabel_skipped",
            "Stored reports that kept their first label without a DNS answer",
            "reason",
            rl.skipped,
        )
        yield CounterMetricFamily(
            "overflowd_inband_relabel_not_lowered",
            "Stored reports whose relabel answered a weaker label (kept, never lowered)",
            value=rl.not_lowered,
        )
        yield GaugeMetricFamily(
            "overflowd_inband_relabel_waiting", "Stored reports waiting for DNS", value=rl.waiting
        )
    if s.storage is not None:
        yield from storage_metrics(s.storage)


def storage_metrics(st: RetentionStatistics) -> Iterator[Metric]:
    """Storage budgets and retention (docs/storage.md)."""
    reports = GaugeMetricFamily(
        "overflowd_storage_reports", "Reports stored, by kind (own, received)", labels=["kind"]
    )
    stored_bytes = GaugeMetricFamily(
        "overflowd_storage_bytes", "Bytes stored (COSE plus row overhead), by kind", labels=["kind"]
    )
    for kind in sorted(st.reports):
        reports.add_metric([kind], st.reports[kind])
        stored_bytes.add_metric([kind], st.bytes.get(kind, 0))
    yield reports
    yield stored_bytes
    yield _counters_by("overflowd_storage_pruned", "Reports pruned, by reason", "reason", st.pruned)
    yield _counters_by(
        "overflowd_storage_refused",
        "Received reports refused by a storage budget",
        "reason",
        st.refused,
    )
    yield GaugeMetricFamily(
        "overflowd_storage_headroom_short",
        "1 while free space is under the reserve (received reports refused)",
        value=1 if st.headroom_short else 0,
    )
    if st.free_bytes is not None:
        yield GaugeMetricFamily(
            "overflowd_storage_free_bytes", "Free space for the store", value=st.free_bytes
        )
    yield _counter(
        "overflowd_storage_headroom_exhausted",
        "Headroom checks short with no received report left to prune",
        st.headroom_exhausted,
    )
    yield _counter("overflowd_storage_errors", "Retention store calls that failed", st.errors)


# -- visibility: why anything was or was not sent (docs/daemon.md "What the metrics say") ----


class ExporterLabels:
    """Which exporter addresses get a label of their own: the first ``limit`` seen, for the
    life of the process, so every labelled series only ever grows and ``other`` (the sum of
    everyone else) does too. Assigned at scrape time from the tables the services keep (in
    the order they first saw each address), never per datagram."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._labelled: dict[str, None] = {}
        self._lock = threading.Lock()  # scrapes run in the HTTP server's threads

    def assign(self, *tables: Iterable[str]) -> frozenset[str]:
        with self._lock:
            for table in tables:
                for address in table:
                    if len(self._labelled) >= self.limit:
                        break
                    if address != OTHER:
                        self._labelled.setdefault(address, None)
            return frozenset(self._labelled)


def _by_exporter(
    name: str, doc: str, values: Mapping[str, int], labelled: frozenset[str]
) -> Metric:
    """A sample per labelled exporter (zero where this table has none: every family has the
    same label set, so their ratios need no ``or``), and ``other`` for the rest (always)."""
    m = CounterMetricFamily(name, doc, labels=["exporter"])
    for address in sorted(labelled):
        m.add_metric([address], values.get(address, 0))
    m.add_metric([OTHER], sum(n for a, n in values.items() if a not in labelled))
    return m


def exporter_metrics(s: NodeStatistics, labels: ExporterLabels) -> Iterator[Metric]:
    """Per exporter: datagrams looked at, records decoded, datagrams malformed or refused."""
    decoded = s.decoder.exporters
    refused = s.exporters_refused_by
    labelled = labels.assign(decoded, refused)
    datagrams = {a: e.datagrams for a, e in decoded.items()}
    for address, n in refused.items():
        datagrams[address] = datagrams.get(address, 0) + n
    yield _by_exporter(
        "overflowd_exporter_datagrams",
        "Datagrams from the exporter: decoded, malformed or refused (queue drops not included)",
        datagrams,
        labelled,
    )
    yield _by_exporter(
        "overflowd_exporter_records",
        "Flow records decoded from the exporter",
        {a: e.records for a, e in decoded.items()},
        labelled,
    )
    yield _by_exporter(
        "overflowd_exporter_malformed",
        "Datagrams from the exporter that the decoder refused",
        {a: e.malformed for a, e in decoded.items()},
        labelled,
    )
    yield _by_exporter(
        "overflowd_exporter_refused",
        "Datagrams from the exporter refused by collector.allowed_exporters",
        refused,
        labelled,
    )
    yield GaugeMetricFamily(
        "overflowd_exporter_labels",
        "Exporter addresses with a label of their own (metrics.max_exporter_labels at most)",
        value=len(labelled),
    )


def send_metrics(s: NodeStatistics) -> Iterator[Metric]:
    """Messages not sent, by channel and reason; what the daemon stored, by via."""
    dropped = CounterMetricFamily(
        "overflowd_send_dropped",
        "Messages not sent, by channel and reason (per target; shed: reports)",
        labels=["channel", "reason"],
    )
    if s.inband_sender is not None:
        for reason in SEND_DROP_REASONS:
            dropped.add_metric(["inband", reason], s.inband_sender.dropped.get(reason, 0))
    yield dropped
    yield _counters_by(
        "overflowd_stored_reports",
        "Reports this daemon newly stored, by how they came (local: its own; udp: in band)",
        "via",
        s.stored_by_via,
    )


def store_gauge_metrics(s: NodeStatistics) -> Iterator[Metric]:
    """Outbox rows by state and the store's size, as of the gauges' last read."""
    g = s.gauges
    if g is None:
        return
    if g.outbox is not None:
        rows = GaugeMetricFamily(
            "overflowd_webhook_outbox_rows",
            "Webhook outbox rows by state (in_flight: pending rows being sent now)",
            labels=["state"],
        )
        for state in OUTBOX_GAUGE_STATES:
            rows.add_metric([state], g.outbox.get(state, 0))
        yield rows
    if g.store_bytes is not None:
        yield GaugeMetricFamily(
            "overflowd_store_bytes",
            "Bytes the store takes (SQLite file and WAL; PostgreSQL pg_database_size)",
            value=g.store_bytes,
        )
    reads = CounterMetricFamily(
        "overflowd_store_gauge_reads",
        "Reads of the store gauges, by outcome (their values are as of the last ok)",
        labels=["outcome"],
    )
    for outcome, n in (
        ("ok", g.reads),
        ("error", g.errors),
        ("timeout", g.timeouts),
        ("skipped", g.skipped),
    ):
        reads.add_metric([outcome], n)
    yield reads


def visibility_metrics(s: NodeStatistics, labels: ExporterLabels) -> Iterator[Metric]:
    yield from send_metrics(s)
    yield from exporter_metrics(s, labels)
    yield from store_gauge_metrics(s)


@contextlib.contextmanager
def serve_metrics(
    listen: str,
    snapshot: Callable[[], NodeStatistics],
    *,
    max_exporter_labels: int = 64,
    collector: NodeCollector | None = None,
    extra_collectors: Sequence[Collector] = (),
) -> Iterator[Any]:
    """Serve /metrics on ``listen`` for the duration of the ``with`` block.

    ``collector``: the one the node API's /metrics also reads, so both give exporters the same
    labels (an exporter keeps the label it got first).
    """
    if not listen:
        yield None
        return
    host, port = parse_listen(listen)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        collector or NodeCollector(snapshot, max_exporter_labels=max_exporter_labels)
    )
    for extra in extra_collectors:  # the services' own families (peers)
        registry.register(extra)
    server, thread = start_http_server(port, addr=host, registry=registry)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
