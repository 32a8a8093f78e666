"""Whom to believe: trust levels for observer keys, and the events an operator must see (sans-IO).

A report proves which key signed it, not who holds the key. This module decides how much a
receiver should believe that the key belongs to the observer the report claims, from four
kinds of evidence, strongest first::

    pinned       the operator configured this key (``[registry] pinned``)
    dns          the key is published in an ``_overflowd`` record for the observer's address or
                 domain (found by :mod:`overflowd.services.dns`; passed in as ``Found`` items)
    continuity   the same key, with the same contacts, has been seen for at least
                 ``min_days``, in at least ``min_reports`` reports, arriving from at least
                 ``min_networks`` distinct networks (/24 for IPv4, /48 for IPv6)
    unknown      none of the above

"Networks" are those the reports of a key reached us from over an *authenticated* path (a TCP
connection: the webhook client, the gossip peer, the API), aggregated to /24 and /48 so that one
host changing addresses inside its LAN does not count twice. A key seen from several networks
over a week is unlikely to be a man in the middle on one path, the same argument SSH's
trust-on-first-use and Perspectives make. The source address of a UDP datagram proves nothing:
anyone can forge it, so an in-band sighting (``authenticated=False``, the default) never adds a
network, and in band alone never grants ``continuity``.

Events: when a *known* observer shows up with a new key (its contacts overlap those of a key we
know, or it carries the label of one, e.g. its pinned name), or a known key changes its
contacts, :meth:`TrustBook.observe` returns an event; the caller logs it, counts it and shows it
in queries. Nothing here logs, reads a clock (``now_ms`` is an argument) or does I/O; the book
is bounded in keys and networks per key.

Keys live in two tables, each bounded and least recently seen first out: *established* keys
(pinned, or that have held ``continuity`` while remembered; at most ``max_keys``) and *new* keys
(every other; at most ``max_new_keys``). A new key only ever pushes out another new key: a valid
signature costs an attacker nothing but a fresh key, and a burst of throwaway keys in band
(every admitted report is observed) must not forget the observers that took a week of
authenticated sightings to earn ``continuity``. The storage policy keeps new and established
keys apart for the same reason (:mod:`overflowd.storage_policy`).

The work of one :meth:`~TrustBook.observe` is bounded too, whatever the book holds: the index
that finds "keys known by this contact or label" keeps, per contact and per label, every pinned
key and at most ``max_keys_per_name`` others (the first seen; a key with ``continuity`` takes the
place of one without). Strangers who all copy one contact (60,000 keys sharing
``mailto:abuse@...``) cannot make each report walk them all; the keys an event must name, the
pinned and the established ones, stay indexed (see :class:`_NameIndex`).
"""

from __future__ import annotations

import base64
import binascii
import enum
import ipaddress
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace

from overflowd.registry import Found

DAY_MS = 86_400_000


class TrustLevel(enum.IntEnum):
    """Ordered: a higher level is stronger evidence."""

    UNKNOWN = 0
    CONTINUITY = 1
    DNS = 2
    PINNED = 3

    def __str__(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Trust:
    """A level and where it came from, for people ("dns: _overflowd.2.0.192.in-addr.arpa")."""

    level: TrustLevel
    source: str

    def __str__(self) -> str:
        return f"{self.level} ({self.source})"


@dataclass(frozen=True)
class ContinuityPolicy:
    """When repeated sightings of a key are worth ``continuity``. Defaults in brackets."""

    #: the key and its contacts unchanged for at least this long [7 days]
    min_days: float = 7.0
    #: seen arriving from at least this many distinct /24 or /48 networks [2]
    min_networks: int = 2
    #: in at least this many reports [3]
    min_reports: int = 3
    #: established keys remembered (pinned, or that have held continuity); the least recently
    #: seen unpinned one is forgotten first [100 000]
    max_keys: int = 100_000
    #: new keys remembered (not established): a separate table, so that a flood of fresh keys
    #: only pushes out other new keys; least recently seen first out [50 000]. About 1.5 KiB
    #: each with a contact of its own and its index entry (tracemalloc, CPython 3.11).
    max_new_keys: int = 50_000
    #: networks remembered per key (only min_networks matter for trust) [32]
    max_networks_per_key: int = 32
    #: unpinned keys indexed per contact and per label, to find the known keys a new key's
    #: event names [16]. Pinned keys always are. Bounds the work of one observe: without it,
    #: 60,000 keys sharing a contact cost 70-110 ms per report in the trio thread.
    max_keys_per_name: int = 16

    def __post_init__(self) -> None:
        if self.min_days < 0 or self.min_networks < 1 or self.min_reports < 1:
            raise ValueError("min_days >= 0, min_networks >= 1 and min_reports >= 1")
        if self.max_keys < 1 or self.max_new_keys < 1:
            raise ValueError("max_keys >= 1 and max_new_keys >= 1")
        if self.max_networks_per_key < self.min_networks:
            raise ValueError("max_networks_per_key >= min_networks")
        if self.max_keys_per_name < 1:
            raise ValueError("max_keys_per_name >= 1")


@dataclass(frozen=True)
class PinnedKey:
    """A key the operator vouches for, with an optional label (a name for the observer)."""

    key: bytes
    label: str = ""


def parse_pinned(text: str) -> PinnedKey:
    """``BASE64KEY`` or ``LABEL=BASE64KEY`` (config and flags); ValueError if neither."""
    text = text.strip()
    # A padded base64 key ends in '=', so try the whole text as a key before splitting a label.
    candidates = [("", text)]
    if "=" in text:
        label, _, rest = text.partition("=")
        candidates.append((label, rest))
    for label, encoded in candidates:
        try:
            key = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(key) == 32:
            return PinnedKey(key, label.strip())
    raise ValueError(
        f"pinned key '{text[:60]}' is not BASE64KEY or LABEL=BASE64KEY (32-byte Ed25519 key)"
    )


def network_of(addr: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The /24 (IPv4) or /48 (IPv6) an address is in, as text: continuity counts these."""
    a = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    plen = 24 if a.version == 4 else 48
    return str(ipaddress.ip_network(f"{a}/{plen}", strict=False))


@dataclass(frozen=True)
class KeyHistory:
    """What we know of one key from reports it signed."""

    key: bytes
    contacts: tuple[str, ...]
    first_seen_ms: int
    last_seen_ms: int
    #: when the contacts last changed (first_seen_ms if never)
    contacts_since_ms: int
    reports: int
    networks: frozenset[str] = frozenset()
    labels: frozenset[str] = frozenset()


@dataclass(frozen=True)
class NetworkSighting:
    """Reports of ``key`` that reached us from ``network``: when first and last, how many."""

    key: bytes
    network: str
    first_seen_ms: int
    last_seen_ms: int
    reports: int


class ContinuityJournal:
    """What a :class:`TrustBook` learned since it was last saved (sans-IO, bounded).

    The caller notes each observation (:meth:`note`) and, every few seconds, takes what has
    gathered (:meth:`take`) to write it in one batch: the (key, network) sightings, and the keys
    whose contacts and ``contacts_since_ms`` to write. At most ``max_entries`` sightings and as
    many keys wait; past that, new ones are dropped and counted (``dropped``): a key dropped
    is noted again with its next report, and a network missed only delays continuity.
    """

    def __init__(self, max_entries: int = 10_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._sightings: dict[tuple[bytes, str], NetworkSighting] = {}
        self._keys: dict[bytes, None] = {}  # an ordered set
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._sightings) + len(self._keys)

    def note(
        self, key: bytes, network: str | None, now_ms: int, *, authenticated: bool = False
    ) -> None:
        """A report signed by ``key`` reached us from ``network`` (None: unknown).

        The network is kept only when ``authenticated`` (a TCP path): a saved network counts
        toward continuity when the book is loaded again, and a UDP source proves nothing.
        """
        if key not in self._keys:
            if len(self._keys) < self.max_entries:
                self._keys[key] = None
            else:
                self.dropped += 1
        if network is None or not authenticated:
            return
        old = self._sightings.get((key, network))
        if old is None:
            if len(self._sightings) >= self.max_entries:
                self.dropped += 1
                return
            self._sightings[(key, network)] = NetworkSighting(key, network, now_ms, now_ms, 1)
        else:
            self._sightings[(key, network)] = NetworkSighting(
                key,
                network,
                min(old.first_seen_ms, now_ms),
                max(old.last_seen_ms, now_ms),
                old.reports + 1,
            )

    def again(self, keys: Iterable[bytes]) -> None:
        """Keys whose contacts could not be written yet: keep them for the next batch."""
        for key in keys:
            if key not in self._keys and len(self._keys) < self.max_entries:
                self._keys[key] = None

    def take(self) -> tuple[list[NetworkSighting], list[bytes]]:
        """The sightings and keys gathered since the last ``take``; the journal is emptied."""
        sightings, keys = list(self._sightings.values()), list(self._keys)
        self._sightings, self._keys = {}, {}
        return sightings, keys


@dataclass(frozen=True)
class NewKey:
    """A key not seen before, for an observer we know by its contacts or label."""

    key: bytes
    previous_keys: tuple[bytes, ...]
    #: one of the previous keys is pinned: the operator should look now
    pinned: bool
    at_ms: int
    why: str


@dataclass(frozen=True)
class ContactsChanged:
    """A known key now carries other contacts."""

    key: bytes
    old: tuple[str, ...]
    new: tuple[str, ...]
    pinned: bool
    at_ms: int


TrustEvent = NewKey | ContactsChanged


def event_kind(event: TrustEvent) -> str:
    """``new_key`` or ``contacts_changed``: the name logs, metrics and the store use."""
    return "new_key" if isinstance(event, NewKey) else "contacts_changed"


@dataclass(frozen=True)
class TrustStatistics:
    keys: int
    pinned: int
    observations: int
    new_key_events: int
    contacts_changed_events: int
    #: keys forgotten to make room, new and established together
    evicted: int
    #: keys left out of a full contact or label index (they still get their events; they are
    #: only not named in the events of later keys)
    unindexed: int = 0
    #: of ``keys``, those in the established table (pinned, or have held continuity)
    established: int = 0
    #: of ``evicted``, established keys (only established keys push these out)
    evicted_established: int = 0


def continuity_holds(history: KeyHistory, policy: ContinuityPolicy, now_ms: int) -> bool:
    """Same key and contacts for min_days, in min_reports reports, from min_networks networks."""
    del now_ms  # the span is between sightings, not until now: a key must keep being seen
    span_ms = history.last_seen_ms - history.contacts_since_ms
    return (
        span_ms >= policy.min_days * DAY_MS
        and history.reports >= policy.min_reports
        and len(history.networks) >= policy.min_networks
    )


def assess(
    key: bytes,
    *,
    pinned: Iterable[PinnedKey] = (),
    dns: Iterable[Found] = (),
    history: KeyHistory | None = None,
    policy: ContinuityPolicy | None = None,
    now_ms: int = 0,
) -> Trust:
    """The strongest evidence for ``key``: pinned, then dns, then continuity, else unknown.

    ``dns`` is what a lookup for the observer's address or domain found; a revocation there
    (``p=`` empty) vouches for no key, and does not lower pinned or continuity either: it says
    nothing about which key it revokes.
    """
    for pin in pinned:
        if pin.key == key:
            return Trust(TrustLevel.PINNED, f"pinned{': ' + pin.label if pin.label else ''}")
    for found in dns:
        if found.record.public_key == key:
            return Trust(TrustLevel.DNS, f"dns: {found.name}")
    policy = policy or ContinuityPolicy()
    if history is not None and continuity_holds(history, policy, now_ms):
        days = (history.last_seen_ms - history.contacts_since_ms) / DAY_MS
        return Trust(
            TrustLevel.CONTINUITY,
            f"continuity: {days:.1f} days, {history.reports} reports, "
            f"{len(history.networks)} networks",
        )
    return Trust(TrustLevel.UNKNOWN, "in-band only" if history is not None else "never seen")


class _NameIndex:
    """The keys known under one contact or label: every pinned key, and ``cap`` others at most.

    Which others: the first seen, so that strangers arriving after an observer cannot push it
    out; and a key with continuity takes the place of the most recent one without, so that an
    established observer is named even when strangers took the contact first. A key left out
    is counted (``TrustStatistics.unindexed``); a slot freed (the key forgotten, or its contacts
    changed) goes to the next key seen with that name, never by a scan of the book.
    """

    __slots__ = ("others", "pinned")

    def __init__(self) -> None:
        self.pinned: set[bytes] = set()
        self.others: dict[bytes, None] = {}  # an ordered set, first indexed first

    def __len__(self) -> int:
        return len(self.pinned) + len(self.others)

    def __contains__(self, key: object) -> bool:
        return key in self.pinned or key in self.others

    def keys(self) -> set[bytes]:
        return self.pinned | self.others.keys()


class TrustBook:
    """Pinned keys and the history of every key seen, with the events they raise."""

    def __init__(
        self, pinned: Iterable[PinnedKey] = (), policy: ContinuityPolicy | None = None
    ) -> None:
        self.policy = policy or ContinuityPolicy()
        self._pinned: dict[bytes, PinnedKey] = {p.key: p for p in pinned}
        # Every key's history; which table it is in says which bound it counts against.
        self._keys: dict[bytes, KeyHistory] = {}
        # Two LRU tables (ordered sets, least recently seen first): see the module docstring.
        self._established: OrderedDict[bytes, None] = OrderedDict()
        self._new: OrderedDict[bytes, None] = OrderedDict()
        self._by_contact: dict[str, _NameIndex] = {}
        self._by_label: dict[str, _NameIndex] = {}
        for pin in self._pinned.values():
            if pin.label:
                self._by_label.setdefault(pin.label, _NameIndex()).pinned.add(pin.key)
        self._observations = self._new_key = self._contacts_changed = self._evicted = 0
        self._unindexed = self._evicted_established = 0

    # -- reading --------------------------------------------------------------------------

    def pinned(self) -> tuple[PinnedKey, ...]:
        return tuple(self._pinned.values())

    def history(self, key: bytes) -> KeyHistory | None:
        return self._keys.get(key)

    def assess(self, key: bytes, *, dns: Iterable[Found] = (), now_ms: int = 0) -> Trust:
        return assess(
            key,
            pinned=self._pinned.values(),
            dns=dns,
            history=self._keys.get(key),
            policy=self.policy,
            now_ms=now_ms,
        )

    def statistics(self) -> TrustStatistics:
        return TrustStatistics(
            keys=len(self._keys),
            pinned=len(self._pinned),
            observations=self._observations,
            new_key_events=self._new_key,
            contacts_changed_events=self._contacts_changed,
            evicted=self._evicted,
            unindexed=self._unindexed,
            established=len(self._established),
            evicted_established=self._evicted_established,
        )

    def established(self, key: bytes) -> bool:
        """Is ``key`` in the established table (pinned, or has held continuity)?"""
        return key in self._established

    # -- learning -------------------------------------------------------------------------

    def load(self, history: KeyHistory) -> None:
        """Take a key's history from the store (no events: it is not news).

        Load the least recently seen first: each goes to the most recent end of its table.
        A key holding continuity goes to the established table, any other to the new one.
        """
        self._forget(history.key)
        self._remember(history)

    def observe(
        self,
        key: bytes,
        contacts: Iterable[str],
        *,
        now_ms: int,
        network: str | None = None,
        authenticated: bool = False,
        label: str | None = None,
    ) -> list[TrustEvent]:
        """Record a verified report signed by ``key``; return the events it raises.

        ``network`` is :func:`network_of` the address the report reached us from, when known.
        It counts toward continuity only when ``authenticated``: the report came over a path
        that proves its source address (a TCP connection: webhook, peer, API). A UDP datagram's
        source can be forged by anyone, so an in-band sighting leaves the networks as they are.
        ``label`` is a name the caller knows the observer by (the DNS name it claims, say).

        Work is bounded by the number of contacts (at most 4 in a report) times the index's
        per-name bound, whatever the book holds.
        """
        if len(key) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        contacts = tuple(contacts)
        self._observations += 1
        events: list[TrustEvent] = []
        old = self._keys.get(key)
        if old is None:
            related = self._related(contacts, label)
            related.discard(key)
            if related:
                pinned = any(k in self._pinned for k in related)
                why = "same label" if label and label in self._by_label else "shared contacts"
                previous = sorted(k for k in related if k in self._pinned) + sorted(
                    k for k in related if k not in self._pinned
                )
                events.append(NewKey(key, tuple(previous), pinned, now_ms, why))
                self._new_key += 1
            self._remember(
                KeyHistory(
                    key=key,
                    contacts=contacts,
                    first_seen_ms=now_ms,
                    last_seen_ms=now_ms,
                    contacts_since_ms=now_ms,
                    reports=1,
                    networks=frozenset([network] if network and authenticated else []),
                    labels=frozenset([label] if label else []),
                )
            )
            return events
        since = old.contacts_since_ms
        if old.contacts != contacts:
            events.append(ContactsChanged(key, old.contacts, contacts, key in self._pinned, now_ms))
            self._contacts_changed += 1
            since = now_ms
        networks = old.networks
        full = len(networks) >= self.policy.max_networks_per_key
        if network and authenticated and network not in networks and not full:
            networks = networks | {network}
        labels = old.labels | {label} if label and len(old.labels) < 8 else old.labels
        history = replace(
            old,
            contacts=contacts,
            first_seen_ms=min(old.first_seen_ms, now_ms),
            last_seen_ms=max(old.last_seen_ms, now_ms),
            contacts_since_ms=since,
            reports=old.reports + 1,
            networks=networks,
            labels=labels,
        )
        self._keys[key] = history
        established = not self._holds(old) and self._holds(history)
        if key in self._established:
            self._established.move_to_end(key)
        elif self._holds(history):
            # It earned continuity: out of the new keys' reach from now on. It stays
            # established while remembered, even if its contacts change later (as the storage
            # policy keeps a key established): only its owner can sign with it.
            del self._new[key]
            self._established[key] = None
            self._trim(self._established, self.policy.max_keys)
        else:
            self._new.move_to_end(key)
        # The index changes only with the names, or when the key becomes established: the
        # common case (the same key, contacts and standing again) touches no index at all.
        for contact in old.contacts:
            if contact not in contacts:
                self._unindex(self._by_contact, contact, key)
        for contact in contacts:
            if established or contact not in old.contacts:
                self._index(self._by_contact, contact, history)
        for name in labels:
            if established or name not in old.labels:
                self._index(self._by_label, name, history)
        return events

    # -- internals ------------------------------------------------------------------------

    def _holds(self, history: KeyHistory) -> bool:
        return continuity_holds(history, self.policy, history.last_seen_ms)

    def _related(self, contacts: tuple[str, ...], label: str | None) -> set[bytes]:
        related: set[bytes] = set()
        for contact in contacts:
            index = self._by_contact.get(contact)
            if index is not None:
                related |= index.keys()
        if label:
            index = self._by_label.get(label)
            if index is not None:
                related |= index.keys()
        return related

    def _index(self, indexes: dict[str, _NameIndex], name: str, history: KeyHistory) -> None:
        key = history.key
        index = indexes.get(name)
        if index is None:
            index = indexes[name] = _NameIndex()
        if key in index:
            return
        if key in self._pinned:
            index.pinned.add(key)
            return
        if len(index.others) < self.policy.max_keys_per_name:
            index.others[key] = None
            return
        if self._holds(history):
            # An established key takes the place of the most recently indexed one without.
            for other in reversed(index.others):
                known = self._keys.get(other)
                if known is None or not self._holds(known):
                    del index.others[other]
                    index.others[key] = None
                    return
        self._unindexed += 1

    def _remember(self, history: KeyHistory) -> None:
        key = history.key
        self._keys[key] = history
        for contact in history.contacts:
            self._index(self._by_contact, contact, history)
        for label in history.labels:
            self._index(self._by_label, label, history)
        if key in self._pinned or self._holds(history):
            self._established[key] = None
            self._trim(self._established, self.policy.max_keys)
        else:
            self._new[key] = None
            self._trim(self._new, self.policy.max_new_keys)

    def _trim(self, table: OrderedDict[bytes, None], cap: int) -> None:
        """Forget the least recently seen unpinned keys of ``table`` past ``cap``."""
        while len(table) > cap:
            # Pinned keys are few (configured) and only in the established table.
            victim = next((k for k in table if k not in self._pinned), None)
            if victim is None:
                break
            self._forget(victim)
            self._evicted += 1
            self._evicted_established += table is self._established

    def _forget(self, key: bytes) -> None:
        history = self._keys.pop(key, None)
        if history is None:
            return
        self._established.pop(key, None)
        self._new.pop(key, None)
        pin = self._pinned.get(key)
        for contact in history.contacts:
            self._unindex(self._by_contact, contact, key)
        for label in history.labels:
            if pin is None or pin.label != label:  # a pinned label stays, whatever is forgotten
                self._unindex(self._by_label, label, key)

    def _unindex(self, indexes: dict[str, _NameIndex], name: str, key: bytes) -> None:
        index = indexes.get(name)
        if index is None:
            return
        pin = self._pinned.get(key)
        if pin is not None and indexes is self._by_label and pin.label == name:
            return  # a pinned key's own label always names it
        index.pinned.discard(key)
        index.others.pop(key, None)
        if not index:
            del indexes[name]
