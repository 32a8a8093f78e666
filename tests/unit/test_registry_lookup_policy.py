"""The pure parts of DNS lookups: names asked, abuse answers, parsing answers, the cache."""

from __future__ import annotations

import ipaddress

import pytest

from overflowd.errors import DecodeError
from overflowd.registry import (
    MAX_RECORDS_PER_NAME,
    CachePolicy,
    Found,
    KeyRecord,
    Outcome,
    TxtCache,
    abuse_zone_name,
    address_record_names,
    domain_record_name,
    format_record,
    parse_abuse_txt,
    parse_answer,
    reverse_name,
    valid_keys,
)

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
