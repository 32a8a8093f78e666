"""Pulling reports from peers (docs/peers.md), through what an operator touches: two real
``overflowd run`` daemons on loopback, ``[[peers]]`` in B's config, B's metrics and store and
``overflowd-query peers``; hostile peers served by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import base64
import functools
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio

from overflowd import report as rpt
from overflowd.config import ApiSettings
from overflowd.identity import NodeIdentity, load_identity, verify_node_record, write_identity
from overflowd.peers import PeeringSettings, PeerSettings
from overflowd.services.api import ApiContext, ApiService
from overflowd.services.peer_pull import PeerPull, default_client, parse_page
from overflowd.store import Store, default_url
from overflowd.store import peers as peer_store
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.reports import make_payload

TIMEOUT_S = 60
OBSERVER = NodeIdentity(seed=bytes(range(7, 39)))


def now_ms() -> int:
    return int(time.time() * 1000)


def seed(home: Path, n: int, *, signer: NodeIdentity = OBSERVER, start: int = 0) -> list[str]:
    """Store ``n`` fresh reports in a node's store (as an import would); their ids."""
    t = now_ms()
    reports = [
        signer.sign_report(
            make_payload(dst=f"198.51.{(start + i) // 250}.{(start + i) % 250}", time_ms=t)
        )
        for i in range(n)
    ]
    with Store.open(default_url(home)) as store:
        store.add_reports([(r, t, "import") for r in reports])
    return [r.report_id for r in reports]


def init(tmp_path: Path, name: str) -> Path:
    """A node home with its identity (what `overflowd init` makes; the config is the test's)."""
    home = tmp_path / name
    write_identity(home, NodeIdentity.generate())
    return home


def metric(daemon: Daemon, family: str, **labels: str) -> float:
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as exposed
    return daemon.metric(f"overflowd_peer_pull_{family}_total{{{inner}}}")


def wait(daemon: Daemon, family: str, value: float, **labels: str) -> float:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        got = metric(daemon, family, **labels)
        if got >= value:
            return got
        time.sleep(0.05)
    return metric(daemon, family, **labels)


# -- hostile peers ------------------------------------------------------------------------------


HOSTILE = {
    name: NodeIdentity(seed=bytes([i]) * 32)
    for i, name in enumerate(("forged", "garbage", "huge"), 1)
}


def _hostile_pages() -> dict[str, bytes]:
    t = now_ms()
    good = OBSERVER.sign_report(make_payload(dst="203.0.113.1", time_ms=t))
    forged = bytearray(OBSERVER.sign_report(make_payload(dst="203.0.113.2", time_ms=t)).cose)
    forged[-1] ^= 1  # the signature's last byte
    stale = OBSERVER.sign_report(make_payload(dst="203.0.113.3", time_ms=t - 30 * 86_400_000))

    def entry(cose: bytes) -> dict[str, object]:
        return {"seq": 1, "report": {"cose": rpt.b64url(cose)}}

    page = {
        "reports": [entry(good.cose), entry(bytes(forged)), entry(stale.cose), {"x": 1}],
        "next": 4,
    }
    return {
        "forged": json.dumps(page).encode(),
        "garbage": b'{"reports": [ not json',
        "huge": json.dumps({"reports": [], "next": 0, "pad": "x" * 300_000}).encode(),
    }


class _Hostile(BaseHTTPRequestHandler):
    pages: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        name = url.path.strip("/").split("/")[0]
        after = int(parse_qs(url.query).get("after", ["0"])[0])
        body = self.pages.get(name, b"{}") if after == 0 else b'{"reports": [], "next": 4}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[str]:
    _Hostile.pages = _hostile_pages()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# -- catch-up between two daemons ----------------------------------------------------------------


def test_b_catches_up_after_downtime_nothing_twice_and_shrugs_off_hostile_peers(
    tmp_path: Path, hostile: str
) -> None:
    home_a, home_b = init(tmp_path, "a"), init(tmp_path, "b")
    key_a = load_identity(home_a)
    (home_a / "overflowd.toml").write_text(
        '[node]\ncontacts = ["mailto:noc@a.example"]\nobservation_point = "edge-a"\n'
        '[peering]\napi_url = "http://a.example:9591/"\n'
    )
    a = Daemon(home_a, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
    try:
        api_a = a.line("api ").split(" ", 1)[1].removesuffix("v1/")
        # A's /v1/identity carries its signed record: it verifies, and says what A is.
        doc = httpx.get(api_a + "v1/identity", timeout=10).json()
        record = verify_node_record(rpt.b64url_decode(doc["signed"]), now_ms=now_ms())
        assert record.key == key_a.public_key and record.point == "edge-a"
        assert record.contacts == ("mailto:noc@a.example",)
        assert record.endpoint == "http://a.example:9591/"

        first = seed(home_a, 30) + seed(home_a, 5, signer=key_a, start=30)  # 5 of A's own
        peers = [("a", api_a, key_a.public_key)] + [
            (name, f"{hostile}{name}/", ident.public_key) for name, ident in HOSTILE.items()
        ]
        (home_b / "overflowd.toml").write_text(
            "".join(
                f'[[peers]]\nname = "{n}"\nurl = "{u}"\nkey = "{base64.b64encode(k).decode()}"\n'
                "pull_interval_s = 1\n"
                for n, u, k in peers
            )
            + "[peering]\npull_page_reports = 8\npull_max_body_bytes = 100000\npull_retry_s = 0.2\n"
        )
        b = Daemon(home_b, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
        try:
            assert wait(b, "reports", 35, peer="a", outcome="stored") == 35
            # each hostile peer: counted, dropped; its good report stored, B running
            assert wait(b, "dropped", 1, peer="forged", reason="forged") == 1
            assert metric(b, "dropped", peer="forged", reason="stale") == 1
            assert metric(b, "dropped", peer="forged", reason="malformed") == 1
            assert metric(b, "reports", peer="forged", outcome="stored") == 1
            assert wait(b, "errors", 2, peer="garbage", kind="bad_json") >= 2  # asked again
            assert wait(b, "errors", 2, peer="huge", kind="too_large") >= 2
            # ...and the honest peer is still pulled, every second, from its cursor
            more = seed(home_a, 3, start=100)
            assert wait(b, "reports", 38, peer="a", outcome="stored") == 38
            assert metric(b, "reports", peer="a", outcome="duplicate") == 0
            assert b.proc.poll() is None
        finally:
            code, out = b.stop()
        assert code == 0, out
        assert "Traceback" not in out
        with Store.open(default_url(home_a)) as store:
            a_last = store.last_seq()
        with Store.open(default_url(home_b)) as store:
            row = peer_store.get_peer(store, key_a.public_key)
            assert row is not None and row.pull_cursor == a_last  # durable, where A's end
            assert (row.reports_in, row.duplicates) == (38, 0)
            for rid in first + more:
                stored = store.get_report(rid)
                assert stored is not None and stored.via == "gossip"
            # A's own reports get A's configured trust (pinned); others the observer's own
            assert {store.get_report(r).trust for r in first[30:]} == {"pinned"}  # type: ignore[union-attr]
            assert {store.get_report(r).trust for r in first[:30]} == {"unknown"}  # type: ignore[union-attr]

        # B is down; traffic goes on at A.
        missed = seed(home_a, 40, start=200)
        b = Daemon(home_b, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
        try:
            assert wait(b, "reports", 40, peer="a", outcome="stored") == 40
            time.sleep(1.5)  # another round or two: nothing more comes, nothing twice
            assert metric(b, "reports", peer="a", outcome="stored") == 40
            assert metric(b, "reports", peer="a", outcome="duplicate") == 0
            listed = run("overflowd-query", "peers", "--json", "--home", str(home_b))
            table = run("overflowd-query", "peers", "--home", str(home_b))
        finally:
            code, out = b.stop()
        assert code == 0, out
    finally:
        a.stop()
    with Store.open(default_url(home_b)) as store:
        assert all(store.get_report(r) is not None for r in missed)
        assert store.count_reports() == 35 + 3 + 40 + 1  # A's, once each, and forged's good one
    assert listed.code == 0, listed.err
    rows = {d["name"]: d for d in map(json.loads, listed.out.splitlines())}
    assert list(rows) == ["a", "forged", "garbage", "huge"]
    assert rows["a"]["state"] == "ok" and rows["a"]["fingerprint"] == key_a.fingerprint
    assert (rows["a"]["reports_in"], rows["a"]["duplicates"], rows["a"]["pull_cursor"]) == (
        78,
        0,
        a_last + 40,
    )
    assert rows["a"]["last_contact"] is not None and rows["a"]["outbox"] == 0
    assert rows["garbage"]["state"] == "failing" and "bad_json" in rows["garbage"]["last_error"]
    assert rows["huge"]["state"] == "failing" and "too_large" in rows["huge"]["last_error"]
    assert table.code == 0 and table.out.splitlines()[0].split()[:3] == ["NAME", "STATE", "KEY"]
    assert "garbage: pull bad_json" in table.err


# -- a peer whose store was reset: 409, from 0 again --------------------------------------------


async def test_a_reset_peer_is_pulled_from_0_again_and_says_so(
    tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """B's cursor is beyond A's last report (A's database was recreated): A answers 409, B
    starts from 0, stores what it lacks, counts the rest as duplicates, and says why."""
    ident_a = NodeIdentity.generate()
    with Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store_a, trio.fail_after(TIMEOUT_S):
        t = now_ms()
        reports = [
            OBSERVER.sign_report(make_payload(dst=f"192.0.2.{i}", time_ms=t)) for i in range(12)
        ]
        store_a.add_reports([(r, t, "import") for r in reports])
        store.add_reports([(r, t, "udp") for r in reports[:4]])  # B had some already
        ctx = ApiContext(identity=ident_a, contacts=(), observation_point="", store=store_a)
        api = ApiService(ApiSettings(listen="127.0.0.1:0"), ctx)
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(api.run)
            peer = PeerSettings(name="a", url=f"http://{host}:{port}/", key=ident_a.public_key)
            peer_store.ensure_peer(store, peer.key, name="a", url=peer.url, now_ms=t)
            peer_store.advance_pull_cursor(store, peer.key, 5000, now_ms=t)
            pull = PeerPull([peer], PeeringSettings(pull_page_reports=5), store)
            async with default_client(pull.peering) as client:
                assert await pull.pull_round(client, peer)
            api.stop()
    s = pull.statistics().peers["a"]
    assert (s.resets, s.stored, s.duplicates, s.pages, s.cursor) == (1, 8, 4, 3, 12)
    row = peer_store.get_peer(store, peer.key)
    assert row is not None and row.pull_cursor == 12
    assert row.last_error is not None and "409" in row.last_error and "from 0" in row.last_error
    assert store.count_reports() == 12
    assert [r for r in caplog.records if "peer_pull.cursor_reset" in r.getMessage()]


# -- the page contract, without a network --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"[]", "bad_json"),
        (b'{"reports": {}, "next": 1}', "bad_json"),
        (b'{"reports": [], "next": true}', "bad_json"),
        (b'{"reports": [], "next": 9}', "bad_page"),  # below our cursor 10
        (json.dumps({"reports": [{}] * 6, "next": 20}).encode(), "bad_page"),  # over limit
        (json.dumps({"reports": [{}] * 5, "next": 10}).encode(), "bad_page"),  # full, no progress
        (b"[" * 100_000, "bad_json"),  # deep nesting: RecursionError is ours
    ],
)
def test_a_page_that_breaks_the_contract_is_refused_whole(body: bytes, kind: str) -> None:
    from overflowd.services.peer_pull import PageError

    with pytest.raises(PageError) as info:
        parse_page(body, after=10, limit=5, now_ms=now_ms(), peering=PeeringSettings())
    assert info.value.kind == kind


# -- one peer that never answers delays no other ------------------------------------------------


async def test_a_stalled_peer_delays_no_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that accepts the connection and never answers holds only its own task: the
    honest peer is pulled (and pulled again for new reports) while the stalled request waits
    for its timeout, which then ends as a counted `timeout` and a rate-limited warning."""
    ident_a, ident_s = NodeIdentity.generate(), NodeIdentity.generate()
    held: list[trio.SocketStream] = []

    async def stall(stream: trio.SocketStream) -> None:
        held.append(stream)  # read nothing, answer nothing
        await trio.sleep_forever()

    with (
        Store.open(f"sqlite:///{tmp_path / 'a.db'}") as store_a,
        Store.open(f"sqlite:///{tmp_path / 'b.db'}") as store_b,
        trio.fail_after(TIMEOUT_S),
    ):
        t = now_ms()
        first = [
            OBSERVER.sign_report(make_payload(dst=f"192.0.2.{i}", time_ms=t)) for i in range(6)
        ]
        store_a.add_reports([(r, t, "import") for r in first])
        api = ApiService(
            ApiSettings(listen="127.0.0.1:0"),
            ApiContext(identity=ident_a, contacts=(), observation_point="", store=store_a),
        )
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(api.run)
            (listener,) = await nursery.start(
                functools.partial(trio.serve_tcp, stall, 0, host="127.0.0.1")
            )
            stall_port = listener.socket.getsockname()[1]
            honest = PeerSettings(
                "a", f"http://{host}:{port}/", ident_a.public_key, pull_interval_s=60
            )
            stalled = PeerSettings("s", f"http://127.0.0.1:{stall_port}/", ident_s.public_key)
            pull = PeerPull([stalled, honest], PeeringSettings(pull_timeout_s=3.0), store_b)
            await nursery.start(pull.run)
            started = trio.current_time()
            while pull.statistics().peers["a"].stored < 6:
                await trio.sleep(0.02)
            more = [
                OBSERVER.sign_report(make_payload(dst=f"192.0.2.{i}", time_ms=t))
                for i in range(6, 9)
            ]
            store_a.add_reports([(r, t, "import") for r in more])
            pull.wake("a")  # a round now, not at the next interval
            while pull.statistics().peers["a"].stored < 9:
                await trio.sleep(0.02)
            honest_done = trio.current_time() - started
            waiting = pull.statistics().peers["s"]
            while pull.statistics().peers["s"].errors["timeout"] < 1:
                await trio.sleep(0.05)
            pull.stop()
            api.stop()
            nursery.cancel_scope.cancel()
    assert held, "the stalled peer was asked"
    assert honest_done < 3.0 and waiting.errors["timeout"] == 0 and waiting.pages == 0
    s = pull.statistics().peers
    assert (s["a"].stored, s["a"].duplicates, s["s"].stored) == (9, 0, 0)
    assert [r for r in caplog.records if "peer_pull.failed peer=s kind=timeout" in r.getMessage()]
