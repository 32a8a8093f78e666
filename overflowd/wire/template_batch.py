"""NetFlow v9 and IPFIX in batches: data sets of fixed-length templates decoded into arrays.

The scalar path (:meth:`Template.flows`) builds a tuple, two address objects and a
:class:`~overflowd.flows.FlowRow` per record, some 2-4 µs each, although a collector sampling
at 1e-6 keeps almost none of them. This path keeps everything the scalar decoder does per
datagram (header, flowset/set walk, templates, options, held data, counters: the very same
code, :func:`~overflowd.wire.dispatch.decode_datagram_rows`) and changes one step: a data
set whose template compiled to a :class:`~overflowd.wire.templates.BatchLayout` (all fields
fixed-length; IPv4 addresses; no per-record sampling; see ``_batch_layout`` for what is
declined) is not decoded there but taken by a :class:`SetSink`, which keeps its bytes and
the values the scalar path would read from the set's context *at that moment* (announced
sampling, system init time, export time). After the last datagram the sets of each layout
are joined and read with one strided numpy view per column: no Python per record. Sampling
runs on the arrays (:class:`~overflowd.flowsample_batch.BatchSampler`), and
:meth:`TemplateBatch.rows` builds FlowRows only for the sampled records, equal to the scalar
path's.

Same state as the scalar path: the datagram, record and exporter counts, held data, templates
and defects end up as ``decode_datagram_rows`` over the same datagrams leaves them (the
``time_out_of_range`` defects of taken sets are counted when the batch is finished, not
during the walk). A layout is cached with its template (``Template.batch_layout``), so a
changed template is a new layout, and the cache's bounds are the scalar ones: the layout is
charged in the template's footprint.

Records of every other set (variable-length and declined templates, sFlow, NetFlow v5 given
here) come back as FlowRows per datagram in ``TemplateBatch.scalar``, for the scalar
sampler. Refused datagrams come back in ``errors`` (DecodeError, counted as the scalar path
counts them) and datagrams that hit a bug in ``failures``; neither stops the batch.

Pure: no I/O, no clock. numpy is used for arithmetic only.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from overflowd.errors import DecodeError
from overflowd.flows import PROVENANCES, FlowRow, make_row
from overflowd.wire import ipfix, netflow_v9
from overflowd.wire.dispatch import decode_datagram_rows
from overflowd.wire.reader import Reader
from overflowd.wire.templates import (
    MAX_TIME_MS,
    MIN_TIME_MS,
    BatchLayout,
    SetContext,
    Template,
)

if TYPE_CHECKING:
    from overflowd.wire.dispatch import DecoderState

__all__ = ["FORMATS", "SetSink", "TemplateBatch", "decode_template_batch"]

#: ``TemplateBatch.fmt`` indexes this.
FORMATS = (netflow_v9.FORMAT, ipfix.FORMAT)
_FORMAT_CODE = {name: i for i, name in enumerate(FORMATS)}
_PROVENANCE_CODE = {name: i for i, name in enumerate(PROVENANCES)}

#: How IPFIX/v9 sysUpTime times become Unix ms for a set (``Template._time``'s branches).
_SYSUP_V9, _SYSUP_BOOT, _SYSUP_EXPORT = 0, 1, 2
#: A system init time outside this cannot be added to a 32-bit uptime in int64; such sets
#: (an exporter's nonsense) go the scalar way.
_BOOT_BOUND = 1 << 62

#: Each width read once into the host's order at the same width (not widened: memory traffic
#: is most of the cost); arithmetic that could overflow a width widens first.
_NATIVE: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.uint16),
    4: np.dtype(np.uint32),
    8: np.dtype(np.uint64),
}
_BIG_ENDIAN: dict[int, np.dtype[Any]] = {
    1: np.dtype("u1"),
    2: np.dtype(">u2"),
    4: np.dtype(">u4"),
    8: np.dtype(">u8"),
}

U64 = npt.NDArray[np.uint64]
Unsigned = npt.NDArray[np.unsignedinteger[Any]]
I64 = npt.NDArray[np.int64]
U32 = npt.NDArray[np.uint32]
U16 = npt.NDArray[np.uint16]
U8 = npt.NDArray[np.uint8]
Bools = npt.NDArray[np.bool_]


@dataclass(frozen=True, slots=True, eq=False)
class TemplateBatch:
    """The array-decoded records of a batch of v9/IPFIX datagrams, one array per field.

    Columns have the types :class:`~overflowd.flowsample_batch.BatchSampler` reads (``src``,
    ``dst`` uint32; ``sport`` uint16; ``proto`` uint8; ``packets`` and ``tcp_flags`` uint64,
    raw as the scalar path keeps them; ``interval`` int64). Treat them as read-only.
    """

    src: U32
    dst: U32
    sport: U16
    dport: U16
    proto: U8
    packets: Unsigned
    bytes: Unsigned
    first: I64
    last: I64
    tcp_flags: Unsigned
    tos: U8
    src_as: Unsigned
    dst_as: Unsigned
    #: Whether the record's template has the AS fields (else the row says None).
    has_as: Bools
    interval: I64
    provenance: U8
    exporter: U32
    domain: U32
    #: Index into :data:`FORMATS`.
    fmt: U8
    exporters: tuple[str, ...]
    #: ``(datagram, position, start, count)`` per taken set: its records are
    #: ``start:start+count`` here, and stood at ``position`` of the scalar records of that
    #: datagram (for tests that compare the order).
    sets: tuple[tuple[int, int, int, int], ...]
    #: FlowRows of each datagram decoded the scalar way (only datagrams with some).
    scalar: tuple[tuple[int, list[FlowRow]], ...]
    #: Datagrams refused (counted in the state as the scalar path counts them).
    errors: tuple[tuple[int, DecodeError], ...]
    #: Datagrams whose decoding raised something else (a bug some input reaches): dropped.
    failures: tuple[tuple[int, Exception], ...]

    def __len__(self) -> int:
        return len(self.src)

    def rows(self, indices: Sequence[int] | npt.NDArray[np.integer[Any]]) -> list[FlowRow]:
        """FlowRows for the chosen records, equal to the scalar decoder's for them."""
        idx = np.asarray(indices, dtype=np.intp)
        exporters = self.exporters
        new_address = IPv4Address
        has_as = self.has_as[idx].tolist()
        src_as = self.src_as[idx].tolist()
        dst_as = self.dst_as[idx].tolist()
        columns = (
            self.src[idx].tolist(),
            self.dst[idx].tolist(),
            self.sport[idx].tolist(),
            self.dport[idx].tolist(),
            self.proto[idx].tolist(),
            self.packets[idx].tolist(),
            self.bytes[idx].tolist(),
            self.first[idx].tolist(),
            self.last[idx].tolist(),
            self.tcp_flags[idx].tolist(),
            self.tos[idx].tolist(),
            [a if h else None for a, h in zip(src_as, has_as, strict=True)],
            [a if h else None for a, h in zip(dst_as, has_as, strict=True)],
            self.exporter[idx].tolist(),
            self.domain[idx].tolist(),
            self.fmt[idx].tolist(),
            self.interval[idx].tolist(),
            self.provenance[idx].tolist(),
        )
        return [
            make_row(
                new_address(src), new_address(dst), sport, dport, proto, packets, octets,
                first, last, flags, tos, sas, das, exporters[exp], domain, FORMATS[fmt],
                interval, PROVENANCES[prov],
            )
            for (
                src, dst, sport, dport, proto, packets, octets, first, last, flags, tos, sas,
                das, exp, domain, fmt, interval, prov,
            ) in zip(*columns, strict=True)
        ]  # fmt: skip

    def all_rows_in_order(self) -> list[FlowRow]:
        """Every record, scalar and array-decoded, in the order the scalar path gives them
        (datagram by datagram). Builds every row: for tests, not for a collector."""
        arrays = self.rows(np.arange(len(self)))
        by_datagram: dict[int, list[tuple[int, int, int]]] = {}
        for datagram, position, start, count in self.sets:
            by_datagram.setdefault(datagram, []).append((position, start, count))
        scalar = dict(self.scalar)
        out: list[FlowRow] = []
        for datagram in sorted(set(scalar) | set(by_datagram)):
            rows = scalar.get(datagram, [])
            done = 0
            for position, start, count in by_datagram.get(datagram, []):
                out.extend(rows[done:position])
                done = position
                out.extend(arrays[start : start + count])
            out.extend(rows[done:])
        return out


class _Group:
    """The taken sets of one layout, in arrival order."""

    __slots__ = ("bodies", "counts", "sets")

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.counts: list[int] = []
        self.sets: list[int] = []


class SetSink:
    """Takes the data sets of array-decodable templates while ``decode_template_batch`` walks
    the datagrams (``DecoderState.sink``), with the per-set values the scalar path would use."""

    def __init__(self, state: DecoderState) -> None:
        self._state = state
        #: Records taken from the datagram being decoded (``dispatch._decode`` adds them to
        #: its record counts).
        self.taken = 0
        self._datagram = 0
        self._mark = 0
        self._groups: dict[BatchLayout, _Group] = {}
        self._exporter_index: dict[str, int] = {}
        # Per taken set, in order: (group, datagram, position, exporter, domain, format,
        # export_ms, uptime, sysUpTime mode, boot ms, interval, provenance). One tuple a set:
        # this runs per datagram.
        self._sets: list[tuple[Any, ...]] = []
        self._last_layout: BatchLayout | None = None
        self._last_group = _Group()
        #: (format, exporter, domain) -> what keep() read from the state for it, while only
        #: plain datagrams (which change no sampling state) are decoded; at most one entry
        #: per exporter and domain of the batch.
        self._contexts: dict[tuple[str, str, int], tuple[int, int, int, int, int, int]] = {}

    def begin(self, datagram: int) -> None:
        self._datagram = datagram
        self._mark = len(self._sets)
        self.taken = 0

    def forget(self) -> None:
        """A datagram goes the scalar way: the sampling state may change."""
        self._contexts.clear()

    def rollback(self) -> None:
        """Forget the sets of the datagram being decoded: it was refused (or failed)."""
        mark = self._mark
        for kept in reversed(self._sets[mark:]):
            group = kept[0]
            group.bodies.pop()
            group.counts.pop()
            group.sets.pop()
        del self._sets[mark:]
        self.taken = 0

    def take(self, template: Template, r: Reader, ctx: SetContext, out: list[Any]) -> bool:
        """Keep the set's records for the arrays, or return False (nothing consumed) for the
        scalar path to decode them."""
        layout = template.batch_layout
        assert layout is not None
        start = r.offset
        length = r.remaining()
        if not self.keep(
            layout, r.data, start, length, ctx.fmt, ctx.exporter, ctx.domain, ctx.export_ms,
            ctx.uptime_ms, len(out),
        ):  # fmt: skip
            return False
        r.skip(length, "data set")
        return True

    def keep(
        self,
        layout: BatchLayout,
        data: bytes,
        start: int,
        length: int,
        fmt: str,
        exporter: str,
        domain: int,
        export_ms: int,
        uptime: int | None,
        position: int,
        memo: bool = False,
    ) -> bool:
        """Keep the ``length`` bytes of a data set body at ``data[start:]`` (checked by the
        caller to lie inside ``data``), or return False for the scalar path to decode it.

        ``memo``: the sampling state has not changed since the last datagram of the scalar
        path (only plain datagrams since), so what was read from it for this exporter and
        domain still holds and is not read again."""
        state = self._state
        key = (fmt, exporter, domain)
        context = self._contexts.get(key) if memo else None
        if context is None:
            if not memo:
                # Inside a datagram of the scalar path, which may change the sampling
                # state (options data) after this set: nothing remembered holds.
                self._contexts.clear()
            code = _FORMAT_CODE.get(fmt)
            if code is None:
                return False
            # The values Template.flows reads from the state, read at the same point of the
            # walk (options data earlier in the datagram has been applied, later data has
            # not).
            sampling = state.sampling
            interval, provenance = state.resolve_interval(
                exporter, sampling.announced(fmt, exporter, domain)
            )
            boot = 0
            if uptime is not None:
                mode = _SYSUP_V9
            else:
                init = sampling.system_init_ms(fmt, exporter, domain)
                if init is None:
                    mode = _SYSUP_EXPORT
                elif -_BOOT_BOUND <= init <= _BOOT_BOUND:
                    mode, boot = _SYSUP_BOOT, init
                else:
                    return False
            index = self._exporter_index.setdefault(exporter, len(self._exporter_index))
            context = (index, code, mode, boot, interval, _PROVENANCE_CODE[provenance])
            if memo:
                self._contexts[key] = context
        index, code, mode, boot, interval, provenance_code = context
        size = layout.itemsize
        count = length // size
        if count == 0:
            # As Template.flows: more than alignment padding but less than one record.
            if length >= 4:
                state.count("data_sets_shorter_than_a_record")
            return True
        body = data[start : start + count * size]  # trailing bytes: padding
        if layout is self._last_layout:
            group = self._last_group
        else:
            # Hashing a layout walks its columns: remember the last one (one exporter's
            # datagrams come in runs).
            got = self._groups.get(layout)
            if got is None:
                got = self._groups[layout] = _Group()
            group = self._last_group = got
            self._last_layout = layout
        sets = self._sets
        group.bodies.append(body)
        group.counts.append(count)
        group.sets.append(len(sets))
        sets.append(
            (
                group, self._datagram, position, index, domain, code, export_ms, uptime or 0,
                mode, boot, interval, provenance_code,
            )
        )  # fmt: skip
        self.taken += count
        return True

    def finish(
        self,
        scalar: Sequence[tuple[int, list[FlowRow]]],
        errors: Sequence[tuple[int, DecodeError]],
        failures: Sequence[tuple[int, Exception]],
    ) -> TemplateBatch:
        """Decode every taken set into the batch's columns."""
        by_field = list(zip(*self._sets, strict=True)) or [()] * 12
        per_set: dict[str, npt.NDArray[Any]] = {
            "exporter": np.array(by_field[3], dtype=np.uint32),
            "domain": np.array(by_field[4], dtype=np.uint32),
            "fmt": np.array(by_field[5], dtype=np.uint8),
            "export_ms": np.array(by_field[6], dtype=np.int64),
            "uptime": np.array(by_field[7], dtype=np.uint32),
            "sysup_mode": np.array(by_field[8], dtype=np.uint8),
            "boot": np.array(by_field[9], dtype=np.int64),
            "interval": np.array(by_field[10], dtype=np.int64),
            "provenance": np.array(by_field[11], dtype=np.uint8),
        }
        parts: list[dict[str, npt.NDArray[Any]]] = []
        starts = [0] * len(self._sets)
        start = 0
        bad_times = np.zeros(len(FORMATS), dtype=np.int64)
        for layout, group in self._groups.items():
            if not group.counts:
                continue  # every set of it was rolled back
            for s, n in zip(group.sets, group.counts, strict=True):
                starts[s] = start
                start += n
            columns, bad = _decode_group(layout, group, per_set)
            bad_times += bad
            parts.append(columns)
        state = self._state
        for code, n in enumerate(bad_times.tolist()):
            if n:
                state.defect(FORMATS[code], "time_out_of_range", n)
        if not parts:
            parts.append(_empty_columns())
        joined = (
            parts[0]
            if len(parts) == 1
            else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        )
        counts = [0] * len(self._sets)
        for group in self._groups.values():
            for s, n in zip(group.sets, group.counts, strict=True):
                counts[s] = n
        return TemplateBatch(
            **joined,
            exporters=tuple(self._exporter_index),
            sets=tuple(zip(by_field[1], by_field[2], starts, counts, strict=True)),
            scalar=tuple(scalar),
            errors=tuple(errors),
            failures=tuple(failures),
        )


def _empty_columns() -> dict[str, npt.NDArray[Any]]:
    return {
        "src": np.empty(0, np.uint32),
        "dst": np.empty(0, np.uint32),
        "sport": np.empty(0, np.uint16),
        "dport": np.empty(0, np.uint16),
        "proto": np.empty(0, np.uint8),
        "packets": np.empty(0, np.uint64),
        "bytes": np.empty(0, np.uint64),
        "first": np.empty(0, np.int64),
        "last": np.empty(0, np.int64),
        "tcp_flags": np.empty(0, np.uint64),
        "tos": np.empty(0, np.uint8),
        "src_as": np.empty(0, np.uint64),
        "dst_as": np.empty(0, np.uint64),
        "has_as": np.empty(0, np.bool_),
        "interval": np.empty(0, np.int64),
        "provenance": np.empty(0, np.uint8),
        "exporter": np.empty(0, np.uint32),
        "domain": np.empty(0, np.uint32),
        "fmt": np.empty(0, np.uint8),
    }


def _decode_group(
    layout: BatchLayout, group: _Group, per_set: dict[str, npt.NDArray[Any]]
) -> tuple[dict[str, npt.NDArray[Any]], I64]:
    """The columns of one layout's sets, and the out-of-range times by format, computed as
    ``_FlowPlan.build`` computes them record by record."""
    data = b"".join(group.bodies)
    size = layout.itemsize
    n = len(data) // size
    raw: dict[str, Unsigned] = {}
    for name, offset, length in layout.columns:
        view = np.ndarray(
            (n,), dtype=_BIG_ENDIAN[length], buffer=data, offset=offset, strides=(size,)
        )
        raw[name] = view.astype(_NATIVE[length])
    sets = np.array(group.sets, dtype=np.intp)
    reps = np.array(group.counts, dtype=np.intp)
    const = {name: np.repeat(values[sets], reps) for name, values in per_set.items()}
    zeros = np.zeros(n, dtype=np.uint64)

    def col(name: str) -> Unsigned:
        return raw.get(name, zeros)

    # Narrowing casts of unsigned integers keep the low bits: ``& 0xFF`` / ``& 0xFFFF``.
    proto = col("proto").astype(np.uint8)
    sport = col("sport").astype(np.uint16)
    dport = col("dport").astype(np.uint16)
    for family, number in (("icmp4", 1), ("icmp6", 58)):
        names = (f"{family}_combined", f"{family}_type", f"{family}_code")
        if not any(name in raw for name in names):
            continue
        is_icmp = proto == number
        if not is_icmp.any():
            continue
        # _icmp_ports: (0, type * 256 + code), unless that says 0/0 beside a source port
        # of 0 (then the destination port stays).
        if names[0] in raw:
            value = raw[names[0]].astype(np.uint64) & 0xFFFF
        else:
            value = (col(names[1]).astype(np.uint64) & 0xFF) << np.uint64(8)
            if names[2] in raw:
                value |= raw[names[2]].astype(np.uint64) & 0xFF
        value16 = value.astype(np.uint16)
        new_dport = np.where((value16 == 0) & (sport == 0), dport, value16)
        dport = np.where(is_icmp, new_dport, dport)
        sport = np.where(is_icmp, np.uint16(0), sport)
    if "tos" in raw:
        tos = raw["tos"].astype(np.uint8)
    elif "dscp" in raw:
        tos = ((raw["dscp"].astype(np.uint64) & 0x3F) << np.uint64(2)).astype(np.uint8)
    else:
        tos = np.zeros(n, dtype=np.uint8)

    export_ms = const["export_ms"]
    first, first_ok = _times(raw, "first", layout.first_kind, const)
    last, last_ok = _times(raw, "last", layout.last_kind, const)
    bad = np.zeros(len(FORMATS), dtype=np.int64)
    for ok in (first_ok, last_ok):
        if ok is not None:
            wrong = ~ok
            if wrong.any():
                bad += np.bincount(const["fmt"][wrong], minlength=len(FORMATS))
    # Absent or out of range: first falls back to last, then to the export time; last to
    # first.
    if last is not None and last_ok is not None:
        fallback = np.where(last_ok, last, export_ms)
    else:
        fallback = export_ms
    first_ms = (
        fallback if first is None or first_ok is None else np.where(first_ok, first, fallback)
    )
    last_ms = first_ms if last is None or last_ok is None else np.where(last_ok, last, first_ms)

    has_as = "src_as" in raw or "dst_as" in raw
    columns: dict[str, npt.NDArray[Any]] = {
        "src": col("src").astype(np.uint32, copy=False),
        "dst": col("dst").astype(np.uint32, copy=False),
        "sport": sport,
        "dport": dport,
        "proto": proto,
        "packets": col("packets"),
        "bytes": col("bytes"),
        "first": first_ms.astype(np.int64, copy=False),
        "last": last_ms.astype(np.int64, copy=False),
        "tcp_flags": col("tcp_flags"),
        "tos": tos,
        "src_as": col("src_as"),
        "dst_as": col("dst_as"),
        "has_as": np.full(n, has_as, dtype=np.bool_),
        "interval": const["interval"],
        "provenance": const["provenance"],
        "exporter": const["exporter"],
        "domain": const["domain"],
        "fmt": const["fmt"],
    }
    return columns, bad


def _times(
    raw: dict[str, Unsigned], name: str, kind: str | None, const: dict[str, npt.NDArray[Any]]
) -> tuple[I64 | None, Bools | None]:
    """One time column as Unix ms and where it is in range (``Template._time`` and the
    MIN/MAX_TIME_MS check of ``_FlowPlan.build``), or (None, None) without one."""
    if kind is None:
        return None, None
    value = raw[name]
    if kind == "ms":
        ok = value <= np.uint64(MAX_TIME_MS)
        if value.dtype.itemsize < 8 or ok.all():
            return value.astype(np.int64), ok
        return np.where(ok, value, 0).astype(np.int64), ok
    if kind == "s":
        ok = value <= np.uint64(MAX_TIME_MS // 1000)
        if value.dtype.itemsize < 8 or ok.all():
            return value.astype(np.int64) * 1000, ok
        return np.where(ok, value, 0).astype(np.int64) * 1000, ok
    export_ms: I64 = const["export_ms"]
    if kind == "delta_us":
        t = export_ms - (value // np.uint64(1000)).astype(np.int64)
    else:  # sysup, at most 32 bits wide (BatchLayout)
        mode = const["sysup_mode"]
        # NetFlow v9: the 32-bit difference to the header's sysUpTime, read as signed.
        v9 = export_ms - (const["uptime"] - value.astype(np.uint32)).view(np.int32)
        low, high = int(mode.min()), int(mode.max())
        if low == high == _SYSUP_V9:
            t = v9
        else:
            boot = const["boot"] + value.astype(np.int64)
            t = np.where(mode == _SYSUP_V9, v9, np.where(mode == _SYSUP_BOOT, boot, export_ms))
    ok = (t >= MIN_TIME_MS) & (t <= MAX_TIME_MS)
    return t, ok


_V9_HEADER = netflow_v9.HEADER
_IPFIX_HEADER = ipfix.HEADER
_SET_HEADER = struct.Struct("!HH")
_V9_VERSION = b"\x00\x09"
_IPFIX_VERSION = b"\x00\x0a"


def _plain_datagram(
    data: bytes, exporter: str, now: float, state: DecoderState, sink: SetSink
) -> bool:
    """Decode a datagram that holds nothing but data sets of array-decodable templates
    (what an exporter sends between template refreshes), with no data held anywhere; or
    return False having changed nothing (but the templates' recency, which the scalar path
    then sets again the same way) for ``decode_datagram_rows`` to decode it.

    It does what ``dispatch._decode`` and the format's ``decode`` do for such a datagram,
    without their readers: the same bounds (every set inside the datagram; a datagram
    that is anything else — templates, options, a set that overruns, trailing bytes, a bad
    header — is left to them, so every refusal and defect is theirs).
    """
    if state.pending:
        return False  # expiry and replay have work to do: the scalar path does it
    size = len(data)
    version = data[:2]
    if version == _V9_VERSION:
        if size < _V9_HEADER.size:
            return False
        _, _, uptime, secs, _, domain = _V9_HEADER.unpack_from(data)
        fmt = netflow_v9.FORMAT
        offset = _V9_HEADER.size
        up: int | None = uptime
    elif version == _IPFIX_VERSION:
        if size < _IPFIX_HEADER.size:
            return False
        _, length, secs, _, domain = _IPFIX_HEADER.unpack_from(data)
        if length != size:
            return False
        fmt = ipfix.FORMAT
        offset = _IPFIX_HEADER.size
        up = None
    else:
        return False
    # Pass 1: the sets, each inside the datagram, ending exactly at its end, each of a
    # known array-decodable template (looked up in the scalar path's order; a lookup only
    # refreshes the template's recency, which the scalar path would refresh the same way).
    get = state.templates.get
    spans: list[tuple[int, int, BatchLayout]] = []
    while offset < size:
        if size - offset < 4:
            return False
        set_id, set_length = _SET_HEADER.unpack_from(data, offset)
        if set_id < 256 or set_length < 4 or set_length > size - offset:
            return False
        template = get((fmt, exporter, domain, set_id))
        if template is None:
            return False
        layout = template.batch_layout
        if layout is None:
            return False
        spans.append((offset + 4, set_length - 4, layout))
        offset += set_length
    # Pass 3: keep them, as the scalar path would decode them (the first one can only be
    # declined before anything was kept: all sets share the datagram's context).
    export_ms = secs * 1000
    keep = sink.keep
    for start, length, layout in spans:
        if not keep(layout, data, start, length, fmt, exporter, domain, export_ms, up, 0, True):
            if sink.taken:  # cannot happen (see above); never leave half a datagram
                raise AssertionError("a set declined after another was kept")
            return False
    state._datagrams += 1
    state.build = make_row
    state._replay_spent = 0
    state._by_format[fmt] += 1
    taken = sink.taken
    state._records += taken
    entry = state._exporters.get(exporter) or state._exporter_entry(exporter)
    entry[0] += 1  # as DecoderState._exporter_seen
    entry[1] += taken
    return True


def decode_template_batch(
    datagrams: Sequence[tuple[bytes, str, float]], state: DecoderState
) -> TemplateBatch:
    """Decode ``(payload, exporter, now)`` datagrams of any format, in order, as
    ``decode_datagram_rows`` would one by one, with the data sets of array-decodable
    templates going into the batch's columns. Never raises for a datagram: see the module
    docstring for where refusals and failures go."""
    sink = SetSink(state)
    scalar: list[tuple[int, list[FlowRow]]] = []
    errors: list[tuple[int, DecodeError]] = []
    failures: list[tuple[int, Exception]] = []
    state.sink = sink
    try:
        for i, (data, exporter, now) in enumerate(datagrams):
            sink.begin(i)
            try:
                if _plain_datagram(data, exporter, now, state, sink):
                    continue
                sink.forget()
                rows = decode_datagram_rows(data, exporter, state, now)
            except DecodeError as exc:
                sink.rollback()
                errors.append((i, exc))
                continue
            except Exception as exc:  # the per-datagram boundary: the caller counts it
                sink.rollback()
                failures.append((i, exc))
                continue
            if rows:
                scalar.append((i, rows))
    finally:
        state.sink = None
    return sink.finish(scalar, errors, failures)
