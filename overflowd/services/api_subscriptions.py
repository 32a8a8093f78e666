"""``POST /v1/subscriptions`` and ``GET /v1/subscriptions``: a peer asks for the reports about
its own address space (docs/peers.md "Subscriptions").

The body ``{"prefixes": ["192.0.2.0/24", ...], "endpoint": "<its inbox URL>"}`` is signed as
an inbox POST is (Standard Webhooks ``v1a`` by the subscriber's key, ``overflowd-peer`` naming
it, ``webhook-id`` the body's id for this node): only configured peers subscribe, and a banned
one gets 403 before anything is read. Each prefix is accepted only if the ``_overflowd``
record found by the registry's walk-up *for the whole prefix*
(:meth:`DnsRegistry.lookup_prefix`: from the prefix's own length upwards) names the
subscriber's key; otherwise it is refused with a reason.
The endpoint must be the peer's configured inbox (no request can make this node call an
address its operator did not configure).

Every limit is a constant below; the answer is ``{"accepted": [...], "refused": [{"prefix",
"reason"}]}``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from overflowd import receiver
from overflowd.errors import DiscoveryError, SignatureError, StoreError
from overflowd.identity import check_signature
from overflowd.peers import PeerSettings
from overflowd.registry import Found, valid_keys
from overflowd.services.peer_policy import PeerPolicy
from overflowd.store import peer_subscriptions as subs
from overflowd.store.repository import Store, StoredReport
from overflowd.wire import peering
from overflowd.wire import webhook as wh

if TYPE_CHECKING:
    from fastapi import APIRouter

    from overflowd.services.dns import DnsRegistry

log = logging.getLogger(__name__)

PATH = "/v1/subscriptions"
#: One request's body at most: 32 prefixes and a URL are under 2 KB.
MAX_BODY_BYTES = 16 * 1024
#: Prefixes in one request: each costs up to a walk-up of DNS questions.
MAX_PREFIXES_PER_REQUEST = 32
#: The shortest prefixes accepted: the walk-up has names at /8 for IPv4 and /32 for IPv6,
#: nothing above them can name a key, and a /8 is already a whole registry allocation.
MIN_PREFIX_LEN = {4: 8, 6: 32}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    retry_after_s: int | None = None


def _json(status: int, doc: object, retry_after_s: int | None = None) -> Answer:
    return Answer(status, json.dumps(doc, separators=(",", ":")).encode(), retry_after_s)


def _detail(status: int, text: str) -> Answer:
    return _json(status, {"detail": text})


def parse_prefix(text: object) -> Network | str:
    """The prefix, or why it is refused (strict: host bits set is a mistake, not a /32)."""
    if not isinstance(text, str) or not text or len(text) > 43:
        return "not a prefix"
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError:
        return "not a prefix (host bits set, or not an address/length)"
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        return "an IPv4-mapped prefix: subscribe to the IPv4 prefix"
    if net.prefixlen < MIN_PREFIX_LEN[net.version]:
        return f"shorter than /{MIN_PREFIX_LEN[net.version]}"
    return net


def judge(found: list[Found], key: bytes) -> str | None:
    """None if the records found for a prefix name ``key``; otherwise the reason."""
    if not found:
        return "no _overflowd record for the prefix"
    if key in valid_keys(found):
        return None
    return f"the _overflowd record at {found[0].name} names another key"


class SubscriptionIndex:
    """Every subscriber's prefixes in memory, for the push tail's per-report question; loaded
    from the store at start and added to as subscriptions are accepted. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nets: dict[bytes, tuple[Network, ...]] = {}

    def load(self, store: Store) -> None:
        by_key: dict[bytes, list[Network]] = {}
        for row in subs.list_subscriptions(store):
            by_key.setdefault(row.subscriber, []).append(row.prefix)
        with self._lock:
            self._nets = {k: tuple(v) for k, v in by_key.items()}

    def add(self, key: bytes, nets: Sequence[Network]) -> None:
        with self._lock:
            held = self._nets.get(key, ())
            self._nets[key] = held + tuple(n for n in nets if n not in held)

    def subscribes(self, key: bytes) -> bool:
        """Does the key hold any subscription? (A pull-only peer's tail skips whole pages.)"""
        with self._lock:
            return bool(self._nets.get(key))

    def covers(self, key: bytes, report: StoredReport) -> bool:
        """Is the report's source or destination inside one of the subscriber's prefixes?"""
        with self._lock:
            nets = self._nets.get(key, ())
        return any(report.src in n or report.dst in n for n in nets)


class SubscriptionDesk:
    """The checks behind both routes; the DNS lookups are async (the API's event loop)."""

    def __init__(
        self,
        store: Store,
        peers: Sequence[PeerSettings],
        registry: DnsRegistry | None,
        *,
        node_key: bytes,
        policy: PeerPolicy | None = None,
        index: SubscriptionIndex | None = None,
        tolerance_s: float = wh.DEFAULT_TOLERANCE_S,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.registry, self.policy = store, registry, policy
        # The webhook-id names this node (peering.message_id): a subscription made for another
        # node is not one made here.
        self.node_key = node_key
        self.index = index or SubscriptionIndex()
        self._peers = {p.key: p for p in peers}
        self._tolerance_s = tolerance_s
        self._clock = wall_clock

    def authenticate(self, headers: Mapping[str, str], body: bytes) -> PeerSettings | Answer:
        """The configured, unbanned peer whose key signed this request, or the refusal."""
        value = headers.get(peering.HEADER_PEER, "").strip()
        try:
            key = base64.b64decode(value, validate=True) if 0 < len(value) <= 64 else b""
        except (binascii.Error, ValueError):
            key = b""
        peer = self._peers.get(key)
        if peer is None:
            return _detail(401, "not a configured peer")
        if self.policy is not None and self.policy.banned(peer.key):
            self.policy.refused(peer.key, "inbox")
            return _detail(403, "the peer is banned")
        try:
            body, parsed = receiver.preflight(
                headers,
                body,
                now=self._clock(),
                tolerance_s=self._tolerance_s,
                max_body_bytes=MAX_BODY_BYTES,
            )
            if parsed.msg_id != peering.message_id(body, self.node_key):
                return _detail(400, "webhook-id is not the body's id")
            wh.verify_signature(parsed, body, public_key=peer.key, check=check_signature)
        except wh.WebhookDecodeError as exc:
            return _detail(400, exc.reason)
        except SignatureError as exc:
            return _detail(401, str(exc) or "signature does not verify")
        return peer

    async def subscribe(self, peer: PeerSettings, body: bytes) -> Answer:
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return _detail(400, "not JSON")
        if not isinstance(doc, dict) or set(doc) != {"prefixes", "endpoint"}:
            return _detail(400, 'the body is {"prefixes": [...], "endpoint": "..."}')
        prefixes, endpoint = doc["prefixes"], doc["endpoint"]
        if not isinstance(prefixes, list) or not 1 <= len(prefixes) <= MAX_PREFIXES_PER_REQUEST:
            return _detail(400, f"prefixes is a list of 1 to {MAX_PREFIXES_PER_REQUEST}")
        inbox = peer.url + peering.INBOX_PATH.lstrip("/")
        if endpoint != inbox:
            return _detail(400, f"endpoint must be the peer's configured inbox, {inbox}")
        accepted: list[Network] = []
        refused: list[tuple[str, str]] = []
        for raw in prefixes:
            net = parse_prefix(raw)
            shown = raw if isinstance(raw, str) else repr(raw)[:43]
            if isinstance(net, str):
                refused.append((shown, net))
                continue
            if net in accepted:
                refused.append((shown, "given twice"))
                continue
            if self.registry is None:
                refused.append((shown, "this node has no DNS resolver to check the prefix"))
                continue
            try:
                why = judge(await self.registry.lookup_prefix(net), peer.key)
            except DiscoveryError as exc:
                why = f"lookup failed: {exc}"[:200]
            if why is None:
                accepted.append(net)
            else:
                refused.append((shown, why))
        if accepted:
            now_ms = int(self._clock() * 1000)
            import anyio.to_thread  # with the app: not in an idle node (issue #16)

            try:
                over = await anyio.to_thread.run_sync(
                    lambda: subs.add_subscriptions(
                        self.store, peer.key, accepted, endpoint, now_ms=now_ms
                    )
                )
            except StoreError as exc:
                log.warning("subscriptions.store_failed peer=%s error=%s", peer.name, exc)
                return _detail(503, "the store is unavailable")
            for net, why in over:
                accepted.remove(net)
                refused.append((str(net), why))
            self.index.add(peer.key, accepted)
        log.info(
            "subscriptions.request peer=%s accepted=%d refused=%d",
            peer.name,
            len(accepted),
            len(refused),
        )
        return _json(
            200,
            {
                "accepted": [str(n) for n in accepted],
                "refused": [{"prefix": p, "reason": r} for p, r in refused],
            },
        )

    async def listing(self, peer: PeerSettings) -> Answer:
        import anyio.to_thread

        rows = await anyio.to_thread.run_sync(subs.list_subscriptions, self.store, peer.key)
        return _json(
            200,
            {"subscriptions": [{"prefix": str(r.prefix), "endpoint": r.endpoint} for r in rows]},
        )


_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["prefixes", "endpoint"],
                    "properties": {
                        "prefixes": {
                            "type": "array",
                            "items": {"type": "string"},
                            "minItems": 1,
                            "maxItems": MAX_PREFIXES_PER_REQUEST,
                        },
                        "endpoint": {"type": "string"},
                    },
                }
            }
        },
    }
}


def router(desk: Callable[[], SubscriptionDesk | None]) -> APIRouter:
    """The routes (services/api_subscriptions_routes.py: FastAPI is imported there, when the
    API app is built, not when the daemon starts)."""
    from overflowd.services.api_subscriptions_routes import router as build

    return build(desk)


__all__ = [
    "MAX_BODY_BYTES",
    "MAX_PREFIXES_PER_REQUEST",
    "MIN_PREFIX_LEN",
    "SubscriptionDesk",
    "SubscriptionIndex",
    "judge",
    "parse_prefix",
    "router",
]
