"""Peer push end to end: three ``overflowd run`` daemons on loopback, A <-> B -> C.

A and B push to each other, B pushes to C; pulls are off, so every report that moves here moved
by push. Reports stored at A reach C once, verified, with their hop counts; nothing is echoed
back to A; the hop limit (2) stops forwarding; a forged item is refused alone; B's inbound
budget for A answers 429 with Retry-After and A's outbox delivers later; B down then up loses
nothing. The test also speaks to B's inbox itself, signing as A (it holds A's key file).

The tests share one topology (module scope) and run in file order: each adds its own reports.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from overflowd import report as rpt
from overflowd.identity import NodeIdentity, load_identity
from overflowd.peers import PeeringSettings, peer_channel
from overflowd.store import Store, default_url
from overflowd.wire import datagram, peering
from overflowd.wire import webhook as wh
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.postgres import free_port
from tests.support.reports import make_payload

TIMEOUT_S = 30.0
#: B takes from A at most 20 reports/s with a burst of 40 (small, so a test can spend it).
B_IN_FROM_A = "in_reports_per_s = 20.0\nin_reports_burst = 40\n"
OBSERVER = NodeIdentity(seed=b"\x31" * 32)  # a router none of the nodes is


@dataclass
class Node:
    name: str
    home: Path
    identity: NodeIdentity
    api_port: int
    daemon: Daemon | None = None
    inband: tuple[str, int] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}/"

    def start(self) -> None:
        self.daemon = Daemon(
            self.home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
            "--api", f"127.0.0.1:{self.api_port}",
        )  # fmt: skip
        host, port = self.daemon.line("listening inband ").split()[-1].rsplit(":", 1)
        self.inband = (host, int(port))
        self.daemon.line("api http")

    def stop(self) -> str:
        assert self.daemon is not None
        code, output = self.daemon.stop()
        self.daemon = None
        assert code == 0, output
        return output

    def store(self) -> Store:
        return Store.open(default_url(self.home))

    def metric(self, name: str, **labels: str) -> float:
        assert self.daemon is not None and self.daemon.metrics_url
        text = httpx.get(self.daemon.metrics_url, timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


def _peer(node: Node, *, push: bool, extra: str = "") -> str:
    return (
        f'[[peers]]\nname = "{node.name}"\nurl = "{node.url}"\n'
        f'key = "{node.identity.public_key_b64}"\npush = {"true" if push else "false"}\n'
        f"pull = false\n{extra}"
    )


def _fresh(n: int, signer: NodeIdentity = OBSERVER, salt: int = 0) -> list[rpt.SignedReport]:
    now = int(time.time() * 1000)
    return [
        signer.sign_report(make_payload(packets=1 + salt * 10_000 + i, time_ms=now))
        for i in range(n)
    ]


def _seed(node: Node, reports: list[rpt.SignedReport], via: str = "import") -> None:
    now = int(time.time() * 1000)
    with node.store() as s:
        s.add_reports([(r, now, via) for r in reports])


def _wait_stored(node: Node, ids: list[str], timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    with node.store() as s:
        while time.monotonic() < deadline:
            if all(s.get_report(i) is not None for i in ids):
                return
            time.sleep(0.1)
        missing = [i for i in ids if s.get_report(i) is None]
    raise AssertionError(f"{node.name}: {len(missing)} of {len(ids)} reports never arrived")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Node]]:
    root = tmp_path_factory.mktemp("peers")
    made: dict[str, Node] = {}
    for name in ("a", "b", "c"):
        home = root / name
        assert run("overflowd", "init", "--home", str(home)).code == 0
        made[name] = Node(name, home, load_identity(home), free_port())
    a, b, c = made["a"], made["b"], made["c"]
    common = "[peering]\nhop_limit = 2\n"
    (a.home / "overflowd.toml").write_text(common + _peer(b, push=True), encoding="utf-8")
    (b.home / "overflowd.toml").write_text(
        common + _peer(a, push=True, extra=B_IN_FROM_A) + _peer(c, push=True), encoding="utf-8"
    )
    (c.home / "overflowd.toml").write_text(common + _peer(b, push=False), encoding="utf-8")
    try:
        # Started side by side: each start is seconds on a loaded machine.
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(Node.start, (c, b, a)))
        yield made
    finally:
        for node in made.values():
            if node.daemon is not None:
                node.stop()


def test_reports_stored_at_a_reach_c_once_with_hops_and_never_echo(
    nodes: dict[str, Node],
) -> None:
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    reports = _fresh(30, a.identity)
    _seed(a, reports, via="local")
    ids = [r.report_id for r in reports]
    _wait_stored(c, ids)
    with c.store() as s:
        held = [s.get_report(i) for i in ids]
        arrivals = s.arrivals(ids)
    assert all(r is not None and r.hops == 2 and r.via == "gossip" for r in held)
    assert all(r is not None and r.cose == o.cose for r, o in zip(held, reports, strict=True))
    assert {i: [(x.channel, x.count) for x in v] for i, v in arrivals.items()} == {
        i: [(peer_channel(b.identity.public_key), 1)] for i in ids
    }
    with b.store() as s:
        assert all(s.get_report(i).hops == 1 for i in ids)  # type: ignore[union-attr]
    # B skips A for each of them (they came from A), and A holds each once, as stored.
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and b.metric(
        "overflowd_peer_push_skipped_total", peer="a", reason="echo"
    ) < len(ids):
        time.sleep(0.1)
    assert b.metric("overflowd_peer_push_skipped_total", peer="a", reason="echo") >= len(ids)
    with a.store() as s:
        assert {i: [(x.channel, x.count) for x in v] for i, v in s.arrivals(ids).items()} == {
            i: [("local", 1)] for i in ids
        }
    assert a.metric("overflowd_peer_inbox_requests_total") == 0


def _post_as(sender: NodeIdentity, node: Node, body: bytes) -> httpx.Response:
    msg_id = peering.message_id(body, node.identity.public_key)
    headers = wh.sign(msg_id, int(time.time()), body, sender.sign)
    headers[peering.HEADER_PEER] = sender.public_key_b64
    return httpx.post(node.url + "v1/inbox", content=body, headers=headers, timeout=10)


def _forge(cose: bytes) -> bytes:
    return cose[:-1] + bytes([cose[-1] ^ 1])  # the signature's last byte


def test_a_forged_item_is_refused_alone_and_the_hop_limit_stops_forwarding(
    nodes: dict[str, Node],
) -> None:
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    far, forged, near = _fresh(3, salt=1)
    body = peering.encode_inbox([(far.cose, 2), (_forge(forged.cose), 1), (near.cose, 1)])
    answer = _post_as(a.identity, b, body)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {
        "accepted": 2, "duplicates": 0, "refused": [{"index": 1, "reason": "forged"}]
    }  # fmt: skip
    assert b.metric("overflowd_peer_events_total", peer="a", event="forged") == 1
    _wait_stored(c, [near.report_id])  # one hop from A, two at C: within the limit
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and not b.metric(
        "overflowd_peer_push_skipped_total", peer="c", reason="hop_limit"
    ):
        time.sleep(0.1)
    assert b.metric("overflowd_peer_push_skipped_total", peer="c", reason="hop_limit") == 1
    with c.store() as s:
        assert s.get_report(far.report_id) is None  # 2 hops at B: a third would pass the limit
    with b.store() as s:
        assert s.get_report(far.report_id).hops == 2  # type: ignore[union-attr]
        assert s.get_report(rpt.report_id(_forge(forged.cose))) is None
    # The same body again: all duplicates now (the forged one still refused), stored once.
    again = _post_as(a.identity, b, body)
    assert again.json()["duplicates"] == 2 and again.json()["accepted"] == 0
    with b.store() as s:
        assert [x.count for x in s.arrivals([near.report_id])[near.report_id]] == [2]
    # A key that is not a peer, a signature by the wrong key, a replayed timestamp: refused.
    assert _post_as(OBSERVER, b, body).status_code == 401
    to_b = peering.message_id(body, b.identity.public_key)
    headers = wh.sign(to_b, int(time.time()), body, OBSERVER.sign)
    headers[peering.HEADER_PEER] = a.identity.public_key_b64
    assert httpx.post(b.url + "v1/inbox", content=body, headers=headers).status_code == 401
    old = wh.sign(to_b, int(time.time()) - 3600, body, a.identity.sign)
    old[peering.HEADER_PEER] = a.identity.public_key_b64
    assert httpx.post(b.url + "v1/inbox", content=body, headers=old).status_code == 401
    assert b.metric("overflowd_peer_events_total", event="replay") == 1
    # Over the body cap (peering.inbox_max_body_bytes, 2 MB): 413 before anything is parsed.
    huge = b" " * (PeeringSettings().inbox_max_body_bytes + 1)
    assert _post_as(a.identity, b, huge).status_code == 413
    assert b.metric("overflowd_peer_events_total", event="oversized") == 1
    assert b.metric("overflowd_peer_events_total", event="unknown") == 1


def test_a_report_by_udp_and_by_push_is_stored_once_with_both_arrivals(
    nodes: dict[str, Node],
) -> None:
    a, b = nodes["a"], nodes["b"]
    (report,) = _fresh(1, salt=2)
    # From A first (had it come by UDP first, B would push it to A, and A, which then has it
    # from B, would never echo it back), then the same report in band.
    _seed(a, [report])
    _wait_stored(b, [report.report_id])
    with b.store() as s:
        before = s.count_reports()
        assert s.get_report(report.report_id).hops == 1  # type: ignore[union-attr]
    assert b.inband is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(datagram.to_wire(report.cose), b.inband)
    deadline = time.monotonic() + TIMEOUT_S
    channels: dict[str, int] = {}
    while time.monotonic() < deadline and len(channels) < 2:
        with b.store() as s:
            channels = {
                x.channel: x.count for x in s.arrivals([report.report_id])[report.report_id]
            }
        time.sleep(0.1)
    assert channels == {"udp": 1, peer_channel(a.identity.public_key): 1}
    with b.store() as s:
        assert s.count_reports() == before  # stored once
        assert s.get_report(report.report_id).hops == 0  # type: ignore[union-attr]  # fewest


def test_over_budget_is_429_with_retry_after_and_the_outbox_delivers_later(
    nodes: dict[str, Node],
) -> None:
    a, b = nodes["a"], nodes["b"]
    flood = _fresh(100, salt=3)
    first = _post_as(a.identity, b, peering.encode_inbox([(r.cose, 1) for r in flood]))
    assert first.status_code == 200 and first.json()["accepted"] == 100
    (extra,) = _fresh(1, salt=4)
    refused = _post_as(a.identity, b, peering.encode_inbox([(extra.cose, 1)]))
    assert refused.status_code == 429
    # 60 or more reports of debt at 20/s: three seconds or a little more
    assert 3 <= int(refused.headers["retry-after"]) <= 6
    assert b.metric("overflowd_peer_events_total", peer="a", event="over_budget") >= 1
    # A's own pushes meet the same spent budget: held, then delivered.
    later = _fresh(5, salt=5)
    _seed(a, later)
    _wait_stored(b, [r.report_id for r in later])
    assert a.metric("overflowd_peer_push_posts_total", peer="b", outcome="slow-down") >= 1


def test_b_down_then_up_loses_nothing(nodes: dict[str, Node]) -> None:
    a, b, c = nodes["a"], nodes["b"], nodes["c"]
    b.stop()
    during = _fresh(10, salt=6)
    _seed(a, during)
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline and not a.metric(
        "overflowd_peer_push_posts_total", peer="b", outcome="network"
    ):
        time.sleep(0.1)
    assert a.metric("overflowd_peer_push_posts_total", peer="b", outcome="network") >= 1
    b.start()
    ids = [r.report_id for r in during]
    _wait_stored(b, ids)
    _wait_stored(c, ids)
    with c.store() as s:
        assert all(len(s.arrivals([i])[i]) == 1 for i in ids)


def test_peer_metric_families_are_documented(tmp_path: Path) -> None:
    from overflowd.services.api_peers import PeerEvents, PeerInbox
    from overflowd.services.peer_push import PeerPush, peer_metrics

    section = (
        (Path(__file__).resolve().parents[2] / "docs" / "daemon.md")
        .read_text(encoding="utf-8")
        .split("## What the metrics say", 1)[1]
    )
    events = PeerEvents()
    events.note("p", "forged")
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        push = PeerPush(NodeIdentity.generate(), store, (), PeeringSettings())
        inbox = PeerInbox(store, (), node_key=bytes(32))
        families = list(peer_metrics(push, inbox, events))
    assert len(families) >= 10
    for m in families:
        name = m.name + ("_total" if m.type == "counter" else "")
        assert re.search(rf"`{name}[`{{]", section), f"{name} is not in daemon.md"
