#!/usr/bin/env python3
"""Trust book benchmark: the cost of one ``TrustBook.observe`` when many keys share a contact.

Not a test: it prints figures. 60,000 keys that all carry one contact are loaded into the book
(strangers copying an abuse desk's address), with a pinned key sharing it; then new keys with
that contact are observed, each raising a ``NewKey`` event. Printed: milliseconds per observe,
the most memory one observe allocated (tracemalloc), and how many previous keys the event
names. Before the per-name bound (review finding 6) this was ~110 ms and 4 MiB per report,
in the trio thread; tests/unit/test_registry_trust.py holds the bound.

Usage::

    .venv/bin/python bench/trust_observe.py [KEYS]
"""

from __future__ import annotations

import sys
import time
import tracemalloc

from overflowd.trust import KeyHistory, NewKey, PinnedKey, TrustBook

SHARED = ("mailto:abuse@isp.example",)


def main(keys: int = 60_000, rounds: int = 200) -> None:
    pinned = bytes([1]) * 32
    book = TrustBook([PinnedKey(pinned, "edge")])
    book.observe(pinned, SHARED, now_ms=0)
    for i in range(keys):
        book.load(KeyHistory((10**6 + i).to_bytes(32, "big"), SHARED, i, i, i, 1))
    started = time.perf_counter()
    for j in range(rounds):
        book.observe((10**9 + j).to_bytes(32, "big"), SHARED, now_ms=keys + j)
    per_ms = (time.perf_counter() - started) / rounds * 1000
    tracemalloc.start()
    [event] = book.observe((10**10).to_bytes(32, "big"), SHARED, now_ms=10**9)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(event, NewKey) and event.pinned
    print(
        f"keys sharing a contact: {keys}  observe: {per_ms:.3f} ms  "
        f"peak allocation: {peak / 1024:.1f} KiB  previous keys named: {len(event.previous_keys)}"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60_000)
