"""Any stream of sFlow datagrams, mangled: the array path never raises, and gives what the
scalar path gives (rows in order, refusals, state), whole, cut at every offset, and with
one hostile datagram among good ones (that one is counted and dropped, the rest decoded)."""

from __future__ import annotations

import functools
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd.wire import DecoderState
from overflowd.wire.sflow_batch import decode_sflow_batch
from tests.unit.test_sflow_batch import (
    COMMON,
    EXPORTER,
    NOW,
    V4_TCP,
    Datagram,
    assert_equivalent,
    flow,
    raw,
)
from tests.unit.test_wire_encoder import sflow_datagram

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def corpus() -> tuple[bytes, ...]:
    """Datagrams of the common case (every sample kind of test_sflow_batch.COMMON), both
    agent address families."""
    out = []
    for k in range(0, len(COMMON), 2):
        for agent in ("192.0.2.10", "2001:db8::10"):
            out.append(sflow_datagram(COMMON[k : k + 5], agent=agent, sub_agent=k))
    return tuple(out)


@st.composite
def streams(draw: st.DrawFn) -> list[Datagram]:
    """A few corpus datagrams with bytes flipped, 32-bit words overwritten (lengths and
    counts are words), cut or spliced, from one or two exporters."""
    picks = draw(st.lists(st.integers(0, len(corpus()) - 1), min_size=1, max_size=8))
    out = []
    for i in picks:
        data = bytearray(corpus()[i])
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        for _ in range(draw(st.integers(0, 2))):
            at = 4 * draw(st.integers(0, len(data) // 4 - 1))
            value = draw(st.sampled_from([0, 1, 3, 4, 8, 0xFFFF, 2**31, 2**32 - 1]))
            data[at : at + 4] = struct.pack("!I", value)
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        if draw(st.integers(0, 7)) == 0:
            data += corpus()[draw(st.integers(0, len(corpus()) - 1))][: draw(st.integers(0, 64))]
        exporter = draw(st.sampled_from(["192.0.2.1", "192.0.2.2"]))
        out.append((bytes(data), exporter, NOW + len(out)))
    return out


@SETTINGS
@given(streams(), st.integers(1, 5))
def test_mangled_streams_decode_the_same_either_way(stream: list[Datagram], size: int) -> None:
    assert_equivalent(stream, batch_size=size)


def test_every_datagram_cut_at_every_offset() -> None:
    stream = [
        (datagram[:cut], EXPORTER, NOW)
        for datagram in corpus()[:4]
        for cut in range(len(datagram) + 1)
    ]
    assert_equivalent(stream, batch_size=len(stream))


def test_a_sample_longer_than_its_datagram_at_the_end_of_a_batch() -> None:
    """Its length says 2 GB, its record count 16 where two records follow, the second of
    them 4 MB long: the walk must not follow them past the batch's bytes."""
    one = flow(raw(V4_TCP)) + struct.pack("!II", 1001, 2**22)
    body = bytearray(one[8:])
    body[28:32] = struct.pack("!I", 16)  # record count
    sample = struct.pack("!II", 1, 2**31) + bytes(body)
    stream = [(corpus()[0], EXPORTER, NOW), (sflow_datagram([sample]), EXPORTER, NOW)]
    [batch] = assert_equivalent(stream)
    assert [i for i, _ in batch.errors] == [1]


def test_one_hostile_datagram_costs_only_itself() -> None:
    good = corpus()[0]
    hostile = [
        struct.pack("!IIIIIII", 5, 1, 0, 0, 0, 0, 2**32 - 1),  # 4 billion samples
        good[:28] + struct.pack("!II", 1, 2**32 - 4) + good[36:],  # a sample past the end
        struct.pack("!II", 5, 9) + bytes(64),  # unknown agent address type
        b"\0\0\0\x05",
    ]
    stream = [(good, EXPORTER, NOW)]
    for h in hostile:
        stream += [(h, EXPORTER, NOW), (good, EXPORTER, NOW)]
    [batch] = assert_equivalent(stream)
    # Every good datagram went the array way; the hostile ones are counted refusals.
    assert set(batch.datagram.tolist()) == set(range(0, len(stream), 2))
    assert [i for i, _ in batch.errors] == list(range(1, len(stream), 2))
    state = DecoderState()
    decode_sflow_batch(stream, state)
    assert sum(state.statistics().malformed.values()) == len(hostile)
