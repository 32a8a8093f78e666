"""Memory the DNS cache holds when a zone answers large TXT sets: ``bench/dns_cache_memory.py``.

Starts Knot on 127.0.0.1 (tests/support/knot.py) with a wildcard zone answering 30 TXT records
of 8 x 250 bytes (~60 KiB, over TCP) for every name, looks up N distinct names through
:class:`overflowd.services.dns.DnsRegistry`, and prints what tracemalloc saw the process grow
by beside the cache's own estimate. Nothing is sent anywhere but 127.0.0.1.

    .venv/bin/python bench/dns_cache_memory.py [N] [--entry-max-bytes B] [--max-bytes B]
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overflowd.errors import DiscoveryError
from overflowd.services.dns import DnsRegistry, RegistrySettings
from tests.support.knot import KnotServer, soa_zone


def big_rrset(records: int, strings: int) -> str:
    lines = []
    for i in range(records):
        body = " ".join(f'"{i:04d}' + chr(97 + j % 26) * 246 + '"' for j in range(strings))
        lines.append(f"* 3600 IN TXT {body}")
    return "\n".join(lines)


async def measure(address: str, n: int, overrides: dict[str, int]) -> None:
    registry = DnsRegistry(RegistrySettings(nameservers=(address,), timeout_s=5.0, **overrides))  # type: ignore[arg-type]

    async def one(name: str) -> None:
        try:
            await registry.lookup_name(name)
        except DiscoveryError:
            pass  # an answer over the entry cap, cached as a failure

    await one("warm-up.big.test")  # dnspython's and trio's first-use allocations
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    started = time.monotonic()
    for i in range(n):
        await one(f"n{i}.big.test")
    elapsed = time.monotonic() - started
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    c = registry.statistics().cache
    print(f"{n} lookups of ~60 KiB answers in {elapsed:.1f} s, settings {overrides or 'defaults'}")
    print(f"  process grew (tracemalloc): {grown / 1e6:.2f} MB")
    print(
        f"  cache estimate: answers {c.positive_bytes / 1e6:.2f} MB in {c.positive_entries}, "
        f"negative {c.negative_bytes / 1e6:.2f} MB in {c.negative_entries}; "
        f"evicted {c.evicted}, too_large {c.too_large}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=300)
    ap.add_argument("--entry-max-bytes", type=int)
    ap.add_argument("--max-bytes", type=int)
    args = ap.parse_args()
    overrides: dict[str, int] = {}
    if args.entry_max_bytes is not None:
        overrides["cache_entry_max_bytes"] = args.entry_max_bytes
    if args.max_bytes is not None:
        overrides["cache_max_bytes"] = args.max_bytes
    with KnotServer({"big.test": soa_zone("big.test", big_rrset(30, 8))}) as knot:
        trio.run(measure, knot.address, args.n, overrides)


if __name__ == "__main__":
    main()
