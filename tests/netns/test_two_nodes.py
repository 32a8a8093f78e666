"""Two nodes in network namespaces: in-band reports reach both ends of the flow, verified.

Node A holds 192.0.2.1 and 2001:db8:a::1, node B 198.51.100.1 and 2001:db8:b::1, joined by
one veth with a route to each other's prefix and nothing else (no default route: an address
outside the test's prefixes is unreachable from A). Each node runs an in-band listener on port
65535 writing to its own SQLite store (tests/support/netns_nodes.py). A signs reports about
flows between the two and sends them with confinement allowing only the test's prefixes; the
reports must arrive at B (destination) and A (source), verify, and be stored once, while
flows naming 203.0.113.5 (TEST-NET-3, not allowed) and 8.8.8.8 (a real address, as the shared
trace holds) send nothing there.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

import pytest

from overflowd.identity import NodeIdentity, verify_report
from overflowd.store import Store
from tests.support import netns

pytestmark = pytest.mark.netns

NODES = Path(__file__).resolve().parents[1] / "support" / "netns_nodes.py"
A4, A6 = "192.0.2.1", "2001:db8:a::1"
B4, B6 = "198.51.100.1", "2001:db8:b::1"
ALLOWED = ["192.0.2.0/24", "198.51.100.0/24", "2001:db8:a::/64", "2001:db8:b::/64"]
ARRIVAL_TIMEOUT_S = 15.0


def _wait_for_reports(url: str, ids: set[str]) -> set[str]:
    """The subset of ``ids`` in the store at ``url`` once all are there or time runs out."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    with Store.open(url) as store:
        while True:
            present = {i for i in ids if store.get_report(i) is not None}
            if present == ids or time.monotonic() > deadline:
                return present
            time.sleep(0.05)


def _stop_and_read_stats(process: netns.Process) -> dict[str, object]:
    assert process.stop() == 0, process.output()
    lines = [line for line in process.output().splitlines() if line.startswith("stats ")]
    assert lines, process.output()
    stats: dict[str, object] = json.loads(lines[-1][len("stats ") :])
    return stats


def test_inband_reports_reach_both_ends_verified_and_stored(
    netns_ready: None, tmp_path: Path
) -> None:
    identity = NodeIdentity(seed=secrets.token_bytes(32))
    url_a = f"sqlite:///{tmp_path / 'a.sqlite'}"
    url_b = f"sqlite:///{tmp_path / 'b.sqlite'}"
    for url in (url_a, url_b):  # create the schema before two processes race to
        Store.open(url).close()
    with (
        netns.namespace(tmp_path, ipv6=True) as a,
        netns.namespace(tmp_path, ipv6=True) as b,
    ):
        link = netns.veth(a, b, [f"{A4}/24", f"{A6}/64"], [f"{B4}/24", f"{B6}/64"])
        a.run(["ip", "route", "add", "198.51.100.0/24", "dev", link.a_dev])
        a.run(["ip", "-6", "route", "add", "2001:db8:b::/64", "dev", link.a_dev])
        b.run(["ip", "route", "add", "192.0.2.0/24", "dev", link.b_dev])
        b.run(["ip", "-6", "route", "add", "2001:db8:a::/64", "dev", link.b_dev])

        listeners = {}
        for name, ns, url in (("a", a, url_a), ("b", b, url_b)):
            process = ns.spawn(
                [sys.executable, str(NODES), "listen", "--db", url, "--listen", "[::]:65535"],
                label=f"listener-{name}",
            )
            process.wait_for_output(r"listening :: 65535", timeout=30)
            listeners[name] = process

        flows = [
            f"{A4},{B4},17,5000,53",  # → A and B
            f"{A4},{B4},6,5001,80",  # → A and B
            f"{A6},{B6},17,5002,53",  # → A and B over IPv6
            f"{A4},203.0.113.5,17,5003,53",  # → A only: 203.0.113.0/24 is not allowed
            f"8.8.8.8,{B4},17,53,5004",  # → B only: a real address is never sent to
        ]
        argv = [
            sys.executable,
            str(NODES),
            "send",
            "--seed",
            identity.seed.hex(),
            "--port",
            "65535",
        ]
        for prefix in ALLOWED:
            argv += ["--allow", prefix]
        for flow in flows:
            argv += ["--flow", flow]
        done = a.run(argv, timeout=60)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        ids = result["report_ids"]
        assert len(ids) == len(flows)
        sender = result["sender"]
        assert result["sent"] == sender["datagrams_sent"] == 8
        assert sender["send_errors"] == 0
        assert sender["budget"]["dropped"]["not_allowed"] == 2
        assert sender["budget"]["allowed"] == 8

        expect_b = {ids[0], ids[1], ids[2], ids[4]}
        expect_a = {ids[0], ids[1], ids[2], ids[3]}
        assert _wait_for_reports(url_b, expect_b) == expect_b
        assert _wait_for_reports(url_a, expect_a) == expect_a
        stats_a = _stop_and_read_stats(listeners["a"])
        stats_b = _stop_and_read_stats(listeners["b"])

    for url, expected, stats in ((url_a, expect_a, stats_a), (url_b, expect_b, stats_b)):
        with Store.open(url) as store:
            assert store.count_reports() == len(expected)  # nothing else arrived
            for report_id in expected:
                stored = store.get_report(report_id)
                assert stored is not None and stored.via == "udp"
                # Verified again here, independently of the listener that stored it.
                verified = verify_report(stored.cose)
                assert verified.report_id == report_id
                assert verified.observer_key == identity.public_key
        assert stats["accepted"] == stats["stored"] == len(expected)
        assert not any(stats["dropped"].values()), stats  # type: ignore[attr-defined]
        assert stats["trust"] == {"unknown": len(expected)}
