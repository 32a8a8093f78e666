"""XARF v4 rendering, checked by the format's own library (``xarf``, PyPI) and by our verifier.

Every document goes through ``json.dumps``/``xarf.parse`` (what a receiving abuse desk runs),
must give no error and no warning, and its evidence must verify as the observer's signature.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import pytest
import xarf
from hypothesis import given, settings
from hypothesis import strategies as st
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import CoseMessage, Sign1Message

from overflowd.errors import ReportDecodeError, SignatureError
from overflowd.formats import FormatError, cose_from_xarf, xarf_reports
from overflowd.formats._common import MAX_COSE_B64_CHARS
from overflowd.formats.xarf import MAX_EVIDENCE, unfit_reason
from overflowd.identity import NodeIdentity, verify_report
from overflowd.report import SignedReport, key_fingerprint
from tests.support.reports import make_payload, varied_payloads

OBSERVER = NodeIdentity(seed=bytes(range(32)))
OTHER = NodeIdentity(seed=bytes(range(1, 33)))
_RFC3339_MAX_MS = 253_402_300_799_999


def _pycose_verifies(cose: bytes, public_key: bytes) -> bool:
    """The independent COSE implementation's verdict (as tests/unit/test_protocol_vectors.py)."""
    msg = CoseMessage.decode(cose)
    assert isinstance(msg, Sign1Message)
    msg.key = OKPKey(crv=Ed25519, x=public_key)
    return bool(msg.verify_signature())


def _sign(identity: NodeIdentity = OBSERVER, **flow: Any) -> SignedReport:
    src, dst = flow.pop("src", "192.0.2.1"), flow.pop("dst", "198.51.100.2")
    payload = make_payload(src, dst, contacts=flow.pop("contacts", ("mailto:abuse@example.net",)))
    return identity.sign_report(
        dataclasses.replace(payload, flow=dataclasses.replace(payload.flow, **flow))
    )


def _parsed(doc: dict[str, Any]) -> xarf.DdosReport:
    """What a receiver gets: the JSON text parsed and validated by the xarf library."""
    result = xarf.parse(json.dumps(doc))
    assert result.errors == []
    assert result.warnings == []  # no field the XARF schema does not define
    assert isinstance(result.report, xarf.DdosReport)
    return result.report


def _round_trip(docs: list[dict[str, Any]]) -> list[SignedReport]:
    return [verify_report(cose) for cose in cose_from_xarf(json.loads(json.dumps(docs)))]


@pytest.mark.parametrize(
    ("src", "dst"), [("192.0.2.1", "198.51.100.2"), ("2001:db8::1", "2001:db8:ffff::2")]
)
def test_one_incident_validates_and_its_evidence_verifies(src: str, dst: str) -> None:
    reports = [_sign(src=src, dst=dst, first=1_700_000_000_000 + i, last=1_700_000_009_999)
               for i in range(3)]  # fmt: skip
    (doc,) = xarf_reports(reports)
    parsed = _parsed(doc)
    assert (parsed.category, parsed.type, parsed.protocol) == ("connection", "ddos", "udp")
    assert (parsed.source_identifier, parsed.source_port) == (src, 53)
    assert doc["destination_ip"] == dst and doc["destination_port"] == 40000
    assert parsed.first_seen == "2023-11-14T22:13:20.000Z"  # the flows' own times
    assert parsed.last_seen == "2023-11-14T22:13:29.999Z"
    assert doc["attack_vector"] == "dns_amplification"
    assert parsed.reporter.contact == "abuse@example.net"
    assert f"observer:{key_fingerprint(OBSERVER.public_key)}" in doc["tags"]
    assert parsed.evidence is not None
    for item, report in zip(
        parsed.evidence, sorted(reports, key=lambda r: r.payload.flow.first), strict=True
    ):
        assert item.content_type == 'application/cose; cose-type="cose-sign1"'
        assert item.hash == f"sha256:{report.report_id}"
        assert base64.b64decode(item.payload) == report.cose
    back = _round_trip([doc])
    for cose in cose_from_xarf(json.loads(json.dumps([doc]))):
        assert _pycose_verifies(cose, OBSERVER.public_key)
        assert not _pycose_verifies(cose, OTHER.public_key)  # the check can fail
    assert {r.report_id for r in back} == {r.report_id for r in reports}
    assert all(r.observer_key == OBSERVER.public_key for r in back)


def test_strict_mode_misses_only_what_docs_formats_md_says() -> None:
    """Strict XARF makes recommended fields required: we leave out only ``confidence``
    (a signature says who saw a flow, not how sure anyone is it was abuse), and the peak rates
    when no flow record lasts a second."""
    long_flow, short_flow = _sign(), _sign(first=1_700_000_000_000, last=1_700_000_000_010)
    for report, missing in ((long_flow, {"confidence"}),
                            (short_flow, {"confidence", "peak_pps", "peak_bps"})):  # fmt: skip
        result = xarf.parse(json.dumps(xarf_reports([report])[0]), strict=True)
        assert {e.message.split("'")[1] for e in result.errors} == missing


def test_incidents_split_by_observer_source_and_destination() -> None:
    reports = [
        _sign(),
        _sign(),  # same incident as the first
        _sign(src="192.0.2.9"),  # another source: its own abuse desk
        _sign(dst="198.51.100.7"),  # another destination
        _sign(OTHER),  # another observer
        _sign(sport=54),  # another source port (CGNAT operators map address + port)
    ]
    docs = xarf_reports([*reports, reports[0]])  # a duplicate counts once
    assert sorted(len(d["evidence"]) for d in docs) == [1, 1, 1, 1, 2]
    for doc in docs:
        _parsed(doc)
    assert sorted(r.report_id for r in _round_trip(docs)) == sorted(r.report_id for r in reports)
    assert xarf_reports(list(reversed(reports))) == docs  # same reports, same documents, ids too


def test_more_than_fifty_reports_split_into_several_documents() -> None:
    reports = [_sign() for _ in range(MAX_EVIDENCE + 3)]
    docs = xarf_reports(reports)
    assert [len(d["evidence"]) for d in docs] == [MAX_EVIDENCE, 3]
    assert len({d["report_id"] for d in docs}) == 2
    for doc in docs:
        _parsed(doc)
    assert len(_round_trip(docs)) == MAX_EVIDENCE + 3


def test_the_node_contact_is_reporter_and_sender_when_given() -> None:
    doc = xarf_reports([_sign(contacts=())], reporter_contact="mailto:abuse@victim.example",
                       reporter_name="Victim Networks")[0]  # fmt: skip
    parsed = _parsed(doc)
    assert parsed.reporter.model_dump() == parsed.sender.model_dump() == {
        "org": "Victim Networks", "contact": "abuse@victim.example", "domain": "victim.example"
    }  # fmt: skip
    with pytest.raises(FormatError, match="needs a reporter contact"):
        xarf_reports([_sign()], reporter_name="Victim Networks")


def test_the_observer_is_named_by_its_newest_contacts() -> None:
    old = _sign(contacts=("mailto:old@example.net",))
    new = OBSERVER.sign_report(
        dataclasses.replace(old.payload, time=old.payload.time + 1, nonce=b"n" * 16,
                            observer=dataclasses.replace(old.payload.observer,
                                                         contacts=("mailto:new@example.net",)))
    )  # fmt: skip
    (doc,) = xarf_reports([new, old])
    assert _parsed(doc).reporter.contact == "new@example.net"
    assert len(doc["evidence"]) == 2


def test_an_observer_without_email_needs_the_reporter_contact() -> None:
    report = _sign(contacts=("https://example.net/abuse", "tel:+1-555-0100"))
    with pytest.raises(FormatError, match=report.report_id):
        xarf_reports([report])
    with pytest.raises(FormatError, match="not an e-mail"):
        xarf_reports([report], reporter_contact="https://example.net/abuse")
    second = _sign(contacts=("https://example.net/abuse", "mailto:noc@example.org?subject=x"))
    assert xarf_reports([second])[0]["reporter"]["contact"] == "noc@example.org"


@pytest.mark.parametrize(
    ("flow", "why"),
    [({"proto": 47}, "protocol 47"), ({"proto": 1, "sport": 0, "dport": 0x0800}, "source port 0")],
)
def test_what_xarf_cannot_say_is_refused_or_skipped(flow: dict[str, int], why: str) -> None:
    unfit, fit = _sign(**flow), _sign()
    with pytest.raises(FormatError, match=why):
        xarf_reports([unfit, fit])
    docs = xarf_reports([unfit, fit], skip_unfit=True)
    assert [r.report_id for r in _round_trip(docs)] == [fit.report_id]


def test_tampered_evidence_fails_verification() -> None:
    doc = json.loads(json.dumps(xarf_reports([_sign()])))
    item = doc[0]["evidence"][0]
    cose = bytearray(base64.b64decode(item["payload"]))
    cose[-1] ^= 1  # one bit of the signature
    item["payload"] = base64.b64encode(bytes(cose)).decode()
    with pytest.raises(FormatError, match="SHA-256"):
        cose_from_xarf(doc)
    item["hash"] = "sha256:" + __import__("hashlib").sha256(bytes(cose)).hexdigest()
    (tampered,) = cose_from_xarf(doc)  # a forger can fix the hash, never the signature
    with pytest.raises((SignatureError, ReportDecodeError)):
        verify_report(tampered)


def test_hostile_evidence_is_refused_without_decoding_it() -> None:
    base = {"content_type": 'application/cose; cose-type="cose-sign1"'}
    for payload, why in (
        ("A" * (MAX_COSE_B64_CHARS + 4), "longer"),
        ("!!!!", "base64"),
        (7, "string"),
    ):
        with pytest.raises(FormatError, match=why):
            cose_from_xarf({"evidence": [{**base, "payload": payload}]})
    with pytest.raises(FormatError, match="not a list"):
        cose_from_xarf({"evidence": "x"})
    assert cose_from_xarf({"evidence": [{"content_type": "text/plain", "payload": "eA=="}]}) == []


@settings(max_examples=40)
@given(st.lists(varied_payloads(max_time_ms=_RFC3339_MAX_MS), min_size=1, max_size=4))
def test_any_flow_validates_or_is_refused_by_name(payloads: list[Any]) -> None:
    reports = [OBSERVER.sign_report(p) for p in payloads]
    fit = {r.report_id: r for r in reports if unfit_reason(r) is None}
    if len(fit) < len({r.report_id for r in reports}):
        with pytest.raises(FormatError, match="report "):
            xarf_reports(reports, reporter_contact="abuse@victim.example")
    docs = xarf_reports(reports, reporter_contact="abuse@victim.example", skip_unfit=True)
    for doc in docs:
        _parsed(doc)
    back = _round_trip(docs)
    assert sorted(r.report_id for r in back) == sorted(fit)
    assert {r.payload for r in back} == {r.payload for r in fit.values()}


def test_a_time_rfc3339_cannot_write_is_refused() -> None:
    with pytest.raises(FormatError, match="RFC 3339"):
        xarf_reports([_sign(first=_RFC3339_MAX_MS + 1, last=_RFC3339_MAX_MS + 1)])
