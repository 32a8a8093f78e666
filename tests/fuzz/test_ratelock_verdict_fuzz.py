"""Any bytes given to the verdict decoder decode or raise VerdictDecodeError, nothing else;
a valid verdict truncated at every offset, or with any byte flipped, never verifies."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from overflowd.errors import VerdictDecodeError, VerdictError
from overflowd.identity import NodeIdentity, check_signature
from ratelock import verdict as vd

NODE = NodeIdentity(seed=b"\x09" * 32)
NONCE = b"\x01" * 24
TOKEN = vd.token_digest("rl1_fuzz")
REQUEST = vd.body_digest(b"")
GOOD = vd.encode_verdict(
    vd.Verdict(
        op="get",
        nonce=NONCE,
        client="web",
        subject="record-42",
        outcome="ok",
        time_ms=1_800_000_000_000,
        token=TOKEN,
        request=REQUEST,
        digest=b"\x02" * 32,
    ),
    NODE.public_key,
    NODE.sign,
)


def _verify(data: bytes) -> vd.Verdict:
    return vd.verify_verdict(
        data, check_signature, public_key=NODE.public_key, nonce=NONCE, now_ms=1_800_000_000_000,
        token=TOKEN, request=REQUEST,
    )


@settings(max_examples=500)
@given(st.binary(max_size=3000))
def test_any_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        vd.decode_unverified(data)
    except VerdictDecodeError:
        pass


@settings(max_examples=300)
@given(st.integers(0, len(GOOD) - 1), st.integers(1, 255))
def test_a_flipped_byte_never_verifies(offset: int, xor: int) -> None:
    data = bytearray(GOOD)
    data[offset] ^= xor
    try:
        _verify(bytes(data))
    except VerdictError:
        return
    raise AssertionError(f"verdict with byte {offset} flipped verified")


@settings(max_examples=300)
@given(
    st.sampled_from(sorted(vd.verdict_to_map(vd.decode_unverified(GOOD).verdict))),
    st.none() | st.integers() | st.binary(max_size=40) | st.text(max_size=8),
)
def test_a_v2_payload_with_any_field_dropped_or_retyped_is_refused(
    name: str, value: object
) -> None:
    """The v2 fields (token, request) are checked as strictly as the v1 ones: each required
    field dropped, or any field given a wrong type or size, is a VerdictDecodeError, even when
    correctly signed."""
    import cbor2

    fields = vd.verdict_to_map(vd.decode_unverified(GOOD).verdict)
    if value is None:
        if name in ("request", "digest"):
            return  # optional: dropping them is a valid verdict
        del fields[name]
    else:
        digests = ("token", "request", "digest")
        if type(value) is type(fields[name]) and not (
            name in digests and isinstance(value, bytes) and len(value) != 32
        ):
            return  # the right type (and size): may be a valid verdict about something else
        fields[name] = value
    payload = cbor2.dumps(fields, canonical=True)
    protected = vd.protected_header(NODE.public_key)
    sig = NODE.sign(vd.sig_structure(protected, payload))
    data = cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, sig]), canonical=True)
    try:
        vd.decode_unverified(data)
    except VerdictDecodeError:
        return
    raise AssertionError(f"{name}={value!r} decoded")


def test_every_truncation_is_refused() -> None:
    assert _verify(GOOD).subject == "record-42"
    for cut in range(len(GOOD)):
        try:
            vd.decode_unverified(GOOD[:cut])
        except VerdictDecodeError:
            continue
        raise AssertionError(f"truncated at {cut} decoded")


@settings(max_examples=300)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.binary(max_size=40) | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
        ),
        max_leaves=20,
    )
)
def test_cbor_shaped_garbage_inside_a_cose_envelope(payload: object) -> None:
    import cbor2

    data = cbor2.dumps(
        cbor2.CBORTag(
            18, [vd.protected_header(NODE.public_key), {}, cbor2.dumps(payload), b"\x00" * 64]
        ),
        canonical=True,
    )
    try:
        vd.decode_unverified(data)
    except VerdictDecodeError:
        pass
