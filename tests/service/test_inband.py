"""In-band delivery on loopback: sender → listener → store, and everything the listener refuses.

Real UDP sockets on 127.0.0.1 / 127.0.0.2 / ::1, port 0, a real SQLite store, and an absolute
timeout on every test. No datagram ever leaves loopback: where a test needs a non-loopback
target it injects the send function and counts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.notify import Budget, BudgetSettings
from overflowd.services.inband import (
    InbandListener,
    InbandReceived,
    InbandSender,
    InbandSettings,
)
from overflowd.store import Store
from overflowd.wire import datagram
from tests.support.reports import make_payload
from tests.support.stores import sqlite_at_head

TIMEOUT_S = 20
OBSERVER = NodeIdentity(seed=b"\x11" * 32)
OTHER = NodeIdentity(seed=b"\x22" * 32)


def now_ms() -> int:
    return int(time.time() * 1000)


def signed(
    src: str = "127.0.0.1",
    dst: str = "127.0.0.2",
    *,
    sport: int = 53,
    packets: int = 1000,
    time_ms: int | None = None,
) -> rpt.SignedReport:
    """A fresh report by OBSERVER; ``sport`` tells flows apart (de-duplication is per flow)."""
    payload = make_payload(
        src, dst, packets=packets, time_ms=now_ms() if time_ms is None else time_ms
    )
    payload = dataclasses.replace(payload, flow=dataclasses.replace(payload.flow, sport=sport))
    return OBSERVER.sign_report(payload)


async def wait_until(check: Callable[[], bool]) -> None:
    while not check():
        await trio.sleep(0.01)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(sqlite_at_head(tmp_path / "b.sqlite")) as s:
        yield s


async def start_listener(
    nursery: trio.Nursery, store: Store, host: str = "127.0.0.1", port: int = 0, **kw: object
) -> tuple[InbandListener, tuple[str, int]]:
    listener = InbandListener(InbandSettings(), store, listen=(host, port), **kw)  # type: ignore[arg-type]
    bound = await nursery.start(listener.run)
    return listener, bound


async def udp_client(family: int = socket.AF_INET) -> trio.socket.SocketType:
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
    return sock


async def assert_nothing_arrives(sock: trio.socket.SocketType, wait_s: float = 0.3) -> None:
    with trio.move_on_after(wait_s):
        data = await sock.recv(65535)
        raise AssertionError(f"a datagram arrived ({len(data)} bytes): nothing may answer")


async def test_sender_to_listeners_at_both_ends_of_the_flow(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        with (
            Store.open(f"sqlite:///{tmp_path / 'a.sqlite'}") as store_a,
            Store.open(f"sqlite:///{tmp_path / 'b.sqlite'}") as store_b,
        ):
            async with trio.open_nursery() as nursery:
                listener_a, (_, port) = await start_listener(nursery, store_a, "127.0.0.1")
                listener_b, _ = await start_listener(nursery, store_b, "127.0.0.2", port)
                settings = InbandSettings(port=port, allowed_prefixes=("127.0.0.0/8",))
                sender = InbandSender(settings, Budget(BudgetSettings(per_prefix_burst=100)))
                bound = await nursery.start(sender.run)
                assert ("0.0.0.0", bound[0][1]) == bound[0]
                reports = [signed("127.0.0.1", "127.0.0.2", sport=n + 1) for n in range(5)]
                # The same flow again is de-duplicated: not sent a second time.
                reports_again = signed("127.0.0.1", "127.0.0.2", sport=1, packets=99)
                for report in [*reports, reports_again]:
                    assert sender.submit(report)
                await wait_until(lambda: sender.statistics().reports == 6)
                await wait_until(lambda: listener_a.statistics().stored == 5)
                await wait_until(lambda: listener_b.statistics().stored == 5)
                stats = sender.statistics()
                assert stats.datagrams_sent == 10 and stats.send_errors == 0
                assert stats.budget.dropped["duplicate"] == 2
                assert stats.bytes_sent == sum(2 * (len(r.cose) + 4) for r in reports)
                listener_a.stop()
                listener_b.stop()
                nursery.cancel_scope.cancel()
            for store in (store_a, store_b):
                assert store.count_reports() == 5
                got = store.get_report(reports[0].report_id)
                assert got is not None and got.via == "udp"
                assert got.signed_report().cose == reports[0].cose
            a = listener_a.statistics()
            assert a.accepted == 5 and a.trust == {"unknown": 5}
            assert sum(a.dropped.values()) == 0


async def test_ipv6_loopback(store: Store) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listener, (_, port) = await start_listener(nursery, store, "::1")
            sender = InbandSender(InbandSettings(port=port, allowed_prefixes=("::1/128",)))
            await nursery.start(sender.run)
            report = signed("::1", "::1")
            assert await sender.send_report(report) == 1  # a flow to itself: one datagram
            await wait_until(lambda: listener.statistics().stored == 1)
            nursery.cancel_scope.cancel()
        assert store.get_report(report.report_id) is not None


def _forged() -> bytes:
    """Signed by OTHER, claiming to be OBSERVER (kid = OBSERVER's key)."""
    payload = make_payload("127.0.0.1", "127.0.0.2", time_ms=now_ms())
    return datagram.to_wire(rpt.encode_signed(payload, OBSERVER.public_key, OTHER.sign))


def _altered() -> bytes:
    wire = bytearray(datagram.to_wire(signed().cose))
    # The flow's packet count (uint32 1000 = 0x19 03 e8) → 1001: canonical, but not signed.
    i = wire.index(b"packets\x19\x03\xe8") + len(b"packets\x19\x03")
    wire[i] = 0xE9
    return bytes(wire)


async def test_listener_refuses_and_counts_and_never_answers(store: Store) -> None:
    seen: list[InbandReceived] = []
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listener, addr = await start_listener(nursery, store, on_report=seen.append)
            client = await udp_client()
            valid = signed()
            valid_wire = datagram.to_wire(valid.cose)
            cases = [
                ("accepted", valid_wire),
                ("duplicate", valid_wire),  # replayed
                ("forged", _forged()),
                ("forged", _altered()),
                ("malformed", valid_wire[:-10]),  # truncated report
                ("malformed", valid_wire[:200]),
                ("truncated", datagram.MAGIC[:2]),
                ("truncated", datagram.MAGIC),
                ("oversize", datagram.MAGIC + b"\x00" * 1197),
                ("oversize", b"\x00" * 9000),
                ("bad_magic", b"OVF\x02" + valid.cose),
                ("bad_magic", valid.cose),  # a bare report, no envelope
                ("truncated", b""),  # empty: a prefix of the magic
                ("stale", datagram.to_wire(signed(time_ms=now_ms() - 7_200_000).cose)),
                ("future", datagram.to_wire(signed(time_ms=now_ms() + 3_600_000).cose)),
                ("accepted", datagram.to_wire(signed(packets=7).cose)),
            ]
            for _, data in cases:
                await client.sendto(data, addr)
            await wait_until(lambda: listener.statistics().datagrams == len(cases))
            await wait_until(lambda: listener.statistics().stored == 2)
            await assert_nothing_arrives(client)
            listener.stop()
        stats = listener.statistics()
        expected = {reason: 0 for reason in stats.dropped}
        for reason, _ in cases:
            if reason != "accepted":
                expected[reason] += 1
        assert dict(stats.dropped) == expected
        assert stats.accepted == 2 == len(seen)
        assert seen[0].report.report_id == valid.report_id and seen[0].sender == "127.0.0.1"
        assert store.count_reports() == 2
        client.close()


async def test_garbage_flood_keeps_valid_reports_flowing(store: Store) -> None:
    """3,000 bad datagrams (random, bad magic, forged) around 30 good ones: all 30 stored."""
    rng = os.urandom
    forged = [_forged() for _ in range(50)]
    good = [datagram.to_wire(signed(packets=n + 1).cose) for n in range(30)]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            listener, addr = await start_listener(nursery, store)
            client = await udp_client()
            sent = 0
            for i in range(3_000):
                kind = i % 3
                if kind == 0:
                    data = rng(1 + i % 1400)
                elif kind == 1:
                    data = datagram.MAGIC + rng(i % 1196)
                else:
                    data = forged[i % len(forged)]
                await client.sendto(data, addr)
                sent += 1
                if i % 100 == 0:
                    await client.sendto(good[i // 100], addr)
                    sent += 1
                    # Pace the flood below the socket buffer: we test our code, not the kernel's.
                    await wait_until(lambda n=sent: listener.statistics().datagrams >= n - 50)  # type: ignore[misc]
            await wait_until(lambda: listener.statistics().datagrams == sent)
            await wait_until(lambda: listener.statistics().stored == 30)
            await assert_nothing_arrives(client)
            listener.stop()
        stats = listener.statistics()
        assert stats.accepted == 30
        assert stats.dropped["forged"] == 1000
        assert sum(stats.dropped.values()) == 3_000
        assert store.count_reports() == 30
        client.close()


async def test_listener_queue_full_is_dropped_and_counted(store: Store) -> None:
    listener = InbandListener(InbandSettings(), store, listen=("127.0.0.1", 0))
    out, _keep = trio.open_memory_channel[InbandReceived](1)
    first = listener.handle_datagram(datagram.to_wire(signed().cose), "127.0.0.1", out)
    assert isinstance(first, InbandReceived)
    second = datagram.to_wire(signed(packets=2).cose)
    assert listener.handle_datagram(second, "127.0.0.1", out) == "queue_full"
    # Not remembered as seen: the same report may still be taken when there is room.
    await _keep.receive()
    assert isinstance(listener.handle_datagram(second, "127.0.0.1", out), InbandReceived)
    assert listener.statistics().dropped["queue_full"] == 1


async def test_trust_hook_labels_reports(store: Store) -> None:
    pinned = {OBSERVER.public_key}
    listener = InbandListener(
        InbandSettings(),
        store,
        listen=("127.0.0.1", 0),
        trust_of=lambda key: "pinned" if key in pinned else "unknown",
    )
    out, recv = trio.open_memory_channel[InbandReceived](10)
    listener.handle_datagram(datagram.to_wire(signed().cose), "127.0.0.1", out)
    other = OTHER.sign_report(make_payload("127.0.0.1", "127.0.0.2", time_ms=now_ms()))
    listener.handle_datagram(datagram.to_wire(other.cose), "127.0.0.1", out)
    assert [recv.receive_nowait().trust for _ in range(2)] == ["pinned", "unknown"]
    assert listener.statistics().trust == {"pinned": 1, "unknown": 1}


# -- confinement and budgets on the sending side ---------------------------------------------


@pytest.mark.parametrize(
    "allowed",
    [(), ("192.0.2.0/24", "2001:db8::/32"), ("0.0.0.0/0", "::/0")],
    ids=["default-empty", "other-prefixes", "everything-but-loopback"],
)
async def test_confined_sender_sends_nothing_to_a_real_socket(allowed: tuple[str, ...]) -> None:
    """A listening socket at the flow's ends receives nothing unless its prefix is allowed."""
    with trio.fail_after(TIMEOUT_S):
        target = await udp_client()
        port = target.getsockname()[1]
        sender = InbandSender(InbandSettings(port=port, allowed_prefixes=allowed))
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            assert await sender.send_report(signed("127.0.0.1", "127.0.0.1")) == 0
            await assert_nothing_arrives(target)
            nursery.cancel_scope.cancel()
        stats = sender.statistics()
        assert stats.datagrams_sent == 0 and stats.budget.allowed == 0
        reason = "special" if allowed and allowed[0] == "0.0.0.0/0" else "not_allowed"
        assert stats.budget.dropped[reason] == 1
        # ...and the same sender, allowed loopback, does reach it.
        sender = InbandSender(InbandSettings(port=port, allowed_prefixes=("127.0.0.1/32",)))
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            assert await sender.send_report(signed("127.0.0.1", "127.0.0.1")) == 1
            data = await target.recv(2048)
            assert data.startswith(datagram.MAGIC)
            nursery.cancel_scope.cancel()
        target.close()


def test_default_settings_send_nothing() -> None:
    assert InbandSettings().allowed_prefixes == ()
    assert InbandSettings().confinement().allowed == ()
    assert InbandSettings().port == 65535


async def test_confinement_with_an_injected_send_function() -> None:
    """Targets in public ranges are never passed to the OS; allowed ones are, with the port."""
    calls: list[tuple[str, int]] = []

    async def sendto(data: bytes, target: tuple[str, int]) -> None:
        assert data.startswith(datagram.MAGIC) and len(data) <= 1200
        calls.append(target)

    settings = InbandSettings(port=4444, allowed_prefixes=("192.0.2.0/24",))
    sender = InbandSender(settings, sendto=sendto)
    assert await sender.send_report(signed("198.51.100.1", "203.0.113.1")) == 0
    assert await sender.send_report(signed("8.8.8.8", "1.1.1.1")) == 0
    assert await sender.send_report(signed("192.0.2.1", "203.0.113.5")) == 1
    assert calls == [("192.0.2.1", 4444)]
    assert sender.statistics().budget.dropped["not_allowed"] == 5


async def test_sender_budget_bounds_what_reaches_the_listener(store: Store) -> None:
    """50 distinct flows at one instant, budget burst 3: three datagrams, 47 counted drops."""
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listener, (_, port) = await start_listener(nursery, store)
            budget = Budget(BudgetSettings(global_per_s=1.0, burst=3))
            settings = InbandSettings(port=port, allowed_prefixes=("127.0.0.1/32",))
            sender = InbandSender(settings, budget, clock=lambda: 0.0)
            await nursery.start(sender.run)
            for n in range(50):
                sender.submit(signed("127.0.0.1", "127.0.0.1", sport=n + 1))
            await wait_until(lambda: sender.statistics().reports == 50)
            await wait_until(lambda: listener.statistics().stored == 3)
            await trio.sleep(0.2)
            assert listener.statistics().datagrams == 3
            nursery.cancel_scope.cancel()
        stats = sender.statistics()
        assert stats.datagrams_sent == 3
        assert stats.budget.dropped["global_budget"] == 47


def test_submit_without_room_is_dropped_and_counted() -> None:
    sender = InbandSender(InbandSettings(queue_reports=2))
    assert sender.submit(signed()) and sender.submit(signed())
    assert not sender.submit(signed())
    assert sender.statistics().queue_dropped == 1


async def test_send_errors_are_counted_not_raised() -> None:
    async def unreachable(data: bytes, target: tuple[str, int]) -> None:
        raise OSError(101, "Network is unreachable")

    sender = InbandSender(InbandSettings(allowed_prefixes=("192.0.2.0/24",)), sendto=unreachable)
    assert await sender.send_report(signed("192.0.2.1", "192.0.2.2")) == 0
    assert sender.statistics().send_errors == 2


async def test_listener_stop_drains_to_the_store(store: Store) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listener, addr = await start_listener(nursery, store)
            client = await udp_client()
            for n in range(20):
                await client.sendto(datagram.to_wire(signed(packets=n + 1).cose), addr)
            await wait_until(lambda: listener.statistics().accepted == 20)
            listener.stop()  # run() returns once the writer has drained
        assert listener.statistics().stored == 20 == store.count_reports()
        client.close()


async def test_submit_after_the_sender_stopped_is_a_counted_drop_not_an_error() -> None:
    sender = InbandSender(InbandSettings(queue_reports=1))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            nursery.cancel_scope.cancel()
    assert sender.submit(signed())
    assert not sender.submit(signed())
    assert sender.statistics().queue_dropped == 1


# -- the per-datagram boundary ----------------------------------------------------------------


class HookBug(RuntimeError):
    """What a bug in a hook raises: nothing the listener expects."""


async def test_an_unexpected_exception_costs_one_datagram_not_the_listener(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug hit by some datagrams (here in the receive-time trust hook, for OTHER's key) is
    counted by type, logged once per 10 s with the sender, and only those datagrams are lost."""

    def trust_of(key: bytes) -> str:
        if key == OTHER.public_key:
            raise HookBug("boom")
        return "unknown"

    caplog.set_level(logging.WARNING, logger="overflowd.services.inband")
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listener, addr = await start_listener(nursery, store, trust_of=trust_of)
            client = await udp_client()
            for n in range(5):
                bad = OTHER.sign_report(
                    make_payload("127.0.0.1", "127.0.0.2", packets=n + 1, time_ms=now_ms())
                )
                await client.sendto(datagram.to_wire(bad.cose), addr)
                await client.sendto(datagram.to_wire(signed(packets=n + 1).cose), addr)
            await wait_until(lambda: listener.statistics().stored == 5)
            listener.stop()
        client.close()
    stats = listener.statistics()
    assert stats.datagrams == 10 and stats.accepted == 5
    assert dict(stats.errors) == {"HookBug": 5}
    warnings = [r for r in caplog.records if "inband.unexpected_error" in r.getMessage()]
    assert len(warnings) == 1  # rate-limited; the other four are counted
    assert "stage=receive sender=127.0.0.1 error=HookBug: boom" in warnings[0].getMessage()


async def test_an_unexpected_exception_in_a_labeller_costs_one_report(store: Store) -> None:
    async def label(report: rpt.SignedReport, sender: str) -> str:
        if report.payload.flow.packets == 13:
            raise HookBug("unlucky")
        return "unknown"

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listener, addr = await start_listener(nursery, store, label=label, label_workers=2)
            client = await udp_client()
            for packets in (12, 13, 14, 13, 15):
                report = signed(packets=packets)
                await client.sendto(datagram.to_wire(report.cose), addr)
            await wait_until(lambda: listener.statistics().stored == 3)
            listener.stop()
        client.close()
    stats = listener.statistics()
    assert stats.accepted == 5 and stats.stored == 3
    assert dict(stats.errors) == {"HookBug": 2}


async def test_relabel_after_storing_and_its_failures(store: Store) -> None:
    """Reports are stored with the quick label, then relabelled in the store; a relabel that
    raises leaves the stored label alone (counted), and the listener goes on."""

    async def quick(report: rpt.SignedReport, sender: str) -> str:
        return "unknown"

    async def relabel(report: rpt.SignedReport, sender: str) -> str:
        if report.payload.flow.packets == 2:
            raise HookBug("relabel bug")
        return "dns"

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            listener, addr = await start_listener(
                nursery, store, label=quick, relabel=relabel, relabel_workers=1
            )
            client = await udp_client()
            reports = [signed(packets=n, sport=n) for n in (1, 2)]

            def finished() -> int:
                return sum(listener.statistics().trust.values())  # reports with a final label

            for n, report in enumerate(reports, 1):
                await client.sendto(datagram.to_wire(report.cose), addr)
                # one at a time: reports of one key and sender would share one relabel
                await wait_until(lambda n=n: finished() == n)  # type: ignore[misc]
            listener.stop()
        client.close()
    labels = [store.get_report(r.report_id).trust for r in reports]  # type: ignore[union-attr]
    assert labels == ["dns", "unknown"]
    stats = listener.statistics()
    assert stats.trust == {"dns": 1, "unknown": 1}
    assert dict(stats.relabel.relabelled) == {"dns": 1} and stats.relabel.skipped["error"] == 1
    assert dict(stats.errors) == {"HookBug": 1}
