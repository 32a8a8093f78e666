"""A pinned peer carries reports; it does not vouch for them.

Found by the five-namespace test (tests/netns/test_peers_topology.py), one run in a few: the
victim pins the hub it peers with, not router ry; ry's reports relayed by the hub were stored
`pinned` when the hub's push arrived before its pull, because the inbox labelled every pushed
report with the *sending peer's* trust, while the pull used the observer's own (the rule of
docs/peers.md). Both paths now share `peers.relayed_trust`.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from overflowd.config import ApiSettings
from overflowd.identity import NodeIdentity
from overflowd.peers import PeeringSettings, PeerSettings
from overflowd.services.api import ApiContext, ApiService
from overflowd.services.api_peers import PeerInbox
from overflowd.services.peer_push import PeerPush
from overflowd.store import Store
from tests.support.reports import make_payload

TIMEOUT_S = 20.0
HUB = NodeIdentity(seed=b"\x71" * 32)  # pinned by the victim, pushes to it
VICTIM = NodeIdentity(seed=b"\x72" * 32)
ROUTER = NodeIdentity(seed=b"\x73" * 32)  # a third observer whose reports the hub relays
PINNED_ROUTER = NodeIdentity(seed=b"\x74" * 32)  # one the victim's own book pins


def test_pushed_reports_keep_their_observers_trust_not_the_pinned_carriers(
    tmp_path: Path,
) -> None:
    now = int(time.time() * 1000)
    relayed = ROUTER.sign_report(make_payload(packets=5, time_ms=now))
    pinned_relayed = PINNED_ROUTER.sign_report(make_payload(packets=6, time_ms=now))
    own = HUB.sign_report(make_payload(packets=7, time_ms=now))
    book = {PINNED_ROUTER.public_key: "pinned"}
    with (
        Store.open(f"sqlite:///{tmp_path / 'hub.db'}") as hub_store,
        Store.open(f"sqlite:///{tmp_path / 'victim.db'}") as victim_store,
    ):
        hub_store.add_reports([(r, now, "import") for r in (relayed, pinned_relayed, own)])

        async def main() -> None:
            with trio.fail_after(TIMEOUT_S):
                hub_at_victim = PeerSettings(
                    "hub", "http://127.0.0.1:9/", HUB.public_key, trust="pinned", push=False
                )
                inbox = PeerInbox(
                    victim_store,
                    [hub_at_victim],
                    node_key=VICTIM.public_key,
                    trust_of=lambda key: book.get(key, "unknown"),
                )
                ctx = ApiContext(
                    identity=VICTIM, contacts=(), observation_point="", store=victim_store,
                    inbox=inbox,
                )  # fmt: skip
                api = ApiService(ApiSettings(listen="127.0.0.1:0"), ctx)
                async with trio.open_nursery() as nursery:
                    host, port = await nursery.start(api.run)
                    url = f"http://{host}:{port}/"
                    victim_at_hub = PeerSettings("victim", url, VICTIM.public_key)
                    push = PeerPush(HUB, hub_store, [victim_at_hub], PeeringSettings())
                    nursery.start_soon(push.run)
                    while victim_store.get_report(own.report_id) is None or any(
                        victim_store.get_report(r.report_id) is None
                        for r in (relayed, pinned_relayed)
                    ):
                        await trio.sleep(0.05)
                    api.stop()
                    nursery.cancel_scope.cancel()

        trio.run(main)
        labels = {
            name: victim_store.get_report(r.report_id).trust  # type: ignore[union-attr]
            for name, r in (("relayed", relayed), ("pinned", pinned_relayed), ("own", own))
        }
    assert labels == {"relayed": "unknown", "pinned": "pinned", "own": "pinned"}
