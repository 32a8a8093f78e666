"""NetFlow v5 in batches: many datagrams decoded into numpy columns at once.

The scalar decoder (:mod:`overflowd.wire.netflow_v5`) builds one Python object per record,
and that object is the floor of its cost (about 2 µs a record). A collector that samples at
1e-6 keeps almost none of them, so this path never builds them: it checks each datagram's
header in Python (per datagram, about 30 records), joins the record blocks with one
``bytes.join`` and reads every record of the batch with one ``np.frombuffer`` over a
big-endian structured dtype. :meth:`V5Batch.rows` builds :class:`~overflowd.flows.FlowRow`
only for the records a sampler chose, equal to what
:func:`~overflowd.wire.dispatch.decode_datagram_rows` gives for them.

Same rules as the scalar path, same state. The checks are those of
:func:`overflowd.wire.netflow_v5.decode`, in the same order, raising (well: collecting) the
same :class:`~overflowd.errors.DecodeError` with the same message and offset:

1. fewer than 24 bytes: ``TruncatedError`` at 0 (the header);
2. fewer than ``24 + 48 × count`` bytes: ``TruncatedError`` at 24 (the records);
3. more than that: accepted, counted as the defect ``netflow-v5/trailing_bytes`` (before
   check 4, as there);
4. ``unix_nsecs >= 10**9``: ``MalformedError`` at 16.

``count`` is not bounded to 1..30 because the scalar decoder does not bound it either
(``count`` 0 is a valid, empty datagram there; 31+ records that are all present decode).
Datagrams whose first two bytes are not ``00 05`` (NetFlow v9, IPFIX, sFlow, garbage, or
shorter than 2 bytes) are not touched and not counted: their indices come back in
``V5Batch.passed`` for the caller to give to ``decode_datagram_rows``, which counts them.

State is updated as ``decode_datagram_rows`` would update it over the same v5 datagrams in
the same order (datagrams, records, by format, per exporter, malformed, counters, pending
expiry), so :meth:`DecoderState.statistics` agrees whichever path ran.

Times, exactly as the scalar decoder: ``export_ms - ((uptime - First) mod 2**32 as int32)``.
Sampling interval: the header's low 14 bits through ``state.resolve_interval`` per datagram
(overrides and provenance as in the scalar path).

Pure: no I/O, no clock. numpy is used for arithmetic only.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from overflowd.errors import DecodeError
from overflowd.flows import PROVENANCES, FlowRow, make_row
from overflowd.wire.netflow_v5 import FORMAT, HEADER, RECORD
from overflowd.wire.reader import MalformedError, TruncatedError, WireDecodeError

if TYPE_CHECKING:
    from overflowd.wire.dispatch import DecoderState

__all__ = ["RECORD_DTYPE", "Slots", "V5Batch", "decode_v5_batch"]

#: One 48-byte v5 record as numpy reads it: the fields ``RECORD`` keeps, at their offsets,
#: big-endian; the skipped ones (nexthop, ifindexes, pads, masks) are simply not named.
RECORD_DTYPE = np.dtype(
    {
        "names": [
            "src", "dst", "packets", "bytes", "first", "last",
            "sport", "dport", "tcp_flags", "proto", "tos", "src_as", "dst_as",
        ],
        "formats": [
            ">u4", ">u4", ">u4", ">u4", ">u4", ">u4",
            ">u2", ">u2", "u1", "u1", "u1", ">u2", ">u2",
        ],
        "offsets": [0, 4, 16, 20, 24, 28, 32, 34, 37, 38, 39, 40, 42],
        "itemsize": 48,
    }
)  # fmt: skip
assert RECORD_DTYPE.itemsize == RECORD.size

#: The 24-byte header; ``domain`` is engine_type and engine_id read as one big-endian u16,
#: which is ``engine_type << 8 | engine_id``.
HEADER_DTYPE = np.dtype(
    {
        "names": ["version", "count", "uptime", "secs", "nsecs", "domain", "sampling"],
        "formats": [">u2", ">u2", ">u4", ">u4", ">u4", ">u2", ">u2"],
        "offsets": [0, 2, 4, 8, 12, 20, 22],
        "itemsize": 24,
    }
)
assert HEADER_DTYPE.itemsize == HEADER.size


def _word_views() -> tuple[dict[int, int], dict[int, int]]:
    """Where each 16- and 8-bit field of a record sits once its words are in native order.

    A record is twelve big-endian 32-bit words. After one byte swap of every word (to the
    host's order), viewing the words as uint16 (or uint8) gives each half (or byte) of each
    word as a native value, at an index that depends on the host's byte order: e.g. the
    word ``sport << 16 | dport`` (record bytes 32-35) holds ``sport`` in its high half,
    which is element 17 of the record's 24 uint16 on a little-endian host, 16 on a
    big-endian one. Maps record byte offset (big-endian layout) -> view index.
    """
    little = sys.byteorder == "little"
    w16 = {}
    for offset in range(0, 48, 2):
        word, in_word = divmod(offset, 4)  # in_word 0: high half
        w16[offset] = 2 * word + ((1 - in_word // 2) if little else in_word // 2)
    w8 = {}
    for offset in range(48):
        word, in_word = divmod(offset, 4)  # in_word 0: most significant byte
        w8[offset] = 4 * word + ((3 - in_word) if little else in_word)
    return w16, w8


_W16, _W8 = _word_views()

_HEADER_SIZE = HEADER.size
_RECORD_SIZE = RECORD.size
_PROVENANCE_CODE = {name: i for i, name in enumerate(PROVENANCES)}

U32 = npt.NDArray[np.uint32]
U16 = npt.NDArray[np.uint16]
U8 = npt.NDArray[np.uint8]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, eq=False)
class V5Batch:
    """The records of a batch of NetFlow v5 datagrams, one numpy array per field.

    Record ``i`` of the batch is row ``i`` of every column, in datagram order. The fields
    read from the records are strided views into one read-only (N, 12) array of native
    32-bit words (no copy per field); the computed ones (``first``, ``last``, and the
    per-datagram values repeated per record) are arrays of their own. Treat all of them as
    read-only: they are shared with whoever sampled the batch.
    """

    src: U32
    dst: U32
    sport: U16
    dport: U16
    proto: U8
    packets: U32
    bytes: U32
    #: Absolute Unix milliseconds, as the scalar decoder computes them.
    first: I64
    last: I64
    tcp_flags: U8
    tos: U8
    src_as: U16
    dst_as: U16
    #: Resolved sampling interval (>= 1) and its provenance, an index into
    #: :data:`overflowd.flows.PROVENANCES`.
    interval: I64
    provenance: U8
    #: Index into :attr:`exporters`, and the observation domain (engine_type << 8 | engine_id).
    exporter: U32
    domain: U16
    #: Exporter address text of each distinct exporter in the batch.
    exporters: tuple[str, ...]
    #: Datagrams refused, by their index in the input, with the error the scalar path raises.
    errors: tuple[tuple[int, DecodeError], ...]
    #: Indices of datagrams that are not NetFlow v5 (not counted here): decode them with
    #: ``decode_datagram_rows``.
    passed: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.src)

    def rows(self, indices: Sequence[int] | npt.NDArray[np.integer[Any]]) -> list[FlowRow]:
        """FlowRows for the chosen records, equal to the scalar decoder's for them."""
        idx = np.asarray(indices, dtype=np.intp)
        exporters = self.exporters
        new_address = IPv4Address
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
            self.src_as[idx].tolist(),
            self.dst_as[idx].tolist(),
            self.exporter[idx].tolist(),
            self.domain[idx].tolist(),
            self.interval[idx].tolist(),
            self.provenance[idx].tolist(),
        )
        return [
            make_row(
                new_address(src),
                new_address(dst),
                sport,
                dport,
                proto,
                packets,
                octets,
                first,
                last,
                flags,
                tos,
                sas,
                das,
                exporters[exp],
                domain,
                FORMAT,
                interval,
                PROVENANCES[prov],
            )
            for (
                src, dst, sport, dport, proto, packets, octets, first, last, flags, tos, sas,
                das, exp, domain, interval, prov,
            ) in zip(*columns, strict=True)
        ]  # fmt: skip


class Slots(NamedTuple):
    """Datagrams laid out in the fixed slots of one buffer (the collector's receive slots):
    datagram ``i`` is ``block[i * stride : i * stride + lengths[i]]``, received from
    ``exporters[i]`` at ``received``. Bytes of a slot past its datagram are stale (an earlier
    datagram's) and are never read as this one's."""

    block: bytes
    stride: int
    lengths: Sequence[int]
    exporters: Sequence[str]
    received: float


_SLOT_HEADERS: dict[int, np.dtype[Any]] = {}


def _slot_header(stride: int) -> np.dtype[Any]:
    """HEADER_DTYPE with an itemsize of ``stride``: the headers of all slots in one view."""
    dtype = _SLOT_HEADERS.get(stride)
    if dtype is None:
        fields: Any = HEADER_DTYPE.fields
        dtype = np.dtype(
            {
                "names": list(fields),
                "formats": [fields[k][0] for k in fields],
                "offsets": [fields[k][1] for k in fields],
                "itemsize": stride,
            }
        )
        _SLOT_HEADERS[stride] = dtype
    return dtype


def decode_v5_batch(
    datagrams: Sequence[tuple[bytes, str, float]],
    state: DecoderState,
    *,
    slots: Slots | None = None,
) -> V5Batch:
    """Decode every NetFlow v5 datagram of ``(payload, exporter, now)`` into one batch.

    ``slots``: the datagrams as :class:`Slots` instead (``datagrams`` is then ignored), read
    in place: headers through a structured view whose itemsize is the slot, record blocks
    joined from memoryview slices, no ``bytes`` per datagram (~0.4 µs a 1.4 KB datagram
    less, bench/recv_micro.py --decode). Same result and state either way.

    Never raises a DecodeError: refused datagrams are counted in ``state`` exactly as
    ``decode_datagram`` counts them and listed in ``V5Batch.errors`` (for a rate-limited log
    line); non-v5 datagrams are listed in ``V5Batch.passed`` and left alone.

    Cost: three C-level passes per datagram in Python (slicing the header, slicing the
    record block, the exporter's index), the rest is numpy over the whole batch. About 50
    numpy calls are a fixed cost per batch (some 50-100 µs), so a batch should hold
    hundreds of datagrams; past a few thousand records the arrays leave the L2 cache and
    the rate per record drops again (see bench/v5_batch.py).

    Order caveat: v5 datagrams are accounted for before the caller decodes the passed
    ones, so with NetFlow v9/IPFIX data held for its template in the same batch, held
    data may expire one batch later than in the scalar path.
    """
    n_datagrams = len(datagrams) if slots is None else len(slots.lengths)
    if not n_datagrams:
        datagrams = [(b"", "", 0.0)]  # one "passed" datagram, then dropped from the result
        empty = decode_v5_batch(datagrams, state)
        return dataclasses.replace(empty, passed=())
    payloads: tuple[bytes, ...] = ()
    names: Sequence[str]
    nows: Sequence[float]
    if slots is not None:
        if max(slots.lengths) > slots.stride or len(slots.block) < n_datagrams * slots.stride:
            raise ValueError("datagrams larger than their slots, or fewer slots than lengths")
        names = slots.exporters
        nows = [slots.received] * n_datagrams
        sizes = np.asarray(slots.lengths, dtype=np.int64)
        # Fields past a datagram's end are stale: every check below that reads a field also
        # requires the size that holds it (as zero padding makes them fail in the other
        # branch), the version included.
        hdr = np.ndarray((n_datagrams,), dtype=_slot_header(slots.stride), buffer=slots.block)
    else:
        payloads, names, nows = zip(*datagrams, strict=True)
        sizes = np.fromiter(map(len, payloads), dtype=np.int64, count=n_datagrams)
        heads = [d[:_HEADER_SIZE] for d in payloads]
        if int(sizes.min()) < _HEADER_SIZE:
            # Short datagrams (garbage, or a truncated header): zero-pad so every header slot
            # is 24 bytes; ``sizes`` still says what was really there.
            heads = [h.ljust(_HEADER_SIZE, b"\0") for h in heads]
        hdr = np.frombuffer(b"".join(heads), dtype=HEADER_DTYPE)

    # The scalar decoder's checks, in its order, for all datagrams at once.
    is_v5 = (hdr["version"] == 5) & (sizes >= 2)
    has_header = is_v5 & (sizes >= _HEADER_SIZE)
    count = hdr["count"].astype(np.int64)
    end = _HEADER_SIZE + _RECORD_SIZE * count
    truncated = has_header & (end > sizes)
    complete = has_header & ~truncated
    trailing = complete & (end < sizes)
    bad_nsecs = complete & (hdr["nsecs"] >= 1_000_000_000)
    good = complete & ~bad_nsecs

    n_v5 = int(np.count_nonzero(is_v5))
    good_idx = np.flatnonzero(good)
    counts = count[good_idx]
    n_records = int(counts.sum())

    # -- state: the same bookkeeping decode_datagram does per datagram ----------------------
    pending = state.pending
    if len(pending):
        # Expiry depends on the order of arrival times (a clock may go backwards in a
        # replay), so it runs per datagram as in the scalar path; nothing is pending in a
        # v5-only collector, so this loop is rare.
        for i in np.flatnonzero(is_v5).tolist():
            pending.expire(nows[i])
    errors: list[tuple[int, DecodeError]] = []
    bad = is_v5 & ~good
    if bad.any():
        for i in np.flatnonzero(bad).tolist():
            exc = _refusal(int(sizes[i]), int(count[i]), int(hdr["nsecs"][i]), names[i])
            code = exc.code
            state._malformed[f"{FORMAT}/{code}"] += 1
            errors.append((i, exc))
    n_trailing = int(np.count_nonzero(trailing))
    if n_trailing:
        state.defect(FORMAT, "trailing_bytes", n_trailing)
    state._datagrams += n_v5
    state._records += n_records
    if n_v5:
        state._by_format[FORMAT] += n_v5

    # Exporters: index per datagram, in first-appearance order (dict.fromkeys keeps it).
    index = dict.fromkeys(names, 0)
    for k, name in enumerate(index):
        index[name] = k
    exporter_names = list(index)
    exporter_of = np.fromiter(map(index.__getitem__, names), dtype=np.uint32, count=n_datagrams)
    if n_v5:
        _count_exporters(state, exporter_names, exporter_of, is_v5, bad, good_idx, counts)

    # -- records -----------------------------------------------------------------------------
    blocks: Sequence[bytes | memoryview]
    if slots is not None:
        at = good_idx * slots.stride
        view = memoryview(slots.block)
        blocks = list(
            map(
                view.__getitem__,
                map(slice, (at + _HEADER_SIZE).tolist(), (at + end[good_idx]).tolist()),
            )
        )
    elif trailing.any():
        ends = end[good_idx].tolist()
        blocks = [payloads[i][_HEADER_SIZE:e] for i, e in zip(good_idx.tolist(), ends, strict=True)]
    else:
        blocks = [payloads[i][_HEADER_SIZE:] for i in good_idx.tolist()]
    # One pass turns every 32-bit word of every record into native order; the 16- and 8-bit
    # fields are then views into those words (see _WORDS): no per-field conversion.
    words = np.frombuffer(b"".join(blocks), dtype=">u4").astype(np.uint32).reshape(-1, 12)
    words.flags.writeable = False
    half = words.view(np.uint16)
    byte = words.view(np.uint8)
    reps = counts.astype(np.intp)
    good_hdr = hdr[good_idx]
    ex_good = exporter_of[good_idx]

    # Interval and provenance per (exporter, announced) pair: few distinct ones per batch.
    announced = good_hdr["sampling"] & 0x3FFF
    if len(index) == 1 and (len(announced) == 0 or announced.min() == announced.max()):
        lone = int(announced[0]) if len(announced) else 0
        value, provenance = state.resolve_interval(exporter_names[0], lone or None)
        interval = np.full(n_records, value, dtype=np.int64)
        provenance_code = np.full(n_records, _PROVENANCE_CODE[provenance], dtype=np.uint8)
    else:
        pairs, inverse = np.unique(ex_good.astype(np.int64) << 14 | announced, return_inverse=True)
        pair_interval = np.empty(len(pairs), dtype=np.int64)
        pair_provenance = np.empty(len(pairs), dtype=np.uint8)
        for j, pair in enumerate(pairs.tolist()):
            name = exporter_names[pair >> 14]
            value, provenance = state.resolve_interval(name, (pair & 0x3FFF) or None)
            pair_interval[j] = value
            pair_provenance[j] = _PROVENANCE_CODE[provenance]
        interval = np.repeat(pair_interval[inverse], reps)
        provenance_code = np.repeat(pair_provenance[inverse], reps)

    # Absolute times exactly as the scalar decoder: export_ms minus the 32-bit uptime
    # difference taken mod 2**32 and read as signed (uint32 subtraction wraps; view int32).
    uptime = np.repeat(good_hdr["uptime"].astype(np.uint32), reps)
    export_ms = good_hdr["secs"].astype(np.int64) * 1000 + good_hdr["nsecs"] // 1_000_000
    base = np.repeat(export_ms, reps)
    first = base - (uptime - words[:, 6]).view(np.int32)
    last = base - (uptime - words[:, 7]).view(np.int32)

    return V5Batch(
        src=words[:, 0],
        dst=words[:, 1],
        sport=half[:, _W16[32]],
        dport=half[:, _W16[34]],
        proto=byte[:, _W8[38]],
        packets=words[:, 4],
        bytes=words[:, 5],
        first=first,
        last=last,
        tcp_flags=byte[:, _W8[37]],
        tos=byte[:, _W8[39]],
        src_as=half[:, _W16[40]],
        dst_as=half[:, _W16[42]],
        interval=interval,
        provenance=provenance_code,
        exporter=np.repeat(ex_good, reps),
        domain=np.repeat(good_hdr["domain"].astype(np.uint16), reps),
        exporters=tuple(exporter_names),
        errors=tuple(errors),
        passed=tuple(np.flatnonzero(~is_v5).tolist()),
    )


def _count_exporters(
    state: DecoderState,
    names: list[str],
    exporter_of: npt.NDArray[np.uint32],
    is_v5: npt.NDArray[np.bool_],
    bad: npt.NDArray[np.bool_],
    good_idx: npt.NDArray[np.intp],
    counts: I64,
) -> None:
    """Per-exporter datagrams, records, refusals, as ``decode_datagram`` counts them.

    Statistics entries are taken in the order the scalar path would first meet each
    exporter, *including* the datagrams passed over (the caller decodes those next, and
    finds their entry there), so that the cap on tracked exporters ("other") falls on the
    same ones whichever path ran.
    """
    entries = [state._exporter_entry(name) for name in names]
    if len(names) == 1:
        entry = entries[0]
        entry[0] += int(np.count_nonzero(is_v5))
        entry[1] += int(counts.sum())
        entry[2] += int(np.count_nonzero(bad))
        return
    n_exp = len(names)
    seen = np.bincount(exporter_of[is_v5], minlength=n_exp).tolist()
    refused = np.bincount(exporter_of[bad], minlength=n_exp).tolist()
    records = np.bincount(exporter_of[good_idx], weights=counts, minlength=n_exp).tolist()
    for entry, d, r, m in zip(entries, seen, records, refused, strict=True):
        entry[0] += d
        entry[1] += int(r)
        entry[2] += m


def _refusal(size: int, count: int, nsecs: int, exporter: str) -> WireDecodeError:
    """The error ``netflow_v5.decode`` raises for a refused datagram (same text, offset)."""
    if size < _HEADER_SIZE:
        return TruncatedError(
            f"header: need {_HEADER_SIZE} bytes, {size} left",
            fmt=FORMAT,
            offset=0,
            exporter=exporter,
        )
    need = _RECORD_SIZE * count
    if _HEADER_SIZE + need > size:
        return TruncatedError(
            f"{count} records: need {need} bytes, {size - _HEADER_SIZE} left",
            fmt=FORMAT,
            offset=_HEADER_SIZE,
            exporter=exporter,
        )
    return MalformedError(f"unix_nsecs {nsecs} >= 10**9", fmt=FORMAT, offset=16, exporter=exporter)
