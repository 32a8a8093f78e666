"""The per-peer latency window: bounded, recent, and its median and maximum as documented."""

from __future__ import annotations

from overflowd.services.peer_latency import WINDOW, LatencyWindow, latency_metrics


def test_the_window_keeps_only_the_last_samples_and_forgets_an_outage() -> None:
    w = LatencyWindow()
    assert w.summary().count == 0
    for _ in range(10):
        w.add(30.0)  # an outage: timeouts
    for i in range(10 * WINDOW):
        w.add(0.001 * (i % 5))
    assert len(w) == WINDOW  # never more than the window, however many samples
    assert w.total == 10 + 10 * WINDOW
    s = w.summary()
    assert s.count == WINDOW
    assert s.max_s == 0.004  # the outage is out of the window
    assert s.p50_s == 0.002


def test_median_and_max_of_a_small_window_and_negative_time_is_zero() -> None:
    w = LatencyWindow(size=4)
    for v in (0.4, 0.1, 0.3, 0.2, -1.0):
        w.add(v)
    s = w.summary()
    assert (s.count, s.p50_s, s.max_s) == (4, 0.1, 0.3)  # 0.1, 0.3, 0.2, 0.0 kept; lower middle


def test_metrics_give_p50_and_max_per_peer_and_the_window_count() -> None:
    w = LatencyWindow()
    w.add(0.25)
    w.add(0.75)
    fams = list(
        latency_metrics(
            "overflowd_x_seconds", "x", {"b": w.summary(), "c": LatencyWindow().summary()}
        )
    )
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in fams for s in f.samples}
    assert samples[("overflowd_x_seconds", (("peer", "b"), ("quantile", "0.5")))] == 0.25
    assert samples[("overflowd_x_seconds", (("peer", "b"), ("quantile", "1")))] == 0.75
    assert samples[("overflowd_x_seconds_window", (("peer", "b"),))] == 2
    assert samples[("overflowd_x_seconds_window", (("peer", "c"),))] == 0
    assert not any(k[0] == "overflowd_x_seconds" and ("peer", "c") in k[1] for k in samples)
