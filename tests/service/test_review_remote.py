"""Findings of the remote-facing review (#9 merged): each reproduced through what a stranger
touches (HTTP on 127.0.0.1, the overflowd-receive process), fixed, and kept."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import httpx
import pytest
import trio

from overflowd.config import ApiSettings
from overflowd.identity import NodeIdentity
from overflowd.receiver import MAX_BODY_BYTES, batch_id, encode_batch_body
from overflowd.services.api import ApiContext, ApiService
from overflowd.store import Store
from overflowd.wire import webhook as wh
from tests.service.test_receiver import lines, start_receiver, stop
from tests.support.reports import make_payload

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
                fine = await client.get(f"http://{host}:{port}/v1/reports?after={2**63 - 1}")
            service.stop()
    assert answer.status_code == 422 and "after" in answer.text, answer.text
    assert fine.status_code == 200 and fine.json()["reports"] == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


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
