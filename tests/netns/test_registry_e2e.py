"""End to end over a real link: a report from a node whose key is published is labelled ``dns``.

Two namespaces joined by one veth: A holds 192.0.2.1, B holds 198.51.100.1. Inside B, a real
Knot DNS server (knotd, on B's own 127.0.0.1) serves ``2.0.192.in-addr.arpa`` with A's key at
``_overflowd.1.2.0.192.in-addr.arpa``, and B runs the real daemon (``overflowd run``) with
``registry.nameservers`` pointing at it. From 192.0.2.1, A sends one report signed with its
published key and one signed with a key published nowhere; B stores the first as ``dns`` and
the second as ``unknown`` (``overflowd-query reports --json``). The sender address B walks up
from is the datagram's real source, not a configured stand-in.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from pathlib import Path

import pytest

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.registry import format_record, split_txt
from tests.support import netns
from tests.support.cli import BIN, run
from tests.support.knot import KnotServer, KnotUnavailable, find_knotd, soa_zone

pytestmark = pytest.mark.netns

A4, B4 = "192.0.2.1", "198.51.100.1"
DNS_PORT = 5353
STEP_TIMEOUT_S = 30.0
REPO = Path(__file__).resolve().parents[2]

#: Run inside A: sign one report with each seed given and send it to B in band.
SENDER = """
import socket, sys, time
sys.path.insert(0, sys.argv[1])
from overflowd.identity import NodeIdentity
from overflowd.wire import datagram
from tests.support.reports import make_payload
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for seed in sys.argv[3:]:
    identity = NodeIdentity(seed=bytes.fromhex(seed))
    report = identity.sign_report(make_payload(time_ms=int(time.time() * 1000)))
    s.sendto(datagram.to_wire(report.cose), (sys.argv[2], 65535))
    print(report.report_id)
"""

#: Run inside B: wait until the DNS server answers (bounded).
DNS_READY = """
import sys, time
import dns.message, dns.query
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    try:
        q = dns.message.make_query("2.0.192.in-addr.arpa.", "SOA")
        if dns.query.udp(q, "127.0.0.1", port=int(sys.argv[1]), timeout=0.2).answer:
            sys.exit(0)
    except Exception:
        time.sleep(0.05)
sys.exit(1)
"""


def txt(key: bytes, *contacts: str) -> str:
    return " ".join(f'"{s}"' for s in split_txt(format_record(key, contacts, None, None)))


def test_report_from_a_published_key_is_labelled_dns(tmp_path: Path) -> None:
    try:
        netns.require("ip", "ethtool", "sysctl")
        knotd = find_knotd()
    except (netns.NetnsUnavailable, KnotUnavailable) as exc:
        pytest.fail(f"registry netns test cannot run: {exc}", pytrace=False)
    netns.sweep_stale()
    published, unpublished = secrets.token_bytes(32), secrets.token_bytes(32)
    key = NodeIdentity(seed=published).public_key
    zone = soa_zone("2.0.192.in-addr.arpa", f"_overflowd.1 60 IN TXT {txt(key, 'mailto:a@a.test')}")
    # KnotServer writes the config and zone files; knotd itself runs inside B, on B's loopback.
    knot = KnotServer({"2.0.192.in-addr.arpa": zone})
    knot.base = tmp_path / "knot"
    knot.base.mkdir()
    knot.port = DNS_PORT
    knot._write_config()
    home = tmp_path / "b"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(f"""
[collector]
listen = ["127.0.0.1:0"]
[metrics]
listen = ""
[inband]
listen = "{B4}:65535"
[registry]
nameservers = ["127.0.0.1:{DNS_PORT}"]
timeout_s = 2.0
""")
    with netns.namespace(tmp_path) as a, netns.namespace(tmp_path) as b:
        link = netns.veth(a, b, [f"{A4}/24"], [f"{B4}/24"])
        a.run(["ip", "route", "add", "198.51.100.0/24", "dev", link.a_dev])
        b.run(["ip", "route", "add", "192.0.2.0/24", "dev", link.b_dev])
        b.spawn([knotd, "-c", str(knot.base / "knot.conf")], label="knotd")
        ready = b.run([sys.executable, "-c", DNS_READY, str(DNS_PORT)], check=False)
        assert ready.returncode == 0, knot.log_tail()
        node = b.spawn([str(BIN / "overflowd"), "run", "--home", str(home)], label="overflowd")
        node.wait_for_output(r"listening inband \S+", STEP_TIMEOUT_S)
        sent = a.run(
            [sys.executable, "-c", SENDER, str(REPO), B4, published.hex(), unpublished.hex()],
            timeout=STEP_TIMEOUT_S,
        )
        by_published, by_unpublished = sent.stdout.split()
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while True:
            listed = run("overflowd-query", "reports", "--json", "--home", str(home))
            rows = {r["report"]["id"]: r for r in map(json.loads, listed.out.splitlines())}
            # stored at once with the trust book's label, relabelled dns once DNS answered
            relabelled = rows.get(by_published, {}).get("trust") == "dns"
            if (len(rows) == 2 and relabelled) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert node.stop(grace=STEP_TIMEOUT_S) == 0, node.output()[-2000:]
    assert rows[by_published]["trust"] == "dns", rows
    assert rows[by_unpublished]["trust"] == "unknown", rows
    assert rows[by_published]["via"] == "udp"
    assert rpt.key_fingerprint(key) == rows[by_published]["report"]["observer"]["fingerprint"]
