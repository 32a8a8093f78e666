"""who's two paths give one answer: the window's rows grouped in numpy (overflowd/store/
window.py, taken from query.WHO_ARRAYS_FROM matching reports: the dashboard's whole-day victim
view) and the SQL GROUP BY (below it), on both backends, over the seeded store and over
stores Hypothesis makes (few sources per observer, so groups of several reports and ties; p
= 1, sampled and forged weights over WEIGHT_CAP; counters at 2**64-1 whose certain sums
overflow 64 bits; IPv4, IPv6 and IPv4-mapped IPv6 sources; prefix lengths that are not whole
bytes). Integers, keys, spans and order must be equal, floating-point sums equal to rounding
(the paths add them in other orders). The victim series, which always reads the window into
arrays, is checked the same way against every report streamed through Tally.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.dashboard import series as series_module
from overflowd.dashboard.series import Series, victim_series
from overflowd.estimate import Estimate, Tally
from overflowd.identity import NodeIdentity
from overflowd.store import Store, query
from overflowd.store.query import ReportFilter, WhoRow, who
from tests.support.query_reports import BACKENDS, BASE_MS, HOUR_MS, Seeded, matches, seeded_store

net = ipaddress.ip_network


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    yield from seeded_store(request, tmp_path_factory, 300, 7)


def both(store: Store, flt: ReportFilter, **kw: Any) -> tuple[list[WhoRow], list[WhoRow]]:
    """who through the arrays (from one matching report) and through SQL (never arrays)."""
    saved = query.WHO_ARRAYS_FROM
    try:
        query.WHO_ARRAYS_FROM = 1
        arrays = who(store, flt, **kw)
        query.WHO_ARRAYS_FROM = 2**62
        grouped = who(store, flt, **kw)
    finally:
        query.WHO_ARRAYS_FROM = saved
    return arrays, grouped


def _flat(e: Estimate) -> list[float]:
    out: list[float] = []
    for i in (e.packets, e.bytes):
        out += [i.estimate, i.low, i.high]
    return out


def _close(a: Estimate, b: Estimate) -> None:
    assert (a.reports, a.certain_reports) == (b.reports, b.certain_reports)
    for x, y in zip(_flat(a), _flat(b), strict=True):
        assert x == y or math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9), (a, b)


def same_answer(arrays: list[WhoRow], grouped: list[WhoRow]) -> None:
    # busiest first; observers whose estimates differ only by rounding may swap
    assert sorted(r.observer_key for r in arrays) == sorted(r.observer_key for r in grouped)
    by_key = {r.observer_key: r for r in grouped}
    for a in arrays:
        g = by_key[a.observer_key]
        assert (a.fingerprint, a.trust, a.contacts, a.point) == (
            g.fingerprint, g.trust, g.contacts, g.point,
        )  # fmt: skip
        assert (a.reports, a.first_ms, a.last_ms) == (g.reports, g.first_ms, g.last_ms)
        _close(a.estimate, g.estimate)
        assert len(a.top_sources) == len(g.top_sources)
        for (ka, ea), (kg, eg) in zip(a.top_sources, g.top_sources, strict=True):
            _close(ea, eg)
            if ka != kg:  # only a tie (to rounding) may rank two networks either way
                assert math.isclose(ea.packets.estimate, eg.packets.estimate, rel_tol=1e-9), (
                    ka,
                    kg,
                )
        assert {k.prefixlen for k, _ in a.top_sources} <= {
            k.prefixlen for k, _ in g.top_sources
        } or not g.top_sources
    points = [r.estimate.packets.estimate for r in arrays]
    assert points == sorted(points, reverse=True)


def series_both(
    store: Store, flt: ReportFilter, now_ms: int | None = None
) -> tuple[Series, Series]:
    """The victim series from the window's arrays and grouped in SQL (the way of a window over
    series.ARRAYS_UP_TO reports)."""
    saved = series_module.ARRAYS_UP_TO
    try:
        arrays = victim_series(store, flt, now_ms=now_ms)
        series_module.ARRAYS_UP_TO = 0
        grouped = victim_series(store, flt, now_ms=now_ms)
    finally:
        series_module.ARRAYS_UP_TO = saved
    return arrays, grouped


def _near(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_near(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is b
    return bool(a == b or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9))


def same_series(a: Series, g: Series) -> None:
    assert (a.bucket_ms, a.starts, a.reports, a.outside_reports) == (
        g.bucket_ms, g.starts, g.reports, g.outside_reports,
    )  # fmt: skip
    assert _near(a.outside_packets, g.outside_packets) and _near(a.outside_bytes, g.outside_bytes)
    assert _near(a.band_packets, g.band_packets) and _near(a.band_bytes, g.band_bytes)
    assert sorted(n for n, _, _ in a.stacks) == sorted(n for n, _, _ in g.stacks)
    grouped = {n: (p, b) for n, p, b in g.stacks}
    for name, p, b in a.stacks:
        if name != "other":  # who is "other" may differ on a tie (to rounding) for 8th place
            assert _near(p, grouped[name][0]) and _near(b, grouped[name][1]), name


FILTERS = [
    ReportFilter(),
    ReportFilter(dst=net("198.51.100.0/24"), since_ms=BASE_MS + HOUR_MS),
    ReportFilter(dst=net("2001:db8:ff::/48")),
    ReportFilter(proto=17, min_trust="continuity"),
    ReportFilter(dst=net("198.51.101.0/24"), until_ms=BASE_MS + HOUR_MS),
    ReportFilter(src=net("203.0.113.0/24")),
    ReportFilter(kind="ddos-suspect", port=53),
]


@pytest.mark.parametrize(
    ("v4_len", "v6_len"), [(24, 48), (20, 36), (0, 0), (32, 128), (25, 100), (8, 64)]
)
@pytest.mark.parametrize("top_sources", [1, 3, 50])
def test_the_arrays_answer_as_sql_on_the_seeded_store(
    seeded: Seeded, v4_len: int, v6_len: int, top_sources: int
) -> None:
    some = (seeded.identities[1].public_key, seeded.identities[2].public_key)
    for flt in [*FILTERS, ReportFilter(observers=some, min_trust="dns")]:
        arrays, grouped = both(
            seeded.store, flt, top_sources=top_sources, v4_len=v4_len, v6_len=v6_len
        )
        assert arrays, flt
        same_answer(arrays, grouped)
        if top_sources == 50:  # every source network: exactly the SQL path's set
            for a, g in zip(
                sorted(arrays, key=lambda r: r.observer_key),
                sorted(grouped, key=lambda r: r.observer_key),
                strict=True,
            ):
                assert {k for k, _ in a.top_sources} == {k for k, _ in g.top_sources}


@pytest.mark.parametrize("now", [None, BASE_MS + 2 * HOUR_MS])
def test_the_series_from_arrays_is_the_grouped_one(seeded: Seeded, now: int | None) -> None:
    for flt in [*FILTERS, ReportFilter(since_ms=BASE_MS + HOUR_MS, until_ms=BASE_MS + 3 * HOUR_MS)]:
        arrays, grouped = series_both(seeded.store, flt, now)
        assert arrays.reports + arrays.outside_reports > 0 or not arrays.stacks, flt
        same_series(arrays, grouped)


def test_the_arrays_are_taken_from_the_threshold(seeded: Seeded, monkeypatch: Any) -> None:
    """A short window groups in SQL; from WHO_ARRAYS_FROM matching reports, in numpy (its
    statements name no GROUP BY)."""
    from sqlalchemy import event

    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement.upper())

    engine = seeded.store._engine
    flt = ReportFilter()
    count = len([r for r in seeded.reports if matches(r, flt)])
    event.listen(engine, "before_cursor_execute", seen)
    try:
        for threshold, grouped in ((count + 1, True), (count, False)):
            monkeypatch.setattr(query, "WHO_ARRAYS_FROM", threshold)
            statements.clear()
            who(seeded.store, flt)
            assert any("GROUP BY" in s for s in statements) == grouped, statements
    finally:
        event.remove(engine, "before_cursor_execute", seen)


# -- varied stores -----------------------------------------------------------------------------

IDENTITIES = [NodeIdentity.generate() for _ in range(3)]
#: few sources, so that an observer's reports share networks (groups of several, ties)
SOURCES = [
    "192.0.2.1", "192.0.2.200", "192.0.3.7", "10.1.2.3", "2001:db8:1::5", "2001:db8:1:8000::1",
    "2001:db8:2::1", "::ffff:192.0.2.1",
]  # fmt: skip
PROBABILITIES = [1.0, 0.5, 0.25, 1e-3, 5e-324]
COUNTS = [0, 1, 3, 1000, 2**53 + 1, 2**64 - 1]

reports = st.lists(
    st.tuples(
        st.integers(0, len(IDENTITIES) - 1),
        st.sampled_from(SOURCES),
        st.integers(0, 255),  # the destination's last byte
        st.sampled_from(COUNTS),
        st.sampled_from(PROBABILITIES),
        st.sampled_from([1, 1, 1000]),
        st.integers(0, 6 * HOUR_MS),
    ),
    min_size=1,
    max_size=24,
)
_counter = itertools.count()


def _store_example(store: Store, rows: list[tuple[Any, ...]]) -> ipaddress.IPv4Network:
    """Store the example's reports about a /24 of their own (the store is shared by the
    examples; each asks about its own destination)."""
    n = next(_counter)
    dst = ipaddress.IPv4Network(f"100.{64 + n // 256 % 64}.{n % 256}.0/24")
    batch = []
    for who_i, src, last_byte, packets, p, interval, at in rows:
        source = ipaddress.ip_address(src)
        target = dst.network_address + last_byte
        if source.version == 6:
            target = ipaddress.IPv6Address(f"2001:db8:ff:{n % 65536:x}::{last_byte:x}")
        last = BASE_MS + at
        payload = rpt.Payload(
            kind="flow-seen",
            nonce=next(_counter).to_bytes(rpt.NONCE_BYTES, "big"),
            time=last + 1000,
            observer=rpt.Observer(contacts=(f"mailto:abuse@o{who_i}.example",), point="p"),
            flow=rpt.Flow(
                src=source,
                dst=target,
                sport=53,
                dport=80,
                proto=17,
                packets=packets,
                bytes=min(packets * 700, 2**64 - 1),
                first=last - 5000,
                last=last,
                tcp_flags=0,
                tos=0,
            ),
            sampling=rpt.Sampling(probability=p, format="netflow-v5", interval=interval),
        )
        batch.append((IDENTITIES[who_i].sign_report(payload), last + 2000, "udp"))
    store.add_reports(batch)
    return dst


@pytest.fixture(scope="module", params=BACKENDS)
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('arrays') / 'overflowd.db'}"
        with Store.open(url) as store:
            yield store
        return
    from tests.conftest import SESSION_DATABASE

    server = request.getfixturevalue("postgres_server")
    request.getfixturevalue("postgres_url")
    with server.schema(SESSION_DATABASE) as url, Store.open(url) as store:
        yield store


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=reports, lengths=st.sampled_from([(24, 48), (20, 36), (32, 128), (0, 0)]))
@example(  # two saturated certain counters: their sum is over 64 bits
    rows=[(0, "192.0.2.1", 1, 2**64 - 1, 1.0, 1000, 0), (0, "192.0.2.1", 2, 2**64 - 1, 1.0, 1, 5)],
    lengths=(24, 48),
)
@example(  # ties: one network's reports added in another order
    rows=[(1, "192.0.2.1", 1, 3, 0.25, 1, 0), (1, "192.0.2.200", 1, 1, 0.25, 1, 1),
          (1, "192.0.2.200", 2, 2, 0.25, 1, 2), (1, "192.0.3.7", 3, 3, 0.25, 1, 3)],
    lengths=(24, 48),
)  # fmt: skip
def test_the_arrays_answer_as_sql_on_varied_stores(
    shared: Store, rows: list[tuple[Any, ...]], lengths: tuple[int, int]
) -> None:
    dst = _store_example(shared, rows)
    v6 = {src for _, src, *_ in rows if ":" in src}
    filters = [ReportFilter(dst=dst)]
    if v6:
        filters.append(ReportFilter(src=net("::/0"), received_since_ms=0))
    for flt in filters:
        arrays, grouped = both(shared, flt, v4_len=lengths[0], v6_len=lengths[1])
        same_answer(arrays, grouped)
    # the series reads the same window into arrays: drawn + outside is who's total, and the
    # series is what grouping in SQL gives
    whole = who(shared, ReportFilter(dst=dst), top_sources=0)
    from_arrays, in_sql = series_both(shared, ReportFilter(dst=dst), BASE_MS + 3 * HOUR_MS)
    same_series(from_arrays, in_sql)
    series = victim_series(shared, ReportFilter(dst=dst))
    assert series.reports + series.outside_reports == sum(r.reports for r in whole)
    total = sum(r.estimate.packets.estimate for r in whole)
    if math.isfinite(total):
        drawn = sum(sum(p) for _, p, _ in series.stacks) * series.bucket_ms / 1000
        assert math.isclose(drawn + series.outside_packets, total, rel_tol=1e-9, abs_tol=1e-9)


def test_a_tally_of_the_window_is_what_the_arrays_add(seeded: Seeded) -> None:
    """The arrays' per-observer sums are each report streamed through Tally (the reference
    of test_query_who_top.py, here for the arrays path alone)."""
    flt = ReportFilter(dst=net("198.51.100.0/24"))
    arrays, _ = both(seeded.store, flt)
    for row in arrays:
        mine = [r for r in seeded.reports if matches(r, flt) and r.observer_key == row.observer_key]
        t = Tally()
        for r in mine:
            t.add(r.packets, r.bytes, r.probability, r.sampling_interval)
        assert row.reports == t.reports
        assert row.estimate.packets.estimate == pytest.approx(t.estimate().packets.estimate)
