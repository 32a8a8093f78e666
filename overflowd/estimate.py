"""The traffic behind sampled reports: Horvitz–Thompson totals with 95% intervals (sans-IO).

Every report carries the ``p`` its flow record was drawn with (`overflowd.flowsample`):
``p = min(1, rate × n × k × boost)`` for a record of ``n`` packets from an exporter sampling 1 in
``k``. The records are independent Bernoulli trials (Poisson sampling), so over the reports of a
group (one destination, one observer, one source prefix...)::

    packets ≈ Σ n·k / p        bytes ≈ Σ b·k / p          (Horvitz–Thompson)

is unbiased for the packets and bytes the exporters' records of that group stand for. This
module computes those sums and an interval around them that keeps its stated coverage when the
reports are few, which is the usual case: at rate 1e-4 a destination that received 30,000
packets in a trace is behind three or four reports.

Why not the textbook interval. The HT variance estimate ``Σ (n·k)² (1 − p) / p²`` with a normal
interval covers far less than 95% at small counts (measured on the shared trace: docs/estimates.md).
The reason is the shape of the estimator: with ``p`` proportional to packets, every report with
``p < 1`` weighs ``w = n·k / p = 1 / (rate × boost)`` whatever its flow's size, so the estimate is
a weighted *count* of reports, and the count is a sum of independent Bernoulli trials
(Poisson-binomial) with mean ``Σ p``: a few reports is a skewed, discrete quantity. So:

- The ``p = 1`` part is counted exactly (those records are always reported).
- The ``p < 1`` part is a weighted sum of counts, and its interval is the gamma interval of
  Fay and Feuer (1997, "Confidence intervals for directly standardized rates: a method based on
  the gamma distribution", Stat. Med. 16:791), made for exactly that: a weighted sum of
  Poisson counts. With one weight it *is* the exact (Garwood 1936) Poisson interval, scaled by
  the weight; with several (boosted and unboosted flows, several observers at different rates)
  it stays conservative. A Poisson-binomial count is less spread than the Poisson count of the
  same mean (its variance is ``Σ p(1 − p)``, not ``Σ p``), which makes the interval more
  conservative still, never less.

Zero reports. When a group has no ``p < 1`` report, its missed traffic is not known to be zero:
the upper end is ``unit × −ln(α/2)`` (3.69 units at 95%), where ``unit`` is the largest weight a
missed report could have had: the caller's, typically the largest ``n·k/p`` among all ``p < 1``
reports of the same observer (its ``1 / (rate × smallest boost)``; see `Tally.packets_unit`).
Without one, the upper end is infinite: an interval we cannot bound is stated as unbounded, not
guessed.

Bytes use the same interval with byte weights ``b·k/p`` (and ``byte_unit`` for the missed
part). The interval assumes, as the Poisson model does, that a missed flow's bytes per packet
are no larger than what ``byte_unit`` states; its coverage is measured, not proven
(docs/estimates.md has the numbers).

What the interval does not include: the exporter's own 1-in-``k`` packet sampling (the estimate
is of ``Σ n·k``, the traffic the exported records stand for) and reports that were lost on
the way or refused by a budget.

Grouping (`TopN`) is streaming and bounded in memory: at most ``max_keys`` groups are held; past
that, the least busy half is folded into "other" (which stays exact, as tallies merge exactly),
and the result says how many groups were folded and how big the largest was.

This module must never import trio, sockets, httpx, SQLAlchemy or nacl, or read a clock.
"""

from __future__ import annotations

import ipaddress
import math
import statistics
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

if TYPE_CHECKING:
    from overflowd.report import Payload

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_MAX_KEYS",
    "GROUP_BY",
    "OTHER",
    "Estimate",
    "Interval",
    "Tally",
    "TopN",
    "TopResult",
    "gamma_quantile",
    "group_key",
    "larger",
    "prefix_key",
    "weighted_poisson_interval",
]

#: The confidence of every interval unless the caller asks otherwise.
DEFAULT_CONFIDENCE = 0.95
#: Groups `TopN` holds before folding the least busy half into "other": 10,000 groups of
#: about 200 bytes each, a couple of MB, whatever a query scans.
DEFAULT_MAX_KEYS = 10_000
#: The key under which `TopN.result` returns everything not in its top N.
OTHER: Literal["other"] = "other"

# The incomplete gamma function below is computed by its series / continued fraction up to this
# shape; beyond it, the Wilson–Hilferty approximation is accurate to better than 1e-6 relative
# (error O(a^-3/2)), and the iterations it saves grow as sqrt(a).
_EXACT_SHAPE_MAX = 1e7
_MAX_ITERATIONS = 20_000
_EPS = 1e-15


# ---------------------------------------------------------------------------------------------
# The gamma distribution, enough of it for the interval (stdlib only: this must stay sans-IO and
# free of scipy).


def _lower_regularized_gamma(a: float, x: float) -> float:
    """P(a, x), the regularized lower incomplete gamma function, for a > 0, x >= 0."""
    if x <= 0.0:
        return 0.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:
        # Series: P = x^a e^-x / Γ(a+1) × Σ x^n / ((a+1)...(a+n)).
        term = total = 1.0 / a
        ap = a
        for _ in range(_MAX_ITERATIONS):
            ap += 1.0
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _EPS:
                break
        return min(1.0, total * math.exp(log_prefix))
    # Continued fraction for Q = 1 - P (modified Lentz), Numerical Recipes §6.2.
    tiny = 1e-300
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, _MAX_ITERATIONS):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        if abs(d) < tiny:
            d = tiny
        c = b + an / c
        if abs(c) < tiny:
            c = tiny
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            break
    return max(0.0, 1.0 - math.exp(log_prefix) * h)


def _wilson_hilferty(a: float, q: float) -> float:
    z = statistics.NormalDist().inv_cdf(q)
    c = 1.0 / (9.0 * a)
    return a * max(1.0 - c + z * math.sqrt(c), 1e-3) ** 3


def gamma_quantile(shape: float, q: float) -> float:
    """The ``q`` quantile of the gamma distribution of ``shape`` and scale 1.

    Newton steps on ``P(shape, x) = q`` from the Wilson–Hilferty guess, kept inside a bracket
    that bisection shrinks whenever a step would leave it, so it always converges.
    """
    if not (shape > 0.0 and math.isfinite(shape)):
        raise ValueError(f"shape must be a finite number > 0, not {shape!r}")
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), not {q!r}")
    if shape == 1.0:
        return -math.log1p(-q)  # the exponential distribution, exactly
    if shape > _EXACT_SHAPE_MAX:
        return _wilson_hilferty(shape, q)
    lo, hi = 0.0, max(1.0, shape)
    while _lower_regularized_gamma(shape, hi) < q:
        lo, hi = hi, hi * 2.0
    x = min(max(_wilson_hilferty(shape, q), lo), hi)
    log_norm = math.lgamma(shape)
    for _ in range(200):
        f = _lower_regularized_gamma(shape, x) - q
        if f < 0.0:
            lo = x
        else:
            hi = x
        density = math.exp((shape - 1.0) * math.log(x) - x - log_norm) if x > 0.0 else 0.0
        step_ok = False
        if density > 0.0:
            nxt = x - f / density
            if lo < nxt < hi:
                step_ok = True
        if not step_ok:
            nxt = 0.5 * (lo + hi)
        if abs(nxt - x) <= 1e-13 * max(1.0, x):
            return nxt
        x = nxt
    return x


def weighted_poisson_interval(
    total: float, sum_squares: float, max_weight: float | None, confidence: float
) -> tuple[float, float]:
    """Fay–Feuer interval for the mean of ``Σ wᵢ Xᵢ``, the ``Xᵢ`` independent Poisson counts.

    ``total`` = ``Σ wᵢ xᵢ`` observed, ``sum_squares`` = ``Σ wᵢ² xᵢ``, ``max_weight`` the largest
    weight any count could have (observed or not); None: not known, the upper end is infinite.
    Lower end: the ``α/2`` quantile of the gamma of mean ``total`` and variance ``sum_squares``
    (0 when nothing was observed). Upper end: the ``1 − α/2`` quantile of the gamma with one more
    count of the largest weight added to both. With one weight ``w`` and ``K`` counts these are
    ``w·χ²(α/2; 2K)/2`` and ``w·χ²(1−α/2; 2K+2)/2``, Garwood's exact interval.
    """
    alpha = 1.0 - confidence
    if not (total >= 0.0 and sum_squares >= 0.0):
        raise ValueError("total and sum_squares must be numbers >= 0")
    if max_weight is not None and not max_weight >= 0.0:
        raise ValueError(f"max_weight must be a number >= 0 or None, not {max_weight!r}")
    if not (math.isfinite(total) and math.isfinite(sum_squares)):
        return 0.0, math.inf
    if total > 0.0 and sum_squares == 0.0:
        raise ValueError("sum_squares cannot be 0 when total is not")
    unbounded = max_weight is None or not math.isfinite(max_weight)
    # The interval scales with the weights: compute it in units of m, at least every weight
    # (sqrt(Σw²x) >= max w), so no square below over- or underflows, whatever the weights.
    m = max(math.sqrt(sum_squares), 0.0 if unbounded or max_weight is None else max_weight)
    if m == 0.0:
        return 0.0, (math.inf if unbounded else 0.0)  # max_weight 0: nothing could be missed
    t, s = total / m, sum_squares / m / m
    low = m * (s / t) * gamma_quantile(t * t / s, alpha / 2.0) if t > 0.0 else 0.0
    if unbounded or max_weight is None:
        return min(low, total), math.inf
    w = max_weight / m
    top_t, top_s = t + w, s + w * w
    high = m * (top_s / top_t) * gamma_quantile(top_t * top_t / top_s, 1.0 - alpha / 2.0)
    # The interval holds its own estimate (true in exact arithmetic: both gammas have shape >= 1,
    # see docs/estimates.md); rounding must not make a reader doubt it.
    return min(low, total), max(high, total)


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate and its interval, ``low <= estimate <= high`` (``high`` may be inf)."""

    estimate: float
    low: float
    high: float
    confidence: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def to_json(self) -> dict[str, float | None]:
        """JSON has no infinity: an unbounded end is null."""
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high if math.isfinite(self.high) else None,
            "confidence": self.confidence,
        }


@dataclass(frozen=True, slots=True)
class Estimate:
    """Packets and bytes behind a group of reports, and what they rest on."""

    packets: Interval
    bytes: Interval
    #: Reports in the group; of them, with p = 1 (counted exactly).
    reports: int
    certain_reports: int

    @property
    def sampled_reports(self) -> int:
        """Reports with p < 1: the count the interval's width comes from."""
        return self.reports - self.certain_reports

    def to_json(self) -> dict[str, object]:
        return {
            "packets": self.packets.to_json(),
            "bytes": self.bytes.to_json(),
            "reports": self.reports,
            "certain_reports": self.certain_reports,
        }


# ---------------------------------------------------------------------------------------------
# The accumulator


class Tally:
    """The sums behind one group's estimate; add reports one at a time, merge tallies exactly.

    Each field is a plain SUM, MAX or COUNT over reports, so a database can compute a tally in a
    GROUP BY (`Tally.from_sums`) instead of streaming every report into Python.
    """

    __slots__ = (
        "bytes_max",
        "bytes_squares",
        "bytes_total",
        "certain_bytes",
        "certain_packets",
        "certain_reports",
        "packets_max",
        "packets_squares",
        "packets_total",
        "reports",
    )

    def __init__(self) -> None:
        self.reports = 0
        #: p = 1: the exact sums of packets × interval and bytes × interval.
        self.certain_reports = 0
        self.certain_packets = 0
        self.certain_bytes = 0
        #: p < 1: Σw, Σw² and max w of the weights n·k/p (packets) and b·k/p (bytes).
        self.packets_total = 0.0
        self.packets_squares = 0.0
        self.packets_max = 0.0
        self.bytes_total = 0.0
        self.bytes_squares = 0.0
        self.bytes_max = 0.0

    @classmethod
    def from_sums(
        cls,
        *,
        reports: int,
        certain_reports: int,
        certain_packets: int,
        certain_bytes: int,
        packets_total: float,
        packets_squares: float,
        packets_max: float,
        bytes_total: float,
        bytes_squares: float,
        bytes_max: float,
    ) -> Tally:
        """A tally from sums computed elsewhere (SQL), with the same meaning as the fields."""
        t = cls()
        t.reports, t.certain_reports = reports, certain_reports
        t.certain_packets, t.certain_bytes = certain_packets, certain_bytes
        t.packets_total, t.packets_squares = float(packets_total), float(packets_squares)
        t.packets_max = float(packets_max)
        t.bytes_total, t.bytes_squares = float(bytes_total), float(bytes_squares)
        t.bytes_max = float(bytes_max)
        return t

    def add(self, packets: int, bytes_: int, probability: float, interval: int = 1) -> None:
        """One report: its flow's packets and bytes, its ``sampling.p`` and ``.interval``.

        Raises ValueError for a ``p`` outside (0, 1] or negative counts: a decoded report
        never has them (`overflowd.report` refuses them), so this is the caller's mistake.
        """
        if not 0.0 < probability <= 1.0:
            raise ValueError(f"probability must be in (0, 1], not {probability!r}")
        if packets < 0 or bytes_ < 0 or interval < 1:
            raise ValueError("packets and bytes must be >= 0 and interval >= 1")
        self.reports += 1
        if probability >= 1.0:
            self.certain_reports += 1
            self.certain_packets += packets * interval
            self.certain_bytes += bytes_ * interval
            return
        w = packets * interval / probability  # may be inf for a p near 5e-324: kept, unbounded
        self.packets_total += w
        self.packets_squares += w * w
        if w > self.packets_max:
            self.packets_max = w
        wb = bytes_ * interval / probability
        self.bytes_total += wb
        self.bytes_squares += wb * wb
        if wb > self.bytes_max:
            self.bytes_max = wb

    def add_payload(self, payload: Payload) -> None:
        """One report, read from its payload: ``flow.packets``, ``flow.bytes``, ``sampling``."""
        flow, sampling = payload.flow, payload.sampling
        self.add(flow.packets, flow.bytes, sampling.probability, sampling.interval)

    def merge(self, other: Tally) -> None:
        """Add ``other``'s reports to this one (exact: every field is a sum or a max)."""
        self.reports += other.reports
        self.certain_reports += other.certain_reports
        self.certain_packets += other.certain_packets
        self.certain_bytes += other.certain_bytes
        self.packets_total += other.packets_total
        self.packets_squares += other.packets_squares
        self.packets_max = max(self.packets_max, other.packets_max)
        self.bytes_total += other.bytes_total
        self.bytes_squares += other.bytes_squares
        self.bytes_max = max(self.bytes_max, other.bytes_max)

    def copy(self) -> Tally:
        t = Tally()
        t.merge(self)
        return t

    @property
    def packets_unit(self) -> float | None:
        """The largest weight n·k/p among this tally's p < 1 reports, None if it has none.

        The tally of *all* of an observer's reports gives that observer's unit: an unboosted
        report weighs ``1 / rate`` (the ``k`` cancels), a boosted one less. Passed as ``unit``
        to the estimate of any of that observer's groups, it bounds what one report missed
        from the group would have added.
        """
        return self.packets_max if self.reports > self.certain_reports else None

    @property
    def bytes_unit(self) -> float | None:
        """As `packets_unit`, for bytes (the largest b·k/p)."""
        return self.bytes_max if self.reports > self.certain_reports else None

    @property
    def packets_estimate(self) -> float:
        """The HT point estimate of packets (what `TopN` ranks by)."""
        return self.certain_packets + self.packets_total

    def estimate(
        self,
        *,
        unit: float | None = None,
        byte_unit: float | None = None,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> Estimate:
        """The estimate, with intervals of ``confidence``.

        ``unit`` / ``byte_unit``: the largest packets / bytes weight (n·k/p, b·k/p) a report
        missed from this group could have had, e.g. `packets_unit` / `bytes_unit` of the
        observer's whole tally. The interval uses the larger of it and the largest weight seen
        here; with neither (no p < 1 report and no unit given) the upper end is infinite.
        """
        if not 0.0 < confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), not {confidence!r}")
        sampled = self.reports > self.certain_reports
        return Estimate(
            packets=_interval(
                self.certain_packets,
                self.packets_total,
                self.packets_squares,
                _max_weight(self.packets_max if sampled else None, unit),
                confidence,
            ),
            bytes=_interval(
                self.certain_bytes,
                self.bytes_total,
                self.bytes_squares,
                _max_weight(self.bytes_max if sampled else None, byte_unit),
                confidence,
            ),
            reports=self.reports,
            certain_reports=self.certain_reports,
        )


def _max_weight(seen: float | None, given: float | None) -> float | None:
    if given is not None and not (given >= 0.0):  # NaN or negative: the caller's mistake
        raise ValueError(f"unit must be a number >= 0 or None, not {given!r}")
    if seen is None:
        return given
    if given is None:
        return seen
    return max(seen, given)


def larger(a: float | None, b: float | None) -> float | None:
    """The larger of two optional units; None stands for "not known", not for zero."""
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _interval(
    certain: int, total: float, squares: float, max_weight: float | None, confidence: float
) -> Interval:
    low, high = weighted_poisson_interval(total, squares, max_weight, confidence)
    exact = float(certain)
    return Interval(
        estimate=exact + total, low=exact + low, high=exact + high, confidence=confidence
    )


# ---------------------------------------------------------------------------------------------
# Grouping

K = TypeVar("K", bound=Hashable)


def prefix_key(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, v4_len: int = 24, v6_len: int = 48
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The prefix of ``address`` to group by (/24 and /48 by default, as nfdump and Akvorado)."""
    if not (0 <= v4_len <= 32 and 0 <= v6_len <= 128):
        raise ValueError(f"prefix lengths must be 0..32 and 0..128, not {v4_len}, {v6_len}")
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv4Network((int(address) >> (32 - v4_len) << (32 - v4_len), v4_len))
    return ipaddress.IPv6Network((int(address) >> (128 - v6_len) << (128 - v6_len), v6_len))


#: What `group_key` groups by: the names of ``overflowd-query top --by`` (issue #11).
GROUP_BY = ("observer", "src", "dst", "srcport", "dstport", "proto")
GroupKey = bytes | int | ipaddress.IPv4Network | ipaddress.IPv6Network


def group_key(
    by: str, payload: Payload, observer_key: bytes, *, v4_len: int = 24, v6_len: int = 48
) -> GroupKey:
    """The key of a report for grouping ``by`` one of `GROUP_BY` (addresses by prefix)."""
    flow = payload.flow
    if by == "observer":
        return observer_key
    if by == "src":
        return prefix_key(flow.src, v4_len, v6_len)
    if by == "dst":
        return prefix_key(flow.dst, v4_len, v6_len)
    if by == "srcport":
        return flow.sport
    if by == "dstport":
        return flow.dport
    if by == "proto":
        return flow.proto
    raise ValueError(f"cannot group by {by!r}: one of {', '.join(GROUP_BY)}")


@dataclass(frozen=True, slots=True)
class TopResult(Generic[K]):
    """`TopN.result`: the top groups with their estimates, then "other" (if anything is left)."""

    top: tuple[tuple[K, Estimate], ...]
    #: Everything else, or None when nothing else was seen.
    other: Estimate | None
    #: Distinct groups the result stands for (top + those in "other"); exact when ``folded`` is
    #: 0, else an upper bound (a group folded and seen again is counted twice).
    groups: int
    #: Groups folded into "other" while streaming because more than ``max_keys`` were held;
    #: 0 means every group's tally is exact. Else, a group seen both before and after a fold is
    #: split between its row and "other", by at most ``max_folded`` packets per fold.
    folded: int
    max_folded: float

    def rows(self) -> Iterator[tuple[K | Literal["other"], Estimate]]:
        yield from self.top
        if self.other is not None:
            yield OTHER, self.other


class TopN(Generic[K]):
    """Tallies by key, bounded in memory; the top N by estimated packets or bytes, the rest "other".

    ``key`` may be anything hashable: an observer key (bytes), `prefix_key` of a source or
    destination, a port, a protocol number, a tuple of those.
    """

    def __init__(self, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 2:
            raise ValueError("max_keys must be at least 2")
        self.max_keys = max_keys
        self._tallies: dict[K, Tally] = {}
        self._folded_tally = Tally()
        self._folded = 0
        self._max_folded = 0.0

    def add(self, key: K, packets: int, bytes_: int, probability: float, interval: int = 1) -> None:
        tally = self._tallies.get(key)
        if tally is None:
            if len(self._tallies) >= self.max_keys:
                self._fold()
            tally = self._tallies[key] = Tally()
        tally.add(packets, bytes_, probability, interval)

    def add_payload(self, key: K, payload: Payload) -> None:
        flow, sampling = payload.flow, payload.sampling
        self.add(key, flow.packets, flow.bytes, sampling.probability, sampling.interval)

    def add_tally(self, key: K, tally: Tally) -> None:
        """Merge a tally computed elsewhere (a GROUP BY row) under ``key``."""
        mine = self._tallies.get(key)
        if mine is None:
            if len(self._tallies) >= self.max_keys:
                self._fold()
            mine = self._tallies[key] = Tally()
        mine.merge(tally)

    def _fold(self) -> None:
        """Fold the least busy half into "other": O(log n) amortized per new key."""
        ranked = sorted(self._tallies.items(), key=lambda kv: kv[1].packets_estimate)
        for key, tally in ranked[: len(ranked) // 2]:
            self._folded_tally.merge(tally)
            self._max_folded = max(self._max_folded, tally.packets_estimate)
            del self._tallies[key]
            self._folded += 1

    def __len__(self) -> int:
        return len(self._tallies)

    def total(self) -> Tally:
        """Every report added, whatever group (exact, folds included)."""
        t = self._folded_tally.copy()
        for tally in self._tallies.values():
            t.merge(tally)
        return t

    def result(
        self,
        n: int,
        *,
        by: Literal["packets", "bytes"] = "packets",
        unit: float | None = None,
        byte_unit: float | None = None,
        unit_of: Callable[[K], tuple[float | None, float | None]] | None = None,
        confidence: float = DEFAULT_CONFIDENCE,
    ) -> TopResult[K]:
        """The ``n`` groups with the largest estimate ``by`` packets or bytes, then "other".

        ``unit``/``byte_unit`` apply to every group; ``unit_of(key)`` may give them per group
        instead (per observer, say). Ties are broken by key order of first appearance.
        """
        if n < 0:
            raise ValueError("n must be >= 0")
        estimates: list[tuple[K, Estimate]] = []
        for key, tally in self._tallies.items():
            u, bu = unit_of(key) if unit_of is not None else (unit, byte_unit)
            estimates.append((key, tally.estimate(unit=u, byte_unit=bu, confidence=confidence)))
        if by == "packets":
            estimates.sort(key=lambda ke: -ke[1].packets.estimate)
        elif by == "bytes":
            estimates.sort(key=lambda ke: -ke[1].bytes.estimate)
        else:
            raise ValueError(f"by must be 'packets' or 'bytes', not {by!r}")
        rest = self._folded_tally.copy()
        rest_unit, rest_byte_unit = unit, byte_unit
        for key, _ in estimates[n:]:
            rest.merge(self._tallies[key])
            if unit_of is not None:
                u, bu = unit_of(key)
                rest_unit = larger(rest_unit, u)
                rest_byte_unit = larger(rest_byte_unit, bu)
        other = (
            rest.estimate(unit=rest_unit, byte_unit=rest_byte_unit, confidence=confidence)
            if rest.reports
            else None
        )
        return TopResult(
            top=tuple(estimates[:n]),
            other=other,
            groups=len(self._tallies) + self._folded,
            folded=self._folded,
            max_folded=self._max_folded,
        )
