"""The kernel-sampling BPF program: exact bytes, the threshold, and what it keeps.

`overflowd.wire.bpf.run` interprets the program the way the kernel does; the netns test
(tests/netns/test_capture.py) shows the kernel agrees on a real interface.
"""

from __future__ import annotations

import math
import random
import struct
import sys

import pytest

from overflowd.wire import bpf
from overflowd.wire.bpf import ETH_P_IP, ETH_P_IPV6, PACKET_OUTGOING, Instruction

LD_ANC = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JGE = 0x35  # BPF_JMP | BPF_JGE | BPF_K
RET = 0x06  # BPF_RET | BPF_K
K_PROTO, K_TYPE, K_RAND = 0xFFFFF000, 0xFFFFF004, 0xFFFFF038
ETH_P_ARP = 0x0806


def test_default_program_instruction_by_instruction() -> None:
    program = bpf.sampling_program(10)
    assert program == (
        Instruction(LD_ANC, 0, 0, K_TYPE),
        Instruction(JEQ, 6, 0, PACKET_OUTGOING),  # -> 8 (drop), else 2
        Instruction(LD_ANC, 0, 0, K_PROTO),
        Instruction(JEQ, 1, 0, ETH_P_IP),  # -> 5 (sample), else 4
        Instruction(JEQ, 0, 3, ETH_P_IPV6),  # -> 5, else 8 (drop)
        Instruction(LD_ANC, 0, 0, K_RAND),
        Instruction(JGE, 1, 0, 0x1999999A),  # A >= T -> 8 (drop), else 7
        Instruction(RET, 0, 0, 128),
        Instruction(RET, 0, 0, 0),
    )
    assert bpf.to_text(program).splitlines() == [
        "(000) ld #type",
        "(001) jeq #0x4, jt 8, jf 2",
        "(002) ld #proto",
        "(003) jeq #0x800, jt 5, jf 4",
        "(004) jeq #0x86dd, jt 5, jf 8",
        "(005) ld #rand",
        "(006) jge #0x1999999a, jt 8, jf 7",
        "(007) ret #128",
        "(008) ret #0",
    ]


def test_the_listing_in_the_module_docstring_is_the_program() -> None:
    listing = bpf.to_text(bpf.sampling_program(10)).splitlines()
    documented = [
        line.strip().split(";")[0].rstrip()
        for line in (bpf.__doc__ or "").splitlines()
        if line.strip().startswith("(0")
    ]
    assert documented == listing


def test_bytes_are_struct_sock_filter_in_host_order() -> None:
    program = bpf.sampling_program(10)
    data = bpf.to_bytes(program)
    assert len(data) == 8 * len(program) == 72
    order = "<" if sys.byteorder == "little" else ">"
    assert data[:8] == struct.pack(f"{order}HBBI", 0x20, 0, 0, 0xFFFFF004)
    assert data[-8:] == struct.pack(f"{order}HBBI", 0x06, 0, 0, 0)
    assert bpf.from_bytes(data) == program
    with pytest.raises(ValueError, match="whole number"):
        bpf.from_bytes(data[:-1])


@pytest.mark.parametrize(
    ("one_in", "expected"),
    [(2, 1 << 31), (3, 0x55555555), (10, 0x1999999A), (1000, 4294967), (1 << 32, 1)],
)
def test_threshold(one_in: int, expected: int) -> None:
    t = bpf.threshold(one_in)
    assert t == expected
    # P(random32 < T) = T / 2**32 is within 2**-33 of 1/N.
    assert abs(t / 2**32 - 1 / one_in) <= 2**-33


@pytest.mark.parametrize("one_in", [0, -1, (1 << 32) + 1])
def test_one_in_out_of_range(one_in: int) -> None:
    with pytest.raises(ValueError, match="one_in"):
        bpf.sampling_program(one_in)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError):
        bpf.sampling_program(True)
    with pytest.raises(ValueError, match="snaplen"):
        bpf.sampling_program(10, snaplen=0)
    with pytest.raises(ValueError, match="families"):
        bpf.sampling_program(10, families=(5,))
    with pytest.raises(ValueError, match="families"):
        bpf.sampling_program(10, families=())


def test_one_in_one_has_no_draw_and_keeps_every_ip_packet() -> None:
    program = bpf.sampling_program(1)
    assert all(ins.k != K_RAND for ins in program)
    assert len(program) == 7
    for proto in (ETH_P_IP, ETH_P_IPV6):
        for r in (0, 1, 0xFFFFFFFF):
            assert bpf.run(program, protocol=proto, random=r) == 128


def test_one_in_one_everything_is_a_single_ret() -> None:
    program = bpf.sampling_program(1, families=None, outgoing=True, snaplen=96)
    assert program == (Instruction(RET, 0, 0, 96),)
    assert bpf.run(program, protocol=ETH_P_ARP, pkttype=PACKET_OUTGOING) == 96


@pytest.mark.parametrize("one_in", [2, 10, 1000, 1 << 32])
def test_the_boundary_of_the_draw(one_in: int) -> None:
    program = bpf.sampling_program(one_in, snaplen=200)
    t = bpf.threshold(one_in)
    assert bpf.run(program, random=0) == 200
    assert bpf.run(program, random=t - 1) == 200
    assert bpf.run(program, random=t) == 0
    assert bpf.run(program, random=0xFFFFFFFF) == 0


def test_non_ip_and_outgoing_are_dropped_before_the_draw() -> None:
    program = bpf.sampling_program(10)
    assert bpf.run(program, protocol=ETH_P_ARP, random=0) == 0
    assert bpf.run(program, protocol=ETH_P_IP, pkttype=PACKET_OUTGOING, random=0) == 0
    draws = 0

    def draw() -> int:
        nonlocal draws
        draws += 1
        return 0

    bpf.run(program, protocol=ETH_P_ARP, random=draw)
    bpf.run(program, pkttype=PACKET_OUTGOING, random=draw)
    assert draws == 0  # 1 in N applies to the packets that pass the filter, nothing else
    bpf.run(program, random=draw)
    assert draws == 1


def test_families_and_outgoing_options() -> None:
    v6_only = bpf.sampling_program(1, families=(6,))
    assert bpf.run(v6_only, protocol=ETH_P_IPV6) == 128
    assert bpf.run(v6_only, protocol=ETH_P_IP) == 0
    v4_out = bpf.sampling_program(1, families=(4,), outgoing=True)
    assert bpf.run(v4_out, protocol=ETH_P_IP, pkttype=PACKET_OUTGOING) == 128
    assert bpf.run(v4_out, protocol=ETH_P_IPV6) == 0
    anything = bpf.sampling_program(1, families=None)
    assert bpf.run(anything, protocol=ETH_P_ARP) == 128
    assert bpf.run(anything, protocol=ETH_P_ARP, pkttype=PACKET_OUTGOING) == 0


def test_the_interpreter_keeps_about_one_in_n() -> None:
    rng = random.Random(20261126)
    program = bpf.sampling_program(10)
    n = 20_000
    kept = sum(1 for _ in range(n) if bpf.run(program, random=rng.getrandbits(32)))
    sigma = math.sqrt(n * 0.1 * 0.9)
    assert abs(kept - n / 10) <= 4 * sigma


def test_interpreter_packet_loads_and_bounds() -> None:
    # ldh [12]; jeq #0x800 -> ret #64 else ret #0: tcpdump's "ip" on Ethernet.
    program = (
        Instruction(0x28, 0, 0, 12),
        Instruction(JEQ, 0, 1, 0x0800),
        Instruction(RET, 0, 0, 64),
        Instruction(RET, 0, 0, 0),
    )
    frame = bytes(12) + b"\x08\x00" + bytes(20)
    assert bpf.run(program, frame) == 64
    assert bpf.run(program, bytes(12) + b"\x86\xdd") == 0
    assert bpf.run(program, bytes(13)) == 0  # out of bounds: the kernel returns 0


def test_validate_refuses_what_the_kernel_would() -> None:
    with pytest.raises(ValueError, match="end with ret"):
        bpf.validate((Instruction(LD_ANC, 0, 0, K_RAND),))
    with pytest.raises(ValueError, match="past the end"):
        bpf.validate((Instruction(JEQ, 5, 0, 1), Instruction(RET, 0, 0, 0)))
    with pytest.raises(ValueError, match="opcode"):
        bpf.validate((Instruction(0x07, 0, 0, 0), Instruction(RET, 0, 0, 0)))
    with pytest.raises(ValueError, match="instructions"):
        bpf.validate(())
