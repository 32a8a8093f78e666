"""Standard Webhooks ``v1`` (HMAC-SHA256, ``whsec_`` secrets) beside ``v1a``, sans-IO.

The HMAC is checked against the specification's own test vector (the reference libraries'
``test_sign_function``) and against an independent HMAC (the ``cryptography`` package); the
Ed25519 entry against ``cryptography``'s Ed25519. The packages from PyPI and npm verify real
deliveries in tests/service/test_stdwebhooks.py.
"""

from __future__ import annotations

import base64
import string

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as chmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given, settings
from hypothesis import strategies as st

from overflowd.errors import SignatureError
from overflowd.identity import NodeIdentity, check_signature
from overflowd.receiver import encode_body, verify_delivery
from overflowd.wire import webhook as wh
from tests.support.reports import make_payload

IDENTITY = NodeIdentity(seed=bytes(range(32)))
NOW = 1_700_000_100
KEY_A = bytes(range(24))
KEY_B = bytes(range(100, 132))

# The specification's vector (libraries/*/tests: test_sign_function).
VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_V1 = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def independent_hmac(key: bytes, content: bytes) -> str:
    h = chmac.HMAC(key, hashes.SHA256())
    h.update(content)
    return base64.b64encode(h.finalize()).decode()


def entries(headers: dict[str, str]) -> list[tuple[str, str]]:
    return [
        (version, value)
        for version, _, value in (e.partition(",") for e in headers["webhook-signature"].split())
    ]


# -- secrets -----------------------------------------------------------------------------------


def test_the_specification_vector() -> None:
    key = wh.parse_secret(VECTOR_SECRET)
    assert len(key) == 24
    headers = wh.sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY, IDENTITY.sign, secrets=[key])
    assert headers["webhook-signature"].split()[0] == VECTOR_V1
    # Either form of the secret signs alike.
    again = wh.sign(VECTOR_ID, VECTOR_TS, VECTOR_BODY, IDENTITY.sign, secrets=[VECTOR_SECRET])
    assert again == headers
    parsed = wh.verify_hmac(headers, VECTOR_BODY, VECTOR_SECRET, now=VECTOR_TS)
    assert (parsed.msg_id, parsed.timestamp) == (VECTOR_ID, VECTOR_TS)


def test_format_and_parse_round_trip() -> None:
    for n in (24, 25, 26, 32, 64):
        key = bytes(range(n))
        text = wh.format_secret(key)
        assert text.startswith("whsec_")
        assert wh.parse_secret(text) == key
        assert wh.parse_secret(f"  {text}\n") == key  # a secret file's newline
        assert wh.parse_secret(text.rstrip("=")) == key  # padding is optional, as in both libraries


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "starts with whsec_"),
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "starts with whsec_"),  # the bare base64
        ("whsk_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "starts with whsec_"),  # an Ed25519 key
        ("whsec_", "bytes, not 0"),
        ("whsec_" + base64.b64encode(bytes(31)).decode() + "=", "standard base64"),  # "==="
        ("whsec_" + base64.b64encode(bytes(32)).decode() + "x", "standard base64"),
        ("whsec_" + base64.urlsafe_b64encode(b"\xfb\xff" * 12).decode(), "standard base64"),
        ("whsec_AAAA AAAA", "standard base64"),
        ("whsec_" + base64.b64encode(bytes(23)).decode(), "24 to 64 bytes, not 23"),
        ("whsec_" + base64.b64encode(bytes(65)).decode(), "24 to 64 bytes, not 65"),
    ],
)
def test_malformed_secrets_are_refused_without_echoing_them(text: str, match: str) -> None:
    with pytest.raises(wh.WebhookSecretError, match=match) as info:
        wh.parse_secret(text)
    secret_part = text.removeprefix("whsec_")
    assert len(secret_part) < 4 or secret_part not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_a_non_canonical_encoding_is_refused() -> None:
    # "AB==" and "AA==" decode to the same byte in lenient decoders; only one is canonical.
    canonical = base64.b64encode(bytes(25)).decode()
    assert canonical.endswith("A==")
    assert wh.parse_secret("whsec_" + canonical) == bytes(25)
    with pytest.raises(wh.WebhookSecretError):
        wh.parse_secret("whsec_" + canonical[:-3] + "B==")


def test_raw_keys_are_bounded_too() -> None:
    with pytest.raises(wh.WebhookSecretError, match="not 8"):
        wh.sign("m", NOW, b"{}", IDENTITY.sign, secrets=[bytes(8)])
    with pytest.raises(wh.WebhookSecretError, match="not 8"):
        wh.format_secret(bytes(8))
    with pytest.raises(TypeError):
        wh.sign("m", NOW, b"{}", IDENTITY.sign, secrets=KEY_A)  # one secret, not a sequence
    with pytest.raises(TypeError):
        wh.sign("m", NOW, b"{}", IDENTITY.sign, secrets=[42])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at most 7"):
        wh.sign("m", NOW, b"{}", IDENTITY.sign, secrets=[KEY_A] * 8)


# -- signing -----------------------------------------------------------------------------------


def test_hmac_entries_come_first_then_ed25519() -> None:
    body = encode_body(IDENTITY.sign_report(make_payload()))
    headers = wh.sign("msg_1", NOW, body, IDENTITY.sign, secrets=[KEY_A, KEY_B])
    got = entries(headers)
    assert [v for v, _ in got] == ["v1", "v1", "v1a"]
    content = f"msg_1.{NOW}.".encode() + body
    assert got[0][1] == independent_hmac(KEY_A, content)
    assert got[1][1] == independent_hmac(KEY_B, content)
    Ed25519PublicKey.from_public_bytes(IDENTITY.public_key).verify(
        base64.b64decode(got[2][1]), content
    )
    # Without secrets the header is exactly what it always was: one v1a entry.
    plain = wh.sign("msg_1", NOW, body, IDENTITY.sign)
    assert plain["webhook-signature"] == f"v1a,{got[2][1]}"
    assert {k: v for k, v in headers.items() if k != "webhook-signature"} == {
        k: v for k, v in plain.items() if k != "webhook-signature"
    }


def test_the_largest_header_we_sign_is_one_we_parse() -> None:
    keys = [bytes([i]) * 64 for i in range(wh.MAX_SECRETS)]
    headers = wh.sign("x" * wh.MAX_ID_BYTES, 10**11, b"{}", IDENTITY.sign, secrets=keys)
    assert len(headers["webhook-signature"]) <= wh.MAX_SIGNATURE_HEADER_BYTES
    assert len(wh.parse_headers(headers).signatures) == 1
    assert len(wh.parse_headers(headers, scheme="v1").signatures) == wh.MAX_SECRETS
    for key in keys:
        wh.verify_hmac(headers, b"{}", key, now=10**11)


# -- verifying ---------------------------------------------------------------------------------


def test_verify_hmac_accepts_any_of_the_secrets_and_refuses_others() -> None:
    headers = wh.sign("msg_2", NOW, b"{}", IDENTITY.sign, secrets=[KEY_A, KEY_B])
    for key in (KEY_A, KEY_B, wh.format_secret(KEY_A)):
        assert wh.verify_hmac(headers, b"{}", key, now=NOW).msg_id == "msg_2"
    with pytest.raises(SignatureError, match="matches the secret"):
        wh.verify_hmac(headers, b"{}", bytes(24), now=NOW)
    with pytest.raises(SignatureError):
        wh.verify_hmac(headers, b"{} ", KEY_A, now=NOW)
    with pytest.raises(SignatureError):
        wh.verify_hmac({**headers, "webhook-id": "msg_3"}, b"{}", KEY_A, now=NOW)
    with pytest.raises(wh.StaleWebhookError):
        wh.verify_hmac(headers, b"{}", KEY_A, now=NOW + 301)
    with pytest.raises(wh.StaleWebhookError):
        wh.verify_hmac(headers, b"{}", KEY_A, now=NOW - 301)
    with pytest.raises(wh.WebhookSecretError):
        wh.verify_hmac(headers, b"{}", "not a secret", now=NOW)


def test_verify_hmac_needs_a_v1_entry() -> None:
    headers = wh.sign("msg_4", NOW, b"{}", IDENTITY.sign)
    with pytest.raises(wh.WebhookDecodeError, match=r"no v1 \(HMAC-SHA256\)"):
        wh.verify_hmac(headers, b"{}", KEY_A, now=NOW)


@pytest.mark.parametrize(
    "bad", ["v1,", "v1,!!!!", "v1," + base64.b64encode(bytes(31)).decode(), "v1"]
)
def test_malformed_v1_entries(bad: str) -> None:
    headers = wh.sign("msg_5", NOW, b"{}", IDENTITY.sign, secrets=[KEY_A])
    headers["webhook-signature"] = bad + " " + headers["webhook-signature"]
    with pytest.raises(wh.WebhookDecodeError):
        wh.verify_hmac(headers, b"{}", KEY_A, now=NOW)
    if "," in bad:
        # The v1a check skips v1 entries without decoding them: unchanged by them.
        wh.verify(headers, b"{}", public_key=IDENTITY.public_key, check=check_signature, now=NOW)
    else:
        with pytest.raises(wh.WebhookDecodeError, match="version,signature"):
            wh.parse_headers(headers)


def test_unknown_scheme_is_a_caller_error() -> None:
    with pytest.raises(ValueError, match="unknown signature scheme"):
        wh.parse_headers({}, scheme="v2")


def test_a_delivery_with_secrets_verifies_for_the_report_receiver() -> None:
    report = IDENTITY.sign_report(make_payload())
    body = encode_body(report)
    headers = wh.sign(report.report_id, NOW, body, IDENTITY.sign, secrets=[KEY_A])
    assert verify_delivery(headers, body, now=NOW) == report
    wh.verify_hmac(headers, body, KEY_A, now=NOW)


# -- properties --------------------------------------------------------------------------------

ids = st.text(string.ascii_letters + string.digits + "_.:-", min_size=1, max_size=wh.MAX_ID_BYTES)
keys = st.binary(min_size=wh.MIN_SECRET_BYTES, max_size=wh.MAX_SECRET_BYTES)


@settings(max_examples=200, deadline=None)
@given(
    ids,
    st.integers(min_value=0, max_value=10**12 - 1),
    st.binary(max_size=2000),
    st.lists(keys, max_size=wh.MAX_SECRETS),
    keys,
)
def test_sign_then_verify(
    msg_id: str, ts: int, body: bytes, secrets: list[bytes], other: bytes
) -> None:
    headers = wh.sign(msg_id, ts, body, IDENTITY.sign, secrets=secrets)
    parsed = wh.verify(
        headers, body, public_key=IDENTITY.public_key, check=check_signature, now=ts
    )
    assert (parsed.msg_id, parsed.timestamp, len(parsed.signatures)) == (msg_id, ts, 1)
    content = wh.signed_content(msg_id, ts, body)
    assert [v for _, v in entries(headers)[:-1]] == [independent_hmac(k, content) for k in secrets]
    for key in secrets:
        assert wh.parse_secret(wh.format_secret(key)) == key
        assert wh.verify_hmac(headers, body, key, now=ts) == wh.WebhookHeaders(
            msg_id, ts, tuple(base64.b64decode(v) for _, v in entries(headers)[:-1])
        )
    if secrets and other not in secrets:
        with pytest.raises(SignatureError):
            wh.verify_hmac(headers, body, other, now=ts)
        with pytest.raises(SignatureError):
            wh.verify_hmac(headers, body + b"x", secrets[0], now=ts)


def test_the_v1_example_in_protocol_md() -> None:
    import json
    import re
    from pathlib import Path

    from overflowd.identity import verify_report

    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    section = text.split("## 7. Webhooks", 1)[1].split("## Test vectors", 1)[0]
    block = json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))  # type: ignore[union-attr]
    report = verify_report(bytes.fromhex(block["vectors"]["ipv4-flow-seen"]["cose_hex"]))
    body = encode_body(report)
    (secret,) = re.findall(r"secret `(whsec_[A-Za-z0-9+/=]+)`", section)
    assert wh.parse_secret(secret) == bytes(range(0x20, 0x40))
    node = NodeIdentity(bytes.fromhex(block["seed_hex"]))
    headers = wh.sign(report.report_id, 1_700_000_000, body, node.sign, secrets=[secret])
    line = f"webhook-signature: {headers['webhook-signature']}"
    assert line in section
    webhooks_md = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    assert line in webhooks_md
    v1 = headers["webhook-signature"].split()[0].removeprefix("v1,")
    content = f"{report.report_id}.1700000000.".encode() + body
    assert v1 == independent_hmac(wh.parse_secret(secret), content)
