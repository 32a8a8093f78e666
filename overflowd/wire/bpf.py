"""Classic BPF programs that sample packets in the kernel, and a tiny interpreter to check them.

`sampling_program` builds the socket filter that `overflowd.services.capture` attaches to an
``AF_PACKET`` socket with ``SO_ATTACH_FILTER``: keep a packet with probability 1/N, decided by
the kernel's random ancillary load (``SKF_AD_OFF + SKF_AD_RANDOM``, Linux ≥ 3.15), optionally
only IPv4/IPv6 and only received (not sent) packets. The kernel runs it for every packet on
the interface; only what it keeps is copied to the socket, so Python pays for the sampled
packets alone.

The whole program for ``one_in=10``, IPv4 and IPv6, incoming only (``to_text``)::

    (000) ld #type                    ; A = skb->pkt_type
    (001) jeq #0x4, jt 8, jf 2        ; PACKET_OUTGOING: drop
    (002) ld #proto                   ; A = ethertype (skb->protocol, VLAN tag already removed)
    (003) jeq #0x800, jt 5, jf 4      ; IPv4
    (004) jeq #0x86dd, jt 5, jf 8     ; IPv6, else drop
    (005) ld #rand                    ; A = uniform 32-bit random number
    (006) jge #0x1999999a, jt 8, jf 7 ; A >= round(2**32 / 10): drop
    (007) ret #128                    ; keep the first snaplen bytes
    (008) ret #0                      ; drop

Only ancillary loads are used (never packet offsets), so the program is the same for any link
type and for ``SOCK_RAW`` and ``SOCK_DGRAM`` sockets.

Why a threshold and not ``mod``: ``A < T`` holds with probability exactly ``T / 2**32``;
with ``T = round(2**32 / N)`` that is within ``2**-33`` of ``1/N`` for every ``N``, with two
instructions every classic BPF implementation has. ``N = 1`` leaves the draw out entirely.

Pure: builds bytes and reads them back; never opens a socket (the capture service does).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import NamedTuple

__all__ = [
    "ETH_P_IP",
    "ETH_P_IPV6",
    "MAX_ONE_IN",
    "PACKET_OUTGOING",
    "SKF_AD_OFF",
    "SKF_AD_PKTTYPE",
    "SKF_AD_PROTOCOL",
    "SKF_AD_RANDOM",
    "Instruction",
    "from_bytes",
    "run",
    "sampling_program",
    "threshold",
    "to_bytes",
    "to_text",
    "validate",
]

# <linux/filter.h> / <linux/bpf_common.h>: instruction classes, sizes, modes, operations.
BPF_LD = 0x00
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_H = 0x08
BPF_B = 0x10
BPF_IMM = 0x00
BPF_ABS = 0x20
BPF_LEN = 0x80
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGT = 0x20
BPF_JGE = 0x30
BPF_JSET = 0x40
BPF_K = 0x00
BPF_A = 0x10

#: Ancillary loads: ``ld [SKF_AD_OFF + x]`` reads skb metadata instead of packet bytes.
SKF_AD_OFF = -0x1000
SKF_AD_PROTOCOL = 0  # ntohs(skb->protocol): the ethertype, after VLAN untagging
SKF_AD_PKTTYPE = 4  # skb->pkt_type: PACKET_HOST, ..., PACKET_OUTGOING
SKF_AD_RANDOM = 56  # prandom 32-bit value (Linux 3.15)

#: <linux/if_packet.h> packet types.
PACKET_HOST = 0
PACKET_OUTGOING = 4

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
_ETHERTYPES = {4: ETH_P_IP, 6: ETH_P_IPV6}

#: <linux/filter.h> BPF_MAXINSNS: the kernel refuses longer classic programs.
BPF_MAXINSNS = 4096
#: The threshold must stay ≥ 1 (else nothing is ever kept): N ≤ 2**32.
MAX_ONE_IN = 1 << 32
#: The kernel caps what it copies at the packet length anyway; 256 KiB is libpcap's maximum.
MAX_SNAPLEN = 262_144

_RANDOM_K = (SKF_AD_OFF + SKF_AD_RANDOM) & 0xFFFFFFFF
_PROTOCOL_K = (SKF_AD_OFF + SKF_AD_PROTOCOL) & 0xFFFFFFFF
_PKTTYPE_K = (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF
_ANCILLARY_NAMES = {_RANDOM_K: "rand", _PROTOCOL_K: "proto", _PKTTYPE_K: "type"}

#: ``struct sock_filter { __u16 code; __u8 jt; __u8 jf; __u32 k; }`` in host byte order.
_SOCK_FILTER = struct.Struct("=HBBI")
SOCK_FILTER_SIZE = _SOCK_FILTER.size


class Instruction(NamedTuple):
    """One ``struct sock_filter``; ``jt``/``jf`` are relative: the target is ``pc + 1 + j``."""

    code: int
    jt: int
    jf: int
    k: int


def threshold(one_in: int) -> int:
    """``T`` such that ``random32 < T`` holds with probability ``T / 2**32 ≈ 1 / one_in``."""
    _check_one_in(one_in)
    return ((1 << 32) + one_in // 2) // one_in


def _check_one_in(one_in: int) -> None:
    if isinstance(one_in, bool) or not isinstance(one_in, int):
        raise TypeError("one_in must be an int")
    if not 1 <= one_in <= MAX_ONE_IN:
        raise ValueError(f"one_in must be between 1 and 2**32, not {one_in}")


def sampling_program(
    one_in: int,
    *,
    snaplen: int = 128,
    families: Collection[int] | None = (4, 6),
    outgoing: bool = False,
) -> tuple[Instruction, ...]:
    """The filter keeping 1 in ``one_in`` packets (the first ``snaplen`` bytes of each).

    ``families``: IP versions to keep (4, 6 or both); ``None`` keeps every ethertype (ARP,
    LLDP... are then sampled too, and the capture counts them as not IP). ``outgoing``: also
    sample packets this host sends; off by default so that a router capturing on all its
    interfaces sees each forwarded packet once, where it came in.
    """
    _check_one_in(one_in)
    if isinstance(snaplen, bool) or not isinstance(snaplen, int):
        raise TypeError("snaplen must be an int")
    if not 1 <= snaplen <= MAX_SNAPLEN:
        raise ValueError(f"snaplen must be between 1 and {MAX_SNAPLEN}, not {snaplen}")
    if families is not None:
        unknown = set(families) - set(_ETHERTYPES)
        if unknown or not families:
            raise ValueError(f"families must be a non-empty subset of (4, 6), not {families!r}")

    # A tiny assembler: each entry is (code, jump-true label, jump-false label, k); labels are
    # resolved once the layout is known. Every jump is forward (classic BPF has no loops).
    asm: list[tuple[str | None, int, str | None, str | None, int]] = []

    def emit(code: int, k: int, *, jt: str | None = None, jf: str | None = None) -> None:
        asm.append((None, code, jt, jf, k))

    def label(name: str) -> None:
        asm.append((name, 0, None, None, 0))

    if not outgoing:
        emit(BPF_LD | BPF_W | BPF_ABS, _PKTTYPE_K)
        emit(BPF_JMP | BPF_JEQ | BPF_K, PACKET_OUTGOING, jt="drop", jf="next0")
        label("next0")
    if families is not None:
        emit(BPF_LD | BPF_W | BPF_ABS, _PROTOCOL_K)
        wanted = [_ETHERTYPES[f] for f in sorted(set(families))]
        for i, ethertype in enumerate(wanted):
            last = i == len(wanted) - 1
            emit(
                BPF_JMP | BPF_JEQ | BPF_K,
                ethertype,
                jt="sample",
                jf="drop" if last else f"family{i + 1}",
            )
            if not last:
                label(f"family{i + 1}")
    label("sample")
    if one_in > 1:
        emit(BPF_LD | BPF_W | BPF_ABS, _RANDOM_K)
        emit(BPF_JMP | BPF_JGE | BPF_K, threshold(one_in), jt="drop", jf="keep")
    label("keep")
    emit(BPF_RET | BPF_K, snaplen)
    if any("drop" in (jt, jf) for _, _, jt, jf, _ in asm):
        label("drop")
        emit(BPF_RET | BPF_K, 0)

    positions: dict[str, int] = {}
    pc = 0
    for name, *_ in asm:
        if name is None:
            pc += 1
        else:
            positions[name] = pc
    program: list[Instruction] = []
    for name, code, jt, jf, k in asm:
        if name is not None:
            continue
        here = len(program)

        def offset(target: str | None, here: int = here) -> int:
            return 0 if target is None else positions[target] - here - 1

        program.append(Instruction(code, offset(jt), offset(jf), k))
    out = tuple(program)
    validate(out)
    return out


def validate(program: Sequence[Instruction]) -> None:
    """Raise ``ValueError`` unless ``program`` passes the checks the kernel makes that apply to
    the instructions `run` knows: length, opcodes, jump targets inside, ends in ``ret``."""
    if not 1 <= len(program) <= BPF_MAXINSNS:
        raise ValueError(f"a program has 1 to {BPF_MAXINSNS} instructions, not {len(program)}")
    for pc, ins in enumerate(program):
        if ins.code not in _MNEMONICS:
            raise ValueError(f"instruction {pc}: opcode {ins.code:#04x} not supported")
        if ins.code & 0x07 == BPF_JMP:
            reach = ins.k if ins.code == BPF_JMP | BPF_JA else max(ins.jt, ins.jf)
            if pc + 1 + reach >= len(program):
                raise ValueError(f"instruction {pc}: jump past the end")
    if program[-1].code & 0x07 != BPF_RET:
        raise ValueError("a program must end with ret")


def to_bytes(program: Iterable[Instruction]) -> bytes:
    """The ``struct sock_filter`` array ``struct sock_fprog.filter`` points at (host order)."""
    return b"".join(_SOCK_FILTER.pack(*ins) for ins in program)


def from_bytes(data: bytes) -> tuple[Instruction, ...]:
    """The instructions of a ``struct sock_filter`` array (host order)."""
    if len(data) % SOCK_FILTER_SIZE:
        raise ValueError(f"{len(data)} bytes is not a whole number of sock_filter structs")
    return tuple(Instruction(*fields) for fields in _SOCK_FILTER.iter_unpack(data))


_MNEMONICS = {
    BPF_LD | BPF_W | BPF_ABS: "ld",
    BPF_LD | BPF_H | BPF_ABS: "ldh",
    BPF_LD | BPF_B | BPF_ABS: "ldb",
    BPF_LD | BPF_W | BPF_IMM: "ld",
    BPF_LD | BPF_W | BPF_LEN: "ld",
    BPF_JMP | BPF_JA: "ja",
    BPF_JMP | BPF_JEQ | BPF_K: "jeq",
    BPF_JMP | BPF_JGT | BPF_K: "jgt",
    BPF_JMP | BPF_JGE | BPF_K: "jge",
    BPF_JMP | BPF_JSET | BPF_K: "jset",
    BPF_RET | BPF_K: "ret",
    BPF_RET | BPF_A: "ret",
}


def to_text(program: Sequence[Instruction]) -> str:
    """A numbered listing in ``bpf_asm`` mnemonics, jumps as absolute targets (``tcpdump -d``)."""
    lines = []
    for pc, ins in enumerate(program):
        name = _MNEMONICS.get(ins.code, f"op{ins.code:#04x}")
        mode = ins.code & 0xE0
        if ins.code & 0x07 == BPF_LD:
            if mode == BPF_ABS:
                operand = (
                    f"#{_ANCILLARY_NAMES[ins.k]}" if ins.k in _ANCILLARY_NAMES else f"[{ins.k}]"
                )
            elif mode == BPF_LEN:
                operand = "#len"
            else:
                operand = f"#{ins.k:#x}"
            text = f"{name} {operand}"
        elif ins.code == BPF_JMP | BPF_JA:
            text = f"ja {pc + 1 + ins.k}"
        elif ins.code & 0x07 == BPF_JMP:
            text = f"{name} #{ins.k:#x}, jt {pc + 1 + ins.jt}, jf {pc + 1 + ins.jf}"
        elif ins.code == BPF_RET | BPF_A:
            text = "ret a"
        else:
            text = f"{name} #{ins.k}"
        lines.append(f"({pc:03d}) {text}")
    return "\n".join(lines)


def run(
    program: Sequence[Instruction],
    packet: bytes = b"",
    *,
    protocol: int = ETH_P_IP,
    pkttype: int = PACKET_HOST,
    random: Callable[[], int] | int = 0,
) -> int:
    """Interpret ``program`` the way the kernel would for one packet; return what ``ret`` says
    (0: drop; otherwise the number of bytes to keep).

    Only the instructions listed in ``_MNEMONICS`` and the ancillary loads ``proto``, ``type``
    and ``rand`` are known; ``random`` is the value ``ld #rand`` reads (or a function giving
    it). As in the kernel, a packet load out of bounds ends the program with 0.
    """
    validate(program)
    a = 0
    pc = 0
    while True:
        ins = program[pc]
        pc += 1
        cls = ins.code & 0x07
        if cls == BPF_LD:
            mode = ins.code & 0xE0
            if mode == BPF_IMM:
                a = ins.k
            elif mode == BPF_LEN:
                a = len(packet)
            elif ins.k >= (SKF_AD_OFF & 0xFFFFFFFF):
                if ins.k == _RANDOM_K:
                    a = (random() if callable(random) else random) & 0xFFFFFFFF
                elif ins.k == _PROTOCOL_K:
                    a = protocol
                elif ins.k == _PKTTYPE_K:
                    a = pkttype
                else:
                    raise ValueError(f"instruction {pc - 1}: unknown ancillary load {ins.k:#x}")
            else:
                size = {BPF_W: 4, BPF_H: 2, BPF_B: 1}[ins.code & 0x18]
                if ins.k + size > len(packet):
                    return 0
                a = int.from_bytes(packet[ins.k : ins.k + size], "big")
        elif cls == BPF_JMP:
            op = ins.code & 0xF0
            if op == BPF_JA:
                pc += ins.k
                continue
            if op == BPF_JEQ:
                taken = a == ins.k
            elif op == BPF_JGT:
                taken = a > ins.k
            elif op == BPF_JGE:
                taken = a >= ins.k
            else:
                taken = bool(a & ins.k)
            pc += ins.jt if taken else ins.jf
        else:  # BPF_RET (validate admits nothing else)
            return a if ins.code == BPF_RET | BPF_A else ins.k
