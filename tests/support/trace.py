"""The shared capture and ways to feed it to a collector over loopback."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from overflowd.wire import CaptureReader

ROOT = Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    return Path(os.environ.get("OVERFLOWD_SHARED", ROOT.parent / "shared"))


def netflow_v5_trace() -> Path:
    path = shared_dir() / "data" / "netflow_v5_simpleweb.pcap"
    assert path.exists(), f"shared trace missing at {path} (set OVERFLOWD_SHARED)"
    return path


def trace_payloads(path: Path | None = None) -> list[bytes]:
    with open(path or netflow_v5_trace(), "rb") as fh:
        return [d.payload for d in CaptureReader().udp_datagrams(fh)]


def send_udp(
    payloads: list[bytes], addr: tuple[str, int], *, per_ms: int = 50, timeout_s: float = 60
) -> int:
    """Send each payload once to a loopback address, paced; bounded in count and time."""
    assert addr[0].startswith("127.") or addr[0] == "::1", "tests only send to loopback"
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    deadline = time.monotonic() + timeout_s
    sent = 0
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        for i, data in enumerate(payloads):
            if time.monotonic() > deadline:
                break
            sock.sendto(data, addr)
            sent += 1
            if per_ms and i % per_ms == per_ms - 1:
                time.sleep(0.001)
    return sent
