"""Real sFlow v5 from a real exporter (pmacct's sfprobe, tests/support/sfprobe.py) decoded
the array way: every datagram takes the array path, and rows, state and probabilities are
the scalar decoder's. Two captures: the shared trace (real traffic: NetFlow export over
Ethernet/IPv4/UDP) and one of mixed frames written here (TCP, IPv6, ICMP, VLAN tags, IPv4
options, fragments), so the exporter's encoding of each kind is checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from overflowd.flowsample import SamplingPolicy, probability
from overflowd.flowsample_batch import BatchSampler
from overflowd.wire import DecoderState
from overflowd.wire.sflow_batch import decode_sflow_batch
from tests.support import sfprobe
from tests.unit.test_sflow_batch import FRAMES, assert_equivalent
from tests.unit.test_wire_encoder import pcap_file

pytestmark = pytest.mark.skipif(
    not sfprobe.available(),
    reason="LOUD SKIP: pmacctd (Debian package pmacct, in `make deps-test`) is not installed, "
    "so no real sFlow exporter data is checked",
)


def check(datagrams: list[bytes]) -> None:
    stream = [(d, "127.0.0.1", 1_700_000_000.0 + i / 1000) for i, d in enumerate(datagrams)]
    batches = assert_equivalent(stream)
    records = sum(len(b) for b in batches)
    assert all(b.scalar == () and b.errors == () for b in batches)
    assert records >= 5 * len(datagrams) // 2  # pmacct packs several samples a datagram
    batch = decode_sflow_batch(stream, DecoderState())
    rows = batch.rows(np.arange(len(batch)))
    policy = SamplingPolicy(rate=1e-3)
    got = BatchSampler(policy, np.random.default_rng(1)).probabilities(batch)
    assert np.array_equal(got, [probability(r, policy) for r in rows])


def test_sfprobe_export_of_the_shared_trace() -> None:
    datagrams = sfprobe.sfprobe_export()
    assert len(datagrams) > 100, "pmacctd exported (almost) nothing"
    check(datagrams)


def test_sfprobe_export_of_mixed_frames(tmp_path: Path) -> None:
    capture = tmp_path / "mixed.pcap"
    capture.write_bytes(
        pcap_file((1_700_000_000 + i / 100, FRAMES[i % len(FRAMES)]) for i in range(600))
    )
    datagrams = sfprobe.sfprobe_export(capture)
    assert len(datagrams) > 20, "pmacctd exported (almost) nothing"
    check(datagrams)
