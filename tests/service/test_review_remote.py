"""Findings of the remote-facing review (#9 merged): each reproduced through what a stranger
touches (HTTP on 127.0.0.1, the overflowd-receive process), fixed, and kept."""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
import pytest
import trio

from overflowd.config import ApiSettings
from overflowd.identity import NodeIdentity
from overflowd.services.api import ApiContext, ApiService
from overflowd.store import Store

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
