"""Peer push throughput: reports/s from A's store through B into C's, three daemons on loopback.

    .venv/bin/python bench/peer_push.py [--reports 5000] [--default-budgets]

Starts ``overflowd run`` three times (A -> B -> C, pulls off), stores N fresh reports at A in
one transaction, and times until C holds all of them: every report crosses two inboxes, is
verified twice (request and COSE signatures), de-duplicated and stored three times. Budgets are
raised out of the way unless ``--default-budgets`` (100 reports/s out per peer, the default,
which then is the figure). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overflowd.identity import NodeIdentity, load_identity
from tests.service.test_peer_push import Node, _fresh, _peer, _seed
from tests.support.cli import run
from tests.support.postgres import free_port

FAST = (
    "in_reports_per_s = 1000000.0\nin_reports_burst = 1000000\nin_bytes_per_s = 1e10\n"
    "in_bytes_burst = 10000000000\nout_reports_per_s = 1000000.0\nout_reports_burst = 1000000\n"
    "out_bytes_per_s = 1e10\nout_bytes_burst = 10000000000\n"
)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--reports", type=int, default=5000)
    p.add_argument("--default-budgets", action="store_true")
    args = p.parse_args()
    extra = "" if args.default_budgets else FAST
    with tempfile.TemporaryDirectory() as tmp:
        nodes = {}
        for name in ("a", "b", "c"):
            home = Path(tmp) / name
            assert run("overflowd", "init", "--home", str(home)).code == 0
            nodes[name] = Node(name, home, load_identity(home), free_port())
        a, b, c = nodes["a"], nodes["b"], nodes["c"]
        (a.home / "overflowd.toml").write_text(_peer(b, push=True, extra=extra))
        (b.home / "overflowd.toml").write_text(
            _peer(a, push=False, extra=extra) + _peer(c, push=True, extra=extra)
        )
        (c.home / "overflowd.toml").write_text(_peer(b, push=False, extra=extra))
        try:
            with ThreadPoolExecutor(3) as pool:
                list(pool.map(Node.start, (c, b, a)))
            observer = NodeIdentity(seed=b"\x42" * 32)
            reports = _fresh(args.reports, observer, salt=7)
            start = time.monotonic()
            _seed(a, reports)
            at_b = None
            with c.store() as s, b.store() as sb:
                while s.count_reports() < len(reports):
                    if at_b is None and sb.count_reports() >= len(reports):
                        at_b = time.monotonic() - start
                    if time.monotonic() - start > 600:
                        print(f"timed out: C holds {s.count_reports()}")
                        return 1
                    time.sleep(0.05)
            took = time.monotonic() - start
            posts = a.metric("overflowd_peer_push_posts_total")
            print(f"all at B after {at_b or took:.2f} s; A sent {posts:.0f} POSTs")
        finally:
            for node in nodes.values():
                if node.daemon is not None:
                    node.stop()
    print(
        f"{len(reports)} reports A -> B -> C in {took:.2f} s: {len(reports) / took:.0f} reports/s"
        f" ({'default' if args.default_budgets else 'raised'} budgets)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
