"""``overflowd-query reports`` prints the same through stdlib sqlite3 (overflowd.store.fastread)
as through the Store (SQLAlchemy), for every filter flag, every output format and --limit.

Both runs call the CLI's ``main(argv)`` on one store: once as it is (the fast path, with the
Store made unavailable so that the run shows it was not asked), once with the fast reader
declining (the Store answers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from overflowd import report as rpt
from overflowd.cli import query
from overflowd.cli.common import Context
from overflowd.store import Store, fastread
from tests.support.query_reports import BASE_MS, HOUR_MS, Seeded, seed_store


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Seeded, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('query-fastread') / 'overflowd.db'}"
    with Store.open(url) as store:
        yield seed_store(store, 300, seed=31), url


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
    def no_store(*_: Any, **__: Any) -> Store:
        raise AssertionError("the fast path asked the Store")

    with monkeypatch.context() as m:
        m.setattr(Context, "open_store", no_store)
        fast = run(capsys, argv)
    with monkeypatch.context() as m:
        m.setattr(fastread.Reader, "open", classmethod(lambda cls, url: None))
        slow = run(capsys, argv)
    return fast, slow


def flag_sets(s: Seeded) -> list[list[str]]:
    fp = s.identities[1].fingerprint
    key = rpt.b64url(s.identities[2].public_key)
    return [
        [],
        ["--since", rpt.iso_ms(BASE_MS + 2 * HOUR_MS)],
        ["--until", rpt.iso_ms(BASE_MS + HOUR_MS)],
        ["--received-since", rpt.iso_ms(BASE_MS + 3 * HOUR_MS)],
        ["--received-until", rpt.iso_ms(BASE_MS + HOUR_MS)],
        ["--src", "2001:db8:1::/48"],
        ["--dst", "198.51.100.0/24"],
        ["--dst", str(s.reports[0].dst)],
        ["--prefix", "203.0.113.0/24"],
        ["--proto", "udp"],
        ["--port", "53"],
        ["--sport", "443", "--dport", "80"],
        ["--kind", "ddos-suspect"],
        ["--observer", fp],
        ["--observer", fp[:4]],
        ["--observer", key],
        ["--min-trust", "dns"],
        ["--min-trust", "unknown", "--proto", "17", "--port", "123", "--dst", "::/0"],
    ]


@pytest.mark.parametrize("fmt", [[], ["--json"], ["--csv"], ["--format", "stix"]])
def test_every_filter_prints_the_same_through_either_path(
    seeded: tuple[Seeded, str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fmt: list[str],
) -> None:
    s, url = seeded
    printed = 0
    for flags in flag_sets(s):
        for limit in ([], ["--limit", "5"]):
            argv = ["reports", "--db", url, *flags, *fmt, *limit]
            fast, slow = both(capsys, monkeypatch, argv)
            assert fast == slow, argv
            assert fast[0] == 0, fast[2]
            printed += len(fast[1])
    assert printed > 50_000  # the answers are not all empty


def test_refusals_are_the_same(
    seeded: tuple[Seeded, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = seeded
    for flags in (["--observer", "0000-0000"], ["--observer", "12"], ["--observer", "fp!"]):
        fast, slow = both(capsys, monkeypatch, ["reports", "--db", url, *flags])
        assert fast == slow
        assert fast[0] == 2 and "--observer" in fast[2]
