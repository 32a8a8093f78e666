"""Review of the peer code as a hostile peer would attack it (review-peers, this session).

Each test is one finding: it failed on main at 3a09f5e and passes with the fix beside it.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import httpx
import trio

from overflowd.config import ApiSettings
from overflowd.identity import NodeIdentity
from overflowd.peers import PeeringSettings, PeerSettings
from overflowd.services.api import ApiContext, ApiService
from overflowd.services.api_peers import PeerInbox
from overflowd.services.api_subscriptions import SubscriptionDesk
from overflowd.services.peer_policy import PeerPolicy
from overflowd.services.peer_push import PeerPush
from overflowd.store import Store
from overflowd.wire import peering
from tests.support.reports import make_payload

TIMEOUT_S = 20.0
HONEST = NodeIdentity(seed=b"\x61" * 32)  # A: pushes to B and to C
HOSTILE = NodeIdentity(seed=b"\x62" * 32)  # B: a peer of A, hostile to A
VICTIM_NODE = NodeIdentity(seed=b"\x63" * 32)  # C: A's other peer
OBSERVER = NodeIdentity(seed=b"\x64" * 32)


class _Clock:
    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


async def _capture_one_push(store_a: Store) -> tuple[dict[str, str], bytes]:
    """Run A's real PeerPush towards B (a loopback socket that records what it is sent and
    answers like an inbox) and return the first request A made for B."""
    got: list[tuple[dict[str, str], bytes]] = []
    done = trio.Event()

    async def inbox_b(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += await stream.receive_some(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")[1:]
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
        while len(body) < int(headers["content-length"]):
            body += await stream.receive_some(65536)
        n = len(peering.decode_inbox(body, content_type=headers["content-type"]).items)
        answer = peering.encode_answer(peering.InboxAnswer(accepted=n, duplicates=0))
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(answer)}\r\nconnection: close\r\n\r\n".encode()
            + answer
        )
        got.append((headers, body))
        done.set()

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(
            functools.partial(trio.serve_tcp, inbox_b, 0, host="127.0.0.1")
        )
        port = listener.socket.getsockname()[1]
        b = PeerSettings("b", f"http://127.0.0.1:{port}/", HOSTILE.public_key)
        push = PeerPush(HONEST, store_a, [b], PeeringSettings())
        nursery.start_soon(push.run)
        await done.wait()
        nursery.cancel_scope.cancel()
    return got[0]


def test_a_request_a_peer_made_for_b_cannot_be_replayed_to_c(tmp_path: Path) -> None:
    """B, a hostile peer of A, takes a push A made for B and sends it to C, A's other peer.

    Standard Webhooks signs id, time and body, nothing that names the recipient, so on main C
    took it as A's (stored it as an arrival from A, spending A's inbound budget), and the same
    bytes sent to C after the 300 s window were judged as A's *replays*: ten of them and C
    banned the honest A. B needs no position on the path, only A's pushes to itself.
    """
    now = int(time.time() * 1000)
    report = OBSERVER.sign_report(make_payload(packets=7, time_ms=now))
    with (
        Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store_a,
        Store.open(f"sqlite:///{tmp_path / 'c.db'}") as store_c,
    ):
        store_a.add_reports([(report, now, "import")])

        async def main() -> None:
            with trio.fail_after(TIMEOUT_S):
                headers, body = await _capture_one_push(store_a)
                peers = [
                    PeerSettings("a", "http://127.0.0.1:9/", HONEST.public_key, push=False),
                    PeerSettings("b", "http://127.0.0.1:9/", HOSTILE.public_key, push=False),
                ]
                clock = _Clock()
                policy = PeerPolicy(store_c, peers, wall_clock=clock)
                inbox = PeerInbox(
                    store_c,
                    peers,
                    node_key=VICTIM_NODE.public_key,
                    policy=policy,
                    wall_clock=clock,
                )
                ctx = ApiContext(
                    identity=VICTIM_NODE,
                    contacts=(),
                    observation_point="",
                    store=store_c,
                    inbox=inbox,
                )
                api = ApiService(ApiSettings(listen="127.0.0.1:0"), ctx)
                async with trio.open_nursery() as nursery:
                    host, port = await nursery.start(api.run)
                    url = f"http://{host}:{port}/v1/inbox"
                    keep = {k: v for k, v in headers.items() if k.startswith("webhook-")}
                    keep[peering.HEADER_PEER] = headers[peering.HEADER_PEER]
                    keep["content-type"] = headers["content-type"]
                    async with httpx.AsyncClient() as client:
                        # In the window: C must not take B's copy as A's.
                        r = await client.post(url, content=body, headers=keep, timeout=10)
                        assert r.status_code != 200, r.text
                        # After the window: not A's replay, so A's score must not move.
                        clock.offset_s = 3600.0
                        for _ in range(12):
                            await client.post(url, content=body, headers=keep, timeout=10)
                    api.stop()
                assert store_c.get_report(report.report_id) is None
                assert not policy.banned(HONEST.public_key)
                assert policy.statistics().scores["a"] == 0.0

        trio.run(main)


def test_a_stranger_with_a_header_given_twice_gets_400_not_500_from_subscriptions(
    tmp_path: Path,
) -> None:
    """``/v1/subscriptions`` normalised the headers outside its try: a ``webhook-id`` given
    twice raised out of the route (500, and a traceback in the log per request) for anyone."""
    with Store.open(f"sqlite:///{tmp_path / 'c.db'}") as store:
        peers = [PeerSettings("a", "http://127.0.0.1:9/", HONEST.public_key, push=False)]
        desk = SubscriptionDesk(store, peers, None, node_key=VICTIM_NODE.public_key)
        ctx = ApiContext(
            identity=VICTIM_NODE, contacts=(), observation_point="", store=store, subscriptions=desk
        )
        api = ApiService(ApiSettings(listen="127.0.0.1:0"), ctx)

        async def main() -> None:
            with trio.fail_after(TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    host, port = await nursery.start(api.run)
                    url = f"http://{host}:{port}/v1/subscriptions"
                    headers = [("webhook-id", "x"), ("webhook-id", "y")]
                    async with httpx.AsyncClient() as client:
                        for method in ("POST", "GET"):
                            r = await client.request(
                                method, url, content=b"{}", headers=headers, timeout=10
                            )
                            assert r.status_code == 400, (method, r.status_code, r.text)
                    api.stop()

        trio.run(main)


def test_a_peer_whose_url_the_operator_changed_still_gets_what_was_queued_for_it(
    tmp_path: Path,
) -> None:
    """B is down; A queues a report for B's inbox; the operator moves B (a new ``url``, same
    key) and restarts A. The outbox rows are keyed by URL and the push cursor had passed the
    report, so on main the report sat at the old URL for ever: lost for B."""
    now = int(time.time() * 1000)
    report = OBSERVER.sign_report(make_payload(packets=9, time_ms=now))
    with Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store_a:
        store_a.add_reports([(report, now, "import")])

        async def main() -> None:
            with trio.fail_after(TIMEOUT_S):
                # 1. B at a port nothing listens on: the report is queued, not delivered.
                with trio.socket.socket() as sock:
                    await sock.bind(("127.0.0.1", 0))
                    dead_port = sock.getsockname()[1]
                old = PeerSettings("b", f"http://127.0.0.1:{dead_port}/", HOSTILE.public_key)
                push = PeerPush(HONEST, store_a, [old], PeeringSettings())
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(push.run)
                    while push.statistics().peers["b"]["enqueued"] < 1:
                        await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
            # 2. B moved; A restarted: B must get the report at its new URL.
            with trio.move_on_after(10):
                _headers, body = await _capture_one_push(store_a)
                items = peering.decode_inbox(body, content_type=_headers["content-type"]).items
                assert report.cose in [i.cose for i in items]
                return
            raise AssertionError("the report queued for B's old URL never reached B")

        trio.run(main)
