"""Budgets, de-duplication and confinement (overflowd.notify): the node is never an amplifier.

The central property: for any sequence of (target, flow, time) inputs, the messages allowed in
any window never exceed ``burst + rate × window``, globally and per target prefix, and the
tables never exceed their caps — whatever evictions happen on the way.
"""

from __future__ import annotations

import ipaddress
import random
from collections import defaultdict
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overflowd import notify
from overflowd.notify import Budget, BudgetSettings, Confinement, FlowKey, flow_key, plan_inband
from overflowd.report import Flow

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ip = ipaddress.ip_address

#: Targets over a few /24s and /48s, with an IPv4-mapped alias that must share its IPv4 bucket.
TARGETS = [
    ip("192.0.2.1"),
    ip("192.0.2.200"),
    ip("198.51.100.7"),
    ip("203.0.113.9"),
    ip("2001:db8::1"),
    ip("2001:db8:0:ffff::2"),
    ip("2001:db8:1::1"),
    ip("::ffff:198.51.100.8"),
]
FLOWS = [
    FlowKey(ip("192.0.2.1"), ip("198.51.100.7"), 17, 53, port) for port in (1000, 1001, 1002)
] + [FlowKey(ip("2001:db8::1"), ip("2001:db8:1::1"), 6, 443, 50000)]


def _allowed_in_windows(times: list[int]) -> list[tuple[int, int]]:
    """For each pair of allowed events i ≤ j: (count in [t_i, t_j], t_j - t_i) — the windows
    that can hold the most events all start and end at an event."""
    out = []
    for i in range(len(times)):
        for j in range(i, len(times)):
            out.append((j - i + 1, times[j] - times[i]))
    return out


def _within_budget(times: list[int], per_s: float, burst: int) -> bool:
    return all(
        count <= burst + span_us * per_s / 1_000_000 + 1e-9
        for count, span_us in _allowed_in_windows(times)
    )


budget_settings = st.builds(
    BudgetSettings,
    global_per_s=st.sampled_from([0.5, 1.0, 3.0, 7.5, 100.0]),
    burst=st.integers(1, 6),
    per_prefix_per_s=st.sampled_from([0.2, 1.0, 2.5]),
    per_prefix_burst=st.integers(1, 4),
    dedup_window_s=st.sampled_from([0.0, 0.5, 2.0, 30.0]),
    max_prefixes=st.integers(1, 5),
    max_dedup_entries=st.integers(1, 6),
)
steps = st.lists(
    st.tuples(
        st.integers(0, len(TARGETS) - 1),
        st.integers(0, len(FLOWS) - 1),
        # Mostly small steps forward in milliseconds; sometimes a jump, sometimes backwards.
        st.one_of(st.integers(0, 300), st.integers(-500, 5_000)),
    ),
    max_size=120,
)


@SETTINGS
@given(budget_settings, steps)
def test_allowed_messages_never_exceed_the_budget(s: BudgetSettings, ops: list) -> None:  # type: ignore[type-arg]
    budget = Budget(s)
    now_ms, clock_us = 10_000, -(2**62)
    global_times: list[int] = []
    prefix_times: dict[tuple[int, int], list[int]] = defaultdict(list)
    for target_i, flow_i, dt_ms in ops:
        now_ms += dt_ms
        target = TARGETS[target_i]
        allowed = budget.allow(target, FLOWS[flow_i], now_ms / 1000)
        clock_us = max(clock_us, now_ms * 1000)  # the budget never lets time go backwards
        if allowed:
            global_times.append(clock_us)
            prefix_times[notify.prefix_of(target)].append(clock_us)
        stats = budget.statistics()
        assert stats.prefixes <= s.max_prefixes
        assert stats.dedup_entries <= s.max_dedup_entries
    assert _within_budget(global_times, s.global_per_s, s.burst)
    for times in prefix_times.values():
        assert _within_budget(times, s.per_prefix_per_s, s.per_prefix_burst)
    stats = budget.statistics()
    assert stats.allowed == len(global_times)
    assert stats.allowed + sum(stats.dropped.values()) == len(ops)
    assert set(stats.dropped) == set(notify.DROP_REASONS)


@SETTINGS
@given(steps)
def test_dedup_is_exact_when_the_table_holds_a_window(ops: list) -> None:  # type: ignore[type-arg]
    s = BudgetSettings(global_per_s=5.0, burst=5, dedup_window_s=2.0, max_dedup_entries=100)
    assert not [w for w in s.warnings() if "dedup" in w]
    budget = Budget(s)
    now_ms = 0
    last_sent: dict[tuple[notify.Address, FlowKey], int] = {}
    for target_i, flow_i, dt_ms in ops:
        now_ms = max(now_ms, now_ms + dt_ms)
        key = (notify.normalize(TARGETS[target_i]), FLOWS[flow_i])
        if budget.allow(TARGETS[target_i], FLOWS[flow_i], now_ms / 1000):
            if key in last_sent:
                assert now_ms - last_sent[key] >= 2000
            last_sent[key] = now_ms


def test_token_bucket_burst_then_rate() -> None:
    s = BudgetSettings(global_per_s=2.0, burst=3, per_prefix_per_s=100, per_prefix_burst=100)
    budget = Budget(s)
    targets = [ip(f"198.51.100.{i}") for i in range(1, 50)]
    flow = FLOWS[0]
    assert [budget.allow(t, flow, 0.0) for t in targets[:4]] == [True, True, True, False]
    assert not budget.allow(targets[4], flow, 0.49)
    assert budget.allow(targets[5], flow, 0.5)  # one token every 0.5 s
    assert not budget.allow(targets[6], flow, 0.5)
    assert budget.statistics().dropped["global_budget"] == 3


def test_per_prefix_budget_groups_v4_24_and_v6_48() -> None:
    s = BudgetSettings(per_prefix_per_s=1.0, per_prefix_burst=2)
    budget = Budget(s)
    f = FLOWS[0]
    assert budget.allow(ip("192.0.2.1"), f, 0)
    assert budget.allow(ip("192.0.2.254"), f, 0)
    assert not budget.allow(ip("::ffff:192.0.2.77"), f, 0)  # the same /24, mapped
    assert budget.allow(ip("192.0.3.1"), f, 0)  # the next /24 has its own bucket
    assert budget.allow(ip("2001:db8:0:1::1"), f, 0)
    assert budget.allow(ip("2001:db8:0:ffff::1"), f, 0)
    assert not budget.allow(ip("2001:db8::abcd"), f, 0)  # the same /48
    assert budget.allow(ip("2001:db8:1::1"), f, 0)
    assert budget.statistics().dropped["prefix_budget"] == 2


def test_evicting_a_refilling_prefix_never_refills_it() -> None:
    s = BudgetSettings(per_prefix_per_s=1.0, per_prefix_burst=2, max_prefixes=1)
    budget = Budget(s)
    a, b = ip("192.0.2.1"), ip("198.51.100.1")
    assert budget.allow(a, FLOWS[0], 0) and budget.allow(a, FLOWS[1], 0)
    assert not budget.allow(a, FLOWS[2], 0)  # A is empty
    assert budget.allow(b, FLOWS[0], 0)  # B evicts A (the table holds one prefix)
    assert budget.statistics().prefix_evictions == 1
    # A, forgotten, comes back no fuller than it was: empty until it refills.
    assert not budget.allow(a, FLOWS[2], 0.5)
    assert budget.allow(a, FLOWS[2], 1.0)
    assert budget.statistics().prefixes == 1


def test_full_buckets_are_forgotten_without_eviction() -> None:
    s = BudgetSettings(per_prefix_per_s=10.0, per_prefix_burst=1, max_prefixes=2)
    budget = Budget(s)
    for i in range(100):
        assert budget.allow(ip(f"10.{i}.0.1"), FLOWS[0], i * 1.0)
    stats = budget.statistics()
    assert stats.prefixes == 1 and stats.prefix_evictions == 0


def test_dedup_window_and_early_eviction_are_counted() -> None:
    s = BudgetSettings(dedup_window_s=10.0, max_dedup_entries=2)
    budget = Budget(s)
    t = ip("192.0.2.1")
    assert budget.allow(t, FLOWS[0], 0)
    assert not budget.allow(t, FLOWS[0], 9.9)
    assert budget.allow(t, FLOWS[0], 10.0)
    assert budget.allow(ip("192.0.2.2"), FLOWS[0], 10.0)  # another target: another entry
    assert budget.allow(t, FLOWS[1], 10.0)  # table full: the oldest goes early
    stats = budget.statistics()
    assert stats.dropped["duplicate"] == 1
    assert stats.dedup_evictions == 1 and stats.dedup_entries == 2


def test_flood_of_distinct_spoofed_flows_stays_within_budget_and_memory() -> None:
    """100k flows from random sources to random targets over 10 s: the budget, and no more."""
    s = BudgetSettings(
        global_per_s=100.0, burst=200, per_prefix_per_s=1.0, per_prefix_burst=10,
        max_prefixes=1000, max_dedup_entries=1000,
    )  # fmt: skip
    budget = Budget(s)
    rng = random.Random(4)
    allowed = 0
    for i in range(100_000):
        target = ipaddress.IPv4Address(rng.getrandbits(32))
        flow = FlowKey(ipaddress.IPv4Address(rng.getrandbits(32)), target, 17, 123, i & 0xFFFF)
        allowed += budget.allow(target, flow, i / 10_000)
    stats = budget.statistics()
    assert allowed == stats.allowed <= 200 + 100 * 10
    assert stats.prefixes <= 1000 and stats.dedup_entries <= 1000
    assert stats.dropped["global_budget"] == 100_000 - allowed


def test_settings_are_checked_and_warn_when_tables_are_small() -> None:
    assert BudgetSettings().warnings() == []
    with pytest.raises(ValueError):
        BudgetSettings(global_per_s=0)
    with pytest.raises(ValueError):
        BudgetSettings(burst=0)
    with pytest.raises(ValueError):
        BudgetSettings(dedup_window_s=float("nan"))
    warnings = BudgetSettings(max_prefixes=10, max_dedup_entries=10).warnings()
    assert len(warnings) == 2
    with pytest.raises(ValueError):
        Budget().allow(TARGETS[0], FLOWS[0], float("inf"))


# -- confinement ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "address", "reason"),
    [
        ((), "192.0.2.1", "not_allowed"),
        ((), "2001:db8::1", "not_allowed"),
        (("192.0.2.0/24",), "192.0.2.1", None),
        (("192.0.2.0/24",), "192.0.3.1", "not_allowed"),
        (("192.0.2.0/24",), "::ffff:192.0.2.1", None),
        (("2001:db8::/32",), "::ffff:192.0.2.1", "not_allowed"),
        (("0.0.0.0/0",), "224.0.0.1", "special"),
        (("0.0.0.0/0",), "255.255.255.255", "special"),
        (("0.0.0.0/0",), "0.0.0.0", "special"),
        (("0.0.0.0/0",), "240.0.0.1", "special"),
        (("0.0.0.0/0",), "127.0.0.1", "special"),
        (("0.0.0.0/0",), "169.254.1.1", "special"),
        (("::/0",), "::1", "special"),
        (("::/0",), "::ffff:127.0.0.1", "not_allowed"),  # it is IPv4: ::/0 does not cover it
        (("0.0.0.0/0", "::/0"), "::ffff:127.0.0.1", "special"),
        (("::/0",), "fe80::1", "special"),
        (("::/0",), "ff02::1", "special"),
        (("127.0.0.0/8",), "127.0.0.1", None),
        (("::1/128",), "::1", None),
        (("0.0.0.0/0", "::/0"), "198.51.100.1", None),
    ],
)
def test_confinement(allowed: tuple[str, ...], address: str, reason: str | None) -> None:
    assert Confinement.from_strings(allowed).refuse(ip(address)) == reason


def test_confinement_refuses_bad_prefixes() -> None:
    with pytest.raises(ValueError, match=r"192\.0\.2\.1/24"):
        Confinement.from_strings(["192.0.2.1/24"])


# -- plans ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Report:
    payload: _Payload


@dataclass(frozen=True)
class _Payload:
    flow: Flow


def _report(src: str, dst: str, sport: int = 53) -> _Report:
    flow = Flow(ip(src), ip(dst), sport, 40000, 17, 10, 1000, 0, 1)
    return _Report(_Payload(flow))


def test_plan_sends_to_both_ends_within_confinement() -> None:
    conf = Confinement.from_strings(["192.0.2.0/24", "198.51.100.0/24"])
    budget = Budget()
    assert plan_inband(_report("192.0.2.1", "198.51.100.1"), budget, 0, conf) == [
        ip("192.0.2.1"),
        ip("198.51.100.1"),
    ]
    assert plan_inband(_report("192.0.2.1", "203.0.113.1", 54), budget, 0, conf) == [
        ip("192.0.2.1")
    ]
    assert budget.statistics().dropped["not_allowed"] == 1


def test_plan_default_confinement_sends_nothing() -> None:
    budget = Budget()
    assert plan_inband(_report("192.0.2.1", "198.51.100.1"), budget, 0, Confinement()) == []
    stats = budget.statistics()
    assert stats.allowed == 0 and stats.dropped["not_allowed"] == 2


def test_plan_flow_to_itself_gets_one_datagram_and_repeats_are_deduplicated() -> None:
    conf = Confinement.from_strings(["192.0.2.0/24"])
    budget = Budget()
    assert plan_inband(_report("192.0.2.1", "192.0.2.1"), budget, 0, conf) == [ip("192.0.2.1")]
    assert plan_inband(_report("192.0.2.1", "192.0.2.1"), budget, 1, conf) == []
    assert budget.statistics().dropped["duplicate"] == 1


def test_flow_key_reads_reports_and_records_alike() -> None:
    f = Flow(ip("192.0.2.1"), ip("198.51.100.1"), 1, 2, 6, 10, 1000, 0, 1)
    assert flow_key(f) == FlowKey(ip("192.0.2.1"), ip("198.51.100.1"), 6, 1, 2)


def test_channels_sharing_a_budget_deduplicate_apart_but_spend_together() -> None:
    budget = Budget(BudgetSettings(global_per_s=1.0, burst=2))
    t = ip("192.0.2.1")
    assert budget.allow(t, FLOWS[0], 0, channel="inband")
    assert budget.allow(t, FLOWS[0], 0, channel="webhook")  # not a duplicate of the datagram
    assert not budget.allow(t, FLOWS[1], 0, channel="webhook")  # but the budget is shared
    assert not budget.allow(t, FLOWS[0], 5, channel="inband")  # a duplicate in its own channel
    assert budget.statistics().dropped == {
        "not_allowed": 0,
        "special": 0,
        "duplicate": 1,
        "prefix_budget": 0,
        "global_budget": 1,
    }


def _max_window_excess(times_us: list[int], per_s: float) -> float:
    """max over windows [t_i, t_j] of count − rate × length, in O(n) (times sorted)."""
    best, excess = float("-inf"), float("-inf")
    for j, t in enumerate(times_us):
        best = max(best, t * per_s / 1e6 - j)
        excess = max(excess, j + 1 - t * per_s / 1e6 + best)
    return excess


@pytest.mark.parametrize("timeline", ["trace-time", "replay-as-fast-as-possible"])
def test_whole_shared_trace_at_rate_1_stays_within_budget(timeline: str) -> None:
    """Every record of the shared trace (real public addresses) reported, both ends allowed:
    what the budgets let through stays within them, per prefix and in total, in bounded tables.
    Pure: nothing is sent anywhere."""
    from overflowd.wire import CaptureReader, DecoderState, decode_datagram
    from tests.support.trace import netflow_v5_trace

    s = BudgetSettings(max_prefixes=256, max_dedup_entries=1024)
    budget = Budget(s)
    everywhere = Confinement.from_strings(["0.0.0.0/0", "::/0"])
    state = DecoderState()
    allowed: list[int] = []
    per_prefix: dict[tuple[int, int], list[int]] = defaultdict(list)
    records = candidates = 0
    with open(netflow_v5_trace(), "rb") as fh:
        for i, dg in enumerate(CaptureReader().udp_datagrams(fh)):
            now = dg.timestamp if timeline == "trace-time" else i * 1e-5
            for record in decode_datagram(dg.payload, dg.src, state, dg.timestamp):
                records += 1
                candidates += (
                    1 if notify.normalize(record.src) == notify.normalize(record.dst) else 2
                )
                for target in plan_inband(_Report(_Payload(record)), budget, now, everywhere):  # type: ignore[arg-type]
                    t = budget._now  # the budget's own (monotonic) clock, in µs
                    allowed.append(t)
                    per_prefix[notify.prefix_of(target)].append(t)
            stats = budget.statistics()
            assert stats.prefixes <= s.max_prefixes and stats.dedup_entries <= s.max_dedup_entries
    stats = budget.statistics()
    assert records > 10_000 and stats.allowed == len(allowed) > 0
    assert _max_window_excess(allowed, s.global_per_s) <= s.burst + 1e-6
    for times in per_prefix.values():
        assert _max_window_excess(times, s.per_prefix_per_s) <= s.per_prefix_burst + 1e-6
    assert stats.allowed + sum(stats.dropped.values()) == candidates


def test_a_confinement_given_a_list_keeps_its_own_copy() -> None:
    import ipaddress

    allowed = [ipaddress.ip_network("192.0.2.0/24")]
    confinement = Confinement(allowed)  # type: ignore[arg-type]
    assert confinement.refuse(ipaddress.ip_address("198.51.100.1")) == "not_allowed"
    allowed.append(ipaddress.ip_network("198.51.100.0/24"))  # the caller's list, changed later
    assert confinement.allowed == (ipaddress.ip_network("192.0.2.0/24"),)
    assert confinement.refuse(ipaddress.ip_address("198.51.100.1")) == "not_allowed"
