"""Learned peers (docs/peers.md "Learned peers"), through what an operator touches: three real
``overflowd run`` daemons on loopback. A peers with B by config, B with C; A, with
``peering.learn``, learns C from B's ``GET /v1/peers``, pulls C's reports at the lowest trust,
lists the ``new_peer`` event and C as learned; a forged record and one over the cap are
refused and counted."""

from __future__ import annotations

import base64
import json
import socket
import time
from pathlib import Path

import httpx

from overflowd import report as rpt
from overflowd.identity import NodeIdentity, load_identity, sign_node_record, verify_node_record
from overflowd.store import Store, default_url
from overflowd.store import peers as peer_store
from tests.service.test_daemon import Daemon
from tests.service.test_peer_pull import init, now_ms, seed
from tests.support.cli import run

TIMEOUT_S = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_toml(name: str, url: str, key: bytes) -> str:
    return (
        f'[[peers]]\nname = "{name}"\nurl = "{url}"\nkey = "{base64.b64encode(key).decode()}"\n'
        "pull_interval_s = 1\npush = false\n"
    )


def records(daemon: Daemon, outcome: str) -> float:
    return daemon.metric(f'overflowd_peer_records_total{{outcome="{outcome}"}}')


def wait_for(check: object, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start(home: Path, *args: str) -> tuple[Daemon, str]:
    d = Daemon(home, "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *args)
    return d, d.line("api ").split(" ", 1)[1].removesuffix("v1/")


def test_a_learns_c_from_b_pulls_it_and_refuses_forged_and_over_cap(tmp_path: Path) -> None:
    home_a, home_b, home_c = (init(tmp_path, n) for n in "abc")
    key_b, key_c = (load_identity(h) for h in (home_b, home_c))
    port_c = free_port()
    url_c = f"http://127.0.0.1:{port_c}/"
    (home_c / "overflowd.toml").write_text(
        f'[node]\ncontacts = ["mailto:noc@c.example"]\n[peering]\napi_url = "{url_c}"\n'
    )
    c_reports = seed(home_c, 7, signer=key_c)  # C's own reports
    # Two records in B's store besides C's (which B fetches itself): D's, genuine but older
    # (over A's cap of one learned peer), and E's, its signature broken (forged).
    d, e = NodeIdentity(seed=bytes([41]) * 32), NodeIdentity(seed=bytes([42]) * 32)
    t = now_ms()
    rec_d = sign_node_record(
        d, contacts=(), point="", endpoint="http://127.0.0.1:9/", time_ms=t - 3_600_000
    )
    rec_e = bytearray(
        sign_node_record(e, contacts=(), point="", endpoint="http://127.0.0.1:9/", time_ms=t)
    )
    rec_e[-1] ^= 1
    with Store.open(default_url(home_b)) as store:
        peer_store.put_record(store, d.public_key, rec_d, record_ms=t - 3_600_000, now_ms=t)
        peer_store.put_record(store, e.public_key, bytes(rec_e), record_ms=t, now_ms=t)

    c, api_c = start(home_c, "--api", f"127.0.0.1:{port_c}")
    try:
        assert api_c == url_c
        (home_b / "overflowd.toml").write_text(peer_toml("c", api_c, key_c.public_key))
        b, api_b = start(home_b)
        try:
            # B's /v1/peers: C's record, as C served it, once B has pulled C.
            def c_listed() -> bool:
                doc = httpx.get(api_b + "v1/peers", timeout=10).json()
                keys = set()
                for item in doc["peers"]:
                    try:
                        keys.add(verify_node_record(rpt.b64url_decode(item["signed"])).key)
                    except Exception:  # E's, forged
                        pass
                return key_c.public_key in keys

            wait_for(c_listed, "B to list C's record")
            (home_a / "overflowd.toml").write_text(
                peer_toml("b", api_b, key_b.public_key)
                + "[peering]\nlearn = true\nlearn_allow_private = true\nmax_learned_peers = 1\n"
                "pull_retry_s = 0.2\nlearned_pull_interval_s = 1\n"
            )
            a, _ = start(home_a)
            try:
                learned = "learned-" + key_c.fingerprint
                stored = f'overflowd_peer_pull_reports_total{{outcome="stored",peer="{learned}"}}'
                seen = stored.replace('"stored"', '"duplicate"')
                # C's reports reach A through B too; from C, each is stored or a duplicate
                wait_for(lambda: a.metric(stored) + a.metric(seen) >= 7, "A to pull from C")
                wait_for(lambda: records(a, "over_limit") >= 1, "D refused over the cap")
                assert records(a, "learned") == 1
                assert records(a, "forged") >= 1
                # B goes away; what C says now, A has from C itself
                b.stop()
                c_reports += seed(home_c, 3, signer=key_c, start=50)
                wait_for(lambda: a.metric(stored) >= 3, "A to pull C's new reports from C")
                assert records(a, "learned") == 1  # nothing learned twice
                assert a.metric(stored) + a.metric(seen) == 10  # nothing twice
                assert a.metric("overflowd_peer_learned") == 1
            finally:
                code, out = a.stop()
            assert code == 0, out
            assert "Traceback" not in out
            assert out.count("peer_pull.learned ") == 1, out
        finally:
            if b.proc.poll() is None:
                b.stop()
    finally:
        c.stop()

    with Store.open(default_url(home_a)) as store:
        for rid in c_reports:
            got = store.get_report(rid)
            assert got is not None and got.via == "gossip" and got.trust == "unknown"
        assert peer_store.get_peer(store, d.public_key) is None
        assert peer_store.get_peer(store, e.public_key) is None
    events = run("overflowd-query", "events", "--json", "--home", str(home_a))
    assert events.code == 0, events.err
    listed = [json.loads(line) for line in events.out.splitlines()]
    assert [(ev["kind"], ev["fingerprint"], ev["sender"]) for ev in listed] == [
        ("new_peer", key_c.fingerprint, "b")
    ]
    assert listed[0]["new_contacts"] == ["mailto:noc@c.example"]
    peers = run("overflowd-query", "peers", "--json", "--home", str(home_a))
    assert peers.code == 0, peers.err
    rows = {r["name"]: r for r in map(json.loads, peers.out.splitlines())}
    assert rows["b"]["learned"] is False and rows["b"]["configured"] is True
    assert rows[learned]["learned"] is True and rows[learned]["configured"] is False
    assert rows[learned]["reports_in"] >= 3 and rows[learned]["url"] == url_c
    table = run("overflowd-query", "peers", "--home", str(home_a))
    assert table.code == 0, table.err
    line = next(x for x in table.out.splitlines() if x.startswith(learned))
    assert line.split()[3] == "yes", table.out
