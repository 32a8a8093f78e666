"""Peer scores and bans (#10): how a peer's misbehaviour turns into a ban, as pure functions.

A peer's :class:`PeerScore` starts at 0 and never goes above 0 (no credit is banked: a peer
that behaved for a year gets no licence to forge for a day). Each proven misdeed subtracts its
weight (:data:`WEIGHTS`); the score decays back toward 0 with a half-life, and honest accepted
batches add a little more, at most :attr:`ScoreSettings.honest_credit_per_s` per second however
many batches come (so an attacker cannot wash forgeries out by interleaving honest batches).
At or below :attr:`ScoreSettings.threshold` the peer is banned for
``base_ban_s * 2 ** (ban_count - 1)``, at most ``max_ban_s``; its score restarts at half the
threshold (probation: a repeat offender is banned again sooner). ``ban_count`` is forgotten
after ``forget_s`` without a ban.

"Proven" is the caller's job: only what the peer's own key signed may move its score (a
stranger naming a peer must not be able to lower it); see docs/peers.md "Scores and bans".

Sans-IO: no clocks are read here (every function takes ``now_ms``, wall time in milliseconds,
because bans outlive restarts), no I/O, no locks. It must never import trio, sockets, HTTP,
database or crypto modules (tests/unit/test_sansio_imports.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

#: What lowers a score, and by how much. A forged report is the worst (the peer relayed or
#: made a report whose signature fails: it skipped the one check every hop must make); a
#: malformed body or a replay is a broken or hostile sender; ignoring our Retry-After is a
#: flood (a 429 the peer respects costs nothing: see :func:`note`). Four forged batches in a
#: row reach the default threshold; ten garbage bodies; twenty ignored 429s.
WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"forged": 25.0, "malformed": 10.0, "replay": 10.0, "over_budget": 5.0, "stale": 1.0}
)
#: The events :func:`note` knows: the misdeeds above and ``honest`` (an accepted batch).
EVENTS = (*WEIGHTS, "honest")


@dataclass(frozen=True, slots=True)
class ScoreSettings:
    """The policy's constants (documented in docs/peers.md with these defaults)."""

    #: At or below this the peer is banned.
    threshold: float = -100.0
    #: The score halves toward 0 in this time: a peer that stops misbehaving is whole again
    #: within an hour or so; a burst of faults is not forgiven within the burst.
    half_life_s: float = 600.0
    #: What one honest batch adds, and the most honest batches add per second together.
    honest_credit: float = 1.0
    honest_credit_per_s: float = 0.05
    #: The first ban; each repetition doubles it up to ``max_ban_s``.
    base_ban_s: float = 600.0
    max_ban_s: float = 7 * 86400.0
    #: A ban count is forgotten this long after the last ban ended.
    forget_s: float = 30 * 86400.0
    weights: Mapping[str, float] = field(default_factory=lambda: WEIGHTS)

    def __post_init__(self) -> None:
        if not self.threshold < 0:
            raise ValueError("threshold must be below 0")
        for name in ("half_life_s", "base_ban_s", "max_ban_s", "forget_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be above 0")
        if self.honest_credit < 0 or self.honest_credit_per_s < 0:
            raise ValueError("honest credit cannot be negative")
        if any(w < 0 for w in self.weights.values()):
            raise ValueError("weights cannot be negative")

    def ban_s(self, ban_count: int) -> float:
        """How long the ``ban_count``-th ban lasts (1 is the first)."""
        if ban_count < 1:
            return 0.0
        # 2**60 is beyond any cap; the exponent is bounded so the float never overflows.
        return min(self.max_ban_s, self.base_ban_s * 2.0 ** min(ban_count - 1, 60))


@dataclass(frozen=True, slots=True)
class PeerScore:
    """One peer's score and ban, as persisted (``peer_state`` columns) plus two clocks."""

    score: float = 0.0
    #: when ``score`` was last decayed (ms)
    updated_ms: int = 0
    #: the last banned-until (kept after it passed: the forget clock runs from it)
    banned_until_ms: int | None = None
    ban_count: int = 0
    ban_reason: str | None = None
    #: honest credit was last given at (ms); not persisted (a restart gives at most one)
    credit_ms: int = 0
    #: a 429 told the peer to wait until then (ms); not persisted
    hold_until_ms: int = 0

    def banned(self, now_ms: int) -> bool:
        return self.banned_until_ms is not None and now_ms < self.banned_until_ms


@dataclass(frozen=True, slots=True)
class Ban:
    """A ban :func:`note` just imposed."""

    until_ms: int
    count: int
    reason: str


def decayed(state: PeerScore, now_ms: int, settings: ScoreSettings) -> PeerScore:
    """The score at ``now_ms`` (halved toward 0 per half-life); the ban count forgotten if due."""
    out = state
    dt_s = (now_ms - state.updated_ms) / 1000.0
    if dt_s > 0:
        score = state.score * 0.5 ** (dt_s / settings.half_life_s)
        if score > -1e-9:
            score = 0.0
        out = replace(out, score=score, updated_ms=now_ms)
    if (
        out.ban_count
        and out.banned_until_ms is not None
        and now_ms - out.banned_until_ms >= settings.forget_s * 1000
    ):
        out = replace(out, ban_count=0)
    return out


def note(
    state: PeerScore,
    event: str,
    now_ms: int,
    settings: ScoreSettings,
    *,
    n: int = 1,
    retry_after_s: float | None = None,
) -> tuple[PeerScore, Ban | None]:
    """``n`` events of one kind at ``now_ms``: the new state, and the ban if this imposed one.

    During a ban nothing moves the score (the peer is refused before its requests are read).
    ``over_budget`` counts only when the peer comes back before the ``Retry-After`` it was
    given (``retry_after_s`` is the new one): an honest sender that waits is not punished.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown peer score event {event!r}")
    if n < 1:
        return state, None
    state = decayed(state, now_ms, settings)
    if state.banned(now_ms):
        return state, None
    if event == "honest":
        since_s = max(0.0, (now_ms - state.credit_ms) / 1000.0)
        gain = min(settings.honest_credit * n, settings.honest_credit_per_s * since_s)
        if gain <= 0:
            return state, None
        return replace(state, score=min(0.0, state.score + gain), credit_ms=now_ms), None
    if event == "over_budget":
        ignored = now_ms < state.hold_until_ms
        if retry_after_s is not None:
            state = replace(state, hold_until_ms=now_ms + int(retry_after_s * 1000))
        if not ignored:
            return state, None
    # Bounded below: a flood must not push the score so far that decay takes days.
    floor = 2 * settings.threshold
    score = max(floor, state.score - settings.weights[event] * n)
    state = replace(state, score=score)
    if score > settings.threshold:
        return state, None
    count = state.ban_count + 1
    until = now_ms + math.ceil(settings.ban_s(count) * 1000)
    reason = f"{event}: score {score:.0f} at or below {settings.threshold:.0f}"
    state = replace(
        state,
        score=settings.threshold / 2,
        banned_until_ms=until,
        ban_count=count,
        ban_reason=reason,
    )
    return state, Ban(until, count, reason)


def max_forged_to_ban(settings: ScoreSettings, *, gap_s: float) -> int:
    """The most forged batches, each at most ``gap_s`` after the previous, that can come before
    a ban, whatever honest batches come between them (the bound the property test checks).

    Between two forged batches the score can rise by at most the honest credit rate and the
    decay at its steepest (at the floor, twice the threshold) over ``gap_s``.
    """
    steepest = 2 * -settings.threshold * math.log(2) / settings.half_life_s
    net = settings.weights["forged"] - gap_s * (settings.honest_credit_per_s + steepest)
    if net <= 0:
        raise ValueError("forged batches this far apart may never lead to a ban")
    return math.ceil(-settings.threshold / net) + 1


__all__ = [
    "EVENTS",
    "WEIGHTS",
    "Ban",
    "PeerScore",
    "ScoreSettings",
    "decayed",
    "max_forged_to_ban",
    "note",
]
