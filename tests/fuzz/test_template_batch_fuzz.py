"""Any stream of v9/IPFIX datagrams, mangled: the array path never raises, and gives what
the scalar path gives (rows in order, refusals, state), whole and cut at every offset."""

from __future__ import annotations

import functools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.trace import trace_payloads
from tests.unit.test_template_batch import Datagram, assert_equivalent, reexport

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def corpus() -> tuple[bytes, ...]:
    v5 = [(p, "192.0.2.1", 0.0) for p in trace_payloads()[:17]]
    return tuple(d for fmt in ("v9", "ipfix-ms", "ipfix-sysup") for d, _, _ in reexport(v5, fmt))


@st.composite
def streams(draw: st.DrawFn) -> list[Datagram]:
    """A few of the re-exported datagrams (templates first or not), with bytes flipped, cut
    or spliced, from one or two exporters."""
    picks = draw(st.lists(st.integers(0, len(corpus()) - 1), min_size=1, max_size=8))
    out = []
    for i in picks:
        data = bytearray(corpus()[i])
        for _ in range(draw(st.integers(0, 3))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        exporter = draw(st.sampled_from(["192.0.2.1", "192.0.2.2"]))
        out.append((bytes(data), exporter, float(len(out))))
    return out


@SETTINGS
@given(streams(), st.integers(1, 5))
def test_mangled_streams_decode_the_same_either_way(stream: list[Datagram], size: int) -> None:
    assert_equivalent(stream, batch_size=size)


def test_a_plain_datagram_cut_at_every_offset() -> None:
    template, plain = corpus()[0], corpus()[1]
    stream = [(template, "192.0.2.1", 0.0)]
    stream += [(plain[:cut], "192.0.2.1", 1.0) for cut in range(len(plain) + 1)]
    assert_equivalent(stream)
