"""sFlow version 5 (sflow.org, "sFlow Version 5", 2004): datagrams of flow and counter samples.

Every flow sample (compact, format 1, or expanded, format 3) becomes at most one flow record,
built from its first usable packet description:

* a raw packet header record (0:1) decoded with :mod:`overflowd.wire.packet` (Ethernet with
  VLAN tags, or bare IPv4/IPv6), or
* a sampled IPv4 (0:3) / IPv6 (0:4) record,

plus the AS numbers of an extended gateway record (0:1003) when present.

Weighting (docs/flows.md): a flow sample is *one* packet, picked 1 in ``sampling_rate``. Like a
NetFlow record from a sampling exporter, the record carries what was observed — ``packets=1``,
``bytes`` = the IP datagram length — and ``sampling_interval = sampling_rate`` (announced);
``packets × sampling_interval`` estimates the traffic it stands for, the same product for
every format. ``bytes`` is the layer-3 length (as NetFlow/IPFIX count octets), taken from the
IP header; the frame length is only a fallback when the IP header does not say.

Counter samples (0:2, 0:4) are counted and skipped; unknown sample and record types are
skipped by their length, and counted. A sample or flow record that fails to decode loses only
itself, and bytes after the last sample are counted, not fatal (:mod:`overflowd.wire.walk`).
The datagram carries no wall-clock time, so a record's ``first`` and ``last`` are the arrival
time ``now``. Its ``observation_domain`` is the sub-agent id; its ``exporter`` the UDP source
(the agent address inside is not trusted).

Pure: no I/O.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, NamedTuple

from overflowd.errors import DecodeError
from overflowd.wire import packet
from overflowd.wire.reader import Reader, WireDecodeError
from overflowd.wire.walk import Walk

if TYPE_CHECKING:
    from overflowd.wire.dispatch import DecoderState

__all__ = ["FORMAT", "decode"]

FORMAT = "sflow-v5"

SAMPLE_FLOW = 1
SAMPLE_COUNTERS = 2
SAMPLE_FLOW_EXPANDED = 3
SAMPLE_COUNTERS_EXPANDED = 4

RECORD_RAW_HEADER = 1
RECORD_IPV4 = 3
RECORD_IPV6 = 4
RECORD_EXTENDED_GATEWAY = 1003

HEADER_ETHERNET = 1
HEADER_IPV4 = 11
HEADER_IPV6 = 12

#: Samples in one datagram and records in one sample. A 1500-byte datagram holds at most a
#: few dozen of either; the caps only bound work on hostile input (each one also needs at
#: least 8 bytes, so the datagram length bounds them too).
MAX_SAMPLES = 1024
MAX_RECORDS = 256
#: AS path segments and ASes per segment read from an extended gateway record.
MAX_AS_PATH_SEGMENTS = 64

_TYPE_LENGTH = struct.Struct("!II")
#: sequence, source id, rate, pool, drops, input, output, record count.
_FLOW_SAMPLE = struct.Struct("!8I")
#: sequence, source type, source index, rate, pool, drops, input format/value, output
#: format/value, record count.
_EXPANDED_FLOW_SAMPLE = struct.Struct("!11I")
#: header protocol, frame length, stripped, header length.
_RAW_HEADER = struct.Struct("!4I")
_SAMPLED_V4 = struct.Struct("!II4s4sIIII")
_SAMPLED_V6 = struct.Struct("!II16s16sIIII")


class _Observed(NamedTuple):
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    proto: int
    sport: int
    dport: int
    tcp_flags: int
    tos: int
    length: int


def decode(data: bytes, exporter: str, state: DecoderState, now: float) -> list[Any]:
    r = Reader(data, fmt=FORMAT, exporter=exporter)
    version = r.u32()
    if version != 5:
        raise r.malformed(f"version {version} is not 5", offset=0)
    _read_address(r)  # agent address: identity is the UDP source
    sub_agent = r.u32()
    r.skip(8, "sequence and uptime")
    samples = r.u32()
    if samples > MAX_SAMPLES:
        raise r.malformed(f"{samples} samples (at most {MAX_SAMPLES})")
    now_ms = int(now * 1000)
    out: list[Any] = []
    walk = Walk(FORMAT)
    end = len(data)
    # Each sample is bounded by its own length and decoded on its own (walk.py): one that
    # fails loses only itself; fewer samples than counted, or bytes after the last one, end
    # the walk and are counted. Each pass reads at least 8 bytes, so the datagram bounds the
    # work whatever ``samples`` says.
    for _ in range(samples):
        if r.remaining() < 8:
            walk.tail(data, r.offset, end, "samples_missing", r.truncated("sample header", 8))
            break
        kind, length = r.unpack(_TYPE_LENGTH, "sample header")
        if length > r.remaining():
            walk.tail(data, r.offset - 8, end, "samples_missing", r.truncated("sample", length))
            break
        body = r.sub(length, "sample")
        enterprise, fmt = kind >> 12, kind & 0xFFF
        try:
            if enterprise != 0:
                state.count("sflow.unknown_samples")
            elif fmt in (SAMPLE_FLOW, SAMPLE_FLOW_EXPANDED):
                record = _flow_sample(
                    body, fmt == SAMPLE_FLOW_EXPANDED, exporter, sub_agent, now_ms, state, walk
                )
                if record is not None:
                    out.append(record)
            elif fmt in (SAMPLE_COUNTERS, SAMPLE_COUNTERS_EXPANDED):
                state.count("sflow.counter_samples")
            else:
                state.count("sflow.unknown_samples")
        except WireDecodeError as exc:
            walk.failed("sample", exc)
            continue
        walk.kept += 1
    else:
        if not r.at_end():
            error = r.malformed(f"{r.remaining()} bytes after the last sample")
            walk.tail(data, r.offset, end, "trailing_bytes", error)
    walk.finish(state, out)
    return out


def _read_address(r: Reader) -> IPv4Address | IPv6Address | None:
    kind = r.u32()
    if kind == 1:
        return IPv4Address(r.bytes(4))
    if kind == 2:
        return IPv6Address(r.bytes(16))
    if kind == 0:
        return None
    raise r.malformed(f"address type {kind}", offset=r.offset - 4)


def _flow_sample(
    r: Reader,
    expanded: bool,
    exporter: str,
    sub_agent: int,
    now_ms: int,
    state: DecoderState,
    walk: Walk,
) -> Any:
    if expanded:
        _seq, _src_type, _src_index, rate, _pool, _drops, _if, _iv, _of, _ov, count = r.unpack(
            _EXPANDED_FLOW_SAMPLE, "expanded flow sample"
        )
    else:
        _seq, _source, rate, _pool, _drops, _input, _output, count = r.unpack(
            _FLOW_SAMPLE, "flow sample"
        )
    if count > MAX_RECORDS:
        raise r.malformed(f"{count} flow records (at most {MAX_RECORDS})")
    if count * 8 > r.remaining():
        raise r.truncated(f"{count} flow records", count * 8)
    observed: _Observed | None = None
    src_as: int | None = None
    dst_as: int | None = None
    failures: list[WireDecodeError] = []
    for _ in range(count):
        kind, length = r.unpack(_TYPE_LENGTH, "flow record header")
        body = r.sub(length, "flow record")
        try:
            if kind == RECORD_RAW_HEADER:
                if observed is None:
                    observed = _raw_header(body, exporter, state)
            elif kind == RECORD_IPV4:
                if observed is None:
                    observed = _sampled_ip(body, _SAMPLED_V4, IPv4Address)
            elif kind == RECORD_IPV6:
                if observed is None:
                    observed = _sampled_ip(body, _SAMPLED_V6, IPv6Address)
            elif kind == RECORD_EXTENDED_GATEWAY:
                src_as, dst_as = _gateway(body)
            else:
                state.count("sflow.flow_records_skipped")
        except WireDecodeError as exc:
            # A record bounded by its length: the sample's other records still describe the
            # packet (a garbled gateway record costs the AS numbers, not the flow).
            failures.append(exc)
    if failures:
        if observed is None:
            raise failures[0]
        walk.noted.extend(f"record_{exc.code}" for exc in failures)
    if observed is None:
        state.count("sflow.samples_without_ip")
        return None
    interval, provenance = state.resolve_interval(exporter, rate or None)
    return state.build(
        observed.src,
        observed.dst,
        observed.sport,
        observed.dport,
        observed.proto,
        1,
        observed.length,
        now_ms,
        now_ms,
        observed.tcp_flags,
        observed.tos,
        src_as,
        dst_as,
        exporter,
        sub_agent,
        FORMAT,
        interval,
        provenance,
    )


def _raw_header(r: Reader, exporter: str, state: DecoderState) -> _Observed | None:
    protocol, frame_length, stripped, header_length = r.unpack(_RAW_HEADER, "raw header")
    header = r.bytes(header_length)
    # XDR opaque<>: padded to 4 bytes; the record length is the authority on what follows.
    r.skip(r.remaining(), "header padding")
    try:
        if protocol == HEADER_ETHERNET:
            summary = packet.decode_ethernet(
                header, exporter=exporter, address=state.address_from_bytes
            )
        elif protocol in (HEADER_IPV4, HEADER_IPV6):
            summary = packet.decode_ip(header, exporter=exporter, address=state.address_from_bytes)
        else:
            state.count("sflow.headers_unsupported")
            return None
    except DecodeError:
        # The sampled packet is traffic, not the exporter's doing: a truncated or garbled
        # header loses this sample only.
        state.count("sflow.headers_undecodable")
        return None
    if summary is None:
        state.count("sflow.headers_not_ip")
        return None
    length = summary.ip_length
    if length <= (40 if summary.src.version == 6 else 0):
        # IP length absent (TSO, jumbogram): what the frame says, less link layer and FCS.
        length = max(0, frame_length - stripped - summary.l3_offset)
    return _Observed(
        summary.src,
        summary.dst,
        summary.proto,
        summary.sport,
        summary.dport,
        summary.tcp_flags,
        summary.tos,
        length,
    )


def _sampled_ip(
    r: Reader, st: struct.Struct, family: type[IPv4Address] | type[IPv6Address]
) -> _Observed:
    length, proto, src, dst, sport, dport, flags, tos = r.unpack(st, "sampled IP record")
    r.skip(r.remaining(), "record padding")
    return _Observed(
        family(src),
        family(dst),
        proto & 0xFF,
        sport & 0xFFFF,
        dport & 0xFFFF,
        flags & 0xFF,
        tos & 0xFF,
        length,
    )


def _gateway(r: Reader) -> tuple[int | None, int | None]:
    _read_address(r)  # next hop
    _router_as = r.u32()
    src_as = r.u32()
    _src_peer_as = r.u32()
    segments = r.u32()
    if segments > MAX_AS_PATH_SEGMENTS:
        raise r.malformed(f"{segments} AS path segments")
    dst_as: int | None = None
    for _ in range(segments):
        _segment_type = r.u32()
        count = r.u32()
        if count * 4 > r.remaining():
            raise r.truncated("AS path segment", count * 4)
        if count:
            r.skip(4 * (count - 1), "AS path")
            dst_as = r.u32()  # the path ends at the destination's origin AS
    r.skip(r.remaining(), "communities and local preference")
    return src_as, dst_as
