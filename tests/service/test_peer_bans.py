"""Scores and bans end to end: one ``overflowd run`` daemon, an honest and a hostile peer.

The test speaks as both peers to the daemon's ``/v1/inbox`` on loopback (it holds their keys).
The hostile one sends a batch holding a forged report, a replayed request, a garbage body and
then a flood at ten times its inbound budget that ignores every Retry-After: it is banned and
turned away with 403 before anything is read, while the honest peer's pushes, one report each,
keep being accepted at the latency they had before (p50 before and during). The ban is in the
store: ``overflowd-query peers`` shows it while the daemon is down, and after a restart the
hostile peer is still refused at once.
"""

from __future__ import annotations

import json
import re
import statistics
import threading
import time
from pathlib import Path

import httpx
import trio

from overflowd import report as rpt
from overflowd.identity import NodeIdentity
from overflowd.peers import PeeringSettings, PeerSettings
from overflowd.services.peer_policy import PeerPolicy, PeerPolicyCollector
from overflowd.services.peer_pull import PeerPull, default_client
from overflowd.store import Store
from overflowd.store import peers as peer_store
from overflowd.wire import peering
from overflowd.wire import webhook as wh
from tests.service.test_daemon import Daemon
from tests.support.cli import run
from tests.support.node_key import node_key
from tests.support.postgres import free_port
from tests.support.reports import make_payload

HONEST = NodeIdentity(seed=b"\x41" * 32)
HOSTILE = NodeIdentity(seed=b"\x42" * 32)
OBSERVER = NodeIdentity(seed=b"\x43" * 32)
#: The hostile peer's inbound budget: 10 reports/s, burst 10; its flood sends 100/s.
BUDGET = "in_reports_per_s = 10.0\nin_reports_burst = 10\n"
HONEST_POSTS = 15
TIMEOUT_S = 20.0


def _peer(name: str, ident: NodeIdentity, port: int, extra: str = "") -> str:
    # Push and pull are off: the URL is never called (port 9, discard, on loopback).
    return (
        f'[[peers]]\nname = "{name}"\nurl = "http://127.0.0.1:{port}/"\n'
        f'key = "{ident.public_key_b64}"\npush = false\npull = false\n{extra}'
    )


_salt = iter(range(1, 10**9))


def _report() -> rpt.SignedReport:
    return OBSERVER.sign_report(make_payload(packets=next(_salt), time_ms=int(time.time() * 1000)))


def _post(
    client: httpx.Client, url: str, sender: NodeIdentity, body: bytes, *, at: int | None = None
) -> httpx.Response:
    ts = int(time.time()) if at is None else at
    headers = wh.sign(peering.message_id(body, node_key(url)), ts, body, sender.sign)
    headers[peering.HEADER_PEER] = sender.public_key_b64
    return client.post(url, content=body, headers=headers, timeout=10)


def _honest_latencies(client: httpx.Client, url: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        body = peering.encode_inbox([(_report().cose, 1)])
        t0 = time.perf_counter()
        r = _post(client, url, HONEST, body)
        out.append(time.perf_counter() - t0)
        assert r.status_code == 200, r.text
        assert r.json()["accepted"] == 1, r.text
        time.sleep(0.02)
    return out


def _metric(daemon: Daemon, name: str, **labels: str) -> float:
    text = httpx.get(daemon.metrics_url or "", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if (line.startswith(name + "{") or line.startswith(name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _start(home: Path) -> tuple[Daemon, str]:
    d = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--api", "127.0.0.1:0")
    api = d.line("api http").split()[-1]
    return d, api + "inbox"


def _hostile(url: str, statuses: list[int], stop: threading.Event) -> None:
    with httpx.Client() as c:
        forged = _report().cose
        forged = forged[:-1] + bytes([forged[-1] ^ 1])
        statuses.append(_post(c, url, HOSTILE, peering.encode_inbox([(forged, 1)])).status_code)
        old = peering.encode_inbox([(_report().cose, 1)])
        statuses.append(_post(c, url, HOSTILE, old, at=int(time.time()) - 3600).status_code)
        statuses.append(_post(c, url, HOSTILE, b'{"reports": "garbage"}').status_code)
        # The flood: 10 reports every 0.1 s (10x the budget), Retry-After ignored.
        deadline = time.monotonic() + TIMEOUT_S
        while not stop.is_set() and time.monotonic() < deadline:
            body = peering.encode_inbox([(_report().cose, 1) for _ in range(10)])
            statuses.append(_post(c, url, HOSTILE, body).status_code)
            time.sleep(0.1)


def test_a_hostile_peer_is_banned_and_the_honest_one_is_not_slowed(tmp_path: Path) -> None:
    home = tmp_path / "node"
    assert run("overflowd", "init", "--home", str(home)).code == 0
    (home / "overflowd.toml").write_text(
        _peer("honest", HONEST, 9) + _peer("hostile", HOSTILE, 10, BUDGET), encoding="utf-8"
    )
    daemon, url = _start(home)
    try:
        with httpx.Client() as client:
            before = _honest_latencies(client, url, HONEST_POSTS)
            statuses: list[int] = []
            stop = threading.Event()
            attacker = threading.Thread(target=_hostile, args=(url, statuses, stop), daemon=True)
            attacker.start()
            during = _honest_latencies(client, url, HONEST_POSTS)
            deadline = time.monotonic() + TIMEOUT_S
            while 403 not in statuses and time.monotonic() < deadline:
                time.sleep(0.05)
            during += _honest_latencies(client, url, HONEST_POSTS)  # and after the ban
            stop.set()
            attacker.join(timeout=TIMEOUT_S)
        # Forged (a signed batch with a forged report: 200 with it refused), replay, garbage,
        # then 429s until the ban, then 403s.
        assert statuses[:3] == [200, 401, 400], statuses[:10]
        assert 429 in statuses and 403 in statuses, statuses
        first_ban = statuses.index(403)
        assert set(statuses[first_ban:]) == {403}, statuses
        for event in ("forged", "replay", "malformed", "over_budget"):
            assert _metric(daemon, "overflowd_peer_events_total", peer="hostile", event=event)
        assert _metric(daemon, "overflowd_peer_banned", peer="hostile") == 1
        assert _metric(daemon, "overflowd_peer_banned", peer="honest") == 0
        assert _metric(daemon, "overflowd_peer_score", peer="honest") == 0
        assert _metric(daemon, "overflowd_peer_bans_total", peer="hostile") == 1
        assert (
            _metric(daemon, "overflowd_peer_banned_refused_total", peer="hostile", path="inbox")
            == len(statuses) - first_ban
        )
        p50_before, p50_during = statistics.median(before), statistics.median(during)
        # "Unchanged": within a small factor on a shared 2-core machine (a banned request
        # is a dict lookup; the honest peer has its own budget and its own checks).
        assert p50_during <= 2 * p50_before + 0.02, (p50_before, p50_during)
        print(f"honest p50 before {p50_before * 1000:.1f} ms, during {p50_during * 1000:.1f} ms")
    finally:
        code, output = daemon.stop()
    assert code == 0, output
    assert "peer_policy.banned peer=hostile" in output

    # Persisted: the store says so with the daemon down, and a restart keeps the ban.
    shown = run("overflowd-query", "peers", "--json", "--home", str(home))
    assert shown.code == 0, shown.err
    rows = {row["name"]: row for row in map(json.loads, shown.out.splitlines())}
    assert rows["hostile"]["state"] == "banned" and rows["hostile"]["ban_count"] == 1
    assert rows["hostile"]["ban_reason"].startswith("over_budget: score")
    assert rows["hostile"]["score"] < 0 and rows["honest"]["state"] != "banned"
    table = run("overflowd-query", "peers", "--home", str(home))
    assert "banned" in table.out and "over_budget" in table.out
    daemon, url = _start(home)
    try:
        with httpx.Client() as client:
            body = peering.encode_inbox([(_report().cose, 1)])
            refused = _post(client, url, HOSTILE, body)
            assert refused.status_code == 403 and int(refused.headers["retry-after"]) > 500
            assert _post(client, url, HONEST, body).json()["accepted"] == 1
    finally:
        code, output = daemon.stop()
    assert code == 0, output


# -- the policy's parts, through their library calls -----------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _ban(policy: PeerPolicy, name: str) -> None:
    for _ in range(4):
        policy.note(name, "forged")


def test_scores_and_bans_are_stored_and_taken_up_on_both_backends(store: Store) -> None:
    clock = _Clock()
    peers = [
        PeerSettings(name="good", url="http://127.0.0.1:9/", key=HONEST.public_key),
        PeerSettings(name="bad", url="http://127.0.0.1:10/", key=HOSTILE.public_key),
    ]
    policy = PeerPolicy(store, peers, wall_clock=clock)
    policy.note("good", "malformed")
    _ban(policy, "bad")
    assert policy.banned(HOSTILE.public_key) and not policy.banned(HONEST.public_key)
    assert policy.flush() == 2 and policy.flush() == 0  # only what changed is written
    rows = {r.name: r for r in peer_store.list_peers(store)}
    assert rows["bad"].ban_count == 1 and rows["bad"].ban_reason == (
        "forged: score -100 at or below -100"
    )
    assert rows["bad"].banned_until_ms == int(clock.now * 1000) + 600_000
    assert rows["good"].score == -10.0 and rows["good"].banned_until_ms is None
    again = PeerPolicy(store, peers, wall_clock=clock)
    assert not again.banned(HOSTILE.public_key)
    again.load()
    assert again.banned(HOSTILE.public_key) and not again.banned(HONEST.public_key)
    clock.now += 600
    assert not again.banned(HOSTILE.public_key)  # the ban ended; the next one is twice as long
    _ban(again, "bad")
    assert again.banned_until_ms(HOSTILE.public_key) == int(clock.now * 1000) + 1_200_000


def test_a_banned_peers_pull_rounds_are_skipped_until_the_ban_ends(tmp_path: Path) -> None:
    clock = _Clock()
    # Nothing listens on the peer's port: a round that is not skipped fails to connect.
    peer = PeerSettings(name="bad", url=f"http://127.0.0.1:{free_port()}/", key=HOSTILE.public_key)
    settings = PeeringSettings(pull_connect_timeout_s=1.0, pull_timeout_s=2.0)
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        policy = PeerPolicy(store, [peer], wall_clock=clock)
        pull = PeerPull([peer], settings, store, policy=policy, wall_clock=clock)

        async def round_() -> bool:
            async with default_client(settings) as client:
                return await pull.pull_round(client, peer)

        assert trio.run(round_) is False  # not banned: it tries, and cannot connect
        _ban(policy, "bad")
        assert trio.run(round_) is True  # banned: skipped, nothing asked
        assert policy.statistics().refused == {("bad", "pull"): 1}
        clock.now += 601
        assert trio.run(round_) is False


def test_the_policy_metric_families_are_documented(tmp_path: Path) -> None:
    section = (
        (Path(__file__).resolve().parents[2] / "docs" / "daemon.md")
        .read_text(encoding="utf-8")
        .split("## What the metrics say", 1)[1]
    )
    peer = PeerSettings(name="p", url="http://127.0.0.1:9/", key=HOSTILE.public_key)
    with Store.open(f"sqlite:///{tmp_path / 'node.db'}") as store:
        policy = PeerPolicy(store, [peer])
        _ban(policy, "p")
        policy.refused(HOSTILE.public_key, "inbox")
        families = list(PeerPolicyCollector(policy).collect())
    assert len(families) == 5
    for m in families:
        name = m.name + ("_total" if m.type == "counter" else "")
        assert re.search(rf"`{name}[`{{]", section), f"{name} is not in daemon.md"
        row = next(line for line in section.splitlines() if f"`{name}`" in line)
        for label in {k for sample in m.samples for k in sample.labels}:
            assert f"`{label}`" in row, f"{name}: label {label} is not in its row"
