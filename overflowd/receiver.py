"""Verify an overflowd webhook delivery: the library call for people writing their own receiver.

``verify_delivery(headers, body, now=time.time())`` does every check ``overflowd-receive`` does
and returns the verified :class:`~overflowd.report.SignedReport`, or raises one of our errors:

* :class:`~overflowd.wire.webhook.WebhookDecodeError` (a ``DecodeError``): headers or body
  malformed or too large; :class:`~overflowd.errors.ReportDecodeError`: the COSE report inside
  is malformed. Answer 400.
* :class:`~overflowd.wire.webhook.StaleWebhookError` (a ``SignatureError``): timestamp outside
  the window. :class:`UntrustedKeyError` (a ``SignatureError``): signed by a key not in
  ``trusted_keys``. :class:`~overflowd.errors.SignatureError`: a signature does not verify.
  Answer 401.

Which key signs a delivery: the node's identity key, which is also the COSE ``kid`` of the
report in the body. So the check is one key for both: the webhook signature must verify under
the ``kid`` of the report it carries, and that key must be trusted when a trust list is given.

De-duplication is the caller's: :class:`SeenIds` is a bounded memory of delivered ids. A
duplicate is *not* an error (the sender retries after a lost response and must be told 2xx).

It never writes, logs or keeps report bodies, and never raises anything but our errors for any
headers and body (a hypothesis test says so).
"""

from __future__ import annotations

import collections
import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from overflowd import report as rpt
from overflowd.errors import ReportDecodeError, SignatureError
from overflowd.identity import check_signature
from overflowd.wire import webhook as wh

#: The largest body accepted. A report is at most 1196 bytes of COSE; its JSON rendering with
#: the base64url COSE inside is under 3 KiB. 64 KiB leaves room for future fields and refuses
#: anything that is plainly not a report before it is parsed.
MAX_BODY_BYTES = 64 * 1024
#: Ids remembered for de-duplication. A retry arrives within the sender's backoff cap (hours);
#: 100 000 ids of 64 characters cost about 15 MiB.
DEFAULT_SEEN_IDS = 100_000


class UntrustedKeyError(SignatureError):
    """A delivery signed by a key that is not in the receiver's trust list."""


def encode_body(report: rpt.SignedReport) -> bytes:
    """The webhook body for ``report``: its JSON rendering (with ``cose``), compact UTF-8."""
    return json.dumps(
        rpt.to_json(report), separators=(",", ":"), sort_keys=True, ensure_ascii=False
    ).encode("utf-8")


def _parse_body(body: bytes) -> tuple[dict[str, Any], rpt.UnverifiedReport]:
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise wh.WebhookDecodeError("body is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise wh.WebhookDecodeError("body is not a JSON object")
    cose_text = doc.get("cose")
    if not isinstance(cose_text, str):
        raise wh.WebhookDecodeError("body has no 'cose' string")
    try:
        cose = rpt.b64url_decode(cose_text)
    except ValueError:
        raise wh.WebhookDecodeError("body 'cose' is not base64url") from None
    return doc, rpt.decode_unverified(cose)


def _agrees(rendered: Any, sent: Any) -> bool:
    """Every field of our rendering is in the body with the same value; extra fields are ok."""
    if isinstance(rendered, dict):
        return isinstance(sent, dict) and all(
            k in sent and _agrees(v, sent[k]) for k, v in rendered.items()
        )
    if isinstance(rendered, bool) or isinstance(sent, bool):
        return rendered is sent
    return bool(type(rendered) is type(sent) and rendered == sent) or (
        isinstance(rendered, float) and isinstance(sent, int) and float(sent) == rendered
    )


def verify_delivery(
    headers: wh.HeaderInput,
    body: bytes,
    *,
    now: float,
    trusted_keys: Collection[bytes] | None = None,
    tolerance_s: float = wh.DEFAULT_TOLERANCE_S,
) -> rpt.SignedReport:
    """Verify one webhook delivery; return the verified report or raise one of our errors.

    ``headers``: a mapping or ``(name, value)`` pairs, names in any case. ``body``: the exact
    bytes received. ``now``: Unix seconds (``time.time()``). ``trusted_keys``: 32-byte Ed25519
    public keys; ``None`` accepts any key whose signatures verify (trust decided later).
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError("body must be bytes")
    body = bytes(body)
    if len(body) > MAX_BODY_BYTES:
        raise wh.WebhookDecodeError(f"body is larger than {MAX_BODY_BYTES} bytes")
    parsed = wh.parse_headers(headers)
    # The cheap checks first: a stale or mis-addressed message costs no crypto.
    wh.check_timestamp(parsed.timestamp, now=now, tolerance_s=tolerance_s)
    doc, unverified = _parse_body(body)
    if trusted_keys is not None and unverified.kid not in trusted_keys:
        raise UntrustedKeyError("delivery signed by a key that is not trusted")
    wh.verify_signature(parsed, body, public_key=unverified.kid, check=check_signature)
    check_signature(unverified.kid, unverified.to_be_signed, unverified.signature)
    report = rpt.SignedReport(
        cose=unverified.cose, observer_key=unverified.kid, payload=unverified.payload
    )
    if parsed.msg_id != report.report_id:
        raise wh.WebhookDecodeError("webhook-id is not the id of the report in the body")
    try:
        # 'cose' itself is what was verified (padded or not); every other field must agree.
        rendered = rpt.to_json(report, include_cose=False)
    except (ValueError, OverflowError):  # pragma: no cover - to_json of a decoded report
        raise ReportDecodeError("report cannot be rendered") from None
    if not _agrees(rendered, doc):
        raise wh.WebhookDecodeError("body JSON does not agree with the signed report")
    return report


@dataclass(frozen=True, slots=True)
class SeenIdsStatistics:
    size: int
    capacity: int
    evicted: int


class SeenIds:
    """A bounded memory of delivered webhook ids, oldest forgotten first.

    Bounded so that a flood of valid-but-distinct deliveries cannot exhaust memory. An id
    forgotten and delivered again is written again: size the capacity above the number of
    deliveries expected within the senders' retry horizon (:data:`DEFAULT_SEEN_IDS`).
    """

    def __init__(self, capacity: int = DEFAULT_SEEN_IDS, initial: Iterable[str] = ()) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._ids: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._evicted = 0
        for msg_id in initial:
            self.add(msg_id)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, msg_id: str) -> bool:
        """Remember ``msg_id``; True if it was new."""
        if msg_id in self._ids:
            self._ids.move_to_end(msg_id)
            return False
        self._ids[msg_id] = None
        while len(self._ids) > self._capacity:
            self._ids.popitem(last=False)
            self._evicted += 1
        return True

    def statistics(self) -> SeenIdsStatistics:
        return SeenIdsStatistics(
            size=len(self._ids), capacity=self._capacity, evicted=self._evicted
        )
