"""decode_v5_batch reading datagrams in place from fixed slots (``slots=``, what the
collector's recvmmsg receiver hands on) gives what it gives from one ``bytes`` per
datagram: the same columns, refusals, passed indices and DecoderState statistics, whatever
stale bytes an earlier datagram left in a slot past a short one."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overflowd.wire import CaptureReader, DecoderState, Limits
from overflowd.wire.v5_batch import Slots, V5Batch, decode_v5_batch
from tests.support.trace import netflow_v5_trace
from tests.unit.test_v5_batch import corrupted

STRIDE = 2048
NOW = 1_700_000_000.0
COLUMNS = (
    "src", "dst", "sport", "dport", "proto", "packets", "bytes", "first", "last",
    "tcp_flags", "tos", "src_as", "dst_as", "interval", "provenance", "exporter", "domain",
)  # fmt: skip


def _datagrams() -> list[tuple[bytes, str]]:
    with open(netflow_v5_trace(), "rb") as fh:
        trace = [(d.payload, d.src, d.timestamp) for d in CaptureReader().udp_datagrams(fh)]
    return [(data, exporter) for data, exporter, _ in corrupted(trace)]


DATAGRAMS = _datagrams()
#: What an earlier, longer datagram may have left in a slot: a whole valid v5 datagram (its
#: version and count where a short one ends), zeros, ones.
STALE = [DATAGRAMS[0][0], b"", b"\xff" * STRIDE, b"\x00\x05" * (STRIDE // 2)]


def state() -> DecoderState:
    return DecoderState(limits=Limits(max_exporters_tracked=4), overrides={"192.0.2.7": 64})


def in_slots(chosen: list[tuple[bytes, str]], stale: list[int]) -> Slots:
    block = bytearray(STRIDE * len(chosen))
    for i, ((data, _), s) in enumerate(zip(chosen, stale, strict=True)):
        block[i * STRIDE : (i + 1) * STRIDE] = STALE[s][:STRIDE].ljust(STRIDE, b"\0")
        block[i * STRIDE : i * STRIDE + len(data)] = data
    return Slots(bytes(block), STRIDE, [len(d) for d, _ in chosen], [e for _, e in chosen], NOW)


def same(a: V5Batch, b: V5Batch) -> None:
    for name in COLUMNS:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.exporters == b.exporters
    assert a.passed == b.passed
    assert [(i, type(e), str(e)) for i, e in a.errors] == [
        (i, type(e), str(e)) for i, e in b.errors
    ]


@settings(max_examples=60, deadline=None)
@given(
    picks=st.lists(
        st.tuples(st.integers(0, len(DATAGRAMS) - 1), st.integers(0, len(STALE) - 1)),
        min_size=1,
        max_size=64,
    )
)
def test_slots_decode_as_bytes_do(picks: list[tuple[int, int]]) -> None:
    chosen = [DATAGRAMS[i] for i, _ in picks]
    slots = in_slots(chosen, [s for _, s in picks])
    from_bytes, from_slots = state(), state()
    a = decode_v5_batch([(d, e, NOW) for d, e in chosen], from_bytes)
    b = decode_v5_batch([], from_slots, slots=slots)
    same(a, b)
    assert from_slots.statistics() == from_bytes.statistics()


def test_every_kind_of_datagram_over_every_stale_fill() -> None:
    """The whole corrupted set (every refusal and oddity) once over each stale fill."""
    for s in range(len(STALE)):
        from_bytes, from_slots = state(), state()
        a = decode_v5_batch([(d, e, NOW) for d, e in DATAGRAMS], from_bytes)
        b = decode_v5_batch([], from_slots, slots=in_slots(DATAGRAMS, [s] * len(DATAGRAMS)))
        same(a, b)
        assert from_slots.statistics() == from_bytes.statistics()
        assert a.errors and a.passed  # the set does hold refusals and non-v5 datagrams


def test_a_datagram_larger_than_its_slot_is_refused() -> None:
    slots = Slots(bytes(STRIDE), STRIDE, [STRIDE + 1], ["192.0.2.1"], NOW)
    with pytest.raises(ValueError, match="larger than their slots"):
        decode_v5_batch([], state(), slots=slots)
