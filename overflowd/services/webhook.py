"""Webhook delivery: the outbox worker that POSTs signed reports to receivers (trio + httpx).

Reports to deliver are rows in the durable outbox (:mod:`overflowd.store.outbox`), put there by
:func:`enqueue`. :class:`WebhookDelivery` claims due rows, signs fresh Standard Webhooks headers
(``v1a``, the node key) over the report's JSON rendering, POSTs, and records the outcome:

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
=====================  ================================================================

Backoff is exponential with jitter: attempt ``n`` waits a uniform random time in
``[d/2, d]`` where ``d = min(cap, base × 2^(n-1))``; after ``max_attempts`` the row is dead.

Exactly once at the receiver: a crash between sending and marking a row only means the row is
sent again when its lease runs out, with the same ``webhook-id`` (the report id), which the
receiver de-duplicates. This module never logs report bodies, and maps httpx's exceptions to
outcomes here, at the one boundary that talks HTTP.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
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
from overflowd.notify import WebhookSettings
from overflowd.receiver import encode_body
from overflowd.store import outbox
from overflowd.store.repository import Store
from overflowd.wire import webhook as wh

log = logging.getLogger(__name__)

SECONDS = 1.0
USER_AGENT = "overflowd-webhook/1"
#: Bytes of a non-2xx answer kept for the dead-letter reason; the rest is never read, so a
#: receiver cannot make us download a large body.
MAX_ERROR_BODY_BYTES = 256
#: How often the running service deletes old delivered rows.
PRUNE_INTERVAL_S = 3600 * SECONDS


# ---------------------------------------------------------------------------------------------
# Settings


# ---------------------------------------------------------------------------------------------
# Pure policy


@functools.lru_cache(maxsize=1024)
def _network(prefix: str) -> ssrf.Network:
    return ipaddress.ip_network(prefix, strict=False)


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
    if value.isdigit():
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


@dataclass(frozen=True, slots=True)
class _Attempt:
    outcome: str
    status: int | None = None
    error: str = ""
    retry_after_s: float | None = None


ClientFactory = Callable[[WebhookSettings], httpx.AsyncClient]


def default_client(settings: WebhookSettings) -> httpx.AsyncClient:
    """The HTTP client: explicit timeouts, no redirects, no proxies from the environment."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(settings.io_timeout_s, connect=settings.connect_timeout_s),
        limits=httpx.Limits(
            max_connections=settings.max_concurrency,
            max_keepalive_connections=settings.max_concurrency,
        ),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": USER_AGENT},
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


class WebhookDelivery:
    """Deliver the outbox. ``run()`` is the daemon's service; ``drain()`` empties it and returns.

    ``client_factory(settings)`` makes the httpx client (tests inject transports); ``clock``
    gives Unix seconds for the outbox's wall-clock times and the signature timestamp; ``rng``
    the backoff jitter.
    """

    def __init__(
        self,
        store: Store,
        identity: NodeIdentity,
        settings: WebhookSettings,
        client_factory: ClientFactory | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._store = store
        self._identity = identity
        self._signer = identity.signer()
        self._public_key = identity.public_key
        self._settings = settings
        self._allowed = settings.allowed_networks
        self._client_factory = client_factory or default_client
        self._clock = clock
        self._rng = rng or random.Random()
        self._counters = _Counters()
        self._wake = trio.Event()
        self._limiter = trio.CapacityLimiter(settings.max_concurrency)
        self._record_lock = threading.Lock()
        #: endpoints that said 429/502/503/504, until when (Unix seconds); also in the store
        self._held: dict[str, float] = {}

    def statistics(self) -> WebhookStatistics:
        return WebhookStatistics(**vars(self._counters))

    def wake(self) -> None:
        """Look at the outbox now (something was enqueued)."""
        self._wake.set()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver forever: a pass over due rows, then wait for wake() or the next poll."""
        async with self._client_factory(self._settings) as client:
            task_status.started()
            log.info("webhook delivery started")
            next_prune = trio.current_time()
            while True:
                try:
                    if trio.current_time() >= next_prune:
                        next_prune = trio.current_time() + PRUNE_INTERVAL_S
                        before_ms = self._now_ms() - int(self._settings.keep_delivered_s * 1000)
                        await trio.to_thread.run_sync(
                            functools.partial(
                                outbox.prune_delivered, self._store, before_ms=before_ms
                            )
                        )
                    claimed = await self._pass(client)
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
            async with self._client_factory(self._settings) as client:
                while True:
                    claimed = await self._pass(client)
                    if claimed:
                        continue
                    counts = await trio.to_thread.run_sync(outbox.counts, self._store)
                    if counts[outbox.PENDING] == 0:
                        return counts
                    await self._idle()
        return await trio.to_thread.run_sync(outbox.counts, self._store)

    async def _idle(self) -> None:
        due = await trio.to_thread.run_sync(outbox.next_due_ms, self._store)
        wait = self._settings.poll_interval_s
        if due is not None:
            wait = min(wait, max(0.0, (due - self._now_ms()) / 1000))
        # A pending row may be due yet held (endpoint slowed down): never spin faster than 20 ms.
        with trio.move_on_after(max(wait, 0.02)):
            await self._wake.wait()
        self._wake = trio.Event()

    async def _pass(self, client: httpx.AsyncClient) -> int:
        s = self._settings
        claimed = await trio.to_thread.run_sync(
            functools.partial(
                outbox.claim_due,
                self._store,
                now_ms=self._now_ms(),
                lease_ms=int(s.lease_s * 1000),
                limit=s.batch_size,
            )
        )
        self._counters.claimed += len(claimed)
        if claimed:
            async with trio.open_nursery() as nursery:
                for entry in claimed:
                    nursery.start_soon(self._deliver_one, client, entry)
        return len(claimed)

    async def _deliver_one(self, client: httpx.AsyncClient, entry: outbox.OutboxEntry) -> None:
        async with self._limiter:
            held_until = self._held.get(entry.url, 0.0)
            if held_until > self._clock():
                # Claimed in the same batch as a row whose answer said "slow down": do not send,
                # give it back for when the endpoint wants to hear from us again.
                self._counters.postponed += 1
                await self._store_call(
                    functools.partial(
                        outbox.release,
                        self._store,
                        entry.id,
                        now_ms=self._now_ms(),
                        next_attempt_ms=int(held_until * 1000),
                    )
                )
                return
            self._counters.in_flight += 1
            try:
                attempt = await self._attempt(client, entry)
            finally:
                self._counters.in_flight -= 1
            now_ms = self._now_ms()
            retry_at_ms = self._retry_at_ms(entry, attempt, now_ms)
            if attempt.outcome == SLOW_DOWN:
                # Before the limiter lets the next request go, so that it sees the hold.
                now_s = now_ms / 1000
                for url in [u for u, t in self._held.items() if t <= now_s]:
                    del self._held[url]
                self._held[entry.url] = max(self._held.get(entry.url, 0.0), retry_at_ms / 1000)
        await self._store_call(functools.partial(self._record, entry, attempt, retry_at_ms))

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
        """Write an outcome. If the database fails, the row stays leased and is sent again
        when its lease runs out (the receiver de-duplicates), so only log it."""
        try:
            await trio.to_thread.run_sync(call)
        except StoreError as exc:
            self._counters.store_errors += 1
            log.warning("webhook delivery: cannot record an outcome: %s", exc)

    def _record(self, entry: outbox.OutboxEntry, attempt: _Attempt, until_ms: int) -> None:
        """Write the outcome of one attempt (blocking; runs in a thread)."""
        with self._record_lock:  # counters are shared with other threads doing the same
            self._record_locked(entry, attempt, until_ms)

    def _record_locked(self, entry: outbox.OutboxEntry, attempt: _Attempt, until_ms: int) -> None:
        s, c, now_ms = self._settings, self._counters, self._now_ms()
        outcome = attempt.outcome
        if outcome == DELIVERED:
            c.delivered += 1
            outbox.mark_delivered(self._store, entry.id, now_ms=now_ms, status=attempt.status or 0)
            return
        if outcome == GONE:
            c.gone += 1
            c.dead += 1
            outbox.mark_dead(
                self._store, entry.id, now_ms=now_ms, error=attempt.error, status=attempt.status
            )
            outbox.disable_endpoint(self._store, entry.url, now_ms=now_ms, reason=attempt.error)
            log.warning("webhook endpoint disabled: %s answered 410 Gone", entry.url)
            return
        if outcome in (RETRY, SLOW_DOWN) and entry.attempts < s.max_attempts:
            if outcome == SLOW_DOWN:
                c.slowed_down += 1
                outbox.hold_endpoint(self._store, entry.url, now_ms=now_ms, until_ms=until_ms)
            c.retried += 1
            outbox.reschedule(
                self._store,
                entry.id,
                now_ms=now_ms,
                next_attempt_ms=until_ms,
                error=attempt.error,
                status=attempt.status,
            )
            return
        c.dead += 1
        error = attempt.error
        if outcome in (RETRY, SLOW_DOWN):
            error = f"gave up after {entry.attempts} attempts: {error}"
        outbox.mark_dead(self._store, entry.id, now_ms=now_ms, error=error, status=attempt.status)

    async def _attempt(self, client: httpx.AsyncClient, entry: outbox.OutboxEntry) -> _Attempt:
        """One POST; every failure becomes an outcome, never an exception (but Cancelled)."""
        s = self._settings
        try:
            unverified = rpt.decode_unverified(entry.cose)
        except ReportDecodeError as exc:
            return _Attempt(DEAD, error=f"stored report does not decode: {exc}")
        if unverified.kid != self._public_key:
            # The receiver checks the webhook key against the report's kid: only our own
            # reports can be delivered under our signature.
            return _Attempt(DEAD, error="report not signed by this node's key")
        report = rpt.SignedReport(
            cose=unverified.cose, observer_key=unverified.kid, payload=unverified.payload
        )
        try:
            target = ssrf.parse_target(entry.url, require_https=s.require_https)
            with trio.fail_after(s.connect_timeout_s):
                addresses = await resolve(target.host, target.port)
            ssrf.check_addresses(addresses, self._allowed)
        except ssrf.AddressRefused as exc:
            self._counters.refused += 1
            return _Attempt(DEAD, error=str(exc))
        except trio.TooSlowError:
            self._counters.network_errors += 1
            return _Attempt(RETRY, error=f"resolving {entry.url} timed out")
        except ResolveError as exc:
            self._counters.network_errors += 1
            return _Attempt(RETRY, error=str(exc))
        except DeliveryError as exc:
            self._counters.refused += 1
            return _Attempt(DEAD, error=str(exc))

        body = encode_body(report)
        headers = wh.sign(report.report_id, int(self._clock()), body, self._signer)
        url, extensions = _pinned(entry.url, target, addresses[0])
        if url != entry.url:
            headers["host"] = _host_header(target)
        try:
            with trio.fail_after(s.total_timeout_s):
                request = client.build_request(
                    "POST", url, content=body, headers=headers, extensions=extensions
                )
                response = await client.send(request, stream=True)
                try:
                    status = response.status_code
                    retry_after = response.headers.get("retry-after")
                    detail = b""
                    # Read a bounded part of every answer: a response closed with its body
                    # unread loses its keep-alive connection (one TCP handshake per delivery).
                    # A 2xx body is normally empty; a larger one is cut and the connection
                    # dropped, as for errors.
                    async for chunk in response.aiter_bytes():
                        detail += chunk
                        if len(detail) >= MAX_ERROR_BODY_BYTES:
                            break
                    if 200 <= status < 300:
                        detail = b""
                finally:
                    await response.aclose()
        except trio.TooSlowError:
            self._counters.network_errors += 1
            return _Attempt(RETRY, error=f"no answer within {s.total_timeout_s:g} s")
        except httpx.InvalidURL as exc:  # a URL httpx will never send: no retry helps
            self._counters.refused += 1
            return _Attempt(DEAD, error=f"invalid URL: {exc}"[:200])
        except httpx.HTTPError as exc:
            self._counters.network_errors += 1
            return _Attempt(RETRY, error=f"{type(exc).__name__}: {exc}"[:200])
        except OSError as exc:  # pragma: no cover - httpx maps these; belt and braces
            self._counters.network_errors += 1
            return _Attempt(RETRY, error=f"network error: {exc.strerror or exc}")
        outcome = classify(status)
        text = detail[:MAX_ERROR_BODY_BYTES].decode("utf-8", "replace").strip()
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
