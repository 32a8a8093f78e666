"""What real exporters send that a strict reading of the RFCs refuses, and decoded values that
must never turn into an exception other than DecodeError.

Every datagram here is built by the independent encoder (test_wire_encoder.py) from the
vendor behaviour described in the test, not copied from a capture:

* an announced samplingProbability (IE 311) so small that ``1/p`` overflows, and other
  sampling values and times no report or renderer can carry;
* zero padding after the last NetFlow v9 flowset (Palo Alto PAN-OS, Cisco ACI), after the last
  IPFIX set, and bytes after the last sFlow sample: the datagram's records are kept and the
  quirk counted in ``DecoderStatistics.defects``;
* ICMP type/code in elements 176/177, 178/179 and 32/139 while the port fields carry the ICMP
  identifier (Cisco ASA), and ICMPv6;
* Cisco ASA NSEL counters (initiator/responder octets and packets, IEs 231/232/298/299) in
  place of the standard counters;
* data held for its template replayed only after the options data of the datagram that
  brings the template, so it gets the announced sampling interval.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from overflowd.cli import cmd_decode
from overflowd.flows import FlowRecord
from overflowd.wire import DecoderState, MalformedError, TruncatedError, decode_datagram
from tests.unit.test_wire_encoder import (
    IE,
    ethernet,
    flowset,
    ipfix_message,
    ipfix_options_template,
    ipfix_template,
    ipv4,
    ipv6,
    pcap_file,
    record,
    sflow_counter_sample,
    sflow_datagram,
    sflow_flow_sample,
    sflow_raw_header,
    udp,
    udp_frame,
    v9_options_template,
    v9_packet,
    v9_template,
)

EXPORTER = "192.0.2.60"
NOW = 1_700_000_100.0

V4 = [IE(8, 4), IE(12, 4), IE(7, 2), IE(11, 2), IE(4, 1), IE(2, 4), IE(1, 4)]


def v4(i: int = 0, *, proto: int = 6, sport: int | None = None, dport: int = 80) -> list[Any]:
    return [
        IPv4Address("198.51.100.7") + i,
        IPv4Address("203.0.113.9"),
        1000 + i if sport is None else sport,
        dport,
        proto,
        5 + i,
        500 + i,
    ]


def decode(data: bytes, state: DecoderState, exporter: str = EXPORTER) -> list[FlowRecord]:
    records = decode_datagram(data, exporter, state, NOW)
    for rec in records:
        rec.validate()
    return records


def defects(state: DecoderState) -> dict[str, int]:
    return dict(state.statistics().defects)


# -- 1. decoded values that used to raise, or that nothing downstream can carry ------------------


SCOPE_V9 = [IE(1, 4)]  # scope type 1: System
SCOPE_IPFIX = [IE(149, 4)]  # observationDomainId


def v9_probability(p: float, *, length: int = 8) -> bytes:
    options = [IE(311, length)]
    return v9_packet(
        [
            flowset(1, v9_options_template(300, SCOPE_V9, options)),
            flowset(300, record(SCOPE_V9 + options, [0, p])),
            flowset(0, v9_template(256, V4)),
            flowset(256, record(V4, v4())),
        ]
    )


def ipfix_probability(p: float, *, length: int = 8) -> bytes:
    options = [IE(311, length)]
    return ipfix_message(
        [
            flowset(3, ipfix_options_template(300, SCOPE_IPFIX, options)),
            flowset(300, record(SCOPE_IPFIX + options, [0, p])),
            flowset(2, ipfix_template(256, V4)),
            flowset(256, record(V4, v4())),
        ]
    )


@pytest.mark.parametrize("build", [v9_probability, ipfix_probability])
def test_sampling_probability_5e_324_is_a_counted_defect_not_an_overflow(build: Any) -> None:
    """One spoofable datagram used to raise OverflowError (round(1/p), 1/p = inf), which
    nothing above the decoder catches: the daemon exited."""
    state = DecoderState()
    [r] = decode(build(5e-324), state)
    assert (r.sampling_interval, r.sampling_provenance) == (1, "assumed")
    fmt = r.format
    assert defects(state) == {f"{fmt}/sampling_out_of_range": 1}
    assert state.statistics().malformed == {}


PROBABILITIES: list[tuple[float, int | None]] = [
    (0.001, 1000),
    (1.0, 1),
    (0.0, None),  # "nothing announced", not a defect
    (-0.0, None),
    (1e-10, None),  # 1 in 10**10: more than any interval a report carries (2**32 - 1)
    (1e-308, None),
    (float("inf"), None),
    (float("-inf"), None),
    (float("nan"), None),
    (-0.5, None),
    (1.5, None),
]


@pytest.mark.parametrize(
    ("p", "interval", "length"),
    [(p, i, n) for p, i in PROBABILITIES for n in (4, 8)] + [(1 / (2**32 - 1), 2**32 - 1, 8)],
)
def test_sampling_probability_in_record_and_options(
    p: float, interval: int | None, length: int
) -> None:
    state = DecoderState()
    [from_options] = decode(ipfix_probability(p, length=length), state)
    fields = [*V4, IE(311, length)]
    data = ipfix_message(
        [flowset(2, ipfix_template(257, fields)), flowset(257, record(fields, [*v4(), p]))],
        domain=9,
    )
    [in_record] = decode(data, state)
    for r in (from_options, in_record):
        if interval is None:
            assert (r.sampling_interval, r.sampling_provenance) == (1, "assumed")
        else:
            assert (r.sampling_interval, r.sampling_provenance) == (interval, "announced")
    if interval is None:
        sent = struct.unpack("!f", struct.pack("!f", p))[0] if length == 4 else p
        expected = {} if sent == 0 else {"ipfix/sampling_out_of_range": 2}
        assert defects(state) == expected


@pytest.mark.parametrize(
    ("values", "interval"),
    [
        ({34: 2**40}, None),  # an 8-byte samplingInterval (reduced-size encoding reversed)
        ({34: 2**32 - 1}, 2**32 - 1),
        ({50: 2**64 - 1}, None),
        ({305: 1, 306: 2**64 - 1}, None),
        ({305: 2**64 - 1, 306: 2**64 - 1}, 2),
        ({309: 1, 310: 2**64 - 1}, None),
        ({34: 0}, None),  # "not announced", not a defect
    ],
)
def test_sampling_intervals_beyond_32_bits_announce_nothing(
    values: dict[int, int], interval: int | None
) -> None:
    options = [IE(e, 8) for e in values]
    message = ipfix_message(
        [
            flowset(3, ipfix_options_template(300, SCOPE_IPFIX, options)),
            flowset(300, record(SCOPE_IPFIX + options, [0, *values.values()])),
            flowset(2, ipfix_template(256, V4)),
            flowset(256, record(V4, v4())),
        ]
    )
    state = DecoderState()
    [r] = decode(message, state)
    if interval is None:
        assert r.sampling_provenance == "assumed"
        assert r.sampling_interval == 1
        zero = all(v == 0 for v in values.values())
        assert defects(state) == ({} if zero else {"ipfix/sampling_out_of_range": 1})
    else:
        assert (r.sampling_interval, r.sampling_provenance) == (interval, "announced")


@pytest.mark.parametrize(
    ("element", "value"),
    [
        (152, 2**63),  # flowStartMilliseconds past the year 292 million
        (152, 2**64 - 1),
        (150, 2**32 - 1),  # flowStartSeconds: fine (year 2106)
        (154, 2**64 - 1),  # flowStartMicroseconds, NTP: fine (year 2036)
        (158, 2**32 - 1),  # flowStartDeltaMicroseconds: 71 minutes before export, fine
    ],
)
def test_times_no_one_can_render_are_replaced_and_counted(
    element: int, value: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`overflowd decode` of a capture with such a record used to die with ValueError
    (datetime cannot write the year 292278994)."""
    size = 4 if element in (150, 158) else 8
    fields = [*V4, IE(element, size)]
    message = ipfix_message(
        [flowset(2, ipfix_template(256, fields)), flowset(256, record(fields, [*v4(), value]))],
        export_time=1_700_000_000,
    )
    state = DecoderState()
    [r] = decode(message, state)
    bad = element == 152
    if bad:
        assert r.first == r.last == 1_700_000_000_000  # as if absent: the export time
        assert defects(state) == {"ipfix/time_out_of_range": 1}
    else:
        assert defects(state) == {}
    path = tmp_path / "ipfix.pcap"
    path.write_bytes(pcap_file([(NOW, udp_frame(EXPORTER, "192.0.2.2", 4000, 4739, message))]))
    assert cmd_decode.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1


def test_cli_survives_a_capture_of_the_overflowing_probability(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = [
        (NOW, udp_frame(EXPORTER, "192.0.2.2", 4000, 2055, v9_probability(5e-324))),
        (NOW + 1, udp_frame(EXPORTER, "192.0.2.2", 4000, 4739, ipfix_probability(5e-324))),
    ]
    path = tmp_path / "p.pcap"
    path.write_bytes(pcap_file(frames))
    assert cmd_decode.main([str(path), "--json"]) == 0
    assert capsys.readouterr().out.count('"sampling_provenance":"assumed"') == 2


# -- 2. trailing and zero-length quirks ----------------------------------------------------------


def v9_with_data(n: int = 2) -> bytes:
    return v9_packet(
        [
            flowset(0, v9_template(256, V4)),
            flowset(256, b"".join(record(V4, v4(i)) for i in range(n))),
        ],
        count=1 + n,
    )


@pytest.mark.parametrize("padding", [4, 8, 12, 100])
def test_v9_zero_padding_after_the_last_flowset_is_kept_and_counted(padding: int) -> None:
    """Palo Alto PAN-OS and Cisco ACI pad the datagram with zeros after the last flowset; a
    walk that reads the zeros as a flowset header (id 0, length 0) refused all of it."""
    state = DecoderState()
    recs = decode(v9_with_data() + bytes(padding), state)
    assert [r.sport for r in recs] == [1000, 1001]
    assert defects(state) == {"netflow-v9/trailing_padding": 1}
    assert state.statistics().malformed == {}


def test_v9_short_zero_padding_is_counted_too() -> None:
    state = DecoderState()
    assert len(decode(v9_with_data() + bytes(2), state)) == 2
    assert defects(state) == {"netflow-v9/trailing_padding": 1}


def test_v9_a_broken_flowset_loses_only_itself() -> None:
    """A flowset whose body fails (here a template with id 5) is counted and skipped; the
    flowsets around it, bounded by their own lengths, still decode."""
    good = v9_with_data()
    bad_template = flowset(0, v9_template(5, V4))
    more = flowset(256, record(V4, v4(7)))
    state = DecoderState()
    recs = decode(good[:20] + bad_template + good[20:] + more, state)
    assert [r.sport for r in recs] == [1000, 1001, 1007]
    assert defects(state) == {"netflow-v9/flowset_malformed": 1}


def test_v9_garbage_after_flowsets_that_decoded_is_counted() -> None:
    state = DecoderState()
    recs = decode(v9_with_data() + b"\x01\x00\x00\x02junk", state)
    assert len(recs) == 2
    assert defects(state) == {"netflow-v9/trailing_bytes": 1}
    state = DecoderState()
    # A last flowset announcing more than the datagram holds: the ones before it are kept.
    recs = decode(v9_with_data() + struct.pack("!HH", 256, 400) + bytes(8), state)
    assert len(recs) == 2
    assert defects(state) == {"netflow-v9/flowset_truncated": 1}


def test_v9_datagram_with_nothing_decodable_is_still_refused() -> None:
    with pytest.raises(MalformedError, match="flowset length"):
        decode(v9_packet([b"\x01\x00\x00\x02"]), DecoderState())
    with pytest.raises(MalformedError, match="template id"):
        decode(v9_packet([flowset(0, v9_template(5, V4))]), DecoderState())


def ipfix_with_data() -> bytes:
    return ipfix_message(
        [flowset(2, ipfix_template(256, V4)), flowset(256, record(V4, v4(0)) + record(V4, v4(1)))]
    )


@pytest.mark.parametrize("padding", [2, 4, 8])
def test_ipfix_zero_padding_after_the_last_set_is_kept_and_counted(padding: int) -> None:
    """Zeros after the last set, inside the message length: RFC 7011 puts padding inside sets,
    some exporters pad the message instead."""
    message = ipfix_with_data()
    padded = message[:2] + struct.pack("!H", len(message) + padding) + message[4:] + bytes(padding)
    state = DecoderState()
    assert len(decode(padded, state)) == 2
    assert defects(state) == {"ipfix/trailing_padding": 1}
    # Bytes after the message length are not IPFIX: counted too.
    state = DecoderState()
    assert len(decode(message + bytes(padding), state)) == 2
    assert defects(state) == {"ipfix/trailing_padding": 1}
    state = DecoderState()
    assert len(decode(message + b"\x01" * padding, state)) == 2
    assert defects(state) == {"ipfix/trailing_bytes": 1}


def sflow_frame() -> bytes:
    return ethernet(ipv4("198.51.100.1", "203.0.113.5", 17, udp(123, 40000, b"n" * 40)), 0x0800)


@pytest.mark.parametrize("tail", [bytes(4), bytes(3), b"\xde\xad\xbe\xef" * 3])
def test_sflow_bytes_after_the_last_sample_are_counted_not_fatal(tail: bytes) -> None:
    sample = sflow_flow_sample([sflow_raw_header(sflow_frame(), frame_length=90)], rate=512)
    datagram = sflow_datagram([sflow_counter_sample(), sample]) + tail
    state = DecoderState()
    [r] = decode(datagram, state)
    assert (r.sport, r.dport, r.sampling_interval) == (123, 40000, 512)
    kind = "trailing_padding" if not any(tail) else "trailing_bytes"
    assert defects(state) == {f"sflow-v5/{kind}": 1}


def test_sflow_a_broken_sample_loses_only_itself() -> None:
    good = sflow_flow_sample([sflow_raw_header(sflow_frame(), frame_length=90)], rate=512)
    # A flow sample announcing 1000 records (more than MAX_RECORDS) inside a correct length.
    broken = struct.pack("!II", 1, 32) + struct.pack("!8I", 1, 3, 10, 10, 0, 3, 4, 1000)
    state = DecoderState()
    recs = decode(sflow_datagram([good, broken, good]), state)
    assert len(recs) == 2
    assert defects(state) == {"sflow-v5/sample_malformed": 1}
    # Fewer samples than the header counts: the ones there are kept.
    state = DecoderState()
    datagram = sflow_datagram([good, good])
    datagram = datagram[:24] + struct.pack("!I", 3) + datagram[28:]
    assert len(decode(datagram, state)) == 2
    assert defects(state) == {"sflow-v5/samples_missing": 1}


def test_sflow_datagram_with_nothing_decodable_is_still_refused() -> None:
    broken = struct.pack("!II", 1, 32) + struct.pack("!8I", 1, 3, 10, 10, 0, 3, 4, 1000)
    with pytest.raises(MalformedError, match="at most"):
        decode(sflow_datagram([broken]), DecoderState())
    head = sflow_datagram([])[:-4]
    with pytest.raises(TruncatedError):
        decode(head + struct.pack("!I", 2), DecoderState())


# -- 3. ICMP type and code ------------------------------------------------------------------------


def test_asa_icmp_type_code_elements_176_177_with_the_icmp_id_in_the_ports() -> None:
    """Cisco ASA exports ICMP with type and code in 176/177 and the ICMP identifier in the
    port fields; the record must say dport = type * 256 + code, sport 0 (docs/flows.md)."""
    fields = [*V4, IE(176, 1), IE(177, 1)]
    echo = record(fields, [*v4(proto=1, sport=0x1A2B, dport=0x1A2B), 8, 0])
    unreachable = record(fields, [*v4(proto=1, sport=0x77, dport=0), 3, 3])
    packet = v9_packet([flowset(0, v9_template(256, fields)), flowset(256, echo + unreachable)])
    a, b = decode(packet, DecoderState())
    assert (a.proto, a.sport, a.dport) == (1, 0, 0x0800)
    assert (b.proto, b.sport, b.dport) == (1, 0, 0x0303)


def test_icmpv6_type_code_elements_178_179() -> None:
    fields = [IE(27, 16), IE(28, 16), IE(7, 2), IE(11, 2), IE(4, 1), IE(178, 1), IE(179, 1)]
    values = [IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2"), 0x55, 0x55, 58, 128, 0]
    message = ipfix_message(
        [flowset(2, ipfix_template(256, fields)), flowset(256, record(fields, values))]
    )
    [r] = decode(message, DecoderState())
    assert (r.proto, r.sport, r.dport) == (58, 0, 0x8000)


def test_combined_icmp_element_wins_over_ports_that_carry_the_icmp_id() -> None:
    fields = [*V4, IE(32, 2)]
    data = record(fields, [*v4(proto=1, sport=0x1A2B, dport=0x1A2B), 0x0800])
    packet = v9_packet([flowset(0, v9_template(256, fields)), flowset(256, data)])
    [r] = decode(packet, DecoderState())
    assert (r.sport, r.dport) == (0, 0x0800)


def test_dual_stack_template_takes_the_icmp_element_of_the_record_family() -> None:
    """A template with both icmpTypeCodeIPv4 (32) and icmpTypeCodeIPv6 (139): an ICMPv6 record
    leaves 32 zero. It used to read 32 whatever the protocol."""
    fields = [
        IE(8, 4),
        IE(12, 4),
        IE(27, 16),
        IE(28, 16),
        IE(4, 1),
        IE(32, 2),
        IE(139, 2),
        IE(2, 4),
    ]
    zero4 = IPv4Address("0.0.0.0")
    v6 = record(
        fields,
        [zero4, zero4, IPv6Address("2001:db8::1"), IPv6Address("2001:db8::2"), 58, 0, 0x8100, 1],
    )
    v4rec = record(
        fields,
        [
            IPv4Address("192.0.2.1"),
            IPv4Address("192.0.2.2"),
            IPv6Address("::"),
            IPv6Address("::"),
            1,
            0x0B00,
            0,
            1,
        ],
    )
    message = ipfix_message([flowset(2, ipfix_template(256, fields)), flowset(256, v6 + v4rec)])
    r6, r4 = decode(message, DecoderState())
    assert (r6.proto, r6.dport, r4.proto, r4.dport) == (58, 0x8100, 1, 0x0B00)


def test_icmp_without_icmp_elements_keeps_the_exporters_ports() -> None:
    """NetFlow v5 and most v9 exporters already put type/code in the destination port."""
    packet = v9_packet(
        [
            flowset(0, v9_template(256, V4)),
            flowset(256, record(V4, v4(proto=1, sport=0, dport=0x0301))),
        ]
    )
    [r] = decode(packet, DecoderState())
    assert (r.sport, r.dport) == (0, 0x0301)


@pytest.mark.parametrize("extension", [b"", bytes([58, 0]) + bytes(6)])
def test_sflow_raw_icmpv6_header_gives_type_and_code(extension: bytes) -> None:
    icmp6 = bytes([129, 0, 0, 0]) + struct.pack("!HH", 0x1234, 1)
    first = 0 if extension else 58
    frame = ethernet(ipv6("2001:db8::a", "2001:db8::b", first, extension + icmp6), 0x86DD)
    sample = sflow_flow_sample([sflow_raw_header(frame, frame_length=len(frame) + 4)], rate=1)
    [r] = decode(sflow_datagram([sample]), DecoderState())
    assert (r.proto, r.sport, r.dport) == (58, 0, 0x8100)


# -- 4. Cisco ASA NSEL counters -------------------------------------------------------------------

#: A Cisco ASA NSEL flow template, as the ASA documentation describes it: connection id,
#: 5-tuple, ICMP type/code, firewall event, event and create times, initiator/responder
#: octets (4 bytes), initiator/responder packets (8 bytes); no packetDeltaCount or
#: octetDeltaCount.
NSEL = [
    IE(148, 4),
    IE(8, 4),
    IE(7, 2),
    IE(12, 4),
    IE(11, 2),
    IE(4, 1),
    IE(176, 1),
    IE(177, 1),
    IE(233, 1),
    IE(323, 8),
    IE(152, 8),
    IE(231, 4),
    IE(232, 4),
    IE(298, 8),
    IE(299, 8),
]


def nsel(event: int, *, counters: tuple[int, int, int, int], proto: int = 17) -> bytes:
    values = [
        4242,
        IPv4Address("10.1.1.5"),
        53001,
        IPv4Address("192.0.2.53"),
        53,
        proto,
        0,
        0,
        event,
        1_700_000_000_900,
        1_700_000_000_100,
        *counters,
    ]
    return record(NSEL, values)


def test_asa_nsel_initiator_and_responder_counters() -> None:
    """The ASA exports no packetDeltaCount/octetDeltaCount: its records came out with 0
    packets and 0 bytes. initiatorOctets/Packets describe src -> dst (the record), and
    responderOctets/Packets the way back: a second record dst -> src."""
    packet = v9_packet(
        [
            flowset(0, v9_template(263, NSEL)),
            flowset(
                263,
                nsel(2, counters=(120, 4800, 2, 10))  # teardown: DNS query, amplified answer
                + nsel(1, counters=(0, 0, 0, 0)),  # create: no traffic counted yet
            ),
        ]
    )
    state = DecoderState()
    fwd, rev, created = decode(packet, state)
    assert (str(fwd.src), fwd.sport, str(fwd.dst), fwd.dport) == (
        "10.1.1.5",
        53001,
        "192.0.2.53",
        53,
    )
    assert (fwd.packets, fwd.bytes) == (2, 120)
    assert (str(rev.src), rev.sport, str(rev.dst), rev.dport) == (
        "192.0.2.53",
        53,
        "10.1.1.5",
        53001,
    )
    assert (rev.packets, rev.bytes) == (10, 4800)
    assert fwd.first == rev.first == 1_700_000_000_100
    assert (created.packets, created.bytes) == (0, 0)
    assert state.statistics().records == 3


def test_standard_counters_win_over_nsel_counters() -> None:
    fields = [*V4, IE(231, 4), IE(232, 4)]
    packet = v9_packet(
        [flowset(0, v9_template(256, fields)), flowset(256, record(fields, [*v4(), 999, 888]))]
    )
    [r] = decode(packet, DecoderState())
    assert (r.packets, r.bytes) == (5, 500)


# -- 5. options data before held data ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["netflow-v9", "ipfix"])
def test_held_data_is_replayed_after_the_options_data_of_the_template_datagram(fmt: str) -> None:
    """After a collector restart the exporter's data arrives first and is held; then one
    datagram brings the data template, the options template and the sampling options data.
    The held records used to be replayed as soon as their template was read, before the
    options data: sampling interval 1 "assumed" instead of the 1 in 10 announced."""
    if fmt == "netflow-v9":
        scope, options = SCOPE_V9, [IE(34, 4)]
        held = v9_packet([flowset(256, record(V4, v4(0)) + record(V4, v4(1)))])
        templates = v9_packet(
            [
                flowset(0, v9_template(256, V4)),
                flowset(1, v9_options_template(300, scope, options)),
                flowset(300, record(scope + options, [0, 10])),
            ]
        )
    else:
        scope, options = SCOPE_IPFIX, [IE(34, 4)]
        held = ipfix_message([flowset(256, record(V4, v4(0)) + record(V4, v4(1)))])
        templates = ipfix_message(
            [
                flowset(2, ipfix_template(256, V4)),
                flowset(3, ipfix_options_template(300, scope, options)),
                flowset(300, record(scope + options, [0, 10])),
            ]
        )
    state = DecoderState()
    assert decode(held, state) == []
    recs = decode(templates, state)
    assert [(r.sampling_interval, r.sampling_provenance) for r in recs] == [(10, "announced")] * 2
    assert state.statistics().pending_replayed == 1


def test_held_options_data_still_applies_before_newer_options_in_the_datagram() -> None:
    """Held options data is older than the options data beside its template: replayed first,
    so the newer announcement wins."""
    scope, options = SCOPE_IPFIX, [IE(34, 4)]
    state = DecoderState()
    decode(ipfix_message([flowset(300, record(scope + options, [0, 50]))]), state)
    decode(ipfix_message([flowset(256, record(V4, v4()))]), state)
    recs = decode(
        ipfix_message(
            [
                flowset(3, ipfix_options_template(300, scope, options)),
                flowset(300, record(scope + options, [0, 20])),
                flowset(2, ipfix_template(256, V4)),
            ]
        ),
        state,
    )
    assert [r.sampling_interval for r in recs] == [20]
