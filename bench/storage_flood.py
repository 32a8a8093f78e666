"""How fast a flood of valid in-band reports, signed by throwaway keys, grows the store.

One socket on 127.0.0.1 sends pre-signed report datagrams (one fresh key each) to an in-band
listener storing into SQLite, as fast as the listener takes them. Prints reports stored and
database bytes per second. With the storage budgets (``overflowd.storage_policy``, when
present) the listener asks the admission policy first, with the default ``[storage]`` settings
but ``received_max_bytes`` as given; on a tree without them everything is stored.

    .venv/bin/python bench/storage_flood.py --reports 20000
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from overflowd.identity import NodeIdentity
from overflowd.services.inband import InbandListener, InbandSettings
from overflowd.store import Store
from overflowd.wire import datagram
from tests.support.reports import make_payload


def datagrams(n: int) -> list[bytes]:
    now = int(time.time() * 1000)
    out = []
    for i in range(n):
        payload = make_payload("127.0.0.1", "127.0.0.2", time_ms=now)
        payload = dataclasses.replace(payload, flow=dataclasses.replace(payload.flow, sport=i))
        out.append(datagram.to_wire(NodeIdentity.generate().sign_report(payload).cose))
    return out


async def flood(path: Path, data: list[bytes], max_bytes: int) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    policy = None
    try:
        from overflowd.config import StorageSettings
        from overflowd.storage_policy import StoragePolicy
    except ImportError:
        pass
    else:
        policy = StoragePolicy(StorageSettings(received_max_bytes=max_bytes))
        kw["admit"] = policy.admit
    with Store.open(f"sqlite:///{path}") as store:
        listener = InbandListener(
            InbandSettings(store_batch=500), store, listen=("127.0.0.1", 0), **kw
        )
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await sock.bind(("127.0.0.1", 0))
        size0 = os.path.getsize(path)
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(listener.run)
            start = time.perf_counter()
            for i, d in enumerate(data):
                await sock.sendto(d, addr)
                if i % 200 == 199:
                    while listener.statistics().datagrams < i - 200:
                        await trio.sleep(0.001)
            while listener.statistics().datagrams < len(data) - 50:
                await trio.sleep(0.01)
            listener.stop()
        elapsed = time.perf_counter() - start
        sock.close()
        stats = listener.statistics()
        grown = sum(
            os.path.getsize(p) for p in path.parent.glob(path.name + "*") if p.is_file()
        ) - size0
        return {
            "budgets": policy is not None,
            "sent": len(data),
            "stored": stats.stored,
            "refused_storage": stats.dropped.get("storage", 0),
            "seconds": round(elapsed, 2),
            "stored_per_s": round(stats.stored / elapsed),
            "db_growth_MB": round(grown / 1e6, 2),
            "db_growth_MB_per_s": round(grown / 1e6 / elapsed, 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=20_000)
    parser.add_argument("--received-max-bytes", type=int, default=300_000_000)
    args = parser.parse_args()
    data = datagrams(args.reports)
    with tempfile.TemporaryDirectory() as tmp:
        result = trio.run(flood, Path(tmp) / "flood.db", data, args.received_max_bytes)
    print(" ".join(f"{k}={v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
