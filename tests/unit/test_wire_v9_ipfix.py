"""NetFlow v9 and IPFIX round trips: datagrams built by the independent encoder in
test_wire_encoder.py, decoded and checked field by field; templates, options, sampling,
withdrawal, held data, bounds."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from overflowd.flows import FlowRecord
from overflowd.wire import DecoderState, Limits, decode_datagram
from overflowd.wire.reader import MalformedError, Reader, TruncatedError
from overflowd.wire.templates import interval_from_elements
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

EXPORTER = "192.0.2.50"
NOW = 1_700_000_100.0

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
    IE(16, 4),
    IE(17, 4),
    IE(22, 4),
    IE(21, 4),
    IE(10, 2),
    IE(14, 2),
]
V6 = [IE(27, 16), IE(28, 16), IE(7, 2), IE(11, 2), IE(4, 1), IE(2, 8), IE(1, 8), IE(6, 1), IE(5, 1)]


def v4_values(i: int = 0) -> list[Any]:
    return [
        IPv4Address("198.51.100.7") + i,
        IPv4Address("203.0.113.9"),
        1000 + i,
        80,
        6,
        5 + i,
        500 + i,
        0x02,
        0x28,
        64500,
        4200000000,
        95_000,
        99_000,
        3,
        4,
    ]


def v6_values(i: int = 0) -> list[Any]:
    return [
        IPv6Address("2001:db8::1") + i,
        IPv6Address("2001:db8:1::2"),
        5353,
        53,
        17,
        2**40 + i,
        2**41,
        0,
        0xB8,
    ]


def decode(data: bytes, state: DecoderState, exporter: str = EXPORTER) -> list[FlowRecord]:
    records = decode_datagram(data, exporter, state, NOW)
    for rec in records:
        rec.validate()
    return records


# -- NetFlow v9 -----------------------------------------------------------------------------


def test_v9_ipv4_field_by_field() -> None:
    packet = v9_packet(
        [
            flowset(0, v9_template(256, V4)),
            flowset(256, record(V4, v4_values(0)) + record(V4, v4_values(1))),
        ],
        uptime_ms=100_000,
        unix_secs=1_700_000_000,
        source_id=7,
    )
    recs = decode(packet, DecoderState())
    assert len(recs) == 2
    r = recs[1]
    assert r.src == IPv4Address("198.51.100.8") and r.dst == IPv4Address("203.0.113.9")
    assert (r.sport, r.dport, r.proto, r.packets, r.bytes) == (1001, 80, 6, 6, 501)
    assert (r.tcp_flags, r.tos, r.src_as, r.dst_as) == (0x02, 0x28, 64500, 4200000000)
    # FIRST/LAST_SWITCHED are uptime ms; export at uptime 100 000 = unix 1 700 000 000 s.
    assert r.first == 1_700_000_000_000 - 5_000
    assert r.last == 1_700_000_000_000 - 1_000
    assert (r.exporter, r.observation_domain, r.format) == (EXPORTER, 7, "netflow-v9")
    assert (r.sampling_interval, r.sampling_provenance) == (1, "assumed")


def test_v9_ipv6_and_64_bit_counters() -> None:
    packet = v9_packet([flowset(0, v9_template(300, V6)), flowset(300, record(V6, v6_values(3)))])
    [r] = decode(packet, DecoderState())
    assert r.src == IPv6Address("2001:db8::4") and r.dst == IPv6Address("2001:db8:1::2")
    assert (r.sport, r.dport, r.proto, r.packets, r.bytes, r.tos) == (
        5353,
        53,
        17,
        2**40 + 3,
        2**41,
        0xB8,
    )
    assert r.src_as is None and r.dst_as is None
    assert r.first == r.last == 1_700_000_000_000  # no times in the template: export time


def test_v9_header_count_is_not_trusted() -> None:
    """softflowd puts the flow count in Count; we parse to the end of the datagram."""
    sets = [
        flowset(0, v9_template(256, V4)),
        flowset(256, b"".join(record(V4, v4_values(i)) for i in range(3))),
    ]
    for count in (0, 1, 3, 200):
        assert len(decode(v9_packet(sets, count=count), DecoderState())) == 3


def test_v9_options_sampling_applies_to_data() -> None:
    scope = [IE(1, 4)]  # scope type 1 = System: *not* element 1 (octetDeltaCount)
    options = [IE(34, 4), IE(35, 1)]
    packet = v9_packet(
        [
            flowset(1, v9_options_template(257, scope, options)),
            flowset(257, record(scope + options, [0, 100, 2])),
            flowset(0, v9_template(256, V4)),
            flowset(256, record(V4, v4_values())),
        ],
        source_id=3,
    )
    state = DecoderState()
    [r] = decode(packet, state)
    assert (r.sampling_interval, r.sampling_provenance) == (100, "announced")
    # Remembered for later datagrams of the same exporter and source id only.
    data = v9_packet([flowset(256, record(V4, v4_values()))], source_id=3)
    assert decode(data, state)[0].sampling_interval == 100
    other = v9_packet(
        [flowset(0, v9_template(256, V4)), flowset(256, record(V4, v4_values()))], source_id=4
    )
    assert decode(other, state)[0].sampling_provenance == "assumed"
    stats = state.statistics()
    assert stats.counters["options_records"] == 1
    assert stats.sampling_entries == 1


def test_v9_sampler_ids_select_their_interval() -> None:
    options = [IE(48, 1), IE(49, 1), IE(50, 4)]
    data_fields = [*V4, IE(48, 1)]
    packet = v9_packet(
        [
            flowset(1, v9_options_template(260, [IE(1, 4)], options)),
            flowset(
                260,
                record([IE(1, 4), *options], [0, 1, 2, 10])
                + record([IE(1, 4), *options], [0, 2, 2, 1000]),
            ),
            flowset(0, v9_template(261, data_fields)),
            flowset(
                261,
                record(data_fields, [*v4_values(), 1])
                + record(data_fields, [*v4_values(), 2])
                + record(data_fields, [*v4_values(), 9]),
            ),
        ],
    )
    recs = decode(packet, DecoderState())
    # Sampler 1 → 10, sampler 2 → 1000, unknown sampler 9 → the domain's last announcement.
    assert [r.sampling_interval for r in recs] == [10, 1000, 1000]
    assert {r.sampling_provenance for r in recs} == {"announced"}


def test_v9_interval_carried_in_the_data_record() -> None:
    fields = [*V4, IE(34, 4)]
    packet = v9_packet(
        [flowset(0, v9_template(256, fields)), flowset(256, record(fields, [*v4_values(), 64]))]
    )
    [r] = decode(packet, DecoderState())
    assert (r.sampling_interval, r.sampling_provenance) == (64, "announced")
    state = DecoderState(overrides={EXPORTER: 3})
    [r] = decode(packet, state)
    assert (r.sampling_interval, r.sampling_provenance) == (3, "overridden")


def test_v9_data_before_template_is_held_then_replayed() -> None:
    state = DecoderState()
    data = v9_packet(
        [flowset(256, record(V4, v4_values(0)) + record(V4, v4_values(1)))],
        uptime_ms=50_000,
        unix_secs=1_700_000_000,
    )
    assert decode(data, state) == []
    stats = state.statistics()
    assert (stats.pending_sets, stats.pending_held) == (1, 1)
    template = v9_packet(
        [flowset(0, v9_template(256, V4))], uptime_ms=60_000, unix_secs=1_700_000_010
    )
    recs = decode(template, state)
    assert [r.sport for r in recs] == [1000, 1001]
    # Times come from the header of the datagram that carried the data.
    assert recs[0].first == 1_700_000_000_000 - (50_000 - 95_000)
    stats = state.statistics()
    assert (stats.pending_sets, stats.pending_replayed, stats.pending_bytes) == (0, 1, 0)
    assert stats.records == 2


def test_v9_malformed_structures() -> None:
    with pytest.raises(MalformedError, match="flowset length"):
        decode(v9_packet([b"\x01\x00\x00\x02"]), DecoderState())
    with pytest.raises(MalformedError, match="template id"):
        decode(v9_packet([flowset(0, v9_template(200, V4))]), DecoderState())
    with pytest.raises(TruncatedError):
        decode(v9_packet([flowset(0, v9_template(256, V4))[:-8]], count=1)[:-1], DecoderState())
    # A zero-length field is a quirk, not a reason to refuse the datagram (nothing is lost;
    # test_wire_templates.py has the details).
    state = DecoderState()
    assert decode(v9_packet([flowset(0, v9_template(256, [IE(8, 0), IE(12, 4)]))]), state) == []
    assert state.statistics().counters["templates.zero_length_fields"] == 1


def test_v9_odd_sized_integers_and_padding() -> None:
    fields = [IE(8, 4), IE(12, 4), IE(2, 3), IE(1, 5), IE(4, 1)]
    body = record(fields, [IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), 70000, 2**33, 17])
    packet = v9_packet([flowset(0, v9_template(256, fields)), flowset(256, body + body)])
    recs = decode(packet, DecoderState())
    assert len(recs) == 2  # 17-byte records, 2 bytes of padding left alone
    assert (recs[0].packets, recs[0].bytes, recs[0].proto) == (70000, 2**33, 17)


def test_icmp_type_code_becomes_destination_port() -> None:
    fields = [IE(8, 4), IE(12, 4), IE(4, 1), IE(32, 2)]
    packet = v9_packet(
        [
            flowset(0, v9_template(256, fields)),
            flowset(
                256, record(fields, [IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), 1, 0x0800])
            ),
        ]
    )
    [r] = decode(packet, DecoderState())
    assert (r.proto, r.sport, r.dport) == (1, 0, 0x0800)


def test_non_flow_data_is_counted_and_skipped() -> None:
    fields = [IE(10, 2), IE(2, 4)]  # no addresses: not a flow
    packet = v9_packet([flowset(0, v9_template(256, fields)), flowset(256, record(fields, [1, 2]))])
    state = DecoderState()
    assert decode(packet, state) == []
    assert state.statistics().counters["non_flow_data_sets"] == 1


# -- IPFIX ----------------------------------------------------------------------------------


def test_ipfix_ipv4_and_ipv6_field_by_field() -> None:
    fields4 = [*V4[:11], IE(152, 8), IE(153, 8)]
    message = ipfix_message(
        [
            flowset(2, ipfix_template(256, fields4) + ipfix_template(257, V6)),
            flowset(
                256, record(fields4, [*v4_values()[:11], 1_700_000_000_123, 1_700_000_001_456])
            ),
            flowset(257, record(V6, v6_values())),
        ],
        export_time=1_700_000_002,
        domain=99,
    )
    r4, r6 = decode(message, DecoderState())
    assert r4.src == IPv4Address("198.51.100.7")
    assert (r4.packets, r4.bytes, r4.first, r4.last) == (
        5,
        500,
        1_700_000_000_123,
        1_700_000_001_456,
    )
    assert (r4.format, r4.observation_domain, r4.src_as, r4.dst_as) == (
        "ipfix",
        99,
        64500,
        4200000000,
    )
    assert r6.dst == IPv6Address("2001:db8:1::2")
    assert (r6.sport, r6.dport, r6.proto, r6.packets) == (5353, 53, 17, 2**40)
    assert r6.first == r6.last == 1_700_000_002_000


def test_ipfix_variable_length_and_enterprise_elements_kept_raw() -> None:
    fields = [
        IE(8, 4),
        IE(82, VARIABLE),
        IE(12, 4),
        IE(1234, VARIABLE, enterprise=29305),
        IE(2, 4),
        IE(7, 2),
        IE(11, 2),
        IE(4, 1),
        IE(99, 4, enterprise=9),
    ]
    long_name = b"x" * 300  # a 3-byte length prefix (255, then u16)
    values = [
        IPv4Address("192.0.2.1"),
        b"eth0",
        IPv4Address("192.0.2.2"),
        long_name,
        7,
        1,
        2,
        17,
        b"ent!",
    ]
    message = ipfix_message(
        [
            flowset(2, ipfix_template(256, fields)),
            flowset(256, record(fields, values) + record(fields, values)),
        ]
    )
    state = DecoderState()
    recs = decode(message, state)
    assert len(recs) == 2
    assert (recs[0].src, recs[0].dst, recs[0].packets, recs[0].sport, recs[0].dport) == (
        IPv4Address("192.0.2.1"),
        IPv4Address("192.0.2.2"),
        7,
        1,
        2,
    )
    # The raw view keeps what the flow record has no room for.
    template = state.templates.get(("ipfix", EXPORTER, 0, 256))
    assert template is not None
    raw = list(template.iter_records(Reader(record(fields, values), fmt="ipfix")))
    assert raw[0][1] == b"eth0" and raw[0][3] == long_name and raw[0][8] == b"ent!"
    assert template.fields[3].enterprise == 29305


def test_ipfix_options_305_306_and_other_sampling_elements() -> None:
    scope = [IE(149, 4)]
    options = [IE(302, 4), IE(305, 4), IE(306, 4)]
    message = ipfix_message(
        [
            flowset(3, ipfix_options_template(400, scope, options)),
            flowset(400, record(scope + options, [5, 1, 1, 99])),
            flowset(2, ipfix_template(256, V4)),
            flowset(256, record(V4, v4_values())),
        ],
        domain=5,
    )
    [r] = decode(message, DecoderState())
    assert (r.sampling_interval, r.sampling_provenance) == (100, "announced")


@pytest.mark.parametrize(
    ("values", "interval"),
    [
        ({305: 1, 306: 99}, 100),
        ({305: 10, 306: 90}, 10),
        ({305: 3, 306: 0}, 1),
        ({305: 512}, 512),  # no space: the de facto "1 in N" reading
        ({34: 4096, 35: 2}, 4096),
        ({50: 250}, 250),
        ({309: 1, 310: 50}, 50),
        ({311: 0.001}, 1000),
        ({34: 0}, None),
        ({311: 0.0}, None),
        ({311: float("nan")}, None),
        ({311: 5e-324}, None),  # 1/p is infinite: used to raise OverflowError
        ({311: 1e-10}, None),  # 1 in 10**10 is beyond the 32 bits a report carries
        ({34: 2**40, 50: 64}, 64),  # an out-of-range element gives way to the next
        ({}, None),
    ],
)
def test_interval_semantics(values: dict[int, Any], interval: int | None) -> None:
    assert interval_from_elements(values) == interval


def test_ipfix_sysuptime_times_need_system_init_time() -> None:
    fields = [IE(8, 4), IE(12, 4), IE(22, 4), IE(21, 4)]
    opts = [IE(160, 8)]
    data = record(fields, [IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), 1000, 2000])
    message = ipfix_message(
        [
            flowset(3, ipfix_options_template(300, [IE(149, 4)], opts)),
            flowset(300, record([IE(149, 4), *opts], [0, 1_600_000_000_000])),
            flowset(2, ipfix_template(256, fields)),
            flowset(256, data),
        ],
    )
    [r] = decode(message, DecoderState())
    assert (r.first, r.last) == (1_600_000_001_000, 1_600_000_002_000)


@pytest.mark.parametrize(
    ("elements", "values", "first", "last"),
    [
        ((150, 151), (1_700_000_000, 1_700_000_005), 1_700_000_000_000, 1_700_000_005_000),
        (
            (154, 155),
            ((1_700_000_000 + 2_208_988_800) << 32 | 2**31, (1_700_000_001 + 2_208_988_800) << 32),
            1_700_000_000_500,
            1_700_000_001_000,
        ),
        ((158, 159), (3_000_000, 1_000_000), 1_700_000_007_000, 1_700_000_009_000),
    ],
)
def test_ipfix_time_elements(
    elements: tuple[int, int], values: tuple[int, int], first: int, last: int
) -> None:
    size = 8 if elements[0] in (154, 155) else 4
    fields = [IE(8, 4), IE(12, 4), IE(elements[0], size), IE(elements[1], size)]
    message = ipfix_message(
        [
            flowset(2, ipfix_template(256, fields)),
            flowset(
                256, record(fields, [IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), *values])
            ),
        ],
        export_time=1_700_000_010,
    )
    [r] = decode(message, DecoderState())
    assert (r.first, r.last) == (first, last)


def test_ipfix_dscp_and_icmpv6() -> None:
    fields = [IE(27, 16), IE(28, 16), IE(4, 1), IE(139, 2), IE(195, 1)]
    message = ipfix_message(
        [
            flowset(2, ipfix_template(256, fields)),
            flowset(
                256,
                record(
                    fields, [IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2"), 58, 0x8000, 46]
                ),
            ),
        ]
    )
    [r] = decode(message, DecoderState())
    assert (r.proto, r.dport, r.tos) == (58, 0x8000, 46 << 2)


def test_ipfix_withdrawal_one_and_all() -> None:
    state = DecoderState()
    learn = ipfix_message([flowset(2, ipfix_template(256, V4) + ipfix_template(257, V6))])
    decode(learn, state)
    assert state.statistics().templates == 2
    decode(ipfix_message([flowset(2, ipfix_withdrawal(256))]), state)
    assert state.statistics().templates == 1
    data = ipfix_message([flowset(256, record(V4, v4_values()))])
    assert decode(data, state) == []  # held again, waiting for a template
    assert state.statistics().pending_sets == 1
    decode(ipfix_message([flowset(2, ipfix_withdrawal(2))]), state)  # all data templates
    stats = state.statistics()
    assert (stats.templates, stats.templates_withdrawn) == (0, 2)


def test_ipfix_same_template_id_per_exporter_and_domain() -> None:
    state = DecoderState()
    fields_a, fields_b = V4, [IE(8, 4), IE(12, 4), IE(2, 4)]
    decode(ipfix_message([flowset(2, ipfix_template(256, fields_a))], domain=1), state)
    decode(ipfix_message([flowset(2, ipfix_template(256, fields_b))], domain=2), state)
    decode(ipfix_message([flowset(2, ipfix_template(256, fields_b))]), state, "192.0.2.99")
    [a] = decode(ipfix_message([flowset(256, record(fields_a, v4_values()))], domain=1), state)
    data_b = record(fields_b, [IPv4Address("192.0.2.1"), IPv4Address("192.0.2.2"), 42])
    [b] = decode(ipfix_message([flowset(256, data_b)], domain=2), state)
    assert (a.packets, b.packets) == (5, 42)
    assert state.statistics().templates == 3


def test_template_refresh_is_not_an_update_but_a_change_is() -> None:
    state = DecoderState()
    decode(ipfix_message([flowset(2, ipfix_template(256, V4))]), state)
    decode(ipfix_message([flowset(2, ipfix_template(256, V4))]), state)
    assert (state.statistics().templates_learned, state.statistics().templates_updated) == (1, 0)
    decode(ipfix_message([flowset(2, ipfix_template(256, V6))]), state)
    assert state.statistics().templates_updated == 1
    [r] = decode(ipfix_message([flowset(256, record(V6, v6_values()))]), state)
    assert r.src.version == 6


def test_ipfix_malformed() -> None:
    good = ipfix_message([flowset(2, ipfix_template(256, V4))])
    with pytest.raises(TruncatedError):
        decode(good[:-4], DecoderState())  # header length says more
    with pytest.raises(MalformedError, match="scope field count"):
        decode(
            ipfix_message([flowset(3, ipfix_options_template(300, [], [IE(34, 4)]))]),
            DecoderState(),
        )
    with pytest.raises(MalformedError, match="set length"):
        decode(ipfix_message([b"\x00\x02\x00\x00"]), DecoderState())
    with pytest.raises(MalformedError, match="withdrawal"):
        decode(ipfix_message([flowset(2, ipfix_withdrawal(5))]), DecoderState())


def test_too_many_fields_is_refused_and_counted() -> None:
    state = DecoderState(limits=Limits(max_template_fields=4))
    decode(ipfix_message([flowset(2, ipfix_template(256, V4))]), state)
    stats = state.statistics()
    assert stats.templates == 0
    assert stats.counters["templates.refused_too_many_fields"] == 1


# -- bounds ------------------------------------------------------------------------------------


def test_template_flood_keeps_the_cache_bounded() -> None:
    state = DecoderState(limits=Limits(max_templates=50))
    for i in range(500):
        decode(ipfix_message([flowset(2, ipfix_template(256 + i % 1000, V4))], domain=i), state)
    stats = state.statistics()
    assert stats.templates == 50
    assert stats.templates_evicted == 450
    # The most recent ones are still there and work.
    [r] = decode(ipfix_message([flowset(256 + 499, record(V4, v4_values()))], domain=499), state)
    assert r.packets == 5


def test_pending_is_bounded_by_count_bytes_and_age() -> None:
    limits = Limits(max_pending_sets=3, max_pending_bytes=10_000, pending_max_age_s=60)
    state = DecoderState(limits=limits)
    body = record(V4, v4_values())
    for i in range(5):
        decode_datagram(ipfix_message([flowset(300 + i, body)]), EXPORTER, state, NOW + i)
    stats = state.statistics()
    assert stats.pending_sets == 3
    assert stats.pending_dropped_by_reason["evicted"] == 2
    # The oldest went first: template 300's data is gone, 304's is still held.
    assert decode(ipfix_message([flowset(2, ipfix_template(300, V4))]), state) == []
    assert len(decode(ipfix_message([flowset(2, ipfix_template(304, V4))]), state)) == 1
    big = flowset(400, body * 300)  # > max_pending_bytes on its own
    decode_datagram(ipfix_message([big]), EXPORTER, state, NOW + 10)
    assert state.statistics().pending_dropped_by_reason["too_large"] == 1
    decode_datagram(ipfix_message([]), EXPORTER, state, NOW + 1000)  # time passes
    stats = state.statistics()
    assert stats.pending_sets == 0
    assert stats.pending_dropped_by_reason["expired"] == 2
    assert stats.pending_bytes == 0


def test_options_data_held_before_its_template_is_replayed() -> None:
    scope, options = [IE(149, 4)], [IE(34, 4)]
    state = DecoderState()
    decode(ipfix_message([flowset(400, record(scope + options, [0, 16]))]), state)
    decode(ipfix_message([flowset(3, ipfix_options_template(400, scope, options))]), state)
    [r] = decode(
        ipfix_message([flowset(2, ipfix_template(256, V4)), flowset(256, record(V4, v4_values()))]),
        state,
    )
    assert r.sampling_interval == 16


def test_replay_failure_is_counted_not_raised() -> None:
    state = DecoderState()
    fields = [IE(8, 4), IE(82, VARIABLE), IE(12, 4)]
    # Held bytes that do not fit the template that arrives later (a variable-length field
    # claiming more than there is).
    decode(ipfix_message([flowset(256, bytes(4) + b"\xff\xff\xff" + bytes(5))]), state)
    assert decode(ipfix_message([flowset(2, ipfix_template(256, fields))]), state) == []
    assert state.statistics().counters["pending.replay_failed.truncated"] == 1


def test_data_set_shorter_than_a_record_is_counted() -> None:
    state = DecoderState()
    decode(ipfix_message([flowset(2, ipfix_template(256, V4))]), state)
    assert decode(ipfix_message([flowset(256, bytes(12))]), state) == []
    assert state.statistics().counters["data_sets_shorter_than_a_record"] == 1
