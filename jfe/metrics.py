"""Prometheus families for jfe, from `Proxy.statistics()` (and the certificate source's).

jfe writes them in the text exposition format to ``<home>/jfe/metrics.prom`` (for
node_exporter's textfile collector) every ``status_interval_s``. Every family is listed in
docs/jfe.md "Metrics" (tests/unit/test_jfe_config.py checks it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jfe.proxy import ProxyStatistics


def families(stats: ProxyStatistics, certificates: Any = None) -> list[Metric]:
    """One snapshot as metric families (pure: tests read it without a registry)."""
    out: list[Metric] = []
    open_ = GaugeMetricFamily("jfe_connections_open", "Client connections open now")
    open_.add_metric([], stats.open_connections)
    out.append(open_)
    accepted = CounterMetricFamily(
        "jfe_connections", "Connections accepted, by port", labels=["port"]
    )
    tls = CounterMetricFamily(
        "jfe_tls_handshakes", "TLS handshakes completed, by port", labels=["port"]
    )
    passed = CounterMetricFamily(
        "jfe_passthroughs",
        "Plain pass-through connections, by port and who spoke first",
        labels=["port", "first"],
    )
    dropped = CounterMetricFamily(
        "jfe_dropped", "Connections dropped, by port and reason", labels=["port", "reason"]
    )
    for port, p in stats.ports.items():
        accepted.add_metric([str(port)], p.accepted)
        tls.add_metric([str(port)], p.tls)
        passed.add_metric([str(port), "client"], p.passthrough_client_first)
        passed.add_metric([str(port), "server"], p.passthrough_server_first)
        for reason, n in sorted(p.dropped.items()):
            dropped.add_metric([str(port), reason], n)
    out += [accepted, tls, passed, dropped]
    moved = CounterMetricFamily("jfe_bytes", "Bytes copied, by direction", labels=["direction"])
    moved.add_metric(["to_upstream"], stats.bytes_to_upstream)
    moved.add_metric(["to_client"], stats.bytes_to_client)
    out.append(moved)
    challenges = CounterMetricFamily("jfe_acme_challenges", "ACME tls-alpn-01 validations answered")
    challenges.add_metric([], stats.acme_challenges)
    out.append(challenges)
    cpu = CounterMetricFamily("jfe_cpu_seconds", "CPU time of the jfe process since start")
    cpu.add_metric([], stats.cpu_seconds)
    out.append(cpu)
    if certificates is not None:
        granted = CounterMetricFamily("jfe_certificates_granted", "Certificates issued")
        granted.add_metric([], getattr(certificates, "granted", 0))
        refused = CounterMetricFamily(
            "jfe_certificates_refused", "Certificate requests refused, by reason", labels=["reason"]
        )
        for reason, n in sorted(dict(getattr(certificates, "refused", {}) or {}).items()):
            refused.add_metric([str(reason)], n)
        out += [granted, refused]
    return out


class _Snapshot(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self._metrics


def exposition(stats: ProxyStatistics, certificates: Any = None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families(stats, certificates)))
    return generate_latest(registry)
