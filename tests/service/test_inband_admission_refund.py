"""Review: InbandListener.handle_datagram asks the admission policy (which *counts* the report
against its key, its sender network and the new-key pool) before it tries the queue; a report
then dropped ``queue_full`` is never refunded. ``StoragePolicy.resync`` corrects only the
totals: per-key and per-sender counts and the new-key pool keep the phantom rows until restart.
A stranger who keeps the listener's queue full (a flood) makes an established observer's
reports count against its own per-key budget while none is stored, until it is refused
``per_key`` for good.

Through the per-datagram entry point (``handle_datagram``), with a queue that is full.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import trio

from overflowd.config import StorageSettings
from overflowd.identity import NodeIdentity
from overflowd.services.inband import InbandListener, InbandSettings
from overflowd.storage_policy import KeyUsage, StoragePolicy
from overflowd.store import Store
from overflowd.wire import datagram
from tests.support.reports import make_payload

VICTIM = NodeIdentity(seed=b"\x41" * 32)


def wire(n: int) -> bytes:
    p = make_payload("127.0.0.1", "127.0.0.2", time_ms=int(time.time() * 1000))
    r = VICTIM.sign_report(dataclasses.replace(p, flow=dataclasses.replace(p.flow, sport=1 + n)))
    return datagram.to_wire(r.cose)


async def test_reports_dropped_queue_full_do_not_use_up_the_per_key_budget(tmp_path: Path) -> None:
    settings = StorageSettings(received_max_reports_per_key=10)
    policy = StoragePolicy(settings)
    # The victim is established (first stored two days ago), holding 1 report.
    two_days_ago = int(time.time() * 1000) - 2 * 86_400_000
    policy.seed(
        reports=1,
        bytes_=1000,
        keys=[KeyUsage(VICTIM.public_key, 1, 1000, two_days_ago)],
        senders=[],
        now=time.time(),
    )
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        listener = InbandListener(
            InbandSettings(), store, listen=("127.0.0.1", 0), admit=policy.admit
        )
        full_send, _full_recv = trio.open_memory_channel(0)  # the queue is full (a flood)
        dropped = [listener.handle_datagram(wire(n), "127.3.0.1", full_send) for n in range(20)]
        assert set(dropped) <= {"queue_full", "storage"}
        # The flood is over; the queue has room; nothing of the victim's was stored.
        send, _recv = trio.open_memory_channel(10)
        verdict = listener.handle_datagram(wire(100), "127.3.0.1", send)
        assert not isinstance(verdict, str), (
            f"refused {verdict!r}: policy={policy.statistics().refused}"
        )


async def test_a_report_the_store_already_had_is_refunded(tmp_path: Path) -> None:
    """Over UDP on loopback: reports the store already holds (from a webhook, say) take no
    budget when they arrive in band again; only the new one is counted."""
    settings = StorageSettings(received_max_reports_per_key=10)
    policy = StoragePolicy(settings)
    reports = []
    for n in range(4):
        p = make_payload("127.0.0.1", "127.0.0.2", time_ms=int(time.time() * 1000))
        reports.append(
            VICTIM.sign_report(
                dataclasses.replace(p, flow=dataclasses.replace(p.flow, sport=1 + n))
            )
        )
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        now_ms = int(time.time() * 1000)
        assert store.add_reports([(r, now_ms, "webhook") for r in reports[:3]]) == 3
        listener = InbandListener(
            InbandSettings(),
            store,
            listen=("127.0.0.1", 0),
            admit=policy.admit,
            refund=policy.refund,
        )
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(listener.run)
                sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                with sock:
                    for r in reports:
                        await sock.sendto(datagram.to_wire(r.cose), addr)
                    while listener.statistics().stored + listener.statistics().already_stored < 4:
                        await trio.sleep(0.01)
                listener.stop()
        stats = listener.statistics()
        assert (stats.stored, stats.already_stored) == (1, 3)
        p = policy.statistics()
        assert (p.admitted, p.refunded, p.received_reports) == (4, 3, 1)
        assert p.new_key_reports == 1 and policy._new[VICTIM.public_key].reports == 1  # white box
