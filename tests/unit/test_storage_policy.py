"""The admission policy for received reports (overflowd/storage_policy.py), as a library call.

Pure: counts in, verdicts out, the clock an argument. Each budget is shown refusing exactly
at its limit, and the memory tables are shown staying at their caps under a flood of keys and
sender networks.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from overflowd.config import StorageSettings, parse_settings
from overflowd.errors import ConfigError
from overflowd.storage_policy import (
    REFUSAL_REASONS,
    ROW_OVERHEAD_BYTES,
    KeyUsage,
    PrunedRow,
    StoragePolicy,
    row_bytes,
)

NOW = 1_700_000_000.0
DAY = 86_400.0
BIG = StorageSettings(
    received_max_bytes=10**12,
    received_max_reports=10**9,
    received_max_reports_per_key=10**9,
    received_max_reports_per_sender=10**9,
    new_keys_max_fraction=1.0,
)


def key(n: int) -> bytes:
    return n.to_bytes(32, "big")


def policy(**kw: object) -> StoragePolicy:
    return StoragePolicy(dataclasses.replace(BIG, **kw))  # type: ignore[arg-type]


def test_per_key_cap() -> None:
    p = policy(received_max_reports_per_key=3)
    verdicts = [p.admit(key(1), "192.0.2.1", 500, NOW) for _ in range(5)]
    assert verdicts == [None, None, None, "per_key", "per_key"]
    assert p.admit(key(2), "192.0.2.1", 500, NOW) is None  # another key is not affected
    assert p.statistics().refused["per_key"] == 2


def test_per_sender_network_cap_is_per_24_and_per_48() -> None:
    p = policy(received_max_reports_per_sender=2)
    assert p.admit(key(1), "192.0.2.1", 500, NOW) is None
    assert p.admit(key(2), "192.0.2.200", 500, NOW) is None  # same /24, other key
    assert p.admit(key(3), "192.0.2.9", 500, NOW) == "per_sender"
    assert p.admit(key(4), "192.0.3.1", 500, NOW) is None  # the next /24
    assert p.admit(key(5), "2001:db8:1:ffff::1", 500, NOW) is None
    assert p.admit(key(6), "2001:db8:1::2", 500, NOW) is None
    assert p.admit(key(7), "2001:db8:1:1::3", 500, NOW) == "per_sender"  # same /48
    assert p.admit(key(8), "::ffff:192.0.2.77", 500, NOW) == "per_sender"  # mapped = IPv4


def test_total_count_and_bytes() -> None:
    p = policy(received_max_reports=3)
    assert [p.admit(key(i), f"10.{i}.0.1", 100, NOW) for i in range(4)][-1] == "total_reports"
    p = policy(received_max_bytes=3 * row_bytes(100))
    assert [p.admit(key(i), f"10.{i}.0.1", 100, NOW) for i in range(3)] == [None] * 3
    assert p.admit(key(9), "10.9.0.1", 1, NOW) == "total_bytes"
    s = p.statistics()
    assert s.received_bytes == 3 * (100 + ROW_OVERHEAD_BYTES) and s.received_reports == 3


def test_new_keys_share_a_pool_established_keys_go_on() -> None:
    """Throwaway keys fill their pool; a key first stored two days ago keeps being admitted."""
    p = policy(
        received_max_reports=100,
        new_keys_max_fraction=0.25,
        established_after_s=DAY,
        established_min_reports=1,
    )
    old = KeyUsage(key(0), reports=1, bytes=row_bytes(500), first_ms=int((NOW - 2 * DAY) * 1000))
    p.seed(reports=1, bytes_=old.bytes, keys=[old], senders=[], now=NOW)
    verdicts = [p.admit(key(1000 + i), f"10.{i}.0.1", 500, NOW) for i in range(40)]
    assert verdicts.count(None) == 25 and verdicts[25:] == ["new_keys"] * 15
    assert all(p.admit(key(0), "198.51.100.1", 500, NOW + i) is None for i in range(50))
    # ...and a new key becomes established after established_after_s: out of the pool.
    assert p.admit(key(1000), "10.0.0.1", 500, NOW + DAY) is None
    assert p.statistics().new_key_reports == 24


def test_headroom_refuses_everything_until_cleared() -> None:
    p = policy()
    p.set_headroom_short(True)
    assert p.admit(key(1), "192.0.2.1", 10, NOW) == "headroom"
    p.set_headroom_short(False)
    assert p.admit(key(1), "192.0.2.1", 10, NOW) is None


def test_forget_frees_what_was_pruned() -> None:
    p = policy(received_max_reports_per_key=2, received_max_reports_per_sender=2)
    for _ in range(2):
        assert p.admit(key(1), "192.0.2.1", 100, NOW) is None
    assert p.admit(key(1), "192.0.2.1", 100, NOW) == "per_key"
    p.forget([PrunedRow(key(1), "192.0.2.0/24", row_bytes(100))])
    assert p.admit(key(1), "192.0.2.1", 100, NOW) is None
    assert p.statistics().received_reports == 2


def test_seed_counts_per_key_and_per_sender() -> None:
    p = policy(received_max_reports_per_key=5, received_max_reports_per_sender=7)
    first = int((NOW - 3 * DAY) * 1000)
    p.seed(
        reports=10,
        bytes_=10 * row_bytes(500),
        keys=[KeyUsage(key(1), 5, 5 * row_bytes(500), first)],
        senders=[("192.0.2.0/24", 7)],
        now=NOW,
    )
    assert p.admit(key(1), "198.51.100.1", 500, NOW) == "per_key"
    assert p.admit(key(2), "192.0.2.1", 500, NOW) == "per_sender"
    assert p.statistics().received_reports == 10


def test_tables_stay_bounded_under_a_flood_of_keys_and_networks() -> None:
    """50,000 keys from 50,000 networks: the tables never pass their caps, and an established
    key's entry survives (new keys only push out new keys)."""
    p = policy(max_tracked_keys=100, max_tracked_senders=50, established_after_s=DAY)
    old = KeyUsage(key(0), 1, row_bytes(500), int((NOW - 2 * DAY) * 1000))
    p.seed(reports=1, bytes_=old.bytes, keys=[old], senders=[], now=NOW)
    for i in range(50_000):
        assert p.admit(key(10 + i), f"10.{i // 256 % 256}.{i % 256}.1", 500, NOW) is None
        s = p.statistics()
        assert s.tracked_keys <= 201 and s.tracked_senders <= 50
    assert p._established.get(key(0)) is not None  # white box: the old key is still known
    assert p.statistics().new_key_reports == 50_000  # orphaned rows still count in the pool


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(0, 5), st.integers(1, 1200), st.booleans()),
        max_size=300,
    )
)
def test_the_budgets_hold_whatever_comes(events: list[tuple[int, int, int, bool]]) -> None:
    """Any mix of admissions and prunes: what is admitted never passes any budget."""
    s = dataclasses.replace(
        BIG,
        received_max_bytes=20_000,
        received_max_reports=25,
        received_max_reports_per_key=4,
        received_max_reports_per_sender=10,
        new_keys_max_fraction=0.5,
        established_after_s=10.0,
        established_min_reports=2,
        max_tracked_keys=8,
    )
    p = StoragePolicy(s)
    stored: list[PrunedRow] = []
    by_new_key: list[bool] = []  # was the row admitted for a key in the new-key table?
    for i, (k, net, size, prune) in enumerate(events):
        now = NOW + i
        if prune and stored:
            p.forget([stored.pop(0)])
            by_new_key.pop(0)
            continue
        verdict = p.admit(key(k), f"10.0.{net}.1", size, now)
        assert verdict is None or verdict in REFUSAL_REASONS
        if verdict is None:
            stored.append(PrunedRow(key(k), f"10.0.{net}.0/24", row_bytes(size)))
            by_new_key.append(key(k) in p._new)  # white box
        assert len(stored) <= s.received_max_reports
        assert sum(r.bytes for r in stored) <= s.received_max_bytes
        for net_id in range(6):
            # the per-network cap limits new keys only (established ones are never refused it)
            in_net = [
                new
                for r, new in zip(stored, by_new_key, strict=True)
                if r.sender_net == f"10.0.{net_id}.0/24"
            ]
            assert sum(in_net) <= 10
        st_ = p.statistics()
        assert st_.received_reports == len(stored)
        assert st_.new_key_reports <= s.new_keys_max_fraction * s.received_max_reports


def test_per_sender_cap_never_refuses_an_established_key() -> None:
    """Sources are spoofable: strangers filling an established observer's /24 with new keys
    are refused there themselves; the observer is not."""
    p = policy(received_max_reports_per_sender=3, established_after_s=DAY)
    old = KeyUsage(key(0), 1, row_bytes(500), int((NOW - 2 * DAY) * 1000))
    p.seed(reports=1, bytes_=old.bytes, keys=[old], senders=[("192.0.2.0/24", 1)], now=NOW)
    assert [p.admit(key(10 + i), "192.0.2.99", 500, NOW) for i in range(3)] == [
        None,
        None,
        "per_sender",
    ]
    assert all(p.admit(key(0), "192.0.2.1", 500, NOW) is None for _ in range(5))


def test_a_refused_report_does_not_start_a_keys_age() -> None:
    p = policy(received_max_reports=10, new_keys_max_fraction=0.1, established_after_s=DAY)
    assert p.admit(key(1), "10.0.0.1", 500, NOW) is None  # fills the pool (1 report)
    assert p.admit(key(2), "10.0.1.1", 500, NOW) == "new_keys"
    assert p.statistics().tracked_keys == 1  # key(2) left no entry...
    p.forget([PrunedRow(key(1), "10.0.0.0/24", row_bytes(500))])
    # ...so a day later it is still a new key, first stored now
    assert p.admit(key(2), "10.0.1.1", 500, NOW + DAY) is None
    assert p._new[key(2)].first_ms == int((NOW + DAY) * 1000)  # white box


def test_age_alone_does_not_establish_a_key() -> None:
    """One report, then a day's wait, is free: a key leaves the pool only with
    established_min_reports stored reports as well."""
    p = policy(established_after_s=DAY, established_min_reports=3)
    for n in range(2):
        assert p.admit(key(1), "10.0.0.1", 500, NOW + n) is None
    assert p.admit(key(1), "10.0.0.1", 500, NOW + 2 * DAY) is None  # aged, but 2 < 3 before it
    assert key(1) in p._new and p.statistics().new_key_reports == 3
    assert p.admit(key(1), "10.0.0.1", 500, NOW + 2 * DAY) is None  # 3 stored and aged
    assert key(1) in p._established and p.statistics().new_key_reports == 0


def test_promotion_never_evicts_an_established_key() -> None:
    p = policy(max_tracked_keys=2, established_after_s=DAY, established_min_reports=1)
    first = int((NOW - 2 * DAY) * 1000)
    p.seed(
        reports=2,
        bytes_=2 * row_bytes(500),
        keys=[
            KeyUsage(key(0), 1, row_bytes(500), first),
            KeyUsage(key(1), 1, row_bytes(500), first),
        ],
        senders=[],
        now=NOW,
    )
    assert p.admit(key(2), "10.0.0.1", 500, NOW) is None
    assert p.admit(key(2), "10.0.0.1", 500, NOW + DAY) is None  # due, but the table is full
    assert set(p._established) == {key(0), key(1)} and key(2) in p._new
    # an established key whose reports are all pruned frees its place
    p.forget([PrunedRow(key(0), None, row_bytes(500))])
    assert p.admit(key(2), "10.0.0.1", 500, NOW + DAY) is None
    assert set(p._established) == {key(1), key(2)}


def test_refund_gives_back_every_count() -> None:
    p = policy(
        received_max_reports_per_key=2,
        received_max_reports_per_sender=2,
        received_max_reports=4,
        new_keys_max_fraction=0.5,
        established_after_s=DAY,
    )
    for _ in range(2):
        assert p.admit(key(1), "10.0.0.1", 500, NOW) is None
    before = p.statistics()
    assert p.admit(key(1), "10.0.0.1", 500, NOW) == "per_key"
    for _ in range(2):
        p.refund(key(1), "10.0.0.1", 500)
    s = p.statistics()
    assert (s.received_reports, s.received_bytes, s.new_key_reports, s.tracked_keys) == (0, 0, 0, 0)
    assert s.refunded == 2 and s.tracked_senders == 0 and before.received_reports == 2
    for _ in range(2):  # per key, per sender, pool: all free again
        assert p.admit(key(1), "10.0.0.1", 500, NOW) is None


def test_storage_config_is_strict() -> None:
    s = parse_settings("[storage]\nreceived_max_bytes = 1000\nreceived_max_age_days = 7\n")
    assert s.storage.received_max_bytes == 1000 and s.storage.received_max_age_days == 7.0
    for bad, what in [
        ("min_free_fraction = 1.5", "storage.min_free_fraction"),
        ("received_max_reports = 0", "storage.received_max_reports"),
        ("max_database_bytes = -1", "storage.max_database_bytes"),
        ("prune_interval_s = 0", "storage.prune_interval_s"),
        ("established_min_reports = -1", "storage.established_min_reports"),
        ("received_max_bytes = '300MB'", "storage.received_max_bytes"),
        ("max_age_days = 3", "storage.max_age_days"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(what)):
            parse_settings(f"[storage]\n{bad}\n", "node.toml")
