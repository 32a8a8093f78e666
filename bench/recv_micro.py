#!/usr/bin/env python3
"""Micro-bench of the collector's receive step alone: CPU per datagram, recvfrom against
recvmmsg through ctypes (overflowd.services.recvmmsg), on loopback from the C sender.

Not a test: it prints figures. A receiver process on core 0 runs one variant: it waits for
readability (poll), optionally lets ``--coalesce-ms`` pass since its last drain (as the
collector does), drains the socket in calls of up to 256 datagrams and makes what the
collector hands on (a list of ``Datagram`` per drain), nothing more. The C ``sendmmsg``
sender (bench/c/sender.c) on core 1 replays the shared v5 trace at each rate for a few
seconds; the receiver's CPU (utime+stime from getrusage, so the kernel's copy is counted,
and utime alone) is divided by the datagrams it got. Variants alternate at each rate.

Variants:

- ``recvfrom``: main's loop, ``sock.recvfrom(65535)`` per datagram, a ``Datagram`` each;
- ``recvmmsg``: :class:`BatchReceiver` (one recvmmsg call per drain into preallocated slots;
  payload bytes, exporter names and ``Datagram`` tuples made by ``map`` in C);
- ``fallback``: :class:`BatchReceiver` with ``native=False`` (its recvfrom loop);
- ``recvmmsg-raw``: recvmmsg, lengths and exporter names read, no bytes or ``Datagram`` made
  (what the call itself costs);
- ``recvmmsg-block``: that and one ``bytes`` copy of the compact slots in use (what a decoder
  reading offsets and lengths in one block, no bytes per datagram, would start from).

Usage::

    .venv/bin/python bench/recv_micro.py                      # ~1 minute
    .venv/bin/python bench/recv_micro.py --rates 100000,300000 --seconds 1 --coalesce-ms 0
    .venv/bin/python bench/recv_micro.py --decode   # bytes per datagram vs a block handoff
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from itertools import repeat
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ingest  # the sender, its dataset file and the trace

VARIANTS = ("recvfrom", "recvmmsg", "fallback", "recvmmsg-raw", "recvmmsg-block")
BATCH = 256


def raw(rx: object, block: bool = False) -> tuple[int, int]:
    """The recvmmsg call and the reading of lengths and source addresses, nothing made."""
    from overflowd.services import recvmmsg as rm

    fd, hdrs = rx._call_args  # type: ignore[attr-defined]
    n = rm._RECVMMSG(fd, hdrs, BATCH, rm.MSG_DONTWAIT | rm.MSG_TRUNC, None)
    if n <= 0:
        return 0, 0
    rx._namelens[:n] = rx._namelen_fill[:n]  # type: ignore[attr-defined]
    rx._exporters(rx._keys(n))  # type: ignore[attr-defined]
    if block:  # one copy of the compact slots in use, for a decoder to read in place
        rx._buf[: n * rx._inline]  # type: ignore[attr-defined]
    return n, sum(rx._lengths[:n].tolist())  # type: ignore[attr-defined]


def child(variant: str, coalesce_s: float, rcvbuf: int) -> int:
    os.sched_setaffinity(0, {ingest.RECEIVER_CPU})
    from overflowd.services.collector import Datagram, open_socket
    from overflowd.services.recvmmsg import BatchReceiver

    sock = open_socket(("127.0.0.1", 0), rcvbuf)
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    make = functools.partial(tuple.__new__, Datagram)
    rx = None
    if variant != "recvfrom":
        rx = BatchReceiver(sock, BATCH, native=variant != "fallback")
    counts = {"datagrams": 0, "bytes": 0, "calls": 0}
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(0, select.POLLIN)
    recvfrom = sock.recvfrom
    last = time.monotonic()
    stdin = os.fdopen(0, "r", buffering=1)
    while True:
        events = dict(poller.poll())
        if 0 in events:
            line = stdin.readline()
            if not line or line.strip() == "quit":
                return 0
            ru = resource.getrusage(resource.RUSAGE_SELF)
            print(json.dumps({**counts, "utime": ru.ru_utime, "stime": ru.ru_stime}), flush=True)
            continue
        if coalesce_s:
            wait = coalesce_s - (time.monotonic() - last)
            if wait > 0:
                time.sleep(wait)
        while True:  # drain: calls of up to BATCH until a short one
            now = time.time()
            if rx is None:
                batch = []
                for _ in repeat(None, BATCH):
                    try:
                        data, addr = recvfrom(65535)
                    except BlockingIOError:
                        break
                    exporter = addr[0]
                    if exporter.startswith("::ffff:"):
                        exporter = exporter[7:]
                    batch.append(Datagram(data, exporter, now))
                n = len(batch)
                nbytes = sum(len(d.data) for d in batch)
            elif variant.startswith("recvmmsg-"):
                n, nbytes = raw(rx, variant == "recvmmsg-block")
            else:
                got = rx.receive()
                batch = list(map(make, zip(got.payloads, got.exporters, repeat(now))))
                n, nbytes = len(batch), got.nbytes
            counts["calls"] += 1
            counts["datagrams"] += n
            counts["bytes"] += nbytes
            if n < BATCH:
                break
        last = time.monotonic()


def decode_handoff(batch: int, runs: int) -> None:
    """``--decode``: in process, no socket. From datagrams sitting in the receiver's compact
    slots to the arrays decode_v5_batch computes on (the headers, and every record's twelve
    32-bit words in native order), two ways: (a) today's, a ``bytes`` and a ``Datagram`` per
    datagram (collector), the tuples node.py builds, decode_v5_batch's own slicing and joins
    of headers and record blocks; (b) a block handoff: headers copied out of the slots
    through a structured dtype whose itemsize is the slot, records joined straight from
    memoryview slices of the slots, no ``bytes`` per datagram (a boolean-mask gather over a
    strided (slot, record, word) view was tried first: 0.43 µs a datagram, slower than
    today's path). What follows
    (times, intervals, exporters, sampling) is the same either way and left out."""
    import mmap
    import operator

    import numpy as np

    from overflowd.services.collector import Datagram
    from overflowd.services.recvmmsg import INLINE_BYTES
    from overflowd.wire.v5_batch import HEADER_DTYPE

    trace = ingest.load_trace(ingest.trace_path())
    payloads = [d for d, _, _ in trace[:batch]]
    n, slot = len(payloads), INLINE_BYTES
    mm = mmap.mmap(-1, n * slot)
    for i, d in enumerate(payloads):
        mm[i * slot : i * slot + len(d)] = d
    lengths = [len(d) for d in payloads]
    names = ["192.0.2.1"] * n
    starts = range(0, n * slot, slot)
    make = functools.partial(tuple.__new__, Datagram)
    fields: Any = HEADER_DTYPE.fields
    slot_header = np.dtype(
        {
            "names": list(fields),
            "formats": [fields[k][0] for k in fields],
            "offsets": [fields[k][1] for k in fields],
            "itemsize": slot,
        }
    )

    def today() -> tuple[Any, Any]:
        got = list(map(mm.__getitem__, map(slice, starts, map(operator.add, starts, lengths))))
        dgs = list(map(make, zip(got, names, repeat(0.0))))
        tuples = [(d.data, d.exporter, d.received) for d in dgs]  # node.py
        data = [t[0] for t in tuples]
        hdr = np.frombuffer(b"".join([d[:24] for d in data]), dtype=HEADER_DTYPE)
        words = np.frombuffer(b"".join([d[24:] for d in data]), dtype=">u4").astype(np.uint32)
        return hdr, words.reshape(-1, 12)

    view = memoryview(mm)
    head_ends = list(map(operator.add, starts, repeat(24)))

    def block() -> tuple[Any, Any]:
        # Headers: one strided copy out of the slots. Records: joined straight from
        # memoryview slices of the slots (one copy, which is also what frees the slots for
        # the next recvmmsg), the record ends from the header counts.
        hdr = np.ndarray((n,), dtype=slot_header, buffer=mm).copy()
        ends = (np.asarray(head_ends) + 48 * hdr["count"].astype(np.intp)).tolist()
        joined = b"".join(map(view.__getitem__, map(slice, head_ends, ends)))
        return hdr, np.frombuffer(joined, dtype=">u4").astype(np.uint32).reshape(-1, 12)

    a, b = today(), block()
    assert np.array_equal(a[1], b[1]) and (a[0]["count"] == b[0]["count"]).all()
    for name, fn in (("today: bytes per datagram", today), ("block handoff", block)) * 2:
        best = min(timeit.repeat(fn, number=20, repeat=runs, timer=time.process_time))
        print(f"  {name:28} {best / 20 / n * 1e6:.3f} µs a datagram ({n} a batch, CPU)")


class Child:
    def __init__(self, variant: str, coalesce_s: float, rcvbuf: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--child", variant, "--coalesce-ms", str(coalesce_s * 1e3)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        self.port = int(json.loads(self.proc.stdout.readline())["port"])

    def stats(self) -> dict[str, float]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        answer: dict[str, float] = json.loads(self.proc.stdout.readline())
        return answer

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="100000,200000,300000", help="datagrams/s")
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--coalesce-ms", type=float, default=10.0)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rcvbuf", type=int, default=4 * 1024 * 1024)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument(
        "--decode", action="store_true", help="only the in-process handoff comparison (v5)"
    )
    a = p.parse_args(argv)
    if a.child:
        return child(a.child, a.coalesce_ms / 1e3, a.rcvbuf)
    if a.decode:
        print(
            f"bench/recv_micro.py --decode: {time.strftime('%Y-%m-%d %H:%M:%S')}, load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        for size in (256, 64):
            decode_handoff(size, 7)
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-recv-"))
    tools = ingest.build_tools(work)
    if isinstance(tools, str):
        print(tools)
        shutil.rmtree(work, ignore_errors=True)
        return 1
    trace = ingest.load_trace(ingest.trace_path())
    payloads = [d for d, _, _ in trace]
    ds = ingest.Dataset("v5", "trace", payloads, [ingest.v5_count(d) for d in payloads])
    sender = ingest.CSender(tools["sender"], ds.write(work / "v5.bin"))
    variants = a.variants.split(",")
    print(
        f"bench/recv_micro.py: {time.strftime('%Y-%m-%d %H:%M:%S')}, v5 trace datagrams "
        f"({sum(map(len, payloads)) / len(payloads):.0f} B avg), coalesce {a.coalesce_ms:g} ms, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"  {'rate/s':>8} {'variant':13} {'got/s':>8} {'drops':>6} {'dg/call':>7} "
          f"{'µs/dg cpu':>9} {'µs/dg user':>10} {'core':>5}")  # fmt: skip
    try:
        for rate in (float(r) for r in a.rates.split(",")):
            for variant in variants:
                c = Child(variant, a.coalesce_ms / 1e3, a.rcvbuf)
                try:
                    sender.send(c.port, rate, 0.2)  # warm-up
                    time.sleep(0.1)
                    k0 = ingest.udp_socket_stats(c.port)
                    s0 = c.stats()
                    reply = sender.send(c.port, rate, a.seconds)
                    time.sleep(0.15)
                    s1 = c.stats()
                    k1 = ingest.udp_socket_stats(c.port)
                finally:
                    c.close()
                got = s1["datagrams"] - s0["datagrams"]
                cpu = s1["utime"] + s1["stime"] - s0["utime"] - s0["stime"]
                user = s1["utime"] - s0["utime"]
                drops = (k1[1] - k0[1]) if k0 and k1 else -1
                calls = max(1, s1["calls"] - s0["calls"])
                print(
                    f"  {rate:8.0f} {variant:13} {got / reply['elapsed']:8.0f} {drops:6d} "
                    f"{got / calls:7.1f} {cpu / max(got, 1) * 1e6:9.3f} "
                    f"{user / max(got, 1) * 1e6:10.3f} {cpu / reply['elapsed']:5.0%}"
                )
    finally:
        sender.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
