"""``POST /v1/inbox``: reports a configured peer pushes to this node (the push half of #10).

What one request goes through, cheapest check first, so that a stranger's or a flood's request
costs as little as possible:

1. body size: ``Content-Length`` and then the bytes read, capped at
   ``peering.inbox_max_body_bytes`` before anything is parsed (413);
2. the sender: the :data:`~overflowd.wire.peering.HEADER_PEER` key must be a configured peer
   (401 otherwise; nothing else is looked at);
3. Standard Webhooks: headers, timestamp window (replays), ``webhook-id`` equal to
   :func:`~overflowd.wire.peering.message_id` of the body and this node's key (a request made
   for another node is refused, and is nobody's replay here), and the ``v1a`` signature under the
   peer's configured key (:func:`overflowd.receiver.preflight` and
   :func:`overflowd.wire.webhook.verify_signature`, the checks webhook receivers make): 400/401;
4. the peer's inbound budget (reports/s and bytes/s; :class:`~overflowd.wire.peering.Budget`):
   429 with ``Retry-After``, charged only after the signature verified, so nobody can spend an
   honest peer's budget by naming it;
5. the body (:func:`~overflowd.wire.peering.decode_inbox`): refused whole only if it is not an
   inbox body at all (400); a bad item is refused by index and the others go on;
6. each report's own COSE signature (forwarding never re-signs), then freshness by the in-band
   listener's rule with ``peering.max_report_age_s`` and ``peering.max_future_s`` (those of
   the pull: a week, since a peer's outbox delivers what it held through an outage);
7. the store, ``via="gossip"``, arrival channel ``peer:<fingerprint>`` and the item's hop
   count, in one transaction; duplicates (already stored by any path) are counted as arrivals.

Steps 2 to 7 run in a worker thread (``anyio.to_thread``), never on the event loop: a request
costs up to ``inbox_max_reports`` Ed25519 checks and a database write. Every refusal is one
call to :meth:`PeerEvents.note` with the peer and a reason, counted per reason: the place where
peer scores and bans plug in.

The answer is ``{"accepted": N, "duplicates": M, "refused": [{"index": i, "reason": r}]}``
(200), the sender's outbox marks every row it carried by it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from overflowd import receiver
from overflowd import report as rpt
from overflowd.errors import DecodeError, SignatureError, StoreError
from overflowd.identity import check_signature, verify_report
from overflowd.peers import PeeringSettings, PeerSettings, fresh, relayed_trust
from overflowd.services.peer_policy import PeerPolicy
from overflowd.store.repository import Store
from overflowd.wire import peering
from overflowd.wire import webhook as wh

if TYPE_CHECKING:
    from fastapi import APIRouter, Request

log = logging.getLogger(__name__)

#: Seconds a sender is told to wait when the store cannot take its reports now.
STORE_RETRY_AFTER_S = 5
#: A Retry-After is whole seconds (RFC 9110 §10.2.3); never less than one, never more than an
#: hour (a budget's debt after a huge burst would otherwise say "come back tomorrow").
MAX_RETRY_AFTER_S = 3600

#: What PeerEvents counts (the metric's ``event`` label); "unknown" has no peer.
PEER_EVENTS = (
    "unknown",  # the sender is not a configured peer (or names no key)
    "malformed",  # headers or body not the format; a bad item
    "replay",  # timestamp outside the window
    "forged",  # the request's or one report's signature does not verify
    "stale",  # a report older than the in-band max age, or further in the future
    "over_budget",  # the peer's inbound budget is spent: 429
    "oversized",  # a body over the cap: 413
)


class PeerEvents:
    """Counts what peers did wrong, by peer name and event; one call per event.

    ``note`` is where scores and bans plug in (next session): each forged, malformed, replayed
    or over-budget request or report is one call here, from the inbox and from push answers.
    Thread-safe (the inbox runs in worker threads). Peer names come from the operator's config,
    so the label set is bounded.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def note(self, peer: str | None, event: str, n: int = 1) -> None:
        if event not in PEER_EVENTS:
            raise ValueError(f"unknown peer event {event!r}")
        key = (peer or "-", event)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n

    def statistics(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


@dataclass(frozen=True, slots=True)
class InboxResult:
    """What the route answers: status, JSON body, and Retry-After seconds for 429/503."""

    status: int
    body: bytes
    retry_after_s: int | None = None


@dataclass(frozen=True, slots=True)
class PeerInboxStatistics:
    requests: int
    accepted: int
    duplicates: int
    refused: Mapping[str, int] = field(default_factory=dict)  # per item reason
    rejected: Mapping[int, int] = field(default_factory=dict)  # whole requests, per status


def _detail(text: str) -> bytes:
    return ('{"detail":"' + text.replace('"', "'") + '"}').encode("utf-8")


class PeerInbox:
    """The inbox's checks and its write: :meth:`handle` (blocking; call from a thread)."""

    def __init__(
        self,
        store: Store,
        peers: Sequence[PeerSettings],
        settings: PeeringSettings | None = None,
        *,
        node_key: bytes,
        tolerance_s: float = wh.DEFAULT_TOLERANCE_S,
        events: PeerEvents | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
        policy: PeerPolicy | None = None,
        trust_of: Callable[[bytes], str] | None = None,
    ) -> None:
        self.store = store
        # The label of a pushed report is its observer's trust in this node's book (read-only
        # here), never the sending peer's (peers.relayed_trust); None: every observer unknown.
        self._trust_of = trust_of
        # This node's public key: a request's webhook-id names its recipient
        # (peering.message_id), so one a peer made for another node is refused here.
        self.node_key = node_key
        # Scores and bans (docs/peers.md "Scores and bans"): only what the peer's key signed
        # is judged, so a stranger naming a peer cannot lower its score.
        self.policy = policy
        settings = settings or PeeringSettings()
        self.max_body_bytes = settings.inbox_max_body_bytes
        self.max_reports = settings.inbox_max_reports
        self.max_age_s, self.max_future_s = settings.max_report_age_s, settings.max_future_s
        self.tolerance_s = tolerance_s
        self.events = events or PeerEvents()
        self._wall_clock, self._clock = wall_clock, clock
        self._peers = {p.key: p for p in peers}
        now = clock()
        # One budget per peer, and one lock per budget: peers never wait on each other.
        self._budgets = {
            p.key: (
                threading.Lock(),
                peering.Budget(
                    reports_per_s=p.in_reports_per_s,
                    reports_burst=p.in_reports_burst,
                    bytes_per_s=p.in_bytes_per_s,
                    bytes_burst=p.in_bytes_burst,
                    now=now,
                ),
            )
            for p in peers
        }
        self._lock = threading.Lock()
        self._requests = self._accepted = self._duplicates = 0
        self._refused: dict[str, int] = {}
        self._rejected: dict[int, int] = {}

    def _reject(
        self, status: int, why: str, peer: str | None, event: str, retry_after_s: int | None = None
    ) -> InboxResult:
        self.events.note(peer, event)
        with self._lock:
            self._rejected[status] = self._rejected.get(status, 0) + 1
        return InboxResult(status, _detail(why), retry_after_s)

    def peer_of(self, headers: Mapping[str, str]) -> PeerSettings | None:
        """The configured peer the request names, or None (any malformed value is None)."""
        value = headers.get(peering.HEADER_PEER, "").strip()
        if not value or len(value) > 64:
            return None
        try:
            key = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        return self._peers.get(key)

    def _label(self, peer: PeerSettings, report: rpt.SignedReport) -> str:
        own = self._trust_of(report.observer_key) if self._trust_of else "unknown"
        return relayed_trust(peer, report.observer_key, own)

    def _judge(self, peer: PeerSettings, event: str, retry_after_s: float | None = None) -> None:
        if self.policy is not None:
            self.policy.note(peer.name, event, retry_after_s=retry_after_s)

    def refuse_banned(self, headers: Mapping[str, str]) -> InboxResult | None:
        """403 for a banned peer, from the one header that names it: nothing else is read,
        parsed or verified (a banned flood costs a dict lookup per request)."""
        if self.policy is None:
            return None
        peer = self.peer_of(headers)
        if peer is None:
            return None
        until = self.policy.banned_until_ms(peer.key)
        if until is None:
            return None
        self.policy.refused(peer.key, "inbox")
        with self._lock:
            self._requests += 1
            self._rejected[403] = self._rejected.get(403, 0) + 1
        seconds = min(MAX_RETRY_AFTER_S, max(1, (until - int(self._wall_clock() * 1000)) // 1000))
        return InboxResult(403, _detail("the peer is banned"), seconds)

    def _signed_by(self, peer: PeerSettings, h: Mapping[str, str], body: bytes) -> bool:
        """Was the request made for this node and signed by the peer's key (whatever its
        time)? A request the peer made for another node, sent here by that node, is not the
        peer's replay."""
        try:
            parsed = wh.parse_headers(h)
            if parsed.msg_id != peering.message_id(body, self.node_key):
                return False
            wh.verify_signature(parsed, body, public_key=peer.key, check=check_signature)
        except (wh.WebhookDecodeError, SignatureError):
            return False
        return True

    def media_type(self, h: Mapping[str, str]) -> str | None:
        """The body's encoding from ``Content-Type`` (JSON when absent), None when neither."""
        value = h.get("content-type", peering.CONTENT_TYPE).split(";", 1)[0].strip().lower()
        return value if value in (peering.CONTENT_TYPE, peering.CBOR) else None

    def oversized(self) -> InboxResult:
        return self._reject(
            413, f"body is larger than {self.max_body_bytes} bytes", None, "oversized"
        )

    def handle(self, headers: wh.HeaderInput, body: bytes) -> InboxResult:
        """Every check and the write for one request (blocking: a worker thread's job)."""
        with self._lock:
            self._requests += 1
        try:
            h = wh.normalize_headers(headers)
        except wh.WebhookDecodeError as exc:
            return self._reject(400, exc.reason, None, "malformed")
        peer = self.peer_of(h)
        if peer is None:
            return self._reject(401, "not a configured peer", None, "unknown")
        banned = self.refuse_banned(h)
        if banned is not None:
            return banned
        try:
            body, parsed = receiver.preflight(
                h,
                body,
                now=self._wall_clock(),
                tolerance_s=self.tolerance_s,
                max_body_bytes=self.max_body_bytes,
            )
        except wh.StaleWebhookError as exc:
            # Out of the window: a replay if the peer's key signed it (then it is the peer's
            # bytes again), a forgery of nobody in particular if not.
            if len(body) <= self.max_body_bytes and self._signed_by(peer, h, body):
                self._judge(peer, "replay")
            return self._reject(401, str(exc), peer.name, "replay")
        except wh.WebhookDecodeError as exc:
            return self._reject(400, exc.reason, peer.name, "malformed")
        if parsed.msg_id != peering.message_id(body, self.node_key):
            return self._reject(
                400, "webhook-id is not this body's id for this node", peer.name, "malformed"
            )
        try:
            wh.verify_signature(parsed, body, public_key=peer.key, check=check_signature)
        except SignatureError:
            return self._reject(401, "signature does not verify", peer.name, "forged")
        media = self.media_type(h)
        if media is None:
            # Not the peer's fault in a way worth judging (an older or newer encoding): say
            # which encodings this inbox reads, so a sender can fall back to JSON.
            return self._reject(
                415, f"an inbox body is {peering.CONTENT_TYPE} or {peering.CBOR}", peer.name,
                "malformed",
            )  # fmt: skip
        try:
            batch = peering.decode_inbox(
                body,
                max_body_bytes=self.max_body_bytes,
                max_reports=self.max_reports,
                content_type=media,
            )
        except peering.InboxDecodeError as exc:
            self._judge(peer, "malformed")
            return self._reject(400, exc.reason, peer.name, "malformed")
        lock, budget = self._budgets[peer.key]
        with lock:
            wait = budget.try_admit(batch.total, len(body), self._clock())
        if wait > 0:
            seconds = min(MAX_RETRY_AFTER_S, max(1, int(wait + 0.999)))
            self._judge(peer, "over_budget", seconds)
            return self._reject(
                429, "over the peer's inbound budget", peer.name, "over_budget", seconds
            )
        return self._store(peer, batch)

    def _store(self, peer: PeerSettings, batch: peering.InboxBatch) -> InboxResult:
        refused = list(batch.bad)
        judged: set[str] = set()  # one judgement per kind per batch: "N forged batches"
        if batch.bad:
            self.events.note(peer.name, "malformed", len(batch.bad))
            judged.add("malformed")
        good: list[tuple[rpt.SignedReport, int]] = []
        now_ms = int(self._wall_clock() * 1000)
        for item in batch.items:
            reason = self._check(item, now_ms)
            if isinstance(reason, str):
                refused.append((item.index, reason))
                event = (
                    "forged"
                    if reason == "forged"
                    else "stale"
                    if reason in ("stale", "future")
                    else "malformed"
                )
                self.events.note(peer.name, event)
                judged.add(event)
            else:
                good.append((reason, item.hops))
        new: set[str] = set()
        if good:
            rows = [(r, now_ms, "gossip") for r, _ in good]
            ids = [r.report_id for r, _ in good]
            try:
                new = self.store.add_new_reports(
                    rows,
                    trust={r.report_id: self._label(peer, r) for r, _ in good},
                    channels=dict.fromkeys(ids, peer.channel),
                    hops={r.report_id: h for r, h in good},
                )
            except StoreError as exc:
                log.warning("peers.inbox_store_failed peer=%s error=%s", peer.name, exc)
                with self._lock:
                    self._rejected[503] = self._rejected.get(503, 0) + 1
                return InboxResult(503, _detail("the store is unavailable"), STORE_RETRY_AFTER_S)
        for event in sorted(judged) or ["honest"]:
            self._judge(peer, event)
        refused.sort()
        answer = peering.InboxAnswer(
            accepted=len(new), duplicates=len(good) - len(new), refused=tuple(refused)
        )
        with self._lock:
            self._accepted += answer.accepted
            self._duplicates += answer.duplicates
            for _index, reason in refused:
                self._refused[reason] = self._refused.get(reason, 0) + 1
        return InboxResult(200, peering.encode_answer(answer))

    def _check(self, item: peering.InboxItem, now_ms: int) -> rpt.SignedReport | str:
        """The verified report, or why it is refused."""
        try:
            report = verify_report(item.cose)
        except DecodeError:
            return "undecodable"
        except SignatureError:
            return "forged"
        # The in-band listener's rule, with [peering]'s ages (the pull's, too).
        late = fresh(
            report.payload.time, now_ms, max_age_s=self.max_age_s, max_future_s=self.max_future_s
        )
        return report if late is None else late

    def statistics(self) -> PeerInboxStatistics:
        with self._lock:
            return PeerInboxStatistics(
                requests=self._requests,
                accepted=self._accepted,
                duplicates=self._duplicates,
                refused=dict(self._refused),
                rejected=dict(self._rejected),
            )


async def read_capped(request: Request, max_bytes: int) -> bytes | None:
    """The body, or None as soon as it is longer than ``max_bytes`` (the rest is not read)."""
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > max_bytes:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def router(inbox: Callable[[], PeerInbox | None]) -> APIRouter:
    """The inbox route (services/api_peers_routes.py: FastAPI and pydantic are imported there,
    when the API app is built, not when the daemon starts)."""
    from overflowd.services.api_peers_routes import router as build

    return build(inbox)


__all__ = [
    "PEER_EVENTS",
    "InboxResult",
    "PeerEvents",
    "PeerInbox",
    "PeerInboxStatistics",
    "router",
]
