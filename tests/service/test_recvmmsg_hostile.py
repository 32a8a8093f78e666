"""BatchReceiver attacked through its socket (review s10/rev10): what a closed socket or a
closed receiver does. ctypes hands the kernel raw addresses and a descriptor number, so
either outliving what it names is memory or data of someone else's."""

from __future__ import annotations

import ctypes
import mmap
import socket
import sys
import time

import pytest

from overflowd.services.collector import open_socket
from overflowd.services.recvmmsg import BatchReceiver

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
