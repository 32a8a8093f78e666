"""The node's per-batch boundary around the sFlow array path (NodeService._decode_batch):
if decode_sflow_batch raised (a bug some input reaches), the batch's datagrams are decoded
the scalar way instead, none lost and none counted twice; if sampling the arrays raised,
the datagrams decoded the scalar way are still reported."""

from __future__ import annotations

from ipaddress import ip_address
from pathlib import Path

import pytest

from overflowd.config import Settings
from overflowd.flowsample import SamplingPolicy
from overflowd.flowsample_batch import BatchSampler
from overflowd.identity import NodeIdentity
from overflowd.services import node as node_module
from overflowd.services.collector import Datagram
from overflowd.services.node import NodeService
from overflowd.store import Store
from overflowd.wire import DecoderState, decode_datagram_rows
from tests.unit.test_sflow_batch import COMMON, V4_TCP, flow, raw
from tests.unit.test_wire_encoder import sflow_datagram, sflow_gateway

NOW = 1_700_000_000.0
FIELDS = ("src", "dst", "sport", "dport", "proto", "packets", "bytes", "tcp_flags", "tos")


def batch() -> list[Datagram]:
    odd = sflow_datagram([flow(raw(V4_TCP), sflow_gateway(64500, [1, 2]))])  # the scalar way
    datagrams = [sflow_datagram(COMMON[k : k + 5], sub_agent=k) for k in range(0, 15, 5)]
    datagrams += [odd, datagrams[0][:50]]  # and one refused
    return [Datagram(d, "192.0.2.1", NOW + k) for k, d in enumerate(datagrams)]


def records(datagrams: list[Datagram]) -> tuple[list[tuple[str, ...]], DecoderState]:
    state = DecoderState()
    rows = []
    for d in datagrams:
        try:
            rows += decode_datagram_rows(d.data, d.exporter, state, d.received)
        except Exception:
            pass
    return sorted(tuple(str(getattr(r, n)) for n in FIELDS) for r in rows), state


def reported(node: NodeService, datagrams: list[Datagram]) -> list[tuple[str, ...]]:
    signed = [s for step in node._decode_batch(datagrams) for s in step]
    return sorted(tuple(str(getattr(s.payload.flow, n)) for n in FIELDS) for s in signed)


@pytest.fixture
def node(tmp_path: Path) -> NodeService:
    store = Store.open(f"sqlite:///{tmp_path / 'node.db'}")
    return NodeService(NodeIdentity.generate(), Settings(), store, rate=1.0)


async def test_the_array_path_reports_every_record(node: NodeService) -> None:
    datagrams = batch()
    expected, state = records(datagrams)
    assert len(expected) > 10
    assert reported(node, datagrams) == expected
    assert node.decoder.statistics() == state.statistics()
    assert node._input_errors == {}


async def test_when_the_sflow_batch_raises_the_batch_goes_the_scalar_way(
    node: NodeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise IndexError("a bug some input reaches")

    monkeypatch.setattr(node_module, "decode_sflow_batch", broken)
    datagrams = batch()
    expected, state = records(datagrams)
    assert reported(node, datagrams) == expected
    assert node.decoder.statistics() == state.statistics()
    assert node._input_errors == {"IndexError": 1}


async def test_when_sampling_the_arrays_raises_the_scalar_datagrams_are_still_reported(
    node: NodeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> None:
        raise ValueError("a sampler bug")

    monkeypatch.setattr(node.batch_sampler, "sample", broken)
    datagrams = batch()
    expected, _ = records(datagrams[3:])  # the gateway one (and the refused one)
    assert len(expected) == 1
    assert reported(node, datagrams) == expected
    assert node.decoder.statistics().records == records(datagrams)[1].statistics().records
    assert node._input_errors == {"ValueError": 1}


async def test_ipv6_records_get_their_asked_boost_through_the_scalar_sampler(
    node: NodeService,
) -> None:
    """With an asked boost on, IPv6 records of the array path are sampled the scalar way:
    the batch sampler would look up 0.0.0.0 for them (their IPv4 columns)."""
    asked = ip_address("2001:db8:1::2")  # V6_TCP's destination, in COMMON

    def boost(address: object) -> float | None:
        return 1e15 if address == asked else None

    policy = SamplingPolicy(rate=1e-15, boost_cap=1e15, asked_boost=boost)
    node.sampler.policy = policy
    node.batch_sampler = BatchSampler(policy)
    datagrams = batch()
    rows, _ = records(datagrams)
    got = reported(node, datagrams)
    assert got and got == sorted(r for r in rows if r[1] == str(asked))
