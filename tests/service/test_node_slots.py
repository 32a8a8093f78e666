"""The node decodes a batch the collector hands on in its receive slots (NetFlow v5 read in
place, the rest made bytes) exactly as it decodes the same datagrams as a list: the same
records reported, the same refusals and decoder statistics. Real datagrams through a real
loopback socket and the recvmmsg receiver; v5 (with every refusal the batch path knows)
mixed with sFlow and garbage."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from overflowd.config import Settings
from overflowd.identity import NodeIdentity
from overflowd.services.collector import Datagram, DatagramBatch, open_socket
from overflowd.services.node import NodeService
from overflowd.services.recvmmsg import BatchReceiver
from overflowd.store import Store
from overflowd.wire import CaptureReader
from tests.support.trace import netflow_v5_trace
from tests.unit.test_sflow_batch import COMMON
from tests.unit.test_v5_batch import corrupted
from tests.unit.test_wire_encoder import sflow_datagram

FIELDS = ("src", "dst", "sport", "dport", "proto", "packets", "bytes", "tcp_flags", "tos")
NOW = 1_700_000_000.0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="recvmmsg: Linux")


def node(tmp_path: Path, name: str) -> NodeService:
    store = Store.open(f"sqlite:///{tmp_path / name}")
    return NodeService(NodeIdentity.generate(), Settings(), store, rate=1.0)


def reported(n: NodeService, batch: object) -> list[tuple[str, ...]]:
    signed = [s for step in n._decode_batch(batch) for s in step]  # type: ignore[arg-type]
    return sorted(tuple(str(getattr(s.payload.flow, k)) for k in FIELDS) for s in signed)


def received(datagrams: list[bytes]) -> DatagramBatch:
    """``datagrams`` sent over loopback and drained with one recvmmsg, as the collector does."""
    with (
        open_socket(("127.0.0.1", 0), 8 * 1024 * 1024) as sock,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx = BatchReceiver(sock, 256)
        try:
            for d in datagrams:
                tx.sendto(d, sock.getsockname())
            time.sleep(0.05)
            batch = DatagramBatch(rx.receive(as_block=True), NOW)
        finally:
            rx.close()
    assert len(batch) == len(datagrams)
    return batch


@pytest.mark.parametrize("mix", ["v5", "v5+sflow+garbage", "sflow"])
async def test_a_batch_in_slots_decodes_as_the_same_datagrams_in_a_list(
    tmp_path: Path, mix: str
) -> None:
    with open(netflow_v5_trace(), "rb") as fh:
        trace = [(d.payload, d.src, d.timestamp) for d in CaptureReader().udp_datagrams(fh)]
    datagrams = [d for d, _, _ in corrupted(trace)][:120] if "v5" in mix else []
    if "sflow" in mix:
        datagrams[3:3] = [sflow_datagram(COMMON[k : k + 5], sub_agent=k) for k in (0, 5, 10)]
    if "garbage" in mix:
        datagrams[7:7] = [b"\x00", b"\xff" * 40]
    batch = received(datagrams)
    assert batch.block is not None  # every one fit its slot: the in-place path runs
    in_slots, as_list = node(tmp_path, "a.db"), node(tmp_path, "b.db")
    expected = reported(as_list, [Datagram(d, "127.0.0.1", NOW) for d in datagrams])
    assert reported(in_slots, batch) == expected
    assert len(expected) > (100 if "v5" in mix else 5)
    assert in_slots.decoder.statistics() == as_list.decoder.statistics()
    assert in_slots._malformed == as_list._malformed and in_slots._input_errors == {}
