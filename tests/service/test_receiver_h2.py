"""``overflowd-receive`` speaks HTTP/1.1 only: HTTP/2 cannot make a connection hold ~1 MiB.

Review finding: over h2c with prior knowledge each connection could buffer up to 64
CONTINUATION frames of 16 KiB (h2's CONTINUATION_BACKLOG) before its headers end, ~1 MiB a
connection where HTTP/1.1 holds at most 16 KiB (h11_max_incomplete_size); within
max_connections (512) that was ~0.5 GiB held by strangers, renewed every header_timeout_s.
On main the first test measured 162 MiB of growth for 128 connections.

Real ``overflowd-receive`` on 127.0.0.1 (or ::1); attackers connect from 127.0.0.2.. (other
clients). Every packet goes to loopback.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path

import httpx
import trio

from overflowd.services.receive_http import network_key
from tests.service.test_receiver_limits import (
    TIMEOUT_S,
    connect_from,
    metrics,
    read_all,
    receiver,
    wait_metric,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
REFUSED = "overflowd_receiver_connections_refused_total"


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    head = struct.pack("!I", len(payload))[1:] + bytes([kind, flags])
    return head + struct.pack("!I", stream) + payload


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def server_pid(port: int) -> int:
    out = subprocess.run(
        ["ss", "-Hltnp", f"sport = :{port}"], capture_output=True, text=True, timeout=10
    ).stdout
    return int(out.split("pid=")[1].split(",")[0])


def test_h2_continuations_do_not_swell_the_receiver(tmp_path: Path) -> None:
    with receiver(tmp_path) as (base, port, _out):
        pid = server_pid(port)
        time.sleep(0.5)
        before = rss_kib(pid)
        socks = []
        junk = b"\x00" * 16384
        try:
            for c in range(4):  # 4 clients x 32 connections (the per-client cap)
                for _ in range(32):
                    s = socket.create_connection(
                        ("127.0.0.1", port), timeout=5, source_address=(f"127.0.0.{2 + c}", 0)
                    )
                    socks.append(s)
                    try:
                        s.sendall(PREFACE + frame(4, 0, 0, b""))
                        s.sendall(frame(1, 0, 1, junk))  # HEADERS without END_HEADERS
                        for _ in range(62):
                            s.sendall(frame(9, 0, 1, junk))  # CONTINUATION, no END_HEADERS
                    except OSError:  # reset: the server closed it, which is the point
                        pass
            time.sleep(1.0)
            after = rss_kib(pid)
        finally:
            for s in socks:
                s.close()
        grown_mib = (after - before) / 1024
        assert grown_mib < 16, f"receiver RSS grew by {grown_mib:.0f} MiB for {len(socks)} conns"
        m = trio.run(wait_metric_sync, base)
        assert m[f'{REFUSED}{{reason="http2"}}'] == len(socks)
        # released at once, not after the idle timer (header_timeout_s, 5 s): /metrics' own
        assert m["overflowd_receiver_connections"] <= 1


async def wait_metric_sync(base: str) -> dict[str, float]:
    with trio.fail_after(TIMEOUT_S):
        return await wait_metric(base, f'{REFUSED}{{reason="http2"}}', 128)


async def test_a_preface_dripped_byte_by_byte_is_refused_and_http11_still_served(
    tmp_path: Path,
) -> None:
    with receiver(tmp_path) as (base, port, _), trio.fail_after(TIMEOUT_S):
        stream = await connect_from("127.0.0.2", port)
        for byte in PREFACE:
            await stream.send_all(bytes([byte]))
            await trio.sleep(0.01)
        answer = await read_all(stream, 10)
        await stream.aclose()
        assert answer == b""  # closed unanswered
        # A request whose first bytes are a prefix of the preface ("P...") is HTTP/1.1.
        stream = await connect_from("127.0.0.2", port)
        await stream.send_all(b"P")
        await trio.sleep(0.05)
        await stream.send_all(b"OST /hook HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        answer = await read_all(stream, 10)
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        m = await metrics(base)
        assert m[f'{REFUSED}{{reason="http2"}}'] == 1
        assert m['overflowd_receiver_rejected_total{reason="malformed"}'] == 1


async def test_h2c_upgrade_is_ignored_and_pri_later_is_just_a_request(tmp_path: Path) -> None:
    with receiver(tmp_path) as (base, port, _), trio.fail_after(TIMEOUT_S):
        stream = await connect_from("127.0.0.2", port)
        await stream.send_all(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
            # then the preface as a second request on the same connection
            + PREFACE
            + frame(4, 0, 0, b"")
        )
        answer = await read_all(stream, 10)
        await stream.aclose()
        assert answer.startswith(b"HTTP/1.1 200 "), answer
        assert b" 101 " not in answer
        # "PRI * HTTP/2.0" is answered as the HTTP/1.1 request it parses as, never switched.
        assert b"HTTP/1.1 405 " in answer or b"HTTP/1.1 400 " in answer, answer
        m = await metrics(base)
        assert m["overflowd_receiver_h2c_upgrades_ignored_total"] == 1
        assert m[f'{REFUSED}{{reason="http2"}}'] == 0


def test_network_key_is_the_ipv6_48() -> None:
    assert network_key("2001:db8:1:ff00::1") == "2001:db8:1::/48"
    assert network_key("2001:db8:1:ff00::1%eth0") == "2001:db8:1::/48"
    assert network_key("::ffff:192.0.2.1") is None
    assert network_key("192.0.2.1") is None
    assert network_key("-") is None


async def served_v6(port: int) -> trio.SocketStream:
    """A connection from ::1 that has had one answer (so the server counts it)."""
    sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_STREAM)
    await sock.connect(("::1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"ok\n"):
        chunk = await stream.receive_some(4096)
        assert chunk, data
        data += chunk
    return stream


async def test_per_network_cap_on_ipv6(tmp_path: Path) -> None:
    """A /48 gets at most --max-connections-per-network, whatever its /64s (one here: ::1)."""
    flags = ("--max-connections-per-client", "8", "--max-connections-per-network", "3")
    with (
        receiver(tmp_path, *flags, listen="[::1]:0") as (base, port, _),
        trio.fail_after(TIMEOUT_S),
    ):
        held = [await served_v6(port) for _ in range(3)]
        sock = trio.socket.socket(trio.socket.AF_INET6, trio.socket.SOCK_STREAM)
        await sock.connect(("::1", port))
        extra = trio.SocketStream(sock)
        await extra.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await read_all(extra, 10) == b""  # closed unanswered
        await extra.aclose()
        for stream in held:
            await stream.aclose()
        shut_out = 0  # /metrics polls refused too, until the held ones' slots are released
        async with httpx.AsyncClient(base_url=base) as client:
            while True:
                try:
                    r = await client.get("/metrics")
                    break
                except httpx.TransportError:
                    shut_out += 1
                    await trio.sleep(0.05)
        assert f'{REFUSED}{{reason="per_network"}} {1 + shut_out}' in r.text
        assert f'{REFUSED}{{reason="per_client"}} 0' in r.text
