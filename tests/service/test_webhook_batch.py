"""Webhook batching (#9): a burst of reports reaches the receiver whole, in few POSTs.

The finding: 30 flows toward one address produced 1 webhook for 31 reports; webhooks shared
the in-band per-prefix budget, and what it refused was never queued. Here a real node
(NodeService, NetFlow v9 on its collector socket, its own WebhookDelivery) and a real
``overflowd-receive`` process on 127.0.0.1: all 30 reports arrive, in fewer POSTs than
reports, each written once, and the in-band Budget is charged by in-band sending alone.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from overflowd.config import Settings
from overflowd.identity import NodeIdentity
from overflowd.notify import (
    WEBHOOK_DROP_REASONS,
    BudgetSettings,
    InbandSettings,
    WebhookSettings,
)
from overflowd.receiver import KeyCaps, batch_id
from overflowd.services import webhook as svc
from overflowd.services.metrics import node_metrics
from overflowd.services.node import NodeService
from overflowd.services.receive_http import JsonLinesSink, ReceiverLimits, WebhookReceiver
from overflowd.store import Store
from overflowd.store import outbox as ob
from tests.service.test_node_hardening import v9_one_record
from tests.service.test_receiver import lines, start_receiver, stop
from tests.service.test_webhook_delivery import Scripted, carried, enqueue_reports, serve_app

TIMEOUT_S = 60
FLOWS = 30


def _metric(text: str, name: str) -> int:
    m = re.search(rf"^{re.escape(name)} (\d+)$", text, re.M)
    assert m is not None, name
    return int(m.group(1))


def _node_settings(hook: str, inband_port: int) -> Settings:
    return dataclasses.replace(
        Settings(),
        # In band to loopback only (a socket of the test's that nobody reads), at the in-band
        # budget's defaults: 1/s per /24, burst 10.
        inband=InbandSettings(port=inband_port, allowed_prefixes=("127.0.0.0/8",)),
        budget=BudgetSettings(),
        webhook=WebhookSettings(
            targets=(("127.0.0.0/8", hook),),
            allow_prefixes=("127.0.0.0/8",),
            require_https=False,
            poll_interval_s=0.2,
        ),
    )


async def test_thirty_flows_toward_one_address_reach_the_receiver_batched(
    tmp_path: Path,
) -> None:
    identity = NodeIdentity.generate()
    out = tmp_path / "received.jsonl"
    receiver, base = start_receiver(out, "--trust", identity.public_key_b64)
    inbox = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inbox.bind(("127.0.0.1", 0))
    try:
        settings = _node_settings(base + "/hook", inbox.getsockname()[1])
        with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
            node = NodeService(
                identity,
                settings,
                store,
                listen=["127.0.0.1:0"],
                inband_listen="127.0.0.1:0",
                rate=1.0,
            )
            with trio.fail_after(TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    bound = await nursery.start(node.run)
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                        for i in range(FLOWS):  # 30 flows toward 127.0.0.1, in one burst
                            udp.sendto(
                                v9_one_record("127.0.0.2", "127.0.0.1", 1, sport=1000 + i),
                                bound[0],
                            )
                    while len(lines(out)) < FLOWS:
                        await trio.sleep(0.05)
                    while node.statistics().webhook.delivered < FLOWS:  # type: ignore[union-attr]
                        await trio.sleep(0.05)
                    node.stop()
            stats = node.statistics()
            stored = {r.report_id for r in store.query_reports(limit=100)}
        metrics = httpx.get(base + "/metrics", timeout=10).text
    finally:
        inbox.close()
        assert stop(receiver) == 0
    written = [str(w["id"]) for w in lines(out)]
    assert len(written) == FLOWS and set(written) == stored  # all 30, each once
    assert _metric(metrics, "overflowd_receiver_accepted_total") == FLOWS
    posts = _metric(metrics, "overflowd_receiver_requests_total") - 1  # minus this GET
    assert 1 <= posts < FLOWS, posts  # batched: fewer POSTs than reports
    assert _metric(metrics, "overflowd_receiver_batches_total") >= 1
    w = stats.webhook
    assert w is not None
    assert w.delivered == FLOWS and w.posts == posts and w.batched_reports >= 2
    assert w.dropped["duplicate"] == 0 and sum(w.dropped.values()) == 0
    # The in-band budget is in-band sending's alone: it decided exactly the 60 in-band
    # candidates (each report to 127.0.0.2 and 127.0.0.1, one /24: its burst of 10, then 1/s),
    # every token it gave went to a datagram, and webhooks asked it nothing.
    sender = stats.inband_sender
    assert sender is not None
    budget = node.budget.statistics()
    assert budget.allowed == sender.datagrams_sent >= 10
    assert budget.allowed + sum(budget.dropped.values()) == 2 * FLOWS
    assert budget.allowed + budget.dropped["prefix_budget"] == 2 * FLOWS
    # ... and the metrics say so.
    exported = {m.name: m.samples for m in node_metrics(stats)}
    assert exported["overflowd_webhook_posts"][0].value == posts
    assert exported["overflowd_webhook_batched_reports"][0].value == w.batched_reports
    assert exported["overflowd_webhook_deferred"][0].value == 0
    dropped = {x.labels["reason"]: x.value for x in exported["overflowd_webhook_dropped"]}
    assert dropped == {reason: 0 for reason in WEBHOOK_DROP_REASONS}


# -- the per-endpoint POST budget batches what it holds back ----------------------------------


async def test_what_the_post_budget_holds_back_goes_in_the_next_post(tmp_path: Path) -> None:
    identity = NodeIdentity(seed=bytes(range(32)))
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = Scripted(identity.public_key, [])
            url = await serve_app(nursery, app) + "/hook"
            settings = WebhookSettings(
                allow_prefixes=("127.0.0.0/8",),
                require_https=False,
                poll_interval_s=0.05,
                endpoint_posts_per_s=2.0,
                endpoint_posts_burst=1,
                max_batch_reports=50,
            )
            delivery = svc.WebhookDelivery(store, identity, settings)
            await nursery.start(delivery.run)
            ids: list[str] = []
            # One report every 50 ms for 2 s: 40 reports, while the budget allows a POST per
            # 0.5 s: each POST carries what came due since the last one.
            for _ in range(40):
                ids += await trio.to_thread.run_sync(enqueue_reports, store, identity, url, 1)
                delivery.wake()
                await trio.sleep(0.05)
            while delivery.statistics().delivered < 40:
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    got = [i for s in app.seen for i in carried(s.body)]
    assert sorted(got) == sorted(ids) and len(set(got)) == 40
    # 2 s or more of enqueueing at 2 POSTs/s with a burst of 1: about 5 POSTs, never one per
    # report (a loaded machine stretches the 2 s: a few POSTs more).
    assert 3 <= len(app.seen) <= 12, len(app.seen)
    gaps = [b.at - a.at for a, b in zip(app.seen, app.seen[1:], strict=False)]
    # The budget: one POST per 0.5 s, as sent; seen at the receiver, with loopback jitter.
    assert min(gaps) >= 0.25, gaps
    for s in app.seen:
        one = carried(s.body)
        assert s.headers["webhook-id"] == (one[0] if len(one) == 1 else batch_id(one))
    stats = delivery.statistics()
    assert stats.posts == len(app.seen) and stats.batched_reports >= 30


async def test_batch_body_cap_splits_into_several_posts(tmp_path: Path) -> None:
    identity = NodeIdentity(seed=bytes(range(32)))
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = Scripted(identity.public_key, [])
            url = await serve_app(nursery, app) + "/hook"
            ids = enqueue_reports(store, identity, url, 25)
            settings = WebhookSettings(
                allow_prefixes=("127.0.0.0/8",),
                require_https=False,
                poll_interval_s=0.05,
                endpoint_posts_per_s=100.0,
                max_batch_reports=10,
                max_batch_bytes=8192,
            )
            counts = await svc.WebhookDelivery(store, identity, settings).drain(timeout_s=30)
            nursery.cancel_scope.cancel()
    assert counts["delivered"] == 25
    assert sorted(i for s in app.seen for i in carried(s.body)) == sorted(ids)
    assert all(len(s.body) <= 8192 for s in app.seen)
    assert all(len(carried(s.body)) <= 10 for s in app.seen)
    assert len(app.seen) >= 25 * 1300 // 8192  # each report's JSON is ~1.3 KiB
    # Rows left out of a POST by the caps went back unsent: one attempt per row.
    assert {e.attempts for e in ob.entries(store)} == {1}


async def test_a_batch_refused_by_a_single_form_receiver_is_sent_one_by_one(
    tmp_path: Path,
) -> None:
    """A receiver built on verify_delivery alone answers 400 to a batch: its rows go back
    unsent and the URL gets one report per POST from then on (nothing dies of it)."""
    identity = NodeIdentity(seed=bytes(range(32)))

    @dataclasses.dataclass
    class SingleOnly(Scripted):
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                body = b""
                while True:
                    m = await receive()
                    body += m.get("body", b"")
                    if not m.get("more_body"):
                        break
                if b'"reports"' in body[:12]:
                    await send({"type": "http.response.start", "status": 400, "headers": []})
                    await send({"type": "http.response.body", "body": b"one report please"})
                    return

                async def again() -> dict[str, Any]:
                    return {"type": "http.request", "body": body, "more_body": False}

                await super().__call__(scope, again, send)
                return
            await super().__call__(scope, receive, send)

    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = SingleOnly(identity.public_key, [])
            url = await serve_app(nursery, app) + "/hook"
            ids = enqueue_reports(store, identity, url, 4)
            settings = WebhookSettings(
                allow_prefixes=("127.0.0.0/8",),
                require_https=False,
                poll_interval_s=0.05,
                endpoint_posts_per_s=100.0,
            )
            delivery = svc.WebhookDelivery(store, identity, settings)
            counts = await delivery.drain(timeout_s=30)
            nursery.cancel_scope.cancel()
    assert counts == {"pending": 0, "delivered": 4, "dead": 0}
    assert sorted(i for s in app.seen for i in carried(s.body)) == sorted(ids)
    assert delivery.statistics().batches_refused == 1
    assert {e.attempts for e in ob.entries(store)} == {1}  # the refused batch cost none


# -- the receiver's per-key caps count every report of a batch; the sender gets there --------


async def test_key_caps_admit_part_of_a_batch_and_the_retry_brings_the_rest(
    tmp_path: Path,
) -> None:
    identity = NodeIdentity(seed=bytes(range(32)))
    out = tmp_path / "out.jsonl"
    sink = JsonLinesSink(str(out))
    # No trust list: the key's caps apply, a burst of 8 reports at 20/s.
    limits = ReceiverLimits(keys=KeyCaps(rate_per_s=20.0, burst=8))
    receiver = WebhookReceiver(sink, limits=limits)
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(functools.partial(receiver.run, ("127.0.0.1", 0)))
            ids = enqueue_reports(store, identity, f"http://{host}:{port}/", 20)
            settings = WebhookSettings(
                allow_prefixes=("127.0.0.0/8",),
                require_https=False,
                poll_interval_s=0.05,
                backoff_base_s=0.05,
                backoff_cap_s=0.2,
                endpoint_posts_per_s=100.0,
            )
            delivery = svc.WebhookDelivery(store, identity, settings)
            counts = await delivery.drain(timeout_s=30)
            nursery.cancel_scope.cancel()
    sink.close()
    assert counts == {"pending": 0, "delivered": 20, "dead": 0}
    written = [w["id"] for w in lines(out)]
    assert sorted(written) == sorted(ids)  # each once
    r = receiver.statistics()
    assert r.accepted == 20 and r.rejected["key_rate"] >= 1 and r.batches >= 2
    d = delivery.statistics()
    assert d.slowed_down >= 1
    # The 429 said when the rest would fit (a burst), so it took few attempts, not 12.
    assert max(e.attempts for e in ob.entries(store)) <= 3


async def test_batch_answer_is_json_counts(tmp_path: Path) -> None:
    identity = NodeIdentity(seed=bytes(range(32)))
    out = tmp_path / "out.jsonl"
    sink = JsonLinesSink(str(out))
    receiver = WebhookReceiver(sink, trusted_keys={identity.public_key})
    reports = [identity.sign_report(make()) for make in [_payload] * 3]
    from overflowd.receiver import encode_batch_body
    from overflowd.wire import webhook as wh

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(functools.partial(receiver.run, ("127.0.0.1", 0)))
            async with httpx.AsyncClient() as client:

                async def post(batch: list[Any]) -> httpx.Response:
                    body = encode_batch_body(batch)
                    msg_id = batch_id([r.report_id for r in batch])
                    headers = wh.sign(msg_id, int(time.time()), body, identity.sign)
                    return await client.post(
                        f"http://{host}:{port}/", content=body, headers=headers
                    )

                first = await post(reports[:2])
                again = await post(reports)
            nursery.cancel_scope.cancel()
    sink.close()
    assert first.status_code == 200 and json.loads(first.content) == {
        "accepted": 2,
        "duplicates": 0,
    }
    assert again.status_code == 200 and json.loads(again.content) == {
        "accepted": 1,
        "duplicates": 2,
    }
    assert sorted(w["id"] for w in lines(out)) == sorted(r.report_id for r in reports)
    s = receiver.statistics()
    assert s.accepted == 3 and s.duplicates == 2 and s.batches == 2


def _payload() -> Any:
    from tests.support.reports import make_payload

    return make_payload()


@pytest.mark.parametrize("n", [1, 2])
async def test_outbox_full_is_a_counted_shed(tmp_path: Path, n: int) -> None:
    """Past max_pending_per_url pending rows, the node sheds new deliveries by policy: counted
    (outbox_full) and warned, the reports themselves stored."""
    identity = NodeIdentity.generate()
    hook = "http://127.0.0.1:9/hook"  # nobody serves it: the rows stay pending
    settings = dataclasses.replace(
        Settings(),
        inband=InbandSettings(enabled=False),
        webhook=WebhookSettings(
            targets=(("127.0.0.0/8", hook),),
            allow_prefixes=("127.0.0.0/8",),
            require_https=False,
            max_pending_per_url=5 * n,
        ),
    )
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        node = NodeService(identity, settings, store, listen=["127.0.0.1:0"], rate=1.0)
        assert node.webhook is not None
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(node.run)
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                    for i in range(12):
                        udp.sendto(v9_one_record("127.0.0.2", "127.0.0.1", 1, sport=i), bound[0])
                while node.statistics().reports_stored < 12:
                    await trio.sleep(0.05)
                node.stop()
        stats = node.statistics()
        assert ob.counts(store)["pending"] == 5 * n
    assert stats.webhook is not None
    assert stats.webhook.dropped["outbox_full"] == 12 - 5 * n


# -- a failing endpoint is one warning per 5 minutes, and secrets reach the signature -----------


async def test_a_failing_endpoint_is_warned_of_once_per_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    identity = NodeIdentity(seed=bytes(range(32)))
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = Scripted(identity.public_key, [], default=500)
            url = await serve_app(nursery, app) + "/broken"
            enqueue_reports(store, identity, url, 3)
            settings = WebhookSettings(
                allow_prefixes=("127.0.0.0/8",),
                require_https=False,
                poll_interval_s=0.05,
                backoff_base_s=0.05,
                backoff_cap_s=0.1,
                max_attempts=4,
                endpoint_posts_per_s=100.0,
            )
            delivery = svc.WebhookDelivery(store, identity, settings)
            counts = await delivery.drain(timeout_s=30)
            nursery.cancel_scope.cancel()
    assert counts["dead"] == 3 and len(app.seen) == 4  # four POSTs of the three rows
    failing = [r for r in caplog.records if "webhook.endpoint_failing" in r.getMessage()]
    assert len(failing) == 1  # one line per endpoint per FAILING_LOG_INTERVAL_S
    assert url in failing[0].getMessage() and "HTTP 500" in failing[0].getMessage()
    assert svc.FAILING_LOG_INTERVAL_S == 300


async def test_an_endpoint_secret_reaches_the_signature(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """[[webhook.endpoints]] secret → wh.sign(..., secrets=...): a v1 HMAC entry over the same
    content before the v1a entry, which still verifies (Scripted checks it independently)."""
    import base64
    import hashlib
    import hmac

    from overflowd.notify import WebhookEndpoint, parse_secret

    secret = "whsec_" + base64.b64encode(bytes(range(24))).decode()
    identity = NodeIdentity(seed=bytes(range(32)))
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = Scripted(identity.public_key, [])
            url = await serve_app(nursery, app) + "/secret"
            enqueue_reports(store, identity, url, 2)
            settings = WebhookSettings(
                endpoints=(WebhookEndpoint(url=url, prefixes=("127.0.0.0/8",), secret=secret),),
                allow_prefixes=("127.0.0.0/8",),
                require_https=False,
                poll_interval_s=0.05,
            )
            counts = await svc.WebhookDelivery(store, identity, settings).drain(timeout_s=30)
            nursery.cancel_scope.cancel()
    assert counts["delivered"] == 2
    (seen,) = app.seen
    entries = seen.headers["webhook-signature"].split()
    v1 = [e.split(",", 1)[1] for e in entries if e.startswith("v1,")]
    assert entries[-1].startswith("v1a,")
    content = f"{seen.headers['webhook-id']}.{seen.headers['webhook-timestamp']}.".encode()
    mac = hmac.new(parse_secret(secret), content + seen.body, hashlib.sha256).digest()
    assert v1 == [base64.b64encode(mac).decode()]
    assert secret not in caplog.text
