"""Review of the query CLI and API as a hostile client, node and observer would attack them.

Each test is one finding (docs in the review report): a relative time too large to be a time,
an observer's contacts that are rich markup or terminal escapes, contacts that are spreadsheet
formulas, and a node answering --remote with pages that never end or rows that lie.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from overflowd import report as rpt
from overflowd.answers import make_filter
from overflowd.cli import query
from overflowd.identity import NodeIdentity
from overflowd.store import Store
from tests.support.reports import make_payload

NOW_MS = 1_700_000_000_000


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = query.main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# -- a relative time beyond any float ------------------------------------------------------------


def test_a_relative_time_too_large_for_a_float_is_refused_not_a_crash(
    capsys: pytest.CaptureFixture[str],
) -> None:
    huge = "9" * 400 + "s"  # inf as a float: int() raised OverflowError (API 500, traceback)
    assert make_filter({"since": huge}, now_ms=NOW_MS, observers=lambda t: ()).since_ms == 0
    code, _, err = cli(capsys, "reports", "--db", "sqlite:////nonexistent/x.db", "--since", huge)
    assert code == 1, err  # got past the filter: the store is missing
    assert err.count("\n") == 1


# -- an observer's free text in tables and CSV ----------------------------------------------

HOSTILE_CONTACTS = (
    "=cmd|' /C calc'!A0",  # first: the CSV cell of the contacts starts with it
    "mailto:abuse@example.net[/x]",
    "[red]https://example.net/[/red]",
    "mailto:a@b\x1b]52;c;ZXZpbA==\x07\x1b[2J\x9b31m",
)


@pytest.fixture
def hostile_store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'overflowd.db'}"
    payload = make_payload(contacts=HOSTILE_CONTACTS, time_ms=NOW_MS)
    signed = NodeIdentity.generate().sign_report(payload)
    with Store.open(url) as store:
        store.add_reports([(signed, NOW_MS, "udp")])
    return url


def test_who_table_prints_contacts_literally_without_markup_or_escapes(
    capsys: pytest.CaptureFixture[str], hostile_store: str
) -> None:
    code, out, err = cli(capsys, "who", "--db", hostile_store)
    assert code == 0, err
    assert "[/x]" in out and "[red]https://example.net/[/red]" in out  # text, not markup
    assert not any(c in out for c in "\x1b\x07\x9b"), repr(out)


def test_who_csv_does_not_start_a_cell_with_a_formula(
    capsys: pytest.CaptureFixture[str], hostile_store: str
) -> None:
    import csv
    import io

    code, out, err = cli(capsys, "who", "--db", hostile_store, "--csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and all(
        not row[name].startswith(("=", "+", "-", "@"))
        for row in rows
        for name in ("contacts", "point")
    ), rows
    assert "cmd|" in rows[0]["contacts"]


# -- a hostile node behind --remote ---------------------------------------------------------------


class FakeNode:
    """An HTTP server on loopback that answers every GET with ``answer(path, query)``."""

    def __init__(self, answer: Any) -> None:
        self.requests = 0
        node = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                node.requests += 1
                body = json.dumps(answer(self.path, node.requests)).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeNode:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _signed_obj(seq: int, **payload: Any) -> dict[str, Any]:
    signed = NodeIdentity.generate().sign_report(make_payload(time_ms=NOW_MS, **payload))
    return {
        "seq": seq,
        "received": rpt.iso_ms(NOW_MS),
        "via": "udp",
        "trust": None,
        "report": rpt.to_json(signed),
    }


def test_remote_pages_whose_cursor_never_moves_end_with_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    row = _signed_obj(1)

    def answer(path: str, n: int) -> dict[str, Any]:
        # full pages, the cursor stuck at 0: 20 times, then a short page (so the old code ends)
        return {"reports": [row] * (1000 if n <= 20 else 0), "next": 0}

    with FakeNode(answer) as node:
        code, _, err = cli(capsys, "reports", "--remote", node.url, "--json")
    assert code == 1, err
    assert "next" in err and node.requests <= 2


def test_remote_rows_of_the_wrong_shape_are_one_line_exit_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with FakeNode(lambda path, n: {"reports": [{"x": 1}], "next": 5, "total": 1}) as node:
        code, _, err = cli(capsys, "reports", "--remote", node.url, "--limit", "5")
    assert code == 1, err
    assert err.count("\n") == 1 and node.url.rstrip("/") in err
    with FakeNode(lambda path, n: {"observers": [{"x": 1}], "reports": "many"}) as node:
        code, _, err = cli(capsys, "who", "--remote", node.url)
    assert code == 1, err
    assert err.count("\n") == 1


def test_remote_prints_what_the_observer_signed_not_what_the_node_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    row = _signed_obj(7, src="192.0.2.1")
    lie = json.loads(json.dumps(row))
    lie["report"]["flow"]["src"] = "203.0.113.66"  # the node blames someone else
    lie["report"]["observer"]["contacts"] = ["mailto:[/x]"]
    with FakeNode(lambda path, n: {"reports": [lie], "next": 7, "total": 1}) as node:
        code, out, err = cli(capsys, "reports", "--remote", node.url, "--limit", "5", "--json")
    assert code == 0, err
    assert "203.0.113.66" not in out
    assert json.loads(out)["report"] == row["report"]


# -- an observer claiming p = 1e-300 for 2**64 - 1 packets: an unbounded estimate -----------------


@pytest.fixture
def unbounded_store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'overflowd.db'}"
    payload = make_payload(packets=2**64 - 1, probability=1e-300, time_ms=NOW_MS)
    with Store.open(url) as store:
        store.add_reports([(NodeIdentity.generate().sign_report(payload), NOW_MS, "udp")])
    return url


def _strict(line: str) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


def test_an_unbounded_estimate_is_json_null_locally_as_on_the_api_and_remote_renders_it(
    capsys: pytest.CaptureFixture[str], unbounded_store: str
) -> None:
    for argv in (("who",), ("top", "--by", "src")):
        code, out, err = cli(capsys, *argv, "--db", unbounded_store, "--json")
        assert code == 0, err
        obj = _strict(out.splitlines()[0])  # 'Infinity' was printed: jq and the API disagree
        assert obj["packets"]["estimate"] is None
    code, out, err = cli(capsys, "who", "--db", unbounded_store, "--json")
    obj = _strict(out)
    with FakeNode(lambda path, n: {"observers": [obj], "reports": 1}) as node:
        code, out, err = cli(capsys, "who", "--remote", node.url)
    assert code == 0, err  # the API's null estimate was a TypeError in the table
    assert "inf" in out
