"""The refused-exporter table: one warning per exporter per interval with the count since the
last, bounded however many (spoofed) sources are refused. The clock is passed in."""

from __future__ import annotations

import logging

import pytest

from overflowd.services.collector import RefusedExporters


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    out = [r.getMessage() for r in caplog.records if "exporter_refused" in r.getMessage()]
    caplog.clear()
    return out


def test_one_line_per_exporter_per_interval_with_the_count_since_the_last(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    table = RefusedExporters(interval_s=60)
    table.refused("192.0.2.1", 0.0)
    assert lines(caplog) == [
        "collector.exporter_refused exporter=192.0.2.1 datagrams=1 interval_s=60 "
        "reason=not_in_allowed_exporters"
    ]
    for t in (1.0, 2.0, 59.9):
        table.refused("192.0.2.1", t)
    table.refused("192.0.2.2", 30.0)  # another exporter has its own interval
    assert [x.split()[1] for x in lines(caplog)] == ["exporter=192.0.2.2"]
    table.refused("192.0.2.1", 60.0)
    assert lines(caplog) == [
        "collector.exporter_refused exporter=192.0.2.1 datagrams=4 interval_s=60 "
        "reason=not_in_allowed_exporters"
    ]
    assert dict(table.totals()) == {"192.0.2.1": 5, "192.0.2.2": 1}
    assert table.lines == 3


def test_a_flood_of_sources_costs_a_bounded_table_and_one_line_an_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    table = RefusedExporters(max_tracked=4, interval_s=60)
    for i in range(10_000):
        table.refused(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", i / 1000)
    totals = table.totals()
    assert len(totals) == 5 and totals["other"] == 10_000 - 4  # 4 tracked, then "other"
    assert sum(totals.values()) == 10_000
    got = lines(caplog)  # 10 s of flood: within one interval
    assert len(got) == 5  # four exporters and one line for all the others
    assert "exporter=other last=10.0.0.4 datagrams=1 " in got[-1]
    table.refused("192.0.2.9", 70.0)  # the next interval: the others' count since
    assert "exporter=other last=192.0.2.9 datagrams=9996 " in lines(caplog)[0]
