"""sFlow v5 in batches: the flow samples of many datagrams decoded into numpy columns at once.

The scalar decoder (:mod:`overflowd.wire.sflow`) builds a
:class:`~overflowd.wire.reader.Reader` per sample and per record and parses each sampled
packet header in Python, some 10 µs a record (0.07-0.10M records/s decode + sample,
bench/sflow_batch.py), although a collector sampling at 1e-6 keeps almost none of them. This
path finds the samples and records of every datagram of a batch with numpy, one *step* at a
time across all datagrams (step ``k`` reads the ``k``-th sample header of every datagram
that has one; datagrams laid out as the batch's first one, and flow samples whose records
are laid out as the first one's, are checked at once instead), reads the packet headers'
fields the sampler needs (protocol, source port, TCP flags) with gathers over the joined
bytes, and the rest (addresses, ToS, lengths, times) and FlowRows only for the records a
sampler chose (:meth:`SFlowBatch.rows`), equal to the scalar path's, as template_batch does
for v9/IPFIX.

The common case only. A datagram goes the array way when all of it is plain, and every
sample's first packet description is a raw header (0:1) of Ethernet (up to
:data:`MAX_FAST_TAGS` VLAN tags) or bare IPv4/IPv6 that decodes simply: IPv4 with or without
options, IPv6 without extension headers, any transport (ports of TCP, UDP and the rest of
``packet.PORT_PROTOCOLS``, the ICMP type and code) cut anywhere after the IP header. Counter
samples, unknown samples and flow records other than the ones below are counted and skipped
as the scalar path does. Anything else sends the *whole datagram* to
:func:`~overflowd.wire.dispatch.decode_datagram_rows`, which stays the reference:

* a structural defect of any kind (truncation, bytes after the last sample, lengths that are
  not multiples of 4, an unknown agent address type, more than :data:`MAX_FAST_SAMPLES`
  samples or :data:`MAX_FAST_RECORDS` records in a sample: the walk is one numpy step per
  sample, and a datagram of hundreds of tiny samples must not cost hundreds of steps);
* an extended gateway record (0:1003: AS path parsing), a sampled IPv4/IPv6 record (0:3,
  0:4) as first description;
* a header that is not one of the above: MPLS, LLC/SNAP, non-IP (the scalar path then
  tries the sample's next description), IPv6 extension headers, truncated or malformed IP.

So the records (each datagram's in its order; :meth:`SFlowBatch.all_rows_in_order` gives
the scalar order), their probabilities and the state (datagrams, records, per-exporter
entries in first-seen order, counters, defects, held v9 data expiry) are those of
``decode_datagram_rows`` over the same datagrams in the same order. Non-sFlow datagrams are
not touched: their indices come back in ``passed`` (decode them after: with held v9/IPFIX
data in the same batch, it may expire one batch later than on the scalar path, as with
``v5_batch``).

Cost: about 6 numpy calls per walk step (one step per sample index, then per record
index: a step reads a length and moves on, every check is made once over all samples or
records after the walk; none when the layout check holds) and some 120 over the batch, so
a batch should be full (the collector's 256 datagrams: ~0.3 µs a record; 15 datagrams,
~220 µs, ~2.5 µs a record); the join of a batch's bytes is made once, padding included (a
second copy got the heap trimmed and every batch paid its page faults).

Work is bounded: per batch at most ``MAX_FAST_SAMPLES + MAX_FAST_RECORDS`` steps of a few
numpy calls each (and each layout check reads one datagram's or sample's headers in Python,
as many), plus a constant number of calls over the samples; each datagram is read once into
the joined buffer.

Pure: no I/O, no clock. numpy is used for arithmetic only.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from overflowd.errors import DecodeError
from overflowd.flows import PROVENANCES, FlowRow, make_row
from overflowd.flowsample import SamplingPolicy
from overflowd.wire import packet
from overflowd.wire.dispatch import decode_datagram_rows
from overflowd.wire.sflow import (
    FORMAT,
    HEADER_ETHERNET,
    HEADER_IPV4,
    HEADER_IPV6,
    RECORD_EXTENDED_GATEWAY,
    RECORD_IPV4,
    RECORD_IPV6,
    RECORD_RAW_HEADER,
    SAMPLE_COUNTERS,
    SAMPLE_COUNTERS_EXPANDED,
    SAMPLE_FLOW,
    SAMPLE_FLOW_EXPANDED,
)

if TYPE_CHECKING:
    from overflowd.wire.dispatch import DecoderState

__all__ = ["MAX_FAST_RECORDS", "MAX_FAST_SAMPLES", "SFlowBatch", "decode_sflow_batch"]

#: Samples per datagram and records per flow sample the array walk takes (one numpy step
#: each); datagrams with more go the scalar way. A 1500-byte datagram of real samples (raw
#: headers of 64-128 bytes) holds about 10, hsflowd and switches put 3-6 records per sample.
MAX_FAST_SAMPLES = 32
MAX_FAST_RECORDS = 16
#: VLAN tags (802.1Q, 802.1ad, QinQ) in front of the IP header that the array path follows.
MAX_FAST_TAGS = 2

_SFLOW_MAGIC = b"\0\0\0\x05"
#: Zero bytes after the joined datagrams: a gather a few bytes past a datagram (masked out
#: afterwards) stays inside the buffer. The farthest is 64 bytes of IPv6 header from an
#: address near the end.
_PAD = 128
_PAD_BYTES = bytes(_PAD)
_PROVENANCE_CODE = {name: i for i, name in enumerate(PROVENANCES)}
_VLAN = np.zeros(0x10000, dtype=bool)
_VLAN[list(packet.VLAN_ETHERTYPES)] = True
#: Flow record types that describe the sampled packet (raw header, sampled IPv4, IPv6), by
#: type, the last entry standing for every larger one.
_DESCRIPTION = np.zeros(8, dtype=bool)
_DESCRIPTIONS = frozenset({RECORD_RAW_HEADER, RECORD_IPV4, RECORD_IPV6})
_DESCRIPTION[list(_DESCRIPTIONS)] = True
#: Header words before the sample count by agent address type (0, 1: IPv4, 2: IPv6, other).
_HEAD_WORDS = np.array([6, 7, 10, 6], dtype=np.int64)
#: Sample class by type (enterprise 0): 1 flow, 2 counters, 0 anything else (the last
#: entry stands for every larger type, an enterprise's included).
_SAMPLE_CLASS = np.zeros(6, dtype=np.int8)
_SAMPLE_CLASS[[SAMPLE_FLOW, SAMPLE_FLOW_EXPANDED]] = 1
_SAMPLE_CLASS[[SAMPLE_COUNTERS, SAMPLE_COUNTERS_EXPANDED]] = 2
#: Ethertypes of IPv4 and IPv6.
_IP_ETHERTYPE = np.zeros(0x10000, dtype=bool)
_IP_ETHERTYPE[[packet.ETHERTYPE_IPV4, packet.ETHERTYPE_IPV6]] = True
_PORTS = np.zeros(256, dtype=bool)
_PORTS[list(packet.PORT_PROTOCOLS)] = True
_ICMP = np.zeros(256, dtype=bool)
_ICMP[list(packet.ICMP_PROTOCOLS)] = True
_V6_CHAIN = np.zeros(256, dtype=bool)
_V6_CHAIN[list(packet.IPV6_CHAIN)] = True

I64 = npt.NDArray[np.int64]
U32 = npt.NDArray[np.uint32]
U16 = npt.NDArray[np.uint16]
U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]


#: The per-record arrays of an SFlowBatch, gathered by :meth:`SFlowBatch.select`.
_PER_RECORD = (
    "sport", "proto", "tcp_flags", "packets", "interval", "provenance", "_dg", "_v6", "_l3",
    "_h", "_dport_at",
)  # fmt: skip


class SFlowBatch:
    """The array-decoded flow samples of a batch of sFlow datagrams, one array per field.

    Records are in the order of the walk: every datagram's first sample, then every
    datagram's second... so a datagram's records are in its order, and ``datagram`` tells
    whose each is (:meth:`all_rows_in_order` gives the scalar path's order).
    Columns have the types :class:`~overflowd.flowsample_batch.BatchSampler` reads. IPv4
    addresses are in ``src``/``dst`` (uint32); an IPv6 record has 0 there and its addresses
    in row ``v6_slot[i]`` of ``src6``/``dst6`` (``v6_slot`` is -1 for IPv4). The sampler
    reads addresses only for operator prefixes and asked boosts, which are IPv4-only there:
    with such a policy, sample ``ipv4()`` with it and ``ipv6_rows()`` with the scalar
    sampler (see :meth:`needs_scalar_ipv6`). Treat the arrays as read-only.

    What the default sampler reads (ports, protocol, TCP flags, packets, interval) is
    decoded with the batch; the rest (addresses, destination port, ToS, length, time,
    exporter, sub-agent) from the joined datagrams when first asked for, and by
    :meth:`rows` for the chosen records only: at 1 in a million, almost never.
    """

    __slots__ = (
        "_b",
        "_cache",
        "_cand",
        "_dg",
        "_dport_at",
        "_ex",
        "_h",
        "_halves",
        "_l3",
        "_nows",
        "_sub_agent",
        "_v6",
        "_words",
        "errors",
        "exporters",
        "failures",
        "interval",
        "packets",
        "passed",
        "proto",
        "provenance",
        "scalar",
        "sport",
        "tcp_flags",
    )  # fmt: skip

    sport: U16
    proto: U8
    tcp_flags: U8
    packets: U32
    #: Resolved sampling interval, and its provenance (index in ``flows.PROVENANCES``).
    interval: I64
    provenance: U8
    exporters: tuple[str, ...]
    #: FlowRows of each sFlow datagram decoded the scalar way (only datagrams with some).
    scalar: tuple[tuple[int, list[FlowRow]], ...]
    #: Datagrams refused (counted in the state as the scalar path counts them).
    errors: tuple[tuple[int, DecodeError], ...]
    #: Datagrams whose decoding raised something else (a bug some input reaches): dropped.
    failures: tuple[tuple[int, Exception], ...]
    #: Indices of datagrams that are not sFlow v5 (not counted here).
    passed: tuple[int, ...]
    _dg: I64
    _v6: Bools
    _l3: I64
    _h: I64
    _dport_at: I64

    def __init__(
        self,
        rec: dict[str, Any],
        *,
        buffers: tuple[U8, U16, U32],
        nows: Sequence[float],
        sub_agent: U32,
        ex: I64,
        cand: I64 | None,
        exporters: tuple[str, ...],
        scalar: tuple[tuple[int, list[FlowRow]], ...] = (),
        errors: tuple[tuple[int, DecodeError], ...] = (),
        failures: tuple[tuple[int, Exception], ...] = (),
        passed: tuple[int, ...] = (),
    ) -> None:
        # Per record (see _PER_RECORD): the datagram among the walked ones (_dg), IPv6 or
        # not, the byte offsets of the IP header and of the raw header record's header,
        # and where the destination port (or ICMP type/code) is read, -1 for none.
        for name in _PER_RECORD:
            setattr(self, name, rec[name])
        # Per walked datagram: arrival time, sub-agent, exporter index; their index in the
        # input (None: the walked datagrams are the input).
        self._nows, self._sub_agent, self._ex, self._cand = nows, sub_agent, ex, cand
        self._b, self._halves, self._words = buffers
        self.exporters = exporters
        self.scalar, self.errors, self.failures, self.passed = scalar, errors, failures, passed
        self._cache: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.sport)

    # -- the columns decoded when first read ----------------------------------------------

    def _lazy(self, name: str) -> Any:
        cache = self._cache
        if name not in cache:
            cache.update(self._decode_rest(None))
        return cache[name]

    def _arrival_ms(self) -> I64:
        """Arrival ms of each walked datagram as the scalar path computes it, int(now *
        1000): float to int64 truncates toward zero as int() does, for every finite value
        in range."""
        if "arrival_ms" not in self._cache:
            nows = np.fromiter(self._nows, np.float64, len(self._nows))
            ms = nows * 1000
            if np.isfinite(ms).all() and float(np.abs(ms).max(initial=0.0)) < 2.0**62:
                out = ms.astype(np.int64)
            else:
                out = np.array([int(t * 1000) for t in nows.tolist()], dtype=np.int64)
            self._cache["arrival_ms"] = out
        arrival: I64 = self._cache["arrival_ms"]
        return arrival

    def _decode_rest(self, idx: npt.NDArray[np.intp] | None) -> dict[str, Any]:
        """The columns not decoded with the batch, for records ``idx`` (None: all)."""

        def pick(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
            return a if idx is None else a[idx]

        b, halves, words = self._b, self._halves, self._words
        v6 = pick(self._v6)
        l3 = pick(self._l3)
        h = pick(self._h)
        dport_at = pick(self._dport_at)
        dg = pick(self._dg)
        b0 = b[l3].astype(np.int64)
        b1 = b[l3 + 1].astype(np.int64)
        k3 = l3 >> 1  # the IP header in u16 units (it starts at an even offset)
        total = halves[k3 + 1].astype(np.int64)
        # IPv4: total length; IPv6: the 40-byte header and the payload length. A length
        # the header does not give (0, TSO, jumbograms): the frame's, less link layer and
        # FCS (the raw header record's frame length and stripped bytes, words 1 and 2).
        ip_length = np.where(v6, 40 + halves[k3 + 2].astype(np.int64), total)
        short = ip_length <= np.where(v6, 40, 0)
        rb = (h >> 2) - 4
        frame = words[rb + 1].astype(np.int64) - words[rb + 2].astype(np.int64)
        length = np.where(short, np.maximum(frame - (l3 - h), 0), ip_length)
        tos = np.where(v6, ((b0 & 0x0F) << 4) | (b1 >> 4), b1).astype(np.uint8)
        dport = np.where(dport_at >= 0, _u16(halves, np.maximum(dport_at, 0)), 0)
        a6 = l3[v6]
        span = np.arange(16, dtype=np.int64)
        slot = np.full(len(v6), -1, dtype=np.int64)
        slot[v6] = np.arange(len(a6))
        datagram = dg if self._cand is None else self._cand[dg]
        return {
            "src": np.where(v6, 0, _u32(halves, l3 + 12)).astype(np.uint32),
            "dst": np.where(v6, 0, _u32(halves, l3 + 16)).astype(np.uint32),
            "src6": b[(a6 + 8)[:, None] + span],
            "dst6": b[(a6 + 24)[:, None] + span],
            "v6_slot": slot,
            "dport": dport.astype(np.uint16),
            "bytes": length,
            "tos": tos,
            "first": self._arrival_ms()[dg],
            "exporter": self._ex[dg].astype(np.uint32),
            "domain": self._sub_agent[dg].astype(np.uint32),
            "datagram": datagram.astype(np.int64, copy=False),
        }

    @property
    def src(self) -> U32:
        out: U32 = self._lazy("src")
        return out

    @property
    def dst(self) -> U32:
        out: U32 = self._lazy("dst")
        return out

    @property
    def src6(self) -> U8:
        out: U8 = self._lazy("src6")
        return out

    @property
    def dst6(self) -> U8:
        out: U8 = self._lazy("dst6")
        return out

    @property
    def v6_slot(self) -> I64:
        out: I64 = self._lazy("v6_slot")
        return out

    @property
    def dport(self) -> U16:
        out: U16 = self._lazy("dport")
        return out

    @property
    def bytes(self) -> I64:
        out: I64 = self._lazy("bytes")
        return out

    @property
    def tos(self) -> U8:
        out: U8 = self._lazy("tos")
        return out

    @property
    def first(self) -> I64:
        """Arrival time in Unix ms (first and last alike: the datagram carries no time)."""
        out: I64 = self._lazy("first")
        return out

    @property
    def last(self) -> I64:
        return self.first

    @property
    def exporter(self) -> U32:
        out: U32 = self._lazy("exporter")
        return out

    @property
    def domain(self) -> U32:
        """The sub-agent id."""
        out: U32 = self._lazy("domain")
        return out

    @property
    def datagram(self) -> I64:
        """Index in the input of the datagram each record came from."""
        out: I64 = self._lazy("datagram")
        return out

    # -- selections and rows ----------------------------------------------------------------

    def needs_scalar_ipv6(self, policy: SamplingPolicy) -> bool:
        """Whether IPv6 records must go the scalar sampler's way under ``policy``: it has
        operator prefixes or an asked boost (the batch sampler reads IPv4 addresses only)."""
        return bool((policy.operator_prefixes or policy.asked_boost is not None) and self._v6.any())

    def select(self, mask: Bools) -> SFlowBatch:
        """The records where ``mask`` holds, as a batch of their own (same exporters)."""
        idx = np.flatnonzero(mask)
        rec = {name: getattr(self, name)[idx] for name in _PER_RECORD}
        return SFlowBatch(
            rec,
            buffers=(self._b, self._halves, self._words),
            nows=self._nows,
            sub_agent=self._sub_agent,
            ex=self._ex,
            cand=self._cand,
            exporters=self.exporters,
        )

    def ipv4(self) -> SFlowBatch:
        return self.select(~self._v6)

    def ipv6_rows(self) -> list[FlowRow]:
        return self.rows(np.flatnonzero(self._v6))

    def all_rows_in_order(self) -> list[FlowRow]:
        """Every record, array and scalar, in the order the scalar path gives them. Builds
        every row: for tests, not for a collector."""
        arrays = self.rows(np.arange(len(self)))
        by_datagram: dict[int, list[FlowRow]] = {i: list(rows) for i, rows in self.scalar}
        for i, row in zip(self.datagram.tolist(), arrays, strict=True):
            by_datagram.setdefault(i, []).append(row)
        return [row for i in sorted(by_datagram) for row in by_datagram[i]]

    def rows(self, indices: Sequence[int] | npt.NDArray[np.integer[Any]]) -> list[FlowRow]:
        """FlowRows for the chosen records, equal to the scalar decoder's for them."""
        idx = np.asarray(indices, dtype=np.intp)
        if not len(idx):
            return []
        rest = self._decode_rest(idx)
        v6 = self._v6[idx]
        src: list[Any] = rest["src"].tolist()
        dst: list[Any] = rest["dst"].tolist()
        where6 = np.flatnonzero(v6).tolist()
        if where6:
            s6 = rest["src6"].tobytes()
            d6 = rest["dst6"].tobytes()
            for k, i in enumerate(where6):
                src[i] = IPv6Address(s6[16 * k : 16 * k + 16])
                dst[i] = IPv6Address(d6[16 * k : 16 * k + 16])
        new_v4 = IPv4Address
        for i in np.flatnonzero(~v6).tolist():
            src[i] = new_v4(src[i])
            dst[i] = new_v4(dst[i])
        exporters = self.exporters
        times = rest["first"].tolist()
        columns = (
            src,
            dst,
            self.sport[idx].tolist(),
            rest["dport"].tolist(),
            self.proto[idx].tolist(),
            rest["bytes"].tolist(),
            times,
            self.tcp_flags[idx].tolist(),
            rest["tos"].tolist(),
            rest["exporter"].tolist(),
            rest["domain"].tolist(),
            self.interval[idx].tolist(),
            self.provenance[idx].tolist(),
        )
        return [
            make_row(
                s, d, sport, dport, proto, 1, octets, t, t, flags, tos, None, None,
                exporters[exp], domain, FORMAT, interval, PROVENANCES[prov],
            )
            for (
                s, d, sport, dport, proto, octets, t, flags, tos, exp, domain, interval, prov,
            ) in zip(*columns, strict=True)
        ]  # fmt: skip


def _u16(halves: npt.NDArray[Any], at: I64) -> I64:
    """Big-endian u16 at even byte offsets ``at``."""
    out: I64 = halves[at >> 1].astype(np.int64)
    return out


def _u32(halves: npt.NDArray[Any], at: I64) -> U32:
    """Big-endian u32 at even byte offsets ``at``."""
    k = at >> 1
    out: U32 = (halves[k].astype(np.uint32) << 16) | halves[k + 1]
    return out


def decode_sflow_batch(
    datagrams: Sequence[tuple[bytes, str, float]], state: DecoderState
) -> SFlowBatch:
    """Decode every sFlow v5 datagram of ``(payload, exporter, now)`` into one batch.

    Never raises a DecodeError: refused datagrams (all of them decoded the scalar way) are
    counted in ``state`` as ``decode_datagram`` counts them and listed in ``errors``; a
    datagram that raised something else is in ``failures``; non-sFlow datagrams in
    ``passed``.
    """
    n = len(datagrams)
    if not n:
        return _columns(datagrams, (), (), (), {}, [], [], [], (), state)
    payloads: tuple[bytes, ...]
    names: tuple[str, ...]
    nows: tuple[float, ...]
    payloads, names, nows = zip(*datagrams, strict=True)
    sizes = np.fromiter(map(len, payloads), dtype=np.int64, count=n)
    # Candidates for the array walk: XDR keeps every field 4-aligned from the datagram's
    # start, so datagrams of a multiple of 4 bytes joined end to end keep them aligned in
    # the buffer, and every XDR field is one element of a big-endian u32 view.
    aligned = int(sizes.min()) >= 4 and not (sizes & 3).any()
    if aligned:
        # The usual batch: join it at once and read every datagram's magic there (the
        # first word, 5); if all are sFlow, that is the buffer walked.
        buf = b"".join([*payloads, _PAD_BYTES])
        start = np.zeros(n, dtype=np.int64)
        np.cumsum(sizes[:-1] >> 2, out=start[1:])
        is_sflow = np.frombuffer(buf, dtype=">u4")[start] == 5
        if is_sflow.all():
            fast_all, walked = _walk_joined(buf, sizes, start)
            return _finish(datagrams, state, names, nows, is_sflow, fast_all, range(n), walked, ())
        del buf
    else:
        is_sflow = np.fromiter(map(_is_sflow, payloads), dtype=bool, count=n)
    passed = tuple(np.flatnonzero(~is_sflow).tolist())
    cand_mask = is_sflow & ((sizes & 3) == 0)
    fast = np.zeros(n, dtype=bool)
    rec: dict[str, Any] = {}
    cand: Sequence[int] = ()
    if cand_mask.any():  # (all of them is the aligned batch above)
        cand = np.flatnonzero(cand_mask).tolist()
        fast_c, rec = _walk([payloads[i] for i in cand], sizes[cand_mask])
        fast[cand_mask] = fast_c
    return _finish(datagrams, state, names, nows, is_sflow, fast, cand, rec, passed)


def _is_sflow(payload: bytes) -> bool:
    return payload[:4] == _SFLOW_MAGIC


def _walk(payloads: Sequence[bytes], sizes: I64) -> tuple[Bools, dict[str, Any]]:
    """The pure part: which datagrams decode the array way, and their records' columns.

    Records come in (datagram, sample) order, with ``datagram`` their index in ``payloads``.
    """
    # One join, the padding included: a second copy of a few hundred kB per batch is not
    # only a copy (freed at once, it gets the heap trimmed, and the next batch pays its
    # page faults again).
    return _walk_joined(b"".join([*payloads, _PAD_BYTES]), sizes, None)


def _word(words: U32, at: I64) -> I64:
    """XDR words at word indices ``at``, as native int64.

    A 1-D ``take`` is the cheapest gather numpy has; the clip holds every index inside the
    buffer, so that a walk over a broken datagram reads on harmlessly (what it reads is not
    kept: the datagram is marked and goes the scalar way). Native int64 because numpy's
    arithmetic on big-endian or mixed-width operands costs 2-3 times what it costs on
    native arrays of one type, and a batch makes a few hundred such calls.
    """
    out: I64 = words.take(at, mode="clip").astype(np.int64)
    return out


def _by_count(counts: I64) -> tuple[I64 | None, list[int]]:
    """The stable order of decreasing ``counts`` (None: they are all equal, the usual
    batch, no sort) and, for each step ``k`` below the largest, how many of that order
    have more than ``k`` (a prefix of it)."""
    n = len(counts)
    if not n:
        return None, []
    low, high = int(counts.min()), int(counts.max())
    if low == high:
        return None, [n] * high
    order = np.argsort(-counts, kind="stable")
    ascending = counts[order][::-1]
    return order, (n - np.searchsorted(ascending, np.arange(high), side="right")).tolist()


def _sample_layout(words: U32, first: I64, end: I64, count: int) -> tuple[I64, I64] | None:
    """Whether the datagrams whose samples start at ``first`` (all with ``count`` samples,
    ending at ``end``) all have the samples of the first one, length for length, none of
    them broken and the last one ending the datagram. If so: the samples' offsets from
    ``first`` and their lengths; else None (walk them). As in _record_layout, equal
    lengths at the first datagram's positions mean the walk reads those positions."""
    if not count:
        return None
    start = at = int(first[0])
    stop = int(end[0])
    # The first samples' lengths first: batches of varied layouts (headers of every size)
    # are told in two calls.
    head_length = _word(words, first + 1)
    if not (head_length == head_length[0]).all():
        return None
    offsets: list[int] = []
    lengths: list[int] = []
    for _ in range(count):
        length = int(words[at + 1])
        if length & 3 or at + 2 + (length >> 2) > stop:
            return None
        offsets.append(at - start)
        lengths.append(length)
        at += 2 + (length >> 2)
    if at != stop or not (first + (at - start) == end).all():
        return None
    offset = np.array(offsets, dtype=np.int64)
    length_of = np.array(lengths, dtype=np.int64)
    if count > 1 and not (_word(words, first + offset[1:, None] + 1) == length_of[1:, None]).all():
        return None
    return offset, length_of


def _walk_samples(
    words: U32, bad_dg: Bools, act: I64, p: I64, end: I64, live_at: list[int]
) -> tuple[I64, I64, I64]:
    """The sample walk: one step per sample index over the datagrams ``act`` (by
    decreasing sample count, so that those with a k-th sample are a prefix of them: a view,
    no copy per step; their first samples at ``p``). A step only reads the sample's length
    and moves on; whether each sample fits its datagram, and the last one ends it, is
    checked once after the walk over all of them. Until then a broken datagram walks on
    wherever its lengths lead (_word keeps the reads inside the buffer); it is marked in
    ``bad_dg`` then, and nothing of it kept. Returns each sample's datagram, header word
    index and length."""
    live_at = [*live_at, 0]
    final = np.empty(len(act), dtype=np.int64)  # each datagram's position after its last
    s_at: list[I64] = []
    s_len: list[I64] = []
    s_next: list[I64] = []
    before = len(act)
    for m in live_at:
        if m < before:  # these have no more samples
            final[m:before] = p[m:before]
        before = m
        if not m:
            break
        p = p[:m]
        length = _word(words, p + 1)
        s_at.append(p)
        s_len.append(length)
        p = p + 2 + (length >> 2)
        s_next.append(p)
    bad_dg[act[final != end[act]]] = True  # bytes after the last sample
    if not s_at:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    sd = np.concatenate([act[:m] for m in live_at[: len(s_at)]])
    sat = np.concatenate(s_at)
    slen = np.concatenate(s_len)
    # Past the datagram's end (a header cut short too: the next one is >= p + 2), or a
    # length that is not a whole number of words.
    broken = (np.concatenate(s_next) > end[sd]) | ((slen & 3) != 0)
    if broken.any():
        bad_dg[sd[broken]] = True
    return sd, sat, slen


def _record_layout(
    words: U32, first: I64, end: I64, live_at: list[int]
) -> tuple[int | None, int] | None:
    """Whether the flow samples whose records start at ``first`` (all with ``len(live_at)``
    records, ending by ``end``) all have the records of the first one: the same kinds, the
    same lengths but for the last record's (which moves no other), none of them broken or
    an extended gateway. If so: the offset of their first packet description from
    ``first`` (None: none) and how many records are not one; else None (walk them).

    If every length read at the first sample's record positions is the first sample's,
    the walk would have read those same positions (by induction on the records), so the
    kinds read there are each sample's.
    """
    count = len(live_at)
    if not count:
        return None
    start = at = int(first[0])
    stop = int(end[0])
    # Word offsets of every record's kind and length, and the values the first sample has.
    fields: list[int] = []
    expected: list[int] = []
    kinds: list[int] = []
    for _ in range(count):
        kind, length = int(words[at]), int(words[at + 1])
        if length & 3 or kind == RECORD_EXTENDED_GATEWAY or at + 2 + (length >> 2) > stop:
            return None
        fields += (at - start, at - start + 1)
        expected += (kind, length)
        kinds.append(kind)
        at += 2 + (length >> 2)
    last_at = fields[-2]
    # One gather of every sample's record headers, (field, sample); the last length is each
    # sample's own, bounded and aligned below.
    got = _word(words, first + np.array(fields, dtype=np.int64)[:, None])
    if not (got[:-1] == np.array(expected[:-1], dtype=np.int64)[:, None]).all():
        return None
    last_length = got[-1]
    if (last_length & 3).any() or not (first + (last_at + 2) + (last_length >> 2) <= end).all():
        return None
    described = [k for k, kind in enumerate(kinds) if kind in _DESCRIPTIONS]
    return (fields[2 * described[0]] if described else None), count - len(described)


def _walk_records(
    words: U32, f_ok: Bools, ract: I64, p: I64, fend: I64, live_at: list[int]
) -> tuple[I64, I64]:
    """The record walk, one step per record index, over the flow samples ``ract`` (by
    decreasing record count, so that those with a k-th record are a prefix; their first
    records at ``p``), checks after it. Marks broken samples in ``f_ok``; returns each flow
    sample's first packet description's word index (0: none) and its other records."""
    n_f = len(f_ok)
    first_pos = np.zeros(n_f, dtype=np.int64)
    r_at: list[I64] = []
    r_kind: list[I64] = []
    r_len: list[I64] = []
    r_next: list[I64] = []
    for m in live_at:  # (every m > 0: the steps are the largest count)
        p = p[:m]
        length = _word(words, p + 1)
        r_at.append(p)
        r_kind.append(_word(words, p))
        r_len.append(length)
        p = p + 2 + (length >> 2)
        r_next.append(p)
    if not r_at:
        return first_pos, np.zeros(n_f, dtype=np.int64)
    rw = np.concatenate([ract[:m] for m in live_at])
    rkind = np.concatenate(r_kind)
    rlen = np.concatenate(r_len)
    broken = (
        (np.concatenate(r_next) > fend[rw]) | ((rlen & 3) != 0) | (rkind == RECORD_EXTENDED_GATEWAY)
    )
    if broken.any():
        f_ok[rw[broken]] = False
    desc = _DESCRIPTION[np.minimum(rkind, len(_DESCRIPTION) - 1)]
    skipped = np.bincount(rw[~desc], minlength=n_f)
    first_desc = desc[: live_at[0]]
    if first_desc.all():  # every sample starts with its packet's header
        first_pos[ract[: live_at[0]]] = r_at[0]
    else:  # the first description of each, last step first so that earlier ones win
        offsets = np.cumsum([0, *live_at]).tolist()
        for k in reversed(range(len(live_at))):
            here = desc[offsets[k] : offsets[k + 1]]
            first_pos[ract[: live_at[k]][here]] = r_at[k][here]
    return first_pos, skipped


def _walk_joined(buf: bytes, sizes: I64, start: I64 | None) -> tuple[Bools, dict[str, Any]]:
    """:func:`_walk` over the datagrams joined in ``buf`` (sizes ``sizes``, then _PAD),
    starting at words ``start`` (None: computed here)."""
    # Views, no copies: XDR words, bytes, and big-endian u16 at even offsets (every 16- and
    # 32-bit field of a packet header the array path reads is at an even offset: the header
    # starts 4-aligned, Ethernet and VLAN tags are 14 and 4 bytes, IP headers multiples of 4).
    words = np.frombuffer(buf, dtype=">u4")
    b = np.frombuffer(buf, dtype=np.uint8)
    halves = np.frombuffer(buf, dtype=">u2")
    n_dg = len(sizes)
    if start is None:
        start = np.zeros(n_dg, dtype=np.int64)
        np.cumsum(sizes[:-1] >> 2, out=start[1:])
    end = start + (sizes >> 2)

    # -- datagram headers: version, agent address (type 0/1/2: 0/4/16 bytes), sub-agent,
    # sequence, uptime, sample count.
    atype = _word(words, start + 1)
    head = _HEAD_WORDS[np.minimum(atype, 3)]
    ok_dg = (atype <= 2) & (sizes >= 4 * head)
    at_count = start + head
    sub_agent = _word(words, at_count - 4)
    n_samples = _word(words, at_count - 1)
    ok_dg &= (n_samples <= MAX_FAST_SAMPLES) & (2 * n_samples <= end - at_count)
    bad_dg = ~ok_dg

    # -- the samples: where each starts and its length, in (sample index, datagram) order.
    # Datagrams of one exporter are often laid out alike (a sample's length follows from
    # its header length): when every datagram has the samples of the first one, length for
    # length, that is checked in a few calls and nothing is walked.
    act = np.flatnonzero(ok_dg)
    order, live_at = _by_count(n_samples[act])
    if order is not None:
        act = act[order]
    p = at_count[act]
    layout = None if order is not None else _sample_layout(words, p, end[act], len(live_at))
    if layout is not None:
        offsets, lengths = layout
        sd = np.tile(act, len(lengths))
        sat = (p + offsets[:, None]).ravel()
        slen = np.repeat(lengths, len(act))
    else:
        sd, sat, slen = _walk_samples(words, bad_dg, act, p, end, live_at)
    skind = _word(words, sat)
    # Sample class: 0 unknown (an enterprise's or a format we do not know), 1 flow, 2
    # counters; nothing of a broken datagram is a flow sample (its bytes are not samples).
    sclass = _SAMPLE_CLASS[np.minimum(skind, len(_SAMPLE_CLASS) - 1)]
    is_counter = sclass == 2
    is_unknown = sclass == 0
    is_flow = (sclass == 1) & ~bad_dg[sd]

    # -- flow sample headers (compact: 8 words, rate at 2, count at 7; expanded: 11, 3, 10).
    f = np.flatnonzero(is_flow)
    fbody = sat[f] + 2
    flen = (slen[f] >> 2).astype(np.int64)
    expanded = skind[f] == SAMPLE_FLOW_EXPANDED
    fhead = np.where(expanded, 11, 8)
    rate = _word(words, fbody + 2 + expanded)
    count = _word(words, fbody + fhead - 1)
    f_ok = (flen >= fhead) & (count <= MAX_FAST_RECORDS) & (2 * count <= flen - fhead)

    # -- the records of the flow samples. Exporters describe every sampled packet alike
    # (pmacct's sfprobe: an extended switch record, then a 128-byte raw header; a switch
    # exporting full-size headers likewise): when every sample's records have the kinds and
    # lengths of the first one's, that is checked in a few calls and nothing is walked.
    n_f = len(f)
    ract = np.flatnonzero(f_ok)
    order, live_at = _by_count(count[ract])
    if order is not None:
        ract = ract[order]
    p = (fbody + fhead)[ract]
    fend = fbody + flen
    # Word index of each flow sample's first packet description record (0: none).
    first_pos = np.zeros(n_f, dtype=np.int64)
    alike = None if order is not None else _record_layout(words, p, fend[ract], live_at)
    if alike is not None:
        first_desc, n_other = alike
        if first_desc is not None:
            first_pos[ract] = p + first_desc
        skipped = np.zeros(n_f, dtype=np.int64)
        skipped[ract] = n_other
    else:
        first_pos, skipped = _walk_records(words, f_ok, ract, p, fend, live_at)
    found = first_pos > 0
    first_kind = np.where(found, _word(words, first_pos), 0)
    first_body = first_pos + 2
    first_len = _word(words, first_pos + 1)

    # Sampled IP records as first description: the scalar way.
    f_ok &= (first_kind == 0) | (first_kind == RECORD_RAW_HEADER)
    raw = np.flatnonzero(f_ok & (first_kind == RECORD_RAW_HEADER))

    # -- raw packet headers: protocol, frame length, stripped, header length, header.
    # Every read below is at most 96 bytes past the record's header start, which lies inside
    # its (checked) datagram: inside the buffer (_PAD), whatever the header length says.
    # Values of records that are not `ok` are garbage and never kept.
    every_raw = len(raw) == n_f  # the usual: no gathers
    rb = first_body if every_raw else first_body[raw]
    rlen = first_len if every_raw else first_len[raw]
    protocol = _word(words, rb)
    hlen = _word(words, rb + 3)
    h = (rb << 2) + 16
    hend = h + hlen
    ok = (rlen >= 16) & (hlen <= rlen - 16)
    eth = protocol == HEADER_ETHERNET
    # Ethernet: 12 address bytes, then the ethertype, after up to MAX_FAST_TAGS VLAN tags;
    # non-Ethernet headers get ethertype 0 (no tag, not IP).
    if eth.all():
        ok &= hlen >= 14
        ethertype = _u16(halves, h + 12)
        l3 = h + 14
    else:
        ok &= (eth & (hlen >= 14)) | (protocol == HEADER_IPV4) | (protocol == HEADER_IPV6)
        ethertype = np.where(eth, _u16(halves, h + 12), 0)
        l3 = np.where(eth, h + 14, h)
    for _ in range(MAX_FAST_TAGS):
        tagged = _VLAN[ethertype]
        if not tagged.any():
            break
        ok &= ~tagged | (hend - l3 >= 4)
        ethertype = np.where(tagged, _u16(halves, l3 + 2), ethertype)
        l3 = np.where(tagged, l3 + 4, l3)
    ok &= _IP_ETHERTYPE[ethertype] | ~eth
    avail3 = hend - l3
    b0 = b[l3]
    version = b0 >> 4
    v4 = version == 4
    # IPv4: version/IHL, ToS, total length, id, flags/fragment offset, TTL, protocol, ...
    ihl4 = (b0 & 0x0F).astype(np.int64) << 2
    ok4 = (avail3 >= 20) & (ihl4 >= 20) & (ihl4 <= avail3)
    k3 = l3 >> 1  # the IP header in u16 units (it starts at an even offset)
    total = halves[k3 + 1].astype(np.int64)
    fragment = v4 & ((halves[k3 + 3] & 0x1FFF) != 0)
    # Where the IP datagram ends inside the header: its total length, if it holds its own
    # header, else the header's end.
    ip_end = np.where(total >= ihl4, np.minimum(hend, l3 + total), hend)
    v6 = version == 6
    if v6.any():
        # IPv6: version/class/label, payload length, next header, hops, addresses.
        nh6 = b[l3 + 6]
        ok &= np.where(v4, ok4, v6 & (avail3 >= 40) & ~_V6_CHAIN[nh6])
        payload6 = halves[k3 + 2].astype(np.int64)
        proto = np.where(v4, b[l3 + 9], nh6)
        l4 = l3 + np.where(v4, ihl4, 40)
        end6 = np.where(payload6 != 0, np.minimum(hend, l3 + 40 + payload6), hend)
        ip_end = np.where(v4, ip_end, end6)
    else:  # IPv4 only (the usual batch): the same without the IPv6 alternatives
        ok &= v4 & ok4
        proto = b[l3 + 9]
        l4 = l3 + ihl4
    available = ip_end - l4  # (negative: none; every use below asks for some)
    readable = ~fragment
    ported = readable & _PORTS[proto] & (available >= 4)
    icmp = readable & _ICMP[proto] & (available >= 2)
    sport = np.where(ported, _u16(halves, l4), 0).astype(np.uint16)
    # The destination port (or ICMP type and code) is read when asked for (rows).
    dport_at = np.where(ported, l4 + 2, np.where(icmp, l4, -1))
    flagged = ported & (proto == 6) & (available >= 14)
    tcp_flags = np.where(flagged, b[l4 + 13], 0).astype(np.uint8)

    # -- which samples decoded: every counter/unknown one; flow samples without a
    # description (counted), or whose first description is a raw header that decoded here.
    # (Samples of a datagram already marked are not in `f`.)
    all_ok = bool(ok.all())
    if every_raw and all_ok:
        flow_ok = f_ok  # (all true: every flow sample is in `raw`)
    else:
        flow_ok = f_ok.copy()
        flow_ok[raw] = ok
        if not flow_ok.all():
            bad_dg[sd[f[~flow_ok]]] = True
    fast = ~bad_dg

    # Per-sample counters, for fast datagrams only (the scalar path counts the others).
    all_fast = bool(fast.all())
    in_fast = fast[sd] if not all_fast else None
    f_fast = in_fast[f] if in_fast is not None else None
    # Records in walk order: sample by sample index, datagram order within each; a datagram's
    # own records are in its order (what the scalar path gives, per datagram).
    if all_ok and all_fast:
        every = True  # all of them (the usual): no copies
        pick = np.arange(0)
    else:
        good = np.flatnonzero(ok)
        pick = good[fast[sd[f[raw[good]]]]]  # positions among `raw` of the records kept
        every = len(pick) == len(raw)

    def per_pick(a: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return a if every else a[pick]

    sel = (None if len(raw) == n_f else raw) if every else raw[pick]  # None: all of `f`
    rsample = f if sel is None else f[sel]
    rec: dict[str, Any] = {
        "_dg": sd[rsample],
        "_v6": per_pick(v6),
        "_l3": per_pick(l3),
        "_h": per_pick(h),
        "_dport_at": per_pick(dport_at),
        "sport": per_pick(sport),
        "proto": per_pick(proto).astype(np.uint8, copy=False),
        "tcp_flags": per_pick(tcp_flags),
        "rate": rate if sel is None else rate[sel],
        "sub_agent": sub_agent,
        "buffers": (b, halves, words),
        # Totals over the fast datagrams, in the order _finish counts them.
        "counts": _counts(is_counter, is_unknown, skipped, first_kind == 0, in_fast, f_fast),
    }
    return fast, rec


def _counts(
    is_counter: Bools,
    is_unknown: Bools,
    skipped: I64,
    no_ip: Bools,
    in_fast: Bools | None,
    f_fast: Bools | None,
) -> tuple[tuple[str, Any], ...]:
    """The state's counters over the samples of fast datagrams (``in_fast`` of every
    sample, ``f_fast`` of every flow sample; None: all are), in the order _finish counts
    them."""
    if in_fast is None or f_fast is None:
        return (
            ("sflow.counter_samples", np.count_nonzero(is_counter)),
            ("sflow.unknown_samples", np.count_nonzero(is_unknown)),
            ("sflow.flow_records_skipped", skipped.sum()),
            ("sflow.samples_without_ip", np.count_nonzero(no_ip)),
        )
    return (
        ("sflow.counter_samples", np.count_nonzero(is_counter & in_fast)),
        ("sflow.unknown_samples", np.count_nonzero(is_unknown & in_fast)),
        ("sflow.flow_records_skipped", skipped[f_fast].sum()),
        ("sflow.samples_without_ip", np.count_nonzero(f_fast & no_ip)),
    )


def _finish(
    datagrams: Sequence[tuple[bytes, str, float]],
    state: DecoderState,
    names: Sequence[str],
    nows: Sequence[float],
    is_sflow: Bools,
    fast: Bools,
    cand: Sequence[int],
    rec: dict[str, Any],
    passed: tuple[int, ...],
) -> SFlowBatch:
    """State bookkeeping as ``_decode`` does it, the scalar way for the rest, the columns."""
    scalar: list[tuple[int, list[FlowRow]]] = []
    errors: list[tuple[int, DecodeError]] = []
    failures: list[tuple[int, Exception]] = []

    def slow(i: int) -> None:
        data, exporter, now = datagrams[i]
        try:
            rows = decode_datagram_rows(data, exporter, state, now)
        except DecodeError as exc:
            errors.append((i, exc))
            return
        except Exception as exc:  # a bug some input reaches: that datagram only
            failures.append((i, exc))
            return
        if rows:
            scalar.append((i, rows))

    n_fast = int(np.count_nonzero(fast))
    whole = isinstance(cand, range)
    n_rec = len(rec["_dg"]) if n_fast else 0
    if n_fast:
        for name, total in rec["counts"]:
            if total:
                state.count(name, int(total))
        state._datagrams += n_fast
        state._records += n_rec
        state._by_format[FORMAT] += n_fast
        # Exporters of the walked datagrams, numbered in order of first appearance.
        cand_names = names if whole else [names[i] for i in cand]
        index = dict.fromkeys(cand_names, 0)
        for k, name in enumerate(index):
            index[name] = k
        rec["exporter_names"] = list(index)
        if len(index) == 1:
            rec["ex_of_cand"] = np.zeros(len(cand), dtype=np.int64)
        else:
            rec["ex_of_cand"] = np.fromiter(map(index.__getitem__, cand_names), np.int64, len(cand))
    slow_idx = [] if n_fast == len(fast) else np.flatnonzero(is_sflow & ~fast).tolist()
    pending = state.pending
    if len(pending) and n_fast:
        # Held v9/IPFIX data expires by each datagram's arrival time, in arrival order (a
        # clock may go backwards in a replay): datagram by datagram, as _decode does. Rare:
        # nothing is held in an sFlow-only collector.
        position = {i: k for k, i in enumerate(cand)}
        n_list = np.bincount(rec["_dg"], minlength=len(cand)).tolist()
        for i in np.flatnonzero(is_sflow).tolist():
            if fast[i]:
                pending.expire(nows[i])
                entry = state._exporter_entry(names[i])
                entry[0] += 1
                entry[1] += n_list[position[i]]
            else:
                slow(i)
        return _columns(datagrams, names, nows, cand, rec, scalar, errors, failures, passed, state)
    if n_fast:
        # Exporter entries are made in the order the scalar path first meets each exporter,
        # the datagrams decoded the scalar way included (they find their entry there), so
        # the cap on tracked exporters falls on the same ones whichever path ran.
        exporter_names = rec["exporter_names"]
        first_seen = exporter_names
        if slow_idx:
            # Order of first appearance over every sFlow datagram, fast or not.
            order = dict.fromkeys(names[i] for i in np.flatnonzero(is_sflow).tolist())
            first_seen = list(order)
        entries = {name: state._exporter_entry(name) for name in first_seen}
        if len(exporter_names) == 1 and n_fast == len(cand):
            entry = entries[exporter_names[0]]
            entry[0] += n_fast
            entry[1] += n_rec
        else:
            ex = rec["ex_of_cand"]
            fast_c = fast if whole else fast[np.asarray(cand, dtype=np.intp)]
            seen = np.bincount(ex[fast_c], minlength=len(exporter_names)).tolist()
            records = np.bincount(ex[rec["_dg"]], minlength=len(exporter_names)).tolist()
            for name, d, r in zip(exporter_names, seen, records, strict=True):
                entry = entries[name]
                entry[0] += d
                entry[1] += r
    for i in slow_idx:
        slow(i)
    return _columns(datagrams, names, nows, cand, rec, scalar, errors, failures, passed, state)


_EMPTY_BUFFERS = (np.zeros(0, np.uint8), np.zeros(0, ">u2"), np.zeros(0, ">u4"))


def _columns(
    datagrams: Sequence[tuple[bytes, str, float]],
    names: Sequence[str],
    nows: Sequence[float],
    cand: Sequence[int],
    rec: dict[str, Any],
    scalar: list[tuple[int, list[FlowRow]]],
    errors: list[tuple[int, DecodeError]],
    failures: list[tuple[int, Exception]],
    passed: tuple[int, ...],
    state: DecoderState,
) -> SFlowBatch:
    if not cand or not len(rec["_dg"]):
        z = np.zeros(0, dtype=np.int64)
        empty = {
            "sport": z.astype(np.uint16),
            "proto": z.astype(np.uint8),
            "tcp_flags": z.astype(np.uint8),
            "packets": z.astype(np.uint32),
            "interval": z,
            "provenance": z.astype(np.uint8),
            "_dg": z,
            "_v6": z.astype(bool),
            "_l3": z,
            "_h": z,
            "_dport_at": z,
        }
        return SFlowBatch(
            empty,
            buffers=_EMPTY_BUFFERS,
            nows=(),
            sub_agent=z.astype(np.uint32),
            ex=z,
            cand=None,
            exporters=(),
            scalar=tuple(scalar),
            errors=tuple(errors),
            failures=tuple(failures),
            passed=passed,
        )
    whole = isinstance(cand, range)
    exporter_names = rec["exporter_names"]
    ex_of_cand = rec["ex_of_cand"]
    dg = rec["_dg"]
    n = len(dg)
    # Interval and provenance per (exporter, announced rate) pair: few per batch.
    rate = rec["rate"]
    low = int(rate.min())
    if len(exporter_names) == 1 and low == int(rate.max()):
        value, provenance = state.resolve_interval(exporter_names[0], low or None)
        interval = np.full(n, value, dtype=np.int64)
        provenance_code = np.full(n, _PROVENANCE_CODE[provenance], dtype=np.uint8)
    else:
        pairs, inverse = np.unique((ex_of_cand[dg] << 32) | rate, return_inverse=True)
        pair_interval = np.empty(len(pairs), dtype=np.int64)
        pair_provenance = np.empty(len(pairs), dtype=np.uint8)
        for j, pair in enumerate(pairs.tolist()):
            value, provenance = state.resolve_interval(
                exporter_names[pair >> 32], (pair & 0xFFFFFFFF) or None
            )
            pair_interval[j] = value
            pair_provenance[j] = _PROVENANCE_CODE[provenance]
        interval = pair_interval[inverse.reshape(-1)]
        provenance_code = pair_provenance[inverse.reshape(-1)]
    rec["packets"] = np.ones(n, dtype=np.uint32)
    rec["interval"] = interval
    rec["provenance"] = provenance_code
    return SFlowBatch(
        rec,
        buffers=rec["buffers"],
        nows=nows if whole else [nows[i] for i in cand],
        sub_agent=rec["sub_agent"],
        ex=ex_of_cand,
        cand=None if whole else np.asarray(cand, dtype=np.int64),
        exporters=tuple(exporter_names),
        scalar=tuple(scalar),
        errors=tuple(errors),
        failures=tuple(failures),
        passed=passed,
    )
