"""Webhook delivery: the outbox worker that POSTs signed reports to receivers (trio + httpx).

Reports to deliver are rows in the durable outbox (:mod:`overflowd.store.outbox`), put there by
:func:`enqueue` (the daemon: :func:`outbox.enqueue_planned_in`, after its plan,
:class:`overflowd.notify.WebhookBudget`). :class:`WebhookDelivery` claims the due rows of a URL
together, up to ``max_batch_reports`` and ``max_batch_bytes``, signs fresh Standard Webhooks
headers (``v1`` per endpoint secret, when configured, and ``v1a``, the node key) over one body
(one report: its JSON rendering, ``webhook-id`` its id; several: ``{"reports": [...]}``,
``webhook-id`` :func:`overflowd.receiver.batch_id`), POSTs, and records the outcome for every
row the POST carried:

=====================  ================================================================
answer                 what happens
=====================  ================================================================
2xx                    delivered
410 Gone               endpoint disabled (recorded in the store); its rows go dead
429, 502, 503, 504     retry with backoff, at least ``Retry-After``; the endpoint waits
408, other 5xx,        retry with backoff
timeout, network
3xx, other 4xx         dead letter (kept, with status and reason)
internal address       dead letter (SSRF policy, :mod:`overflowd.ssrf`)
broken HTTP, any       retry with backoff, counted (a bad answer; an unexpected exception
other error            by its type): one row never stops the service
=====================  ================================================================

Backoff is exponential with jitter: attempt ``n`` waits a uniform random time in
``[d/2, d]`` where ``d = min(cap, base × 2^(n-1))``; after ``max_attempts`` the row is dead.
Every POST is charged to its URL's POST budget (``endpoint_posts_per_s``, burst
``endpoint_posts_burst``): a URL out of tokens is not claimed, so its rows wait in the outbox
and go together in its next POST (batching), and a URL has one POST in flight at a time. POSTs
carrying retries are also charged to per-URL and per-host token buckets (:class:`RetryLimits`);
over budget, the rows wait for the bucket without spending an attempt. A receiver that answers
a batch with a 4xx (built for the single form) gets its rows back unsent and one report per
POST from then on. A failing endpoint is logged once per FAILING_LOG_INTERVAL_S.

Deliveries run in a pool of ``max_concurrency`` slots, each refilled as soon as it frees, and
one server (host name and port) gets at most ``max_concurrency_per_host`` of them, so an
endpoint that never answers holds up only its own slots, never everybody's deliveries.

Every endpoint is an attacker's (anyone can publish ``u=``): answers are read raw, never
decoded (``Accept-Encoding: identity``; a ``gzip, gzip`` body of 500 bytes can inflate to
GBs), and at most MAX_ERROR_BODY_BYTES of the body and MAX_ANSWER_HEAD_BYTES of the head are
read, all within one deadline for the whole attempt. Due times are wall-clock, like
:func:`enqueue`'s, and re-based when the wall clock steps (:func:`outbox.rebase_clock`).

Exactly once at the receiver: a crash between sending and marking a row only means the row is
sent again when its lease runs out, with the same report id, which the receiver
de-duplicates (per report, in a batch too). This module never logs report bodies or
secrets, and maps httpx's exceptions to outcomes here, at the one boundary that talks HTTP.
"""

from __future__ import annotations

import argparse
import datetime as dt
import email.utils
import functools
import ipaddress
import logging
import math
import random
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import trio

from overflowd import report as rpt
from overflowd import ssrf
from overflowd.errors import (
    DeliveryError,
    OverflowdError,
    ReportDecodeError,
    StoreError,
)
from overflowd.identity import NodeIdentity
from overflowd.notify import WebhookBudget, WebhookSettings
from overflowd.receiver import BATCH_PREFIX, BATCH_SUFFIX, batch_id, encode_body
from overflowd.store import outbox
from overflowd.store.repository import Store
from overflowd.wire import webhook as wh

if TYPE_CHECKING:
    # imported where a request is made (default_client, _send, _pinned): httpx and httpcore
    # are ~1.5 MB of an idle node that has no webhook endpoint (issue #16)
    import httpx

log = logging.getLogger(__name__)

SECONDS = 1.0
USER_AGENT = "overflowd-webhook/1"
#: Raw bytes of an answer's body we read at most (kept for the dead-letter reason); reading
#: stops there and the connection is dropped, so a receiver cannot make us download a large
#: body. Counted in raw bytes from the socket: we ask for ``Accept-Encoding: identity`` and
#: never decode a ``Content-Encoding`` (a 500-byte ``gzip, gzip`` answer inflates to GBs).
MAX_ERROR_BODY_BYTES = 256
#: The answer's head (status line and headers) is capped by httpcore at this many bytes
#: (``AsyncHTTP11Connection.MAX_INCOMPLETE_EVENT_SIZE``, h11's ``max_incomplete_event_size``);
#: a longer one is a protocol error, a counted bad answer. With the body cap and one socket
#: read of 64 KiB, this bounds what one attempt reads; ``total_timeout_s`` bounds how long.
MAX_ANSWER_HEAD_BYTES = 100 * 1024
#: How often the running service deletes old delivered rows.
PRUNE_INTERVAL_S = 3600 * SECONDS
#: A change of the wall clock against the monotonic one larger than this is a clock step:
#: due times written under the old clock are re-based (:func:`outbox.rebase_clock`). Smaller
#: than any backoff worth speaking of, larger than NTP slewing between two passes.
CLOCK_STEP_TOLERANCE_S = 1 * SECONDS
#: One WARNING per kind of unexpected error per this long; the others are counted and the
#: next warning says how many were suppressed (a hostile endpoint must not flood the log).
UNEXPECTED_LOG_INTERVAL_S = 60 * SECONDS
#: Endpoints held in memory (said 429/503) at most. The hold is also in the store, which is
#: what claiming obeys; the memory copy only stops rows claimed before it got there, so
#: forgetting the hold that ends first is safe, and a flood of slow-down answers cannot grow
#: it unbounded.
MAX_HELD_URLS = 10_000
#: A URL whose receiver refused a batch (a 4xx) gets one report per POST for this long, then
#: batches are tried again: a proxy's transient 404 or a skewed clock's 401 must not make it
#: single-form for the process's life.
SINGLE_FORM_FOR_S = 3600.0
#: A row claimed for a host that already has max_concurrency_per_host deliveries in flight
#: (under another of its URLs: the busy URLs themselves are not claimed) is given back unsent,
#: due again after this long. Long enough that the next claims reach other hosts' rows, short
#: enough that a quick host's other URLs hardly wait; a host with many URLs costs at most one
#: claim and release per row per this long, never a request.
HOST_BUSY_RELEASE_S = 1 * SECONDS
#: One WARNING per failing endpoint (URL) per this long, saying how many failed POSTs since
#: the last: an operator hears of a broken receiver without a line per retry.
FAILING_LOG_INTERVAL_S = 300 * SECONDS
#: Kinds of unexpected error counted by name; more kinds than this are counted as "other"
#: (the names come from our code, so this only bounds a pathological case).
MAX_ERROR_KINDS = 32


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, slots=True)
class RetryLimits:
    """Budgets for retries, per URL and per host name (an explicit value, like ``httpx.Limits``).

    First attempts are admitted by the node's send budget (:class:`overflowd.notify.Budget`);
    each can be retried up to ``max_attempts - 1`` times, so without these a receiver that
    answers 500 to everything would get up to 12 requests per admitted delivery. With them,
    every URL gets at most ``per_url_burst + per_url_per_s × T`` retries in any window of
    ``T`` seconds, every host name ``per_host_burst + per_host_per_s × T``, however many
    deliveries wait. A row whose retry is over budget is not sent and not charged an attempt:
    it waits for the bucket (rescheduled, counted), it is never dropped.

    Defaults: one retry per second to a URL (two per host, which may serve several URLs),
    about what the per-prefix send budget admits to one site (1/s); a burst of 30 (60) lets
    that many waiting rows go at once when an endpoint comes back.
    """

    per_url_per_s: float = 1.0
    per_url_burst: int = 30
    per_host_per_s: float = 2.0
    per_host_burst: int = 60
    #: Buckets kept per table. URLs come from DNS (anyone's ``u=``), so the table is bounded;
    #: what is forgotten never comes back with more retries (see :class:`_Buckets`).
    max_tracked: int = 10_000

    def __post_init__(self) -> None:
        for name in ("per_url_per_s", "per_host_per_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of retries per second")
        for name in ("per_url_burst", "per_host_burst", "max_tracked"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer of at least 1")

    @property
    def longest_wait_s(self) -> float:
        """The longest a row can wait for one retry token."""
        return 1 / min(self.per_url_per_s, self.per_host_per_s)


# ---------------------------------------------------------------------------------------------
# Pure policy


class _Buckets:
    """Token buckets by key, each one number: GCRA's theoretical arrival time (TAT).

    Emission interval ``T = 1 / per_s`` and tolerance ``(burst - 1) × T``; a key conforms when
    ``TAT - tolerance <= now``. Time is injected (monotonic seconds) and never goes backwards
    here. At most ``max_keys`` buckets: full ones (TAT at or before now) are forgotten first,
    as a forgotten full bucket comes back full; if that is not enough, the quarter closest to
    full is evicted and ``_floor`` raised to the highest TAT evicted, the TAT every key not in
    the table starts from — so an evicted key never comes back with more tokens than it had.
    """

    def __init__(self, per_s: float, burst: int, max_keys: int) -> None:
        self.interval_s = 1.0 / per_s
        self._tolerance_s = (burst - 1) * self.interval_s
        self._max_keys = max_keys
        self._tat: dict[str, float] = {}
        self._floor = -math.inf
        self._last = -math.inf

    def _tick(self, now: float) -> float:
        self._last = max(self._last, now)
        return self._last

    def wait_s(self, key: str, now: float) -> float:
        """Seconds until ``key`` has a token (0 when it has one now)."""
        now = self._tick(now)
        return max(0.0, self._tat.get(key, self._floor) - self._tolerance_s - now)

    def take(self, key: str, now: float) -> None:
        now = self._tick(now)
        tat = max(self._tat.get(key, self._floor), now) + self.interval_s
        if key not in self._tat and len(self._tat) >= self._max_keys:
            self._make_room(now)
        self._tat[key] = tat

    def __len__(self) -> int:
        return len(self._tat)

    def spent(self, now: float) -> list[str]:
        """Keys without a token at ``now`` (at most ``max_keys``: the table's size)."""
        now = self._tick(now)
        edge = now + self._tolerance_s
        return [key for key, tat in self._tat.items() if tat > edge]

    def next_token_s(self, now: float) -> float | None:
        """Seconds until the first spent key has a token again; None if none is spent."""
        now = self._tick(now)
        waits = [tat - self._tolerance_s - now for tat in self._tat.values()]
        ahead = [w for w in waits if w > 0]
        return min(ahead) if ahead else None

    def _make_room(self, now: float) -> None:
        for key in [k for k, t in self._tat.items() if t <= now]:
            del self._tat[key]
        if len(self._tat) < self._max_keys:
            return
        # Evict a quarter at once: the sort is paid once per max_keys / 4 new keys.
        by_tat = sorted(self._tat.items(), key=lambda kv: kv[1])
        for key, tat in by_tat[: max(1, len(by_tat) // 4)]:
            self._floor = max(self._floor, tat)
            del self._tat[key]


class RetryBudget:
    """Per-URL and per-host retry budgets (:class:`RetryLimits`), on an injected clock (pure)."""

    def __init__(self, limits: RetryLimits | None = None) -> None:
        self.limits = limits or RetryLimits()
        lim = self.limits
        self._url = _Buckets(lim.per_url_per_s, lim.per_url_burst, lim.max_tracked)
        self._host = _Buckets(lim.per_host_per_s, lim.per_host_burst, lim.max_tracked)

    def charge(self, url: str, host: str, now: float) -> tuple[str, float, float] | None:
        """Take one retry from both the URL's and the host's bucket, or from neither.

        None when taken; else ``(which, wait_s, interval_s)``: the bucket that is empty
        (``"host"`` or ``"url"``), seconds until it has a token, and its emission interval
        (for spreading several waiting rows over the refill instead of waking them at once).
        """
        wait = self._host.wait_s(host, now)
        if wait > 0:
            return ("host", wait, self._host.interval_s)
        wait = self._url.wait_s(url, now)
        if wait > 0:
            return ("url", wait, self._url.interval_s)
        self._host.take(host, now)
        self._url.take(url, now)
        return None

    def tracked(self) -> tuple[int, int]:
        """Buckets held: (URLs, hosts)."""
        return len(self._url), len(self._host)


class _LogLimiter:
    """At most one WARNING per key per ``interval_s`` (monotonic); the rest are counted and the
    next warning for that key says how many were suppressed."""

    def __init__(self, interval_s: float, clock: Callable[[], float], max_keys: int) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._max_keys = max_keys
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = self._clock()
        if key not in self._next and len(self._next) >= self._max_keys:
            key = "other"
        if now < self._next.get(key, -math.inf):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._next[key] = now + self._interval_s
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            msg += " (%d more suppressed)"
            args = (*args, suppressed)
        log.warning(msg, *args)


@functools.lru_cache(maxsize=1024)
def _network(prefix: str) -> ssrf.Network:
    return ipaddress.ip_network(prefix, strict=False)


def sign_headers(
    msg_id: str, timestamp: int, body: bytes, signer: wh.Signer, secrets: Sequence[bytes]
) -> dict[str, str]:
    """The Standard Webhooks headers of one POST: ``v1`` for each endpoint secret (when
    configured), then ``v1a`` with the node key."""
    return wh.sign(msg_id, timestamp, body, signer, secrets=tuple(secrets))


def webhook_targets(report: rpt.SignedReport, mapping: Sequence[tuple[str, str]]) -> list[str]:
    """The URLs for ``report``: every mapping entry whose prefix holds its src or dst, once."""
    flow = report.payload.flow
    urls: dict[str, None] = {}
    for prefix, url in mapping:
        net = _network(prefix)
        if any(a.version == net.version and a in net for a in (flow.src, flow.dst)):
            urls[url] = None
    return list(urls)


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a Retry-After header (RFC 9110 §10.2.3): delay-seconds or a date."""
    if value is None:
        return None
    value = value.strip()
    # ASCII digits only: str.isdigit() is true for "²", which int() refuses.
    if value.isascii() and value.isdigit():
        return float(min(int(value[:12]), 10**9))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:  # pragma: no cover - older Pythons
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now)


def backoff_s(attempt: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Jittered exponential backoff before retry number ``attempt`` (1-based)."""
    exponent = min(max(attempt - 1, 0), 62)
    delay = min(cap_s, base_s * 2.0**exponent)
    return rng.uniform(delay / 2, delay)


#: Outcomes of one attempt.
DELIVERED, RETRY, SLOW_DOWN, GONE, DEAD = "delivered", "retry", "slow-down", "gone", "dead"


def classify(status: int) -> str:
    if 200 <= status < 300:
        return DELIVERED
    if status == 410:
        return GONE
    if status in (429, 502, 503, 504):
        return SLOW_DOWN
    if status == 408 or status >= 500:
        return RETRY
    return DEAD


# ---------------------------------------------------------------------------------------------
# Enqueueing


def enqueue(
    store: Store, report: rpt.SignedReport, urls: Sequence[str], *, now_ms: int | None = None
) -> int:
    """Put deliveries of ``report`` to ``urls`` in the durable outbox; return how many are new.

    Blocking (database): from trio, call through ``trio.to_thread.run_sync``, then
    :meth:`WebhookDelivery.wake` to send without waiting for the next poll.
    """
    when = int(time.time() * 1000) if now_ms is None else now_ms
    return outbox.enqueue(store, report, urls, now_ms=when)


# ---------------------------------------------------------------------------------------------
# The service


@dataclass(frozen=True, slots=True)
class WebhookStatistics:
    claimed: int
    delivered: int
    retried: int
    slowed_down: int
    gone: int
    dead: int
    refused: int
    network_errors: int
    postponed: int
    store_errors: int
    in_flight: int
    #: answers whose body was longer than MAX_ERROR_BODY_BYTES: reading stopped there
    answers_cut: int
    #: answers that broke HTTP (a head over MAX_ANSWER_HEAD_BYTES, garbage): failed attempts
    bad_answers: int
    #: retries not sent because the URL's / the host's retry budget was spent (rows wait)
    retry_budget_url: int
    retry_budget_host: int
    #: rows given back unsent because their host had max_concurrency_per_host in flight
    host_busy: int
    #: wall-clock steps seen (beyond CLOCK_STEP_TOLERANCE_S) and rows/holds re-based
    clock_steps: int
    rebased: int
    #: unexpected exceptions at the per-POST boundary, by type name (each a failed attempt)
    unexpected_errors: Mapping[str, int]
    #: POSTs sent (one carries one report, or several: {"reports": [...]})
    posts: int = 0
    #: reports carried in POSTs of more than one report
    batched_reports: int = 0
    #: batches a receiver refused with a 4xx: its URL then gets one report per POST
    batches_refused: int = 0
    #: deliveries the node's plan did not enqueue, by reason (notify.WEBHOOK_DROP_REASONS)
    dropped: Mapping[str, int] = field(default_factory=dict)
    #: deliveries whose first attempt the prefix budget deferred (enqueued, sent later)
    deferred: int = 0


@dataclass
class _Counters:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    slowed_down: int = 0
    gone: int = 0
    dead: int = 0
    refused: int = 0
    network_errors: int = 0
    postponed: int = 0
    store_errors: int = 0
    in_flight: int = 0
    answers_cut: int = 0
    bad_answers: int = 0
    retry_budget_url: int = 0
    retry_budget_host: int = 0
    host_busy: int = 0
    clock_steps: int = 0
    rebased: int = 0
    posts: int = 0
    batched_reports: int = 0
    batches_refused: int = 0


@dataclass(frozen=True, slots=True)
class _Attempt:
    outcome: str
    status: int | None = None
    error: str = ""
    retry_after_s: float | None = None
    #: not sent: the URL or its addresses are refused (SSRF policy), counted per row
    refused: bool = False


ClientFactory = Callable[[WebhookSettings], "httpx.AsyncClient"]


def default_client(settings: WebhookSettings) -> httpx.AsyncClient:
    """The HTTP client: explicit timeouts, no redirects, no proxies from the environment.

    HTTP/1.1 only (httpx's default): its answer head is capped by httpcore
    (MAX_ANSWER_HEAD_BYTES), and the body is read raw by :meth:`WebhookDelivery._send`.
    """
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.io_timeout_s, connect=settings.connect_timeout_s),
        limits=httpx.Limits(
            max_connections=settings.max_concurrency,
            max_keepalive_connections=settings.max_concurrency,
        ),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
    )


class ResolveError(DeliveryError):
    """The webhook host name did not resolve (worth retrying, unlike a refused address)."""


async def resolve(host: str, port: int) -> list[ssrf.Address]:
    """Every address ``host`` resolves to (no DNS for an IP literal)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise ResolveError(f"cannot resolve {host}: {exc}") from None
    except (UnicodeError, ValueError) as exc:  # a name IDNA cannot encode: never deliverable
        raise DeliveryError(f"webhook host {host[:80]!r} is not a valid name: {exc}") from None
    out: list[ssrf.Address] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if addr not in out:
            out.append(addr)
    return out


async def read_raw_capped(response: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    """At most ``max_bytes`` of a streamed answer's body as sent, and whether there was more.

    Raw: transfer-encoding undone by h11, content-encoding never (``aiter_raw``), so the cap
    is on bytes from the socket, not on what a compression bomb inflates to. Stops reading at
    the cap (the caller closes the response, which drops the connection if unread bytes are
    left). For every answer from a server we call: webhook endpoints, and peers.
    """
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk[: max_bytes + 1 - len(body)]
        if len(body) > max_bytes:
            return bytes(body[:max_bytes]), True
    return bytes(body), False


def _host_key(url: str) -> str:
    """The host name a URL's retries are charged to (the URL itself if it does not parse)."""
    try:
        return ssrf.parse_target(url, require_https=False).host.lower()
    except DeliveryError:
        return url


def _server_key(url: str) -> str:
    """The server a URL's deliveries share slots on: host name and port (the connection
    pool's origin; another port is another server). The URL itself if it does not parse."""
    try:
        target = ssrf.parse_target(url, require_https=False)
    except DeliveryError:
        return url
    return f"{target.host.lower()}:{target.port}"


def _printable(text: str) -> str:
    """An endpoint's words as they go into the dead-letter reason: no control characters."""
    return "".join(ch if ch.isprintable() else "?" for ch in text)


class WebhookDelivery:
    """Deliver the outbox. ``run()`` is the daemon's service; ``drain()`` empties it and returns.

    ``client_factory(settings)`` makes the httpx client (tests inject transports); ``clock``
    gives Unix seconds for the outbox's wall-clock times and the signature timestamp;
    ``monotonic`` gives seconds that never step (retry budgets, endpoint holds, detecting
    steps of ``clock``; default ``trio.current_time``); ``rng`` the backoff jitter;
    ``retry_limits`` the retry budgets; ``planner`` the enqueue-time webhook budget whose
    drops and deferrals :meth:`statistics` reports (the node's; a new one if not given).

    Due times in the outbox are wall-clock milliseconds, like :func:`enqueue`'s, so that every
    worker and restart reads them alike. A clock stepped back would leave them far in the
    future: at start-up and whenever the wall clock moves against the monotonic one, the
    service re-bases them (:func:`outbox.rebase_clock`), so a row waits at most its own delay
    again, never the size of the step.
    """

    def __init__(
        self,
        store: Store,
        identity: NodeIdentity,
        settings: WebhookSettings,
        client_factory: ClientFactory | None = None,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = trio.current_time,
        rng: random.Random | None = None,
        retry_limits: RetryLimits | None = None,
        planner: WebhookBudget | None = None,
    ) -> None:
        self._store = store
        self._identity = identity
        self._signer = identity.signer()
        self._public_key = identity.public_key
        self._settings = settings
        self._allowed = settings.allowed_networks
        self._client_factory = client_factory or default_client
        self._clock = clock
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        if retry_limits is None:
            retry_limits = RetryLimits(
                per_url_per_s=settings.retry_per_url_per_s,
                per_url_burst=settings.retry_per_url_burst,
                per_host_per_s=settings.retry_per_host_per_s,
                per_host_burst=settings.retry_per_host_burst,
            )
        self._budget = RetryBudget(retry_limits)
        #: the node's enqueue-time plan: de-duplication and the per-prefix deferral
        self.planner = planner or WebhookBudget(settings)
        #: POSTs per URL at delivery (endpoint_posts_per_s, burst endpoint_posts_burst)
        self._posts = _Buckets(
            settings.endpoint_posts_per_s, settings.endpoint_posts_burst, retry_limits.max_tracked
        )
        #: v1 (HMAC) keys per URL, from [[webhook.endpoints]] secrets; DNS URLs have none
        self._secrets = settings.secrets()
        #: URLs whose receiver refused a batch with a 4xx -> until when (monotonic) they get
        #: one report per POST; those POSTs spend no POST-budget token (see _single_form)
        self._singles: dict[str, float] = {}
        self._counters = _Counters()
        self._unexpected: dict[str, int] = {}
        self._log_limiter = _LogLimiter(UNEXPECTED_LOG_INTERVAL_S, monotonic, MAX_ERROR_KINDS)
        self._failing = _LogLimiter(FAILING_LOG_INTERVAL_S, monotonic, MAX_HELD_URLS)
        self._outbox_full = _LogLimiter(FAILING_LOG_INTERVAL_S, monotonic, MAX_HELD_URLS)
        self._wake = trio.Event()
        #: delivery tasks running (a slot each, up to max_concurrency), and per host name the
        #: URLs they deliver to, with how many each (max_concurrency_per_host per host)
        self._active = 0
        self._per_host = min(settings.max_concurrency_per_host, settings.max_concurrency)
        self._busy: dict[str, dict[str, int]] = {}
        #: over-budget rows given back per bucket since the last idle (spreads their due times)
        self._deferred: dict[str, int] = {}
        self._record_lock = threading.Lock()
        #: endpoints that said 429/502/503/504, until when (monotonic seconds, so that a
        #: wall-clock step does not stretch a hold); also in the store, in wall-clock time
        self._held: dict[str, float] = {}
        #: wall clock minus monotonic clock at the last look, to see steps; None before
        self._clock_offset: float | None = None
        s = settings
        #: no due time we write lies further ahead than this (rebase_clock clamps to it)
        self._max_delay_s = max(
            s.backoff_cap_s, s.retry_after_cap_s, s.lease_s, self._budget.limits.longest_wait_s
        )

    def statistics(self) -> WebhookStatistics:
        plan = self.planner.statistics()
        return WebhookStatistics(
            **vars(self._counters),
            unexpected_errors=MappingProxyType(dict(self._unexpected)),
            dropped=plan.dropped,
            deferred=plan.deferred,
        )

    def warn_outbox_full(self, url: str, n: int, per_url: int, total: int) -> None:
        """One line per URL per FAILING_LOG_INTERVAL_S for deliveries shed at a full outbox."""
        self._outbox_full.warning(
            url,
            "webhook.outbox_full url=%s shed=%d (max_pending_per_url=%d, max_pending=%d)",
            url[:200],
            n,
            per_url,
            total,
        )

    def wake(self) -> None:
        """Look at the outbox now (something was enqueued)."""
        self._wake.set()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def _check_clock(self) -> None:
        """Re-base due times if the wall clock stepped since the last look (or ever, at start:
        it may have stepped while the service was down; the rows say so by themselves)."""
        offset = self._clock() - self._monotonic()
        last, self._clock_offset = self._clock_offset, offset
        if last is not None:
            if abs(offset - last) <= CLOCK_STEP_TOLERANCE_S:
                return
            self._counters.clock_steps += 1
            log.warning("webhook delivery: wall clock stepped by %+.0f s", offset - last)
        moved = await trio.to_thread.run_sync(
            functools.partial(
                outbox.rebase_clock,
                self._store,
                now_ms=self._now_ms(),
                max_delay_ms=int(self._max_delay_s * 1000),
                tolerance_ms=int(CLOCK_STEP_TOLERANCE_S * 1000),
            )
        )
        self._counters.rebased += moved
        if moved:
            log.info("webhook delivery: re-based %d due times to the current clock", moved)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver forever: a pass over due rows, then wait for wake() or the next poll."""
        async with self._client_factory(self._settings) as client, trio.open_nursery() as nursery:
            task_status.started()
            log.info("webhook delivery started")
            next_prune = trio.current_time()
            while True:
                try:
                    await self._check_clock()
                    if trio.current_time() >= next_prune:
                        next_prune = trio.current_time() + PRUNE_INTERVAL_S
                        now_ms = self._now_ms()
                        await trio.to_thread.run_sync(
                            functools.partial(
                                outbox.prune_delivered,
                                self._store,
                                before_ms=now_ms - int(self._settings.keep_delivered_s * 1000),
                                dead_before_ms=now_ms - int(self._settings.keep_dead_s * 1000),
                            )
                        )
                    claimed = await self._pass(client, nursery)
                except StoreError as exc:
                    # The database is away: keep the service up and try again next poll.
                    self._counters.store_errors += 1
                    log.warning("webhook delivery: %s", exc)
                    claimed = 0
                if claimed == 0:
                    try:
                        await self._idle()
                    except StoreError as exc:
                        self._counters.store_errors += 1
                        log.warning("webhook delivery: %s", exc)
                        await trio.sleep(self._settings.poll_interval_s)

    async def drain(self, *, timeout_s: float | None = None) -> dict[str, int]:
        """Deliver until no row is pending (waiting out backoffs); return the outbox counts."""
        with trio.move_on_after(math.inf if timeout_s is None else timeout_s):
            async with self._client_factory(self._settings) as client, trio.open_nursery() as n:
                while True:
                    await self._check_clock()
                    claimed = await self._pass(client, n)
                    if claimed:
                        continue
                    if self._active == 0:
                        counts = await trio.to_thread.run_sync(outbox.counts, self._store)
                        if counts[outbox.PENDING] == 0:
                            return counts
                    await self._idle()
        return await trio.to_thread.run_sync(outbox.counts, self._store)

    async def _idle(self) -> None:
        """Wait for wake(): something enqueued, or a delivery finished (a slot is free); or for
        the next due row or poll."""
        self._deferred.clear()
        due = await trio.to_thread.run_sync(
            functools.partial(outbox.next_due_ms, self._store, now_ms=self._now_ms())
        )
        wait = self._settings.poll_interval_s
        if due is not None:
            wait = min(wait, max(0.0, (due - self._now_ms()) / 1000))
            if wait < 0.02 and self._active:
                # Due but not claimed: the rows of busy hosts, or no slot free. A finishing
                # delivery wakes us; no need to look again every 20 ms meanwhile.
                wait = self._settings.poll_interval_s
            token_s = self._posts.next_token_s(self._monotonic())
            if wait < 0.02 and token_s is not None:
                # Due but their URL's POST budget is spent: they go when it has a token
                # (with whatever else came due by then: the batching).
                wait = min(self._settings.poll_interval_s, token_s)
        # Held endpoints' rows come due when the hold ends (next_due_ms); whatever else is due
        # yet not claimed, never spin faster than 20 ms.
        with trio.move_on_after(max(wait, 0.02)):
            await self._wake.wait()
        self._wake = trio.Event()

    def _skip_urls(self) -> list[str]:
        """URLs not to claim now: those with a POST in flight (one at a time per URL: what
        comes due meanwhile goes in its next POST), those of hosts with
        max_concurrency_per_host in flight, and those whose POST budget is spent (their rows
        wait and are batched). At most outbox.MAX_SKIP_URLS: rows of the others are claimed
        and given back, as correct, only dearer."""
        skip: dict[str, None] = {}
        for urls in self._busy.values():
            skip.update(dict.fromkeys(urls))
        mono = self._monotonic()
        for url in self._posts.spent(mono):
            skip[url] = None
        return list(skip)[: outbox.MAX_SKIP_URLS]

    async def _pass(self, client: httpx.AsyncClient, nursery: trio.Nursery) -> int:
        """Fill the free delivery slots with due POSTs; return how many rows were claimed.

        A worker pool: each POST (all due rows of one URL, up to max_batch_reports) runs in
        ``nursery`` in a slot of its own and frees it when done (waking the service to claim
        again), so a slow endpoint holds up only its own slots. A host has at most
        max_concurrency_per_host of them; a URL one POST at a time, and at most
        ``endpoint_posts_per_s`` (burst ``endpoint_posts_burst``).
        """
        s = self._settings
        total = 0
        while self._active < s.max_concurrency:
            if len(self._deferred) > MAX_HELD_URLS:
                self._deferred.clear()
            batches = await trio.to_thread.run_sync(
                functools.partial(
                    outbox.claim_batches,
                    self._store,
                    now_ms=self._now_ms(),
                    lease_ms=int(s.lease_s * 1000),
                    max_urls=min(s.max_concurrency - self._active, s.batch_size),
                    max_reports=s.max_batch_reports,
                    skip_urls=self._skip_urls(),
                )
            )
            claimed = sum(len(b) for b in batches)
            self._counters.claimed += claimed
            total += claimed
            if not batches:
                break
            for batch in batches:
                url = batch[0].url
                host = _server_key(url)
                urls = self._busy.get(host, {})
                if sum(urls.values()) >= self._per_host or url in urls:
                    self._counters.host_busy += len(batch)
                    await self._release_all(batch, HOST_BUSY_RELEASE_S)
                    continue
                wait_s = self._posts.wait_s(url, self._monotonic())
                if wait_s > 0:  # past the skip list's cap: back for when the bucket allows
                    await self._release_all(batch, wait_s)
                    continue
                urls[url] = urls.get(url, 0) + 1
                self._busy[host] = urls
                self._active += 1
                nursery.start_soon(self._deliver_one, client, batch, host)
        return total

    def _free_slot(self, url: str, host: str) -> None:
        self._active -= 1
        urls = self._busy[host]
        urls[url] -= 1
        if not urls[url]:
            del urls[url]
        if not urls:
            del self._busy[host]
        self.wake()

    async def _deliver_one(
        self, client: httpx.AsyncClient, batch: list[outbox.OutboxEntry], host: str
    ) -> None:
        """One delivery slot, and the per-POST boundary: whatever goes wrong with one POST is
        a counted, failed attempt of its rows, never the end of the service (Cancelled still
        passes). The slot is freed however it ends."""
        try:
            await self._deliver_guarded(client, batch)
        finally:
            self._free_slot(batch[0].url, host)

    async def _deliver_guarded(
        self, client: httpx.AsyncClient, batch: list[outbox.OutboxEntry]
    ) -> None:
        try:
            await self._deliver(client, batch)
        except Exception as exc:
            kind = type(exc).__name__
            if kind not in self._unexpected and len(self._unexpected) >= MAX_ERROR_KINDS:
                kind = "other"
            self._unexpected[kind] = self._unexpected.get(kind, 0) + 1
            self._log_limiter.warning(
                kind,
                "webhook delivery: unexpected %s delivering %d rows from row %d: %s",
                type(exc).__name__,
                len(batch),
                batch[0].id,
                str(exc)[:200],
            )
            attempt = _Attempt(RETRY, error=f"internal error: {type(exc).__name__}")
            now_ms = self._now_ms()
            try:
                retry_at_ms = self._retry_at_ms(batch[0], attempt, now_ms)
            except Exception:  # the boundary itself must not fail: the longest backoff
                retry_at_ms = now_ms + int(self._settings.backoff_cap_s * 1000)
            # Rows already finished (the error came later) are left as they are: _finish only
            # changes pending rows.
            await self._store_call(
                functools.partial(self._record, batch, attempt, now_ms, retry_at_ms)
            )

    async def _deliver(self, client: httpx.AsyncClient, batch: list[outbox.OutboxEntry]) -> None:
        url = batch[0].url
        held_until = self._held.get(url, -math.inf)
        wait_s = held_until - self._monotonic()
        if wait_s > 0:
            # Claimed before the "slow down" of a POST in flight reached the store: do not
            # send, give them back for when the endpoint wants to hear from us again.
            self._counters.postponed += len(batch)
            await self._release_all(batch, wait_s)
            return
        # Only retries are charged to the retry budgets, once per POST that carries any: the
        # POST budget bounds every POST, first attempts included.
        if any(e.attempts > 1 for e in batch) and await self._over_retry_budget(batch):
            return
        body = await self._body(batch)
        if body is None:
            return
        sent, msg_id, content = body
        if not (len(sent) == 1 and self._single_form(url)):
            # A single-form URL's POSTs are bounded by its one POST in flight and by what the
            # enqueue budgets let into the outbox; a token each would cap it at 1 report/s.
            self._posts.take(url, self._monotonic())
        self._counters.in_flight += len(sent)
        try:
            attempt = await self._attempt(client, url, msg_id, content)
        finally:
            self._counters.in_flight -= len(sent)
        if attempt.refused:
            self._counters.refused += len(sent)
        else:
            self._counters.posts += 1
        if len(sent) > 1:
            if not attempt.refused:  # a POST that was never sent carried nothing
                self._counters.batched_reports += len(sent)
            refused_batch = attempt.outcome == DEAD and attempt.status is not None
            if refused_batch and not self._single_form(url):
                # A receiver that knows only the single form (4xx to the batch): its rows go
                # back unsent and are sent one per POST from now on (bounded memory).
                self._batch_refused(url)
                await self._release_all(sent, 0.0)
                return
        now_ms = self._now_ms()
        retry_at_ms = self._retry_at_ms(sent[0], attempt, now_ms)
        if attempt.outcome == SLOW_DOWN:
            # Before the slot is freed and the next row claimed, so that it sees the hold.
            mono = self._monotonic()
            for held in [u for u, t in self._held.items() if t <= mono]:
                del self._held[held]
            if url not in self._held and len(self._held) >= MAX_HELD_URLS:
                del self._held[min(self._held, key=self._held.__getitem__)]
            until = mono + (retry_at_ms - now_ms) / 1000
            self._held[url] = max(self._held.get(url, -math.inf), until)
        if attempt.outcome != DELIVERED:
            self._failing.warning(
                url,
                "webhook.endpoint_failing url=%s reports=%d outcome=%s error=%s",
                url[:200],
                len(sent),
                attempt.outcome,
                attempt.error[:200],
            )
        await self._store_call(functools.partial(self._record, sent, attempt, now_ms, retry_at_ms))

    def _single_form(self, url: str) -> bool:
        until = self._singles.get(url)
        if until is None:
            return False
        if until <= self._monotonic():
            del self._singles[url]
            return False
        return True

    def _batch_refused(self, url: str) -> None:
        self._counters.batches_refused += 1
        if url not in self._singles and len(self._singles) >= MAX_HELD_URLS:
            self._singles.pop(next(iter(self._singles)))
        self._singles[url] = self._monotonic() + SINGLE_FORM_FOR_S
        log.warning(
            "webhook.batch_refused url=%s (one report per POST for %d s)",
            url[:200],
            SINGLE_FORM_FOR_S,
        )

    async def _body(
        self, batch: list[outbox.OutboxEntry]
    ) -> tuple[list[outbox.OutboxEntry], str, bytes] | None:
        """The rows that go, the webhook-id and the body; rows that cannot go are recorded
        (dead: not our report, or it does not decode) or given back (over the body cap, or
        the endpoint takes one report per POST), and None if none is left."""
        s = self._settings
        url = batch[0].url
        limit = 1 if self._single_form(url) else s.max_batch_reports
        reports: list[rpt.SignedReport] = []
        parts: list[bytes] = []
        size = len(BATCH_PREFIX) + len(BATCH_SUFFIX)
        sent: list[outbox.OutboxEntry] = []
        rest: list[outbox.OutboxEntry] = []
        for i, entry in enumerate(batch):
            if len(sent) >= limit:
                rest = batch[i:]
                break
            report, error = self._own_report(entry)
            if report is None:
                await self._store_call(
                    functools.partial(
                        self._record, [entry], _Attempt(DEAD, error=error), self._now_ms(), 0
                    )
                )
                continue
            part = encode_body(report)
            if sent and size + len(part) + 1 > s.max_batch_bytes:
                rest = batch[i:]
                break
            size += len(part) + (1 if parts else 0)
            reports.append(report)
            parts.append(part)
            sent.append(entry)
        if rest:
            await self._release_all(rest, 0.0, uncount=True)
        if not sent:
            return None
        if len(sent) == 1:
            return sent, reports[0].report_id, parts[0]
        content = BATCH_PREFIX + b",".join(parts) + BATCH_SUFFIX
        return sent, batch_id([r.report_id for r in reports]), content

    def _own_report(self, entry: outbox.OutboxEntry) -> tuple[rpt.SignedReport | None, str]:
        try:
            unverified = rpt.decode_unverified(entry.cose)
        except ReportDecodeError as exc:
            return None, f"stored report does not decode: {exc}"
        if unverified.kid != self._public_key:
            # The receiver checks the webhook key against the report's kid: only our own
            # reports can be delivered under our signature.
            return None, "report not signed by this node's key"
        return (
            rpt.SignedReport(
                cose=unverified.cose, observer_key=unverified.kid, payload=unverified.payload
            ),
            "",
        )

    async def _over_retry_budget(self, batch: list[outbox.OutboxEntry]) -> bool:
        """Charge a retry to its URL and host; if either is spent, give the rows back for when
        the bucket has refilled (later POSTs, until the service idles, one interval later each)."""
        url = batch[0].url
        deferred = self._deferred
        spent = self._budget.charge(url, _host_key(url), self._monotonic())
        if spent is None:
            return False
        which, wait_s, interval_s = spent
        key = f"{which} {url if which == 'url' else _host_key(url)}"
        queued = deferred.get(key, 0)
        deferred[key] = queued + 1
        if which == "url":
            self._counters.retry_budget_url += 1
        else:
            self._counters.retry_budget_host += 1
        await self._release_all(batch, min(wait_s + queued * interval_s, self._max_delay_s))
        return True

    async def _release_all(
        self, batch: Sequence[outbox.OutboxEntry], wait_s: float, *, uncount: bool = False
    ) -> None:
        """Give claimed rows back unsent (their claim's attempt not counted), due in
        ``wait_s``. ``uncount``: they were counted claimed but never offered for sending."""
        if uncount:
            self._counters.claimed -= len(batch)
        now_ms = self._now_ms()
        due_ms = now_ms + math.ceil(wait_s * 1000)
        ids = [e.id for e in batch]
        await self._store_call(
            functools.partial(
                outbox.release_many, self._store, ids, now_ms=now_ms, next_attempt_ms=due_ms
            )
        )

    async def _release(self, entry: outbox.OutboxEntry, wait_s: float) -> None:
        await self._release_all([entry], wait_s)

    def _retry_at_ms(self, entry: outbox.OutboxEntry, attempt: _Attempt, now_ms: int) -> int:
        """When to try again: jittered backoff, at least what Retry-After asked (capped)."""
        s = self._settings
        delay = backoff_s(
            entry.attempts, base_s=s.backoff_base_s, cap_s=s.backoff_cap_s, rng=self._rng
        )
        if attempt.retry_after_s is not None:
            delay = max(delay, min(attempt.retry_after_s, s.retry_after_cap_s))
        return now_ms + int(delay * 1000)

    async def _store_call(self, call: Callable[[], object]) -> None:
        """Write an outcome. If the database fails, the rows stay leased and are sent again
        when their lease runs out (the receiver de-duplicates), so only log it."""
        try:
            await trio.to_thread.run_sync(call)
        except StoreError as exc:
            self._counters.store_errors += 1
            log.warning("webhook delivery: cannot record an outcome: %s", exc)

    def _record(
        self, batch: list[outbox.OutboxEntry], attempt: _Attempt, now_ms: int, until_ms: int
    ) -> None:
        """Write the outcome of one POST for every row it carried (blocking; in a thread).

        ``now_ms`` is the time ``until_ms`` was computed from, written as the rows'
        ``updated_ms``: the pair keeps the delay even if the clock steps meanwhile, which is
        what :func:`outbox.rebase_clock` relies on.
        """
        with self._record_lock:  # counters are shared with other threads doing the same
            if attempt.outcome == DELIVERED:
                # One transaction for the POST; counted once written: whoever sees the
                # counter then finds the rows delivered.
                ids = [e.id for e in batch]
                status = attempt.status or 0
                outbox.mark_delivered_many(self._store, ids, now_ms=now_ms, status=status)
                self._counters.delivered += len(batch)
                return
            if attempt.outcome == GONE:
                url = batch[0].url
                self._counters.gone += 1
                outbox.disable_endpoint(self._store, url, now_ms=now_ms, reason=attempt.error)
                log.warning("webhook endpoint disabled: %s answered 410 Gone", url)
            # One transaction for the POST's rows and the endpoint's hold, as for a 2xx: an
            # endpoint answering 429 to every POST must not cost a commit per row it carried.
            outcomes = [self._outcome(entry, attempt, until_ms) for entry in batch]
            slow = attempt.outcome == SLOW_DOWN and any(o.state == outbox.PENDING for o in outcomes)
            hold = (batch[0].url, until_ms) if slow else None
            outbox.finish_many(self._store, outcomes, now_ms=now_ms, hold=hold)

    def _outcome(
        self, entry: outbox.OutboxEntry, attempt: _Attempt, until_ms: int
    ) -> outbox.RowOutcome:
        """What a failed attempt makes of one row (counted); written by :meth:`_record`."""
        s, c = self._settings, self._counters
        outcome = attempt.outcome
        if outcome in (RETRY, SLOW_DOWN) and entry.attempts < s.max_attempts:
            if outcome == SLOW_DOWN:
                c.slowed_down += 1
            c.retried += 1
            return outbox.RowOutcome(
                entry.id, outbox.PENDING, attempt.error, attempt.status, next_attempt_ms=until_ms
            )
        # GONE: disable_endpoint (in _record) made the pending rows dead; this one too.
        c.dead += 1
        error = attempt.error
        if outcome in (RETRY, SLOW_DOWN):
            error = f"gave up after {entry.attempts} attempts: {error}"
        return outbox.RowOutcome(entry.id, outbox.DEAD, error, attempt.status)

    async def _attempt(
        self, client: httpx.AsyncClient, url: str, msg_id: str, body: bytes
    ) -> _Attempt:
        """One POST; every failure becomes an outcome, never an exception (but Cancelled).

        One deadline, ``total_timeout_s``, covers the whole attempt: resolving, connecting,
        sending and reading the answer, however slowly it drips.
        """
        s = self._settings
        try:
            with trio.fail_after(s.total_timeout_s):
                return await self._send(client, url, msg_id, body)
        except trio.TooSlowError:
            self._counters.network_errors += 1
            return _Attempt(RETRY, error=f"no answer within {s.total_timeout_s:g} s")

    async def _send(
        self, client: httpx.AsyncClient, url: str, msg_id: str, body: bytes
    ) -> _Attempt:
        import httpx

        s = self._settings
        try:
            target = ssrf.parse_target(url, require_https=s.require_https)
            with trio.fail_after(s.connect_timeout_s):
                addresses = await resolve(target.host, target.port)
            ssrf.check_addresses(addresses, self._allowed)
        except ssrf.AddressRefused as exc:
            return _Attempt(DEAD, error=str(exc), refused=True)
        except trio.TooSlowError:
            self._counters.network_errors += 1
            return _Attempt(RETRY, error=f"resolving {url} timed out")
        except ResolveError as exc:
            self._counters.network_errors += 1
            return _Attempt(RETRY, error=str(exc))
        except DeliveryError as exc:
            return _Attempt(DEAD, error=str(exc), refused=True)

        headers = sign_headers(
            msg_id, int(self._clock()), body, self._signer, self._secrets.get(url, ())
        )
        # The body as it is: a Content-Encoding we would have to inflate is a bomb's fuse.
        headers["accept-encoding"] = "identity"
        pinned, extensions = _pinned(url, target, addresses[0])
        if pinned != url:
            headers["host"] = _host_header(target)
        try:
            request = client.build_request(
                "POST", pinned, content=body, headers=headers, extensions=extensions
            )
            response = await client.send(request, stream=True)
            try:
                status = response.status_code
                retry_after = response.headers.get("retry-after")
                encoding = response.headers.get("content-encoding", "").strip().lower()
                # Reading an answer to its end keeps the keep-alive connection (no TCP
                # handshake per delivery); a longer one is cut and its connection dropped.
                detail, cut = await read_raw_capped(response, MAX_ERROR_BODY_BYTES)
            finally:
                await response.aclose()
        except httpx.InvalidURL as exc:  # a URL httpx will never send: no retry helps
            return _Attempt(DEAD, error=f"invalid URL: {exc}"[:200], refused=True)
        except httpx.RemoteProtocolError as exc:  # not HTTP, or a head over the cap
            self._counters.bad_answers += 1
            return _Attempt(RETRY, error=f"bad answer: {exc}"[:200])
        except httpx.HTTPError as exc:
            self._counters.network_errors += 1
            return _Attempt(RETRY, error=f"{type(exc).__name__}: {exc}"[:200])
        except OSError as exc:  # pragma: no cover - httpx maps these; belt and braces
            self._counters.network_errors += 1
            return _Attempt(RETRY, error=f"network error: {exc.strerror or exc}")
        if cut:
            self._counters.answers_cut += 1
        outcome = classify(status)
        if encoding not in ("", "identity"):
            text = f"({_printable(encoding[:40])}-encoded body, not read)"
        else:
            text = _printable(detail[:MAX_ERROR_BODY_BYTES].decode("utf-8", "replace").strip())
        error = f"HTTP {status}" + (f": {text}" if text else "")
        if 300 <= status < 400:
            error = f"HTTP {status}: redirects are not followed"
        return _Attempt(
            outcome,
            status=status,
            error="" if outcome == DELIVERED else error,
            retry_after_s=parse_retry_after(retry_after, now=self._clock()),
        )


def _host_header(target: ssrf.Target) -> str:
    default = 443 if target.scheme == "https" else 80
    host = f"[{target.host}]" if ":" in target.host else target.host
    return host if target.port == default else f"{host}:{target.port}"


def _pinned(url: str, target: ssrf.Target, address: ssrf.Address) -> tuple[str, dict[str, Any]]:
    """Connect to the address we checked, not to whatever a second lookup would return.

    The URL's host becomes the IP; the Host header and the TLS server name (``sni_hostname``,
    which httpcore also uses to check the certificate) stay the name from the URL.
    """
    if target.literal is not None:
        return url, {}
    import httpx

    parsed = httpx.URL(url)
    ip = f"{address}"
    pinned = parsed.copy_with(host=ip)
    return str(pinned), {"sni_hostname": target.host}


# ---------------------------------------------------------------------------------------------
# python -m overflowd.services.webhook: deliver the outbox until it is empty


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m overflowd.services.webhook",
        description="Deliver the node's webhook outbox until nothing is pending, then exit.",
    )
    p.add_argument("--home", metavar="DIR", help="node home (identity.key)")
    p.add_argument("--db", metavar="URL", help="database URL (default: the home's SQLite)")
    p.add_argument("--allow-prefix", action="append", default=[], metavar="PREFIX")
    p.add_argument("--allow-http", action="store_true", help="allow plain-http URLs")
    p.add_argument("--lease-s", type=float, default=WebhookSettings.lease_s)
    p.add_argument("--max-attempts", type=int, default=WebhookSettings.max_attempts)
    p.add_argument("--backoff-base-s", type=float, default=WebhookSettings.backoff_base_s)
    p.add_argument("--backoff-cap-s", type=float, default=WebhookSettings.backoff_cap_s)
    p.add_argument("--concurrency", type=int, default=WebhookSettings.max_concurrency)
    p.add_argument("--batch-size", type=int, default=WebhookSettings.batch_size)
    p.add_argument(
        "--max-batch-reports",
        type=int,
        default=WebhookSettings.max_batch_reports,
        help="reports one POST carries at most",
    )
    p.add_argument("--timeout-s", type=float, default=None, help="give up after this long")
    p.add_argument("-v", "--verbose", action="count", default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from overflowd.config import resolve_home
    from overflowd.identity import load_identity
    from overflowd.store.repository import default_url

    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if not args.verbose else logging.DEBUG,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    prog = "overflowd-webhook"
    try:
        home = resolve_home(args.home)
        settings = WebhookSettings(
            allow_prefixes=tuple(args.allow_prefix),
            require_https=not args.allow_http,
            lease_s=args.lease_s,
            max_attempts=args.max_attempts,
            backoff_base_s=args.backoff_base_s,
            backoff_cap_s=args.backoff_cap_s,
            max_concurrency=args.concurrency,
            batch_size=args.batch_size,
            max_batch_reports=args.max_batch_reports,
            poll_interval_s=min(WebhookSettings.poll_interval_s, args.lease_s),
        )
        identity = load_identity(home)
        with Store.open(args.db or default_url(Path(home))) as store:
            delivery = WebhookDelivery(store, identity, settings)
            counts = trio.run(functools.partial(delivery.drain, timeout_s=args.timeout_s))
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OverflowdError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(
        " ".join(f"{k}={v}" for k, v in counts.items()),
        file=sys.stderr,
    )
    return 0 if counts[outbox.PENDING] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
