"""Per-peer latency windows: the last few round trips of one kind, in bounded memory.

A peer's latency is a property of *now*, not of the whole run: a window of the last
:data:`WINDOW` samples (a ring, O(1) memory per peer and kind) gives the median and the worst
of the recent exchanges, and forgets an outage once the peer answers quickly again. Sans-IO:
the services time their exchanges and add the seconds here; scrapes and pages read it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric

#: Samples one window keeps: the last 64 POSTs (or pages, or deliveries) of a peer.
WINDOW = 64


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Of one window: samples held, median and maximum seconds (0 when empty)."""

    count: int
    p50_s: float
    max_s: float


#: The summary of a window that holds no sample yet.
EMPTY = LatencySummary(0, 0.0, 0.0)


class LatencyWindow:
    """The last ``size`` samples (seconds) of one peer and kind; never grows past ``size``."""

    __slots__ = ("_lock", "_samples", "total")

    def __init__(self, size: int = WINDOW) -> None:
        self._samples: deque[float] = deque(maxlen=size)
        self.total = 0  # samples ever added (the window holds the last ``size`` of them)
        # Added to from worker threads (a delivery's answer is recorded in one), read by the
        # scrape's: a copy under the lock is never one mutated mid-iteration.
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        with self._lock:
            self._samples.append(max(0.0, float(seconds)))
            self.total += 1

    def __len__(self) -> int:
        return len(self._samples)

    def summary(self) -> LatencySummary:
        """Median (the lower middle of an even count) and maximum of the window."""
        with self._lock:
            ordered = sorted(self._samples)
        if not ordered:
            return EMPTY
        return LatencySummary(len(ordered), ordered[(len(ordered) - 1) // 2], ordered[-1])


def latency_metrics(name: str, doc: str, by_peer: Mapping[str, LatencySummary]) -> Iterable[Metric]:
    """A summary-like gauge family per peer, ``quantile="0.5"`` and ``"1"`` (the max) of the
    recent window, and ``<name>_window``: samples in it (at most WINDOW). A window, not since
    start, hence gauges and not a Prometheus summary (whose count and sum only grow)."""
    m = GaugeMetricFamily(name, doc, labels=["peer", "quantile"])
    for peer, s in sorted(by_peer.items()):
        if s.count:
            m.add_metric([peer, "0.5"], s.p50_s)
            m.add_metric([peer, "1"], s.max_s)
    yield m
    c = GaugeMetricFamily(f"{name}_window", f"Samples in the window of {name}", labels=["peer"])
    for peer, s in sorted(by_peer.items()):
        c.add_metric([peer], s.count)
    yield c


__all__ = ["EMPTY", "WINDOW", "LatencySummary", "LatencyWindow", "latency_metrics"]


#: The families :func:`latency_of_collectors` reads, and the key each becomes.
FAMILIES = {
    "overflowd_peer_push_rtt_seconds": "push_rtt",
    "overflowd_peer_push_age_seconds": "delivery_age",
    "overflowd_peer_pull_rtt_seconds": "pull_rtt",
}


def latency_of_collectors(collectors: Iterable[object]) -> dict[str, dict[str, float | None]]:
    """Per peer name, the latency windows the node's collectors export (seconds, None when
    the window is empty): ``push_rtt_p50``, ``push_rtt_max``, ``delivery_age_p50``, ... The
    same numbers as /metrics, read from the same collectors."""
    keys = [f"{k}_{q}" for k in FAMILIES.values() for q in ("p50", "max")]
    out: dict[str, dict[str, float | None]] = {}
    for collector in collectors:
        collect = getattr(collector, "collect", None)
        if collect is None:
            continue
        for family in collect():
            key = FAMILIES.get(family.name)
            if key is None:
                continue
            for sample in family.samples:
                peer = sample.labels.get("peer")
                q = {"0.5": "p50", "1": "max"}.get(sample.labels.get("quantile", ""))
                if peer is None or q is None:
                    continue
                out.setdefault(peer, dict.fromkeys(keys))[f"{key}_{q}"] = float(sample.value)
    return out
