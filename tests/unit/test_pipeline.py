"""Records become reports whatever their exporter put in them (found in review: a record with
a time before 1970 or a 32-bit TCP flags field used to raise out of the daemon)."""

from __future__ import annotations

import dataclasses
import ipaddress

from overflowd.config import Settings
from overflowd.flows import FlowRow
from overflowd.flowsample import SamplingPolicy
from overflowd.identity import NodeIdentity, verify_report
from overflowd.pipeline import SUSPECT_REASONS, ReportMaker


def row(**changes: object) -> FlowRow:
    base = FlowRow(
        src=ipaddress.ip_address("192.0.2.1"), dst=ipaddress.ip_address("198.51.100.1"),
        sport=1234, dport=80, proto=6, packets=10, bytes=1000, first=1_000, last=2_000,
        tcp_flags=2, tos=0, src_as=None, dst_as=None, exporter="192.0.2.9",
        observation_domain=0, format="netflow-v5", sampling_interval=1,
        sampling_provenance="assumed",
    )  # fmt: skip
    return base._replace(**changes)


def maker() -> ReportMaker:
    return ReportMaker.for_node(NodeIdentity.generate(), Settings(), SamplingPolicy(rate=1.0))


def test_out_of_range_exporter_values_are_clamped_not_fatal() -> None:
    odd = row(first=-100_000, last=-1, tcp_flags=0x10002, src_as=2**40, dst_as=-1,
              sampling_interval=2**33, packets=2**64 + 5)  # fmt: skip
    report = maker().make(odd, 1.0, 1_700_000_000_000)
    flow = verify_report(report.cose).payload.flow
    assert (flow.first, flow.last, flow.tcp_flags) == (0, 0, 0x0002)
    assert (flow.src_as, flow.dst_as, flow.packets) == (None, None, 2**64 - 1)
    assert verify_report(report.cose).payload.sampling.interval == 2**32 - 1


def test_unreportable_records_are_counted_and_skipped() -> None:
    m = maker()
    mixed = row(dst=ipaddress.ip_address("2001:db8::1"))
    reports = m.make_all([(mixed, 1.0), (row(), 1.0)], 1_700_000_000_000)
    assert len(reports) == 1 and m.unreportable == 1
    assert dataclasses.is_dataclass(reports[0])


def test_make_signs_the_payload_report_payload_builds_with_the_encoder_before() -> None:
    """make() builds the payload inline (clamps included) and signs it with the envelope: the
    same payload as report_payload, and the same COSE bytes as encode_signed, for plain and odd
    rows, a suspect one, and after the maker's observer is replaced."""
    from overflowd import report as rpt
    from overflowd.pipeline import report_payload

    m = maker()
    nonce = b"\x05" * rpt.NONCE_BYTES
    m.nonce = lambda n: nonce
    rows = [
        row(),
        row(first=-100_000, last=-1, tcp_flags=0x10002, src_as=2**40, dst_as=-1,
            sampling_interval=2**33, packets=2**64 + 5, bytes=-3, tos=0x1FF),
        row(sampling_interval=0, src_as=64500, dst_as=0, format="x" * 40),
        row(proto=17, sport=53, tcp_flags=0),  # amplification: flow-suspect
        row(tcp_flags=0x12),  # SYN-ACK: flow-seen
        row(src=ipaddress.ip_address("2001:db8::1"), dst=ipaddress.ip_address("2001:db8::2")),
    ]  # fmt: skip
    kinds = []
    for observer in (m.observer, rpt.Observer(contacts=("mailto:other@example.net",))):
        m.observer = observer
        for r in rows:
            report = m.make(r, 0.25, 1_700_000_000_000)
            expected = report_payload(r, 0.25, observer=observer, nonce=nonce,
                                      now_ms=1_700_000_000_000, kind=m.kind_of(r))  # fmt: skip
            assert report.payload == expected
            signed = rpt.encode_signed(expected, m.identity.public_key, m.identity.sign)
            assert report.cose == signed
            assert verify_report(report.cose).payload == expected
            # kind_of reads the policy's bits; the reasons by name say the same
            named = SUSPECT_REASONS.intersection(m.policy.explain(r)[2])
            assert expected.kind == ("flow-suspect" if named else "flow-seen")
            kinds.append(expected.kind)
    assert set(kinds) == {"flow-suspect", "flow-seen"}
