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

Trust that needs the network (a DNS lookup for the sender's address) is an injected async
``label`` hook, awaited by a small pool of labeller tasks between that channel and the store
writer, never by the receive loop: a slow or dead resolver fills the bounded channel, and the
receive loop goes on counting and dropping (``queue_full``) instead of waiting.

Neither class reads ``InbandSettings.enabled``: the daemon decides whether to start them.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import trio

from overflowd import report as rpt
from overflowd.errors import DecodeError, SignatureError, StoreError
from overflowd.identity import verify_report
from overflowd.notify import (
    DEFAULT_PORT,
    Address,
    Budget,
    BudgetStatistics,
    InbandSettings,
    plan_inband,
)
from overflowd.store import Store
from overflowd.wire import datagram
from overflowd.wire.reader import WireDecodeError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_PORT",
    "LISTENER_DROP_REASONS",
    "InbandListener",
    "InbandListenerStatistics",
    "InbandReceived",
    "InbandSender",
    "InbandSenderStatistics",
    "InbandSettings",
    "TrustLabeller",
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
        self._queue_dropped = 0
        self._sent = 0
        self._bytes = 0
        self._errors = 0

    def submit(self, report: rpt.SignedReport) -> bool:
        """Queue ``report`` for :meth:`run`; False (and counted) when the queue is full."""
        try:
            self._queue_send.send_nowait(report)
        except trio.WouldBlock:
            self._queue_dropped += 1
            return False
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
            while True:
                await self.send_report(await self._queue_recv.receive())
        finally:
            for sock in self._sockets.values():
                sock.close()
            self._sockets.clear()

    async def send_report(self, report: rpt.SignedReport) -> int:
        """Send ``report`` to whichever of its flow's ends the plan allows; how many were sent."""
        self._reports += 1
        targets = plan_inband(report, self.budget, self._clock(), self.confinement)
        if not targets:
            return 0
        data = datagram.to_wire(report.cose)
        sent = 0
        for address in targets:
            try:
                await self._sendto(data, address)
            except OSError as exc:
                self._errors += 1
                log.debug("inband.send_failed target=%s error=%s", address, exc)
                continue
            sent += 1
            self._sent += 1
            self._bytes += len(data)
        return sent

    async def _sendto(self, data: bytes, address: Address) -> None:
        target = (str(address), self.settings.port)
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


#: ``label(report, sender) -> trust label``: awaited off the receive path; may ask DNS.
TrustLabeller = Callable[[rpt.SignedReport, str], Awaitable[str]]

#: Reports labelled at once (each may wait for DNS). With the registry's 2 s question timeout
#: and the walk stopping at the first failure, 16 workers keep ≥ 8 reports/s from new senders
#: flowing through a dead resolver (failures are cached: one timeout per name, not per
#: report), and bound the DNS questions a flood of valid reports from many senders can cause.
LABEL_WORKERS = 16
#: Longest one label may take; past it the report keeps the ``trust_of`` label (counted).
LABEL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class InbandListenerStatistics:
    datagrams: int
    accepted: int  # verified and queued for the store
    stored: int  # new in the store
    already_stored: int  # the store had the id already (e.g. from a webhook or gossip)
    store_errors: int
    dropped: Mapping[str, int]  # by reason, see LISTENER_DROP_REASONS
    trust: Mapping[str, int] = field(default_factory=dict)  # accepted reports by trust label
    seen_ids: int = 0  # size of the de-duplication cache
    label_timeouts: int = 0  # labels that took longer than label_timeout_s


def unknown_trust(key: bytes) -> str:
    """Trust until the registry exists: every observer is ``unknown``."""
    return "unknown"


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
        on_report: Callable[[InbandReceived], None] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """``trust_of`` labels at receive time (sync, cheap: pinned keys, the trust book).

        ``label``, when given, replaces that label before the report is stored; it runs in
        ``label_workers`` tasks, each label bounded by ``label_timeout_s``. ``on_report`` and
        the ``trust`` counters see the final label.
        """
        if label_workers < 1 or label_timeout_s <= 0:
            raise ValueError("label_workers >= 1 and label_timeout_s > 0")
        self.settings = settings
        self.listen = listen or settings.listen_address()
        self._store = store
        self._trust_of = trust_of
        self._label = label
        self._label_workers = label_workers
        self._label_timeout_s = label_timeout_s
        self._label_timeouts = 0
        self._on_report = on_report
        self._wall_clock = wall_clock
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._stop = trio.Event()
        self._datagrams = 0
        self._accepted = 0
        self._stored = 0
        self._already = 0
        self._store_errors = 0
        self._dropped = dict.fromkeys(LISTENER_DROP_REASONS, 0)
        self._trust: Counter[str] = Counter()

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
                if self._label is None:
                    outer.start_soon(self._store_writer, queue)
                else:
                    # receive loop → queue → labellers → labelled → store writer. The second
                    # channel is small: when the store is slow, labellers wait, then the
                    # first channel fills and the receive loop drops (never waits).
                    labelled, to_store = trio.open_memory_channel[InbandReceived](
                        self.settings.store_batch
                    )
                    async with queue, labelled:
                        for _ in range(self._label_workers):
                            outer.start_soon(self._labeller, queue.clone(), labelled.clone())
                    outer.start_soon(self._store_writer, to_store)
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
                self.handle_datagram(data, sender, out)

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
        received = InbandReceived(report, self._trust_of(report.observer_key), sender, now_ms)
        try:
            out.send_nowait(received)
        except trio.WouldBlock:
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
                label = received.trust  # trust_of's, if the label takes too long
                with trio.move_on_after(self._label_timeout_s) as scope:
                    label = await self._label(received.report, received.sender)
                if scope.cancelled_caught:
                    self._label_timeouts += 1
                    log.debug("inband.label_timeout sender=%s", received.sender)
                received = replace(received, trust=label)
                self._labelled(received)
                await out.send(received)

    def _drop(self, reason: str, sender: str) -> str:
        self._dropped[reason] += 1
        log.debug("inband.dropped reason=%s sender=%s", reason, sender)
        return reason

    def _remember(self, rid: str) -> None:
        seen = self._seen
        seen[rid] = None
        if len(seen) > self.settings.seen_ids:
            seen.popitem(last=False)

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
        rows = [(r.report, r.received_ms, "udp") for r in batch]
        trust = {r.report.report_id: r.trust for r in batch}

        def write() -> int:
            return self._store.add_reports(rows, trust=trust)

        try:
            new = await trio.to_thread.run_sync(write)
        except StoreError as exc:
            self._store_errors += 1
            log.warning("inband.store_failed reports=%d error=%s", len(batch), exc)
            return
        self._stored += new
        self._already += len(batch) - new

    def statistics(self) -> InbandListenerStatistics:
        return InbandListenerStatistics(
            datagrams=self._datagrams,
            accepted=self._accepted,
            stored=self._stored,
            already_stored=self._already,
            store_errors=self._store_errors,
            dropped=MappingProxyType(dict(self._dropped)),
            trust=MappingProxyType(dict(self._trust)),
            seen_ids=len(self._seen),
            label_timeouts=self._label_timeouts,
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
