"""The numpy NetFlow v5 batch path agrees with the scalar decoder and sampler.

Decoding: on the real trace, and on the trace with corrupted datagrams mixed in, the batch
path gives the same FlowRows, the same refusals and the same DecoderState statistics as
``decode_datagram_rows``. Sampling: every record's ``p`` is `flowsample.probability`'s, and
the draws are right in distribution (counts within 4 sigma of sum p; Horvitz–Thompson
packet total within 4 sigma). Speed is not tested here: see bench/v5_batch.py.
"""

from __future__ import annotations

import ipaddress
import math
import struct
from collections.abc import Iterator, Sequence

import numpy as np
import pytest

from overflowd.errors import DecodeError
from overflowd.flows import FlowRow
from overflowd.flowsample import IPAddress, SamplingPolicy, probability
from overflowd.flowsample_batch import BatchSampler
from overflowd.wire import CaptureReader, DecoderState, Limits, decode_datagram_rows
from overflowd.wire.v5_batch import V5Batch, decode_v5_batch
from tests.support.trace import netflow_v5_trace

Datagram = tuple[bytes, str, float]


@pytest.fixture(scope="module")
def trace() -> list[Datagram]:
    with open(netflow_v5_trace(), "rb") as fh:
        return [(d.payload, d.src, d.timestamp) for d in CaptureReader().udp_datagrams(fh)]


@pytest.fixture(scope="module")
def trace_batch(trace: list[Datagram]) -> V5Batch:
    return decode_v5_batch(trace, DecoderState())


@pytest.fixture(scope="module")
def trace_rows(trace_batch: V5Batch) -> list[FlowRow]:
    return trace_batch.rows(np.arange(len(trace_batch)))


def scalar(
    datagrams: Sequence[Datagram], state: DecoderState
) -> tuple[list[FlowRow], list[tuple[int, DecodeError]]]:
    rows: list[FlowRow] = []
    errors: list[tuple[int, DecodeError]] = []
    for i, (data, exporter, now) in enumerate(datagrams):
        try:
            rows.extend(decode_datagram_rows(data, exporter, state, now))
        except DecodeError as exc:
            errors.append((i, exc))
    return rows, errors


def batch_path(
    datagrams: Sequence[Datagram], state: DecoderState
) -> tuple[V5Batch, list[FlowRow], list[tuple[int, DecodeError]]]:
    """decode_v5_batch, then what a caller does with the datagrams it passes over."""
    batch = decode_v5_batch(datagrams, state)
    rows = batch.rows(np.arange(len(batch)))
    errors = list(batch.errors)
    for i in batch.passed:
        data, exporter, now = datagrams[i]
        try:
            rows.extend(decode_datagram_rows(data, exporter, state, now))
        except DecodeError as exc:
            errors.append((i, exc))
    return batch, rows, sorted(errors, key=lambda e: e[0])


def same_errors(a: list[tuple[int, DecodeError]], b: list[tuple[int, DecodeError]]) -> None:
    assert [(i, type(e), str(e), e.offset, e.exporter) for i, e in a] == [
        (i, type(e), str(e), e.offset, e.exporter) for i, e in b
    ]


# -- decoding -------------------------------------------------------------------------------


def test_rows_and_statistics_equal_the_scalar_decoder_on_the_trace(
    trace: list[Datagram], trace_rows: list[FlowRow]
) -> None:
    scalar_state = DecoderState()
    expected, errors = scalar(trace, scalar_state)
    batch_state = DecoderState()
    batch = decode_v5_batch(trace, batch_state)
    assert len(expected) == len(batch) == 78_684
    assert batch.rows(np.arange(len(batch))) == expected
    assert trace_rows == expected
    assert errors == [] and batch.errors == () and batch.passed == ()
    assert batch_state.statistics() == scalar_state.statistics()


def test_rows_of_chosen_indices(trace_batch: V5Batch, trace_rows: list[FlowRow]) -> None:
    chosen = [0, 5, 77, len(trace_batch) - 1, 5]
    assert trace_batch.rows(chosen) == [trace_rows[i] for i in chosen]
    assert trace_batch.rows(np.array([], dtype=np.intp)) == []


def test_batches_of_any_size_give_the_same_rows(
    trace: list[Datagram], trace_rows: list[FlowRow]
) -> None:
    head = trace[:600]
    expected_state = DecoderState()
    expected, _ = scalar(head, expected_state)
    for size in (1, 7, 64, 300):
        state = DecoderState()
        rows: list[FlowRow] = []
        for start in range(0, len(head), size):
            b = decode_v5_batch(head[start : start + size], state)
            rows.extend(b.rows(np.arange(len(b))))
        assert rows == expected
        assert state.statistics() == expected_state.statistics()


def _set_header(data: bytes, fmt: str, offset: int, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def corrupted(trace: list[Datagram]) -> list[Datagram]:
    """The first 200 trace datagrams with every kind of refusal and oddity mixed in."""
    out: list[Datagram] = []
    for i, (data, exporter, now) in enumerate(trace[:200]):
        kind = i % 20
        if kind == 1:
            data = _set_header(data, "!H", 0, 6)  # unknown version: not v5 at all
        elif kind == 2:
            count = struct.unpack_from("!H", data, 2)[0]
            data = _set_header(data, "!H", 2, count + 1)  # count beyond the data: truncated
        elif kind == 3:
            data = _set_header(data, "!H", 2, 1)  # count below the data: trailing bytes
        elif kind == 4:
            data = data[: len(data) - 17]  # cut inside the last record
        elif kind == 5:
            data = data[:23]  # cut inside the header
        elif kind == 6:
            data = _set_header(data, "!I", 12, 1_000_000_000)  # unix_nsecs out of range
        elif kind == 7:
            data = b""
        elif kind == 8:
            data = b"\x00"
        elif kind == 9:
            data = data[:2]  # a version and nothing else
        elif kind == 10:
            data = data[:24]  # a header whose records are missing
        elif kind == 11:
            data = _set_header(data, "!H", 2, 0)  # count 0: an empty datagram (trailing bytes)
        elif kind == 12:
            data = _set_header(data, "!I", 4, 1_000)  # uptime before the records: wraps
        elif kind == 13:
            data = _set_header(data, "!H", 22, (1 << 14) | 100)  # announces 1 in 100
        elif kind == 14:
            data = _set_header(data, "!H", 20, 0xABCD)  # engine type/id
        elif kind == 15:
            data = b"\x00\x00\x00\x05" + data[4:]  # sFlow's version word: not ours
        elif kind == 16:
            data = data + b"\x00" * 5  # padded: trailing bytes
        elif kind == 17:
            data = _set_header(data, "!I", 12, 1_000_000_000) + b"\x01"  # trailing and bad
        if i % 3 == 1:
            exporter = "192.0.2.7"
        elif i % 7 == 2:
            exporter = "::ffff:192.0.2.8"
        out.append((data, exporter, now + (i % 5) * 0.001))
    return out


@pytest.mark.parametrize("max_exporters", [1024, 2])
def test_corrupted_datagrams_are_counted_as_the_scalar_decoder_counts_them(
    trace: list[Datagram], max_exporters: int
) -> None:
    datagrams = corrupted(trace)

    def state() -> DecoderState:
        return DecoderState(
            limits=Limits(max_exporters_tracked=max_exporters),
            overrides={"192.0.2.7": 64},
        )

    scalar_state = state()
    expected, expected_errors = scalar(datagrams, scalar_state)
    batch_state = state()
    batch, rows, errors = batch_path(datagrams, batch_state)

    assert rows == expected
    same_errors(errors, expected_errors)
    assert batch_state.statistics() == scalar_state.statistics()
    stats = batch_state.statistics()
    assert stats.malformed["netflow-v5/truncated"] > 0
    assert stats.malformed["netflow-v5/malformed"] > 0
    assert stats.defects["netflow-v5/trailing_bytes"] > 0
    # What each path had to say about it, and which datagrams the batch left to the caller.
    assert {i for i, _ in batch.errors}.isdisjoint(batch.passed)
    assert all(datagrams[i][0][:2] != b"\x00\x05" for i in batch.passed)
    provenances = {r.sampling_provenance for r in rows}
    assert provenances == {"overridden", "announced", "assumed"}


def test_empty_and_passed_only_batches_leave_the_state_alone() -> None:
    state = DecoderState()
    empty = decode_v5_batch([], state)
    assert len(empty) == 0 and empty.passed == () and empty.rows([]) == []
    only = decode_v5_batch([(b"\x00\x09" + bytes(18), "192.0.2.1", 0.0)], state)
    assert len(only) == 0 and only.passed == (0,)
    assert state.statistics() == DecoderState().statistics()


def test_columns_have_the_documented_types(trace_batch: V5Batch) -> None:
    b = trace_batch
    assert b.src.dtype == np.uint32 and b.dst.dtype == np.uint32
    assert b.sport.dtype == np.uint16 and b.dport.dtype == np.uint16
    assert b.proto.dtype == np.uint8 and b.tcp_flags.dtype == np.uint8
    assert b.first.dtype == np.int64 and b.last.dtype == np.int64
    assert b.interval.dtype == np.int64 and int(b.interval.min()) >= 1
    for column in (b.src, b.sport, b.proto, b.first, b.interval, b.exporter, b.domain):
        assert len(column) == len(b)


# -- sampling: p ----------------------------------------------------------------------------


def asked_table(trace_rows: list[FlowRow]) -> dict[IPAddress, float | None]:
    """An asked-boost table touching many trace addresses, with every odd value in it."""
    values: list[float | None] = [None, math.nan, 0.5, 1.0, 3.0, 40.0, math.inf, 1e9, 7.5]
    table: dict[IPAddress, float | None] = {}
    for k, address in enumerate(sorted({r.src for r in trace_rows} | {r.dst for r in trace_rows})):
        if k % 3:
            table[address] = values[k % len(values)]
    return table


def busy_policy(trace_rows: list[FlowRow], *, rate: float = 1e-4) -> SamplingPolicy:
    table = asked_table(trace_rows)
    return SamplingPolicy(
        rate=rate,
        boost_cap=500.0,
        amplification_ports=frozenset({53, 123, 2354}),
        amplification_boost=30.0,
        syn_only_boost=20.0,
        operator_prefixes=[
            (ipaddress.ip_network("122.166.0.0/16"), 0.25),
            (ipaddress.ip_network("122.166.254.0/24"), 8.0),
            (ipaddress.ip_network("0.0.0.0/0"), 1.5),
            (ipaddress.ip_network("15.0.0.0/8"), 40.0),
            (ipaddress.ip_network("15.47.0.0/16"), 3.0),
            (ipaddress.ip_network("2001:db8::/32"), 9.0),  # IPv6: never matches v5
        ],
        asked_boost=table.get,
    )


def policies(trace_rows: list[FlowRow]) -> Iterator[tuple[str, SamplingPolicy]]:
    yield "default", SamplingPolicy()
    yield "busy", busy_policy(trace_rows)
    no_ask = busy_policy(trace_rows)
    yield (
        "prefixes only",
        SamplingPolicy(
            rate=no_ask.rate,
            boost_cap=no_ask.boost_cap,
            amplification_ports=no_ask.amplification_ports,
            amplification_boost=no_ask.amplification_boost,
            syn_only_boost=no_ask.syn_only_boost,
            operator_prefixes=no_ask.operator_prefixes,
        ),
    )
    # More prefixes of one length than the sampler compares one by one (binary search).
    sources = sorted({r.src for r in trace_rows})
    many = [
        (ipaddress.ip_network(f"{a}/24", strict=False), 1.0 + k)
        for k, a in enumerate(sources[::40])
    ]
    many += [(ipaddress.ip_network(f"{a}/28", strict=False), 0.5) for a in sources[5::97]]
    assert len(many) > 20
    yield "many prefixes", SamplingPolicy(rate=1e-4, operator_prefixes=many)
    yield (
        "boosts above the cap",
        SamplingPolicy(rate=1e-3, boost_cap=10.0, amplification_boost=300.0, syn_only_boost=0.0),
    )


def test_p_of_every_record_is_flowsample_probability(
    trace_batch: V5Batch, trace_rows: list[FlowRow]
) -> None:
    for name, policy in policies(trace_rows):
        sampler = BatchSampler(policy, np.random.default_rng(0))
        p = sampler.probabilities(trace_batch)
        expected = np.array([probability(r, policy) for r in trace_rows])
        assert np.allclose(p, expected, rtol=1e-12, atol=0), name
        assert np.array_equal(p, expected), name  # in fact bit for bit
    # The policies above reach every factor on the trace.
    busy = busy_policy(trace_rows)
    reasons = {name for r in trace_rows for name in busy.explain(r)[2]}
    assert reasons == {"amplification", "syn_only", "operator_prefix", "asked", "capped"}


@pytest.mark.parametrize("name", ["busy", "default", "boosts above the cap"])
def test_sampled_p_is_the_records_p(
    trace_batch: V5Batch, trace_rows: list[FlowRow], name: str
) -> None:
    # "default" and "boosts above the cap" take the sampler's plain (in-place) path.
    policy = {
        "busy": busy_policy(trace_rows, rate=1e-2),
        "default": SamplingPolicy(rate=1e-2),
        "boosts above the cap": dict(policies(trace_rows))["boosts above the cap"],
    }[name]
    sampler = BatchSampler(policy, np.random.default_rng(1))
    indices, p = sampler.sample(trace_batch)
    assert len(indices) > 500
    assert np.all(np.diff(indices) > 0)
    assert np.array_equal(p, np.array([probability(trace_rows[i], policy) for i in indices]))
    rows = trace_batch.rows(indices)
    assert rows == [trace_rows[i] for i in indices]


def test_thinning_looks_up_few_records(trace_batch: V5Batch, trace_rows: list[FlowRow]) -> None:
    policy = busy_policy(trace_rows, rate=1e-6)
    sampler = BatchSampler(policy, np.random.default_rng(2))
    sampler.sample(trace_batch)
    assert sampler.asked_lookups < len(trace_batch) // 10


# -- sampling: distribution -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["default", "busy", "prefixes only", "many prefixes"])
def test_counts_and_horvitz_thompson_within_4_sigma(
    trace_batch: V5Batch, trace_rows: list[FlowRow], name: str
) -> None:
    policy = dict(policies(trace_rows))[name]
    if name == "default":
        policy = SamplingPolicy(rate=1e-4)
    p = BatchSampler(policy, np.random.default_rng(0)).probabilities(trace_batch)
    packets = trace_batch.packets.astype(np.float64)
    expected = float(p.sum())
    sigma_n = math.sqrt(float((p * (1 - p)).sum()))
    true_packets = float(packets.sum())
    positive = p > 0
    assert positive.all() or name != "default"
    sigma_ht = math.sqrt(float(((1 - p[positive]) / p[positive] * packets[positive] ** 2).sum()))
    assert expected > 100
    for seed in range(6):
        sampler = BatchSampler(policy, np.random.default_rng(seed))
        indices, p_chosen = sampler.sample(trace_batch)
        assert abs(len(indices) - expected) <= 4 * sigma_n, (seed, len(indices), expected)
        estimate = float((packets[indices] / p_chosen).sum())
        # Records with p == 0 are never reported: HT estimates the rest.
        assert abs(estimate - packets[positive].sum()) <= 4 * sigma_ht, (seed, estimate)
        stats = sampler.statistics()
        assert stats.records_seen == len(trace_batch)
        assert stats.records_sampled == len(indices)
        assert stats.packets_seen == true_packets
        assert stats.packets_sampled == packets[indices].sum()
        assert stats.certain == int((p >= 1).sum())
        if policy.asked_boost is None:
            assert stats.expected_sampled == pytest.approx(expected, rel=1e-9)
            assert stats.variance_sampled == pytest.approx(sigma_n**2, rel=1e-6)
        else:
            # Estimated from the records looked up (unbiased), so only close.
            assert abs(stats.expected_sampled - expected) <= 0.1 * expected


def test_statistics_count_boosts_like_the_scalar_sampler(
    trace_batch: V5Batch, trace_rows: list[FlowRow]
) -> None:
    for name, policy in policies(trace_rows):
        if policy.asked_boost is not None:
            continue
        sampler = BatchSampler(policy, np.random.default_rng(3))
        sampler.sample(trace_batch)
        stats = sampler.statistics()
        expected = {"amplification": 0, "syn_only": 0, "operator_prefix": 0, "asked": 0}
        capped = 0
        for r in trace_rows:
            for reason in policy.explain(r)[2]:
                if reason == "capped":
                    capped += 1
                else:
                    expected[reason] += 1
        assert dict(stats.boosts) == expected, name
        assert stats.boost_capped == capped, name


def test_own_generator_reseeds_from_entropy_every_n_draws(trace_batch: V5Batch) -> None:
    calls: list[int] = []

    def entropy(n: int) -> bytes:
        calls.append(n)
        return bytes([len(calls)]) * n

    sampler = BatchSampler(SamplingPolicy(), entropy=entropy, reseed_every=1000)
    sampler.sample(trace_batch)
    n = len(trace_batch)
    assert sampler.statistics().reseeds == math.ceil(n / 1000) - 1
    assert len(calls) == math.ceil(n / 1000) and set(calls) == {32}
    # The draws come from the seeded state: the same entropy gives the same choices.
    again = BatchSampler(SamplingPolicy(rate=1e-3), entropy=lambda k: b"\x07" * k)
    other = BatchSampler(SamplingPolicy(rate=1e-3), entropy=lambda k: b"\x07" * k)
    assert np.array_equal(again.sample(trace_batch)[0], other.sample(trace_batch)[0])
    with pytest.raises(ValueError):
        BatchSampler(SamplingPolicy(), reseed_every=0)


def test_empty_batch_samples_nothing() -> None:
    sampler = BatchSampler(SamplingPolicy(), np.random.default_rng(0))
    indices, p = sampler.sample(decode_v5_batch([], DecoderState()))
    assert len(indices) == 0 and len(p) == 0
    assert sampler.statistics().records_seen == 0


def test_truncated_at_every_offset_and_random_headers_agree_with_the_scalar_decoder(
    trace: list[Datagram],
) -> None:
    data, exporter, now = trace[10]
    datagrams: list[Datagram] = [(data[:cut], exporter, now) for cut in range(len(data) + 1)]
    rng = np.random.default_rng(5)
    for _ in range(300):
        head = bytearray(data[:24])
        for offset in rng.choice(24, size=3, replace=False).tolist():
            head[offset] = int(rng.integers(256))
        head[0:2] = b"\x00\x05" if rng.random() < 0.8 else head[0:2]
        datagrams.append((bytes(head) + data[24:], exporter, now))
    scalar_state = DecoderState()
    expected, expected_errors = scalar(datagrams, scalar_state)
    batch_state = DecoderState()
    _, rows, errors = batch_path(datagrams, batch_state)
    assert rows == expected
    same_errors(errors, expected_errors)
    assert batch_state.statistics() == scalar_state.statistics()
