"""Review: a relabel lowered stored labels and proved (key, prefix) pairs DNS never vouched for.

``InbandListener._relabel_entry`` wrote whatever the relabel hook answered over the stored
label, and put the pair in the priority lane on any change. NodeService's hook answers the
book's label when DNS does not vouch (the lookup failed, or found nothing), and the book may have
forgotten the key since the report was stored (a flood of fresh keys), so a failed lookup turned
a stored ``continuity`` into ``unknown`` and earned the sender's prefix the priority lane. Now a
relabel only ever raises a stored label, and only ``dns`` proves a pair.

Real UDP on 127.0.0.1, a real SQLite store; the hooks stand in for the trust book and DNS.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.services.inband import InbandListener, InbandSettings
from overflowd.store import Store
from overflowd.wire import datagram
from tests.support.reports import make_payload

TIMEOUT_S = 20
OBSERVER = NodeIdentity(seed=b"\x33" * 32)
#: packets -> (label at store time, the relabel's answer)
CASES = {
    1: ("continuity", "unknown"),  # the lookup failed and the book forgot the key: keep
    2: ("unknown", "continuity"),  # the book's continuity grew meanwhile: raise, prove nothing
    3: ("unknown", "dns"),  # DNS vouched: raise and prove the pair
}


def signed(packets: int) -> rpt.SignedReport:
    payload = make_payload(
        "127.0.0.1", "127.0.0.2", packets=packets, time_ms=int(time.time() * 1000)
    )
    flow = dataclasses.replace(payload.flow, sport=packets)  # one flow each: no de-duplication
    return OBSERVER.sign_report(dataclasses.replace(payload, flow=flow))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(f"sqlite:///{tmp_path / 'r.sqlite'}") as s:
        yield s


async def test_relabel_never_lowers_and_only_dns_proves(store: Store) -> None:
    async def label(report: rpt.SignedReport, sender: str) -> str:
        return CASES[report.payload.flow.packets][0]

    async def relabel(report: rpt.SignedReport, sender: str) -> str:
        return CASES[report.payload.flow.packets][1]

    listener = InbandListener(
        InbandSettings(),
        store,
        listen=("127.0.0.1", 0),
        label=label,
        relabel=relabel,
        relabel_workers=1,
    )
    reports = [signed(n) for n in CASES]
    proven: list[int] = []
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            addr = await nursery.start(listener.run)
            client = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
            await client.bind(("127.0.0.1", 0))
            for n, report in enumerate(reports, 1):
                await client.sendto(datagram.to_wire(report.cose), addr)
                # one at a time: reports of one key and sender would share one relabel
                while sum(listener.statistics().trust.values()) < n:
                    await trio.sleep(0.01)
                proven.append(listener.statistics().relabel.proven_pairs)
            listener.stop()
        client.close()
    labels = [store.get_report(r.report_id).trust for r in reports]  # type: ignore[union-attr]
    assert labels == ["continuity", "continuity", "dns"]
    assert proven == [0, 0, 1]
    stats = listener.statistics()
    assert stats.trust == {"continuity": 2, "dns": 1}  # the final labels, as stored
    assert dict(stats.relabel.relabelled) == {"continuity": 1, "dns": 1}
    assert stats.relabel.unchanged == 1 and stats.relabel.not_lowered == 1
