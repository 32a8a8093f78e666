"""Every filter is an indexed query: EXPLAIN (PostgreSQL) / EXPLAIN QUERY PLAN (SQLite) of the
statements find_reports, count_reports, who and top send names the filter's own index.

The store holds a few thousand rows where each filter keeps about 1%, so that a planner
weighing costs prefers an index when it has one (PostgreSQL after ANALYZE, as autovacuum runs
it; SQLite as a node leaves it, without ANALYZE). The rows are inserted through the store's
engine (signed bytes from a small pool): the plans depend on the columns, not the signatures.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest
from sqlalchemy import event, insert, text

from overflowd.identity import NodeIdentity
from overflowd.store import Store, address_to_key
from overflowd.store.models import Base, derived_columns
from overflowd.store.query import ReportFilter, count_reports, find_reports, top, who
from overflowd.store.repository import _report_row
from tests.support.query_reports import BACKENDS
from tests.support.reports import make_payload

ROWS = 4000
DAY_MS = 86_400_000
NOW_MS = 1_800_000_000_000
OBSERVERS = 50
RARE = ipaddress.ip_network("203.0.113.0/24")


@pytest.fixture(scope="module", params=BACKENDS)
def store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('plans') / 'overflowd.db'}"
        with Store.open(url) as s:
            _fill(s)
            yield s
        return
    from tests.conftest import SESSION_DATABASE

    server = request.getfixturevalue("postgres_server")
    request.getfixturevalue("postgres_url")
    with server.schema(SESSION_DATABASE) as url, Store.open(url) as s:
        _fill(s)
        with s.transaction("analyze", write=False) as conn:
            conn.execute(text("ANALYZE reports"))
        yield s


def _fill(store: Store) -> None:
    rng = random.Random(7)
    identity = NodeIdentity.generate()
    pool = [identity.sign_report(make_payload()) for _ in range(20)]
    keys = [rng.randbytes(32) for _ in range(OBSERVERS)]
    rows: list[dict[str, Any]] = []
    for i in range(ROWS):
        signed = pool[i % len(pool)]
        rare = i % 100 == 0  # 1% of rows carry each rare value
        last = NOW_MS - rng.randrange(100 * DAY_MS)
        row = _report_row(signed, last + 5_000, "udp", "unknown")
        dst = RARE.network_address + rng.randrange(256) if rare else _ten(rng)
        row.update(
            id=hashlib.sha256(signed.cose + i.to_bytes(4, "big")).hexdigest(),
            observer_key=keys[i % OBSERVERS],
            kind="rare-kind" if i % 100 == 1 else "flow-seen",
            src=address_to_key(RARE.network_address + 9 if i % 100 == 2 else _ten(rng)),
            dst=address_to_key(dst),
            proto=6 if i % 100 == 3 else 17,
            sport=4444 if i % 100 == 4 else 53,
            dport=4444 if i % 100 == 5 else rng.randrange(10_000, 60_000),
            first_ms=last - rng.randrange(60_000),
            last_ms=last,
            received_ms=last + 5_000,
            trust="pinned" if i % 100 == 6 else "unknown",
            via="local" if i % 100 == 7 else "udp",
            sender_net=None,
            seq=i + 1,
        )
        if row["via"] == "local":
            row["trust"] = None
        rows.append(derived_columns(row))
    with store.transaction("filling", write=True) as conn:
        conn.execute(insert(Base.metadata.tables["reports"]), rows)
        conn.execute(text("UPDATE report_sequence SET last = :n"), {"n": ROWS})


def _ten(rng: random.Random) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(0x0A000000 + rng.getrandbits(24))


def _plans(
    store: Store, ask: Callable[[], object], keep: Callable[[str], bool] = lambda _s: True
) -> list[str]:
    """The plans of every SELECT on the reports table that ``ask`` sends (and ``keep``
    keeps), one text each."""
    engine = store._engine
    sent: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if (
            statement.lstrip().upper().startswith(("SELECT", "WITH"))
            and "FROM reports" in statement
            and keep(statement)
        ):
            sent.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        ask()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    out = []
    prefix = "EXPLAIN QUERY PLAN " if store.backend == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        for statement, params in sent:
            rows = conn.exec_driver_sql(prefix + statement, params).all()
            out.append("\n".join(str(r[-1]) for r in rows))
    assert out, "no statement on reports was sent"
    return out


FILTERS: list[tuple[ReportFilter, tuple[str, ...]]] = [
    (ReportFilter(since_ms=NOW_MS - DAY_MS), ("ix_reports_last_ms_covering",)),
    (ReportFilter(until_ms=NOW_MS - 99 * DAY_MS), ("ix_reports_first_ms",)),
    (ReportFilter(received_since_ms=NOW_MS - DAY_MS), ("ix_reports_received_ms",)),
    (ReportFilter(dst=RARE), ("ix_reports_dst_covering",)),
    (ReportFilter(dst=ipaddress.ip_network("203.0.113.9/32")), ("ix_reports_dst_covering",)),
    (ReportFilter(src=RARE), ("ix_reports_src_last_ms",)),
    (ReportFilter(either=RARE), ("ix_reports_src_last_ms", "ix_reports_dst_covering")),
    (ReportFilter(proto=6), ("ix_reports_proto_last_ms",)),
    (ReportFilter(port=4444), ("ix_reports_sport_last_ms", "ix_reports_dport_last_ms")),
    (ReportFilter(sport=4444), ("ix_reports_sport_last_ms",)),
    (ReportFilter(dport=4444), ("ix_reports_dport_last_ms",)),
    (ReportFilter(kind="rare-kind"), ("ix_reports_kind_last_ms",)),
    (ReportFilter(observers=(bytes(32),)), ("ix_reports_observer_key_received_ms",)),
    (ReportFilter(min_trust="pinned"), ("ix_reports_trust", "ix_reports_via_received_ms")),
]


@pytest.mark.parametrize(
    ("flt", "indexes"), FILTERS, ids=lambda v: "" if isinstance(v, tuple) else None
)
def test_each_filter_uses_its_index(
    store: Store, flt: ReportFilter, indexes: tuple[str, ...]
) -> None:
    for ask in (
        lambda: count_reports(store, flt),
        lambda: find_reports(store, flt),
        lambda: top(store, flt, by="src"),
    ):
        for plan in _plans(store, ask):
            for name in indexes:
                assert name in plan, f"{flt}: {name} not in\n{plan}"


def test_who_of_a_network_in_an_hour_uses_indexes(store: Store) -> None:
    """The issue's own question: every statement of who --dst NET --since 1h is indexed."""
    flt = ReportFilter(dst=RARE, since_ms=NOW_MS - DAY_MS)
    for plan in _plans(store, lambda: who(store, flt)):
        assert "ix_reports_" in plan, plan
        assert "Seq Scan on reports" not in plan and "SCAN reports" not in plan, plan


def test_who_of_a_network_over_a_long_window_reads_the_network_s_index(store: Store) -> None:
    """A victim's whole history (the dashboard's victim view over a day) through its
    destination's covering index, not every report of the window through the time's; and a
    network bigger than the window the other way round. SQLite guesses both ranges alike, so
    query.py counts (capped) which has fewer entries; PostgreSQL plans from its statistics."""
    if store.backend != "sqlite":
        pytest.skip("PostgreSQL chooses from its statistics (the test above: indexed)")
    cases = [
        (ReportFilter(dst=RARE, since_ms=NOW_MS - 100 * DAY_MS), "ix_reports_dst_covering"),
        (
            ReportFilter(dst=ipaddress.ip_network("10.0.0.0/8"), since_ms=NOW_MS - DAY_MS),
            "ix_reports_last_ms_covering",
        ),
    ]
    from overflowd.dashboard.series import victim_series

    for flt, index in cases:
        for ask in (partial(who, store, flt), partial(victim_series, store, flt)):
            # what reads the window (grouped in SQL or, for the series, read into arrays), not
            # the capped counts that chose the index nor the observers' rows
            def reads(s: str) -> bool:
                return not s.lstrip().startswith("SELECT count(*)") and "FROM observers" not in s

            for plan in _plans(store, ask, keep=reads):
                assert f"COVERING INDEX {index}" in plan, (flt, plan)
