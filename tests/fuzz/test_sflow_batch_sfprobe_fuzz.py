"""Real sFlow v5 (pmacct's sfprobe, tests/support/sfprobe.py), mutated where it matters: the
array path gives what the scalar path gives (rows in order, refusals, state).

Byte flips over a whole datagram mostly land in packet payload; here each mutation hits a
*field* of the real datagram, found by walking it: the agent address type, sub-agent,
sample count, each sample's type and length, every word of each flow sample header (rate,
pool, drops, ifIndex encodings, record count), each record's type and length, the raw
header's protocol, frame length, stripped and header length, and each of the first 80
bytes of the sampled packet (ethertype, VLAN tags, IP version/IHL, total length, fragment
offset, protocol, IPv6 payload length and next header, ports, ICMP type/code, TCP flags).
A field is overwritten with a value from a list of edges, or nudged by a small delta (a
length off by one word, a count off by one). Derandomized under ``CI=true`` (conftest)."""

from __future__ import annotations

import functools
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import sfprobe
from tests.unit.test_sflow_batch import FRAMES, Datagram, assert_equivalent
from tests.unit.test_wire_encoder import pcap_file

pytestmark = pytest.mark.skipif(
    not sfprobe.available(),
    reason="LOUD SKIP: pmacctd (Debian package pmacct, in `make deps-test`) is not installed, "
    "so mutated real sFlow exporter data is not checked",
)

NOW = 1_700_000_000.5
WORDS = (0, 1, 2, 3, 4, 5, 8, 11, 12, 14, 16, 17, 20, 32, 33, 1001, 1003, 0xFFFF, 2**31)
WORDS += (2**32 - 4, 2**32 - 1)
BYTES = (0x00, 0x01, 0x04, 0x05, 0x06, 0x08, 0x11, 0x20, 0x2C, 0x33, 0x3A, 0x40, 0x44, 0x45)
BYTES += (0x46, 0x4F, 0x60, 0x81, 0x86, 0x88, 0x91, 0xA8, 0xAA, 0xDD, 0xFF)
DELTAS = (0, 0, 0, 1, -1, 2, 4, -4)


@functools.cache
def corpus(tmp: str) -> tuple[bytes, ...]:
    """Datagrams sfprobe exports for a capture of the test frames (TCP, UDP, ICMP, IPv6,
    VLAN tags, IPv4 options, fragments...), several samples each."""
    capture = Path(tmp) / "mixed.pcap"
    capture.write_bytes(
        pcap_file((1_700_000_000 + i / 100, FRAMES[i % len(FRAMES)]) for i in range(300))
    )
    datagrams = sfprobe.sfprobe_export(capture)
    assert len(datagrams) > 10, "pmacctd exported (almost) nothing"
    return tuple(datagrams)


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, ...]:
    return corpus(str(tmp_path_factory.mktemp("sfprobe")))


def fields(d: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each field of ``d`` a mutation may hit (see the module docstring)."""
    out: list[tuple[int, int]] = []

    def word(at: int) -> None:
        if at + 4 <= len(d):
            out.append((at, 4))

    word(4)  # agent address type
    at = 8 + (16 if d[4:8] == b"\0\0\0\x02" else 4)
    for k in (0, 4, 12):  # sub-agent, sequence, sample count
        word(at + k)
    pos = at + 16
    while pos + 8 <= len(d):
        kind, length = struct.unpack_from("!II", d, pos)
        word(pos)
        word(pos + 4)
        body = pos + 8
        if kind in (1, 3):
            head = 11 if kind == 3 else 8
            for k in range(head):
                word(body + 4 * k)
            r = body + 4 * head
            while r + 8 <= min(len(d), body + length):
                record, record_length = struct.unpack_from("!II", d, r)
                word(r)
                word(r + 4)
                if record == 1:
                    for k in range(4):  # protocol, frame length, stripped, header length
                        word(r + 8 + 4 * k)
                    out += [(r + 24 + k, 1) for k in range(80) if r + 24 + k < len(d)]
                r += 8 + record_length
        pos = body + length
    return out


def mutate(d: bytes, picks: list[tuple[int, int, int]]) -> bytes:
    targets = fields(d)
    data = bytearray(d)
    for which, value, delta in picks:
        at, size = targets[which % len(targets)]
        if size == 4:
            old = struct.unpack_from("!I", data, at)[0]
            new = (old + delta) % 2**32 if delta else WORDS[value % len(WORDS)]
            data[at : at + 4] = struct.pack("!I", new)
        else:
            data[at] = (data[at] + delta) % 256 if delta else BYTES[value % len(BYTES)]
    return bytes(data)


@st.composite
def streams(draw: st.DrawFn, real: tuple[bytes, ...]) -> list[Datagram]:
    out: list[Datagram] = []
    for k in range(draw(st.integers(1, 8))):
        data = real[draw(st.integers(0, len(real) - 1))]
        picks = draw(
            st.lists(
                st.tuples(st.integers(0, 10**6), st.integers(0, 99), st.sampled_from(DELTAS)),
                max_size=3,
            )
        )
        data = mutate(data, picks)
        if draw(st.integers(0, 9)) == 0:
            data = data[: draw(st.integers(0, len(data)))]
        exporter = draw(st.sampled_from(["192.0.2.1", "192.0.2.2"]))
        out.append((data, exporter, NOW + k))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.integers(1, 8))
def test_mutated_real_datagrams_decode_the_same_either_way(
    real: tuple[bytes, ...], data: st.DataObject, size: int
) -> None:
    assert_equivalent(data.draw(streams(real)), batch_size=size)


def test_the_mutations_reach_the_array_path(real: tuple[bytes, ...]) -> None:
    """The property above tests something: the corpus goes the array way unmutated, and
    every field the mutator finds is inside its datagram."""
    stream = [(d, "192.0.2.1", NOW) for d in real]
    batches = assert_equivalent(stream, batch_size=len(stream))
    assert batches[0].scalar == () and batches[0].errors == () and len(batches[0]) > len(real)
    for d in real:
        targets = fields(d)
        assert len(targets) > 100 and all(at + size <= len(d) for at, size in targets)


@st.composite
def repeated(draw: st.DrawFn, real: tuple[bytes, ...]) -> list[Datagram]:
    """One real datagram repeated (the layout shortcuts hold for its copies), with one or two
    copies other than the first mutated, cut or lengthened: a length, count or kind that
    differs only in a later datagram."""
    base = real[draw(st.integers(0, len(real) - 1))]
    stream = [base] * draw(st.integers(2, 12))
    for _ in range(draw(st.integers(1, 2))):
        k = draw(st.integers(1, len(stream) - 1))
        picks = draw(
            st.lists(
                st.tuples(st.integers(0, 10**6), st.integers(0, 99), st.sampled_from(DELTAS)),
                min_size=1,
                max_size=3,
            )
        )
        data = mutate(stream[k], picks) if fields(stream[k]) else stream[k]
        tail = draw(st.integers(0, 9))
        if tail == 0:
            data = data[: draw(st.integers(0, len(data)))]
        elif tail == 1:
            data += bytes(draw(st.integers(1, 9)))
        stream[k] = data
    return [(d, "192.0.2.1", NOW + i) for i, d in enumerate(stream)]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_repeated_layout_broken_in_a_later_datagram_decodes_the_same(
    real: tuple[bytes, ...], data: st.DataObject
) -> None:
    stream = data.draw(repeated(real))
    assert_equivalent(stream, batch_size=len(stream))
