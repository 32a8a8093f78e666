"""The same question three ways: the CLI on the store, the CLI with --remote, the node's API.

One daemon (``overflowd run --api``) serves a seeded store for the whole module; the CLI asks
the same database directly and through the API. They must print the same bytes, and the API's
objects must be the CLI's ``--json`` lines. Paging by cursor must see every matching report
exactly once while a writer keeps storing.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from overflowd import report as rpt
from overflowd.answers import make_filter
from overflowd.cli import query
from overflowd.identity import NodeIdentity
from overflowd.store import Store
from overflowd.store.query import find_reports
from overflowd.store.repository import default_url
from tests.service.test_daemon import Daemon
from tests.support.cli import BIN, run
from tests.support.query_reports import BASE_MS, HOUR_MS, Seeded, seed_store
from tests.support.reports import make_payload

N = 400


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Seeded, str, str]]:
    """(the seeded store, its URL, the daemon's API base URL), for tests that only read."""
    home = tmp_path_factory.mktemp("query-remote") / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    # The seeded reports arrived in 2023: keep them (the daemon prunes by arrival age).
    (home / "overflowd.toml").write_text(
        "[storage]\nreceived_max_age_days = 36500.0\nown_max_age_days = 36500.0\n"
    )
    url = default_url(home)
    with Store.open(url) as store:
        data = seed_store(store, N, seed=5)
        daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
        try:
            yield data, url, daemon.line("api ").split()[1].rstrip("/")
        finally:
            code, output = daemon.stop()
            assert code == 0, output


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = query.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def iso(ms: int) -> str:
    return rpt.iso_ms(ms)


def _params(flags: list[str]) -> dict[str, str]:
    """The query parameters for CLI flags: the same names, with underscores."""
    out = {}
    for name, value in zip(flags[::2], flags[1::2], strict=True):
        out[{"-n": "n", "--bytes": "measure"}.get(name, name[2:].replace("-", "_"))] = value
    return out


QUESTIONS = [
    ["reports", "--dst", "198.51.100.0/24"],
    ["reports", "--limit", "25", "--min-trust", "continuity", "--since", iso(BASE_MS + HOUR_MS)],
    ["reports", "--proto", "udp", "--port", "53", "--until", iso(BASE_MS + 3 * HOUR_MS)],
    ["reports", "--limit", "1500"],
    ["who", "--dst", "198.51.100.0/24"],
    ["who", "--prefix", "2001:db8::/32", "--prefix-len", "16", "--kind", "flow-seen"],
    ["top", "--by", "src", "-n", "3"],
    ["top", "--by", "observer", "--received-since", iso(BASE_MS + 2 * HOUR_MS)],
    ["top", "--by", "dstport", "--min-trust", "dns"],
]


@pytest.mark.parametrize("question", QUESTIONS, ids=" ".join)
def test_the_cli_remote_and_the_api_answer_alike(
    node: tuple[Seeded, str, str], capsys: pytest.CaptureFixture[str], question: list[str]
) -> None:
    _, url, api = node
    # every output for every question but the largest (its JSON is the same rows as the rest)
    formats: list[list[str]] = [["--json"]] if "1500" in question else [["--json"], [], ["--csv"]]
    if question[0] == "reports" and "25" in question:  # one is enough: they render --json's
        formats += [["--format", "xarf"], ["--format", "stix"]]
    for fmt in formats:
        local = cli(capsys, *question, "--db", url, *fmt)
        remote = cli(capsys, *question, "--remote", api + "/", *fmt)
        assert local[0] == 0, local[2]
        assert remote == local
    lines = [json.loads(line) for line in local_json(capsys, url, question)]
    assert lines, "the question must have an answer"
    command, flags = question[0], question[1:]
    params = _params(flags)
    with httpx.Client(timeout=10) as client:
        if command == "reports":
            if "limit" in params and int(params["limit"]) <= 1000:
                page = client.get(f"{api}/reports", params={**params, "order": "flow"}).json()
                assert page["reports"] == lines and page["total"] >= len(lines)
            else:
                params.pop("limit", None)
                got = page_all(client, api, params)
                got.sort(key=lambda o: (-o["report"]["flow"]["last_ms"], -o["seq"]))
                assert got[: len(lines)] == lines
        elif command == "who":
            answer = client.get(f"{api}/who", params=params).json()
            assert answer["observers"] == lines
        else:
            answer = client.get(f"{api}/top", params=params).json()
            assert answer["rows"] == lines


def local_json(capsys: pytest.CaptureFixture[str], url: str, question: list[str]) -> list[str]:
    code, out, err = cli(capsys, *question, "--db", url, "--json")
    assert code == 0, err
    return out.splitlines()


def page_all(
    client: httpx.Client, api: str, params: dict[str, str], limit: int = 1000
) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    after = 0
    while True:
        answer = client.get(f"{api}/reports", params={**params, "after": after, "limit": limit})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        got.extend(body["reports"])
        assert body["next"] >= after
        after = body["next"]
        if len(body["reports"]) < limit:
            return got


@pytest.mark.parametrize(
    ("path", "params", "status", "names"),
    [
        ("who", {"since": "yesterday"}, 400, "since"),
        ("reports", {"min_trust": "high"}, 400, "min_trust"),
        ("reports", {"proto": "tcpp"}, 400, "proto"),
        ("reports", {"observer": "0000-0000"}, 400, "observer"),
        ("reports", {"order": "random"}, 422, "order"),
        ("top", {"by": "color"}, 422, "by"),
        ("top", {}, 422, "by"),
        ("top", {"by": "src", "n": 0}, 422, "n"),
        ("who", {"prefix_len": 33}, 422, "prefix_len"),
    ],
)
def test_a_bad_parameter_is_refused_naming_it(
    node: tuple[Seeded, str, str], path: str, params: dict[str, object], status: int, names: str
) -> None:
    _, _, api = node
    answer = httpx.get(f"{api}/{path}", params=params, timeout=10)
    assert answer.status_code == status, answer.text
    assert names in answer.text


def test_remote_failures_are_one_line_naming_the_url(
    node: tuple[Seeded, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, api = node
    code, out, err = cli(capsys, "reports", "--remote", "http://127.0.0.1:9")
    assert (code, out) == (1, "") and err.count("\n") == 1
    assert "http://127.0.0.1:9/v1/reports: cannot connect" in err
    code, out, err = cli(capsys, "who", "--remote", api.removesuffix("/v1") + "/elsewhere")
    assert (code, out) == (1, "") and err.count("\n") == 1 and "HTTP 404" in err
    assert "/elsewhere/v1/who" in err
    # a value only the node can refuse (it holds the observers): usage, as it is locally
    code, out, err = cli(capsys, "reports", "--remote", api, "--observer", "0000-0000")
    assert (code, out) == (2, "") and err.count("\n") == 1 and "observer" in err


def test_paging_is_complete_and_stable_while_a_writer_stores(
    node: tuple[Seeded, str, str],
) -> None:
    data, url, api = node
    observer = NodeIdentity.generate()
    stop = threading.Event()
    now_ms = int(time.time() * 1000)

    def write() -> None:
        with Store.open(url) as store:
            for i in range(30):
                store.add_reports(
                    [
                        (observer.sign_report(make_payload(f"192.0.2.{j}", f"100.64.{j % 2}.{i}")),
                         now_ms, "udp")
                        for j in range(8)
                    ]
                )  # fmt: skip
                time.sleep(0.01)
        stop.set()

    writer = threading.Thread(target=write)
    got: list[dict[str, Any]] = []
    after = 0
    params = {"dst": "100.64.0.0/24", "limit": 7}
    with httpx.Client(timeout=10) as client:
        writer.start()
        try:
            while True:
                done = stop.is_set()  # read before the page: a short page after it is final
                body = client.get(f"{api}/reports", params={**params, "after": after}).json()
                got.extend(body["reports"])
                after = body["next"]
                if done and len(body["reports"]) < params["limit"]:
                    break
        finally:
            writer.join(timeout=60)
    ids = [o["report"]["id"] for o in got]
    seqs = [o["seq"] for o in got]
    assert seqs == sorted(seqs) and len(set(ids)) == len(ids)
    flt = make_filter({"dst": "100.64.0.0/24"}, now_ms=now_ms, observers=lambda t: ())
    want = {r.report_id for r in find_reports(data.store, flt)}
    assert len(want) == 30 * 4 and set(ids) == want


def test_follow_remote_prints_what_is_stored_then_ctrl_c_exits_0(
    node: tuple[Seeded, str, str],
) -> None:
    _, url, api = node
    observer = NodeIdentity.generate()
    now_ms = int(time.time() * 1000)
    proc = subprocess.Popen(
        [str(BIN / "overflowd-query"), "reports", "--remote", api, "--dst", "100.65.0.0/16",
         "--json", "--follow", "--poll-interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline() == "0 reports\n"  # the answer so far: none yet
        batch = [
            (observer.sign_report(make_payload("192.0.2.1", f"100.6{5 + i % 2}.0.{i}")), now_ms,
             "udp")
            for i in range(10)
        ]  # fmt: skip
        with Store.open(url) as store:
            store.add_reports(batch)
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 30
        while len(lines) < 5 and time.monotonic() < deadline:
            lines.append(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    ids = [json.loads(line)["report"]["id"] for line in lines + rest.splitlines()]
    assert sorted(ids) == sorted(r.report_id for r, _, _ in batch[::2])
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_the_seeded_store_reaches_the_api_whole(node: tuple[Seeded, str, str]) -> None:
    data, _, api = node
    with httpx.Client(timeout=10) as client:
        got = page_all(client, api, {"received_until": iso(BASE_MS + 9 * HOUR_MS)}, limit=97)
    assert {o["report"]["id"] for o in got} == {r.report_id for r in data.reports}


def test_the_api_reads_relative_times_as_the_cli_does(node: tuple[Seeded, str, str]) -> None:
    data, _, api = node
    seeded_dst = {"dst": "198.51.100.0/24", "order": "flow", "limit": 1}
    want = sum(
        1 for r in data.reports if r.dst.version == 4 and str(r.dst).startswith("198.51.100.")
    )
    with httpx.Client(timeout=10) as client:
        # the seeded flows are of 2023: none in the last hour, all in the last 2000 weeks
        assert (
            client.get(f"{api}/reports", params={**seeded_dst, "since": "1h"}).json()["total"] == 0
        )
        assert (
            client.get(f"{api}/reports", params={**seeded_dst, "since": "2000w"}).json()["total"]
            == want
        )
        assert (
            client.get(f"{api}/reports", params={**seeded_dst, "until": "now"}).json()["total"]
            == want
        )
