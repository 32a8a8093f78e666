"""The dashboard in Debian's headless Chromium, against a running node fed with the shared trace.

One daemon (``overflowd run``, loopback only, nothing sent to a flow's addresses) and one
browser for the module. Every page loads with no console error (a CSP violation or a resource
that fails to load is one), the victim view of the trace's busiest destination shows what
``overflowd-query who`` says, the URL's filters are honoured, a new report appears on the
Reports page without a reload, and the tables are there with JavaScript off.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from overflowd import report as rpt
from tests.service.test_daemon import Daemon
from tests.support.chromium import Chromium
from tests.support.chromium import browser as start_browser
from tests.support.cli import run
from tests.support.trace import send_udp, trace_payloads

CONTACT = "mailto:abuse@example.net"


@dataclass
class Node:
    daemon: Daemon
    home: Path
    base: str
    payloads: list[bytes]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    home = tmp_path_factory.mktemp("dashboard") / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    # The trace's flows are from 2007: keep its reports (retention prunes by arrival only,
    # but the age settings are the test's own as in test_query_remote).
    (home / "overflowd.toml").write_text(
        f'[node]\ncontacts = ["{CONTACT}"]\nobservation_point = "dash-test"\n'
        "[storage]\nreceived_max_age_days = 36500.0\nown_max_age_days = 36500.0\n"
    )
    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--rate", "0.02")
    try:
        base = daemon.line("api ").split()[1].removesuffix("/v1/")
        payloads = trace_payloads()
        assert daemon.udp is not None
        send_udp(payloads, daemon.udp)
        assert daemon.wait_for("overflowd_decoder_records_total", 78684) == 78684
        # Every sampled record signed (or shed by the signing budget) and stored before a page
        # is asked for: waiting for the first signature let the tests start while the store
        # still filled (under load the busiest destination then had one report).
        sampled = daemon.metric("overflowd_sampler_sampled_total")
        assert sampled > 100
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            signed = daemon.metric("overflowd_reports_signed_total")
            if signed + daemon.metric("overflowd_reports_shed_total") >= sampled:
                break
            time.sleep(0.1)
        assert daemon.wait_for("overflowd_reports_stored_total", signed, timeout=30) == signed
        yield Node(daemon, home, base, payloads)
    finally:
        code, output = daemon.stop()
        assert code == 0, output


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    yield from start_browser()


def busiest_destination(node: Node) -> str:
    top = httpx.get(f"{node.base}/v1/top", params={"by": "dst", "n": 1}, timeout=10).json()
    return str(top["rows"][0]["key"])


def test_every_page_loads_with_no_console_error(node: Node, chromium: Chromium) -> None:
    dst = busiest_destination(node)
    page = chromium.page()
    try:
        for path, title in (
            ("/", "Node"),
            (f"/victim?dst={dst}", "Victim"),
            ("/victim", "Victim"),
            ("/reports", "Reports"),
            ("/peers", "Peers"),
            ("/login", "Operator token"),
        ):
            page.goto(node.base + path)
            assert page.eval("document.querySelector('h1').textContent") == title
            # every chart drawn (an <img> that failed has no natural width)
            assert page.eval("[...document.images].every(i => i.complete && i.naturalWidth > 0)"), (
                path
            )
        assert page.eval("document.querySelectorAll('section.chart img').length") == 0
        page.goto(node.base + "/")
        assert page.eval("document.querySelectorAll('section.chart img').length") == 8
        assert page.errors() == []
        # the watch sees what it must: a console error, and an inline script the CSP refuses
        page.eval("console.error('probe')")
        page.eval(
            "(() => { const s = document.createElement('script'); s.textContent = 'window.x = 1';"
            " document.body.append(s); return 1 })()"
        )
        page.wait_for("true")
        assert page.eval("window.x") is None
        found = " ".join(page.errors())
        assert "probe" in found and "Content Security Policy" in found, found
    finally:
        page.close()
    answer = httpx.get(node.base + "/", timeout=10)
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    assert "'unsafe-inline'" not in answer.headers["content-security-policy"]


def test_the_victim_view_shows_what_who_says(node: Node, chromium: Chromium) -> None:
    dst = busiest_destination(node)
    since = "2007-07-27T00:00:00Z"  # the trace's day (the view's default is the last hour)
    who = run("overflowd-query", "who", "--dst", dst, "--since", since, "--json", "--no-dns",
              home=node.home)  # fmt: skip
    assert who.code == 0, who.err
    lines = [json.loads(line) for line in who.out.splitlines()]
    assert lines
    page = chromium.page(javascript=False)
    try:
        page.goto(f"{node.base}/victim?dst={dst}")
        assert page.eval("document.querySelector('input[name=since]').value") == "1h"
        assert page.eval("document.querySelectorAll('#who tbody tr').length") == 0  # 2007
        page.goto(f"{node.base}/victim?dst={dst}&since={since}")
        rows = page.eval(
            """[...document.querySelectorAll('#who tbody tr')].map(tr => ({
                fp: tr.querySelector('code').textContent,
                values: [...tr.querySelectorAll('[data-value]')].map(e => Number(e.dataset.value)),
            }))"""
        )
        assert [r["fp"] for r in rows] == [o["observer"]["fingerprint"] for o in lines]
        for row, o in zip(rows, lines, strict=True):
            reports, packets, byte_count = row["values"]
            assert reports == o["reports"]
            assert packets == o["packets"]["estimate"]
            assert byte_count == o["bytes"]["estimate"]
        # the charts' series, added up over the span, are the same estimate
        chart = httpx.get(
            f"{node.base}/dashboard/chart/victim.svg",
            params={"dst": dst, "since": since},
            timeout=10,
        )
        assert chart.status_code == 200 and "<polygon" in chart.text
        assert page.errors() == []
    finally:
        page.close()


def test_filters_in_the_url_are_honoured(node: Node, chromium: Chromium) -> None:
    page = chromium.page()
    try:
        page.goto(f"{node.base}/reports?proto=udp&limit=7")
        protos = page.eval(
            "[...document.querySelectorAll('#reports tbody tr td:nth-child(8)')]"
            ".map(td => td.textContent)"
        )
        assert protos == ["udp"] * 7
        assert page.eval("document.querySelector('input[name=proto]').value") == "udp"
        api = httpx.get(
            f"{node.base}/v1/reports",
            params={"proto": "udp", "order": "flow", "limit": 7},
            timeout=10,
        ).json()
        seqs = page.eval(
            "[...document.querySelectorAll('#reports tbody tr td:first-child')]"
            ".map(td => Number(td.textContent))"
        )
        assert seqs == [r["seq"] for r in api["reports"]]
        live = page.eval("document.querySelector('#live').textContent")
        assert f"7 of {api['total']} reports" in live
        dst = busiest_destination(node)
        flows = httpx.get(
            f"{node.base}/v1/reports",
            params={"prefix": dst, "order": "flow", "limit": 1000},
            timeout=10,
        ).json()["reports"]
        ends = sorted(r["report"]["flow"]["last_ms"] for r in flows)
        since = rpt.iso_ms(ends[len(ends) // 2])  # half of its reports' flows end after
        page.goto(f"{node.base}/victim?prefix={dst}&since={since}")
        assert page.eval("document.querySelector('input[name=prefix]').value") == dst
        shown = page.eval("Number(document.querySelector('#who [data-value]').dataset.value)")
        who = run("overflowd-query", "who", "--prefix", dst, "--since", since, "--json",
                  "--no-dns", home=node.home)  # fmt: skip
        everything = run("overflowd-query", "who", "--prefix", dst, "--json", "--no-dns",
                         home=node.home)  # fmt: skip
        reports = [json.loads(line)["reports"] for line in who.out.splitlines()]
        assert shown == reports[0] < json.loads(everything.out.splitlines()[0])["reports"]
        assert httpx.get(f"{node.base}/reports?proto=nonsense", timeout=10).status_code == 400
    finally:
        page.close()


def test_a_new_report_appears_without_a_reload(node: Node, chromium: Chromium) -> None:
    page = chromium.page()
    try:
        page.goto(f"{node.base}/reports?limit=20")
        page.eval("window.stayed = 'the same document'")
        before = node.daemon.metric("overflowd_reports_stored_total")
        assert node.daemon.udp is not None
        send_udp(node.payloads[:300], node.daemon.udp)
        assert node.daemon.wait_for("overflowd_reports_stored_total", before + 1) > before
        page.wait_for("document.querySelectorAll('#reports tr.new').length > 0", timeout_s=15)
        assert page.eval("window.stayed") == "the same document"
        assert page.eval("document.querySelectorAll('#reports tbody tr').length") <= 20
        assert page.eval("document.getElementById('live-state').textContent").startswith("live: ")
        assert page.errors() == []
    finally:
        page.close()


def test_tables_are_there_with_javascript_off(node: Node, chromium: Chromium) -> None:
    page = chromium.page(javascript=False)
    try:
        for path, table in (("/reports", "#reports"), ("/", "#counters")):
            page.goto(node.base + path)
            assert page.eval(f"document.querySelectorAll('{table} tbody tr').length") > 0, path
        counters = page.eval(
            "Object.fromEntries([...document.querySelectorAll('#counters tbody tr')].map(tr =>"
            " [tr.cells[0].textContent, Number(tr.querySelector('[data-value]').dataset.value)]))"
        )
        assert counters["records:127.0.0.1"] == node.daemon.metric(
            "overflowd_decoder_records_total"
        )
        assert counters["signed"] == node.daemon.metric("overflowd_reports_signed_total")
        # the live line still says what it would do: nothing ran
        assert page.eval("1 + 1") == 2
        page.goto(node.base + "/reports")
        assert "JavaScript" in page.eval("document.getElementById('live-state').textContent")
        assert page.errors() == []
    finally:
        page.close()


def test_report_links_and_exports(node: Node) -> None:
    with httpx.Client(base_url=node.base, timeout=20) as client:
        first = client.get("/v1/reports", params={"limit": 1}).json()["reports"][0]
        as_json = client.get(f"/dashboard/report/{first['seq']}.json").json()
        assert as_json == first
        cose = client.get(f"/dashboard/report/{first['seq']}.cose")
        assert cose.headers["content-type"].startswith("application/cose")
        assert rpt.b64url(cose.content) == first["report"]["cose"]
        assert client.get("/dashboard/report/999999999.json").status_code == 404
        dst = busiest_destination(node)
        xarf = client.get("/dashboard/export/xarf", params={"dst": dst})
        assert xarf.status_code == 200, xarf.text
        docs = [json.loads(line) for line in xarf.text.splitlines()]
        assert docs and all(d["reporter"]["contact"] == "abuse@example.net" for d in docs)
        stix = client.get("/dashboard/export/stix", params={"dst": dst}).json()
        assert stix["type"] == "bundle"
