"""The dashboard's routes: HTML pages rendered on the server, SVG charts, one small script.

Every page is a GET with its filters in the URL (the API's own names: ``?dst=...&since=1h``),
so a view can be shared and reloaded; the tables and charts need no JavaScript (the charts
are SVG images drawn here); ``live.js`` only refreshes the Reports page by polling
``/reports/rows``. Every number comes from the functions the API answers with
(:mod:`overflowd.answers`, :mod:`overflowd.store.query`), so a page says what
``overflowd-query`` says for the same filters.

Headers on every answer: a strict Content-Security-Policy (scripts, styles and images from
this origin only, no inline script or style, no frames, forms to this origin), nosniff, no
referrer. Auth (:class:`Gate`): open on loopback; otherwise (or whenever ``api.dashboard_token``
is set) the operator token as ``Authorization: Bearer`` or the ``overflowd_dashboard`` cookie
that ``/login`` sets.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from html import escape
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio.to_thread
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from overflowd import report as rpt
from overflowd.answers import FILTER_PARAMS, PROTO_NAMES, WHO_TOP_SOURCES, make_filter, who_json
from overflowd.config import parse_listen
from overflowd.dashboard import svg
from overflowd.dashboard.history import CHARTS, CounterHistory

if TYPE_CHECKING:
    from overflowd.config import ApiSettings
    from overflowd.services.api import ApiContext
    from overflowd.store.query import ReportFilter
    from overflowd.store.repository import StoredReport

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
COOKIE = "overflowd_dashboard"
#: Reports on the Reports page and under the victim view; rows per live refresh at most.
REPORT_ROWS = 50
MAX_REPORT_ROWS = 500
LIVE_ROWS = 100
#: Reports put in one XARF or STIX export (the CLI's --limit gives more).
EXPORT_LIMIT = 1000
#: The victim view's time when the URL gives none: an attack is now (and a day of a busy
#: store's reports is more than a page can sum in 200 ms; give since= for longer).
VICTIM_SINCE = "1h"
VICTIM_FIELDS = ("prefix", "dst", "since", "until", "min_trust")
PAGES = (("/", "Node"), ("/victim", "Victim"), ("/reports", "Reports"), ("/peers", "Peers"))


def _static(name: str) -> bytes:
    return resources.files("overflowd.dashboard").joinpath("static", name).read_bytes()


class Gate:
    """Who may see the dashboard: anyone on loopback, else the holder of the operator token."""

    def __init__(self, settings: ApiSettings) -> None:
        self.token = settings.dashboard_token
        try:
            host, _ = parse_listen(settings.listen)
            self.loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            self.loopback = False

    def allows(self, request: Request) -> bool:
        if not self.token:
            # Open on loopback to this host's users, not to any web page they visit: a page
            # whose name resolves to 127.0.0.1 (DNS rebinding) is same-origin with what it
            # fetches from there, and its requests carry its own name as Host.
            return self.loopback and loopback_host(request.headers.get("host", ""))
        given = request.cookies.get(COOKIE, "")
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.token.encode())

    def check(self, request: Request) -> None:
        if self.allows(request):
            return
        if not self.token and self.loopback:
            raise HTTPException(
                403, "on loopback the dashboard answers a loopback Host only (127.0.0.1, "
                "[::1], localhost); for any other name set api.dashboard_token "
                "(docs/dashboard.md)",
            )  # fmt: skip
        if not self.token:
            raise HTTPException(
                403, "the dashboard beyond loopback needs api.dashboard_token (docs/dashboard.md)"
            )
        raise HTTPException(
            401, "the operator token is needed: /login", {"www-authenticate": "Bearer"}
        )


def loopback_host(host: str) -> bool:
    """Does a Host header name this host's loopback (``127.0.0.1:9591``, ``[::1]:9591``,
    ``localhost``)?"""
    host = host.strip().lower()
    if host.startswith("["):  # an IPv6 literal, with or without a port
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name = host.rsplit(":", 1)[0]
    name = name.rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


# -- HTML ------------------------------------------------------------------------------------


def _page(title: str, here: str, body: str, *, scripts: Sequence[str] = ()) -> HTMLResponse:
    nav = " ".join(
        f'<a href="{path}"{" class=here" if path == here else ""}>{name}</a>'
        for path, name in PAGES
    )
    tags = "".join(f'<script src="/dashboard/static/{s}" defer></script>' for s in scripts)
    html = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)} · overflowd</title>"
        '<link rel=stylesheet href="/dashboard/static/dash.css">'
        '<link rel=icon href="/dashboard/static/icon.svg" type="image/svg+xml">'
        f"{tags}</head><body><header><b>overflowd</b> <nav>{nav}</nav></header>"
        f"<main><h1>{escape(title)}</h1>{body}</main></body></html>"
    )
    return HTMLResponse(html, headers=HEADERS)


def _query(params: Mapping[str, str | None], **more: str | int | None) -> str:
    items = {k: v for k, v in {**params, **more}.items() if v not in (None, "")}
    return urllib.parse.urlencode(items)


def _filter_form(action: str, params: Mapping[str, str | None], names: Sequence[str]) -> str:
    fields = "".join(
        f'<label>{escape(n)} <input name="{escape(n)}" value="{escape(params.get(n) or "")}" '
        f'size="{18 if n in ("prefix", "src", "dst", "since", "until") else 8}"></label> '
        for n in names
    )
    return (
        f'<form class=filters method=get action="{action}">{fields}'
        "<button type=submit>Show</button></form>"
    )


def _table(
    head: Sequence[str], rows: Sequence[Sequence[str]], *, cls: str = "", tid: str = ""
) -> str:
    """Cells are HTML already (escaped by the caller)."""
    h = "".join(f"<th>{escape(c)}</th>" for c in head)
    b = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    attrs = (f' class="{cls}"' if cls else "") + (f' id="{tid}"' if tid else "")
    return f"<table{attrs}><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>"


def _num(value: float | None, raw: float | None = None) -> str:
    """A number for people, with the exact value in data-value (what tests compare)."""
    exact = "" if raw is None else f' data-value="{raw!r}"'
    return f"<span class=num{exact}>{escape(svg.number(value))}</span>"


def _interval(obj: Mapping[str, Any]) -> str:
    high = obj.get("high")
    return (
        f"{_num(obj['estimate'], obj['estimate'])} "
        f"<small>[{escape(svg.number(obj['low']))} – "
        f"{'∞' if high is None else escape(svg.number(high))}]</small>"
    )


def _swatch(i: int) -> str:
    return (
        '<svg class=swatch width="10" height="10" aria-hidden="true">'
        f'<rect width="10" height="10" fill="{svg.color(i)}"/></svg>'
    )


def _report_row(row: StoredReport) -> list[str]:
    proto = PROTO_NAMES.get(row.proto, str(row.proto))
    return [
        f'<a href="/dashboard/report/{row.seq}.json">{row.seq}</a>',
        escape(rpt.iso_ms(row.received_ms)),
        escape(rpt.iso_ms(row.last_ms)),
        f"<code>{escape(rpt.key_fingerprint(row.observer_key))}</code>",
        escape(row.trust or "-"),
        escape(f"{row.src}:{row.sport}"),
        escape(f"{row.dst}:{row.dport}"),
        escape(proto),
        _num(row.packets, row.packets),
        _num(row.bytes, row.bytes),
        escape(f"{row.probability:.3g}"),
        escape(row.kind),
        f'<a href="/dashboard/report/{row.seq}.json">JSON</a> '
        f'<a href="/dashboard/report/{row.seq}.cose">COSE</a>',
    ]


REPORT_HEAD = (
    "seq", "received", "flow last", "observer", "trust", "source", "destination", "proto",
    "packets", "bytes", "p", "kind", "signed",
)  # fmt: skip


# -- the routes ------------------------------------------------------------------------------


def router(ctx: ApiContext, settings: ApiSettings, history: CounterHistory | None) -> APIRouter:
    """The dashboard's routes over the API's context (mounted by services/api.py)."""
    from fastapi import Depends

    gate = Gate(settings)

    def guard(request: Request) -> None:
        gate.check(request)

    r = APIRouter(include_in_schema=False)
    open_r = APIRouter(include_in_schema=False)
    guarded = [Depends(guard)]

    def params_of(request: Request) -> dict[str, str | None]:
        return {n: request.query_params.get(n) for n in FILTER_PARAMS}

    def make(params: Mapping[str, str | None]) -> ReportFilter:
        from overflowd.store.query import resolve_observer

        try:
            return make_filter(
                params,
                now_ms=int(time.time() * 1000),
                observers=lambda text: resolve_observer(ctx.store, text),
            )
        except ValueError as exc:
            raise HTTPException(400, str(exc)[:300]) from None

    def int_param(request: Request, name: str, default: int, top: int) -> int:
        text = request.query_params.get(name)
        if text is None or text == "":
            return default
        # ASCII digits only: str.isdigit() also takes '²' (int() refuses it) and int() of
        # thousands of digits raises; both were a 500 for a bad URL
        if not (text.isascii() and text.isdigit()) or len(text) > 20 or int(text) > top:
            raise HTTPException(400, f"{name} {text[:20]!r}: expected a number 0-{top}")
        return int(text)

    # -- Node ------------------------------------------------------------------------------

    @r.get("/", dependencies=guarded)
    async def node() -> HTMLResponse:  # in the event loop, as the sampler: no locking
        parts = []
        if history is None:
            parts.append(
                "<p>No counter history in this process (run by <code>overflowd run</code>).</p>"
            )
        else:
            for chart in CHARTS:
                current = history.ring.current(chart)
                legend = _table(
                    ("series", "now"),
                    [
                        [f"{_swatch(i)} {escape(name)}", _num(value, value)]
                        for i, (name, value) in enumerate(current.items())
                    ],
                    cls="legend",
                )
                parts.append(
                    f'<section class=chart id="chart-{chart.key}"><img src="/dashboard/chart/node/'
                    f'{chart.key}.svg" alt="{escape(chart.title)}" width="{svg.WIDTH}" '
                    f'height="{svg.HEIGHT}">{legend}</section>'
                )
            rows = [[escape(k), _num(v, v)] for k, v in sorted(history.now().items())]
            parts.insert(
                0,
                "<h2>Counters now</h2>"
                + _table(("counter", "total since start"), rows, tid="counters", cls="counters"),
            )
        body = (
            f"<p>Node <code>{escape(ctx.identity.fingerprint)}</code> · "
            f"{escape(ctx.observation_point or '-')} · contacts "
            f"{escape(', '.join(ctx.contacts) or '-')} · one sample every 10 s, the last hour"
            f' · <a href="/metrics">/metrics</a></p>' + "".join(parts)
        )
        return _page("Node", "/", body)

    @r.get("/dashboard/chart/node/{key}.svg", dependencies=guarded)
    async def node_chart(key: str) -> Response:
        chart = next((c for c in CHARTS if c.key == key), None)
        if chart is None:
            raise HTTPException(404, "no such chart")
        if history is None:
            body = svg.empty(chart.title, "no counter history")
        else:
            lines = [(line.name, line.points) for line in history.ring.lines(chart)]
            body = svg.line_chart(chart.title, chart.unit, lines)
        return Response(body, media_type="image/svg+xml", headers=HEADERS)

    # -- Victim ----------------------------------------------------------------------------

    @r.get("/victim", dependencies=guarded)
    async def victim(request: Request) -> HTMLResponse:
        from overflowd.store.query import find_reports
        from overflowd.store.query import who as who_query

        params = params_of(request)
        if not any(params.values()):
            form = _filter_form("/victim", {"since": VICTIM_SINCE}, VICTIM_FIELDS)
            return _page(
                "Victim", "/victim",
                form + "<p>Who is sending this to me? Give a prefix (your network) and "
                "a time: the estimate over time, the observers behind it, their contacts.</p>",
            )  # fmt: skip
        if not params["since"] and not params["until"]:
            params["since"] = VICTIM_SINCE  # "now", not the store's whole history
        form = _filter_form("/victim", params, VICTIM_FIELDS)

        def answer() -> tuple[list[dict[str, Any]], list[StoredReport]]:
            flt = make(params)
            rows = who_query(ctx.store, flt, top_sources=WHO_TOP_SOURCES)
            return [who_json(row) for row in rows], find_reports(ctx.store, flt, limit=20)

        observers, latest = await anyio.to_thread.run_sync(answer)
        qs = _query(params)
        who_rows = []
        source_rows = []
        for i, o in enumerate(observers):
            fp = o["observer"]["fingerprint"]
            who_rows.append(
                [
                    f"{_swatch(i)} <code>{escape(fp)}</code>",
                    escape(o["observer"]["point"] or "-"),
                    escape(o["trust"] or "-"),
                    escape(", ".join(o["contacts"]) or "-"),
                    _num(o["reports"], o["reports"]),
                    _interval(o["packets"]),
                    _interval(o["bytes"]),
                    escape(o["first"]),
                    escape(o["last"]),
                ]
            )
            for s in o["top_sources"]:
                source_rows.append(
                    [escape(s["prefix"]), f"<code>{escape(fp)}</code>", _interval(s["packets"]),
                     _interval(s["bytes"])]
                )  # fmt: skip
        total = sum(o["reports"] for o in observers)
        body = (
            form + f"<p>{total} reports from {len(observers)} observers · export "
            f'<a class=button href="/dashboard/export/xarf?{qs}">XARF</a> '
            f'<a class=button href="/dashboard/export/stix?{qs}">STIX</a> · '
            f'<a href="/v1/who?{qs}">the API\'s answer</a></p>'
            + _chart_img(params, "packets")
            + _chart_img(params, "bytes")
            + "<h2>Who reports it</h2>"
            + _table(
                (
                    "observer",
                    "point",
                    "trust",
                    "contacts",
                    "reports",
                    "packets [95%]",
                    "bytes [95%]",
                    "first",
                    "last",
                ),
                who_rows,
                tid="who",
            )
            + "<h2>Top sources</h2>"
            + _table(
                ("source", "observer", "packets [95%]", "bytes [95%]"), source_rows, tid="sources"
            )
            + "<h2>Latest reports</h2>"
            + _table(REPORT_HEAD, [_report_row(x) for x in latest], tid="reports")
        )
        return _page("Victim", "/victim", body)

    @r.get("/dashboard/chart/victim.svg", dependencies=guarded)
    async def victim_chart(request: Request) -> Response:
        from overflowd.dashboard.series import victim_series

        params = params_of(request)
        measure = request.query_params.get("measure", "packets")
        if measure not in ("packets", "bytes"):
            raise HTTPException(400, "measure: packets or bytes")
        series = await anyio.to_thread.run_sync(
            lambda: victim_series(ctx.store, make(params), now_ms=int(time.time() * 1000))
        )
        index = 1 if measure == "packets" else 2
        title = f"Estimated {measure}/s by observer (dashed: 95% band)"
        note = ""
        if series.outside_reports:
            # flows said to end past the axis (until, or now): not drawn, or one report
            # ending in year 292 million would squash the whole chart into its first pixel
            amount = series.outside_packets if measure == "packets" else series.outside_bytes
            note = (
                f"not drawn: {series.outside_reports} report"
                f"{'s' if series.outside_reports != 1 else ''} ending after the axis "
                f"({svg.number(amount)} {measure})"
            )
        body = svg.stacked_chart(
            title,
            f"{measure}/s",
            [s / 1000 for s in series.starts],
            [(st[0], st[index]) for st in series.stacks],  # type: ignore[misc]
            series.band_packets if measure == "packets" else series.band_bytes,
            note=note,
        )
        return Response(body, media_type="image/svg+xml", headers=HEADERS)

    # -- Reports ---------------------------------------------------------------------------

    @r.get("/reports", dependencies=guarded)
    async def reports(request: Request) -> HTMLResponse:
        from overflowd.store.query import FOOTER_COUNT_CAP, count_reports_capped, find_reports

        params = params_of(request)
        limit = int_param(request, "limit", REPORT_ROWS, MAX_REPORT_ROWS)

        def answer() -> tuple[int, list[StoredReport], int]:
            flt = make(params)
            cursor = ctx.store.last_seq()  # before the rows: nothing after it is missed
            rows = find_reports(ctx.store, flt, limit=limit)
            return cursor, rows, count_reports_capped(ctx.store, flt)

        cursor, rows, counted = await anyio.to_thread.run_sync(answer)
        # an exact count of every match, up to the cap (a million rows cost PostgreSQL ~200 ms)
        total = f"more than {FOOTER_COUNT_CAP:,}" if counted > FOOTER_COUNT_CAP else str(counted)
        form = _filter_form(
            "/reports", {**params, "limit": str(limit)},
            ("prefix", "src", "dst", "proto", "port", "since", "kind", "min_trust", "limit"),
        )  # fmt: skip
        qs = _query(params)
        body = (
            form
            + f'<p id=live data-next="{cursor}" data-query="{escape(qs)}" data-limit="{limit}">'
            f"{len(rows)} of {total} reports, newest flow first · "
            f"<span id=live-state>live: new reports appear at the top (JavaScript)</span> · "
            f'<a href="/v1/reports?{_query(params, order="flow", limit=limit)}">JSON</a> · export '
            f'<a href="/dashboard/export/xarf?{qs}">XARF</a> '
            f'<a href="/dashboard/export/stix?{qs}">STIX</a></p>'
            + _table(REPORT_HEAD, [_report_row(x) for x in rows], tid="reports")
        )
        return _page("Reports", "/reports", body, scripts=("live.js",))

    @r.get("/dashboard/reports/rows", dependencies=guarded)
    async def report_rows(request: Request) -> JSONResponse:
        """New reports after a cursor, as table rows: what live.js polls."""
        from overflowd.store.query import page_reports
        from overflowd.store.repository import MAX_SEQ, CursorAhead

        params = params_of(request)
        after = int_param(request, "after", 0, MAX_SEQ)

        def answer() -> tuple[list[StoredReport], int]:
            return page_reports(ctx.store, make(params), after=after, limit=LIVE_ROWS)

        try:
            rows, nxt = await anyio.to_thread.run_sync(answer)
        except CursorAhead as exc:
            raise HTTPException(409, f"after: {exc}") from None
        html = "".join(
            "<tr class=new>" + "".join(f"<td>{c}</td>" for c in _report_row(x)) + "</tr>"
            for x in reversed(rows)
        )
        return JSONResponse({"next": nxt, "count": len(rows), "rows": html}, headers=HEADERS)

    @r.get("/dashboard/report/{seq}.json", dependencies=guarded)
    async def report_json_route(seq: int) -> JSONResponse:
        from overflowd.answers import report_json

        row = await anyio.to_thread.run_sync(lambda: _by_seq(ctx, seq))
        return JSONResponse(report_json(row), headers=HEADERS)

    @r.get("/dashboard/report/{seq}.cose", dependencies=guarded)
    async def report_cose(seq: int) -> Response:
        from overflowd.formats import COSE_MEDIA_TYPE

        row = await anyio.to_thread.run_sync(lambda: _by_seq(ctx, seq))
        return Response(
            row.cose,
            media_type=COSE_MEDIA_TYPE,
            headers={**HEADERS, "content-disposition": f'attachment; filename="report-{seq}.cose"'},
        )

    @r.get("/dashboard/export/{fmt}", dependencies=guarded)
    async def export(fmt: str, request: Request) -> Response:
        from overflowd.formats import FormatError, stix_bundle, xarf_reports
        from overflowd.store.query import find_reports

        if fmt not in ("xarf", "stix"):
            raise HTTPException(404, "export formats: xarf, stix")
        params = params_of(request)

        def answer() -> str:
            rows = find_reports(ctx.store, make(params), limit=EXPORT_LIMIT)
            signed = [x.signed_report() for x in rows]
            if fmt == "stix":
                return json.dumps(stix_bundle(signed, skip_unwritable=True)) + "\n"
            # XARF names who files the reports: ?reporter_contact=, else this node's first
            # e-mail contact, else each report's observer (refused if it has none)
            contact = request.query_params.get("reporter_contact") or next(
                (c for c in ctx.contacts if "@" in c), None
            )
            docs = xarf_reports(signed, reporter_contact=contact, skip_unfit=True)
            return "".join(json.dumps(d) + "\n" for d in docs)

        try:
            text = await anyio.to_thread.run_sync(answer)
        except FormatError as exc:
            raise HTTPException(422, f"{fmt}: {exc}"[:300]) from None
        kind = "application/json" if fmt == "stix" else "application/x-ndjson"
        name = "reports.stix.json" if fmt == "stix" else "reports.xarf.jsonl"
        return Response(
            text,
            media_type=kind,
            headers={**HEADERS, "content-disposition": f'attachment; filename="{name}"'},
        )

    # -- Peers -----------------------------------------------------------------------------

    @r.get("/peers", dependencies=guarded)
    async def peers() -> HTMLResponse:
        from overflowd.peers import MAX_PEER_RECORDS
        from overflowd.store.peers import list_records

        table = _peer_table(ctx.collectors)
        records = await anyio.to_thread.run_sync(
            lambda: list_records(ctx.store, limit=MAX_PEER_RECORDS)
        )
        if table is None:
            counts = "<p>No peers configured (<code>[[peers]]</code> in overflowd.toml).</p>"
        else:
            head, rows = table
            counts = _table(head, rows, tid="peers")
        body = (
            counts + f"<p>{len(records)} signed node records of peers held "
            '(<a href="/v1/peers">/v1/peers</a>); every counter is also in '
            '<a href="/metrics">/metrics</a>.</p>'
        )
        return _page("Peers", "/peers", body)

    # -- static, login ---------------------------------------------------------------------

    kinds = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
    statics = {n: _static(n) for n in ("live.js", "dash.css", "icon.svg")}

    @open_r.get("/dashboard/static/{name}")
    def static(name: str) -> Response:
        if name not in statics:
            raise HTTPException(404, "not found")
        return Response(
            statics[name],
            media_type=kinds[name.rsplit(".", 1)[1]],
            headers={**HEADERS, "cache-control": "max-age=300"},
        )

    @open_r.get("/login")
    def login_form() -> HTMLResponse:
        return _page(
            "Operator token", "",
            '<form method=post action="/login"><label>token <input type=password name=token '
            "size=40 autocomplete=current-password></label> <button type=submit>Sign in"
            "</button></form><p>The value of <code>api.dashboard_token</code>.</p>",
        )  # fmt: skip

    @open_r.post("/login")
    async def login(request: Request) -> Response:
        from overflowd.services.api_peers import read_capped

        # Capped while read (request.body() held all of a client's bytes before the length
        # was looked at: an open route, so anyone's megabytes)
        body = await read_capped(request, 4096)
        if body is None:
            raise HTTPException(413, "too long")
        token = urllib.parse.parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
        if not gate.token or not hmac.compare_digest(token.encode(), gate.token.encode()):
            raise HTTPException(401, "wrong token")
        answer = RedirectResponse("/", status_code=303, headers=HEADERS)
        secure = settings.tls_certificate_file != ""
        answer.set_cookie(
            COOKIE, token, httponly=True, samesite="strict", secure=secure, max_age=7 * 86400
        )
        return answer

    r.include_router(open_r)
    return r


def _chart_img(params: Mapping[str, str | None], measure: str) -> str:
    return (
        f'<img class=chart src="/dashboard/chart/victim.svg?{_query(params, measure=measure)}" '
        f'alt="estimated {measure} per second" width="{svg.WIDTH}" height="{svg.HEIGHT}">'
    )


def _by_seq(ctx: ApiContext, seq: int) -> StoredReport:
    from overflowd.store.query import ReportFilter, page_reports
    from overflowd.store.repository import MAX_SEQ, CursorAhead

    if not 1 <= seq <= MAX_SEQ:
        raise HTTPException(404, "no such report")
    try:
        rows, _ = page_reports(ctx.store, ReportFilter(), after=seq - 1, limit=1)
    except CursorAhead:  # a number this store has not given yet
        raise HTTPException(404, "no such report") from None
    if not rows or rows[0].seq != seq:
        raise HTTPException(404, "no such report")
    return rows[0]


def _peer_table(collectors: Sequence[Any]) -> tuple[list[str], list[list[str]]] | None:
    """Every metric sample with a ``peer`` label, one row per peer, one column per metric
    (and its other label, as ``posts/ok``): the same numbers as /metrics. The latency
    windows (services/peer_latency.py) are one column, ``latency``, in milliseconds."""
    from overflowd.services.peer_latency import FAMILIES, latency_of_collectors

    latency = latency_of_collectors(collectors)
    columns: dict[str, None] = {}
    cells: dict[str, dict[str, float]] = {}
    for collector in collectors:
        for family in collector.collect():
            if family.name in FAMILIES or family.name.removesuffix("_window") in FAMILIES:
                continue
            for sample in family.samples:
                peer = sample.labels.get("peer")
                if peer is None or sample.name.endswith("_created"):
                    continue
                name = sample.name.removeprefix("overflowd_peer_").removesuffix("_total")
                rest = [v for k, v in sorted(sample.labels.items()) if k != "peer"]
                column = "/".join([name, *rest])
                columns.setdefault(column, None)
                row = cells.setdefault(peer, {})
                row[column] = row.get(column, 0.0) + sample.value
    if not cells:
        return None
    head = ["peer", "latency (ms)", *columns]
    rows = [
        [
            f"<code>{escape(peer)}</code>",
            _latency_cell(latency.get(peer, {})),
            *(_num(cells[peer].get(c), cells[peer].get(c)) for c in columns),
        ]
        for peer in sorted(cells)
    ]
    return head, rows


def _latency_cell(lat: dict[str, float | None]) -> str:
    """``push rtt 301/305 · delivery age 320 · pull rtt -`` (p50/max, p50, p50; ms)."""

    def ms(key: str) -> str:
        v = lat.get(key)
        return "-" if v is None else f"{v * 1000:.0f}"

    return (
        f"push rtt {ms('push_rtt_p50')}/{ms('push_rtt_max')} · "
        f"delivery age {ms('delivery_age_p50')} · pull rtt {ms('pull_rtt_p50')}"
    )


__all__ = ["CSP", "Gate", "loopback_host", "router"]
