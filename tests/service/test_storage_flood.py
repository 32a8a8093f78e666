"""A flood of valid in-band reports, signed by throwaway keys, over real UDP on loopback.

The listener (overflowd/services/inband.py) asks the admission policy before it queues each
verified report; the retention service seeds that policy from the store. The flood comes from
one socket, then from many /24s of 127/8 (Linux answers on all of it), and is refused per key,
per sender network, for new keys and in total, while an observer first stored two days ago
keeps being stored. Nothing is sent anywhere but 127.0.0.0/8.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Callable
from pathlib import Path

import trio

from overflowd import report as rpt
from overflowd.config import StorageSettings
from overflowd.identity import NodeIdentity
from overflowd.services.inband import InbandListener, InbandSettings
from overflowd.services.retention import RetentionService
from overflowd.storage_policy import StoragePolicy
from overflowd.store import Store
from overflowd.store import retention as ret
from overflowd.wire import datagram
from tests.support.reports import make_payload

TIMEOUT_S = 60
DAY_MS = 86_400_000
ESTABLISHED = NodeIdentity(seed=b"\x41" * 32)
#: Other observers first stored two days ago, each from its own network.
OLD_KEYS = [NodeIdentity(seed=bytes([0x50, n]) * 16) for n in range(20)]
SETTINGS = StorageSettings(
    received_max_reports=300,
    received_max_bytes=10**9,
    received_max_reports_per_key=20,
    received_max_reports_per_sender=60,
    new_keys_max_fraction=0.5,  # 150 reports for keys younger than a day
    established_after_s=86_400.0,
    prune_interval_s=3600.0,
)


def now_ms() -> int:
    return int(time.time() * 1000)


def signed(by: NodeIdentity, n: int = 0, at_ms: int | None = None) -> rpt.SignedReport:
    payload = make_payload("127.0.0.1", "127.0.0.2", time_ms=at_ms or now_ms())
    flow = dataclasses.replace(payload.flow, sport=1 + n)
    return by.sign_report(dataclasses.replace(payload, flow=flow))


def throwaway(n: int) -> NodeIdentity:
    return NodeIdentity(seed=n.to_bytes(4, "big") * 8)


async def wait_until(check: Callable[[], bool]) -> None:
    while not check():
        await trio.sleep(0.01)


async def test_flood_of_throwaway_keys_is_capped_and_an_established_key_keeps_going(
    tmp_path: Path,
) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        # Two days ago: the established observer and 20 others, one report each.
        then = now_ms() - 2 * DAY_MS
        seeded = [(signed(k, 0, then), then, "udp") for k in [ESTABLISHED, *OLD_KEYS]]
        senders = {r.report_id: f"127.2.{i}.0/24" for i, (r, _, _) in enumerate(seeded)}
        assert store.add_reports(seeded, senders=senders) == 21

        policy = StoragePolicy(SETTINGS)
        # No headroom check here (the test machine's disk is not ours to judge); see
        # tests/service/test_retention.py for headroom.
        retention = RetentionService(store, SETTINGS, policy=policy, probe=lambda: None)
        listener = InbandListener(
            InbandSettings(), store, listen=("127.0.0.1", 0), admit=policy.admit
        )
        sockets: dict[str, trio.socket.SocketType] = {}
        sent = 0
        established_ids: list[str] = []

        async def send(report: rpt.SignedReport, source: str) -> None:
            nonlocal sent
            sock = sockets.get(source)
            if sock is None:
                sock = sockets[source] = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                await sock.bind((source, 0))
            await sock.sendto(datagram.to_wire(report.cose), addr)
            sent += 1
            if sent % 25 == 0:  # pace below the socket buffer: we test our code, not the kernel
                await wait_until(lambda: listener.statistics().datagrams == sent)

        async def established_report() -> None:
            r = signed(ESTABLISHED, len(established_ids) + 1)
            established_ids.append(r.report_id)
            await send(r, "127.3.0.1")

        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                await nursery.start(retention.run)
                addr = await nursery.start(listener.run)
                # The first pass measures the store; let it end before the flood, so that no
                # report is counted twice (admitted after its mark and stored before it
                # measured: conservative, but it would make the counts below vary).
                await wait_until(lambda: retention.statistics().passes == 1)
                # A: one throwaway key, 30 reports, one socket: 20 stored (per key).
                one = throwaway(1)
                for n in range(30):
                    await send(signed(one, n), "127.0.0.1")
                # B: 100 more throwaway keys from the same socket: 40 more (per sender /24).
                for i in range(100):
                    await send(signed(throwaway(100 + i)), "127.0.0.1")
                    if i % 25 == 0:
                        await established_report()
                # C: 270 throwaway keys from nine other /24s: the new-key pool (150) is full
                # after 90 of them.
                for i in range(270):
                    await send(signed(throwaway(1000 + i)), f"127.0.{1 + i % 9}.1")
                    if i % 25 == 0:
                        await established_report()
                await wait_until(lambda: listener.statistics().datagrams == sent)
                await wait_until(lambda: listener.statistics().stored == 20 + 40 + 90 + 15)
                # D: the 20 old observers, 15 reports each: the total (300) is reached.
                for k, key in enumerate(OLD_KEYS):
                    for n in range(15):
                        await send(signed(key, 1 + n), f"127.2.{k + 1}.1")
                await wait_until(lambda: listener.statistics().datagrams == sent)
                await wait_until(lambda: listener.statistics().stored == 300 - 21)
                listener.stop()
                nursery.cancel_scope.cancel()
        for sock in sockets.values():
            sock.close()

        stats = listener.statistics()
        refused = policy.statistics().refused
        assert len(established_ids) == 15
        assert dict(refused) == {
            "headroom": 0,
            "per_key": 10,
            "per_sender": 60,
            "new_keys": 180,
            "total_reports": 300 - (300 - 21 - 20 - 40 - 90 - 15),
            "total_bytes": 0,
        }
        assert stats.dropped["storage"] == sum(refused.values())
        assert stats.accepted == 300 - 21
        # The store is at its budget, not past it, and the established key lost nothing.
        usage = ret.usage(store)[ret.RECEIVED]
        assert usage.reports == store.count_reports() == SETTINGS.received_max_reports
        assert usage.bytes <= SETTINGS.received_max_bytes
        assert all(store.get_report(i) is not None for i in established_ids)
        # sender networks are stored, for the budgets after a restart
        seed = ret.received_seed(store, max_keys=1000, max_senders=1000)
        assert dict(seed.senders)["127.0.0.0/24"] == 60
