"""Trust continuity survives a restart: networks per key and since when its contacts are
unchanged are saved (overflowd/store/continuity.py) and loaded back into a fresh TrustBook the
way NodeService does it, on SQLite and PostgreSQL."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import trio

from overflowd import report as rpt
from overflowd.config import Settings
from overflowd.identity import NodeIdentity
from overflowd.registry import RegistrySettings
from overflowd.services.inband import InbandSettings
from overflowd.services.node import NodeService
from overflowd.store import Store
from overflowd.store.continuity import (
    MAX_NETWORKS_PER_KEY,
    batch_from,
    load_continuity,
    read_histories,
    save_continuity,
)
from overflowd.trust import (
    DAY_MS,
    ContinuityJournal,
    ContinuityPolicy,
    NetworkSighting,
    TrustBook,
    TrustLevel,
    network_of,
)
from overflowd.wire import datagram
from tests.support.reports import make_payload

X = NodeIdentity.generate()
T0 = 1_700_000_000_000
OLD = ("mailto:noc@edge.example.net",)
NEW = ("mailto:new@edge.example.net",)

class Daemon:
    """What NodeService does per report received over an authenticated path (TCP: a webhook, a
    peer; see test_in_band_sightings_grant_no_continuity for UDP), and every few seconds, with
    the clock injected."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.book = fresh_book(store)
        self.journal = ContinuityJournal()

    def receive(self, sender: str, contacts: tuple[str, ...], now_ms: int) -> None:
        report = X.sign_report(make_payload(contacts=contacts, time_ms=now_ms))
        network = network_of(sender)
        self.book.observe(
            X.public_key, contacts, now_ms=now_ms, network=network, authenticated=True
        )
        self.journal.note(X.public_key, network, now_ms, authenticated=True)
        assert self.store.add_reports([(report, now_ms, "webhook")]) == 1

    def save(self) -> list[bytes]:
        return save_continuity(self.store, *batch_from(self.book, self.journal))


def fresh_book(store: Store, policy: ContinuityPolicy | None = None) -> TrustBook:
    book = TrustBook(policy=policy or ContinuityPolicy())
    for history in read_histories(  # as NodeService._load_trust_book
        store,
        max_keys=book.policy.max_keys,
        max_networks_per_key=book.policy.max_networks_per_key,
        policy=book.policy,
    ):
        book.load(history)
    return book


def level(book: TrustBook) -> TrustLevel:
    return book.assess(X.public_key, now_ms=T0 + 30 * DAY_MS).level


def test_continuity_resumes_after_restart(store: Store) -> None:
    d = Daemon(store)
    for day, sender in [(0, "192.0.2.7"), (3, "198.51.100.9"), (8, "192.0.2.8")]:
        d.receive(sender, OLD, T0 + day * DAY_MS)
    assert level(d.book) == TrustLevel.CONTINUITY
    # Before anything is saved, a restart starts over (as before this change).
    assert level(fresh_book(store)) == TrustLevel.UNKNOWN
    assert d.save() == []
    book = fresh_book(store)
    assert level(book) == TrustLevel.CONTINUITY  # without any new observation
    history = book.history(X.public_key)
    assert history is not None
    assert history.networks == {"192.0.2.0/24", "198.51.100.0/24"}
    assert history.contacts_since_ms == T0
    (stored,) = load_continuity(store).values()
    by_net = {n.network: n for n in stored.networks}
    assert by_net["192.0.2.0/24"] == NetworkSighting(
        X.public_key, "192.0.2.0/24", T0, T0 + 8 * DAY_MS, 2
    )
    # Saving again merges: counts add up, times widen.
    d.receive("192.0.2.9", OLD, T0 + 9 * DAY_MS)
    d.save()
    (stored,) = load_continuity(store).values()
    assert {n.network: n.reports for n in stored.networks} == {
        "192.0.2.0/24": 3,
        "198.51.100.0/24": 1,
    }


def test_contacts_change_resets_and_survives_restart(store: Store) -> None:
    d = Daemon(store)
    for day, sender in [(0, "192.0.2.7"), (3, "198.51.100.9"), (8, "192.0.2.8")]:
        d.receive(sender, OLD, T0 + day * DAY_MS)
    d.save()
    # A restart; then the contacts change: continuity is lost, and stays lost after a restart.
    d.book = fresh_book(store)
    assert level(d.book) == TrustLevel.CONTINUITY
    d.receive("198.51.100.9", NEW, T0 + 9 * DAY_MS)
    assert level(d.book) == TrustLevel.UNKNOWN
    d.save()
    book = fresh_book(store)
    assert level(book) == TrustLevel.UNKNOWN
    history = book.history(X.public_key)
    assert history is not None and history.contacts == NEW
    assert history.contacts_since_ms == T0 + 9 * DAY_MS
    assert len(history.networks) == 2  # networks stay: only the contacts clock restarted
    # ... and continuity comes back after another week with the new contacts, across a restart.
    d.book = book
    d.receive("192.0.2.7", NEW, T0 + 17 * DAY_MS)
    d.save()
    assert level(fresh_book(store)) == TrustLevel.CONTINUITY


def test_unsaved_contacts_change_never_grants_continuity(store: Store) -> None:
    """The report with new contacts reached the store, the book's date for them did not (a
    crash between the two writes): the stored date is dropped, continuity starts over."""
    d = Daemon(store)
    for day, sender in [(0, "192.0.2.7"), (3, "198.51.100.9"), (8, "192.0.2.8")]:
        d.receive(sender, OLD, T0 + day * DAY_MS)
    d.save()
    d.receive("198.51.100.9", NEW, T0 + 9 * DAY_MS)  # stored, not saved
    book = fresh_book(store)
    assert level(book) == TrustLevel.UNKNOWN
    history = book.history(X.public_key)
    assert history is not None and history.contacts_since_ms == T0 + 9 * DAY_MS


def test_dating_waits_for_the_observers_row(store: Store) -> None:
    """contacts_since is written only onto a row with the same contacts; else retried later."""
    book, journal = TrustBook(), ContinuityJournal()
    book.observe(X.public_key, OLD, now_ms=T0, network="192.0.2.0/24", authenticated=True)
    journal.note(X.public_key, "192.0.2.0/24", T0, authenticated=True)
    assert save_continuity(store, *batch_from(book, journal)) == [X.public_key]
    assert len(load_continuity(store)) == 1  # the network is saved all the same
    report = X.sign_report(make_payload(contacts=OLD, time_ms=T0))
    store.add_reports([(report, T0, "udp")])
    journal.again([X.public_key])
    assert save_continuity(store, *batch_from(book, journal)) == []
    (row,) = store.observers()
    assert row.contacts_since_ms == T0


def test_networks_per_key_are_capped(store: Store) -> None:
    other = NodeIdentity.generate().public_key
    flood = [
        NetworkSighting(X.public_key, f"10.{i // 256}.{i % 256}.0/24", T0 + i, T0 + i, 1)
        for i in range(MAX_NETWORKS_PER_KEY + 40)
    ]
    save_continuity(store, [*flood[:50], NetworkSighting(other, "192.0.2.0/24", T0, T0, 1)])
    save_continuity(store, flood[50:])
    stored = load_continuity(store, max_networks_per_key=1000)
    assert len(stored[X.public_key].networks) == MAX_NETWORKS_PER_KEY
    assert len(stored[other].networks) == 1  # another key's rows are untouched
    # the least recently seen went first
    kept = {n.network for n in stored[X.public_key].networks}
    assert kept == {n.network for n in flood[-MAX_NETWORKS_PER_KEY:]}
    # a smaller cap prunes at the next save; loading takes the most recent
    save_continuity(store, flood[-1:], max_networks_per_key=3)
    assert [n.network for n in load_continuity(store)[X.public_key].networks] == [
        n.network for n in reversed(flood[-3:])
    ]
    assert len(load_continuity(store, max_networks_per_key=2)[X.public_key].networks) == 2


def test_a_burst_of_fresh_keys_before_a_restart_does_not_displace_established_ones(
    store: Store,
) -> None:
    """Review: read_histories loaded the most recently seen keys, so after a burst of
    throwaway keys a restart loaded the attacker's and forgot the established observer. Now
    established keys (continuity) are loaded first, the rest in their own bound."""
    d = Daemon(store)
    for day, sender in [(0, "192.0.2.7"), (3, "198.51.100.9"), (8, "192.0.2.8")]:
        d.receive(sender, OLD, T0 + day * DAY_MS)
    assert d.save() == []
    # the burst: 12 fresh keys, each one in-band report, all seen after X
    strangers = [NodeIdentity.generate() for _ in range(12)]
    later = T0 + 9 * DAY_MS
    for n, stranger in enumerate(strangers):
        report = stranger.sign_report(make_payload(contacts=("mailto:x@example.org",)))
        assert store.add_reports([(report, later + n, "udp")]) == 1
    policy = ContinuityPolicy(max_keys=4, max_new_keys=4)
    book = fresh_book(store, policy)
    assert level(book) == TrustLevel.CONTINUITY and book.established(X.public_key)
    stats = book.statistics()
    assert stats.keys == 5 and stats.established == 1 and stats.evicted == 0
    # the new keys loaded are the most recently seen ones, oldest first in the book's order
    loaded = [s.public_key for s in strangers if book.history(s.public_key) is not None]
    assert loaded == [s.public_key for s in strangers[-4:]]


def test_journal_is_bounded() -> None:
    journal = ContinuityJournal(max_entries=4)
    for i in range(10):
        journal.note(X.public_key, f"10.0.{i}.0/24", T0 + i, authenticated=True)
    sightings, keys = journal.take()
    assert len(sightings) == 4 and keys == [X.public_key] and journal.dropped == 6
    assert len(journal) == 0


async def test_node_saves_at_stop_and_loads_at_start(tmp_path: Path) -> None:
    """A real NodeService: in-band reports from two networks (127.0.0.0/24, 127.0.1.0/24) add
    no network and grant nothing (UDP sources are forgeable); the same reports over an
    authenticated path (``NodeService._label(..., authenticated=True)``, what a webhook or peer
    service calls) make the key ``continuity``; after a restart the new node's book says so
    before any new report."""
    node_id = NodeIdentity.generate()
    s = Settings(
        registry=RegistrySettings(continuity_min_days=0.0, continuity_min_reports=2),
        inband=InbandSettings(listen="127.0.0.1:0"),
    )

    def signed() -> rpt.SignedReport:
        return X.sign_report(make_payload(contacts=OLD, time_ms=int(time.time() * 1000)))

    async def send(to: tuple[str, int], source: str) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind((source, 0))
            await sock.sendto(datagram.to_wire(signed().cose), to)

    with Store.open(f"sqlite:///{tmp_path / 'node.sqlite'}") as store:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                node = NodeService(
                    node_id, s, store, listen=["127.0.0.1:0"], inband_listen="127.0.0.1:0"
                )
                await nursery.start(node.run)
                assert node.inband_bound is not None
                for source in ("127.0.0.1", "127.0.1.1"):
                    await send(node.inband_bound, source)
                while (h := node.trust_book.history(X.public_key)) is None or h.reports < 2:
                    await trio.sleep(0.01)
                assert h.networks == frozenset()
                assert node.trust_book.assess(X.public_key).level == TrustLevel.UNKNOWN
                while len(store.observers()) < 1:  # the report rows, written by the listener
                    await trio.sleep(0.01)
                await node._save_continuity()
                assert load_continuity(store) == {}  # nothing in band is saved as a network
                # The same sightings over an authenticated path count.
                for source in ("127.0.0.1", "127.0.1.1"):
                    await node._label(signed(), source, authenticated=True)
                assert node.trust_book.assess(X.public_key).level == TrustLevel.CONTINUITY
                node.stop()
            (stored,) = load_continuity(store).values()
            assert {n.network for n in stored.networks} == {"127.0.0.0/24", "127.0.1.0/24"}
            async with trio.open_nursery() as nursery:
                again = NodeService(
                    node_id, s, store, listen=["127.0.0.1:0"], inband_listen="127.0.0.1:0"
                )
                await nursery.start(again.run)
                history = again.trust_book.history(X.public_key)
                assert history is not None and len(history.networks) == 2
                assert again.trust_book.assess(X.public_key).level == TrustLevel.CONTINUITY
                again.stop()
