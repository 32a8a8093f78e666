"""Review: throwaway keys first *seen* (even refused) a day ago escape the new-key pool, push the
established observer out of the policy's established table, and fill the total budget.

Over real UDP on loopback; the listener's wall clock is injected so that "a day later" is
instant. Expected (the module's promise): an established observer keeps being stored whatever
strangers do. Observed: its report is refused.
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
from tests.support.reports import make_payload

DAY_S = 86_400
ESTABLISHED = NodeIdentity(seed=b"\x41" * 32)
SETTINGS = StorageSettings(
    received_max_reports=200,
    received_max_bytes=10**9,
    received_max_reports_per_key=20,
    received_max_reports_per_sender=10**6,
    new_keys_max_fraction=0.1,  # 20 reports for keys younger than a day
    established_after_s=float(DAY_S),
    prune_interval_s=3600.0,
    max_tracked_keys=40,
)


def throwaway(n: int) -> NodeIdentity:
    return NodeIdentity(seed=(n + 7).to_bytes(4, "big") * 8)


def signed(by: NodeIdentity, n: int, at_s: float) -> rpt.SignedReport:
    payload = make_payload("127.0.0.1", "127.0.0.2", time_ms=int(at_s * 1000))
    return by.sign_report(
        dataclasses.replace(payload, flow=dataclasses.replace(payload.flow, sport=1 + n))
    )


async def test_keys_aged_while_refused_starve_an_established_observer(tmp_path: Path) -> None:
    clock = [time.time()]
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        then_ms = int((clock[0] - 2 * DAY_S) * 1000)
        old = signed(ESTABLISHED, 0, then_ms / 1000)
        assert store.add_reports([(old, then_ms, "udp")]) == 1
        policy = StoragePolicy(SETTINGS)
        retention = RetentionService(store, SETTINGS, policy=policy, probe=lambda: None)
        listener = InbandListener(
            InbandSettings(),
            store,
            listen=("127.0.0.1", 0),
            admit=policy.admit,
            wall_clock=lambda: clock[0],
        )
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        sent = 0

        async def send(r: rpt.SignedReport) -> None:
            nonlocal sent
            from overflowd.wire import datagram

            await sock.sendto(datagram.to_wire(r.cose), addr)
            sent += 1
            with trio.fail_after(10):
                while listener.statistics().datagrams < sent:
                    await trio.sleep(0.005)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                await nursery.start(retention.run)
                addr = await nursery.start(listener.run)
                # Day 0: 40 throwaway keys, one report each. Most are refused (new-key pool),
                # but every one of them starts its clock in the policy.
                for k in range(40):
                    await send(signed(throwaway(k), 0, clock[0]))
                # A day later: the same keys are "established" and bypass the pool; the
                # established table (max_tracked_keys) no longer holds ESTABLISHED.
                # (20 of the 40 were refused: the pool holds 20; they age all the same)
                assert policy.statistics().refused["new_keys"] == 20
                clock[0] += DAY_S + 1
                for n in range(1, 20):
                    for k in range(40):
                        await send(signed(throwaway(k), n, clock[0]))
                # The established observer, heard from two days ago, reports again.
                mine = signed(ESTABLISHED, 1, clock[0])
                await send(mine)
                with trio.move_on_after(2):
                    while store.get_report(mine.report_id) is None:
                        await trio.sleep(0.02)
                listener.stop()
                nursery.cancel_scope.cancel()
        sock.close()
        refused = dict(policy.statistics().refused)
        assert store.get_report(mine.report_id) is not None, (
            f"established observer refused; policy refused={refused}, "
            f"stored={listener.statistics().stored}"
        )
