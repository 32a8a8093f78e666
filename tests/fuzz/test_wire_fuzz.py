"""Flow decoders under hostile input: any bytes give records or our DecodeError, never anything
else; whole and truncated at every offset; and the decoder's memory stays bounded whatever
arrives (a flood of distinct templates, held data, exporters).

The one invariant (h11's fuzz harness states the same): ``decode_datagram`` returns a list of
valid FlowRecords or raises DecodeError. Any other exception is a bug.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from overflowd.cli.cmd_decode import format_record
from overflowd.errors import DecodeError
from overflowd.flows import FlowRecord
from overflowd.wire import CaptureReader, DecoderState, Limits, decode_datagram
from overflowd.wire.templates import MAX_INTERVAL, MAX_TIME_MS, MIN_TIME_MS
from tests.unit.test_wire_encoder import (
    IE,
    VARIABLE,
    ethernet,
    flowset,
    ipfix_message,
    ipfix_options_template,
    ipfix_template,
    ipfix_withdrawal,
    ipv4,
    ipv6,
    pcap_file,
    pcapng_file,
    record,
    sflow_counter_sample,
    sflow_datagram,
    sflow_flow_sample,
    sflow_gateway,
    sflow_raw_header,
    tcp,
    udp,
    udp_frame,
    v9_options_template,
    v9_packet,
    v9_template,
)
from tests.unit.test_wire_v5 import v5

SETTINGS = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
SHARED = Path(
    os.environ.get("OVERFLOWD_SHARED") or Path(__file__).resolve().parents[2].parent / "shared"
)
TRACE = SHARED / "data" / "netflow_v5_simpleweb.pcap"
EXPORTER = "192.0.2.1"
SMALL = Limits(
    max_templates=16,
    max_pending_sets=8,
    max_pending_bytes=4096,
    max_sampling_entries=8,
    max_samplers_per_domain=4,
    max_exporters_tracked=8,
    address_cache_size=64,
)


def decode_ok(
    data: bytes, state: DecoderState | None = None, exporter: str = EXPORTER
) -> list[FlowRecord] | None:
    """The invariant: records (each valid) or DecodeError; None for the error."""
    state = state if state is not None else DecoderState()
    try:
        records = decode_datagram(data, exporter, state, 1_700_000_000.0)
    except DecodeError as exc:
        assert exc.fmt, "a DecodeError names its format"
        return None
    assert isinstance(records, list)
    for rec in records:
        assert isinstance(rec, FlowRecord)
        rec.validate()
        # Within what every consumer can carry: a report's 32-bit interval, and times that
        # datetime can render (`overflowd decode` prints each record).
        assert 1 <= rec.sampling_interval <= MAX_INTERVAL
        assert MIN_TIME_MS <= rec.first <= MAX_TIME_MS and MIN_TIME_MS <= rec.last <= MAX_TIME_MS
        format_record(rec)
    return records


def check_bounds(state: DecoderState) -> None:
    limits = state.limits
    stats = state.statistics()
    assert stats.templates <= limits.max_templates
    assert stats.pending_sets <= limits.max_pending_sets
    assert stats.pending_bytes <= limits.max_pending_bytes
    assert stats.sampling_entries <= limits.max_sampling_entries
    assert len(stats.exporters) <= limits.max_exporters_tracked + 1  # + "other"


# -- corpus: real and built datagrams -------------------------------------------------------

V4 = [
    IE(8, 4),
    IE(12, 4),
    IE(7, 2),
    IE(11, 2),
    IE(4, 1),
    IE(2, 4),
    IE(1, 4),
    IE(22, 4),
    IE(21, 4),
    IE(6, 1),
]
V4_VALUES = [IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), 1, 2, 6, 3, 4, 5, 6, 2]
VAR = [IE(27, 16), IE(28, 16), IE(82, VARIABLE), IE(1, 8, enterprise=9), IE(2, 2)]
VAR_VALUES = [
    IPv6Address("2001:db8::1"),
    IPv6Address("2001:db8::2"),
    b"ge-0/0/0" * 40,
    b"\1" * 8,
    7,
]


def built_datagrams() -> list[bytes]:
    opts = [IE(34, 4), IE(48, 1), IE(305, 4), IE(306, 4), IE(160, 8)]
    frame = ethernet(
        ipv6("2001:db8::a", "2001:db8::b", 6, tcp(443, 5, 0x12, b"x" * 200)), 0x86DD, vlans=[7]
    )
    frame4 = ethernet(ipv4("192.0.2.9", "192.0.2.8", 17, udp(53, 99, b"y" * 50)), 0x0800)
    return [
        v9_packet(
            [
                flowset(1, v9_options_template(300, [IE(1, 4)], opts)),
                flowset(300, record([IE(1, 4), *opts], [0, 10, 1, 1, 9, 5])),
                flowset(0, v9_template(256, V4)),
                flowset(256, record(V4, V4_VALUES) * 3),
            ],
            count=4,
        ),
        ipfix_message(
            [
                flowset(3, ipfix_options_template(300, [IE(149, 4)], opts)),
                flowset(300, record([IE(149, 4), *opts], [0, 10, 1, 1, 9, 5])),
                flowset(2, ipfix_template(256, V4) + ipfix_template(257, VAR)),
                flowset(256, record(V4, V4_VALUES) * 2),
                flowset(257, record(VAR, VAR_VALUES)),
                flowset(2, ipfix_withdrawal(256)),
            ]
        ),
        v5([{}, {"proto": 1, "sport": 0, "dport": 0x0800}], sampling=0x4000 | 100),
        sflow_datagram(
            [
                sflow_counter_sample(),
                sflow_flow_sample(
                    [sflow_raw_header(frame[:128], frame_length=300), sflow_gateway(1, [2, 3])],
                    rate=100,
                    expanded=True,
                ),
                sflow_flow_sample([sflow_raw_header(frame4, frame_length=96)], rate=7),
            ]
        ),
    ]


def trace_datagrams() -> list[bytes]:
    if not TRACE.is_file():
        pytest.fail(f"shared trace {TRACE} not found (set OVERFLOWD_SHARED)", pytrace=False)
    with open(TRACE, "rb") as source:
        return [d.payload for d in CaptureReader().udp_datagrams(source, port=9500)]


# -- any bytes ----------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=3000))
def test_any_bytes_give_records_or_decode_error(data: bytes) -> None:
    decode_ok(data)


VERSION_PREFIXES = [b"\x00\x05", b"\x00\x09", b"\x00\x0a", b"\x00\x00\x00\x05"]


@SETTINGS
@given(st.sampled_from(VERSION_PREFIXES), st.binary(max_size=3000))
def test_any_bytes_behind_a_known_version(prefix: bytes, rest: bytes) -> None:
    decode_ok(prefix + rest)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(built_datagrams())))
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data)


@SETTINGS
@given(mutated())
def test_mutated_datagrams(data: bytes) -> None:
    decode_ok(data)


@SETTINGS
@given(st.lists(st.binary(max_size=600).map(lambda b: b"\x00\x0a" + b) | mutated(), max_size=30))
def test_one_state_across_hostile_datagrams_stays_bounded(datagrams: Sequence[bytes]) -> None:
    state = DecoderState(limits=SMALL)
    for i, data in enumerate(datagrams):
        decode_ok(data, state, exporter=f"192.0.2.{i % 20}")
        check_bounds(state)


# -- extreme decoded values: floats and intervals that turn into arithmetic ----------------------

#: samplingProbability values that have broken decoders: 5e-324 (1/p is infinite, round()
#: raised OverflowError and the daemon exited), zero of both signs, NaN, infinities, huge.
EXTREME_FLOATS = [5e-324, 0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, -1e308]
SAMPLING_INTS = (34, 50, 305, 306, 309, 310)
TIME_ELEMENTS = (150, 151, 152, 153, 154, 155, 156, 157, 158, 159, 22, 21)
U64 = st.one_of(
    st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)


@st.composite
def extreme_datagrams(draw: st.DrawFn) -> bytes:
    """A v9 or IPFIX datagram whose options data and data record carry sampling values and
    times at the edges: IE 311 as a 4- or 8-byte float, intervals as 8-byte integers (zero,
    huge), 64-bit time elements and system init time; sometimes mutated after."""
    probability = draw(st.one_of(st.sampled_from(EXTREME_FLOATS), st.floats()))
    width = draw(st.sampled_from([4, 8]))
    ints = draw(st.lists(st.sampled_from(SAMPLING_INTS), unique=True, max_size=4))
    options = [IE(311, width), *(IE(e, 8) for e in ints), IE(160, 8)]
    option_values = [probability, *(draw(U64) for _ in ints), draw(U64)]
    times = draw(st.lists(st.sampled_from(TIME_ELEMENTS), unique=True, max_size=3))
    in_record = draw(st.lists(st.sampled_from([*SAMPLING_INTS, 311]), unique=True, max_size=3))
    fields = [*V4, *(IE(e, 8) for e in times)]
    values: list[object] = [*V4_VALUES, *(draw(U64) for _ in times)]
    for e in in_record:
        fields.append(IE(e, width if e == 311 else 8))
        values.append(draw(st.floats()) if e == 311 else draw(U64))
    data = record(fields, values)
    if draw(st.booleans()):
        scope = [IE(1, 4)]
        datagram = v9_packet(
            [
                flowset(0, v9_template(256, fields)),
                flowset(1, v9_options_template(300, scope, options)),
                flowset(300, record(scope + options, [0, *option_values])),
                flowset(256, data * draw(st.integers(1, 3))),
            ],
            unix_secs=draw(st.sampled_from([0, 1, 1_700_000_000, 2**32 - 1])),
            uptime_ms=draw(st.sampled_from([0, 2**31, 2**32 - 1])),
        )
    else:
        scope = [IE(149, 4)]
        datagram = ipfix_message(
            [
                flowset(3, ipfix_options_template(300, scope, options)),
                flowset(300, record(scope + options, [0, *option_values])),
                flowset(2, ipfix_template(256, fields)),
                flowset(256, data * draw(st.integers(1, 3))),
            ],
            export_time=draw(st.sampled_from([0, 1, 1_700_000_000, 2**32 - 1])),
        )
    buf = bytearray(datagram)
    for _ in range(draw(st.integers(0, 4))):
        buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
    return bytes(buf)


def _ipfix_probability(p: float) -> bytes:
    scope, options = [IE(149, 4)], [IE(311, 8)]
    return ipfix_message(
        [
            flowset(3, ipfix_options_template(300, scope, options)),
            flowset(300, record(scope + options, [0, p])),
            flowset(2, ipfix_template(256, V4)),
            flowset(256, record(V4, V4_VALUES)),
        ]
    )


@SETTINGS
@given(extreme_datagrams())
@example(_ipfix_probability(5e-324))
@example(_ipfix_probability(float("nan")))
def test_extreme_floats_intervals_and_times_decode_or_raise_decode_error(data: bytes) -> None:
    decode_ok(data)
    state = DecoderState()
    decode_ok(data, state)
    decode_ok(data, state)  # templates and options known: the data path with them


# -- truncated at every offset ---------------------------------------------------------------


def test_built_datagrams_truncated_at_every_offset() -> None:
    for data in built_datagrams():
        whole = decode_ok(data)
        assert whole, "the untruncated datagram decodes"
        primed = DecoderState()
        decode_ok(data, primed)  # templates known: truncation hits the data path too
        for cut in range(len(data)):
            decode_ok(data[:cut])
            decode_ok(data[:cut], primed)


def _truncate_all(datagrams: list[bytes]) -> tuple[int, int]:
    state = DecoderState()
    refused = decoded = 0
    for data in datagrams:
        for cut in range(len(data)):
            if decode_ok(data[:cut], state) is None:
                refused += 1
            else:
                decoded += 1
    return refused, decoded


#: one trace datagram in this many (plus the first and last of each header shape) is cut at
#: every offset in the ordinary run: 2,708 datagrams x ~1,400 offsets take ~20 s of two cores,
#: and every shape in the trace (record count, engine) is in the sample. ``make fuzz``
#: (HYPOTHESIS_PROFILE=fuzz) cuts every datagram.
TRACE_SAMPLE_STRIDE = 50


def _shape(data: bytes) -> tuple[int, ...]:
    """A v5 header's version, record count, engine type and id, and the datagram's length."""
    version, count = struct.unpack_from(">HH", data)
    return version, count, data[20], data[21], len(data)


def trace_sample(datagrams: list[bytes]) -> list[bytes]:
    """Every ``TRACE_SAMPLE_STRIDE``-th datagram, and the first and last of each shape."""
    picked = set(range(0, len(datagrams), TRACE_SAMPLE_STRIDE))
    first: dict[tuple[int, ...], int] = {}
    last: dict[tuple[int, ...], int] = {}
    for i, data in enumerate(datagrams):
        first.setdefault(_shape(data), i)
        last[_shape(data)] = i
    picked |= set(first.values()) | set(last.values())
    return [datagrams[i] for i in sorted(picked)]


def test_every_trace_datagram_truncated_at_every_offset() -> None:
    datagrams = trace_datagrams()
    assert len(datagrams) > 2000
    if os.environ.get("HYPOTHESIS_PROFILE", "").strip() != "fuzz":
        sample = trace_sample(datagrams)
        assert {_shape(d) for d in sample} == {_shape(d) for d in datagrams}
        datagrams = sample
    workers = max(1, min(8, os.cpu_count() or 1)) if len(datagrams) > 500 else 1
    if workers == 1:
        results = [_truncate_all(datagrams)]
    else:
        chunks = [datagrams[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_truncate_all, chunks))
    refused = sum(r for r, _ in results)
    decoded = sum(d for _, d in results)
    # A v5 datagram cut anywhere loses whole records: every cut is refused (the count in
    # the header promises more) except the empty-looking ones, which still raise.
    assert refused + decoded == sum(len(d) for d in datagrams)
    assert decoded == 0


# -- bounded memory under floods ---------------------------------------------------------------


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(1, 400), st.sampled_from([1, 2, 4, 8, 16, VARIABLE])),
            min_size=1,
            max_size=20,
        ),
        min_size=1,
        max_size=60,
    )
)
def test_flood_of_distinct_templates_stays_bounded(templates: list[list[tuple[int, int]]]) -> None:
    state = DecoderState(limits=SMALL)
    for i, fields in enumerate(templates):
        ies = [IE(e, n) for e, n in fields]
        message = ipfix_message(
            [flowset(2, ipfix_template(256 + i, ies)), flowset(5000 + i, bytes(40))], domain=i
        )
        decode_ok(message, state, exporter=f"198.51.100.{i % 50}")
        check_bounds(state)


def test_large_template_flood_keeps_counts_and_memory_bounded() -> None:
    import tracemalloc

    limits = Limits(max_templates=256, max_pending_sets=64, max_pending_bytes=64 * 1024)
    state = DecoderState(limits=limits)
    fields = [IE(8, 4), IE(12, 4), *[IE(100 + k, 4) for k in range(30)]]

    def flood(start: int, n: int) -> None:
        for i in range(start, start + n):
            message = ipfix_message(
                [
                    flowset(2, ipfix_template(256 + i % 60000, fields)),
                    flowset(300 + i % 60000, bytes(200)),
                ],
                domain=i,
            )
            decode_ok(message, state, exporter=f"10.0.{i % 200}.{i % 250}")

    flood(0, 1500)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    flood(1500, 4500)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    check_bounds(state)
    stats = state.statistics()
    assert stats.templates == 256
    assert stats.templates_evicted == 6000 - 256
    assert stats.pending_dropped >= 6000 - 64
    # Three times the traffic after the tables filled up: memory did not grow with it.
    assert after - before < 2 * 1024 * 1024, after - before


# -- capture files ---------------------------------------------------------------------------


def _capture_ok(data: bytes) -> None:
    reader = CaptureReader()
    try:
        for datagram in reader.udp_datagrams(data):
            assert isinstance(datagram.payload, bytes)
    except DecodeError:
        pass


@SETTINGS
@given(st.binary(max_size=2000))
def test_any_bytes_as_a_capture_file(data: bytes) -> None:
    _capture_ok(data)


@st.composite
def mutated_capture(draw: st.DrawFn) -> bytes:
    frames = [
        (1.0, udp_frame("192.0.2.1", "192.0.2.2", 1, 2, b"abc" * 30)),
        (2.0, udp_frame("2001:db8::1", "2001:db8::2", 1, 2, b"d" * 10)),
    ]
    data = bytearray(draw(st.sampled_from([pcap_file(frames), pcapng_file(frames)])))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


@SETTINGS
@given(mutated_capture())
def test_mutated_capture_files(data: bytes) -> None:
    _capture_ok(data)


def test_capture_truncated_at_every_offset() -> None:
    frames = [(1.0, udp_frame("192.0.2.1", "192.0.2.2", 1, 2, d)) for d in built_datagrams()]
    for capture in (pcap_file(frames), pcapng_file(frames)):
        for cut in range(len(capture)):
            _capture_ok(capture[:cut])


def test_header_sizes_used_above() -> None:
    assert struct.calcsize("!HHIIII") == 20  # keeps the encoder honest about v9 headers
