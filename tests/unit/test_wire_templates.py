"""NetFlow v9 / IPFIX template state under attack and under real exporters' quirks, through
the interface a sender reaches: ``decode_datagram`` with one ``DecoderState``, on datagrams
built by the independent encoder in test_wire_encoder.py.

Work: re-announcements are free, learning is rate-limited per exporter (on the injected
``now``), per datagram and in total. Memory: the cache's bytes (estimated per template and
checked here with tracemalloc) stay under ``Limits.max_template_bytes``. Fairness: one
source's churn never costs another exporter its templates. Quirks: zero-length fields
(Juniper's System scope, element 0 of length 0) decode instead of costing the datagram.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd.flows import FlowRecord
from overflowd.wire import DecoderState, Limits, decode_datagram, decode_datagram_rows
from overflowd.wire import templates as templates_module
from tests.support.heap import own_objects_only
from tests.unit.test_wire_encoder import (
    IE,
    VARIABLE,
    flowset,
    ipfix_message,
    ipfix_options_template,
    ipfix_template,
    ipfix_withdrawal,
    record,
    v9_options_template,
    v9_packet,
    v9_template,
)

REAL = "192.0.2.50"
CHURNER = "198.51.100.66"
T0 = 1_700_000_100.0

V4 = [
    IE(8, 4),
    IE(12, 4),
    IE(7, 2),
    IE(11, 2),
    IE(4, 1),
    IE(2, 4),
    IE(1, 4),
    IE(6, 1),
    IE(5, 1),
    IE(22, 4),
    IE(21, 4),
]


def v4_values(i: int = 0) -> list[Any]:
    return [
        IPv4Address("198.51.100.7") + i,
        IPv4Address("203.0.113.9"),
        1000 + i,
        80,
        6,
        5,
        500,
        0x02,
        0,
        95_000,
        99_000,
    ]


def decode(
    data: bytes, state: DecoderState, exporter: str = REAL, now: float = T0
) -> list[FlowRecord]:
    records = decode_datagram(data, exporter, state, now)
    for rec in records:
        rec.validate()
    return records


def tiny_templates(first_id: int, count: int, element: int = 1) -> bytes:
    """One template set of ``count`` one-field templates: 8 bytes each on the wire."""
    return flowset(0, b"".join(v9_template(first_id + k, [IE(element, 4)]) for k in range(count)))


def real_exporter_templates(count: int = 10) -> bytes:
    return v9_packet([flowset(0, b"".join(v9_template(256 + k, V4) for k in range(count)))])


def real_exporter_data(count: int = 10) -> bytes:
    return v9_packet([flowset(256 + k, record(V4, v4_values(k))) for k in range(count)])


def churn(n: int, fields: Sequence[IE] = V4[:4]) -> bytes:
    """The n-th datagram of a source that announces 20 never-seen templates each time."""
    body = b"".join(v9_template(256 + (n * 20 + k) % 65280, fields) for k in range(20))
    return v9_packet([flowset(0, body)], sequence=n)


def compiled(state: DecoderState) -> int:
    stats = state.statistics()
    return stats.templates_learned + stats.templates_updated


# -- fairness: another source's churn --------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="default"),
        # The churner may hold the whole cache: eviction must still pick it, not the real one.
        pytest.param({"max_templates": 64, "max_templates_per_exporter": 4096}, id="small-cache"),
        pytest.param(
            {"max_template_bytes": 256 * 1024, "max_templates_per_exporter": 4096}, id="by-bytes"
        ),
    ],
)
def test_churn_from_a_second_exporter_costs_the_real_exporter_no_records(
    kwargs: dict[str, Any],
) -> None:
    limits = Limits(**kwargs)
    state = DecoderState(limits=limits)
    assert decode(real_exporter_templates(), state) == []
    assert len(decode(real_exporter_data(), state)) == 10
    # 6000 distinct templates in 3 s from one other address, more than the default cache
    # holds; the real exporter uses its templates every 2.5 s (5000 churned templates apart).
    lost = 0
    for n in range(300):
        now = T0 + n * 0.01
        decode(churn(n), state, CHURNER, now)
        if n % 250 == 249:
            lost += 10 - len(decode(real_exporter_data(), state, now=now))
    assert lost == 0
    assert len(decode(real_exporter_data(), state, now=T0 + 3)) == 10
    assert state.templates.exporter_templates(REAL) == 10
    stats = state.statistics()
    assert stats.pending_sets == 0
    assert stats.templates <= limits.max_templates
    assert stats.template_bytes <= limits.max_template_bytes


def test_fair_eviction_takes_from_the_biggest_exporter() -> None:
    limits = Limits(max_templates=30, max_templates_per_exporter=4096)
    state = DecoderState(limits=limits)
    decode(real_exporter_templates(10), state)
    for n in range(5):
        decode(churn(n), state, CHURNER)
    # 10 + 100 announced, 30 held: the churner gave up 80, the real exporter nothing.
    assert state.templates.exporter_templates(REAL) == 10
    assert state.templates.exporter_templates(CHURNER) == 20
    assert state.statistics().templates_evicted_by_reason["count"] == 80
    # A third exporter still gets in; again the biggest (the churner) pays.
    decode(real_exporter_templates(10), state, "192.0.2.77")
    assert state.templates.exporter_templates("192.0.2.77") == 10
    assert state.templates.exporter_templates(REAL) == 10
    assert state.templates.exporter_templates(CHURNER) == 10


# -- work: tiny templates, churn, spoofed sources ----------------------------------------------


def test_flood_of_tiny_templates_is_bounded_in_templates_compiled_per_second() -> None:
    limits = Limits()
    state = DecoderState(limits=limits)
    seconds = 20
    # 50 datagrams/s, each of 170 new one-field templates (8 bytes each), ids cycling.
    per_s = 50
    for n in range(seconds * per_s):
        first = 256 + (n * 170) % 65000
        packet = v9_packet([tiny_templates(first, 170, element=1 + n % 2)], sequence=n)
        decode(packet, state, CHURNER, T0 + n / per_s)
    learned = compiled(state)
    announced = seconds * per_s * 170
    assert learned < announced / 100
    bound = limits.template_learn_burst + limits.template_learn_rate_per_s * seconds
    assert learned <= bound
    assert learned >= bound - limits.max_templates_per_datagram  # the bucket, not an accident
    stats = state.statistics()
    assert stats.templates_dropped_by_reason["exporter_rate"] > 0.99 * announced
    # Every announcement accounted for: compiled, dropped by reason, or (ids recur with the
    # same layout) recognised as a re-announcement.
    assert learned + stats.templates_dropped + stats.templates_refreshed == announced
    assert stats.templates <= limits.max_templates_per_exporter


def test_rate_limit_follows_the_injected_clock() -> None:
    limits = Limits(template_learn_burst=4, template_learn_rate_per_s=2.0)
    state = DecoderState(limits=limits)
    decode(v9_packet([tiny_templates(256, 10)]), state, now=T0)
    assert compiled(state) == 4
    decode(v9_packet([tiny_templates(256, 10)]), state, now=T0 + 1.0)  # 2 more tokens
    assert compiled(state) == 6
    decode(v9_packet([tiny_templates(256, 10)]), state, now=T0 + 0.5)  # clock went back
    assert compiled(state) == 6
    decode(v9_packet([tiny_templates(256, 10)]), state, now=T0 + 1.5)  # refills from T0 + 0.5
    assert compiled(state) == 8
    assert state.statistics().templates_dropped_by_reason["exporter_rate"] == 6 + 4 + 4 + 2


def test_spoofed_sources_are_bounded_by_the_total_bucket() -> None:
    limits = Limits()
    state = DecoderState(limits=limits)
    seconds = 10
    for n in range(seconds * 100):
        # A fresh source address every datagram: each would start with a full bucket.
        exporter = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        packet = v9_packet([tiny_templates(256, 120)], sequence=n)
        decode(packet, state, exporter, T0 + n / 100)
    cost = 16 + 1  # TEMPLATE_WORK + one field
    bound = (limits.template_work_burst + limits.template_work_rate_per_s * seconds) / cost
    assert compiled(state) <= bound
    assert state.statistics().templates_dropped_by_reason["total_rate"] > 0


def test_templates_compiled_per_datagram_are_capped() -> None:
    limits = Limits()
    state = DecoderState(limits=limits)
    cap = limits.max_templates_per_datagram
    packet = v9_packet([tiny_templates(256, cap + 72)])
    decode(packet, state)
    stats = state.statistics()
    assert stats.templates == cap
    assert stats.templates_dropped_by_reason["datagram_cap"] == 72
    decode(packet, state, now=T0 + 1)  # the next datagram learns the rest, refreshes the others
    stats = state.statistics()
    assert stats.templates == cap + 72
    assert stats.templates_refreshed == cap


def test_identical_reannouncement_is_free_even_when_the_bucket_is_empty() -> None:
    limits = Limits(template_learn_burst=10, template_learn_rate_per_s=0.001)
    state = DecoderState(limits=limits)
    announce = real_exporter_templates(10)
    decode(announce, state)
    key = ("netflow-v9", REAL, 0, 256)
    first = state.templates.get(key)
    for n in range(1000):
        decode(announce, state, now=T0 + n)
    stats = state.statistics()
    # Compared by bytes: never admitted, so never rate-limited, never recompiled.
    assert (stats.templates_learned, stats.templates_refreshed, stats.templates_dropped) == (
        10,
        10_000,
        0,
    )
    assert state.templates.get(key) is first
    assert len(decode(real_exporter_data(), state)) == 10
    # Same for IPFIX, options templates included.
    state = DecoderState(limits=limits)
    ipfix = ipfix_message(
        [
            flowset(2, ipfix_template(256, V4)),
            flowset(3, ipfix_options_template(300, [IE(149, 4)], [IE(34, 4)])),
        ]
    )
    decode(ipfix, state)
    for n in range(100):
        decode(ipfix, state, now=T0 + n)
    stats = state.statistics()
    assert (stats.templates_learned, stats.templates_refreshed) == (2, 200)


def test_a_change_that_is_dropped_takes_the_stale_template_with_it() -> None:
    limits = Limits(template_learn_burst=1, template_learn_rate_per_s=0.01)
    state = DecoderState(limits=limits)
    decode(v9_packet([flowset(0, v9_template(256, V4))]), state)
    changed = [IE(12, 4), IE(8, 4), *V4[2:]]  # addresses swapped
    decode(v9_packet([flowset(0, v9_template(256, changed))]), state)
    stats = state.statistics()
    assert stats.templates_dropped_by_reason["exporter_rate"] == 1
    assert stats.templates_evicted_by_reason["superseded"] == 1
    # Data in the new layout is held for the new template, not read with the old one.
    data = v9_packet([flowset(256, record(changed, v4_values()))])
    assert decode(data, state) == []
    assert state.statistics().pending_sets == 1
    [r] = decode(v9_packet([flowset(0, v9_template(256, changed))]), state, now=T0 + 100)
    assert (str(r.src), str(r.dst)) == ("203.0.113.9", "198.51.100.7")


def test_domain_and_exporter_caps_evict_the_sources_own_oldest() -> None:
    limits = Limits(max_templates_per_domain=5, max_templates_per_exporter=8)
    state = DecoderState(limits=limits)
    decode(v9_packet([tiny_templates(256, 7)], source_id=1), state)
    assert state.statistics().templates_evicted_by_reason["domain_cap"] == 2
    decode(v9_packet([tiny_templates(256, 5)], source_id=2), state)
    stats = state.statistics()
    assert stats.templates == 8
    assert stats.templates_evicted_by_reason["exporter_cap"] == 2
    # Domain 1 gave up 256 and 257 to its own cap, then 258 and 259 (the exporter's oldest)
    # to the exporter's cap when domain 2 came.
    held = sorted(k[2:] for k in state.templates)
    assert held == [(1, 260), (1, 261), (1, 262), *((2, i) for i in range(256, 261))]
    assert state.templates.exporter_templates(REAL) == 8


def test_withdraw_all_takes_only_that_domains_templates_of_that_kind() -> None:
    state = DecoderState()
    learn = [
        flowset(2, ipfix_template(256, V4) + ipfix_template(257, V4)),
        flowset(3, ipfix_options_template(300, [IE(149, 4)], [IE(34, 4)])),
    ]
    decode(ipfix_message(learn, domain=1), state)
    decode(ipfix_message(learn, domain=2), state)
    decode(ipfix_message([flowset(2, ipfix_withdrawal(2))], domain=1), state)
    keys = state.templates
    assert sorted(k[2:] for k in keys) == [(1, 300), (2, 256), (2, 257), (2, 300)]
    decode(ipfix_message([flowset(3, ipfix_withdrawal(3))], domain=1), state)
    assert sorted(k[2:] for k in state.templates) == [(2, 256), (2, 257), (2, 300)]
    assert state.statistics().templates_withdrawn == 3


# -- memory: bytes held, against the cap and against tracemalloc ----------------------------


def _bytes_held_by_cache(state: DecoderState) -> int:
    """Bytes freed when the cache goes (tracemalloc must be tracing; inside
    ``own_objects_only``, or each collection scans the whole session's heap)."""
    cache = state.templates
    state.templates = None  # type: ignore[assignment]
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    del cache
    gc.collect()
    return before - tracemalloc.get_traced_memory()[0]


def test_flood_of_large_templates_stays_under_the_byte_cap() -> None:
    limits = Limits()
    wide = [IE(1 + k % 400, 4) for k in range(limits.max_template_fields)]
    with own_objects_only():
        gc.collect()
        tracemalloc.start()
        try:
            state = DecoderState(limits=limits)
            for n in range(250):
                packet = v9_packet([flowset(0, v9_template(256 + n, wide))])
                decode(packet, state, f"10.0.{n >> 8}.{n & 255}", T0 + n)
            stats = state.statistics()
            estimate = stats.template_bytes
            held = _bytes_held_by_cache(state)
        finally:
            tracemalloc.stop()
    assert stats.templates_evicted_by_reason["bytes"] > 0
    assert estimate <= limits.max_template_bytes
    assert held <= limits.max_template_bytes, held
    assert abs(held - estimate) <= 0.1 * held, (held, estimate)


def test_footprint_estimate_matches_tracemalloc_for_every_kind_of_template() -> None:
    shapes: list[list[IE]] = [
        [IE(1, 4)],
        V4,
        [IE(27, 16), IE(28, 16), IE(7, 2), IE(11, 2), IE(4, 1), IE(2, 8), IE(1, 8)],
        [*V4, IE(82, VARIABLE), IE(300, 4, 29305)],
        [*V4, IE(2, 3), IE(1, 5), IE(152, 8), IE(153, 8), IE(305, 4), IE(306, 4)],
    ]
    with own_objects_only():
        gc.collect()
        tracemalloc.start()
        try:
            state = DecoderState()
            for n in range(600):
                fields = shapes[n % len(shapes)]
                sets = [flowset(2, ipfix_template(256 + n % 300, fields))]
                if n % 7 == 0:
                    options = ipfix_options_template(600 + n, [IE(149, 4)], [IE(34, 4)])
                    sets.append(flowset(3, options))
                decode(ipfix_message(sets, domain=n // 300), state, f"10.1.0.{n % 50}")
            estimate = state.statistics().template_bytes
            held = _bytes_held_by_cache(state)
        finally:
            tracemalloc.stop()
    assert abs(held - estimate) <= 0.2 * held, (held, estimate)


# -- the cache's own accounting, under any sequence of announcements ---------------------------

TINY = Limits(
    max_templates=12,
    max_template_bytes=40_000,
    max_templates_per_exporter=7,
    max_templates_per_domain=4,
    max_templates_per_datagram=3,
    template_learn_rate_per_s=1.0,
    template_learn_burst=5,
    template_work_rate_per_s=40.0,
    template_work_burst=200,
    max_template_exporters=3,
    max_template_fields=12,
)

_RECORD = st.tuples(
    st.sampled_from(["template", "options", "withdraw", "withdraw_all", "data"]),
    st.integers(256, 261),  # template id
    st.integers(0, 14),  # field count: 0 and over max_template_fields included
    st.booleans(),  # zero-length fields
)
_DATAGRAM = st.tuples(
    st.integers(0, 3),  # exporter
    st.integers(0, 2),  # domain
    st.sampled_from([0.0, 0.01, 0.5, 3.0, -1.0]),  # time step (backwards too)
    st.lists(_RECORD, min_size=1, max_size=5),
)


def _hostile_ipfix(records: Sequence[tuple[str, int, int, bool]], domain: int) -> bytes:
    sets = []
    for kind, template_id, count, zero in records:
        fields = [IE(8, 4), IE(12, 4), *(IE(100 + k, 0 if zero else 2) for k in range(count))]
        fields = fields[:count]
        if kind == "template":
            sets.append(flowset(2, ipfix_template(template_id, fields)))
        elif kind == "options" and fields:
            sets.append(flowset(3, ipfix_options_template(template_id, fields[:1], fields[1:])))
        elif kind == "withdraw":
            sets.append(flowset(2, ipfix_withdrawal(template_id)))
        elif kind == "withdraw_all":
            sets.append(flowset(3 if count % 2 else 2, ipfix_withdrawal(3 if count % 2 else 2)))
        else:
            sets.append(flowset(template_id, bytes(count * 3)))
    return ipfix_message(sets, domain=domain)


def _check_cache(state: DecoderState) -> None:
    cache = state.templates
    limits = state.limits
    entries = cache._exporters
    assert len(cache) == sum(len(e.lru) for e in entries.values()) <= limits.max_templates
    assert cache.bytes == sum(e.bytes for e in entries.values())
    if len(cache):
        assert cache.bytes <= limits.max_template_bytes
    domains: dict[tuple[str, str, int], set[int]] = {}
    for name, entry in entries.items():
        assert entry.lru, "no empty exporter entries"
        assert len(entry.lru) <= limits.max_templates_per_exporter
        charged = sum(t.footprint + templates_module._ENTRY_SIZE for t in entry.lru.values())
        own = {k[:3] for k in entry.lru}
        assert entry.bytes == (
            templates_module._EXPORTER_SIZE + charged + len(own) * templates_module._DOMAIN_SIZE
        )
        for key in entry.lru:
            assert key[1] == name
            domains.setdefault(key[:3], set()).add(key[3])
    assert domains == cache._domains
    assert all(len(ids) <= limits.max_templates_per_domain for ids in domains.values())
    assert len(cache._buckets) <= limits.max_template_exporters
    stats = state.statistics()
    assert stats.templates == stats.templates_learned - stats.templates_evicted - (
        stats.templates_withdrawn
    )
    assert stats.templates_evicted == sum(stats.templates_evicted_by_reason.values())
    assert stats.templates_dropped == sum(stats.templates_dropped_by_reason.values())


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(_DATAGRAM, min_size=1, max_size=40))
def test_cache_accounting_stays_exact_under_any_announcements(
    datagrams: list[tuple[int, int, float, list[tuple[str, int, int, bool]]]],
) -> None:
    state = DecoderState(limits=TINY)
    now = T0
    for exporter, domain, step, records in datagrams:
        now += step
        decode(_hostile_ipfix(records, domain), state, f"192.0.2.{exporter}", now)
        _check_cache(state)


# -- quirks of real exporters ---------------------------------------------------------------


def test_v9_options_template_with_a_zero_length_system_scope_decodes() -> None:
    # Juniper: options scoped to "System" (scope type 1) with scope length 0.
    scope = [IE(1, 0)]
    options = [IE(34, 4), IE(35, 1)]
    packet = v9_packet(
        [
            flowset(1, v9_options_template(257, scope, options)),
            flowset(257, record(scope + options, [b"", 1000, 2])),
            flowset(0, v9_template(256, V4)),
            flowset(256, record(V4, v4_values()) + record(V4, v4_values(1))),
        ]
    )
    state = DecoderState()
    records = decode(packet, state)
    assert [(r.sport, r.sampling_interval, r.sampling_provenance) for r in records] == [
        (1000, 1000, "announced"),
        (1001, 1000, "announced"),
    ]
    stats = state.statistics()
    assert stats.counters["templates.zero_length_scope_fields"] == 1
    assert stats.counters["options_records"] == 1
    assert stats.malformed == {}


@pytest.mark.parametrize("fmt", ["v9", "ipfix"])
def test_element_0_of_length_0_in_a_template_decodes(fmt: str) -> None:
    fields = [*V4[:5], IE(0, 0), *V4[5:]]
    values = v4_values(3)
    values.insert(5, b"")
    if fmt == "v9":
        packet = v9_packet(
            [flowset(0, v9_template(256, fields)), flowset(256, record(fields, values))]
        )
    else:
        packet = ipfix_message(
            [flowset(2, ipfix_template(256, fields)), flowset(256, record(fields, values))]
        )
    state = DecoderState()
    rows = decode_datagram_rows(packet, REAL, state, T0)
    [r] = decode(packet, DecoderState())
    assert len(rows) == 1
    assert (str(r.src), str(r.dst), r.sport, r.dport, r.proto, r.packets, r.bytes) == (
        "198.51.100.10",
        "203.0.113.9",
        1003,
        80,
        6,
        5,
        500,
    )
    assert state.statistics().counters["templates.zero_length_fields"] == 1


def test_zero_length_quirks_never_cost_the_rest_of_the_datagram() -> None:
    packet = v9_packet(
        [
            flowset(0, v9_template(300, [IE(0, 0), IE(1, 0)])),  # records of no bytes
            flowset(0, v9_template(301, [])),  # no fields at all
            flowset(0, v9_template(256, V4)),
            flowset(256, record(V4, v4_values())),
        ]
    )
    state = DecoderState()
    assert len(decode(packet, state)) == 1
    dropped = state.statistics().templates_dropped_by_reason
    assert (dropped["empty_record"], dropped["no_fields"]) == (1, 1)
    ipfix = ipfix_message(
        [
            flowset(3, ipfix_options_template(400, [IE(149, 0)], [IE(0, 0)])),
            flowset(2, ipfix_template(256, V4)),
            flowset(256, record(V4, v4_values())),
        ]
    )
    assert len(decode(ipfix, state)) == 1
    assert state.statistics().templates_dropped_by_reason["empty_record"] == 2


# -- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_template_bytes": 0},
        {"max_templates_per_datagram": 0},
        {"template_learn_rate_per_s": 0.0},
        {"template_work_rate_per_s": float("inf")},
        {"template_work_burst": 100},
    ],
)
def test_limits_refuse_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="Limits"):
        Limits(**kwargs)
