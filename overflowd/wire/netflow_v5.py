"""NetFlow v5: a 24-byte header and ``count`` fixed 48-byte records (Cisco's v5 format).

This is the hot path of the collector: the reader checks the header and that ``count``
records fit, then one ``struct.iter_unpack`` over the record block extracts the thirteen
fields we keep, and records are built with the positional ``state.build``. No per-field
reader calls, no per-record bounds checks (the block was checked once).

Times: ``first``/``last`` in a record are the exporter's sysUpTime (ms since boot) when the
flow's first/last packet was seen; the header gives sysUpTime and the wall clock
(``unix_secs``, ``unix_nsecs``) at export. A record's absolute time is the export time minus
how long before the export it was seen, taking the 32-bit uptime difference modulo 2**32 as a
signed number so flows across the 49.7-day uptime wrap keep their right time.

Sampling: the header's ``sampling_interval`` field has the mode in its top 2 bits and the
interval in the low 14; an interval of 0 means "not announced" (assumed 1).

Pure: no I/O.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

from overflowd.wire.reader import Reader

if TYPE_CHECKING:
    from overflowd.wire.dispatch import DecoderState

__all__ = ["FORMAT", "HEADER", "RECORD", "decode", "header_sampling"]

FORMAT = "netflow-v5"

#: version, count, sysUpTime, unix_secs, unix_nsecs, flow_sequence, engine_type, engine_id,
#: sampling (mode:2, interval:14).
HEADER = struct.Struct("!HHIIIIBBH")

#: One 48-byte record, keeping: srcaddr, dstaddr, [nexthop, input, output skipped], dPkts,
#: dOctets, First, Last, srcport, dstport, [pad1], tcp_flags, prot, tos, src_as, dst_as,
#: [src_mask, dst_mask, pad2 skipped].
RECORD = struct.Struct("!II4x4xIIIIHHxBBBHH4x")

assert HEADER.size == 24 and RECORD.size == 48


def header_sampling(field: int) -> tuple[int, int]:
    """(mode, interval) from the header's sampling field."""
    return field >> 14, field & 0x3FFF


def decode(data: bytes, exporter: str, state: DecoderState, now: float) -> list[Any]:
    """Records built with ``state.build`` (FlowRecord, or FlowRow for the rows API)."""
    r = Reader(data, fmt=FORMAT, exporter=exporter)
    (version, count, uptime, secs, nsecs, _seq, engine_type, engine_id, sampling) = r.unpack(
        HEADER, "header"
    )
    if version != 5:
        raise r.malformed(f"version {version} is not 5", offset=0)
    rows = r.unpack_many(RECORD, count, f"{count} records")
    if not r.at_end():
        # Cisco never pads v5; some exporters do. The records announced were all there.
        state.defect(FORMAT, "trailing_bytes")
    if nsecs >= 1_000_000_000:
        raise r.malformed(f"unix_nsecs {nsecs} >= 10**9", offset=16)
    export_ms = secs * 1000 + nsecs // 1_000_000
    domain = (engine_type << 8) | engine_id
    announced = sampling & 0x3FFF
    interval, provenance = state.resolve_interval(exporter, announced or None)

    cache = state.v4_cache
    if len(cache) > state.limits.address_cache_size:
        cache.clear()
    new_address = IPv4Address
    make = state.build
    out: list[Any] = []
    append = out.append
    for src, dst, packets, octets, first, last, sport, dport, flags, proto, tos, sas, das in rows:
        a = cache.get(src)
        if a is None:
            a = cache[src] = new_address(src)
        b = cache.get(dst)
        if b is None:
            b = cache[dst] = new_address(dst)
        d1 = (uptime - first) & 0xFFFFFFFF
        if d1 & 0x80000000:
            d1 -= 0x100000000
        d2 = (uptime - last) & 0xFFFFFFFF
        if d2 & 0x80000000:
            d2 -= 0x100000000
        append(
            make(
                a,
                b,
                sport,
                dport,
                proto,
                packets,
                octets,
                export_ms - d1,
                export_ms - d2,
                flags,
                tos,
                sas,
                das,
                exporter,
                domain,
                FORMAT,
                interval,
                provenance,
            )
        )
    return out
