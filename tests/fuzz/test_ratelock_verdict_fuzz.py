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
GOOD = vd.encode_verdict(
    vd.Verdict(
        op="get",
        nonce=NONCE,
        client="web",
        subject="record-42",
        outcome="ok",
        time_ms=1_800_000_000_000,
        digest=b"\x02" * 32,
    ),
    NODE.public_key,
    NODE.sign,
)


def _verify(data: bytes) -> vd.Verdict:
    return vd.verify_verdict(
        data, check_signature, public_key=NODE.public_key, nonce=NONCE, now_ms=1_800_000_000_000
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
