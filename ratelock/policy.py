"""Budgets as exact integer token buckets (GCRA), sans-IO: state and ``now`` in, decision out.

The vault keeps one integer per bucket (its *theoretical arrival time*, ``tat``) in its database
and runs :func:`charge` inside the transaction that decides; this module only does arithmetic.
It must never use floating point for a decision: the 2016 prototype allowed 4 where it said 3,
and a float ``0.1 + 0.2`` is how the next one would.

A :class:`Rate` of ``burst`` B and ``per_period`` N per ``period_ms`` P is the generic cell
rate algorithm with emission interval P/N. To keep that exact, times are scaled by N: a
``tat`` is stored in units of 1/N ms, so one token is exactly P units. A charge of ``cost``
tokens at ``now`` is allowed iff ``max(tat, now*N) + cost*P - now*N <= B*P``; then
``tat = max(tat, now*N) + cost*P``. Invariant (tested in tests/unit/test_ratelock_policy.py):
over any interval of length ``t`` ms, at most ``B + floor(t*N/P)`` tokens pass — "at most B at
once" means B, not B+1.

A denied charge changes nothing and says when it could pass (``retry_after_ms``, rounded up so
that retrying then does pass). Several buckets (per user, per client, global) are charged
together: all pass or none is charged (:func:`charge_all`), so one noisy user drains only its
own bucket and the shared ones only by what it was actually let through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HOUR_MS = 3_600_000


@dataclass(frozen=True, slots=True)
class Rate:
    """``burst`` tokens at once, refilled at ``per_period`` tokens per ``period_ms``."""

    burst: int
    per_period: int
    period_ms: int = HOUR_MS

    def __post_init__(self) -> None:
        if self.burst < 1 or self.per_period < 1 or self.period_ms < 1:
            raise ValueError("a rate needs burst, per_period and period_ms of at least 1")

    @property
    def capacity_units(self) -> int:
        return self.burst * self.period_ms

    def now_units(self, now_ms: int) -> int:
        return now_ms * self.per_period


@dataclass(frozen=True, slots=True)
class Decision:
    """The result of a charge: ``allowed``, the new ``tat`` to store, and when to retry."""

    allowed: bool
    tat: int
    retry_after_ms: int
    remaining: int


def charge(rate: Rate, tat: int, now_ms: int, cost: int = 1) -> Decision:
    """Charge ``cost`` tokens against a bucket whose stored state is ``tat`` (0 for new)."""
    if cost < 0:
        raise ValueError("cost must not be negative")
    now_u = rate.now_units(now_ms)
    base = max(tat, now_u)
    new_tat = base + cost * rate.period_ms
    excess = new_tat - now_u - rate.capacity_units
    if excess > 0:
        # Waiting ``excess`` units (1/N ms each) brings it within capacity: round up to ms.
        retry = -(-excess // rate.per_period)
        return Decision(False, tat, retry, _remaining(rate, base, now_u))
    return Decision(True, new_tat, 0, _remaining(rate, new_tat, now_u))


def refund(rate: Rate, tat: int, now_ms: int, cost: int = 1) -> int:
    """Give ``cost`` tokens back (a verify that succeeded); never more than the bucket holds."""
    return max(tat - cost * rate.period_ms, rate.now_units(now_ms))


def remaining(rate: Rate, tat: int, now_ms: int) -> int:
    """Whole tokens available now."""
    now_u = rate.now_units(now_ms)
    return _remaining(rate, max(tat, now_u), now_u)


def _remaining(rate: Rate, tat: int, now_u: int) -> int:
    return max(0, (rate.capacity_units - (tat - now_u)) // rate.period_ms)


@dataclass(frozen=True, slots=True)
class Joint:
    """The result of charging several buckets at once."""

    allowed: bool
    tats: tuple[int, ...]
    retry_after_ms: int
    #: index of the first bucket that refused (None when allowed)
    refused_by: int | None


def charge_all(rates: Sequence[Rate], tats: Sequence[int], now_ms: int, cost: int = 1) -> Joint:
    """Charge every bucket or none. Retry-after is the longest wait among the refusers."""
    if len(rates) != len(tats):
        raise ValueError("one tat per rate")
    decisions = [charge(r, t, now_ms, cost) for r, t in zip(rates, tats, strict=True)]
    refused = [i for i, d in enumerate(decisions) if not d.allowed]
    if refused:
        wait = max(decisions[i].retry_after_ms for i in refused)
        return Joint(False, tuple(tats), wait, refused[0])
    return Joint(True, tuple(d.tat for d in decisions), 0, None)


def retry_after_header(retry_after_ms: int) -> int:
    """Retry-After in whole seconds (RFC 9110 §10.2.3), rounded up so it is never early."""
    return max(1, -(-retry_after_ms // 1000)) if retry_after_ms > 0 else 0
