"""Peer scores and bans (overflowd/peerscore.py): the properties the issue asks for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from overflowd import peerscore as ps

S = ps.ScoreSettings()
T0 = 1_800_000_000_000  # ms; any wall time


def run(
    events: list[tuple[int, str]], state: ps.PeerScore | None = None
) -> tuple[ps.PeerScore, list[ps.Ban]]:
    state = state or ps.PeerScore(updated_ms=T0, credit_ms=T0)
    bans: list[ps.Ban] = []
    now = T0
    for gap_ms, event in events:
        now += gap_ms
        state, ban = ps.note(state, event, now, S, retry_after_s=1.0)
        if ban is not None:
            bans.append(ban)
    return state, bans


@given(st.lists(st.integers(min_value=0, max_value=3_600_000), max_size=300))
def test_a_peer_sending_only_honest_batches_is_never_banned(gaps: list[int]) -> None:
    state, bans = run([(g, "honest") for g in gaps])
    assert bans == [] and not state.banned(T0 + sum(gaps)) and state.score == 0.0


@given(
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=1000),  # ms between forged batches: <= 1 s
            st.integers(min_value=0, max_value=50),  # honest batches in between
        ),
        min_size=1,
        max_size=40,
    )
)
def test_forged_batches_ban_within_the_bound_whatever_honest_batches_between(
    steps: list[tuple[int, int]],
) -> None:
    bound = ps.max_forged_to_ban(S, gap_s=1.0)
    assert bound <= 6  # 25 a forged batch against a threshold of 100: about four
    events: list[tuple[int, str]] = []
    for gap, honest in steps:
        events += [(0, "honest")] * honest
        events.append((gap, "forged"))
    _, bans = run(events)
    forged = len(steps)
    if forged >= bound:
        assert bans, f"{forged} forged batches and no ban (bound {bound})"
        # The first ban came no later than the bound-th forged batch.
        _, bans2 = run(events[: _index_of_nth_forged(events, bound) + 1])
        assert bans2
    assert all(b.count == i + 1 for i, b in enumerate(bans))


def _index_of_nth_forged(events: list[tuple[int, str]], n: int) -> int:
    seen = 0
    for i, (_, e) in enumerate(events):
        seen += e == "forged"
        if seen == n:
            return i
    raise AssertionError("fewer forged events")


def test_four_forged_batches_in_a_row_ban() -> None:
    state, bans = run([(0, "forged")] * 3)
    assert bans == [] and state.score == pytest.approx(-75)
    state, bans = run([(0, "forged")] * 4)
    assert len(bans) == 1 and state.banned(T0 + 599_999) and not state.banned(T0 + 600_000)
    assert bans[0].until_ms == T0 + 600_000
    assert bans[0].reason.startswith("forged: score -100")


@given(st.integers(min_value=1, max_value=12))
def test_ban_time_doubles_on_each_repetition_up_to_the_cap(repeats: int) -> None:
    state = ps.PeerScore(updated_ms=T0, credit_ms=T0)
    now = T0
    lengths = []
    for _ in range(repeats):
        ban = None
        while ban is None:
            now += 1
            state, ban = ps.note(state, "forged", now, S)
        lengths.append(ban.until_ms - now)
        assert not state.banned(ban.until_ms) and state.banned(ban.until_ms - 1)
        now = ban.until_ms  # the ban ends; the peer forges again at once
    for i, length in enumerate(lengths):
        assert length == min(S.max_ban_s, S.base_ban_s * 2**i) * 1000
    assert max(lengths) <= S.max_ban_s * 1000


def test_nothing_moves_the_score_during_a_ban_and_probation_after() -> None:
    state, (ban,) = run([(0, "forged")] * 4)
    during, again = ps.note(state, "forged", ban.until_ms - 1, S)
    assert again is None and during == ps.decayed(state, ban.until_ms - 1, S)
    # After the ban the score is still below 0 (probation: fewer faults ban again).
    after = ps.decayed(state, ban.until_ms, S)
    assert S.threshold < after.score < 0


def test_the_score_decays_by_half_life_and_the_ban_count_is_forgotten() -> None:
    state, _ = run([(0, "malformed")] * 5)
    assert state.score == pytest.approx(-50)
    later = ps.decayed(state, T0 + int(S.half_life_s * 1000), S)
    assert later.score == pytest.approx(-25)
    state, (ban,) = run([(0, "forged")] * 4)
    assert ps.decayed(state, ban.until_ms + int(S.forget_s * 1000) - 1, S).ban_count == 1
    assert ps.decayed(state, ban.until_ms + int(S.forget_s * 1000), S).ban_count == 0


def test_honest_batches_recover_slowly_and_never_bank_credit() -> None:
    state, _ = run([(0, "malformed")] * 2)
    # 1000 honest batches within one second: at most 0.05 back, not 1000.
    burst, _ = run([(1, "honest")] * 1000, state)
    decay_only = ps.decayed(state, T0 + 1000, S).score
    assert decay_only < burst.score <= decay_only + S.honest_credit_per_s * 1.0 + 1e-6
    slow, _ = run([(60_000, "honest")] * 30, state)  # one a minute for half an hour
    assert slow.score > burst.score
    assert ps.note(ps.PeerScore(), "honest", T0, S)[0].score == 0.0


def test_over_budget_counts_only_when_the_peer_ignores_retry_after() -> None:
    state = ps.PeerScore(updated_ms=T0)
    # A sender that waits the Retry-After it was given is never scored.
    for i in range(100):
        state, ban = ps.note(state, "over_budget", T0 + i * 2000, S, retry_after_s=2.0)
        assert ban is None
    assert state.score == 0.0
    # A flood that comes back at once is.
    bans = []
    for i in range(100):
        state, ban = ps.note(state, "over_budget", T0 + 300_000 + i, S, retry_after_s=2.0)
        bans += [ban] if ban else []
    assert len(bans) == 1


def test_unknown_events_and_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown peer score event"):
        ps.note(ps.PeerScore(), "nice", T0, S)
    with pytest.raises(ValueError, match="threshold"):
        ps.ScoreSettings(threshold=1.0)
    with pytest.raises(ValueError, match="never lead to a ban"):
        ps.max_forged_to_ban(S, gap_s=1e6)
