"""The peer inbox codec (overflowd.wire.peering): strict, bounded, one bad item not fatal."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.wire import peering
from overflowd.wire.peering import Budget, InboxAnswer, InboxDecodeError
from tests.support.reports import make_payload

IDENTITY = NodeIdentity(seed=b"\x05" * 32)
COSES = [IDENTITY.sign_report(make_payload(packets=n + 1)).cose for n in range(3)]


def test_round_trip_keeps_bytes_hops_and_order() -> None:
    body = peering.encode_inbox([(c, i + 1) for i, c in enumerate(COSES)])
    batch = peering.decode_inbox(body)
    assert batch.bad == () and batch.total == 3
    assert [(i.index, i.cose, i.hops) for i in batch.items] == [
        (0, COSES[0], 1),
        (1, COSES[1], 2),
        (2, COSES[2], 3),
    ]
    assert batch.items[0].report_id == rpt.report_id(COSES[0])


def _body(items: list[object]) -> bytes:
    return json.dumps({"reports": items}).encode()


GOOD = {"cose": rpt.b64url(COSES[0]), "hops": 1}


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({"cose": rpt.b64url(COSES[1]), "hops": 0}, "hops"),
        ({"cose": rpt.b64url(COSES[1]), "hops": peering.MAX_HOPS + 1}, "hops"),
        ({"cose": rpt.b64url(COSES[1]), "hops": True}, "malformed"),
        ({"cose": rpt.b64url(COSES[1])}, "malformed"),
        ({"cose": rpt.b64url(COSES[1]), "hops": 1, "extra": 1}, "malformed"),
        ({"cose": "not base64!", "hops": 1}, "malformed"),
        ({"cose": "", "hops": 1}, "malformed"),
        ({"cose": 5, "hops": 1}, "malformed"),
        ({"cose": "A" * (peering.MAX_COSE_TEXT + 4), "hops": 1}, "oversized"),
        ({"cose": rpt.b64url(b"\x00" * (rpt.MAX_REPORT_BYTES + 1)), "hops": 1}, "oversized"),
        ([1, 2], "malformed"),
        ("x", "malformed"),
        (GOOD, "repeated"),
    ],
)
def test_one_bad_item_is_refused_by_index_and_the_others_kept(item: object, reason: str) -> None:
    batch = peering.decode_inbox(_body([GOOD, item, {"cose": rpt.b64url(COSES[2]), "hops": 2}]))
    assert batch.bad == ((1, reason),)
    assert [i.index for i in batch.items] == [0, 2]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe",
        b"[]",
        b'{"reports": []}',
        b'{"reports": {}}',
        b'{"reports": [], "x": 1}',
        b'{"reports": [1], "reports": [2]}',
        b'{"reports": [{"cose": "AA", "hops": 1.5}]}',
        b'{"reports": [{"cose": "AA", "hops": NaN}]}',
        b'{"reports": [{"cose": "AA", "hops": 1' + b"0" * 20 + b"}]}",
        b"[" * 100_000,
    ],
)
def test_what_is_not_an_inbox_body_is_refused_whole(body: bytes) -> None:
    with pytest.raises(InboxDecodeError):
        peering.decode_inbox(body)


def test_caps_are_checked_before_parsing() -> None:
    body = peering.encode_inbox([(c, 1) for c in COSES])
    with pytest.raises(InboxDecodeError, match="larger than"):
        peering.decode_inbox(body, max_body_bytes=len(body) - 1)
    with pytest.raises(InboxDecodeError, match="more than 2"):
        peering.decode_inbox(body, max_reports=2)
    # A body of the cap's size that is garbage is refused as garbage, not as too large.
    with pytest.raises(InboxDecodeError, match="JSON"):
        peering.decode_inbox(b"x" * 100, max_body_bytes=100)


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ValueError):
        peering.encode_inbox([(COSES[0], 0)])
    with pytest.raises(ValueError):
        peering.encode_inbox([(b"", 1)])


def test_message_id_names_the_body_and_the_recipient() -> None:
    a, b = peering.encode_inbox([(COSES[0], 1)]), peering.encode_inbox([(COSES[0], 2)])
    to, other = b"\x01" * 32, b"\x02" * 32
    assert peering.message_id(a, to) != peering.message_id(b, to)
    assert peering.message_id(a, to) != peering.message_id(a, other)
    assert peering.message_id(a, to).startswith("inbox_") and len(peering.message_id(a, to)) == 38


def test_answer_round_trip_and_counts_must_add_up() -> None:
    answer = InboxAnswer(accepted=2, duplicates=1, refused=((3, "forged"),))
    assert peering.decode_answer(peering.encode_answer(answer), sent=4) == answer
    for body, sent in [
        (peering.encode_answer(answer), 5),  # one report unaccounted for
        (peering.encode_answer(InboxAnswer(9, 0)), 4),  # claims more than was sent
        (b'{"accepted":0,"duplicates":0,"refused":[{"index":4,"reason":"x"}]}', 1),
        (
            b'{"accepted":0,"duplicates":0,"refused":[{"index":0,"reason":"x"},'
            b'{"index":0,"reason":"x"}]}',
            2,
        ),
        (b'{"accepted":-1,"duplicates":2,"refused":[]}', 1),
        (b'{"accepted":1,"duplicates":0}', 1),
        (b" " * (peering.MAX_ANSWER_BYTES + 1), 1),
    ]:
        with pytest.raises(InboxDecodeError):
            peering.decode_answer(body, sent=sent)


def test_budget_admits_whole_batches_and_makes_the_next_wait() -> None:
    b = Budget(reports_per_s=10, reports_burst=20, bytes_per_s=1e6, bytes_burst=1e6, now=0.0)
    assert b.try_admit(50, 100, 0.0) == 0.0  # a batch larger than the burst passes once
    wait = b.try_admit(1, 1, 0.0)
    assert wait == pytest.approx(3.0, abs=0.01)  # 30 reports of debt at 10/s
    assert b.try_admit(1, 1, 2.9) > 0
    assert b.try_admit(1, 1, 3.01) == 0.0
    bytes_bound = Budget(
        reports_per_s=1e6, reports_burst=1e6, bytes_per_s=100, bytes_burst=100, now=0.0
    )
    assert bytes_bound.try_admit(1, 300, 0.0) == 0.0
    assert bytes_bound.wait_s(0.0) == pytest.approx(2.0, abs=0.01)
    with pytest.raises(ValueError):
        Budget(reports_per_s=0, reports_burst=1, bytes_per_s=1, bytes_burst=1, now=0.0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(COSES), st.integers(1, peering.MAX_HOPS)), max_size=6))
def test_property_encode_decode_is_identity_up_to_repeats(items: list[tuple[bytes, int]]) -> None:
    if not items:
        return
    batch = peering.decode_inbox(peering.encode_inbox(items))
    first: dict[bytes, int] = {}
    for index, (cose, _hops) in enumerate(items):
        first.setdefault(cose, index)
    assert [(i.index, i.cose, i.hops) for i in batch.items] == [
        (i, c, h) for i, (c, h) in enumerate(items) if first[c] == i
    ]
    assert sorted(i for i, _ in batch.bad) == [i for i, (c, _) in enumerate(items) if first[c] != i]
    assert all(reason == "repeated" for _, reason in batch.bad)


# -- CBOR bodies and lean pages ------------------------------------------------------------------

import cbor2  # noqa: E402


def test_cbor_inbox_round_trip_is_deterministic_cbor_and_lean() -> None:
    items = [(c, i + 1) for i, c in enumerate(COSES)]
    body = peering.encode_inbox(items, content_type=peering.CBOR)
    # Deterministic CBOR, exactly the documented shape
    assert cbor2.loads(body) == {"reports": [[c, h] for c, h in items]}
    assert cbor2.dumps(cbor2.loads(body), canonical=True) == body
    batch = peering.decode_inbox(body, content_type=peering.CBOR)
    assert [(i.index, i.cose, i.hops) for i in batch.items] == [
        (n, c, h) for n, (c, h) in enumerate(items)
    ]
    # A few bytes per report beyond its COSE (JSON with base64 is a third more)
    cose = sum(len(c) for c in COSES)
    assert len(body) - cose <= 10 + 6 * len(COSES)
    assert len(body) < len(peering.encode_inbox(items)) * 0.8
    sizes = [peering.inbox_item_bytes(len(c), peering.CBOR) for c in COSES]
    # The sender's size estimate is an upper bound (hops of two bytes), at most one over.
    empty = len(peering.encode_inbox([], content_type=peering.CBOR))
    assert 0 <= sum(sizes) + empty - len(body) <= len(COSES)


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ([b"x"], "malformed"),
        ([b"x", 1, 2], "malformed"),
        ({"cose": b"x", "hops": 1}, "malformed"),
        (["text", 1], "malformed"),
        ([b"", 1], "malformed"),
        ([b"x", 0], "hops"),
        ([b"x", 256], "hops"),
        ([b"x", True], "malformed"),
        ([b"x" * (rpt.MAX_REPORT_BYTES + 1), 1], "oversized"),
    ],
)
def test_cbor_bad_item_is_refused_by_index(doc: object, reason: str) -> None:
    body = cbor2.dumps({"reports": [[COSES[0], 1], doc, [COSES[0], 2]]}, canonical=True)
    batch = peering.decode_inbox(body, content_type=peering.CBOR)
    assert batch.bad == ((1, reason), (2, "repeated"))
    assert [i.index for i in batch.items] == [0]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xa1",  # truncated
        cbor2.dumps({"reports": []}),  # no reports
        cbor2.dumps({"reports": [[COSES[0], 1]], "x": 1}),  # other keys
        cbor2.dumps([[COSES[0], 1]]),
        cbor2.dumps({"reports": [[COSES[0], 1.0]]}),  # a float
        cbor2.dumps({"reports": [cbor2.CBORTag(24, COSES[0])]}),  # a tag
        b"\xa1\x67reports\x9f\x82\x41x\x01\xff",  # indefinite length
        b"\xa1\x67reports\x81\x82\x41x\x18\x01",  # hops 1 not in its shortest form
        b"\xa1\x67reports\x81\x82\x41x\x01\x00",  # bytes after the item
        b"\xa1\x67reports\x9b" + b"\xff" * 8,  # 2**64-1 items announced
        b"\xa1\x67reports\x81\x82\x5b" + b"\x7f" * 8 + b"x\x01",  # a huge byte string
        b"\xa2\x67reports\x80\x67reports\x80",  # a key twice
        b"\x81" * 10 + b"\x00",  # deeply nested
        b"\xa1\x67rep\xffrts\x80",  # not UTF-8
    ],
)
def test_cbor_not_an_inbox_body_is_refused_whole(body: bytes) -> None:
    with pytest.raises(InboxDecodeError):
        peering.decode_inbox(body, content_type=peering.CBOR)


def test_cbor_body_over_the_cap_is_refused_before_parsing() -> None:
    body = peering.encode_inbox([(COSES[0], 1)], content_type=peering.CBOR)
    with pytest.raises(InboxDecodeError, match="larger"):
        peering.decode_inbox(body, max_body_bytes=len(body) - 1, content_type=peering.CBOR)
    with pytest.raises(InboxDecodeError, match="more than 1"):
        peering.decode_inbox(
            peering.encode_inbox([(COSES[0], 1), (COSES[1], 1)], content_type=peering.CBOR),
            max_reports=1,
            content_type=peering.CBOR,
        )


def test_a_json_body_is_not_cbor_nor_the_reverse() -> None:
    items = [(COSES[0], 1)]
    with pytest.raises(InboxDecodeError):
        peering.decode_inbox(peering.encode_inbox(items), content_type=peering.CBOR)
    with pytest.raises(InboxDecodeError):
        peering.decode_inbox(peering.encode_inbox(items, content_type=peering.CBOR))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 2**63 - 1), st.binary(min_size=1, max_size=600), st.integers(0, 255)
        ),
        max_size=20,
    ),
    st.integers(0, 2**63 - 1),
)
def test_lean_page_round_trip(items: list[tuple[int, bytes, int]], nxt: int) -> None:
    body = peering.encode_page(items, nxt)
    assert cbor2.dumps(cbor2.loads(body), canonical=True) == body
    page = peering.decode_page(body, max_body_bytes=10**6, max_reports=20)
    assert page.next == nxt and page.listed == len(items) and page.bad == ()
    assert [(i.seq, i.cose, i.hops) for i in page.items] == items


def test_lean_page_refuses_bad_items_by_index_and_bad_pages_whole() -> None:
    body = cbor2.dumps(
        {"next": 9, "reports": [[1, COSES[0], 0], [0, COSES[0], 0], [2, "x", 0], [3, COSES[0], 256],
                                [4, b"x" * (rpt.MAX_REPORT_BYTES + 1), 1], [5, COSES[1]]]},
        canonical=True,
    )  # fmt: skip
    page = peering.decode_page(body, max_body_bytes=10**6, max_reports=10)
    assert [i.seq for i in page.items] == [1]
    assert page.bad == ((1, "malformed"), (2, "malformed"), (3, "malformed"), (4, "oversized"),
                        (5, "malformed"))  # fmt: skip
    for bad in (
        cbor2.dumps({"next": -1, "reports": []}),
        cbor2.dumps({"next": 2**63, "reports": []}),
        cbor2.dumps({"next": 1}),
        cbor2.dumps({"next": 1, "reports": {}}),
        cbor2.dumps({"next": 1, "reports": [], "more": 1}),
    ):
        with pytest.raises(InboxDecodeError):
            peering.decode_page(bad, max_body_bytes=10**6, max_reports=10)
    with pytest.raises(InboxDecodeError, match="more than 1"):
        peering.decode_page(body, max_body_bytes=10**6, max_reports=1)
