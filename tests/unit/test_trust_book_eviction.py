"""Review: throwaway keys evict an established observer's continuity from the trust book.

The book kept ``max_keys`` keys, least recently seen unpinned first out, with no preference for
keys that hold ``continuity``. In the daemon every *admitted* in-band report is ``observe``d
(NodeService._label), and the storage policy admits up to its new-key pool (125,000 reports of
fresh keys by default), more than max_keys. So one burst of valid datagrams from fresh keys
wiped every established observer's continuity, which took >= 7 days of authenticated sightings
to earn. Now new keys live in their own table (``max_new_keys``) and push out only each other.

Sans-IO (TrustBook), scaled down.
"""

from __future__ import annotations

from overflowd.trust import ContinuityPolicy, KeyHistory, PinnedKey, TrustBook, TrustLevel

DAY_MS = 86_400_000
POLICY = ContinuityPolicy(max_keys=50, max_new_keys=50)
OBSERVER = bytes([7]) * 32
T0 = 1_700_000_000_000
NOW = T0 + 8 * DAY_MS


def fresh(n: int) -> bytes:
    return (n + 1_000).to_bytes(4, "big") * 8


def establish(book: TrustBook, key: bytes = OBSERVER) -> None:
    """8 days of webhook (authenticated) reports from two networks: continuity."""
    for day in range(9):
        for net in ("192.0.2.0/24", "198.51.100.0/24"):
            book.observe(
                key,
                ["mailto:noc@example.net"],
                now_ms=T0 + day * DAY_MS,
                network=net,
                authenticated=True,
            )


def test_fresh_keys_do_not_erase_an_established_observers_continuity() -> None:
    book = TrustBook((), POLICY)
    establish(book)
    assert book.assess(OBSERVER, now_ms=NOW).level is TrustLevel.CONTINUITY
    assert book.established(OBSERVER)
    # A stranger: 200 datagrams, each signed by a fresh key (in band, unauthenticated).
    for n in range(200):
        book.observe(fresh(n), ["mailto:x@example.org"], now_ms=NOW + n)
    assert book.assess(OBSERVER, now_ms=NOW + 1_000).level is TrustLevel.CONTINUITY
    stats = book.statistics()
    # the flood did evict (the test is not vacuous), but only its own kind
    assert stats.evicted == 150 and stats.evicted_established == 0
    assert stats.keys == 51 and stats.established == 1


def test_new_keys_are_bounded_on_their_own_least_recently_seen_first() -> None:
    book = TrustBook((), ContinuityPolicy(max_keys=5, max_new_keys=3))
    for n in range(4):
        book.observe(fresh(n), [], now_ms=n)
    book.observe(fresh(1), [], now_ms=10)  # seen again: the most recent
    book.observe(fresh(9), [], now_ms=11)
    assert [book.history(fresh(n)) is not None for n in (0, 1, 2, 3, 9)] == [
        False,
        True,
        False,
        True,
        True,
    ]
    assert book.statistics().evicted == 2


def test_a_new_key_that_earns_continuity_moves_to_the_established_table() -> None:
    book = TrustBook((), POLICY)
    establish(book)  # new at first: it became established on the way
    assert book.established(OBSERVER)
    # Its contacts change: continuity starts over, but it stays established while remembered.
    book.observe(OBSERVER, ["mailto:new@example.net"], now_ms=NOW + 1)
    assert book.assess(OBSERVER, now_ms=NOW + 1).level is TrustLevel.UNKNOWN
    for n in range(200):
        book.observe(fresh(n), [], now_ms=NOW + 2 + n)
    assert book.history(OBSERVER) is not None


def test_established_keys_are_bounded_and_pins_are_never_forgotten() -> None:
    pin = PinnedKey(bytes([1]) * 32, "edge")
    book = TrustBook([pin], ContinuityPolicy(max_keys=3, max_new_keys=2))
    book.observe(pin.key, [], now_ms=0)
    for n in range(5):
        establish(book, fresh(n))
    stats = book.statistics()
    assert stats.established == 3 and stats.evicted_established == 3
    assert book.history(pin.key) is not None
    assert [book.history(fresh(n)) is not None for n in range(5)] == [False] * 3 + [True] * 2


def test_load_puts_each_key_in_its_table() -> None:
    book = TrustBook((), POLICY)
    book.load(
        KeyHistory(
            key=OBSERVER,
            contacts=("mailto:noc@example.net",),
            first_seen_ms=T0,
            last_seen_ms=NOW,
            contacts_since_ms=T0,
            reports=18,
            networks=frozenset({"192.0.2.0/24", "198.51.100.0/24"}),
        )
    )
    book.load(KeyHistory(fresh(0), (), NOW, NOW, NOW, 1))
    assert book.established(OBSERVER) and not book.established(fresh(0))
    for n in range(1, 100):
        book.observe(fresh(n), [], now_ms=NOW + n)
    assert book.assess(OBSERVER, now_ms=NOW).level is TrustLevel.CONTINUITY
