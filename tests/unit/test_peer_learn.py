"""Learned peers, sans-IO and store parts: the /v1/peers list codec, a learned endpoint, the
learned peer's settings, the config keys, and peer_records keeping the newest record."""

from __future__ import annotations

import json
import time

import pytest

from overflowd import report as rpt
from overflowd.identity import NodeIdentity, sign_node_record, verify_node_record
from overflowd.peers import (
    MAX_NODE_RECORD_BYTES,
    PeeringSettings,
    PeerListError,
    learned_endpoint,
    learned_peer,
    parse_peer_list,
)
from overflowd.store import Store
from overflowd.store import peers as peer_store

NODE = NodeIdentity(seed=bytes([5]) * 32)


def record(t: int, endpoint: str = "http://192.0.2.1:9591/") -> bytes:
    return sign_node_record(NODE, contacts=("mailto:a@b",), point="p", endpoint=endpoint, time_ms=t)


def test_peer_list_keeps_entries_and_marks_bad_ones() -> None:
    good = record(1)
    body = json.dumps(
        {"peers": [{"signed": rpt.b64url(good)}, {"signed": "!!"}, {"x": 1}, 7,
                   {"signed": "A" * (2 * MAX_NODE_RECORD_BYTES + 1)}]}
    ).encode()  # fmt: skip
    assert parse_peer_list(body) == [good, None, None, None, None]


@pytest.mark.parametrize(
    "body", [b"[", b"[]", b'{"peers": 3}', b'{"peers": [{}, {}, {}]}', b'{"a": 1}']
)
def test_peer_list_refused_as_a_whole(body: bytes) -> None:
    with pytest.raises(PeerListError):
        parse_peer_list(body, max_records=2)


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://h/",
        "http:///x",
        "http://u:p@h/",
        "http://h/?q=1",
        "http://h/#f",
        "http://h:99999/",
    ],
)
def test_learned_endpoint_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        learned_endpoint(url)


def test_learned_endpoint_and_settings() -> None:
    assert learned_endpoint("https://n.example:9591") == "https://n.example:9591/"
    rec = verify_node_record(record(int(time.time() * 1000)))
    peer = learned_peer(rec, "http://192.0.2.1:9591/", 5.0)
    assert (peer.trust, peer.push, peer.pull, peer.pull_interval_s) == ("unknown", False, True, 5)
    assert peer.name == "learned-" + NODE.fingerprint and peer.key == NODE.public_key


def test_learning_settings_checked() -> None:
    assert PeeringSettings().learn is False and PeeringSettings().learn_allow_private is False
    assert PeeringSettings().max_learned_peers == 16
    assert [k for k, _ in PeeringSettings(max_learned_peers=257).problems()] == [
        "max_learned_peers"
    ]
    assert [k for k, _ in PeeringSettings(learned_pull_interval_s=0.5).problems()] == [
        "learned_pull_interval_s"
    ]


def test_peer_records_keep_the_newest(store: Store) -> None:
    old, new = record(1000), record(2000)
    peer_store.put_record(store, NODE.public_key, new, record_ms=2000, now_ms=5)
    peer_store.put_record(store, NODE.public_key, old, record_ms=1000, now_ms=6)  # a replay
    assert peer_store.list_records(store, limit=10) == [new]
    other = NodeIdentity(seed=bytes([6]) * 32)
    rec = sign_node_record(other, contacts=(), point="", endpoint="", time_ms=3000)
    peer_store.put_record(store, other.public_key, rec, record_ms=3000, now_ms=7)
    assert peer_store.list_records(store, limit=10) == [rec, new]
    assert peer_store.list_records(store, limit=1) == [rec]
    with pytest.raises(ValueError):
        peer_store.put_record(store, b"x", rec, record_ms=1, now_ms=1)


def _consider(store: Store, signed: bytes | None, **peering: object) -> str:
    import trio

    from overflowd.peers import PeerSettings
    from overflowd.services.peer_pull import PeerPull

    async def resolve(host: str, port: int) -> list[object]:
        import ipaddress

        return [ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("10.1.2.3")]

    via = PeerSettings(name="b", url="http://127.0.0.1:1/", key=bytes([9]) * 32)
    pull = PeerPull(
        [via], PeeringSettings(learn=True, **peering), store,  # type: ignore[arg-type]
        own_key=NodeIdentity(seed=bytes([8]) * 32).public_key, resolve=resolve,  # type: ignore[arg-type]
    )  # fmt: skip
    return trio.run(pull._consider, via, signed)


@pytest.mark.parametrize(
    ("endpoint", "age_ms", "peering", "outcome"),
    [
        ("http://127.0.0.1:9591/", 0, {}, "internal"),  # loopback, learn_allow_private off
        ("http://[::ffff:10.0.0.1]:9591/", 0, {}, "internal"),
        ("http://node.example:9591/", 0, {}, "internal"),  # one resolved address is private
        ("", 0, {}, "bad_endpoint"),
        ("ftp://8.8.8.8/", 0, {}, "bad_endpoint"),
        ("http://8.8.8.8:9591/", 2 * 86_400_000, {}, "stale"),
        ("http://8.8.8.8:9591/", -3_600_000, {}, "stale"),  # dated an hour ahead
        ("http://8.8.8.8:9591/", 0, {"max_learned_peers": 0}, "over_limit"),
        ("http://127.0.0.1:9591/", 0, {"max_learned_peers": 0, "learn_allow_private": True},
         "over_limit"),
    ],
)  # fmt: skip
def test_a_listed_record_is_refused_and_counted(
    store: Store, endpoint: str, age_ms: int, peering: dict[str, object], outcome: str
) -> None:
    signed = record(int(time.time() * 1000) - age_ms, endpoint)
    assert _consider(store, signed, **peering) == outcome
    assert peer_store.list_peers(store) == []  # nothing stored for a refused record


def test_forged_malformed_and_known_records(store: Store) -> None:
    t = int(time.time() * 1000)
    forged = bytearray(record(t))
    forged[-1] ^= 1
    assert _consider(store, bytes(forged)) == "forged"
    assert _consider(store, b"\xa0") == "malformed"
    assert _consider(store, None) == "malformed"
    me = NodeIdentity(seed=bytes([8]) * 32)  # PeerPull's own key above
    mine = sign_node_record(me, contacts=(), point="", endpoint="http://8.8.8.8/", time_ms=t)
    assert _consider(store, mine) == "known"
