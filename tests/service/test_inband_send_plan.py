"""The in-band send plan with its caches: remembered confinement verdicts are the verdicts,
they do not outlive the settings they were decided under, their table stays bounded under
spoofed addresses, and the sender sends what it is given in batches per wake-up.

Real sockets on loopback only (a sink on 127.0.0.1 / 127.0.0.2, port 0); non-loopback targets
are TEST-NET addresses given to an injected send function, never to a socket.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
import time

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from overflowd import notify
from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.notify import Budget, BudgetSettings, Confinement
from overflowd.services.inband import SEND_BATCH, InbandSender, InbandSettings
from tests.support.reports import make_payload

TIMEOUT_S = 20
OBSERVER = NodeIdentity(seed=b"\x31" * 32)
NO_LIMIT = BudgetSettings(
    global_per_s=1e6, burst=10**6, per_prefix_per_s=1e6, per_prefix_burst=10**6,
    dedup_window_s=0,
)  # fmt: skip


def signed(src: str, dst: str, sport: int = 1) -> rpt.SignedReport:
    payload = make_payload(src, dst, packets=10, time_ms=int(time.time() * 1000))
    payload = dataclasses.replace(payload, flow=dataclasses.replace(payload.flow, sport=sport))
    return OBSERVER.sign_report(payload)


# -- confinement verdicts -----------------------------------------------------------------------

v4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)
v6 = st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address)
special_v4 = st.sampled_from(
    ["127.0.0.1", "127.9.9.9", "169.254.1.1", "224.0.0.1", "255.255.255.255", "0.0.0.0",
     "240.0.0.1", "192.0.2.7", "198.51.100.1", "203.0.113.9", "10.1.2.3"]
).map(ipaddress.IPv4Address)  # fmt: skip
special_v6 = st.sampled_from(
    ["::1", "::", "fe80::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:192.0.2.7", "2001:db8::5",
     "100::1", "::ffff:224.0.0.1"]
).map(ipaddress.IPv6Address)  # fmt: skip
addresses = st.one_of(v4, v6, special_v4, special_v6)
PREFIX_SETS = [
    (), ("0.0.0.0/0", "::/0"), ("127.0.0.0/8",), ("::1/128",), ("192.0.2.0/24", "2001:db8::/32"),
    ("0.0.0.0/0", "127.0.0.0/8", "169.254.0.0/16", "fe80::/10"), ("198.51.100.0/24",),
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(addresses, min_size=1, max_size=60), st.sampled_from(PREFIX_SETS))
def test_remembered_verdicts_are_the_verdicts_and_stay_bounded(
    targets: list[ipaddress.IPv4Address | ipaddress.IPv6Address], prefixes: tuple[str, ...]
) -> None:
    """Each address asked three times (first decision, remembered, after the table emptied)
    gets what a fresh Confinement decides; with a table of 8, it never holds more than 8."""
    original = notify.CONFINEMENT_VERDICTS
    notify.CONFINEMENT_VERDICTS = 8
    try:
        cached = Confinement.from_strings(prefixes)
        for _round in range(3):
            for address in targets:
                assert cached.refuse(address) == Confinement.from_strings(prefixes)._decide(
                    address
                )
                assert len(cached._verdicts) <= 8
    finally:
        notify.CONFINEMENT_VERDICTS = original


def test_a_flood_of_spoofed_destinations_keeps_the_table_at_its_bound() -> None:
    confinement = Confinement.from_strings(["0.0.0.0/0", "::/0"])
    for n in range(3 * notify.CONFINEMENT_VERDICTS + 7):
        assert confinement.refuse(ipaddress.IPv4Address(0x0B000000 + n)) is None
        assert confinement.refuse(ipaddress.IPv4Address(0xE0000000 + n)) == "special"
        assert len(confinement._verdicts) <= notify.CONFINEMENT_VERDICTS
    # The remembered verdicts do not make two confinements of the same prefixes differ.
    assert confinement == Confinement.from_strings(["0.0.0.0/0", "::/0"])


async def test_new_settings_give_new_verdicts_whatever_the_old_ones_remembered() -> None:
    """A sender whose confinement allowed 192.0.2.0/24 and sent there, given the settings of a
    config that no longer allows it, sends nothing more there (and the reverse)."""
    sent: list[tuple[str, int]] = []

    async def sendto(data: bytes, target: tuple[str, int]) -> None:
        sent.append(target)

    old = InbandSettings(port=9, allowed_prefixes=("192.0.2.0/24",))
    sender = InbandSender(old, Budget(NO_LIMIT), sendto=sendto)
    assert await sender.send_report(signed("192.0.2.1", "198.51.100.1")) == 1
    assert sent == [("192.0.2.1", 9)]
    # The daemon's config changes: the sender is built from the new settings...
    new = InbandSettings(port=9, allowed_prefixes=("198.51.100.0/24",))
    sender = InbandSender(new, Budget(NO_LIMIT), sendto=sendto)
    assert await sender.send_report(signed("192.0.2.1", "198.51.100.1", sport=2)) == 1
    assert sent[-1] == ("198.51.100.1", 9)
    assert sender.statistics().dropped["not_allowed"] == 1
    # ... or handed a new confinement: the verdicts it remembered go with the old one.
    sender.confinement = Confinement.from_strings(["192.0.2.0/24"])
    assert await sender.send_report(signed("192.0.2.1", "198.51.100.1", sport=3)) == 1
    assert sent[-1] == ("192.0.2.1", 9)
    assert sender.statistics().dropped["not_allowed"] == 2
    assert len(sent) == 3


# -- batches per wake-up ------------------------------------------------------------------------


async def test_submitted_reports_leave_in_batches_per_wake_up_and_all_arrive() -> None:
    """Reports submitted together are sent back to back: another task scheduled meanwhile sees
    the sender only between whole batches, never inside one; every datagram reaches
    the real sink on loopback, and wait_idle/unsent account for the reports in hand."""
    n = 3 * SEND_BATCH + 5
    with trio.fail_after(TIMEOUT_S):
        sinks = []
        for host in ("127.0.0.1", "127.0.0.2"):
            sink = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            await sink.bind((host, sinks[0].getsockname()[1] if sinks else 0))
            sinks.append(sink)
        port = sinks[0].getsockname()[1]
        settings_ = InbandSettings(port=port, allowed_prefixes=("127.0.0.0/8",))
        sender = InbandSender(settings_, Budget(NO_LIMIT))
        reports = [signed("127.0.0.1", "127.0.0.2", sport=i + 1) for i in range(n)]
        seen_counts: list[int] = []
        done = trio.Event()

        async def watch() -> None:
            while not done.is_set():
                seen_counts.append(sender.statistics().reports)
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            nursery.start_soon(watch)
            await trio.lowlevel.checkpoint()
            for report in reports:
                assert sender.submit(report)
            assert sender.unsent() == n
            await sender.wait_idle()
            assert sender.unsent() == 0
            done.set()
            received = 0
            with trio.move_on_after(5):
                for sink in sinks:  # each end of every flow: n datagrams per sink
                    for _ in range(n):
                        await sink.recv(2048)
                        received += 1
            nursery.cancel_scope.cancel()
        for sink in sinks:
            sink.close()
    stats = sender.statistics()
    assert stats.reports == n and stats.datagrams_sent == 2 * n and stats.send_errors == 0
    assert received == 2 * n
    # Whenever the watcher ran, the sender stood at a batch boundary, never inside a batch.
    boundaries = {min(k * SEND_BATCH, n) for k in range(n // SEND_BATCH + 2)}
    assert set(seen_counts) <= boundaries, set(seen_counts) - boundaries
    assert len(set(seen_counts)) >= 2  # it did see the sender at work


@pytest.mark.parametrize("blocked_after", [0, 5])
async def test_a_full_socket_buffer_waits_for_room_and_loses_nothing(blocked_after: int) -> None:
    """The one wait left in a batch: when the socket buffer is full, the sender waits until
    it drains (here the injected send refuses as a full buffer would, then takes them)."""
    taken: list[tuple[str, int]] = []
    refusals = 0
    room = trio.Event()

    async def sendto(data: bytes, target: tuple[str, int]) -> None:
        nonlocal refusals
        while len(taken) >= blocked_after and not room.is_set():
            refusals += 1
            await room.wait()
        taken.append(target)

    sender = InbandSender(
        InbandSettings(port=9, allowed_prefixes=("192.0.2.0/24",)), Budget(NO_LIMIT), sendto=sendto
    )
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            for i in range(10):
                assert sender.submit(signed("192.0.2.1", "192.0.2.2", sport=i + 1))
            while refusals == 0:  # until the sender meets the full buffer
                await trio.sleep(0.01)
            assert len(taken) == blocked_after and sender.unsent() > 0
            room.set()
            await sender.wait_idle()
            nursery.cancel_scope.cancel()
    assert len(taken) == 20 and refusals == 1


async def test_a_run_cancelled_in_a_batch_leaves_the_rest_for_the_next_run() -> None:
    """A batch taken from the queue is not lost when run() is cancelled inside it (while a
    socket is full): as when the sender took one report at a time, at most the report in
    flight is lost, the rest go out from the next run(), and wait_idle returns."""
    taken: list[tuple[str, int]] = []
    room = trio.Event()

    async def sendto(data: bytes, target: tuple[str, int]) -> None:
        if len(taken) >= 2 and not room.is_set():
            await room.wait()  # the buffer is full: run() is cancelled here
        taken.append(target)

    sender = InbandSender(
        InbandSettings(port=9, allowed_prefixes=("192.0.2.0/24",)), Budget(NO_LIMIT), sendto=sendto
    )
    n = 10
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            for i in range(n):
                assert sender.submit(signed("192.0.2.1", "192.0.2.2", sport=i + 1))
            while sender.statistics().reports < 2:  # the second report meets the full buffer
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert len(taken) == 2  # the first report's two datagrams
        lost_in_flight = 1
        assert sender.unsent() == n - 1 - lost_in_flight
        room.set()
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            with trio.move_on_after(5):
                await sender.wait_idle()
            assert sender.unsent() == 0
            nursery.cancel_scope.cancel()
    # Every report but the one in flight at the cancellation was sent, to both ends.
    assert len(taken) == 2 * (n - lost_in_flight)


async def test_port_unreachable_answers_do_not_stop_the_sender() -> None:
    """ICMP port unreachable from loopback (nothing listens at 127.0.0.1:PORT) for every other
    datagram: the sender keeps sending, every datagram to the listening end arrives, and an
    error the kernel reports for the unreachable end is counted, never raised."""
    n = 2 * SEND_BATCH + 3
    with trio.fail_after(TIMEOUT_S):
        sink = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        await sink.bind(("127.0.0.2", 0))
        port = sink.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", port))  # free now; closed before the sender starts
        sender = InbandSender(
            InbandSettings(port=port, allowed_prefixes=("127.0.0.0/8",)), Budget(NO_LIMIT)
        )
        received = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            for i in range(n):
                assert sender.submit(signed("127.0.0.1", "127.0.0.2", sport=i + 1))
                if i % 7 == 0:
                    await trio.sleep(0.001)  # let ICMP answers come back between batches
            await sender.wait_idle()
            with trio.move_on_after(5):
                while received < n:
                    await sink.recv(2048)
                    received += 1
            nursery.cancel_scope.cancel()
        sink.close()
    stats = sender.statistics()
    assert stats.reports == n and received == n
    assert stats.datagrams_sent + stats.send_errors == 2 * n
