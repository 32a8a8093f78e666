"""Properties of the registry's pure parts: parsers never raise anything but DecodeError, the
walk-up names nest, and the cache and trust book stay within their bounds.

Every failure these properties (or ``make fuzz``) found is kept as an ``@example``, so CI's
derandomized run replays it whatever it draws.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from overflowd.errors import DecodeError
from overflowd.registry import (
    MAX_RECORD_BYTES,
    CachedTxt,
    CachePolicy,
    KeyRecord,
    Outcome,
    TxtCache,
    address_record_names,
    as_address,
    entry_footprint,
    format_record,
    parse_abuse_txt,
    parse_answer,
    parse_record,
    split_txt,
)
from overflowd.trust import ContinuityPolicy, PinnedKey, TrustBook, TrustLevel

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

contacts = st.lists(
    st.from_regex(
        r"(mailto:[a-z0-9.]{1,20}@example\.net|https://example\.net/[a-z0-9/%]{0,40})",
        fullmatch=True,
    ),
    max_size=4,
)
keys = st.binary(min_size=32, max_size=32)
urls = st.none() | st.from_regex(r"https://[a-z]{1,20}\.example/[a-z0-9/?=&]{0,40}", fullmatch=True)
boosts = st.none() | st.integers(1, 1_000_000).map(float)
# DKIM-ish tag soup: likely tags and separators, so the parser's branches are reached
tag_soup = st.lists(
    st.one_of(
        st.sampled_from(
            ["v=OVF1", "v=OVF2", "k=ed25519", "k=rsa", "p=", "p=AAAA", "c=", "u=", "r=5"]
        ),
        st.sampled_from([";", " ", "=", "\t", ",", "\n"]),
        st.text(max_size=12),
    ),
    max_size=20,
).map("".join)


KEY_B64 = base64.b64encode(bytes([1]) * 32).decode()


def _first_tag(data: str | bytes | list[bytes]) -> str:
    raw = b"".join(data) if isinstance(data, list) else data
    text = raw.decode("ascii") if isinstance(raw, bytes) else raw
    return next((t.strip() for t in text.split(";") if t.strip()), "")


def _parse_or_decode_error(data: str | bytes | list[bytes]) -> None:
    try:
        rec = parse_record(data)
    except DecodeError:
        return
    assert isinstance(rec, KeyRecord)
    assert rec.public_key is None or len(rec.public_key) == 32
    assert rec.boost is None or 1 <= rec.boost <= 1e6
    # protocol.md §5: v is required and first
    assert re.fullmatch(r"v\s*=\s*OVF1", _first_tag(data)), data


@SETTINGS
@given(
    st.one_of(
        st.binary(max_size=600),
        st.text(max_size=300),
        tag_soup,
        st.lists(st.binary(max_size=255), max_size=20),
    )
)
@example(f"k=ed25519; v=OVF1; p={KEY_B64}")  # found: v= not first was accepted
@example(f"p={KEY_B64};v=OVF1")
def test_parse_record_any_input_is_a_record_or_decode_error(
    data: str | bytes | list[bytes],
) -> None:
    _parse_or_decode_error(data)


@SETTINGS
@given(keys, contacts, urls, boosts)
def test_format_then_parse_round_trips_whatever_the_split(
    key: bytes, cs: list[str], url: str | None, boost: float | None
) -> None:
    text = format_record(key, cs, url, boost)
    rec = parse_record([s.encode() for s in split_txt(text)])
    assert rec == KeyRecord(key, tuple(cs), url, boost)
    raw = text.encode()
    for cut in range(len(raw) + 1):  # truncated at every offset
        _parse_or_decode_error(raw[:cut])


@SETTINGS
@given(st.one_of(st.binary(max_size=600), st.text(max_size=300), tag_soup))
def test_parse_abuse_txt_any_input_is_contacts_or_decode_error(data: str | bytes) -> None:
    try:
        out = parse_abuse_txt(data)
    except DecodeError:
        return
    assert out and all(":" in c for c in out)


@SETTINGS
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=300),
            tag_soup.map(str.encode),
            st.binary(max_size=8).map(lambda b: b"v=OVF1; p=" + b * 600 + b"x" * MAX_RECORD_BYTES),
        ),
        max_size=12,
    )
)
def test_parse_answer_never_raises_and_accounts_for_every_record(records: list[bytes]) -> None:
    a = parse_answer(records)
    assert len(a.records) + a.foreign + a.malformed + a.oversized + a.excess <= len(records)


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address),
    st.integers(0, 2**128 - 1).map(ipaddress.IPv6Address),
    # IPv4-mapped (::ffff:0:0/96): 1 in 2**96 of the draws above, so drawn on purpose
    st.integers(0, 2**32 - 1).map(lambda i: ipaddress.IPv6Address((0xFFFF << 32) | i)),
)


@SETTINGS
@given(st.one_of(addresses, addresses.map(str)))
@example(ipaddress.IPv6Address("::ffff:192.0.2.7"))  # found: an object walked ip6.arpa
@example(ipaddress.IPv6Address("::ffff:0.0.0.0"))
def test_walk_names_nest_from_the_address_upwards(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address | str,
) -> None:
    names = [name for _plen, name in address_record_names(addr)]
    obj = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    mapped = obj.ipv4_mapped if isinstance(obj, ipaddress.IPv6Address) else None
    assert names[0] == "_overflowd." + (mapped or obj).reverse_pointer
    assert as_address(addr) == (mapped or obj)
    # text and object agree: the same walk whatever the caller holds
    assert names == [name for _plen, name in address_record_names(str(obj))]
    bare = [n.removeprefix("_overflowd.") for n in names]
    for longer, shorter in itertools.pairwise(bare):
        assert longer.endswith("." + shorter)
    assert all(len(n) <= 253 for n in names)


cache_ops = st.lists(
    st.tuples(
        st.sampled_from(["answer", "nxdomain", "nodata", "failure", "get"]),
        st.sampled_from([f"n{i}" for i in range(12)]),
        st.floats(0, 10_000, allow_nan=False),
        st.floats(0, 50, allow_nan=False),
        st.integers(0, 6),  # records in an answer
        st.integers(0, 3000),  # bytes per record
    ),
    max_size=80,
)


@SETTINGS
@given(cache_ops)
def test_cache_stays_bounded_and_never_returns_expired_entries(
    ops: list[tuple[str, str, float, float, int, int]],
) -> None:
    policy = CachePolicy(
        max_positive=3,
        max_negative=4,
        max_positive_bytes=8000,
        max_negative_bytes=2000,
        max_entry_bytes=6000,
        positive_ttl_cap_s=100,
        negative_ttl_cap_s=20,
        failure_ttl_s=5,
    )
    cache = TxtCache(policy)
    now = 0.0
    for op, name, ttl, step, n, size in ops:
        now += step
        if op == "answer":
            records = tuple(bytes([i]) * size for i in range(n))
            entry = cache.put_answer(name, records, ttl, now)
            too_large = entry_footprint(name, records) > policy.max_entry_bytes
            assert (entry.outcome is Outcome.FAILURE) == too_large
        elif op in ("nxdomain", "nodata"):
            cache.put_negative(name, Outcome(op), ttl, now)
        elif op == "failure":
            cache.put_failure(name, "x", now)
        else:
            entry = cache.get(name, now)
            assert entry is None or now < entry.expires_at
            if entry is not None and entry.outcome is not Outcome.ANSWER:
                # the cap, up to float rounding of (put time + cap) - now
                assert entry.expires_at - now <= 20 + 1e-9
        stats = cache.statistics()
        assert stats.positive_entries <= 3 and stats.negative_entries <= 4
        assert stats.positive_bytes <= 8000 and stats.negative_bytes <= 2000
        held: list[CachedTxt] = [*cache._positive.entries.values()]
        assert stats.positive_bytes == sum(e.footprint for e in held)
        held = [*cache._negative.entries.values()]
        assert stats.negative_bytes == sum(e.footprint for e in held)


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.integers(0, 15),
            st.integers(0, 3),
            st.integers(0, 5),
            st.integers(0, 10 * 86_400_000),
        ),
        max_size=60,
    )
)
def test_trust_book_stays_bounded_and_pins_win(obs: list[tuple[int, int, int, int]]) -> None:
    pinned = PinnedKey(bytes([0]) * 32, "pin")
    policy = ContinuityPolicy(max_keys=4, max_new_keys=3, min_networks=1, max_networks_per_key=2)
    book = TrustBook([pinned], policy)
    for k, c, net, t in obs:
        book.observe(
            bytes([k]) * 32,
            (f"mailto:{c}@example.net",),
            now_ms=t,
            network=f"10.{net}.0.0/24",
            label="pin" if k % 5 == 0 else None,
        )
        stats = book.statistics()
        assert stats.established <= 4 and stats.keys - stats.established <= 3
    assert book.assess(pinned.key).level is TrustLevel.PINNED
