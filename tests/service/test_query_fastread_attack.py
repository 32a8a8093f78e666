"""Review of the fast read path (#16): odd filters, odd stores and odd paths print the same
through stdlib sqlite3 as through the Store, and the fast path neither writes nor fails where
the Store would wait."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from overflowd.cli import query
from overflowd.cli.common import Context
from overflowd.store import Store, fastread
from tests.support.query_reports import Seeded, seed_store


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Seeded, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fastread-attack') / 'overflowd.db'}"
    with Store.open(url) as store:
        yield seed_store(store, 120, seed=5), url


def run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    try:
        code = query.main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def both(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> tuple[tuple[int, str, str], tuple[int, str, str]]:
    with monkeypatch.context() as m:
        m.setattr(fastread.Reader, "open", classmethod(lambda cls, url: None))
        slow = run(capsys, argv)
    fast = run(capsys, argv)
    return fast, slow


ODD = [
    ["--src", "0.0.0.0/0"],
    ["--src", "::/0"],
    ["--dst", "::ffff:10.9.8.0/120"],
    ["--dst", "::ffff:198.51.100.0/120"],
    ["--src", "255.255.255.255/32"],
    ["--src", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128"],
    ["--since", "9999-12-31T23:59:59Z"],
    ["--until", "1970-01-01T00:00:00Z"],
    ["--since", "1970-01-01T00:00:00Z"],
    ["--received-until", "9999-12-31T23:59:59Z"],
    ["--port", "0"],
    ["--port", "65535"],
    ["--port", "65536"],
    ["--proto", "255"],
    ["--proto", "256"],
    ["--limit", "0"],
    ["--limit", str(2**63)],
    ["--limit", str(2**63 - 1)],
    ["--limit", "-1"],
    ["--observer", "%"],
    ["--observer", "_"],
    ["--observer", "'"],
    ["--kind", "x" * 1000],
    ["--min-trust", "bogus"],
    ["--since", "2023-11-14T22:13:20Z", "--until", "2023-11-14T22:13:19Z"],
]


@pytest.mark.parametrize("flags", ODD, ids=lambda f: " ".join(f)[:40])
def test_odd_filters_print_the_same(
    seeded: tuple[Seeded, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
) -> None:
    _, url = seeded
    fast, slow = both(capsys, monkeypatch, ["reports", "--db", url, *flags])
    assert fast == slow


def copy_store(url: str, tmp_path: Path) -> tuple[Path, str]:
    src = Path(url.removeprefix("sqlite:///"))
    dst = tmp_path / "overflowd.db"
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)
    a.close()
    b.close()
    return dst, f"sqlite:///{dst}"


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE reports SET cose = x'00' WHERE seq = 3",
        "UPDATE reports SET cose = x'' WHERE seq = 3",
        "UPDATE reports SET trust = 'made-up' WHERE seq = 3",
        "UPDATE reports SET via = 'made-up' WHERE seq = 3",
        "UPDATE reports SET hops = 9223372036854775807 WHERE seq = 3",
        "UPDATE reports SET received_ms = -1 WHERE seq = 3",
        "UPDATE reports SET last_ms = 9223372036854775807 WHERE seq = 3",
        "UPDATE reports SET id = 'x' WHERE seq = 3",
    ],
)
def test_odd_rows_print_the_same(
    seeded: tuple[Seeded, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    change: str,
) -> None:
    path, url = copy_store(seeded[1], tmp_path)
    with sqlite3.connect(path) as conn:
        conn.execute(change)
    conn.close()
    for fmt in ([], ["--json"], ["--csv"]):
        fast, slow = both(capsys, monkeypatch, ["reports", "--db", url, *fmt])
        assert fast == slow, fmt


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_a_locked_store_is_waited_for_not_refused(
    seeded: tuple[Seeded, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    journal: str,
) -> None:
    """A writer (the daemon) holding the lock for a moment: the fast path waits as the Store
    does (busy timeout), it neither says "database is locked" nor falls back."""
    import threading

    path, url = copy_store(seeded[1], tmp_path)
    expected = run(capsys, ["reports", "--db", url, "--json"])
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute(f"PRAGMA journal_mode = {journal}")
    if journal == "wal":
        writer.execute("PRAGMA locking_mode = EXCLUSIVE")
    writer.execute("BEGIN EXCLUSIVE")
    writer.execute("UPDATE report_sequence SET last = last")
    opened: list[Any] = []

    def open_spy(cls: Any, url: str) -> Any:
        opened.append(url)
        return real_open(url)

    real_open = fastread.Reader.open
    timer = threading.Timer(0.5, lambda: (writer.execute("COMMIT"), writer.close()))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fastread.Reader, "open", classmethod(open_spy))

        def no_store(*_: Any, **__: Any) -> Store:
            raise AssertionError("the fast path fell back to the Store")

        m.setattr(Context, "open_store", no_store)
        timer.start()
        try:
            got = run(capsys, ["reports", "--db", url, "--json"])
        finally:
            timer.join()
    assert opened
    assert got == expected
