"""In-band delivery on trio: send report datagrams to a flow's ends, and receive them.

:class:`InbandSender` sends each report as one datagram (:mod:`overflowd.wire.datagram`) to
UDP port 65535 of the flow's source and destination, but only where the confinement and the
budgets (:mod:`overflowd.notify`) allow it. With the default settings (no allowed prefixes)
it sends nothing at all: an operator opts in to the Internet with ``0.0.0.0/0`` and ``::/0``.

:class:`InbandListener` takes such datagrams on a UDP port. It checks the envelope, refuses a
report id it has seen (before spending a signature check on it), verifies, refuses stale
reports, labels the observer's trust through an injected ``trust_of`` hook, and hands the
report to a bounded channel that a writer drains into the store in batches. It never sends a
single byte back: an answer to a spoofable datagram would make the node an amplifier.

Nothing before the store waits for the network. The ``label`` hook (the trust book alone:
pinned, continuity, unknown) runs in a small pool of labeller tasks between that channel and
the store writer; trust that needs DNS (a lookup for the sender's address) is the ``relabel``
hook, asked *after* the report is stored, by relabel workers fed from a bounded
:class:`RelabelQueue` (fair per sender /24 or /48, a priority lane for pairs DNS vouched for
before), and written with ``Store.update_trust``. Spoofed senders whose reverse zones never
answer can only fill that queue; when it is full their reports keep their first label
(counted), and an established observer's reports are stored at once whatever strangers do.

Each datagram, each label and each relabel is a boundary: an unexpected exception from one is
logged (rate-limited, with the sender), counted by type (``errors``), and costs that datagram
or report only.

Neither class reads ``InbandSettings.enabled``: the daemon decides whether to start them.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import trio

from overflowd import report as rpt
from overflowd.errors import DecodeError, SignatureError, StoreError
from overflowd.identity import verify_report
from overflowd.notify import (
    DEFAULT_PORT,
    DROP_REASONS,
    Address,
    Budget,
    BudgetStatistics,
    InbandSettings,
    plan_inband,
)
from overflowd.services.storing import PersistentWrite
from overflowd.store import Store
from overflowd.trust import TrustLevel, network_of
from overflowd.wire import datagram
from overflowd.wire.reader import WireDecodeError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PORT",
    "LISTENER_DROP_REASONS",
    "SEND_DROP_REASONS",
    "InbandListener",
    "InbandListenerStatistics",
    "InbandReceived",
    "InbandSender",
    "InbandSenderStatistics",
    "InbandSettings",
    "RelabelQueue",
    "RelabelStatistics",
    "TrustLabeller",
    "TrustRelabeller",
]


#: Why the listener refused a datagram; statistics count each one.
LISTENER_DROP_REASONS = (
    "oversize",  # longer than 1200 bytes
    "bad_magic",  # not an overflowd datagram
    "truncated",  # the magic, or less, and nothing after it
    "malformed",  # the report inside does not parse (truncated, altered, not canonical...)
    "forged",  # well-formed, but the signature does not verify
    "duplicate",  # a report id seen recently (a replay, or the same report twice)
    "stale",  # made longer ago than max_age_s
    "future",  # made more than max_future_s from now
    "queue_full",  # verified, but the store writer is behind
    "storage",  # verified, but over a storage budget (the admission hook says which)
)


# ---------------------------------------------------------------------------------------------
# Sender

#: ``sendto(data, (host, port))``, injectable so tests can count without sockets.
SendTo = Callable[[bytes, tuple[str, int]], Awaitable[None]]


@dataclass(frozen=True)
class InbandSenderStatistics:
    reports: int  # reports planned
    queue_dropped: int  # submitted while the queue was full
    datagrams_sent: int
    bytes_sent: int
    send_errors: int  # the OS refused (no route, firewall, no IPv6...)
    budget: BudgetStatistics  # drops by reason, confinement included
    #: What this sender did not send, by reason (:data:`SEND_DROP_REASONS`): the plan's
    #: refusals of its own reports only, whoever else shares the budget (one per target), plus
    #: ``shed`` (a report submitted while the queue was full: up to two datagrams unsent) and
    #: ``send_error`` (the OS refused one datagram).
    dropped: Mapping[str, int] = field(default_factory=dict)


#: Why the sender did not send a datagram: the plan's reasons (:data:`notify.DROP_REASONS`),
#: then ``shed`` (the sender's queue was full) and ``send_error`` (the OS refused it).
SEND_DROP_REASONS = (*DROP_REASONS, "shed", "send_error")

#: How often a stopping node looks whether the sender's queue has emptied.
IDLE_POLL_S = 0.01
#: Reports the sender takes from its queue per wake-up and sends back to back, with no trio
#: checkpoint between them unless a socket's buffer is full: one scheduling round trip per
#: batch instead of per report (~5 us each), and the datagrams of a batch leave together.
#: Bounded so that a full queue still lets other tasks run every this many reports.
SEND_BATCH = 64
#: Target addresses whose text form (what sendto takes) the sender keeps; emptied when full.
TARGET_NAMES = 4_096


class InbandSender:
    """Send report datagrams to flows' ends, within confinement and budget.

    Reports come in through :meth:`submit` (never blocks; for the daemon's report hook) and
    are sent by :meth:`run`, or are sent at once by :meth:`send_report`.
    """

    def __init__(
        self,
        settings: InbandSettings | None = None,
        budget: Budget | None = None,
        *,
        sendto: SendTo | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.settings = settings or InbandSettings()
        self.budget = budget or Budget()
        self.confinement = self.settings.confinement()
        self._injected = sendto
        self._clock = clock
        self._sockets: dict[int, socket.socket] = {}
        self._queue_send, self._queue_recv = trio.open_memory_channel[rpt.SignedReport](
            self.settings.queue_reports
        )
        self._reports = 0
        # Reports submit() queued, and those run() is done with: the difference is what is
        # still to send, including one handed straight to run() waiting in receive() (it is
        # then in no buffer yet).
        self._queued = 0
        self._done = 0
        self._batch: deque[rpt.SignedReport] = deque()
        self._names: dict[Address, str] = {}
        self._queue_dropped = 0
        self._sent = 0
        self._bytes = 0
        self._errors = 0
        self._dropped = dict.fromkeys(SEND_DROP_REASONS, 0)

    async def wait_idle(self) -> None:
        """Return once every submitted report has been sent (or refused by the plan)."""
        while self._queued != self._done:
            await trio.sleep(IDLE_POLL_S)

    def unsent(self) -> int:
        """Reports submitted and not yet sent: in the queue, in the batch in hand, in flight
        (what a stop leaves unsent)."""
        return self._queued - self._done

    def submit(self, report: rpt.SignedReport) -> bool:
        """Queue ``report`` for :meth:`run`; False (and counted) when the queue is full."""
        try:
            self._queue_send.send_nowait(report)
        except trio.WouldBlock:
            self._queue_dropped += 1
            self._dropped["shed"] += 1
            return False
        self._queued += 1
        return True

    async def run(
        self, *, task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open one socket per family, report their local addresses, send what is submitted."""
        bound: list[tuple[str, int]] = []
        try:
            for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                # Plain non-blocking sockets: a datagram is sent with one system call, and trio
                # is only asked to wait when the socket buffer is full (a trio sendto costs
                # ~40 us of checkpoints per datagram, more than making the report's envelope).
                try:
                    sock = socket.socket(family, socket.SOCK_DGRAM)
                except OSError as exc:  # no IPv6 in this kernel / namespace
                    log.info("inband.sender_no_socket family=%s error=%s", family.name, exc)
                    continue
                sock.setblocking(False)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind((any_addr, 0))
                except OSError as exc:
                    sock.close()
                    log.info("inband.sender_no_socket family=%s error=%s", family.name, exc)
                    continue
                self._sockets[4 if family == socket.AF_INET else 6] = sock
                name = sock.getsockname()
                bound.append((name[0], name[1]))
            task_status.started(bound)
            # The channel stays open when run() ends, so a late submit() is a counted drop,
            # never an exception in the caller's task.
            # A batch taken from the queue stays on this object: if run() is cancelled inside
            # it (a full socket), the report in flight is lost (as when one was taken at a
            # time) but the rest are sent by the next run(), and unsent()/wait_idle agree.
            receive, receive_nowait = self._queue_recv.receive, self._queue_recv.receive_nowait
            batch = self._batch
            while True:
                if not batch:
                    batch.append(await receive())
                    while len(batch) < SEND_BATCH:
                        try:
                            batch.append(receive_nowait())
                        except trio.WouldBlock:
                            break
                while batch:
                    report = batch.popleft()
                    try:
                        await self.send_report(report)  # no checkpoint unless a socket is full
                    finally:
                        self._done += 1
        finally:
            for sock in self._sockets.values():
                sock.close()
            self._sockets.clear()

    async def send_report(self, report: rpt.SignedReport) -> int:
        """Send ``report`` to whichever of its flow's ends the plan allows; how many were sent."""
        self._reports += 1
        # The budget may be shared (webhooks, other senders): what this plan refused is the
        # difference of its counters across the call (synchronous: nothing runs in between).
        before = self.budget.drop_counts()
        targets = plan_inband(report, self.budget, self._clock(), self.confinement)
        if len(targets) < 2:
            after = self.budget.drop_counts()
            for reason, b, a in zip(DROP_REASONS, before, after, strict=True):
                self._dropped[reason] += a - b
        if not targets:
            return 0
        data = datagram.to_wire(report.cose)
        sent = 0
        for address in targets:
            try:
                if not self._send_now(data, address):  # the socket is full, or injected
                    await self._sendto(data, address)
            except OSError as exc:
                self._errors += 1
                self._dropped["send_error"] += 1
                log.debug("inband.send_failed target=%s error=%s", address, exc)
                continue
            sent += 1
            self._sent += 1
            self._bytes += len(data)
        return sent

    def _target(self, address: Address) -> tuple[str, int]:
        names = self._names
        name = names.get(address)
        if name is None:
            if len(names) >= TARGET_NAMES:
                names.clear()
            name = names[address] = str(address)
        return name, self.settings.port

    def _send_now(self, data: bytes, address: Address) -> bool:
        """Send without a coroutine when the socket takes it: True if sent, False if the
        socket buffer is full (or the send function is injected): then :meth:`_sendto`."""
        sock = self._sockets.get(address.version)
        if sock is None or self._injected is not None:
            return False
        try:
            sock.sendto(data, self._target(address))
        except BlockingIOError:
            return False
        return True

    async def _sendto(self, data: bytes, address: Address) -> None:
        target = self._target(address)
        if self._injected is not None:
            await self._injected(data, target)
            return
        sock = self._sockets.get(address.version)
        if sock is None:
            raise OSError(f"no IPv{address.version} socket (is run() started?)")
        while True:
            try:
                sock.sendto(data, target)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(sock)

    def statistics(self) -> InbandSenderStatistics:
        return InbandSenderStatistics(
            reports=self._reports,
            queue_dropped=self._queue_dropped,
            datagrams_sent=self._sent,
            bytes_sent=self._bytes,
            send_errors=self._errors,
            budget=self.budget.statistics(),
            dropped=MappingProxyType(dict(self._dropped)),
        )


# ---------------------------------------------------------------------------------------------
# Listener


@dataclass(frozen=True)
class InbandReceived:
    """A verified report as it arrived: who sent the datagram, when, and the observer's trust."""

    report: rpt.SignedReport
    trust: str
    sender: str
    received_ms: int
    #: ``trust`` is provisional: once stored, the report waits for a relabel (DNS)
    relabel: bool = False


#: ``admit(key, sender, cose_bytes, now_s) -> None | reason`` (overflowd.storage_policy).
StorageAdmission = Callable[[bytes, str, int, float], str | None]
#: ``refund(key, sender, cose_bytes)``: an admitted report that was not stored after all.
StorageRefund = Callable[[bytes, str, int], None]



def _network(sender: str) -> str:
    """The /24 or /48 stored with a report, for the storage budgets per sender network."""
    try:
        return network_of(sender)
    except ValueError:
        return ""


#: ``label(report, sender) -> trust label``: awaited by the labellers before the report is
#: stored; must not wait for the network (the trust book alone: pinned, continuity, unknown).
TrustLabeller = Callable[[rpt.SignedReport, str], Awaitable[str]]
#: ``relabel(report, sender) -> trust label``: awaited after the report is stored; may ask DNS.
TrustRelabeller = Callable[[rpt.SignedReport, str], Awaitable[str]]
#: ``wants_relabel(report, sender, label) -> bool``: sync and cheap; is a relabel worth asking?
RelabelWanted = Callable[[rpt.SignedReport, str, str], bool]

#: Reports labelled at once. The label comes from the trust book and never waits for the
#: network; the workers only overlap the short waits of storing an observer event.
LABEL_WORKERS = 16
#: Longest one label or relabel may take; past it the report keeps the label it had (counted).
LABEL_TIMEOUT_S = 10.0
#: Relabels (DNS lookups) at once. With the registry's 2 s question timeout and failures
#: cached, 16 workers get through ≥ 8 new senders a second behind dead zones, and bound the
#: questions a flood of valid reports from many spoofed senders can cause.
RELABEL_WORKERS = 16
#: Stored reports waiting for a relabel, all senders together (each ~2 KB with its parsed
#: payload). When full, a report keeps its first label: DNS is skipped, counted ``backlog``.
RELABEL_REPORTS = 2_048
#: ... of which at most this many from one /24 or /48 (outside the priority lane, below): one
#: prefix of spoofed senders cannot fill the queue, it takes at least 16.
RELABEL_PREFIX_SHARE = 128
#: A report that waited longer than this is not looked up any more (counted ``stale``): under a
#: backlog, workers skip old entries rather than fall further behind on dead lookups.
RELABEL_MAX_WAIT_S = 60.0
#: (key, /24 or /48) pairs whose relabel changed their label before (DNS vouched for them): their
#: reports go to the priority lane, ahead of strangers and outside the per-prefix share. Only a
#: key published at its sender's reverse zone gets there; about 100 B each.
PROVEN_PAIRS = 4_096
_DNS = str(TrustLevel.DNS)
_RANKS = {str(level): int(level) for level in TrustLevel}


def _label_rank(label: str | None) -> int:
    """Trust labels by strength (``TrustLevel``); anything else ranks below ``unknown``, so
    that a hook's stray answer never replaces a real label."""
    return _RANKS.get(label or "", -1)


#: At most one warning about an unexpected exception per this many seconds (all are counted).
ERROR_LOG_INTERVAL_S = 10.0

#: Why a stored report kept its first label instead of being relabelled; statistics count each.
RELABEL_SKIP_REASONS = (
    "backlog",  # the relabel queue was full
    "prefix_share",  # its sender's /24 or /48 already had RELABEL_PREFIX_SHARE waiting
    "evicted",  # pushed out of a full queue by a report in the priority lane
    "stale",  # waited longer than RELABEL_MAX_WAIT_S
    "not_stored",  # the store write failed: there is nothing to relabel
    "timeout",  # the relabel took longer than label_timeout_s
    "error",  # the relabel hook or the store update failed
    "stopped",  # still waiting when the listener stopped
)


@dataclass
class RelabelEntry:
    """Reports of one key from one sender address, waiting for one relabel (one DNS lookup)."""

    key: bytes
    sender: str
    prefix: str
    priority: bool
    queued_at: float
    items: list[InbandReceived]


class RelabelQueue:
    """Stored reports waiting for DNS, bounded and fair per sender prefix (sans-IO).

    Reports of the same key from the same sender share one entry and one lookup. Two lanes:
    *priority* for pairs proven before (see :data:`PROVEN_PAIRS`), served first, bounded only
    by the total, and allowed to push the newest stranger entry out of a full queue; and the
    others, first in first out, each /24 or /48 holding at most ``prefix_share`` reports.
    Nothing here waits or reads a clock: ``now`` is an argument.
    """

    def __init__(
        self,
        max_reports: int = RELABEL_REPORTS,
        prefix_share: int = RELABEL_PREFIX_SHARE,
        max_wait_s: float = RELABEL_MAX_WAIT_S,
    ) -> None:
        if max_reports < 1 or prefix_share < 1 or max_wait_s <= 0:
            raise ValueError("max_reports >= 1, prefix_share >= 1 and max_wait_s > 0")
        self.max_reports = max_reports
        self.prefix_share = prefix_share
        self.max_wait_s = max_wait_s
        self._queued: dict[tuple[bytes, str], RelabelEntry] = {}
        self._priority: deque[RelabelEntry] = deque()
        self._others: deque[RelabelEntry] = deque()
        self._per_prefix: Counter[str] = Counter()  # reports waiting in the others' lane
        self._reports = 0

    def __len__(self) -> int:
        """Reports waiting."""
        return self._reports

    def prefix_waiting(self, prefix: str) -> int:
        return self._per_prefix[prefix]

    def offer(
        self, received: InbandReceived, prefix: str, *, priority: bool, now: float
    ) -> tuple[str | None, list[InbandReceived]]:
        """Queue ``received``: (None, pushed out) if queued, else (the reason, [])."""
        evicted: list[InbandReceived] = []
        pair = (received.report.observer_key, received.sender)
        entry = self._queued.get(pair)
        lane_priority = entry.priority if entry is not None else priority
        if not lane_priority and self._per_prefix[prefix] >= self.prefix_share:
            return "prefix_share", []
        if self._reports >= self.max_reports:
            if not lane_priority or not self._others:
                return "backlog", []
            victim = self._others.pop()  # the newest stranger entry: the oldest are nearly done
            self._drop(victim)
            evicted = victim.items
            if victim is entry:
                entry, lane_priority = None, priority
        if entry is None:
            entry = RelabelEntry(pair[0], pair[1], prefix, lane_priority, now, [])
            self._queued[pair] = entry
            (self._priority if lane_priority else self._others).append(entry)
        entry.items.append(received)
        self._reports += 1
        if not entry.priority:
            self._per_prefix[prefix] += 1
        return None, evicted

    def take(self, now: float) -> tuple[RelabelEntry | None, list[RelabelEntry]]:
        """The next entry to relabel (priority lane first), and those it found stale."""
        stale: list[RelabelEntry] = []
        for lane in (self._priority, self._others):
            while lane:
                entry = lane.popleft()
                self._drop(entry)
                if now - entry.queued_at > self.max_wait_s:
                    stale.append(entry)
                    continue
                return entry, stale
        return None, stale

    def clear(self) -> list[RelabelEntry]:
        """Everything still waiting (the listener stops)."""
        entries = [*self._priority, *self._others]
        self._priority.clear()
        self._others.clear()
        self._queued.clear()
        self._per_prefix.clear()
        self._reports = 0
        return entries

    def _drop(self, entry: RelabelEntry) -> None:
        del self._queued[(entry.key, entry.sender)]
        self._reports -= len(entry.items)
        if not entry.priority:
            self._per_prefix[entry.prefix] -= len(entry.items)
            if self._per_prefix[entry.prefix] <= 0:
                del self._per_prefix[entry.prefix]


@dataclass(frozen=True)
class RelabelStatistics:
    queued: int = 0  # stored reports queued for a relabel
    waiting: int = 0  # ... still waiting now
    relabelled: Mapping[str, int] = field(default_factory=dict)  # stored label changed, by new
    unchanged: int = 0  # looked up, the label stayed
    #: of ``unchanged``, reports whose relabel answered a weaker label than the stored one (a
    #: lookup that failed or found nothing, a key forgotten by the book since): kept, never
    #: lowered
    not_lowered: int = 0
    skipped: Mapping[str, int] = field(default_factory=dict)  # see RELABEL_SKIP_REASONS
    priority: int = 0  # reports queued in the priority lane
    proven_pairs: int = 0


@dataclass(frozen=True)
class InbandListenerStatistics:
    datagrams: int
    accepted: int  # verified and queued for the store
    stored: int  # new in the store
    already_stored: int  # the store had the id already (e.g. from a webhook or gossip)
    store_errors: int  # failed store writes (each tried again)
    dropped: Mapping[str, int]  # by reason, see LISTENER_DROP_REASONS
    trust: Mapping[str, int] = field(default_factory=dict)  # accepted reports by final label
    seen_ids: int = 0  # size of the de-duplication cache
    label_timeouts: int = 0  # labels and relabels that took longer than label_timeout_s
    #: unexpected exceptions caught at the per-datagram boundary, by exception type; each
    #: datagram (or report, in a labeller) was dropped and the listener went on
    errors: Mapping[str, int] = field(default_factory=dict)
    relabel: RelabelStatistics = field(default_factory=RelabelStatistics)
    store_retried: int = 0  # batches stored after at least one failed write
    #: accepted reports never stored: the drain deadline at stop cut their write's retries
    unstored_at_stop: int = 0


def unknown_trust(key: bytes) -> str:
    """Trust until the registry exists: every observer is ``unknown``."""
    return "unknown"


def _always(report: rpt.SignedReport, sender: str, label: str) -> bool:
    return True


#: A receive buffer one byte larger than the largest datagram, so oversize ones are seen as such.
_RECV_BYTES = datagram.MAX_DATAGRAM_BYTES + 1


class InbandListener:
    """Receive, verify, de-duplicate and store report datagrams. Never answers."""

    def __init__(
        self,
        settings: InbandSettings,
        store: Store,
        *,
        listen: tuple[str, int] | None = None,
        trust_of: Callable[[bytes], str] = unknown_trust,
        label: TrustLabeller | None = None,
        label_workers: int = LABEL_WORKERS,
        label_timeout_s: float = LABEL_TIMEOUT_S,
        relabel: TrustRelabeller | None = None,
        wants_relabel: RelabelWanted = _always,
        relabel_workers: int = RELABEL_WORKERS,
        relabel_queue: RelabelQueue | None = None,
        on_report: Callable[[InbandReceived], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
        admit: StorageAdmission | None = None,
        refund: StorageRefund | None = None,
    ) -> None:
        """``admit(key, sender, cose_bytes, now_s)`` is asked before a verified report is
        queued for the store (only when the queue has room); a reason (not None) refuses it,
        counted as ``storage``. ``refund(key, sender, cose_bytes)`` hands back an admitted
        report that was not stored after all: the store had it already, a labeller dropped it,
        or the drain deadline cut its write.

        ``trust_of`` labels at receive time (sync, cheap: pinned keys, the trust book).

        ``label``, when given, replaces that label before the report is stored; it runs in
        ``label_workers`` tasks, each label bounded by ``label_timeout_s``, and must not wait
        for the network. ``relabel`` (needs ``label``), when given, is asked after the report
        is stored, for reports ``wants_relabel`` picks: ``relabel_workers`` tasks take them
        from ``relabel_queue`` (bounded, fair per sender prefix) and write a changed label
        with ``Store.update_trust``. ``on_report`` and the ``trust`` counters see each
        report's final label: at once, or when its relabel is done or skipped.
        """
        if label_workers < 1 or label_timeout_s <= 0 or relabel_workers < 1:
            raise ValueError("label_workers >= 1, relabel_workers >= 1 and label_timeout_s > 0")
        if relabel is not None and label is None:
            raise ValueError("relabel needs label (the labeller stage that queues for it)")
        self.settings = settings
        self.listen = listen or settings.listen_address()
        self._store = store
        self._trust_of = trust_of
        self._label = label
        self._label_workers = label_workers
        self._label_timeout_s = label_timeout_s
        self._label_timeouts = 0
        self._relabel = relabel
        self._wants_relabel = wants_relabel
        self._relabel_workers = relabel_workers
        self._relabels = relabel_queue or RelabelQueue()
        self._relabel_lot = trio.lowlevel.ParkingLot()
        self._proven: OrderedDict[tuple[bytes, str], None] = OrderedDict()
        self._relabel_queued = 0
        self._relabel_priority = 0
        self._relabelled: Counter[str] = Counter()
        self._relabel_unchanged = 0
        self._relabel_not_lowered = 0
        self._relabel_skipped = dict.fromkeys(RELABEL_SKIP_REASONS, 0)
        self._on_report = on_report
        self._wall_clock = wall_clock
        self._admit = admit
        self._refund = refund
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._stop = trio.Event()
        self._datagrams = 0
        self._accepted = 0
        self._stored = 0
        self._already = 0
        # A failed write is tried again (overflowd.services.storing), as the node's own writer
        # does: a failing store delays received reports, never loses them; meanwhile the queue
        # fills and the receive loop drops, counted ``queue_full``.
        self._writer = PersistentWrite("inband.store_failed")
        self._relabel_store_errors = 0
        self._unstored_at_stop = 0
        self._dropped = dict.fromkeys(LISTENER_DROP_REASONS, 0)
        self._trust: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._errors_unlogged = 0
        self._last_error_log = -ERROR_LOG_INTERVAL_S

    def stop(self) -> None:
        """Stop receiving; what is queued reaches the store within ``drain_timeout_s``."""
        self._stop.set()

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        host, port = self.listen
        sock = await _bind(host, port)
        out, queue = trio.open_memory_channel[InbandReceived](self.settings.queue_reports)
        with sock:
            bound = sock.getsockname()
            log.info("inband.listening addr=%s port=%s", bound[0], bound[1])
            async with trio.open_nursery() as outer:
                # Relabels only improve labels already stored: they stop once the store writer
                # is done, and what still waits keeps its first label (counted "stopped").
                relabelling = trio.CancelScope()
                if self._relabel is not None:
                    outer.start_soon(self._run_relabellers, relabelling)
                if self._label is None:
                    outer.start_soon(self._store_writer_then, queue, relabelling)
                else:
                    # receive loop → queue → labellers → labelled → store writer → relabel
                    # queue. The second channel is small: when the store is slow, labellers
                    # wait, then the first channel fills and the receive loop drops (never
                    # waits). Nothing before the store waits for DNS.
                    labelled, to_store = trio.open_memory_channel[InbandReceived](
                        self.settings.store_batch
                    )
                    async with queue, labelled:
                        for _ in range(self._label_workers):
                            outer.start_soon(self._labeller, queue.clone(), labelled.clone())
                    outer.start_soon(self._store_writer_then, to_store, relabelling)
                with trio.CancelScope() as receiving:
                    async with trio.open_nursery() as inner:
                        inner.start_soon(self._receive_loop, sock, out)
                        task_status.started((bound[0], bound[1]))
                        await self._stop.wait()
                        receiving.cancel()
                # The receive loop closed its channel: the writer drains, then ends.
                outer.cancel_scope.deadline = trio.current_time() + self.settings.drain_timeout_s

    async def _receive_loop(
        self, sock: trio.socket.SocketType, out: trio.MemorySendChannel[InbandReceived]
    ) -> None:
        with out:
            while True:
                try:
                    data, addr = await sock.recvfrom(_RECV_BYTES)
                except (ConnectionRefusedError, ConnectionResetError):
                    continue  # an ICMP error queued on the socket: not a datagram, not fatal
                sender = addr[0]
                if sender.startswith("::ffff:"):
                    sender = sender[7:]
                # The per-datagram boundary: whatever one datagram makes go wrong (a bug in a
                # decoder or a hook) costs that datagram, never the listener.
                try:
                    self.handle_datagram(data, sender, out)
                except Exception as exc:
                    self._unexpected("receive", exc, sender)

    def handle_datagram(
        self, data: bytes, sender: str, out: trio.MemorySendChannel[InbandReceived]
    ) -> InbandReceived | str:
        """Check one datagram and queue its report; else count and return the drop reason."""
        self._datagrams += 1
        try:
            cose = datagram.from_wire(data, sender=sender)
        except WireDecodeError as exc:
            return self._drop(exc.code if exc.code in self._dropped else "malformed", sender)
        # Replays are refused before the (costly) signature check. Only verified reports enter
        # the cache, so forged bytes can never shadow a real report.
        rid = rpt.report_id(cose)
        if rid in self._seen:
            self._seen.move_to_end(rid)
            return self._drop("duplicate", sender)
        try:
            report = verify_report(cose)
        except SignatureError:
            return self._drop("forged", sender)
        except DecodeError:
            return self._drop("malformed", sender)
        now_ms = int(self._wall_clock() * 1000)
        if report.payload.time < now_ms - self.settings.max_age_s * 1000:
            return self._drop("stale", sender)
        if report.payload.time > now_ms + self.settings.max_future_s * 1000:
            return self._drop("future", sender)
        # Room first, admission second: a report dropped for a full queue must not use up its
        # key's, its network's or the pool's budget (nothing of it is stored). No checkpoint
        # lies between this test and send_nowait, so the room is still there.
        room = out.statistics()
        if room.current_buffer_used >= room.max_buffer_size and not room.tasks_waiting_receive:
            return self._drop("queue_full", sender)
        if self._admit is not None and self._admit(
            report.observer_key, sender, len(cose), now_ms / 1000
        ):
            return self._drop("storage", sender)
        received = InbandReceived(report, self._trust_of(report.observer_key), sender, now_ms)
        try:
            out.send_nowait(received)
        except trio.WouldBlock:  # not expected (see above); counted all the same
            self._refund_one(received)
            return self._drop("queue_full", sender)
        self._remember(rid)
        self._accepted += 1
        if self._label is None:
            self._labelled(received)
        return received

    def _labelled(self, received: InbandReceived) -> None:
        self._trust[received.trust] += 1
        if self._on_report is not None:
            self._on_report(received)

    async def _labeller(
        self,
        queue: trio.MemoryReceiveChannel[InbandReceived],
        out: trio.MemorySendChannel[InbandReceived],
    ) -> None:
        assert self._label is not None
        async with queue, out:
            async for received in queue:
                try:
                    received = await self._label_one(received)
                except Exception as exc:  # the per-report boundary: this report is dropped
                    self._unexpected("label", exc, received.sender)
                    self._refund_one(received)
                    continue
                await out.send(received)

    async def _label_one(self, received: InbandReceived) -> InbandReceived:
        assert self._label is not None
        label = received.trust  # trust_of's, if the label takes too long
        with trio.move_on_after(self._label_timeout_s) as scope:
            label = await self._label(received.report, received.sender)
        if scope.cancelled_caught:
            self._label_timeouts += 1
            log.debug("inband.label_timeout sender=%s", received.sender)
        wanted = self._relabel is not None and self._wants_relabel(
            received.report, received.sender, label
        )
        received = replace(received, trust=label, relabel=wanted)
        if not wanted:
            self._labelled(received)  # final: nothing better to ask
        return received

    # -- relabelling, after the store -----------------------------------------------------

    def _queue_relabels(self, batch: list[InbandReceived], *, stored: bool) -> None:
        """Hand the reports of a written batch that want a relabel to the relabel queue."""
        now = trio.current_time()
        woken = 0
        for received in batch:
            if not received.relabel:
                continue
            if not stored:
                self._skip([received], "not_stored")
                continue
            try:
                prefix = network_of(received.sender)
            except ValueError:
                prefix = received.sender
            key = received.report.observer_key
            priority = (key, prefix) in self._proven
            reason, evicted = self._relabels.offer(received, prefix, priority=priority, now=now)
            if evicted:
                self._skip(evicted, "evicted")
            if reason is not None:
                self._skip([received], reason)
                continue
            self._relabel_queued += 1
            self._relabel_priority += priority
            woken += 1
        if woken:
            self._relabel_lot.unpark(count=woken)

    async def _run_relabellers(self, scope: trio.CancelScope) -> None:
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    for _ in range(self._relabel_workers):
                        nursery.start_soon(self._relabeller)
        finally:
            for entry in self._relabels.clear():
                self._skip(entry.items, "stopped")

    async def _relabeller(self) -> None:
        while True:
            entry, stale = self._relabels.take(trio.current_time())
            for old in stale:
                self._skip(old.items, "stale")
            if entry is None:
                await self._relabel_lot.park()
                continue
            finished = False
            try:
                await self._relabel_entry(entry)
                finished = True
            except Exception as exc:  # the per-report boundary: the stored labels stand
                finished = True
                self._unexpected("relabel", exc, entry.sender)
                self._skip(entry.items, "error")
            finally:
                if not finished:  # cancelled: the listener stops, the stored labels stand
                    self._skip(entry.items, "stopped")

    async def _relabel_entry(self, entry: RelabelEntry) -> None:
        assert self._relabel is not None
        first = entry.items[0]
        with trio.move_on_after(self._label_timeout_s) as scope:
            label = await self._relabel(first.report, entry.sender)
        if scope.cancelled_caught:
            self._label_timeouts += 1
            log.debug("inband.relabel_timeout sender=%s", entry.sender)
            self._skip(entry.items, "timeout")
            return
        # A relabel only ever raises a stored label. What it answers below the stored one is no
        # evidence against it: the lookup failed or found nothing, and the book's own answer
        # may be weaker now only because it forgot the key (a flood of fresh keys) since.
        changes = {
            r.report.report_id: (r.trust, label)
            for r in entry.items
            if _label_rank(label) > _label_rank(r.trust)
        }
        self._relabel_not_lowered += sum(
            _label_rank(label) < _label_rank(r.trust) for r in entry.items
        )
        if changes:
            try:
                await trio.to_thread.run_sync(self._store.update_trust, changes)
            except StoreError as exc:
                self._relabel_store_errors += 1
                log.warning("inband.relabel_store_failed reports=%d error=%s", len(changes), exc)
                self._skip(entry.items, "error")
                return
            self._relabelled[label] += len(changes)
        if label == _DNS:
            # Only DNS vouching for the key at its sender's reverse zone earns the priority
            # lane; any other change (the book's continuity grew meanwhile) proves nothing
            # about this (key, prefix) pair.
            self._prove((entry.key, entry.prefix))
        self._relabel_unchanged += len(entry.items) - len(changes)
        for received in entry.items:
            final = label if received.report.report_id in changes else received.trust
            self._labelled(replace(received, trust=final, relabel=False))

    def _prove(self, pair: tuple[bytes, str]) -> None:
        proven = self._proven
        proven[pair] = None
        proven.move_to_end(pair)
        if len(proven) > PROVEN_PAIRS:
            proven.popitem(last=False)

    def _skip(self, items: list[InbandReceived], reason: str) -> None:
        self._relabel_skipped[reason] += len(items)
        for received in items:
            self._labelled(replace(received, relabel=False))  # the stored label is final

    # -- errors -----------------------------------------------------------------------------

    def _unexpected(self, stage: str, exc: Exception, sender: str) -> None:
        """Count an exception nothing expected, by type; warn at most every 10 s, with the
        sender and the traceback (it is a bug to fix); the caller drops what caused it."""
        self._errors[type(exc).__name__] += 1
        now = trio.current_time()
        if now - self._last_error_log < ERROR_LOG_INTERVAL_S:
            self._errors_unlogged += 1
            log.debug("inband.unexpected_error stage=%s sender=%s error=%r", stage, sender, exc)
            return
        self._last_error_log = now
        log.warning(
            "inband.unexpected_error stage=%s sender=%s error=%s: %s suppressed_since_last=%d",
            stage,
            sender,
            type(exc).__name__,
            exc,
            self._errors_unlogged,
            exc_info=exc,
        )
        self._errors_unlogged = 0

    def _drop(self, reason: str, sender: str) -> str:
        self._dropped[reason] += 1
        log.debug("inband.dropped reason=%s sender=%s", reason, sender)
        return reason

    def _refund_one(self, received: InbandReceived) -> None:
        """``received`` was admitted but will not be stored: its budget share is free again."""
        if self._refund is not None:
            report = received.report
            self._refund(report.observer_key, received.sender, len(report.cose))

    def _remember(self, rid: str) -> None:
        seen = self._seen
        seen[rid] = None
        if len(seen) > self.settings.seen_ids:
            seen.popitem(last=False)

    async def _store_writer_then(
        self, queue: trio.MemoryReceiveChannel[InbandReceived], relabelling: trio.CancelScope
    ) -> None:
        try:
            await self._store_writer(queue)
        finally:
            relabelling.cancel()

    async def _store_writer(self, queue: trio.MemoryReceiveChannel[InbandReceived]) -> None:
        async with queue:
            while True:
                try:
                    batch = [await queue.receive()]
                except trio.EndOfChannel:
                    return
                # Whatever queued up while the last write ran goes in this one.
                while len(batch) < self.settings.store_batch:
                    try:
                        batch.append(queue.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._write(batch)

    async def _write(self, batch: list[InbandReceived]) -> None:
        """Store ``batch``; a failed write is tried again with backoff for as long as it takes.

        Like the node's own writer: while a write fails (SQLite locked past its busy timeout,
        a full disk, a database restarting) the queue behind it fills and the receive loop
        drops, counted ``queue_full`` and not charged to any budget. Only the drain deadline
        at stop gives a batch up (counted ``unstored_at_stop``); its ids then leave the
        de-duplication cache and its admissions are refunded, so nothing holds them.
        """
        rows = [(r.report, r.received_ms, "udp") for r in batch]
        trust = {r.report.report_id: r.trust for r in batch}
        senders = {r.report.report_id: _network(r.sender) for r in batch}

        def write() -> set[str]:
            return self._store.add_new_reports(rows, trust=trust, senders=senders)

        try:
            new = await self._writer.write(write, reports=len(batch))
        except trio.Cancelled:
            self._unstored_at_stop += len(batch)
            for received in batch:
                self._seen.pop(received.report.report_id, None)
                self._refund_one(received)
            self._queue_relabels(batch, stored=False)
            raise
        self._stored += len(new)
        self._already += len(batch) - len(new)
        for received in batch:
            rid = received.report.report_id
            if rid in new:
                new.discard(rid)  # a report repeated within the batch is stored once
            else:
                self._refund_one(received)  # the store had it: it takes no new room
        self._queue_relabels(batch, stored=True)

    def statistics(self) -> InbandListenerStatistics:
        return InbandListenerStatistics(
            datagrams=self._datagrams,
            accepted=self._accepted,
            stored=self._stored,
            already_stored=self._already,
            store_errors=self._writer.errors + self._relabel_store_errors,
            store_retried=self._writer.retried,
            unstored_at_stop=self._unstored_at_stop,
            dropped=MappingProxyType(dict(self._dropped)),
            trust=MappingProxyType(dict(self._trust)),
            seen_ids=len(self._seen),
            label_timeouts=self._label_timeouts,
            errors=MappingProxyType(dict(self._errors)),
            relabel=RelabelStatistics(
                queued=self._relabel_queued,
                waiting=len(self._relabels),
                relabelled=MappingProxyType(dict(self._relabelled)),
                unchanged=self._relabel_unchanged,
                not_lowered=self._relabel_not_lowered,
                skipped=MappingProxyType(dict(self._relabel_skipped)),
                priority=self._relabel_priority,
                proven_pairs=len(self._proven),
            ),
        )


#: Receive buffer of the in-band listener's socket.
LISTENER_RCVBUF_BYTES = 4 * 1024 * 1024


async def _bind(host: str, port: int) -> trio.socket.SocketType:
    """A UDP socket bound to (host, port); "::" is dual-stack, falling back to IPv4 only."""
    requested = host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    except OSError:
        if host != "::":
            raise
        family, host = socket.AF_INET, "0.0.0.0"
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        # Reports arrive in bursts (a budget's worth at once); the kernel's default buffer
        # (~200 KiB of skb truesize) holds fewer than 100 of them. As root, force a larger one.
        try:
            sock.setsockopt(socket.SOL_SOCKET, 33, LISTENER_RCVBUF_BYTES)  # SO_RCVBUFFORCE
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTENER_RCVBUF_BYTES)
        await sock.bind((host, port))
    except OSError as exc:
        sock.close()
        exc.filename = f"{requested}:{port}"  # which socket: the CLI names its flag
        raise
    except BaseException:
        sock.close()
        raise
    return sock
