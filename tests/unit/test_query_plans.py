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


def _replayed(
    store: Store, ask: Callable[[], object], *, before: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """The PostgreSQL plans (EXPLAIN ANALYZE, JSON) of every statement on the reports table
    that ``ask`` sends, replayed in one transaction in the order sent, the store's own
    settings statements (its SET LOCALs) included and run as they are; ``before``: statements
    run first, as a server's or role's configuration would be."""
    engine = store._engine
    sent: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        sent.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        ask()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    plans: list[dict[str, Any]] = []
    with engine.connect() as conn, conn.begin():
        for statement in before:
            conn.exec_driver_sql(statement)
        for statement, params in sent:
            if "FROM reports" not in statement:
                conn.exec_driver_sql(statement, params)
                continue
            (plan,) = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, SETTINGS, FORMAT JSON) " + statement, params
            ).one()
            plans.append(plan[0])
    assert plans, "no statement on reports was sent"
    return plans


#: top's ways to its answer: stored keys ranked in SQL (src at /24 and /48, a port), a
#: prefix of whole bytes ranked in SQL, one of part of a byte and by observer ranked in Python
TOP_WAYS: list[dict[str, Any]] = [
    dict(by="src"),
    dict(by="srcport"),
    dict(by="dst", v4_len=16, v6_len=32),
    dict(by="src", v4_len=20, v6_len=36),
    dict(by="observer"),
]


@pytest.mark.parametrize("how", TOP_WAYS, ids=lambda h: "-".join(map(str, h.values())))
def test_top_never_compiles_with_jit(store: Store, how: dict[str, Any]) -> None:
    """A window a little bigger than the bench's hour (41,500 reports: an estimated cost of
    71,000) passes PostgreSQL's jit_above_cost (100,000), and then LLVM compiles the
    expressions first: 378 ms for that hour, which runs in 40 ms without. The store turns JIT
    off for the transaction: here on a server configured to compile everything (a cost
    threshold of 0), where the same statement without the store's settings does compile."""
    if store.backend != "postgresql":
        pytest.skip("JIT is PostgreSQL's")
    with store.transaction("jit?", write=False) as conn:
        if not conn.execute(text("SELECT pg_jit_available()")).scalar_one():
            # nothing can compile there, so there is nothing to check (Debian's server package
            # ships llvmjit on amd64)
            pytest.skip("this PostgreSQL has no JIT provider (llvmjit): JIT cannot fire")
    everything = ("SET LOCAL jit = on", "SET LOCAL jit_above_cost = 0")
    flt = ReportFilter(since_ms=NOW_MS - 30 * DAY_MS)
    for plan in _replayed(store, lambda: top(store, flt, **how), before=everything):
        assert "JIT" not in plan, plan
        assert plan["Settings"]["jit"] == "off"
    # the control: the server as configured compiles this statement, settings left out
    statement, params = _sent_top(store, flt, how)
    with store._engine.connect() as conn, conn.begin():
        for s in everything:
            conn.exec_driver_sql(s)
        (plan,) = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, params).one()
    assert "JIT" in plan[0]


def _sent_top(store: Store, flt: ReportFilter, how: dict[str, Any]) -> tuple[str, Any]:
    """The first statement on the reports table that top sends."""
    sent: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        if "FROM reports" in statement:
            sent.append((statement, params))

    event.listen(store._engine, "before_cursor_execute", capture)
    try:
        top(store, flt, **how)
    finally:
        event.remove(store._engine, "before_cursor_execute", capture)
    return sent[0]


def test_the_reports_table_is_vacuumed_every_thousand_inserts(store: Store) -> None:
    """Revision 0011_q10_visibility: autovacuum vacuums the reports table after 1,000 inserts
    (not 1,000 + 20% of the table), so that the newest hours' pages are all-visible and a
    window's index-only scan reads no table row (the test below)."""
    if store.backend != "postgresql":
        pytest.skip("SQLite has no visibility map")
    with store.transaction("reloptions", write=False) as conn:
        options = conn.execute(
            text("SELECT reloptions FROM pg_class WHERE oid = 'reports'::regclass")
        ).scalar_one()
    assert set(options) >= {
        "autovacuum_vacuum_insert_threshold=1000",
        "autovacuum_vacuum_insert_scale_factor=0",
    }


#: not srcport, dstport, proto: the ports and protocol are not in the covering index (yet), so
#: those read the window's rows from the table
@pytest.mark.parametrize(
    "how",
    [h for h in TOP_WAYS if h["by"] in ("src", "dst", "observer")],
    ids=lambda h: "-".join(map(str, h.values())),
)
def test_top_reads_its_window_from_the_covering_index_alone(
    store: Store, how: dict[str, Any]
) -> None:
    """Every column top reads of a window is in ix_reports_last_ms_covering: once vacuum has
    come by (on PostgreSQL; what 0011_q10_visibility makes autovacuum do soon), no statement
    top sends reads a table row. A column added to top's statements but not to the index
    makes this an Index Scan (SQLite: not a COVERING INDEX)."""
    flt = ReportFilter(since_ms=NOW_MS - DAY_MS)
    if store.backend == "sqlite":
        for plan in _plans(store, lambda: top(store, flt, **how)):
            assert "COVERING INDEX ix_reports_last_ms_covering" in plan, plan
            assert "SCAN reports" not in plan, plan
        return
    with store._engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM reports")
    scans: list[dict[str, Any]] = []

    def walk(node: dict[str, Any]) -> None:
        if node.get("Relation Name") == "reports":
            scans.append(node)
        for child in node.get("Plans", ()):
            walk(child)

    for plan in _replayed(store, lambda: top(store, flt, **how)):
        walk(plan["Plan"])
    assert scans, "no scan of reports"
    for scan in scans:
        assert scan["Node Type"] == "Index Only Scan", scan
        assert scan["Index Name"] == "ix_reports_last_ms_covering", scan
        assert scan["Heap Fetches"] == 0, scan
