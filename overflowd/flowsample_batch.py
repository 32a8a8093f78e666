"""The sampler of `overflowd.flowsample`, over a whole batch at once (sans-IO): a `V5Batch`
or a `TemplateBatch` (NetFlow v9/IPFIX), anything with the columns of `BatchColumns`.

Same policy, same ``p`` (bit for bit: the factors are multiplied in the order
`SamplingPolicy.evaluate` multiplies them), same meaning of every statistic; the difference
is that ``p`` and the draws are numpy arrays over every record of a batch, so sampling costs
a few nanoseconds a record instead of half a microsecond.

Every factor but one vectorizes: amplification (a 65,536-entry port table and ``proto ==
17``), SYN-only (``proto == 6`` and ``flags & 0x3f == 0x02``), operator prefixes (IPv4
prefixes grouped by length, shortest first so that longer matches overwrite shorter ones;
a few prefixes of one length are compared one by one, more are binary-searched; the
larger of the two ends). With the default policy (amplification and SYN-only only) the
factors are multiplied in place where they apply, without a boost array. The asked boost
is a per-address callable (a DNS cache) and cannot be vectorized. It is handled by
**two-stage thinning**, which is exact:

1. draw ``u`` uniform in [0, 1) for every record;
2. compute ``p_max``, the largest ``p`` any asked boost could give the record: the asked
   boost is at least 1 and at most ``boost_cap``, and the product is capped at
   ``boost_cap``, so ``p_max = min(1, rate × n × k × min(boost_cap, b × boost_cap))``
   with ``b`` the product of the other factors;
3. only where ``u < p_max`` (a small fraction at sane rates) look the two addresses up and
   compute the exact ``p``; report when ``u < p``.

Since ``p <= p_max`` holds in floating point too (multiplication by a positive number is
monotone under rounding), ``u < p`` implies ``u < p_max``: the record is reported exactly
when ``u < p``, with ``u`` uniform, i.e. with probability ``p``. The lookups are done for
about ``sum(p_max)`` records instead of all of them (0.6% of the shared trace's records at
rate 1e-6 and the default cap), once per distinct address among them.

Randomness: numpy's PCG64, seeded with 256 bits from ``os.urandom`` and **reseeded from
fresh OS entropy every** ``reseed_every`` **draws** (default 4096, as `Sampler`; a reseed
costs about 3 µs, under a nanosecond a draw). PCG64 is not a cryptographic generator; what
makes it fit here is what makes MT19937 fit in `Sampler`: draws are never shown, a traffic
sender learns at most one bit (reported or not) per record of its own, without knowing
where its records fall among the batch's draws, and each reseed replaces the whole state
(128-bit state and 127-bit increment) with entropy independent of everything before. One
draw is made per record, whatever its ``p`` (``u < 1`` always holds, ``u < 0`` never), so a
record's fate never depends on other records' ``p``. An injected generator is used as is
and never reseeded (tests; or a caller's own).

This module must never import trio, sockets, httpx, SQLAlchemy or nacl, read a clock, or hold
global state.
"""

from __future__ import annotations

import ipaddress
import math
import os
from collections.abc import Callable
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from overflowd.flowsample import BOOST_REASONS, SamplerStatistics, SamplingPolicy

__all__ = ["BatchColumns", "BatchSampler"]

Unsigned = npt.NDArray[np.unsignedinteger[Any]]


class BatchColumns(Protocol):
    """What the sampler reads of a batch: one array per field, a row per record."""

    @property
    def src(self) -> npt.NDArray[np.uint32]: ...
    @property
    def dst(self) -> npt.NDArray[np.uint32]: ...
    @property
    def sport(self) -> npt.NDArray[np.uint16]: ...
    @property
    def proto(self) -> npt.NDArray[np.uint8]: ...
    @property
    def tcp_flags(self) -> Unsigned: ...
    @property
    def packets(self) -> Unsigned: ...
    #: Resolved sampling interval, >= 1.
    @property
    def interval(self) -> npt.NDArray[np.int64]: ...
    def __len__(self) -> int: ...


#: Packet counts below this cannot overflow a uint64 sum over any batch (< 2**32 records).
_SUMMABLE = 1 << 32


def _total(packets: Unsigned) -> int:
    """Sum of the packet counts as Python ints do it (no wrap-around for 64-bit counters)."""
    if len(packets) and packets.dtype.itemsize > 4 and int(packets.max()) >= _SUMMABLE:
        return sum(packets.tolist())
    return int(packets.sum(dtype=np.uint64))


F64 = npt.NDArray[np.float64]
Indices = npt.NDArray[np.intp]

_SEED_BITS = 256
_MASK128 = (1 << 128) - 1


class _PrefixLevels:
    """Longest-prefix match of IPv4 addresses (numpy ``uint32``) against the operator's list.

    One level per distinct prefix length: the network numbers shifted right by ``32 -
    length``, sorted, with their boosts. The same prefix listed twice: the later
    entry wins, as in `SamplingPolicy` (and a config file). IPv6 prefixes cannot contain a
    NetFlow v5 address and are ignored here; `SamplingPolicy` does the same for IPv4
    addresses.
    """

    def __init__(self, prefixes: tuple[tuple[Any, float], ...]) -> None:
        by_shift: dict[int, dict[int, float]] = {}
        for net, boost in prefixes:
            if not isinstance(net, ipaddress.IPv4Network):
                continue
            shift = 32 - net.prefixlen
            by_shift.setdefault(shift, {})[int(net.network_address) >> shift] = float(boost)
        self.levels: list[tuple[int, npt.NDArray[np.uint32], F64]] = []
        # Shortest prefix first: each level overwrites what a shorter prefix matched, so
        # the longest match is what is left, with no bookkeeping of which are settled.
        for shift in sorted(by_shift, reverse=True):
            table = by_shift[shift]
            keys = np.array(sorted(table), dtype=np.uint32)
            values = np.array([table[k] for k in keys.tolist()], dtype=np.float64)
            self.levels.append((shift, keys, values))

    def lookup(self, addresses: npt.NDArray[np.uint32]) -> F64:
        """The boost of the longest prefix containing each address, NaN where none does."""
        out = np.full(len(addresses), np.nan)
        for shift, keys, values in self.levels:
            if shift == 32:
                out.fill(values[0])  # 0.0.0.0/0 contains everything (and >> 32 is undefined)
                continue
            shifted = addresses >> np.uint32(shift)
            if len(keys) <= _FEW:
                # A handful of prefixes of this length: one comparison each beats a search.
                for key, value in zip(keys.tolist(), values.tolist(), strict=True):
                    np.copyto(out, value, where=shifted == key)
            else:
                pos = np.searchsorted(keys, shifted)
                pos[pos == len(keys)] = 0
                np.copyto(out, values[pos], where=keys[pos] == shifted)
        return out


#: Up to this many prefixes of one length are matched by comparisons, more by binary search.
_FEW = 8


class BatchSampler:
    """Draws, for every record of a batch (`BatchColumns`), whether it is reported, with
    the policy's p."""

    def __init__(
        self,
        policy: SamplingPolicy,
        rng: np.random.Generator | None = None,
        *,
        entropy: Callable[[int], bytes] = os.urandom,
        reseed_every: int = 4096,
    ) -> None:
        if reseed_every < 1:
            raise ValueError("reseed_every must be at least 1")
        self.policy = policy
        self._entropy = entropy
        self._reseed_every = reseed_every
        self._own: np.random.PCG64 | None = None
        if rng is None:
            self._own = np.random.PCG64()
            rng = np.random.Generator(self._own)
            self._set_state()
        self._rng = rng
        self._draws_left = reseed_every
        self._reseeds = 0

        ports = np.zeros(0x10000, dtype=bool)
        ports[list(policy.amplification_ports)] = True
        self._amp_ports = ports
        self._prefixes = _PrefixLevels(tuple(policy.operator_prefixes))
        # Can any record's boost exceed the cap without an asked boost? (Else no pass
        # counts the capped ones.) And can rate × packets × interval overflow to inf?
        top_prefix = max(
            (b for _, _, values in self._prefixes.levels for b in values.tolist()), default=1.0
        )
        self._may_cap = (
            max(policy.amplification_boost, policy.syn_only_boost, 1.0) * max(top_prefix, 1.0)
            > policy.boost_cap
        )
        self._may_overflow = not math.isfinite(policy.rate * 2.0**32 * 2.0**63)
        self._plain_policy = (
            not self._prefixes.levels and policy.asked_boost is None and not self._may_overflow
        )

        self._seen = 0
        self._sampled = 0
        self._sum_p = 0.0
        self._sum_var = 0.0
        self._packets_seen = 0
        self._packets_sampled = 0
        self._certain = 0
        self._capped = 0
        self._reasons = [0] * len(BOOST_REASONS)
        #: Records whose asked boost was looked up (the thinning candidates).
        self._asked_lookups = 0

    # -- randomness -------------------------------------------------------------------------

    def _set_state(self) -> None:
        assert self._own is not None
        seed = int.from_bytes(self._entropy(_SEED_BITS // 8), "big")
        # Setting the state directly costs ~3 µs; PCG64(seed) runs a SeedSequence (~60 µs).
        # The increment must be odd.
        self._own.state = {
            "bit_generator": "PCG64",
            "state": {"state": seed >> 128, "inc": (seed & _MASK128) | 1},
            "has_uint32": 0,
            "uinteger": 0,
        }

    def reseed(self) -> None:
        """Replace the generator's state with fresh OS entropy (own generator only)."""
        if self._own is not None:
            self._set_state()
            self._reseeds += 1
        self._draws_left = self._reseed_every

    def _uniform(self, n: int) -> F64:
        if self._own is None:
            return self._rng.random(n)
        out = np.empty(n)
        pos = 0
        while pos < n:
            if self._draws_left <= 0:
                self.reseed()
            k = min(n - pos, self._draws_left)
            self._rng.random(out=out[pos : pos + k])
            self._draws_left -= k
            pos += k
        return out

    # -- probabilities ------------------------------------------------------------------------

    def _base(self, batch: BatchColumns) -> tuple[F64, F64, F64]:
        """``(scale, boost, p)`` without the asked boost.

        ``scale`` is ``rate × packets × interval``, ``boost`` the uncapped product of the
        vectorizable factors, ``p`` the probability they give (capped boost, clamped to
        [0, 1]). Counts the factors' reasons.
        """
        policy = self.policy
        proto = batch.proto
        amp = (proto == 17) & self._amp_ports[batch.sport]
        syn = (proto == 6) & ((batch.tcp_flags & 0x3F) == 0x02)
        # 1.0 × factor is exact, so starting from the factor is evaluate()'s product.
        boost = np.where(amp, policy.amplification_boost, np.where(syn, policy.syn_only_boost, 1.0))
        self._reasons[0] += int(np.count_nonzero(amp))
        self._reasons[1] += int(np.count_nonzero(syn))
        if self._prefixes.levels:
            found = np.fmax(self._prefixes.lookup(batch.src), self._prefixes.lookup(batch.dst))
            matched = ~np.isnan(found)
            boost = np.where(matched, boost * found, boost)
            self._reasons[2] += int(np.count_nonzero(matched))
        # evaluate() takes an interval < 1 as 1; V5Batch.interval is >= 1 by construction
        # (resolve_interval), so the scale is evaluate()'s rate × packets × interval as is.
        scale: F64 = (policy.rate * batch.packets * batch.interval).astype(np.float64, copy=False)
        return scale, boost, self._clamp(scale * np.minimum(boost, policy.boost_cap))

    def _plain(self, batch: BatchColumns) -> tuple[F64, int]:
        """``(p, n capped)`` when the only factors are amplification and SYN-only (the
        default policy): no boost array, the factors multiplied in place where they apply.

        Bit for bit evaluate()'s ``rate × packets × interval × min(boost, cap)``: the same
        products in the same order (× 1.0 where no factor applies is exact, and skipped).
        """
        policy = self.policy
        proto = batch.proto
        amp = (proto == 17) & self._amp_ports[batch.sport]
        syn = (proto == 6) & ((batch.tcp_flags & 0x3F) == 0x02)
        n_amp = int(np.count_nonzero(amp))
        n_syn = int(np.count_nonzero(syn))
        self._reasons[0] += n_amp
        self._reasons[1] += n_syn
        p: F64 = (policy.rate * batch.packets).astype(np.float64, copy=False)
        interval = batch.interval
        low, high = int(interval.min()), int(interval.max())
        if low != high:
            p *= interval
        elif low != 1:
            p *= float(low)
        cap = policy.boost_cap
        if n_amp:
            np.multiply(p, min(policy.amplification_boost, cap), out=p, where=amp)
        if n_syn:
            np.multiply(p, min(policy.syn_only_boost, cap), out=p, where=syn)
        np.minimum(p, 1.0, out=p)
        n_capped = (n_amp if policy.amplification_boost > cap else 0) + (
            n_syn if policy.syn_only_boost > cap else 0
        )
        return p, n_capped

    def _clamp(self, p: F64) -> F64:
        """evaluate()'s ``p > 1 → 1``, ``not p > 0 → 0``.

        p >= 0 always (every factor is >= 0); it can only be NaN if ``rate × packets ×
        interval`` overflows to infinity and meets a zero boost, which takes an absurd rate:
        the full clamp only runs then.
        """
        if self._may_overflow:
            out: F64 = np.where(p > 1.0, 1.0, np.where(p > 0.0, p, 0.0))
            return out
        return np.minimum(p, 1.0)

    def _exact(
        self, batch: BatchColumns, idx: Indices, scale: F64, boost: F64
    ) -> tuple[F64, int, int]:
        """Exact p for records ``idx`` with the asked boost; (p, n asked, n capped).

        The lookup is called once per distinct address among those records (it is a pure
        function of the address: a DNS cache), then `flowsample._asked` and the rest of
        `SamplingPolicy.evaluate` run vectorized, with the same comparisons in the same
        order: src then dst, a value counts if it is greater than the best so far (None
        and NaN never are), and is held to the cap.
        """
        policy = self.policy
        lookup = policy.asked_boost
        assert lookup is not None
        cap = policy.boost_cap
        src = batch.src[idx]
        dst = batch.dst[idx]
        addresses, where = np.unique(np.concatenate((src, dst)), return_inverse=True)
        address = ipaddress.IPv4Address
        nan = math.nan
        asked = np.array(
            [nan if (v := lookup(address(a))) is None else float(v) for a in addresses.tolist()],
            dtype=np.float64,
        )[where]
        asked_src, asked_dst = asked[: len(idx)], asked[len(idx) :]
        best = np.where(asked_src > 1.0, np.minimum(asked_src, cap), 1.0)
        best = np.where(asked_dst > best, np.minimum(asked_dst, cap), best)
        lifted = best > 1.0
        b = np.where(lifted, boost[idx] * best, boost[idx])
        capped = b > cap
        p = scale[idx] * np.minimum(b, cap)
        out: F64 = np.where(p > 1.0, 1.0, np.where(p > 0.0, p, 0.0))
        return out, int(np.count_nonzero(lifted)), int(np.count_nonzero(capped))

    def probabilities(self, batch: BatchColumns) -> F64:
        """p of every record, as `overflowd.flowsample.probability` gives it; no draws, no
        statistics. With an asked boost this looks up every record (slow: for tests)."""
        saved = list(self._reasons)
        scale, boost, p = self._base(batch)
        self._reasons = saved
        if self.policy.asked_boost is not None:
            p, _, _ = self._exact(batch, np.arange(len(batch)), scale, boost)
        return p

    # -- sampling ---------------------------------------------------------------------------

    def sample(self, batch: BatchColumns) -> tuple[Indices, F64]:
        """``(indices, p)`` of the records to report, in batch order.

        ``batch.rows(indices)`` gives their FlowRows.
        """
        n = len(batch)
        if not n:
            return np.empty(0, dtype=np.intp), np.empty(0)
        policy = self.policy
        cap = policy.boost_cap
        packets = batch.packets
        if self._plain_policy:
            p, n_capped = self._plain(batch)
        else:
            scale, boost, p = self._base(batch)
            if policy.asked_boost is None:
                n_capped = int(np.count_nonzero(boost > cap)) if self._may_cap else 0
        u = self._uniform(n)
        if policy.asked_boost is None:
            chosen = np.flatnonzero(u < p)
            p_chosen = p[chosen]
            sum_p = float(p.sum())
            # sum p(1 - p) = sum p - sum p². Not p.dot(p): BLAS may use several threads on
            # long vectors, and this path is measured (and meant to run) on one core.
            sum_var = sum_p - float(np.square(p).sum())
            # p == 1 is always chosen (u < 1), so the certain ones are among the chosen.
            certain = int(np.count_nonzero(p_chosen >= 1.0))
        else:
            # Two-stage thinning (module docstring). The largest boost an asked value can
            # give: min(cap, b × cap); b < 1 is an operator quieting its own prefixes.
            p_max = self._clamp(scale * np.minimum(boost * cap, cap))
            candidates = np.flatnonzero(u < p_max)
            p_exact, n_asked, n_capped_asked = self._exact(batch, candidates, scale, boost)
            keep = u[candidates] < p_exact
            chosen = candidates[keep]
            p_chosen = p_exact[keep]
            self._reasons[3] += n_asked
            self._asked_lookups += len(candidates)
            # Sum of p over all records, estimated without looking every record up: the base
            # p everywhere, plus the asked excess where it was looked up, weighted by
            # 1 / P(looked up) = 1 / p_max (Horvitz–Thompson: unbiased). Same for p(1-p).
            p_base_c = p[candidates]
            q = p_max[candidates]
            var_base = p * (1.0 - p)
            sum_p = float(p.sum() + ((p_exact - p_base_c) / q).sum())
            sum_var = float(
                var_base.sum() + ((p_exact * (1.0 - p_exact) - var_base[candidates]) / q).sum()
            )
            # p == 1 implies p_max == 1: every certain record is a candidate.
            certain = int(np.count_nonzero(p_exact >= 1.0))
            # Capped by the other factors alone, anywhere; or by the asked boost, among
            # those looked up (not already counted).
            capped = boost > cap
            n_capped = (
                int(np.count_nonzero(capped))
                + n_capped_asked
                - int(np.count_nonzero(capped[candidates]))
            )
        self._seen += n
        self._sampled += len(chosen)
        self._sum_p += sum_p
        self._sum_var += sum_var
        self._packets_seen += _total(packets)
        self._packets_sampled += _total(packets[chosen])
        self._certain += certain
        self._capped += n_capped
        return chosen, p_chosen

    def statistics(self) -> SamplerStatistics:
        """As `Sampler.statistics`. With an asked boost: ``expected_sampled`` and
        ``variance_sampled`` are unbiased estimates (exact without one), and the ``asked``
        boost and the caps it causes are counted among the records looked up only."""
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

    @property
    def asked_lookups(self) -> int:
        """Records whose asked boost was looked up (thinning candidates), over all batches."""
        return self._asked_lookups
