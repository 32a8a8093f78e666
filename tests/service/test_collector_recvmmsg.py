"""The collector's receive step through its UDP socket, recvmmsg and its recvfrom fallback
alike: every datagram whole and alone (sizes across the compact slot and its spill, empty
ones, garbage), exporters named as recvfrom names them (IPv4, IPv6, IPv4-mapped, many
sources at once, past the name cache), a datagram too large for its slot dropped and
counted, a full kernel buffer counted and survived."""

from __future__ import annotations

import socket
import sys

import pytest
import trio

from overflowd.services import recvmmsg
from overflowd.services.collector import (
    Backlog,
    Datagram,
    DatagramBatch,
    UdpCollector,
    open_socket,
)
from overflowd.services.recvmmsg import INLINE_BYTES, BatchReceiver

RCVBUF = 4 * 1024 * 1024
NATIVE = [
    pytest.param(
        True,
        id="recvmmsg",
        marks=pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only"),
    ),
    pytest.param(False, id="recvfrom-fallback"),
]
#: Across the compact slot's edge and into the spill slot, up to the largest IPv4 payload.
SIZES = [0, 1, 24, 1464, INLINE_BYTES - 1, INLINE_BYTES, INLINE_BYTES + 1, 9000, 65507]


def payload(i: int, size: int) -> bytes:
    """``size`` bytes that tell datagram ``i`` from any other (when 4 or more long)."""
    return (i.to_bytes(4, "big") + bytes((i + k) % 251 for k in range(size)))[:size]


async def collect(
    native: bool, listen: tuple[str, int], send: list[tuple[socket.socket, bytes]], n: int
) -> tuple[list[DatagramBatch], UdpCollector]:
    send_ch, recv = trio.open_memory_channel[DatagramBatch](10_000)
    collector = UdpCollector(
        listen, send_ch, Backlog(10_000), rcvbuf_bytes=RCVBUF, coalesce_s=0.0, native=native
    )
    got: list[DatagramBatch] = []
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(collector.run)
        target = ("127.0.0.1" if host in ("::", "0.0.0.0") else host, port)
        for tx, data in send:
            tx.sendto(data, (("::1", port) if tx.family == socket.AF_INET6 else target))
        with trio.fail_after(10):
            while sum(len(b) for b in got) < n:
                got.append(await recv.receive())
        nursery.cancel_scope.cancel()
    return got, collector


@pytest.mark.parametrize("native", NATIVE)
async def test_every_datagram_arrives_whole_and_alone(native: bool) -> None:
    sent = [payload(i, size) for i, size in enumerate(SIZES * 3)]
    sent.insert(5, b"\xff" * 7)  # garbage is a datagram like any other here
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        got, collector = await collect(native, ("127.0.0.1", 0), [(tx, d) for d in sent], len(sent))
    datagrams = [d for b in got for d in b]
    assert [d.data for d in datagrams] == sent
    assert {d.exporter for d in datagrams} == {"127.0.0.1"}
    assert all(type(d) is Datagram and isinstance(d.received, float) for d in datagrams)
    stats = collector.statistics()
    assert (stats.datagrams, stats.bytes, stats.truncated) == (len(sent), sum(map(len, sent)), 0)
    assert stats.recvmmsg is native


@pytest.mark.parametrize("native", NATIVE)
async def test_an_ipv6_socket_names_ipv4_and_ipv6_exporters_as_recvfrom_does(
    native: bool,
) -> None:
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with v4, v6:
        send = [(v4 if i % 3 else v6, bytes([i])) for i in range(30)]
        got, _ = await collect(native, ("::", 0), send, 30)
    names = {d.data[0]: d.exporter for b in got for d in b}
    assert names == {i: ("127.0.0.1" if i % 3 else "::1") for i in range(30)}


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("cache", [recvmmsg.NAME_CACHE, 3])
async def test_many_sources_in_one_batch_are_each_named(
    native: bool, cache: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixteen loopback sources interleaved: each datagram keeps its own exporter, also when
    the name cache (bounded against spoofed floods) starts over in the middle of a batch."""
    monkeypatch.setattr(recvmmsg, "NAME_CACHE", cache)
    sources = []
    try:
        for k in range(16):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sources.append(s)
            s.bind((f"127.0.0.{k + 2}", 0))
        send = [(sources[i % 16], bytes([i % 16, i // 16])) for i in range(160)]
        got, _ = await collect(native, ("127.0.0.1", 0), send, 160)
    finally:
        for s in sources:
            s.close()
    datagrams = [d for b in got for d in b]
    assert len(datagrams) == 160
    assert all(d.exporter == f"127.0.0.{d.data[0] + 2}" for d in datagrams)


@pytest.mark.parametrize("native", NATIVE)
def test_a_datagram_larger_than_its_slot_is_dropped_and_counted(native: bool) -> None:
    slot = 100
    with (
        open_socket(("127.0.0.1", 0), RCVBUF) as sock,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx = BatchReceiver(sock, 8, slot, native=native)
        try:
            sizes = [10, slot, slot + 1, 3000, 0, slot - 1, 65507, 50]
            for i, size in enumerate(sizes):
                tx.sendto(payload(i, size), sock.getsockname())
            got = rx.receive()
            assert got.payloads == [payload(i, s) for i, s in enumerate(sizes) if s <= slot]
            assert got.exporters == ["127.0.0.1"] * len(got.payloads)
            assert got.truncated == 3
            assert got.nbytes == sum(s for s in sizes if s <= slot)
            assert len(rx.receive()) == 0  # nothing left, nothing blocks
        finally:
            rx.close()


@pytest.mark.parametrize("native", NATIVE)
def test_a_drain_takes_at_most_its_slots_and_the_rest_stays_queued(native: bool) -> None:
    with (
        open_socket(("127.0.0.1", 0), RCVBUF) as sock,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx = BatchReceiver(sock, 4, native=native)
        try:
            for i in range(10):
                tx.sendto(payload(i, 3000 * (i % 2)), sock.getsockname())
            drains = [rx.receive().payloads for _ in range(4)]
        finally:
            rx.close()
    assert [len(d) for d in drains] == [4, 4, 2, 0]
    assert [p for d in drains for p in d] == [payload(i, 3000 * (i % 2)) for i in range(10)]


@pytest.mark.parametrize("native", NATIVE)
async def test_a_full_kernel_buffer_is_counted_and_the_collector_goes_on(native: bool) -> None:
    """The kernel drops what does not fit a small receive buffer while the collector cannot
    run; those drops are counted (/proc/net/udp), and what comes after is received."""
    send_ch, recv = trio.open_memory_channel[DatagramBatch](10_000)
    collector = UdpCollector(
        ("127.0.0.1", 0), send_ch, Backlog(10_000), rcvbuf_bytes=64 * 1024, native=native
    )
    got: list[Datagram] = []
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(collector.run)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for i in range(500):  # no checkpoint: the collector does not run meanwhile
                tx.sendto(payload(i, 1000), addr)
            with trio.fail_after(10):
                while (
                    collector.statistics().datagrams + (collector.statistics().kernel_drops or 0)
                    < 500
                ):
                    await trio.sleep(0.01)
            tx.sendto(b"after", addr)
            with trio.fail_after(10):
                while not got or got[-1].data != b"after":
                    got.extend(await recv.receive())
        stats = collector.statistics()
        nursery.cancel_scope.cancel()
    assert stats.kernel_drops and stats.kernel_drops > 0
    assert stats.datagrams + stats.kernel_drops == 501
    order = [int.from_bytes(d.data[:4], "big") for d in got[:-1]]
    assert order == sorted(set(order))  # whole datagrams, in order, none twice
    assert all(d.data == payload(i, 1000) for i, d in zip(order, got, strict=False))


def test_recvmmsg_missing_is_the_fallback_or_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recvmmsg, "_RECVMMSG", None)
    with open_socket(("127.0.0.1", 0), RCVBUF) as sock:
        rx = BatchReceiver(sock, 4)
        assert rx.native is False
        with pytest.raises(RuntimeError, match="recvmmsg is not available"):
            BatchReceiver(sock, 4, native=True)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.sendto(b"\x00\x05", sock.getsockname())
            got = rx.receive()
        assert (got.payloads, got.exporters) == ([b"\x00\x05"], ["127.0.0.1"])


REFUSED_CHILD = r"""
import ctypes, ctypes.util, errno, json, socket, time
lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x7FFF0000)  # allow everything ...
nr = lib.seccomp_syscall_resolve_name(b"recvmmsg")
assert lib.seccomp_rule_add(ctx, 0x00050000 | errno.EPERM, nr, 0) == 0  # ... but recvmmsg
assert lib.seccomp_load(ctx) == 0
from overflowd.services.collector import open_socket
from overflowd.services.recvmmsg import BatchReceiver
sock = open_socket(("127.0.0.1", 0), 1 << 20)
rx = BatchReceiver(sock, 8)
before = rx.native
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
    for i in range(3):
        tx.sendto(bytes([i]) * 10, sock.getsockname())
time.sleep(0.05)
got = rx.receive()
hexes = [p.hex() for p in got.payloads]
print(json.dumps({"before": before, "after": rx.native, "payloads": hexes}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="seccomp is Linux's")
def test_recvmmsg_refused_by_a_seccomp_filter_falls_back_to_recvfrom() -> None:
    """A unit's SystemCallFilter= (or any seccomp filter) refusing recvmmsg with EPERM: the
    receiver goes on with recvfrom instead of stopping the collector. A real filter, in a
    child process (a filter cannot be taken off again)."""
    import ctypes.util
    import json
    import subprocess

    if not ctypes.util.find_library("seccomp"):
        pytest.skip("libseccomp is not installed (apt-get install libseccomp2)")
    done = subprocess.run(
        [sys.executable, "-c", REFUSED_CHILD], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert (out["before"], out["after"]) == (True, False)
    assert out["payloads"] == [(bytes([i]) * 10).hex() for i in range(3)]
    assert "collector.recvmmsg_unavailable" in done.stderr


@pytest.mark.parametrize("native", NATIVE)
async def test_a_drain_that_fits_its_slots_is_handed_on_in_place(native: bool) -> None:
    """Datagrams that all fit their compact slots come as one copy of the slots (no bytes
    per datagram until asked); a drain with a larger one comes as a list. Either way the
    batch is a sequence of whole, separate Datagrams."""
    small = [payload(i, 100 + i) for i in range(5)]
    big = [*small[:2], payload(9, INLINE_BYTES + 1), *small[2:]]
    for sent in (small, big):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            got, collector = await collect(
                native, ("127.0.0.1", 0), [(tx, d) for d in sent], len(sent)
            )
        assert len(got) == 1, "sent before the collector ran: one drain"
        batch = got[0]
        in_place = native and sent is small
        assert (batch.block is not None) is in_place
        assert batch.held_bytes == (len(sent) * INLINE_BYTES if in_place else sum(map(len, sent)))
        assert [batch[i].data for i in range(len(sent))] == sent
        assert batch[-1].data == sent[-1] and batch[1:3] == list(batch)[1:3]
        with pytest.raises(IndexError):
            batch[len(sent)]
        assert [d.data for d in batch] == sent
        assert collector.statistics().bytes == sum(map(len, sent))


def test_may_hold_v5_reads_the_version_in_the_slots() -> None:
    with (
        open_socket(("127.0.0.1", 0), RCVBUF) as sock,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx = BatchReceiver(sock, 8)
        try:
            answers = []
            for datagrams in ([b"\x00\x09" + bytes(30), b"\x00\x0a" + bytes(30)], [b"\x00\x05"]):
                for d in datagrams:
                    tx.sendto(d, sock.getsockname())
                answers.append(DatagramBatch(rx.receive(as_block=rx.native), 0.0).may_hold_v5())
        finally:
            rx.close()
    assert answers == [False, True]
