"""Standard Webhooks v1a signatures and the receiver's library call, checked against an
independent Ed25519 (the ``cryptography`` package) in both directions."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from overflowd import report as rpt
from overflowd.errors import DecodeError, ReportDecodeError, SignatureError
from overflowd.identity import NodeIdentity, check_signature
from overflowd.receiver import SeenIds, UntrustedKeyError, encode_body, verify_delivery
from overflowd.wire import webhook as wh
from tests.support.reports import make_payload

SEED = bytes(range(32))
NOW = 1_700_000_100


@pytest.fixture
def identity() -> NodeIdentity:
    return NodeIdentity(seed=SEED)


@pytest.fixture
def signed(identity: NodeIdentity) -> rpt.SignedReport:
    return identity.sign_report(make_payload())


def deliver(
    identity: NodeIdentity, report: rpt.SignedReport, ts: int = NOW
) -> tuple[dict[str, str], bytes]:
    body = encode_body(report)
    return wh.sign(report.report_id, ts, body, identity.sign), body


# -- the wire module ---------------------------------------------------------------------------


def test_headers_have_the_standard_form(identity: NodeIdentity, signed: rpt.SignedReport) -> None:
    headers, _body = deliver(identity, signed)
    assert headers["webhook-id"] == signed.report_id
    assert headers["webhook-timestamp"] == str(NOW)
    scheme, _, sig = headers["webhook-signature"].partition(",")
    assert scheme == "v1a"
    assert len(base64.b64decode(sig, validate=True)) == 64
    assert headers["content-type"] == "application/json"
    assert wh.signed_content("abc", 12, b"{}") == b"abc.12.{}"


def test_independent_ed25519_verifies_our_signature(
    identity: NodeIdentity, signed: rpt.SignedReport
) -> None:
    headers, body = deliver(identity, signed)
    signature = base64.b64decode(headers["webhook-signature"].split(",", 1)[1])
    public = Ed25519PublicKey.from_public_bytes(identity.public_key)
    exact = f"{signed.report_id}.{NOW}.".encode() + body
    public.verify(signature, exact)  # raises InvalidSignature if not
    with pytest.raises(InvalidSignature):
        public.verify(signature, exact + b" ")


def test_we_verify_a_signature_made_by_independent_ed25519(signed: rpt.SignedReport) -> None:
    # The same seed in the cryptography package; the report inside is signed by PyNaCl with the
    # same key, so this checks our webhook verification alone against an outside signer.
    private = Ed25519PrivateKey.from_private_bytes(SEED)
    body = encode_body(signed)
    sig = private.sign(f"{signed.report_id}.{NOW}.".encode() + body)
    headers = {
        "Webhook-Id": signed.report_id,
        "Webhook-Timestamp": str(NOW),
        "Webhook-Signature": "v1a," + base64.b64encode(sig).decode(),
    }
    assert verify_delivery(headers, body, now=NOW) == signed
    bad = private.sign(f"{signed.report_id}.{NOW + 1}.".encode() + body)
    headers["Webhook-Signature"] = "v1a," + base64.b64encode(bad).decode()
    with pytest.raises(SignatureError):
        verify_delivery(headers, body, now=NOW)


def test_any_of_several_signatures_may_verify(
    identity: NodeIdentity, signed: rpt.SignedReport
) -> None:
    headers, body = deliver(identity, signed)
    other = base64.b64encode(bytes(64)).decode()
    headers["webhook-signature"] = f"v1,whatever= v1a,{other} " + headers["webhook-signature"]
    assert verify_delivery(headers, body, now=NOW).report_id == signed.report_id


def test_verify_module_level(identity: NodeIdentity) -> None:
    headers = wh.sign("msg_1", NOW, b"hello", identity.sign)
    parsed = wh.verify(
        headers, b"hello", public_key=identity.public_key, check=check_signature, now=NOW
    )
    assert parsed.msg_id == "msg_1"
    with pytest.raises(SignatureError):
        wh.verify(headers, b"hellO", public_key=identity.public_key, check=check_signature, now=NOW)


@pytest.mark.parametrize(
    "change",
    [
        {"webhook-id": ""},
        {"webhook-id": "a b"},
        {"webhook-id": "x" * 300},
        {"webhook-timestamp": "12.5"},
        {"webhook-timestamp": "-5"},
        {"webhook-timestamp": "9" * 20},
        {"webhook-signature": "v1a"},
        {"webhook-signature": "v1a,!!!"},
        {"webhook-signature": "v1a,AAAA"},
        {"webhook-signature": "v1,abc"},
        {"webhook-signature": " ".join(["v1,x"] * 20)},
        {"webhook-signature": "v1a," + "A" * 3000},
    ],
)
def test_malformed_headers(
    identity: NodeIdentity, signed: rpt.SignedReport, change: dict[str, str]
) -> None:
    headers, _body = deliver(identity, signed)
    headers.update(change)
    with pytest.raises(wh.WebhookDecodeError):
        wh.parse_headers(headers)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-timestamp", "webhook-signature"])
def test_missing_or_repeated_header(
    identity: NodeIdentity, signed: rpt.SignedReport, name: str
) -> None:
    headers, body = deliver(identity, signed)
    pairs = [(k, v) for k, v in headers.items() if k != name]
    with pytest.raises(wh.WebhookDecodeError, match="missing"):
        verify_delivery(pairs, body, now=NOW)
    pairs = [*headers.items(), (name.upper(), headers[name])]
    with pytest.raises(wh.WebhookDecodeError, match="more than once"):
        verify_delivery(pairs, body, now=NOW)


# -- verify_delivery ---------------------------------------------------------------------------


def test_a_valid_delivery_returns_the_report(
    identity: NodeIdentity, signed: rpt.SignedReport
) -> None:
    headers, body = deliver(identity, signed)
    asgi_style = [(k.encode(), v.encode()) for k, v in headers.items()]
    got = verify_delivery(asgi_style, body, now=NOW, trusted_keys={identity.public_key})
    assert got == signed


@pytest.mark.parametrize("skew", [-301, 301, -10_000, 10_000])
def test_stale_or_future_timestamps_are_refused(
    identity: NodeIdentity, signed: rpt.SignedReport, skew: int
) -> None:
    headers, body = deliver(identity, signed, ts=NOW + skew)
    with pytest.raises(wh.StaleWebhookError):
        verify_delivery(headers, body, now=NOW)


@pytest.mark.parametrize("skew", [-300, 0, 300])
def test_timestamps_inside_the_window_pass(
    identity: NodeIdentity, signed: rpt.SignedReport, skew: int
) -> None:
    headers, body = deliver(identity, signed, ts=NOW + skew)
    assert verify_delivery(headers, body, now=NOW) == signed


def test_every_single_byte_change_of_the_body_is_refused(
    identity: NodeIdentity, signed: rpt.SignedReport
) -> None:
    headers, body = deliver(identity, signed)
    for i in range(0, len(body), 7):
        altered = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]
        with pytest.raises((DecodeError, SignatureError)):
            verify_delivery(headers, altered, now=NOW)


def test_forged_by_another_key(signed: rpt.SignedReport) -> None:
    # A forger signs the webhook with its own key around somebody else's report.
    forger = NodeIdentity(seed=bytes(31) + b"\x01")
    headers, body = deliver(forger, signed)
    with pytest.raises(SignatureError):
        verify_delivery(headers, body, now=NOW)


def test_own_report_own_key_but_not_trusted(signed: rpt.SignedReport) -> None:
    stranger = NodeIdentity(seed=bytes(31) + b"\x02")
    theirs = stranger.sign_report(make_payload())
    headers, body = deliver(stranger, theirs)
    assert verify_delivery(headers, body, now=NOW) == theirs
    with pytest.raises(UntrustedKeyError):
        verify_delivery(headers, body, now=NOW, trusted_keys={signed.observer_key})


def test_id_must_be_the_report_id(identity: NodeIdentity, signed: rpt.SignedReport) -> None:
    body = encode_body(signed)
    headers = wh.sign("0" * 64, NOW, body, identity.sign)
    with pytest.raises(wh.WebhookDecodeError, match="webhook-id"):
        verify_delivery(headers, body, now=NOW)


def test_body_json_must_agree_with_the_cose(
    identity: NodeIdentity, signed: rpt.SignedReport
) -> None:
    # Correctly signed by the report's own key, but the JSON says another destination.
    doc = rpt.to_json(signed)
    doc["flow"]["dst"] = "203.0.113.9"
    body = json.dumps(doc).encode()
    headers = wh.sign(signed.report_id, NOW, body, identity.sign)
    with pytest.raises(wh.WebhookDecodeError, match="agree"):
        verify_delivery(headers, body, now=NOW)
    # Extra fields from a newer sender are fine.
    doc = rpt.to_json(signed)
    doc["future"] = {"x": 1}
    body = json.dumps(doc).encode()
    headers = wh.sign(signed.report_id, NOW, body, identity.sign)
    assert verify_delivery(headers, body, now=NOW) == signed


def test_a_report_signed_wrongly_inside_a_valid_webhook(identity: NodeIdentity) -> None:
    good = identity.sign_report(make_payload())
    cose = bytearray(good.cose)
    cose[-1] ^= 1  # the COSE signature's last byte
    broken = rpt.SignedReport(
        cose=bytes(cose), observer_key=good.observer_key, payload=good.payload
    )
    body = encode_body(broken)
    headers = wh.sign(broken.report_id, NOW, body, identity.sign)
    with pytest.raises(SignatureError):
        verify_delivery(headers, body, now=NOW)


@pytest.mark.parametrize(
    "body",
    [b"", b"[]", b"{}", b'{"cose": 5}', b'{"cose": "***"}', b'{"cose": "AAAA"}', b"\xff\xfe"],
)
def test_malformed_bodies(identity: NodeIdentity, body: bytes) -> None:
    headers = wh.sign("x", NOW, body, identity.sign)
    with pytest.raises(DecodeError) as info:
        verify_delivery(headers, body, now=NOW)
    assert isinstance(info.value, wh.WebhookDecodeError | ReportDecodeError)


def test_oversized_body(identity: NodeIdentity) -> None:
    body = b" " * (64 * 1024 + 1)
    headers = wh.sign("x", NOW, body, identity.sign)
    with pytest.raises(wh.WebhookDecodeError, match="larger"):
        verify_delivery(headers, body, now=NOW)


def test_seen_ids_are_bounded() -> None:
    seen = SeenIds(capacity=3, initial=["a"])
    assert "a" in seen
    assert seen.add("b") and seen.add("c") and not seen.add("a")
    assert seen.add("d")  # evicts the oldest, "b" ("a" was refreshed)
    assert "b" not in seen and "a" in seen and len(seen) == 3
    assert seen.statistics().evicted == 1
    with pytest.raises(ValueError):
        SeenIds(capacity=0)


def test_the_example_in_protocol_md_section_7() -> None:
    import hashlib
    import re
    from pathlib import Path

    from overflowd.identity import verify_report

    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    section = text.split("## 7. Webhooks", 1)[1].split("## Test vectors", 1)[0]
    block = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))  # type: ignore[union-attr]
    vector = block["vectors"]["ipv4-flow-seen"]
    report = verify_report(bytes.fromhex(vector["cose_hex"]))
    body = encode_body(report)
    headers = wh.sign(
        report.report_id, 1_700_000_000, body, NodeIdentity(bytes.fromhex(block["seed_hex"])).sign
    )
    assert f"{len(body)} bytes" in section
    assert hashlib.sha256(body).hexdigest() in section
    assert f"webhook-id: {headers['webhook-id']}" in section
    assert f"webhook-signature: {headers['webhook-signature']}" in section
    # and it verifies independently
    sig = base64.b64decode(headers["webhook-signature"][4:])
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(block["public_key_hex"])).verify(
        sig, f"{report.report_id}.1700000000.".encode() + body
    )
