"""Verify an overflowd webhook delivery: the library call for people writing their own receiver.

``verify_batch(headers, body, now=time.time())`` does every check ``overflowd-receive`` does
and returns the verified reports, for both forms a sender POSTs: one report (the report's JSON,
``webhook-id`` = its id) or several (``{"reports": [...]}``, ``webhook-id`` = :func:`batch_id`
of their ids). ``verify_delivery`` does the same for the single form only and returns the one
:class:`~overflowd.report.SignedReport`. Both raise one of our errors:

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
import hashlib
import ipaddress
import json
from collections.abc import Collection, Iterable, Sequence
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
#: Reports one batch may carry: a report's JSON is at least ~600 bytes, so MAX_BODY_BYTES holds
#: about 100; the cap bounds the Ed25519 checks one request costs (one per report, plus one).
MAX_BATCH_REPORTS = 100
#: How a batch body begins and ends (the sender writes exactly this; receivers parse JSON).
BATCH_PREFIX = b'{"reports":['
BATCH_SUFFIX = b"]}"
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


def encode_batch_body(reports: Sequence[rpt.SignedReport]) -> bytes:
    """The body of one POST carrying several reports: ``{"reports": [<report JSON>, ...]}``."""
    return BATCH_PREFIX + b",".join(encode_body(r) for r in reports) + BATCH_SUFFIX


def batch_id(report_ids: Sequence[str]) -> str:
    """The ``webhook-id`` of a batch: ``batch_`` + hex of the first 16 bytes of SHA-256 over
    the report ids in body order joined by ``,`` (so it names exactly these reports)."""
    digest = hashlib.sha256(",".join(report_ids).encode("ascii")).digest()
    return "batch_" + digest[:16].hex()


def _load(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise wh.WebhookDecodeError("body is not UTF-8 JSON") from None


def _parse_doc(doc: Any) -> tuple[dict[str, Any], rpt.UnverifiedReport]:
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
    max_body_bytes: int = MAX_BODY_BYTES,
) -> rpt.SignedReport:
    """Verify one webhook delivery; return the verified report or raise one of our errors.

    ``headers``: a mapping or ``(name, value)`` pairs, names in any case. ``body``: the exact
    bytes received. ``now``: Unix seconds (``time.time()``). ``trusted_keys``: 32-byte Ed25519
    public keys; ``None`` accepts any key whose signatures verify (trust decided later).
    ``max_body_bytes``: the receiver's body cap (it may raise the default).
    """
    body, parsed = preflight(
        headers, body, now=now, tolerance_s=tolerance_s, max_body_bytes=max_body_bytes
    )
    return _single(parsed, body, _load(body), trusted_keys)


def preflight(
    headers: wh.HeaderInput, body: bytes, *, now: float, tolerance_s: float, max_body_bytes: int
) -> tuple[bytes, wh.WebhookHeaders]:
    """The checks both forms start with, before any JSON or crypto: size, headers, timestamp
    (a stale or mis-addressed message costs no crypto). Public for the peer inbox
    (:mod:`overflowd.services.api_peers`), whose body is another format behind the same
    Standard Webhooks checks."""
    if not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError("body must be bytes")
    body = bytes(body)
    if len(body) > max_body_bytes:
        raise wh.WebhookDecodeError(f"body is larger than {max_body_bytes} bytes")
    parsed = wh.parse_headers(headers)
    wh.check_timestamp(parsed.timestamp, now=now, tolerance_s=tolerance_s)
    return body, parsed


def _single(
    parsed: wh.WebhookHeaders, body: bytes, loaded: Any, trusted_keys: Collection[bytes] | None
) -> rpt.SignedReport:
    """The single form, once :func:`preflight` has passed and the body is loaded."""
    doc, unverified = _parse_doc(loaded)
    if trusted_keys is not None and unverified.kid not in trusted_keys:
        raise UntrustedKeyError("delivery signed by a key that is not trusted")
    wh.verify_signature(parsed, body, public_key=unverified.kid, check=check_signature)
    report = _verified(doc, unverified)
    if parsed.msg_id != report.report_id:
        raise wh.WebhookDecodeError("webhook-id is not the id of the report in the body")
    return report


def verify_batch(
    headers: wh.HeaderInput,
    body: bytes,
    *,
    now: float,
    trusted_keys: Collection[bytes] | None = None,
    tolerance_s: float = wh.DEFAULT_TOLERANCE_S,
    max_reports: int = MAX_BATCH_REPORTS,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> list[rpt.SignedReport]:
    """Verify one delivery of either form; return its reports in body order.

    A single-report body gives a list of one (the checks of :func:`verify_delivery`). A batch,
    ``{"reports": [...]}``, holds 1 to ``max_reports`` report renderings, all by one key (the
    ``kid`` every COSE carries, which must verify the webhook signature), none twice, and
    ``webhook-id`` must be :func:`batch_id` of their ids: every COSE is verified, every
    rendering must agree with its report. Any failure refuses the whole delivery.
    ``max_reports`` and ``max_body_bytes`` are the receiver's caps (its flags may raise them).
    """
    body, parsed = preflight(
        headers, body, now=now, tolerance_s=tolerance_s, max_body_bytes=max_body_bytes
    )
    doc = _load(body)
    if not (isinstance(doc, dict) and "reports" in doc and "cose" not in doc):
        return [_single(parsed, body, doc, trusted_keys)]  # parsed and loaded once
    items = doc["reports"]
    if set(doc) != {"reports"} or not isinstance(items, list) or not items:
        raise wh.WebhookDecodeError('a batch is {"reports": [one or more reports]}')
    if len(items) > max_reports:
        raise wh.WebhookDecodeError(f"a batch holds more than {max_reports} reports")
    docs = [_parse_doc(item) for item in items]
    kid = docs[0][1].kid
    if any(u.kid != kid for _, u in docs):
        raise wh.WebhookDecodeError("the reports of a batch are not all signed by one key")
    # The cheap checks first (ids are hashes of the COSE bytes): no crypto for a mismatch.
    ids = [rpt.report_id(u.cose) for _, u in docs]
    if len(set(ids)) != len(ids):
        raise wh.WebhookDecodeError("a batch holds one report twice")
    if parsed.msg_id != batch_id(ids):
        raise wh.WebhookDecodeError("webhook-id is not the batch id of the reports in the body")
    if trusted_keys is not None and kid not in trusted_keys:
        raise UntrustedKeyError("delivery signed by a key that is not trusted")
    wh.verify_signature(parsed, body, public_key=kid, check=check_signature)
    return [_verified(d, u) for d, u in docs]


def _verified(doc: dict[str, Any], unverified: rpt.UnverifiedReport) -> rpt.SignedReport:
    """The report after its COSE signature verified and its rendering agreed."""
    check_signature(unverified.kid, unverified.to_be_signed, unverified.signature)
    report = rpt.SignedReport(
        cose=unverified.cose, observer_key=unverified.kid, payload=unverified.payload
    )
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


# -- who may write how much: the receiver's budgets for keys it does not know ------------------

#: Defaults for :class:`KeyCaps`, each with its reason. A sender is an overflowd node: its
#: budgets send one target a few reports a second at most, even in a flood, and on 429 it holds
#: the endpoint until ``Retry-After`` (its outbox is durable: late, not lost). One a second with
#: a burst of 20 leaves it room and gives a throwaway key little.
DEFAULT_KEY_RATE_PER_S = 1.0
DEFAULT_KEY_BURST = 20
#: 16 MiB a day is about 5 500 reports of 3 KiB from one observer: far more than a real one
#: sends to one receiver, far less than a disk.
DEFAULT_KEY_MAX_BYTES = 16 * 1024 * 1024
DEFAULT_KEY_WINDOW_S = 86_400.0
#: Keys are free to make, so per-key caps alone do not bound a flood of throwaway keys: keys
#: not seen before are admitted one per 10 s (burst 10); a real receiver meets new observers
#: far more slowly than that.
DEFAULT_NEW_KEYS_PER_S = 0.1
DEFAULT_NEW_KEYS_BURST = 10
#: All keys together, per window: many keys within their own caps still add up, and this
#: refills (a full output file does not). 256 MiB a day is some 90 000 reports.
DEFAULT_ALL_KEYS_MAX_BYTES = 256 * 1024 * 1024
#: Keys whose budgets are remembered (about 200 bytes each); the least recently used goes first,
#: and a forgotten key is new again (so it passes the new-key bucket again).
DEFAULT_MAX_KEYS = 65_536


@dataclass(frozen=True)
class KeyCaps:
    """Per-key rate and size caps for deliveries from keys nobody vouched for (no ``--trust``)."""

    rate_per_s: float = DEFAULT_KEY_RATE_PER_S
    burst: int = DEFAULT_KEY_BURST
    max_bytes: int = DEFAULT_KEY_MAX_BYTES
    window_s: float = DEFAULT_KEY_WINDOW_S
    new_keys_per_s: float = DEFAULT_NEW_KEYS_PER_S
    new_keys_burst: int = DEFAULT_NEW_KEYS_BURST
    all_keys_max_bytes: int = DEFAULT_ALL_KEYS_MAX_BYTES
    max_keys: int = DEFAULT_MAX_KEYS

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and self.new_keys_per_s > 0 and self.window_s > 0):
            raise ValueError("key rates and the window must be positive")
        if min(self.burst, self.new_keys_burst, self.max_keys, self.max_bytes) < 1:
            raise ValueError("key bursts, max_bytes and max_keys must be at least 1")
        if self.all_keys_max_bytes < 1:
            raise ValueError("all_keys_max_bytes must be at least 1")


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a verified delivery is not written now, and when trying again may succeed."""

    reason: str  # "key_rate", "key_bytes", "new_key_rate" or "all_keys_bytes"
    retry_after_s: float


class _Bucket:
    """Tokens up to ``capacity``, refilled at ``per_s``; time is the caller's (``now``)."""

    __slots__ = ("at", "tokens")

    def __init__(self, capacity: float, now: float) -> None:
        self.tokens, self.at = capacity, now

    def refill(self, capacity: float, per_s: float, now: float) -> None:
        if now > self.at:
            self.tokens = min(capacity, self.tokens + (now - self.at) * per_s)
            self.at = now

    def wait_s(self, need: float, per_s: float) -> float:
        return max(0.0, (need - self.tokens) / per_s)


@dataclass(frozen=True, slots=True)
class KeyBudgetStatistics:
    keys: int
    evicted: int


class KeyBudget:
    """Token buckets per signing key (reports and bytes) and one for keys not seen before.

    Sans-IO: ``now`` is any monotonic clock in seconds. Charge only verified deliveries (a
    forger must not spend somebody else's budget) and only what is about to be written.
    """

    def __init__(self, caps: KeyCaps | None = None) -> None:
        self.caps = caps or KeyCaps()
        self._keys: collections.OrderedDict[bytes, tuple[_Bucket, _Bucket]] = (
            collections.OrderedDict()
        )
        self._new: _Bucket | None = None
        self._all: _Bucket | None = None
        self._evicted = 0

    def admit(self, key: bytes, nbytes: int, now: float) -> Refusal | None:
        """Charge one report of ``nbytes`` to ``key``; a :class:`Refusal` if over a cap."""
        c = self.caps
        state = self._keys.get(key)
        if state is None:
            if self._new is None:
                self._new = _Bucket(c.new_keys_burst, now)
            self._new.refill(c.new_keys_burst, c.new_keys_per_s, now)
            if self._new.tokens < 1:
                return Refusal("new_key_rate", self._new.wait_s(1, c.new_keys_per_s))
            rate, size = _Bucket(c.burst, now), _Bucket(c.max_bytes, now)
        else:
            rate, size = state
        if self._all is None:
            self._all = _Bucket(c.all_keys_max_bytes, now)
        bytes_per_s = c.max_bytes / c.window_s
        all_per_s = c.all_keys_max_bytes / c.window_s
        rate.refill(c.burst, c.rate_per_s, now)
        size.refill(c.max_bytes, bytes_per_s, now)
        self._all.refill(c.all_keys_max_bytes, all_per_s, now)
        refusal: Refusal | None = None
        if rate.tokens < 1:
            refusal = Refusal("key_rate", rate.wait_s(1, c.rate_per_s))
        elif size.tokens < nbytes:
            # A report bigger than the whole cap never fits: say "a window", not forever.
            wait = c.window_s if nbytes > c.max_bytes else size.wait_s(nbytes, bytes_per_s)
            refusal = Refusal("key_bytes", min(c.window_s, wait))
        elif self._all.tokens < nbytes:
            wait = self._all.wait_s(nbytes, all_per_s)
            refusal = Refusal("all_keys_bytes", min(c.window_s, wait))
        if state is None:
            if refusal is not None:
                return refusal  # a new key refused by its own caps costs no new-key token
            assert self._new is not None
            self._new.tokens -= 1
            self._keys[key] = (rate, size)
            while len(self._keys) > c.max_keys:
                self._keys.popitem(last=False)
                self._evicted += 1
        else:
            self._keys.move_to_end(key)
            if refusal is not None:
                return refusal
        rate.tokens -= 1
        size.tokens -= nbytes
        self._all.tokens -= nbytes
        return None

    def statistics(self) -> KeyBudgetStatistics:
        return KeyBudgetStatistics(keys=len(self._keys), evicted=self._evicted)


def client_key(host: str) -> str:
    """The unit the per-client limits count: an IPv4 address, or an IPv6 /64.

    One IPv6 host usually holds a whole /64 (SLAAC, privacy addresses), so counting single
    IPv6 addresses would give each attacker 2^64 clients. IPv4-mapped addresses count as IPv4.
    Anything else (a Unix socket, no address) is its own key.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)
