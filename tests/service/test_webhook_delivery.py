"""Webhook delivery through the durable outbox, to servers on 127.0.0.1 only.

Scripted receivers (hypercorn on trio) answer 410, 503 with Retry-After, 400, 500; every request
they see is checked with an independent Ed25519 (``cryptography``). The crash test runs the
sender as a process, kills it with SIGKILL in the middle, restarts it, and counts what the real
``overflowd-receive`` wrote.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypercorn.config import Config
from hypercorn.trio import serve

from overflowd.identity import NodeIdentity, write_identity
from overflowd.receiver import batch_id
from overflowd.services import webhook as svc
from overflowd.services.receive_http import JsonLinesSink, WebhookReceiver
from overflowd.store import Store
from overflowd.store import outbox as ob
from tests.service.test_receiver import lines, start_receiver, stop
from tests.support.reports import make_payload
from tests.support.stores import sqlite_at_head

TIMEOUT_S = 60
LOOPBACK_ONLY = ("127.0.0.0/8",)


def fast(**over: Any) -> svc.WebhookSettings:
    values: dict[str, Any] = {
        "allow_prefixes": LOOPBACK_ONLY,
        "require_https": False,
        "connect_timeout_s": 2.0,
        "io_timeout_s": 2.0,
        "total_timeout_s": 5.0,
        "backoff_base_s": 0.05,
        "backoff_cap_s": 0.2,
        "lease_s": 10.0,
        "poll_interval_s": 0.05,
        # The per-endpoint POST budget is tested on its own (test_webhook_batch.py); here it
        # must not stand in the way of the retry and slot behaviour these tests count.
        "endpoint_posts_per_s": 1000.0,
        "endpoint_posts_burst": 1000,
    }
    values.update(over)
    return svc.WebhookSettings(**values)


def carried(body: bytes) -> list[str]:
    """The report ids one POST carried: its own, or those of a batch ({"reports": [...]})."""
    doc = json.loads(body)
    if "reports" in doc:
        return [r["id"] for r in doc["reports"]]
    return [doc["id"]]


@dataclass
class Seen:
    at: float
    headers: dict[str, str]
    body: bytes
    wall: float = field(default_factory=time.time)


@dataclass
class Scripted:
    """An ASGI receiver that answers from a script and checks each signature independently."""

    public_key: bytes
    script: list[tuple[int, list[tuple[bytes, bytes]]]]
    default: int = 204
    seen: list[Seen] = field(default_factory=list)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                await send({"type": m["type"] + ".complete"})
                if m["type"] == "lifespan.shutdown":
                    return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.seen.append(Seen(time.monotonic(), headers, body))
        # The independent check: the exact Standard Webhooks string, another Ed25519.
        # The v1a entry (an endpoint with a secret also gets v1 HMAC entries before it).
        (v1a,) = [e for e in headers["webhook-signature"].split() if e.startswith("v1a,")]
        sig = base64.b64decode(v1a.split(",", 1)[1])
        content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        Ed25519PublicKey.from_public_bytes(self.public_key).verify(sig, content)
        status, extra = self.script.pop(0) if self.script else (self.default, [])
        await send({"type": "http.response.start", "status": status, "headers": extra})
        await send({"type": "http.response.body", "body": b"scripted"})


async def serve_app(nursery: trio.Nursery, app: Any) -> str:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.5
    binds: list[str] = await nursery.start(functools.partial(serve, app, config))
    return binds[0]


@pytest.fixture(scope="module")
def identity() -> NodeIdentity:
    return NodeIdentity(seed=bytes(range(32)))


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store.open(sqlite_at_head(tmp_path / "node.db")) as s:
        yield s


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as n:
            yield n
            n.cancel_scope.cancel()


def enqueue_reports(store: Store, identity: NodeIdentity, url: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = identity.sign_report(make_payload())
        store.add_report(r, received_ms=int(time.time() * 1000), via="local")
        assert svc.enqueue(store, r, [url]) == 1
        ids.append(r.report_id)
    return ids


async def test_delivers_to_the_real_receiver_exactly_once(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity, tmp_path: Path
) -> None:
    out = tmp_path / "out.jsonl"
    receiver = WebhookReceiver(JsonLinesSink(str(out)), trusted_keys={identity.public_key})
    host, port = await nursery.start(functools.partial(receiver.run, ("127.0.0.1", 0)))
    ids = enqueue_reports(store, identity, f"http://{host}:{port}/hook", 25)
    delivery = svc.WebhookDelivery(store, identity, fast())
    counts = await delivery.drain(timeout_s=30)
    assert counts == {"pending": 0, "delivered": 25, "dead": 0}
    assert sorted(w["id"] for w in lines(out)) == sorted(ids)
    assert delivery.statistics().delivered == 25
    # Re-enqueueing the same report to the same URL is a no-op.
    r = store.get_report(ids[0])
    assert r is not None
    assert svc.enqueue(store, r.signed_report(), [f"http://{host}:{port}/hook"]) == 0


async def test_run_service_delivers_what_is_enqueued_later(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity
) -> None:
    app = Scripted(identity.public_key, [])
    base = await serve_app(nursery, app)
    delivery = svc.WebhookDelivery(store, identity, fast(poll_interval_s=30))
    await nursery.start(delivery.run)
    ids = await trio.to_thread.run_sync(enqueue_reports, store, identity, base + "/x", 3)
    delivery.wake()  # poll interval is 30 s: only wake() makes this fast
    while delivery.statistics().delivered < 3:
        await trio.sleep(0.02)
    # Batched since the operability issue (#9): the ids arrive in one POST or several.
    assert sorted(i for s in app.seen for i in carried(s.body)) == sorted(ids)
    assert all(s.headers["content-type"] == "application/json" for s in app.seen)
    for s in app.seen:
        one = carried(s.body)
        assert s.headers["webhook-id"] == (one[0] if len(one) == 1 else batch_id(one))


async def test_410_gone_disables_the_endpoint(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity
) -> None:
    app = Scripted(identity.public_key, [(410, [])])
    base = await serve_app(nursery, app)
    url = base + "/gone"
    enqueue_reports(store, identity, url, 3)
    delivery = svc.WebhookDelivery(store, identity, fast(max_concurrency=1, batch_size=1))
    counts = await delivery.drain(timeout_s=30)
    assert counts == {"pending": 0, "delivered": 0, "dead": 3}
    assert len(app.seen) == 1  # the first answer disabled it; the others were never sent
    (endpoint,) = ob.endpoints(store)
    assert endpoint.url == url and endpoint.disabled_ms is not None
    enqueue_reports(store, identity, url, 1)
    assert ob.counts(store)["dead"] == 4
    assert delivery.statistics().gone == 1


async def test_503_with_retry_after_is_honoured(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity
) -> None:
    app = Scripted(identity.public_key, [(503, [(b"retry-after", b"1")])])
    base = await serve_app(nursery, app)
    enqueue_reports(store, identity, base + "/busy", 1)
    delivery = svc.WebhookDelivery(store, identity, fast())
    counts = await delivery.drain(timeout_s=30)
    assert counts["delivered"] == 1
    assert len(app.seen) == 2
    gap = app.seen[1].at - app.seen[0].at
    assert gap >= 0.95, gap  # backoff alone would have been <= 0.2 s
    assert app.seen[0].headers["webhook-id"] == app.seen[1].headers["webhook-id"]
    assert delivery.statistics().slowed_down == 1


async def test_retry_after_as_http_date_and_429_holds_the_endpoint(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity
) -> None:
    import email.utils

    date = email.utils.formatdate(time.time() + 2, usegmt=True)
    when = email.utils.parsedate_to_datetime(date).timestamp()
    app = Scripted(identity.public_key, [(429, [(b"retry-after", date.encode())])])
    base = await serve_app(nursery, app)
    enqueue_reports(store, identity, base + "/slow", 3)
    delivery = svc.WebhookDelivery(store, identity, fast(max_concurrency=1))
    counts = await delivery.drain(timeout_s=30)
    assert counts["delivered"] == 3
    # The three rows go in one POST (batching, #9): the 429 applies to all three, and after
    # it nothing went to that endpoint until the date it named; then one POST carries them.
    assert len(app.seen) == 2
    assert (
        carried(app.seen[0].body) == carried(app.seen[1].body)
        and len(carried(app.seen[1].body)) == 3
    )
    # Not before the date it named (which is whole seconds, so 1-2 s after the test began).
    assert app.seen[1].wall >= when - 0.05, (app.seen[1].wall, when)
    assert delivery.statistics().postponed == 0
    assert sorted(e.attempts for e in ob.entries(store)) == [2, 2, 2]


async def test_other_4xx_is_a_dead_letter_and_5xx_gives_up_after_max_attempts(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity
) -> None:
    app400 = Scripted(identity.public_key, [], default=400)
    app500 = Scripted(identity.public_key, [], default=500)
    base400 = await serve_app(nursery, app400)
    base500 = await serve_app(nursery, app500)
    enqueue_reports(store, identity, base400 + "/", 1)
    enqueue_reports(store, identity, base500 + "/", 1)
    delivery = svc.WebhookDelivery(store, identity, fast(max_attempts=3))
    counts = await delivery.drain(timeout_s=30)
    assert counts == {"pending": 0, "delivered": 0, "dead": 2}
    assert len(app400.seen) == 1 and len(app500.seen) == 3
    dead = {e.url: e for e in ob.entries(store, state="dead")}
    assert dead[base400 + "/"].last_status == 400
    assert (dead[base400 + "/"].last_error or "").startswith("HTTP 400: scripted")
    assert (dead[base500 + "/"].last_error or "").startswith("gave up after 3 attempts")


async def test_unreachable_endpoint_is_retried_then_dead(
    store: Store, identity: NodeIdentity
) -> None:
    from tests.support.postgres import free_port

    enqueue_reports(store, identity, f"http://127.0.0.1:{free_port()}/", 1)
    delivery = svc.WebhookDelivery(store, identity, fast(max_attempts=2))
    with trio.fail_after(TIMEOUT_S):
        counts = await delivery.drain(timeout_s=30)
    assert counts["dead"] == 1
    assert delivery.statistics().network_errors == 2


async def test_slow_receiver_times_out(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity
) -> None:
    async def sleepy(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                m = await receive()
                await send({"type": m["type"] + ".complete"})
                if m["type"] == "lifespan.shutdown":
                    return
        await trio.sleep(30)

    base = await serve_app(nursery, sleepy)
    enqueue_reports(store, identity, base, 1)
    delivery = svc.WebhookDelivery(
        store, identity, fast(max_attempts=1, io_timeout_s=0.3, total_timeout_s=1.0)
    )
    start = time.monotonic()
    counts = await delivery.drain(timeout_s=30)
    assert counts["dead"] == 1 and time.monotonic() - start < 5
    (dead,) = ob.entries(store, state="dead")
    assert "Timeout" in (dead.last_error or "") or "no answer" in (dead.last_error or "")


async def test_loopback_is_refused_unless_allowed(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity
) -> None:
    app = Scripted(identity.public_key, [])
    base = await serve_app(nursery, app)
    enqueue_reports(store, identity, base + "/internal", 2)
    # Default policy: no internal prefix is allowed.
    delivery = svc.WebhookDelivery(store, identity, fast(allow_prefixes=()))
    counts = await delivery.drain(timeout_s=30)
    assert counts == {"pending": 0, "delivered": 0, "dead": 2}
    assert app.seen == []
    assert delivery.statistics().refused == 2
    assert all("internal address" in (e.last_error or "") for e in ob.entries(store))


async def test_a_name_resolving_to_loopback_is_refused(
    store: Store, identity: NodeIdentity
) -> None:
    enqueue_reports(store, identity, "http://localhost:9/x", 1)
    delivery = svc.WebhookDelivery(store, identity, fast(allow_prefixes=()))
    counts = await delivery.drain(timeout_s=30)
    assert counts["dead"] == 1 and delivery.statistics().refused == 1


async def test_reports_of_other_observers_are_not_signed_for(
    store: Store, identity: NodeIdentity
) -> None:
    other = NodeIdentity(seed=bytes(31) + b"\x05")
    enqueue_reports(store, other, "http://127.0.0.1:9/x", 1)
    counts = await svc.WebhookDelivery(store, identity, fast()).drain(timeout_s=30)
    assert counts["dead"] == 1
    assert "not signed by this node" in (ob.entries(store)[0].last_error or "")


# -- the wall clock steps -------------------------------------------------------------------------


class SteppedClock:
    """The wall clock, plus an offset the test sets (as if an operator or NTP stepped it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


async def wait_for(condition: Any, timeout_s: float = 20) -> None:
    with trio.fail_after(timeout_s):
        while not await condition():
            await trio.sleep(0.02)


async def recorded(store: Store, status: int) -> bool:
    rows = await trio.to_thread.run_sync(ob.entries, store)
    return any(e.last_status == status for e in rows)


#: Backoff of the retry in these tests: uniform in [0.5, 1] s.
BACKOFF_S = 1.0
#: Slack for a poll, a pass and a loaded test machine on top of the backoff.
SLACK_S = 2.0
STEPS_S = [6 * 3600, 3600, 30 * 86400]


@pytest.mark.parametrize("step_s", STEPS_S)
async def test_clock_stepped_back_does_not_stall_a_due_row(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity, step_s: float
) -> None:
    app = Scripted(identity.public_key, [(500, [])])
    base = await serve_app(nursery, app)
    enqueue_reports(store, identity, base + "/x", 1)
    clock = SteppedClock()
    settings = fast(backoff_base_s=BACKOFF_S, backoff_cap_s=BACKOFF_S)
    delivery = svc.WebhookDelivery(store, identity, settings, clock=clock)
    await nursery.start(delivery.run)
    await wait_for(lambda: recorded(store, 500))  # the retry is due within BACKOFF_S
    clock.offset = -step_s
    stepped = time.monotonic()
    with trio.fail_after(BACKOFF_S + SLACK_S):
        while delivery.statistics().delivered < 1:
            await trio.sleep(0.02)
    assert time.monotonic() - stepped < BACKOFF_S + SLACK_S
    assert len(app.seen) == 2
    assert delivery.statistics().clock_steps == 1


@pytest.mark.parametrize("step_s", STEPS_S)
async def test_clock_stepped_back_while_stopped_does_not_stall_after_restart(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity, step_s: float
) -> None:
    app = Scripted(identity.public_key, [(500, [])])
    base = await serve_app(nursery, app)
    enqueue_reports(store, identity, base + "/x", 1)
    clock = SteppedClock()
    settings = fast(backoff_base_s=BACKOFF_S, backoff_cap_s=BACKOFF_S)
    # The first service in a nursery of its own, so that it really stops: started in the
    # test's nursery it went on running, and sometimes saw the step (and re-based) first.
    async with trio.open_nursery() as first_life:
        first = svc.WebhookDelivery(store, identity, settings, clock=clock)
        await first_life.start(first.run)
        await wait_for(lambda: recorded(store, 500))
        first_life.cancel_scope.cancel()
    clock.offset = -step_s  # while nothing runs
    second = svc.WebhookDelivery(store, identity, settings, clock=clock)
    stepped = time.monotonic()
    counts = await second.drain(timeout_s=BACKOFF_S + SLACK_S)
    assert counts["delivered"] == 1
    assert time.monotonic() - stepped < BACKOFF_S + SLACK_S
    assert second.statistics().rebased == 1  # seen in the rows, not by the new service


async def test_clock_stepped_back_does_not_stretch_a_retry_after_hold(
    nursery: trio.Nursery, store: Store, identity: NodeIdentity
) -> None:
    app = Scripted(identity.public_key, [(503, [(b"retry-after", b"1")])])
    base = await serve_app(nursery, app)
    enqueue_reports(store, identity, base + "/x", 2)
    clock = SteppedClock()
    delivery = svc.WebhookDelivery(store, identity, fast(max_concurrency=1), clock=clock)
    await nursery.start(delivery.run)
    await wait_for(lambda: recorded(store, 503))
    clock.offset = -6 * 3600
    stepped = time.monotonic()
    with trio.fail_after(1 + SLACK_S):
        while delivery.statistics().delivered < 2:
            await trio.sleep(0.02)
    assert time.monotonic() - stepped < 1 + SLACK_S
    # Both rows in each POST (batching, #9): the 503, then the retry after Retry-After.
    assert len(app.seen) == 2 and app.seen[1].at - app.seen[0].at >= 0.95
    (endpoint,) = await trio.to_thread.run_sync(ob.endpoints, store)
    assert endpoint.not_before_ms <= clock() * 1000 + 1000


# -- kill -9 in the middle of delivery ------------------------------------------------------------


def sender(home: Path, db: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "overflowd.services.webhook",
            "--home",
            str(home),
            "--db",
            db,
            "--allow-prefix",
            "127.0.0.0/8",
            "--allow-http",
            "--lease-s",
            "1",
            "--backoff-base-s",
            "0.1",
            "--backoff-cap-s",
            "0.5",
            "--timeout-s",
            "60",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if k != "OVERFLOWD_HOME"},
    )


def test_kill_9_mid_delivery_then_restart_delivers_each_report_once(tmp_path: Path) -> None:
    home = tmp_path / "node"
    identity = NodeIdentity.generate()
    write_identity(home, identity)
    db = f"sqlite:///{tmp_path / 'node.db'}"
    out = tmp_path / "received.jsonl"
    receiver, base = start_receiver(out, "--trust", identity.public_key_b64)
    n = 150
    try:
        with Store.open(db) as store:
            ids = set(enqueue_reports(store, identity, base + "/hook", n))
        proc = sender(home, db, "--concurrency", "4", "--batch-size", "8")
        deadline = time.monotonic() + TIMEOUT_S
        while len(lines(out)) < 20 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        assert proc.poll() is None, "the sender finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=15) == -signal.SIGKILL
        at_kill = len(lines(out))
        assert 0 < at_kill < n
        with Store.open(db) as store:
            # Leased rows of the dead sender are still pending: nothing is lost.
            assert ob.counts(store)["pending"] > 0
        proc = sender(home, db)
        _, err = proc.communicate(timeout=TIMEOUT_S)
        assert proc.returncode == 0, err.decode()
        with Store.open(db) as store:
            assert ob.counts(store) == {"pending": 0, "delivered": n, "dead": 0}
        metrics = httpx.get(base + "/metrics", timeout=10).text
        assert "overflowd_receiver_accepted_total 150" in metrics
        # Deliveries sent but not marked when the sender died were sent again and answered
        # 2xx as duplicates (how many depends on timing; zero is possible).
        print(next(m for m in metrics.splitlines() if m.startswith("overflowd_receiver_dup")))
    finally:
        assert stop(receiver) == 0
    written = [w["id"] for w in lines(out)]
    assert len(written) == n and set(written) == ids


def test_sender_script_usage(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "overflowd.services.webhook", "--home", str(tmp_path / "none")],
        capture_output=True,
        timeout=30,
    )
    assert run.returncode == 1 and b"identity" in run.stderr


def test_webhook_targets_feed_enqueue(store: Store, identity: NodeIdentity) -> None:
    settings = fast(targets=(("198.51.100.0/24", "http://127.0.0.1:9/a"),))
    r = identity.sign_report(make_payload(dst="198.51.100.7"))
    urls = svc.webhook_targets(r, settings.targets)
    assert svc.enqueue(store, r, urls) == 1
    assert [e.url for e in ob.entries(store)] == ["http://127.0.0.1:9/a"]


async def test_the_stdlib_receiver_example_in_webhooks_md(
    store: Store, identity: NodeIdentity, tmp_path: Path
) -> None:
    import re

    doc = (Path(__file__).resolve().parents[2] / "docs" / "webhooks.md").read_text()
    (code,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", doc, re.S)
        if "A minimal overflowd webhook receiver" in block
    ]
    script = tmp_path / "receiver.py"
    script.write_text(code)
    proc = subprocess.Popen(
        [sys.executable, str(script), "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stderr is not None and proc.stdout is not None
        line = proc.stderr.readline().decode()
        port = int(line.rsplit(" ", 1)[1])
        ids = enqueue_reports(store, identity, f"http://127.0.0.1:{port}/", 5)
        counts = await svc.WebhookDelivery(store, identity, fast()).drain(timeout_s=30)
        assert counts["delivered"] == 5
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert sorted(json.loads(x)["id"] for x in out.decode().splitlines()) == sorted(ids)
