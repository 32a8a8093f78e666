"""ratelock.verdict: signed verdicts round-trip; forged, replayed, stale or foreign ones fail."""

from __future__ import annotations

import ipaddress

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.errors import (
    RatelockError,
    VerdictDecodeError,
    VerdictReplayError,
    VerdictSignatureError,
    VerdictStaleError,
)
from overflowd.identity import NodeIdentity, check_signature
from ratelock import verdict as vd

NODE = NodeIdentity(seed=b"\x05" * 32)
OTHER = NodeIdentity(seed=b"\x06" * 32)
NONCE = b"n" * 16
NOW = 1_800_000_000_000
TOKEN = vd.token_digest("rl1_the-application")
BODY = vd.body_digest(b'{"password":"cHc"}')


def _verdict(**changes: object) -> vd.Verdict:
    fields: dict[str, object] = {
        "op": "verify",
        "nonce": NONCE,
        "client": "web",
        "subject": "alice",
        "outcome": "ok",
        "time_ms": NOW,
        "token": TOKEN,
        "request": BODY,
    }
    fields.update(changes)
    return vd.Verdict(**fields)  # type: ignore[arg-type]


def _check(data: bytes, **kw: object) -> vd.Verdict:
    args: dict[str, object] = {
        "public_key": NODE.public_key, "nonce": NONCE, "now_ms": NOW, "token": TOKEN,
        "request": BODY,
    }
    args.update(kw)
    return vd.verify_verdict(data, check_signature, **args)  # type: ignore[arg-type]


def test_round_trip() -> None:
    v = _verdict(outcome="over_budget", retry_after_ms=1234)
    assert _check(vd.encode_verdict(v, NODE.public_key, NODE.sign)) == v


def test_forged_by_another_key_is_refused() -> None:
    forged = vd.encode_verdict(_verdict(), OTHER.public_key, OTHER.sign)
    with pytest.raises(VerdictSignatureError):
        _check(forged)
    # claiming the node's kid but signed by another key
    lying = vd.encode_verdict(_verdict(), NODE.public_key, OTHER.sign)
    with pytest.raises(VerdictSignatureError):
        _check(lying)


def test_edited_payload_is_refused() -> None:
    data = vd.encode_verdict(_verdict(outcome="wrong"), NODE.public_key, NODE.sign)
    tag = cbor2.loads(data)
    fields = cbor2.loads(tag.value[2])
    fields["outcome"] = "ok"
    tag.value[2] = cbor2.dumps(fields, canonical=True)
    with pytest.raises(VerdictSignatureError):
        _check(cbor2.dumps(tag, canonical=True))


def test_replayed_verdict_for_another_request_is_refused() -> None:
    data = vd.encode_verdict(_verdict(), NODE.public_key, NODE.sign)
    with pytest.raises(VerdictReplayError):
        _check(data, nonce=b"m" * 16)
    with pytest.raises(VerdictReplayError):
        _check(data, expect={"subject": "bob"})
    assert _check(data, expect={"subject": "alice", "op": "verify", "client": "web"})


def test_verdict_for_another_token_or_body_is_refused() -> None:
    """v2: the verdict binds the presenting token's digest and the request body's SHA-256."""
    data = vd.encode_verdict(_verdict(), NODE.public_key, NODE.sign)
    with pytest.raises(VerdictReplayError, match="another token"):
        _check(data, token=vd.token_digest("rl1_another-client"))
    with pytest.raises(VerdictReplayError, match="another body"):
        _check(data, request=vd.body_digest(b'{"password":"b3RoZXI"}'))
    # an "ok" that binds no body at all is refused when a body was sent ...
    bodiless = vd.encode_verdict(_verdict(request=None), NODE.public_key, NODE.sign)
    with pytest.raises(VerdictReplayError, match="body"):
        _check(bodiless)
    # ... but a refusal before the body was read may bind none
    for outcome in sorted(vd.PRE_BODY_OUTCOMES):
        refusal = vd.encode_verdict(
            _verdict(request=None, outcome=outcome), NODE.public_key, NODE.sign
        )
        assert _check(refusal).outcome == outcome


def test_token_digest_is_neither_the_token_nor_its_at_rest_hash() -> None:
    from ratelock import crypto

    token = "rl1_" + "A" * 43
    assert vd.token_digest(token) != crypto.token_digest(token)
    assert token.encode() not in vd.token_digest(token)
    assert vd.token_digest(" " + token + " ") == vd.token_digest(token)  # as the daemon strips


def test_a_version_1_verdict_is_refused() -> None:
    """v1 bound neither token nor body: a v1 verdict (even correctly signed) is not accepted."""
    fields = vd.verdict_to_map(_verdict())
    fields["v"] = 1
    for drop in ((), ("token",)):
        m = {k: v for k, v in fields.items() if k not in drop}
        payload = cbor2.dumps(m, canonical=True)
        protected = vd.protected_header(NODE.public_key)
        sig = NODE.sign(vd.sig_structure(protected, payload))
        data = cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, sig]), canonical=True)
        with pytest.raises(VerdictDecodeError):
            _check(data)


def test_stale_or_future_verdict_is_refused() -> None:
    data = vd.encode_verdict(_verdict(), NODE.public_key, NODE.sign)
    _check(data, now_ms=NOW + vd.DEFAULT_MAX_SKEW_MS)
    with pytest.raises(VerdictStaleError):
        _check(data, now_ms=NOW + vd.DEFAULT_MAX_SKEW_MS + 1)
    with pytest.raises(VerdictStaleError):
        _check(data, now_ms=NOW - vd.DEFAULT_MAX_SKEW_MS - 1)


def test_a_signed_report_is_never_a_verdict() -> None:
    # domain separation: the node signs reports with the same key under another content type
    payload = rpt.Payload(
        kind="flow-seen",
        nonce=NONCE,
        time=NOW,
        observer=rpt.Observer(),
        flow=rpt.Flow(
            src=ipaddress.IPv4Address("192.0.2.1"),
            dst=ipaddress.IPv4Address("198.51.100.1"),
            sport=1,
            dport=2,
            proto=17,
            packets=1,
            bytes=60,
            first=NOW,
            last=NOW,
        ),
        sampling=rpt.Sampling(probability=1.0, format="netflow-v5"),
    )
    report = NODE.sign_report(payload).cose
    with pytest.raises(VerdictDecodeError, match="content type"):
        _check(report)


def test_errors_sit_under_ratelock_error() -> None:
    for cls in (VerdictDecodeError, VerdictSignatureError, VerdictReplayError, VerdictStaleError):
        assert issubclass(cls, RatelockError)


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ValueError):
        vd.encode_verdict(_verdict(nonce=b"short"), NODE.public_key, NODE.sign)
    with pytest.raises(ValueError):
        vd.encode_verdict(_verdict(subject="x" * 2000), NODE.public_key, NODE.sign)
    with pytest.raises(ValueError):
        vd.encode_verdict(_verdict(token=b"short"), NODE.public_key, NODE.sign)
    with pytest.raises(ValueError):
        vd.encode_verdict(_verdict(request=b"\x00" * 31), NODE.public_key, NODE.sign)


names = st.text(min_size=0, max_size=40)
verdicts = st.builds(
    vd.Verdict,
    op=st.sampled_from(["verify", "enroll", "change", "get", "put", "delete"]),
    nonce=st.binary(min_size=vd.MIN_NONCE_BYTES, max_size=vd.MAX_NONCE_BYTES),
    client=names,
    subject=names,
    outcome=st.sampled_from(["ok", "wrong", "unknown", "over_budget", "not_found"]),
    time_ms=st.integers(0, 2**63 - 1),
    token=st.binary(min_size=32, max_size=32),
    request=st.none() | st.binary(min_size=32, max_size=32),
    retry_after_ms=st.none() | st.integers(0, 2**40),
    digest=st.none() | st.binary(min_size=32, max_size=32),
)


@settings(max_examples=200)
@given(verdicts)
def test_property_round_trip_and_single_encoding(v: vd.Verdict) -> None:
    data = vd.encode_verdict(v, NODE.public_key, NODE.sign)
    assert len(data) <= vd.MAX_VERDICT_BYTES
    got = vd.verify_verdict(
        data, check_signature, public_key=NODE.public_key, nonce=v.nonce, now_ms=v.time_ms,
        token=v.token,
    )
    assert got == v
    assert vd.encode_verdict(got, NODE.public_key, NODE.sign) == data  # Ed25519 is deterministic
