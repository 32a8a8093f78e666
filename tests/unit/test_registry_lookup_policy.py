"""The pure parts of DNS lookups: names asked, abuse answers, parsing answers, the cache."""

from __future__ import annotations

import gc
import ipaddress
import tracemalloc

import pytest

from overflowd.errors import DecodeError
from overflowd.registry import (
    MAX_REASON_CHARS,
    MAX_RECORDS_PER_NAME,
    CachePolicy,
    Found,
    KeyRecord,
    Outcome,
    TxtCache,
    abuse_zone_name,
    address_record_names,
    as_address,
    domain_record_name,
    entry_footprint,
    format_record,
    parse_abuse_txt,
    parse_answer,
    reverse_name,
    valid_keys,
    walk_prefixes,
)
from tests.support.heap import own_objects_only

K1, K2 = bytes([1]) * 32, bytes([2]) * 32


def test_ipv4_walk_is_32_24_16_8() -> None:
    assert address_record_names("192.0.2.7") == [
        (32, "_overflowd.7.2.0.192.in-addr.arpa"),
        (24, "_overflowd.2.0.192.in-addr.arpa"),
        (16, "_overflowd.0.192.in-addr.arpa"),
        (8, "_overflowd.192.in-addr.arpa"),
    ]


def test_ipv6_walk_is_128_64_48_32_in_nibbles() -> None:
    names = dict(address_record_names("2001:db8:1:2::5"))
    assert list(names) == [128, 64, 48, 32]
    assert names[32] == "_overflowd.8.b.d.0.1.0.0.2.ip6.arpa"
    assert names[48] == "_overflowd.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    assert names[64] == "_overflowd.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"
    assert names[128].startswith("_overflowd.5.0.0.0.") and names[128].count(".") == 34


def test_reverse_name_agrees_with_the_stdlib_for_whole_addresses() -> None:
    for text in ("192.0.2.1", "2001:db8::abcd", "::", "255.255.255.255"):
        addr = ipaddress.ip_address(text)
        assert reverse_name(addr) == addr.reverse_pointer


def test_reverse_name_refuses_partial_labels() -> None:
    with pytest.raises(ValueError):
        reverse_name("192.0.2.1", 20)
    with pytest.raises(ValueError):
        reverse_name("2001:db8::", 50)


def test_mapped_ipv4_walks_in_addr_arpa() -> None:
    assert address_record_names("::ffff:192.0.2.7")[0][1] == "_overflowd.7.2.0.192.in-addr.arpa"


@pytest.mark.parametrize(
    "mapped", ["::ffff:192.0.2.7", ipaddress.IPv6Address("::ffff:192.0.2.7")], ids=["str", "obj"]
)
def test_mapped_ipv4_is_ipv4_in_every_function_whatever_its_type(
    mapped: str | ipaddress.IPv6Address,
) -> None:
    # an address object (a v6 socket's peer, an IPFIX v6 field) used to walk ip6.arpa
    v4 = ipaddress.IPv4Address("192.0.2.7")
    assert as_address(mapped) == v4
    assert address_record_names(mapped) == address_record_names(v4)
    assert walk_prefixes(mapped) == (32, 24, 16, 8)
    assert reverse_name(mapped) == reverse_name(v4) == "7.2.0.192.in-addr.arpa"
    assert reverse_name(mapped, 24) == "2.0.192.in-addr.arpa"
    assert abuse_zone_name(mapped, "abuse.example.test") == "7.2.0.192.abuse.example.test"


def test_abuse_zone_names() -> None:
    assert abuse_zone_name("192.0.2.7", "abuse.example.test.") == "7.2.0.192.abuse.example.test"
    name6 = abuse_zone_name("2001:db8::1", "Abuse.Example.Test")
    assert name6.startswith("1.0.0.0.") and name6.endswith(".8.b.d.0.1.0.0.2.abuse.example.test")


@pytest.mark.parametrize("bad", ["", ".", "a..b", "-a.test", "a b.test", "é.test", "x" * 64 + ".t"])
def test_bad_domains_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        domain_record_name(bad)


def test_domain_record_name_is_canonical() -> None:
    assert domain_record_name("Example.NET.") == "_overflowd.example.net"


def test_abuse_txt_contacts() -> None:
    assert parse_abuse_txt("abuse@example.net") == ("mailto:abuse@example.net",)
    assert parse_abuse_txt([b"abuse@example.net, ", b"https://example.net/abuse"]) == (
        "mailto:abuse@example.net",
        "https://example.net/abuse",
    )
    bad_inputs: list[str | bytes] = ["", "not a contact", b"\xff@x", "v=OVF1; p="]
    for bad in bad_inputs:
        with pytest.raises(DecodeError):
            parse_abuse_txt(bad)


def test_parse_answer_sorts_what_it_cannot_use() -> None:
    good = format_record(K1, ["mailto:a@example.net"]).encode()
    rotated = format_record(K2).encode()
    answer = parse_answer(
        [good, rotated, good, b"v=spf1 -all", b"v=OVF1; p=!!", b"v=OVF1; " + b"x" * 5000]
    )
    assert [r.public_key for r in answer.records] == [K1, K2]  # the duplicate counted once
    assert (answer.foreign, answer.malformed, answer.oversized) == (1, 1, 1)
    # v=OVF1 not first: refused, and counted as malformed (it claims to be ours)
    late_v = b"k=ed25519; v=OVF1; p=" + good.split(b"p=")[1]
    assert parse_answer([late_v]) == parse_answer([b"v=OVF1; p=!!"])
    many = [format_record(bytes([i]) * 32).encode() for i in range(MAX_RECORDS_PER_NAME + 3)]
    assert parse_answer(many).excess == 3


def test_valid_keys_leaves_revocations_out() -> None:
    found = [Found("n", KeyRecord(None)), Found("n", KeyRecord(K1)), Found("n", KeyRecord(K1))]
    assert valid_keys(found) == [K1]


# -- cache ------------------------------------------------------------------------------------


def test_answers_live_their_ttl_capped() -> None:
    cache = TxtCache(CachePolicy(positive_ttl_cap_s=100))
    cache.put_answer("A.example.", (b"x",), ttl_s=60, now=0)
    cache.put_answer("b.example", (b"y",), ttl_s=10_000, now=0)
    assert cache.get("a.example", 59.9) is not None
    assert cache.get("a.example", 60) is None
    assert cache.get("b.example", 99) is not None
    assert cache.get("b.example", 100) is None
    assert cache.statistics().expired == 2


def test_negative_ttl_follows_the_soa_but_is_capped_at_minutes() -> None:
    cache = TxtCache(CachePolicy(negative_ttl_cap_s=300, negative_ttl_default_s=60))
    assert cache.put_negative("a", Outcome.NXDOMAIN, 7200, 0).expires_at == 300
    assert cache.put_negative("b", Outcome.NODATA, 30, 0).expires_at == 30
    assert cache.put_negative("c", Outcome.NXDOMAIN, None, 0).expires_at == 60
    with pytest.raises(ValueError):
        cache.put_negative("d", Outcome.ANSWER, 1, 0)


def test_failures_are_cached_briefly() -> None:
    cache = TxtCache(CachePolicy(failure_ttl_s=30))
    entry = cache.put_failure("a", "timed out", now=5)
    assert entry.outcome is Outcome.FAILURE and entry.reason == "timed out"
    assert cache.get("a", 34) is not None and cache.get("a", 35) is None


def test_ttl_zero_is_never_cached() -> None:
    cache = TxtCache()
    cache.put_answer("a", (b"x",), 0, now=0)
    assert cache.get("a", 0) is None and len(cache) == 0


def test_negative_entries_cannot_push_out_answers() -> None:
    cache = TxtCache(CachePolicy(max_positive=2, max_negative=3))
    cache.put_answer("keep1", (b"x",), 60, 0)
    cache.put_answer("keep2", (b"x",), 60, 0)
    for i in range(100):
        cache.put_negative(f"random{i}", Outcome.NXDOMAIN, 60, 0)
    stats = cache.statistics()
    assert (stats.positive_entries, stats.negative_entries, stats.evicted) == (2, 3, 97)
    assert cache.get("keep1", 1) is not None and cache.get("keep2", 1) is not None


def test_least_recently_used_answer_is_evicted_first() -> None:
    cache = TxtCache(CachePolicy(max_positive=2))
    cache.put_answer("a", (b"x",), 60, 0)
    cache.put_answer("b", (b"x",), 60, 0)
    assert cache.get("a", 1) is not None  # a is now the most recently used
    cache.put_answer("c", (b"x",), 60, 0)
    assert cache.get("b", 1) is None and cache.get("a", 1) is not None


def test_an_answer_replaces_a_negative_entry() -> None:
    cache = TxtCache()
    cache.put_negative("a", Outcome.NXDOMAIN, 60, 0)
    cache.put_answer("a", (b"x",), 60, 1)
    entry = cache.get("a", 2)
    assert entry is not None and entry.outcome is Outcome.ANSWER
    assert cache.statistics().negative_entries == 0


def test_policy_refuses_negative_bounds() -> None:
    with pytest.raises(ValueError):
        CachePolicy(max_positive=-1)
    with pytest.raises(ValueError):
        CachePolicy(failure_ttl_s=-1)


# -- cache bytes -------------------------------------------------------------------------------


def _answer(i: int, n: int, size: int) -> tuple[str, tuple[bytes, ...]]:
    name = f"_overflowd.{i}.2.0.192.in-addr.arpa"
    return name, tuple(bytes([65 + j % 26]) * size + str(i).encode() for j in range(n))


@pytest.mark.parametrize(("n", "size"), [(0, 0), (1, 100), (1, 400), (3, 600), (30, 2000)])
def test_entry_footprint_is_an_upper_bound_of_what_tracemalloc_sees(n: int, size: int) -> None:
    """The cache's own byte count, checked once against the allocator (CPython 3.11)."""
    policy = CachePolicy(max_positive=10**6, max_positive_bytes=10**12, max_entry_bytes=10**9)
    count = 500
    with own_objects_only():
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            cache = TxtCache(policy)
            for i in range(count):
                name, records = _answer(i, n, size)
                cache.put_answer(name, records, 60, 0)
                del records
            gc.collect()
            measured = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
    estimated = cache.bytes
    assert measured <= estimated <= 2 * measured + 1024 * count // 10, (measured, estimated)


def test_answers_are_bounded_in_bytes_lru_first() -> None:
    big = 10_000
    cache = TxtCache(
        CachePolicy(
            max_positive_bytes=5 * entry_footprint("n00", (b"x" * big,)), max_entry_bytes=10**6
        )
    )
    for i in range(20):
        cache.put_answer(f"n{i:02d}", (b"x" * big,), 60, 0)
        assert cache.statistics().positive_bytes <= cache.policy.max_positive_bytes
    stats = cache.statistics()
    assert (stats.positive_entries, stats.evicted) == (5, 15)
    assert cache.get("n19", 1) is not None and cache.get("n14", 1) is None
    assert stats.positive_bytes == sum(
        entry_footprint(f"n{i:02d}", (b"x" * big,)) for i in range(15, 20)
    )


def test_an_answer_over_the_entry_cap_is_cached_as_a_failure() -> None:
    cache = TxtCache(CachePolicy(max_entry_bytes=16 * 1024, failure_ttl_s=30))
    entry = cache.put_answer("huge", tuple(b"y" * 2000 for _ in range(30)), 3600, 0)
    assert entry.outcome is Outcome.FAILURE and "larger than 16384 bytes" in entry.reason
    assert cache.get("huge", 29) == entry and cache.get("huge", 30) is None
    stats = cache.statistics()
    assert (stats.too_large, stats.positive_entries, stats.positive_bytes) == (1, 0, 0)
    assert stats.negative_bytes == 0  # expired and removed: the count follows


def test_byte_count_follows_replacement_expiry_and_clear() -> None:
    cache = TxtCache()
    cache.put_answer("a", (b"x" * 100,), 60, 0)
    cache.put_answer("a", (b"x" * 300,), 60, 0)  # replaced, not added
    assert cache.bytes == entry_footprint("a", (b"x" * 300,))
    cache.put_negative("a", Outcome.NXDOMAIN, 60, 0)  # an answer becomes a negative entry
    assert cache.statistics().positive_bytes == 0
    assert cache.statistics().negative_bytes == entry_footprint("a")
    cache.put_failure("b", "r" * 10_000, 0)  # reasons are cut to one line
    assert cache.get("b", 1) is not None and len(cache.get("b", 1).reason) == MAX_REASON_CHARS  # type: ignore[union-attr]
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_negative_entries_are_bounded_in_bytes() -> None:
    cache = TxtCache(CachePolicy(max_negative_bytes=10 * entry_footprint("x" * 200)))
    for i in range(100):
        cache.put_negative(f"{i:03d}" + "x" * 197, Outcome.NXDOMAIN, 60, 0)
    stats = cache.statistics()
    assert stats.negative_entries == 10 and stats.negative_bytes <= 10 * entry_footprint("x" * 200)
