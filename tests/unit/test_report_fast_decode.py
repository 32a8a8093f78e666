"""The fast path of ``decode_unverified`` gives exactly the general decoder's verdicts.

Differential: every input goes through ``report.decode_unverified`` (fast path, falling back)
and ``report._decode_unverified_reference`` (cbor2 decodes, checks, cbor2 re-encodes); both must
accept with equal values or refuse with the same message. Inputs: the protocol vectors, random
well-formed reports, and well over 500 mutated or hostile ones (byte flips, truncations,
insertions, non-shortest heads, indefinite lengths, trailing bytes, re-signed payload maps that
are valid CBOR but not what the encoder writes: unknown keys, duplicate keys, an explicit empty
point, floats and integers in longer forms). Re-signed inputs matter most: a mutation of the
signed bytes is refused by the signature anyway, but the decoder sees it first.
"""

from __future__ import annotations

import ipaddress
import os
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.errors import ReportDecodeError
from overflowd.identity import NodeIdentity
from tests.fuzz.test_report_fuzz import payloads
from tests.support.reports import make_payload
from tests.vectors import make_vectors

IDENTITY = NodeIdentity(seed=b"\x09" * 32)
SEED = 1234 if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes") else None


def _verdict(decode: Callable[[bytes], rpt.UnverifiedReport], data: bytes) -> tuple[Any, ...]:
    try:
        return ("accepted", decode(data))
    except ReportDecodeError as exc:
        return ("refused", str(exc), exc.offset)


def _same(data: bytes) -> str:
    """Assert both decoders agree on ``data``; return the verdict's name."""
    fast = _verdict(rpt.decode_unverified, data)
    reference = _verdict(rpt._decode_unverified_reference, data)
    assert fast == reference, data.hex()
    return str(fast[0])


def _sign1(protected: bytes, payload: bytes, *, sign: bool = True) -> bytes:
    sig = IDENTITY.sign(rpt.sig_structure(protected, payload)) if sign else bytes(64)
    return bytes(cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, sig])))


def _head(major: int, n: int, width: int) -> bytes:
    """A CBOR head of ``width`` extra bytes (0: in the initial byte), shortest or not."""
    if width == 0:
        return bytes((major << 5 | n,))
    code = {1: 24, 2: 25, 4: 26, 8: 27}[width]
    return bytes((major << 5 | code,)) + n.to_bytes(width, "big")


def _map_variants(payload: rpt.Payload) -> Iterator[dict[Any, Any] | bytes]:
    """Payload maps (or raw payload bytes) that are valid CBOR but not the encoder's output,
    and a few that are exactly it, built differently."""
    m = rpt.payload_to_map(payload)
    yield m
    yield {**m, "extra": 1}
    yield {**m, "zzz-unknown-key": [1, 2, 3]}
    yield {**m, "observer": {**m["observer"], "point": ""}}
    yield {**m, "observer": {**m["observer"], "spare": True}}
    yield {**m, "flow": {**m["flow"], "src_as": 7}}
    yield {**m, "flow": {**m["flow"], "tos": True}}
    yield {**m, "flow": {**m["flow"], "sport": 70000}}
    yield {**m, "sampling": {**m["sampling"], "p": 1}}
    yield {**m, "sampling": {**m["sampling"], "interval": 0}}
    yield {**m, "v": 2}
    yield {**m, "kind": "Flow"}
    yield {**m, "nonce": b"short"}
    yield {k: v for k, v in m.items() if k != "time"}
    yield {**m, 7: "integer key"}
    yield {**m, "extra": cbor2.CBORTag(1, 1_700_000_000)}
    canonical = rpt._canonical(m)
    yield canonical + b"\x00"  # trailing byte
    yield bytes(cbor2.dumps(m))  # insertion order, not deterministic order
    # p as a double although a shorter float holds it; then as a half if it is one.
    p = float(payload.sampling.probability)
    short = rpt._float(p)
    if short[0] != 0xFB:
        yield canonical.replace(short, b"\xfb" + struct.pack(">d", p), 1)
    # "v": 1 with a one-byte-argument head (non-shortest)
    yield canonical.replace(b"\x61v\x01", b"\x61v\x18\x01", 1)
    # duplicate key: the map head says one more entry and "v" appears twice
    yield bytes((canonical[0] + 1,)) + b"\x61v\x01" + canonical[1:]
    # indefinite-length map of the same entries
    yield b"\xbf" + canonical[1:] + b"\xff"


def _hostile(rng: random.Random) -> Iterator[bytes]:
    """Mutated and hostile inputs, several hundred."""
    base = [IDENTITY.sign_report(make_payload(packets=1 + i)).cose for i in range(4)]
    base.append(IDENTITY.sign_report(make_payload("2001:db8::1", "2001:db8::2", contacts=())).cose)
    for cose in base:
        yield cose
        for _ in range(40):  # byte flips (the signature then fails, but decoding comes first)
            altered = bytearray(cose)
            altered[rng.randrange(len(altered))] ^= 1 << rng.randrange(8)
            yield bytes(altered)
        for _ in range(10):
            yield cose[: rng.randrange(len(cose))]
        for _ in range(10):
            at = rng.randrange(len(cose) + 1)
            yield cose[:at] + bytes((rng.randrange(256),)) + cose[at:]
        yield cose + b"\x00"
        yield cose[1:]  # untagged
        yield b"\xd8\x12" + cose[1:]  # tag 18 in a longer head
    payload = make_payload()
    protected = rpt.protected_header(IDENTITY.public_key)
    good_payload = rpt.encode_payload(payload)
    sig = IDENTITY.sign(rpt.sig_structure(protected, good_payload))
    # The outer array with non-shortest heads, an indefinite array, a non-empty unprotected map.
    for width in (1, 2, 4, 8):
        yield (
            rpt._COSE_PREFIX + _head(2, len(protected), width) + protected + b"\xa0"
            + rpt._bstr(good_payload) + rpt._bstr(sig)
        )  # fmt: skip
        yield (
            rpt._COSE_PREFIX + rpt._bstr(protected) + b"\xa0"
            + _head(2, len(good_payload), max(2, width)) + good_payload + rpt._bstr(sig)
        )  # fmt: skip
        yield (
            rpt._COSE_PREFIX + rpt._bstr(protected) + b"\xa0" + rpt._bstr(good_payload)
            + _head(2, 64, max(1, width)) + sig
        )  # fmt: skip
    yield (
        b"\xd2\x9f"
        + rpt._bstr(protected)
        + b"\xa0"
        + rpt._bstr(good_payload)
        + rpt._bstr(sig)
        + b"\xff"
    )
    yield (
        b"\xd2\x84"
        + rpt._bstr(protected)
        + b"\xa1\x04\x41x"
        + rpt._bstr(good_payload)
        + rpt._bstr(sig)
    )
    yield (
        b"\xd2\x84" + rpt._bstr(protected) + b"\xa0" + rpt._bstr(good_payload) + rpt._bstr(sig[:63])
    )
    yield b"\xd2\x83" + rpt._bstr(protected) + b"\xa0" + rpt._bstr(good_payload)
    yield b"\xd2\x84" + rpt._bstr(protected) + b"\xa0" + b"\xf6" + rpt._bstr(sig)
    # Protected headers: other orders, extra and critical parameters, other algorithms.
    kid = IDENTITY.public_key
    for header in (
        {1: -8, 3: rpt.CONTENT_TYPE, 4: kid},
        {4: kid, 3: rpt.CONTENT_TYPE, 1: -8},
        {1: -8, 3: rpt.CONTENT_TYPE, 4: kid, 5: b"iv"},
        {1: -8, 2: [5], 3: rpt.CONTENT_TYPE, 4: kid},
        {1: -7, 3: rpt.CONTENT_TYPE, 4: kid},
        {1: -8, 3: "application/cbor", 4: kid},
        {1: -8, 3: rpt.CONTENT_TYPE, 4: kid[:31]},
        {1: -8, 3: rpt.CONTENT_TYPE},
    ):
        for encoded in (rpt._canonical(header), bytes(cbor2.dumps(header))):
            yield _sign1(encoded, good_payload)
    yield _sign1(rpt.protected_header(kid) + b"\x00", good_payload)
    yield _sign1(b"\xa3\x01\x27\x03\x78" + protected[5:], good_payload)  # text head longer
    # Re-signed payloads that are valid CBOR but not what the encoder writes.
    for variant_payload in (
        payload,
        make_payload("2001:db8::5", "2001:db8::6", contacts=(), probability=0.5),
        make_payload(probability=1.0),
        make_payload(probability=0.1),
    ):
        for variant in _map_variants(variant_payload):
            raw = variant if isinstance(variant, bytes) else rpt._canonical(variant)
            yield _sign1(protected, raw)
            yield _sign1(protected, raw, sign=False)
    # Values decoders may choke on.
    yield from (
        b"", b"\x00", b"\xd2", b"\xd2\x84", b"\xff" * 40, b"\x9f" * 600, b"\xd2" * 1196,
        b"\xd2\x84\x5f\x41\x00\xff", b"\xd2\x84\x58", b"\xd2\x84\x59\xff\xff", bytes(1197),
        b"\xd8\x1c\x81\xd8\x1d\x00",
    )  # fmt: skip
    for _ in range(100):
        yield bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))


def test_vectors_are_accepted_with_the_same_values() -> None:
    for vec in make_vectors.vectors().values():
        assert _same(bytes.fromhex(vec["cose_hex"])) == "accepted"


def test_the_fast_path_takes_the_reports_a_node_signs() -> None:
    """Not a verdict test: the fast path must actually decide the common case itself."""
    cose = IDENTITY.sign_report(make_payload()).cose
    parts = rpt._split_sign1(cose)
    assert parts is not None
    protected, payload_bytes, _ = parts
    assert protected.startswith(rpt._PROTECTED_PREFIX) and len(protected) == rpt._PROTECTED_LEN
    assert rpt._encode_payload_fast(rpt.decode_unverified(cose).payload) == payload_bytes


def test_hostile_and_mutated_inputs_get_the_same_verdicts() -> None:
    seed = SEED if SEED is not None else random.randrange(2**32)
    rng = random.Random(seed)
    verdicts: dict[str, int] = {}
    count = 0
    for data in _hostile(rng):
        try:
            verdict = _same(data)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}: {exc}") from None
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        count += 1
    assert count >= 500, count
    # Both kinds of verdict are exercised, not only refusals.
    assert verdicts.get("accepted", 0) >= 20 and verdicts.get("refused", 0) >= 400, verdicts


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads(), st.data())
def test_random_reports_and_their_mutations_agree(
    payload: rpt.Payload, data: st.DataObject
) -> None:
    cose = IDENTITY.sign_report(payload).cose
    assert _same(cose) == "accepted"
    altered = bytearray(cose)
    for _ in range(data.draw(st.integers(1, 3))):
        altered[data.draw(st.integers(0, len(altered) - 1))] = data.draw(st.integers(0, 255))
    _same(bytes(altered))
    for variant in _map_variants(payload):
        raw = variant if isinstance(variant, bytes) else rpt._canonical(variant)
        _same(_sign1(rpt.protected_header(IDENTITY.public_key), raw, sign=False))


@pytest.mark.parametrize("address", ["192.0.2.1", "2001:db8::1"])
def test_accepted_values_are_equal_field_by_field(address: str) -> None:
    dst = str(ipaddress.ip_address(address) + 1)
    cose = IDENTITY.sign_report(make_payload(address, dst)).cose
    fast, reference = rpt.decode_unverified(cose), rpt._decode_unverified_reference(cose)
    for name in ("cose", "protected", "payload_bytes", "signature", "kid", "payload"):
        assert getattr(fast, name) == getattr(reference, name)
        assert type(getattr(fast, name)) is type(getattr(reference, name))
