"""who and top: SQL GROUP BY sums against every report streamed through Tally/TopN in Python.

Same store, same filter, both backends: the estimates (points and 95% intervals, packets and
bytes), counts, spans, top source prefixes and "other" must agree to rounding (the database
adds floats in its own order). Prefix lengths that are not whole bytes, IPv6, and forged
counters that would overflow a 64-bit sum are covered too.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, select

from overflowd import report as rpt
from overflowd.estimate import Estimate, Tally, TopN, prefix_key
from overflowd.identity import NodeIdentity
from overflowd.store import Store, StoredReport, query
from overflowd.store.query import ReportFilter, top, who
from tests.support.query_reports import BACKENDS, BASE_MS, HOUR_MS, Seeded, matches, seeded_store
from tests.support.reports import make_payload

net = ipaddress.ip_network


SEED = 5


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    yield from seeded_store(request, tmp_path_factory, 300, SEED)


def _tally(reports: Iterable[StoredReport]) -> Tally:
    t = Tally()
    for r in reports:
        t.add(r.packets, r.bytes, r.probability, r.sampling_interval)
    return t


def _flat(e: Estimate) -> list[float]:
    out: list[float] = [e.reports, e.certain_reports]
    for i in (e.packets, e.bytes):
        out += [i.estimate, i.low, i.high if math.isfinite(i.high) else -1.0]
    return out


def _same(a: Estimate, b: Estimate) -> None:
    assert _flat(a) == pytest.approx(_flat(b), rel=1e-9, abs=1e-9)


def _units(s: Seeded, key: bytes) -> tuple[float | None, float | None]:
    """An observer's unit: the largest weights of all its stored reports (docs/estimates.md)."""
    t = _tally(r for r in s.reports if r.observer_key == key)
    return t.packets_unit, t.bytes_unit


def _all_units(s: Seeded, keys: Iterable[bytes]) -> tuple[float | None, float | None]:
    """The largest unit of these observers: top's unit for groups of several observers."""
    units = [_units(s, k) for k in keys]
    packets = [u for u, _ in units if u is not None]
    octets = [b for _, b in units if b is not None]
    return (max(packets) if packets else None, max(octets) if octets else None)


FILTERS = [
    ReportFilter(),
    ReportFilter(dst=net("198.51.100.0/24"), since_ms=BASE_MS + HOUR_MS),
    ReportFilter(dst=net("2001:db8:ff::/48")),
    ReportFilter(proto=17, min_trust="continuity"),
    ReportFilter(dst=net("198.51.101.0/24"), until_ms=BASE_MS + HOUR_MS),
]


@pytest.mark.parametrize(("v4_len", "v6_len"), [(24, 48), (20, 36), (0, 0), (32, 128)])
def test_who_equals_streaming_every_report(seeded: Seeded, v4_len: int, v6_len: int) -> None:
    s = seeded
    latest = {}
    for r in sorted(s.reports, key=lambda r: (r.received_ms, r.seq)):
        latest[r.observer_key] = r
    for flt in FILTERS if (v4_len, v6_len) == (24, 48) else FILTERS[:2]:
        rows = who(s.store, flt, v4_len=v4_len, v6_len=v6_len)
        match = [r for r in s.reports if matches(r, flt)]
        keys = {r.observer_key for r in match}
        assert [row.observer_key for row in rows] != [] or not keys
        assert {row.observer_key for row in rows} == keys
        points = [row.estimate.packets.estimate for row in rows]
        assert points == sorted(points, reverse=True)
        for row in rows:
            mine = [r for r in match if r.observer_key == row.observer_key]
            unit, byte_unit = _units(s, row.observer_key)
            _same(row.estimate, _tally(mine).estimate(unit=unit, byte_unit=byte_unit))
            assert row.reports == len(mine)
            assert row.first_ms == min(r.first_ms for r in mine)
            assert row.last_ms == max(r.last_ms for r in mine)
            assert row.fingerprint == rpt.key_fingerprint(row.observer_key)
            last = latest[row.observer_key]
            assert row.trust == last.trust
            payload = last.signed_report().payload
            assert row.contacts == payload.observer.contacts
            assert row.point == payload.observer.point
            by_prefix: dict[Any, Tally] = {}
            for r in mine:
                by_prefix.setdefault(prefix_key(r.src, v4_len, v6_len), Tally()).add(
                    r.packets, r.bytes, r.probability, r.sampling_interval
                )
            ref: TopN[Any] = TopN()
            for k in sorted(by_prefix, key=lambda n: (n.version, n.network_address.packed)):
                ref.add_tally(k, by_prefix[k])
            want = ref.result(3, unit=unit, byte_unit=byte_unit).top
            assert [k for k, _ in row.top_sources] == [k for k, _ in want]
            for (_, got_e), (_, want_e) in zip(row.top_sources, want, strict=True):
                _same(got_e, want_e)
            for k, _ in row.top_sources:
                assert k.prefixlen == (v4_len if k.version == 4 else v6_len)


def _key(by: str, r: StoredReport, v4_len: int, v6_len: int) -> Any:
    if by == "observer":
        return r.observer_key
    if by in ("src", "dst"):
        return prefix_key(getattr(r, by), v4_len, v6_len)
    return {"srcport": r.sport, "dstport": r.dport, "proto": r.proto}[by]


def _order(k: Any) -> Any:
    if isinstance(k, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return (k.version, k.network_address.packed)
    return k


@pytest.mark.parametrize(
    ("by", "v4_len", "v6_len", "measure"),
    [
        ("src", 24, 48, "packets"),
        ("dst", 24, 48, "bytes"),
        ("src", 12, 40, "packets"),
        ("dst", 32, 128, "packets"),
        ("srcport", 24, 48, "packets"),
        ("dstport", 24, 48, "bytes"),
        ("proto", 24, 48, "packets"),
        ("observer", 24, 48, "packets"),
    ],
)
def test_top_equals_streaming_every_report(
    seeded: Seeded, by: str, v4_len: int, v6_len: int, measure: str
) -> None:
    _check_top(seeded, by, v4_len, v6_len, measure)


def _check_top(s: Seeded, by: str, v4_len: int, v6_len: int, measure: str) -> None:
    for flt in (FILTERS[0], FILTERS[1], FILTERS[3]):
        units = {k: _units(s, k) for k in {r.observer_key for r in s.reports}}
        match = [r for r in s.reports if matches(r, flt)]
        groups: dict[Any, Tally] = {}
        for r in match:
            groups.setdefault(_key(by, r, v4_len, v6_len), Tally()).add(
                r.packets, r.bytes, r.probability, r.sampling_interval
            )
        ref: TopN[Any] = TopN()
        for k in sorted(groups, key=_order):
            ref.add_tally(k, groups[k])
        if by == "observer":
            want = ref.result(4, by=measure, unit_of=units.__getitem__)  # type: ignore[arg-type]
        else:
            unit, byte_unit = _all_units(s, {r.observer_key for r in s.reports})
            want = ref.result(4, by=measure, unit=unit, byte_unit=byte_unit)  # type: ignore[arg-type]
        got = top(s.store, flt, by=by, n=4, v4_len=v4_len, v6_len=v6_len, measure=measure)  # type: ignore[arg-type]
        assert [k for k, _ in got.top] == [k for k, _ in want.top]
        for (_, a), (_, b) in zip(got.top, want.top, strict=True):
            _same(a, b)
        assert (got.other is None) == (want.other is None)
        if got.other is not None and want.other is not None:
            _same(got.other, want.other)
        assert got.groups == len(groups)
        assert got.folded == 0
        assert sum(e.reports for _, e in got.rows()) == len(match)


def _statements(store: Store) -> list[str]:
    """The statements on the reports table sent from now on (appended as they are sent)."""
    sent: list[str] = []

    def capture(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        if "FROM reports" in statement:
            sent.append(statement)

    event.listen(store._engine, "before_cursor_execute", capture)
    _listeners.append((store, capture))
    return sent


_listeners: list[tuple[Store, Any]] = []


@pytest.fixture(autouse=True)
def _no_listeners_left() -> Iterator[None]:
    yield
    while _listeners:
        store, fn = _listeners.pop()
        event.remove(store._engine, "before_cursor_execute", fn)


@pytest.mark.parametrize("share", [0.0, 2.0])
def test_other_by_difference_equals_other_added_again(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch, share: float
) -> None:
    """ "Other" as every group's sums less the shown ones (one statement a question) and as
    the rest's reports added up again (a second one), each forced here: both equal streaming."""
    monkeypatch.setattr(query, "_DIFFERENCE_MIN_SHARE", share)
    sent = _statements(seeded.store)
    for by, measure in (("src", "packets"), ("srcport", "bytes"), ("dstport", "packets")):
        del sent[:]
        _check_top(seeded, by, 24, 48, measure)  # three filters
        if share == 0.0:
            assert len(sent) == 3, by
        else:  # a rest of only p = 1 reports has no floating-point sum to lose
            assert len(sent) > 3, by


def test_other_is_added_again_when_the_difference_would_lose_it(store: Store) -> None:
    """One source weighing a billion times the rest: every group's sums less the shown ones
    would be mostly rounding error, so the rest is added up again (a second statement), and
    "other" is what streaming gives."""
    big, small = NodeIdentity.generate(), NodeIdentity.generate()
    batch = [
        (
            big.sign_report(make_payload(src="192.0.2.1", packets=10**9, probability=1e-6)),
            BASE_MS,
            "udp",
        )
    ]
    for i in range(1, 40):
        payload = make_payload(src=f"198.18.{i}.1", packets=1 + i % 3, probability=0.5)
        batch.append((small.sign_report(payload), BASE_MS + i, "udp"))
    assert store.add_reports(batch) == 40
    reports = store.reports_after(0, 100)[0]
    sent = _statements(store)
    got = top(store, ReportFilter(), by="src", n=2)
    assert len(sent) == 2
    ref: TopN[Any] = TopN()
    groups: dict[Any, Tally] = {}
    for r in reports:
        groups.setdefault(prefix_key(r.src, 24, 48), Tally()).add(
            r.packets, r.bytes, r.probability, r.sampling_interval
        )
    for k in sorted(groups, key=_order):
        ref.add_tally(k, groups[k])
    everyone = Tally()
    for r in reports:
        everyone.add(r.packets, r.bytes, r.probability, r.sampling_interval)
    want = ref.result(2, unit=everyone.packets_unit, byte_unit=everyone.bytes_unit)
    assert [k for k, _ in got.top] == [k for k, _ in want.top]
    assert got.other is not None and want.other is not None
    _same(got.other, want.other)
    assert got.groups == 40


def test_an_empty_answer(seeded: Seeded) -> None:
    flt = ReportFilter(kind="no-such-kind")
    assert who(seeded.store, flt) == []
    result = top(seeded.store, flt, by="src")
    assert result.top == () and result.other is None and result.groups == 0


def test_bad_arguments_are_refused(seeded: Seeded) -> None:
    with pytest.raises(ValueError, match="cannot group by"):
        top(seeded.store, ReportFilter(), by="flows")
    with pytest.raises(ValueError, match="prefix lengths"):
        top(seeded.store, ReportFilter(), by="src", v4_len=33)
    with pytest.raises(ValueError, match="prefix lengths"):
        who(seeded.store, ReportFilter(), v6_len=129)


def test_forged_counters_and_probabilities_do_not_break_a_query(store: Store) -> None:
    """Anyone may sign a report: counters at 2**64-1 (stored saturated at 2**63-1) and a p of
    5e-324 must give an answer (infinite where it is), never a database error."""
    identity = NodeIdentity.generate()
    batch = []
    for packets, p in ((2**64 - 1, 1.0), (2**64 - 1, 1.0), (2**64 - 1, 5e-324), (10, 0.5)):
        payload = make_payload(dst="198.51.100.9", packets=packets, probability=p)
        batch.append((identity.sign_report(payload), BASE_MS, "udp"))
    assert store.add_reports(batch) == 4
    flt = ReportFilter(dst=net("198.51.100.0/24"))
    (row,) = who(store, flt)
    assert row.reports == 4
    assert row.estimate.packets.estimate == math.inf
    assert row.estimate.packets.high == math.inf
    assert row.estimate.certain_reports == 2
    (only,) = top(store, flt, by="dst").top
    assert only[1].packets.estimate == math.inf
    # certain part alone: two saturated counters, more than a 64-bit sum holds, still summed
    certain = who(store, ReportFilter(dst=net("198.51.100.0/24"), observers=(identity.public_key,)))
    assert certain[0].estimate.bytes.estimate >= 2 * (2**63 - 1)


def test_observer_units_are_kept_by_inserts_and_filled_by_the_migration(db_url: str) -> None:
    """observers.packets_unit/bytes_unit: the largest weights of all an observer's p < 1
    reports, whether they were stored after revision 0007_query or before it."""
    import alembic.command
    import alembic.config
    import sqlalchemy as sa

    from overflowd.store import repository

    identity = NodeIdentity.generate()
    certain_only = NodeIdentity.generate()
    batches = [
        [(10, 0.01), (500, 0.5)],
        [(3, 0.001), (2000, 1.0)],  # a later batch with a larger weight, and a certain one
    ]
    with Store.open(db_url) as store:
        for batch in batches:
            store.add_reports(
                [
                    (identity.sign_report(make_payload(packets=n, probability=p)), BASE_MS, "udp")
                    for n, p in batch
                ]
            )
        store.add_report(
            certain_only.sign_report(make_payload(probability=1.0)), received_ms=BASE_MS, via="udp"
        )
        want = _tally(r for r in store.query_reports() if r.observer_key == identity.public_key)
    config = alembic.config.Config()
    config.set_main_option("script_location", str(repository._MIGRATIONS))
    config.set_main_option("path_separator", "os")
    engine = sa.create_engine(db_url)
    read = sa.text("SELECT key, packets_unit, bytes_unit FROM observers")
    try:
        with engine.begin() as conn:
            inserted = {bytes(k): (u, b) for k, u, b in conn.execute(read)}
            config.attributes["connection"] = conn
            alembic.command.downgrade(config, "0006")
            alembic.command.upgrade(config, "head")
            migrated = {bytes(k): (u, b) for k, u, b in conn.execute(read)}
    finally:
        engine.dispose()
    for units in (inserted, migrated):
        assert units[identity.public_key] == pytest.approx((want.packets_unit, want.bytes_unit))
        assert units[certain_only.public_key] == (None, None)


def test_ties_rank_by_key_as_streaming_does(store: Store) -> None:
    """Groups with equal estimates (and groups tied at infinity) cut by n: SQL ranks them by
    key ascending, as TopN fed in key order does, on both backends, for top and who."""
    identity = NodeIdentity.generate()
    batch = []
    # sources given out of key order; 10 packets each at p = 1 ties six /24s;
    # two /24s are unbounded (p = 5e-324), tied at infinity
    sources = [("192.0.2.9", 10, 1.0), ("10.0.4.1", 10, 1.0), ("10.0.3.1", 10, 1.0)]
    sources += [("10.0.1.1", 10, 1.0), ("203.0.113.1", 10, 1.0), ("10.0.2.1", 10, 1.0)]
    sources += [("172.16.0.1", 10, 5e-324), ("172.15.0.1", 10, 5e-324), ("10.0.0.1", 3, 1.0)]
    for src, packets, p in sources:
        payload = make_payload(src=src, dst="198.51.100.9", packets=packets, probability=p)
        batch.append((identity.sign_report(payload), BASE_MS, "udp"))
    assert store.add_reports(batch) == len(sources)
    flt = ReportFilter(dst=net("198.51.100.0/24"))
    groups: dict[Any, Tally] = {}
    for r in store.query_reports():
        groups.setdefault(prefix_key(r.src, 24, 48), Tally()).add(
            r.packets, r.bytes, r.probability, r.sampling_interval
        )
    ref: TopN[Any] = TopN()
    for k in sorted(groups, key=_order):
        ref.add_tally(k, groups[k])
    unit = _tally(store.query_reports())
    for n in (1, 3, 4, 6):
        want = ref.result(n, by="packets", unit=unit.packets_unit, byte_unit=unit.bytes_unit)
        got = top(store, flt, by="src", n=n)
        assert [k for k, _ in got.top] == [k for k, _ in want.top]
        assert got.other is not None and want.other is not None
        _same(got.other, want.other)
        (row,) = who(store, flt, top_sources=n)
        assert [k for k, _ in row.top_sources] == [k for k, _ in want.top]
    assert [str(k) for k, _ in top(store, flt, by="src", n=4).top] == [
        "172.15.0.0/24",
        "172.16.0.0/24",
        "10.0.1.0/24",
        "10.0.2.0/24",
    ]


def test_top_with_nothing_shown_or_everything_shown(seeded: Seeded) -> None:
    """The two statements' edges: n = 0 puts every group in "other" (the ungrouped pass with
    no keys excluded, groups counted apart), n past the group count leaves no "other"."""
    s = seeded
    flt = FILTERS[1]
    match = [r for r in s.reports if matches(r, flt)]
    groups = {prefix_key(r.src, 24, 48) for r in match}
    assert len(groups) > 2
    unit, byte_unit = _all_units(s, {r.observer_key for r in s.reports})
    none = top(s.store, flt, by="src", n=0)
    assert none.top == () and none.groups == len(groups)
    assert none.other is not None
    _same(none.other, _tally(match).estimate(unit=unit, byte_unit=byte_unit))
    every = top(s.store, flt, by="src", n=len(groups) + 5)
    assert len(every.top) == len(groups) == every.groups and every.other is None
    assert sum(e.reports for _, e in every.top) == len(match)


def test_who_without_top_sources_equals_streaming(seeded: Seeded) -> None:
    """top_sources=0 asks one GROUP BY observer_key; the same per-observer answers as the
    single scan by (observer, source prefix) merged in Python."""
    s = seeded
    for flt in FILTERS[:2]:
        plain = who(s.store, flt, top_sources=0)
        full = who(s.store, flt)
        assert [r.observer_key for r in plain] == [r.observer_key for r in full]
        for a, b in zip(plain, full, strict=True):
            assert a.top_sources == []
            _same(a.estimate, b.estimate)
            assert (a.reports, a.first_ms, a.last_ms) == (b.reports, b.first_ms, b.last_ms)
            mine = [r for r in s.reports if matches(r, flt) and r.observer_key == a.observer_key]
            unit, byte_unit = _units(s, a.observer_key)
            _same(a.estimate, _tally(mine).estimate(unit=unit, byte_unit=byte_unit))


def test_sums_over_the_reports_table_equal_who(seeded: Seeded) -> None:
    """_run_sums (sums written over the reports table, what the dashboard's victim series
    builds on) gives each observer the same estimate as who's weighed sums."""
    t = query._T
    flt = FILTERS[1]
    rows = query._run_sums(
        seeded.store,
        lambda cols: query._where(select(t.c.observer_key, *cols), flt).group_by(t.c.observer_key),
        "testing",
    )
    want = {r.observer_key: r for r in who(seeded.store, flt, top_sources=0)}
    assert {bytes(r[0]) for r in rows} == set(want) and want
    units = query._observer_units(seeded.store)
    for r in rows:
        key = bytes(r[0])
        got = query._from(query._sums(r, 1)).estimate(unit=units[key][0], byte_unit=units[key][1])
        _same(got, want[key].estimate)


def test_top_columns_are_computed_at_insert_and_filled_by_the_migration(db_url: str) -> None:
    """src_key/dst_key/packets_weight/bytes_weight (what top groups and adds, revision
    0010_top_keys): what an insert computes in Python is what the migration's SQL fills for
    rows stored before it, on both backends: IPv4 and IPv6 keys, a certain report (NULL
    weights), an ordinary weight, and one over WEIGHT_CAP (+inf)."""
    import alembic.command
    import alembic.config
    import sqlalchemy as sa

    from overflowd.store import repository
    from overflowd.store.models import V6_KEY_BASE

    identity = NodeIdentity.generate()
    cases = [
        dict(src="192.0.2.77", dst="198.51.100.9", packets=10, probability=1.0),
        dict(src="203.0.113.200", dst="198.51.100.255", packets=7, probability=0.001),
        dict(src="2001:db8:1234:5678::1", dst="2001:db8:ffff::9", packets=3, probability=0.25),
        dict(src="198.18.0.1", dst="198.51.100.1", packets=10**9, probability=1e-300),
    ]
    with Store.open(db_url) as store:
        store.add_reports(
            [(identity.sign_report(make_payload(**c)), BASE_MS, "udp") for c in cases]  # type: ignore[arg-type]
        )
    config = alembic.config.Config()
    config.set_main_option("script_location", str(repository._MIGRATIONS))
    config.set_main_option("path_separator", "os")
    engine = sa.create_engine(db_url)
    read = sa.text(
        "SELECT packets, src_key, dst_key, packets_weight, bytes_weight FROM reports "
        "ORDER BY packets"
    )
    try:
        with engine.begin() as conn:
            inserted = [tuple(r) for r in conn.execute(read)]
            config.attributes["connection"] = conn
            alembic.command.downgrade(config, "0009_dash_dst_covering")
            alembic.command.upgrade(config, "head")
            migrated = [tuple(r) for r in conn.execute(read)]
    finally:
        engine.dispose()
    assert migrated == inserted
    by_packets = {r[0]: r[1:] for r in inserted}
    assert by_packets[10] == (0xC00002, 0xC63364, None, None)
    src_key, dst_key, weight, _ = by_packets[3]
    assert (src_key, dst_key) == (V6_KEY_BASE | 0x20010DB81234, V6_KEY_BASE | 0x20010DB8FFFF)
    assert weight == 3 / 0.25
    assert by_packets[7][2] == 7 / 0.001
    assert by_packets[10**9][2] == math.inf


def test_certain_amounts_past_2_53_rank_exactly(store: Store) -> None:
    """PostgreSQL ranks the groups by floating-point certain sums only while the window's
    certain amount is under 2**53 (every partial sum then exact); past it, it ranks again with
    exact sums. Group B (2**53 + 1 + 1 + 1) outweighs group A (2**53 + 1) by 2 packets, which a
    floating-point sum rounds away: B must rank first, as streaming says."""
    identity = NodeIdentity.generate()
    big = 2**53
    rows = [("198.18.1.1", big + 1), ("198.18.2.1", big), ("198.18.2.2", 1)]
    rows += [("198.18.2.3", 1), ("198.18.2.4", 1)]
    batch = []
    for src, n in rows:
        payload = make_payload(src=src, packets=n, probability=1.0)
        # one byte a report: the byte sums stay within 64 bits (else SQLite adds in floating
        # point, which rounds these counts on every backend alike)
        payload = dataclasses.replace(payload, flow=dataclasses.replace(payload.flow, bytes=1))
        batch.append((identity.sign_report(payload), BASE_MS, "udp"))
    assert store.add_reports(batch) == len(rows)
    got = top(store, ReportFilter(), by="src", n=1)
    assert [str(k) for k, _ in got.top] == ["198.18.2.0/24"]
    assert got.top[0][1].packets.estimate == float(big + 3)
    assert got.other is not None and got.other.packets.estimate == float(big + 1)
    assert got.groups == 2
