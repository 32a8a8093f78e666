"""One entry point for every flow datagram: sniff the version, route to the decoder, count.

One UDP port takes all four formats. The first bytes tell them apart without ambiguity:

=====================  ==========================================
first bytes            format
=====================  ==========================================
``00 05``              NetFlow v5 (u16 version)
``00 09``              NetFlow v9 (u16 version)
``00 0a``              IPFIX (u16 version 10)
``00 00 00 05``        sFlow v5 (u32 version)
=====================  ==========================================

:func:`decode_datagram` either returns flow records (possibly none: a template-only
datagram, counter samples, data held for its template) or raises a
:class:`~overflowd.errors.DecodeError`; any other exception is a bug. The
:class:`DecoderState` it updates is the only memory between datagrams: templates, held
data, announced sampling, counters — all bounded by :class:`Limits`.

Pure: no I/O, no clock of its own (``now`` is the arrival time, Unix seconds).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from overflowd.errors import DecodeError
from overflowd.flows import FlowRecord, FlowRow, make_record, make_row
from overflowd.wire import ipfix, netflow_v5, netflow_v9, sflow
from overflowd.wire.reader import Reader, TruncatedError, UnsupportedError, WireDecodeError
from overflowd.wire.templates import (
    Limits,
    PendingBuffer,
    PendingSet,
    SamplingTable,
    SetContext,
    Template,
    TemplateCache,
    TemplateKey,
    address_cache,
)

if TYPE_CHECKING:
    from overflowd.wire.template_batch import SetSink

__all__ = [
    "DecoderState",
    "DecoderStatistics",
    "ExporterStatistics",
    "Limits",
    "decode_datagram",
    "decode_datagram_rows",
    "sniff_format",
]

Provenance = Literal["announced", "overridden", "assumed"]

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def sniff_format(data: bytes) -> str:
    """The format name of a datagram from its version field, or raise a DecodeError."""
    if len(data) < 2:
        raise TruncatedError("datagram shorter than a version field", fmt="unknown", offset=0)
    version = _U16.unpack_from(data)[0]
    if version == 5:
        return netflow_v5.FORMAT
    if version == 9:
        return netflow_v9.FORMAT
    if version == 10:
        return ipfix.FORMAT
    if version == 0 and len(data) >= 4:
        version32 = _U32.unpack_from(data)[0]
        if version32 == 5:
            return sflow.FORMAT
        raise UnsupportedError(f"sFlow/unknown version {version32}", fmt="unknown", offset=0)
    raise UnsupportedError(f"unknown version {version}", fmt="unknown", offset=0)


_DECODERS = {
    netflow_v5.FORMAT: netflow_v5.decode,
    netflow_v9.FORMAT: netflow_v9.decode,
    ipfix.FORMAT: ipfix.decode,
    sflow.FORMAT: sflow.decode,
}


def decode_datagram(
    data: bytes, exporter: str, state: DecoderState, now: float
) -> list[FlowRecord]:
    """Decode one UDP payload from ``exporter`` (its address as text) arriving at ``now``.

    Returns the flow records it yields, including records of earlier data sets of this
    exporter replayed because their template arrived (in this datagram or, over
    Limits.max_replayed_records_per_datagram, in an earlier one). Raises a DecodeError (counted in
    ``state``) for anything malformed, truncated or unsupported.
    """
    records: list[FlowRecord] = _decode(data, exporter, state, now, make_record)
    return records


def decode_datagram_rows(
    data: bytes, exporter: str, state: DecoderState, now: float
) -> list[FlowRow]:
    """:func:`decode_datagram`, giving :class:`~overflowd.flows.FlowRow` tuples.

    Same records, same state, same errors; about twice as fast for NetFlow v5 because no
    frozen dataclass is built. For pipelines that sample first and build FlowRecords only
    for what they keep (``FlowRecord.from_row``).
    """
    rows: list[FlowRow] = _decode(data, exporter, state, now, make_row)
    return rows


def _decode(
    data: bytes, exporter: str, state: DecoderState, now: float, build: Callable[..., Any]
) -> list[Any]:
    state._datagrams += 1
    state.build = build
    state._replay_spent = 0  # the replay budget is per datagram
    try:
        fmt = sniff_format(data)
        state._by_format[fmt] += 1
        state.pending.expire(now)
        records = _DECODERS[fmt](data, exporter, state, now)
    except DecodeError as exc:
        state._malformed_datagram(exc, exporter)
        if exc.exporter is None:
            exc.exporter = exporter
        raise
    n = len(records)
    sink = state.sink
    if sink is not None:
        n += sink.taken  # records of this datagram decoded into arrays, not into `records`
    state._records += n
    state._exporter_seen(exporter, n)
    return records


@dataclass(frozen=True, slots=True)
class ExporterStatistics:
    datagrams: int = 0
    records: int = 0
    malformed: int = 0


@dataclass(frozen=True, slots=True)
class DecoderStatistics:
    """An immutable snapshot of a :class:`DecoderState`."""

    #: Datagrams seen (decoded or not) and records produced.
    datagrams: int
    records: int
    #: Datagrams by sniffed format (``unknown`` ones only appear in ``malformed``).
    datagrams_by_format: Mapping[str, int]
    #: Refused datagrams by ``"<format>/<code>"`` (code: truncated, malformed, unsupported).
    malformed: Mapping[str, int]
    #: Templates held now (count, and estimated bytes: what Limits.max_template_bytes caps),
    #: and what happened to them over time. ``templates_refreshed`` counts identical
    #: re-announcements (recognised by their bytes, not recompiled).
    templates: int
    template_bytes: int
    templates_learned: int
    templates_updated: int
    templates_refreshed: int
    templates_evicted: int
    templates_withdrawn: int
    #: Evictions by reason: ``domain_cap``, ``exporter_cap`` (the source's own oldest went),
    #: ``count``, ``bytes`` (the cache was full: the biggest exporter's oldest went),
    #: ``superseded`` (a changed template was dropped, so the stale one went too).
    templates_evicted_by_reason: Mapping[str, int]
    #: Template announcements not learned, and why: ``datagram_cap``, ``exporter_rate``,
    #: ``total_rate``, ``too_many_fields``, ``no_fields``, ``empty_record``.
    templates_dropped: int
    templates_dropped_by_reason: Mapping[str, int]
    #: Data sets held for their template now (count and bytes; including those whose template
    #: came and that wait for a replay budget), and their fates. Drops by reason:
    #: ``evicted`` (buffer full), ``exporter_cap`` (the exporter's share full: its own oldest
    #: went), ``expired``, ``too_large``, ``replay_cap`` (held options data over a datagram's
    #: replay budget).
    pending_sets: int
    pending_bytes: int
    pending_held: int
    pending_replayed: int
    pending_dropped: int
    pending_dropped_by_reason: Mapping[str, int]
    #: (exporter, domain) entries of announced sampling.
    sampling_entries: int
    #: Everything else that was counted and skipped (sFlow counter samples, non-flow data
    #: records, unknown sFlow record types, replay failures...).
    counters: Mapping[str, int]
    #: Per exporter (up to Limits.max_exporters_tracked, then summed under "other").
    exporters: Mapping[str, ExporterStatistics] = field(default_factory=dict)
    #: Exporter quirks tolerated in datagrams that were otherwise decoded, by
    #: ``"<format>/<kind>"``: ``trailing_padding`` (zeros after the last flowset, set or
    #: sample), ``trailing_bytes``, ``flowset_<code>``/``set_<code>``/``sample_<code>`` (a part
    #: that did not decode, the rest kept), ``samples_missing``, ``record_<code>`` (an sFlow
    #: flow record), ``sampling_out_of_range``, ``time_out_of_range`` (docs/flows.md).
    defects: Mapping[str, int] = field(default_factory=dict)


class DecoderState:
    """Everything the decoders remember between datagrams, for all exporters.

    One instance serves one collector (any number of exporters): every table inside is
    keyed by exporter and bounded in total, so spoofed exporters cannot grow it.
    ``overrides`` maps an exporter address to the sampling interval the operator knows it
    uses; it replaces whatever the exporter announces (provenance ``overridden``).
    """

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        overrides: Mapping[str, int] | None = None,
    ) -> None:
        self.limits = limits if limits is not None else Limits()
        self.templates = TemplateCache(self.limits)
        self.pending = PendingBuffer(self.limits)
        self.sampling = SamplingTable(
            self.limits.max_sampling_entries, self.limits.max_samplers_per_domain
        )
        self._overrides: dict[str, int] = {}
        self.set_overrides(overrides or {})
        #: int -> IPv4Address memo for the NetFlow v5 fast path (cleared when full).
        self.v4_cache: dict[int, IPv4Address] = {}
        self.address_from_bytes = address_cache(self.limits.address_cache_size)
        #: How decoders build a record (``make_record`` or ``make_row``), set per call.
        self.build: Callable[..., Any] = make_record
        #: Where data sets of array-decodable templates go instead of becoming records, while
        #: ``template_batch.decode_template_batch`` runs (None otherwise).
        self.sink: SetSink | None = None
        #: What the last ``decode_template_batch`` knew of the templates, for the next one:
        #: (datagram count then, routes, template LRUs), good while the count is the same.
        self.template_memo: tuple[int, dict[Any, Any], dict[str, Any]] | None = None
        self._datagrams = 0
        self._records = 0
        self._by_format: Counter[str] = Counter()
        self._malformed: Counter[str] = Counter()
        self._counters: Counter[str] = Counter()
        self._defects: Counter[str] = Counter()
        self._exporters: dict[str, list[int]] = {}
        #: Held records replayed in the datagram being decoded, counted by each held set's
        #: most records (Limits.max_replayed_records_per_datagram).
        self._replay_spent = 0

    # -- sampling --------------------------------------------------------------------------

    def set_overrides(self, overrides: Mapping[str, int]) -> None:
        """Replace the per-exporter sampling overrides (e.g. after a config reload)."""
        checked: dict[str, int] = {}
        for exporter, interval in overrides.items():
            if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
                raise ValueError(f"sampling override for {exporter}: {interval!r} is not >= 1")
            name = _normalize_exporter(exporter)
            checked[name] = interval
            if ":" not in name:
                # A dual-stack collector socket sees IPv4 exporters as ::ffff:a.b.c.d.
                checked[f"::ffff:{name}"] = interval
        self._overrides = checked

    def resolve_interval(self, exporter: str, announced: int | None) -> tuple[int, Provenance]:
        """The interval and provenance for a record: override, else announced, else 1."""
        override = self._overrides.get(exporter)
        if override is not None:
            return override, "overridden"
        if announced is not None and announced > 0:
            return announced, "announced"
        return 1, "assumed"

    # -- template machinery (used by netflow_v9 and ipfix) -------------------------------

    @property
    def datagram_serial(self) -> int:
        """Changes with every datagram (for the template cache's per-datagram cap): the
        datagram count, which ``_decode`` advances before it calls a format's decoder, so
        the v9/IPFIX decoders must be reached through it."""
        return self._datagrams

    def learn_template(
        self, key: TemplateKey, template: Template, now: float, out: list[Any]
    ) -> None:
        """Store a template and replay data that was waiting for it.

        Held *options* data is replayed into ``out`` at once: it is older than any options
        data later in this datagram, which must win; what is over the datagram's replay
        budget is dropped (replayed later it would undo newer announcements). Held *flow*
        data becomes ready and waits for the end of the datagram (:meth:`replay_deferred`),
        so that the sampling announced by this datagram's options data applies to it: an
        exporter that sends templates, options template and options data together after a
        restart means them together.
        """
        self.templates.add(key, template)
        if not template.is_options:
            self.pending.release(key)
            return
        for entry in self.pending.take(key):
            if self._within_replay_budget(template, entry):
                self.pending.replayed += 1
                self._replay(template, entry, out)
            else:
                self.pending.dropped_replay_cap += 1

    def replay_deferred(self, exporter: str, out: list[Any]) -> None:
        """Replay the exporter's held flow data whose template has arrived, oldest first, as
        far as this datagram's replay budget goes (call at the end of a datagram that was
        not refused). What is left stays held for the exporter's next datagram."""
        ready = self.pending.ready(exporter)
        for index, (ident, entry) in enumerate(ready):
            # The template now cached: the one that released the set, unless it changed.
            template = self.templates.get(entry.key)
            if template is None:
                self.pending.wait_again(ident)
                continue
            if not self._within_replay_budget(template, entry):
                self._counters["pending.replay_postponed"] += len(ready) - index
                return
            self._replay(template, self.pending.pop(ident), out)

    def _within_replay_budget(self, template: Template, held: PendingSet) -> bool:
        """Charge a held set's most records to this datagram's budget if they fit. The first
        set of a datagram always fits, so a set bigger than the budget is not stuck; a set
        came in one datagram, so that is still no more than one datagram carries."""
        most = len(held.body) // max(1, template.min_length)
        spent = self._replay_spent
        if spent and spent + most > self.limits.max_replayed_records_per_datagram:
            return False
        self._replay_spent = spent + most
        return True

    def _replay(self, template: Template, held: PendingSet, out: list[Any]) -> None:
        r = Reader(held.body, fmt=held.ctx.fmt, exporter=held.ctx.exporter)
        try:
            self._decode_set(template, r, held.ctx, out)
        except WireDecodeError as exc:
            # The datagram that carried this data was accepted long ago; its data is
            # lost but this datagram (the template) is fine.
            self._counters[f"pending.replay_failed.{exc.code}"] += 1

    def data_set(self, set_id: int, r: Reader, ctx: SetContext, now: float, out: list[Any]) -> None:
        key = (ctx.fmt, ctx.exporter, ctx.domain, set_id)
        template = self.templates.get(key)
        if template is None:
            self.pending.hold(key, r.bytes(r.remaining()), ctx, now)
            return
        self._decode_set(template, r, ctx, out)

    def _decode_set(self, template: Template, r: Reader, ctx: SetContext, out: list[Any]) -> None:
        if template.is_options:
            for values in template.option_values(r):
                self._counters["options_records"] += 1
                if not self.sampling.learn(ctx.fmt, ctx.exporter, ctx.domain, values):
                    self._defects[f"{ctx.fmt}/sampling_out_of_range"] += 1
            return
        if not template.is_flow:
            self._counters["non_flow_data_sets"] += 1
            r.skip(r.remaining(), "data set")
            return
        sink = self.sink
        if (
            sink is not None
            and template.batch_layout is not None
            and sink.take(template, r, ctx, out)
        ):
            return
        out.extend(template.flows(r, ctx, self))

    # -- counters --------------------------------------------------------------------------

    def count(self, what: str, n: int = 1) -> None:
        """Count an expected event (skipped sample, reserved set...)."""
        self._counters[what] += n

    def defect(self, fmt: str, kind: str, n: int = 1) -> None:
        """Count an exporter's quirk that was tolerated (``DecoderStatistics.defects``)."""
        self._defects[f"{fmt}/{kind}"] += n

    def _malformed_datagram(self, exc: DecodeError, exporter: str) -> None:
        code = exc.code if isinstance(exc, WireDecodeError) else "malformed"
        self._malformed[f"{exc.fmt or 'unknown'}/{code}"] += 1
        entry = self._exporter_entry(exporter)
        entry[0] += 1
        entry[2] += 1

    def _exporter_seen(self, exporter: str, records: int) -> None:
        entry = self._exporter_entry(exporter)
        entry[0] += 1
        entry[1] += records

    def _exporter_entry(self, exporter: str) -> list[int]:
        entry = self._exporters.get(exporter)
        if entry is None:
            if len(self._exporters) >= self.limits.max_exporters_tracked:
                exporter = "other"
                entry = self._exporters.get(exporter)
            if entry is None:
                entry = self._exporters[exporter] = [0, 0, 0]
        return entry

    def statistics(self) -> DecoderStatistics:
        pending = self.pending
        templates = self.templates
        dropped = {
            "evicted": pending.dropped_evicted,
            "expired": pending.dropped_expired,
            "too_large": pending.dropped_too_large,
            "exporter_cap": pending.dropped_exporter_cap,
            "replay_cap": pending.dropped_replay_cap,
        }
        return DecoderStatistics(
            datagrams=self._datagrams,
            records=self._records,
            datagrams_by_format=MappingProxyType(dict(self._by_format)),
            malformed=MappingProxyType(dict(self._malformed)),
            templates=len(templates),
            template_bytes=templates.bytes,
            templates_learned=templates.learned,
            templates_updated=templates.updated,
            templates_refreshed=templates.refreshed,
            templates_evicted=templates.evicted,
            templates_withdrawn=templates.withdrawn,
            templates_evicted_by_reason=MappingProxyType(dict(templates.evicted_by)),
            templates_dropped=templates.dropped,
            templates_dropped_by_reason=MappingProxyType(dict(templates.dropped_by)),
            pending_sets=len(pending),
            pending_bytes=pending.bytes,
            pending_held=pending.held,
            pending_replayed=pending.replayed,
            pending_dropped=sum(dropped.values()),
            pending_dropped_by_reason=MappingProxyType(dropped),
            sampling_entries=len(self.sampling),
            counters=MappingProxyType(dict(self._counters)),
            exporters=MappingProxyType(
                {k: ExporterStatistics(*v) for k, v in self._exporters.items()}
            ),
            defects=MappingProxyType(dict(self._defects)),
        )


def _normalize_exporter(exporter: str) -> str:
    """Overrides are written by people: accept any spelling of an address."""
    try:
        address: IPv4Address | IPv6Address = IPv4Address(exporter)
    except ValueError:
        try:
            address = IPv6Address(exporter)
        except ValueError:
            return exporter
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
    return str(address)
