"""The daemon's stop summary: what it took in, stored from every source, sent and refused.

A few ``stopped:`` lines printed by ``overflowd run`` once the node has drained, read from the
same :class:`~overflowd.services.node.NodeStatistics` the metrics render, so the two never
disagree. The first line keeps its old form (scripts read ``stored N``: the node's own
reports); the others are ``key=value``. Drop reasons at zero are left out; totals never are.
"""

from __future__ import annotations

from collections.abc import Mapping

from overflowd.services.inband import LISTENER_DROP_REASONS
from overflowd.services.node import NodeStatistics

__all__ = ["stop_summary"]


def _reasons(counts: Mapping[str, int]) -> str:
    """The total, then ``reason=n`` for each reason counted (in the order given)."""
    parts = [f"{reason}={n}" for reason, n in counts.items() if n]
    return " ".join([f"{sum(counts.values())}", *parts]) if parts else "0"


def stop_summary(s: NodeStatistics) -> list[str]:
    lines = [
        f"stopped: datagrams {sum(c.datagrams for c in s.collectors)} "
        f"records {s.decoder.records} malformed {s.malformed_datagrams} "
        f"sampled {s.sampler.records_sampled} stored {s.reports_stored}"
    ]
    stored = " ".join(f"{via}={n}" for via, n in s.stored_by_via.items())
    lines.append(
        f"stopped: stored {stored} duplicates={s.reports_duplicate} "
        f"unstored_at_stop={s.reports_unstored_at_stop} signed={s.reports_signed} "
        f"shed={s.reports_shed}"
    )
    if s.inband_sender is not None:
        sender = s.inband_sender
        lines.append(
            f"stopped: inband sent={sender.datagrams_sent} not_sent={_reasons(sender.dropped)} "
            f"unsent_at_stop={s.inband_unsent_at_stop}"
        )
    if s.webhook is not None:
        w = s.webhook
        line = (
            f"stopped: webhook delivered={w.delivered} retried={w.retried} dead={w.dead} "
            f"gone={w.gone} refused={w.refused} network_errors={w.network_errors} "
            # What the plan did not enqueue (duplicate, outbox_full...): shed by policy, so
            # said here as in-band's not_sent is, not only in /metrics.
            f"not_enqueued={_reasons(w.dropped)} deferred={w.deferred}"
        )
        if s.gauges is not None and s.gauges.outbox is not None:
            rows = s.gauges.outbox
            line += " outbox " + " ".join(f"{state}={n}" for state, n in rows.items())
        lines.append(line)
    refused = [f"stopped: refused exporters={s.exporters_refused}"]
    if s.inband_listener is not None:
        dropped = s.inband_listener.dropped  # in the documented order, not arrival's
        ordered = {r: dropped.get(r, 0) for r in (*LISTENER_DROP_REASONS, *sorted(dropped))}
        refused.append(f"inband={_reasons(ordered)}")
    if s.storage is not None:
        refused.append(f"storage_budget={_reasons(s.storage.refused)}")
    lines.append(" ".join(refused))
    return lines
