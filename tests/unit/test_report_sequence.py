"""Report sequence numbers: the cursor that never skips or repeats (peers, --follow, the API).

Every stored report gets this node's own number when it is first stored; paging with
:meth:`Store.reports_after` from 0 sees each report exactly once, also while writers keep
storing, on SQLite and on PostgreSQL, with two writers at once.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
import time
from pathlib import Path

import alembic.command
import alembic.config
import pytest
import sqlalchemy as sa

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.store import Store, repository
from tests.support.reports import make_payload

IDENTITY = NodeIdentity.generate()
RECEIVED_MS = 1_700_000_000_000


def _reports(n: int, *, dst: str = "198.51.100.2") -> list[rpt.SignedReport]:
    return [IDENTITY.sign_report(make_payload(dst=dst)) for _ in range(n)]


def _page_all(store: Store, *, limit: int, after: int = 0) -> tuple[list[str], int]:
    ids: list[str] = []
    while True:
        page, after = store.reports_after(after, limit)
        if not page:
            return ids, after
        ids.extend(r.report_id for r in page)


def test_numbers_follow_storage_and_a_duplicate_keeps_its_number(store: Store) -> None:
    first, second = _reports(3), _reports(2)
    assert store.last_seq() == 0
    store.add_reports([(r, RECEIVED_MS, "local") for r in first])
    store.add_reports([(r, RECEIVED_MS, "udp") for r in [first[0], *second]])
    page, cursor = store.reports_after(0, 100)
    assert [r.report_id for r in page] == [r.report_id for r in first + second]
    seqs = [r.seq for r in page]
    assert seqs == sorted(seqs) and len(set(seqs)) == 5
    assert page[0].via == "local"  # stored once, with its first number and path
    assert cursor == store.last_seq() >= seqs[-1]


@pytest.fixture(scope="module")
def ten_thousand() -> list[rpt.SignedReport]:
    """Signed once for both backends (signing is most of the cost)."""
    return _reports(10_000)


def test_ten_thousand_reports_of_one_second_page_at_50_with_no_gap_or_repeat(
    store: Store, ten_thousand: list[rpt.SignedReport]
) -> None:
    reports = ten_thousand
    for i in range(0, len(reports), 500):  # all stored within the same millisecond
        store.add_reports([(r, RECEIVED_MS, "local") for r in reports[i : i + 500]])
    ids, _ = _page_all(store, limit=50)
    assert len(ids) == 10_000 and len(set(ids)) == 10_000
    assert set(ids) == {r.report_id for r in reports}


def test_paging_while_two_writers_store_sees_each_report_once(store: Store, db_url: str) -> None:
    """Two writers on their own connections, a reader paging all the while at limit=50."""
    batches = [_reports(50) for _ in range(40)]
    errors: list[BaseException] = []

    def write(mine: list[list[rpt.SignedReport]]) -> None:
        try:
            with Store.open(db_url) as own:
                for batch in mine:
                    own.add_reports([(r, RECEIVED_MS, "udp") for r in batch])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(batches[k::2],)) for k in range(2)]
    seen: list[str] = []
    cursor = 0
    for w in writers:
        w.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = not any(w.is_alive() for w in writers)
        page, cursor = store.reports_after(cursor, 50)
        seen.extend(r.report_id for r in page)
        if done and not page:
            break
    for w in writers:
        w.join(timeout=30)
    assert not errors, errors
    want = {r.report_id for batch in batches for r in batch}
    assert len(seen) == len(set(seen)) == len(want) == 2000
    assert set(seen) == want


def test_a_filtered_page_moves_the_cursor_past_what_it_filtered_out(store: Store) -> None:
    mine = ipaddress.ip_network("203.0.113.0/24")
    store.add_reports([(r, RECEIVED_MS, "udp") for r in _reports(30)])
    store.add_reports([(r, RECEIVED_MS, "udp") for r in _reports(3, dst="203.0.113.9")])
    store.add_reports([(r, RECEIVED_MS, "udp") for r in _reports(30)])
    page, cursor = store.reports_after(0, 10, either=mine)
    assert [str(r.dst) for r in page] == ["203.0.113.9"] * 3
    assert cursor == store.last_seq()
    assert store.reports_after(cursor, 10, either=mine) == ([], cursor)
    later = _reports(1, dst="203.0.113.10")
    store.add_reports([(later[0], RECEIVED_MS, "udp")])
    page, _ = store.reports_after(cursor, 10, either=mine)
    assert [r.report_id for r in page] == [later[0].report_id]


@pytest.mark.parametrize(("after", "limit"), [(-1, 10), (0, 0), (0, 10_001)])
def test_bad_cursor_or_limit_is_refused(store: Store, after: int, limit: int) -> None:
    with pytest.raises(ValueError):
        store.reports_after(after, limit)


def test_reports_stored_before_the_sequence_are_numbered_in_received_order(
    tmp_path: Path,
) -> None:
    """Migration 0006 on a store holding reports: numbered by received time, ties by id."""
    path = tmp_path / "old.db"
    config = alembic.config.Config()
    config.set_main_option("script_location", str(repository._MIGRATIONS))
    config.set_main_option("path_separator", "os")
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        alembic.command.upgrade(config, "0005")
    engine.dispose()
    reports = _reports(4)
    received = [RECEIVED_MS + 30, RECEIVED_MS + 10, RECEIVED_MS + 20, RECEIVED_MS + 10]
    db = sqlite3.connect(path)
    columns = [c[1] for c in db.execute("PRAGMA table_info(reports)")]
    for report, when in zip(reports, received, strict=True):
        row = repository._report_row(report, when, "udp", None)
        row["sender_net"] = None
        values = [row[c] if c != "bytes" else row.get("bytes", row.get("octets")) for c in columns]
        db.execute(
            f"INSERT INTO reports ({','.join(columns)}) VALUES ({','.join('?' * len(columns))})",
            values,
        )
    db.commit()
    db.close()
    with Store.open(f"sqlite:///{path}") as store:
        page, cursor = store.reports_after(0, 10)
        order = sorted(zip(received, (r.report_id for r in reports), strict=True))
        assert [r.report_id for r in page] == [i for _, i in order]
        assert [r.seq for r in page] == [1, 2, 3, 4] and cursor == 4
        store.add_reports([(r, RECEIVED_MS, "udp") for r in _reports(1)])
        assert store.reports_after(4, 10)[0][0].seq == 5
