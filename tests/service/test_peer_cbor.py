"""CBOR between peers (docs/peers.md): the lean pull page and CBOR inbox bodies, through the
node API on loopback (a real hypercorn server over a real SQLite store), and the JSON both
keep for people and older peers."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
import trio

from overflowd.config import ApiSettings
from overflowd.identity import NodeIdentity
from overflowd.peers import PeeringSettings, PeerSettings
from overflowd.services.api import ApiContext, ApiService
from overflowd.services.api_peers import PeerInbox
from overflowd.services.peer_pull import PeerPull, default_client
from overflowd.services.peer_push import PeerPush
from overflowd.store import Store, outbox
from overflowd.store import peers as peer_store
from overflowd.wire import peering
from overflowd.wire import webhook as wh
from tests.support.reports import make_payload

TIMEOUT_S = 60
OBSERVER = NodeIdentity(seed=bytes(range(40, 72)))
A, B = NodeIdentity(seed=b"\x31" * 32), NodeIdentity(seed=b"\x32" * 32)


def _now_ms() -> int:
    return int(time.time() * 1000)


async def _serving(store: Store, inbox: PeerInbox | None = None) -> AsyncIterator[str]:
    ctx = ApiContext(identity=A, contacts=(), observation_point="", store=store, inbox=inbox)
    api = ApiService(ApiSettings(listen="127.0.0.1:0"), ctx)
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(api.run)
        try:
            yield f"http://{host}:{port}/"
        finally:
            api.stop()


async def test_the_lean_page_carries_seq_cose_hops_and_the_pull_keeps_hops(
    tmp_path: Path,
) -> None:
    """A serves its reports (some relayed, with hops) as a CBOR page to a peer that asks for
    it, JSON to anyone else; B pulls the CBOR pages and stores each report with one hop more
    than A had, the cursor at A's last number."""
    t = _now_ms()
    reports = [OBSERVER.sign_report(make_payload(dst=f"192.0.2.{i}", time_ms=t)) for i in range(9)]
    hops = {r.report_id: i % 3 for i, r in enumerate(reports)}
    with (
        Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store_a,
        Store.open(f"sqlite:///{tmp_path / 'b.db'}") as store_b,
    ):
        store_a.add_reports([(r, t, "import") for r in reports], hops=hops)
        with trio.fail_after(TIMEOUT_S):
            async for url in _serving(store_a):
                async with httpx.AsyncClient() as client:
                    lean = await client.get(
                        f"{url}v1/reports?after=0&limit=4", headers={"accept": peering.CBOR}
                    )
                    people = await client.get(f"{url}v1/reports?after=0&limit=4")
                assert lean.headers["content-type"] == peering.CBOR
                page = peering.decode_page(lean.content, max_body_bytes=10**6, max_reports=4)
                assert page.bad == () and page.next == page.items[-1].seq
                assert [(i.cose, i.hops) for i in page.items] == [
                    (r.cose, hops[r.report_id]) for r in reports[:4]
                ]
                # JSON, as before, now with hops; several times the lean page's bytes
                assert people.headers["content-type"].startswith("application/json")
                doc = people.json()
                assert [e["hops"] for e in doc["reports"]] == [0, 1, 2, 0]
                assert len(people.content) > 2 * len(lean.content)

                peer = PeerSettings(name="a", url=url, key=A.public_key)
                peer_store.ensure_peer(store_b, peer.key, name="a", url=url, now_ms=t)
                pull = PeerPull([peer], PeeringSettings(pull_page_reports=4), store_b)
                async with default_client(pull.peering) as pclient:
                    assert await pull.pull_round(pclient, peer)
        s = pull.statistics().peers["a"]
        assert (s.stored, s.duplicates, s.pages, s.cursor) == (9, 0, 3, 9)
        for r in reports:
            held = store_b.get_report(r.report_id)
            assert held is not None and held.hops == hops[r.report_id] + 1


def _signed(body: bytes, content_type: str) -> dict[str, str]:
    headers = wh.sign(peering.message_id(body, A.public_key), int(time.time()), body, B.signer())
    headers[peering.HEADER_PEER] = base64.b64encode(B.public_key).decode()
    headers["content-type"] = content_type
    return headers


@pytest.mark.parametrize("content_type", [peering.CBOR, peering.CONTENT_TYPE])
async def test_the_inbox_reads_cbor_and_json_and_the_signature_covers_the_bytes(
    tmp_path: Path, content_type: str
) -> None:
    t = _now_ms()
    reports = [
        OBSERVER.sign_report(make_payload(dst=f"198.51.100.{i}", time_ms=t)) for i in range(3)
    ]
    body = peering.encode_inbox([(r.cose, 2) for r in reports], content_type=content_type)
    peer = PeerSettings(name="b", url="http://127.0.0.1:9/", key=B.public_key)
    with Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store_a, trio.fail_after(TIMEOUT_S):
        inbox = PeerInbox(store_a, [peer], node_key=A.public_key)
        async for url in _serving(store_a, inbox):
            async with httpx.AsyncClient() as client:
                post = f"{url}v1/inbox"
                other = peering.CONTENT_TYPE if content_type == peering.CBOR else peering.CBOR
                # The same bytes labelled as the other encoding do not parse: refused whole
                wrong = await client.post(post, content=body, headers=_signed(body, other))
                unknown = await client.post(post, content=body, headers=_signed(body, "text/x"))
                # One byte changed (its id made for it): the signature covers the exact bytes
                tampered = body[:-1] + bytes([body[-1] ^ 1])
                headers = _signed(body, content_type)
                headers.update(
                    {
                        k: v
                        for k, v in wh.sign(
                            peering.message_id(tampered, A.public_key),
                            int(headers[wh.HEADER_TIMESTAMP]),
                            body,
                            B.signer(),
                        ).items()
                    }
                )
                forged = await client.post(post, content=tampered, headers=headers)
                ok = await client.post(post, content=body, headers=_signed(body, content_type))
        assert (wrong.status_code, unknown.status_code, forged.status_code) == (400, 415, 401)
        assert ok.status_code == 200, ok.text
        assert ok.json() == {"accepted": 3, "duplicates": 0, "refused": []}
        for r in reports:
            held = store_a.get_report(r.report_id)
            assert held is not None and held.hops == 2 and held.via == "gossip"


class _OldInbox(BaseHTTPRequestHandler):
    """An inbox of a node from before CBOR: it reads JSON bodies only (400 otherwise)."""

    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        self.seen.append(self.headers.get("content-type", ""))
        try:
            batch = peering.decode_inbox(body)
        except peering.InboxDecodeError as exc:
            status, answer = 400, json.dumps({"detail": exc.reason}).encode()
        else:
            status = 200
            answer = peering.encode_answer(peering.InboxAnswer(batch.total, 0, ()))
        self.send_response(status)
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_the_sender_falls_back_to_json_for_an_inbox_that_reads_only_json(
    tmp_path: Path,
) -> None:
    """A pushes CBOR; an older peer answers 400; A sends the same reports again at once as
    JSON, and every one is delivered (none dead, no attempt spent)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OldInbox)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _OldInbox.seen.clear()
    t = _now_ms()
    reports = [
        OBSERVER.sign_report(make_payload(dst=f"203.0.113.{i}", time_ms=t)) for i in range(5)
    ]
    peer = PeerSettings(
        name="old", url=f"http://127.0.0.1:{server.server_address[1]}/", key=B.public_key
    )
    try:
        with Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store_a:
            store_a.add_reports([(r, t, "local") for r in reports])
            push = PeerPush(A, store_a, [peer], PeeringSettings())
            with trio.fail_after(TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    await nursery.start(push.run)
                    while push.statistics().peers["old"]["delivered"] < len(reports):
                        await trio.sleep(0.05)
                    nursery.cancel_scope.cancel()
            counts = outbox.counts(store_a)
    finally:
        server.shutdown()
        server.server_close()
    assert _OldInbox.seen[0] == peering.CBOR and _OldInbox.seen[1:] == [peering.CONTENT_TYPE]
    assert counts.get(outbox.DEAD, 0) == 0 and counts.get(outbox.DELIVERED) == len(reports)
