"""Review: the per-sender-network budget is charged by reports of *throwaway keys* and then
refuses an *established* observer in that network. UDP sources are spoofable, so anyone can
spend an observer's /24 (or /48) budget with fresh keys (admitted while the new-key pool has
room) and shut it out until those rows age out (received_max_age_days, 30 by default).

Over real UDP on loopback: the "spoofed" source is another address of the victim's /24 of
127/8. Expected: an established observer keeps being stored whatever strangers do.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import trio

from overflowd import report as rpt
from overflowd.config import StorageSettings
from overflowd.identity import NodeIdentity
from overflowd.services.inband import InbandListener, InbandSettings
from overflowd.services.retention import RetentionService
from overflowd.storage_policy import StoragePolicy
from overflowd.store import Store
from overflowd.wire import datagram
from tests.support.reports import make_payload

DAY_MS = 86_400_000
VICTIM = NodeIdentity(seed=b"\x41" * 32)
SETTINGS = StorageSettings(
    received_max_reports=10_000,
    received_max_bytes=10**9,
    received_max_reports_per_key=20,
    received_max_reports_per_sender=60,
    new_keys_max_fraction=0.25,  # 2,500 reports for new keys: plenty for the attack
    established_after_s=86_400.0,
    prune_interval_s=3600.0,
)


def signed(by: NodeIdentity, n: int = 0, at_ms: int | None = None) -> rpt.SignedReport:
    payload = make_payload("127.0.0.1", "127.0.0.2", time_ms=at_ms or int(time.time() * 1000))
    return by.sign_report(
        dataclasses.replace(payload, flow=dataclasses.replace(payload.flow, sport=1 + n))
    )


async def test_throwaway_keys_from_a_spoofed_neighbour_shut_out_an_established_observer(
    tmp_path: Path,
) -> None:
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        then = int(time.time() * 1000) - 2 * DAY_MS
        old = signed(VICTIM, 0, then)
        assert store.add_reports([(old, then, "udp")], senders={old.report_id: "127.3.0.0/24"}) == 1
        policy = StoragePolicy(SETTINGS)
        retention = RetentionService(store, SETTINGS, policy=policy, probe=lambda: None)
        listener = InbandListener(
            InbandSettings(), store, listen=("127.0.0.1", 0), admit=policy.admit
        )
        socks: dict[str, trio.socket.SocketType] = {}
        sent = 0

        async def send(r: rpt.SignedReport, source: str) -> None:
            nonlocal sent
            if source not in socks:
                socks[source] = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                await socks[source].bind((source, 0))
            await socks[source].sendto(datagram.to_wire(r.cose), addr)
            sent += 1
            with trio.fail_after(10):
                while listener.statistics().datagrams < sent:
                    await trio.sleep(0.002)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(retention.run)
                addr = await nursery.start(listener.run)
                # The attacker: 60 fresh keys, one report each, "from" the victim's /24.
                for k in range(60):
                    await send(
                        signed(NodeIdentity(seed=(k + 1000).to_bytes(4, "big") * 8)), "127.3.0.99"
                    )
                mine = signed(VICTIM, 1)
                await send(mine, "127.3.0.1")
                with trio.move_on_after(2):
                    while store.get_report(mine.report_id) is None:
                        await trio.sleep(0.02)
                listener.stop()
                nursery.cancel_scope.cancel()
        for s in socks.values():
            s.close()
        refused = dict(policy.statistics().refused)
        assert store.get_report(mine.report_id) is not None, (
            f"established observer refused: {refused}"
        )
