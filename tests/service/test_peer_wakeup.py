"""The store wakes the push tails: a report stored at A reaches B's store at once, not at a poll.

A is in process (its store and its PeerPush), B is an ``overflowd run`` daemon on loopback with
A among its peers. A's tail poll and its delivery's idle sleep are set to a minute, so a report
that reaches B within a few seconds can only have been carried by the wake-up from the store's
commit (``Store.on_new_reports``) to the tail, and from the tail to the delivery.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import trio

from overflowd.identity import NodeIdentity, load_identity
from overflowd.peers import PeeringSettings, PeerSettings
from overflowd.services.peer_push import PeerPush
from overflowd.store import Store
from tests.service.test_peer_push import Node, _fresh
from tests.support.cli import run
from tests.support.postgres import free_port

#: Far longer than the test's own deadline: only the wake-up can explain any arrival.
LONG_POLL_S = 600.0
#: A report stored at A is in B's store within this once the connection is up (~10-50 ms on
#: an idle machine, 300-500 ms on a loaded one; the margin is for a loaded CI runner).
ARRIVAL_BOUND_S = 5.0


def test_a_stored_report_is_pushed_at_once_not_at_the_next_poll(tmp_path: Path) -> None:
    a_identity = NodeIdentity.generate()
    home_b = tmp_path / "b"
    assert run("overflowd", "init", "--home", str(home_b)).code == 0
    b = Node("b", home_b, load_identity(home_b), free_port())
    (home_b / "overflowd.toml").write_text(
        f'[[peers]]\nname = "a"\nurl = "http://127.0.0.1:9/"\n'
        f'key = "{a_identity.public_key_b64}"\npush = false\npull = false\n',
        encoding="utf-8",
    )
    store_a = Store.open(f"sqlite:///{tmp_path / 'a.db'}")
    peer_b = PeerSettings(name="b", url=b.url, key=b.identity.public_key, pull=False)
    push = PeerPush(a_identity, store_a, [peer_b], PeeringSettings())
    push.tail_poll_s = push.idle_max_s = LONG_POLL_S
    b.start()
    try:
        warm_up, *reports = _fresh(4, salt=91)
        took: list[float] = []

        async def main() -> None:
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    await nursery.start(push.run)
                    await trio.sleep(0.3)  # the tails' first read is done: they wait a minute
                    with Store.open(f"sqlite:///{home_b / 'overflowd.db'}") as store_b:
                        # The first one also opens the connection and warms B's first request:
                        # no bound on its time but the test's (far under the poll), then each
                        # next one within ARRIVAL_BOUND_S.
                        now_ms = int(time.time() * 1000)
                        await trio.to_thread.run_sync(
                            functools.partial(store_a.add_reports, [(warm_up, now_ms, "import")])
                        )
                        while store_b.get_report(warm_up.report_id) is None:
                            await trio.sleep(0.02)
                        for r in reports:
                            start = time.monotonic()
                            now_ms = int(time.time() * 1000)
                            await trio.to_thread.run_sync(
                                functools.partial(store_a.add_reports, [(r, now_ms, "import")])
                            )
                            with trio.move_on_after(ARRIVAL_BOUND_S):
                                while store_b.get_report(r.report_id) is None:
                                    await trio.sleep(0.01)
                            took.append(time.monotonic() - start)
                    # B stored it before it answered; A counts it once the answer is read.
                    while push.statistics().peers["b"]["delivered"] < 1 + len(reports):
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()

        trio.run(main)
        assert push.wakeups >= 1 + len(reports)
        assert all(t < ARRIVAL_BOUND_S for t in took), took
    finally:
        b.stop()
        store_a.close()
