"""softflowd, a real NetFlow v9/IPFIX exporter, run on a generated capture and exporting to a
socket on 127.0.0.1: the datagrams it sent, for tests that decode real exporter output
without network namespaces (tests/support/exporters.py has the namespaced lab).

The capture is built here (Ethernet/IPv4, TEST-NET addresses only: 192.0.2.0/24 and
198.51.100.0/24 to 203.0.113.0/24; TCP, UDP and ICMP flows of 1-3 packets), from a seed.
``softflowd -r`` exports every flow when the file ends and exits; it is not given ``-c``
(with ``-r`` it would then wait forever: NETLAB.md). Bounded: one timeout for the whole
export, the process is stopped by its own handle if it overruns.
"""

from __future__ import annotations

import random
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

SOFTFLOWD = shutil.which("softflowd") or shutil.which("softflowd", path="/usr/sbin:/sbin")
EXPORT_TIMEOUT_S = 30.0
#: Linux's SO_RCVBUFFORCE (socket.h), which Python's socket module does not name.
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_ETHERNET = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"


def write_capture(path: Path, flows: int, *, seed: int = 1, icmp_share: float = 0.02) -> int:
    """A pcap of ``flows`` flows; returns the number of packets."""
    rng = random.Random(seed)
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    t = 1_700_000_000.0
    packets = 0
    tcp_share = (1 - icmp_share) * 0.6
    for i in range(flows):
        net = bytes([192, 0, 2]) if i % 2 else bytes([198, 51, 100])
        src = net + bytes([rng.randrange(1, 255)])
        dst = bytes([203, 0, 113, rng.randrange(1, 255)])
        roll = rng.random()
        proto = 1 if roll < icmp_share else 6 if roll < icmp_share + tcp_share else 17
        sport = rng.randrange(1024, 65535)
        dport = rng.choice((53, 80, 443, 123, rng.randrange(1, 65535)))
        for k in range(rng.choice((1, 1, 2, 3))):
            if proto == 6:
                flags = 0x02 if k == 0 else 0x10
                l4 = struct.pack("!HHIIBBHHH", sport, dport, k, 0, 0x50, flags, 8192, 0, 0)
            elif proto == 17:
                l4 = struct.pack("!HHHH", sport, dport, 28, 0) + b"x" * 20
            else:
                l4 = struct.pack("!BBHHH", 8, 0, 0, i & 0xFFFF, k) + b"p" * 32
            ip = struct.pack(
                "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), i & 0xFFFF, 0, 64, proto, 0, src, dst
            )
            frame = _ETHERNET + ip + l4
            t += 0.0005
            out.append(struct.pack("<IIII", int(t), int(t % 1 * 1e6), len(frame), len(frame)))
            out.append(frame)
            packets += 1
    path.write_bytes(b"".join(out))
    return packets


def export(capture: Path, version: int, workdir: Path) -> list[bytes]:
    """``softflowd -r capture -v version`` to a fresh socket on 127.0.0.1: the datagrams
    received (in order; the socket buffer is large, but loopback may still drop a few)."""
    assert SOFTFLOWD is not None, "softflowd is not installed"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        try:  # past net.core.rmem_max where allowed (root): loopback drops nothing then
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 1 << 25)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 25)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        port = sock.getsockname()[1]
        argv = [SOFTFLOWD, "-d", "-r", str(capture), "-v", str(version)]
        argv += ["-n", f"127.0.0.1:{port}", "-p", str(workdir / f"softflowd-{version}.pid")]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got: list[bytes] = []
        deadline = time.monotonic() + EXPORT_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                try:
                    got.append(sock.recv(65535))
                except TimeoutError:
                    if proc.poll() is not None:
                        break
        finally:
            if proc.poll() is None:
                proc.terminate()
            proc.wait(timeout=10)
        return got
    finally:
        sock.close()
