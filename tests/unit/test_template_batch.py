"""The array path for NetFlow v9/IPFIX agrees with the scalar decoder and sampler.

Decoding: on the shared trace re-exported the way softflowd exports NetFlow v9 and IPFIX,
on every datagram of tests/unit/test_wire_v9_ipfix.py's builders, and on generated templates
and data sets (hypothesis, whole and truncated), ``decode_template_batch`` gives the same
FlowRows in the same order, the same refusals and the same DecoderState statistics as
``decode_datagram_rows`` one datagram at a time. Sampling: every record's ``p`` is
`flowsample.probability`'s, bit for bit. Speed: bench/v9_batch.py.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd.errors import DecodeError
from overflowd.flows import FlowRow
from overflowd.flowsample import SamplingPolicy, probability
from overflowd.flowsample_batch import BatchSampler
from overflowd.wire import CaptureReader, DecoderState, decode_datagram_rows
from overflowd.wire.template_batch import TemplateBatch, decode_template_batch
from overflowd.wire.templates import Template
from tests.support.trace import netflow_v5_trace

Datagram = tuple[bytes, str, float]
EXPORTER = "192.0.2.9"

V5_HEADER = struct.Struct("!HHIIIIBBH")
V5_RECORD = struct.Struct("!IIIHHIIIIHHxBBBHHBBxx")

#: softflowd 1.x's NetFlow v9 IPv4 template (netflow9.c), and an IPFIX one with
#: millisecond times (flowStart/EndMilliseconds, 8 bytes) and one with sysUpTime times
#: relative to systemInitTimeMilliseconds from options data.
V9_FIELDS = (
    (8, 4), (12, 4), (21, 4), (22, 4), (1, 4), (2, 4), (10, 4), (14, 4),
    (7, 2), (11, 2), (4, 1), (6, 1), (60, 1), (5, 1), (16, 2), (17, 2),
)  # fmt: skip
IPFIX_MS_FIELDS = (
    (8, 4), (12, 4), (152, 8), (153, 8), (1, 8), (2, 8), (10, 4), (14, 4),
    (7, 2), (11, 2), (4, 1), (6, 2), (60, 1), (5, 1), (16, 4), (17, 4),
)  # fmt: skip
IPFIX_SYSUP_FIELDS = (
    (8, 4), (12, 4), (22, 4), (21, 4), (1, 4), (2, 4), (7, 2), (11, 2), (4, 1), (6, 1),
    (195, 1), (32, 2),
)  # fmt: skip


def _set(set_id: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack("!HH", set_id, 4 + len(body)) + body


def _template(template_id: int, fields: Sequence[tuple[int, int]]) -> bytes:
    return struct.pack("!HH", template_id, len(fields)) + b"".join(
        struct.pack("!HH", e, n) for e, n in fields
    )


def _record(fields: Sequence[tuple[int, int]], values: dict[int, int]) -> bytes:
    return b"".join((values.get(e, 0) % (1 << (8 * n))).to_bytes(n, "big") for e, n in fields)


def reexport(v5: list[Datagram], fmt: str) -> list[Datagram]:
    """The v5 trace's records as softflowd would export them in NetFlow v9 or IPFIX:
    templates (and, for IPFIX sysUpTime, the options with systemInitTimeMilliseconds) in
    the first datagram and every 16th, one data set per datagram."""
    fields = {"v9": V9_FIELDS, "ipfix-ms": IPFIX_MS_FIELDS, "ipfix-sysup": IPFIX_SYSUP_FIELDS}[fmt]
    out = []
    for n, (data, exporter, now) in enumerate(v5):
        _, count, uptime, secs, nsecs, _, _, _, _ = V5_HEADER.unpack_from(data)
        boot_ms = secs * 1000 + nsecs // 1_000_000 - uptime
        records = []
        for i in range(count):
            (src, dst, _, _, _, pkts, octets, first, last, sport, dport, flags, proto, tos,
             sas, das, _, _) = V5_RECORD.unpack_from(data, 24 + 48 * i)  # fmt: skip
            values = {8: src, 12: dst, 1: octets, 2: pkts, 7: sport, 11: dport, 4: proto,
                      6: flags, 5: tos, 195: tos >> 2, 16: sas, 17: das, 22: first, 21: last,
                      152: boot_ms + first, 153: boot_ms + last, 60: 4, 10: 1, 14: 2,
                      32: dport if proto == 1 else 0}  # fmt: skip
            records.append(_record(fields, values))
        sets = b""
        if fmt == "v9":
            if n % 16 == 0:
                sets += _set(0, _template(256, fields))
            sets += _set(256, b"".join(records))
            dgram = struct.pack("!HHIIII", 9, count, uptime, secs, n, 0) + sets
        else:
            if n % 16 == 0:
                sets += _set(2, _template(256, fields))
                if fmt == "ipfix-sysup":
                    options = struct.pack("!HHHHHHH", 257, 2, 1, 149, 4, 160, 8)
                    sets += _set(3, options)
                    sets += _set(257, struct.pack("!IQ", 0, boot_ms))
            sets += _set(256, b"".join(records))
            dgram = struct.pack("!HHIII", 10, 16 + len(sets), secs, n, 0) + sets
        out.append((dgram, exporter, now))
    return out


#: Datagrams of the trace re-exported (of ~2,700: the rest adds time, not cases).
TRACE_DATAGRAMS = 800


@pytest.fixture(scope="module")
def v5_trace() -> list[Datagram]:
    with open(netflow_v5_trace(), "rb") as fh:
        return [(d.payload, d.src, d.timestamp) for d in CaptureReader().udp_datagrams(fh)]


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


def same_errors(a: Sequence[tuple[int, DecodeError]], b: Sequence[tuple[int, DecodeError]]) -> None:
    assert [(i, type(e), str(e), e.offset, e.exporter) for i, e in a] == [
        (i, type(e), str(e), e.offset, e.exporter) for i, e in b
    ]


def assert_equivalent(datagrams: Sequence[Datagram], batch_size: int = 256) -> TemplateBatch:
    """Scalar and array paths over ``datagrams`` (in batches): same rows, errors, state."""
    scalar_state, batch_state = DecoderState(), DecoderState()
    expected, expected_errors = scalar(datagrams, scalar_state)
    rows: list[FlowRow] = []
    errors: list[tuple[int, DecodeError]] = []
    last = None
    for start in range(0, max(1, len(datagrams)), batch_size):
        batch = decode_template_batch(datagrams[start : start + batch_size], batch_state)
        assert batch.failures == ()
        rows.extend(batch.all_rows_in_order())
        errors.extend((start + i, e) for i, e in batch.errors)
        last = batch
    assert rows == expected
    same_errors(errors, expected_errors)
    assert batch_state.statistics() == scalar_state.statistics()
    # The same templates in the same recency order (what eviction takes first).
    assert batch_state.templates.keys() == scalar_state.templates.keys()
    assert last is not None
    return last


@pytest.mark.parametrize("fmt", ["v9", "ipfix-ms", "ipfix-sysup"])
def test_softflowd_like_reexport_of_the_trace(v5_trace: list[Datagram], fmt: str) -> None:
    datagrams = reexport(v5_trace[:TRACE_DATAGRAMS], fmt)
    batch = decode_template_batch(datagrams, DecoderState())
    # Every data set went into the arrays: nothing decoded record by record.
    assert len(batch) > 20_000 and batch.scalar == ()
    assert_equivalent(datagrams)
    # Columns outside the sampler's are decoded on demand, for all or some records.
    rows = batch.rows(np.arange(len(batch)))
    some = np.arange(0, len(batch), 7)
    assert batch.column("first").tolist() == [r.first for r in rows]
    assert batch.column("dport", some).tolist() == [rows[i].dport for i in some]
    assert batch.column("exporter", some).tolist() == [0] * len(some)
    assert batch.column("packets", some).tolist() == [rows[i].packets for i in some]


@pytest.mark.parametrize("fmt", ["v9", "ipfix-ms", "ipfix-sysup"])
def test_p_of_every_record_is_flowsample_probability(v5_trace: list[Datagram], fmt: str) -> None:
    datagrams = reexport(v5_trace[:600], fmt)
    batch = decode_template_batch(datagrams, DecoderState())
    rows = batch.rows(np.arange(len(batch)))
    sources = sorted({r.src for r in rows}, key=int)
    import ipaddress

    prefixes = tuple((ipaddress.ip_network(f"{a}/24", strict=False), 3.0) for a in sources[::50])
    for policy in (
        SamplingPolicy(rate=1e-3),
        SamplingPolicy(rate=1e-2, operator_prefixes=prefixes, boost_cap=20.0),
        SamplingPolicy(rate=1e-3, asked_boost=lambda a: 2.0 if int(a) % 3 == 0 else None),
    ):
        sampler = BatchSampler(policy, np.random.default_rng(0))
        expected = np.array([probability(r, policy) for r in rows])
        assert np.array_equal(sampler.probabilities(batch), expected)
        indices, p = BatchSampler(policy, np.random.default_rng(1)).sample(batch)
        assert np.array_equal(p, expected[indices])
        assert batch.rows(indices) == [rows[i] for i in indices]


def test_mixed_batches_with_corruption_and_other_formats(v5_trace: list[Datagram]) -> None:
    v9 = reexport(v5_trace[:300], "v9")
    ipfix = reexport(v5_trace[:300], "ipfix-sysup")
    mixed: list[Datagram] = []
    for k, (a, b) in enumerate(zip(v9, ipfix, strict=True)):
        if k % 7 == 3:
            a = (a[0][: 40 + k % 50], a[1], a[2])  # truncated
        if k % 11 == 5:
            b = (b[0][:2] + b"\xff" + b[0][3:], b[1], b[2])  # bad IPFIX length
        mixed += [a, (b[0], "198.51.100.7", b[2])]
        if k % 13 == 0:
            mixed.append(v5_trace[k])  # NetFlow v5 through the scalar path
            mixed.append((b"\x00\x07garbage", "203.0.113.1", b[2]))
    assert_equivalent(mixed, batch_size=37)


def test_data_before_template_is_held_and_replayed_into_the_arrays(
    v5_trace: list[Datagram],
) -> None:
    v9 = reexport(v5_trace[:40], "v9")
    # Data of datagrams 1-15 arrives before the template (datagram 0, delivered last).
    datagrams = v9[1:16] + v9[:1] + v9[16:]
    batch = assert_equivalent(datagrams, batch_size=8)
    assert len(batch) > 0


def test_datagrams_of_the_scalar_unit_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every datagram tests/unit/test_wire_v9_ipfix.py decodes (built by the independent
    encoder: IPv4 and IPv6, options, sampler ids, held data, odd sizes, ICMP, NSEL, time
    elements, malformed ones), each test's datagrams as one stream, through both paths."""
    import inspect

    from tests.unit import test_wire_v9_ipfix as t

    original = t.decode_datagram
    seen: list[Datagram] = []

    def recording(data: bytes, exporter: str, state: DecoderState, now: float) -> list[object]:
        seen.append((data, exporter, now))
        return list(original(data, exporter, state, now))

    monkeypatch.setattr(t, "decode_datagram", recording)
    streams = 0
    for name, test in sorted(vars(t).items()):
        if not name.startswith("test_") or inspect.signature(test).parameters:
            continue
        seen.clear()
        test()
        if seen:
            assert_equivalent(list(seen))
            streams += 1
    assert streams >= 20


def test_declined_templates_keep_the_scalar_path() -> None:
    def layout(fields: Sequence[tuple[int, int]]) -> object:
        from overflowd.wire.templates import FieldSpec

        return Template("ipfix", 256, [FieldSpec(e, n) for e, n in fields]).batch_layout

    assert layout(V9_FIELDS) is not None
    assert layout([(27, 16), (28, 16), (2, 4)]) is None  # IPv6
    assert layout([(8, 4), (12, 4), (27, 16), (28, 16)]) is None  # both families
    assert layout([(8, 4), (12, 4), (2, 3)]) is None  # a 3-byte counter
    assert layout([(8, 4), (12, 4), (34, 4)]) is None  # sampling in the record
    assert layout([(8, 4), (12, 4), (154, 8)]) is None  # NTP time
    assert layout([(8, 4), (12, 4), (16, 4)]) is None  # one AS field
    assert layout([(8, 4), (12, 4), (231, 8), (232, 8)]) is None  # NSEL
    assert layout([(8, 4), (12, 4), (2, 65535)]) is None  # variable length


# -- generated templates and data ------------------------------------------------------------

ELEMENTS = (0, 1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 16, 17, 21, 22, 23, 24, 27, 28, 32, 34, 48,
            60, 85, 86, 139, 150, 151, 152, 153, 154, 156, 158, 159, 176, 177, 178, 179, 195,
            231, 232, 298, 299, 302, 305)  # fmt: skip
LENGTHS = (0, 1, 2, 3, 4, 8, 16)
#: Elements and lengths the array path takes (so that about half the examples reach it).
FAST_ELEMENTS = (1, 2, 4, 5, 6, 7, 10, 11, 14, 21, 22, 32, 60, 85, 86, 150, 151, 152, 153,
                 158, 159, 176, 177, 195)  # fmt: skip
FAST_LENGTHS = (1, 2, 4, 8)


@st.composite
def templated_datagrams(draw: st.DrawFn) -> list[Datagram]:
    ipfix = draw(st.booleans())
    fields = [(8, 4), (12, 4)] if draw(st.integers(0, 3)) else []
    elements, lengths = draw(st.sampled_from([(ELEMENTS, LENGTHS), (FAST_ELEMENTS, FAST_LENGTHS)]))
    fields += draw(
        st.lists(st.tuples(st.sampled_from(elements), st.sampled_from(lengths)), max_size=12)
    )
    if draw(st.booleans()):
        fields += [(16, 2), (17, 2)]
    fields = draw(st.permutations(fields))
    record_size = sum(n for _, n in fields)
    count = draw(st.integers(0, 6))
    body = draw(st.binary(min_size=record_size * count, max_size=record_size * count + 7))
    uptime = draw(st.integers(0, 2**32 - 1))
    secs = draw(st.integers(0, 2**32 - 1))
    sets = _set(2 if ipfix else 0, _template(300, fields))
    if ipfix and draw(st.booleans()):
        init = draw(st.integers(0, 2**64 - 1))
        sets += _set(3, struct.pack("!HHHHHHH", 301, 2, 1, 149, 4, 160, 8))
        sets += _set(301, struct.pack("!IQ", 0, init))
    sets += _set(300, body)
    if ipfix:
        dgram = struct.pack("!HHIII", 10, 16 + len(sets), secs, 0, 7) + sets
    else:
        dgram = struct.pack("!HHIIII", 9, 1, uptime, secs, 0, 7) + sets
    out = [(dgram, EXPORTER, 5.0)]
    cut = draw(st.integers(0, len(dgram)))
    out.append((dgram[:cut], EXPORTER, 6.0))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(templated_datagrams())
def test_generated_templates_decode_the_same_either_way(datagrams: list[Datagram]) -> None:
    assert_equivalent(datagrams)
    assert_equivalent(list(reversed(datagrams)))


# -- what goes the scalar way -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["v9", "ipfix-ms", "ipfix-sysup"])
def test_refreshes_and_options_data_stay_on_the_array_path(
    v5_trace: list[Datagram], fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-announced templates (every 16th datagram) and the systemInitTimeMilliseconds
    options data with them are taken on the array path: only the first datagram, which
    teaches the templates, is decoded the scalar way."""
    import overflowd.wire.template_batch as tb

    datagrams = reexport(v5_trace[:200], fmt)
    scalar_calls: list[int] = []
    original = tb.decode_datagram_rows

    def counting(data: bytes, exporter: str, state: DecoderState, now: float) -> list[FlowRow]:
        scalar_calls.append(len(data))
        return original(data, exporter, state, now)

    monkeypatch.setattr(tb, "decode_datagram_rows", counting)
    state = DecoderState()
    for start in range(0, len(datagrams), 64):
        decode_template_batch(datagrams[start : start + 64], state)
    assert len(scalar_calls) == 1
    assert state.statistics().templates_refreshed == (2 if fmt == "ipfix-sysup" else 1) * 12
    monkeypatch.undo()
    assert_equivalent(datagrams, batch_size=64)


def test_a_changed_template_or_options_among_refreshes_goes_the_scalar_way(
    v5_trace: list[Datagram],
) -> None:
    """A template datagram that is not a pure refresh (a changed template, a withdrawal, a
    new options template, sampling announced out of range) is the scalar path's; the
    datagrams after it decode with what it taught, on either path."""
    datagrams = reexport(v5_trace[:64], "ipfix-sysup")
    header = struct.Struct("!HHIII")
    changed = _set(2, _template(256, (*IPFIX_SYSUP_FIELDS[:-1], (11, 2))))
    withdrawal = _set(2, struct.pack("!HH", 256, 0))
    sampling = _set(3, struct.pack("!HHHHHHH", 258, 2, 1, 149, 4, 34, 4))
    sampling += _set(258, struct.pack("!II", 0, 0))  # interval 0: out of range
    sampling_ok = _set(258, struct.pack("!II", 0, 100))
    extra = []
    for i, sets in enumerate((changed, withdrawal, sampling, sampling_ok)):
        extra.append(header.pack(10, 16 + len(sets), 1_600_000_000 + i, 0, 0) + sets)
    stream = [*datagrams[:20], (extra[0], datagrams[0][1], 1.0), *datagrams[20:30]]
    stream += [(extra[1], datagrams[0][1], 2.0), *datagrams[:1], *datagrams[30:40]]
    stream += [(extra[2], datagrams[0][1], 3.0), *datagrams[40:48]]
    # Not before datagram 48, whose own options data would set the sampling again.
    stream += [(extra[3], datagrams[0][1], 4.0), *datagrams[49:]]
    assert_equivalent(stream, batch_size=256)
    assert_equivalent(stream, batch_size=5)


def test_data_held_for_an_unknown_template_keeps_no_exporter_off_the_array_path(
    v5_trace: list[Datagram], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One data set for a template nobody announced is held for up to
    ``pending_max_age_s`` (10 minutes). Held, waiting for its template, it changes nothing
    the next datagrams of any exporter decode with: a hostile source that sends one such set
    every few minutes (from its own address or spoofing an exporter's) must not push every
    exporter's datagrams to the scalar walk (about 3x the CPU per datagram) meanwhile."""
    import overflowd.wire.template_batch as tb

    datagrams = reexport(v5_trace[:64], "v9")
    exporter = datagrams[0][1]
    unknown = struct.pack("!HHIIII", 9, 1, 0, 1_600_000_000, 0, 0) + _set(999, b"\1" * 40)
    stream = [*datagrams[:2], (unknown, "203.0.113.66", datagrams[1][2]), *datagrams[2:20]]
    stream += [(unknown, exporter, datagrams[19][2]), *datagrams[20:]]
    scalar_calls: list[str] = []
    original = tb.decode_datagram_rows

    def counting(data: bytes, source: str, state: DecoderState, now: float) -> list[FlowRow]:
        scalar_calls.append(source)
        return original(data, source, state, now)

    monkeypatch.setattr(tb, "decode_datagram_rows", counting)
    state = DecoderState()
    for start in range(0, len(stream), 16):
        decode_template_batch(stream[start : start + 16], state)
    assert state.statistics().pending_sets == 2
    # The template datagram and the two held sets: nothing else.
    assert scalar_calls == [exporter, "203.0.113.66", exporter]
    monkeypatch.undo()
    assert_equivalent(stream, batch_size=16)
    assert_equivalent(stream, batch_size=1)


def test_rows_and_columns_take_indices_as_numpy_does(v5_trace: list[Datagram]) -> None:
    """A negative index is counted from the end for every field, not only for the sampler's
    columns (the others, decoded from the kept bytes, came back as zeros); one past the end
    raises."""
    batch = decode_template_batch(reexport(v5_trace[:20], "v9"), DecoderState())
    n = len(batch)
    assert batch.rows([-1, -n]) == batch.rows([n - 1, 0])
    for name in ("dport", "bytes", "first", "src", "exporter"):
        assert batch.column(name, np.array([-1])).tolist() == batch.column(name)[-1:].tolist()
    for bad in (n, -n - 1):
        with pytest.raises(IndexError):
            batch.rows([bad])
        with pytest.raises(IndexError):
            batch.column("dport", np.array([bad]))
