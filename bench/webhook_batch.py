#!/usr/bin/env python3
"""Webhook batching benchmark: reports/s delivered one per POST beside batched, one run.

Not a test: it prints figures, all from one run so that they can be compared.

Pre-made reports are enqueued in the durable outbox (SQLite in a temp dir) for two URLs (two
paths) of one ``python -m overflowd.cli.receive --trust KEY`` process on 127.0.0.1 (a real
receiver: it verifies every report and fsyncs before answering), and delivered by
``WebhookDelivery.drain``. Two URLs, so that both modes can have the two POSTs in flight a
host gets (``max_concurrency_per_host``; a URL has one at a time).

1. **one per POST**: ``max_batch_reports = 1`` (the sender before #9 sent one report a POST);
2. **batched**: ``max_batch_reports = 50`` (the default);

both with the per-endpoint POST budget set out of the way (1e6/s), to measure the transport.
Then 3. **batched, default budgets**: the default POST budget (1/s, burst 5) and a smaller
burst of reports, to show what the budget does: few POSTs, every report delivered.

Every line the receiver wrote is checked against the reports sent, once each.

    .venv/bin/python bench/webhook_batch.py [--reports N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file: tests.support is the repository's
    sys.path.insert(1, str(REPO))

from overflowd.identity import NodeIdentity  # noqa: E402
from overflowd.notify import WebhookSettings  # noqa: E402
from overflowd.services.webhook import WebhookDelivery  # noqa: E402
from overflowd.store import Store  # noqa: E402
from overflowd.store import outbox as ob  # noqa: E402
from tests.support.reports import make_payload  # noqa: E402


def start_receiver(out: Path, key: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "overflowd.cli.receive", "--listen", "127.0.0.1:0"),
            *("--out", str(out), "--trust", key),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"},
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    if "listening on " not in line:
        proc.kill()
        raise SystemExit(f"overflowd-receive did not start: {line!r}")
    return proc, line.split("listening on ", 1)[1].strip()


def run(mode: str, n: int, settings: WebhookSettings, identity: NodeIdentity) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "received.jsonl"
        proc, base = start_receiver(out, identity.public_key_b64)
        try:
            with Store.open(f"sqlite:///{Path(tmp) / 'node.db'}") as store:
                reports = [identity.sign_report(make_payload(packets=1000 + i)) for i in range(n)]
                now_ms = int(time.time() * 1000)
                urls = [base + "/a", base + "/b"]
                with store.transaction("bench", write=True) as conn:
                    planned = [ob.Planned(r, urls[i % 2], now_ms) for i, r in enumerate(reports)]
                    ob.enqueue_planned_in(
                        conn, store, planned, now_ms=now_ms, max_pending_per_url=n, max_pending=n
                    )
                delivery = WebhookDelivery(store, identity, settings)
                start = time.perf_counter()
                cpu = time.process_time()
                counts = trio.run(delivery.drain)
                wall = time.perf_counter() - start
                cpu = time.process_time() - cpu
                stats = delivery.statistics()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        written = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    ok = sorted(written) == sorted(r.report_id for r in reports) and counts["delivered"] == n
    print(
        f"{mode:<28} {n:>6} reports {stats.posts:>6} POSTs {wall:>7.2f} s "
        f"{n / wall:>9.0f} reports/s {stats.posts / wall:>8.0f} POSTs/s "
        f"{cpu / n * 1e6:>7.0f} µs sender CPU/report  {'ok' if ok else 'MISMATCH'}"
    )
    if not ok:
        raise SystemExit(f"{mode}: receiver output does not match what was sent")
    return {"rate": n / wall, "posts": stats.posts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reports", type=int, default=2000)
    args = p.parse_args()
    identity = NodeIdentity.generate()
    common = {
        "allow_prefixes": ("127.0.0.0/8",),
        "require_https": False,
        "poll_interval_s": 0.05,
    }
    free = {"endpoint_posts_per_s": 1e6, "endpoint_posts_burst": 1_000_000}
    single = run(
        "one per POST",
        args.reports,
        WebhookSettings(**common, **free, max_batch_reports=1),  # type: ignore[arg-type]
        identity,
    )
    batched = run(
        "batched (50 per POST)",
        args.reports,
        WebhookSettings(**common, **free),  # type: ignore[arg-type]
        identity,
    )
    run("batched, default budgets", 300, WebhookSettings(**common), identity)  # type: ignore[arg-type]
    print(f"batched / one per POST: {batched['rate'] / single['rate']:.1f}x reports/s")


if __name__ == "__main__":
    main()
