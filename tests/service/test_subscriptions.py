"""Subscriptions end to end: one ``overflowd run`` daemon, a real Knot DNS server on loopback
publishing ``_overflowd`` records, and a subscriber peer whose inbox is a small HTTP server in
this test.

192.0.2.0/24 publishes the subscriber's key: accepted, and a report whose destination is in it
is pushed to the subscriber's inbox (the subscriber has ``push = false``: it gets only what it
subscribed to). 198.51.100.0/24 publishes another key, 203.0.113.0/24 publishes nothing, and
a /4, a prefix with host bits set and a prefix given twice are malformed: each refused with its
reason. A request signed by a key that is not the named peer's is 401.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.registry import format_record, split_txt
from overflowd.store import Store, default_url
from overflowd.wire import peering
from overflowd.wire import webhook as wh
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.knot import KnotServer, running_knot, soa_zone
from tests.support.node_key import node_key
from tests.support.reports import make_payload

SUBSCRIBER = NodeIdentity(seed=b"\x51" * 32)
OTHER = NodeIdentity(seed=b"\x52" * 32)
OBSERVER = NodeIdentity(seed=b"\x53" * 32)
TIMEOUT_S = 30.0


def _txt(key: bytes) -> str:
    return " ".join(f'"{s}"' for s in split_txt(format_record(key, ("mailto:noc@sub.test",))))


ZONES = {
    "2.0.192.in-addr.arpa": soa_zone(
        "2.0.192.in-addr.arpa", f"_overflowd 60 IN TXT {_txt(SUBSCRIBER.public_key)}"
    ),
    "100.51.198.in-addr.arpa": soa_zone(
        "100.51.198.in-addr.arpa", f"_overflowd 60 IN TXT {_txt(OTHER.public_key)}"
    ),
    # The parent, so the walk-up for 203.0.113.0/24 gets NXDOMAIN (nothing published).
    "in-addr.arpa": soa_zone("in-addr.arpa", "", negative_ttl=30),
}


class _Inbox(BaseHTTPRequestHandler):
    """The subscriber's inbox: records every body, answers every report accepted."""

    received: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        n = peering.decode_inbox(body, content_type=self.headers["content-type"]).total
        type(self).received.append(body)
        answer = json.dumps({"accepted": n, "duplicates": 0, "refused": []}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def knot() -> Iterator[KnotServer]:
    with running_knot(ZONES) as server:
        yield server


def _signed(
    url: str, sender: NodeIdentity, body: bytes, named: NodeIdentity | None = None
) -> dict[str, str]:
    msg_id = peering.message_id(body, node_key(url))
    headers = wh.sign(msg_id, int(time.time()), body, sender.sign)
    headers[peering.HEADER_PEER] = (named or sender).public_key_b64
    return headers


def _report(src: str, dst: str) -> rpt.SignedReport:
    return OBSERVER.sign_report(make_payload(src, dst, time_ms=int(time.time() * 1000)))


def test_a_subscription_is_accepted_only_where_dns_names_the_key(
    knot: KnotServer, tmp_path: Path
) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Inbox)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sub_url = f"http://127.0.0.1:{server.server_address[1]}/"
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(
        f'[registry]\nnameservers = ["{knot.address}"]\n\n'
        f'[[peers]]\nname = "sub"\nurl = "{sub_url}"\nkey = "{SUBSCRIBER.public_key_b64}"\n'
        "push = false\npull = false\n",
        encoding="utf-8",
    )
    daemon = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--api",
                    "127.0.0.1:0")  # fmt: skip
    try:
        api = daemon.line("api http").split()[-1]
        url = api + "subscriptions"
        prefixes = [
            "192.0.2.0/24",
            "198.51.100.0/24",
            "203.0.113.0/24",
            "16.0.0.0/4",
            "192.0.2.1/24",
            "192.0.2.0/24",
        ]
        body = json.dumps({"prefixes": prefixes, "endpoint": sub_url + "v1/inbox"}).encode()
        # Signed by another key while naming the subscriber: refused, nothing stored.
        forged = httpx.post(url, content=body, headers=_signed(url, OTHER, body, SUBSCRIBER))
        assert forged.status_code == 401, forged.text
        r = httpx.post(url, content=body, headers=_signed(url, SUBSCRIBER, body), timeout=20)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["accepted"] == ["192.0.2.0/24"]
        reasons = {x["prefix"]: x["reason"] for x in answer["refused"]}
        assert reasons["198.51.100.0/24"].startswith(
            "the _overflowd record at _overflowd.100.51.198.in-addr.arpa names another key"
        )
        assert reasons["203.0.113.0/24"] == "no _overflowd record for the prefix"
        assert reasons["16.0.0.0/4"] == "shorter than /8"
        assert reasons["192.0.2.1/24"].startswith("not a prefix")
        assert len(answer["refused"]) == 5  # the repeated 192.0.2.0/24 too
        wrong = json.dumps({"prefixes": ["192.0.2.0/24"], "endpoint": "http://127.0.0.9/"})
        bad = httpx.post(url, content=wrong, headers=_signed(url, SUBSCRIBER, wrong.encode()))
        assert bad.status_code == 400 and "configured inbox" in bad.text
        listed = httpx.get(url, headers=_signed(url, SUBSCRIBER, b""))
        assert listed.json() == {
            "subscriptions": [{"prefix": "192.0.2.0/24", "endpoint": sub_url + "v1/inbox"}]
        }

        # Reports: outside first (seq order), then inside; only the inside one is pushed.
        outside, inside = (
            _report("198.51.100.7", "203.0.113.9"),
            _report("203.0.113.9", "192.0.2.77"),
        )
        now = int(time.time() * 1000)
        with Store.open(default_url(home)) as store:
            store.add_reports([(outside, now, "import"), (inside, now, "import")])
        deadline = time.monotonic() + TIMEOUT_S
        while not _Inbox.received and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _Inbox.received, "the subscribed report never reached the subscriber"
        time.sleep(1.0)  # anything else the tail would send has had its turn
        pushed = [
            rpt.b64url(i.cose)
            for b in _Inbox.received
            for i in peering.decode_inbox(b, content_type=peering.CBOR).items
        ]
        assert pushed == [rpt.b64url(inside.cose)]
        assert 'reason="not_subscribed"' in httpx.get(daemon.metrics_url or "").text
    finally:
        code, output = daemon.stop()
        server.shutdown()
    assert code == 0, output
