"""Templates shared by NetFlow v9 and IPFIX: compiled templates, the bounded template cache,
the bounded buffer of data that arrived before its template, and exporter sampling state.

A template (RFC 3954 §5.2, RFC 7011 §3.4.1) describes the layout of data records; both
formats use the same element numbers below 128 and IPFIX extends them (IANA "IPFIX
Information Elements"). A :class:`Template` is compiled once when it arrives:

* fixed-length templates get a ``struct.Struct`` that extracts only the elements a
  :class:`~overflowd.flows.FlowRecord` needs (the rest is ``x`` padding), so a data set is
  decoded with one ``iter_unpack`` over the checked block;
* templates with variable-length elements (IPFIX length 65535, RFC 7011 §7) are decoded
  record by record through the bounded reader;
* enterprise-specific elements (IPFIX E bit) and elements we do not know are kept as raw
  bytes (:meth:`Template.read_values`); they never make a template invalid.

Everything here is bounded (see :class:`Limits` and docs/flows.md): templates by count and
estimated bytes, per exporter and per domain, learned at a bounded rate (re-announcements are
recognised by their bytes and cost nothing) and evicted fairly, the exporter holding the most
first; held data by sets and bytes (in all and per exporter) and age, and replayed within a
per-datagram budget; sampling entries by exporter/domain and sampler.

Pure: no I/O, no clocks (``now`` is an argument), no global state.
"""

from __future__ import annotations

import heapq
import math
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from sys import getsizeof
from typing import TYPE_CHECKING, Any, NamedTuple

from overflowd.wire.reader import MalformedError, Reader

if TYPE_CHECKING:
    from overflowd.wire.dispatch import DecoderState

__all__ = [
    "VARIABLE_LENGTH",
    "BatchLayout",
    "FieldSpec",
    "Limits",
    "PendingBuffer",
    "PendingSet",
    "SamplingTable",
    "SetContext",
    "Template",
    "TemplateCache",
    "TemplateKey",
    "announces_sampling",
    "interval_from_elements",
]

#: IPFIX field length that means "length precedes each value" (RFC 7011 §7).
VARIABLE_LENGTH = 65535

#: Work units a template costs beyond its field count (Limits.template_work_rate_per_s).
TEMPLATE_WORK = 16

KiB = 1024
MiB = 1024 * KiB
SECONDS = 1.0
MINUTES = 60 * SECONDS


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound on decoder state, with its default and the reason for it.

    The state is fed by anyone who can send a UDP datagram (and spoof its source), so each
    table is capped; what does not fit is evicted or refused, and counted.
    """

    #: Templates kept across all exporters. Real exporters send tens of templates each
    #: (softflowd 2–4, pmacct a handful, a big router under 100 per line card); 4096 covers a
    #: few dozen large exporters. When full, the exporter holding the most gives up its least
    #: recently used template (fair eviction): one source's churn evicts its own templates,
    #: not another exporter's.
    max_templates: int = 4096
    #: Bytes held by the template cache (each template charged its estimated footprint:
    #: fields, compiled struct and flow plan, wire bytes, the cache's entry). A typical 15–30
    #: field template takes 3–6 KiB, so 4096 of them fit; a template of max_template_fields
    #: fields takes ~65 KiB and without this cap 4096 of them held over 220 MiB.
    max_template_bytes: int = 16 * MiB
    #: Templates held for one exporter address (all its domains and both formats), so that
    #: claiming many observation domains from one address buys no more than a quarter of
    #: the cache. Beyond it the exporter's own least recently used template goes.
    max_templates_per_exporter: int = 1024
    #: Templates held for one (format, exporter, observation domain / source id): a big
    #: router's line card uses under 100. Beyond it the domain's own oldest template goes.
    max_templates_per_domain: int = 256
    #: New or changed templates compiled from one datagram; more are dropped and counted
    #: (identical re-announcements are not compiled and do not count). A 1500-byte datagram
    #: holds 17 templates of 20 fields; only a flood packs a datagram with tiny templates.
    max_templates_per_datagram: int = 128
    #: Token bucket per exporter address for new or changed templates: the rate and the
    #: burst. An exporter announces all its templates at start (the burst) and then re-sends
    #: them unchanged (free: compared by bytes, never recompiled); a source that keeps
    #: changing templates is churning, and its churn is compiled at most this fast.
    template_learn_rate_per_s: float = 16.0
    template_learn_burst: int = 512
    #: Token bucket for all exporters together, in work units: compiling a template costs 16
    #: plus its field count (the fixed part — object, flow plan, cache entry, the eviction it
    #: causes — costs about as much as 16 fields). It bounds the work of a flood spoofing
    #: many source addresses, each of which would start with a full bucket of its own: about
    #: 1000 one-field, 500 fifteen-field or 30 maximal templates a second. The burst relearns
    #: a full cache of 64-field templates after a collector restart.
    template_work_rate_per_s: float = 16384.0
    template_work_burst: int = 4096 * 80
    #: Exporters whose learning bucket is remembered, least recently seen forgotten first.
    max_template_exporters: int = 4096
    #: Fields in one template. The largest real templates have ~100 fields; a template of
    #: thousands of fields is an attack on compile time, refused and counted.
    max_template_fields: int = 512
    #: Data sets held while waiting for their template (NetFlow v9/IPFIX over UDP may deliver
    #: data first, after an exporter or collector restart). Oldest evicted first.
    max_pending_sets: int = 1024
    #: Bytes held in those sets: 4 MiB is a few thousand typical datagrams.
    max_pending_bytes: int = 4 * MiB
    #: Held sets and bytes for one exporter address (all its domains, both formats): a
    #: quarter of the buffer, so that one source (spoofed or not) cannot fill the buffer
    #: for everyone. Beyond them the exporter's own oldest held set goes (``exporter_cap``).
    max_pending_sets_per_exporter: int = 256
    max_pending_bytes_per_exporter: int = 1 * MiB
    #: Held records replayed in one datagram (counted by each held set's most records:
    #: its bytes over the template's shortest record). A small template datagram would
    #: otherwise release everything held for it at once (a full buffer is ~160,000 records,
    #: close to a second of the trio thread). 2048 is what one maximal datagram of ~32-byte
    #: records carries; what is over stays held and is replayed by the exporter's next
    #: datagrams (at least one held set each, so no set is stuck), and expires as held data.
    max_replayed_records_per_datagram: int = 2048
    #: How long held data waits. RFC 7011 §10.3.6 suggests re-sending templates over UDP at
    #: least every 600 s; data older than one refresh period will not be rescued.
    pending_max_age_s: float = 10 * MINUTES
    #: (exporter, domain) entries of announced sampling and system-init time, LRU.
    max_sampling_entries: int = 4096
    #: Sampler/selector ids remembered per (exporter, domain).
    max_samplers_per_domain: int = 64
    #: Exporters with their own counters in statistics(); beyond that they are summed
    #: under "other" so a spoofing flood cannot grow the statistics without bound.
    max_exporters_tracked: int = 1024
    #: Decoded addresses cached for reuse (flows repeat addresses); cleared when full.
    address_cache_size: int = 65536

    def __post_init__(self) -> None:
        for name in (
            "max_templates",
            "max_template_bytes",
            "max_templates_per_exporter",
            "max_templates_per_domain",
            "max_templates_per_datagram",
            "template_learn_burst",
            "max_template_exporters",
            "max_template_fields",
            "max_pending_sets",
            "max_pending_sets_per_exporter",
            "max_replayed_records_per_datagram",
            "max_sampling_entries",
            "max_samplers_per_domain",
            "max_exporters_tracked",
            "address_cache_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be >= 1")
        if (
            self.max_pending_bytes < 0
            or self.max_pending_bytes_per_exporter < 0
            or self.pending_max_age_s < 0
        ):
            raise ValueError("Limits: pending bounds must be >= 0")
        for name in ("template_learn_rate_per_s", "template_work_rate_per_s"):
            rate = getattr(self, name)
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"Limits.{name} must be a finite number > 0")
        if self.template_work_burst < TEMPLATE_WORK + self.max_template_fields:
            raise ValueError("Limits.template_work_burst must cover one maximal template")


# -- information elements (IANA numbers; v9 uses the same below 128) -------------------------

IE_OCTET_DELTA = 1
IE_PACKET_DELTA = 2
IE_PROTOCOL = 4
IE_TOS = 5
IE_TCP_FLAGS = 6
IE_SRC_PORT = 7
IE_SRC_V4 = 8
IE_DST_PORT = 11
IE_DST_V4 = 12
IE_SRC_AS = 16
IE_DST_AS = 17
IE_LAST_SYSUP = 21
IE_FIRST_SYSUP = 22
IE_POST_OCTET_DELTA = 23
IE_POST_PACKET_DELTA = 24
IE_SRC_V6 = 27
IE_DST_V6 = 28
IE_ICMP_V4 = 32
IE_SAMPLING_INTERVAL = 34
IE_SAMPLING_ALGORITHM = 35
IE_SAMPLER_ID = 48
IE_SAMPLER_MODE = 49
IE_SAMPLER_RANDOM_INTERVAL = 50
IE_OCTET_TOTAL = 85
IE_PACKET_TOTAL = 86
IE_ICMP_V6 = 139
IE_ICMP_TYPE_V4 = 176
IE_ICMP_CODE_V4 = 177
IE_ICMP_TYPE_V6 = 178
IE_ICMP_CODE_V6 = 179
#: Cisco ASA NSEL (NetFlow Security Event Logging) counters, IANA names: what the
#: connection's initiator sent (towards the responder) and what came back.
IE_INITIATOR_OCTETS = 231
IE_RESPONDER_OCTETS = 232
IE_INITIATOR_PACKETS = 298
IE_RESPONDER_PACKETS = 299
IE_START_S = 150
IE_END_S = 151
IE_START_MS = 152
IE_END_MS = 153
IE_START_US = 154
IE_END_US = 155
IE_START_NS = 156
IE_END_NS = 157
IE_START_DELTA_US = 158
IE_END_DELTA_US = 159
IE_SYSTEM_INIT_MS = 160
IE_DSCP = 195
IE_SELECTOR_ID = 302
IE_SAMPLING_PACKET_INTERVAL = 305
IE_SAMPLING_PACKET_SPACE = 306
IE_SAMPLING_SIZE = 309
IE_SAMPLING_POPULATION = 310
IE_SAMPLING_PROBABILITY = 311

#: Elements decoded as unsigned integers (any length 1–8: IPFIX reduced-size encoding,
#: RFC 7011 §6.2). Everything else stays raw bytes.
_UNSIGNED_V9 = (1, 2, 3, 4, 5, 6, 7, 10, 11, 14, 16, 17, 21, 22, 23, 24, 32, 34, 35, 48, 49, 50)
_UNSIGNED_IPFIX = (85, 86, 136, 139, 144, 148, 149, *range(150, 161), 195, 302, 304, 305, 306)
_UNSIGNED_ICMP_NSEL = (176, 177, 178, 179, 231, 232, 298, 299)
UNSIGNED_ELEMENTS = frozenset((*_UNSIGNED_V9, *_UNSIGNED_IPFIX, *_UNSIGNED_ICMP_NSEL, 309, 310))
ADDRESS_V4_ELEMENTS = frozenset({IE_SRC_V4, IE_DST_V4})
ADDRESS_V6_ELEMENTS = frozenset({IE_SRC_V6, IE_DST_V6})

#: NTP era offset (1900 → 1970) for dateTimeMicroseconds/Nanoseconds (RFC 7011 §6.1.9–10).
NTP_UNIX_OFFSET_S = 2_208_988_800

#: The largest sampling interval a record carries: a report says it in 32 bits (and sFlow's
#: rate is 32 bits). An exporter "announcing" more (an 8-byte samplingInterval, a
#: samplingProbability of 1e-10, or of 5e-324 whose inverse is infinite) announces nothing,
#: and that is counted (``<format>/sampling_out_of_range`` in ``DecoderStatistics.defects``).
MAX_INTERVAL = 2**32 - 1
#: Times a record may carry, in Unix milliseconds: 0001-01-01 to 9999-12-31, what
#: ``datetime`` and RFC 3339 text can write, so every consumer can render them. Only IPFIX's
#: 64-bit time elements reach beyond (flowStartMilliseconds of 2**63, ...); such a time is
#: treated as absent and counted (``<format>/time_out_of_range``).
MIN_TIME_MS = -62_135_596_800_000
MAX_TIME_MS = 253_402_300_799_999


class FieldSpec(NamedTuple):
    """One (element, length) pair of a template.

    ``enterprise`` is 0 for IANA elements. ``scope`` marks scope fields of options
    templates; for NetFlow v9 their ``id`` is a *scope type* (1 system, 2 interface, ...),
    not an element number.
    """

    id: int
    length: int
    enterprise: int = 0
    scope: bool = False

    @property
    def standard(self) -> bool:
        return self.enterprise == 0 and not self.scope


TemplateKey = tuple[str, str, int, int]  # (format, exporter, domain, template id)
Value = int | bytes | float


#: What one FieldSpec (a 4-tuple) takes, GC header included, plus the one item more that
#: CPython allocates for instances of tuple subclasses (PyType_GenericAlloc: nitems + 1).
_FIELD_SPEC_SIZE = getsizeof(FieldSpec(300, 300, 300, False)) + 8


def _deep_size(obj: object) -> int:
    """Bytes of ``obj`` and the containers and numbers it holds (not shared singletons:
    None, bools, small ints, str constants). For the few small objects of a flow plan."""
    seen: set[int] = set()
    stack = [obj]
    size = 0
    while stack:
        item = stack.pop()
        if (
            item is None
            or isinstance(item, bool | str)
            or (isinstance(item, int) and -5 <= item <= 256)
            or id(item) in seen
        ):
            continue
        seen.add(id(item))
        size += getsizeof(item)
        if isinstance(item, tuple | list | frozenset | set):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif hasattr(item, "__slots__"):
            stack.extend(getattr(item, name, None) for name in item.__slots__)
    return size


def _field_kind(f: FieldSpec) -> str:
    """How a value of this field is represented after decoding: int, bytes or float."""
    if f.standard and f.length != VARIABLE_LENGTH:
        if f.id in UNSIGNED_ELEMENTS and 1 <= f.length <= 8:
            return "int"
        if f.id == IE_SAMPLING_PROBABILITY and f.length in (4, 8):
            return "float"
    return "bytes"


class SetContext(NamedTuple):
    """What a data set needs from its message header to become flow records."""

    fmt: str
    exporter: str
    domain: int
    export_ms: int
    #: NetFlow v9 sysUpTime of the header (ms); None for IPFIX.
    uptime_ms: int | None


# Time elements, in order of preference: (element, conversion kind).
_FIRST_TIME = (
    (IE_START_MS, "ms"),
    (IE_START_S, "s"),
    (IE_START_US, "ntp"),
    (IE_START_NS, "ntp"),
    (IE_START_DELTA_US, "delta_us"),
    (IE_FIRST_SYSUP, "sysup"),
)
_LAST_TIME = (
    (IE_END_MS, "ms"),
    (IE_END_S, "s"),
    (IE_END_US, "ntp"),
    (IE_END_NS, "ntp"),
    (IE_END_DELTA_US, "delta_us"),
    (IE_LAST_SYSUP, "sysup"),
)
_IN_RECORD_SAMPLING = frozenset(
    {
        IE_SAMPLING_INTERVAL,
        IE_SAMPLER_RANDOM_INTERVAL,
        IE_SAMPLING_PACKET_INTERVAL,
        IE_SAMPLING_SIZE,
        IE_SAMPLING_PROBABILITY,
    }
)


def interval_from_elements(values: Mapping[int, Value]) -> int | None:
    """The "1 in N" sampling interval announced by a set of element values, if any.

    Precedence and semantics (docs/flows.md), the first that gives an interval in
    1..:data:`MAX_INTERVAL` wins:

    * 305/306 samplingPacketInterval/Space (RFC 5477 §8.2.2, RFC 7014): ``interval`` packets
      are selected, then ``space`` packets are skipped, so 1 in ``(interval+space)/interval``
      (rounded, at least 1). 305 without 306 is not RFC 5477 (both are required for
      systematic count-based selection) and is what several exporters send to mean
      "1 in N": we take it as that.
    * 34 samplingInterval (RFC 7270 §5.1, NetFlow v9 SAMPLING_INTERVAL): 1 in N.
    * 50 samplerRandomInterval (v9 FLOW_SAMPLER_RANDOM_INTERVAL): 1 in N.
    * 309/310 samplingSize/samplingPopulation: ``size`` of ``population``.
    * 311 samplingProbability: 1 / p.

    Zero or nonsensical values announce nothing; :func:`announces_sampling` tells a caller
    whether that was a defect worth counting. Never raises: every value comes from the wire
    (a probability of 5e-324 has an infinite inverse, which ``round`` refuses).
    """
    interval = values.get(IE_SAMPLING_PACKET_INTERVAL)
    if isinstance(interval, int) and interval > 0:
        space = values.get(IE_SAMPLING_PACKET_SPACE)
        # Integer true division is exact enough and never overflows for 64-bit values.
        n = max(1, round((interval + space) / interval)) if isinstance(space, int) else interval
        if n <= MAX_INTERVAL:
            return n
    for element in (IE_SAMPLING_INTERVAL, IE_SAMPLER_RANDOM_INTERVAL):
        value = values.get(element)
        if isinstance(value, int) and 0 < value <= MAX_INTERVAL:
            return value
    size = values.get(IE_SAMPLING_SIZE)
    population = values.get(IE_SAMPLING_POPULATION)
    if isinstance(size, int) and isinstance(population, int) and 0 < size <= population:
        n = max(1, round(population / size))
        if n <= MAX_INTERVAL:
            return n
    probability = values.get(IE_SAMPLING_PROBABILITY)
    # NaN fails both comparisons; 1/p is inf (not an error) for subnormal p, and inf fails
    # the bound, so round() only ever sees a finite number below 2**32.
    if isinstance(probability, float) and 0.0 < probability <= 1.0:
        inverse = 1.0 / probability
        if inverse < MAX_INTERVAL + 0.5:
            return max(1, round(inverse))
    return None


#: Elements whose non-zero value is an announcement of sampling (306 and 310 only qualify
#: 305 and 309).
_ANNOUNCING = (
    IE_SAMPLING_PACKET_INTERVAL,
    IE_SAMPLING_INTERVAL,
    IE_SAMPLER_RANDOM_INTERVAL,
    IE_SAMPLING_SIZE,
    IE_SAMPLING_PROBABILITY,
)


def announces_sampling(values: Mapping[int, Value]) -> bool:
    """Whether ``values`` tried to announce sampling: a non-zero interval, size or probability
    (NaN included). Zero is how exporters say "not sampled"; anything else that
    :func:`interval_from_elements` refuses is a defect of the exporter."""
    for element in _ANNOUNCING:
        value = values.get(element)
        if isinstance(value, int | float) and value != 0:
            return True
    return False


def _sampler_of(values: Mapping[int, Value]) -> int | None:
    for element in (IE_SELECTOR_ID, IE_SAMPLER_ID):
        value = values.get(element)
        if isinstance(value, int):
            return value
    return None


class Template:
    """A compiled data or options template."""

    __slots__ = (
        "_flow_plan",
        "_flow_struct",
        "_kinds",
        "batch_layout",
        "fields",
        "fixed_length",
        "fmt",
        "footprint",
        "is_flow",
        "is_options",
        "min_length",
        "scope_count",
        "template_id",
        "wire",
    )

    def __init__(
        self,
        fmt: str,
        template_id: int,
        fields: Iterable[FieldSpec],
        *,
        scope_count: int = 0,
        is_options: bool = False,
        wire: bytes = b"",
    ) -> None:
        self.fmt = fmt
        self.template_id = template_id
        self.fields = tuple(fields)
        self.scope_count = scope_count
        self.is_options = is_options
        #: The template record as it came on the wire: a re-announcement with the same
        #: bytes is a refresh, not an update.
        self.wire = wire
        self._kinds = tuple(_field_kind(f) for f in self.fields)
        variable = any(f.length == VARIABLE_LENGTH for f in self.fields)
        # A variable-length field takes at least its 1-byte length prefix.
        self.min_length = sum(1 if f.length == VARIABLE_LENGTH else f.length for f in self.fields)
        self.fixed_length: int | None = None if variable else self.min_length
        self._flow_struct: struct.Struct | None = None
        self._flow_plan: _FlowPlan | None = None
        #: Where the columns of the array decoder (overflowd.wire.template_batch) sit in a
        #: record, or None where that decoder declines this template (the scalar path runs).
        self.batch_layout: BatchLayout | None = None
        self.is_flow = False
        if not is_options:
            self._compile_flow_plan()
        #: Estimated bytes this template holds (what the cache's byte cap is charged).
        self.footprint = self._footprint()

    def __repr__(self) -> str:
        kind = "options template" if self.is_options else "template"
        return f"<{self.fmt} {kind} {self.template_id}: {len(self.fields)} fields>"

    def _footprint(self) -> int:
        """Bytes held by this template and what it compiled, as tracemalloc would count them.

        The field list is sized by formula (every FieldSpec is a 4-tuple; numbers above 256
        are int objects of their own, smaller ones are shared), the rest by walking the
        objects, which are few: the struct (its ``__sizeof__`` includes the format codes) and
        the flow plan. tests/unit/test_wire_templates.py checks this against tracemalloc.
        """
        fields = self.fields
        size = getsizeof(self) + getsizeof(fields) + getsizeof(self._kinds)
        size += getsizeof(self.wire) + len(fields) * _FIELD_SPEC_SIZE
        for f in fields:
            for number in (f.id, f.length, f.enterprise):
                if number > 256:
                    size += getsizeof(number)
        st = self._flow_struct
        if st is not None:
            size += getsizeof(st) + getsizeof(st.format)
        if self._flow_plan is not None:
            size += _deep_size(self._flow_plan)
        if self.batch_layout is not None:
            size += _deep_size(self.batch_layout)
        return size

    # -- generic decoding (variable-length templates, options, raw access) --------------

    def read_values(self, r: Reader) -> tuple[Value, ...]:
        """One record's values in field order: ints, floats, or raw bytes (unknown and
        enterprise elements are kept raw)."""
        out: list[Value] = []
        for f, kind in zip(self.fields, self._kinds, strict=True):
            n = f.length
            if n == VARIABLE_LENGTH:
                # RFC 7011 §7: one length byte, or 255 then a two-byte length.
                n = r.u8()
                if n == 255:
                    n = r.u16()
            if kind == "int":
                out.append(r.uint(n))
            elif kind == "float":
                raw = r.bytes(n)
                out.append(struct.unpack("!d" if n == 8 else "!f", raw)[0])
            else:
                out.append(r.bytes(n))
        return tuple(out)

    def iter_records(self, r: Reader) -> Iterator[tuple[Value, ...]]:
        """All records of a data set body; trailing bytes shorter than a record are padding
        (RFC 7011 §3.3.1, RFC 3954 §5.3)."""
        min_length = max(1, self.min_length)
        while r.remaining() >= min_length:
            yield self.read_values(r)
        r.skip(r.remaining(), "padding")

    def option_values(self, r: Reader) -> Iterator[dict[int, Value]]:
        """Options data records as {element: value}; scope fields of v9 (scope types)
        are left out, IPFIX scope fields are ordinary elements and kept."""
        for values in self.iter_records(r):
            yield {
                f.id: v
                for f, v in zip(self.fields, values, strict=True)
                if f.enterprise == 0 and not f.scope
            }

    # -- flows ----------------------------------------------------------------------------

    def _compile_flow_plan(self) -> None:
        position: dict[int, int] = {}
        for index, f in enumerate(self.fields):
            if f.standard and f.id not in position:
                if f.id in ADDRESS_V4_ELEMENTS and f.length != 4:
                    continue
                if f.id in ADDRESS_V6_ELEMENTS and f.length != 16:
                    continue
                if f.id in UNSIGNED_ELEMENTS and not 1 <= f.length <= 8:
                    continue
                position[f.id] = index
        has_src = IE_SRC_V4 in position or IE_SRC_V6 in position
        has_dst = IE_DST_V4 in position or IE_DST_V6 in position
        self.is_flow = has_src and has_dst
        if not self.is_flow:
            return
        if self.fixed_length is not None:
            # Extract only the elements the plan reads; everything else becomes padding.
            used = sorted(position.values())
            column = {field_index: col for col, field_index in enumerate(used)}
            parts = ["!"]
            for index, f in enumerate(self.fields):
                if index not in column:
                    parts.append(f"{f.length}x")
                elif self._kinds[index] == "int" and f.length in (1, 2, 4, 8):
                    parts.append({1: "B", 2: "H", 4: "I", 8: "Q"}[f.length])
                elif self._kinds[index] == "float":
                    parts.append("f" if f.length == 4 else "d")
                else:
                    parts.append(f"{f.length}s")
            self._flow_struct = struct.Struct("".join(parts))
            remap = {element: column[index] for element, index in position.items()}
            odd = {
                remap[element]
                for element, index in position.items()
                if self._kinds[index] == "int" and self.fields[index].length not in (1, 2, 4, 8)
            }
            self._flow_plan = _FlowPlan(remap, odd)
            self.batch_layout = _batch_layout(self.fields, _FlowPlan(position, set()))
        else:
            self._flow_plan = _FlowPlan(position, set())

    def flows(self, r: Reader, ctx: SetContext, state: DecoderState) -> list[Any]:
        """Decode a data set body into flow records (empty for non-flow templates)."""
        plan = self._flow_plan
        if plan is None:
            r.skip(r.remaining(), "data set")
            return []
        st = self._flow_struct
        if st is not None:
            assert self.fixed_length is not None
            count = r.remaining() // self.fixed_length if self.fixed_length else 0
            if count == 0 and r.remaining() >= 4:
                # More than alignment padding but less than one record: the template and
                # the data disagree (or the template changed). Nothing to decode; say so.
                state.count("data_sets_shorter_than_a_record")
            rows: Iterable[tuple[Any, ...]] = r.unpack_many(st, count, "data records")
            r.skip(r.remaining(), "padding")
        else:
            rows = list(self.iter_records(r))
        return plan.build(rows, ctx, state)


class BatchLayout(NamedTuple):
    """A fixed-length flow template compiled for the array decoder (``template_batch``).

    ``columns`` are ``(name, byte offset, length)`` of the unsigned big-endian fields the
    array decoder reads (lengths 1, 2, 4 or 8); a column the template lacks is absent. Pure
    data, hashable: sets of templates with the same layout (the same exporter software on
    many routers) are decoded together. Built from the same :class:`_FlowPlan` as the scalar
    path, so the precedence rules (which counter, which time element) are the scalar ones.
    """

    itemsize: int
    columns: tuple[tuple[str, int, int], ...]
    first_kind: str | None
    last_kind: str | None


#: Time kinds the array decoder computes; NTP timestamps (dateTimeMicro/Nanoseconds) and
#: the rarer layouts are left to the scalar path.
_BATCH_TIME_KINDS = frozenset({"ms", "s", "delta_us", "sysup"})


def _batch_layout(fields: tuple[FieldSpec, ...], plan: _FlowPlan) -> BatchLayout | None:
    """The array decoder's layout for a fixed-length flow template, or None to decline.

    Declined (the scalar path, the reference, decodes them): IPv6 address fields (alone or
    beside IPv4 ones: which family a record uses depends on its values), sampling carried
    in the records (intervals or sampler ids per record), one AS field without the other,
    NSEL initiator/responder counters (two records per record), integers of 3, 5, 6 or 7
    bytes, NTP times, and sysUpTime times wider than 32 bits. ``plan`` holds field
    *indices* (not struct columns).
    """
    if plan.src4 < 0 or plan.dst4 < 0 or plan.src6 >= 0 or plan.dst6 >= 0:
        return None
    if plan.interval_elements or plan.sampler >= 0:
        return None
    if plan.reverse_packets_ix >= 0 or plan.reverse_bytes_ix >= 0:
        return None
    if (plan.src_as < 0) != (plan.dst_as < 0):
        return None  # one AS without the other: rare, and one presence flag per record
    offsets = []
    offset = 0
    for f in fields:
        offsets.append(offset)
        offset += f.length
    wanted: list[tuple[str, int]] = [
        ("src", plan.src4),
        ("dst", plan.dst4),
        ("sport", plan.sport),
        ("dport", plan.dport),
        ("proto", plan.proto),
        ("packets", plan.packets_ix),
        ("bytes", plan.bytes_ix),
        ("tcp_flags", plan.tcp_flags),
        ("tos", plan.tos),
        ("dscp", plan.dscp),
        ("src_as", plan.src_as),
        ("dst_as", plan.dst_as),
    ]
    for name, icmp in (("icmp4", plan.icmp4), ("icmp6", plan.icmp6)):
        if icmp is not None:
            wanted += [(f"{name}_combined", icmp[0]), (f"{name}_type", icmp[1])]
            wanted += [(f"{name}_code", icmp[2])]
    kinds: list[str | None] = []
    for name, when in (("first", plan.first), ("last", plan.last)):
        if when is None:
            kinds.append(None)
            continue
        index, kind = when
        if kind not in _BATCH_TIME_KINDS or (kind == "sysup" and fields[index].length > 4):
            return None
        wanted.append((name, index))
        kinds.append(kind)
    columns = []
    for name, index in wanted:
        if index < 0:
            continue
        length = fields[index].length
        if length not in (1, 2, 4, 8):
            return None
        columns.append((name, offsets[index], length))
    return BatchLayout(offset, tuple(columns), kinds[0], kinds[1])


class _FlowPlan:
    """Where each FlowRecord field sits in a decoded row, and how to convert it."""

    __slots__ = (
        "bytes_ix",
        "dport",
        "dscp",
        "dst4",
        "dst6",
        "dst_as",
        "first",
        "icmp4",
        "icmp6",
        "interval_elements",
        "last",
        "odd",
        "packets_ix",
        "proto",
        "reverse_bytes_ix",
        "reverse_packets_ix",
        "sampler",
        "sport",
        "src4",
        "src6",
        "src_as",
        "tcp_flags",
        "tos",
    )

    def __init__(self, position: Mapping[int, int], odd: set[int]) -> None:
        get = position.get
        self.odd = frozenset(odd)  # columns that are odd-sized ints still in bytes
        self.src4 = get(IE_SRC_V4, -1)
        self.dst4 = get(IE_DST_V4, -1)
        self.src6 = get(IE_SRC_V6, -1)
        self.dst6 = get(IE_DST_V6, -1)
        self.sport = get(IE_SRC_PORT, -1)
        self.dport = get(IE_DST_PORT, -1)
        self.proto = get(IE_PROTOCOL, -1)
        self.packets_ix = next(
            (
                position[e]
                for e in (IE_PACKET_DELTA, IE_PACKET_TOTAL, IE_POST_PACKET_DELTA)
                if e in position
            ),
            -1,
        )
        self.bytes_ix = next(
            (
                position[e]
                for e in (IE_OCTET_DELTA, IE_OCTET_TOTAL, IE_POST_OCTET_DELTA)
                if e in position
            ),
            -1,
        )
        # Cisco ASA NSEL exports no standard counters, only the initiator's and the
        # responder's (docs/flows.md): the initiator's are the record's (src -> dst), the
        # responder's become a second record the other way.
        self.reverse_packets_ix = self.reverse_bytes_ix = -1
        if self.packets_ix < 0 and IE_INITIATOR_PACKETS in position:
            self.packets_ix = position[IE_INITIATOR_PACKETS]
            self.reverse_packets_ix = get(IE_RESPONDER_PACKETS, -1)
        if self.bytes_ix < 0 and IE_INITIATOR_OCTETS in position:
            self.bytes_ix = position[IE_INITIATOR_OCTETS]
            self.reverse_bytes_ix = get(IE_RESPONDER_OCTETS, -1)
        self.tcp_flags = get(IE_TCP_FLAGS, -1)
        self.tos = get(IE_TOS, -1)
        self.dscp = get(IE_DSCP, -1)
        self.src_as = get(IE_SRC_AS, -1)
        self.dst_as = get(IE_DST_AS, -1)
        # Where ICMP type/code is, for an ICMP (1) and an ICMPv6 (58) record: the element of
        # the record's family first, the other family's as a fallback (exporters mix them up).
        v4 = _icmp_source(position, IE_ICMP_V4, IE_ICMP_TYPE_V4, IE_ICMP_CODE_V4)
        v6 = _icmp_source(position, IE_ICMP_V6, IE_ICMP_TYPE_V6, IE_ICMP_CODE_V6)
        self.icmp4 = v4 or v6
        self.icmp6 = v6 or v4
        self.first = next(((position[e], k) for e, k in _FIRST_TIME if e in position), None)
        self.last = next(((position[e], k) for e, k in _LAST_TIME if e in position), None)
        self.sampler = get(IE_SELECTOR_ID, get(IE_SAMPLER_ID, -1))
        self.interval_elements = tuple(
            (e, position[e])
            for e in (*_IN_RECORD_SAMPLING, IE_SAMPLING_PACKET_SPACE, IE_SAMPLING_POPULATION)
            if e in position
        )

    def build(
        self, rows: Iterable[tuple[Any, ...]], ctx: SetContext, state: DecoderState
    ) -> list[Any]:
        exporter, domain, fmt = ctx.exporter, ctx.domain, ctx.fmt
        make = state.build
        export_ms = ctx.export_ms
        sampling = state.sampling
        set_interval, set_provenance = state.resolve_interval(
            exporter, sampling.announced(fmt, exporter, domain)
        )
        boot_ms = None
        if ctx.uptime_ms is not None:
            boot_ms = export_ms - ctx.uptime_ms
        else:
            boot_ms = sampling.system_init_ms(fmt, exporter, domain)
        address = state.address_from_bytes
        odd = self.odd
        src4, dst4, src6, dst6 = self.src4, self.dst4, self.src6, self.dst6
        sport_ix, dport_ix, proto_ix = self.sport, self.dport, self.proto
        packets_ix, bytes_ix = self.packets_ix, self.bytes_ix
        reverse_packets_ix, reverse_bytes_ix = self.reverse_packets_ix, self.reverse_bytes_ix
        reverse = reverse_packets_ix >= 0 or reverse_bytes_ix >= 0
        flags_ix, tos_ix, dscp_ix = self.tcp_flags, self.tos, self.dscp
        src_as_ix, dst_as_ix = self.src_as, self.dst_as
        icmp4, icmp6 = self.icmp4, self.icmp6
        first, last = self.first, self.last
        sampler_ix, interval_elements = self.sampler, self.interval_elements
        uptime = ctx.uptime_ms
        bad_times = bad_sampling = 0
        out: list[Any] = []
        append = out.append
        for raw in rows:
            row: Any = raw
            if odd:
                row = [int.from_bytes(v, "big") if i in odd else v for i, v in enumerate(raw)]
            # Addresses: IPv4 if present and not 0.0.0.0, else IPv6 (templates that carry
            # both leave the unused family zero).
            if src4 >= 0 and (src6 < 0 or any(row[src4])):
                src = address(row[src4])
            elif src6 >= 0:
                src = address(row[src6])
            else:
                src = address(row[src4])
            if dst4 >= 0 and (dst6 < 0 or any(row[dst4])):
                dst = address(row[dst4])
            elif dst6 >= 0:
                dst = address(row[dst6])
            else:
                dst = address(row[dst4])
            proto = row[proto_ix] & 0xFF if proto_ix >= 0 else 0
            sport = row[sport_ix] & 0xFFFF if sport_ix >= 0 else 0
            dport = row[dport_ix] & 0xFFFF if dport_ix >= 0 else 0
            if proto == 1 or proto == 58:
                icmp = icmp4 if proto == 1 else icmp6
                if icmp is not None:
                    sport, dport = _icmp_ports(row, icmp, sport, dport)
            if tos_ix >= 0:
                tos = row[tos_ix] & 0xFF
            elif dscp_ix >= 0:
                tos = (row[dscp_ix] & 0x3F) << 2
            else:
                tos = 0
            first_ms = last_ms = None
            if first is not None:
                first_ms = _time(row[first[0]], first[1], export_ms, boot_ms, uptime)
                if not MIN_TIME_MS <= first_ms <= MAX_TIME_MS:
                    first_ms = None
                    bad_times += 1
            if last is not None:
                last_ms = _time(row[last[0]], last[1], export_ms, boot_ms, uptime)
                if not MIN_TIME_MS <= last_ms <= MAX_TIME_MS:
                    last_ms = None
                    bad_times += 1
            if first_ms is None:
                first_ms = export_ms if last_ms is None else last_ms
            if last_ms is None:
                last_ms = first_ms
            interval, provenance = set_interval, set_provenance
            if interval_elements:
                values = {e: row[i] for e, i in interval_elements}
                announced = interval_from_elements(values)
                if announced is not None:
                    interval, provenance = state.resolve_interval(exporter, announced)
                elif announces_sampling(values):
                    bad_sampling += 1
            elif sampler_ix >= 0:
                announced = sampling.announced(fmt, exporter, domain, row[sampler_ix])
                interval, provenance = state.resolve_interval(exporter, announced)
            flags = row[flags_ix] if flags_ix >= 0 else 0
            src_as = row[src_as_ix] if src_as_ix >= 0 else None
            dst_as = row[dst_as_ix] if dst_as_ix >= 0 else None
            append(
                make(
                    src,
                    dst,
                    sport,
                    dport,
                    proto,
                    row[packets_ix] if packets_ix >= 0 else 0,
                    row[bytes_ix] if bytes_ix >= 0 else 0,
                    first_ms,
                    last_ms,
                    flags,
                    tos,
                    src_as,
                    dst_as,
                    exporter,
                    domain,
                    fmt,
                    interval,
                    provenance,
                )
            )
            if reverse:
                packets = row[reverse_packets_ix] if reverse_packets_ix >= 0 else 0
                octets = row[reverse_bytes_ix] if reverse_bytes_ix >= 0 else 0
                if packets or octets:
                    # The responder's traffic: ends, ports and ASes swapped. ICMP keeps
                    # sport 0 and the exported type/code in dport (the replies' own type is
                    # not exported).
                    if proto == 1 or proto == 58:
                        rsport, rdport = sport, dport
                    else:
                        rsport, rdport = dport, sport
                    append(
                        make(
                            dst,
                            src,
                            rsport,
                            rdport,
                            proto,
                            packets,
                            octets,
                            first_ms,
                            last_ms,
                            flags,
                            tos,
                            dst_as,
                            src_as,
                            exporter,
                            domain,
                            fmt,
                            interval,
                            provenance,
                        )
                    )
        if bad_times:
            state.defect(fmt, "time_out_of_range", bad_times)
        if bad_sampling:
            state.defect(fmt, "sampling_out_of_range", bad_sampling)
        return out


#: Where a record's ICMP type/code is: (combined type*256+code column, type column, code
#: column), -1 where absent.
_IcmpSource = tuple[int, int, int]


def _icmp_source(
    position: Mapping[int, int], combined: int, type_element: int, code_element: int
) -> _IcmpSource | None:
    source = (
        position.get(combined, -1),
        position.get(type_element, -1),
        position.get(code_element, -1),
    )
    return source if source != (-1, -1, -1) else None


def _icmp_ports(row: Any, icmp: _IcmpSource, sport: int, dport: int) -> tuple[int, int]:
    """(sport, dport) of an ICMP record by the convention: (0, type * 256 + code).

    The exported type/code elements win over the port fields, which Cisco ASA fills with the
    ICMP identifier. One exception: elements saying 0/0 (an echo reply, or an exporter that
    never fills them) beside a source port of 0 keep the destination port, where exporters
    without ICMP elements put type/code.
    """
    combined, type_ix, code_ix = icmp
    if combined >= 0:
        value = row[combined] & 0xFFFF
    else:
        value = (row[type_ix] & 0xFF) << 8 if type_ix >= 0 else 0
        if code_ix >= 0:
            value |= row[code_ix] & 0xFF
    if value == 0 and sport == 0:
        return 0, dport
    return 0, value


def _time(value: int, kind: str, export_ms: int, boot_ms: int | None, uptime: int | None) -> int:
    """One time element as Unix milliseconds (kinds from ``_FIRST_TIME``)."""
    if kind == "ms":
        return value
    if kind == "s":
        return value * 1000
    if kind == "ntp":
        seconds, fraction = value >> 32, value & 0xFFFFFFFF
        return (seconds - NTP_UNIX_OFFSET_S) * 1000 + ((fraction * 1000) >> 32)
    if kind == "delta_us":
        return export_ms - value // 1000
    # sysup: milliseconds since the exporter booted.
    if uptime is not None:
        # NetFlow v9: relative to the header's sysUpTime; both are 32-bit counters that wrap
        # every 49.7 days, so take the difference modulo 2**32 as a signed number.
        delta = (uptime - value) & 0xFFFFFFFF
        if delta & 0x80000000:
            delta -= 0x100000000
        return export_ms - delta
    if boot_ms is not None:
        # IPFIX: relative to systemInitTimeMilliseconds from options data.
        return boot_ms + value
    return export_ms


# -- template cache --------------------------------------------------------------------------

#: Bytes the cache itself spends per template (its key tuple and template-id int, the
#: exporter's LRU slot, the domain index slot), per domain index and per exporter entry;
#: measured with tracemalloc (tests/unit/test_wire_templates.py checks the total).
_ENTRY_SIZE = 300
_DOMAIN_SIZE = 400
_EXPORTER_SIZE = 500

#: Why templates leave the cache (TemplateCache.evicted_by) and why announcements are not
#: learned (TemplateCache.dropped_by); docs/flows.md explains each.
EVICTION_REASONS = ("domain_cap", "exporter_cap", "count", "bytes", "superseded")
DROP_REASONS = (
    "datagram_cap",
    "exporter_rate",
    "total_rate",
    "too_many_fields",
    "no_fields",
    "empty_record",
)


class _Bucket:
    """A token bucket on the caller's clock."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def refill(self, now: float, rate: float, burst: float) -> float:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(burst, self.tokens + elapsed * rate)
        # A clock that went backwards (a pcap replay of several files) restarts the refill
        # from here instead of pinning the bucket empty until it catches up.
        self.stamp = now
        return self.tokens


class _ExporterTemplates:
    """One exporter address's templates, least recently used first, and their bytes."""

    __slots__ = ("bytes", "lru", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.lru: OrderedDict[TemplateKey, Template] = OrderedDict()
        self.bytes = _EXPORTER_SIZE


class TemplateCache:
    """Templates by (format, exporter, domain, template id), bounded in count and bytes,
    learned at a bounded rate, evicted fairly.

    Work: an identical re-announcement is recognised by comparing bytes with the cached
    template's wire form (:meth:`refresh`) and costs no compile. A new or changed template
    must be :meth:`admit`-ted first: at most ``max_templates_per_datagram`` per datagram,
    one token from its exporter's bucket and ``TEMPLATE_WORK + len(fields)`` from the bucket
    shared by all exporters. A dropped change also removes the stale template it was meant
    to replace, so data is held for the new one instead of being decoded with the old
    layout.

    Memory: each template is charged its :attr:`Template.footprint` plus the cache's entry.
    A domain or an exporter over its own cap gives up its own least recently used template;
    when the whole cache is over ``max_templates`` or ``max_template_bytes``, the exporter
    holding the most (bytes, or templates at the cache's average size, whichever is more)
    gives up its least recently used one. So one source's churn evicts its own templates and
    never another exporter's while it holds more than they do.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._exporters: dict[str, _ExporterTemplates] = {}
        self._domains: dict[tuple[str, str, int], set[int]] = {}
        # (-weight, exporter): a max-heap of exporters by weight, updated lazily (an entry
        # is valid while it matches the exporter's current weight).
        self._heap: list[tuple[int, str]] = []
        self._unit = max(1, limits.max_template_bytes // limits.max_templates)
        self._count = 0
        #: Estimated bytes held (what max_template_bytes caps).
        self.bytes = 0
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._work_bucket: _Bucket | None = None
        self._datagram: object = None
        self._datagram_learned = 0
        self.learned = 0
        self.updated = 0
        self.refreshed = 0
        self.withdrawn = 0
        self.evicted_by = dict.fromkeys(EVICTION_REASONS, 0)
        self.dropped_by = dict.fromkeys(DROP_REASONS, 0)

    def __len__(self) -> int:
        return self._count

    @property
    def evicted(self) -> int:
        return sum(self.evicted_by.values())

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by.values())

    def get(self, key: TemplateKey) -> Template | None:
        entry = self._exporters.get(key[1])
        if entry is None:
            return None
        template = entry.lru.get(key)
        if template is not None:
            entry.lru.move_to_end(key)
        return template

    def exporter_lru(self, exporter: str) -> OrderedDict[TemplateKey, Template] | None:
        """The exporter's templates, least recently used first (None without any), for the
        array decoder (``template_batch``), which checks a whole datagram before it changes
        anything: ``.get(key)`` looks a template up without touching its recency (unlike
        :meth:`get`), ``.move_to_end(key)`` then does what :meth:`get` would have done.
        Nothing else may be changed through it."""
        entry = self._exporters.get(exporter)
        return None if entry is None else entry.lru

    def keys(self) -> list[TemplateKey]:
        return [key for entry in self._exporters.values() for key in entry.lru]

    def __iter__(self) -> Iterator[TemplateKey]:
        return iter(self.keys())

    def exporter_templates(self, exporter: str) -> int:
        """Templates held for one exporter address."""
        entry = self._exporters.get(exporter)
        return 0 if entry is None else len(entry.lru)

    # -- learning ---------------------------------------------------------------------------

    def refresh(
        self, key: TemplateKey, data: bytes, start: int, end: int, *, is_options: bool
    ) -> int:
        """If ``data[start:]`` begins with the cached template's exact wire form (and it
        fits before ``end``), count a refresh and return that length; else 0.

        A template record is self-delimiting, so equal leading bytes are the same record:
        no parse, no compile.
        """
        entry = self._exporters.get(key[1])
        if entry is None:
            return 0
        template = entry.lru.get(key)
        if template is None or template.is_options != is_options:
            return 0
        wire = template.wire
        if not wire or start + len(wire) > end or not data.startswith(wire, start):
            return 0
        entry.lru.move_to_end(key)
        self.refreshed += 1
        return len(wire)

    def admit(self, key: TemplateKey, fields: int, now: float, datagram: object) -> bool:
        """May a new or changed template of ``fields`` fields be compiled now? Consumes
        tokens if so; counts the reason and drops the stale template if not. ``datagram``
        identifies the datagram being decoded (any value that changes between datagrams)."""
        limits = self._limits
        if datagram != self._datagram:
            self._datagram = datagram
            self._datagram_learned = 0
        if self._datagram_learned >= limits.max_templates_per_datagram:
            return self.refuse(key, "datagram_cap")
        exporter = key[1]
        bucket = self._buckets.get(exporter)
        if bucket is None:
            bucket = self._buckets[exporter] = _Bucket(float(limits.template_learn_burst), now)
            if len(self._buckets) > limits.max_template_exporters:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(exporter)
        if bucket.refill(now, limits.template_learn_rate_per_s, limits.template_learn_burst) < 1:
            return self.refuse(key, "exporter_rate")
        total = self._work_bucket
        if total is None:
            total = self._work_bucket = _Bucket(float(limits.template_work_burst), now)
        cost = TEMPLATE_WORK + fields
        rate, burst = limits.template_work_rate_per_s, limits.template_work_burst
        if total.refill(now, rate, burst) < cost:
            return self.refuse(key, "total_rate")
        bucket.tokens -= 1
        total.tokens -= cost
        self._datagram_learned += 1
        return True

    def refuse(self, key: TemplateKey, reason: str) -> bool:
        """Count an announcement not learned; the template it would have replaced goes
        (the exporter said it changed). Returns False, for ``return cache.refuse(...)``."""
        self.dropped_by[reason] += 1
        entry = self._exporters.get(key[1])
        if entry is not None and key in entry.lru:
            self._remove(entry, key, "superseded")
        return False

    def add(self, key: TemplateKey, template: Template) -> bool:
        """Store a template; return True if it is new or changed (data may be replayed)."""
        fmt, exporter, domain, template_id = key
        entry = self._exporters.get(exporter)
        if entry is None:
            entry = self._exporters[exporter] = _ExporterTemplates(exporter)
            self.bytes += entry.bytes
        # Keys share the entry's exporter string (each datagram brings its own copy).
        key = (fmt, entry.name, domain, template_id)
        charge = template.footprint + _ENTRY_SIZE
        old = entry.lru.get(key)
        if old is not None:
            entry.lru.move_to_end(key)
            if old.wire == template.wire and old.is_options == template.is_options:
                self.refreshed += 1  # keep the compiled one
                return False
            entry.lru[key] = template
            delta = charge - old.footprint - _ENTRY_SIZE
            entry.bytes += delta
            self.bytes += delta
            self.updated += 1
        else:
            domain_key = (fmt, entry.name, domain)
            ids = self._domains.get(domain_key)
            if ids is None:
                ids = self._domains[domain_key] = set()
                entry.bytes += _DOMAIN_SIZE
                self.bytes += _DOMAIN_SIZE
            ids.add(template_id)
            entry.lru[key] = template
            entry.bytes += charge
            self.bytes += charge
            self._count += 1
            self.learned += 1
            limits = self._limits
            while len(ids) > limits.max_templates_per_domain:
                oldest = next(k for k in entry.lru if k[:3] == domain_key and k != key)
                self._remove(entry, oldest, "domain_cap")
            while len(entry.lru) > limits.max_templates_per_exporter:
                oldest = next(k for k in entry.lru if k != key)
                self._remove(entry, oldest, "exporter_cap")
        self._push(entry)
        self._fit()
        return True

    def _fit(self) -> None:
        """Evict until the cache is within its count and byte caps, fairly."""
        limits = self._limits
        while self._count > limits.max_templates or (
            self.bytes > limits.max_template_bytes and self._count
        ):
            reason = "count" if self._count > limits.max_templates else "bytes"
            victim = self._biggest()
            self._remove(victim, next(iter(victim.lru)), reason)

    def _weight(self, entry: _ExporterTemplates) -> int:
        return max(entry.bytes, len(entry.lru) * self._unit)

    def _push(self, entry: _ExporterTemplates) -> None:
        heap = self._heap
        heapq.heappush(heap, (-self._weight(entry), entry.name))
        if len(heap) > 2 * len(self._exporters) + 64:
            # Stale entries pile up with every change: rebuild from the live exporters.
            heap[:] = [(-self._weight(e), e.name) for e in self._exporters.values()]
            heapq.heapify(heap)

    def _biggest(self) -> _ExporterTemplates:
        heap = self._heap
        while True:
            weight, name = heap[0]
            entry = self._exporters.get(name)
            if entry is not None and -weight == self._weight(entry):
                return entry
            heapq.heappop(heap)

    def _remove(self, entry: _ExporterTemplates, key: TemplateKey, reason: str | None) -> None:
        template = entry.lru.pop(key)
        charge = template.footprint + _ENTRY_SIZE
        entry.bytes -= charge
        self.bytes -= charge
        self._count -= 1
        if reason is not None:
            self.evicted_by[reason] += 1
        domain_key = key[:3]
        ids = self._domains[domain_key]
        ids.discard(key[3])
        if not ids:
            del self._domains[domain_key]
            entry.bytes -= _DOMAIN_SIZE
            self.bytes -= _DOMAIN_SIZE
        if entry.lru:
            self._push(entry)
        else:
            del self._exporters[entry.name]
            self.bytes -= entry.bytes
            # Its heap entries are stale now and go when they reach the top.

    # -- withdrawal (IPFIX, RFC 7011 §8.1) ----------------------------------------------------

    def withdraw(self, key: TemplateKey) -> None:
        entry = self._exporters.get(key[1])
        if entry is not None and key in entry.lru:
            self._remove(entry, key, None)
            self.withdrawn += 1

    def withdraw_all(self, fmt: str, exporter: str, domain: int, *, options: bool) -> None:
        """Only the domain's own templates are visited, so a datagram full of withdrawals
        costs no more than the templates it removes."""
        entry = self._exporters.get(exporter)
        ids = self._domains.get((fmt, exporter, domain))
        if entry is None or not ids:
            return
        doomed = [
            key
            for key in ((fmt, exporter, domain, i) for i in ids)
            if entry.lru[key].is_options == options
        ]
        for key in doomed:
            self._remove(entry, key, None)
        self.withdrawn += len(doomed)


# -- data held until its template arrives ----------------------------------------------------


class PendingSet(NamedTuple):
    key: TemplateKey
    body: bytes
    ctx: SetContext
    arrived: float


class _HeldFor:
    """One exporter's share of the pending buffer."""

    __slots__ = ("bytes", "ready", "sets")

    def __init__(self) -> None:
        #: Its held sets, oldest first (for its own cap).
        self.sets: OrderedDict[int, None] = OrderedDict()
        #: Those of them whose template has arrived, waiting for a replay budget.
        self.ready: dict[int, None] = {}
        self.bytes = 0


class PendingBuffer:
    """Data sets whose template is unknown, bounded by count, bytes and age (oldest go
    first), in all and per exporter address.

    A held set is *waiting* until its template arrives, then *ready*: the decoder replays
    ready sets as its per-datagram budget allows (:meth:`ready`, :meth:`pop`), in arrival
    order, and what the budget leaves stays held (capped and aged like the rest) for the
    exporter's next datagram.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._sets: OrderedDict[int, PendingSet] = OrderedDict()
        #: Waiting sets by key, in arrival order.
        self._by_key: dict[TemplateKey, list[int]] = {}
        self._exporters: dict[str, _HeldFor] = {}
        self._next = 0
        self.bytes = 0
        self.held = 0
        self.replayed = 0
        self.dropped_evicted = 0
        self.dropped_expired = 0
        self.dropped_too_large = 0
        self.dropped_exporter_cap = 0
        #: Held options data over a datagram's replay budget (counted by the decoder).
        self.dropped_replay_cap = 0

    def __len__(self) -> int:
        return len(self._sets)

    def exporter_sets(self, exporter: str) -> int:
        """Sets held for one exporter address (waiting and ready)."""
        mine = self._exporters.get(exporter)
        return 0 if mine is None else len(mine.sets)

    def exporter_bytes(self, exporter: str) -> int:
        mine = self._exporters.get(exporter)
        return 0 if mine is None else mine.bytes

    def hold(self, key: TemplateKey, body: bytes, ctx: SetContext, now: float) -> None:
        limits = self._limits
        size = len(body)
        if size > min(limits.max_pending_bytes, limits.max_pending_bytes_per_exporter):
            self.dropped_too_large += 1
            return
        exporter = key[1]
        mine = self._exporters.get(exporter)
        # The exporter's own oldest go first, so one source never evicts another's data
        # beyond its share; then the buffer's oldest, whoever held them.
        while mine is not None and (  # an exporter holding nothing has no entry
            len(mine.sets) >= limits.max_pending_sets_per_exporter
            or mine.bytes + size > limits.max_pending_bytes_per_exporter
        ):
            self._drop(next(iter(mine.sets)))
            self.dropped_exporter_cap += 1
            mine = self._exporters.get(exporter)
        while self._sets and (
            len(self._sets) >= limits.max_pending_sets
            or self.bytes + size > limits.max_pending_bytes
        ):
            self._drop(next(iter(self._sets)))
            self.dropped_evicted += 1
        ident = self._next
        self._next += 1
        self._sets[ident] = PendingSet(key, body, ctx, now)
        self._by_key.setdefault(key, []).append(ident)
        mine = self._exporters.get(exporter)
        if mine is None:
            mine = self._exporters[exporter] = _HeldFor()
        mine.sets[ident] = None
        mine.bytes += size
        self.bytes += size
        self.held += 1

    def _drop(self, ident: int) -> PendingSet:
        """Remove one held set, waiting or ready, from every index."""
        entry = self._sets.pop(ident)
        size = len(entry.body)
        self.bytes -= size
        exporter = entry.key[1]
        mine = self._exporters[exporter]
        del mine.sets[ident]
        mine.bytes -= size
        if ident in mine.ready:
            del mine.ready[ident]
        else:  # still waiting for its template
            idents = self._by_key[entry.key]
            idents.remove(ident)
            if not idents:
                del self._by_key[entry.key]
        if not mine.sets:
            del self._exporters[exporter]
        return entry

    def expire(self, now: float) -> None:
        horizon = now - self._limits.pending_max_age_s
        while self._sets:
            entry = next(iter(self._sets.values()))
            # A clock that went backwards (pcap replay of several files) must not pin data.
            if horizon < entry.arrived <= now + self._limits.pending_max_age_s:
                break
            self._drop(next(iter(self._sets)))
            self.dropped_expired += 1

    def take(self, key: TemplateKey) -> list[PendingSet]:
        """Remove and return the sets waiting for ``key``, oldest first."""
        idents = self._by_key.pop(key, None)
        if not idents:
            return []
        # Marked ready first: _drop then leaves _by_key (already popped) alone.
        self._release(key, idents)
        return [self._drop(ident) for ident in sorted(idents)]

    def release(self, key: TemplateKey) -> None:
        """``key``'s template has arrived: its waiting sets become ready."""
        idents = self._by_key.pop(key, None)
        if idents:
            self._release(key, idents)

    def _release(self, key: TemplateKey, idents: list[int]) -> None:
        ready = self._exporters[key[1]].ready
        for ident in idents:
            ready[ident] = None

    def ready(self, exporter: str) -> list[tuple[int, PendingSet]]:
        """The exporter's ready sets, oldest first (at most max_pending_sets_per_exporter)."""
        mine = self._exporters.get(exporter)
        if mine is None or not mine.ready:
            return []
        return [(ident, self._sets[ident]) for ident in sorted(mine.ready)]

    def pop(self, ident: int) -> PendingSet:
        """Remove a ready set to replay it."""
        self.replayed += 1
        return self._drop(ident)

    def wait_again(self, ident: int) -> None:
        """A ready set whose template went (evicted, withdrawn) before its replay waits for
        the template again."""
        entry = self._sets[ident]
        del self._exporters[entry.key[1]].ready[ident]
        idents = self._by_key.setdefault(entry.key, [])
        idents.append(ident)
        idents.sort()


# -- sampling and system init time announced in options data -----------------------------------


class _DomainInfo:
    __slots__ = ("interval", "samplers", "system_init_ms")

    def __init__(self) -> None:
        self.interval: int | None = None
        self.samplers: OrderedDict[int, int] = OrderedDict()
        self.system_init_ms: int | None = None


class SamplingTable:
    """What each (format, exporter, domain) announced in options data, bounded (LRU)."""

    def __init__(self, max_entries: int, max_samplers: int) -> None:
        self._max = max_entries
        self._max_samplers = max_samplers
        self._domains: OrderedDict[tuple[str, str, int], _DomainInfo] = OrderedDict()
        self.evicted = 0
        self.updates = 0

    def __len__(self) -> int:
        return len(self._domains)

    def _entry(self, key: tuple[str, str, int]) -> _DomainInfo:
        info = self._domains.get(key)
        if info is None:
            info = self._domains[key] = _DomainInfo()
            while len(self._domains) > self._max:
                self._domains.popitem(last=False)
                self.evicted += 1
        else:
            self._domains.move_to_end(key)
        return info

    def learn(self, fmt: str, exporter: str, domain: int, values: Mapping[int, Value]) -> bool:
        """Apply one options data record; False if it announced sampling out of range (then
        it changes no interval, and the caller counts the defect)."""
        interval = interval_from_elements(values)
        valid = interval is not None or not announces_sampling(values)
        init = values.get(IE_SYSTEM_INIT_MS)
        if interval is None and not isinstance(init, int):
            return valid
        info = self._entry((fmt, exporter, domain))
        if isinstance(init, int):
            info.system_init_ms = init
        if interval is not None:
            self.updates += 1
            # The latest announcement is also the domain default: records that do not name
            # their sampler get the interval the domain announced last.
            info.interval = interval
            sampler = _sampler_of(values)
            if sampler is not None:
                info.samplers[sampler] = interval
                info.samplers.move_to_end(sampler)
                while len(info.samplers) > self._max_samplers:
                    info.samplers.popitem(last=False)
        return valid

    def announced(
        self, fmt: str, exporter: str, domain: int, sampler: int | None = None
    ) -> int | None:
        info = self._domains.get((fmt, exporter, domain))
        if info is None:
            return None
        if sampler is not None:
            interval = info.samplers.get(sampler)
            if interval is not None:
                return interval
        return info.interval

    def system_init_ms(self, fmt: str, exporter: str, domain: int) -> int | None:
        info = self._domains.get((fmt, exporter, domain))
        return None if info is None else info.system_init_ms


# -- addresses -----------------------------------------------------------------------------


def address_cache(size: int) -> Callable[[bytes], IPv4Address | IPv6Address]:
    """A bounded memo of 4- and 16-byte address values (flows repeat addresses)."""
    cache: dict[bytes, IPv4Address | IPv6Address] = {}

    def address(raw: bytes) -> IPv4Address | IPv6Address:
        found = cache.get(raw)
        if found is not None:
            return found
        if len(cache) >= size:
            cache.clear()
        value: IPv4Address | IPv6Address
        if len(raw) == 4:
            value = IPv4Address(raw)
        elif len(raw) == 16:
            value = IPv6Address(raw)
        else:  # the flow plan only maps 4- and 16-byte fields
            raise MalformedError(f"address of {len(raw)} bytes")
        cache[raw] = value
        return value

    return address
