"""DNS lookups against a real Knot DNS server on loopback (tests/support/knot.py).

The zones below are the whole fixture: reverse zones for 192.0.2.0/24, 198.51.100.0/24 and
2001:db8::/32, the parents in-addr.arpa and ip6.arpa (so the walk-up gets NXDOMAIN above them
rather than REFUSED), a domain zone and an abuse-contacts zone.
"""

from __future__ import annotations

import base64
import gc
import ipaddress
import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from overflowd.cli import cmd_contact
from overflowd.errors import DiscoveryError
from overflowd.identity import NodeIdentity
from overflowd.registry import Found, Outcome, format_record, split_txt, valid_keys
from overflowd.services import dns as dns_service
from overflowd.services.dns import (
    DnsRegistry,
    Hint,
    RegistryHints,
    RegistrySettings,
    observer_trust,
)
from overflowd.store import Store, default_url
from overflowd.trust import PinnedKey, TrustBook, TrustLevel
from tests.support.heap import own_objects_only
from tests.support.knot import KnotServer, KnotUnavailable, find_knotd, running_knot, soa_zone
from tests.support.reports import make_payload

KEY = {name: bytes([i + 1]) * 32 for i, name in enumerate("ABCDEFGHIJKL")}
#: a real node key, published for 192.0.2.20, that signs reports in the CLI test
NODE = NodeIdentity(seed=b"\x09" * 32)


def txt(
    key: bytes | None, *contacts: str, url: str | None = None, boost: float | None = None
) -> str:
    """A TXT rdata in zone-file syntax (split into 255-byte strings)."""
    text = "v=OVF1; k=ed25519; p=" if key is None else format_record(key, contacts, url, boost)
    return " ".join(f'"{s}"' for s in split_txt(text))


OVERSIZED = " ".join(['"v=OVF1; p=; c=' + "x" * 230 + '"'] + ['"' + "y" * 250 + '"'] * 19)

HOOK = "https://example.net/hook"
REV4 = f"""
_overflowd 60 IN TXT {txt(KEY["A"], "mailto:noc@example.net", url=HOOK, boost=10)}
_overflowd.7 60 IN TXT {txt(KEY["B"], "mailto:host7@example.net")}
_overflowd.8 60 IN TXT {txt(KEY["C"], "mailto:rot@example.net")}
_overflowd.8 60 IN TXT {txt(KEY["D"], "mailto:rot@example.net")}
_overflowd.9 60 IN TXT {txt(None)}
_overflowd.10 60 IN TXT "v=OVF1; p=!!!not-base64"
_overflowd.11 60 IN TXT {OVERSIZED}
_overflowd.11 60 IN TXT {txt(KEY["E"])}
_overflowd.12 60 IN TXT {txt(KEY["F"], *[f"https://example.net/{'z' * 70}/{i}" for i in range(3)])}
_overflowd.13 60 IN TXT "google-site-verification=abc"
_overflowd.14 60 IN A 192.0.2.14
_overflowd.20 60 IN TXT {txt(NODE.public_key, "mailto:n20@example.net")}
_overflowd.15 60 IN TXT "k=ed25519; v=OVF1; p={base64.b64encode(KEY["B"]).decode()}"
"""
# 198.51.100.0/24 publishes nothing itself; its /16 parent does (in the in-addr.arpa zone).
REV4_PARENT = f"_overflowd.51.198 60 IN TXT {txt(KEY['G'], 'mailto:lir@example.org')}"
# 2001:db8::/32: /32 at the apex, /48 for 2001:db8:1::, /64 for 2001:db8:1:2::, /128 for ::1
REV6 = f"""
_overflowd 60 IN TXT {txt(KEY["H"], "mailto:lir6@example.net")}
_overflowd.1.0.0.0 60 IN TXT {txt(KEY["I"], "mailto:site@example.net")}
_overflowd.2.0.0.0.1.0.0.0 60 IN TXT {txt(KEY["J"], "mailto:lan@example.net")}
_overflowd.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0 60 IN TXT {txt(KEY["K"])}
"""
DOMAIN = f"""
_overflowd 60 IN TXT {txt(KEY["L"], "mailto:abuse@example.test", url="https://example.test/h")}
_overflowd.nodata 60 IN A 192.0.2.1
"""
ABUSE = """
7.2.0.192 60 IN TXT "abuse@example.net"
5.100.51.198 60 IN TXT "abuse@example.org, https://example.org/abuse"
8.2.0.192 60 IN TXT "this is not a contact"
1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2 60 IN TXT "abuse6@example.net"
"""


def big_rrset(owner: str, records: int, strings: int, length: int = 250) -> str:
    """``records`` distinct TXT records at ``owner``, each of ``strings`` strings."""
    lines = []
    for i in range(records):
        body = " ".join(f'"{i:04d}' + chr(97 + j % 26) * (length - 4) + '"' for j in range(strings))
        lines.append(f"{owner} 3600 IN TXT {body}")
    return "\n".join(lines)


#: any name under big.test: 30 TXT records of 8 x 250 bytes, ~60 KiB (TCP), none ours
BIG_ANSWER_BYTES = 30 * 8 * 250
LONG_URL = "https://example.net/" + "u" * 3000
LONG_URL_TXT = txt(KEY["A"], url=LONG_URL)
#: any name under huge.test: 12 records of 20 x 250 bytes, each over MAX_RECORD_BYTES
ZONES = {
    "big.test": soa_zone("big.test", big_rrset("*", 30, 8)),
    "huge.test": soa_zone("huge.test", big_rrset("*", 12, 20)),
    # every 10.0.0.x publishes a record with a 3000-byte webhook URL (for the hints table)
    "10.in-addr.arpa": soa_zone("10.in-addr.arpa", f"*.0.0 60 IN TXT {LONG_URL_TXT}"),
    "2.0.192.in-addr.arpa": soa_zone("2.0.192.in-addr.arpa", REV4, negative_ttl=7200),
    "100.51.198.in-addr.arpa": soa_zone("100.51.198.in-addr.arpa", "", negative_ttl=7200),
    "in-addr.arpa": soa_zone("in-addr.arpa", REV4_PARENT, negative_ttl=30),
    "8.b.d.0.1.0.0.2.ip6.arpa": soa_zone("8.b.d.0.1.0.0.2.ip6.arpa", REV6),
    "ip6.arpa": soa_zone("ip6.arpa", ""),
    "example.test": soa_zone("example.test", DOMAIN, negative_ttl=120),
    "abuse.example.test": soa_zone("abuse.example.test", ABUSE),
}


@pytest.fixture(scope="module")
def knot() -> Iterator[KnotServer]:
    with running_knot(ZONES) as server:
        yield server


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(knot: KnotServer, clock: FakeClock | None = None, **overrides: object) -> DnsRegistry:
    settings = RegistrySettings(
        nameservers=(knot.address,),
        timeout_s=2.0,
        abuse_zones=("abuse.example.test",),
        **overrides,  # type: ignore[arg-type]
    )
    return DnsRegistry(settings, clock=clock)


# -- walk-up ------------------------------------------------------------------------------------


async def test_a_record_at_the_24_answers_for_a_host_without_its_own(knot: KnotServer) -> None:
    r = make(knot)
    found = await r.lookup_address("192.0.2.99")
    assert [f.name for f in found] == ["_overflowd.2.0.192.in-addr.arpa"]
    rec = found[0].record
    assert rec.public_key == KEY["A"]
    assert rec.contacts == ("mailto:noc@example.net",)
    assert rec.webhook_url == "https://example.net/hook"
    assert rec.boost == 10
    assert r.statistics().queries == 2  # /32 NXDOMAIN, /24 answers; /16 and /8 never asked


async def test_a_more_specific_record_wins(knot: KnotServer) -> None:
    found = await make(knot).lookup_address("192.0.2.7")
    assert [(f.name, f.record.public_key) for f in found] == [
        ("_overflowd.7.2.0.192.in-addr.arpa", KEY["B"])
    ]


async def test_walk_reaches_the_16_in_the_parent_zone(knot: KnotServer) -> None:
    r = make(knot)
    found = await r.lookup_address("198.51.100.5")
    assert [(f.name, f.record.public_key) for f in found] == [
        ("_overflowd.51.198.in-addr.arpa", KEY["G"])
    ]
    assert r.statistics().nxdomain == 2


async def test_nothing_published_anywhere_is_an_empty_answer(knot: KnotServer) -> None:
    r = make(knot)
    assert await r.lookup_address("203.0.113.1") == []
    assert r.statistics().queries == 4  # /32, /24, /16, /8: the whole walk, no more


@pytest.mark.parametrize(
    "mapped", ["::ffff:192.0.2.7", ipaddress.IPv6Address("::ffff:192.0.2.7")], ids=["str", "obj"]
)
async def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4(
    knot: KnotServer, mapped: str | ipaddress.IPv6Address
) -> None:
    # an address object used to walk ip6.arpa (and find nothing) while text walked in-addr.arpa
    r = make(knot)
    found = await r.lookup_address(mapped)
    assert [(f.name, f.record.public_key) for f in found] == [
        ("_overflowd.7.2.0.192.in-addr.arpa", KEY["B"])
    ]
    [abuse] = await r.abuse_contacts(mapped)
    assert abuse.name == "7.2.0.192.abuse.example.test"


async def test_hints_for_a_mapped_address_are_those_of_the_ipv4_host(knot: KnotServer) -> None:
    hints = RegistryHints(make(knot), clock=FakeClock())
    v4, mapped = ipaddress.IPv4Address("192.0.2.2"), ipaddress.IPv6Address("::ffff:192.0.2.2")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(hints.run)
            assert hints.warm(mapped)
            assert not hints.warm(v4)  # the same host: already queued
            while hints.statistics().lookups < 1:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert hints.boost(v4) == hints.boost(mapped) == 10  # the /24's r=10
    assert hints.webhook_url(mapped) == HOOK
    assert hints.statistics().entries == 1


@pytest.mark.parametrize(
    ("addr", "key", "name"),
    [
        ("2001:db8:1:2::5", "J", "_overflowd.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"),
        ("2001:db8:1:3::5", "I", "_overflowd.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"),
        ("2001:db8:ffff::1", "H", "_overflowd.8.b.d.0.1.0.0.2.ip6.arpa"),
        (
            "2001:db8::1",
            "K",
            "_overflowd." + ".".join("1" + "0" * 23) + ".8.b.d.0.1.0.0.2.ip6.arpa",
        ),
    ],
)
async def test_ipv6_nibbles_at_128_64_48_32(
    knot: KnotServer, addr: str, key: str, name: str
) -> None:
    found = await make(knot).lookup_address(addr)
    assert [(f.name, f.record.public_key) for f in found] == [(name, KEY[key])]


async def test_domain_names(knot: KnotServer) -> None:
    r = make(knot)
    found = await r.lookup_name("Example.Test.")
    assert [(f.name, f.record.public_key) for f in found] == [("_overflowd.example.test", KEY["L"])]
    assert found[0].record.webhook_url == "https://example.test/h"
    with pytest.raises(ValueError, match="not a domain name"):
        await r.lookup_name("bad name.test")


async def test_a_zone_the_server_refuses_is_a_discovery_error(knot: KnotServer) -> None:
    r = make(knot)
    with pytest.raises(DiscoveryError, match=r"_overflowd\.example\.org"):
        await r.lookup_name("example.org")
    assert r.statistics().failures == 1


# -- negative caching and TTLs ------------------------------------------------------------------


async def test_nxdomain_is_cached_and_capped_at_minutes(knot: KnotServer) -> None:
    clock = FakeClock()
    r = make(knot, clock)
    assert await r.lookup_name("missing.example.test") == []
    assert r.statistics().queries == 1
    entry = r.cache.get("_overflowd.missing.example.test", clock.now)
    assert entry is not None and entry.outcome is Outcome.NXDOMAIN
    assert entry.expires_at - clock.now == 120  # the SOA's MINIMUM, under the 300 s cap
    assert await r.lookup_name("missing.example.test") == []
    assert r.statistics().queries == 1  # second lookup: no query
    # the reverse zone's SOA says 2 hours; we keep NXDOMAIN 5 minutes at most
    await r.lookup_address("192.0.2.99")
    entry = r.cache.get("_overflowd.99.2.0.192.in-addr.arpa", clock.now)
    assert entry is not None and entry.expires_at - clock.now == 300
    clock.now += 301
    before = r.statistics().queries
    assert await r.lookup_name("missing.example.test") == []
    assert r.statistics().queries == before + 1


async def test_nodata_is_cached(knot: KnotServer) -> None:
    r = make(knot, FakeClock())
    assert await r.lookup_name("nodata.example.test") == []
    assert await r.lookup_name("nodata.example.test") == []
    stats = r.statistics()
    assert (stats.nodata, stats.queries, stats.cache_hits) == (1, 1, 1)
    # a name that exists with an A record only, in the walk: NODATA, then the /24 answers
    found = await r.lookup_address("192.0.2.14")
    assert found[0].record.public_key == KEY["A"]
    assert r.statistics().nodata == 2


async def test_answers_are_cached_until_their_ttl(knot: KnotServer) -> None:
    clock = FakeClock()
    r = make(knot, clock)
    await r.lookup_address("192.0.2.7")
    await r.lookup_address("192.0.2.7")
    assert r.statistics().queries == 1
    clock.now += 59
    await r.lookup_address("192.0.2.7")
    assert r.statistics().queries == 1
    clock.now += 2  # the record's TTL is 60 s
    found = await r.lookup_address("192.0.2.7")
    assert found[0].record.public_key == KEY["B"]
    assert r.statistics().queries == 2
    assert r.statistics().cache.expired == 1


async def test_concurrent_lookups_of_one_name_send_one_question(knot: KnotServer) -> None:
    r = make(knot, FakeClock())
    results: list[list[Found]] = []

    async def one() -> None:
        results.append(await r.lookup_address("192.0.2.99"))

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert len(results) == 20 and all(valid_keys(f) == [KEY["A"]] for f in results)
    assert r.statistics().queries == 2  # /32 NXDOMAIN and /24, once each
    assert r.statistics().coalesced >= 19


async def test_query_budget_bounds_a_lookup(knot: KnotServer) -> None:
    r = make(knot, FakeClock(), max_queries=2)
    with pytest.raises(DiscoveryError, match="budget"):
        await r.lookup_address("203.0.113.9")
    stats = r.statistics()
    assert (stats.queries, stats.budget_exhausted) == (2, 1)
    # the two answers are cached: the next lookup goes two names further
    assert await r.lookup_address("203.0.113.9") == []
    assert r.statistics().queries == 4


# -- records: rotation, revocation, malformed, oversized, multi-string --------------------------


async def test_rotation_two_records_both_keys_valid(knot: KnotServer) -> None:
    found = await make(knot).lookup_address("192.0.2.8")
    assert sorted(valid_keys(found)) == sorted([KEY["C"], KEY["D"]])
    assert {f.name for f in found} == {"_overflowd.8.2.0.192.in-addr.arpa"}


async def test_revocation_answers_and_vouches_for_no_key(knot: KnotServer) -> None:
    found = await make(knot).lookup_address("192.0.2.9")
    assert len(found) == 1 and found[0].record.public_key is None
    assert valid_keys(found) == []  # and the /24's key is not used for this host


async def test_malformed_record_is_ignored_and_counted(knot: KnotServer) -> None:
    r = make(knot, FakeClock())
    found = await r.lookup_address("192.0.2.10")
    assert found[0].record.public_key == KEY["A"]  # fell through to the /24
    assert r.statistics().records_malformed == 1
    await r.lookup_address("192.0.2.10")
    assert r.statistics().records_malformed == 1  # counted once, not per cache hit


async def test_oversized_record_is_ignored_and_counted(knot: KnotServer) -> None:
    r = make(knot)
    found = await r.lookup_address("192.0.2.11")  # > 1232 bytes: truncated, retried over TCP
    assert valid_keys(found) == [KEY["E"]]
    assert r.statistics().records_oversized == 1


async def test_a_record_whose_v_is_not_first_is_not_ours(knot: KnotServer) -> None:
    # protocol.md §5: v= is required and first; "k=...; v=OVF1; p=..." used to be accepted
    r = make(knot)
    found = await r.lookup_address("192.0.2.15")
    assert [(f.name, f.record.public_key) for f in found] == [
        ("_overflowd.2.0.192.in-addr.arpa", KEY["A"])  # fell through to the /24
    ]
    assert r.statistics().records_malformed == 1


async def test_multi_string_txt_is_joined(knot: KnotServer) -> None:
    found = await make(knot).lookup_address("192.0.2.12")
    assert found[0].record.public_key == KEY["F"]
    assert found[0].record.contacts[2].endswith("/2")


async def test_foreign_txt_is_not_ours_and_the_walk_goes_on(knot: KnotServer) -> None:
    r = make(knot)
    found = await r.lookup_address("192.0.2.13")
    assert found[0].record.public_key == KEY["A"]
    assert (r.statistics().records_foreign, r.statistics().records_malformed) == (1, 0)


# -- memory: large answers ---------------------------------------------------------------------


def _traced(before: int) -> int:
    gc.collect()  # inside own_objects_only: a scan of the test's objects, not the session's
    return tracemalloc.get_traced_memory()[0] - before


async def test_large_answers_are_not_cached_by_default(knot: KnotServer) -> None:
    """A zone answering 60 KiB for every name costs a failure entry per name, not 60 KiB."""
    r = make(knot, FakeClock())
    with pytest.raises(DiscoveryError, match="larger than 16384 bytes"):
        await r.lookup_name("first.big.test")  # warms dnspython and the resolver up
    assert r.statistics().queries == 1
    with pytest.raises(DiscoveryError, match="larger than"):
        await r.lookup_name("first.big.test")  # cached as a failure: not asked again
    assert r.statistics().queries == 1
    lookups = 40
    with own_objects_only():
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(lookups):
                with pytest.raises(DiscoveryError):
                    await r.lookup_name(f"n{i}.big.test")
            grown = _traced(before)
        finally:
            tracemalloc.stop()
    stats = r.statistics()
    assert stats.cache.too_large == lookups + 1 and stats.cache.positive_bytes == 0
    # each entry holds a name and a reason (~500 B); the answers were ~60 KiB each
    assert grown < lookups * 2048 < BIG_ANSWER_BYTES * lookups // 25, grown
    assert stats.cache.negative_bytes <= lookups * 1024 + 1024


async def test_cache_memory_stays_under_its_byte_cap(knot: KnotServer) -> None:
    """Answers the entry cap lets in still fit the total cap: LRU eviction by bytes."""
    cap = 512 * 1024
    r = make(knot, FakeClock(), cache_max_bytes=cap, cache_entry_max_bytes=128 * 1024)
    assert await r.lookup_name("first.big.test") == []  # none of the 30 records is ours
    assert r.statistics().records_foreign == 30
    lookups = 30  # 1.8 MB of answers into a 512 KiB cache
    with own_objects_only():
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for i in range(lookups):
                assert await r.lookup_name(f"n{i}.big.test") == []
                assert r.cache.statistics().positive_bytes <= cap
            grown = _traced(before)
        finally:
            tracemalloc.stop()
    stats = r.statistics().cache
    assert stats.evicted >= lookups + 1 - cap // BIG_ANSWER_BYTES
    assert stats.positive_entries * BIG_ANSWER_BYTES <= cap
    # what the allocator saw agrees with the cache's own count, and both are under the cap
    assert grown <= cap + 128 * 1024, grown
    assert stats.positive_bytes >= BIG_ANSWER_BYTES * stats.positive_entries


async def test_hints_table_is_bounded_in_bytes(knot: KnotServer) -> None:
    """Long u= URLs: the hints table holds fewer entries rather than more bytes."""
    one = Hint(None, LONG_URL, "_overflowd.255.0.0.10.in-addr.arpa", 0.0).footprint
    hints = RegistryHints(make(knot), max_bytes=10 * one, clock=FakeClock())
    addresses = [ipaddress.IPv4Address(f"10.0.0.{i}") for i in range(1, 41)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(hints.run)
            for address in addresses:
                assert hints.warm(address)
            while hints.statistics().lookups < len(addresses):
                assert hints.statistics().bytes <= 10 * one
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    stats = hints.statistics()
    assert stats.failures == 0 and stats.entries == 10 and stats.bytes <= 10 * one
    assert sum(hints.webhook_url(a) == LONG_URL for a in addresses) == 10


async def test_records_over_the_record_limit_are_dropped_before_caching(knot: KnotServer) -> None:
    r = make(knot, FakeClock())
    assert await r.lookup_name("a.huge.test") == []  # 12 records of 5000 bytes: none kept
    stats = r.statistics()
    assert stats.records_oversized == 12 and stats.cache.too_large == 0
    entry = r.cache.get("_overflowd.a.huge.test", 1000.0)
    assert entry is not None and entry.outcome is Outcome.ANSWER and entry.records == ()
    assert stats.cache.positive_bytes < 1024


# -- abuse zones --------------------------------------------------------------------------------


async def test_abuse_zone_contacts(knot: KnotServer) -> None:
    r = make(knot)
    [found] = await r.abuse_contacts("198.51.100.5")
    assert found.name == "5.100.51.198.abuse.example.test"
    assert found.contacts == ("mailto:abuse@example.org", "https://example.org/abuse")
    [found6] = await r.abuse_contacts("2001:db8::1")
    assert found6.contacts == ("mailto:abuse6@example.net",)
    assert await r.abuse_contacts("192.0.2.8") == []  # not a contact list: ignored, counted
    assert r.statistics().abuse_malformed == 1
    assert await r.abuse_contacts("203.0.113.1") == []


async def test_discover_consults_abuse_zones_after_overflowd_records(knot: KnotServer) -> None:
    d = await make(knot).discover("192.0.2.7")
    assert d.keys == [KEY["B"]]
    assert d.contacts == ("mailto:host7@example.net", "mailto:abuse@example.net")
    assert d.errors == ()
    d = await make(knot).discover("example.test")
    assert d.keys == [KEY["L"]] and d.abuse == ()


# -- trust of a report's key -------------------------------------------------------------------


async def test_observer_trust_dns_unknown_and_pinned(knot: KnotServer) -> None:
    r = make(knot)
    book = TrustBook()
    t = await observer_trust(r, book, NODE.public_key, now_ms=0, address="192.0.2.20")
    assert (t.level, t.source) == (TrustLevel.DNS, "dns: _overflowd.20.2.0.192.in-addr.arpa")
    stranger = NodeIdentity(seed=b"\x0a" * 32).public_key
    t = await observer_trust(r, book, stranger, now_ms=0, address="192.0.2.20")
    assert t.level is TrustLevel.UNKNOWN
    t = await observer_trust(
        r, book, KEY["L"], now_ms=0, address="203.0.113.1", domain="example.test"
    )
    assert (t.level, t.source) == (TrustLevel.DNS, "dns: _overflowd.example.test")
    pinned = TrustBook([PinnedKey(stranger, "edge")])
    before = r.statistics().queries
    t = await observer_trust(r, pinned, stranger, now_ms=0, address="192.0.2.66")
    assert t.level is TrustLevel.PINNED and r.statistics().queries == before  # no DNS needed
    # DNS down: no evidence, not an error
    t = await observer_trust(r, book, KEY["A"], now_ms=0, domain="example.org")
    assert t.level is TrustLevel.UNKNOWN


# -- a resolver that never answers --------------------------------------------------------------


async def test_a_resolver_that_never_answers(knot: KnotServer) -> None:
    received = 0
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def drop() -> None:
        nonlocal received
        while True:
            await sock.recv(4096)
            received += 1

    clock = FakeClock()
    settings = RegistrySettings(
        nameservers=(f"127.0.0.1:{port}",),
        timeout_s=0.3,
        max_queries=3,
        abuse_zones=("abuse.example.test",),
    )
    r = DnsRegistry(settings, clock=clock)
    with trio.fail_after(5), sock:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drop)
            started = time.monotonic()
            with pytest.raises(DiscoveryError, match=r"no answer within 0\.3s"):
                await r.lookup_address("192.0.2.7")
            # one question, one timeout: the walk stops at the first failure. The wall-clock
            # bound is the documented one (max_queries x timeout_s) with a margin for a loaded
            # machine; the question count below is what proves "one".
            assert time.monotonic() - started < settings.max_queries * settings.timeout_s + 2.0
            assert r.statistics().queries == 1
            # the failure is cached: asking again sends nothing and fails at once
            with pytest.raises(DiscoveryError):
                await r.lookup_address("192.0.2.7")
            assert r.statistics().queries == 1 and r.statistics().cache_hits == 1
            d = await r.discover("192.0.2.7")  # errors as values, both parts tried
            assert len(d.errors) == 2 and d.records == ()
            await trio.sleep(0.05)
            stats = r.statistics()
            assert stats.timeouts == 2 and stats.queries == 2
            assert received == 2  # one datagram per question: no retry storm
            clock.now += settings.failure_ttl_s + 1  # failures are remembered briefly only
            with pytest.raises(DiscoveryError):
                await r.lookup_address("192.0.2.7")
            assert r.statistics().queries == 3
            nursery.cancel_scope.cancel()


async def test_names_in_flight_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond MAX_INFLIGHT_NAMES names being asked, a question fails at once (counted)."""
    monkeypatch.setattr(dns_service, "MAX_INFLIGHT_NAMES", 2)
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))  # a resolver that never answers
    settings = RegistrySettings(nameservers=(f"127.0.0.1:{sock.getsockname()[1]}",), timeout_s=0.5)
    r = DnsRegistry(settings, clock=FakeClock())
    errors: list[str] = []

    async def one(name: str) -> None:
        try:
            await r.lookup_name(name)
        except DiscoveryError as exc:
            errors.append(str(exc))

    with trio.fail_after(5), sock:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(one, f"n{i}.example.test")
            await trio.sleep(0.1)
            [refused] = errors  # whichever started third (trio's order is not fixed)
            assert refused.endswith(": 2 names are being asked already")
    assert len(errors) == 3 and r.statistics().inflight_refused == 1
    assert r.statistics().queries == 2


def test_missing_knotd_fails_loudly_with_the_fix() -> None:
    with pytest.raises(KnotUnavailable, match="apt-get install knot"):
        find_knotd("/nonexistent")


def test_settings_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="not an IP address"):
        RegistrySettings(nameservers=("dns.example.net:53",))
    with pytest.raises(ValueError, match="port"):
        RegistrySettings(nameservers=("127.0.0.1:99999",))
    with pytest.raises(ValueError, match="pinned"):
        RegistrySettings(pinned=("not-a-key",))
    with pytest.raises(ValueError, match="cache_entry_max_bytes"):
        RegistrySettings(cache_entry_max_bytes=10)
    with pytest.raises(ValueError, match="cache_max_bytes"):
        RegistrySettings(cache_max_bytes=-1)
    policy = RegistrySettings(cache_max_bytes=2**20, cache_entry_max_bytes=4096).cache_policy()
    assert (policy.max_positive_bytes, policy.max_entry_bytes) == (2**20, 4096)
    s = RegistrySettings(
        nameservers=("127.0.0.1:5353", "[::1]:53", "::1", "192.0.2.1"),
        pinned=("edge=" + base64.b64encode(KEY["A"]).decode(),),
    )
    assert s.pinned_keys()[0].label == "edge"


# -- overflowd-query contact ---------------------------------------------------------------------


def contact(knot: KnotServer, home: Path, *args: str) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    argv = ["contact", *args, "--home", str(home), "--resolver", knot.address]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cmd_contact.main([*argv, "--abuse-zone", "abuse.example.test", "--timeout", "1"])
    return code, out.getvalue(), err.getvalue()


def test_contact_cli_shows_where_each_piece_came_from(knot: KnotServer, tmp_path: Path) -> None:
    code, out, _ = contact(knot, tmp_path, "192.0.2.20", "--json")
    assert code == 0
    doc = json.loads(out)
    [key] = doc["keys"]
    assert key["key"] == NODE.public_key_b64
    assert (key["trust"], key["sources"]) == ("dns", ["dns: _overflowd.20.2.0.192.in-addr.arpa"])
    assert doc["contacts"] == [
        {"uri": "mailto:n20@example.net", "source": "dns: _overflowd.20.2.0.192.in-addr.arpa"}
    ]
    # reports from that key in the store: in-band evidence and contacts join
    store = Store.open(default_url(tmp_path))
    try:
        signed = NODE.sign_report(make_payload(contacts=("mailto:inband@example.net",)))
        store.add_report(signed, received_ms=1_700_000_000_000, via="udp")
    finally:
        store.close()
    code, out, _ = contact(knot, tmp_path, "192.0.2.20", "--json")
    doc = json.loads(out)
    [key] = doc["keys"]
    assert key["sources"][-1] == "in-band" and key["in_band"]["reports"] == 1
    assert {"uri": "mailto:inband@example.net", "source": f"in-band: {NODE.fingerprint}"} in doc[
        "contacts"
    ]


def test_contact_cli_text_with_abuse_zone_and_pinned(knot: KnotServer, tmp_path: Path) -> None:
    code, out, _ = contact(knot, tmp_path, "192.0.2.7")
    assert code == 0
    assert "trust dns (dns: _overflowd.7.2.0.192.in-addr.arpa)" in out
    assert "contact mailto:abuse@example.net  (abuse-zone: 7.2.0.192.abuse.example.test)" in out
    code, out, _ = contact(knot, tmp_path, "example.test")
    assert "webhook https://example.test/h  (dns: _overflowd.example.test)" in out
    code, out, _ = contact(knot, tmp_path, "192.0.2.9")
    assert "revoked (empty p=) at _overflowd.9.2.0.192.in-addr.arpa" in out


def test_contact_cli_errors_are_one_line(knot: KnotServer, tmp_path: Path) -> None:
    code, _, err = contact(knot, tmp_path, "not an address")
    assert code == 1 and "neither an IP address nor a domain name" in err
    code, _, err = contact(knot, tmp_path, "example.org")  # REFUSED by our server
    assert code == 1 and err.splitlines()[-1].startswith("overflowd-query: error: nothing found")
    code, _, err = contact(knot, tmp_path, "192.0.2.7", "--resolver", "dns.example:53")
    # a bad flag value is a usage error: exit 2, naming the flag (operability issue)
    assert code == 2 and "--resolver" in err and "not an IP address" in err


# -- the resolver: refused at start as dnspython would, built by the first question (#16) ------

#: /etc/resolv.conf contents (None: no file); the registry must refuse exactly those that
#: dnspython's read_resolv_conf refuses, and say it in dnspython's words
RESOLV_CONFS = {
    "missing": None,
    "empty": "",
    "comments": "# nameserver 192.0.2.1\n; nameserver 192.0.2.2\n",
    "indented comment": "  # nameserver 192.0.2.1\n",
    "bare keyword": "nameserver\nsearch example.test\n",
    "other keys": "search example.test\noptions ndots:2\n",
    "one": "search example.test\nnameserver 127.0.0.1\n",
    "indented": "  nameserver 127.0.0.1 # a comment after it\n",
    "tab": "nameserver\t::1\n",
    "scoped": "nameserver fe80::1%eth0\nnameserver fe80::2%\n",
    "two scopes": "nameserver fe80::1%eth0%1\n",
    "https": "nameserver https://dns.example.test/dns-query\n",
    "a name": "nameserver localhost\n",
    "a bad second": "nameserver 127.0.0.1\nnameserver 192.0.2\n",
    "leading zero": "nameserver 127.0.0.01\n",
    "names": "domain example.test.\nsearch a.test b.test\nnameserver 127.0.0.1\n",
    "empty label": "domain a..test\nnameserver 127.0.0.1\n",
    "long label": f"search ok.test {'a' * 64}.test\nnameserver 127.0.0.1\n",
    "long name": f"search {'.'.join(['a' * 63] * 4)}\nnameserver 127.0.0.1\n",
    "before no nameserver": "search .test\n",
    "before a bad nameserver": "nameserver localhost\ndomain x..y\n",
}


@pytest.mark.parametrize("conf", RESOLV_CONFS)
def test_a_resolv_conf_dnspython_refuses_is_refused_when_the_registry_is_made(
    conf: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dns.exception
    import dns.resolver

    path = tmp_path / "resolv.conf"
    text = RESOLV_CONFS[conf]
    if text is not None:
        path.write_text(text)
    try:
        dns.resolver.Resolver(configure=False).read_resolv_conf(str(path))
        expected = None
    except (dns.exception.DNSException, ValueError) as exc:  # (ValueError: its setter)
        expected = str(exc)
    accepted = ("one", "indented", "tab", "scoped", "https", "names")
    assert (expected is None) == (conf in accepted)  # the table means it
    monkeypatch.setattr(dns_service, "RESOLV_CONF", str(path))
    if expected is None:
        DnsRegistry(RegistrySettings())
    else:
        with pytest.raises(DiscoveryError) as info:
            DnsRegistry(RegistrySettings())
        assert str(info.value) == (
            f"no registry.nameservers configured and {path} unusable: {expected}"
        )


async def test_concurrent_first_questions_share_the_resolver_they_build(knot: KnotServer) -> None:
    r = make(knot)
    answers: list[list[Found]] = []

    async def ask(address: str) -> None:
        answers.append(await r.lookup_address(address))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(ask, "192.0.2.7")
    assert len(answers) == 8
    assert all([(f.name, f.record.public_key) for f in a] == [
        ("_overflowd.7.2.0.192.in-addr.arpa", KEY["B"])
    ] for a in answers)  # fmt: skip


async def test_a_resolv_conf_emptied_after_start_fails_the_questions_not_the_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 127.0.0.1\n")
    monkeypatch.setattr(dns_service, "RESOLV_CONF", str(path))
    r = DnsRegistry(RegistrySettings(timeout_s=0.5))
    path.write_text("# nothing here any more\n")  # before the first question builds the resolver
    with trio.fail_after(5):
        with pytest.raises(DiscoveryError, match="unusable: no nameservers"):
            await r.lookup_address("192.0.2.7")
    assert r.statistics().failures == 1 and r.statistics().queries == 0
