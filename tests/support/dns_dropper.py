"""A DNS server on 127.0.0.1 for which most zones never answer.

Questions for names under ``answer_zones`` are forwarded to a real authoritative server (Knot,
tests/support/knot.py) and its answer relayed; every other question is read and dropped, the
way a spoofed sender's reverse zone behaves when its servers are down or firewalled: the
resolver waits for its whole timeout. Runs as a trio task; binds port 0 and reports its
address through ``task_status``. Never sends anywhere but 127.0.0.1.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence

import dns.exception
import dns.message
import dns.name
import trio

#: How long a forwarded question may wait for the upstream server's answer.
FORWARD_TIMEOUT_S = 2.0


class DroppingDns:
    def __init__(self, upstream: tuple[str, int], answer_zones: Sequence[str]) -> None:
        if upstream[0] != "127.0.0.1":
            raise ValueError("tests only talk to 127.0.0.1")
        self.upstream = upstream
        self.zones = [dns.name.from_text(z) for z in answer_zones]
        self.forwarded = 0
        self.dropped = 0

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            await sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            async with trio.open_nursery() as nursery:
                task_status.started(f"127.0.0.1:{port}")
                while True:
                    data, client = await sock.recvfrom(65535)
                    try:
                        question = dns.message.from_wire(data).question[0].name
                    except (dns.exception.DNSException, IndexError):
                        self.dropped += 1
                        continue
                    if any(question.is_subdomain(zone) for zone in self.zones):
                        self.forwarded += 1
                        nursery.start_soon(self._forward, sock, data, client)
                    else:
                        self.dropped += 1  # a zone that never answers

    async def _forward(
        self, server: trio.socket.SocketType, data: bytes, client: tuple[str, int]
    ) -> None:
        up = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with up, trio.move_on_after(FORWARD_TIMEOUT_S):
            await up.connect(self.upstream)
            await up.send(data)
            answer = await up.recv(65535)
            await server.sendto(answer, client)
