"""Scrape a real /metrics endpoint and read it with prometheus_client's own parser.

The parser is the reference reading of the text exposition format: a family whose samples do
not parse fails the scrape here, as it would fail a Prometheus server's.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

Labels = frozenset[tuple[str, str]]


class Scrape:
    """One scrape: every sample by (name, labels), names as exposed (``_total`` included)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples: dict[tuple[str, Labels], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                assert key not in self.samples, f"sample {key} exposed twice"
                self.samples[key] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """The one sample of ``name`` with exactly ``labels``; KeyError if it is not there."""
        return self.samples[(name, frozenset(labels.items()))]

    def series(self, name: str, label: str) -> dict[str, float]:
        """``label``'s value → sample value, for every sample of ``name``."""
        out: dict[str, float] = {}
        for (sample, labels), value in self.samples.items():
            if sample == name:
                out[dict(labels)[label]] = value
        return out

    def total(self, name: str) -> float:
        return sum(v for (sample, _), v in self.samples.items() if sample == name)

    def has(self, name: str) -> bool:
        return any(sample == name for sample, _ in self.samples)


def scrape(url: str, *, timeout_s: float = 5) -> Scrape:
    answer = httpx.get(url, timeout=timeout_s)
    answer.raise_for_status()
    return Scrape(answer.text)


def reasons(s: Scrape, name: str, **fixed: str) -> Mapping[str, float]:
    """``reason`` → value for the samples of ``name`` whose other labels are ``fixed``."""
    out: dict[str, float] = {}
    for (sample, labels), value in s.samples.items():
        d = dict(labels)
        if sample == name and all(d.get(k) == v for k, v in fixed.items()):
            out[d["reason"]] = value
    return out
