"""The UDP collector on a real loopback socket: wake-ups coalesced into batches (drains at
most every ``coalesce_s``, never waiting while batches come full, never on a small receive
buffer), and the bounded backlog counting what it sheds."""

from __future__ import annotations

import socket
import time

import trio

from overflowd.services.collector import (
    BATCH_DATAGRAMS,
    Backlog,
    Datagram,
    DatagramBatch,
    UdpCollector,
    open_socket,
)

RCVBUF = 4 * 1024 * 1024  # granted as asked to root (SO_RCVBUFFORCE), as the daemon runs


async def start(
    nursery: trio.Nursery, backlog: Backlog, **kwargs: float
) -> tuple[UdpCollector, trio.MemoryReceiveChannel[DatagramBatch], socket.socket]:
    send, recv = trio.open_memory_channel[DatagramBatch](backlog.limit)
    collector = UdpCollector(("127.0.0.1", 0), send, backlog, **kwargs)  # type: ignore[arg-type]
    host, port = await nursery.start(collector.run)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect((host, port))
    return collector, recv, tx


async def batches_of(
    recv: trio.MemoryReceiveChannel[DatagramBatch], datagrams: int
) -> list[DatagramBatch]:
    out: list[DatagramBatch] = []
    with trio.fail_after(10):
        while sum(len(b) for b in out) < datagrams:
            out.append(await recv.receive())
    return out


async def spaced(tx: socket.socket, n: int, gap_s: float) -> None:
    for i in range(n):
        tx.send(b"\x00\x05" + i.to_bytes(4, "big"))
        await trio.sleep(gap_s)  # the collector runs in between: it could take each alone


async def test_datagrams_arriving_apart_are_handed_on_together() -> None:
    async with trio.open_nursery() as nursery:
        _, recv, tx = await start(nursery, Backlog(10_000), coalesce_s=0.5, rcvbuf_bytes=RCVBUF)
        with tx:
            nursery.start_soon(spaced, tx, 20, 0.005)  # ~0.1 s of sending
            got = await batches_of(recv, 20)
        nursery.cancel_scope.cancel()
    assert len(got) <= 3
    assert [int.from_bytes(d.data[2:], "big") for b in got for d in b] == list(range(20))
    assert {d.exporter for b in got for d in b} == {"127.0.0.1"}


async def test_without_coalescing_each_wake_up_takes_what_is_there() -> None:
    """The contrast for the test above: with coalesce_s=0 the same datagrams come one by
    one, as they do on a receive buffer too small to wait on."""
    for kwargs in (
        {"coalesce_s": 0.0, "rcvbuf_bytes": RCVBUF},
        {"coalesce_s": 0.5, "rcvbuf_bytes": 128 * 1024},
    ):
        async with trio.open_nursery() as nursery:
            collector, recv, tx = await start(nursery, Backlog(10_000), **kwargs)
            with tx:
                nursery.start_soon(spaced, tx, 20, 0.02)  # a stall of 20 ms merges two
                got = await batches_of(recv, 20)
            nursery.cancel_scope.cancel()
        assert len(got) >= 10, (kwargs, collector.statistics().rcvbuf_bytes)


async def test_full_batches_are_drained_without_waiting() -> None:
    coalesce = 1.0
    n = 2 * BATCH_DATAGRAMS + 88
    async with trio.open_nursery() as nursery:
        # A large buffer, so the wait's bound by the buffer's fill (tiny datagrams, drained
        # right after each other) is far above `coalesce`: only the full batch skips it.
        collector, recv, tx = await start(
            nursery, Backlog(10_000), coalesce_s=coalesce, rcvbuf_bytes=8 * RCVBUF
        )
        with tx:
            t0 = time.monotonic()
            for i in range(n):  # all queued before the collector runs again
                tx.send(bytes([i % 256]))
            got = await batches_of(recv, n)
            elapsed = time.monotonic() - t0
        nursery.cancel_scope.cancel()
    # One wait (at most `coalesce`) for the first drain; the full ones after it do not wait.
    assert [len(b) for b in got] == [BATCH_DATAGRAMS, BATCH_DATAGRAMS, 88]
    assert elapsed < 1.9 * coalesce
    stats = collector.statistics()
    assert (stats.datagrams, stats.batches, stats.dropped_queue_full) == (n, 3, 0)


async def test_a_full_backlog_sheds_whole_batches_and_counts_them() -> None:
    backlog = Backlog(5)
    async with trio.open_nursery() as nursery:
        collector, recv, tx = await start(nursery, backlog, coalesce_s=0.05, rcvbuf_bytes=RCVBUF)
        with tx:
            for burst in range(3):  # nobody consumes: the backlog fills, then sheds
                for i in range(4):
                    tx.send(bytes([burst, i]))
                with trio.fail_after(10):
                    while collector.statistics().datagrams < 4 * (burst + 1):
                        await trio.sleep(0.01)
        stats = collector.statistics()
        nursery.cancel_scope.cancel()
    queued: list[Datagram] = []
    while True:
        try:
            queued.extend(recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    assert stats.datagrams == 12
    assert len(queued) == backlog.queued <= 5
    assert stats.dropped_queue_full == 12 - len(queued) > 0


async def test_collectors_on_reuseport_sockets_keep_each_exporter_on_one_of_them() -> None:
    """Several collectors on one address (SO_REUSEPORT, the building block of several
    receivers): every datagram arrives once, and all of one source's datagrams at the same
    collector (the kernel hashes the 4-tuple), so per-exporter state (templates) stays whole.
    A given socket stays open when its collector stops: its owner keeps it."""
    first = open_socket(("127.0.0.1", 0), RCVBUF, reuseport=True)
    port = first.getsockname()[1]
    socks = [first] + [open_socket(("127.0.0.1", port), RCVBUF, reuseport=True) for _ in range(3)]
    backlog = Backlog(10_000)
    sources = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
    got: list[list[Datagram]] = [[] for _ in socks]

    async def drain(i: int, recv: trio.MemoryReceiveChannel[DatagramBatch]) -> None:
        async for batch in recv:
            got[i].extend(batch)

    try:
        async with trio.open_nursery() as nursery:
            for i, sock in enumerate(socks):
                send, recv = trio.open_memory_channel[DatagramBatch](backlog.limit)
                collector = UdpCollector(("127.0.0.1", port), send, backlog, sock=sock)
                assert await nursery.start(collector.run) == ("127.0.0.1", port)
                nursery.start_soon(drain, i, recv)
            for s, tx in enumerate(sources):
                tx.connect(("127.0.0.1", port))
                for n in range(10):
                    tx.send(bytes([s, n]))
            with trio.fail_after(10):
                while sum(len(g) for g in got) < 160:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        seen = sorted(d.data for g in got for d in g)
        assert seen == sorted(bytes([s, n]) for s in range(16) for n in range(10))
        for s in range(16):
            holders = [i for i, g in enumerate(got) if any(d.data[0] == s for d in g)]
            assert len(holders) == 1, (s, holders)
        assert sum(1 for g in got if g) > 1, "16 sources all hashed to one socket"
        assert all(sock.fileno() >= 0 for sock in socks)  # not closed by the collectors
    finally:
        for sock in socks + sources:
            sock.close()
