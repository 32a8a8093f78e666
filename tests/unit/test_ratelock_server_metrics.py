"""Every Prometheus family ratelockd exposes is in docs/ratelock.md "Metrics", with its labels."""

from __future__ import annotations

import re
from pathlib import Path

from ratelock.server import RatelockMetrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "ratelock.md"


def test_every_family_is_documented_with_its_labels() -> None:
    m = RatelockMetrics()
    m.requests.labels("verify", "ok").inc()
    m.refused.labels("bad_token").inc()
    m.seconds.labels("verify").observe(0.1)
    section = DOC.read_text(encoding="utf-8").split("## Metrics", 1)[1].split("\n## ", 1)[0]
    families = list(m.registry.collect())
    assert len(families) == 12
    for fam in families:
        name = fam.name + ("_total" if fam.type == "counter" else "")
        assert re.search(rf"`{name}`", section), f"{name} is not in {DOC.name}"
        row = next(line for line in section.splitlines() if f"`{name}`" in line)
        for label in {k for s in fam.samples for k in s.labels if k != "le"}:
            assert f"`{label}`" in row, f"{name}: label {label} is not in its row"
