"""The signed report codec: round trips, strictness, and the size bound."""

from __future__ import annotations

import dataclasses
import ipaddress

import cbor2
import pytest

from overflowd import report as rpt
from overflowd.errors import ReportDecodeError, SignatureError
from overflowd.identity import NodeIdentity, verify_report
from tests.support.reports import make_payload

IDENTITY = NodeIdentity(seed=bytes(range(32)))


def test_round_trip_keeps_every_field() -> None:
    payload = make_payload()
    signed = IDENTITY.sign_report(payload)
    back = verify_report(signed.cose)
    assert back.payload == payload
    assert back.observer_key == IDENTITY.public_key
    assert back.report_id == signed.report_id == rpt.report_id(signed.cose)


def test_ipv6_report_with_three_contacts_fits_one_datagram() -> None:
    payload = make_payload(
        "2001:db8:1234:5678:9abc:def0:1234:5678",
        "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
        contacts=("mailto:abuse@example.net", "https://example.net/abuse", "tel:+1-555-0100"),
        packets=2**64 - 1,
    )
    signed = IDENTITY.sign_report(payload)
    assert len(signed.cose) + 4 <= 1200


def test_largest_possible_report_still_fits() -> None:
    """Every field at its limit: the bound in docs/protocol.md holds by construction."""
    contact = "mailto:" + "a" * (rpt.MAX_CONTACT_BYTES_TOTAL // rpt.MAX_CONTACTS - 7)
    big = rpt.Payload(
        kind="k" * rpt.MAX_KIND_BYTES,
        nonce=b"\xff" * 16,
        time=2**64 - 1,
        observer=rpt.Observer(contacts=(contact,) * rpt.MAX_CONTACTS, point="p" * 64),
        flow=rpt.Flow(
            src=ipaddress.IPv6Address("2001:db8::1"),
            dst=ipaddress.IPv6Address("2001:db8::2"),
            sport=65535,
            dport=65535,
            proto=255,
            packets=2**64 - 1,
            bytes=2**64 - 1,
            first=2**64 - 1,
            last=2**64 - 1,
            tcp_flags=65535,
            tos=255,
            src_as=2**32 - 1,
            dst_as=2**32 - 1,
        ),
        sampling=rpt.Sampling(
            probability=0.1234567890123,
            format="f" * 24,
            interval=2**32 - 1,
            provenance="overridden",
        ),
    )
    signed = IDENTITY.sign_report(big)
    assert len(signed.cose) <= rpt.MAX_REPORT_BYTES
    assert verify_report(signed.cose).payload == big


def test_flipping_any_byte_is_rejected() -> None:
    cose = IDENTITY.sign_report(make_payload()).cose
    for i in range(len(cose)):
        for mask in (0x01, 0x80):
            altered = bytearray(cose)
            altered[i] ^= mask
            with pytest.raises((ReportDecodeError, SignatureError)):
                verify_report(bytes(altered))


def test_truncation_at_every_offset_is_a_decode_error() -> None:
    cose = IDENTITY.sign_report(make_payload()).cose
    for i in range(len(cose)):
        with pytest.raises(ReportDecodeError):
            verify_report(cose[:i])


def test_signature_from_another_key_is_rejected() -> None:
    other = NodeIdentity.generate()
    payload = make_payload()
    forged = rpt.encode_signed(payload, IDENTITY.public_key, other.sign)
    with pytest.raises(SignatureError):
        verify_report(forged)


def _resign(outer: list[object], sign: NodeIdentity = IDENTITY) -> bytes:
    protected, unprotected, payload, _ = outer
    sig = sign.sign(rpt.sig_structure(protected, payload))  # type: ignore[arg-type]
    return bytes(cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, sig])))


def _parts(cose: bytes) -> list[object]:
    return list(cbor2.loads(cose).value)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda o: o.__setitem__(1, {4: b"x"}), "unprotected"),
        (
            lambda o: o.__setitem__(
                0, rpt._canonical({1: -7, 3: rpt.CONTENT_TYPE, 4: IDENTITY.public_key})
            ),
            "EdDSA",
        ),
        (
            lambda o: o.__setitem__(
                0, rpt._canonical({1: -8, 3: "application/cbor", 4: IDENTITY.public_key})
            ),
            "content type",
        ),
        (
            lambda o: o.__setitem__(
                0, rpt._canonical({1: -8, 2: [99], 3: rpt.CONTENT_TYPE, 4: IDENTITY.public_key})
            ),
            "critical",
        ),
        (
            lambda o: o.__setitem__(0, rpt._canonical({1: -8, 3: rpt.CONTENT_TYPE, 4: b"short"})),
            "kid",
        ),
        (lambda o: o.__setitem__(2, cbor2.dumps({"v": 1})), "missing"),
    ],
)
def test_well_signed_but_invalid_messages_are_refused(mutate: object, reason: str) -> None:
    outer = _parts(IDENTITY.sign_report(make_payload()).cose)
    mutate(outer)  # type: ignore[operator]
    with pytest.raises(ReportDecodeError, match=reason):
        verify_report(_resign(outer))


def test_non_deterministic_payload_is_refused() -> None:
    payload = make_payload()
    m = rpt.payload_to_map(payload)
    # Same content, keys in insertion order that is not the deterministic order.
    loose = cbor2.dumps(dict(sorted(m.items(), reverse=True)))
    assert loose != rpt.encode_payload(payload)
    protected = rpt.protected_header(IDENTITY.public_key)
    with pytest.raises(ReportDecodeError, match="deterministic"):
        verify_report(_resign([protected, {}, loose, b""]))


def test_untagged_and_non_canonical_outer_are_refused() -> None:
    cose = IDENTITY.sign_report(make_payload()).cose
    untagged = cose[1:]
    with pytest.raises(ReportDecodeError, match="tag 18"):
        verify_report(untagged)
    # 0x84 (array of 4) written in a longer form 0x98 0x04 is valid CBOR but not canonical.
    longer = cose[:1] + b"\x98\x04" + cose[2:]
    with pytest.raises(ReportDecodeError, match="canonical"):
        verify_report(longer)


def test_booleans_never_pass_for_numbers() -> None:
    m = rpt.payload_to_map(make_payload())
    m["flow"]["proto"] = True
    protected = rpt.protected_header(IDENTITY.public_key)
    with pytest.raises(ReportDecodeError, match=r"flow\.proto"):
        verify_report(_resign([protected, {}, rpt._canonical(m), b""]))


def test_unknown_payload_keys_are_ignored_but_signed() -> None:
    m = rpt.payload_to_map(make_payload())
    m["future"] = {"x": 1}
    protected = rpt.protected_header(IDENTITY.public_key)
    cose = _resign([protected, {}, rpt._canonical(m), b""])
    assert verify_report(cose).payload.flow.proto == 17


def test_invalid_payloads_are_refused_before_signing() -> None:
    bad = dataclasses.replace(make_payload(), kind="Not A Kind")
    with pytest.raises(ValueError, match="kind"):
        IDENTITY.sign_report(bad)
    mixed = make_payload("192.0.2.1", "2001:db8::1")
    with pytest.raises(ValueError, match="family"):
        IDENTITY.sign_report(mixed)


def test_oversized_input_is_refused_before_decoding() -> None:
    with pytest.raises(ReportDecodeError, match="more than"):
        verify_report(b"\xd2" * (rpt.MAX_REPORT_BYTES + 1))


def test_json_rendering_is_derived_from_the_payload() -> None:
    signed = IDENTITY.sign_report(make_payload())
    out = rpt.to_json(signed)
    assert out["id"] == signed.report_id
    assert out["flow"]["src"] == "192.0.2.1"
    assert out["observer"]["fingerprint"] == IDENTITY.fingerprint
    assert rpt.b64url_decode(out["cose"]) == signed.cose
    assert out["time"] == "2023-11-14T22:13:20.000Z"


def test_payload_values_the_encoder_refuses_are_a_decode_error() -> None:
    """An unknown key holding a self-referencing CBOR value (tags 28/29) decodes but cannot be
    re-encoded: it must be our ReportDecodeError, before any signature check (found in review:
    it used to escape as cbor2's ValueError and stop the in-band listener)."""
    m = rpt.payload_to_map(make_payload())
    m["zz"] = 0
    enc = rpt._canonical(m).replace(b"\x62zz\x00", b"\x62zz" + bytes.fromhex("d81c81d81d00"))
    assert enc != rpt._canonical(m)
    protected = rpt.protected_header(IDENTITY.public_key)
    cose = rpt._COSE_PREFIX + rpt._bstr(protected) + b"\xa0" + rpt._bstr(enc) + rpt._bstr(bytes(64))
    with pytest.raises(ReportDecodeError, match="re-encoded"):
        verify_report(cose)


def test_kind_with_a_trailing_newline_is_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        IDENTITY.sign_report(dataclasses.replace(make_payload(), kind="flow-seen\n"))
