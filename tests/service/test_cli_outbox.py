"""The outbox for operators, through the console scripts: ``overflowd-query outbox``,
``overflowd outbox retry``, ``overflowd outbox enable``.

The commands' logic runs through their ``main(argv)`` in this process (``tests.support.cli.call``:
same parser, dispatch and exit codes, no Python start per command) on SQLite; the tests whose
SQL differs between backends (listing and selecting, retry by id and ``--all``, enable, and the
daemon's claim -> dead -> retry -> delivered) also run on PostgreSQL. What only a process shows
(exit status and streams of the real scripts, a read-only home, the documented examples) runs
the installed console scripts as processes.

Rows are made dead by the outbox's own functions here (the states a worker leaves), or, in the
daemon tests, by a real ``overflowd run`` delivering to a real HTTP server on 127.0.0.1 that
answers 400 or 410; the retry is then picked up by that running daemon. Every refused command
is one line, the right exit code, and leaves the store exactly as it was.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select

from overflowd.identity import load_identity
from overflowd.store import Store
from overflowd.store import outbox as ob
from overflowd.store.models import Base
from tests.service.test_cli_bad_input import _run_read_only, files, one_line
from tests.service.test_daemon import Daemon
from tests.support.cli import Result, call, run
from tests.support.reports import make_payload
from tests.support.trace import send_udp

URL_A = "http://127.0.0.1:9/a"  # dead: answered 400
URL_B = "http://127.0.0.1:9/b?x=1&y=2"  # one pending, one delivered
URL_GONE = "http://127.0.0.1:9/gone"  # answered 410: disabled, its rows dead


@pytest.fixture
def home(tmp_path: Path) -> Path:
    home = tmp_path / "node"
    assert call("overflowd", "init", "--home", str(home)).code == 0
    return home


@pytest.fixture
def sqlite_url(home: Path) -> str:
    """For the tests where the backend does not matter (the SQL they reach is shared with a
    test that runs on both): the node's own SQLite file."""
    return f"sqlite:///{home / 'overflowd.db'}"


@dataclass(frozen=True)
class Seeded:
    dead_a: list[int]
    pending_b: int
    delivered_b: int
    dead_gone: list[int]

    @property
    def total(self) -> int:
        return len(self.dead_a) + 2 + len(self.dead_gone)


def seed(home: Path, db_url: str) -> Seeded:
    """Rows in each state, as the delivery service leaves them (claimed, then marked)."""
    identity = load_identity(home)
    now = int(time.time() * 1000)

    def enqueue(store: Store, url: str, n: int) -> list[int]:
        for _ in range(n):
            ob.enqueue(store, identity.sign_report(make_payload()), [url], now_ms=now)
        claimed = ob.claim_due(store, now_ms=now, lease_ms=60_000, limit=100)
        return sorted(e.id for e in claimed)

    with Store.open(db_url) as store:
        dead_a = enqueue(store, URL_A, 3)
        for i in dead_a:
            assert ob.mark_dead(store, i, now_ms=now, error="HTTP 400: bad request", status=400)
        pending_b, delivered_b = enqueue(store, URL_B, 2)
        assert ob.reschedule(store, pending_b, now_ms=now, next_attempt_ms=now + 3_600_000,
                             error="HTTP 503: busy", status=503)
        assert ob.mark_delivered(store, delivered_b, now_ms=now, status=204)
        dead_gone = enqueue(store, URL_GONE, 2)
        ob.mark_dead(store, dead_gone[0], now_ms=now, error="HTTP 410: gone", status=410)
        assert ob.disable_endpoint(store, URL_GONE, now_ms=now, reason="HTTP 410: gone") == 1
    return Seeded(dead_a, pending_b, delivered_b, dead_gone)


def snapshot(db_url: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every outbox row and endpoint, every column: equal before and after means unchanged."""
    outbox, endpoints = (Base.metadata.tables[t] for t in ("webhook_outbox", "webhook_endpoints"))
    with Store.open(db_url) as store, store.transaction("test", write=False) as conn:
        rows = [tuple(r) for r in conn.execute(select(outbox).order_by(outbox.c.id))]
        ends = [tuple(r) for r in conn.execute(select(endpoints).order_by(endpoints.c.url))]
    return rows, ends


def rows_by_id(db_url: str) -> dict[int, ob.OutboxEntry]:
    with Store.open(db_url) as store:
        return {e.id: e for e in ob.entries(store)}


def cli(prog: str, home: Path, db_url: str, *argv: str) -> Result:
    return call(prog, *argv, "--home", str(home), "--db", db_url)


def json_lines(result: Result) -> list[dict[str, Any]]:
    assert result.code == 0, result.err
    return [json.loads(line) for line in result.out.splitlines()]


def rfc3339(text: str) -> dt.datetime:
    assert text.endswith("Z") and "T" in text, text
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


# -- overflowd-query outbox ----------------------------------------------------------------------


def test_query_lists_rows_newest_first_and_the_disabled_endpoint(home: Path, db_url: str) -> None:
    s = seed(home, db_url)
    lines = json_lines(cli("overflowd-query", home, db_url, "outbox", "--json"))
    rows = [x for x in lines if x["type"] == "row"]
    assert [x["id"] for x in rows] == sorted([*s.dead_a, s.pending_b, s.delivered_b,
                                              *s.dead_gone], reverse=True)
    by_id = {x["id"]: x for x in rows}
    a = by_id[s.dead_a[0]]
    assert (a["state"], a["url"], a["attempts"]) == ("dead", URL_A, 1)
    assert (a["last_status"], a["last_error"], a["next_attempt"]) == (400, "HTTP 400: bad request",
                                                                       None)
    b = by_id[s.pending_b]
    assert b["state"] == "pending" and b["last_status"] == 503
    assert rfc3339(b["next_attempt"]) > dt.datetime.now(dt.UTC) + dt.timedelta(minutes=50)
    assert abs(rfc3339(b["created"]) - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=5)
    assert by_id[s.delivered_b]["state"] == "delivered"
    assert all(len(x["report_id"]) == 64 for x in rows)
    (endpoint,) = [x for x in lines if x["type"] == "endpoint"]
    assert endpoint["url"] == URL_GONE and endpoint["dead"] == 2
    assert endpoint["disabled_reason"] == "HTTP 410: gone" and endpoint["held_until"] is None
    rfc3339(endpoint["disabled"])


def test_query_table_footer_says_n_of_m(home: Path, sqlite_url: str) -> None:
    s = seed(home, sqlite_url)
    result = cli("overflowd-query", home, sqlite_url, "outbox", "--limit", "2")
    assert result.code == 0, result.err
    header, first, second, blank, ends_header, gone = result.out.splitlines()
    assert header.split()[:4] == ["ID", "STATE", "URL", "REPORT"]
    assert first.split()[:3] == [str(s.dead_gone[1]), "dead", URL_GONE]
    assert second.split()[:3] == [str(s.dead_gone[0]), "dead", URL_GONE]
    assert blank == "" and ends_header.split()[:2] == ["ENDPOINT", "STATE"]
    assert gone.split()[:2] == [URL_GONE, "disabled"]
    assert result.err.startswith(f"2 of {s.total} rows (pending 1, delivered 1, dead 5)")
    assert "1 of 1 endpoints disabled or held" in result.err
    assert result.err.count("\n") == 1


def test_query_dead_and_url_select(home: Path, db_url: str) -> None:
    s = seed(home, db_url)
    got = lambda *a: [x["id"] for x in json_lines(  # noqa: E731
        cli("overflowd-query", home, db_url, "outbox", "--json", *a)) if x["type"] == "row"]
    assert got("--dead") == sorted([*s.dead_a, *s.dead_gone], reverse=True)
    assert got("--url", URL_B) == [s.delivered_b, s.pending_b]
    assert got("--dead", "--url", URL_B) == []
    assert got("--dead", "--url", URL_A, "--limit", "1") == [s.dead_a[-1]]
    table = cli("overflowd-query", home, db_url, "outbox", "--url", URL_A, "--limit", "1")
    assert table.err.startswith(f"1 of 3 rows (pending 0, delivered 0, dead 3 for {URL_A})")
    nothing = cli("overflowd-query", home, db_url, "outbox", "--url", URL_A + "/")
    assert nothing.code == 0 and "no row has this URL" in nothing.err


def test_query_escapes_control_characters_for_the_terminal(home: Path, sqlite_url: str) -> None:
    identity = load_identity(home)
    now = int(time.time() * 1000)
    with Store.open(sqlite_url) as store:
        ob.enqueue(store, identity.sign_report(make_payload()), [URL_A], now_ms=now)
        (entry,) = ob.claim_due(store, now_ms=now, lease_ms=1, limit=1)
        ob.mark_dead(store, entry.id, now_ms=now, error="HTTP 400: \x1b[2Jgotcha\r", status=400)
    result = cli("overflowd-query", home, sqlite_url, "outbox")
    assert "\x1b" not in result.out and "\r" not in result.out
    assert "\\x1b[2Jgotcha\\r" in result.out
    (row,) = json_lines(cli("overflowd-query", home, sqlite_url, "outbox", "--json"))
    assert row["last_error"] == "HTTP 400: \x1b[2Jgotcha\r"  # JSON carries it exactly, escaped


# -- overflowd outbox retry ----------------------------------------------------------------------


def test_retry_ids_puts_dead_rows_back_due_now(home: Path, db_url: str) -> None:
    s = seed(home, db_url)
    before = rows_by_id(db_url)
    started = int(time.time() * 1000)
    result = cli("overflowd", home, db_url, "outbox", "retry", *map(str, s.dead_a[:2]))
    assert result.code == 0, result.err
    assert result.out == "2 dead rows pending again, due now\n"
    after = rows_by_id(db_url)
    for i in s.dead_a[:2]:
        row = after[i]
        assert (row.state, row.attempts) == ("pending", 0)
        assert started <= row.next_attempt_ms <= int(time.time() * 1000)
        assert row.last_status == 400  # what happened before, until the next attempt
    assert {i: r for i, r in after.items() if i not in s.dead_a[:2]} == {
        i: r for i, r in before.items() if i not in s.dead_a[:2]
    }
    with Store.open(db_url) as store:
        due = ob.claim_due(store, now_ms=int(time.time() * 1000), lease_ms=1, limit=10)
    assert sorted(e.id for e in due) == s.dead_a[:2]  # what a worker claims next


@pytest.mark.parametrize(
    ("which", "names"),
    [
        ("unknown", ("no outbox row 999999", "nothing retried")),
        ("pending", ("pending, not dead",)),
        ("delivered", ("delivered, not dead",)),
        ("dead+unknown", ("no outbox row 999999",)),
        ("gone", ("disabled endpoint", f"overflowd outbox enable {URL_GONE}` first")),
    ],
)
def test_retry_refused_changes_nothing(home: Path, sqlite_url: str, which: str,
                                       names: tuple[str, ...]) -> None:
    s = seed(home, sqlite_url)
    ids = {
        "unknown": [999_999],
        "pending": [s.pending_b],
        "delivered": [s.delivered_b],
        "dead+unknown": [s.dead_a[0], 999_999],  # all or nothing: the dead one stays dead
        "gone": [s.dead_gone[0]],
    }[which]
    before = snapshot(sqlite_url)
    result = cli("overflowd", home, sqlite_url, "outbox", "retry", *map(str, ids))
    err = one_line(result, 1, *names)
    assert err.startswith("overflowd: error: ")
    assert snapshot(sqlite_url) == before


def test_retry_all_leaves_disabled_endpoints_and_says_so(home: Path, db_url: str) -> None:
    s = seed(home, db_url)
    result = cli("overflowd", home, db_url, "outbox", "retry", "--all")
    assert result.code == 0, result.err
    assert result.out.startswith("3 dead rows pending again, due now; 2 dead rows of 1 disabled "
                                 "endpoints left")
    after = rows_by_id(db_url)
    assert {after[i].state for i in s.dead_a} == {"pending"}
    assert {after[i].state for i in s.dead_gone} == {"dead"}
    again = cli("overflowd", home, db_url, "outbox", "retry", "--all", "--json")
    assert json_lines(again) == [{"retried": 0, "skipped_disabled": 2, "skipped_endpoints": 1}]


def test_retry_all_of_one_url(home: Path, sqlite_url: str) -> None:
    s = seed(home, sqlite_url)
    with Store.open(sqlite_url) as store:  # a second URL with a dead row, left alone
        now = int(time.time() * 1000)
        ob.enqueue(store, load_identity(home).sign_report(make_payload()), [URL_B], now_ms=now)
        (other,) = ob.claim_due(store, now_ms=now, lease_ms=1, limit=1)
        ob.mark_dead(store, other.id, now_ms=now, error="HTTP 404", status=404)
    result = cli("overflowd", home, sqlite_url, "outbox", "retry", "--all", "--url", URL_A)
    assert result.out == f"3 dead rows for {URL_A} pending again, due now\n", result.err
    after = rows_by_id(sqlite_url)
    assert {after[i].state for i in s.dead_a} == {"pending"}
    assert after[other.id].state == "dead"
    none_left = cli("overflowd", home, sqlite_url, "outbox", "retry", "--all", "--url", URL_A)
    assert none_left.code == 0 and none_left.out == f"no dead rows for {URL_A}: nothing to retry\n"


@pytest.mark.parametrize(
    ("url", "names"),
    [
        (URL_GONE, (f"{URL_GONE} is disabled (HTTP 410: gone, since ",
                    f"`overflowd outbox enable {URL_GONE}` first", "nothing retried")),
        (URL_A + "/", (f"no outbox row or endpoint has the URL {URL_A}/", "match exactly")),
    ],
)
def test_retry_all_url_refused_changes_nothing(home: Path, sqlite_url: str, url: str,
                                               names: tuple[str, ...]) -> None:
    seed(home, sqlite_url)
    before = snapshot(sqlite_url)
    result = cli("overflowd", home, sqlite_url, "outbox", "retry", "--all", "--url", url)
    one_line(result, 1, *names)
    assert snapshot(sqlite_url) == before


# -- overflowd outbox enable ---------------------------------------------------------------------


def test_enable_clears_the_disable_and_says_how_to_send_the_dead(home: Path, db_url: str) -> None:
    s = seed(home, db_url)
    result = cli("overflowd", home, db_url, "outbox", "enable", URL_GONE)
    assert result.code == 0, result.err
    assert result.out.startswith(f"enabled {URL_GONE} (disabled since ")
    assert result.out.endswith(
        f"HTTP 410: gone); it has 2 dead rows: `overflowd outbox retry --all --url {URL_GONE}` "
        "sends them\n"
    )
    with Store.open(db_url) as store:
        (endpoint,) = ob.endpoints(store)
    assert endpoint.disabled_ms is None and endpoint.disabled_reason is None
    assert {rows_by_id(db_url)[i].state for i in s.dead_gone} == {"dead"}  # until retried
    retried = cli("overflowd", home, db_url, "outbox", "retry", "--all", "--url", URL_GONE)
    assert retried.out == f"2 dead rows for {URL_GONE} pending again, due now\n", retried.err
    # Enabling again is harmless, and says so; a URL that needs quoting is quoted.
    again = cli("overflowd", home, db_url, "outbox", "enable", URL_GONE, "--json")
    assert json_lines(again) == [{"url": URL_GONE, "was_disabled": None, "dead": 0}]
    b = cli("overflowd", home, db_url, "outbox", "enable", URL_B)
    assert b.out == f"{URL_B} was not disabled; it has no dead rows\n"


def test_enable_unknown_url_changes_nothing(home: Path, sqlite_url: str) -> None:
    seed(home, sqlite_url)
    before = snapshot(sqlite_url)
    result = cli("overflowd", home, sqlite_url, "outbox", "enable", URL_GONE + "x")
    one_line(result, 1, f"no outbox row or endpoint has the URL {URL_GONE}x", "nothing enabled")
    assert snapshot(sqlite_url) == before


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (("overflowd-query", "outbox", "--limit", "0"), ("--limit", "1-1000000")),
        (("overflowd-query", "outbox", "--limit", "-1"), ("--limit",)),
        (("overflowd-query", "outbox", "--limit", "1e23"), ("--limit",)),
        (("overflowd-query", "outbox", "--url", ""), ("--url",)),
        (("overflowd-query", "outbox", "--url", "x" * 2049), ("--url", "1-2048")),
        (("overflowd", "outbox", "retry"), ("row ids", "--all")),
        (("overflowd", "outbox", "retry", "1", "--all"), ("ids or --all",)),
        (("overflowd", "outbox", "retry", "1", "--url", URL_A), ("--url goes with --all",)),
        (("overflowd", "outbox", "retry", "0"), ("ID", "not an integer in 1-")),
        (("overflowd", "outbox", "retry", "7x"), ("ID",)),
        (("overflowd", "outbox", "retry", str(2**63)), ("ID",)),
        (("overflowd", "outbox", "enable", ""), ("URL",)),
    ],
)
def test_bad_flag_values_are_usage_errors(home: Path, argv: tuple[str, ...],
                                          names: tuple[str, ...]) -> None:
    # Refused by the parser, before any store is opened: one backend shows it.
    db_url = f"sqlite:///{home / 'overflowd.db'}"
    seed(home, db_url)
    before = snapshot(db_url)
    one_line(cli(argv[0], home, db_url, *argv[1:]), 2, *names)
    assert snapshot(db_url) == before


def test_usage_errors_are_exit_2_and_one_line_from_the_processes(home: Path) -> None:
    """The installed scripts themselves (not only their ``main``) refuse with status 2."""
    db_url = f"sqlite:///{home / 'overflowd.db'}"
    seed(home, db_url)
    before = snapshot(db_url)
    common = ("--home", str(home), "--db", db_url)
    one_line(run("overflowd-query", "outbox", "--limit", "0", *common), 2, "--limit", "1-1000000")
    one_line(run("overflowd", "outbox", "retry", "1", "--all", *common), 2, "ids or --all")
    assert snapshot(db_url) == before


@pytest.mark.parametrize(
    "argv",
    [
        ("overflowd-query", "outbox", "--json", "--dead"),
        ("overflowd", "outbox", "retry", "--all"),
        ("overflowd", "outbox", "enable", URL_A),
    ],
)
def test_missing_store_is_one_line_and_creates_nothing(tmp_path: Path, home: Path,
                                                       argv: tuple[str, ...]) -> None:
    db = tmp_path / "missing" / "dir" / "x.db"
    before = files(tmp_path)
    tool = run if argv[0] == "overflowd-query" else call  # each script once as a process
    one_line(tool(*argv, "--home", str(home), "--db", f"sqlite:///{db}"), 1, f"no store at {db}")
    assert files(tmp_path) == before
    one_line(tool(*argv, "--home", str(home)), 1, f"no store at {home / 'overflowd.db'}")
    assert files(tmp_path) == before


def test_read_only_home_can_be_queried_not_changed(home: Path) -> None:
    db_url = f"sqlite:///{home / 'overflowd.db'}"
    s = seed(home, db_url)
    before = snapshot(db_url)
    stamps = {p: p.stat().st_mtime_ns for p in files(home)}
    listed = _run_read_only(home, "overflowd-query", "outbox", "--json", "--home", str(home))
    assert listed.code == 0, listed.err
    assert len([x for x in json_lines(listed) if x["type"] == "row"]) == s.total
    for argv in (("retry", str(s.dead_a[0])), ("retry", "--all"), ("enable", URL_GONE)):
        result = _run_read_only(home, "overflowd", "outbox", *argv, "--home", str(home))
        one_line(result, 1, f"{home / 'overflowd.db'} is read-only",
                 f"overflowd outbox {argv[0]} writes to the store")
    assert {p: p.stat().st_mtime_ns for p in files(home)} == stamps
    assert snapshot(db_url) == before


@pytest.mark.parametrize("where", ["before", "after"])
def test_home_and_db_before_or_after_the_subcommand(home: Path, sqlite_url: str,
                                                    where: str) -> None:
    s = seed(home, sqlite_url)
    common = ["--home", str(home), "--db", sqlite_url]
    for prog, cmd in (
        ("overflowd-query", ["outbox", "--json"]),
        ("overflowd", ["outbox", "retry", str(s.dead_a[0])]),
        ("overflowd", ["outbox", "enable", URL_GONE]),
    ):
        argv = [*common, *cmd] if where == "before" else [*cmd, *common]
        result = call(prog, *argv)
        assert result.code == 0, (argv, result.err)


# -- with a running daemon and a real webhook receiver --------------------------------------------

#: the daemon's outbox poll interval in these tests; a retry is due at once, so the running
#: daemon sends it at its next look, within this (plus a loaded machine's slack)
POLL_S = 0.3
#: the longest any step may take on a loaded CI machine (2 cores shared by many jobs)
STEP_TIMEOUT_S = 30.0


class Receiver:
    """A real HTTP server on 127.0.0.1 answering ``status`` to every POST; it records the
    report ids each POST carried (one report, or a batch ``{"reports": [...]}``) after
    checking its v1a signature with an independent Ed25519 (``cryptography``)."""

    def __init__(self, public_key: bytes) -> None:
        self.status = 400
        self.posts: list[tuple[int, list[str]]] = []
        self.bad: list[str] = []
        self._lock = threading.Lock()
        key = Ed25519PublicKey.from_public_bytes(public_key)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                body = self.rfile.read(min(length, 4 * 1024 * 1024))
                ids: list[str] = []
                try:
                    msg_id, ts = self.headers["webhook-id"], self.headers["webhook-timestamp"]
                    (v1a,) = [
                        s for s in self.headers["webhook-signature"].split() if s[:4] == "v1a,"
                    ]
                    key.verify(base64.b64decode(v1a[4:]), f"{msg_id}.{ts}.".encode() + body)
                    doc = json.loads(body)
                    ids = [r["id"] for r in doc["reports"]] if "reports" in doc else [doc["id"]]
                except Exception as exc:  # recorded and failed by the test, never raised here
                    outer.bad.append(repr(exc))
                with outer._lock:
                    status = outer.status
                    outer.posts.append((status, ids))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def answered(self, status: int) -> set[str]:
        with self._lock:
            return {i for s, ids in self.posts if s == status for i in ids}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver(home: Path) -> Iterator[Receiver]:
    r = Receiver(load_identity(home).public_key)
    yield r
    r.close()


def wait_until(what: str, check: Callable[[], Any], timeout_s: float = STEP_TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def v5_datagram(dsts: list[str]) -> bytes:
    """One NetFlow v5 datagram, a UDP flow from 192.0.2.1 to each of ``dsts`` (rate 1: each
    becomes a report, for the webhook target covering 198.51.100.0/24)."""
    now = int(time.time())
    header = struct.pack(">HHIIIIBBH", 5, len(dsts), 100_000, now, 0, 0, 0, 0, 0)
    records = b"".join(
        struct.pack(
            ">IIIHHIIIIHHBBBBHHBBH",
            int(ipaddress.IPv4Address("192.0.2.1")), int(ipaddress.IPv4Address(dst)),
            0, 0, 0, 10, 1000, 99_000, 99_500, 123, 40000, 0, 0, 17, 0, 0, 0, 0, 0, 0,
        )
        for dst in dsts
    )
    return header + records


def start_daemon(home: Path, db_url: str, url: str) -> Daemon:
    (home / "overflowd.toml").write_text(
        "[webhook]\n"
        f'targets = [{{ prefix = "198.51.100.0/24", url = "{url}" }}]\n'
        'allow_prefixes = ["127.0.0.0/8"]\n'
        "require_https = false\n"
        f"poll_interval_s = {POLL_S}\n"
    )
    return Daemon(home, "--db", db_url, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                  "--rate", "1")


def outbox_rows(home: Path, db_url: str, *argv: str) -> list[dict[str, Any]]:
    lines = json_lines(cli("overflowd-query", home, db_url, "outbox", "--json", *argv))
    return [x for x in lines if x["type"] == "row"]


def test_retry_is_delivered_by_the_running_daemon(home: Path, sqlite_url: str,
                                                  receiver: Receiver) -> None:
    daemon = start_daemon(home, sqlite_url, receiver.url)
    try:
        assert daemon.udp is not None
        send_udp([v5_datagram(["198.51.100.7", "198.51.100.8", "198.51.100.9"])], daemon.udp)
        dead = wait_until("3 dead rows", lambda: (r := outbox_rows(home, sqlite_url, "--dead"))
                          and len(r) == 3 and r)
        reports = {x["report_id"] for x in dead}
        assert {x["last_status"] for x in dead} == {400}
        assert receiver.answered(400) == reports
        receiver.status = 204
        time.sleep(3 * POLL_S)  # dead rows stay dead: nothing is sent until the retry
        assert receiver.answered(204) == set()
        result = cli("overflowd", home, sqlite_url, "outbox", "retry",
                     *(str(x["id"]) for x in dead))
        retried_at = time.monotonic()  # committed when the command returns
        assert result.out == "3 dead rows pending again, due now\n", result.err
        wait_until("the retried reports at the receiver", lambda: receiver.answered(204) == reports)
        took = time.monotonic() - retried_at
        assert took < POLL_S + 5, took  # at the next look (5 s: a loaded machine's slack)
        rows = wait_until("the rows marked delivered", lambda: (r := outbox_rows(home, sqlite_url))
                          and {x["state"] for x in r} == {"delivered"} and r)
        assert {x["report_id"] for x in rows} == reports and {x["attempts"] for x in rows} == {1}
    finally:
        code, output = daemon.stop()
    assert code == 0, output
    assert receiver.bad == []
    print(f"retry committed to delivered with a running daemon: {took:.2f} s (poll {POLL_S} s)")


def test_410_then_enable_and_retry_all_url_delivers(home: Path, db_url: str,
                                                    receiver: Receiver) -> None:
    receiver.status = 410
    daemon = start_daemon(home, db_url, receiver.url)
    url = receiver.url
    try:
        assert daemon.udp is not None
        send_udp([v5_datagram(["198.51.100.7", "198.51.100.8", "198.51.100.9"])], daemon.udp)
        dead = wait_until("3 dead rows", lambda: (r := outbox_rows(home, db_url, "--dead"))
                          and len(r) == 3 and r)
        reports = {x["report_id"] for x in dead}
        lines = json_lines(cli("overflowd-query", home, db_url, "outbox", "--json"))
        (endpoint,) = [x for x in lines if x["type"] == "endpoint"]
        assert endpoint["url"] == url and endpoint["disabled"] and endpoint["dead"] == 3
        # Refused while disabled, one line each, nothing changed.
        before = snapshot(db_url)
        one_line(cli("overflowd", home, db_url, "outbox", "retry", str(dead[0]["id"])), 1,
                 f"`overflowd outbox enable {url}` first")
        one_line(cli("overflowd", home, db_url, "outbox", "retry", "--all", "--url", url), 1,
                 f"{url} is disabled", f"`overflowd outbox enable {url}` first")
        assert snapshot(db_url) == before
        receiver.status = 200
        enabled = cli("overflowd", home, db_url, "outbox", "enable", url)
        assert enabled.out.endswith(f"it has 3 dead rows: `overflowd outbox retry --all --url "
                                    f"{url}` sends them\n"), enabled.err
        # A new report for it now goes out (the daemon reads the endpoint from the store) ...
        send_udp([v5_datagram(["198.51.100.10"])], daemon.udp)
        fresh = wait_until("the new report at the receiver", lambda: receiver.answered(200))
        assert not fresh & reports
        # ... and the dead ones once retried.
        result = cli("overflowd", home, db_url, "outbox", "retry", "--all", "--url", url)
        assert result.out == f"3 dead rows for {url} pending again, due now\n", result.err
        wait_until("the retried reports at the receiver",
                   lambda: receiver.answered(200) == reports | fresh)
        wait_until("every row delivered", lambda: (r := outbox_rows(home, db_url))
                   and len(r) == 4 and {x["state"] for x in r} == {"delivered"})
    finally:
        code, output = daemon.stop()
    assert code == 0, output
    assert receiver.bad == []
    assert receiver.answered(410) and receiver.answered(410) <= reports


# -- the examples in docs/webhooks.md ------------------------------------------------------------


def test_the_examples_in_webhooks_md_are_what_the_commands_print(home: Path) -> None:
    """Each ``$ command`` in the "Operating the outbox" section, run in order on the seeded
    store (ids 1-7 in a new SQLite file), prints what the doc shows; times and report ids
    differ run to run and are compared as placeholders of the same width."""
    import re
    import shlex

    doc = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    section = doc.split("## Operating the outbox", 1)[1].split("\n## ", 1)[0]
    examples: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```text\n(.*?)```", section, re.S):
        for line in block.splitlines():
            if line.startswith("$ "):
                examples.append((line[2:], []))
            else:
                examples[-1][1].append(line)
    assert len(examples) == 4, examples
    seed(home, f"sqlite:///{home / 'overflowd.db'}")

    def masked(lines: list[str]) -> list[str]:
        times = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
        return [re.sub(r"\b[0-9a-f]{12}\b", "<id>", times.sub("<time>", x)) for x in lines]

    for command, shown in examples:
        argv = shlex.split(command)
        result = call(*argv, "--home", str(home))
        assert masked((result.out + result.err).splitlines()) == masked(shown), command
