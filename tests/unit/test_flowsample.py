"""The sampler: the formula, each boost and the cap, the RNG discipline, and statistics.

The statistical tests are exact Poisson-sampling checks: the number sampled has mean
``sum p`` and variance ``sum p(1-p)``; the Horvitz–Thompson total ``sum(packets / p)`` over the
sampled records is unbiased for the true packet total with variance
``sum(packets² (1-p) / p)`` over all records, estimated from the sample by
``sum(packets² (1-p) / p²)``. Seeds are fixed so nothing is flaky; several seeds are run so a
lucky one proves nothing.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from overflowd.flowsample import (
    AMPLIFICATION_PORTS,
    BOOST_REASONS,
    IPAddress,
    SampledRecord,
    Sampler,
    SamplingPolicy,
    probability,
)

TRACE = "netflow_v5_simpleweb.pcap"
TRACE_PORT = 9500


SRC = ipaddress.IPv4Address("192.0.2.1")
DST = ipaddress.IPv4Address("198.51.100.2")


@dataclasses.dataclass(frozen=True, slots=True)
class Rec:
    """The fields the sampler reads, nothing else (a FlowRecord has them all)."""

    packets: int = 1
    src: IPAddress = SRC
    dst: IPAddress = DST
    sport: int = 40000
    dport: int = 80
    proto: int = 6
    tcp_flags: int = 0x1B  # FIN PSH ACK SYN: an ordinary finished connection
    sampling_interval: int = 1


def shared_dir() -> Path:
    env = os.environ.get("OVERFLOWD_SHARED")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared"


# -- the formula ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "packets", "interval", "expected"),
    [
        (1e-6, 1, 1, 1e-6),
        (1e-6, 1000, 1, 1e-3),
        (1e-6, 1000, 100, 0.1),
        (1e-3, 999, 1, 0.999),
        (1e-3, 1000, 1, 1.0),
        (1e-3, 10**12, 1000, 1.0),
        (1e-6, 0, 1, 0.0),
        (0.0, 10**9, 1, 0.0),
    ],
)
def test_formula(rate: float, packets: int, interval: int, expected: float) -> None:
    policy = SamplingPolicy(rate=rate)
    p = probability(Rec(packets=packets, sampling_interval=interval), policy)
    assert p == pytest.approx(expected, rel=1e-12)
    assert 0.0 <= p <= 1.0


def test_unknown_interval_counts_as_unsampled() -> None:
    policy = SamplingPolicy(rate=1e-3)
    assert probability(Rec(packets=10, sampling_interval=0), policy) == pytest.approx(1e-2)


def test_default_policy() -> None:
    policy = SamplingPolicy()
    assert policy.rate == 1e-6
    assert policy.boost_cap == 1000
    assert {17, 19, 53, 111, 123, 161, 389, 1900, 3702, 11211} <= policy.amplification_ports
    assert policy.amplification_ports == AMPLIFICATION_PORTS
    assert policy.operator_prefixes == ()
    assert policy.asked_boost is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": -1e-6},
        {"rate": math.nan},
        {"rate": math.inf},
        {"boost_cap": 0.5},
        {"boost_cap": math.inf},
        {"amplification_boost": -1.0},
        {"syn_only_boost": math.nan},
        {"amplification_ports": frozenset({70000})},
        {"operator_prefixes": [(ipaddress.ip_network("192.0.2.0/24"), -2.0)]},
    ],
)
def test_policy_refuses_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SamplingPolicy(**kwargs)  # type: ignore[arg-type]


def test_policy_is_frozen_and_normalizes_prefixes() -> None:
    policy = SamplingPolicy(operator_prefixes=[(ipaddress.ip_network("192.0.2.0/24"), 2)])
    assert policy.operator_prefixes == ((ipaddress.ip_network("192.0.2.0/24"), 2.0),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.rate = 1.0  # type: ignore[misc]
    assert policy == SamplingPolicy(operator_prefixes=[(ipaddress.ip_network("192.0.2.0/24"), 2)])


# -- each boost -------------------------------------------------------------------------------

BASE = SamplingPolicy(rate=1e-6, amplification_boost=100, syn_only_boost=10, boost_cap=1000)


def boost_of(record: Rec, policy: SamplingPolicy = BASE) -> tuple[float, tuple[str, ...]]:
    p, boost, reasons = policy.explain(record)
    assert p == pytest.approx(policy.rate * record.packets * boost)
    return boost, reasons


def test_no_boost_for_ordinary_flows() -> None:
    assert boost_of(Rec()) == (1.0, ())
    assert boost_of(Rec(proto=17, sport=40000, dport=53)) == (1.0, ())  # a DNS *query*
    assert boost_of(Rec(proto=1, sport=0, dport=0, tcp_flags=0)) == (1.0, ())


@pytest.mark.parametrize("port", sorted(AMPLIFICATION_PORTS))
def test_amplification_source_ports_over_udp(port: int) -> None:
    assert boost_of(Rec(proto=17, sport=port, tcp_flags=0)) == (100.0, ("amplification",))


def test_amplification_needs_udp() -> None:
    assert boost_of(Rec(proto=6, sport=53)) == (1.0, ())


def test_amplification_ports_are_policy() -> None:
    policy = dataclasses.replace(BASE, amplification_ports=frozenset({9999}))
    assert boost_of(Rec(proto=17, sport=9999), policy)[0] == 100.0
    assert boost_of(Rec(proto=17, sport=53), policy)[0] == 1.0


@pytest.mark.parametrize(
    ("proto", "flags", "boosted"),
    [
        (6, 0x02, True),  # SYN
        (6, 0x42, True),  # SYN + ECE (ECN setup)
        (6, 0xC2, True),  # SYN + ECE + CWR
        (6, 0x12, False),  # SYN ACK
        (6, 0x1B, False),
        (6, 0x00, False),  # exporter that sends no flags
        (6, 0x04, False),  # RST only
        (17, 0x02, False),  # flags on UDP mean nothing
    ],
)
def test_syn_only(proto: int, flags: int, boosted: bool) -> None:
    boost, reasons = boost_of(Rec(proto=proto, tcp_flags=flags, sport=40000))
    assert (boost, reasons) == ((10.0, ("syn_only",)) if boosted else (1.0, ()))


def test_operator_prefixes_longest_match_either_end() -> None:
    net = ipaddress.ip_network
    policy = dataclasses.replace(
        BASE,
        operator_prefixes=[
            (net("198.51.100.0/24"), 3.0),
            (net("198.51.100.128/25"), 5.0),
            (net("203.0.113.0/24"), 0.5),
            (net("2001:db8::/32"), 7.0),
            (net("2001:db8:1::/48"), 2.0),
        ],
    )
    a = ipaddress.ip_address

    def boost(src: str, dst: str) -> float:
        return boost_of(Rec(src=a(src), dst=a(dst)), policy)[0]

    assert boost("192.0.2.1", "198.51.100.2") == 3.0
    assert boost("198.51.100.200", "192.0.2.1") == 5.0  # longest prefix wins
    assert boost("203.0.113.9", "192.0.2.1") == 0.5  # an operator may quiet a prefix
    assert boost("203.0.113.9", "198.51.100.129") == 5.0  # the larger end wins
    assert boost("2001:db8:2::1", "2001:db8:ffff::1") == 7.0
    assert boost("2001:db8:1::1", "2001:db8:1::2") == 2.0
    assert boost("::ffff:198.51.100.7", "2001:db9::1") == 3.0  # IPv4-mapped
    assert boost("192.0.2.1", "2001:db9::1") == 1.0
    assert boost_of(Rec(src=a("198.51.100.1")), policy)[1] == ("operator_prefix",)


def test_asked_boost_from_either_end_never_lowers() -> None:
    asked: dict[str, float | None] = {
        "198.51.100.2": 20.0,
        "192.0.2.50": 0.01,
        "192.0.2.60": math.nan,
        "192.0.2.70": math.inf,
        "192.0.2.80": 40.0,
    }
    calls: list[IPAddress] = []

    def lookup(address: IPAddress) -> float | None:
        calls.append(address)
        return asked.get(str(address))

    policy = dataclasses.replace(BASE, asked_boost=lookup)
    a = ipaddress.ip_address
    assert boost_of(Rec(), policy) == (20.0, ("asked",))
    assert set(calls) == {a("192.0.2.1"), a("198.51.100.2")}
    assert boost_of(Rec(src=a("192.0.2.80")), policy)[0] == 40.0
    assert boost_of(Rec(src=a("192.0.2.50"), dst=a("192.0.2.1")), policy) == (1.0, ())
    assert boost_of(Rec(src=a("192.0.2.60"), dst=a("192.0.2.1")), policy) == (1.0, ())
    assert boost_of(Rec(src=a("192.0.2.70"), dst=a("192.0.2.1")), policy) == (
        1000.0,
        ("asked",),
    )


def test_boosts_multiply_and_are_capped() -> None:
    net = ipaddress.ip_network("198.51.100.0/24")
    policy = dataclasses.replace(
        BASE, operator_prefixes=[(net, 4.0)], asked_boost=lambda _address: 2.0
    )
    amp = Rec(proto=17, sport=123, tcp_flags=0)
    assert boost_of(amp, policy) == (800.0, ("amplification", "operator_prefix", "asked"))
    capped = dataclasses.replace(policy, boost_cap=500.0)
    assert boost_of(amp, capped) == (
        500.0,
        ("amplification", "operator_prefix", "asked", "capped"),
    )
    # The cap holds for the simple path too, and for huge asks.
    small_cap = dataclasses.replace(BASE, boost_cap=50.0)
    assert boost_of(amp, small_cap) == (50.0, ("amplification", "capped"))
    assert probability(Rec(packets=1, proto=17, sport=123), small_cap) == pytest.approx(5e-5)


# -- drawing ----------------------------------------------------------------------------------


def test_certain_records_always_sampled_and_impossible_never() -> None:
    sampler = Sampler(SamplingPolicy(rate=1.0), random.Random(1))
    records = [Rec(packets=n) for n in range(1, 2001)]
    assert [p for _, p in sampler.sample(records)] == [1.0] * 2000
    assert all(sampler.decide(r) == 1.0 for r in records)
    zero = Sampler(SamplingPolicy(rate=0.0), random.Random(1))
    assert zero.sample(records) == []
    assert zero.statistics().records_seen == 2000


def test_tiny_probability_almost_never() -> None:
    sampler = Sampler(SamplingPolicy(rate=1e-12), random.Random(2))
    assert sampler.sample([Rec(packets=1)] * 200_000) == []
    stats = sampler.statistics()
    assert stats.expected_sampled == pytest.approx(2e-7)


def test_draws_are_uniform_comparisons() -> None:
    """With a scripted RNG: sampled iff draw < p; p in {0, 1} consumes no draw."""

    class Scripted:
        def __init__(self, values: Sequence[float]) -> None:
            self.values = list(values)

        def random(self) -> float:
            return self.values.pop(0)

    rng = Scripted([0.49, 0.5, 0.51, 0.0])
    sampler = Sampler(SamplingPolicy(rate=0.5), rng)
    got = sampler.sample([Rec(packets=1), Rec(packets=1), Rec(packets=2), Rec(packets=0)])
    assert [p for _, p in got] == [0.5, 1.0]
    assert rng.values == [0.51, 0.0]
    assert sampler.decide(Rec(packets=1)) is None  # 0.51 >= 0.5
    assert sampler.decide(Rec(packets=1)) == 0.5  # 0.0 < 0.5


def equivalence_records(seed: int, n: int) -> list[Rec]:
    rng = random.Random(seed)
    a = ipaddress.ip_address
    out = []
    for _ in range(n):
        out.append(
            Rec(
                packets=int(10 ** rng.uniform(0, 6)),
                proto=rng.choice([6, 17, 1]),
                sport=rng.choice([53, 123, 443, 40000]),
                tcp_flags=rng.choice([0x02, 0x12, 0x1B, 0]),
                sampling_interval=rng.choice([0, 1, 10]),
                src=a(rng.choice(["192.0.2.1", "198.51.100.9", "2001:db8::1"])),
                dst=a(rng.choice(["203.0.113.5", "198.51.100.200", "2001:db8:1::1"])),
            )
        )
    return out


@pytest.mark.parametrize(
    "policy",
    [
        SamplingPolicy(rate=1e-4),
        SamplingPolicy(rate=1e-4, boost_cap=20.0),
        SamplingPolicy(
            rate=1e-4,
            operator_prefixes=[(ipaddress.ip_network("198.51.100.128/25"), 3.0)],
            asked_boost=lambda addr: 5.0 if addr.version == 6 else None,
        ),
    ],
    ids=["simple", "capped", "prefixes+asked"],
)
def test_decide_and_sample_agree(policy: SamplingPolicy) -> None:
    """The batch fast path and the one-record path draw and count identically."""
    records = equivalence_records(7, 5000)
    one, many = Sampler(policy, random.Random(3)), Sampler(policy, random.Random(3))
    chosen = [(r, p) for r in records if (p := one.decide(r)) is not None]
    assert many.sample(records[:1234]) + many.sample(records[1234:]) == chosen
    a, b = one.statistics(), many.statistics()
    # Float sums differ in the last bits with the order of addition; everything else is equal.
    assert a.expected_sampled == pytest.approx(b.expected_sampled, rel=1e-12)
    assert a.variance_sampled == pytest.approx(b.variance_sampled, rel=1e-12)
    assert dataclasses.replace(a, expected_sampled=0.0, variance_sampled=0.0) == (
        dataclasses.replace(b, expected_sampled=0.0, variance_sampled=0.0)
    )
    for r, p in chosen:
        assert p == probability(r, policy)


def test_statistics_snapshot() -> None:
    policy = SamplingPolicy(rate=0.01, amplification_boost=10, syn_only_boost=5, boost_cap=8)
    sampler = Sampler(policy, random.Random(4))
    records = [
        Rec(packets=50, proto=17, sport=53, tcp_flags=0),  # 0.01*50*8 -> 1 (capped)
        Rec(packets=10, tcp_flags=0x02),  # 0.01*10*5 = 0.5
        Rec(packets=10),  # 0.1
        Rec(packets=0),  # 0
    ]
    chosen = sampler.sample(records)
    stats = sampler.statistics()
    assert stats.records_seen == 4
    assert stats.records_sampled == len(chosen)
    assert stats.expected_sampled == pytest.approx(1.6)
    assert stats.variance_sampled == pytest.approx(0.25 + 0.09)
    assert stats.packets_seen == 70
    assert stats.packets_sampled == sum(r.packets for r, _ in chosen)
    assert stats.certain == 1
    assert stats.boost_capped == 1
    assert dict(stats.boosts) == {
        "amplification": 1,
        "syn_only": 1,
        "operator_prefix": 0,
        "asked": 0,
    }
    assert tuple(stats.boosts) == BOOST_REASONS
    with pytest.raises(TypeError):
        stats.boosts["asked"] = 3  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.records_seen = 0  # type: ignore[misc]
    sampler.sample(records)
    assert stats.records_seen == 4  # a snapshot, not a view
    assert sampler.statistics().records_seen == 8


# -- the generator's discipline ---------------------------------------------------------------


class CountingEntropy:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.calls.append(n)
        return bytes([len(self.calls)]) * n


def test_own_generator_seeded_from_entropy_and_reseeded_every_n_draws() -> None:
    entropy = CountingEntropy()
    sampler = Sampler(SamplingPolicy(rate=1e-3), entropy=entropy, reseed_every=100)
    assert entropy.calls == [2500]  # a full MT19937 state's worth, once at construction
    sampler.sample([Rec(packets=1)] * 1000)
    # 1000 draws: fresh state before draws 101, 201, ..., 901.
    assert len(entropy.calls) == 10
    assert sampler.statistics().reseeds == 9
    for _ in range(100):
        sampler.decide(Rec(packets=1))
    assert sampler.statistics().reseeds == 10
    # Certain and impossible records draw nothing, so they never force a reseed.
    sampler.sample([Rec(packets=10**6)] * 1000 + [Rec(packets=0)] * 1000)
    assert sampler.statistics().reseeds == 10


def test_own_generator_is_deterministic_only_given_the_entropy() -> None:
    records = [Rec(packets=100)] * 5000
    first = Sampler(SamplingPolicy(rate=1e-3), entropy=CountingEntropy(), reseed_every=700)
    again = Sampler(SamplingPolicy(rate=1e-3), entropy=CountingEntropy(), reseed_every=700)
    assert first.sample(records) == again.sample(records)
    a, b = Sampler(SamplingPolicy(rate=1e-3)), Sampler(SamplingPolicy(rate=1e-3))
    assert [a.decide(r) for r in records] != [b.decide(r) for r in records]


def test_injected_generator_is_never_reseeded() -> None:
    entropy = CountingEntropy()
    sampler = Sampler(SamplingPolicy(rate=1e-3), random.Random(5), entropy=entropy, reseed_every=10)
    sampler.sample([Rec(packets=1)] * 1000)
    sampler.reseed()
    assert entropy.calls == []
    assert sampler.statistics().reseeds == 0


def test_reseed_every_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Sampler(SamplingPolicy(), reseed_every=0)


# -- statistically right ----------------------------------------------------------------------


def poisson_sampling_checks(
    records: Sequence[SampledRecord], policy: SamplingPolicy, seeds: Sequence[int]
) -> list[dict[str, float]]:
    """Sample once per seed; the z-scores of the count and of the Horvitz–Thompson total."""
    ps = [probability(r, policy) for r in records]
    expected = math.fsum(ps)
    variance = math.fsum(p * (1 - p) for p in ps)
    true_total = sum(r.packets for r in records)
    ht_var_true = math.fsum(
        r.packets**2 * (1 - p) / p for r, p in zip(records, ps, strict=True) if p > 0
    )
    results = []
    for seed in seeds:
        sampler = Sampler(policy, random.Random(seed))
        chosen = sampler.sample(records)
        stats = sampler.statistics()
        assert stats.expected_sampled == pytest.approx(expected, rel=1e-9)
        assert stats.variance_sampled == pytest.approx(variance, rel=1e-9)
        ht = math.fsum(r.packets / p for r, p in chosen)
        ht_var_est = math.fsum(r.packets**2 * (1 - p) / p**2 for r, p in chosen)
        results.append(
            {
                "sampled": len(chosen),
                "expected": expected,
                "z_count": (len(chosen) - expected) / math.sqrt(variance) if variance else 0.0,
                "true_total": true_total,
                "ht": ht,
                "z_ht": (ht - true_total) / math.sqrt(ht_var_true) if ht_var_true else 0.0,
                "z_ht_est": (ht - true_total) / math.sqrt(ht_var_est) if ht_var_est else 0.0,
            }
        )
    return results


def assert_statistically_right(results: list[dict[str, float]]) -> None:
    for r in results:
        assert abs(r["z_count"]) <= 4, r
        assert abs(r["z_ht"]) <= 4, r
        # The interval a receiver would compute from the reports alone holds as well.
        assert abs(r["z_ht_est"]) <= 4, r
    # Across seeds the errors are centred: the mean z of n runs is within 4/sqrt(n).
    n = len(results)
    assert abs(sum(r["z_count"] for r in results) / n) <= 4 / math.sqrt(n)
    assert abs(sum(r["z_ht"] for r in results) / n) <= 4 / math.sqrt(n)


def synthetic_records(seed: int, n: int) -> list[Rec]:
    """Heavy-tailed flow sizes (Pareto, like real traffic), a mix of protocols and boosts."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        proto = rng.choice([6, 6, 6, 17, 17, 1])
        out.append(
            Rec(
                packets=min(int(rng.paretovariate(1.2)), 10**7),
                proto=proto,
                sport=rng.choice([53, 123, 443, 40000, 51000]),
                tcp_flags=rng.choice([0x02, 0x1B, 0x1B, 0x10]) if proto == 6 else 0,
                sampling_interval=rng.choice([1, 1, 1, 100]),
            )
        )
    return out


@pytest.mark.parametrize("rate", [1e-4, 1e-3, 1e-2])
def test_statistically_right_on_synthetic_flows(rate: float) -> None:
    records = synthetic_records(11, 50_000)
    policy = SamplingPolicy(rate=rate, amplification_boost=20, syn_only_boost=5)
    results = poisson_sampling_checks(records, policy, range(8))
    assert_statistically_right(results)
    assert results[0]["sampled"] > 10


def decode_trace(path: Path) -> list[SampledRecord]:
    """Every flow record of the shared NetFlow v5 trace, decoded by overflowd itself.

    The last frame of the file is cut short: the capture reader counts it and moves on.
    """
    from overflowd.wire.dispatch import DecoderState, decode_datagram
    from overflowd.wire.pcap import CaptureReader

    state = DecoderState()
    records: list[SampledRecord] = []
    reader = CaptureReader()
    with open(path, "rb") as source:
        for datagram in reader.udp_datagrams(source, port=TRACE_PORT):
            records += decode_datagram(datagram.payload, datagram.src, state, datagram.timestamp)
    assert reader.statistics().truncated_frames == 1
    return records


@pytest.fixture(scope="module")
def trace_records() -> list[SampledRecord]:
    path = shared_dir() / "data" / TRACE
    assert path.exists(), f"{path} is missing (set OVERFLOWD_SHARED to the shared directory)"
    records = decode_trace(path)
    assert len(records) > 10_000
    return records


@pytest.mark.parametrize("rate", [1e-4, 1e-3, 1e-2])
def test_statistically_right_on_the_real_trace(
    trace_records: list[SampledRecord], rate: float
) -> None:
    policy = SamplingPolicy(rate=rate)
    results = poisson_sampling_checks(trace_records, policy, range(8))
    assert_statistically_right(results)
    assert results[0]["sampled"] > 10
