"""Do the stated 95% intervals cover? Measured on the real trace, at three rates, over 50 seeds.

The issue's claim (#11, Show): Horvitz–Thompson estimates from the shared NetFlow v5 trace at
rates 1e-4, 1e-3 and 1e-2, over 50 seeds, hold the true per-destination packet total inside
the stated 95% interval in at least 93% of runs.

How it is measured:

- The trace is decoded once per session by overflowd's own decoders (78,684 flow records).
  The truth is the sum of ``packets × interval`` (and bytes) per destination over *all* records.
- The sampler is the real one (`overflowd.flowsample.Sampler`, default policy at the rate:
  amplification and SYN-only boosts included, so weights are mixed) with an injected
  ``random.Random(seed)``, seeds 0..49: the test is derandomized.
- Each sampled record becomes the payload the node would sign (`overflowd.pipeline
  .report_payload`), and the estimator reads packets, bytes, ``sampling.p`` and
  ``sampling.interval`` from that payload, as a receiver would from a report.
- **Which destinations.** Fixed before any sampling, from the true data alone (choosing by
  what was sampled would bias coverage: a destination that drew many reports by luck is one
  whose estimate is too high). Two sets, per rate: the 20 destinations with the most packets,
  and the 20 with the most packets in records the policy samples with ``p < 1`` at that rate
  (the ones whose estimate is actually uncertain: the busiest are often one huge flow with
  ``p = 1``, exact and trivially covered). Their union is scored: every (destination, seed) is
  one run.
- **Zero reports.** A destination with no report in a run still gets an interval: estimate 0
  (or the exact ``p = 1`` part), upper end ``unit × 3.69``, where ``unit`` is the largest
  ``n·k/p`` among the ``p < 1`` reports of the observer in that run (`Tally.packets_unit` of
  the observer's whole tally, as `who` would compute it). It counts as covered when the truth
  is below that; the number of such runs is printed, and coverage is also printed without them.
- Besides our interval, the test prints the coverage of the textbook normal interval on the HT
  variance estimate, ``est ± 1.96 √Σ w²(1−p)``, to show the harness tells a bad interval from
  a good one (it fails the bar at every rate).

Run ``.venv/bin/pytest tests/unit/test_estimate_coverage.py -s -q -p no:cacheprovider`` to see
the table (docs/estimates.md quotes it).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from overflowd import report as rpt
from overflowd.estimate import Tally
from overflowd.flows import FlowRecord
from overflowd.flowsample import Sampler, SamplingPolicy
from overflowd.pipeline import report_payload
from overflowd.wire.dispatch import DecoderState, decode_datagram
from overflowd.wire.pcap import CaptureReader
from tests.support.trace import netflow_v5_trace

RATES = (1e-4, 1e-3, 1e-2)
SEEDS = range(50)
#: Destinations per set (see the module docstring).
TOP_BUSIEST = 20
TOP_UNCERTAIN = 20
#: The issue's bar for the packet interval.
MIN_COVERAGE = 0.93
TRACE_PORT = 9500
Z95 = 1.959963984540054

OBSERVER = rpt.Observer(contacts=("mailto:noc@example.net",), point="trace")
NONCE = bytes(rpt.NONCE_BYTES)


@pytest.fixture(scope="session")
def trace_records() -> list[FlowRecord]:
    state = DecoderState()
    records: list[FlowRecord] = []
    reader = CaptureReader()
    with open(netflow_v5_trace(), "rb") as source:
        for datagram in reader.udp_datagrams(source, port=TRACE_PORT):
            records += decode_datagram(datagram.payload, datagram.src, state, datagram.timestamp)
    assert len(records) > 70_000
    return records


@dataclass
class Score:
    runs: int = 0
    covered: int = 0
    runs_with_reports: int = 0
    covered_with_reports: int = 0
    zero_report_runs: int = 0
    bytes_covered: int = 0
    normal_covered: int = 0
    rel_width_sum: float = 0.0

    def coverage(self) -> float:
        return self.covered / self.runs

    def line(self, rate: float) -> str:
        with_reports = (
            f"{self.covered_with_reports / self.runs_with_reports:7.1%}"
            if self.runs_with_reports
            else "    n/a"
        )
        return (
            f"{rate:8.0e} {self.runs:6d} {self.coverage():9.1%} {with_reports:>12} "
            f"{self.zero_report_runs:8d} {self.bytes_covered / self.runs:8.1%} "
            f"{self.normal_covered / self.runs:8.1%} {self.rel_width_sum / self.runs:9.2f}"
        )


HEADER = "    rate   runs  packets  w/ reports  0-report    bytes   normal  rel.width"


def chosen_destinations(records: Sequence[FlowRecord], policy: SamplingPolicy) -> list[int]:
    """The destinations scored at this rate (as integers), from the true data only."""
    total: Counter[int] = Counter()
    uncertain: Counter[int] = Counter()
    for r in records:
        dst = int(r.dst)
        total[dst] += r.packets * r.sampling_interval
        p = policy.evaluate(r)[0]
        if 0.0 < p < 1.0:
            uncertain[dst] += r.packets * r.sampling_interval
    busiest = [d for d, _ in total.most_common(TOP_BUSIEST)]
    most_uncertain = [d for d, _ in uncertain.most_common(TOP_UNCERTAIN)]
    return list(dict.fromkeys(busiest + most_uncertain))


def measure(records: Sequence[FlowRecord], rate: float) -> Score:
    policy = SamplingPolicy(rate=rate)
    dests = chosen_destinations(records, policy)
    wanted = set(dests)
    true_packets: Counter[int] = Counter()
    true_bytes: Counter[int] = Counter()
    #: id(record) -> its destination, for the records of the scored destinations only: the
    #: sampled records are looked up by identity, not by hashing an address (the hot loop).
    scored: dict[int, int] = {}
    for r in records:
        dst = int(r.dst)
        if dst in wanted:
            true_packets[dst] += r.packets * r.sampling_interval
            true_bytes[dst] += r.bytes * r.sampling_interval
            scored[id(r)] = dst
    score = Score()
    for seed in SEEDS:
        sampler = Sampler(policy, random.Random(seed))
        observer = Tally()
        per_dst = {d: Tally() for d in dests}
        normal_var = dict.fromkeys(dests, 0.0)
        for record, p in sampler.sample(records):
            dst = scored.get(id(record))
            if dst is None:  # only the observer's unit needs it: skip building a payload
                observer.add(record.packets, record.bytes, p, record.sampling_interval)
                continue
            payload = report_payload(record, p, observer=OBSERVER, nonce=NONCE, now_ms=0)
            assert int(payload.flow.dst) == dst
            observer.add_payload(payload)
            per_dst[dst].add_payload(payload)
            q = payload.sampling.probability
            w = payload.flow.packets * payload.sampling.interval / q
            normal_var[dst] += w * w * (1.0 - q)
        unit, byte_unit = observer.packets_unit, observer.bytes_unit
        assert unit is not None  # hundreds of p < 1 reports per run at every rate
        for d in dests:
            tally = per_dst[d]
            est = tally.estimate(unit=unit, byte_unit=byte_unit)
            truth = true_packets[d]
            hit = est.packets.contains(truth)
            score.runs += 1
            score.covered += hit
            if tally.reports:
                score.runs_with_reports += 1
                score.covered_with_reports += hit
            else:
                score.zero_report_runs += 1
            score.bytes_covered += est.bytes.contains(true_bytes[d])
            half = Z95 * math.sqrt(normal_var[d])
            score.normal_covered += (
                est.packets.estimate - half <= truth <= est.packets.estimate + half
            )
            score.rel_width_sum += (est.packets.high - est.packets.low) / truth
    return score


@pytest.fixture(scope="session")
def coverage_table(trace_records: list[FlowRecord]) -> dict[float, Score]:
    table = {rate: measure(trace_records, rate) for rate in RATES}
    print()
    print("Coverage of the stated 95% interval, shared NetFlow v5 trace, seeds 0..49")
    print(HEADER)
    for rate, score in table.items():
        print(score.line(rate))
    return table


@pytest.mark.parametrize("rate", RATES)
def test_packet_interval_covers_the_true_total(
    coverage_table: dict[float, Score], rate: float
) -> None:
    score = coverage_table[rate]
    assert score.runs >= 50 * TOP_BUSIEST
    assert score.coverage() >= MIN_COVERAGE, score.line(rate)
    # Coverage is not bought by giving up: where reports arrived the interval still covers,
    # and most runs had reports to go on.
    assert score.covered_with_reports / score.runs_with_reports >= MIN_COVERAGE
    assert score.runs_with_reports >= score.runs / 2


@pytest.mark.parametrize("rate", RATES)
def test_the_harness_rejects_the_normal_interval(
    coverage_table: dict[float, Score], rate: float
) -> None:
    """The same runs, scored with the textbook normal interval, miss the bar: the test can fail."""
    score = coverage_table[rate]
    assert score.normal_covered / score.runs < MIN_COVERAGE, score.line(rate)
