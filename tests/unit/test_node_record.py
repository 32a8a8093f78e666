"""The signed node record (``/v1/identity`` ``signed``): its codec in overflowd.peers, signed and
checked through overflowd.identity, and checked against pycose (an independent COSE)."""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycose.headers import KID, ContentType
from pycose.keys import OKPKey
from pycose.keys.curves import Ed25519
from pycose.messages import CoseMessage, Sign1Message

from overflowd import peers
from overflowd import report as rpt
from overflowd.errors import ReportDecodeError, SignatureError
from overflowd.identity import NodeIdentity, sign_node_record, verify_node_record, verify_report
from overflowd.peers import NODE_CONTENT_TYPE, NodeRecord, NodeRecordError
from tests.support.reports import make_payload

IDENT = NodeIdentity(seed=bytes(range(32)))
OTHER = NodeIdentity(seed=bytes(range(1, 33)))
NOW_MS = 1_780_000_000_000
CONTACTS = ("mailto:abuse@example.net", "https://example.net/abuse")


def signed(ident: NodeIdentity = IDENT, **over: object) -> bytes:
    fields: dict[str, object] = {
        "contacts": CONTACTS,
        "point": "edge-1",
        "endpoint": "http://127.0.0.1:9591/",
        "time_ms": NOW_MS,
    }
    fields.update(over)
    return sign_node_record(ident, **fields)  # type: ignore[arg-type]


def test_a_record_verifies_to_what_was_signed() -> None:
    record = verify_node_record(signed(), now_ms=NOW_MS)
    assert record == NodeRecord(
        key=IDENT.public_key,
        contacts=CONTACTS,
        point="edge-1",
        endpoint="http://127.0.0.1:9591/",
        time_ms=NOW_MS,
    )
    assert record.fingerprint == IDENT.fingerprint
    assert peers.record_to_json(record)["endpoint"] == "http://127.0.0.1:9591/"
    assert signed() == signed()  # deterministic: one record, one byte string


def test_pycose_reads_and_verifies_it() -> None:
    msg = CoseMessage.decode(signed())
    assert isinstance(msg, Sign1Message)
    assert msg.phdr[ContentType] == NODE_CONTENT_TYPE
    assert msg.phdr[KID] == IDENT.public_key
    assert cbor2.loads(msg.payload)["endpoint"] == "http://127.0.0.1:9591/"
    msg.key = OKPKey(crv=Ed25519, x=IDENT.public_key)
    assert msg.verify_signature()
    msg.key = OKPKey(crv=Ed25519, x=OTHER.public_key)
    assert not msg.verify_signature()


def test_every_flipped_bit_is_refused() -> None:
    data = signed()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises((NodeRecordError, SignatureError)):
            verify_node_record(bytes(bad))


def test_a_record_is_no_report_and_a_report_no_record() -> None:
    """Own content types: one signed thing can never be taken for the other."""
    report = IDENT.sign_report(make_payload())
    with pytest.raises(NodeRecordError, match="content type"):
        verify_node_record(report.cose)
    with pytest.raises(ReportDecodeError, match="content type"):
        verify_report(signed())


def _forge(payload: dict[str, object], kid: bytes, ident: NodeIdentity = IDENT) -> bytes:
    """A well-signed COSE_Sign1 over any payload map: what a hostile node could send."""
    protected = cbor2.dumps(
        {rpt.HDR_ALG: rpt.ALG_EDDSA, rpt.HDR_CONTENT_TYPE: NODE_CONTENT_TYPE, rpt.HDR_KID: kid},
        canonical=True,
    )
    body = cbor2.dumps(payload, canonical=True)
    sig = ident.sign(rpt.sig_structure(protected, body))
    return bytes(cbor2.dumps(cbor2.CBORTag(18, [protected, {}, body, sig]), canonical=True))


GOOD = {
    "v": 1,
    "key": IDENT.public_key,
    "contacts": list(CONTACTS),
    "point": "p",
    "endpoint": "",
    "time": NOW_MS,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"key": OTHER.public_key}, "key must be the 32-byte key the record is signed with"),
        ({"v": 2}, "version must be 1"),
        ({"v": True}, "version must be 1"),
        ({"time": "now"}, "time must be an integer"),
        ({"time": -1}, "time out of range"),
        ({"contacts": ["a", 1]}, "contacts must be a list of strings"),
        ({"contacts": [f"mailto:{i}@x" for i in range(5)]}, "at most 4 contacts"),
        ({"point": "x" * 65}, "point longer than 64 bytes"),
        ({"endpoint": "http://" + "e" * 600}, "endpoint longer than 512 bytes"),
        ({"extra": 1}, "payload must hold exactly"),
    ],
)
def test_bad_fields_are_refused_even_when_well_signed(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(NodeRecordError, match=message):
        verify_node_record(_forge({**GOOD, **change}, IDENT.public_key))


def test_the_forger_is_caught_by_the_key_it_claims() -> None:
    # OTHER signs a record naming IDENT's key as kid and key: the signature check fails.
    with pytest.raises(SignatureError):
        verify_node_record(_forge(GOOD, IDENT.public_key, ident=OTHER))
    assert verify_node_record(_forge(GOOD, IDENT.public_key)).key == IDENT.public_key


def test_non_canonical_and_oversized_input_is_refused() -> None:
    data = signed()
    msg = cbor2.loads(data)
    protected, _, payload, sig = msg.value
    # the same content with the array length written in two bytes: another byte string
    longer = (
        b"\xd2\x98\x04" + cbor2.dumps(protected) + b"\xa0" + cbor2.dumps(payload) + cbor2.dumps(sig)
    )
    with pytest.raises(NodeRecordError, match="canonical"):
        verify_node_record(longer)
    with pytest.raises(NodeRecordError, match="more than 4096"):
        verify_node_record(b"\xd2" + bytes(5000))
    with pytest.raises(NodeRecordError, match="unprotected"):
        verify_node_record(bytes(cbor2.dumps(cbor2.CBORTag(18, [protected, {1: 2}, payload, sig]))))


def test_stale_and_future_records_are_refused_when_a_clock_is_given() -> None:
    day_ms = 86_400_000
    old = signed(time_ms=NOW_MS - day_ms - 1)
    verify_node_record(old)  # no clock: the caller decides
    with pytest.raises(NodeRecordError, match="stale"):
        verify_node_record(old, now_ms=NOW_MS)
    with pytest.raises(NodeRecordError, match="future"):
        verify_node_record(signed(time_ms=NOW_MS + 301_000), now_ms=NOW_MS)
    verify_node_record(signed(time_ms=NOW_MS + 299_000), now_ms=NOW_MS)


def test_signing_refuses_what_the_parser_would_refuse() -> None:
    with pytest.raises(ValueError, match="point"):
        signed(point="x" * 65)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_the_record_error(data: bytes) -> None:
    try:
        peers.decode_node_record(data)
    except NodeRecordError:
        pass


def test_every_truncation_raises_the_record_error() -> None:
    data = signed()
    for n in range(len(data)):
        with pytest.raises(NodeRecordError):
            peers.decode_node_record(data[:n])
