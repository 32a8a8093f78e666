#!/usr/bin/env python3
"""CPU time of the daemon's decode loop (``NodeService._decode_loop``) over the shared trace.

Not a test: it prints figures. The datagrams are queued in batches of 256, as the collector
hands them over, and the loop decodes, samples (rate 1e-6) and signs what is sampled; process
CPU time, so that a loaded machine changes the figure less than wall time would. To compare
two versions, run it from a worktree of each, alternating, and compare the best of several::

    .venv/bin/python bench/decode_loop.py [PASSES]     # default 20 passes over 2708 datagrams
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from overflowd.config import Settings
from overflowd.identity import NodeIdentity
from overflowd.services.collector import Backlog, Datagram
from overflowd.services.node import NodeService
from overflowd.store import Store
from tests.support.trace import trace_payloads

payloads = trace_payloads()
PASSES = int(sys.argv[1]) if len(sys.argv) > 1 else 20


async def main() -> float:
    with Store.open("sqlite:///:memory:") as store:
        node = NodeService(
            NodeIdentity.generate(), Settings(), store, listen=["127.0.0.1:0"], rate=1e-6
        )
        node._backlog = Backlog(10**9)
        node._sign_refilled = trio.current_time()
        send, recv = trio.open_memory_channel[list[Datagram]](10**6)
        rsend, _rrecv = trio.open_memory_channel[object](10**6)
        now = time.time()
        batches = []
        for _ in range(PASSES):
            for i in range(0, len(payloads), 256):
                batches.append([Datagram(p, "127.0.0.1", now) for p in payloads[i : i + 256]])
        for b in batches:
            node._backlog.admit(len(b), sum(len(d.data) for d in b))
            send.send_nowait(b)
        await send.aclose()
        t0 = time.process_time()
        await node._decode_loop(recv, rsend)  # type: ignore[arg-type]
        return time.process_time() - t0


cpu = trio.run(main)
n = len(payloads) * PASSES
print(f"{n} datagrams, {cpu:.3f} s CPU, {n / cpu / 1000:.1f}k datagrams/s per CPU-second")
