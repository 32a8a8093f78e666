"""Which flow records become reports: the sampling policy and the sampler (sans-IO).

A flow record of ``n`` packets, from an exporter that already samples 1 in ``k``, is reported
with probability::

    p = min(1, rate × n × k × boost)        boost = min(boost_cap, product of the factors below)

so the bigger the flood, the sooner its victim hears of it, and every report carries the ``p``
it was drawn with: a receiver estimates the traffic behind the reports it got by
Horvitz–Thompson, ``sum(packets / p)``. Each record is an independent Bernoulli trial
(Poisson sampling), which is what makes that estimate unbiased and its variance
``sum((1 - p) / p² × packets²)`` (over the sampled records) computable.

The boost factors, each applied at most once and multiplied:

``amplification``
    UDP from a source port of a service known for reflection/amplification (DNS, NTP,
    memcached...). A reflected flood reaches its victim from thousands of reflectors, so each
    record an exporter sees is small; the boost makes up for the split.
``syn_only``
    TCP flows whose cumulative flags are SYN alone (a spoofed SYN flood is one-packet flows
    from random sources and ports, the same split again).
``operator_prefix``
    The operator's own list of prefixes and boosts: the longest prefix containing the source,
    the longest containing the destination, the larger of the two when both match. A boost
    below 1 is allowed here: it is how an operator quiets reports about its own networks.
``asked``
    What a report recipient (the flow's source or destination: both get reports) asked for in
    its DNS record (the ``r=`` tag), through an injected lookup; the larger of the two ends.
    Asking never lowers the probability (values below 1 count as 1): one end must not be able
    to silence reports meant for the other.

The product is capped at ``boost_cap``: whatever the traffic or the DNS says, a record is
never reported more often than ``rate × n × k × boost_cap``. Global output budgets are
enforced later (notify); the cap bounds what sampling alone can ask for.

Randomness must be unpredictable to whoever sends the traffic, or a flooder could shape its
flows to dodge reports, and cheap: there is no system call per record. See `Sampler`.

This module must never import trio, sockets, httpx, SQLAlchemy or nacl, read a clock, or hold
global state: the RNG and the source of entropy are injected.
"""

from __future__ import annotations

import ipaddress
import math
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, TypeVar

__all__ = [
    "AMPLIFICATION_PORTS",
    "BOOST_REASONS",
    "AskedBoost",
    "IPAddress",
    "IPNetwork",
    "SampledRecord",
    "Sampler",
    "SamplerStatistics",
    "SamplingPolicy",
    "UniformRandom",
    "probability",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Given an address, the boost its owner asked for (the ``r=`` tag of its DNS record), or None.
AskedBoost = Callable[[IPAddress], "float | None"]

#: UDP source ports of services abused for reflection/amplification (after CISA alert
#: TA14-017A "UDP-Based Amplification Attacks", and memcached/WS-Discovery/ARD/CoAP floods
#: since). A flow *from* one of these ports carries the service's answers.
AMPLIFICATION_PORTS: frozenset[int] = frozenset(
    {
        17,  # QOTD
        19,  # CharGEN
        53,  # DNS
        69,  # TFTP
        111,  # portmapper (rpcbind)
        123,  # NTP (monlist)
        137,  # NetBIOS name service
        161,  # SNMP (GetBulk)
        389,  # CLDAP
        427,  # SLP
        520,  # RIPv1
        1434,  # MS-SQL browser
        1900,  # SSDP
        3283,  # Apple Remote Desktop
        3702,  # WS-Discovery
        5353,  # mDNS
        5683,  # CoAP
        10001,  # Ubiquiti discovery
        11211,  # memcached
        37810,  # DVR DHCPDiscover
    }
)

#: Names of the boost factors, as counted in `SamplerStatistics.boosts`.
BOOST_REASONS = ("amplification", "syn_only", "operator_prefix", "asked")

_AMPLIFICATION = 1
_SYN_ONLY = 2
_OPERATOR = 4
_ASKED = 8
_CAPPED = 16

_TCP = 6
_UDP = 17
#: SYN alone among FIN SYN RST PSH ACK URG; ECE and CWR (0xc0) may ride on an ECN-setup SYN.
_TCP_FLAGS_MASK = 0x3F
_SYN = 0x02


class SampledRecord(Protocol):
    """What the sampler reads from a flow record (`overflowd.flows.FlowRecord` has it all)."""

    @property
    def src(self) -> IPAddress: ...
    @property
    def dst(self) -> IPAddress: ...
    @property
    def sport(self) -> int: ...
    @property
    def proto(self) -> int: ...
    @property
    def packets(self) -> int: ...
    @property
    def tcp_flags(self) -> int: ...
    @property
    def sampling_interval(self) -> int: ...


class UniformRandom(Protocol):
    """A source of floats uniform in [0, 1): `random.Random` is one."""

    def random(self) -> float: ...


R = TypeVar("R", bound=SampledRecord)


def _check_boost(name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")


@dataclass(frozen=True)
class _PrefixTable:
    """Longest-prefix match over the operator's prefixes, one dict per prefix length.

    For each address family, the distinct prefix lengths longest first; an address is shifted
    right by (address bits - length) and looked up. A handful of lengths in practice, so a
    lookup is a few dict probes, not a walk over every prefix.
    """

    v4: tuple[tuple[int, dict[int, float]], ...]
    v6: tuple[tuple[int, dict[int, float]], ...]

    @classmethod
    def build(cls, prefixes: Sequence[tuple[IPNetwork, float]]) -> _PrefixTable:
        by_len: dict[tuple[int, int], dict[int, float]] = {}
        for net, boost in prefixes:
            bits = net.max_prefixlen
            shift = bits - net.prefixlen
            table = by_len.setdefault((net.version, shift), {})
            # The same prefix listed twice: the later entry wins, as in a config file.
            table[int(net.network_address) >> shift] = float(boost)
        v4 = tuple(sorted(((s, t) for (v, s), t in by_len.items() if v == 4), key=_first))
        v6 = tuple(sorted(((s, t) for (v, s), t in by_len.items() if v == 6), key=_first))
        return cls(v4=v4, v6=v6)

    def lookup(self, address: IPAddress) -> float | None:
        if isinstance(address, ipaddress.IPv4Address):
            levels = self.v4
        else:
            # ::ffff:192.0.2.1 is the IPv4 host as far as an operator's IPv4 list goes.
            mapped = address.ipv4_mapped if self.v4 else None
            if mapped is not None:
                found = self.lookup(mapped)
                if found is not None:
                    return found
            levels = self.v6
        n = int(address)
        for shift, table in levels:  # smallest shift = longest prefix first
            boost = table.get(n >> shift)
            if boost is not None:
                return boost
        return None


def _first(item: tuple[int, dict[int, float]]) -> int:
    return item[0]


@dataclass(frozen=True)
class SamplingPolicy:
    """How likely a flow record is to be reported. Immutable; build a new one to change it.

    Defaults, and why:

    - ``rate`` 1e-6 reports per packet: a 1 Mpps flood is reported about once a second by
      each exporter that sees it, a 10-packet web flow about once in 100,000.
    - ``boost_cap`` 1000: whatever policy and DNS ask, no record is more than 1000 times as
      likely to be reported as its packets alone make it.
    - ``amplification_boost`` 100: a reflected flood reaches its victim from many
      reflectors, so an exporter sees it as many small records. Boosted 100 times, the
      100-packet record of one of 100 reflectors is as likely to be reported as the whole
      10,000-packet flood would be had it come from one source.
    - ``syn_only_boost`` 100: a spoofed SYN flood is one-packet flows from random sources
      and ports; each is reported as if it were a 100-packet flow.
    - no operator prefixes, no asked-boost lookup.
    """

    #: Reports per packet (before exporter sampling and boost); finite, >= 0.
    rate: float = 1e-6
    #: Upper bound on the product of all boosts.
    boost_cap: float = 1000.0
    #: UDP source ports whose flows get ``amplification_boost``.
    amplification_ports: frozenset[int] = AMPLIFICATION_PORTS
    amplification_boost: float = 100.0
    #: Boost for TCP flows whose cumulative flags are SYN only.
    syn_only_boost: float = 100.0
    #: (prefix, boost) pairs; longest match per end, larger of the two ends.
    operator_prefixes: Sequence[tuple[IPNetwork, float]] = ()
    #: Boost asked by the owner of an address (DNS ``r=``); called for source and destination.
    asked_boost: AskedBoost | None = field(default=None, compare=False)
    _prefix_table: _PrefixTable = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0, not {self.rate!r}")
        if not (math.isfinite(self.boost_cap) and self.boost_cap >= 1):
            raise ValueError(f"boost_cap must be a finite number >= 1, not {self.boost_cap!r}")
        _check_boost("amplification_boost", self.amplification_boost)
        _check_boost("syn_only_boost", self.syn_only_boost)
        ports = frozenset(self.amplification_ports)
        if any(not 0 <= port <= 0xFFFF for port in ports):
            raise ValueError("amplification_ports must be between 0 and 65535")
        prefixes = tuple(
            (ipaddress.ip_network(net), float(boost)) for net, boost in self.operator_prefixes
        )
        for net, boost in prefixes:
            _check_boost(f"boost of operator prefix {net}", boost)
        object.__setattr__(self, "amplification_ports", ports)
        object.__setattr__(self, "operator_prefixes", prefixes)
        object.__setattr__(self, "_prefix_table", _PrefixTable.build(prefixes))

    def evaluate(self, record: SampledRecord) -> tuple[float, float, int]:
        """``(p, boost, reasons)`` for one record; ``reasons`` is a bit set (see `explain`)."""
        boost = 1.0
        reasons = 0
        proto = record.proto
        if proto == _UDP:
            if record.sport in self.amplification_ports:
                boost *= self.amplification_boost
                reasons |= _AMPLIFICATION
        elif proto == _TCP and record.tcp_flags & _TCP_FLAGS_MASK == _SYN:
            boost *= self.syn_only_boost
            reasons |= _SYN_ONLY
        if self.operator_prefixes:
            table = self._prefix_table
            found_src = table.lookup(record.src)
            found_dst = table.lookup(record.dst)
            if found_src is not None or found_dst is not None:
                boost *= max(b for b in (found_src, found_dst) if b is not None)
                reasons |= _OPERATOR
        if self.asked_boost is not None:
            asked = _asked(self.asked_boost, record.src, record.dst, self.boost_cap)
            if asked > 1.0:
                boost *= asked
                reasons |= _ASKED
        if boost > self.boost_cap:
            boost = self.boost_cap
            reasons |= _CAPPED
        interval = record.sampling_interval
        if interval < 1:  # "unknown" from a careless exporter: assume unsampled
            interval = 1
        p = self.rate * record.packets * interval * boost
        if p > 1.0:
            p = 1.0
        elif not p > 0.0:  # zero packets, rate 0, boost 0 (and NaN cannot get here)
            p = 0.0
        return p, boost, reasons

    def explain(self, record: SampledRecord) -> tuple[float, float, tuple[str, ...]]:
        """``(p, boost, reasons)`` with the reasons named, for people and reports."""
        p, boost, bits = self.evaluate(record)
        names = tuple(name for i, name in enumerate(BOOST_REASONS) if bits & (1 << i))
        if bits & _CAPPED:
            names += ("capped",)
        return p, boost, names


def _asked(lookup: AskedBoost, src: IPAddress, dst: IPAddress, cap: float) -> float:
    best = 1.0
    for address in (src, dst):
        value = lookup(address)
        # NaN fails the comparison and is ignored, like a missing tag; +inf is held to the cap.
        if value is not None and value > best:
            best = min(float(value), cap)
    return best


def probability(record: SampledRecord, policy: SamplingPolicy) -> float:
    """The probability that ``policy`` reports ``record``: ``min(1, rate×n×k×boost)``."""
    return policy.evaluate(record)[0]


@dataclass(frozen=True)
class SamplerStatistics:
    """A snapshot of what a `Sampler` has seen; never changes after it is taken."""

    #: Records offered to the sampler.
    records_seen: int
    #: Records it chose.
    records_sampled: int
    #: Sum of p over records seen: the expected number sampled.
    expected_sampled: float
    #: Sum of p(1-p): the variance of the number sampled.
    variance_sampled: float
    #: Packets in records seen / sampled.
    packets_seen: int
    packets_sampled: int
    #: Records with p == 1 (always reported).
    certain: int
    #: Records whose boost hit ``boost_cap``.
    boost_capped: int
    #: Records each boost factor applied to, by name (`BOOST_REASONS`).
    boosts: Mapping[str, int]
    #: Times the sampler's own generator was reseeded from OS entropy.
    reseeds: int


class Sampler:
    """Draws, for each flow record, whether it is reported, with the policy's ``p``.

    Randomness. Reports are only useful if a flooder cannot predict which of its flows are
    reported, and sampling must not cost a system call per record. Measured on the
    development machine (Python 3.11, one core), per uniform draw: `random.Random.random`
    38 ns; `os.urandom(8)` per draw (what `random.SystemRandom` does) 650 ns; floats from a
    buffered 64 KiB ``os.urandom`` 170 ns in bulk, 290 ns one at a time; BLAKE2b in counter
    mode 590 ns; SHAKE-256 190 ns. So the default generator is a Mersenne Twister, seeded
    from OS entropy with a full state's worth (2,500 bytes > 19,937 bits) at construction
    and **reseeded from fresh OS entropy every ``reseed_every`` draws** (default 4096; a
    reseed costs 28 µs, about 7 ns a draw). Why that is safe although MT19937 is not a
    cryptographic generator:

    - Its outputs are never shown to anyone. All a traffic sender can observe is, for its own
      flows, whether a report came (the report carries ``p``, never the draw): at most one bit
      per draw, and it does not know where its records fall among everyone else's draws.
    - Recovering MT's state takes 19,937 independent bits of its output (the well-known
      attack reads 624 whole 32-bit outputs). Between reseeds a sender learns at most
      ``reseed_every`` bits (4096) about a state of 19,937, too few to determine it; a reseed
      then replaces the whole state with entropy independent of everything before, so what
      was learned in one epoch of 4096 draws is worth nothing in the next.

    A service may also call `reseed` on a timer; it is cheap. Throughput, same machine:
    `sample` 400–470 ns a record with the default policy on the shared NetFlow v5 trace,
    `decide` about 750 ns, either with operator prefixes about 2.5 µs (two address lookups).

    An injected ``rng`` (tests, or a caller's own CSPRNG such as `random.SystemRandom`) is
    used as is and never reseeded here: its owner decides.

    Records with ``p == 0`` or ``p == 1`` consume no draw.
    """

    def __init__(
        self,
        policy: SamplingPolicy,
        rng: UniformRandom | None = None,
        *,
        entropy: Callable[[int], bytes] = os.urandom,
        reseed_every: int = 4096,
    ) -> None:
        if reseed_every < 1:
            raise ValueError("reseed_every must be at least 1")
        self.policy = policy
        self._entropy = entropy
        self._reseed_every = reseed_every
        self._own_rng: random.Random | None = None
        if rng is None:
            self._own_rng = random.Random(entropy(_SEED_BYTES))
            rng = self._own_rng
        self._rng: UniformRandom = rng
        self._draws_left = reseed_every
        self._seen = 0
        self._sampled = 0
        self._sum_p = 0.0
        self._sum_var = 0.0
        self._packets_seen = 0
        self._packets_sampled = 0
        self._certain = 0
        self._capped = 0
        self._reasons = [0] * len(BOOST_REASONS)
        self._reseeds = 0

    def reseed(self) -> None:
        """Replace the generator's state with fresh OS entropy (own generator only)."""
        if self._own_rng is not None:
            self._own_rng.seed(self._entropy(_SEED_BYTES))
            self._reseeds += 1
        self._draws_left = self._reseed_every

    def decide(self, record: SampledRecord) -> float | None:
        """``p`` if ``record`` is to be reported, None if not.

        Draws exactly as `sample` does, so a record stream gives the same choices either way.
        """
        p, _, bits = self.policy.evaluate(record)
        self._count_reasons(bits, 1)
        self._seen += 1
        self._packets_seen += record.packets
        self._sum_p += p
        if p >= 1.0:
            self._certain += 1
        elif p > 0.0:
            self._sum_var += p * (1.0 - p)
            if self._draws_left <= 0:
                self.reseed()
            self._draws_left -= 1
            if not self._rng.random() < p:
                return None
        else:
            return None
        self._sampled += 1
        self._packets_sampled += record.packets
        return p

    def sample(self, records: Iterable[R]) -> list[tuple[R, float]]:
        """The records to report, each with its ``p``, in input order. The fast path.

        Draws and counts exactly as `decide` over the same records would.
        """
        policy = self.policy
        if policy.operator_prefixes or policy.asked_boost is not None:
            return self._sample_general(records)
        # Without prefixes or a lookup, the boost is one of three constants: the arithmetic
        # of `SamplingPolicy.evaluate` is inlined here, with literals for the protocol numbers
        # and flags (6 TCP, 17 UDP, 0x3f/0x02 SYN alone) because this loop is the hot path.
        rate = policy.rate
        amp_ports = policy.amplification_ports
        amp_boost = min(policy.amplification_boost, policy.boost_cap)
        syn_boost = min(policy.syn_only_boost, policy.boost_cap)
        draw = self._rng.random
        draws_left = self._draws_left
        out: list[tuple[R, float]] = []
        append = out.append
        seen = sampled = certain = 0
        sum_p = sum_var = 0.0
        packets_seen = packets_sampled = 0
        n_amp = n_syn = 0
        for record in records:
            seen += 1
            packets = record.packets
            packets_seen += packets
            interval = record.sampling_interval
            p = rate * packets * interval if interval > 1 else rate * packets
            proto = record.proto
            if proto == 17:
                if record.sport in amp_ports:
                    p *= amp_boost
                    n_amp += 1
            elif proto == 6 and record.tcp_flags & 0x3F == 0x02:
                p *= syn_boost
                n_syn += 1
            if p < 1.0:
                if not p > 0.0:
                    continue  # p == 0: never, and no draw
                sum_p += p
                sum_var += p * (1.0 - p)
                if draws_left <= 0:
                    self.reseed()
                    draws_left = self._draws_left
                draws_left -= 1
                if not draw() < p:
                    continue
            else:
                p = 1.0
                sum_p += 1.0
                certain += 1
            sampled += 1
            packets_sampled += packets
            append((record, p))
        self._draws_left = draws_left
        self._seen += seen
        self._sampled += sampled
        self._sum_p += sum_p
        self._sum_var += sum_var
        self._packets_seen += packets_seen
        self._packets_sampled += packets_sampled
        self._certain += certain
        if n_amp:
            amp_bits = _AMPLIFICATION
            if policy.amplification_boost > policy.boost_cap:
                amp_bits |= _CAPPED
            self._count_reasons(amp_bits, n_amp)
        if n_syn:
            syn_bits = _SYN_ONLY
            if policy.syn_only_boost > policy.boost_cap:
                syn_bits |= _CAPPED
            self._count_reasons(syn_bits, n_syn)
        return out

    def _sample_general(self, records: Iterable[R]) -> list[tuple[R, float]]:
        """`sample` with operator prefixes or asked boosts: `decide` per record."""
        decide = self.decide
        return [(record, p) for record in records if (p := decide(record)) is not None]

    def _count_reasons(self, bits: int, n: int) -> None:
        if not bits:
            return
        for i in range(len(BOOST_REASONS)):
            if bits & (1 << i):
                self._reasons[i] += n
        if bits & _CAPPED:
            self._capped += n

    def statistics(self) -> SamplerStatistics:
        return SamplerStatistics(
            records_seen=self._seen,
            records_sampled=self._sampled,
            expected_sampled=self._sum_p,
            variance_sampled=self._sum_var,
            packets_seen=self._packets_seen,
            packets_sampled=self._packets_sampled,
            certain=self._certain,
            boost_capped=self._capped,
            boosts=MappingProxyType(dict(zip(BOOST_REASONS, self._reasons, strict=True))),
            reseeds=self._reseeds,
        )


#: 2,500 bytes = 20,000 bits: more than MT19937's 19,937-bit state, so every state is reachable.
_SEED_BYTES = 2500
