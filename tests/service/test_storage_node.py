"""Storage budgets in a running NodeService, over real UDP on loopback.

Spoofed NetFlow v5 records claiming 2**32-1 packets are each reported (p = 1): the signing
budget bounds the rate, the own-report budget bounds what accumulates. When headroom runs
short, received reports are refused and pruned while the node's own reports and their webhook
outbox rows keep being written. Free space is a stand-in filesystem (the probe is injectable;
no test may fill the machine's disk). Nothing is sent anywhere but 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable
from pathlib import Path

import trio

from overflowd.config import SamplingSettings, Settings, StorageSettings
from overflowd.identity import NodeIdentity
from overflowd.notify import BudgetSettings, WebhookSettings
from overflowd.services.inband import InbandSettings
from overflowd.services.metrics import node_metrics
from overflowd.services.node import NodeService
from overflowd.services.retention import RetentionService
from overflowd.store import Store, outbox
from overflowd.store import retention as ret
from overflowd.wire import datagram
from tests.support.reports import make_payload
from tests.unit.test_wire_v5 import v5

TIMEOUT_S = 60
OBSERVER = NodeIdentity(seed=b"\x61" * 32)
HOOK = "https://127.0.0.1:9/hook"  # refused by the SSRF policy: rows go dead, never sent


def spoofed_v5(first: int, n: int = 30) -> bytes:
    """n records of 2**32-1 packets each from 192.0.2.0/24 (the webhook target prefix)."""
    records = [
        {"src": 0xC0000200 + (first + i) % 250 + 1, "sport": 1 + first + i, "packets": 2**32 - 1}
        for i in range(n)
    ]
    return v5(records, secs=int(time.time()))


def received(n: int) -> bytes:
    payload = make_payload("127.0.0.1", "127.0.0.2", time_ms=int(time.time() * 1000))
    flow = dataclasses.replace(payload.flow, sport=1 + n)
    return datagram.to_wire(OBSERVER.sign_report(dataclasses.replace(payload, flow=flow)).cose)


def settings(storage: StorageSettings) -> Settings:
    return Settings(
        sampling=SamplingSettings(max_reports_per_s=1000.0, max_reports_burst=5000),
        inband=InbandSettings(listen="127.0.0.1:0"),
        # every own report gets its outbox row, due now (the budgets are not what is tested
        # here; webhooks have their own since #9)
        webhook=WebhookSettings(targets=(("192.0.2.0/24", HOOK),), prefix_reports_burst=10_000),
        budget=BudgetSettings(burst=10_000, per_prefix_burst=10_000),
        storage=storage,
    )


async def wait_until(check: Callable[[], bool]) -> None:
    while not check():
        await trio.sleep(0.02)


async def send(to: tuple[str, int], data: bytes) -> None:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.bind(("127.0.0.1", 0))
        await sock.sendto(data, to)


async def test_spoofed_v5_flood_own_reports_stay_within_their_budget(tmp_path: Path) -> None:
    """300 spoofed records, all reported; pruning keeps own reports under own_max_bytes."""
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        budget = 60 * 900  # about 60 own reports
        s = settings(
            StorageSettings(own_max_bytes=budget, prune_interval_s=0.2, headroom_interval_s=0.1)
        )
        node = NodeService(NodeIdentity.generate(), s, store, listen=["127.0.0.1:0"])
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                (collector,) = await nursery.start(node.run)
                for i in range(10):
                    await send(collector, spoofed_v5(30 * i))
                await wait_until(lambda: node.statistics().reports_stored == 300)
                # Reports a pending delivery refers to are kept; these go dead (SSRF refusal)
                # quickly, and the next passes bring the rest back under budget.
                await wait_until(lambda: outbox.counts(store)[outbox.PENDING] == 0)
                passes = node.retention.statistics().passes
                await wait_until(lambda: node.retention.statistics().passes >= passes + 2)
                node.stop()
        stats = node.retention.statistics()
        own = ret.usage(store)[ret.OWN]
        assert own.bytes <= budget and own.reports < 300
        assert stats.pruned["own_size"] == 300 - own.reports
        # every delivery was recorded, pruned report or not (the outbox carries its own copy)
        assert len(outbox.entries(store)) == 300
        assert node.statistics().storage == stats


class Disk:
    """A stand-in filesystem: ``capacity`` bytes, holding the store and ``other`` bytes."""

    def __init__(self, store: Store, capacity: int) -> None:
        self.store, self.capacity, self.other = store, capacity, 0

    def probe(self) -> ret.Headroom:
        used = sum(u.bytes for u in ret.usage(self.store).values())
        return ret.Headroom(self.capacity - self.other - used, self.capacity)


async def test_disk_short_sheds_received_reports_own_reports_and_outbox_go_on(
    tmp_path: Path,
) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        storage = StorageSettings(
            min_free_bytes=10_000_000,
            min_free_fraction=0.0,
            headroom_interval_s=0.05,
            prune_interval_s=3600.0,
        )
        s = settings(storage)
        node = NodeService(NodeIdentity.generate(), s, store, listen=["127.0.0.1:0"])
        disk = Disk(store, capacity=100_000_000)
        node.retention = RetentionService(
            store, storage, policy=node.storage_policy, probe=disk.probe
        )
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                (collector,) = await nursery.start(node.run)
                assert node.inband_bound is not None
                listener = node.inband_listener
                assert listener is not None
                # Room: received reports are stored.
                for n in range(10):
                    await send(node.inband_bound, received(n))
                await wait_until(lambda: listener.statistics().stored == 10)
                # The disk fills (something else on it): short.
                disk.other = 95_000_000
                await wait_until(lambda: node.retention.statistics().headroom_short)
                await wait_until(lambda: ret.usage(store)[ret.RECEIVED].reports == 0)
                for n in range(10, 20):
                    await send(node.inband_bound, received(n))
                # ...while own reports and their outbox rows are all written.
                for i in range(5):
                    await send(collector, spoofed_v5(30 * i))
                await wait_until(lambda: listener.statistics().datagrams == 20)
                await wait_until(lambda: node.statistics().reports_stored == 150)
                assert len(outbox.entries(store)) == 150
                assert ret.usage(store)[ret.RECEIVED].reports == 0
                # Room again: received reports are stored again.
                disk.other = 0
                await wait_until(lambda: not node.retention.statistics().headroom_short)
                await send(node.inband_bound, received(99))
                await wait_until(lambda: listener.statistics().stored == 11)
                node.stop()
        stats = node.retention.statistics()
        assert stats.refused["headroom"] == 10 == listener.statistics().dropped["storage"]
        assert stats.pruned["headroom"] == 10 and stats.headroom_exhausted >= 1
        assert ret.usage(store)[ret.OWN].reports == 150
        exported = {
            (m.name, sample.labels.get("reason", "")): sample.value
            for m in node_metrics(node.statistics())
            for sample in m.samples
        }
        assert exported[("overflowd_storage_refused", "headroom")] == 10
        assert exported[("overflowd_storage_pruned", "headroom")] == 10
