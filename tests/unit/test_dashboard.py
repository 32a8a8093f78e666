"""The dashboard's parts without a browser: the counter ring, the victim series (one read of
the window, its sums equal to ``who``'s), the SVG's escaping, and who may see the pages."""

from __future__ import annotations

import contextlib
import ipaddress
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import trio
from sqlalchemy import event

from overflowd.config import ApiSettings
from overflowd.dashboard import svg
from overflowd.dashboard.history import CHARTS, CounterHistory, CounterRing, ExporterNames
from overflowd.dashboard.pages import COOKIE, router
from overflowd.dashboard.series import bucket_for, victim_series
from overflowd.identity import NodeIdentity
from overflowd.services.api import ApiContext
from overflowd.store.query import ReportFilter, who
from tests.support.query_reports import BACKENDS, Seeded, seeded_store

CHART = {c.key: c for c in CHARTS}


def test_rates_gauges_and_the_hit_rate_come_from_the_samples() -> None:
    ring = CounterRing(points=3)
    for t, records, pending, hits, lookups in (
        (0, 0, 5, 0, 0),
        (10, 100, 7, 0, 0),
        (20, 300, 2, 30, 40),
        (30, 300, 1, 30, 40),
    ):
        ring.add(t, {"records:192.0.2.1": records, "outbox:pending": pending,
                     "dns:cache_hits": hits, "dns:lookups": lookups})  # fmt: skip
    assert len(ring) == 3  # bounded: the oldest went
    (line,) = ring.lines(CHART["ingest"])
    assert line.name == "records:192.0.2.1"
    assert line.points == ((10, None), (20, 20.0), (30, 0.0))
    pending = {ln.name: ln.points for ln in ring.lines(CHART["outbox"])}["outbox:pending"]
    assert [v for _, v in pending] == [7, 2, 1]
    (hit,) = ring.lines(CHART["dns_hits"])
    assert [v for _, v in hit.points] == [None, 0.75, None]  # no lookups: no rate
    assert ring.current(CHART["ingest"]) == {"records:192.0.2.1": 0.0}


def test_exporter_series_are_bounded() -> None:
    names = ExporterNames(limit=2)
    got = [names.name(a) for a in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.1")]
    assert got == ["192.0.2.1", "192.0.2.2", "other", "192.0.2.1"]


async def test_the_service_samples_every_interval_and_stops(autojump_clock: Any) -> None:
    class Stats:
        calls = 0

    def snapshot() -> Any:
        Stats.calls += 1
        raise RuntimeError("a snapshot that fails is counted, not fatal")

    history = CounterHistory(snapshot, interval_s=10, clock=trio.current_time)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        await trio.sleep(35)
        history.stop()
    assert Stats.calls == 4 and history.errors == 4


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


# -- the victim series ------------------------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Seeded]:
    yield from seeded_store(request, tmp_path_factory, 300, 7)


@pytest.mark.parametrize(
    "flt",
    [
        ReportFilter(),
        ReportFilter(dst=ipaddress.ip_network("198.51.100.0/24")),
        ReportFilter(either=ipaddress.ip_network("2001:db8::/32"), proto=17),
    ],
    ids=["all", "dst", "v6-udp"],
)
def test_the_series_adds_up_to_who_from_one_read_of_the_window(
    seeded: Seeded, flt: ReportFilter
) -> None:
    store = seeded.store
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    engine = store._engine  # type: ignore[attr-defined]
    event.listen(engine, "before_cursor_execute", seen)
    try:
        series = victim_series(store, flt)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    # the window's rows once (the span is theirs), the observers' units: never a statement
    # per bucket (PostgreSQL's read is on psycopg's own binary cursor, not seen here)
    assert not [s for s in statements if "GROUP BY" in s.upper()], statements
    rows_read = [s for s in statements if s.lstrip().upper().startswith("SELECT REPORTS.")]
    assert len(rows_read) == (1 if store.backend == "sqlite" else 0), statements
    assert len(statements) <= 2, statements
    assert len(series.starts) >= 2 and len(series.starts) <= 2 * 60
    rows = {r.fingerprint: r for r in who(store, flt, top_sources=0)}
    assert {name for name, _, _ in series.stacks} == set(rows)
    seconds = series.bucket_ms / 1000
    for name, packets, byte_rates in series.stacks:
        assert math.isclose(
            sum(packets) * seconds, rows[name].estimate.packets.estimate, rel_tol=1e-9
        )
        assert math.isclose(
            sum(byte_rates) * seconds, rows[name].estimate.bytes.estimate, rel_tol=1e-9
        )
    assert series.reports == sum(r.reports for r in rows.values())
    low, high = series.band_packets
    totals = [sum(s[1][i] for s in series.stacks) for i in range(len(series.starts))]
    for lo, total, hi in zip(low, totals, high, strict=True):
        assert lo <= total * (1 + 1e-9) and (hi is None or total <= hi * (1 + 1e-9))


def test_no_reports_is_an_empty_series(seeded: Seeded) -> None:
    series = victim_series(seeded.store, ReportFilter(dst=ipaddress.ip_network("192.0.2.77/32")))
    assert series.stacks == () and series.reports == 0
    assert "no reports" in svg.stacked_chart("t", "u", [], [])


def test_buckets_are_round_and_few() -> None:
    assert bucket_for(0) == 1000
    assert bucket_for(3_600_000) == 60_000
    assert 365 * 86_400_000 / bucket_for(365 * 86_400_000) <= 60


def test_names_in_charts_are_escaped() -> None:
    text = svg.line_chart("<t>", "u", [("<script>", [(0.0, 1.0), (10.0, 2.0)])])
    assert "<script>" not in text.replace("<t>", "") and "&lt;t&gt;" in text
    stacked = svg.stacked_chart("t", "u", [0, 1], [('"><x', [1.0, 2.0])])
    assert '"><x' not in stacked


# -- who may see it ---------------------------------------------------------------------------


def _client(listen: str, token: str = "") -> httpx.AsyncClient:
    from fastapi import FastAPI

    ctx = ApiContext(
        identity=NodeIdentity.generate(),
        contacts=("mailto:abuse@example.net",),
        observation_point="edge-1",
        store=None,  # type: ignore[arg-type]  # the Node page without history reads no store
    )
    app = FastAPI()
    app.include_router(router(ctx, ApiSettings(listen=listen, dashboard_token=token), None))
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 4000))
    base = "http://127.0.0.1:9591" if listen.startswith("127.") else "http://node.example"
    return httpx.AsyncClient(transport=transport, base_url=base)


TOKEN = "a-long-operator-token-0123456789"


async def test_loopback_needs_no_token() -> None:
    async with _client("127.0.0.1:9591") as client:
        answer = await client.get("/")
        assert answer.status_code == 200
        csp = answer.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert answer.headers["x-content-type-options"] == "nosniff"


async def test_on_loopback_another_host_name_is_refused() -> None:
    """Open on loopback meant open to any web page the operator visits: a page whose name
    resolves to 127.0.0.1 (DNS rebinding) read the dashboard as its own origin."""
    async with _client("127.0.0.1:9591") as client:
        for host in ("localhost:9591", "LOCALHOST", "127.0.0.1", "[::1]:9591", "127.1.2.3:80"):
            assert (await client.get("/", headers={"host": host})).status_code == 200, host
        for host in ("evil.example:9591", "evil.example", "127.0.0.1.evil.example", "", "[::1"):
            answer = await client.get("/", headers={"host": host})
            assert answer.status_code == 403 and "dashboard_token" in answer.text, host
    async with _client("[::1]:9591") as client:  # the same on IPv6 loopback
        assert (await client.get("/", headers={"host": "[::1]:9591"})).status_code == 200
        assert (await client.get("/", headers={"host": "rebound.example"})).status_code == 403


async def test_beyond_loopback_without_a_token_the_dashboard_is_refused() -> None:
    async with _client("0.0.0.0:9591") as client:
        answer = await client.get("/")
        assert answer.status_code == 403 and "dashboard_token" in answer.text
        assert (await client.get("/dashboard/static/dash.css")).status_code == 200  # no secrets


async def test_beyond_loopback_the_token_is_asked_as_bearer_or_cookie() -> None:
    async with _client("[::]:9591", TOKEN) as client:
        assert (await client.get("/")).status_code == 401
        assert (await client.get("/", headers={"authorization": "Bearer wrong"})).status_code == 401
        assert (
            await client.get("/", headers={"authorization": f"Bearer {TOKEN}"})
        ).status_code == 200
        assert (await client.post("/login", content=b"token=wrong")).status_code == 401
        answer = await client.post(
            "/login",
            content=f"token={TOKEN}".encode(),
            headers={"content-type": "application/x-www-form-urlencoded"},
            follow_redirects=False,
        )
        assert answer.status_code == 303
        assert "httponly" in answer.headers["set-cookie"].lower()
        assert client.cookies.get(COOKIE) == TOKEN
        assert (await client.get("/")).status_code == 200


def test_a_short_token_is_a_config_error() -> None:
    from overflowd.config import parse_settings
    from overflowd.errors import ConfigError

    with pytest.raises(ConfigError, match="dashboard_token"):
        parse_settings('[api]\ndashboard_token = "short"\n')
    assert parse_settings(f'[api]\ndashboard_token = "{TOKEN}"\n').api.dashboard_token == TOKEN


def test_the_peers_table_is_every_peer_counter_by_peer() -> None:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector

    from overflowd.dashboard.pages import _peer_table

    class Peers(Collector):
        def collect(self) -> Iterator[Any]:
            posts = CounterMetricFamily("overflowd_peer_push_posts", "", labels=["peer", "outcome"])
            posts.add_metric(["b<peer>", "ok"], 3)
            posts.add_metric(["a-peer", "ok"], 5)
            posts.add_metric(["a-peer", "refused"], 1)
            yield posts
            banned = GaugeMetricFamily("overflowd_peer_banned", "", labels=["peer"])
            banned.add_metric(["a-peer"], 1)
            yield banned
            yield GaugeMetricFamily("overflowd_peer_learned", "", value=2)  # no peer label
            rtt = GaugeMetricFamily(
                "overflowd_peer_push_rtt_seconds", "", labels=["peer", "quantile"]
            )
            rtt.add_metric(["a-peer", "0.5"], 0.301)
            rtt.add_metric(["a-peer", "1"], 0.5)
            yield rtt
            name = "overflowd_peer_push_rtt_seconds_window"
            window = GaugeMetricFamily(name, "", labels=["peer"])
            window.add_metric(["a-peer"], 2)
            yield window

    table = _peer_table([Peers()])
    assert table is not None
    head, rows = table
    # The latency windows are one column (ms), not a column per quantile.
    assert head == ["peer", "latency (ms)", "push_posts/ok", "push_posts/refused", "banned"]
    assert rows[0][1] == "push rtt 301/500 · delivery age - · pull rtt -"
    assert rows[1][1] == "push rtt -/- · delivery age - · pull rtt -"
    assert rows[0][0] == "<code>a-peer</code>" and 'data-value="5.0"' in rows[0][2]
    assert 'data-value="1"' in rows[0][4] or 'data-value="1.0"' in rows[0][4]
    assert rows[1][0] == "<code>b&lt;peer&gt;</code>" and rows[1][3] == "<span class=num>-</span>"
    assert _peer_table([]) is None


async def test_a_bad_number_in_the_url_is_a_400_not_a_500() -> None:
    """``limit``/``after`` of non-ASCII digits ('²' passes str.isdigit) or thousands of digits
    (int() refuses them) were an unhandled ValueError: a 500 for any URL an attacker writes."""
    async with _client("127.0.0.1:9591") as client:
        for path in ("/reports?limit=", "/dashboard/reports/rows?after="):
            for bad in ("%C2%B2", "%D9%A1", "9" * 5000, "-1", "1e3"):
                answer = await client.get(path + bad)
                assert answer.status_code == 400, (path, bad[:10], answer.status_code)


async def test_a_long_login_body_is_refused_without_reading_it_all() -> None:
    """/login is open to anyone: its body was read whole (request.body()) before its length
    was checked, so one client's stream of megabytes was held in memory."""
    pulled = 0

    async def endless() -> Any:
        nonlocal pulled
        for _ in range(200):  # 12.5 MiB in all, were it read
            pulled += 1
            yield b"token=" + b"x" * 65536

    async with _client("[::]:9591", TOKEN) as client:
        answer = await client.post(
            "/login", content=endless(),
            headers={"content-type": "application/x-www-form-urlencoded"},
        )  # fmt: skip
        assert answer.status_code == 413
        assert pulled <= 2
        long = await client.post("/login", content=b"x" * 5000)  # with a content-length
        assert long.status_code == 413


@contextlib.asynccontextmanager
async def _far_future_flow(tmp_path: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with _far_future_store(tmp_path) as (client, _store):
        yield client


@contextlib.asynccontextmanager
async def _far_future_store(tmp_path: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """A dashboard over a store of two reports to 198.51.100.2, one of whose flow says it
    ends at 2**64-1 ms (any signer may say so: the observer's word)."""
    import dataclasses
    import time

    from fastapi import FastAPI

    from overflowd.store.repository import Store
    from tests.support.reports import make_payload

    now = int(time.time() * 1000)
    observer = NodeIdentity(seed=b"\x07" * 32)
    payload = make_payload(time_ms=now)
    hostile = dataclasses.replace(payload.flow, first=now - 5, last=2**64 - 1)
    with Store.open(f"sqlite:///{tmp_path / 'overflowd.db'}") as store:
        for p in (payload, dataclasses.replace(make_payload(time_ms=now), flow=hostile)):
            store.add_report(observer.sign_report(p), received_ms=now, via="udp")
        ctx = ApiContext(
            identity=NodeIdentity.generate(), contacts=(), observation_point="", store=store
        )
        app = FastAPI()
        app.include_router(router(ctx, ApiSettings(listen="127.0.0.1:9591"), None))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:9591") as c:
            yield c, store


async def test_a_flow_ending_past_year_9999_does_not_break_the_victim_chart(
    tmp_path: Any,
) -> None:
    """The span then reached past year 9999 and the chart's time labels raised ValueError:
    one stored report made the victim chart of every prefix holding its destination a 500."""
    async with _far_future_flow(tmp_path) as c:
        for since in ("1h", ""):
            answer = await c.get(
                "/dashboard/chart/victim.svg",
                params={"prefix": "198.51.100.0/24", "since": since, "measure": "bytes"},
            )
            assert answer.status_code == 200
            assert answer.text.startswith("<svg") and "<polygon" in answer.text


async def test_a_flow_ending_past_year_9999_is_left_out_of_the_exports(tmp_path: Any) -> None:
    """Neither XARF nor STIX can write such a time; both exports raised (422), so one stored
    report broke every export of its destination. Now it is left out of both."""
    async with _far_future_flow(tmp_path) as c:
        answer = await c.get(
            "/dashboard/export/xarf",
            params={"dst": "198.51.100.2", "reporter_contact": "abuse@victim.example"},
        )
        assert answer.status_code == 200, answer.text
        assert len(answer.text.splitlines()) == 1  # the other report's incident
        answer = await c.get("/dashboard/export/stix", params={"dst": "198.51.100.2"})
        assert answer.status_code == 200, answer.text
        kinds = [o["type"] for o in answer.json()["objects"]]
        assert kinds.count("observed-data") == 1  # the other report only


async def test_a_far_future_flow_does_not_stretch_the_victim_chart(tmp_path: Any) -> None:
    """The axis ends at now (no `until`): a flow said to end at 2**64-1 ms stretched it to
    year 292 million, every other report squashed into its first pixel. It is counted in a
    note instead, and drawn + outside is still exactly what who says."""
    import re
    import time

    async with _far_future_store(tmp_path) as (c, store):
        now = int(time.time() * 1000)
        flt = ReportFilter(dst=ipaddress.ip_network("198.51.100.0/24"), since_ms=now - 3_600_000)
        series = victim_series(store, flt, now_ms=now + 60_000)
        assert series.starts[0] <= now - 3_600_000 and series.starts[-1] <= now + 60_000
        assert series.bucket_ms <= 120_000  # an hour's buckets, not 2**64 ms / 60
        assert series.reports == 1 and series.outside_reports == 1
        (row,) = who(store, flt, top_sources=0)
        seconds = series.bucket_ms / 1000
        drawn = sum(sum(packets) for _, packets, _ in series.stacks) * seconds
        assert math.isclose(
            drawn + series.outside_packets, row.estimate.packets.estimate, rel_tol=1e-9
        )
        drawn_bytes = sum(sum(b) for _, _, b in series.stacks) * seconds
        assert math.isclose(drawn_bytes + series.outside_bytes, row.estimate.bytes.estimate)
        for measure in ("packets", "bytes"):
            answer = await c.get(
                "/dashboard/chart/victim.svg",
                params={"prefix": "198.51.100.0/24", "since": "1h", "measure": measure},
            )
            assert answer.status_code == 200 and "<polygon" in answer.text
            assert "not drawn: 1 report ending after the axis" in answer.text
            labels = re.findall(
                r'text-anchor="(?:start|middle|end)">(\d\d:\d\d)</text>', answer.text
            )
            assert len(labels) == 5, answer.text  # clock times of the last hour, not seconds
        # without a time the axis is the stored flows' span, also ended at now
        answer = await c.get("/dashboard/chart/victim.svg", params={"dst": "198.51.100.2"})
        assert answer.status_code == 200 and "not drawn: 1 report" in answer.text


async def test_the_reports_footer_counts_exactly_up_to_the_cap_then_says_more_than(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The footer's "N of M": M exact while at most FOOTER_COUNT_CAP reports match (a million
    would cost PostgreSQL ~200 ms to count), "more than <cap>" beyond it, never a wrong M."""
    import re

    from overflowd.store import query

    async with _far_future_flow(tmp_path) as client:  # two reports
        for cap, footer in ((2, "2 of 2 reports"), (1, "1 of more than 1 reports")):
            monkeypatch.setattr(query, "FOOTER_COUNT_CAP", cap)
            page = await client.get("/reports", params={"limit": str(cap)})
            assert page.status_code == 200
            text = re.sub(r"<[^>]+>", "", page.text)
            assert footer in text, text
