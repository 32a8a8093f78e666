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
are joined and the six columns the sampler reads are decoded, one strided numpy view per
column: no Python per record. Sampling runs on the arrays
(:class:`~overflowd.flowsample_batch.BatchSampler`), and :meth:`TemplateBatch.rows` decodes
the other fields and builds FlowRows only for the sampled records, equal to the scalar
path's.

Most datagrams never reach the scalar code at all (``_walk``): those of data sets
only (taken in one pass, rolled back if the datagram turns out to be anything else) and,
in two passes (check everything, then apply in the scalar order), those that refresh
templates with identical bytes and carry options data of known options templates — what
an exporter such as softflowd sends every 16 datagrams. Anything else (a new or changed
template, a withdrawal, held data, a defect of any kind) is left to the scalar code, so
every refusal, defect and learned template is its own.

Same state as the scalar path: the datagram, record and exporter counts, held data, templates
and defects end up as ``decode_datagram_rows`` over the same datagrams leaves them (the
``time_out_of_range`` defects of taken sets, and the counts of datagrams taken without the
scalar code, are counted when the batch is finished or before the next datagram of the
scalar path, not during the walk). A layout is cached with its template
(``Template.batch_layout``), so a changed template is a new layout, and the cache's bounds
are the scalar ones: the layout is charged in the template's footprint.

Records of every other set (variable-length and declined templates, sFlow, NetFlow v5 given
here) come back as FlowRows per datagram in ``TemplateBatch.scalar``, for the scalar
sampler. Refused datagrams come back in ``errors`` (DecodeError, counted as the scalar path
counts them) and datagrams that hit a bug in ``failures``; neither stops the batch.

Pure: no I/O, no clock. numpy is used for arithmetic only.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from overflowd.errors import DecodeError
from overflowd.flows import PROVENANCES, FlowRow, make_row
from overflowd.wire import ipfix, netflow_v9
from overflowd.wire.dispatch import decode_datagram_rows
from overflowd.wire.reader import Reader, WireDecodeError
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


class _Part:
    """One layout's records in a batch: records ``begin:begin+n`` of the batch, read from
    ``data`` (the layout's set bodies joined)."""

    __slots__ = ("begin", "data", "layout", "n")

    def __init__(self, layout: BatchLayout, data: bytes, begin: int) -> None:
        self.layout = layout
        self.data = data
        self.begin = begin
        self.n = len(data) // layout.itemsize

    def raw(
        self, names: frozenset[str] | None = None, local: npt.NDArray[np.intp] | None = None
    ) -> dict[str, Unsigned]:
        """The layout's columns (those in ``names``) in host order, for records ``local``
        (all without)."""
        size = self.layout.itemsize
        out: dict[str, Unsigned] = {}
        for name, offset, length in self.layout.columns:
            if names is not None and name not in names:
                continue
            view = np.ndarray(
                (self.n,), dtype=_BIG_ENDIAN[length], buffer=self.data, offset=offset,
                strides=(size,),
            )  # fmt: skip
            out[name] = (view if local is None else view[local]).astype(_NATIVE[length])
        return out


#: The columns built only for the records asked for (:meth:`TemplateBatch.rows`): the
#: sampler reads none of them. name -> dtype.
_LAZY: dict[str, np.dtype[Any]] = {
    "dport": np.dtype(np.uint16),
    "bytes": np.dtype(np.uint64),
    "first": np.dtype(np.int64),
    "last": np.dtype(np.int64),
    "tos": np.dtype(np.uint8),
    "src_as": np.dtype(np.uint64),
    "dst_as": np.dtype(np.uint64),
    "has_as": np.dtype(np.bool_),
}


class TemplateBatch:
    """The array-decoded records of a batch of v9/IPFIX datagrams, one array per field.

    The columns :class:`~overflowd.flowsample_batch.BatchSampler` reads are arrays (``src``,
    ``dst`` uint32; ``sport`` uint16; ``proto`` uint8; ``packets`` and ``tcp_flags``
    unsigned, raw as the scalar path keeps them; ``interval`` int64); treat them as
    read-only. Every other field is decoded from the kept bytes only for the records asked
    for (:meth:`rows`, :meth:`column`): at a sampling rate of 1e-6 that is almost none, and
    a batch's fixed cost is what a daemon at a modest rate pays per wake-up.
    """

    __slots__ = (
        "_context",
        "_meta",
        "_parts",
        "_set_of_record",
        "_set_table_export",
        "_set_table_uptime",
        "_starts",
        "_table",
        "dst",
        "errors",
        "exporters",
        "failures",
        "interval",
        "packets",
        "proto",
        "scalar",
        "sport",
        "src",
        "tcp_flags",
    )

    def __init__(
        self,
        *,
        src: U32,
        dst: U32,
        sport: U16,
        proto: U8,
        packets: Unsigned,
        tcp_flags: Unsigned,
        interval: I64,
        context: npt.NDArray[np.int64],
        set_of_record: npt.NDArray[np.int64],
        table: npt.NDArray[np.int64],
        set_export: npt.NDArray[np.int64],
        set_uptime: npt.NDArray[np.int64],
        parts: tuple[_Part, ...],
        exporters: tuple[str, ...],
        meta: npt.NDArray[np.int64],
        starts: npt.NDArray[np.int64],
        scalar: tuple[tuple[int, list[FlowRow]], ...],
        errors: tuple[tuple[int, DecodeError], ...],
        failures: tuple[tuple[int, Exception], ...],
    ) -> None:
        self.src = src
        self.dst = dst
        self.sport = sport
        self.proto = proto
        self.packets = packets
        self.tcp_flags = tcp_flags
        self.interval = interval
        self._context = context
        self._set_of_record = set_of_record
        self._table = table
        self._set_table_export = set_export
        self._set_table_uptime = set_uptime
        self._parts = parts
        self.exporters = exporters
        self._meta = meta
        self._starts = starts
        #: FlowRows of each datagram decoded the scalar way (only datagrams with some).
        self.scalar = scalar
        #: Datagrams refused (counted in the state as the scalar path counts them).
        self.errors = errors
        #: Datagrams whose decoding raised something else (a bug some input reaches):
        #: dropped.
        self.failures = failures

    def __len__(self) -> int:
        return len(self.src)

    @property
    def set_table(self) -> npt.NDArray[np.int64]:
        """``(datagram, position, start, count)`` per taken set, a row each: its records
        are ``start:start+count`` here, and stood at ``position`` of the scalar records of
        that datagram (for tests that compare the order)."""
        meta = self._meta
        return np.stack(
            (meta[:, _DATAGRAM], meta[:, _POSITION], self._starts, meta[:, _COUNT]), axis=1
        )

    def _const(self, idx: npt.NDArray[np.intp]) -> dict[str, npt.NDArray[Any]]:
        """The per-record values the time columns read, for records ``idx``."""
        context = self._context[idx]
        sets = self._set_of_record[idx]
        table = self._table
        return {
            "export_ms": self._set_table_export[sets],
            "uptime": self._set_table_uptime[sets].astype(np.uint32),
            "fmt": table[context, 1].astype(np.uint8),
            "sysup_mode": table[context, 3].astype(np.uint8),
            "boot": table[context, 4],
        }

    def column(self, name: str, indices: npt.NDArray[np.intp] | None = None) -> npt.NDArray[Any]:
        """Any field (a sampler column, one of ``dport bytes first last tos src_as dst_as
        has_as``, or ``provenance exporter domain fmt``) for records ``indices`` (all
        without)."""
        idx = np.arange(len(self)) if indices is None else self._index(indices)
        if name in _LAZY:
            return self._lazy(idx)[name]
        by_context = {"exporter": (0, np.uint32), "fmt": (1, np.uint8), "domain": (2, np.uint32)}
        by_context["provenance"] = (6, np.uint8)
        if name in by_context:
            index, dtype = by_context[name]
            values: npt.NDArray[Any] = self._table[self._context[idx], index].astype(dtype)
            return values
        values = getattr(self, name)[idx]
        return values

    def _index(self, indices: Sequence[int] | npt.NDArray[np.integer[Any]]) -> npt.NDArray[np.intp]:
        """``indices`` as numpy takes them (negative ones from the end; out of range raise
        IndexError), as non-negative positions: the lazy columns find a record's part by
        its position, so a negative one would match none and read as zeros."""
        idx = np.asarray(indices, dtype=np.intp)
        if not len(idx):
            return idx
        n = len(self)
        low, high = int(idx.min()), int(idx.max())
        if low < -n or high >= n:
            raise IndexError(f"record index {high if high >= n else low} of {n}")
        return idx + n * (idx < 0) if low < 0 else idx

    def _lazy(self, idx: npt.NDArray[np.intp]) -> dict[str, npt.NDArray[Any]]:
        out = {name: np.zeros(len(idx), dtype=dtype) for name, dtype in _LAZY.items()}
        const = self._const(idx)
        for part in self._parts:
            inside = (idx >= part.begin) & (idx < part.begin + part.n)
            if not inside.any():
                continue
            local = idx[inside] - part.begin
            columns, _ = _columns(
                part.layout,
                part.raw(None, local),
                {k: v[inside] for k, v in const.items()},
                len(local),
            )
            for name in _LAZY:
                out[name][inside] = columns[name]
        return out

    def rows(self, indices: Sequence[int] | npt.NDArray[np.integer[Any]]) -> list[FlowRow]:
        """FlowRows for the chosen records, equal to the scalar decoder's for them."""
        idx = self._index(indices)
        if not len(idx):
            return []
        exporters = self.exporters
        new_address = IPv4Address
        lazy = self._lazy(idx)
        has_as = lazy["has_as"].tolist()
        src_as = lazy["src_as"].tolist()
        dst_as = lazy["dst_as"].tolist()
        table = self._table
        context = self._context[idx]
        columns = (
            self.src[idx].tolist(),
            self.dst[idx].tolist(),
            self.sport[idx].tolist(),
            lazy["dport"].tolist(),
            self.proto[idx].tolist(),
            self.packets[idx].tolist(),
            lazy["bytes"].tolist(),
            lazy["first"].tolist(),
            lazy["last"].tolist(),
            self.tcp_flags[idx].tolist(),
            lazy["tos"].tolist(),
            [a if h else None for a, h in zip(src_as, has_as, strict=True)],
            [a if h else None for a, h in zip(dst_as, has_as, strict=True)],
            table[context, 0].tolist(),
            table[context, 2].tolist(),
            table[context, 1].tolist(),
            self.interval[idx].tolist(),
            table[context, 6].tolist(),
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
        for datagram, position, start, count in self.set_table.tolist():
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
    """The taken sets of one layout: their bodies, in arrival order."""

    __slots__ = ("bodies", "layout")

    def __init__(self, layout: BatchLayout) -> None:
        self.layout = layout
        self.bodies: list[bytes] = []


#: ``SetSink._routes``' values: (format, exporter, domain), set memo, ``move_to_end`` of the
#: exporter's templates, sets seen.
_Route = tuple[tuple[str, str, int], dict[int, Any], Any, dict[tuple[int, bytes], Any]]
#: Sets seen a route keeps for the next batch, at most.
_MAX_SEEN = 64

#: Fields of ``SetSink._flat``, one run of them per taken set.
_DATAGRAM, _POSITION, _COUNT, _CONTEXT, _EXPORT_MS, _UPTIME = range(6)
_PER_SET = 6


class SetSink:
    """Takes the data sets of array-decodable templates while ``decode_template_batch`` walks
    the datagrams (``DecoderState.sink``), with the per-set values the scalar path would use.

    Per taken set it keeps the body (in its layout's group), the group's number and six
    integers (datagram, position, record count, context, export time, sysUpTime) in one flat
    list: a few appends a set, and one array conversion for the whole batch in
    :meth:`finish`. A *context* is what the set's records take from the sampling state
    (exporter, format, domain, sysUpTime mode, boot time, interval, provenance): few per
    batch, kept once each in ``_context_rows``.
    """

    def __init__(self, state: DecoderState) -> None:
        self._state = state
        #: Records taken from the datagram being decoded (``dispatch._decode`` adds them to
        #: its record counts).
        self.taken = 0
        self._datagram = 0
        self._mark = 0
        self._groups: list[_Group] = []
        #: Layout -> group number: by identity first (a template keeps its layout), then by
        #: value (the same exporter software on many routers: one group). ``_layouts``
        #: keeps the identities alive for the batch.
        self._by_id: dict[int, int] = {}
        self._by_value: dict[BatchLayout, int] = {}
        self._layouts: list[BatchLayout] = []
        self._set_groups: list[int] = []
        self._flat: list[int] = []
        self._exporter_index: dict[str, int] = {}
        self._context_rows: list[tuple[int, int, int, int, int, int, int]] = []
        #: (format, exporter, domain) -> context number, while only datagrams that change no
        #: sampling state are decoded; at most one entry per exporter and domain of the batch.
        self._contexts: dict[tuple[str, str, int], int] = {}
        #: Whether data may be held anywhere, as of the last datagram of the scalar path
        #: (nothing on the array path holds data).
        self._pending_unknown = True
        #: (exporter, version, domain) -> ((format, exporter, domain), set memo, the
        #: exporter's ``TemplateCache.exporter_lru().move_to_end``, sets seen), as of the
        #: last datagram of the scalar path: nothing on the array path changes templates.
        #: The set memo is set id -> (template key, record size, group, its bodies'
        #: ``append``) of array-decodable templates; sets seen are what ``_mixed_datagram``
        #: found in template and options data sets, by their bytes.
        self._routes: dict[tuple[str, int, int], _Route] = {}
        #: exporter -> ``TemplateCache.exporter_lru`` (the same lifetime).
        self._lrus: dict[str, Any] = {}
        # What the last batch over this state knew of its templates still holds if no
        # datagram was decoded since (every change of a template is made decoding one):
        # its routes without their set memos (whose groups were that batch's).
        saved = state.template_memo
        state.template_memo = None
        if saved is not None and saved[0] == state._datagrams:
            self._lrus.update(saved[2])
            for route_key, (memo_key, _, touch, seen) in saved[1].items():
                self._routes[route_key] = (memo_key, {}, touch, seen)
        #: (format, exporter) -> [datagrams, records] taken without the scalar code since the
        #: last :meth:`flush`, in order of first appearance.
        self._tally: dict[tuple[str, str], list[int]] = {}

    def save(self) -> None:
        """Leave the routes to the next batch over the state (``__init__``), their sets
        seen unless there are many (an exporter whose options data changes every time)."""
        self.flush()
        routes = {
            key: (memo_key, None, touch, seen if len(seen) <= _MAX_SEEN else {})
            for key, (memo_key, _, touch, seen) in self._routes.items()
        }
        self._state.template_memo = (self._state._datagrams, routes, dict(self._lrus))

    def begin(self, datagram: int) -> None:
        self._datagram = datagram
        self._mark = len(self._set_groups)
        self.taken = 0

    def forget(self) -> None:
        """The sampling state may change (a datagram goes the scalar way, or options data
        was applied): no context read from it before still holds."""
        self._contexts.clear()

    def count(self, fmt: str, exporter: str, records: int) -> None:
        """Count a datagram taken here as ``dispatch._decode`` counts one, later
        (:meth:`flush`): per exporter in order of first appearance, so that the state's
        per-exporter table fills in the same order."""
        entry = self._tally.get((fmt, exporter))
        if entry is None:
            self._tally[(fmt, exporter)] = [1, records]
        else:
            entry[0] += 1
            entry[1] += records

    def flush(self) -> None:
        """Apply the counts of :meth:`count` to the state: before a datagram goes the scalar
        way (its decoder reads the datagram count: ``DecoderState.datagram_serial``) and when
        the batch ends."""
        tally = self._tally
        if not tally:
            return
        state = self._state
        state.build = make_row
        state._replay_spent = 0
        by_format = state._by_format
        for (fmt, exporter), (datagrams, records) in tally.items():
            state._datagrams += datagrams
            by_format[fmt] += datagrams
            state._records += records
            entry = state._exporters.get(exporter) or state._exporter_entry(exporter)
            entry[0] += datagrams  # as DecoderState._exporter_seen
            entry[1] += records
        tally.clear()

    def settle(self) -> None:
        """A datagram goes the scalar way: counts are due, and templates, held data and the
        sampling state may change."""
        self.flush()
        self._contexts.clear()
        self._routes.clear()
        self._lrus.clear()
        self._pending_unknown = True

    def rollback(self) -> None:
        """Forget the sets of the datagram being decoded: it was refused (or failed)."""
        mark = self._mark
        groups = self._groups
        for number in self._set_groups[mark:]:
            groups[number].bodies.pop()
        del self._set_groups[mark:]
        del self._flat[mark * _PER_SET :]
        self.taken = 0

    def take(self, template: Template, r: Reader, ctx: SetContext, out: list[Any]) -> bool:
        """Keep the set's records for the arrays (the scalar path's walk calls this)."""
        layout = template.batch_layout
        assert layout is not None
        start = r.offset
        length = r.remaining()
        # Inside a datagram of the scalar path, which may change the sampling state (options
        # data) after this set: nothing remembered holds, and this is not remembered.
        self._contexts.clear()
        context = self._context(ctx.fmt, ctx.exporter, ctx.domain, ctx.uptime_ms is not None)
        self.keep(layout, r.data, start, length, context, ctx.export_ms, ctx.uptime_ms, len(out))
        r.skip(length, "data set")
        return True

    def _context(self, fmt: str, exporter: str, domain: int, v9_times: bool) -> int:
        """The number of the context of a set of ``fmt``, ``exporter``, ``domain`` now: the
        values ``Template.flows`` reads from the state, read at the same point of the walk
        (options data earlier in the datagram has been applied, later data has not)."""
        state = self._state
        sampling = state.sampling
        interval, provenance = state.resolve_interval(
            exporter, sampling.announced(fmt, exporter, domain)
        )
        boot = 0
        if v9_times:
            mode = _SYSUP_V9
        else:
            init = sampling.system_init_ms(fmt, exporter, domain)
            if init is None:
                mode = _SYSUP_EXPORT
            else:
                # Held to ±2**62 so that adding a 32-bit uptime cannot overflow int64: any
                # init time past that gives times out of range either way (MAX_TIME_MS is
                # under 2**58), counted and replaced as the scalar path does.
                mode, boot = _SYSUP_BOOT, min(max(init, -_BOOT_BOUND), _BOOT_BOUND)
        index = self._exporter_index.setdefault(exporter, len(self._exporter_index))
        rows = self._context_rows
        rows.append(
            (index, _FORMAT_CODE[fmt], domain, mode, boot, interval, _PROVENANCE_CODE[provenance])
        )
        return len(rows) - 1

    def keep(
        self,
        layout: BatchLayout,
        data: bytes,
        start: int,
        length: int,
        context: int,
        export_ms: int,
        uptime: int | None,
        position: int,
    ) -> None:
        """Keep the ``length`` bytes of a data set body at ``data[start:]`` (checked by the
        caller to lie inside ``data``) with its context (:meth:`_context`)."""
        size = layout.itemsize
        count = length // size
        if count == 0:
            # As Template.flows: more than alignment padding but less than one record.
            if length >= 4:
                self._state.count("data_sets_shorter_than_a_record")
            return
        number = self._by_id.get(id(layout))
        if number is None:
            number = self._group_of(layout)
        self._groups[number].bodies.append(data[start : start + count * size])  # no padding
        self._set_groups.append(number)
        self._flat.extend((self._datagram, position, count, context, export_ms, uptime or 0))
        self.taken += count

    def _group_of(self, layout: BatchLayout) -> int:
        number = self._by_value.get(layout)
        if number is None:
            number = self._by_value[layout] = len(self._groups)
            self._groups.append(_Group(layout))
        self._by_id[id(layout)] = number
        self._layouts.append(layout)
        return number

    def finish(
        self,
        scalar: Sequence[tuple[int, list[FlowRow]]],
        errors: Sequence[tuple[int, DecodeError]],
        failures: Sequence[tuple[int, Exception]],
    ) -> TemplateBatch:
        """The batch: the per-set values as arrays once, the sampler's columns decoded
        (one strided view per column and layout), the rest kept for ``rows``; and the
        out-of-range times counted, as the scalar path counts them."""
        self.flush()
        n_sets = len(self._set_groups)
        meta = np.array(self._flat, dtype=np.int64).reshape(n_sets, _PER_SET)
        groups = np.array(self._set_groups, dtype=np.intp)
        # Records go layout by layout (in order of first appearance), each layout's sets in
        # arrival order.
        order = np.arange(n_sets) if len(self._groups) == 1 else np.argsort(groups, kind="stable")
        counts = meta[order, _COUNT]
        ends = np.cumsum(counts)
        starts = np.empty(n_sets, dtype=np.int64)
        starts[order] = ends - counts
        set_of_record = np.repeat(order, counts)
        context = meta[set_of_record, _CONTEXT]
        table = np.array(self._context_rows or [(0,) * 7], dtype=np.int64)
        set_export = meta[:, _EXPORT_MS]
        set_uptime = meta[:, _UPTIME]
        boots = table[table[:, 3] == _SYSUP_BOOT, 4]
        boots_in_range = not len(boots) or (
            int(boots.min()) >= MIN_TIME_MS and int(boots.max()) + 0xFFFFFFFF <= MAX_TIME_MS
        )
        parts: list[_Part] = []
        columns: list[dict[str, npt.NDArray[Any]]] = []
        bad_times = np.zeros(len(FORMATS), dtype=np.int64)
        done = 0
        for group in self._groups:
            if not group.bodies:
                continue  # every set of it was rolled back
            part = _Part(group.layout, b"".join(group.bodies), done)
            done += part.n
            parts.append(part)
            raw = part.raw(_EAGER_FIELDS)
            columns.append(_sampler_columns(raw, part.n))
            bad_times += _bad_times(
                part, context, set_of_record, set_export, set_uptime, table, boots_in_range
            )
        state = self._state
        for code, n in enumerate(bad_times.tolist()):
            if n:
                state.defect(FORMATS[code], "time_out_of_range", n)
        if not columns:
            columns.append(_sampler_columns({}, 0))
        joined = (
            columns[0]
            if len(columns) == 1
            else {name: np.concatenate([c[name] for c in columns]) for name in columns[0]}
        )
        return TemplateBatch(
            **joined,
            interval=table[context, 5],
            context=context,
            set_of_record=set_of_record,
            table=table,
            set_export=set_export,
            set_uptime=set_uptime,
            parts=tuple(parts),
            exporters=tuple(self._exporter_index),
            meta=meta,
            starts=starts,
            scalar=tuple(scalar),
            errors=tuple(errors),
            failures=tuple(failures),
        )


#: The fields the sampler's columns are made of (ICMP ones: an ICMP record's source port
#: is 0).
_EAGER_FIELDS = frozenset(
    {"src", "dst", "sport", "proto", "tcp_flags", "packets"}
    | {f"{family}_{kind}" for family in ("icmp4", "icmp6") for kind in ("combined", "type", "code")}
)


#: The sampler's columns.
_SAMPLER_FIELDS = frozenset({"src", "dst", "sport", "proto", "packets", "tcp_flags"})
#: (protocol number, its ICMP fields): an ICMP record's source port is 0.
_ICMP_FIELDS = tuple(
    (number, tuple(f"{family}_{kind}" for kind in ("combined", "type", "code")))
    for family, number in (("icmp4", 1), ("icmp6", 58))
)


def _sampler_columns(raw: dict[str, Unsigned], n: int) -> dict[str, npt.NDArray[Any]]:
    """``src dst sport proto packets tcp_flags`` of ``n`` records, as ``_columns`` makes
    them."""
    if not raw.keys() >= _SAMPLER_FIELDS:
        zeros = np.zeros(n, dtype=np.uint64)
        raw = {name: raw.get(name, zeros) for name in _SAMPLER_FIELDS} | raw
    proto = raw["proto"].astype(np.uint8, copy=False)
    sport = raw["sport"].astype(np.uint16, copy=False)
    for number, names in _ICMP_FIELDS:
        if names[0] in raw or names[1] in raw or names[2] in raw:
            is_icmp = proto == number
            if is_icmp.any():
                sport = np.where(is_icmp, np.uint16(0), sport)
    return {
        "src": raw["src"].astype(np.uint32, copy=False),
        "dst": raw["dst"].astype(np.uint32, copy=False),
        "sport": sport,
        "proto": proto,
        "packets": raw["packets"],
        "tcp_flags": raw["tcp_flags"],
    }


def _bad_times(
    part: _Part,
    context: npt.NDArray[np.int64],
    set_of_record: npt.NDArray[np.int64],
    set_export: npt.NDArray[np.int64],
    set_uptime: npt.NDArray[np.int64],
    table: npt.NDArray[np.int64],
    boots_in_range: bool,
) -> I64:
    """The part's first/last times out of range, by format (``_times``), computed only
    where they can be: a time of a kind and width that cannot leave the range (below) is
    not computed at all."""
    bad = np.zeros(len(FORMATS), dtype=np.int64)
    layout = part.layout
    widths = {name: length for name, _, length in layout.columns}
    span = slice(part.begin, part.begin + part.n)
    for name, kind in (("first", layout.first_kind), ("last", layout.last_kind)):
        if kind is None:
            continue
        if kind == "sysup":
            # NetFlow v9: export time (a u32 of seconds, in ms) minus an int32: in range.
            # IPFIX without an init time: the export time. With one: init + a u32.
            # (Judged on every context of the batch: few, and exact either way.)
            if boots_in_range:
                continue
        elif widths[name] <= 4:
            continue  # ms, s (x 1000) and delta_us (export - u32 / 1000) of 32 bits: in range
        sets = set_of_record[span]
        contexts = context[span]
        const = {
            "export_ms": set_export[sets],
            "uptime": set_uptime[sets].astype(np.uint32),
            "sysup_mode": table[contexts, 3].astype(np.uint8),
            "boot": table[contexts, 4],
        }
        _, ok = _times(part.raw(frozenset({name})), name, kind, const)
        assert ok is not None
        wrong = ~ok
        if wrong.any():
            bad += np.bincount(table[contexts[wrong], 1], minlength=len(FORMATS))
    return bad


def _columns(
    layout: BatchLayout, raw: dict[str, Unsigned], const: dict[str, npt.NDArray[Any]], n: int
) -> tuple[dict[str, npt.NDArray[Any]], I64]:
    """Every column of ``n`` records of ``layout`` (``raw``: its fields, ``const``: their
    per-set values), and the out-of-range times by format, computed as ``_FlowPlan.build``
    computes them record by record."""
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
#: Template and options template set ids of each format, and the size of their record
#: headers (the decoders' loops stop when less than that is left: padding).
_V9_TEMPLATE_SETS = {netflow_v9.TEMPLATE_FLOWSET: 4, netflow_v9.OPTIONS_TEMPLATE_FLOWSET: 6}
_IPFIX_TEMPLATE_SETS = {ipfix.TEMPLATE_SET: 4, ipfix.OPTIONS_TEMPLATE_SET: 4}
_OPTIONS_SETS = frozenset({netflow_v9.OPTIONS_TEMPLATE_FLOWSET, ipfix.OPTIONS_TEMPLATE_SET})

#: What pass 1 of ``_mixed_datagram`` found in a set, for pass 2 to apply in set order.
_FLOW, _OPTIONS_DATA, _REFRESH = 0, 1, 2


def _route(
    sink: SetSink, state: DecoderState, exporter: str, fmt: str, domain: int
) -> _Route | None:
    """A new ``SetSink._routes`` entry for an exporter's format and domain, or None without
    any template of the exporter."""
    lru = sink._lrus.get(exporter)
    if lru is None:
        lru = state.templates.exporter_lru(exporter)
        if lru is None:
            return None
        sink._lrus[exporter] = lru
    return ((fmt, exporter, domain), {}, lru.move_to_end, {})


def _memo_hit(sink: SetSink, memo: dict[int, Any], memo_key: Any, set_id: int) -> Any:
    """The memo entry of ``set_id`` for a route, made now; None unless its template is
    known and array-decodable (looked up without touching its recency)."""
    if set_id < 256:
        return None
    key = (*memo_key, set_id)
    template = sink._lrus[memo_key[1]].get(key)
    if template is None or template.batch_layout is None:
        return None
    layout = template.batch_layout
    number = sink._group_of(layout)
    hit = memo[set_id] = (key, layout.itemsize, number, sink._groups[number].bodies.append)
    return hit


def _walk(
    datagrams: Sequence[tuple[bytes, str, float]],
    state: DecoderState,
    sink: SetSink,
    scalar: list[tuple[int, list[FlowRow]]],
    errors: list[tuple[int, DecodeError]],
    failures: list[tuple[int, Exception]],
) -> None:
    """Every datagram in order, as ``decode_datagram_rows`` would decode it.

    A v9/IPFIX datagram of data sets only, of array-decodable templates, with no held data
    of the exporter ready to replay, is taken here in one pass (per datagram a header and a
    route lookup, per set a memo lookup and a few appends); what it kept goes back if it
    turns out to be anything else, and the recency it touched is then touched again, in the
    same order, by whichever path takes it (both walk the same sets first), so it ends the
    same. A datagram that also refreshes templates or carries options data of known
    options templates — what softflowd sends every 16 datagrams — goes to
    ``_mixed_datagram``. Anything else (a new or changed template, a withdrawal, data of an
    unknown template, a set that overruns, trailing bytes, a bad header, another format) is
    left to ``decode_datagram_rows``, so every refusal, defect and learned template is its
    own; before it, ``SetSink.settle``.
    """
    v9_header = _V9_HEADER.unpack_from
    ipfix_header = _IPFIX_HEADER.unpack_from
    unpack = _SET_HEADER.unpack_from
    set_groups = sink._set_groups
    flat = sink._flat
    routes = sink._routes
    contexts = sink._contexts
    tally = sink._tally
    groups = sink._groups
    v9_format, ipfix_format = netflow_v9.FORMAT, ipfix.FORMAT
    for i, (data, exporter, now) in enumerate(datagrams):
        mark = len(set_groups)
        try:
            size = len(data)
            # The header: a whole v9 one, or an IPFIX one whose length is the datagram's.
            if size >= 20 and data[0] == 0 and data[1] == 9:
                _, _, up, secs, _, domain = v9_header(data)
                fmt, version, offset, v9 = v9_format, 9, 20, True
            elif size >= 16 and data[0] == 0 and data[1] == 10:
                _, length, secs, _, domain = ipfix_header(data)
                fmt, version, offset, v9, up = ipfix_format, 10, 16, False, 0
                if length != size:
                    version = 0
            else:
                version = 0
            route = None
            if version:
                if sink._pending_unknown:
                    pending = state.pending
                    if pending:
                        # Held data waits for templates this datagram cannot teach (one it
                        # teaches is the scalar path's), so it changes nothing here but for
                        # expiry, done as ``dispatch._decode`` does it once the version is
                        # known (and again there, harmlessly, if the scalar path takes the
                        # datagram), and replay of what is ready: the exporter's ready sets
                        # are the scalar path's. (Not declined whenever anything is held:
                        # one set for an unknown template, from any source, would push every
                        # exporter off this path for ``pending_max_age_s``.)
                        pending.expire(now)
                        if pending.ready(exporter):
                            version = 0
                    if not pending:
                        sink._pending_unknown = False
                if version:
                    route = routes.get((exporter, version, domain))
                    if route is None:
                        route = _route(sink, state, exporter, fmt, domain)
                        if route is not None:
                            routes[(exporter, version, domain)] = route
            mixed = False
            if route is not None:
                memo_key, memo, touch, _ = route
                context = contexts.get(memo_key)
                if context is None:
                    context = contexts[memo_key] = sink._context(fmt, exporter, domain, v9)
                export_ms = secs * 1000
                short = 0
                taken = 0
                start = offset
                while offset < size:
                    if size - offset < 4:
                        break
                    set_id, set_length = unpack(data, offset)
                    if set_length < 4 or set_length > size - offset:
                        break
                    hit = memo.get(set_id)
                    if hit is None:
                        hit = _memo_hit(sink, memo, memo_key, set_id)
                        if hit is None:
                            # Not data for an unknown template (held by the scalar path).
                            mixed = (
                                set_id < 256
                                or sink._lrus[exporter].get((*memo_key, set_id)) is not None
                            )
                            break
                    key, record_size, number, keep_body = hit
                    touch(key)
                    count = (set_length - 4) // record_size
                    if count:
                        body = offset + 4
                        keep_body(data[body : body + count * record_size])
                        set_groups.append(number)
                        flat += (i, 0, count, context, export_ms, up)
                        taken += count
                    elif set_length >= 8:
                        short += 1  # as Template.flows: more than padding, less than a record
                    offset += set_length
                else:
                    if short:
                        state.count("data_sets_shorter_than_a_record", short)
                    entry = tally.get((fmt, exporter))
                    if entry is None:
                        tally[(fmt, exporter)] = [1, taken]
                    else:
                        entry[0] += 1
                        entry[1] += taken
                    continue
                # Not data sets only: what was kept goes back.
                for number in set_groups[mark:]:
                    groups[number].bodies.pop()
                del set_groups[mark:]
                del flat[mark * _PER_SET :]
            sink._datagram = i
            sink._mark = mark
            sink.taken = 0
            if mixed and route is not None and _mixed_datagram(
                data, exporter, state, sink, route, start, secs, up if v9 else None,
                _V9_TEMPLATE_SETS if v9 else _IPFIX_TEMPLATE_SETS,
            ):  # fmt: skip
                continue
            sink.settle()
            rows = decode_datagram_rows(data, exporter, state, now)
        except DecodeError as exc:
            sink._mark = mark
            sink.rollback()
            errors.append((i, exc))
            continue
        except Exception as exc:  # the per-datagram boundary: the caller counts it
            sink._mark = mark
            sink.rollback()
            failures.append((i, exc))
            continue
        if rows:
            scalar.append((i, rows))


def _mixed_datagram(
    data: bytes,
    exporter: str,
    state: DecoderState,
    sink: SetSink,
    route: _Route,
    offset: int,
    secs: int,
    up: int | None,
    template_sets: dict[int, int],
) -> bool:
    """``_walk``'s step for a datagram that also holds template refreshes or options
    data (its sets from ``offset``), in two passes.

    What pass 1 finds in a template set or an options data set is remembered in the
    route's sets seen under the set's id and bytes: while the route lasts (no datagram of the
    scalar path since), the exporter's templates are the same, so the same bytes refresh
    the same templates and decode to the same options values."""
    size = len(data)
    memo_key, memo, touch, seen_sets = route
    fmt, _, domain = memo_key
    lru = sink._lrus[exporter]
    # Pass 1: every set inside the datagram, ending exactly at its end, and of a kind taken.
    peek = lru.get
    unpack = _SET_HEADER.unpack_from
    spans: list[tuple[int, int, int, Any]] = []
    while offset < size:
        if size - offset < 4:
            return False
        set_id, set_length = unpack(data, offset)
        if set_length < 4 or set_length > size - offset:
            return False
        end = offset + set_length
        hit = memo.get(set_id)
        if hit is not None:
            spans.append((_FLOW, offset + 4, set_length - 4, hit))
        elif set_id >= 256:
            seen = seen_sets.get((set_id, data[offset + 4 : end]))
            if seen is not None:
                spans.append((_OPTIONS_DATA, 0, 0, seen))
                offset = end
                continue
            key = (fmt, exporter, domain, set_id)
            template = peek(key)
            if template is None:
                return False
            if template.batch_layout is not None:
                hit = _memo_hit(sink, memo, memo_key, set_id)
                spans.append((_FLOW, offset + 4, set_length - 4, hit))
            elif template.is_options:
                values = _option_values(template, data, offset + 4, end, fmt, exporter)
                if values is None:
                    return False
                seen = seen_sets[(set_id, data[offset + 4 : end])] = (key, values)
                spans.append((_OPTIONS_DATA, 0, 0, seen))
            else:
                return False
        else:
            body = data[offset + 4 : end]
            known = seen_sets.get((set_id, body))
            if known is None:
                header = template_sets.get(set_id)
                if header is None:
                    return False
                known = _refreshes(
                    lru, fmt, exporter, domain, data, offset + 4, end, header,
                    set_id in _OPTIONS_SETS,
                )  # fmt: skip
                if known is None:
                    return False
                seen_sets[(set_id, body)] = known
            spans.append((_REFRESH, 0, 0, known))
        offset = end
    # Pass 2: apply, set by set.
    export_ms = secs * 1000
    uptime = up or 0
    sink_contexts = sink._contexts
    context = sink_contexts.get(memo_key)
    cache = state.templates
    sampling = state.sampling
    set_groups = sink._set_groups
    flat = sink._flat
    datagram = sink._datagram
    taken = 0
    short = 0
    for kind, start, length, extra in spans:
        if kind == _FLOW:
            key, record_size, number, keep_body = extra
            touch(key)
            if context is None:
                context = sink_contexts[memo_key] = sink._context(
                    fmt, exporter, domain, up is not None
                )
            count = length // record_size
            if count:
                keep_body(data[start : start + count * record_size])
                set_groups.append(number)
                flat += (datagram, 0, count, context, export_ms, uptime)
                taken += count
            elif length >= 4:
                short += 1  # as Template.flows: more than padding, less than a record
        elif kind == _OPTIONS_DATA:
            key, values_list = extra
            touch(key)
            for values in values_list:
                state.count("options_records")
                if not sampling.learn(fmt, exporter, domain, values):
                    state.defect(fmt, "sampling_out_of_range")
            sink.forget()
            context = None
        else:  # _REFRESH: as TemplateCache.refresh does for each (checked in pass 1)
            for template_key in extra:
                touch(template_key)
                cache.refreshed += 1
    if short:
        state.count("data_sets_shorter_than_a_record", short)
    sink.taken = taken
    sink.count(fmt, exporter, taken)
    return True


def _refreshes(
    lru: Any,
    fmt: str,
    exporter: str,
    domain: int,
    data: bytes,
    start: int,
    end: int,
    header: int,
    is_options: bool,
) -> list[tuple[str, str, int, int]] | None:
    """The key of each template record of the set body ``data[start:end]`` if
    every one is the exact wire form of a cached template of its kind (what
    ``TemplateCache.refresh`` recognises), else None. Such a record passed every check the
    format's template walk makes before it asks ``refresh`` when it was learned, so the walk
    would refresh it and move on; fewer than ``header`` bytes left are its padding."""
    out = []
    pos = start
    unpack = _SET_HEADER.unpack_from
    while end - pos >= header:
        template_id = unpack(data, pos)[0]
        key = (fmt, exporter, domain, template_id)
        template = lru.get(key)
        if template is None or template.is_options != is_options:
            return None
        wire = template.wire
        if not wire or pos + len(wire) > end or not data.startswith(wire, pos):
            return None
        out.append(key)
        pos += len(wire)
    return out


def _option_values(
    template: Template, data: bytes, start: int, end: int, fmt: str, exporter: str
) -> list[dict[int, Any]] | None:
    """The records of an options data set as ``Template.option_values`` reads them, or None
    if it would fail (the scalar path then counts that as it does)."""
    try:
        return list(
            template.option_values(Reader(data, fmt=fmt, exporter=exporter, start=start, end=end))
        )
    except WireDecodeError:
        return None


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
        _walk(datagrams, state, sink, scalar, errors, failures)
        sink.save()
    finally:
        state.sink = None
        sink.flush()
    return sink.finish(scalar, errors, failures)
