"""Admission of received reports into the store: budgets per key, per sender network, in total.

Sans-IO: counts in, a verdict out; no database, no clock of its own (``now`` is an argument,
Unix seconds). The in-band listener asks :meth:`StoragePolicy.admit` for every verified report
before it queues it for the store, and hands back with :meth:`refund` what it admitted but did
not store (already in the store, cut at stop); the retention service
(:mod:`overflowd.services.retention`) seeds the counts from the store at start, tells the
policy what it pruned (:meth:`forget`), re-reads the totals after every pass (:meth:`resync`)
and switches the headroom state.

Why each budget exists (docs/storage.md has the defaults):

* **per observer key** — a valid signature costs an attacker nothing but a fresh key; no key
  may take more than ``received_max_reports_per_key`` rows.
* **per sender network** (/24, /48, as :func:`overflowd.trust.network_of` draws them) — one
  socket, or one misbehaving node, cannot fill the store with many *new* keys. Sources are
  spoofable, so this is not a bound on a determined attacker (the next two are), and it never
  refuses an established key: anyone can send "from" an established observer's network.
* **in total**, rows and bytes — the hard bound: whatever comes in, received reports never take
  more than ``received_max_bytes``.
* **new keys** — keys whose first stored report is younger than ``established_after_s``, or
  that have fewer than ``established_min_reports`` stored, share at most
  ``new_keys_max_fraction`` of the total, so a flood of throwaway keys fills its own pool and is
  refused there, while the observers we have heard from before keep being stored. A refused
  report leaves no entry, so a key's age starts with its first *stored* report; and age alone
  (one report, then a day's wait) does not establish a key.
* **headroom** — while the disk (or the configured database size) runs short, every received
  report is refused: our own reports and the webhook outbox need the room.

Memory is bounded: ``max_tracked_keys`` and ``max_tracked_senders`` entries, least recently
used forgotten first. Established keys and new keys live in separate tables, so a flood of new
keys can only push out other new keys; a key due for promotion while the established table is
full stays new (no established entry is ever evicted; one is freed when its last report is
pruned). A new key's rows that leave the table stay in the new-key
pool (as ``orphaned``) until they are pruned: forgetting a key must not free its pool share.

Expected outcomes are values: ``admit`` returns None (admitted, and counted) or the reason it
refused, one of :data:`REFUSAL_REASONS`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from overflowd.config import StorageSettings
from overflowd.trust import network_of

#: Bytes a stored report takes beyond its COSE bytes: the index columns (addresses, ports,
#: times, the 64-character id), the entries in its indexes, its arrivals row and its share of a
#: page. Measured on SQLite with 10,000 reports of 446 COSE bytes from one observer key: 592
#: bytes more a row at revision 0006, 995 once the query indexes (0007_query: one covering
#: who/top, one per filter) and the arrivals table (0007_arrivals) came; PostgreSQL takes
#: about 1,070 (bench/query.py prints both). The budgets count in these units, so they follow
#: what the database takes to within about 15%; headroom checks the real size.
ROW_OVERHEAD_BYTES = 1000

#: The largest report one datagram carries (1200 bytes less the 4-byte magic).
MAX_COSE_BYTES = 1196

#: Why a received report was refused.
REFUSAL_REASONS = (
    "headroom",  # the disk or the database size limit is short: own reports first
    "per_key",  # this observer key holds received_max_reports_per_key rows
    "per_sender",  # this sender network holds received_max_reports_per_sender rows
    "total_reports",  # received_max_reports rows are stored
    "total_bytes",  # received_max_bytes are stored
    "new_keys",  # keys younger than established_after_s hold their share of the total
)


def row_bytes(cose_bytes: int) -> int:
    """What one stored report counts against the byte budgets."""
    return cose_bytes + ROW_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """Received reports one observer key has in the store (for seeding)."""

    key: bytes
    reports: int
    bytes: int
    first_ms: int


@dataclass(frozen=True, slots=True)
class PrunedRow:
    """One received report the retention service deleted."""

    key: bytes
    sender_net: str | None
    bytes: int


@dataclass(frozen=True)
class StoragePolicyStatistics:
    admitted: int
    refunded: int  # admitted, then handed back (not stored after all)
    refused: Mapping[str, int]  # by reason, see REFUSAL_REASONS
    received_reports: int  # as the policy counts them (admitted + seeded - pruned)
    received_bytes: int
    new_key_reports: int  # of which in the new-key pool
    new_key_bytes: int
    tracked_keys: int
    tracked_senders: int
    headroom_short: bool


class _Key:
    __slots__ = ("bytes", "first_ms", "new_bytes", "new_reports", "reports")

    def __init__(self, first_ms: int) -> None:
        self.first_ms = first_ms
        self.reports = 0
        self.bytes = 0
        # what this key contributes to the new-key pool (zero once it is established)
        self.new_reports = 0
        self.new_bytes = 0


class StoragePolicy:
    """Decides, report by report, whether a received report may be stored; O(1) per call."""

    def __init__(self, settings: StorageSettings) -> None:
        self.settings = settings
        self._established: OrderedDict[bytes, _Key] = OrderedDict()
        self._new: OrderedDict[bytes, _Key] = OrderedDict()
        self._senders: OrderedDict[str, int] = OrderedDict()
        self._reports = 0
        self._bytes = 0
        self._new_reports = 0
        self._new_bytes = 0
        # pool share of new keys that left the table; released as pruned rows of unknown keys
        self._orphan_reports = 0
        self._orphan_bytes = 0
        self._short = False
        self._admitted = 0
        self._admitted_bytes = 0
        self._refunded = 0
        self._refused = dict.fromkeys(REFUSAL_REASONS, 0)

    # -- the decision --------------------------------------------------------------------------

    def admit(self, key: bytes, sender: str, size: int, now: float) -> str | None:
        """None if a received report of ``size`` COSE bytes from ``sender``, signed by
        ``key``, may be stored now (and count it); else the reason it may not.

        A refused report leaves no trace but its refusal count: a key's entry (and so its
        age) starts with its first *admitted* report. A report admitted and then not stored
        (queue full, failed write, already in the store) is handed back with :meth:`refund`.
        """
        s = self.settings
        if self._short:
            return self._refuse("headroom")
        now_ms = int(now * 1000)
        entry = self._lookup(key, now_ms)
        if entry is None:
            is_new = s.established_after_s > 0  # a key first stored now starts new
            held = 0
        else:
            is_new = key in self._new
            held = entry.reports
        if held >= s.received_max_reports_per_key:
            return self._refuse("per_key")
        try:
            net: str | None = network_of(sender)
        except ValueError:
            net = None  # not an address (a test harness, a Unix socket): no network to count
        # Sources are spoofable: anyone can send "from" an established observer's /24. So the
        # per-network cap limits new keys only; an established key is never refused for what
        # strangers sent from its network (its own reports still count there, as the store
        # counts them).
        if (
            is_new
            and net is not None
            and self._senders.get(net, 0) >= s.received_max_reports_per_sender
        ):
            return self._refuse("per_sender")
        if self._reports >= s.received_max_reports:
            return self._refuse("total_reports")
        cost = row_bytes(size)
        if self._bytes + cost > s.received_max_bytes:
            return self._refuse("total_bytes")
        if is_new:
            pool = s.new_keys_max_fraction
            if (
                self._new_bytes + cost > pool * s.received_max_bytes
                or self._new_reports + 1 > pool * s.received_max_reports
            ):
                return self._refuse("new_keys")
        # admitted: count it everywhere
        if entry is None:
            entry = _Key(now_ms)
            if is_new:
                self._put_new(key, entry)
            else:
                self._promote(key, entry)  # established_after_s = 0: every key is established
                is_new = key in self._new  # (or stays new if the established table is full)
        entry.reports += 1
        entry.bytes += cost
        if is_new:
            entry.new_reports += 1
            entry.new_bytes += cost
            self._new_reports += 1
            self._new_bytes += cost
        if net is not None:
            self._senders[net] = self._senders.get(net, 0) + 1
            self._senders.move_to_end(net)
            if len(self._senders) > s.max_tracked_senders:
                self._senders.popitem(last=False)
        self._reports += 1
        self._bytes += cost
        self._admitted += 1
        self._admitted_bytes += cost
        return None

    def refund(self, key: bytes, sender: str, size: int) -> None:
        """Hand back a report :meth:`admit` counted that was not stored after all (dropped
        before the store, a write given up, already in the store): every count it took is
        free again, and a new key left with no report starts over (its age with it)."""
        try:
            net: str | None = network_of(sender)
        except ValueError:
            net = None
        self._refunded += 1
        self.forget([PrunedRow(key, net, row_bytes(size))])

    def _refuse(self, reason: str) -> str:
        self._refused[reason] += 1
        return reason

    def _lookup(self, key: bytes, now_ms: int) -> _Key | None:
        """The key's entry, most recently used (promoted if it is due); None if it has none."""
        entry = self._established.get(key)
        if entry is not None:
            self._established.move_to_end(key)
            return entry
        entry = self._new.get(key)
        if entry is None:
            return None
        s = self.settings
        if (
            now_ms - entry.first_ms >= s.established_after_s * 1000
            and entry.reports >= s.established_min_reports
            and len(self._established) < s.max_tracked_keys
        ):
            del self._new[key]
            self._promote(key, entry)
        else:
            self._new.move_to_end(key)
        return entry

    def _put_new(self, key: bytes, entry: _Key) -> None:
        self._new[key] = entry
        if len(self._new) > self.settings.max_tracked_keys:
            _, gone = self._new.popitem(last=False)
            self._orphan_reports += gone.new_reports
            self._orphan_bytes += gone.new_bytes

    def _promote(self, key: bytes, entry: _Key) -> None:
        """Move ``entry`` out of the pool into the established table. Never pushes an
        established key out: with the table full, the key stays new (and in the pool)."""
        if len(self._established) >= self.settings.max_tracked_keys:
            self._put_new(key, entry)
            return
        self._new_reports -= entry.new_reports
        self._new_bytes -= entry.new_bytes
        entry.new_reports = entry.new_bytes = 0
        self._established[key] = entry

    # -- what the store says -------------------------------------------------------------------

    def seed(
        self,
        *,
        reports: int,
        bytes_: int,
        keys: Iterable[KeyUsage],
        senders: Iterable[tuple[str, int]],
        now: float,
    ) -> None:
        """Start from what the store holds: totals, and per key and sender network (each in
        least recently seen first order, so the table keeps the most recent ones)."""
        now_ms = int(now * 1000)
        self._established.clear()
        self._new.clear()
        self._senders.clear()
        self._new_reports = self._new_bytes = 0
        self._orphan_reports = self._orphan_bytes = 0
        for usage in keys:
            entry = _Key(usage.first_ms)
            entry.reports, entry.bytes = usage.reports, usage.bytes
            if now_ms - usage.first_ms >= self.settings.established_after_s * 1000:
                self._established[usage.key] = entry
                if len(self._established) > self.settings.max_tracked_keys:
                    self._established.popitem(last=False)
            else:
                entry.new_reports, entry.new_bytes = usage.reports, usage.bytes
                self._new_reports += usage.reports
                self._new_bytes += usage.bytes
                self._put_new(usage.key, entry)
        for net, count in senders:
            self._senders[net] = count
            if len(self._senders) > self.settings.max_tracked_senders:
                self._senders.popitem(last=False)
        self._reports, self._bytes = reports, bytes_

    def mark(self) -> tuple[int, int]:
        """Reports and bytes admitted so far: take it before measuring the store, and hand it
        to :meth:`resync` with the measurement."""
        return self._admitted, self._admitted_bytes

    def resync(
        self, *, reports: int, bytes_: int, since: tuple[int, int] = (0, 0), in_flight: int = 0
    ) -> None:
        """Correct the totals with the store's own, measured after :meth:`mark` gave ``since``.

        The policy's count drifts up (a report admitted, then a duplicate, lost to a full
        queue or a failed write) and the store's lags (admitted reports still on their way to
        it, at most ``in_flight``). So the count is never set below what the store holds plus
        what was admitted since the mark, and never left more than ``in_flight`` reports (at
        their largest) above it: a resync can never let the budget be passed. (A report
        admitted after the mark and stored before the measurement is counted twice: at most
        what arrives during one measurement, and on the safe side.)
        """
        admitted = self._admitted - since[0]
        admitted_bytes = self._admitted_bytes - since[1]
        floor_reports, floor_bytes = reports + admitted, bytes_ + admitted_bytes
        self._reports = max(floor_reports, min(self._reports, floor_reports + in_flight))
        self._bytes = max(
            floor_bytes, min(self._bytes, floor_bytes + in_flight * row_bytes(MAX_COSE_BYTES))
        )
        # The pool can never hold more than everything received.
        self._new_reports = min(self._new_reports, self._reports)
        self._new_bytes = min(self._new_bytes, self._bytes)

    def forget(self, rows: Iterable[PrunedRow]) -> None:
        """Received reports the retention service deleted: their share is free again."""
        for row in rows:
            self._reports = max(0, self._reports - 1)
            self._bytes = max(0, self._bytes - row.bytes)
            entry = self._established.get(row.key) or self._new.get(row.key)
            if entry is not None:
                entry.reports = max(0, entry.reports - 1)
                entry.bytes = max(0, entry.bytes - row.bytes)
                if entry.new_reports:
                    entry.new_reports -= 1
                    entry.new_bytes = max(0, entry.new_bytes - row.bytes)
                    self._release_pool(row.bytes)
                if entry.reports == 0:
                    # Nothing of it is stored any more: as after a restart (the store seeds
                    # only keys with reports), its next report starts it over as a new key.
                    # This is also what frees established entries: none is ever evicted.
                    self._established.pop(row.key, None)
                    self._new.pop(row.key, None)
            elif self._orphan_reports:
                self._orphan_reports -= 1
                self._orphan_bytes = max(0, self._orphan_bytes - row.bytes)
                self._release_pool(row.bytes)
            if row.sender_net is not None and row.sender_net in self._senders:
                left = self._senders[row.sender_net] - 1
                if left > 0:
                    self._senders[row.sender_net] = left
                else:
                    del self._senders[row.sender_net]

    def _release_pool(self, size: int) -> None:
        self._new_reports = max(0, self._new_reports - 1)
        self._new_bytes = max(0, self._new_bytes - size)

    def set_headroom_short(self, short: bool) -> None:
        """While short, every received report is refused (``headroom``)."""
        self._short = short

    @property
    def headroom_short(self) -> bool:
        return self._short

    def statistics(self) -> StoragePolicyStatistics:
        return StoragePolicyStatistics(
            admitted=self._admitted,
            refunded=self._refunded,
            refused=MappingProxyType(dict(self._refused)),
            received_reports=self._reports,
            received_bytes=self._bytes,
            new_key_reports=self._new_reports,
            new_key_bytes=self._new_bytes,
            tracked_keys=len(self._established) + len(self._new),
            tracked_senders=len(self._senders),
            headroom_short=self._short,
        )


__all__ = [
    "REFUSAL_REASONS",
    "ROW_OVERHEAD_BYTES",
    "KeyUsage",
    "PrunedRow",
    "StoragePolicy",
    "StoragePolicyStatistics",
    "row_bytes",
]
