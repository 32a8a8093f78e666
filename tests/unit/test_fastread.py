"""overflowd.store.fastread: the stdlib-sqlite3 reader of ``overflowd-query reports`` sends the
statements SQLAlchemy sends (caught on the engine as they leave for SQLite) and gives the answers
the Store path gives, for every filter the command has, and declines what it is not for.
"""

from __future__ import annotations

import base64
import ipaddress
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from overflowd import report as rpt
from overflowd.answers import report_json
from overflowd.store import Store, fastread
from overflowd.store.models import Base
from overflowd.store.query import ReportFilter, count_reports, find_reports, resolve_observer
from overflowd.store.repository import SCHEMA_HEAD, SQLITE_BUSY_TIMEOUT_MS
from tests.support.query_reports import BASE_MS, HOUR_MS, Seeded, seed_store

net = ipaddress.ip_network


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Seeded, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fastread') / 'overflowd.db'}"
    with Store.open(url) as store:
        yield seed_store(store, 300, seed=23), url


def filters(s: Seeded) -> list[ReportFilter]:
    """Each filter alone, the OR-shaped ones alone and together, and all of them at once."""
    own, other, _ = (i.public_key for i in s.identities)
    return [
        ReportFilter(),
        ReportFilter(since_ms=BASE_MS + 2 * HOUR_MS),
        ReportFilter(until_ms=BASE_MS + HOUR_MS),
        ReportFilter(received_since_ms=BASE_MS + 3 * HOUR_MS),
        ReportFilter(received_until_ms=BASE_MS + HOUR_MS),
        ReportFilter(received_since_ms=BASE_MS + HOUR_MS, received_until_ms=BASE_MS + 2 * HOUR_MS),
        ReportFilter(src=net("192.0.2.0/24")),
        ReportFilter(dst=net("198.51.100.0/24")),
        ReportFilter(dst=net("2001:db8:ff::/48")),
        ReportFilter(dst=net("::ffff:10.9.8.0/120")),
        ReportFilter(either=net("203.0.113.0/24")),
        ReportFilter(proto=17),
        ReportFilter(port=53),
        ReportFilter(sport=443),
        ReportFilter(dport=80),
        ReportFilter(kind="ddos-suspect"),
        ReportFilter(observers=(other,)),
        ReportFilter(observers=(other, own, other)),
        ReportFilter(min_trust="unknown"),
        ReportFilter(min_trust="dns"),
        ReportFilter(port=53, min_trust="continuity"),
        ReportFilter(either=net("2001:db8::/32"), port=123),
        ReportFilter(
            since_ms=BASE_MS, until_ms=BASE_MS + 3 * HOUR_MS, received_since_ms=BASE_MS,
            received_until_ms=BASE_MS + 4 * HOUR_MS, src=net("0.0.0.0/0"),
            dst=net("198.51.0.0/16"), either=net("0.0.0.0/0"), proto=17, port=53, sport=53,
            dport=53, kind="flow-seen", observers=(own, other), min_trust="pinned",
        ),
    ]  # fmt: skip


def copy_of(url: str, path: Path) -> Path:
    """A copy of the store at ``url`` (its WAL included: SQLite's backup API)."""
    with sqlite3.connect(url.removeprefix("sqlite:///")) as src, sqlite3.connect(path) as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return path


def sent(store: Store, ask: Any) -> list[tuple[str, list[Any]]]:
    """The statements ``ask()`` sends to SQLite through the Store, with their parameters."""
    out: list[tuple[str, list[Any]]] = []

    def capture(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.startswith("SELECT"):
            out.append((statement, list(params)))

    engine = store._engine
    event.listen(engine, "before_cursor_execute", capture)
    try:
        ask()
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    return out


@pytest.mark.parametrize("limit", [None, 7])
def test_statements_are_the_ones_sqlalchemy_sends(seeded: tuple[Seeded, str], limit: Any) -> None:
    s, _ = seeded
    for flt in filters(s):
        assert sent(s.store, lambda f=flt: find_reports(s.store, f, limit=limit)) == [
            fastread.find_statement(flt, limit)
        ], flt
        assert sent(s.store, lambda f=flt: count_reports(s.store, f)) == [
            fastread.count_statement(flt)
        ], flt
    assert sent(s.store, s.store.last_seq) == [(fastread.LAST_SEQ_SQL, ["reports"])]
    prefix = rpt.key_fingerprint(s.identities[1].public_key)[:6]
    (observers,) = sent(s.store, lambda: resolve_observer(s.store, prefix))
    assert observers[0] == fastread.OBSERVERS_LIKE_SQL
    assert observers[1][0] == prefix + "%"


def test_written_for_this_schema() -> None:
    assert fastread.SCHEMA == SCHEMA_HEAD
    assert fastread.BUSY_TIMEOUT_MS == SQLITE_BUSY_TIMEOUT_MS
    assert tuple(c.name for c in Base.metadata.tables["reports"].columns) == fastread.COLUMNS


@pytest.mark.parametrize("limit", [None, 1, 7, 10_000])
def test_answers_are_the_store_paths(seeded: tuple[Seeded, str], limit: Any) -> None:
    s, url = seeded
    reader = fastread.Reader.open(url)
    assert reader is not None
    with reader:
        assert reader.last_seq() == s.store.last_seq()
        for flt in filters(s):
            want = [report_json(r) for r in find_reports(s.store, flt, limit=limit)]
            assert reader.find_reports(flt, limit=limit) == want, flt
            assert reader.count_reports(flt) == count_reports(s.store, flt), flt
        assert reader.find_reports(ReportFilter(proto=17))  # not all empty


def test_observer_names_resolve_and_fail_alike(seeded: tuple[Seeded, str]) -> None:
    s, url = seeded
    key = s.identities[2].public_key
    fp = rpt.key_fingerprint(key)
    texts = [
        fp, fp[:4], fp.upper(), base64.b64encode(key).decode(), base64.urlsafe_b64encode(key)
        .decode().rstrip("="), "0000-0000", "12", "not a key!", "",
    ]  # fmt: skip
    reader = fastread.Reader.open(url)
    assert reader is not None
    with reader:
        for text in texts:
            try:
                want: Any = resolve_observer(s.store, text)
            except ValueError as exc:
                want = str(exc)
            try:
                got: Any = reader.resolve_observer(text)
            except ValueError as exc:
                got = str(exc)
            assert got == want, text
    assert reader.name == s.store.name


def test_declines_what_the_store_must_answer(tmp_path: Path, seeded: tuple[Seeded, str]) -> None:
    _, url = seeded
    assert fastread.Reader.open("postgresql+psycopg://u:p@127.0.0.1/x") is None
    assert fastread.Reader.open(url + "?mode=ro") is None
    assert fastread.Reader.open(f"sqlite:///{tmp_path / 'none.db'}") is None  # "no store at"
    assert fastread.Reader.open("sqlite:///:memory:") is None
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    assert fastread.Reader.open(f"sqlite:///{empty}") is None  # no schema
    older = copy_of(url, tmp_path / "older.db")
    with sqlite3.connect(older) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0007_query'")
    assert fastread.Reader.open(f"sqlite:///{older}") is None


def test_reads_and_never_writes(tmp_path: Path, seeded: tuple[Seeded, str]) -> None:
    _, url = seeded
    copy = copy_of(url, tmp_path / "overflowd.db")
    reader = fastread.Reader.open(f"sqlite:///{copy}")
    assert reader is not None
    with reader, pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader._conn.execute("DELETE FROM reports")
