"""Template churn across a batch: the array path and the scalar path, datagram by datagram.

Streams of generated v9/IPFIX datagrams from two exporters, two observation domains / source
ids, with the same template ids in both formats, each id announced with two different
layouts (different record lengths), re-announced, withdrawn (IPFIX), its data sent before
its template (held), options templates and options data announcing sampling intervals and
system init times between data sets, broken set headers and lengths. Cut into batches of
every size, ``decode_template_batch`` must give what ``decode_datagram_rows`` gives one
datagram at a time: rows in order (so the template and sampling in force when each record
arrived), refusals, statistics, template cache contents and recency, and each record's
sampling probability.

Bounded: ``max_examples`` 120 in the suite (a few seconds); ``OVERFLOWD_CHURN_EXAMPLES``
asks for more (e.g. 5000 for a long run). Derandomized under ``CI=true`` by the profile.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from overflowd.errors import DecodeError
from overflowd.flows import FlowRow
from overflowd.flowsample import SamplingPolicy, probability
from overflowd.flowsample_batch import BatchSampler
from overflowd.wire import DecoderState
from overflowd.wire.template_batch import decode_template_batch
from overflowd.wire.templates import Limits
from tests.unit.test_template_batch import Datagram, assert_equivalent, same_errors, scalar

EXAMPLES = int(os.environ.get("OVERFLOWD_CHURN_EXAMPLES", "120"))
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

EXPORTERS = ("192.0.2.1", "192.0.2.2")
#: Two layouts per template id: array-decodable, different record lengths (and time kinds).
LAYOUTS = (
    ((8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (6, 1), (2, 4), (1, 4), (22, 4), (21, 4)),
    ((8, 4), (12, 4), (2, 8), (1, 8), (4, 1), (7, 2), (152, 8), (153, 8), (10, 2)),
    ((8, 4), (12, 4), (2, 4)),  # no times: the export time
)
TEMPLATE_IDS = (256, 257)
OPTIONS_ID = 300
#: samplingInterval (34), systemInitTimeMilliseconds (160) behind one scope field.
OPTIONS_FIELDS = ((34, 4), (160, 8))


def _set(set_id: int, body: bytes, pad: bool = True) -> bytes:
    if pad:
        body += b"\0" * (-len(body) % 4)
    return struct.pack("!HH", set_id, 4 + len(body)) + body


def _template(template_id: int, fields: tuple[tuple[int, int], ...]) -> bytes:
    return struct.pack("!HH", template_id, len(fields)) + b"".join(
        struct.pack("!HH", e, n) for e, n in fields
    )


def _options_template(ipfix: bool) -> bytes:
    if ipfix:
        fields = ((1, 4), *OPTIONS_FIELDS)  # scope: observation point id... any element
        return struct.pack("!HHH", OPTIONS_ID, len(fields), 1) + b"".join(
            struct.pack("!HH", e, n) for e, n in fields
        )
    scope = struct.pack("!HH", 1, 4)  # scope type System
    options = b"".join(struct.pack("!HH", e, n) for e, n in OPTIONS_FIELDS)
    return struct.pack("!HHH", OPTIONS_ID, len(scope), len(options)) + scope + options


@st.composite
def a_set(draw: st.DrawFn, ipfix: bool) -> bytes:
    kind = draw(
        st.sampled_from(
            ["template", "template", "data", "data", "data", "options_template", "options",
             "withdraw", "reserved", "broken"]
        )
    )  # fmt: skip
    tid = draw(st.sampled_from(TEMPLATE_IDS))
    # Mostly each id's usual layout (refreshes, data that fits), sometimes another one.
    usual = LAYOUTS[0] if tid == 256 else LAYOUTS[2]
    layout = usual if draw(st.integers(0, 3)) else draw(st.sampled_from(LAYOUTS))
    if kind == "template":
        return _set(2 if ipfix else 0, _template(tid, layout))
    if kind == "data":
        size = sum(n for _, n in layout) if draw(st.integers(0, 4)) else draw(st.integers(1, 50))
        count = draw(st.integers(0, 4))
        body = draw(st.binary(min_size=size * count, max_size=size * count + 6))
        return _set(tid, body, pad=draw(st.booleans()))
    if kind == "options_template":
        return _set(3 if ipfix else 1, _options_template(ipfix))
    if kind == "options":
        interval = draw(st.sampled_from([0, 1, 10, 100, 4096]))
        init = draw(st.sampled_from([0, 1_600_000_000_000, 2**63 + 5]))
        return _set(OPTIONS_ID, struct.pack("!IIQ", 0, interval, init))
    if kind == "withdraw":
        if not ipfix:
            return b""
        which = draw(st.sampled_from([tid, 2]))
        return _set(2, struct.pack("!HH", which, 0))
    if kind == "reserved":
        return _set(draw(st.sampled_from([4, 255, 1 if ipfix else 2])), b"\0\0\0\0")
    # A set header whose length is 0, 3, odd, or runs past the datagram.
    length = draw(st.sampled_from([0, 3, 5, 9, 4000]))
    return struct.pack("!HH", tid, length) + draw(st.binary(max_size=8))


@st.composite
def datagrams(draw: st.DrawFn) -> Datagram:
    ipfix = draw(st.booleans())
    sets = b"".join(draw(st.lists(a_set(ipfix), min_size=0, max_size=4)))
    domain = draw(st.sampled_from([0, 0, 0, 1]))
    secs = draw(st.sampled_from([1_600_000_000, 1_600_000_100, 5]))
    seq = draw(st.integers(0, 3))
    if ipfix:
        data = struct.pack("!HHIII", 10, 16 + len(sets), secs, seq, domain) + sets
    else:
        uptime = draw(st.sampled_from([0, 1000, 2**32 - 1]))
        data = struct.pack("!HHIIII", 9, 1, uptime, secs, seq, domain) + sets
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    exporter = draw(st.sampled_from((*EXPORTERS, EXPORTERS[0])))
    return data, exporter, float(secs)


@st.composite
def streams(draw: st.DrawFn) -> list[Datagram]:
    out = draw(st.lists(datagrams(), min_size=1, max_size=14))
    if draw(st.integers(0, 2)):
        # Most streams start as an exporter does: the usual templates and options first,
        # so that later datagrams reach the array path (and its memos) before churn.
        teach: list[Datagram] = []
        for ipfix in (False, True):
            sets = _set(2 if ipfix else 0, _template(256, LAYOUTS[0]) + _template(257, LAYOUTS[2]))
            sets += _set(3 if ipfix else 1, _options_template(ipfix))
            for exporter in draw(st.sets(st.sampled_from(EXPORTERS), min_size=1)):
                teach.append(((_ipfix if ipfix else _v9)(sets), exporter, 0.0))
        out = teach + out
    # Arrival times mostly a second apart; sometimes past the held data's age limit, or
    # backwards (a pcap replay of several files).
    steps = draw(
        st.lists(
            st.sampled_from([1.0] * 6 + [0.0, 700.0, -1300.0]), min_size=len(out), max_size=len(out)
        )
    )
    times = [1000.0 + sum(steps[: i + 1]) for i in range(len(out))]
    return [(data, exporter, now) for (data, exporter, _), now in zip(out, times, strict=True)]


def _probabilities_match(stream: list[Datagram], batch_size: int) -> None:
    policy = SamplingPolicy(rate=1e-2)
    state = DecoderState()
    for start in range(0, len(stream), batch_size):
        batch = decode_template_batch(stream[start : start + batch_size], state)
        if not len(batch):
            continue
        rows = batch.rows(np.arange(len(batch)))
        expected = np.array([probability(r, policy) for r in rows])
        got = BatchSampler(policy, np.random.default_rng(0)).probabilities(batch)
        assert np.array_equal(got, expected)


@SETTINGS
@given(streams(), st.integers(1, 6))
def test_template_churn_decodes_the_same_either_way(stream: list[Datagram], size: int) -> None:
    assert_equivalent(stream, batch_size=size)
    _probabilities_match(stream, size)


def _v9(sets: bytes, domain: int = 0, secs: int = 1_600_000_000) -> bytes:
    return struct.pack("!HHIIII", 9, 1, 1000, secs, 0, domain) + sets


def _ipfix(sets: bytes, domain: int = 0, secs: int = 1_600_000_000) -> bytes:
    return struct.pack("!HHIII", 10, 16 + len(sets), secs, 0, domain) + sets


def _records(layout: tuple[tuple[int, int], ...], n: int, seed: int) -> bytes:
    size = sum(length for _, length in layout)
    return bytes((seed * 7 + i * 13) % 251 for i in range(size * n))


def test_a_template_changed_mid_batch_is_used_from_then_on() -> None:
    """Datagram k changes template 256's layout; k+1's data decodes with the new one, on
    either path and whatever the batch cut (the memo of set id -> layout is not stale)."""
    a, b = LAYOUTS[0], LAYOUTS[1]
    exporter = EXPORTERS[0]
    stream: list[Datagram] = []
    for i, layout in enumerate((a, b, a, b)):
        stream.append((_v9(_set(0, _template(256, layout))), exporter, float(2 * i)))
        stream.append((_v9(_set(256, _records(layout, 3, i))), exporter, float(2 * i + 1)))
        stream.append((_ipfix(_set(2, _template(256, layout))), exporter, float(2 * i)))
        stream.append((_ipfix(_set(256, _records(layout, 2, i))), exporter, float(2 * i + 1)))
    for size in (1, 2, 3, 16):
        assert_equivalent(stream, batch_size=size)


def test_same_template_id_from_two_domains_and_exporters() -> None:
    stream: list[Datagram] = []
    for domain, exporter, layout in (
        (0, EXPORTERS[0], LAYOUTS[0]),
        (1, EXPORTERS[0], LAYOUTS[1]),
        (0, EXPORTERS[1], LAYOUTS[2]),
    ):
        stream.append((_v9(_set(0, _template(256, layout)), domain), exporter, 0.0))
    for n in range(6):
        for domain, exporter, layout in (
            (0, EXPORTERS[0], LAYOUTS[0]),
            (1, EXPORTERS[0], LAYOUTS[1]),
            (0, EXPORTERS[1], LAYOUTS[2]),
        ):
            body = _set(256, _records(layout, 2, n))
            stream.append((_v9(body, domain), exporter, 1.0 + n))
    for size in (1, 4, 64):
        assert_equivalent(stream, batch_size=size)


def test_options_data_between_data_sets_of_one_datagram() -> None:
    """Sampling announced between two data sets of a datagram applies to the second only,
    and to what follows in the batch."""
    layout = LAYOUTS[0]
    exporter = EXPORTERS[0]
    teach = _ipfix(_set(2, _template(256, layout)) + _set(3, _options_template(True)))

    def options(interval: int) -> bytes:
        return _set(OPTIONS_ID, struct.pack("!IIQ", 0, interval, 1_600_000_000_000))

    stream: list[Datagram] = [(teach, exporter, 0.0)]
    for n, interval in enumerate((10, 100, 0, 4096)):
        sets = _set(256, _records(layout, 2, n)) + options(interval)
        sets += _set(256, _records(layout, 2, n + 1))
        stream.append((_ipfix(sets), exporter, 1.0 + n))
        stream.append((_ipfix(_set(2, _template(256, layout)) + sets), exporter, 1.5 + n))
    for size in (1, 2, 64):
        assert_equivalent(stream, batch_size=size)
        _probabilities_match(stream, size)


# Found while writing the above (kept as examples for CI).
test_template_churn_decodes_the_same_either_way = example(
    stream=[
        (_ipfix(_set(2, _template(256, LAYOUTS[0]))), EXPORTERS[0], 0.0),
        (_ipfix(_set(256, _records(LAYOUTS[0], 2, 1))), EXPORTERS[0], 1.0),
    ],
    size=1,
)(test_template_churn_decodes_the_same_either_way)


def _fields(fields: tuple[tuple[int, int, int], ...]) -> bytes:
    out = b""
    for element, length, pen in fields:
        out += struct.pack("!HH", element | (0x8000 if pen else 0), length)
        out += struct.pack("!I", pen) if pen else b""
    return out


@pytest.mark.parametrize(
    "fields",
    [
        ((8, 4, 0), (12, 4, 0), (2, 4, 0), (1, 4, 9), (7, 2, 0), (1, 4, 0)),  # enterprise
        ((8, 4, 5), (8, 4, 0), (12, 4, 0), (2, 4, 0)),  # enterprise element 8 first
        ((8, 4, 0), (0, 0, 0), (12, 4, 0), (2, 4, 0)),  # a zero-length filler
        ((8, 4, 0), (8, 4, 0), (12, 4, 0), (2, 4, 0)),  # the source twice: the first wins
        ((8, 4, 0), (12, 4, 0), (4, 1, 0), (7, 2, 0), (11, 2, 0), (32, 2, 0), (2, 4, 0)),
        ((8, 4, 0), (12, 4, 0), (4, 1, 0), (7, 2, 0), (139, 2, 0), (176, 1, 0), (177, 1, 0)),
    ],
    ids=["enterprise", "enterprise-src", "zero-length", "src-twice", "icmp", "icmp-v6-type"],
)
def test_odd_fixed_templates_stay_on_the_array_path_and_agree(
    fields: tuple[tuple[int, int, int], ...],
) -> None:
    """Enterprise fields (skipped as padding), zero-length fillers, a repeated element, ICMP
    type/code elements: array-decoded, equal to the scalar path, padding and all."""
    size = sum(length for _, length, _ in fields)
    template = _set(2, struct.pack("!HH", 256, len(fields)) + _fields(fields))
    data = [
        _ipfix(_set(256, bytes((i * 37 + k) % 256 for i in range(size * 5 + 3)))) for k in range(4)
    ]
    both = _ipfix(template + _set(256, bytes(range(size * 2))))
    stream: list[Datagram] = [(_ipfix(template), EXPORTERS[0], 0.0)]
    stream += [(d, EXPORTERS[0], 1.0) for d in data] + [(both, EXPORTERS[0], 2.0)]
    stream += [(d, EXPORTERS[0], 3.0) for d in data]
    for size_ in (1, 3, 64):
        batch = assert_equivalent(stream, batch_size=size_)
    assert batch.scalar == () and len(batch) == 8 * 5 + 2


#: Every table at its smallest, so that the churn evicts templates (by domain, exporter,
#: count), refuses announcements (per datagram, by rate), drops held data and sampling
#: entries, and counts exporters under "other": the two paths must still agree.
TIGHT = Limits(
    max_templates=3,
    max_templates_per_exporter=2,
    max_templates_per_domain=1,
    max_templates_per_datagram=1,
    template_learn_rate_per_s=0.5,
    template_learn_burst=3,
    max_template_exporters=1,
    max_pending_sets=2,
    max_pending_sets_per_exporter=1,
    max_replayed_records_per_datagram=1,
    pending_max_age_s=30.0,
    max_sampling_entries=1,
    max_samplers_per_domain=1,
    max_exporters_tracked=1,
)


def _equivalent_under(stream: list[Datagram], batch_size: int) -> None:
    """``assert_equivalent`` with TIGHT limits and an interval override for one exporter."""
    overrides = {EXPORTERS[1]: 7}
    scalar_state = DecoderState(limits=TIGHT, overrides=overrides)
    batch_state = DecoderState(limits=TIGHT, overrides=overrides)
    expected, expected_errors = scalar(stream, scalar_state)
    rows: list[FlowRow] = []
    errors: list[tuple[int, DecodeError]] = []
    for start in range(0, len(stream), batch_size):
        batch = decode_template_batch(stream[start : start + batch_size], batch_state)
        assert batch.failures == ()
        rows.extend(batch.all_rows_in_order())
        errors.extend((start + i, e) for i, e in batch.errors)
    assert rows == expected
    same_errors(errors, expected_errors)
    assert batch_state.statistics() == scalar_state.statistics()
    assert batch_state.templates.keys() == scalar_state.templates.keys()


@SETTINGS
@given(streams(), st.integers(1, 6))
def test_template_churn_under_tight_limits(stream: list[Datagram], size: int) -> None:
    _equivalent_under(stream, size)


def test_remembered_refresh_and_options_bytes_do_not_outlive_a_template_change() -> None:
    """Template and options sets are remembered by their bytes while the exporter's
    templates stay the same: the same bytes after a change of template 256 (to another
    layout and back) or of the options template (to other fields) must be judged anew —
    a refresh of the old layout is then a changed template, options data of the old
    length decodes to other values — and the counts (refreshes, options records) and
    recency must stay the scalar path's."""
    exporter = EXPORTERS[0]
    other_options = _set(
        3,
        struct.pack("!HHH", OPTIONS_ID, 2, 1) + struct.pack("!HHHH", 1, 4, 160, 12),
    )
    for ipfix in (False, True):
        wrap = _ipfix if ipfix else _v9
        tset = 2 if ipfix else 0
        oset = 3 if ipfix else 1
        refresh = _set(tset, _template(256, LAYOUTS[0]) + _template(257, LAYOUTS[2]))
        announce = _set(oset, _options_template(ipfix))
        stream: list[Datagram] = [(wrap(refresh + announce), exporter, 0.0)]
        for n, interval in enumerate((100, 10, 100)):
            # Other options bytes, then the first ones again, on the array path.
            options = _set(OPTIONS_ID, struct.pack("!IIQ", 0, interval, 1_600_000_000_000))
            softflowd_like = refresh + announce + options
            data = _set(256, _records(LAYOUTS[0], 3, n)) + _set(257, _records(LAYOUTS[2], 1, n))
            stream.append((wrap(softflowd_like + data), exporter, 1.0 + n))
            stream.append((wrap(data), exporter, 1.5 + n))
        # 256 changes: the old refresh bytes are a change back, not a refresh.
        stream.append((wrap(_set(tset, _template(256, LAYOUTS[1]))), exporter, 5.0))
        stream.append((wrap(softflowd_like + data), exporter, 6.0))
        stream.append((wrap(data + options), exporter, 6.5))
        # The options template changes: the same options bytes read other fields.
        stream.append((wrap(refresh + (other_options if ipfix else b"")), exporter, 7.0))
        stream.append((wrap(data + options + data), exporter, 8.0))
        stream.append((wrap(refresh + options + data), exporter, 9.0))
        for size in (1, 2, 3, 5, 64):
            assert_equivalent(stream, batch_size=size)


def test_what_a_batch_remembers_is_dropped_when_the_state_decodes_anything_else() -> None:
    """The next batch over a state starts from what the last one knew of the templates
    (refresh and options bytes seen) only if no datagram was decoded since: here template
    256 and the options template change through ``decode_datagram_rows`` between two batches,
    and the second batch's old refresh bytes and old options bytes must be judged anew —
    as the scalar path, datagram by datagram, judges them."""
    exporter = EXPORTERS[0]
    for ipfix in (False, True):
        wrap = _ipfix if ipfix else _v9
        tset, oset = (2, 3) if ipfix else (0, 1)
        refresh = _set(tset, _template(256, LAYOUTS[0]) + _template(257, LAYOUTS[2]))
        announce = _set(oset, _options_template(ipfix))
        options = _set(OPTIONS_ID, struct.pack("!IIQ", 0, 100, 1_600_000_000_000))
        data = _set(256, _records(LAYOUTS[0], 3, 1)) + _set(257, _records(LAYOUTS[2], 1, 1))
        softflowd_like = wrap(refresh + announce + options + data)
        first = [(wrap(refresh + announce), exporter, 0.0), (softflowd_like, exporter, 1.0)]
        first += [(wrap(data), exporter, 1.5), (softflowd_like, exporter, 2.0)]
        other_options = struct.pack("!HHH", OPTIONS_ID, 2, 1) + struct.pack("!HHHH", 1, 4, 34, 12)
        if not ipfix:
            scope, fields = struct.pack("!HH", 1, 4), struct.pack("!HH", 34, 12)
            other_options = struct.pack("!HHH", OPTIONS_ID, 4, 4) + scope + fields
        between = (wrap(_set(tset, _template(256, LAYOUTS[1])) + _set(oset, other_options)),)
        second = [(softflowd_like, exporter, 4.0), (wrap(data + options), exporter, 5.0)]
        second += [(softflowd_like, exporter, 6.0)]

        reference = DecoderState()
        stream = [*first, (between[0], exporter, 3.0), *second]
        expected, expected_errors = scalar(stream, reference)
        state = DecoderState()
        rows: list[FlowRow] = []
        errors: list[tuple[int, DecodeError]] = []
        batch = decode_template_batch(first, state)
        rows += batch.all_rows_in_order()
        errors += batch.errors
        rows += scalar([(between[0], exporter, 3.0)], state)[0]
        batch = decode_template_batch(second, state)
        rows += batch.all_rows_in_order()
        errors += [(len(first) + 1 + i, e) for i, e in batch.errors]
        assert rows == expected
        same_errors(errors, expected_errors)
        assert state.statistics() == reference.statistics()
        assert state.templates.keys() == reference.templates.keys()
