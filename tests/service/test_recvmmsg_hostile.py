"""BatchReceiver attacked through its socket (review s10/rev10): what a closed socket or a
closed receiver does. ctypes hands the kernel raw addresses and a descriptor number, so
either outliving what it names is memory or data of someone else's."""

from __future__ import annotations

import ctypes
import ipaddress
import mmap
import socket
import sys
import time
from pathlib import Path

import pytest

from overflowd.config import Settings
from overflowd.identity import NodeIdentity
from overflowd.services.collector import DatagramBatch, open_socket
from overflowd.services.node import NodeService
from overflowd.services.recvmmsg import BatchReceiver
from overflowd.store import Store
from tests.unit.test_wire_v5 import v5

NATIVE = [
    pytest.param(
        True,
        id="recvmmsg",
        marks=pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only"),
    ),
    pytest.param(False, id="recvfrom-fallback"),
]


@pytest.mark.parametrize("native", NATIVE)
def test_a_closed_socket_raises_and_never_reads_the_socket_that_took_its_number(
    native: bool,
) -> None:
    """The caller closed the socket; the next socket opened gets its descriptor number.
    recvmmsg on the number kept at construction read *that* socket's datagrams (and took them
    from it); recvfrom says EBADF. Both must say EBADF and leave the other socket alone."""
    sock = open_socket(("127.0.0.1", 0), 1 << 20)
    rx = BatchReceiver(sock, 8, native=native)
    number = sock.fileno()
    sock.close()
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        other.bind(("127.0.0.1", 0))
        assert other.fileno() == number  # the lowest free number: the closed socket's
        tx.sendto(b"for the other socket", other.getsockname())
        time.sleep(0.02)
        with pytest.raises(OSError):
            rx.receive()
        assert other.recv(100, socket.MSG_DONTWAIT) == b"for the other socket"
    rx.close()


def test_receive_after_close_never_lets_the_kernel_write_into_freed_memory() -> None:
    """close() unmaps the slots, but the mmsghdr array still points into them: a receive
    after it had the kernel copy the next datagram into whatever was mapped there since
    (here a new mapping of the same size, which the kernel places at the same address)."""
    with (
        open_socket(("127.0.0.1", 0), 1 << 20) as sock,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx = BatchReceiver(sock, 4, 4096, native=True)
        size = len(rx._buf)
        rx.close()
        victim = mmap.mmap(-1, size)
        tx.sendto(b"NOT YOURS", sock.getsockname())
        time.sleep(0.02)
        with pytest.raises(OSError):
            rx.receive()
        assert victim[:9] == b"\0" * 9
        # The datagram is still queued for whoever reads the socket next.
        assert sock.recv(100) == b"NOT YOURS"
        anchor = ctypes.c_char.from_buffer(victim)  # the mapping stayed usable
        del anchor
        victim.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="recvmmsg: Linux")
async def test_a_short_datagram_never_reads_what_another_exporter_left_in_its_slot(
    tmp_path: Path,
) -> None:
    """The slots are reused drain after drain and handed on whole (DatagramBatch): one
    exporter's full v5 datagrams, then another's that claim 30 records and carry one (and a
    bare version field). The second drain reports the liar's one whole datagram only, and
    none of the first exporter's records a second time."""
    liar_src = 0x0B000001
    n = NodeService(
        NodeIdentity.generate(), Settings(), Store.open(f"sqlite:///{tmp_path / 'n.db'}"), rate=1.0
    )
    honest = v5([{"src": 0xC0A80000 + i} for i in range(30)])
    lies = [v5([{"src": liar_src}], count=30)] * 4 + [v5([{"src": liar_src}]), b"\x00\x05"]
    with (
        open_socket(("127.0.0.1", 0), 8 << 20) as sock,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b,
    ):
        a.bind(("127.0.0.2", 0))
        b.bind(("127.0.0.3", 0))
        rx = BatchReceiver(sock, 16, native=True)
        try:
            drains = []
            for tx, datagrams in ((a, [honest] * 4), (b, lies)):
                for d in datagrams:
                    tx.sendto(d, sock.getsockname())
                time.sleep(0.05)
                got = DatagramBatch(rx.receive(as_block=True), time.time())
                assert got.block is not None and len(got) == len(datagrams)
                drains.append([s for step in n._decode_batch(got) for s in step])
        finally:
            rx.close()
    assert len(drains[0]) == 120
    assert [int(ipaddress.ip_address(str(s.payload.flow.src))) for s in drains[1]] == [liar_src]
    stats = n.decoder.statistics().exporters
    assert (stats["127.0.0.2"].records, stats["127.0.0.3"].records) == (120, 1)
    assert stats["127.0.0.3"].malformed == 5
