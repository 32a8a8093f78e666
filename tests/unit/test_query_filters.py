"""overflowd.store.query filters: each one, and combinations, against the same filter written
in Python (tests/support/query_reports.py), on SQLite and PostgreSQL.

find_reports (newest flow first, limit), count_reports (the footer's M) and page_reports (the
reports_after guarantees with any filter), and resolve_observer's answers and refusals.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterator

import pytest

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.store import Store
from overflowd.store.query import (
    ReportFilter,
    count_reports,
    count_reports_capped,
    find_reports,
    page_reports,
    resolve_observer,
)
from overflowd.store.repository import CursorAhead
from tests.support.query_reports import (
    BACKENDS,
    BASE_MS,
    HOUR_MS,
    Seeded,
    matches,
    seed_store,
    seeded_store,
)
from tests.support.reports import make_payload

net = ipaddress.ip_network


SEED = 11


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    yield from seeded_store(request, tmp_path_factory, 300, SEED)


def _filters(s: Seeded) -> list[ReportFilter]:
    own, other, third = (i.public_key for i in s.identities)
    return [
        ReportFilter(),
        ReportFilter(since_ms=BASE_MS + 2 * HOUR_MS),
        ReportFilter(until_ms=BASE_MS + HOUR_MS),
        ReportFilter(since_ms=BASE_MS + HOUR_MS, until_ms=BASE_MS + HOUR_MS + 60_000),
        ReportFilter(received_since_ms=BASE_MS + 3 * HOUR_MS),
        ReportFilter(received_until_ms=BASE_MS + HOUR_MS),
        ReportFilter(dst=net("198.51.100.0/24")),
        ReportFilter(dst=net("198.51.100.101/32")),
        ReportFilter(dst=net("198.51.100.96/27"), since_ms=BASE_MS + HOUR_MS),
        ReportFilter(dst=net("198.51.100.0/23")),
        ReportFilter(src=net("192.0.2.128/25"), dst=net("198.51.100.0/24")),
        ReportFilter(dst=net("198.51.0.0/16"), since_ms=BASE_MS + HOUR_MS),
        ReportFilter(dst=net("10.9.8.0/24")),  # IPv4: not the IPv6 ::ffff:10.9.8.x reports
        ReportFilter(dst=net("::ffff:10.9.8.0/120")),
        ReportFilter(dst=net("2001:db8::/32")),
        ReportFilter(src=net("192.0.2.0/24")),
        ReportFilter(src=net("2001:db8:2::/48"), dst=net("::/0")),
        ReportFilter(either=net("192.0.2.0/24")),
        ReportFilter(either=net("2001:db8::/32")),
        ReportFilter(proto=6),
        ReportFilter(port=443),
        ReportFilter(sport=53),
        ReportFilter(dport=40000, proto=17),
        ReportFilter(kind="ddos-suspect"),
        ReportFilter(kind="no-such-kind"),
        ReportFilter(observers=(other,)),
        ReportFilter(observers=(own, third)),
        ReportFilter(min_trust="unknown"),
        ReportFilter(min_trust="continuity"),
        ReportFilter(min_trust="dns"),
        ReportFilter(min_trust="pinned", kind="flow-seen"),
        ReportFilter(min_trust="pinned", observers=(other,)),
    ]


def test_every_filter_finds_what_its_definition_says(seeded: Seeded) -> None:
    everything = seeded.reports
    nonempty = 0
    for flt in _filters(seeded):
        want = sorted(
            (r for r in everything if matches(r, flt)), key=lambda r: (-r.last_ms, -r.seq)
        )
        got = find_reports(seeded.store, flt)
        assert [r.report_id for r in got] == [r.report_id for r in want], flt
        assert count_reports(seeded.store, flt) == len(want), flt
        limited = find_reports(seeded.store, flt, limit=7)
        assert [r.report_id for r in limited] == [r.report_id for r in want[:7]], flt
        nonempty += 0 < len(want) < len(everything)
    # the data exercises the filters: most of them keep some reports but not all
    assert nonempty >= len(_filters(seeded)) - 4


def test_a_capped_count_is_exact_up_to_its_cap_and_says_more_above_it(seeded: Seeded) -> None:
    """The Reports page's footer: exact when at most ``cap`` match, ``cap + 1`` ("more than
    cap") when more do, for every filter, on both backends."""
    for flt in _filters(seeded):
        n = sum(matches(r, flt) for r in seeded.reports)
        for cap in (0, 1, n - 1, n, n + 1, 10_000):
            if cap < 0:
                continue
            assert count_reports_capped(seeded.store, flt, cap) == min(n, cap + 1), (flt, cap)
    with pytest.raises(ValueError):
        count_reports_capped(seeded.store, ReportFilter(), -1)


def test_a_found_report_is_the_stored_one(seeded: Seeded) -> None:
    got = find_reports(seeded.store, ReportFilter(dst=net("2001:db8:ff::/48")), limit=3)
    assert got
    for r in got:
        assert seeded.store.get_report(r.report_id) == r
        assert r.signed_report().payload.flow.dst == r.dst


def test_paging_with_a_filter_sees_each_match_once_in_number_order(seeded: Seeded) -> None:
    store = seeded.store
    flt = ReportFilter(dst=net("198.51.100.0/24"), min_trust="continuity")
    want = sorted((r for r in seeded.reports if matches(r, flt)), key=lambda r: r.seq)
    assert len(want) > 10
    seen: list[str] = []
    after, pages = 0, 0
    while True:
        page, after = page_reports(store, flt, after=after, limit=4)
        pages += 1
        if not page:
            break
        seen.extend(r.report_id for r in page)
    assert seen == [r.report_id for r in want]
    # the last, short page jumped to the committed counter: nothing is looked at again
    assert after == store.last_seq()
    assert page_reports(store, flt, after=after, limit=4) == ([], after)
    with pytest.raises(CursorAhead):
        page_reports(store, flt, after=store.last_seq() + 1, limit=4)


def test_paging_picks_up_reports_stored_after_the_cursor(store: Store) -> None:
    first = seed_store(store, 50, seed=3)
    flt = ReportFilter(proto=17)
    page, cursor = page_reports(store, flt, after=0, limit=1000)
    in_order = sorted(first.reports, key=lambda r: r.seq)
    assert [r.report_id for r in page] == [r.report_id for r in in_order if r.proto == 17]
    more = seed_store(store, 50, seed=4)  # adds 50 more (query_reports sees all 100)
    later = {r.report_id for r in more.reports} - {r.report_id for r in first.reports}
    page, _ = page_reports(store, flt, after=cursor, limit=1000)
    assert [r.report_id for r in page] == [
        r.report_id
        for r in sorted(more.reports, key=lambda r: r.seq)
        if r.report_id in later and r.proto == 17
    ]


def test_resolve_observer_by_key_and_fingerprint(seeded: Seeded) -> None:
    store = seeded.store
    key = seeded.identities[1].public_key
    fp = rpt.key_fingerprint(key)
    assert resolve_observer(store, base64.b64encode(key).decode()) == (key,)
    assert resolve_observer(store, rpt.b64url(key)) == (key,)
    assert resolve_observer(store, fp) == (key,)
    assert resolve_observer(store, fp.upper()) == (key,)
    # the shortest prefix that names only this key
    others = [rpt.key_fingerprint(i.public_key) for i in seeded.identities if i.public_key != key]
    length = next(n for n in range(4, 20) if not any(o.startswith(fp[:n]) for o in others))
    assert resolve_observer(store, fp[: max(length, 4)]) == (key,)
    assert find_reports(store, ReportFilter(observers=resolve_observer(store, fp)))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "neither a base64 key"),
        ("hello", "neither a base64 key"),
        ("ab", "at least 4 digits"),
        ("ffff-ffff-ffff-ffff", "no observer with that fingerprint"),
        (base64.b64encode(bytes(31)).decode() + "AAAA", "neither a base64 key"),
    ],
)
def test_resolve_observer_refuses_with_a_reason(seeded: Seeded, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_observer(seeded.store, text)


def test_an_ambiguous_prefix_is_refused(store: Store) -> None:
    # two keys whose fingerprints share their first 4 digits (about 300 draws, birthday bound)
    by_prefix: dict[str, NodeIdentity] = {}
    while True:
        identity = NodeIdentity.generate()
        prefix = rpt.key_fingerprint(identity.public_key)[:4]
        if prefix in by_prefix:
            pair = (by_prefix[prefix], identity)
            break
        by_prefix[prefix] = identity
    for identity in pair:
        store.add_report(identity.sign_report(make_payload()), received_ms=BASE_MS, via="udp")
    with pytest.raises(ValueError, match="matches 2 observers"):
        resolve_observer(store, prefix)
    for identity in pair:
        fp = rpt.key_fingerprint(identity.public_key)
        assert resolve_observer(store, fp) == (identity.public_key,)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"since_ms": -1},
        {"until_ms": 2**63},
        {"proto": 256},
        {"port": 65536},
        {"dport": -1},
        {"observers": (b"short",)},
        {"min_trust": "trusted"},
    ],
)
def test_a_bad_filter_is_refused_before_any_query(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ReportFilter(**kwargs)  # type: ignore[arg-type]
