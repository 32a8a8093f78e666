"""The live capture's per-packet boundary: any bytes the kernel hands over are one counted
packet (a flow row, not IP, undecodable, or an input error), and the capture goes on."""

from __future__ import annotations

import trio
from hypothesis import given
from hypothesis import strategies as st

from overflowd.flows import FlowRow
from overflowd.services.capture import KernelSampledCapture
from tests.unit.test_wire_encoder import ethernet, ipv4, ipv6, tcp, udp

VALID = [
    ipv4("192.0.2.1", "198.51.100.2", 17, udp(4000, 53, b"q" * 12)),
    ipv6("2001:db8::1", "2001:db8::2", 6, tcp(4000, 443, 0x02)),
    ipv4("192.0.2.1", "198.51.100.2", 1, b"\x08\x00\x00\x00\x00\x01\x00\x01"),
]
ETHERTYPES = [0x0800, 0x86DD, 0x8100, 0x0806, 0]


@st.composite
def packets(draw: st.DrawFn) -> tuple[bytes, int]:
    ethertype = draw(st.sampled_from(ETHERTYPES))
    if draw(st.booleans()):
        return draw(st.binary(max_size=200)), ethertype
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    data = data[: draw(st.integers(0, len(data)))]
    if ethertype == 0x8100:
        return ethernet(bytes(data), 0x0800, vlans=[7])[14:], ethertype
    return bytes(data), ethertype


def _capture() -> KernelSampledCapture:
    send, _recv = trio.open_memory_channel[list[FlowRow]](1)
    return KernelSampledCapture("lo", 10, send)


@given(st.lists(packets(), min_size=1, max_size=20))
def test_every_packet_is_counted_once_and_none_escapes(batch: list[tuple[bytes, int]]) -> None:
    capture = _capture()

    async def feed() -> list[FlowRow | None]:  # its rate-limited warnings read trio's clock
        return [capture._packet(data, ethertype, 0, 1) for data, ethertype in batch]

    rows = trio.run(feed)
    s = capture.statistics()
    assert s.packets == len(batch)
    assert s.decoded + s.not_ip + s.undecodable + sum(s.input_errors.values()) == len(batch)
    assert sum(row is not None for row in rows) == s.decoded
