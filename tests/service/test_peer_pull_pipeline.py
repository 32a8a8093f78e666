"""Pull pipelining: the next page is asked for while the previous one is verified and stored,
one page ahead at most, and a failure of the page ahead costs only that round.

In process: node A's API (hypercorn, SQLite) serves its reports; node B's PeerPull takes them
with pages of PAGE reports. B's store write is slowed (WRITE_S per page) and every GET's
``after`` and time are recorded by an httpx request hook.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio

from overflowd.config import ApiSettings
from overflowd.identity import NodeIdentity
from overflowd.peers import PeeringSettings, PeerSettings
from overflowd.services.api import ApiContext, ApiService
from overflowd.services.peer_pull import PeerPull, default_client
from overflowd.store import Store
from overflowd.store import peers as peer_store
from tests.support.reports import make_payload

OBSERVER, SERVER = NodeIdentity(seed=b"\x61" * 32), NodeIdentity(seed=b"\x62" * 32)
PAGE = 200
PAGES = 5
WRITE_S = 0.3


def _serve_and_pull(
    tmp_path: Path, rounds: int, hook: Callable[[httpx.Request], Any]
) -> tuple[PeerPull, list[tuple[float, float]], Store, list[str]]:
    """A with PAGES full pages; B pulls ``rounds`` rounds. Returns B's pull, its page writes'
    (start, end) times, B's store (open) and A's report ids."""
    now = int(time.time() * 1000)
    reports = [
        OBSERVER.sign_report(make_payload(packets=1 + i, time_ms=now)) for i in range(PAGE * PAGES)
    ]
    a = Store.open(f"sqlite:///{tmp_path / 'a.db'}")
    a.add_reports([(r, now, "import") for r in reports])
    b = Store.open(f"sqlite:///{tmp_path / 'b.db'}")
    settings = PeeringSettings(pull_page_reports=PAGE)
    writes: list[tuple[float, float]] = []

    async def main() -> PeerPull:
        ctx = ApiContext(identity=SERVER, contacts=(), observation_point="", store=a)
        api = ApiService(ApiSettings(listen="127.0.0.1:0"), ctx)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(api.run)
            url = f"http://{host}:{port}/"
            peer = PeerSettings(name="a", url=url, key=SERVER.public_key)
            peer_store.ensure_peer(b, peer.key, name="a", url=url, now_ms=now)
            pull = PeerPull([peer], settings, b)
            write = pull._write

            def slow_write(*args: Any) -> set[str]:
                start = time.monotonic()
                time.sleep(WRITE_S)
                try:
                    return write(*args)
                finally:
                    writes.append((start, time.monotonic()))

            pull._write = slow_write  # type: ignore[method-assign]
            async with default_client(settings) as client:
                client.event_hooks["request"] = [hook]
                with trio.fail_after(60):
                    for _ in range(rounds):
                        await pull.pull_round(client, peer)
            api.stop()
        return pull

    try:
        pull = trio.run(main)
    finally:
        a.close()
    return pull, writes, b, [r.report_id for r in reports]


def _after(request: httpx.Request) -> int:
    return int(request.url.params["after"])


def test_the_next_page_is_fetched_while_the_last_one_is_stored(tmp_path: Path) -> None:
    gets: list[tuple[int, float]] = []

    async def hook(request: httpx.Request) -> None:
        gets.append((_after(request), time.monotonic()))

    pull, writes, b, ids = _serve_and_pull(tmp_path, 1, hook)
    try:
        stats = pull.statistics().peers["a"]
        assert stats.stored == len(ids) and stats.duplicates == 0
        assert all(b.get_report(i) is not None for i in ids)
        # Pages 2..PAGES+1 (the last one short, empty) were each asked for while the page
        # before it was being written: at most one page ahead, so never two writes before.
        assert len(gets) == PAGES + 1 and len(writes) == PAGES + 1
        for k in range(1, len(gets)):
            asked = gets[k][1]
            start, end = writes[k - 1]
            assert asked < end, (k, asked, start, end)
            if k >= 2:
                assert asked > writes[k - 2][1], "more than one page ahead"
        assert [after for after, _ in gets] == sorted({after for after, _ in gets})
    finally:
        b.close()


def test_a_failed_page_ahead_costs_its_round_and_nothing_is_lost(tmp_path: Path) -> None:
    seen: list[int] = []

    async def hook(request: httpx.Request) -> None:
        after = _after(request)
        seen.append(after)
        # The third page fails in the first round (asked twice: the pull retries a
        # connection error once at once), then works.
        if seen.count(after) <= 2 and len({s for s in seen}) == 3:
            raise httpx.ConnectError("refused by the test")

    pull, _writes, b, ids = _serve_and_pull(tmp_path, 2, hook)
    try:
        stats = pull.statistics().peers["a"]
        assert stats.errors.get("connect") == 1, stats.errors
        assert stats.stored == len(ids) and stats.duplicates == 0
        assert all(b.get_report(i) is not None for i in ids)
        row = peer_store.get_peer(b, SERVER.public_key)
        assert row is not None and row.pull_cursor == stats.cursor
    finally:
        b.close()
