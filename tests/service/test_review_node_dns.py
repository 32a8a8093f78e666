"""Review of #9's [send] switch with DNS: webhooks to a flow end's ``u=`` URL obey the switch
and the confinement, and nothing else (docs/notify.md, "Confinement, [send] and enabled").

The real Knot server and zones of test_registry_wiring (127.0.0.3 publishes ``u=`` HOOK); a
real :class:`NodeService` built from a TOML text as ``overflowd run`` builds it. Nothing
leaves loopback, and nothing is delivered (the worker is not run).
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from overflowd.config import parse_settings
from overflowd.identity import NodeIdentity
from overflowd.services.node import NodeService
from overflowd.store import Store
from tests.service.test_registry_wiring import HOOK, NODE, TIMEOUT_S, knot, wait_until
from tests.support.knot import KnotServer
from tests.support.reports import make_payload

__all__ = ["knot"]  # the fixture, re-used


async def test_dns_webhooks_follow_send_not_inband_enabled(
    knot: KnotServer, tmp_path: Path
) -> None:
    """``[inband] enabled = false`` says: no listener, no in-band sender. With ``[send]`` on,
    the documented rule still sends webhooks to the ``u=`` URL a flow end publishes; the node
    built no DNS registry without in-band, so no hints and no DNS webhook, silently."""
    text = (
        f'[registry]\nnameservers = ["{knot.address}"]\ntimeout_s = 1.0\n'
        '[send]\nto_flow_addresses = true\nallowed_prefixes = ["127.0.0.0/8"]\n'
        "[inband]\nenabled = false\n"
    )
    s = parse_settings(text, "overflowd.toml")
    report = NodeIdentity(seed=b"\x36" * 32).sign_report(
        make_payload("127.0.0.4", "127.0.0.3", time_ms=int(time.time() * 1000))
    )
    with Store.open(f"sqlite:///{tmp_path / 'node.sqlite'}") as store, trio.fail_after(TIMEOUT_S):
        node = NodeService(NODE, s, store, listen=["127.0.0.1:0"])
        assert node.hints is not None and node.webhook is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(node.hints.run)
            node._warm(report)
            hints = node.hints
            await wait_until(lambda: hints.statistics().lookups == 2)
            planned = node._webhook_plan(report, trio.current_time(), 0)
            assert [p.url for p in planned] == [HOOK]
            nursery.cancel_scope.cancel()


async def test_webhooks_from_dns_counts_what_was_planned_not_what_was_looked_at(
    knot: KnotServer, tmp_path: Path
) -> None:
    """``webhooks_from_dns`` is "deliveries enqueued to URLs published in DNS"; it was counted
    when the URL was chosen, before the plan, so each duplicate the plan dropped counted too."""
    text = (
        f'[registry]\nnameservers = ["{knot.address}"]\ntimeout_s = 1.0\n'
        '[send]\nto_flow_addresses = true\nallowed_prefixes = ["127.0.0.0/8"]\n'
    )
    s = parse_settings(text, "overflowd.toml")
    report = NodeIdentity(seed=b"\x36" * 32).sign_report(
        make_payload("127.0.0.4", "127.0.0.3", time_ms=int(time.time() * 1000))
    )
    with Store.open(f"sqlite:///{tmp_path / 'node.sqlite'}") as store, trio.fail_after(TIMEOUT_S):
        node = NodeService(NODE, s, store, listen=["127.0.0.1:0"], inband_listen="127.0.0.1:0")
        assert node.hints is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(node.hints.run)
            node._warm(report)
            hints = node.hints
            await wait_until(lambda: hints.statistics().lookups == 2)
            for _ in range(3):
                node._webhook_plan(report, trio.current_time(), 0)
            assert node.webhook_budget.statistics().dropped["duplicate"] == 2
            assert node.statistics().webhooks_from_dns == 1
            nursery.cancel_scope.cancel()
