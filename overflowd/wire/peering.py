"""The peer inbox protocol: the body of ``POST /v1/inbox``, its answer, and peer budgets.

A node forwards reports to a peer as one JSON body::

    {"reports": [{"cose": "<base64url COSE_Sign1>", "hops": 1}, ...]}

signed the Standard Webhooks way (:mod:`overflowd.wire.webhook`, ``v1a``) with the sending
node's key, which it names in the :data:`HEADER_PEER` header (base64, as in the receiver's
``[[peers]]`` ``key``): the receiver then checks one signature under one configured key instead
of trying every peer's. ``webhook-id`` is :func:`message_id` of the body *and the recipient's
key*: Standard Webhooks signs id, time and body and nothing that names the recipient, so
without it a peer could resend what a sender pushed to it to the sender's other peers, as the
sender's (spending its budget there, and after the time window getting it judged for
"replays" it never made). ``hops`` counts the
peer-to-peer hops the report has made when it arrives (1 for a report its observer's node
sent); it travels outside the signed COSE bytes, which are forwarded verbatim, never re-signed.

The answer is ``{"accepted": N, "duplicates": M, "refused": [{"index": i, "reason": r}]}``.

**CBOR** (``Content-Type: application/cbor``, :data:`CBOR`): the same body without base64 and
keys per item, what nodes send each other (JSON stays for people and older peers)::

    {"reports": [[h'<COSE_Sign1>', hops], ...]}

and the lean pull page of ``GET /v1/reports`` asked with ``Accept: application/cbor``::

    {"next": cursor, "reports": [[seq, h'<COSE_Sign1>', hops], ...]}

Both are read by one strict, bounded CBOR reader (:func:`_cbor_value` over
:class:`~overflowd.wire.reader.Reader`): definite lengths only, shortest heads (deterministic
encoding, RFC 8949 §4.2.1), no tags, floats or undefined, text keys once each, a nesting
depth of :data:`_MAX_CBOR_DEPTH`, and every declared length checked against the bytes left
before anything is allocated. The signature (Standard Webhooks, the caller's) covers the body
bytes as sent, whichever the encoding; the webhook-id binding of the recipient is the same.

Parsing is strict and bounded (the body and the answer come from the network): the size is
checked before JSON is read, the item count before any item is looked at, every field of every
item is checked, and one bad item is reported by index and reason (:class:`InboxBatch.bad`)
rather than refusing its neighbours. Only a body that is not an inbox body at all raises
:class:`InboxDecodeError`. Pure: no sockets, no crypto (signatures are the caller's).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from overflowd import report as rpt
from overflowd.errors import DecodeError
from overflowd.wire.reader import Reader, WireDecodeError

INBOX_PATH = "/v1/inbox"
#: Names the sending peer's Ed25519 public key (standard base64, 32 bytes): the key the
#: ``v1a`` signature must verify under. Not part of Standard Webhooks; its value is checked
#: against the configured peers before any crypto is spent.
HEADER_PEER = "overflowd-peer"
CONTENT_TYPE = "application/json"
#: The compact encoding of inbox bodies and pull pages (module docstring), negotiated by
#: ``Content-Type`` (inbox) and ``Accept`` (pull).
CBOR = "application/cbor"
#: Reports one lean pull page may list (the API's ``MAX_PAGE``): bounds the decoder's work.
MAX_PAGE_REPORTS = 5000
#: Report numbers are unsigned 63-bit (the store's ``MAX_SEQ``).
MAX_SEQ = 2**63 - 1

#: The most hops a report may have made. The operator's ``peering.hop_limit`` (default 4) is
#: what stops forwarding; this only bounds the field (one byte's worth is far beyond any mesh).
MAX_HOPS = 255
#: The longest ``cose`` text: base64url of the largest report (``report.MAX_REPORT_BYTES``),
#: with padding. Longer text cannot be a report and is refused before decoding.
MAX_COSE_TEXT = 4 * math.ceil(rpt.MAX_REPORT_BYTES / 3)
#: Default caps (the ``[peering]`` settings override them). 500 reports of at most ~1.6 KiB
#: each fit in 1 MiB; the report cap bounds the Ed25519 checks one request costs.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
DEFAULT_MAX_REPORTS = 500
#: An answer is three small fields and at most one refusal per report sent: 64 KiB holds 500
#: refusals of ~40 bytes with room; a peer's longer answer is not read.
MAX_ANSWER_BYTES = 64 * 1024
#: Reasons are short tokens from the receiver's vocabulary; longer text is not one.
MAX_REASON_CHARS = 32
#: Integer literals in a body: hops and counts are small; this refuses a 4 000-digit number
#: before Python spends time converting it.
_MAX_INT_DIGITS = 9

#: Why one item is refused (the receiver's answer, and the metric labels).
ITEM_REASONS = (
    "malformed",  # not {"cose": str, "hops": int}, or cose not base64url
    "hops",  # hops outside 1..MAX_HOPS
    "oversized",  # cose longer than any report
    "undecodable",  # the COSE bytes are not a report
    "forged",  # the report's own signature does not verify
    "stale",  # made longer ago than the receiver's max age
    "future",  # made further ahead than the receiver allows
    "repeated",  # the same report twice in one body
)


class InboxDecodeError(DecodeError):
    """A body (or answer) that is not the inbox format at all: refused whole (HTTP 400)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, fmt="peer-inbox")


@dataclass(frozen=True, slots=True)
class InboxItem:
    """One forwarded report as parsed: its position in the body, its bytes and hop count."""

    index: int
    cose: bytes
    hops: int

    @property
    def report_id(self) -> str:
        return rpt.report_id(self.cose)


@dataclass(frozen=True, slots=True)
class InboxBatch:
    """A parsed body: the items that parsed, and ``(index, reason)`` for those that did not."""

    items: tuple[InboxItem, ...]
    bad: tuple[tuple[int, str], ...]
    total: int


@dataclass(frozen=True, slots=True)
class InboxAnswer:
    accepted: int
    duplicates: int
    refused: tuple[tuple[int, str], ...] = field(default_factory=tuple)


def message_id(body: bytes, recipient: bytes) -> str:
    """The ``webhook-id`` of an inbox POST to the node whose key is ``recipient``: ``inbox_`` +
    hex of 16 bytes of SHA-256(recipient key + body). The id is signed, so a request made for
    one node does not verify as one made for another (see the module docstring)."""
    if len(recipient) != 32:
        raise ValueError("the recipient is a 32-byte Ed25519 public key")
    return "inbox_" + hashlib.sha256(bytes(recipient) + bytes(body)).digest()[:16].hex()


def encode_inbox(items: Sequence[tuple[bytes, int]], *, content_type: str = CONTENT_TYPE) -> bytes:
    """The body carrying ``(cose, hops)`` pairs, in order; compact JSON, or CBOR."""
    for cose, hops in items:
        if not 1 <= hops <= MAX_HOPS:
            raise ValueError(f"hops must be 1 to {MAX_HOPS}")
        if not 0 < len(cose) <= rpt.MAX_REPORT_BYTES:
            raise ValueError("not a report's size")
    if content_type == CBOR:
        parts = [_head(5, 1), _text_item("reports"), _head(4, len(items))]
        for cose, hops in items:
            parts += [b"\x82", _head(2, len(cose)), bytes(cose), _head(0, hops)]
        return b"".join(parts)
    if content_type != CONTENT_TYPE:
        raise ValueError(f"an inbox body is {CONTENT_TYPE} or {CBOR}")
    out = [{"cose": rpt.b64url(cose), "hops": hops} for cose, hops in items]
    return json.dumps({"reports": out}, separators=(",", ":")).encode("ascii")


def inbox_item_bytes(cose_len: int, content_type: str = CONTENT_TYPE) -> int:
    """What one item adds to a body (the sender's byte cap per POST counts with this)."""
    if content_type == CBOR:
        return 1 + len(_head(2, cose_len)) + cose_len + 2
    return 4 * math.ceil(cose_len / 3) + 24  # {"cose":"...","hops":N},


# -- CBOR: the strict subset both bodies use ----------------------------------------------------

#: Arrays and maps nest at most this deep: {"reports": [[...]]} is 3.
_MAX_CBOR_DEPTH = 4
#: The longest map key: both formats' keys are short words.
_MAX_KEY_CHARS = 16


def _head(major: int, value: int) -> bytes:
    """A CBOR head in the shortest form (RFC 8949 §4.2.1)."""
    if value < 0:
        raise ValueError("CBOR arguments are unsigned")
    top = major << 5
    if value < 24:
        return bytes([top | value])
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([top | ai]) + value.to_bytes(size, "big")
    raise ValueError("a CBOR argument is at most 64 bits")


def _text_item(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _head(3, len(raw)) + raw


def _read_head(r: Reader) -> tuple[int, int]:
    start = r.offset
    initial = r.u8()
    major, ai = initial >> 5, initial & 0x1F
    if ai < 24:
        return major, ai
    if ai > 27:
        raise r.malformed("indefinite lengths and reserved values are not used", offset=start)
    value = r.uint(1 << (ai - 24))
    if value < (24 if ai == 24 else 1 << (8 * (1 << (ai - 25)))):
        raise r.malformed("a CBOR head is not in its shortest form", offset=start)
    return major, value


def _cbor_value(r: Reader, depth: int) -> Any:
    """One data item of the subset: unsigned and negative integers, byte and text strings,
    arrays, maps with text keys, false/true/null. Anything else raises (the caller maps)."""
    start = r.offset
    major, arg = _read_head(r)
    if major == 0:
        return arg
    if major == 1:
        return -1 - arg
    if major == 2:
        return r.bytes(arg)
    if major == 3:
        try:
            return r.bytes(arg).decode("utf-8")
        except UnicodeDecodeError:
            raise r.malformed("a text string is not UTF-8", offset=start) from None
    if major in (4, 5):
        if depth >= _MAX_CBOR_DEPTH:
            raise r.malformed("nested too deeply", offset=start)
        # Every item takes at least one byte (a map entry two): a count beyond what is left
        # is refused before anything is made for it.
        if arg * (2 if major == 5 else 1) > r.remaining():
            raise r.truncated("array or map", arg)
        if major == 4:
            return [_cbor_value(r, depth + 1) for _ in range(arg)]
        out: dict[str, Any] = {}
        for _ in range(arg):
            key_at = r.offset
            key = _cbor_value(r, depth + 1)
            if not isinstance(key, str) or len(key) > _MAX_KEY_CHARS:
                raise r.malformed("a map key is not a short text string", offset=key_at)
            if key in out:
                raise r.malformed(f"key {key!r} given twice", offset=key_at)
            out[key] = _cbor_value(r, depth + 1)
        return out
    if major == 7 and arg in (20, 21, 22):
        return (False, True, None)[arg - 20]
    if major == 6:
        raise r.malformed("tags are not used", offset=start)
    raise r.malformed("floats and other simple values are not used", offset=start)


def _load_cbor(body: bytes, max_bytes: int, what: str) -> Any:
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError("body must be bytes")
    if len(body) > max_bytes:
        raise InboxDecodeError(f"{what} is larger than {max_bytes} bytes")
    r = Reader(body, fmt="peer-cbor")
    try:
        doc = _cbor_value(r, 0)
        if not r.at_end():
            raise r.malformed("bytes after the CBOR item")
    except WireDecodeError as exc:
        raise InboxDecodeError(
            f"{what} is not the peers' CBOR: {exc} at offset {exc.offset}"
        ) from None
    return doc


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise InboxDecodeError(f"key {key[:32]!r} given twice")
        doc[key] = value
    return doc


def _int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise InboxDecodeError("an integer is too long")
    return int(text)


def _refuse_constant(text: str) -> Any:
    raise InboxDecodeError(f"{text} is not JSON")


def _float(text: str) -> Any:
    raise InboxDecodeError("a number is not an integer")


def _load(body: bytes, max_bytes: int, what: str) -> Any:
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError("body must be bytes")
    if len(body) > max_bytes:
        raise InboxDecodeError(f"{what} is larger than {max_bytes} bytes")
    try:
        return json.loads(
            bytes(body).decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_int=_int,
            parse_float=_float,
            parse_constant=_refuse_constant,
        )
    except InboxDecodeError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InboxDecodeError(f"{what} is not UTF-8 JSON") from None


def _cbor_item(index: int, raw: Any) -> InboxItem | str:
    """One CBOR item ``[cose, hops]``, or the reason it is refused."""
    if not isinstance(raw, list) or len(raw) != 2:
        return "malformed"
    cose, hops = raw
    if not isinstance(cose, bytes) or not isinstance(hops, int) or isinstance(hops, bool):
        return "malformed"
    if not 1 <= hops <= MAX_HOPS:
        return "hops"
    if not cose:
        return "malformed"
    if len(cose) > rpt.MAX_REPORT_BYTES:
        return "oversized"
    return InboxItem(index=index, cose=cose, hops=hops)


def _item(index: int, raw: Any) -> InboxItem | str:
    """One item, or the reason it is refused."""
    if not isinstance(raw, dict) or set(raw) != {"cose", "hops"}:
        return "malformed"
    cose_text, hops = raw["cose"], raw["hops"]
    if not isinstance(cose_text, str) or not isinstance(hops, int) or isinstance(hops, bool):
        return "malformed"
    if not 1 <= hops <= MAX_HOPS:
        return "hops"
    if len(cose_text) > MAX_COSE_TEXT:
        return "oversized"
    try:
        cose = rpt.b64url_decode(cose_text)
    except ValueError:
        return "malformed"
    if not cose or len(cose) > rpt.MAX_REPORT_BYTES:
        return "oversized" if cose else "malformed"
    return InboxItem(index=index, cose=cose, hops=hops)


def decode_inbox(
    body: bytes,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_reports: int = DEFAULT_MAX_REPORTS,
    content_type: str = CONTENT_TYPE,
) -> InboxBatch:
    """Parse an inbox body; :class:`InboxDecodeError` if it is not one at all.

    Refused whole: over ``max_body_bytes`` (checked first), not UTF-8 JSON, a key given twice,
    not exactly ``{"reports": [...]}``, no reports, more than ``max_reports``. Per item (kept
    in ``bad`` by index): anything but ``{"cose": base64url, "hops": 1..MAX_HOPS}``, and the
    same COSE bytes twice (``repeated``, the later one). The COSE bytes are not decoded here:
    the receiver decodes and verifies each report (its own errors are per item too).
    ``content_type`` is :data:`CONTENT_TYPE` (JSON) or :data:`CBOR` (items ``[cose, hops]``).
    """
    if content_type == CBOR:
        doc, item_of = _load_cbor(body, max_body_bytes, "body"), _cbor_item
    elif content_type == CONTENT_TYPE:
        doc, item_of = _load(body, max_body_bytes, "body"), _item
    else:
        raise ValueError(f"an inbox body is {CONTENT_TYPE} or {CBOR}")
    if not isinstance(doc, dict) or set(doc) != {"reports"} or not isinstance(doc["reports"], list):
        raise InboxDecodeError('an inbox body is {"reports": [...]}')
    raw_items = doc["reports"]
    if not raw_items:
        raise InboxDecodeError("an inbox body holds one or more reports")
    if len(raw_items) > max_reports:
        raise InboxDecodeError(f"an inbox body holds more than {max_reports} reports")
    items: list[InboxItem] = []
    bad: list[tuple[int, str]] = []
    seen: set[bytes] = set()
    for index, raw in enumerate(raw_items):
        parsed = item_of(index, raw)
        if isinstance(parsed, str):
            bad.append((index, parsed))
        elif parsed.cose in seen:
            bad.append((index, "repeated"))
        else:
            seen.add(parsed.cose)
            items.append(parsed)
    return InboxBatch(items=tuple(items), bad=tuple(bad), total=len(raw_items))


# -- the lean pull page (GET /v1/reports, Accept: application/cbor) -------------------------


@dataclass(frozen=True, slots=True)
class PageItem:
    """One report of a lean page: the peer's number for it, its bytes, its hops there."""

    seq: int
    cose: bytes
    hops: int


@dataclass(frozen=True, slots=True)
class LeanPage:
    """A lean page as parsed: the items that parsed, how many were listed, the next cursor,
    and how many items were refused by shape (``malformed``) or size (``oversized``)."""

    items: tuple[PageItem, ...]
    next: int
    listed: int
    bad: tuple[tuple[int, str], ...]


def encode_page(items: Sequence[tuple[int, bytes, int]], next_cursor: int) -> bytes:
    """The lean page: ``(seq, cose, hops)`` triples in order and the next cursor (CBOR)."""
    if not 0 <= next_cursor <= MAX_SEQ:
        raise ValueError("the cursor is 0 to 2**63-1")
    parts = [_head(5, 2), _text_item("next"), _head(0, next_cursor), _text_item("reports")]
    parts.append(_head(4, len(items)))
    for seq, cose, hops in items:
        parts += [b"\x83", _head(0, seq), _head(2, len(cose)), bytes(cose), _head(0, hops)]
    return b"".join(parts)


def decode_page(body: bytes, *, max_body_bytes: int, max_reports: int) -> LeanPage:
    """A peer's lean page; :class:`InboxDecodeError` when it is not one at all.

    Refused whole: over ``max_body_bytes``, not the CBOR subset, not exactly
    ``{"next": uint, "reports": [...]}``, more than ``max_reports`` items, a ``next`` out of
    range. Per item (kept in ``bad`` by index): not ``[uint seq, bstr cose, uint hops]`` with
    a report's size and hops 0 to :data:`MAX_HOPS`. The paging contract (``next`` against
    the asker's cursor) and the reports themselves are the caller's to check.
    """
    doc = _load_cbor(body, max_body_bytes, "page")
    if not isinstance(doc, dict) or set(doc) != {"next", "reports"}:
        raise InboxDecodeError('a page is {"next": cursor, "reports": [...]}')
    nxt, raw_items = doc["next"], doc["reports"]
    if not isinstance(nxt, int) or isinstance(nxt, bool) or not 0 <= nxt <= MAX_SEQ:
        raise InboxDecodeError("a page's next is not a cursor")
    if not isinstance(raw_items, list):
        raise InboxDecodeError("a page's reports are not a list")
    if len(raw_items) > max_reports:
        raise InboxDecodeError(f"a page lists more than {max_reports} reports")
    items: list[PageItem] = []
    bad: list[tuple[int, str]] = []
    for index, raw in enumerate(raw_items):
        if not isinstance(raw, list) or len(raw) != 3:
            bad.append((index, "malformed"))
            continue
        seq, cose, hops = raw
        if (
            not isinstance(seq, int)
            or isinstance(seq, bool)
            or not 0 < seq <= MAX_SEQ
            or not isinstance(cose, bytes)
            or not cose
            or not isinstance(hops, int)
            or isinstance(hops, bool)
            or not 0 <= hops <= MAX_HOPS
        ):
            bad.append((index, "malformed"))
        elif len(cose) > rpt.MAX_REPORT_BYTES:
            bad.append((index, "oversized"))
        else:
            items.append(PageItem(seq=seq, cose=cose, hops=hops))
    return LeanPage(items=tuple(items), next=nxt, listed=len(raw_items), bad=tuple(bad))


def encode_answer(answer: InboxAnswer) -> bytes:
    return json.dumps(
        {
            "accepted": answer.accepted,
            "duplicates": answer.duplicates,
            "refused": [{"index": i, "reason": r} for i, r in answer.refused],
        },
        separators=(",", ":"),
    ).encode("ascii")


def decode_answer(body: bytes, *, sent: int) -> InboxAnswer:
    """A peer's answer to a POST of ``sent`` reports; :class:`InboxDecodeError` if malformed.

    The numbers must add up: ``accepted + duplicates + len(refused) == sent``, every refused
    index below ``sent`` and named once, so a peer cannot claim more than it was sent.
    """
    doc = _load(body, MAX_ANSWER_BYTES, "answer")
    if not isinstance(doc, dict) or set(doc) != {"accepted", "duplicates", "refused"}:
        raise InboxDecodeError("an answer is {accepted, duplicates, refused}")
    accepted, duplicates, refused_raw = doc["accepted"], doc["duplicates"], doc["refused"]
    counts_ok = all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (accepted, duplicates)
    )
    if not counts_ok or not isinstance(refused_raw, list) or len(refused_raw) > sent:
        raise InboxDecodeError("an answer's counts are malformed")
    refused: list[tuple[int, str]] = []
    indexes: set[int] = set()
    for entry in refused_raw:
        if not isinstance(entry, dict) or set(entry) != {"index", "reason"}:
            raise InboxDecodeError("a refusal is {index, reason}")
        index, reason = entry["index"], entry["reason"]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < sent:
            raise InboxDecodeError("a refusal's index is not one of the reports sent")
        if index in indexes:
            raise InboxDecodeError("a report is refused twice")
        if not isinstance(reason, str) or not 0 < len(reason) <= MAX_REASON_CHARS:
            raise InboxDecodeError("a refusal's reason is malformed")
        indexes.add(index)
        refused.append((index, reason))
    if accepted + duplicates + len(refused) != sent:
        raise InboxDecodeError("an answer's counts do not add up to the reports sent")
    return InboxAnswer(accepted=accepted, duplicates=duplicates, refused=tuple(refused))


# -- budgets ----------------------------------------------------------------------------------


class Budget:
    """Reports/s and bytes/s token buckets for one peer and one direction; time is injected.

    A batch is admitted whole when both buckets hold something (are above zero) and then
    charged in full, so a bucket may go into debt: a batch larger than the burst still passes,
    and the debt makes the next one wait, so the average stays at the rate. ``wait_s`` says how
    long until a batch may pass (the sender's wait, the receiver's ``Retry-After``).
    """

    __slots__ = (
        "_at",
        "_bytes",
        "_reports",
        "bytes_burst",
        "bytes_per_s",
        "reports_burst",
        "reports_per_s",
    )

    def __init__(
        self,
        *,
        reports_per_s: float,
        reports_burst: float,
        bytes_per_s: float,
        bytes_burst: float,
        now: float,
    ) -> None:
        if not (reports_per_s > 0 and bytes_per_s > 0 and reports_burst > 0 and bytes_burst > 0):
            raise ValueError("budget rates and bursts must be positive")
        self.reports_per_s, self.reports_burst = reports_per_s, reports_burst
        self.bytes_per_s, self.bytes_burst = bytes_per_s, bytes_burst
        self._reports, self._bytes, self._at = float(reports_burst), float(bytes_burst), now

    def _refill(self, now: float) -> None:
        if now > self._at:
            dt = now - self._at
            self._reports = min(self.reports_burst, self._reports + dt * self.reports_per_s)
            self._bytes = min(self.bytes_burst, self._bytes + dt * self.bytes_per_s)
            self._at = now

    def wait_s(self, now: float) -> float:
        """Seconds until a batch may pass (0.0: now)."""
        self._refill(now)
        # "> 0" with a small epsilon: a float that refilled to 1e-12 has to wait for more.
        need_r = max(0.0, (1e-9 - self._reports) / self.reports_per_s)
        need_b = max(0.0, (1e-9 - self._bytes) / self.bytes_per_s)
        return max(need_r, need_b)

    def room(self, now: float) -> tuple[int, int]:
        """How many reports and bytes fit without debt now (at least 1 report when passable)."""
        self._refill(now)
        return max(0, math.floor(self._reports)), max(0, math.floor(self._bytes))

    def charge(self, reports: int, nbytes: int, now: float) -> None:
        self._refill(now)
        self._reports -= reports
        self._bytes -= nbytes

    def try_admit(self, reports: int, nbytes: int, now: float) -> float:
        """Charge and return 0.0 if a batch may pass now, else the seconds to wait."""
        wait = self.wait_s(now)
        if wait == 0.0:
            self.charge(reports, nbytes, now)
        return wait


__all__ = [
    "CBOR",
    "CONTENT_TYPE",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_REPORTS",
    "HEADER_PEER",
    "INBOX_PATH",
    "ITEM_REASONS",
    "MAX_HOPS",
    "MAX_PAGE_REPORTS",
    "Budget",
    "InboxAnswer",
    "InboxBatch",
    "InboxDecodeError",
    "InboxItem",
    "LeanPage",
    "PageItem",
    "decode_answer",
    "decode_inbox",
    "decode_page",
    "encode_answer",
    "encode_inbox",
    "encode_page",
    "inbox_item_bytes",
    "message_id",
]
