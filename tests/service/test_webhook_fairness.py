"""Fairness between webhook endpoints: one slow server never holds up the others.

From the review: one endpoint that never answers held every delivery slot. A pass claimed the 64
oldest due rows and waited for all of them; max_concurrency (8) slots each waited out
total_timeout_s (30 s by default) for the silent endpoint. First attempts are charged to no
budget (retry budgets start at attempt 2) and nothing limits one host's share of the slots, so a
URL anybody publishes in DNS (``u=``, for the flows it is an end of) delays every other
endpoint's deliveries by 64/8 x 30 s = 4 min per pass -- for as long as its rows keep coming.

Library level (WebhookDelivery and its outbox) against two servers on 127.0.0.1;
total_timeout_s 2 s here, so the wait was 16 s instead of 240 s. Fixed by a worker pool
(a freed slot is refilled at once) and max_concurrency_per_host (2 of the 8 slots per server).
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from overflowd.identity import NodeIdentity
from overflowd.services import webhook as svc
from overflowd.store import Store
from overflowd.store import outbox as ob
from tests.service.test_webhook_delivery import enqueue_reports, fast
from tests.service.test_webhook_hostile import answer, serve_raw


async def silent(n: int, stream: trio.SocketStream) -> None:
    await trio.sleep(3600)


async def test_a_silent_endpoint_does_not_hold_up_another_endpoints_delivery(
    tmp_path: Path,
) -> None:
    identity = NodeIdentity(seed=bytes(range(32)))
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            bad_url, _bad = await serve_raw(nursery, silent)
            good_url, good = await serve_raw(nursery, answer(204))
            enqueue_reports(store, identity, bad_url, 64)
            enqueue_reports(store, identity, good_url, 1)
            delivery = svc.WebhookDelivery(
                store, identity, fast(total_timeout_s=2.0, io_timeout_s=2.0, max_concurrency=8)
            )
            started = time.monotonic()
            await nursery.start(delivery.run)
            with trio.move_on_after(30):
                while not good.at:
                    await trio.sleep(0.05)
            waited = (good.at[0] if good.at else time.monotonic()) - started
            nursery.cancel_scope.cancel()
        assert waited < 4.0, (
            f"the good endpoint's delivery waited {waited:.1f} s behind the silent one"
        )


class Counting:
    """A server that never answers and remembers how many requests it held open at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    async def respond(self, n: int, stream: trio.SocketStream) -> None:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            # Until the sender gives up and closes (its total_timeout_s): then the slot is free.
            while await stream.receive_some():
                pass
        finally:
            self.now -= 1


async def test_one_server_holds_at_most_max_concurrency_per_host_slots(tmp_path: Path) -> None:
    identity = NodeIdentity(seed=bytes(range(32)))
    counting = Counting()
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            bad_url, _bad = await serve_raw(nursery, counting.respond)
            good_url, good = await serve_raw(nursery, answer(204))
            # Three URLs (paths) of one server: the busy ones are not claimed, the others are
            # given back while it has its two deliveries in flight.
            for path in ("/a", "/b", "/c"):
                enqueue_reports(store, identity, bad_url + path, 10)
            enqueue_reports(store, identity, good_url, 3)
            delivery = svc.WebhookDelivery(
                store,
                identity,
                # One report per POST, so that each URL has POSTs waiting: slots, not batches.
                fast(total_timeout_s=1.0, io_timeout_s=1.0, max_concurrency=8, max_batch_reports=1),
            )
            await nursery.start(delivery.run)
            with trio.move_on_after(30):
                while len(good.at) < 3 or delivery.statistics().network_errors < 4:
                    await trio.sleep(0.05)
            stats = delivery.statistics()
            nursery.cancel_scope.cancel()
    assert len(good.at) == 3
    # Two at a time, for two rounds of timeouts at least: never a third connection.
    assert stats.network_errors >= 4
    assert counting.most == svc.WebhookSettings.max_concurrency_per_host == 2
    assert stats.host_busy > 0 and stats.dead == 0


def test_a_claim_skips_the_urls_it_is_told_to(tmp_path: Path) -> None:
    identity = NodeIdentity(seed=bytes(range(32)))
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        enqueue_reports(store, identity, "http://127.0.0.1:1/busy", 3)
        enqueue_reports(store, identity, "http://127.0.0.1:1/free", 1)
        now_ms = max(e.next_attempt_ms for e in ob.entries(store))
        claimed = ob.claim_due(
            store,
            now_ms=now_ms,
            lease_ms=1000,
            limit=10,
            skip_urls=["http://127.0.0.1:1/busy"],
        )
        assert [e.url for e in claimed] == ["http://127.0.0.1:1/free"]
        assert ob.counts(store)["pending"] == 4


def test_max_concurrency_per_host_is_checked_and_read_from_toml() -> None:
    import pytest

    from overflowd.errors import ConfigError

    assert (
        svc.WebhookSettings.from_toml({"max_concurrency_per_host": 3}).max_concurrency_per_host == 3
    )
    with pytest.raises(ValueError, match="max_concurrency_per_host"):
        svc.WebhookSettings(max_concurrency_per_host=0)
    with pytest.raises(ConfigError, match="max_concurrency_per_host"):
        svc.WebhookSettings.from_toml({"max_concurrency_per_host": 2.5})
