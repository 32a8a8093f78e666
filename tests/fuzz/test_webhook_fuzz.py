"""Any headers and body given to verify_delivery or verify_batch verify or raise our errors,
never anything else.

Also: a valid delivery truncated at every offset, or with any one byte changed, never verifies
as a different report.
"""

from __future__ import annotations

import base64
import json
import string
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.errors import DecodeError, SignatureError
from overflowd.identity import NodeIdentity
from overflowd.receiver import (
    batch_id,
    encode_batch_body,
    encode_body,
    verify_batch,
    verify_delivery,
)
from overflowd.wire import webhook as wh
from tests.support.reports import make_payload

IDENTITY = NodeIdentity(seed=b"\x07" * 32)
REPORT = IDENTITY.sign_report(make_payload())
BODY = encode_body(REPORT)
NOW = 1_800_000_000
HEADERS = wh.sign(REPORT.report_id, NOW, BODY, IDENTITY.sign)
SECRET = bytes(range(32))
#: The same delivery for an endpoint with a shared secret: "v1,<hmac> v1a,<ed25519>".
V1_HEADERS = wh.sign(REPORT.report_id, NOW, BODY, IDENTITY.sign, secrets=[SECRET])
V1_ENTRY, V1A_ENTRY = V1_HEADERS["webhook-signature"].split()
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OUR_ERRORS = (DecodeError, SignatureError)

header_names = st.sampled_from(
    ["webhook-id", "Webhook-Timestamp", "WEBHOOK-SIGNATURE", "content-type", "x"]
) | st.text(max_size=20)
header_values = st.text(max_size=300) | st.sampled_from(
    [
        REPORT.report_id,
        str(NOW),
        HEADERS["webhook-signature"],
        V1_HEADERS["webhook-signature"],
        V1_ENTRY,
        "v1," + base64.b64encode(b"\x00" * 32).decode() + " " + V1A_ENTRY,
        "v1a," + base64.b64encode(b"\x00" * 64).decode(),
        "v1a,",
        "v1a,====",
        " ",
        "",
    ]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def check(headers: object, body: bytes, now: float = NOW) -> rpt.SignedReport | None:
    try:
        return verify_delivery(headers, body, now=now)  # type: ignore[arg-type]
    except OUR_ERRORS:
        return None


@SETTINGS
@given(st.dictionaries(header_names, header_values, max_size=6), st.binary(max_size=3000))
def test_any_headers_and_bytes(headers: dict[str, str], body: bytes) -> None:
    check(headers, body)


@SETTINGS
@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=120)), max_size=6))
def test_any_raw_header_pairs(pairs: list[tuple[bytes, bytes]]) -> None:
    check(pairs, BODY)


@SETTINGS
@given(json_values)
def test_any_json_body_with_valid_headers(doc: object) -> None:
    body = json.dumps(doc).encode()
    headers = wh.sign(REPORT.report_id, NOW, body, IDENTITY.sign)
    check(headers, body)


@SETTINGS
@given(
    st.dictionaries(st.text(max_size=10), json_values, max_size=5),
    st.sampled_from(["id", "flow", "observer", "sampling", "kind", "time_ms", "cose"]),
)
def test_validly_signed_bodies_with_a_field_changed(extra: dict[str, object], key: str) -> None:
    doc = rpt.to_json(REPORT)
    doc.update(extra)
    if key in extra:
        doc[key] = extra[key]
    body = json.dumps(doc).encode()
    headers = wh.sign(REPORT.report_id, NOW, body, IDENTITY.sign)
    got = check(headers, body)
    # Whatever is accepted is the one signed report, with a body that agrees with it.
    assert got is None or got == REPORT


@SETTINGS
@given(st.integers(min_value=0, max_value=2**40), st.floats(allow_nan=True))
def test_any_timestamp_and_clock(ts: int, now: float) -> None:
    headers = wh.sign(REPORT.report_id, ts, BODY, IDENTITY.sign)
    got = check(headers, BODY, now=now)
    assert got is None or abs(ts - now) <= wh.DEFAULT_TOLERANCE_S


b64_text = st.text(string.ascii_letters + string.digits + "+/=,", max_size=60)
v1_entries = st.sampled_from(
    [V1_ENTRY, "v1,", "v1,====", "v1," + base64.b64encode(bytes(32)).decode(), "v1," + "A" * 300]
) | b64_text.map(lambda t: "v1," + t)


@SETTINGS
@given(st.lists(v1_entries, max_size=10), st.integers(min_value=0, max_value=10))
def test_v1_entries_anywhere_in_the_signature_header(extra: list[str], at: int) -> None:
    """v1 entries never change the v1a outcome while the header is within its bounds, and
    verify_hmac accepts only when the secret's own entry is there."""
    entries = [*extra]
    entries.insert(min(at, len(entries)), V1A_ENTRY)
    text = " ".join(entries)
    headers = {**HEADERS, "webhook-signature": text}
    got = check(headers, BODY)
    if len(entries) <= wh.MAX_SIGNATURES and len(text) <= wh.MAX_SIGNATURE_HEADER_BYTES:
        assert got == REPORT
    else:
        assert got is None
    try:
        wh.verify_hmac(headers, BODY, SECRET, now=NOW)
    except OUR_ERRORS:
        accepted = False
    else:
        accepted = True
    assert not accepted or V1_ENTRY in entries


@SETTINGS
@given(st.dictionaries(header_names, header_values, max_size=6), st.binary(max_size=300))
def test_verify_hmac_on_any_headers_and_bytes(headers: dict[str, str], body: bytes) -> None:
    try:
        wh.verify_hmac(headers, body, SECRET, now=NOW)
    except OUR_ERRORS:
        return
    # Accepted: then it is the one delivery we signed with the secret.
    signature = wh.normalize_headers(headers)["webhook-signature"]
    assert body == BODY and V1_ENTRY in signature.split()


def test_every_truncation_and_every_byte_flip() -> None:
    assert check(HEADERS, BODY) == REPORT
    for i in range(len(BODY)):
        assert check(HEADERS, BODY[:i]) is None
        flipped = BODY[:i] + bytes([BODY[i] ^ 0x20]) + BODY[i + 1 :]
        assert check(HEADERS, flipped) is None
    assert check(V1_HEADERS, BODY) == REPORT
    wh.verify_hmac(V1_HEADERS, BODY, SECRET, now=NOW)
    for i in range(0, len(BODY), 7):
        flipped = BODY[:i] + bytes([BODY[i] ^ 0x20]) + BODY[i + 1 :]
        for body in (BODY[:i], flipped):
            try:
                wh.verify_hmac(V1_HEADERS, body, SECRET, now=NOW)
            except SignatureError:
                continue
            raise AssertionError(f"v1 verified a changed body at offset {i}")


def test_real_clock_sanity() -> None:
    headers = wh.sign(REPORT.report_id, int(time.time()), BODY, IDENTITY.sign)
    assert verify_delivery(headers, BODY, now=time.time()) == REPORT


# -- the batch form (#9): verify_batch, {"reports": [...]} ---------------------------------------

BATCH = [IDENTITY.sign_report(make_payload(packets=1000 + i)) for i in range(3)]
BATCH_BODY = encode_batch_body(BATCH)
BATCH_ID = batch_id([r.report_id for r in BATCH])
BATCH_HEADERS = wh.sign(BATCH_ID, NOW, BATCH_BODY, IDENTITY.sign)


def check_batch(headers: object, body: bytes, now: float = NOW) -> list[rpt.SignedReport] | None:
    try:
        return verify_batch(headers, body, now=now, max_reports=8)  # type: ignore[arg-type]
    except OUR_ERRORS:
        return None


def test_batch_verifies_in_order_and_single_form_too() -> None:
    assert check_batch(BATCH_HEADERS, BATCH_BODY) == BATCH
    assert check_batch(HEADERS, BODY) == [REPORT]


@SETTINGS
@given(json_values)
def test_any_reports_list_with_valid_headers(items: object) -> None:
    body = json.dumps({"reports": items}).encode()
    headers = wh.sign(BATCH_ID, NOW, body, IDENTITY.sign)
    got = check_batch(headers, body)
    assert got is None  # nothing but our own three reports, in order, verifies under BATCH_ID


report_docs = st.lists(
    st.sampled_from([json.loads(encode_body(r)) for r in [*BATCH, REPORT]]), max_size=10
)


@SETTINGS
@given(report_docs, st.booleans())
def test_any_selection_of_real_reports(docs: list[dict[str, object]], right_id: bool) -> None:
    """Any order, repetition and count of real reports, under their batch id or ours: only a
    list of distinct reports under exactly its own batch id, within max_reports, verifies."""
    body = json.dumps({"reports": docs}, separators=(",", ":")).encode()
    ids = [str(d["id"]) for d in docs]
    msg_id = batch_id(ids) if right_id and ids else BATCH_ID
    got = check_batch(wh.sign(msg_id, NOW, body, IDENTITY.sign), body)
    valid = bool(ids) and len(set(ids)) == len(ids) <= 8 and msg_id == batch_id(ids)
    if valid:
        assert got is not None and [r.report_id for r in got] == ids
    else:
        assert got is None


def test_batch_of_two_keys_is_refused() -> None:
    other = NodeIdentity(seed=b"\x08" * 32)
    mixed = [BATCH[0], other.sign_report(make_payload())]
    body = encode_batch_body(mixed)
    msg_id = batch_id([r.report_id for r in mixed])
    for signer in (IDENTITY, other):
        assert check_batch(wh.sign(msg_id, NOW, body, signer.sign), body) is None


def test_batch_truncated_at_every_offset_and_every_byte_flipped() -> None:
    for cut in range(len(BATCH_BODY)):
        assert check_batch(BATCH_HEADERS, BATCH_BODY[:cut]) is None
    for i in range(0, len(BATCH_BODY), 7):
        flipped = bytearray(BATCH_BODY)
        flipped[i] ^= 0x20
        # The webhook signature covers the exact bytes: no change of one survives it.
        assert check_batch(BATCH_HEADERS, bytes(flipped)) is None


@SETTINGS
@given(st.dictionaries(header_names, header_values, max_size=6), st.binary(max_size=3000))
def test_batch_parser_any_headers_and_bytes(headers: dict[str, str], body: bytes) -> None:
    check_batch(headers, body)
    check_batch(BATCH_HEADERS, b'{"reports":' + body + b"}")
