"""The estimator as a library: the gamma arithmetic, the interval's invariants, exact coverage,
reading real reports, and bounded grouping.

Coverage on the real trace is in test_estimate_coverage.py; here coverage is computed exactly
(by summing the distribution of the report count, no sampling) on small Poisson-binomial groups.
"""

from __future__ import annotations

import ipaddress
import math
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overflowd import report as rpt
from overflowd.estimate import (
    GROUP_BY,
    OTHER,
    Tally,
    TopN,
    gamma_quantile,
    group_key,
    prefix_key,
    weighted_poisson_interval,
)
from overflowd.flowsample import Sampler, SamplingPolicy
from overflowd.identity import NodeIdentity, verify_report
from tests.support.reports import make_payload
from tests.unit.test_flowsample import Rec
from tests.unit.test_sansio_imports import FORBIDDEN, _imports

ROOT = Path(__file__).resolve().parents[2]
#: -ln(0.025): the 97.5% quantile of the exponential, Garwood's upper end for a count of 0.
K0_UPPER = -math.log(0.025)


def test_estimate_module_is_sans_io() -> None:
    assert not (_imports(ROOT / "overflowd" / "estimate.py") & FORBIDDEN)


# -- the gamma quantile -----------------------------------------------------------------------

# Garwood's exact 95% limits for a Poisson count k, (χ²(0.025; 2k)/2, χ²(0.975; 2k+2)/2), as
# tabulated in the literature (e.g. Ulm 1990, Am. J. Epidemiol. 131:373), 4 significant digits.
GARWOOD = [
    (0, 0.0, 3.689),
    (1, 0.02532, 5.572),
    (2, 0.2422, 7.225),
    (3, 0.6186, 8.767),
    (5, 1.624, 11.67),
    (10, 4.795, 18.39),
    (20, 12.22, 30.89),
    (50, 37.11, 65.92),
]


@pytest.mark.parametrize(("k", "low", "high"), GARWOOD)
def test_one_weight_is_garwoods_exact_interval(k: int, low: float, high: float) -> None:
    lo, hi = weighted_poisson_interval(float(k), float(k), 1.0, 0.95)
    assert lo == pytest.approx(low, rel=1e-3, abs=1e-9)
    assert hi == pytest.approx(high, rel=1e-3)
    # Scaled by the weight: k reports of weight w.
    lo_w, hi_w = weighted_poisson_interval(k * 250.0, k * 250.0**2, 250.0, 0.95)
    assert (lo_w, hi_w) == pytest.approx((lo * 250.0, hi * 250.0), rel=1e-9)


def _p_lower(a: float, x: float) -> float:
    """P(a, x) by the plain series, independent of the module's two-branch code (slow)."""
    term = total = 1.0 / a
    n = a
    while term > total * 1e-17:
        n += 1.0
        term *= x / n
        total += term
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


@pytest.mark.parametrize("shape", [1.0, 1.3, 2.0, 7.5, 40.0, 400.0, 5000.0])
@pytest.mark.parametrize("q", [0.001, 0.025, 0.5, 0.975, 0.999])
def test_gamma_quantile_inverts_the_cdf(shape: float, q: float) -> None:
    x = gamma_quantile(shape, q)
    assert _p_lower(shape, x) == pytest.approx(q, rel=1e-8)


def test_gamma_quantile_is_continuous_where_it_switches_to_wilson_hilferty() -> None:
    for q in (0.025, 0.975):
        below, above = gamma_quantile(1e7 * (1 - 1e-9), q), gamma_quantile(1e7 * (1 + 1e-9), q)
        assert above == pytest.approx(below, rel=1e-7)


@pytest.mark.parametrize(("shape", "q"), [(0.0, 0.5), (-1.0, 0.5), (math.inf, 0.5), (2.0, 0.0)])
def test_gamma_quantile_refuses_nonsense(shape: float, q: float) -> None:
    with pytest.raises(ValueError):
        gamma_quantile(shape, q)


# -- exact coverage on small groups -----------------------------------------------------------


def binomial(n: int, p: float) -> list[float]:
    return [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]


@pytest.mark.parametrize(
    ("flows", "expected"),
    [
        (flows, expected)
        for flows in (1, 2, 5, 30, 100)
        for expected in (0.05, 0.3, 1.0, 2.0, 3.5, 8.0, 20.0)
        if expected < flows  # p = expected/flows < 1: p = 1 is the exact part, not sampled
    ],
)
def test_exact_coverage_with_one_weight(flows: int, expected: float) -> None:
    """``flows`` records of one boost class, each drawn with p = expected/flows.

    Each weighs w = n/p = 1/(rate×boost), so the truth is w × expected; the coverage is the
    probability, summed exactly over the binomial count, that the interval holds it.
    """
    p = expected / flows
    w = 1e6
    coverage = 0.0
    for k, prob in enumerate(binomial(flows, p)):
        t = Tally()
        for _ in range(k):
            t.add(round(w * p), 0, p)  # n/p == w up to rounding of n
        est = t.estimate(unit=w).packets
        coverage += prob * est.contains(round(w * p) * flows)
    assert coverage >= 0.95


@pytest.mark.parametrize("small_weight", [0.01, 0.1, 0.5])
@pytest.mark.parametrize(("n1", "m1"), [(1, 0.3), (3, 1.0), (10, 2.0), (20, 0.5)])
@pytest.mark.parametrize(("n2", "m2"), [(1, 0.5), (10, 3.0), (50, 20.0)])
def test_exact_coverage_with_two_weights(
    small_weight: float, n1: int, m1: float, n2: int, m2: float
) -> None:
    """Unboosted records (weight 1) and boosted ones (weight ``small_weight``) in one group."""
    truth = m1 * 1.0 + m2 * small_weight
    coverage = 0.0
    for k1, q1 in enumerate(binomial(n1, m1 / n1)):
        for k2, q2 in enumerate(binomial(n2, m2 / n2)):
            lo, hi = weighted_poisson_interval(
                k1 + small_weight * k2, k1 + small_weight**2 * k2, 1.0, 0.95
            )
            coverage += q1 * q2 * (lo <= truth <= hi)
    assert coverage >= 0.95


# -- invariants (hypothesis) ------------------------------------------------------------------

report_st = st.tuples(
    st.integers(0, 10**9),  # packets
    st.integers(0, 10**12),  # bytes
    st.one_of(st.just(1.0), st.floats(1e-9, 1.0, exclude_max=True)),  # p
    st.integers(1, 10_000),  # interval
)
unit_st = st.one_of(st.none(), st.floats(0.0, 1e15))


def tally_of(reports: list[tuple[int, int, float, int]]) -> Tally:
    t = Tally()
    for r in reports:
        t.add(*r)
    return t


@given(st.lists(report_st, max_size=30), unit_st, unit_st)
def test_interval_contains_the_estimate(
    reports: list[tuple[int, int, float, int]], unit: float | None, byte_unit: float | None
) -> None:
    est = tally_of(reports).estimate(unit=unit, byte_unit=byte_unit)
    for iv in (est.packets, est.bytes):
        assert iv.low <= iv.estimate <= iv.high
        assert iv.low >= 0
    assert est.packets.estimate == pytest.approx(
        math.fsum(n * k / p for n, _, p, k in reports), rel=1e-9, abs=1e-6
    )
    assert est.reports == len(reports)
    assert est.certain_reports == sum(p == 1.0 for _, _, p, _ in reports)


certain_st = st.tuples(
    st.integers(0, 10**9), st.integers(0, 10**12), st.just(1.0), st.integers(1, 10_000)
)


@given(st.lists(certain_st, max_size=30), st.floats(0.0, 1e12))
def test_p_one_is_exact(reports: list[tuple[int, int, float, int]], unit: float) -> None:
    """Always-reported records are counted exactly; only what was missed (unit) is open."""
    t = tally_of(reports)
    exact = sum(n * k for n, _, _, k in reports)
    est = t.estimate(unit=unit).packets
    assert est.estimate == est.low == exact
    assert est.high == pytest.approx(exact + unit * K0_UPPER, rel=1e-12)
    # Nothing known about what a missed report would weigh: stated as unbounded.
    assert t.estimate().packets.high == math.inf
    assert t.estimate().packets.low == exact


@given(st.integers(0, 60), st.integers(1, 10**6), st.floats(1e-6, 0.999), st.floats(1.0, 10.0))
def test_monotone_in_the_count(k: int, packets: int, p: float, spare: float) -> None:
    """One more report of the same weight never lowers either end (and raises the upper)."""
    before, after = Tally(), Tally()
    for _ in range(k):
        before.add(packets, 0, p)
        after.add(packets, 0, p)
    after.add(packets, 0, p)
    unit = packets / p * spare
    a, b = before.estimate(unit=unit).packets, after.estimate(unit=unit).packets
    assert b.low >= a.low
    assert b.high > a.high
    assert b.estimate >= a.estimate


@given(st.lists(report_st, max_size=20), st.integers(0, 10**9), st.integers(1, 100))
def test_a_certain_report_shifts_the_interval_by_its_packets(
    reports: list[tuple[int, int, float, int]], packets: int, interval: int
) -> None:
    a = tally_of(reports).estimate(unit=5.0).packets
    t = tally_of(reports)
    t.add(packets, 0, 1.0, interval)
    b = t.estimate(unit=5.0).packets
    shift = packets * interval
    assert b.low == pytest.approx(a.low + shift, rel=1e-12, abs=1e-6)
    assert b.high == pytest.approx(a.high + shift, rel=1e-12, abs=1e-6)


@given(st.lists(report_st, max_size=30), st.integers(0, 30))
def test_merge_is_adding_everything(reports: list[tuple[int, int, float, int]], cut: int) -> None:
    whole = tally_of(reports)
    left, right = tally_of(reports[:cut]), tally_of(reports[cut:])
    left.merge(right)
    for name in Tally.__slots__:
        assert getattr(left, name) == pytest.approx(getattr(whole, name), rel=1e-12)
    sums = {name: getattr(whole, name) for name in Tally.__slots__}
    again = Tally.from_sums(**sums)
    assert again.estimate(unit=3.0) == whole.estimate(unit=3.0)


def test_wider_at_higher_confidence() -> None:
    t = tally_of([(10, 5000, 0.01, 1)] * 4)
    e90, e99 = t.estimate(unit=1000.0, confidence=0.9), t.estimate(unit=1000.0, confidence=0.99)
    assert e99.packets.low < e90.packets.low <= e90.packets.high < e99.packets.high


def test_zero_reports_is_a_stated_interval() -> None:
    est = Tally().estimate(unit=10_000.0, byte_unit=1.5e7)
    assert (est.packets.estimate, est.packets.low) == (0.0, 0.0)
    assert est.packets.high == pytest.approx(10_000.0 * K0_UPPER)
    assert est.bytes.high == pytest.approx(1.5e7 * K0_UPPER)
    assert est.to_json()["packets"] == {
        "estimate": 0.0,
        "low": 0.0,
        "high": pytest.approx(10_000.0 * K0_UPPER),
        "confidence": 0.95,
    }
    unbounded = Tally().estimate()
    assert unbounded.packets.high == math.inf
    assert unbounded.to_json()["packets"]["high"] is None  # type: ignore[index]


def test_a_tiny_p_is_unbounded_not_a_crash() -> None:
    t = Tally()
    t.add(2**64 - 1, 2**64 - 1, 5e-324, 2**32 - 1)  # a hostile but decodable report
    est = t.estimate(unit=1.0)
    assert est.packets.estimate == math.inf
    assert est.packets.high == math.inf


@pytest.mark.parametrize(
    "args",
    [(1, 1, 0.0, 1), (1, 1, 1.5, 1), (1, 1, math.nan, 1), (-1, 1, 0.5, 1), (1, 1, 0.5, 0)],
)
def test_add_refuses_what_no_report_carries(args: tuple[int, int, float, int]) -> None:
    with pytest.raises(ValueError):
        Tally().add(*args)


@pytest.mark.parametrize("kwargs", [{"confidence": 1.0}, {"confidence": 0.0}, {"unit": -1.0}])
def test_estimate_refuses_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Tally().estimate(**kwargs)  # type: ignore[arg-type]


# -- from real reports ------------------------------------------------------------------------


def test_reads_the_sampling_block_of_a_verified_report() -> None:
    """p, interval, packets and bytes survive signing and decoding unchanged (p is a float the
    encoder keeps exactly), so a receiver's estimate equals the sender's."""
    identity = NodeIdentity(seed=bytes(range(32)))
    policy = SamplingPolicy(rate=1e-4)
    payloads = []
    for packets, interval in ((37, 1), (1234, 100), (20_000, 1), (3, 7)):
        p = min(1.0, policy.rate * packets * interval)
        base = make_payload(packets=packets, probability=p)
        sampling = rpt.Sampling(probability=p, format="netflow-v9", interval=interval)
        payloads.append(
            rpt.Payload(
                kind=base.kind,
                nonce=base.nonce,
                time=base.time,
                observer=base.observer,
                flow=base.flow,
                sampling=sampling,
            )
        )
    sent, received = Tally(), Tally()
    for payload in payloads:
        sent.add_payload(payload)
        received.add_payload(verify_report(identity.sign_report(payload).cose).payload)
    assert received.estimate(unit=1e4) == sent.estimate(unit=1e4)
    # Every p < 1 report stands for 1/rate packets, whatever its size or its exporter's k.
    assert received.packets_unit == pytest.approx(1 / policy.rate)
    assert received.certain_packets == 1234 * 100 + 20_000  # p = 1: counted exactly


def test_sampler_weights_are_one_over_rate_times_boost() -> None:
    """What the interval's model rests on, checked on the real sampler's output."""
    policy = SamplingPolicy(rate=1e-3, syn_only_boost=50)
    records = []
    for i in range(1, 400):
        records.append(Rec(packets=i, sampling_interval=1 + i % 3))
        records.append(Rec(packets=i, tcp_flags=0x02))
    weights = {
        round(r.packets * r.sampling_interval / p, 6)
        for r, p in Sampler(policy, random.Random(5)).sample(records)
        if p < 1
    }
    assert weights == {1000.0, 20.0}


# -- grouping ---------------------------------------------------------------------------------


def test_prefix_key() -> None:
    assert prefix_key(ipaddress.ip_address("198.51.100.77")) == ipaddress.ip_network(
        "198.51.100.0/24"
    )
    assert prefix_key(ipaddress.ip_address("2001:db8:1:2::1")) == ipaddress.ip_network(
        "2001:db8:1::/48"
    )
    assert prefix_key(ipaddress.ip_address("10.1.2.3"), v4_len=8) == ipaddress.ip_network(
        "10.0.0.0/8"
    )
    assert prefix_key(ipaddress.ip_address("10.1.2.3"), v4_len=32).prefixlen == 32
    assert prefix_key(ipaddress.ip_address("10.1.2.3"), v4_len=0).prefixlen == 0


def test_group_key_names_every_top_by() -> None:
    payload = make_payload(src="203.0.113.9", dst="198.51.100.77")
    key = bytes(32)
    got = {by: group_key(by, payload, key) for by in GROUP_BY}
    assert got == {
        "observer": key,
        "src": ipaddress.ip_network("203.0.113.0/24"),
        "dst": ipaddress.ip_network("198.51.100.0/24"),
        "srcport": 53,
        "dstport": 40000,
        "proto": 17,
    }
    assert group_key("dst", payload, key, v4_len=32) == ipaddress.ip_network("198.51.100.77/32")
    with pytest.raises(ValueError, match="cannot group by 'flows'"):
        group_key("flows", payload, key)
    with pytest.raises(ValueError):
        prefix_key(ipaddress.ip_address("10.0.0.1"), v4_len=33)


def test_top_n_and_other_add_up() -> None:
    top: TopN[int] = TopN()
    direct: dict[int, Tally] = {}
    for port in range(50):
        for i in range(port + 1):
            packets, p = 10 * (i + 1), 0.01 * (i + 1)
            top.add(port, packets, packets * 100, min(1.0, p))
            direct.setdefault(port, Tally()).add(packets, packets * 100, min(1.0, p))
    result = top.result(5, unit=1000.0, byte_unit=1e5)
    assert [k for k, _ in result.top] == [49, 48, 47, 46, 45]
    for key, est in result.top:
        assert est == direct[key].estimate(unit=1000.0, byte_unit=1e5)
    assert result.other is not None
    assert result.groups == 50 and result.folded == 0
    rows = list(result.rows())
    assert rows[-1][0] == OTHER
    assert sum(e.reports for _, e in rows) == sum(t.reports for t in direct.values())
    assert sum(e.packets.estimate for _, e in rows) == pytest.approx(
        top.total().packets_estimate, rel=1e-12
    )
    by_bytes = top.result(3, by="bytes", unit=1000.0, byte_unit=1e5)
    assert [k for k, _ in by_bytes.top] == [49, 48, 47]


def test_top_n_is_bounded_and_other_stays_exact() -> None:
    """A stream of 100,000 distinct sources never holds more than max_keys tallies; the heavy
    ones survive the folds, and the totals (top + other) are those of every report."""
    top: TopN[int] = TopN(max_keys=64)
    whole = Tally()
    heavy = {7, 70_007, 99_999}
    for src in range(100_000):
        packets = 10**6 if src in heavy else 1
        top.add(src, packets, packets * 60, 1.0 if src in heavy else 1e-3)
        whole.add(packets, packets * 60, 1.0 if src in heavy else 1e-3)
        assert len(top) <= 64
    result = top.result(3, unit=1000.0)
    assert {k for k, _ in result.top} == heavy
    assert result.folded > 0
    assert result.max_folded == pytest.approx(1000.0)
    assert result.other is not None
    total = sum(e.reports for _, e in result.rows())
    assert total == whole.reports == 100_000
    assert top.total().packets_estimate == pytest.approx(whole.packets_estimate, rel=1e-9)


def test_top_n_per_group_units() -> None:
    """Per-observer units: a group with no p < 1 report gets its own observer's unit."""
    top: TopN[str] = TopN()
    top.add("a", 5000, 0, 1.0)
    top.add("b", 5000, 0, 1.0)
    units = {"a": (100.0, None), "b": (1e4, None)}
    result = top.result(2, unit_of=lambda k: units[k])
    got = {k: e.packets.high for k, e in result.top}
    assert got["a"] == pytest.approx(5000 + 100.0 * K0_UPPER)
    assert got["b"] == pytest.approx(5000 + 1e4 * K0_UPPER)
    assert result.other is None
    rest = top.result(0, unit_of=lambda k: units[k]).other
    assert rest is not None
    assert rest.packets.high == pytest.approx(10_000 + 1e4 * K0_UPPER)


@pytest.mark.parametrize("kwargs", [{"n": -1}, {"n": 1, "by": "flows"}])
def test_top_n_refuses_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TopN[int]().result(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TopN[int](max_keys=1)
