"""Any bytes given to the inbox decoders parse or raise InboxDecodeError, never anything else;
a valid body truncated at every offset never parses into other reports than it carried."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.wire import peering
from tests.support.reports import make_payload

IDENTITY = NodeIdentity(seed=b"\x09" * 32)
COSES = [IDENTITY.sign_report(make_payload(packets=n + 1)).cose for n in range(2)]
BODY = peering.encode_inbox([(COSES[0], 1), (COSES[1], 3)])
CBOR_BODY = peering.encode_inbox([(COSES[0], 1), (COSES[1], 3)], content_type=peering.CBOR)
PAGE = peering.encode_page([(1, COSES[0], 0), (7, COSES[1], 2)], 9)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.text(max_size=20)
    | st.floats(allow_nan=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


def one_input(data: bytes) -> None:
    """The invariant, for atheris or hypothesis."""
    try:
        batch = peering.decode_inbox(data, max_body_bytes=4096, max_reports=8)
    except peering.InboxDecodeError:
        pass
    else:
        assert batch.total <= 8 and len(batch.items) + len(batch.bad) == batch.total
        for item in batch.items:
            assert 1 <= item.hops <= peering.MAX_HOPS and len(item.cose) <= rpt.MAX_REPORT_BYTES
    try:
        batch = peering.decode_inbox(
            data, max_body_bytes=4096, max_reports=8, content_type=peering.CBOR
        )
    except peering.InboxDecodeError:
        pass
    else:
        assert batch.total <= 8 and len(batch.items) + len(batch.bad) == batch.total
        for item in batch.items:
            assert 1 <= item.hops <= peering.MAX_HOPS and len(item.cose) <= rpt.MAX_REPORT_BYTES
    try:
        page = peering.decode_page(data, max_body_bytes=4096, max_reports=8)
    except peering.InboxDecodeError:
        pass
    else:
        assert page.listed <= 8 and len(page.items) + len(page.bad) == page.listed
        for entry in page.items:
            assert 0 <= entry.hops <= peering.MAX_HOPS and entry.seq > 0
    try:
        peering.decode_answer(data, sent=4)
    except peering.InboxDecodeError:
        pass


@SETTINGS
@given(st.binary(max_size=600))
def test_any_bytes(data: bytes) -> None:
    one_input(data)


@SETTINGS
@given(st.binary(max_size=60), st.integers(0, len(CBOR_BODY)))
def test_cbor_mutations(noise: bytes, at: int) -> None:
    """Valid CBOR bodies with bytes spliced in: near misses reach the deep checks."""
    for base in (CBOR_BODY, PAGE):
        one_input(base[:at] + noise + base[at:])
        one_input(base[:at] + noise + base[at + len(noise) :])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_json)
def test_any_json(doc: object) -> None:
    one_input(json.dumps(doc).encode())
    one_input(json.dumps({"reports": doc}).encode())
    one_input(json.dumps({"reports": [doc, {"cose": rpt.b64url(COSES[0]), "hops": 1}]}).encode())


def test_cbor_truncated_at_every_offset_never_parses() -> None:
    for cut in range(len(CBOR_BODY)):
        with pytest.raises(peering.InboxDecodeError):
            peering.decode_inbox(CBOR_BODY[:cut], content_type=peering.CBOR)
    for cut in range(len(PAGE)):
        with pytest.raises(peering.InboxDecodeError):
            peering.decode_page(PAGE[:cut], max_body_bytes=4096, max_reports=8)


def test_truncated_at_every_offset() -> None:
    for cut in range(len(BODY)):
        try:
            batch = peering.decode_inbox(BODY[:cut])
        except peering.InboxDecodeError:
            continue
        assert {i.cose for i in batch.items} <= set(COSES)  # pragma: no cover - JSON is closed
