"""Per-peer latency as the operator reads it: A pushes to B through a proxy that holds each of
B's answers DELAY_S, and A's ``/v1/peers``, ``overflowd-query peers --json``, ``/metrics`` and
dashboard Peers page all show a push round trip (and a report age at delivery) of at least
that delay; B, which pushes nothing, shows none.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from overflowd.identity import load_identity
from tests.service.test_peer_push import Node, _fresh, _peer, _seed, _wait_stored
from tests.support.cli import run
from tests.support.postgres import free_port

DELAY_S = 0.3
TIMEOUT_S = 30.0


class DelayProxy:
    """TCP on loopback: bytes to the upstream at once, bytes back each held ``delay_s``."""

    def __init__(self, upstream: tuple[str, int], delay_s: float) -> None:
        self.upstream, self.delay_s = upstream, delay_s
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._start(self._accept)

    def _start(self, target: object, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            up = socket.create_connection(self.upstream, timeout=5)
            self._conns += [client, up]
            self._start(self._pipe, client, up, 0.0)
            self._start(self._pipe, up, client, self.delay_s)

    def _pipe(self, src: socket.socket, dst: socket.socket, delay_s: float) -> None:
        src.settimeout(0.2)
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if delay_s:
                time.sleep(delay_s)
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for t in self._threads:
            t.join(timeout=2)
        for c in self._conns:
            c.close()


@contextmanager
def _two_nodes(root: Path) -> Iterator[tuple[Node, Node, DelayProxy]]:
    made = []
    for name in ("a", "b"):
        home = root / name
        assert run("overflowd", "init", "--home", str(home)).code == 0
        made.append(Node(name, home, load_identity(home), free_port()))
    a, b = made
    proxy = DelayProxy(("127.0.0.1", b.api_port), DELAY_S)
    slow_b = Node("b", b.home, b.identity, proxy.port)  # A knows B by the proxy's address
    (a.home / "overflowd.toml").write_text(_peer(slow_b, push=True), encoding="utf-8")
    (b.home / "overflowd.toml").write_text(_peer(a, push=False), encoding="utf-8")
    try:
        b.start()
        a.start()
        yield a, b, proxy
    finally:
        for node in (a, b):
            if node.daemon is not None:
                node.stop()
        proxy.close()


def test_a_slow_peer_shows_its_delay_in_v1_peers_the_cli_metrics_and_dashboard(
    tmp_path: Path,
) -> None:
    with _two_nodes(tmp_path) as (a, b, _proxy):
        for salt in range(3):  # a few POSTs: the window's median is a POST's, not a fluke
            reports = _fresh(3, salt=100 + salt)
            _seed(a, reports)
            _wait_stored(b, [r.report_id for r in reports], TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while (
            time.monotonic() < deadline
            and a.metric("overflowd_peer_push_rtt_seconds_window", peer="b") < 3
        ):
            time.sleep(0.05)

        lat = httpx.get(f"{a.url}v1/peers", timeout=5).json()["latency"]["b"]
        assert DELAY_S <= lat["push_rtt_p50"] <= lat["push_rtt_max"] < TIMEOUT_S
        assert lat["delivery_age_p50"] >= DELAY_S
        assert lat["pull_rtt_p50"] is None  # A does not pull B

        shown = run("overflowd-query", "peers", "--json", "--home", str(a.home), "--api", a.url)
        assert shown.code == 0, shown
        (b_row,) = [json.loads(line) for line in shown.out.splitlines()]
        assert b_row["name"] == "b"
        assert b_row["push_rtt_p50"] >= DELAY_S and b_row["delivery_age_p50"] >= DELAY_S
        table = run("overflowd-query", "peers", "--home", str(a.home), "--api", a.url)
        assert "RTT MS" in table.out
        assert int(table.out.splitlines()[1].split()[-3].split("/")[0]) >= DELAY_S * 1000

        p50 = a.metric("overflowd_peer_push_rtt_seconds", peer="b", quantile="0.5")
        assert p50 >= DELAY_S
        assert a.metric("overflowd_peer_push_age_seconds", peer="b", quantile="0.5") >= DELAY_S

        page = httpx.get(f"{a.url}peers", timeout=5).text
        assert "push rtt" in page.lower() and "delivery age" in page.lower()

        # B's own view of A: no push to A, so nothing measured, and the CLI says so (null).
        shown_b = run("overflowd-query", "peers", "--json", "--home", str(b.home), "--api", b.url)
        assert json.loads(shown_b.out.splitlines()[0])["push_rtt_p50"] is None
