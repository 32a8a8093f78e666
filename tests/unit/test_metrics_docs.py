"""Every metric family the daemon can expose is in docs/daemon.md's "What the metrics say"."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from overflowd.config import Settings
from overflowd.identity import NodeIdentity
from overflowd.notify import WebhookSettings
from overflowd.services.collector import CollectorStatistics
from overflowd.services.gauges import StoreGaugeStatistics
from overflowd.services.metrics import ExporterLabels, node_metrics, visibility_metrics
from overflowd.services.node import NodeService
from overflowd.store import Store

DOC = Path(__file__).resolve().parents[2] / "docs" / "daemon.md"


def test_every_family_is_documented_with_its_labels(tmp_path: Path) -> None:
    settings = Settings(webhook=WebhookSettings(targets=(("192.0.2.0/24", "https://x.example/"),)))
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        node = NodeService(NodeIdentity.generate(), settings, store)
        stats = node.statistics()
    assert stats.storage is not None
    stats = dataclasses.replace(
        stats,
        collectors=(CollectorStatistics(1, 1, 0, 0, 0),),
        gauges=StoreGaugeStatistics(outbox={"pending": 0}, store_bytes=1),
        storage=dataclasses.replace(stats.storage, free_bytes=1),  # every optional gauge
    )
    section = DOC.read_text(encoding="utf-8").split("## What the metrics say", 1)[1]
    families = [*node_metrics(stats), *visibility_metrics(stats, ExporterLabels(64))]
    assert len(families) > 60
    for m in families:
        name = m.name + ("_total" if m.type == "counter" else "")
        assert re.search(rf"`{name}[`{{]", section), f"{name} is not in {DOC.name}"
        for label in {k for sample in m.samples for k in sample.labels}:
            row = next(line for line in section.splitlines() if f"`{name}" in line)
            assert f"`{label}" in row, f"{name}: label {label} is not in its row"
