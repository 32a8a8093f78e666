"""ratelock.policy: exact token buckets. "At most N" means N, over any interval."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ratelock import policy
from ratelock.policy import HOUR_MS, Rate


def test_burst_of_three_allows_three_not_four() -> None:
    # the 2016 prototype's bug: "3 per 10 s" let a fourth through (``> 3``)
    rate = Rate(burst=3, per_period=3, period_ms=10_000)
    tat, allowed = 0, 0
    for _ in range(10):
        d = policy.charge(rate, tat, now_ms=5_000)
        if d.allowed:
            allowed += 1
            tat = d.tat
    assert allowed == 3


def test_retry_after_is_exact_and_never_early() -> None:
    rate = Rate(burst=2, per_period=1, period_ms=HOUR_MS)
    now = 1_000_000
    tat = policy.charge(rate, 0, now).tat
    tat = policy.charge(rate, tat, now).tat
    refused = policy.charge(rate, tat, now)
    assert not refused.allowed and refused.retry_after_ms == HOUR_MS
    assert not policy.charge(rate, tat, now + refused.retry_after_ms - 1).allowed
    assert policy.charge(rate, tat, now + refused.retry_after_ms).allowed
    assert policy.retry_after_header(refused.retry_after_ms) == 3600
    assert policy.retry_after_header(1) == 1


def test_charge_all_is_all_or_nothing() -> None:
    user, shared = Rate(1, 1), Rate(100, 100)
    now = 10**12
    j = policy.charge_all([user, shared], [0, 0], now)
    assert j.allowed
    again = policy.charge_all([user, shared], list(j.tats), now)
    # the user's bucket refuses, and the shared bucket is not charged for the refused attempt
    assert not again.allowed and again.refused_by == 0 and again.tats == j.tats


def test_refund_gives_back_at_most_what_was_taken() -> None:
    rate = Rate(3, 1)
    now = 10**9
    tat = policy.charge(rate, 0, now).tat
    assert policy.remaining(rate, tat, now) == 2
    tat = policy.refund(rate, tat, now)
    assert policy.remaining(rate, tat, now) == 3
    tat = policy.refund(rate, tat, now)  # nothing more to give back: still full, not 4
    assert policy.remaining(rate, tat, now) == 3


@settings(max_examples=300)
@given(
    burst=st.integers(1, 20),
    per_period=st.integers(1, 50),
    period_ms=st.integers(1, 100_000),
    gaps=st.lists(st.integers(0, 20_000), min_size=1, max_size=200),
    costs=st.lists(st.integers(1, 3), min_size=1, max_size=200),
)
def test_never_more_than_burst_plus_refill_in_any_interval(
    burst: int, per_period: int, period_ms: int, gaps: list[int], costs: list[int]
) -> None:
    rate = Rate(burst, per_period, period_ms)
    tat, now = 0, 10**6
    passed: list[tuple[int, int]] = []
    for i, gap in enumerate(gaps):
        now += gap
        cost = costs[i % len(costs)]
        d = policy.charge(rate, tat, now, cost)
        if d.allowed:
            tat = d.tat
            passed.append((now, cost))
        else:
            assert d.tat == tat and d.retry_after_ms > 0
            # retry_after is exact: at that time the same charge passes (if it can ever)
            if cost <= burst:
                assert policy.charge(rate, tat, now + d.retry_after_ms, cost).allowed
                assert not policy.charge(rate, tat, now + d.retry_after_ms - 1, cost).allowed
    # every window [t0, t1]: tokens passed <= burst + floor((t1 - t0) * N / P)
    for i in range(len(passed)):
        total = 0
        for j in range(i, len(passed)):
            total += passed[j][1]
            span = passed[j][0] - passed[i][0]
            assert total <= burst + span * per_period // period_ms
