"""CounterHistory: the node's counters sampled every 10 s into a bounded ring, for the
dashboard's line charts of the last hour.

A service of its own, composed in ``overflowd run`` beside the node (not methods on it): it
reads the same ``statistics()`` snapshot the Prometheus collector renders (no I/O, no lock),
keeps :data:`POINTS` samples of a few dozen numbers (a few hundred KiB at most) and turns
them into per-second rates when a page asks. Counters only grow; a rate between two samples
is their difference over the time between them (a restart empties the ring, so there is no
reset to handle). The per-exporter series are bounded: the first :data:`MAX_EXPORTERS`
exporters seen get a series of their own, the rest are added into ``other``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import trio

if TYPE_CHECKING:
    from overflowd.services.node import NodeStatistics

log = logging.getLogger(__name__)

#: One sample per this many seconds, this many kept: the last hour.
INTERVAL_S = 10.0
POINTS = 360
#: Exporters with a series of their own (the rest: "other"), as metrics.max_exporter_labels.
MAX_EXPORTERS = 8
OTHER = "other"

Kind = Literal["rate", "gauge", "ratio"]


@dataclass(frozen=True)
class Chart:
    """One line chart of the Node page: which sampled numbers, drawn how.

    ``rate``: counters as per-second rates; ``gauge``: values as sampled; ``ratio``: the rate
    of ``series[0]`` over the rate of ``series[1]`` (a hit rate), one line.
    """

    key: str
    title: str
    unit: str
    kind: Kind
    #: sampled names (exact), or a prefix ending in ':' for a family (per exporter, reason)
    series: tuple[str, ...]


CHARTS = (
    Chart("ingest", "Ingest: records per exporter", "records/s", "rate", ("records:",)),
    Chart("refused", "Ingest: malformed and refused datagrams", "datagrams/s", "rate",
          ("malformed", "refused")),
    Chart("sampling", "Sampled and signed", "reports/s", "rate", ("sampled", "signed")),
    Chart("sent", "Sent in band and by webhook", "messages/s", "rate",
          ("sent:inband", "sent:webhook")),
    Chart("drops", "Drops by reason", "per s", "rate", ("drop:",)),
    Chart("outbox", "Webhook outbox depth and dead letters", "rows", "gauge",
          ("outbox:pending", "outbox:dead")),
    Chart("dns", "DNS lookups and questions", "per s", "rate", ("dns:lookups", "dns:queries")),
    Chart("dns_hits", "DNS cache hit rate", "share", "ratio", ("dns:cache_hits", "dns:lookups")),
)  # fmt: skip


class ExporterNames:
    """Bounded names for exporters: the first MAX_EXPORTERS seen keep theirs, then "other"."""

    def __init__(self, limit: int = MAX_EXPORTERS) -> None:
        self._limit = limit
        self._names: dict[str, str] = {}

    def name(self, address: str) -> str:
        found = self._names.get(address)
        if found is None:
            found = address if len(self._names) < self._limit else OTHER
            if found != OTHER:
                self._names[address] = found
        return found


def sample_of(s: NodeStatistics, exporters: ExporterNames) -> dict[str, float]:
    """The numbers the charts draw, from one node snapshot: cumulative counters and gauges."""
    out: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        out[name] = out.get(name, 0.0) + float(value)

    for address, e in sorted(s.decoder.exporters.items()):
        add(f"records:{exporters.name(address)}", e.records)
    add("malformed", sum(s.decoder.malformed.values()))
    add("refused", s.exporters_refused)
    add("sampled", s.sampler.records_sampled)
    add("signed", s.reports_signed)
    add("drop:shed", s.reports_shed)
    add("sent:inband", s.inband_sender.datagrams_sent if s.inband_sender else 0)
    add("sent:webhook", s.webhook.delivered if s.webhook else 0)
    if s.inband_sender is not None:
        for reason, n in s.inband_sender.dropped.items():
            add(f"drop:{'shed' if reason == 'shed' else 'inband_' + reason}", n)
    if s.webhook is not None:
        for reason, n in s.webhook.dropped.items():
            add(f"drop:webhook_{reason}", n)
        add("drop:webhook_dead", s.webhook.dead)
        add("drop:webhook_refused", s.webhook.refused)
    outbox = s.gauges.outbox if s.gauges is not None else None
    add("outbox:pending", (outbox or {}).get("pending", 0))
    add("outbox:dead", (outbox or {}).get("dead", 0))
    if s.dns is not None:
        add("dns:lookups", s.dns.lookups)
        add("dns:queries", s.dns.queries)
        add("dns:cache_hits", s.dns.cache_hits)
    return out


@dataclass(frozen=True)
class Line:
    name: str
    #: (unix seconds, value); None where a rate cannot be had (the first point, a ratio of 0)
    points: tuple[tuple[float, float | None], ...]


class CounterRing:
    """The sans-IO core: samples in, chart lines out."""

    def __init__(self, points: int = POINTS) -> None:
        self._ring: deque[tuple[float, dict[str, float]]] = deque(maxlen=points)

    def add(self, t_s: float, sample: Mapping[str, float]) -> None:
        self._ring.append((t_s, dict(sample)))

    def __len__(self) -> int:
        return len(self._ring)

    def latest(self) -> tuple[float, dict[str, float]] | None:
        return self._ring[-1] if self._ring else None

    def names(self, chart: Chart) -> list[str]:
        """The sampled names a chart draws (a family's members as they appear)."""
        seen: dict[str, None] = {}
        every: dict[str, None] = {}
        for _, sample in self._ring:
            every.update(dict.fromkeys(sample))
        for name in every:
            if any(name == s or (s.endswith(":") and name.startswith(s)) for s in chart.series):
                seen.setdefault(name, None)
        if chart.kind != "ratio":
            order = {s: i for i, s in enumerate(chart.series)}
            return sorted(seen, key=lambda n: (order.get(n, len(order)), n))
        return list(seen)

    def lines(self, chart: Chart) -> list[Line]:
        ring = list(self._ring)
        if chart.kind == "gauge":
            return [Line(n, tuple((t, s.get(n, 0.0)) for t, s in ring)) for n in self.names(chart)]
        if chart.kind == "rate":
            return [Line(n, tuple(_rates(ring, n))) for n in self.names(chart)]
        top, bottom = chart.series
        hits, asked = list(_rates(ring, top)), list(_rates(ring, bottom))
        points = tuple(
            (t, None if h is None or not a else min(1.0, h / a))
            for (t, h), (_, a) in zip(hits, asked, strict=True)
        )
        return [Line("hit rate", points)]

    def current(self, chart: Chart) -> dict[str, float | None]:
        """Each line's last value (the number beside the chart)."""
        return {
            line.name: line.points[-1][1] if line.points else None for line in self.lines(chart)
        }


def _rates(
    ring: list[tuple[float, dict[str, float]]], name: str
) -> Iterator[tuple[float, float | None]]:
    previous: tuple[float, float] | None = None
    for t, sample in ring:
        value = sample.get(name, 0.0)
        if previous is None or t <= previous[0]:
            yield t, None
        else:
            yield t, max(0.0, value - previous[1]) / (t - previous[0])
        previous = (t, value)


class CounterHistory:
    """The service: ``await nursery.start(history.run)``, ``stop()``; the dashboard reads
    ``ring``."""

    def __init__(
        self,
        snapshot: Callable[[], NodeStatistics],
        *,
        interval_s: float = INTERVAL_S,
        points: int = POINTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._snapshot = snapshot
        self._interval_s = interval_s
        self._clock = clock
        self._exporters = ExporterNames()
        self.ring = CounterRing(points)
        self.errors = 0
        self._stop = trio.Event()

    def now(self) -> dict[str, float]:
        """The numbers as of this moment (the Node page's table), not the last sample's."""
        return sample_of(self._snapshot(), self._exporters)

    def sample(self) -> None:
        """Take one sample now (also the first one at start, so a page has a point at once)."""
        try:
            self.ring.add(self._clock(), sample_of(self._snapshot(), self._exporters))
        except Exception as exc:  # a snapshot bug must not end the node: counted, logged once
            self.errors += 1
            if self.errors == 1:
                log.warning("dashboard.history_error error=%s", str(exc)[:200])

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.sample()
        task_status.started()
        while not self._stop.is_set():
            with trio.move_on_after(self._interval_s):
                await self._stop.wait()
            if not self._stop.is_set():
                self.sample()

    def stop(self) -> None:
        self._stop.set()


__all__ = ["CHARTS", "Chart", "CounterHistory", "CounterRing", "Line", "sample_of"]
