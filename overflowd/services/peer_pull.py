"""Pulling reports from peers: on start and on a timer, from each peer's durable cursor.

Push (the peer-push service) carries news as it happens; pull is how a node catches up after
downtime, or after a peer's push gave up. For each configured peer with ``pull = true`` this
service runs its own task, so one slow or failing peer never delays another. A round asks
``GET {url}/v1/reports?after=CURSOR&limit=N`` page after page until a short page (the peer
has nothing more) or ``pull_max_pages``; then the task sleeps ``pull_interval_s`` (after a
failure ``pull_retry_s``, doubling up to the interval) and goes again.

Every page is the peer's words, read as an attacker's: its body is read raw and capped at
``pull_max_body_bytes`` within ``pull_timeout_s``; it must be one JSON object with a list of
at most ``limit`` reports and a ``next`` cursor not below ours. Each report's own COSE
signature is verified (the peer never vouches for a report, its observer does), and reports
made longer ago than ``max_report_age_s`` or dated ahead by more than ``max_future_s`` are
refused (the in-band listener's rule, :func:`overflowd.peers.fresh`). A bad report is counted
and dropped; a bad page is counted, ends the round, and is asked again next round.

Nothing twice, nothing missed: the page's new reports are stored ``via="gossip"`` and the
peer's cursor is moved to the page's ``next`` *in the same transaction*
(``Store.add_new_reports(..., alongside=...)``), so after a crash or a restart the node asks
from exactly where what it stored ends; a report seen again (it came by push, or from another
peer) is a duplicate the store's primary key refuses, counted. A ``409`` means our cursor is
beyond the peer's last report: its store was reset. The cursor goes back to 0, with a warning
and ``last_error`` saying so, and the round goes on from there (the store de-duplicates what
we already had).

It must never let one peer's answer block the event loop or another peer: parsing and
verifying a page runs in a worker thread, store writes too.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection

from overflowd import __version__, ssrf
from overflowd import report as rpt
from overflowd.errors import DecodeError, DeliveryError, SignatureError, StoreError
from overflowd.identity import verify_node_record, verify_report
from overflowd.peers import (
    MAX_NODE_RECORD_BYTES,
    MAX_PEER_RECORDS,
    TRUST_LEVELS,
    NodeRecordError,
    PeeringSettings,
    PeerListError,
    PeerSettings,
    fresh,
    learned_endpoint,
    learned_peer,
    parse_peer_list,
    relayed_trust,
)
from overflowd.services.peer_latency import EMPTY, LatencySummary, LatencyWindow, latency_metrics
from overflowd.services.peer_policy import PeerPolicy
from overflowd.services.webhook import read_raw_capped
from overflowd.store import events as event_store
from overflowd.store import peers as peer_store
from overflowd.store.repository import MAX_SEQ, Store
from overflowd.wire import peering as wire_peering

if TYPE_CHECKING:
    import httpx  # imported where a request is made: a node that pulls from no peer never loads it

log = logging.getLogger(__name__)

USER_AGENT = f"overflowd/{__version__} (peer pull)"
#: Why a pulled report was dropped (each counted per peer, listed at zero until it happens).
DROP_REASONS = (
    "forged",  # its signature does not verify
    "malformed",  # not a report (bad base64, bad COSE, field limits)
    "stale",  # made longer ago than peering.max_report_age_s
    "future",  # dated more than peering.max_future_s ahead
    "storage",  # refused by the storage budgets (docs/storage.md)
)
#: Why a page (a request) failed: the round ends, the next try waits ``pull_retry_s``.
ERROR_KINDS = (
    "connect",  # no connection, or it broke (httpx transport errors)
    "timeout",  # no whole answer within peering.pull_timeout_s
    "status",  # an answer other than 200 (and 409, a reset)
    "too_large",  # a body over peering.pull_max_body_bytes
    "bad_json",  # not JSON, or not the page object
    "bad_page",  # a page that breaks the paging contract (next below our cursor, too long)
    "store",  # our store refused the write (the page is asked again)
    "unexpected",  # a bug of ours in one round (logged with its traceback): the next goes on
)
#: What became of the node records read (a peer's own at /v1/identity, and those in the lists
#: configured peers serve at /v1/peers when peering.learn is on); each counted, summed.
RECORD_OUTCOMES = (
    "stored",  # a peer's own record, verified and kept for GET /v1/peers
    "learned",  # a new learned peer
    "known",  # a record of a peer we have (configured, learned, or ourselves)
    "forged",  # its signature does not verify
    "malformed",  # not a node record (bad base64, bad CBOR, field limits)
    "stale",  # signed longer ago than peers.MAX_RECORD_AGE_S, or dated ahead
    "wrong_key",  # a peer's /v1/identity record signed by a key not the peer's
    "bad_endpoint",  # names no http(s) endpoint
    "internal",  # its endpoint is an internal address (peering.learn_allow_private = false)
    "over_limit",  # peering.max_learned_peers reached
    "unavailable",  # /v1/identity or /v1/peers did not answer with a usable document
)
#: The most bytes read of one /v1/identity answer (a record is at most 4 kB; the rest is a
#: few short fields).
MAX_IDENTITY_BODY_BYTES = 64 * 1024
#: The most bytes read of one /v1/peers answer: MAX_PEER_RECORDS records of the largest size,
#: base64url in JSON, fit.
MAX_PEER_LIST_BODY_BYTES = MAX_PEER_RECORDS * (2 * MAX_NODE_RECORD_BYTES + 32) + 1024
#: At most one warning per peer per this long (every failure is counted).
WARN_INTERVAL_S = 60.0
#: The longest error text kept per peer (last_error in the store, the log line).
MAX_ERROR_CHARS = 300

#: ``record_arrivals(conn, reports, channel, now_ms)``: the report_arrivals hook (peer-push
#: owns the table); called in the page's transaction with every verified report of the page,
#: new or not, and the peer's channel ``peer:<fingerprint>``.
ArrivalsHook = Callable[[Connection, Sequence[rpt.SignedReport], str, int], None]
#: ``admit(key, sender, cose_bytes, now_s)`` -> refusal reason or None; ``refund(...)`` hands
#: back one admitted and not stored (the storage policy's, as the in-band listener uses them).
Admit = Callable[[bytes, str, int, float], str | None]
Refund = Callable[[bytes, str, int], None]


# -- one page, pure but for the signature checks -----------------------------------------------


class PageError(Exception):
    """A page we cannot use at all: ``kind`` is one of :data:`ERROR_KINDS`."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass(frozen=True)
class Page:
    """One checked page: the reports to store, the peer's next cursor, what was dropped."""

    reports: list[rpt.SignedReport]
    next: int
    #: how many reports the page listed (stored, duplicates and dropped together)
    listed: int
    dropped: Mapping[str, int]
    #: the page was full: ask again from ``next``
    full: bool
    #: report id -> hops on arrival here (the peer's count + 1; 1 when the peer gave none)
    hops: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RawPage:
    """A page read but not verified: its cursor is known, so the next page can be asked for
    while this one's reports are checked and stored (:meth:`PeerPull.pull_round`)."""

    #: (COSE bytes, or None for an entry that is not a report at all; the peer's hops)
    entries: list[tuple[bytes | None, int]]
    next: int
    listed: int
    full: bool


@dataclass
class _Fetch:
    """A page asked for from cursor ``after``: the answer (body, media type) or why not."""

    after: int
    answer: tuple[bytes, str] | None = None
    error: PageError | None = None
    done: trio.Event = field(default_factory=trio.Event)


def parse_page(
    body: bytes,
    *,
    after: int,
    limit: int,
    now_ms: int,
    peering: PeeringSettings,
    content_type: str = wire_peering.CONTENT_TYPE,
) -> Page:
    """Check one ``/v1/reports`` answer; PageError when the page as a whole is unusable.

    ``content_type`` is the answer's: the lean CBOR page (``seq``, ``cose``, ``hops``) or the
    JSON page people read (an older peer answers that whatever we accept)."""
    raw = read_page(body, after=after, limit=limit, content_type=content_type)
    return verify_page(raw, now_ms=now_ms, peering=peering)


def read_page(
    body: bytes, *, after: int, limit: int, content_type: str = wire_peering.CONTENT_TYPE
) -> RawPage:
    """The page's shape and cursor (the first half of :func:`parse_page`): PageError when
    the page as a whole is unusable."""
    entries: list[tuple[bytes | None, int]] = []  # (COSE bytes or None: malformed, hops)
    if content_type == wire_peering.CBOR:
        try:
            lean = wire_peering.decode_page(
                body, max_body_bytes=len(body), max_reports=max(limit, 1)
            )
        except wire_peering.InboxDecodeError as exc:
            kind = "bad_page" if "more than" in exc.reason else "bad_json"
            raise PageError(kind, exc.reason) from None
        nxt, listed = lean.next, lean.listed
        entries = [(i.cose, i.hops) for i in lean.items] + [(None, 0) for _ in lean.bad]
    else:
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise PageError("bad_json", "the answer is not JSON") from None
        if not isinstance(doc, dict):
            raise PageError("bad_json", "the answer is not a JSON object")
        items, json_next = doc.get("reports"), doc.get("next")
        if (
            not isinstance(items, list)
            or not isinstance(json_next, int)
            or isinstance(json_next, bool)
        ):
            raise PageError("bad_json", "the answer has no 'reports' list and integer 'next'")
        nxt = json_next
        if len(items) > limit:
            raise PageError("bad_page", f"{len(items)} reports on a page of at most {limit}")
        listed = len(items)
        entries = [(_cose_of(item), _hops_of(item)) for item in items]
    if not after <= nxt <= MAX_SEQ:
        raise PageError("bad_page", f"next {nxt} is below our cursor {after} or out of range")
    full = listed == limit
    if full and nxt == after:
        # A full page that does not move the cursor would be asked for ever.
        raise PageError("bad_page", f"a full page whose next is our cursor {after}")
    return RawPage(entries=entries, next=nxt, listed=listed, full=full)


def verify_page(raw: RawPage, *, now_ms: int, peering: PeeringSettings) -> Page:
    """Verify and date-check a read page's reports (the second half of :func:`parse_page`)."""
    entries, nxt, listed, full = raw.entries, raw.next, raw.listed, raw.full
    dropped: Counter[str] = Counter()
    reports: list[rpt.SignedReport] = []
    hops: dict[str, int] = {}
    # One worker-thread call verifies the whole page (no round trip per report); the caller
    # stores it in one transaction.
    for cose, peer_hops in entries:
        if cose is None:
            dropped["malformed"] += 1
            continue
        try:
            report = verify_report(cose)
        except SignatureError:
            dropped["forged"] += 1
            continue
        except (DecodeError, TypeError):
            dropped["malformed"] += 1
            continue
        why = fresh(
            report.payload.time,
            now_ms,
            max_age_s=peering.max_report_age_s,
            max_future_s=peering.max_future_s,
        )
        if why is not None:
            dropped[why] += 1
            continue
        reports.append(report)
        # One hop more than it had made to the peer (the fewest is kept if it came twice).
        hops[report.report_id] = min(wire_peering.MAX_HOPS, peer_hops + 1)
    return Page(reports=reports, next=nxt, listed=listed, dropped=dropped, full=full, hops=hops)


def _hops_of(item: Any) -> int:
    """The hops a JSON page entry says it made to the peer (0 when absent or not a count)."""
    hops = item.get("hops") if isinstance(item, dict) else None
    if isinstance(hops, int) and not isinstance(hops, bool) and 0 <= hops <= wire_peering.MAX_HOPS:
        return hops
    return 0


def _cose_of(item: Any) -> bytes | None:
    """The COSE bytes of one page entry (``{"report": {"cose": b64url, ...}, ...}``)."""
    inner = item.get("report") if isinstance(item, dict) else None
    cose = inner.get("cose") if isinstance(inner, dict) else None
    if not isinstance(cose, str) or len(cose) > 2 * rpt.MAX_REPORT_BYTES:
        return None
    try:
        return rpt.b64url_decode(cose)
    except ValueError:
        return None


# -- the service ------------------------------------------------------------------------------


@dataclass
class _PeerCounters:
    pulled: int = 0
    stored: int = 0
    duplicates: int = 0
    pages: int = 0
    rounds: int = 0
    resets: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    cursor: int = 0
    #: wall-clock ms of the last page read, 0 for none yet
    last_page_ms: int = 0
    next_warn: float = -math.inf
    #: page GET sent -> whole 200 answer read, of the last pages
    rtt: LatencyWindow = field(default_factory=LatencyWindow)


@dataclass(frozen=True)
class PeerPullPeerStatistics:
    name: str
    fingerprint: str
    cursor: int
    pulled: int
    stored: int
    duplicates: int
    pages: int
    rounds: int
    resets: int
    dropped: Mapping[str, int]
    errors: Mapping[str, int]
    last_page_ms: int
    #: the recent page round trips (GET sent -> 200 answer read)
    rtt: LatencySummary = EMPTY


@dataclass(frozen=True)
class PeerPullStatistics:
    """Counters since start, per peer (by name) and summed."""

    peers: Mapping[str, PeerPullPeerStatistics]

    @property
    def pulled(self) -> int:
        return sum(p.pulled for p in self.peers.values())

    @property
    def stored(self) -> int:
        return sum(p.stored for p in self.peers.values())

    @property
    def duplicates(self) -> int:
        return sum(p.duplicates for p in self.peers.values())

    @property
    def dropped(self) -> Mapping[str, int]:
        out: Counter[str] = Counter()
        for p in self.peers.values():
            out.update(p.dropped)
        return {r: out[r] for r in DROP_REASONS}

    @property
    def errors(self) -> Mapping[str, int]:
        out: Counter[str] = Counter()
        for p in self.peers.values():
            out.update(p.errors)
        return {k: out[k] for k in ERROR_KINDS}


ClientFactory = Callable[[PeeringSettings], "httpx.AsyncClient"]


def default_client(peering: PeeringSettings) -> httpx.AsyncClient:
    """Explicit timeouts, no redirects, no proxies from the environment, bodies as sent."""
    import httpx

    return httpx.AsyncClient(
        timeout=httpx.Timeout(peering.pull_timeout_s, connect=peering.pull_connect_timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers={
            "user-agent": USER_AGENT,
            # The lean CBOR page when the peer has it; its JSON page otherwise.
            "accept": f"{wire_peering.CBOR}, {wire_peering.CONTENT_TYPE};q=0.5",
            "accept-encoding": "identity",
        },
    )


class PeerPull:
    """Pull every ``pull = true`` peer, each in its own task, from its durable cursor."""

    def __init__(
        self,
        peers: Sequence[PeerSettings],
        peering: PeeringSettings,
        store: Store,
        *,
        trust_of: Callable[[bytes], str] | None = None,
        admit: Admit | None = None,
        refund: Refund | None = None,
        record_arrivals: ArrivalsHook | None = None,
        wall_clock: Callable[[], float] = time.time,
        client_factory: ClientFactory = default_client,
        policy: PeerPolicy | None = None,
        own_key: bytes | None = None,
        resolve: Callable[[str, int], Any] | None = None,
    ) -> None:
        """``trust_of(observer_key)`` is the node's trust for an observer (its trust book);
        a pulled report is labelled with the better of it and, for reports the peer itself
        observed, the peer's configured ``trust``."""
        self.peers = tuple(p for p in peers if p.pull)
        self.peering = peering
        self._store = store
        self._trust_of = trust_of
        self._admit = admit
        self._refund = refund
        self._record_arrivals = record_arrivals
        self._clock = wall_clock
        self._client_factory = client_factory
        # Scores and bans (docs/peers.md): a banned peer's rounds are skipped; forged and
        # malformed reports in its pages count against it (one event per page and kind).
        self._policy = policy
        self._counters = {p.name: _PeerCounters() for p in self.peers}
        self._wake = {p.name: trio.Event() for p in self.peers}
        self._cancel = trio.CancelScope()
        # Learned peers (docs/peers.md "Learned peers"), by key; their tasks join the nursery.
        self._own_key = own_key
        self._configured = {p.key for p in peers}
        self._learned: dict[bytes, PeerSettings] = {}
        self._records: Counter[str] = Counter()
        self._resolve = resolve if resolve is not None else _resolve
        self._allow: tuple[ssrf.Network, ...] = ()
        self._nursery: trio.Nursery | None = None
        self._client: httpx.AsyncClient | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ensure every peer's row, then pull each in its own task until :meth:`stop`."""
        now_ms = self._now_ms()
        try:
            # Rows first, so `overflowd-query peers` lists every peer from the start.
            rows = await trio.to_thread.run_sync(self._ensure_rows, now_ms)
        except StoreError as exc:  # each round reads (and makes) its row again: not fatal
            log.warning("peer_pull.rows_unstored error=%s", exc)
            rows = {}
        for peer in self.peers:
            if peer.key in rows:
                self._counters[peer.name].cursor = rows[peer.key].pull_cursor
        with self._cancel:
            async with self._client_factory(self.peering) as client, trio.open_nursery() as n:
                self._nursery, self._client = n, client
                for peer in self.peers:
                    n.start_soon(self._peer_loop, client, peer)
                if self.peering.learn:
                    try:
                        learned = await trio.to_thread.run_sync(self._learned_rows)
                    except StoreError as exc:
                        log.warning("peer_pull.learned_unread error=%s", exc)
                        learned = []
                    for row in learned:
                        self._start_learned(
                            learned_peer_of(row, self.peering.learned_pull_interval_s)
                        )
                task_status.started()
                await trio.sleep_forever()

    def stop(self) -> None:
        """Stop pulling: a page being stored is its own transaction, so nothing is half done."""
        self._cancel.cancel()

    def wake(self, name: str | None = None) -> None:
        """Start a round now (for one peer, or all) instead of at the next interval."""
        for peer_name, event in self._wake.items():
            if name is None or peer_name == name:
                event.set()

    def _learned_rows(self) -> list[peer_store.PeerRow]:
        rows = [r for r in peer_store.list_peers(self._store) if r.learned]
        return rows[: self.peering.max_learned_peers]

    def _start_learned(self, peer: PeerSettings) -> None:
        if peer.key in self._learned or peer.key in self._configured:
            return
        self._learned[peer.key] = peer
        self._counters[peer.name] = _PeerCounters()
        self._wake[peer.name] = trio.Event()
        assert self._nursery is not None and self._client is not None
        self._nursery.start_soon(self._peer_loop, self._client, peer)

    def _ensure_rows(self, now_ms: int) -> dict[bytes, peer_store.PeerRow]:
        return {
            p.key: peer_store.ensure_peer(self._store, p.key, name=p.name, url=p.url, now_ms=now_ms)
            for p in self.peers
        }

    def _row(self, peer: PeerSettings) -> peer_store.PeerRow:
        row = peer_store.get_peer(self._store, peer.key)
        if row is None:
            row = peer_store.ensure_peer(
                self._store,
                peer.key,
                name=peer.name,
                url=peer.url,
                now_ms=self._now_ms(),
                learned=peer.key in self._learned,
            )
        return row

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- one peer -------------------------------------------------------------------------

    async def _peer_loop(self, client: httpx.AsyncClient, peer: PeerSettings) -> None:
        retry = self.peering.pull_retry_s
        while True:
            # The per-peer boundary: whatever one round makes go wrong costs that round.
            try:
                ok = await self.pull_round(client, peer)
                if ok:
                    await self.record_round(client, peer)
            except Exception as exc:
                ok = False
                log.exception("peer_pull.unexpected peer=%s", peer.name)
                with trio.move_on_after(self.peering.pull_timeout_s):
                    await self._fail(peer, "unexpected", f"{type(exc).__name__}: {exc}")
            if ok:
                delay, retry = peer.pull_interval_s, self.peering.pull_retry_s
            else:
                delay, retry = (
                    min(retry, peer.pull_interval_s),
                    min(retry * 2, peer.pull_interval_s),
                )
            event = self._wake[peer.name]
            with trio.move_on_after(delay):
                await event.wait()
            self._wake[peer.name] = trio.Event()

    async def pull_round(self, client: httpx.AsyncClient, peer: PeerSettings) -> bool:
        """Pages from the cursor until a short one (or ``pull_max_pages``); False on a failure."""
        counters = self._counters[peer.name]
        if self._policy is not None and self._policy.banned(peer.key):
            self._policy.refused(peer.key, "pull")
            return True  # not a failure: the next round comes at the interval
        counters.rounds += 1
        # The durable cursor is the truth: read it at each round (one small read per round),
        # so a cursor reset by the operator or another process is taken up.
        try:
            row = await trio.to_thread.run_sync(self._row, peer)
        except StoreError as exc:
            await self._fail(peer, "store", str(exc))
            return False
        counters.cursor = row.pull_cursor
        # One page ahead at most: while a page is verified and stored, the next one (from the
        # cursor the page names) is being fetched. Leaving the round cancels a fetch ahead.
        async with trio.open_nursery() as ahead:
            try:
                return await self._pages(client, peer, ahead)
            finally:
                ahead.cancel_scope.cancel()

    async def _pages(
        self, client: httpx.AsyncClient, peer: PeerSettings, ahead: trio.Nursery
    ) -> bool:
        counters = self._counters[peer.name]
        limit = self.peering.pull_page_reports
        pending: _Fetch | None = None
        pages_left = self.peering.pull_max_pages
        while pages_left > 0:
            pages_left -= 1
            after = counters.cursor
            if pending is not None and pending.after == after:
                fetch = pending
            else:
                fetch = _Fetch(after)
                await self._fetch(fetch, client, peer, limit)
            pending = None
            await fetch.done.wait()
            if fetch.error is not None:
                exc = fetch.error
                if exc.kind == "reset" and after > 0:
                    try:
                        await self._reset(peer, str(exc))
                    except StoreError as store_exc:
                        await self._fail(peer, "store", str(store_exc))
                        return False
                    continue
                await self._fail(peer, "status" if exc.kind == "reset" else exc.kind, str(exc))
                return False
            assert fetch.answer is not None
            body, media = fetch.answer
            now_ms = self._now_ms()
            try:
                raw = await trio.to_thread.run_sync(
                    functools.partial(read_page, body, after=after, limit=limit, content_type=media)
                )
            except PageError as exc:
                await self._fail(peer, exc.kind, str(exc))
                return False
            del body  # the page ahead is the only other body held
            if raw.full and pages_left > 0:
                pending = _Fetch(raw.next)
                ahead.start_soon(self._fetch, pending, client, peer, limit)
            page = await trio.to_thread.run_sync(
                functools.partial(verify_page, raw, now_ms=now_ms, peering=self.peering)
            )
            try:
                new, dup, refused = await self._store_page(peer, page, now_ms)
            except StoreError as exc:
                await self._fail(peer, "store", str(exc))
                return False
            if self._policy is not None:
                for kind in ("forged", "malformed"):
                    if page.dropped.get(kind):
                        self._policy.note(peer.name, kind)
            counters.pages += 1
            counters.pulled += page.listed
            counters.stored += new
            counters.duplicates += dup
            counters.dropped.update(page.dropped)
            counters.dropped["storage"] += refused
            counters.cursor = page.next
            counters.last_page_ms = now_ms
            if new or page.dropped:
                log.debug(
                    "peer_pull.page peer=%s after=%d next=%d stored=%d duplicates=%d dropped=%d",
                    peer.name,
                    after,
                    page.next,
                    new,
                    dup,
                    sum(page.dropped.values()),
                )
            if not page.full:
                return True
        return True  # more to come: the next round goes on from the cursor

    async def _fetch(
        self, fetch: _Fetch, client: httpx.AsyncClient, peer: PeerSettings, limit: int
    ) -> None:
        """One page into ``fetch`` (its answer or its PageError), then ``fetch.done``."""
        try:
            fetch.answer = await self._get(client, peer, fetch.after, limit)
        except PageError as exc:
            fetch.error = exc
        finally:
            fetch.done.set()

    async def _get(
        self, client: httpx.AsyncClient, peer: PeerSettings, after: int, limit: int
    ) -> tuple[bytes, str]:
        try:
            return await self._get_once(client, peer, after, limit)
        except PageError as exc:
            if exc.kind != "connect":
                raise
        # Once more at once, on a new connection: the kept-alive one may have been closed by
        # the peer's idle timeout while this node verified and stored the last page (a race
        # that is no failure of the peer's). A second failure is one.
        return await self._get_once(client, peer, after, limit)

    async def _get_once(
        self, client: httpx.AsyncClient, peer: PeerSettings, after: int, limit: int
    ) -> tuple[bytes, str]:
        import httpx

        url = peer.endpoint("v1/reports")
        sent_at = trio.current_time()
        try:
            with trio.fail_after(self.peering.pull_timeout_s):
                response = await client.send(
                    client.build_request("GET", url, params={"after": after, "limit": limit}),
                    stream=True,
                )
                try:
                    status = response.status_code
                    media = response.headers.get("content-type", "").split(";", 1)[0]
                    body, cut = await read_raw_capped(response, self.peering.pull_max_body_bytes)
                finally:
                    await response.aclose()
        except trio.TooSlowError:
            raise PageError(
                "timeout", f"no whole answer within {self.peering.pull_timeout_s:g} s"
            ) from None
        except httpx.TimeoutException as exc:
            raise PageError("timeout", f"{type(exc).__name__}") from None
        except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            raise PageError("connect", f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]) from None
        if status == 409:
            raise PageError("reset", f"the peer answered 409 to after={after}: its store was reset")
        if status != 200:
            raise PageError("status", f"HTTP {status}")
        counters = self._counters.get(peer.name)
        if counters is not None:
            counters.rtt.add(trio.current_time() - sent_at)
        if cut:
            raise PageError(
                "too_large", f"a page over {self.peering.pull_max_body_bytes} bytes (cut)"
            )
        media = media.strip().lower()
        return body, wire_peering.CBOR if media == wire_peering.CBOR else wire_peering.CONTENT_TYPE

    async def _store_page(
        self, peer: PeerSettings, page: Page, now_ms: int
    ) -> tuple[int, int, int]:
        """Store the page's reports and move the cursor in one transaction: (new, duplicates,
        refused by the storage budgets).

        Admission and labels are decided here, in the event loop (the storage policy and the
        trust book are the loop's, shared with the in-band listener); the write in a thread.
        """
        sender = peer.channel  # not an address: the budgets count per key and in total
        admitted: list[rpt.SignedReport] = []
        refused = 0
        for report in page.reports:
            if self._admit is not None and self._admit(
                report.observer_key, sender, len(report.cose), now_ms / 1000
            ):
                refused += 1
                continue
            admitted.append(report)
        trust = {r.report_id: self._label(peer, r) for r in admitted}
        try:
            new_ids = await trio.to_thread.run_sync(
                self._write, peer, page.next, admitted, trust, now_ms, page.hops
            )
        except BaseException:
            self._refund_all(sender, admitted)
            raise
        self._refund_all(sender, [r for r in admitted if r.report_id not in new_ids])
        return len(new_ids), len(admitted) - len(new_ids), refused

    def _write(
        self,
        peer: PeerSettings,
        cursor: int,
        reports: list[rpt.SignedReport],
        trust: dict[str, str],
        now_ms: int,
        hops: Mapping[str, int] | None = None,
    ) -> set[str]:
        """In a worker thread: the reports, the cursor (and the arrivals) in one transaction."""

        def alongside(conn: Connection) -> None:
            peer_store.advance_pull_cursor_in(conn, peer.key, cursor, now_ms=now_ms)
            if self._record_arrivals is not None:
                # report_arrivals: channel peer:<fingerprint> (wired where that table exists)
                self._record_arrivals(conn, reports, peer.channel, now_ms)

        if reports:
            rows = [(r, now_ms, "gossip") for r in reports]
            # Every report of the page is an arrival from this peer, with one hop more than
            # the peer's own count (1 when its page gave none).
            ids = [r.report_id for r in reports]
            new_ids = self._store.add_new_reports(
                rows,
                trust=trust,
                alongside=alongside,
                channels=dict.fromkeys(ids, peer.channel),
                hops={i: (hops or {}).get(i, 1) for i in ids},
            )
        else:
            new_ids = set()
            with self._store.transaction("advancing a pull cursor", write=True) as conn:
                alongside(conn)
        # Counts are statistics, not the cursor: their own small write after the page's, and
        # a failure here must not make a stored page look unstored (the counters have it).
        try:
            peer_store.add_counts(
                self._store,
                peer.key,
                now_ms=now_ms,
                reports_in=len(new_ids),
                duplicates=len(reports) - len(new_ids),
            )
        except StoreError as exc:
            log.debug("peer_pull.counts_unstored peer=%s error=%s", peer.name, exc)
        return new_ids

    def _refund_all(self, sender: str, reports: Iterable[rpt.SignedReport]) -> None:
        if self._refund is None:
            return
        for r in reports:
            self._refund(r.observer_key, sender, len(r.cose))

    def _label(self, peer: PeerSettings, report: rpt.SignedReport) -> str:
        own = self._trust_of(report.observer_key) if self._trust_of else "unknown"
        return relayed_trust(peer, report.observer_key, own)

    async def _reset(self, peer: PeerSettings, why: str) -> None:
        counters = self._counters[peer.name]
        counters.resets += 1
        reason = f"{why}; pulling again from 0 (cursor was {counters.cursor})"
        log.warning("peer_pull.cursor_reset peer=%s %s", peer.name, reason)
        await trio.to_thread.run_sync(
            lambda: peer_store.reset_pull_cursor(
                self._store, peer.key, reason=reason, now_ms=self._now_ms()
            )
        )
        counters.cursor = 0

    async def _fail(self, peer: PeerSettings, kind: str, detail: str) -> None:
        counters = self._counters[peer.name]
        counters.errors[kind] += 1
        detail = " ".join(detail.split())[:MAX_ERROR_CHARS]
        now = trio.current_time()
        if now >= counters.next_warn:
            counters.next_warn = now + WARN_INTERVAL_S
            log.warning("peer_pull.failed peer=%s kind=%s error=%s", peer.name, kind, detail)
        now_ms = self._now_ms()
        try:
            await trio.to_thread.run_sync(
                lambda: peer_store.record_error(
                    self._store, peer.key, f"pull {kind}: {detail}", now_ms=now_ms
                )
            )
        except StoreError:
            pass  # the store is what failed; the counter and the log have it

    # -- node records and learned peers ---------------------------------------------------

    async def record_round(self, client: httpx.AsyncClient, peer: PeerSettings) -> None:
        """After a good round: keep the peer's own signed record (for GET /v1/peers) and, with
        ``peering.learn``, learn the peers a configured peer's list names. A failure here is
        counted and costs nothing else: the reports are what a round is for."""
        body = await self._get_doc(client, peer, "v1/identity", MAX_IDENTITY_BODY_BYTES)
        signed = _signed_of(body) if body is not None else None
        if signed is None:
            self._records["unavailable"] += 1
        else:
            now_ms = self._now_ms()
            try:
                record = verify_node_record(signed, now_ms=now_ms)
            except SignatureError:
                self._records["forged"] += 1
            except NodeRecordError as exc:
                self._records["stale" if "node record is" in str(exc) else "malformed"] += 1
            else:
                if record.key != peer.key:
                    self._records["wrong_key"] += 1
                else:
                    try:
                        await trio.to_thread.run_sync(
                            functools.partial(
                                peer_store.put_record,
                                self._store,
                                peer.key,
                                signed,
                                record_ms=record.time_ms,
                                now_ms=now_ms,
                            )
                        )
                        self._records["stored"] += 1
                    except StoreError as exc:
                        log.debug("peer_pull.record_unstored peer=%s error=%s", peer.name, exc)
        if self.peering.learn and peer.key in self._configured:
            await self._learn_from(client, peer)

    async def _learn_from(self, client: httpx.AsyncClient, peer: PeerSettings) -> None:
        body = await self._get_doc(client, peer, "v1/peers", MAX_PEER_LIST_BODY_BYTES)
        if body is None:
            self._records["unavailable"] += 1
            return
        try:
            items = await trio.to_thread.run_sync(parse_peer_list, body)
        except PeerListError as exc:
            self._records["unavailable"] += 1
            log.debug("peer_pull.bad_peer_list peer=%s error=%s", peer.name, exc)
            return
        for signed in items:
            outcome = await self._consider(peer, signed)
            self._records[outcome] += 1

    async def _consider(self, via: PeerSettings, signed: bytes | None) -> str:
        """One record of ``via``'s list: its outcome (one of RECORD_OUTCOMES)."""
        if signed is None:
            return "malformed"
        now_ms = self._now_ms()
        try:
            record = verify_node_record(signed, now_ms=now_ms)
        except SignatureError:
            return "forged"
        except NodeRecordError as exc:
            return "stale" if "node record is" in str(exc) else "malformed"
        if (
            record.key == self._own_key
            or record.key in self._configured
            or record.key in self._learned
        ):
            return "known"
        try:
            url = learned_endpoint(record.endpoint)
        except ValueError:
            return "bad_endpoint"
        if not self.peering.learn_allow_private and not await self._global(url):
            return "internal"
        if len(self._learned) >= self.peering.max_learned_peers:
            return "over_limit"
        peer = learned_peer(record, url, self.peering.learned_pull_interval_s)
        event = event_store.ObserverEvent(
            kind=event_store.NEW_PEER,
            key=record.key,
            old_contacts=(),
            new_contacts=record.contacts,
            pinned=False,
            at_ms=now_ms,
            sender=via.name,
            detail=f"learned from peer {via.name}: endpoint {url}, pulled at trust unknown",
        )

        def write() -> None:
            peer_store.ensure_peer(
                self._store, peer.key, name=peer.name, url=url, now_ms=now_ms, learned=True
            )
            peer_store.put_record(
                self._store, peer.key, signed, record_ms=record.time_ms, now_ms=now_ms
            )
            event_store.add_events(self._store, [event])

        try:
            await trio.to_thread.run_sync(write)
        except StoreError as exc:  # asked again next round
            log.debug("peer_pull.learned_unstored peer=%s error=%s", peer.name, exc)
            return "unavailable"
        log.warning(
            "peer_pull.learned peer=%s url=%s via=%s contacts=%s",
            peer.name,
            url,
            via.name,
            ",".join(record.contacts) or "-",
        )
        self._start_learned(peer)
        return "learned"

    async def _global(self, url: str) -> bool:
        """Every address the endpoint's host has is global (ssrf.py, as the webhook client)."""
        try:
            target = ssrf.parse_target(url, require_https=False)
            if target.literal is not None:
                ssrf.check_address(target.literal, self._allow)
            else:
                with trio.fail_after(self.peering.pull_connect_timeout_s):
                    addresses = await self._resolve(target.host, target.port)
                ssrf.check_addresses(addresses, self._allow)
        except (DeliveryError, OSError, trio.TooSlowError):
            return False
        return True

    async def _get_doc(
        self, client: httpx.AsyncClient, peer: PeerSettings, path: str, cap: int
    ) -> bytes | None:
        """One GET under the peer's base: the body of a 200 within the cap and timeout."""
        import httpx

        try:
            with trio.fail_after(self.peering.pull_timeout_s):
                response = await client.send(
                    client.build_request("GET", peer.endpoint(path)), stream=True
                )
                try:
                    status = response.status_code
                    body, cut = await read_raw_capped(response, cap)
                finally:
                    await response.aclose()
        except (trio.TooSlowError, httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
            log.debug("peer_pull.doc_failed peer=%s path=%s error=%s", peer.name, path, exc)
            return None
        return body if status == 200 and not cut else None

    def record_statistics(self) -> Mapping[str, int]:
        """Node records read since start, by outcome (RECORD_OUTCOMES), and learned peers."""
        return {o: self._records[o] for o in RECORD_OUTCOMES}

    @property
    def learned(self) -> Sequence[PeerSettings]:
        return tuple(self._learned.values())

    # -- statistics -----------------------------------------------------------------------

    def statistics(self) -> PeerPullStatistics:
        out = {}
        for peer in (*self.peers, *self._learned.values()):
            c = self._counters[peer.name]
            out[peer.name] = PeerPullPeerStatistics(
                name=peer.name,
                fingerprint=peer.fingerprint,
                cursor=c.cursor,
                pulled=c.pulled,
                stored=c.stored,
                duplicates=c.duplicates,
                pages=c.pages,
                rounds=c.rounds,
                resets=c.resets,
                dropped={r: c.dropped[r] for r in DROP_REASONS},
                errors={k: c.errors[k] for k in ERROR_KINDS},
                last_page_ms=c.last_page_ms,
                rtt=c.rtt.summary(),
            )
        return PeerPullStatistics(peers=out)


def learned_peer_of(row: peer_store.PeerRow, interval_s: float) -> PeerSettings:
    """A stored learned peer's settings (its row holds the endpoint it was learned with)."""
    return PeerSettings(
        name=row.name,
        url=row.url,
        key=row.key,
        trust=TRUST_LEVELS[0],
        push=False,
        pull=True,
        pull_interval_s=interval_s,
    )


def _signed_of(body: bytes) -> bytes | None:
    """The ``signed`` record of a /v1/identity answer, or None."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    text = doc.get("signed") if isinstance(doc, dict) else None
    if not isinstance(text, str) or len(text) > 2 * MAX_NODE_RECORD_BYTES:
        return None
    try:
        return rpt.b64url_decode(text)
    except ValueError:
        return None


async def _resolve(host: str, port: int) -> list[ssrf.Address]:
    import ipaddress

    infos = await trio.socket.getaddrinfo(host, port, type=trio.socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


# -- metrics ----------------------------------------------------------------------------------


def peer_pull_metrics(s: PeerPullStatistics) -> Iterable[Metric]:
    """The ``overflowd_peer_pull_*`` families (docs/daemon.md), one sample per peer name."""
    reports = CounterMetricFamily(
        "overflowd_peer_pull_reports",
        "Reports pulled from peers, by outcome",
        labels=["peer", "outcome"],
    )
    dropped = CounterMetricFamily(
        "overflowd_peer_pull_dropped",
        "Pulled reports dropped, by reason",
        labels=["peer", "reason"],
    )
    errors = CounterMetricFamily(
        "overflowd_peer_pull_errors", "Pull requests that failed, by kind", labels=["peer", "kind"]
    )
    pages = CounterMetricFamily("overflowd_peer_pull_pages", "Pages pulled", labels=["peer"])
    resets = CounterMetricFamily(
        "overflowd_peer_pull_resets",
        "Pull cursors reset to 0: the peer answered 409 (its store was reset)",
        labels=["peer"],
    )
    cursor = GaugeMetricFamily(
        "overflowd_peer_pull_cursor", "The peer's report number pulled up to", labels=["peer"]
    )
    for name, p in sorted(s.peers.items()):
        reports.add_metric([name, "stored"], p.stored)
        reports.add_metric([name, "duplicate"], p.duplicates)
        reports.add_metric([name, "dropped"], sum(p.dropped.values()))
        for reason, n in p.dropped.items():
            dropped.add_metric([name, reason], n)
        for kind, n in p.errors.items():
            errors.add_metric([name, kind], n)
        pages.add_metric([name], p.pages)
        resets.add_metric([name], p.resets)
        cursor.add_metric([name], p.cursor)
    rtt = latency_metrics(
        "overflowd_peer_pull_rtt_seconds",
        "Page round trips (GET sent to the whole 200 answer read), of the peer's last pages",
        {name: p.rtt for name, p in s.peers.items()},
    )
    return [reports, dropped, errors, pages, resets, cursor, *rtt]


def peer_record_metrics(records: Mapping[str, int], learned: int) -> Iterable[Metric]:
    """``overflowd_peer_records`` and ``overflowd_peer_learned`` (docs/daemon.md)."""
    outcomes = CounterMetricFamily(
        "overflowd_peer_records",
        "Signed node records read from peers (/v1/identity, /v1/peers), by outcome",
        labels=["outcome"],
    )
    for outcome, n in records.items():
        outcomes.add_metric([outcome], n)
    gauge = GaugeMetricFamily("overflowd_peer_learned", "Learned peers being pulled")
    gauge.add_metric([], learned)
    return [outcomes, gauge]


class PeerPullCollector(Collector):
    """Prometheus collector over :meth:`PeerPull.statistics` (read at scrape, no I/O)."""

    def __init__(
        self, snapshot: Callable[[], PeerPullStatistics], pull: PeerPull | None = None
    ) -> None:
        self._snapshot = snapshot
        self._pull = pull

    def collect(self) -> Iterable[Metric]:
        yield from peer_pull_metrics(self._snapshot())
        if self._pull is not None:
            yield from peer_record_metrics(self._pull.record_statistics(), len(self._pull.learned))
