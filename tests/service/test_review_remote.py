"""Findings of the remote-facing review (#9 merged): each reproduced through what a stranger
touches (HTTP on 127.0.0.1, the overflowd-receive process), fixed, and kept."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from overflowd.config import ApiSettings
from overflowd.identity import NodeIdentity
from overflowd.notify import WebhookSettings
from overflowd.receiver import MAX_BODY_BYTES, batch_id, encode_batch_body
from overflowd.services import webhook as svc
from overflowd.services.api import ApiContext, ApiService
from overflowd.store import Store
from overflowd.store import outbox as ob
from overflowd.wire import webhook as wh
from tests.service.test_receiver import lines, start_receiver, stop
from tests.service.test_webhook_delivery import Scripted, enqueue_reports, fast, serve_app
from tests.support.reports import make_payload
from tests.unit.test_outbox import store

__all__ = ["store"]  # the fixture (SQLite and PostgreSQL), shared with test_outbox.py

TIMEOUT_S = 60


# -- the node API: a cursor past SQLite's INTEGER is a 422, not a 500 and a traceback ----------


@pytest.mark.parametrize("after", [2**63, 10**30])
async def test_an_after_past_the_store_integer_is_refused_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, after: int
) -> None:
    """`?after=9223372036854775808` reached SQLite, which cannot bind it: OverflowError, a 500
    and hypercorn's ERROR traceback for every such request (anyone on the port floods the
    log). The cursor is a store sequence number: it fits 63 bits or names no report."""
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        ctx = ApiContext(
            identity=NodeIdentity.generate(), contacts=(), observation_point="", store=store
        )
        service = ApiService(ApiSettings(listen="127.0.0.1:0"), ctx)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(service.run)
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"http://{host}:{port}/v1/reports?after={after}")
                # the largest cursor is well-formed: an empty store never gave it (409, not 500)
                edge = await client.get(f"http://{host}:{port}/v1/reports?after={2**63 - 1}")
                fine = await client.get(f"http://{host}:{port}/v1/reports?after=0")
            service.stop()
    assert answer.status_code == 422 and "after" in answer.text, answer.text
    assert edge.status_code == 409 and "after" in edge.text, edge.text
    assert fine.status_code == 200 and fine.json()["reports"] == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]



@pytest.mark.postgres
async def test_a_store_that_fails_is_a_503_and_no_traceback_per_request(
    postgres_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The database goes away under the API (here: its reports table, as a failed migration
    or a restore would): every request was a 500 and an ERROR traceback from hypercorn, so any
    client on the port wrote the log as fast as it asked. A store error is the server's
    state, not the request's: 503 with a short reason, and the warning rate-limited."""
    import sqlalchemy

    with Store.open(postgres_db_url) as store, trio.fail_after(TIMEOUT_S):
        ctx = ApiContext(
            identity=NodeIdentity.generate(), contacts=(), observation_point="", store=store
        )
        service = ApiService(ApiSettings(listen="127.0.0.1:0"), ctx)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(service.run)
            async with httpx.AsyncClient() as client:
                assert (await client.get(f"http://{host}:{port}/v1/reports")).status_code == 200
                admin = sqlalchemy.create_engine(postgres_db_url)
                with admin.begin() as conn:
                    conn.execute(sqlalchemy.text("DROP TABLE reports CASCADE"))
                admin.dispose()
                answers = [
                    await client.get(f"http://{host}:{port}/v1/reports") for _ in range(20)
                ]
            service.stop()
    assert {a.status_code for a in answers} == {503}, answers[0].text
    assert answers[0].json() == {"detail": "the store is unavailable"}  # nothing internal
    assert answers[0].headers["retry-after"] == "5"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) <= 1


# -- overflowd-receive: --max-body-bytes above 64 KiB is what it says ---------------------------


async def test_a_larger_max_body_bytes_takes_a_larger_batch(tmp_path: Path) -> None:
    """`--max-body-bytes 262144` read the body, then verify_batch refused it at its own fixed
    64 KiB ("400 malformed: body is larger than 65536 bytes"): the flag raised nothing, and the
    sender took the 400 for a receiver of the single form."""
    identity = NodeIdentity.generate()
    reports = [identity.sign_report(make_payload()) for _ in range(70)]
    body = encode_batch_body(reports)
    assert MAX_BODY_BYTES < len(body) <= 262_144
    headers = wh.sign(batch_id([r.report_id for r in reports]), int(time.time()), body,
                      identity.sign)  # fmt: skip
    out = tmp_path / "out.jsonl"
    proc, base = start_receiver(
        out, "--trust", identity.public_key_b64, "--max-body-bytes", "262144"
    )
    try:
        with trio.fail_after(TIMEOUT_S):
            async with httpx.AsyncClient(base_url=base) as client:
                answer = await client.post("/", content=body, headers=headers)
    finally:
        assert stop(proc) == 0
    assert answer.status_code == 200, answer.text
    assert json.loads(answer.content) == {"accepted": 70, "duplicates": 0}
    assert len(lines(out)) == 70


# -- webhook delivery: an endpoint that said "wait an hour" must not make us poll every 20 ms --


async def test_a_held_endpoint_with_due_rows_does_not_spin_the_delivery_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint answers 429 with Retry-After: 3600 (an overloaded receiver, or a hostile
    one). Reports for it keep coming: their rows are due, but held. next_due_ms ignores holds,
    so the service woke every 20 ms for the whole hold (up to retry_after_cap_s, 6 h) and ran a
    claim (a write transaction scanning every held row) each time: 50 claims a second."""
    identity = NodeIdentity(seed=bytes(range(32)))
    claims = 0
    real_claim = ob.claim_batches

    def counting_claim(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(ob, "claim_batches", counting_claim)
    settings = WebhookSettings(
        allow_prefixes=("127.0.0.0/8",), require_https=False, poll_interval_s=0.5
    )
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = Scripted(identity.public_key, [(429, [(b"retry-after", b"3600")])])
            url = await serve_app(nursery, app) + "/busy"
            enqueue_reports(store, identity, url, 1)
            delivery = svc.WebhookDelivery(store, identity, settings)
            await nursery.start(delivery.run)
            while delivery.statistics().slowed_down < 1:
                await trio.sleep(0.01)
            enqueue_reports(store, identity, url, 3)  # due now, their endpoint held
            delivery.wake()
            claims = 0
            await trio.sleep(1.5)  # the bug claimed every 20 ms: 75 claims in this window
            nursery.cancel_scope.cancel()
    assert len(app.seen) == 1  # the hold held
    # Woken by the enqueue, then once per poll interval: 1.5 s / 0.5 s, and a little slack.
    assert claims <= 8, claims


def test_next_due_counts_a_held_endpoint_due_when_its_hold_ends(store: Store) -> None:
    """The store side of the fix, on both backends: rows of a held endpoint are due when the
    hold ends, a disabled endpoint's never, other rows when they are."""
    from tests.unit.test_outbox import T0, URL_A, URL_B, report

    identity = NodeIdentity(seed=bytes(range(32)))
    ob.enqueue(store, report(identity), [URL_A], now_ms=T0)
    ob.hold_endpoint(store, URL_A, now_ms=T0, until_ms=T0 + 3_600_000)
    assert ob.next_due_ms(store) == T0  # without a clock: holds ignored, as before
    assert ob.next_due_ms(store, now_ms=T0 + 10) == T0 + 3_600_000
    ob.enqueue(store, report(identity), [URL_B], now_ms=T0 + 5_000)
    assert ob.next_due_ms(store, now_ms=T0 + 10) == T0 + 5_000
    ob.disable_endpoint(store, URL_B, now_ms=T0 + 20, reason="410")
    assert ob.next_due_ms(store, now_ms=T0 + 30) == T0 + 3_600_000
    assert ob.next_due_ms(store, now_ms=T0 + 3_600_000) == T0  # the hold is over


# -- webhook counters: a batch the SSRF policy refused was never a POST -------------------------


async def test_a_refused_batch_is_not_counted_as_batched_reports(tmp_path: Path) -> None:
    """batched_reports ("reports carried in POSTs of more than one") counted the rows of a
    batch the SSRF policy refused before anything was sent: the metric said reports went out
    batched where none went out at all (posts, rightly, stayed 0)."""
    identity = NodeIdentity(seed=bytes(range(32)))
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = Scripted(identity.public_key, [])
            url = await serve_app(nursery, app) + "/internal"
            enqueue_reports(store, identity, url, 3)
            delivery = svc.WebhookDelivery(store, identity, fast(allow_prefixes=()))
            counts = await delivery.drain(timeout_s=30)
            nursery.cancel_scope.cancel()
    assert counts == {"pending": 0, "delivered": 0, "dead": 3} and app.seen == []
    s = delivery.statistics()
    assert s.refused == 3 and s.posts == 0
    assert s.batched_reports == 0


# -- webhook delivery: one 4xx to a batch caps the URL at endpoint_posts_per_s reports ---------


async def test_a_single_form_receiver_is_not_throttled_to_one_report_a_second(
    tmp_path: Path,
) -> None:
    """A receiver that answers a batch with a 4xx (one built on verify_delivery, or a proxy's
    transient 404/413, a 401 for a skewed clock) is sent one report per POST from then on,
    and each POST spent a token of the URL's POST budget: 30 reports took 25 s at the
    defaults, and under a sustained 2 reports/s (one prefix's budget) the backlog grew until it
    was shed. Now single-form POSTs spend no token (one in flight bounds them), and the mark
    ends after SINGLE_FORM_FOR_S."""
    identity = NodeIdentity(seed=bytes(range(32)))

    class SingleOnly(Scripted):
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await super().__call__(scope, receive, send)
                return
            body = b""
            while True:
                m = await receive()
                body += m.get("body", b"")
                if not m.get("more_body"):
                    break
            if body.startswith(b'{"reports"'):
                await send({"type": "http.response.start", "status": 400, "headers": []})
                await send({"type": "http.response.body", "body": b"one report please"})
                return

            async def again() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            await super().__call__(scope, again, send)

    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = SingleOnly(identity.public_key, [])
            url = await serve_app(nursery, app) + "/single"
            enqueue_reports(store, identity, url, 30)
            settings = WebhookSettings(  # the POST budget at its defaults (1/s, burst 5)
                allow_prefixes=("127.0.0.0/8",), require_https=False, poll_interval_s=0.1
            )
            delivery = svc.WebhookDelivery(store, identity, settings)
            counts = await delivery.drain(timeout_s=10)
            nursery.cancel_scope.cancel()
    assert delivery.statistics().batches_refused == 1
    assert counts == {"pending": 0, "delivered": 30, "dead": 0}


async def test_a_transient_4xx_to_a_batch_makes_a_url_single_form_only_for_a_while(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One 400 to a batch (a proxy's hiccup), then the receiver takes batches again: once the
    single-form mark ends (SINGLE_FORM_FOR_S, here 0) the rest go batched, not one per POST."""
    monkeypatch.setattr(svc, "SINGLE_FORM_FOR_S", 0.0)
    identity = NodeIdentity(seed=bytes(range(32)))
    refused: list[int] = []

    class RefusesOnce(Scripted):
        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] != "http" or refused:
                await super().__call__(scope, receive, send)
                return
            while (await receive()).get("more_body") is not False:
                pass
            refused.append(1)
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"not now"})

    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = RefusesOnce(identity.public_key, [])
            url = await serve_app(nursery, app) + "/flaky"
            enqueue_reports(store, identity, url, 10)
            settings = WebhookSettings(
                allow_prefixes=("127.0.0.0/8",), require_https=False, poll_interval_s=0.1
            )
            delivery = svc.WebhookDelivery(store, identity, settings)
            counts = await delivery.drain(timeout_s=20)
            nursery.cancel_scope.cancel()
    stats = delivery.statistics()
    assert counts == {"pending": 0, "delivered": 10, "dead": 0}
    assert stats.batches_refused == 1
    assert len(app.seen) < 5, f"{len(app.seen)} POSTs for 10 reports: still one per POST"


# -- webhook delivery: a failed POST's outcome is one transaction, as a delivered one's is ------


async def test_a_slowed_down_batch_is_recorded_in_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 429 to a POST of 20 rows was recorded row by row: a reschedule and a hold upsert
    each, 40 write transactions (SQLite's write lock taken 40 times, and 40 commits to flush on
    PostgreSQL) under the service's one record lock, where a 2xx is one. An endpoint that
    answers 429 to every POST made every outcome 20x dearer for everybody's deliveries."""
    identity = NodeIdentity(seed=bytes(range(32)))
    outcome_writes: list[str] = []
    real_transaction = Store.transaction

    def counting(self: Store, doing: str, *, write: bool) -> Any:
        if write and not doing.startswith(("claiming", "re-basing", "pruning")):
            outcome_writes.append(doing)
        return real_transaction(self, doing, write=write)

    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store, trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            app = Scripted(identity.public_key, [(429, [(b"retry-after", b"3600")])])
            url = await serve_app(nursery, app) + "/busy"
            enqueue_reports(store, identity, url, 20)
            settings = WebhookSettings(
                allow_prefixes=("127.0.0.0/8",), require_https=False, poll_interval_s=0.1
            )
            delivery = svc.WebhookDelivery(store, identity, settings)
            monkeypatch.setattr(Store, "transaction", counting)
            await delivery.drain(timeout_s=2)
            monkeypatch.undo()
            nursery.cancel_scope.cancel()
        entries = ob.entries(store)
        (endpoint,) = ob.endpoints(store)
    assert len(app.seen) == 1 and delivery.statistics().slowed_down == 20
    assert {e.attempts for e in entries} == {1} and {e.last_status for e in entries} == {429}
    assert all(e.next_attempt_ms >= endpoint.not_before_ms - 1 for e in entries)
    assert endpoint.not_before_ms > time.time() * 1000 + 3_000_000  # held for the hour
    assert len(outcome_writes) == 1, outcome_writes


def test_finish_many_writes_each_rows_outcome_and_the_hold(store: Store) -> None:
    """The store side, on both backends: rows rescheduled or dead by their own outcome, the
    hold written, a row another worker finished meanwhile left alone."""
    from tests.unit.test_outbox import T0, URL_A, report

    identity = NodeIdentity(seed=bytes(range(32)))
    for _ in range(3):
        ob.enqueue(store, report(identity), [URL_A], now_ms=T0)
    a, b, c = ob.claim_batches(store, now_ms=T0, lease_ms=1000, max_urls=1, max_reports=3)[0]
    ob.mark_delivered(store, c.id, now_ms=T0, status=200)
    changed = ob.finish_many(
        store,
        [
            ob.RowOutcome(a.id, ob.PENDING, "HTTP 429", 429, next_attempt_ms=T0 + 9000),
            ob.RowOutcome(b.id, ob.DEAD, "gave up after 12 attempts: HTTP 429", 429),
            ob.RowOutcome(c.id, ob.PENDING, "HTTP 429", 429, next_attempt_ms=T0 + 9000),
        ],
        now_ms=T0 + 1,
        hold=(URL_A, T0 + 9000),
    )
    assert changed == 2
    rows = {e.id: e for e in ob.entries(store)}
    assert (rows[a.id].state, rows[a.id].next_attempt_ms, rows[a.id].last_status) == (
        ob.PENDING,
        T0 + 9000,
        429,
    )
    assert rows[b.id].state == ob.DEAD and "gave up" in (rows[b.id].last_error or "")
    assert rows[c.id].state == ob.DELIVERED
    assert [e.not_before_ms for e in ob.endpoints(store)] == [T0 + 9000]
