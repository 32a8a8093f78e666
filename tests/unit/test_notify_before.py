"""``Budget.allow``, ``Confinement.refuse`` and ``plan_inband`` as written out for #16 decide
exactly what they decided before (commit 9466c00, main before the send-plan change).

``_Before*`` below are frozen copies of main's code, verbatim but for names, kept here so that
later edits of overflowd/notify.py cannot move the reference with them. Hypothesis drives both
with the same sequences of messages (few addresses and prefixes so that the de-duplication and
prefix tables are hit, filled, evicted and pruned; clocks that stall, jump and go backwards;
IPv4-mapped, scoped and special addresses) and compares every verdict, every counter and the
tables themselves after every step.
"""

from __future__ import annotations

import heapq
import ipaddress
import math
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from overflowd import notify
from overflowd.notify import (
    DROP_REASONS,
    V4_PREFIX_LEN,
    V6_PREFIX_LEN,
    Budget,
    BudgetSettings,
    Confinement,
    FlowKey,
    plan_inband,
)

_US = 1_000_000

# -- main before #16's send plan (9466c00: overflowd/notify.py), verbatim but for names --------


def _before_normalize(address: Any) -> Any:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _before_prefix_of(address: Any) -> tuple[int, int]:
    address = _before_normalize(address)
    if address.version == 4:
        return 4, int(address) >> (32 - V4_PREFIX_LEN)
    return 6, int(address) >> (128 - V6_PREFIX_LEN)


_LIMITED_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_LOOPBACK_OR_LINK = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("::1/128"),
    ipaddress.ip_network("fe80::/10"),
)


def _before_within(inner: Any, outer: Any) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


def _before_refuse(allowed: tuple[Any, ...], address: Any) -> str | None:
    address = _before_normalize(address)
    loopback_or_link = address.is_loopback or address.is_link_local
    if (
        address.is_multicast
        or address.is_unspecified
        or (address.is_reserved and not loopback_or_link)
        or address == _LIMITED_BROADCAST
    ):
        return "special"
    covering = [n for n in allowed if n.version == address.version and address in n]
    if not covering:
        return "not_allowed"
    for special in _LOOPBACK_OR_LINK:
        if (
            special.version == address.version
            and address in special
            and not any(_before_within(n, special) for n in covering)
        ):
            return "special"
    return None


class _BeforeGcra:
    __slots__ = ("interval", "tolerance")

    def __init__(self, per_s: float, burst: int) -> None:
        self.interval = max(1, math.ceil(_US / per_s))
        self.tolerance = (burst - 1) * self.interval

    def conforms(self, tat: int, t: int) -> bool:
        return max(tat, t) - t <= self.tolerance

    def next_tat(self, tat: int, t: int) -> int:
        return max(tat, t) + self.interval


class _BeforeBudget:
    def __init__(self, settings: BudgetSettings) -> None:
        self.settings = s = settings
        self._global = _BeforeGcra(s.global_per_s, s.burst)
        self._prefix = _BeforeGcra(s.per_prefix_per_s, s.per_prefix_burst)
        self._window_us = math.ceil(s.dedup_window_s * _US)
        self._now = -(2**62)
        self._global_tat = self._now
        self._tats: dict[tuple[int, int], int] = {}
        self._heap: list[tuple[int, tuple[int, int]]] = []
        self._unknown_tat = self._now
        self._dedup: OrderedDict[Any, int] = OrderedDict()
        self._allowed = 0
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._prefix_evictions = 0
        self._dedup_evictions = 0

    def _tick(self, now: float) -> int:
        if not math.isfinite(now):
            raise ValueError("now must be a finite number of seconds")
        self._now = max(self._now, round(now * _US))
        return self._now

    def drop(self, reason: str) -> None:
        if reason not in self._dropped:
            raise ValueError(f"unknown drop reason {reason!r}")
        self._dropped[reason] += 1

    def allow(self, target: Any, flow: Any, now: float, *, channel: str = "") -> bool:
        t = self._tick(now)
        target = _before_normalize(target)
        self._prune_dedup(t)
        key = (channel, target, flow)
        if key in self._dedup:
            self._dropped["duplicate"] += 1
            return False
        prefix = _before_prefix_of(target)
        self._prune_prefixes(t)
        prefix_tat = self._tats.get(prefix, self._unknown_tat)
        if not self._prefix.conforms(prefix_tat, t):
            self._dropped["prefix_budget"] += 1
            return False
        if not self._global.conforms(self._global_tat, t):
            self._dropped["global_budget"] += 1
            return False
        self._global_tat = self._global.next_tat(self._global_tat, t)
        self._set_prefix(prefix, self._prefix.next_tat(prefix_tat, t))
        if self._window_us > 0:
            if len(self._dedup) >= self.settings.max_dedup_entries:
                self._dedup.popitem(last=False)
                self._dedup_evictions += 1
            self._dedup[key] = t + self._window_us
        self._allowed += 1
        return True

    def _prune_dedup(self, t: int) -> None:
        dedup = self._dedup
        while dedup:
            key, expiry = next(iter(dedup.items()))
            if expiry > t:
                break
            del dedup[key]

    def _prune_prefixes(self, t: int) -> None:
        heap, tats = self._heap, self._tats
        while heap:
            tat, prefix = heap[0]
            if tats.get(prefix) != tat:
                heapq.heappop(heap)
            elif tat <= t:
                heapq.heappop(heap)
                del tats[prefix]
            else:
                break

    def _set_prefix(self, prefix: tuple[int, int], tat: int) -> None:
        tats = self._tats
        if prefix not in tats and len(tats) >= self.settings.max_prefixes:
            self._evict_one()
        tats[prefix] = tat
        heapq.heappush(self._heap, (tat, prefix))
        if len(self._heap) > 2 * len(tats) + 64:
            self._heap = [(v, k) for k, v in tats.items()]
            heapq.heapify(self._heap)

    def _evict_one(self) -> None:
        heap, tats = self._heap, self._tats
        while heap:
            tat, prefix = heapq.heappop(heap)
            if tats.get(prefix) == tat:
                del tats[prefix]
                self._unknown_tat = max(self._unknown_tat, tat)
                self._prefix_evictions += 1
                return


def _before_plan_inband(
    report: Any, policy_state: _BeforeBudget, now: float, allowed: tuple[Any, ...]
) -> list[Any]:
    flow = report.payload.flow
    key = FlowKey(flow.src, flow.dst, flow.proto, flow.sport, flow.dport)
    candidates = [_before_normalize(flow.src)]
    if _before_normalize(flow.dst) != candidates[0]:
        candidates.append(_before_normalize(flow.dst))
    targets: list[Any] = []
    for address in candidates:
        reason = _before_refuse(allowed, address)
        if reason is not None:
            policy_state.drop(reason)
            continue
        if policy_state.allow(address, key, now, channel="inband"):
            targets.append(address)
    return targets


# -- the comparison -----------------------------------------------------------------------------

ADDRESSES = [
    ipaddress.ip_address(text)
    for text in (
        "192.0.2.1", "192.0.2.200", "192.0.3.1", "198.51.100.7", "203.0.113.9",
        "::ffff:192.0.2.1", "::ffff:198.51.100.7", "2001:db8::1", "2001:db8::2",
        "2001:db8:0:1::1", "2001:db8:1::1", "fe80::1", "fe80::1%1", "fe80::1%2",
        "::ffff:127.0.0.1", "127.0.0.1", "169.254.9.9", "::1", "::", "0.0.0.0",
        "255.255.255.255", "224.0.0.1", "ff02::1", "240.0.0.1", "100::1",
    )
]  # fmt: skip
PREFIX_SETS = [
    (), ("0.0.0.0/0", "::/0"), ("192.0.2.0/24", "2001:db8::/32"), ("127.0.0.0/8", "::1/128"),
    ("0.0.0.0/0", "::/0", "127.0.0.0/8", "169.254.0.0/16", "fe80::/10"), ("198.51.100.0/24",),
]  # fmt: skip

budget_settings = st.builds(
    BudgetSettings,
    global_per_s=st.sampled_from([0.5, 1.0, 3.0, 100.0, 1e6]),
    burst=st.integers(1, 6),
    per_prefix_per_s=st.sampled_from([0.25, 1.0, 7.0, 1e6]),
    per_prefix_burst=st.integers(1, 4),
    dedup_window_s=st.sampled_from([0.0, 0.5, 2.0, 600.0]),
    max_prefixes=st.integers(1, 4),
    max_dedup_entries=st.integers(1, 4),
)
# Time steps in seconds: stalls, small and large jumps, and backwards (the clock holds).
steps = st.one_of(
    st.just(0.0), st.sampled_from([1e-6, 0.1, 0.25, 1.0, 3.0, 700.0, -0.5, -100.0]),
    st.floats(-2.0, 20.0, allow_nan=False),
)  # fmt: skip
messages = st.tuples(
    st.sampled_from(ADDRESSES),
    st.sampled_from(ADDRESSES),
    st.sampled_from([6, 17]),
    st.integers(0, 2),
    st.sampled_from(["inband", "webhook"]),
    steps,
)


def _state(budget: Any) -> tuple[Any, ...]:
    return (
        budget._now, budget._global_tat, budget._unknown_tat, dict(budget._tats),
        list(budget._dedup.items()), budget._allowed, dict(budget._dropped),
        budget._prefix_evictions, budget._dedup_evictions,
    )  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(budget_settings, st.lists(messages, max_size=60), st.floats(0, 1e9, allow_nan=False))
def test_budget_allow_decides_and_records_what_it_did_before(
    s: BudgetSettings, sequence: list[Any], start: float
) -> None:
    new, old = Budget(s), _BeforeBudget(s)
    now = start
    for target, other, proto, port, channel, step in sequence:
        now += step
        key = FlowKey(target, other, proto, port, port)
        assert new.allow(target, key, now, channel=channel) == old.allow(
            target, key, now, channel=channel
        )
        assert _state(new) == _state(old)
        stats = new.statistics()
        assert stats.dropped == old._dropped
        assert stats.prefixes == len(old._tats)
        assert new.drop_counts() == tuple(old._dropped[r] for r in DROP_REASONS)


@settings(max_examples=400, deadline=None)
@given(
    budget_settings,
    st.sampled_from(PREFIX_SETS),
    st.lists(messages, max_size=60),
    st.floats(0, 1e9, allow_nan=False),
)
def test_plan_inband_plans_what_it_planned_before(
    s: BudgetSettings, prefixes: tuple[str, ...], sequence: list[Any], start: float
) -> None:
    confinement = Confinement.from_strings(prefixes)
    new, old = Budget(s), _BeforeBudget(s)
    now = start
    for src, dst, proto, port, _, step in sequence:
        now += step
        flow = SimpleNamespace(src=src, dst=dst, proto=proto, sport=port, dport=port + 1)
        report = SimpleNamespace(payload=SimpleNamespace(flow=flow))
        got = plan_inband(report, new, now, confinement)
        want = _before_plan_inband(report, old, now, confinement.allowed)
        assert got == want
        assert [type(a) for a in got] == [type(a) for a in want]
        assert _state(new) == _state(old)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PREFIX_SETS), st.lists(st.sampled_from(ADDRESSES), max_size=80))
def test_remembered_confinement_verdicts_are_the_verdicts_before(
    prefixes: tuple[str, ...], sequence: list[Any]
) -> None:
    confinement = Confinement.from_strings(prefixes)
    for address in sequence:
        assert confinement.refuse(address) == _before_refuse(confinement.allowed, address)
    assert len(confinement._verdicts) <= notify.CONFINEMENT_VERDICTS
