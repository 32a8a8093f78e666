"""``overflowd-query reports|who|top`` on a seeded store: the filters, the rows, the footers.

Most tests call the CLI's ``main(argv)`` in this process (the same parsing and printing a
user's process runs, without a second of start-up each); the table and ``--follow`` run as
real processes, as a person runs them.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overflowd import report as rpt
from overflowd.answers import count_line, make_filter, who_json
from overflowd.cli import query
from overflowd.identity import NodeIdentity
from overflowd.store import Store
from overflowd.store.query import ReportFilter, who
from tests.support.cli import BIN
from tests.support.query_reports import BASE_MS, HOUR_MS, Seeded, matches, seed_store
from tests.support.reports import make_payload

N = 300


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Seeded, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('query-cli') / 'overflowd.db'}"
    with Store.open(url) as store:
        yield seed_store(store, N, seed=7), url


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = query.main(list(argv))
    except SystemExit as exc:  # argparse's own usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def iso(ms: int) -> str:
    return rpt.iso_ms(ms)


def expected(seeded: Seeded, flt: ReportFilter) -> list[str]:
    """What the filter means, in the CLI's order: the newest flow first, then the newest stored."""
    rows = [r for r in seeded.reports if matches(r, flt)]
    rows.sort(key=lambda r: (-r.last_ms, -r.seq))
    return [r.report_id for r in rows]


def fingerprint(seeded: Seeded, i: int) -> str:
    return seeded.identities[i].fingerprint


FILTERS: list[tuple[list[str], dict[str, Any]]] = [
    ([], {}),
    (["--since", iso(BASE_MS + 2 * HOUR_MS)], {"since_ms": BASE_MS + 2 * HOUR_MS}),
    (["--until", iso(BASE_MS + HOUR_MS)], {"until_ms": BASE_MS + HOUR_MS}),
    (
        ["--since", iso(BASE_MS + HOUR_MS), "--until", iso(BASE_MS + 90 * 60_000)],
        {"since_ms": BASE_MS + HOUR_MS, "until_ms": BASE_MS + 90 * 60_000},
    ),
    (["--received-since", iso(BASE_MS + 3 * HOUR_MS)],
     {"received_since_ms": BASE_MS + 3 * HOUR_MS}),
    (["--dst", "198.51.100.0/24"], {"dst": "198.51.100.0/24"}),
    (["--src", "2001:db8:1::/48"], {"src": "2001:db8:1::/48"}),
    (["--prefix", "203.0.113.0/24"], {"either": "203.0.113.0/24"}),
    (["--proto", "tcp", "--port", "443"], {"proto": 6, "port": 443}),
    (["--proto", "1"], {"proto": 1}),
    (["--sport", "53", "--dport", "123"], {"sport": 53, "dport": 123}),
    (["--kind", "ddos-suspect"], {"kind": "ddos-suspect"}),
    (["--min-trust", "dns"], {"min_trust": "dns"}),
    (["--min-trust", "pinned", "--dst", "2001:db8:ff::/48"],
     {"min_trust": "pinned", "dst": "2001:db8:ff::/48"}),
]  # fmt: skip


def _filter(fields: dict[str, Any]) -> ReportFilter:
    nets = {k: ipaddress.ip_network(v) for k, v in fields.items() if k in ("src", "dst", "either")}
    return ReportFilter(**{**fields, **nets})


@pytest.mark.parametrize(
    ("flags", "fields"), FILTERS, ids=lambda x: " ".join(x) if isinstance(x, list) else ""
)
def test_each_filter_selects_what_it_means_newest_flow_first(
    seeded: tuple[Seeded, str], capsys: pytest.CaptureFixture[str], flags: list[str],
    fields: dict[str, Any],
) -> None:  # fmt: skip
    data, url = seeded
    want = expected(data, _filter(fields))
    assert 0 < len(want) < N or not flags, "the filter must select some reports, not all"
    code, out, err = cli(capsys, "reports", "--db", url, "--json", *flags)
    assert code == 0, err
    got = [json.loads(line)["report"]["id"] for line in out.splitlines()]
    assert got == want
    assert err.strip() == count_line(len(want), len(want), "report")


def test_observer_by_fingerprint_prefix_and_by_key(
    seeded: tuple[Seeded, str], capsys: pytest.CaptureFixture[str]
) -> None:
    data, url = seeded
    ident = data.identities[1]
    want = expected(data, ReportFilter(observers=(ident.public_key,)))
    for name in (ident.fingerprint[:9], ident.fingerprint, ident.public_key_b64):
        code, out, err = cli(capsys, "reports", "--db", url, "--json", "--observer", name)
        assert code == 0, err
        assert [json.loads(line)["report"]["id"] for line in out.splitlines()] == want


def test_limit_says_n_of_m_and_the_table_shows_the_flows_time(seeded: tuple[Seeded, str]) -> None:
    data, url = seeded
    done = subprocess.run(
        [str(BIN / "overflowd-query"), "reports", "--db", url, "--limit", "5"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == f"5 of {N} reports"
    header, *lines = done.stdout.splitlines()
    assert header.split()[:4] == ["FLOW", "START", "(UTC)", "DUR"] and len(lines) == 5
    newest = sorted(data.reports, key=lambda r: (-r.last_ms, -r.seq))[:5]
    for line, row in zip(lines, newest, strict=True):
        # the flow's first packet (2023), not when this store received it
        assert line.startswith(iso(row.first_ms)[:19].replace("T", " "))
        assert row.report_id[:12] in line and str(row.src) in line
        assert line == line.rstrip(), "no padding after the last column into a pipe"


BAD = [
    (["reports", "--since", "yesterday"], "--since"),
    (["reports", "--until", "2026-13-01"], "--until"),
    (["reports", "--received-since", "-5m"], "--received-since"),
    (["reports", "--dst", "10.0.0.0/33"], "--dst"),
    (["reports", "--src", "nope"], "--src"),
    (["reports", "--prefix", "::1/200"], "--prefix"),
    (["reports", "--proto", "tcpp"], "--proto"),
    (["reports", "--proto", "256"], "--proto"),
    (["reports", "--port", "65536"], "--port"),
    (["reports", "--dport", "x"], "--dport"),
    (["reports", "--kind", "Flow Seen"], "--kind"),
    (["reports", "--observer", "zz"], "--observer"),
    (["reports", "--observer", "0000-0000"], "--observer"),
    (["reports", "--min-trust", "high"], "--min-trust"),
    (["reports", "--limit", "0"], "--limit"),
    (["reports", "--limit", "1e23"], "--limit"),
    (["reports", "--poll-interval", "0"], "--poll-interval"),
    (["reports", "--format", "pdf"], "--format"),
    (["reports", "--json", "--csv"], "--csv"),
    (["reports", "--since", "2026-01-02T00:00:00Z", "--until", "2026-01-01T00:00:00Z"], "--until"),
    (["reports", "--follow", "--format", "stix"], "--follow"),
    (["reports", "--format", "xarf", "--reporter-contact", "nope"], "--reporter-contact"),
    (["reports", "--format", "stix", "--reporter-name", "X"], "--reporter-name"),
    (["who", "--prefix-len", "33"], "--prefix-len"),
    (["who", "--format", "xarf"], "--format"),
    (["top", "--by", "color"], "--by"),
    (["top"], "--by"),
    (["top", "--by", "src", "-n", "0"], "-n"),
    (["reports", "--remote", "ftp://x"], "--remote"),
]


@pytest.mark.parametrize(
    ("argv", "flag"), BAD, ids=lambda x: " ".join(x) if isinstance(x, list) else x
)
def test_a_bad_value_is_one_line_naming_the_flag_exit_2(
    seeded: tuple[Seeded, str], capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    _, url = seeded
    code, out, err = cli(capsys, *argv, "--db", url)
    assert code == 2, err
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("overflowd-query") and " error: " in err, err
    assert flag in err, err


def test_who_is_per_observer_largest_first_with_contacts_and_intervals(
    seeded: tuple[Seeded, str], capsys: pytest.CaptureFixture[str]
) -> None:
    data, url = seeded
    code, out, err = cli(capsys, "who", "--db", url, "--dst", "198.51.100.0/24", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    flt = make_filter({"dst": "198.51.100.0/24"}, now_ms=0, observers=lambda t: ())
    assert rows == [who_json(r) for r in who(data.store, flt, top_sources=3)]
    matching = [r for r in data.reports if matches(r, flt)]
    assert len(rows) == 3 and sum(r["reports"] for r in rows) == len(matching)
    packets = [r["packets"]["estimate"] for r in rows]
    assert packets == sorted(packets, reverse=True)
    for row in rows:
        mine = [
            r
            for r in matching
            if rpt.key_fingerprint(r.observer_key) == row["observer"]["fingerprint"]
        ]
        assert row["reports"] == len(mine)
        assert row["first"] == iso(min(r.first_ms for r in mine))
        assert row["last"] == iso(max(r.last_ms for r in mine))
        index = [i.fingerprint for i in data.identities].index(row["observer"]["fingerprint"])
        assert row["contacts"] == [f"mailto:abuse@obs{index}.example"]
        assert (
            row["packets"]["low"] <= row["packets"]["estimate"] <= (row["packets"]["high"] or 1e300)
        )
        sources = [ipaddress.ip_network(s["prefix"]) for s in row["top_sources"]]
        assert sources and all(any(r.src in net for r in mine) for net in sources)
    assert err.strip() == f"3 observers, {len(matching)} reports"
    # the table for people: one line per observer, in the same order
    code, out, _ = cli(capsys, "who", "--db", url, "--dst", "198.51.100.0/24")
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        r["observer"]["fingerprint"] for r in rows
    ]


def test_top_n_then_other_and_by_bytes(
    seeded: tuple[Seeded, str], capsys: pytest.CaptureFixture[str]
) -> None:
    data, url = seeded
    code, out, err = cli(capsys, "top", "--db", url, "--by", "dstport", "-n", "3", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3, None] and rows[-1]["key"] == "other"
    assert sum(r["reports"] for r in rows) == N
    by_port = {r["key"]: r["reports"] for r in rows[:3]}
    for port, count in by_port.items():
        assert count == sum(1 for r in data.reports if r.dport == port)
    packets = [r["packets"]["estimate"] for r in rows[:3]]
    assert packets == sorted(packets, reverse=True)
    assert err.strip() == "3 of 6 groups by dstport, ranked by packets"
    code, out, _ = cli(
        capsys, "top", "--db", url, "--by", "src", "--prefix-len", "16", "--bytes", "--json"
    )
    rows = [json.loads(line) for line in out.splitlines()]
    sizes = [r["bytes"]["estimate"] for r in rows if r["rank"] is not None]
    assert sizes == sorted(sizes, reverse=True)
    assert {r["key"] for r in rows} >= {"192.0.0.0/16", "2001:db8::/40"}
    code, out, _ = cli(capsys, "top", "--db", url, "--by", "proto", "--csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert {(r["key"], r["name"]) for r in table} == {("6", "tcp"), ("17", "udp"), ("1", "icmp")}


def test_csv_has_a_header_and_one_row_per_report(
    seeded: tuple[Seeded, str], capsys: pytest.CaptureFixture[str]
) -> None:
    data, url = seeded
    code, out, err = cli(
        capsys, "reports", "--db", url, "--csv", "--kind", "flow-seen", "--limit", "7"
    )
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    want = expected(data, ReportFilter(kind="flow-seen"))
    assert [r["id"] for r in rows] == want[:7]
    assert rows[0]["first"].endswith("Z") and rows[0]["first"].startswith("2023-11-1")
    assert err.strip() == f"7 of {len(want)} reports"


def test_follow_prints_new_reports_once_then_ctrl_c_exits_0(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'overflowd.db'}"
    observer = NodeIdentity.generate()
    now_ms = int(time.time() * 1000)

    def batch(dst: str, n: int) -> list[tuple[rpt.SignedReport, int, str]]:
        return [
            (observer.sign_report(make_payload("192.0.2.9", dst)), now_ms, "udp") for _ in range(n)
        ]

    with Store.open(url) as store:
        store.add_reports(batch("198.51.100.1", 3))
        proc = subprocess.Popen(
            [str(BIN / "overflowd-query"), "reports", "--db", url, "--dst", "198.51.100.0/24",
             "--json", "--follow", "--poll-interval", "0.1"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            lines = [proc.stdout.readline() for _ in range(3)]  # the answer so far
            later = batch("198.51.100.2", 4) + batch("203.0.113.1", 5)  # 5 that do not match
            store.add_reports(later[:6])
            store.add_reports(later[6:])
            deadline = time.monotonic() + 30
            while len(lines) < 7 and time.monotonic() < deadline:
                lines.append(proc.stdout.readline())
            proc.send_signal(signal.SIGINT)
            rest, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
    ids = [json.loads(line)["report"]["id"] for line in lines + rest.splitlines()]
    assert len(ids) == len(set(ids)) == 7
    assert set(ids[3:]) == {r.report_id for r, _, _ in later[:4]}
    assert proc.returncode == 0, err
    assert "Traceback" not in err and err.splitlines()[0] == "3 reports"


@pytest.mark.parametrize("fmt", ["xarf", "stix"])
def test_xarf_and_stix_carry_every_selected_report_and_its_cose_verifies(
    seeded: tuple[Seeded, str], capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    from overflowd.formats import cose_from_stix, cose_from_xarf
    from overflowd.identity import verify_report

    data, url = seeded
    flags = ["--dst", "198.51.100.0/24", "--proto", "udp", "--limit", "40"]
    if fmt == "xarf":
        flags += ["--reporter-contact", "abuse@victim.example"]
    code, out, err = cli(capsys, "reports", "--db", url, "--format", fmt, *flags)
    assert code == 0, err
    if fmt == "xarf":
        docs = [json.loads(line) for line in out.splitlines()]
        assert docs and all(d["reporter"]["contact"] == "abuse@victim.example" for d in docs)
        coses = cose_from_xarf(docs)
    else:
        coses = cose_from_stix(json.loads(out))
    want = expected(data, ReportFilter(dst=ipaddress.ip_network("198.51.100.0/24"), proto=17))
    assert sorted(verify_report(c).report_id for c in coses) == sorted(want[:40])
    assert err.splitlines()[0] == f"40 of {len(want)} reports"


def test_verify_reads_a_line_of_reports_json(
    seeded: tuple[Seeded, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.support.cli import run

    _, url = seeded
    code, out, err = cli(capsys, "reports", "--db", url, "--json", "--limit", "1")
    assert code == 0, err
    checked = run("overflowd-query", "verify", "-", stdin=out.encode())
    assert checked.code == 0, checked.err
    assert json.loads(checked.out)["id"] == json.loads(out)["report"]["id"]
