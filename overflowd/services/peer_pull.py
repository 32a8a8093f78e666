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
from typing import Any

import httpx
import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Connection

from overflowd import __version__
from overflowd import report as rpt
from overflowd.errors import DecodeError, SignatureError, StoreError
from overflowd.identity import verify_report
from overflowd.peers import TRUST_LEVELS, PeeringSettings, PeerSettings, fresh
from overflowd.services.peer_policy import PeerPolicy
from overflowd.services.webhook import read_raw_capped
from overflowd.store import peers as peer_store
from overflowd.store.repository import MAX_SEQ, Store

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


def parse_page(
    body: bytes, *, after: int, limit: int, now_ms: int, peering: PeeringSettings
) -> Page:
    """Check one ``/v1/reports`` answer; PageError when the page as a whole is unusable."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PageError("bad_json", "the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise PageError("bad_json", "the answer is not a JSON object")
    items, nxt = doc.get("reports"), doc.get("next")
    if not isinstance(items, list) or not isinstance(nxt, int) or isinstance(nxt, bool):
        raise PageError("bad_json", "the answer has no 'reports' list and integer 'next'")
    if len(items) > limit:
        raise PageError("bad_page", f"{len(items)} reports on a page of at most {limit}")
    if not after <= nxt <= MAX_SEQ:
        raise PageError("bad_page", f"next {nxt} is below our cursor {after} or out of range")
    full = len(items) == limit
    if full and nxt == after:
        # A full page that does not move the cursor would be asked for ever.
        raise PageError("bad_page", f"a full page whose next is our cursor {after}")
    dropped: Counter[str] = Counter()
    reports: list[rpt.SignedReport] = []
    for item in items:
        cose = _cose_of(item)
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
    return Page(reports=reports, next=nxt, listed=len(items), dropped=dropped, full=full)


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


ClientFactory = Callable[[PeeringSettings], httpx.AsyncClient]


def default_client(peering: PeeringSettings) -> httpx.AsyncClient:
    """Explicit timeouts, no redirects, no proxies from the environment, bodies as sent."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(peering.pull_timeout_s, connect=peering.pull_connect_timeout_s),
        follow_redirects=False,
        trust_env=False,
        headers={
            "user-agent": USER_AGENT,
            "accept": "application/json",
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
                for peer in self.peers:
                    n.start_soon(self._peer_loop, client, peer)
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

    def _ensure_rows(self, now_ms: int) -> dict[bytes, peer_store.PeerRow]:
        return {
            p.key: peer_store.ensure_peer(self._store, p.key, name=p.name, url=p.url, now_ms=now_ms)
            for p in self.peers
        }

    def _row(self, peer: PeerSettings) -> peer_store.PeerRow:
        row = peer_store.get_peer(self._store, peer.key)
        if row is None:
            row = peer_store.ensure_peer(
                self._store, peer.key, name=peer.name, url=peer.url, now_ms=self._now_ms()
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
        limit = self.peering.pull_page_reports
        # The durable cursor is the truth: read it at each round (one small read per round),
        # so a cursor reset by the operator or another process is taken up.
        try:
            row = await trio.to_thread.run_sync(self._row, peer)
        except StoreError as exc:
            await self._fail(peer, "store", str(exc))
            return False
        counters.cursor = row.pull_cursor
        for _ in range(self.peering.pull_max_pages):
            after = counters.cursor
            try:
                body = await self._get(client, peer, after, limit)
            except PageError as exc:
                if exc.kind == "reset" and after > 0:
                    try:
                        await self._reset(peer, str(exc))
                    except StoreError as store_exc:
                        await self._fail(peer, "store", str(store_exc))
                        return False
                    continue
                await self._fail(peer, "status" if exc.kind == "reset" else exc.kind, str(exc))
                return False
            now_ms = self._now_ms()
            try:
                page = await trio.to_thread.run_sync(
                    functools.partial(
                        parse_page,
                        body,
                        after=after,
                        limit=limit,
                        now_ms=now_ms,
                        peering=self.peering,
                    )
                )
            except PageError as exc:
                await self._fail(peer, exc.kind, str(exc))
                return False
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

    async def _get(
        self, client: httpx.AsyncClient, peer: PeerSettings, after: int, limit: int
    ) -> bytes:
        url = peer.endpoint("v1/reports")
        try:
            with trio.fail_after(self.peering.pull_timeout_s):
                response = await client.send(
                    client.build_request("GET", url, params={"after": after, "limit": limit}),
                    stream=True,
                )
                try:
                    status = response.status_code
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
        if cut:
            raise PageError(
                "too_large", f"a page over {self.peering.pull_max_body_bytes} bytes (cut)"
            )
        return body

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
                self._write, peer, page.next, admitted, trust, now_ms
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
    ) -> set[str]:
        """In a worker thread: the reports, the cursor (and the arrivals) in one transaction."""

        def alongside(conn: Connection) -> None:
            peer_store.advance_pull_cursor_in(conn, peer.key, cursor, now_ms=now_ms)
            if self._record_arrivals is not None:
                # report_arrivals: channel peer:<fingerprint> (wired where that table exists)
                self._record_arrivals(conn, reports, peer.channel, now_ms)

        if reports:
            rows = [(r, now_ms, "gossip") for r in reports]
            # Every report of the page is an arrival from this peer, one hop away (its API
            # does not say how many hops it had: one is the fewest it can have made).
            ids = [r.report_id for r in reports]
            new_ids = self._store.add_new_reports(
                rows,
                trust=trust,
                alongside=alongside,
                channels=dict.fromkeys(ids, peer.channel),
                hops=dict.fromkeys(ids, 1),
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
        label = self._trust_of(report.observer_key) if self._trust_of else "unknown"
        if report.observer_key == peer.key and _rank(peer.trust) > _rank(label):
            label = peer.trust
        return label

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

    # -- statistics -----------------------------------------------------------------------

    def statistics(self) -> PeerPullStatistics:
        out = {}
        for peer in self.peers:
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
            )
        return PeerPullStatistics(peers=out)


def _rank(level: str) -> int:
    return TRUST_LEVELS.index(level) if level in TRUST_LEVELS else 0


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
    return [reports, dropped, errors, pages, resets, cursor]


class PeerPullCollector(Collector):
    """Prometheus collector over :meth:`PeerPull.statistics` (read at scrape, no I/O)."""

    def __init__(self, snapshot: Callable[[], PeerPullStatistics]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return peer_pull_metrics(self._snapshot())
