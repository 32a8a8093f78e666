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

_BIG_ENDIAN: dict[int, np.dtype[Any]] = {
    1: np.dtype("u1"),
    2: np.dtype(">u2"),
    4: np.dtype(">u4"),
    8: np.dtype(">u8"),
}

U64 = npt.NDArray[np.uint64]
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
    packets: U64
    bytes: U64
    first: I64
    last: I64
    tcp_flags: U64
    tos: U8
    src_as: U64
    dst_as: U64
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
        # Per taken set, in order.
        self._group_of: list[_Group] = []
        self._datagram_of: list[int] = []
        self._position: list[int] = []
        self._exporter: list[int] = []
        self._domain: list[int] = []
        self._fmt: list[int] = []
        self._export_ms: list[int] = []
        self._uptime: list[int] = []
        self._sysup_mode: list[int] = []
        self._boot: list[int] = []
        self._interval: list[int] = []
        self._provenance: list[int] = []

    def begin(self, datagram: int) -> None:
        self._datagram = datagram
        self._mark = len(self._group_of)
        self.taken = 0

    def rollback(self) -> None:
        """Forget the sets of the datagram being decoded: it was refused (or failed)."""
        mark = self._mark
        for group in reversed(self._group_of[mark:]):
            group.bodies.pop()
            group.counts.pop()
            group.sets.pop()
        for column in (
            self._group_of, self._datagram_of, self._position, self._exporter, self._domain,
            self._fmt, self._export_ms, self._uptime, self._sysup_mode, self._boot,
            self._interval, self._provenance,
        ):  # fmt: skip
            del column[mark:]
        self.taken = 0

    def take(self, template: Template, r: Reader, ctx: SetContext, out: list[Any]) -> bool:
        """Keep the set's records for the arrays, or return False (nothing consumed) for the
        scalar path to decode them."""
        layout = template.batch_layout
        assert layout is not None
        state = self._state
        fmt, exporter, domain = ctx.fmt, ctx.exporter, ctx.domain
        code = _FORMAT_CODE.get(fmt)
        if code is None:
            return False
        # The values Template.flows reads from the state, read at the same point of the walk
        # (options data earlier in the datagram has been applied, later data has not).
        sampling = state.sampling
        interval, provenance = state.resolve_interval(
            exporter, sampling.announced(fmt, exporter, domain)
        )
        export_ms = ctx.export_ms
        uptime = ctx.uptime_ms
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
        size = layout.itemsize
        count = r.remaining() // size
        if count == 0:
            if r.remaining() >= 4:
                state.count("data_sets_shorter_than_a_record")
            r.skip(r.remaining(), "padding")
            return True
        body = r.bytes(count * size)
        r.skip(r.remaining(), "padding")
        group = self._groups.get(layout)
        if group is None:
            group = self._groups[layout] = _Group()
        group.bodies.append(body)
        group.counts.append(count)
        group.sets.append(len(self._group_of))
        index = self._exporter_index.setdefault(exporter, len(self._exporter_index))
        self._group_of.append(group)
        self._datagram_of.append(self._datagram)
        self._position.append(len(out))
        self._exporter.append(index)
        self._domain.append(domain)
        self._fmt.append(code)
        self._export_ms.append(export_ms)
        self._uptime.append(uptime or 0)
        self._sysup_mode.append(mode)
        self._boot.append(boot)
        self._interval.append(interval)
        self._provenance.append(_PROVENANCE_CODE[provenance])
        self.taken += count
        return True

    def finish(
        self,
        scalar: Sequence[tuple[int, list[FlowRow]]],
        errors: Sequence[tuple[int, DecodeError]],
        failures: Sequence[tuple[int, Exception]],
    ) -> TemplateBatch:
        """Decode every taken set into the batch's columns."""
        per_set: dict[str, npt.NDArray[Any]] = {
            "exporter": np.array(self._exporter, dtype=np.uint32),
            "domain": np.array(self._domain, dtype=np.uint32),
            "fmt": np.array(self._fmt, dtype=np.uint8),
            "export_ms": np.array(self._export_ms, dtype=np.int64),
            "uptime": np.array(self._uptime, dtype=np.uint32),
            "sysup_mode": np.array(self._sysup_mode, dtype=np.uint8),
            "boot": np.array(self._boot, dtype=np.int64),
            "interval": np.array(self._interval, dtype=np.int64),
            "provenance": np.array(self._provenance, dtype=np.uint8),
        }
        parts: list[dict[str, npt.NDArray[Any]]] = []
        starts = [0] * len(self._group_of)
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
        counts = [0] * len(self._group_of)
        for group in self._groups.values():
            for s, n in zip(group.sets, group.counts, strict=True):
                counts[s] = n
        return TemplateBatch(
            **joined,
            exporters=tuple(self._exporter_index),
            sets=tuple(zip(self._datagram_of, self._position, starts, counts, strict=True)),
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
    raw: dict[str, U64] = {}
    for name, offset, length in layout.columns:
        view = np.ndarray(
            (n,), dtype=_BIG_ENDIAN[length], buffer=data, offset=offset, strides=(size,)
        )
        raw[name] = view.astype(np.uint64)
    sets = np.array(group.sets, dtype=np.intp)
    reps = np.array(group.counts, dtype=np.intp)
    const = {name: np.repeat(values[sets], reps) for name, values in per_set.items()}
    zeros = np.zeros(n, dtype=np.uint64)

    def col(name: str) -> U64:
        return raw.get(name, zeros)

    proto = (col("proto") & 0xFF).astype(np.uint8)
    sport = (col("sport") & 0xFFFF).astype(np.uint16)
    dport = (col("dport") & 0xFFFF).astype(np.uint16)
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
            value = raw[names[0]] & 0xFFFF
        else:
            value = (col(names[1]) & 0xFF) << np.uint64(8)
            if names[2] in raw:
                value |= raw[names[2]] & 0xFF
        value16 = value.astype(np.uint16)
        new_dport = np.where((value16 == 0) & (sport == 0), dport, value16)
        dport = np.where(is_icmp, new_dport, dport)
        sport = np.where(is_icmp, np.uint16(0), sport)
    if "tos" in raw:
        tos = (raw["tos"] & 0xFF).astype(np.uint8)
    elif "dscp" in raw:
        tos = ((raw["dscp"] & 0x3F) << np.uint64(2)).astype(np.uint8)
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
        "src": col("src").astype(np.uint32),
        "dst": col("dst").astype(np.uint32),
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
    raw: dict[str, U64], name: str, kind: str | None, const: dict[str, npt.NDArray[Any]]
) -> tuple[I64 | None, Bools | None]:
    """One time column as Unix ms and where it is in range (``Template._time`` and the
    MIN/MAX_TIME_MS check of ``_FlowPlan.build``), or (None, None) without one."""
    if kind is None:
        return None, None
    value = raw[name]
    if kind == "ms":
        ok = value <= np.uint64(MAX_TIME_MS)
        return np.where(ok, value, 0).astype(np.int64), ok
    if kind == "s":
        ok = value <= np.uint64(MAX_TIME_MS // 1000)
        return np.where(ok, value, 0).astype(np.int64) * 1000, ok
    export_ms: I64 = const["export_ms"]
    if kind == "delta_us":
        t = export_ms - (value // np.uint64(1000)).astype(np.int64)
    else:  # sysup, at most 32 bits wide (BatchLayout)
        mode = const["sysup_mode"]
        # NetFlow v9: the 32-bit difference to the header's sysUpTime, read as signed.
        delta = (const["uptime"] - value.astype(np.uint32)).view(np.int32)
        t = np.where(
            mode == _SYSUP_V9,
            export_ms - delta,
            np.where(mode == _SYSUP_BOOT, const["boot"] + value.astype(np.int64), export_ms),
        )
    ok = (t >= MIN_TIME_MS) & (t <= MAX_TIME_MS)
    return t, ok


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
