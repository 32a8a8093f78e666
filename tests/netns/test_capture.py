"""Kernel-sampled live capture on a real veth: the kernel samples, Python sees only the sample.

Two namespaces joined by a veth pair (192.0.2.1/24, 2001:db8::1/64 ↔ 192.0.2.2/24,
2001:db8::2/64). `KernelSampledCapture` runs in a process inside the second namespace on its
end of the pair (tests/support/netns_capture.py); plain UDP sockets send a known number of
datagrams. Our flows are counted by their 4-tuple, so the link's own IPv6 chatter (MLD, DAD)
does not disturb the counts; ARP certainly crosses the link, and must never reach Python.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import trio

from overflowd.errors import ConfigError
from overflowd.flows import FlowRow
from overflowd.services.capture import KernelSampledCapture
from tests.support import netns
from tests.support.netns_capture import (
    CaptureResult,
    capture_argv,
    parse_output,
    send_argv,
)

pytestmark = pytest.mark.netns

PYTHON = sys.executable
A4, B4 = "192.0.2.1", "192.0.2.2"
A6, B6 = "2001:db8::1", "2001:db8::2"
#: Sent payload: 32 bytes, so IPv4 datagrams are 20 + 8 + 32 and IPv6 40 + 8 + 32 bytes long.
PAYLOAD = 32
V4_BYTES, V6_BYTES = 20 + 8 + PAYLOAD, 40 + 8 + PAYLOAD
#: Packets the link itself may add to what the capture sees (IPv6 MLD reports, DAD, NS/NA).
CHATTER = 50
#: Each sender and each capture start or finish within this; the whole file takes ~10 s.
STEP_TIMEOUT_S = 30.0


@dataclass
class Lab:
    a: netns.Namespace
    b: netns.Namespace
    link: netns.Link


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    try:
        netns.require("ip", "ethtool", "sysctl")
    except netns.NetnsUnavailable as exc:
        pytest.fail(f"capture netns tests cannot run: {exc}", pytrace=False)
    netns.sweep_stale()
    workdir = tmp_path_factory.mktemp("capture")
    with (
        netns.namespace(workdir, ipv6=True) as a,
        netns.namespace(workdir, ipv6=True) as b,
    ):
        link = netns.veth(a, b, [f"{A4}/24", f"{A6}/64"], [f"{B4}/24", f"{B6}/64"])
        yield Lab(a, b, link)
    leftover = [name for name in netns.list_namespaces() if netns.created_here(name)]
    assert not leftover, f"namespaces left behind: {leftover}"


def start_capture(lab: Lab, one_in: int, *, outgoing: bool = False) -> netns.Process:
    process = lab.b.spawn(
        capture_argv(PYTHON, lab.link.b_dev, one_in, outgoing=outgoing), label="capture"
    )
    process.wait_for_output(r"(?m)^ready$", STEP_TIMEOUT_S)
    return process


def send(
    ns: netns.Namespace,
    dst: str,
    port: int,
    count: int,
    *,
    sport: int,
    burst: int = 200,
    pause_s: float = 0.002,
) -> None:
    argv = send_argv(
        PYTHON, dst, port, count, sport=sport, burst=burst, pause_s=pause_s, size=PAYLOAD
    )
    done = ns.run(argv, timeout=STEP_TIMEOUT_S)
    assert done.stdout.strip() == f"sent {count}", done.stdout + done.stderr


def finish(process: netns.Process) -> CaptureResult:
    status = process.stop(grace=STEP_TIMEOUT_S)
    assert status == 0, process.output()[-3000:]
    return parse_output(process.output())


def within_sigmas(observed: int, n: int, one_in: int, sigmas: float = 4.0) -> bool:
    p = 1 / one_in
    return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def check_common(result: CaptureResult, one_in: int, lab: Lab, started_ms: int) -> None:
    stats = result.stats
    assert result.formats == {"capture"}
    assert result.exporters == {f"capture:{lab.link.b_dev}"}
    assert result.intervals == {one_in}
    assert result.provenances == {"announced"}
    assert len(result.domains) == 1 and next(iter(result.domains)) > 0  # the ifindex
    assert result.first_equals_last
    now_ms = int(time.time() * 1000)
    assert result.first_ms is not None and result.last_ms is not None
    assert started_ms - 1000 <= result.first_ms <= result.last_ms <= now_ms + 1000
    # Every packet Python read was IP and decoded; nothing was lost on the way.
    assert stats["not_ip"] == 0, stats  # ARP crossed the link: the filter kept it out
    assert stats["undecodable"] == 0, stats
    assert stats["dropped_queue_full"] == 0, stats
    assert stats["kernel_drops"] == 0, stats
    assert stats["packets"] == stats["decoded"] == stats["kernel_packets"], stats
    assert stats["one_in"] == one_in


def test_one_in_one_keeps_every_packet_in_both_families_and_only_incoming(lab: Lab) -> None:
    started_ms = int(time.time() * 1000)
    incoming = start_capture(lab, 1)
    both = start_capture(lab, 1, outgoing=True)
    # Paced to ~20,000 packets/s: at 1 in 1 every packet reaches Python.
    send(lab.a, B4, 9001, 3000, sport=40001, burst=100, pause_s=0.005)
    send(lab.a, B6, 9002, 3000, sport=40002, burst=100, pause_s=0.005)
    send(lab.b, A4, 9003, 500, sport=40003, burst=100, pause_s=0.005)  # from the capturing side
    only_in, in_and_out = finish(incoming), finish(both)

    for result in (only_in, in_and_out):
        check_common(result, 1, lab, started_ms)
        # Every datagram, with its exact addresses, ports and IP length.
        assert result.matching(A4, B4, 40001, 9001) == {(A4, B4, 40001, 9001, 17, V4_BYTES, 1)}
        assert result.count(A4, B4, 40001, 9001) == 3000
        assert result.matching(A6, B6, 40002, 9002) == {(A6, B6, 40002, 9002, 17, V6_BYTES, 1)}
        assert result.count(A6, B6, 40002, 9002) == 3000
    # Outgoing packets only when asked for.
    assert only_in.count(B4, A4, 40003, 9003) == 0
    assert in_and_out.count(B4, A4, 40003, 9003) == 500
    assert 6000 <= only_in.stats["packets"] <= 6000 + CHATTER, only_in.stats
    assert 6500 <= in_and_out.stats["packets"] <= 6500 + 2 * CHATTER, in_and_out.stats
    print(f"\n1 in 1: incoming {only_in.stats}\n1 in 1: both {in_and_out.stats}")


def test_one_in_ten_python_sees_only_the_kernels_sample(lab: Lab) -> None:
    started_ms = int(time.time() * 1000)
    process = start_capture(lab, 10)
    send(lab.a, B4, 9011, 20_000, sport=40011)
    send(lab.a, B6, 9012, 10_000, sport=40012)
    result = finish(process)
    check_common(result, 10, lab, started_ms)

    v4 = result.count(A4, B4, 40011, 9011)
    v6 = result.count(A6, B6, 40012, 9012)
    assert within_sigmas(v4, 20_000, 10), f"IPv4: {v4} of 20000 sampled at 1 in 10"
    assert within_sigmas(v6, 10_000, 10), f"IPv6: {v6} of 10000 sampled at 1 in 10"
    assert result.matching(A4, B4, 40011, 9011) == {(A4, B4, 40011, 9011, 17, V4_BYTES, 1)}
    # The kernel did the sampling: Python read the sample and (at most) some chatter, not
    # the 30,000 packets that crossed the link.
    assert v4 + v6 <= result.stats["packets"] <= v4 + v6 + CHATTER, result.stats
    print(f"\n1 in 10: IPv4 {v4}/20000, IPv6 {v6}/10000, python saw {result.stats['packets']}")


async def test_unknown_interface_is_a_config_error() -> None:
    send_channel, _receive = trio.open_memory_channel[list[FlowRow]](1)
    capture = KernelSampledCapture("ovf-no-such0", 10, send_channel)
    with pytest.raises(ConfigError, match="no such interface"):
        await capture.run()
    with pytest.raises(trio.ClosedResourceError):
        send_channel.send_nowait([])  # closed even though it never started
