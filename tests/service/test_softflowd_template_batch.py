"""Real exporter output through the array path: softflowd exports a generated capture as
NetFlow v9 and as IPFIX to 127.0.0.1, and ``decode_template_batch`` gives what
``decode_datagram_rows`` gives datagram by datagram (rows in order, refusals, state, template
recency), in the daemon's batches and in small ones; every data set but those of the
learning datagram goes into the arrays, and the sampled records' probabilities are
``flowsample.probability``'s.

softflowd's datagrams are not the re-exported trace's: many data sets a datagram (its IPv4
template and its ICMP one alternate record by record), templates, options template and
options data re-sent every 16 datagrams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from overflowd.flowsample import SamplingPolicy, probability
from overflowd.flowsample_batch import BatchSampler
from overflowd.wire import DecoderState
from overflowd.wire.template_batch import decode_template_batch
from tests.support import softflowd_local
from tests.unit.test_template_batch import assert_equivalent

pytestmark = pytest.mark.skipif(
    softflowd_local.SOFTFLOWD is None, reason="softflowd is not installed (make deps-test)"
)


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("softflowd") / "traffic.pcap"
    # A fifth of the flows ICMP: many short data sets a datagram, the array path's worst.
    softflowd_local.write_capture(path, 3000, seed=7, icmp_share=0.2)
    return path


@pytest.mark.parametrize("version", [9, 10])
def test_softflowd_exports_decode_the_same_either_way(
    capture: Path, tmp_path: Path, version: int
) -> None:
    payloads = softflowd_local.export(capture, version, tmp_path)
    assert len(payloads) >= 40, "softflowd exported (almost) nothing"
    datagrams = [(p, "127.0.0.1", 1_700_000_000.0 + i) for i, p in enumerate(payloads)]
    batch = assert_equivalent(datagrams, batch_size=256)
    assert_equivalent(datagrams, batch_size=3)
    # Only the datagram that teaches the templates is decoded record by record (and, if
    # loopback lost softflowd's first one, the data held until the next refresh).
    batch = decode_template_batch(datagrams, DecoderState())
    first = next(i for i, p in enumerate(payloads) if _first_set_id(p, version) in (0, 2))
    assert all(i <= first for i, _ in batch.scalar) and len(batch.scalar) <= first + 1
    assert len(batch) > 2000
    rows = batch.rows(np.arange(len(batch)))
    policy = SamplingPolicy(rate=1e-3)
    expected = np.array([probability(r, policy) for r in rows])
    assert np.array_equal(
        BatchSampler(policy, np.random.default_rng(0)).probabilities(batch), expected
    )


def _first_set_id(payload: bytes, version: int) -> int:
    return int.from_bytes(payload[20:22] if version == 9 else payload[16:18], "big")
