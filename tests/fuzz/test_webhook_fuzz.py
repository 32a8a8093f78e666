"""Any headers and body given to verify_delivery verify or raise our errors, never anything else.

Also: a valid delivery truncated at every offset, or with any one byte changed, never verifies
as a different report.
"""

from __future__ import annotations

import base64
import json
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.errors import DecodeError, SignatureError
from overflowd.identity import NodeIdentity
from overflowd.receiver import encode_body, verify_delivery
from overflowd.wire import webhook as wh
from tests.support.reports import make_payload

IDENTITY = NodeIdentity(seed=b"\x07" * 32)
REPORT = IDENTITY.sign_report(make_payload())
BODY = encode_body(REPORT)
NOW = 1_800_000_000
HEADERS = wh.sign(REPORT.report_id, NOW, BODY, IDENTITY.sign)
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


def test_every_truncation_and_every_byte_flip() -> None:
    assert check(HEADERS, BODY) == REPORT
    for i in range(len(BODY)):
        assert check(HEADERS, BODY[:i]) is None
        flipped = BODY[:i] + bytes([BODY[i] ^ 0x20]) + BODY[i + 1 :]
        assert check(HEADERS, flipped) is None


def test_real_clock_sanity() -> None:
    headers = wh.sign(REPORT.report_id, int(time.time()), BODY, IDENTITY.sign)
    assert verify_delivery(headers, BODY, now=time.time()) == REPORT
