"""Peer scores and bans, live: one :class:`PeerPolicy` the inbox and the pull share.

The decisions are :mod:`overflowd.peerscore`'s (pure); this holds each configured peer's
state in memory behind one lock, answers :meth:`PeerPolicy.banned` with a dict lookup (the
inbox asks before it reads a body or verifies anything), and writes changed rows to the store
every ``flush_interval_s`` and at stop (:mod:`overflowd.store.peer_bans`), so a ban survives a
restart. A ban is logged once, at WARNING, when it is imposed.

Thread-safe: the inbox calls in from worker threads, the pull from the event loop; no call
here blocks on the store except :meth:`PeerPolicy.load` and :meth:`PeerPolicy.flush`, which
the service runs in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from overflowd import peerscore
from overflowd.errors import StoreError
from overflowd.peers import PeerSettings
from overflowd.store import peer_bans
from overflowd.store.repository import Store

log = logging.getLogger(__name__)

#: Changed scores and bans reach the store within this time (a ban outlives a crash that
#: comes later than this); one small transaction per interval at most, only when changed.
FLUSH_INTERVAL_S = 1.0
#: The last flush at stop may take this long before the daemon gives up on it.
STOP_FLUSH_TIMEOUT_S = 5.0

#: Where a banned peer was turned away (the metric's ``path`` label).
PATHS = ("inbox", "pull")


@dataclass(frozen=True, slots=True)
class PeerPolicyStatistics:
    scores: Mapping[str, float]
    banned: Mapping[str, bool]
    bans: Mapping[str, int] = field(default_factory=dict)
    refused: Mapping[tuple[str, str], int] = field(default_factory=dict)
    flush_errors: int = 0


class PeerPolicy:
    """Scores and bans of the configured peers (by key; events name the peer by its name)."""

    def __init__(
        self,
        store: Store,
        peers: Sequence[PeerSettings],
        settings: peerscore.ScoreSettings | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        flush_interval_s: float = FLUSH_INTERVAL_S,
    ) -> None:
        self._store = store
        self.settings = settings or peerscore.ScoreSettings()
        self._clock = wall_clock
        self._flush_interval_s = flush_interval_s
        self._peers = {p.key: p for p in peers}
        self._names = {p.name: p.key for p in peers}
        self._lock = threading.Lock()
        now_ms = self._now_ms()
        self._states = {
            k: peerscore.PeerScore(updated_ms=now_ms, credit_ms=now_ms) for k in self._peers
        }
        self._dirty: set[bytes] = set()
        self._bans = dict.fromkeys(self._names, 0)
        self._refused: dict[tuple[str, str], int] = {}
        self._flush_errors = 0
        self._cancel = trio.CancelScope()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # -- the hooks ------------------------------------------------------------------------

    def banned(self, key: bytes) -> bool:
        """Is this configured peer banned now? (Unknown keys are not: the inbox 401s them.)"""
        with self._lock:
            state = self._states.get(key)
        return state is not None and state.banned(self._now_ms())

    def banned_until_ms(self, key: bytes) -> int | None:
        with self._lock:
            state = self._states.get(key)
        if state is None or not state.banned(self._now_ms()):
            return None
        return state.banned_until_ms

    def note(self, name: str, event: str, *, retry_after_s: float | None = None) -> None:
        """A proven event of the peer named ``name`` (see peerscore.EVENTS)."""
        key = self._names.get(name)
        if key is None:
            return
        now_ms = self._now_ms()
        with self._lock:
            before = self._states[key]
            state, ban = peerscore.note(
                before, event, now_ms, self.settings, retry_after_s=retry_after_s
            )
            self._states[key] = state
            if ban is not None:
                self._bans[name] += 1
            # Honest credit and Retry-After holds are not worth a write by themselves.
            if ban is not None or (state.score != before.score and event != "honest"):
                self._dirty.add(key)
        if ban is not None:
            log.warning(
                "peer_policy.banned peer=%s until_ms=%d count=%d reason=%r",
                name,
                ban.until_ms,
                ban.count,
                ban.reason,
            )

    def refused(self, key: bytes, path: str) -> None:
        """Count a banned peer turned away at ``path`` (one of PATHS)."""
        peer = self._peers.get(key)
        if peer is None:
            return
        with self._lock:
            k = (peer.name, path)
            self._refused[k] = self._refused.get(k, 0) + 1

    # -- the store ------------------------------------------------------------------------

    def load(self) -> None:
        """Take up the stored scores and bans of the configured peers (blocking)."""
        stored = peer_bans.load_scores(self._store, now_ms=self._now_ms())
        with self._lock:
            for key, state in stored.items():
                if key in self._states:
                    self._states[key] = state

    def flush(self) -> int:
        """Write the changed rows (blocking); the number written."""
        with self._lock:
            keys, self._dirty = self._dirty, set()
            rows = [
                peer_bans.ScoreRow(
                    key=k, name=self._peers[k].name, url=self._peers[k].url, score=self._states[k]
                )
                for k in sorted(keys)
            ]
        if not rows:
            return 0
        try:
            return peer_bans.save_scores(self._store, rows, now_ms=self._now_ms())
        except StoreError as exc:
            with self._lock:
                self._dirty |= keys  # written at the next flush
                self._flush_errors += 1
            log.warning("peer_policy.flush_failed error=%s", exc)
            return 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, then flush every interval until :meth:`stop`; flush once more at the end."""
        await trio.to_thread.run_sync(self.load)
        task_status.started()
        try:
            with self._cancel:
                while True:
                    await trio.sleep(self._flush_interval_s)
                    await trio.to_thread.run_sync(self.flush)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_FLUSH_TIMEOUT_S):
                await trio.to_thread.run_sync(self.flush)

    def stop(self) -> None:
        self._cancel.cancel()

    def statistics(self) -> PeerPolicyStatistics:
        now_ms = self._now_ms()
        with self._lock:
            states = {self._peers[k].name: s for k, s in self._states.items()}
            return PeerPolicyStatistics(
                scores={
                    n: peerscore.decayed(s, now_ms, self.settings).score for n, s in states.items()
                },
                banned={n: s.banned(now_ms) for n, s in states.items()},
                bans=dict(self._bans),
                refused=dict(self._refused),
                flush_errors=self._flush_errors,
            )


class PeerPolicyCollector(Collector):
    """Scores and bans for Prometheus (docs/daemon.md "What the metrics say")."""

    def __init__(self, policy: PeerPolicy) -> None:
        self._policy = policy

    def collect(self) -> Iterable[Metric]:
        s = self._policy.statistics()
        score = GaugeMetricFamily(
            "overflowd_peer_score",
            "A peer's score (0 best; banned at the threshold)",
            labels=["peer"],
        )
        banned = GaugeMetricFamily(
            "overflowd_peer_banned", "1 while the peer is banned", labels=["peer"]
        )
        for name in sorted(s.scores):
            score.add_metric([name], s.scores[name])
            banned.add_metric([name], 1.0 if s.banned[name] else 0.0)
        bans = CounterMetricFamily(
            "overflowd_peer_bans", "Bans imposed on a peer since start", labels=["peer"]
        )
        for name, n in sorted(s.bans.items()):
            bans.add_metric([name], n)
        refused = CounterMetricFamily(
            "overflowd_peer_banned_refused",
            "A banned peer's inbox requests (403) and pull rounds skipped",
            labels=["peer", "path"],
        )
        for (name, path), n in sorted(s.refused.items()):
            refused.add_metric([name, path], n)
        errors = CounterMetricFamily(
            "overflowd_peer_score_flush_errors", "Failed writes of scores and bans to the store"
        )
        errors.add_metric([], s.flush_errors)
        return [score, banned, bans, refused, errors]


__all__ = ["PATHS", "PeerPolicy", "PeerPolicyCollector", "PeerPolicyStatistics"]
