"""Peer push: forward newly stored reports to each configured peer's inbox (``POST /v1/inbox``).

Two tasks per peer with ``push = true``, so a slow, failing or hostile peer holds up only its
own tasks, never another peer's deliveries (nor the node's webhooks, which are other rows):

* the **tail** pages the store by report number from the peer's durable push cursor
  (``peer_state.push_cursor``, :mod:`overflowd.store.peers`) and puts each report that should
  go to the peer into the durable outbox (:mod:`overflowd.store.outbox`, rows of kind
  ``peer``, URL = the peer's inbox) *in the same transaction* as it moves the cursor: a crash
  or restart loses nothing and enqueues nothing twice. Not forwarded: reports that arrived
  from this peer (its ``peer:<fingerprint>`` channel is among the report's arrivals: no echo),
  reports its own key signed, and reports whose ``hops + 1`` would exceed
  ``peering.hop_limit``. When the peer's outbox is full (``PEER_OUTBOX_MAX_PENDING``) the
  cursor stops short of what did not fit and the tail tries again later: late, never lost.
* the **delivery** claims that peer's due rows, at most what its outbound budget
  (``out_reports_per_s``/``out_bytes_per_s`` with bursts) allows now (the rest waits in the
  outbox), POSTs them as one inbox body signed with the node key (Standard Webhooks ``v1a``),
  and records the answer per row as webhook delivery does: 2xx delivered (each report the
  peer refused, by index, goes dead with its reason: sending it again would not help); 429,
  502-504 wait for ``Retry-After`` without spending an attempt; other failures (network,
  timeouts, 5xx, 401 while the peer has not configured us yet) retry with jittered exponential
  backoff, for as long as it takes; 400/413 (a body the peer will never take) go dead.

Each report carries the hop count it will have on arrival (its stored ``hops`` + 1) outside the
signed bytes, which are forwarded verbatim. Answers are read raw and capped
(:data:`~overflowd.wire.peering.MAX_ANSWER_BYTES`). Peers are configured by the operator, so no
SSRF policy applies to their URLs (loopback peers are normal in tests and on one host).
"""

from __future__ import annotations

import base64
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from overflowd.errors import StoreError
from overflowd.identity import NodeIdentity
from overflowd.peers import PeeringSettings, PeerSettings
from overflowd.services.api_peers import PeerEvents, PeerInbox
from overflowd.services.peer_latency import LatencySummary, LatencyWindow, latency_metrics
from overflowd.services.webhook import (
    DELIVERED,
    SLOW_DOWN,
    backoff_s,
    classify,
    parse_retry_after,
    read_raw_capped,
)
from overflowd.store import outbox
from overflowd.store import peers as peer_store
from overflowd.store.models import Base
from overflowd.store.repository import Store, StoredReport
from overflowd.wire import peering
from overflowd.wire import webhook as wh

if TYPE_CHECKING:
    import httpx  # imported where a request is made: a node that pushes to no peer never loads it

log = logging.getLogger(__name__)

SECONDS = 1.0
USER_AGENT = "overflowd-peer/1"
#: How often an idle tail looks for new reports when nothing woke it: one indexed query per
#: peer and period. The store wakes the tails after every commit that stored new reports
#: (:meth:`Store.on_new_reports`), so this is only the fallback (a write by another process,
#: e.g. ``overflowd-query import`` on the same database, or a wake-up lost to a race).
TAIL_POLL_S = 0.5 * SECONDS
#: After a wake-up the tail waits this long for more commits to land before it reads, so a
#: stream of small writes (the daemon's store writer commits every few reports) becomes at
#: most 20 pages, outbox transactions and POSTs a second per peer, not one each: every one
#: is several SQLite write transactions here and at the peer. It adds at most this much to a
#: hop's latency (goal: under 1 s for two hops).
TAIL_GATHER_S = 0.005 * SECONDS
#: Reports one tail step reads (and enqueues in one transaction): after an outage the tail
#: catches up a page per transaction.
TAIL_PAGE_REPORTS = 1000
#: Pending rows one peer's outbox may hold: a peer down for a day at 1 report/s is 86 400;
#: beyond this the tail waits (its cursor stays), so the outbox cannot grow without bound.
PEER_OUTBOX_MAX_PENDING = 200_000
#: And all rows of the outbox together (webhooks' too): the same bound the tail respects.
OUTBOX_MAX_PENDING = 1_000_000
#: Reports one POST carries at most: the receiver's default ``inbox_max_reports`` (a larger
#: batch would be refused whole; fewer would cost a round trip more per 200 after an outage).
BATCH_REPORTS = 500
#: Bytes of one body at most: under the receiver's default ``inbox_max_body_bytes``.
BATCH_BYTES = 900_000
#: POSTs one peer's delivery keeps in flight at most while the peer takes them (a backlog: the
#: peer verifies one batch while we read, encode and send the next, and the next's answer
#: comes back while it stores). After a failed POST, one at a time until a POST succeeds, so
#: a peer that is down sees one connection attempt at a time. Bounds the memory per peer to
#: this many bodies of at most BATCH_BYTES.
MAX_POSTS_IN_FLIGHT = 3
#: One POST, connect to the whole answer read, takes at most this long; connecting alone at most
#: ``CONNECT_TIMEOUT_S``. A peer that stalls holds only its own task this long.
TOTAL_TIMEOUT_S = 30 * SECONDS
CONNECT_TIMEOUT_S = 5 * SECONDS
#: A claimed row comes due again after this long if the worker died mid-POST.
LEASE_S = 2 * TOTAL_TIMEOUT_S
#: Backoff after a failed POST: jittered, doubling from RETRY_BASE_S up to RETRY_CAP_S, never
#: giving up (a configured peer that is down is late, not gone). The cap is short because the
#: peer is the operator's, not a stranger's endpoint: one connection attempt every 10 s costs
#: nothing, and the backlog moves within seconds of the peer coming back.
RETRY_BASE_S = 0.5 * SECONDS
RETRY_CAP_S = 10 * SECONDS
#: A Retry-After longer than this is read as this (a peer cannot park our reports for a year).
MAX_RETRY_AFTER_S = 3600 * SECONDS
#: The longest an idle delivery sleeps before looking at the outbox again.
IDLE_MAX_S = 1 * SECONDS
#: The POST outcome of a 2xx whose body is not an inbox answer (counted as a failure).
UNREADABLE = "unreadable"
#: Why a report is not forwarded to a peer (the ``reason`` label).
SKIP_REASONS = ("echo", "own", "hop_limit", "not_subscribed")

_REPORTS = Base.metadata.tables["reports"]


@dataclass
class _PeerCounters:
    enqueued: int = 0
    delivered: int = 0
    duplicates: int = 0
    refused: int = 0
    outbox_full: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    attempts: dict[str, int] = field(default_factory=dict)
    #: POST sent -> answer read, of the last POSTs that got an answer (any status)
    rtt: LatencyWindow = field(default_factory=LatencyWindow)
    #: a report's age at the peer's 2xx: queued in the outbox (stored here) -> delivered,
    #: one sample per delivered POST (its oldest row), so a backlog shows as its wait
    age: LatencyWindow = field(default_factory=LatencyWindow)


@dataclass(frozen=True, slots=True)
class PeerPushStatistics:
    #: per peer name: enqueued, delivered, duplicates, refused, outbox_full
    peers: dict[str, dict[str, int]]
    skipped: dict[tuple[str, str], int]
    attempts: dict[tuple[str, str], int]
    #: pending outbox rows of peers no longer configured, deleted at start
    pruned_removed: int = 0
    #: per peer name: the recent POST round trips and report ages at delivery
    rtt: dict[str, LatencySummary] = field(default_factory=dict)
    age: dict[str, LatencySummary] = field(default_factory=dict)


def inbox_url(peer: PeerSettings) -> str:
    return peer.endpoint(peering.INBOX_PATH)


def _client() -> httpx.AsyncClient:
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(TOTAL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(
            max_connections=MAX_POSTS_IN_FLIGHT, max_keepalive_connections=MAX_POSTS_IN_FLIGHT
        ),
        follow_redirects=False,
        trust_env=False,
        headers={"user-agent": USER_AGENT, "accept-encoding": "identity"},
    )


class PeerPush:
    """Forward stored reports to every peer with ``push``; see the module docstring."""

    def __init__(
        self,
        identity: NodeIdentity,
        store: Store,
        peers: Sequence[PeerSettings],
        peering_settings: PeeringSettings,
        *,
        events: PeerEvents | None = None,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        subscribed: Callable[[bytes, StoredReport], bool] | None = None,
        subscribes: Callable[[bytes], bool] | None = None,
    ) -> None:
        self._identity = identity
        # Subscriptions (docs/peers.md "Subscriptions"): a peer with push = false still gets
        # the reports its subscriptions cover, through the same tail, outbox and budgets.
        self._subscribed = subscribed
        # Whether a key holds any subscription now: a push = false peer without one would
        # have every report skipped, so its tail moves the cursor without reading them
        # (reading 1000 stored reports and their arrivals per page cost the receiving node
        # of a catch-up a quarter of its time).
        self._subscribes = subscribes
        self._signer = identity.signer()
        self._key_b64 = base64.b64encode(identity.public_key).decode("ascii")
        self._store = store
        self._peers = tuple(p for p in peers if p.push or subscribed is not None)
        self._settings = peering_settings
        self.events = events or PeerEvents()
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._counters = {p.name: _PeerCounters() for p in self._peers}
        self._wakeups = {p.name: trio.Event() for p in self._peers}
        # Set by the store's commit hook: new reports to look at (one event per tail).
        self._new_reports = {p.name: trio.Event() for p in self._peers}
        # The body encoding per peer: CBOR (docs/peers.md), JSON once a peer's inbox refused
        # CBOR (415, or 400 from an inbox that reads only JSON), for the rest of the run.
        self._encoding = {p.name: peering.CBOR for p in self._peers}
        self.tail_poll_s = TAIL_POLL_S
        self.idle_max_s = IDLE_MAX_S
        self.wakeups = 0  # commit notifications received (statistics, tests)
        self.pruned_removed = 0  # pending rows of removed peers deleted at start

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        now_ms = self._now_ms()
        for peer in self._peers:
            await trio.to_thread.run_sync(
                functools.partial(
                    peer_store.ensure_peer,
                    self._store,
                    peer.key,
                    name=peer.name,
                    url=peer.url,
                    now_ms=now_ms,
                )
            )
        # Rows for a peer no longer pushed to (removed from the configuration) would wait for
        # ever and count in the outbox depth: they go, counted and said.
        self.pruned_removed = await trio.to_thread.run_sync(
            outbox.prune_unserved_peer_rows, self._store, [inbox_url(p) for p in self._peers]
        )
        if self.pruned_removed:
            log.warning(
                "peers.outbox_pruned rows=%d why=no_configured_peer_has_their_url",
                self.pruned_removed,
            )
        token = trio.lowlevel.current_trio_token()

        def notify() -> None:  # any thread: the store's committing one
            try:
                token.run_sync_soon(self._wake_tails)
            except trio.RunFinishedError:
                pass

        undo = self._store.on_new_reports(notify) if self._peers else None
        try:
            async with trio.open_nursery() as nursery:
                for peer in self._peers:
                    nursery.start_soon(self._guarded, self._tail, peer)
                    nursery.start_soon(self._guarded, self._deliver, peer)
                task_status.started()
        finally:
            if undo is not None:
                undo()

    def _wake_tails(self) -> None:
        self.wakeups += 1
        for event in self._new_reports.values():
            event.set()

    async def _guarded(
        self, fn: Callable[[PeerSettings], Awaitable[None]], peer: PeerSettings
    ) -> None:
        """A peer's task, restarted after any failure (a store outage, a bug): one peer's
        trouble never ends the service, and never another peer's task."""
        import httpx

        delay = RETRY_BASE_S
        while True:
            try:
                await fn(peer)
            except (StoreError, httpx.HTTPError, OSError, ValueError) as exc:
                log.warning("peers.push_task_failed peer=%s error=%s", peer.name, exc)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_CAP_S)

    # -- store -> outbox ------------------------------------------------------------------------

    async def _tail(self, peer: PeerSettings) -> None:
        while True:
            # A fresh event before the read: a commit that lands while we read wakes us again.
            woken = self._new_reports[peer.name] = trio.Event()
            before = self._counters[peer.name].enqueued
            more = await trio.to_thread.run_sync(self._tail_step, peer)
            if self._counters[peer.name].enqueued != before:
                self._wakeups[peer.name].set()
            if more:
                await trio.sleep(0)
                continue
            with trio.move_on_after(self.tail_poll_s):
                await woken.wait()
            if woken.is_set():
                await trio.sleep(TAIL_GATHER_S)

    def _tail_step(self, peer: PeerSettings) -> bool:
        """Enqueue one page after the push cursor; True if there may be more right away."""
        row = peer_store.get_peer(self._store, peer.key)
        cursor = 0 if row is None else row.push_cursor
        if not peer.push and (
            self._subscribed is None
            or (self._subscribes is not None and not self._subscribes(peer.key))
        ):
            return self._skip_unsubscribed(peer, cursor)
        page, next_cursor = self._store.reports_after(cursor, TAIL_PAGE_REPORTS)
        if not page and next_cursor == cursor:
            return False
        arrivals = self._store.arrivals([r.report_id for r in page])
        counters = self._counters[peer.name]
        url = inbox_url(peer)
        now_ms = self._now_ms()
        chosen: list[StoredReport] = []
        for r in page:
            reason = self._skip(peer, r, {a.channel for a in arrivals.get(r.report_id, ())})
            if reason is None:
                chosen.append(r)
            else:
                counters.skipped[reason] += 1
        # Id and bytes only: decoding each stored report again cost most of a tail step.
        planned = [outbox.Planned(outbox.Queued(r.report_id, r.cose), url, now_ms) for r in chosen]
        with self._store.transaction("queueing reports for a peer", write=True) as conn:
            result = outbox.enqueue_planned_in(
                conn,
                self._store,
                planned,
                now_ms=now_ms,
                max_pending_per_url=PEER_OUTBOX_MAX_PENDING,
                max_pending=OUTBOX_MAX_PENDING,
                kind=outbox.KIND_PEER,
            )
            shed = sum(result.outbox_full.values())
            if shed:
                # Rows are admitted in order until a cap is reached: the last `shed` did not
                # fit. Stop the cursor just before the first of them; it is read again later.
                next_cursor = chosen[len(chosen) - shed].seq - 1
            peer_store.advance_push_cursor_in(
                conn, peer.key, next_cursor, now_ms=now_ms, reports_out=0
            )
        counters.enqueued += result.new
        if shed:
            counters.outbox_full += shed
            return False
        return len(page) == TAIL_PAGE_REPORTS

    def _skip_unsubscribed(self, peer: PeerSettings, cursor: int) -> bool:
        """Move a peer's cursor past every report stored so far, none of which it is sent (it
        is not pushed to and holds no subscription): counted ``not_subscribed``, not read."""
        last = self._store.last_seq()
        if last <= cursor:
            return False
        # Asked again after the number is read: a subscription accepted since the first
        # question may cover reports up to it (they are read one by one, the next step).
        subscribes = self._subscribes if self._subscribed is not None else None
        if subscribes is not None and subscribes(peer.key):
            return True
        t = _REPORTS
        count = select(func.count()).where(t.c.seq > cursor, t.c.seq <= last)
        with self._store.transaction("skipping reports for a peer", write=True) as conn:
            skipped = int(conn.execute(count).scalar_one())
            peer_store.advance_push_cursor_in(conn, peer.key, last, now_ms=self._now_ms())
        self._counters[peer.name].skipped["not_subscribed"] += skipped
        return False

    def _skip(self, peer: PeerSettings, r: StoredReport, channels: set[str]) -> str | None:
        if peer.channel in channels:
            return "echo"
        if r.observer_key == peer.key:
            return "own"
        if r.hops + 1 > self._settings.hop_limit:
            return "hop_limit"
        if not peer.push and (self._subscribed is None or not self._subscribed(peer.key, r)):
            return "not_subscribed"
        return None

    # -- outbox -> peer -----------------------------------------------------------------------

    async def _deliver(self, peer: PeerSettings) -> None:
        url = inbox_url(peer)
        budget = peering.Budget(
            reports_per_s=peer.out_reports_per_s,
            reports_burst=peer.out_reports_burst,
            bytes_per_s=peer.out_bytes_per_s,
            bytes_burst=peer.out_bytes_burst,
            now=trio.current_time(),
        )
        # Tokens: POSTs in flight. Rows are leased when claimed, so the next claim takes the
        # next rows; each POST's answer settles its own rows (by id), whatever the order the
        # answers come back in.
        flight = trio.CapacityLimiter(MAX_POSTS_IN_FLIGHT)
        async with _client() as client, trio.open_nursery() as posts:
            while True:
                wait = budget.wait_s(trio.current_time())
                if wait > 0:
                    await trio.sleep(wait)  # over budget: the rows wait in the outbox
                    continue
                token = object()
                await flight.acquire_on_behalf_of(token)
                try:
                    room_reports, _room_bytes = budget.room(trio.current_time())
                    limit = max(1, min(BATCH_REPORTS, room_reports))
                    now_ms = self._now_ms()
                    batches = await trio.to_thread.run_sync(
                        functools.partial(
                            outbox.claim_batches,
                            self._store,
                            now_ms=now_ms,
                            lease_ms=int(LEASE_S * 1000),
                            max_urls=1,
                            max_reports=limit,
                            kind=outbox.KIND_PEER,
                            url=url,
                        )
                    )
                    if batches:
                        rows = batches[0]
                        encoding = self._encoding[peer.name]
                        sent, body = await trio.to_thread.run_sync(self._body, rows, encoding)
                        budget.charge(len(sent), len(body), trio.current_time())
                except BaseException:
                    flight.release_on_behalf_of(token)
                    raise
                if not batches:
                    flight.release_on_behalf_of(token)
                    await self._idle(peer, url)
                    continue
                posts.start_soon(
                    self._post_in_flight, flight, token, client, peer, url, sent, body, encoding
                )

    async def _post_in_flight(
        self,
        flight: trio.CapacityLimiter,
        token: object,
        client: httpx.AsyncClient,
        peer: PeerSettings,
        url: str,
        rows: list[outbox.OutboxEntry],
        body: bytes,
        encoding: str,
    ) -> None:
        """One POST of the delivery's; its slot is free again once its outcome is written."""
        try:
            delivered = await self._post(
                client, peer, url, rows, body, self._counters[peer.name], encoding
            )
            flight.total_tokens = MAX_POSTS_IN_FLIGHT if delivered else 1
        finally:
            flight.release_on_behalf_of(token)
        if not delivered:
            self._wake_delivery(peer)

    def _wake_delivery(self, peer: PeerSettings) -> None:
        """An idle delivery looks at the outbox again (rows a POST gave back may be due)."""
        self._wakeups[peer.name].set()

    async def _idle(self, peer: PeerSettings, url: str) -> None:
        # The event first: a tail step that queues rows while we look wakes us all the same.
        event = self._wakeups[peer.name] = trio.Event()
        now_ms = self._now_ms()
        due = await trio.to_thread.run_sync(
            functools.partial(
                outbox.next_due_ms, self._store, now_ms=now_ms, kind=outbox.KIND_PEER, url=url
            )
        )
        cap = self.idle_max_s
        wait = cap if due is None else min(cap, max(0.0, (due - now_ms) / 1000))
        with trio.move_on_after(wait):
            await event.wait()

    def _body(
        self, rows: list[outbox.OutboxEntry], encoding: str = peering.CBOR
    ) -> tuple[list[outbox.OutboxEntry], bytes]:
        """The rows that fit one body, and the body (rows over the byte cap go back)."""
        hops = self._hops([r.report_id for r in rows])
        sent: list[outbox.OutboxEntry] = []
        size = len(b'{"reports":[]}')
        for r in rows:
            item = peering.inbox_item_bytes(len(r.cose), encoding)
            if sent and size + item > BATCH_BYTES:
                break
            sent.append(r)
            size += item
        rest = rows[len(sent) :]
        if rest:
            outbox.release_many(
                self._store, [r.id for r in rest], now_ms=self._now_ms(), next_attempt_ms=0
            )
        # A report pruned meanwhile is still sent (the row holds its bytes) as one hop.
        items = [(r.cose, min(peering.MAX_HOPS, hops.get(r.report_id, 0) + 1)) for r in sent]
        return sent, peering.encode_inbox(items, content_type=encoding)

    def _hops(self, report_ids: Iterable[str]) -> dict[str, int]:
        t = _REPORTS
        stmt = select(t.c.id, t.c.hops).where(t.c.id.in_(sorted(set(report_ids))))
        with self._store.transaction("reading hop counts", write=False) as conn:
            return {str(i): int(h) for i, h in conn.execute(stmt)}

    async def _post(
        self,
        client: httpx.AsyncClient,
        peer: PeerSettings,
        url: str,
        rows: list[outbox.OutboxEntry],
        body: bytes,
        counters: _PeerCounters,
        encoding: str = peering.CBOR,
    ) -> bool:
        """POST one batch and record its outcome; True when the peer took it (2xx)."""
        import httpx

        msg_id = peering.message_id(body, peer.key)  # names the recipient: not replayable elsewhere
        # The signature covers the body bytes whatever their encoding.
        headers = wh.sign(msg_id, int(self._wall_clock()), body, self._signer)
        headers[peering.HEADER_PEER] = self._key_b64
        headers["content-type"] = encoding
        status: int | None = None
        retry_after: float | None = None
        answer_body = b""
        error = ""
        sent_at = trio.current_time()
        try:
            with trio.fail_after(TOTAL_TIMEOUT_S):
                request = client.build_request("POST", url, content=body, headers=headers)
                response = await client.send(request, stream=True)
                try:
                    status = response.status_code
                    retry_after = parse_retry_after(
                        response.headers.get("retry-after"), now=self._wall_clock()
                    )
                    answer_body, _cut = await read_raw_capped(response, peering.MAX_ANSWER_BYTES)
                finally:
                    await response.aclose()
                counters.rtt.add(trio.current_time() - sent_at)
        except trio.TooSlowError:
            error = f"no answer within {TOTAL_TIMEOUT_S:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:200]
        now_ms = self._now_ms()
        ids = [r.id for r in rows]
        outcome = "network" if status is None else classify(status)
        if status is not None and outcome == DELIVERED:
            if await trio.to_thread.run_sync(self._delivered, peer, rows, answer_body, now_ms):
                counters.attempts[outcome] = counters.attempts.get(outcome, 0) + 1
                return True
            # A 2xx whose answer does not parse: what the peer kept is unknown, so it is a
            # failure (retried with backoff; what it did store comes back as duplicates).
            outcome = UNREADABLE
        counters.attempts[outcome] = counters.attempts.get(outcome, 0) + 1
        if outcome == UNREADABLE:
            error = f"HTTP {status}: an answer that is not an inbox answer"
        elif status is not None:
            error = f"HTTP {status}: " + answer_body[:200].decode("utf-8", "replace").strip()
        if outcome == SLOW_DOWN:
            wait_s = min(MAX_RETRY_AFTER_S, retry_after if retry_after is not None else 1.0)
            until = now_ms + int(wait_s * 1000)
            if status == 429:
                self.events.note(peer.name, "over_budget")

            def hold() -> None:
                outbox.hold_endpoint(self._store, url, now_ms=now_ms, until_ms=until)
                outbox.release_many(self._store, ids, now_ms=now_ms, next_attempt_ms=until)

            await trio.to_thread.run_sync(hold)
            return False
        if encoding == peering.CBOR and status in (400, 415):
            # An inbox that does not read CBOR (an older node: 400, "not UTF-8 JSON"): the
            # same rows again at once, as JSON, without spending their attempt.
            log.info("peers.push_json peer=%s status=%d", peer.name, status)
            self._encoding[peer.name] = peering.CONTENT_TYPE
            await trio.to_thread.run_sync(
                functools.partial(
                    outbox.release_many, self._store, ids, now_ms=now_ms, next_attempt_ms=now_ms
                )
            )
            return False
        if status in (400, 413, 415):
            outcomes = [outbox.RowOutcome(i, outbox.DEAD, error, status) for i in ids]
        else:
            attempt = max(r.attempts for r in rows)
            delay = backoff_s(attempt, base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S, rng=self._rng)
            at = now_ms + int(delay * 1000)
            outcomes = [outbox.RowOutcome(i, outbox.PENDING, error, status, at) for i in ids]

        def fail() -> None:
            outbox.finish_many(self._store, outcomes, now_ms=now_ms)
            peer_store.record_error(self._store, peer.key, error or "failed", now_ms=now_ms)

        await trio.to_thread.run_sync(fail)
        return False

    def _delivered(
        self, peer: PeerSettings, rows: list[outbox.OutboxEntry], answer: bytes, now_ms: int
    ) -> bool:
        """Record a 2xx answer; False (nothing written) when the answer does not parse."""
        counters = self._counters[peer.name]
        try:
            parsed = peering.decode_answer(answer, sent=len(rows))
        except peering.InboxDecodeError:
            self.events.note(peer.name, "malformed")
            return False
        refused = dict(parsed.refused)
        ok = [r.id for i, r in enumerate(rows) if i not in refused]
        # One commit for the whole answer: the rows delivered, the refused ones dead, the
        # peer's counters and contact (four transactions per POST were half the sender's
        # write time during a catch-up).
        with self._store.transaction("recording a peer delivery", write=True) as conn:
            outbox.mark_delivered_in(conn, ok, now_ms=now_ms, status=200)
            if refused:
                outbox.finish_in(
                    conn,
                    [
                        outbox.RowOutcome(
                            rows[i].id, outbox.DEAD, f"refused by the peer: {why}", 200
                        )
                        for i, why in refused.items()
                    ],
                    now_ms=now_ms,
                )
            peer_store.add_counts_in(conn, peer.key, now_ms=now_ms, reports_out=parsed.accepted)
            peer_store.record_contact_in(conn, peer.key, now_ms=now_ms)
        counters.delivered += parsed.accepted
        counters.duplicates += parsed.duplicates
        counters.refused += len(refused)
        if rows:
            counters.age.add((now_ms - min(r.created_ms for r in rows)) / 1000)
        return True

    def statistics(self) -> PeerPushStatistics:
        peers = {
            name: {
                "enqueued": c.enqueued,
                "delivered": c.delivered,
                "duplicates": c.duplicates,
                "refused": c.refused,
                "outbox_full": c.outbox_full,
            }
            for name, c in self._counters.items()
        }
        skipped = {
            (name, reason): n
            for name, c in self._counters.items()
            for reason, n in c.skipped.items()
        }
        attempts = {
            (name, outcome): n
            for name, c in self._counters.items()
            for outcome, n in c.attempts.items()
        }
        return PeerPushStatistics(
            peers=peers,
            skipped=skipped,
            attempts=attempts,
            pruned_removed=self.pruned_removed,
            rtt={name: c.rtt.summary() for name, c in self._counters.items()},
            age={name: c.age.summary() for name, c in self._counters.items()},
        )


class PeerCollector(Collector):
    """The peers' counters for Prometheus (docs/daemon.md "What the metrics say")."""

    def __init__(self, push: PeerPush | None, inbox: PeerInbox | None, events: PeerEvents) -> None:
        self._push, self._inbox, self._events = push, inbox, events

    def collect(self) -> Iterable[Metric]:
        return list(peer_metrics(self._push, self._inbox, self._events))


def peer_metrics(
    push: PeerPush | None, inbox: PeerInbox | None, events: PeerEvents
) -> Iterable[Metric]:
    if push is not None:
        s = push.statistics()
        for what, doc in (
            ("enqueued", "Reports queued in the outbox for a peer"),
            ("delivered", "Reports a peer stored as new from our pushes"),
            ("duplicates", "Reports pushed that a peer already held"),
            ("refused", "Reports a peer refused (by index in its answer)"),
            ("outbox_full", "Reports held back from a peer's full outbox (tried again later)"),
        ):
            m = CounterMetricFamily(f"overflowd_peer_push_{what}", doc, labels=["peer"])
            for name, counts in sorted(s.peers.items()):
                m.add_metric([name], counts[what])
            yield m
        m = CounterMetricFamily(
            "overflowd_peer_push_skipped",
            "Reports not forwarded to a peer (echo, own, hop_limit)",
            labels=["peer", "reason"],
        )
        for (name, reason), n in sorted(s.skipped.items()):
            m.add_metric([name, reason], n)
        yield m
        m = CounterMetricFamily(
            "overflowd_peer_push_posts", "Inbox POSTs by outcome", labels=["peer", "outcome"]
        )
        for (name, outcome), n in sorted(s.attempts.items()):
            m.add_metric([name, outcome], n)
        yield m
        yield from latency_metrics(
            "overflowd_peer_push_rtt_seconds",
            "Inbox POST round trips (sent to answer read), of the peer's last POSTs",
            s.rtt,
        )
        yield from latency_metrics(
            "overflowd_peer_push_age_seconds",
            "Reports' age at the peer's 2xx (queued here to delivered), of its last POSTs",
            s.age,
        )
        m = CounterMetricFamily(
            "overflowd_peer_push_pruned",
            "Pending outbox rows of peers removed from the configuration, deleted at start",
        )
        m.add_metric([], s.pruned_removed)
        yield m
    if inbox is not None:
        st = inbox.statistics()
        m = CounterMetricFamily("overflowd_peer_inbox_requests", "Inbox requests received")
        m.add_metric([], st.requests)
        yield m
        m = CounterMetricFamily(
            "overflowd_peer_inbox_reports",
            "Inbox reports stored (accepted) or already held (duplicate)",
            labels=["outcome"],
        )
        m.add_metric(["accepted"], st.accepted)
        m.add_metric(["duplicate"], st.duplicates)
        yield m
        m = CounterMetricFamily(
            "overflowd_peer_inbox_refused", "Inbox reports refused, by reason", labels=["reason"]
        )
        for reason in peering.ITEM_REASONS:
            m.add_metric([reason], st.refused.get(reason, 0))
        yield m
        m = CounterMetricFamily(
            "overflowd_peer_inbox_rejected",
            "Whole inbox requests refused, by status",
            labels=["status"],
        )
        for status, n in sorted(st.rejected.items()):
            m.add_metric([str(status)], n)
        yield m
    m = CounterMetricFamily(
        "overflowd_peer_events", "What peers did wrong, by peer and event", labels=["peer", "event"]
    )
    for (name, event), n in sorted(events.statistics().items()):
        m.add_metric([name, event], n)
    yield m


__all__ = ["PeerCollector", "PeerPush", "PeerPushStatistics", "inbox_url", "peer_metrics"]
