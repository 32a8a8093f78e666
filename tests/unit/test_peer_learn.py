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
