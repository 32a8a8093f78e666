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
from typing import Any

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
    rich = 0
    for d in real:
        targets = fields(d)
        assert all(at + size <= len(d) for at, size in targets)
        rich += len(targets) > 100
    # sfprobe also sends counter samples on its own clock (more of them when a loaded machine
    # slows its export down): those datagrams have few fields; the flow-sample ones, many.
    assert rich > 10 and rich >= len(real) // 2, (rich, len(real))


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


def _parse(d: bytes) -> tuple[bytes, list[list[Any]]]:
    """A datagram's header (to the sample count) and its samples: [kind, body, None], or for
    a flow sample [kind, header words, [[record kind, record body], ...]]."""
    at = 8 + (16 if d[4:8] == b"\0\0\0\x02" else 4) + 16
    samples: list[list[Any]] = []
    pos = at
    while pos + 8 <= len(d):
        kind, length = struct.unpack_from("!II", d, pos)
        body = d[pos + 8 : pos + 8 + length]
        words = 4 * (11 if kind == 3 else 8)
        if kind in (1, 3) and len(body) >= words:  # (a shorter one stays as it is)
            records = []
            r = words
            while r + 8 <= len(body):
                record, record_length = struct.unpack_from("!II", body, r)
                records.append([record, body[r + 8 : r + 8 + record_length]])
                r += 8 + record_length
            samples.append([kind, body[:words], records])
        else:
            samples.append([kind, body, None])
        pos += 8 + length
    return d[:at], samples


def _build(head: bytes, samples: list[list[Any]], lie: int, record_lie: dict[int, int]) -> bytes:
    out = bytearray(head)
    struct.pack_into("!I", out, len(head) - 4, max(0, len(samples) + lie))
    for k, (kind, a, records) in enumerate(samples):
        if records is None:
            body = a
        else:
            words = bytearray(a)
            struct.pack_into(
                "!I", words, len(words) - 4, max(0, len(records) + record_lie.get(k, 0))
            )
            body = bytes(words) + b"".join(struct.pack("!II", t, len(b)) + b for t, b in records)
        out += struct.pack("!II", kind, len(body)) + body
    return bytes(out)


def restructure(d: bytes, rnd: Any) -> bytes:
    """``d`` rebuilt with one structural change, every length kept consistent unless the change
    is a lie: a zero-length record or sample inserted, a record or sample count that lies,
    records dropped, duplicated, swapped or padded, a raw header's header length moved."""
    head, samples = _parse(d)
    flows = [k for k, s in enumerate(samples) if s[2] is not None]
    lie, record_lie = 0, {}
    op = rnd.randrange(10)
    records = samples[rnd.choice(flows)][2] if flows else None
    if op == 0 and records is not None:
        kind = rnd.choice((2, 1001, 7, 4097, 1, 3, 4))
        records.insert(rnd.randint(0, len(records)), [kind, b""])
    elif op == 1 and flows:
        record_lie = {rnd.choice(flows): rnd.choice((-1, 1, 2, 100))}
    elif op == 2:
        lie = rnd.choice((-1, 1, 5))
    elif op == 3:
        samples.insert(rnd.randint(0, len(samples)), [rnd.choice((2, 4, 7, 1, 3)), b"", None])
    elif op == 4 and records:
        i, j = rnd.randrange(len(records)), rnd.randrange(len(records))
        records[i], records[j] = records[j], records[i]
    elif op == 5 and records:
        records.pop(rnd.randrange(len(records)))
    elif op == 6 and records:
        records.insert(rnd.randrange(len(records)), list(rnd.choice(records)))
    elif op == 7 and records:
        for record in records:
            if record[0] == 1 and len(record[1]) >= 16:
                body = bytearray(record[1])
                old = struct.unpack_from("!I", body, 12)[0]
                struct.pack_into("!I", body, 12, max(0, old + rnd.choice((-4, -1, 1, 3, 4, -old))))
                record[1] = bytes(body)
                break
    elif op == 8 and records:
        record = rnd.choice(records)
        record[1] += bytes(rnd.choice((4, 8, 1, 2)))
    elif op == 9 and len(samples) > 1:
        i, j = rnd.randrange(len(samples)), rnd.randrange(len(samples))
        samples[i], samples[j] = samples[j], samples[i]
    return _build(head, samples, lie, record_lie)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.randoms(use_true_random=False))
def test_a_repeated_layout_restructured_in_a_later_datagram_decodes_the_same(
    real: tuple[bytes, ...], data: st.DataObject, rnd: Any
) -> None:
    """As above, with the change made to the structure (samples and records re-encoded)."""
    base = real[data.draw(st.integers(0, len(real) - 1))]
    stream = [base] * data.draw(st.integers(2, 10))
    for _ in range(data.draw(st.integers(1, 3))):
        k = data.draw(st.integers(0, len(stream) - 1))
        stream[k] = restructure(stream[k], rnd)
        if data.draw(st.integers(0, 9)) == 0:
            stream[k] = stream[k][: -data.draw(st.sampled_from([4, 8, 12]))]
    assert_equivalent([(d, "192.0.2.1", NOW + i) for i, d in enumerate(stream)], len(stream))


def test_restructuring_keeps_a_datagram_whole_and_reaches_both_paths(
    real: tuple[bytes, ...],
) -> None:
    """The property above tests something: parsed and rebuilt unchanged, a datagram is itself,
    and restructured copies go the array way as well as the scalar way."""
    import random

    from overflowd.wire import DecoderState
    from overflowd.wire.sflow_batch import decode_sflow_batch

    assert all(_build(*_parse(d), 0, {}) == d for d in real)
    rnd = random.Random(7)
    changed = [(d, restructure(d, rnd)) for d in real * 4]
    ways = []
    for d, m in changed:
        batch = decode_sflow_batch([(d, "192.0.2.1", NOW), (m, "192.0.2.1", NOW)], DecoderState())
        ways.append(1 in batch.datagram.tolist())
    assert any(ways) and not all(ways), ways
