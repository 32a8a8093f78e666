"""NetFlow v9 (RFC 3954): header, template and options template flowsets, data flowsets.

The header's ``count`` is *not* used to stop parsing: RFC 3954 defines it as the number of
records (templates plus data) in the packet, and exporters disagree about it (softflowd puts
the flow count there, tshark 4.0 then misses records). We walk flowsets until the end of the
datagram, each bounded by its own length; a flowset that fails, or a tail that is no flowset
(zero padding), is counted and the rest kept (:mod:`overflowd.wire.walk`).

Pure: no I/O.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from overflowd.wire.reader import Reader, WireDecodeError
from overflowd.wire.templates import FieldSpec, SetContext, Template, TemplateKey
from overflowd.wire.walk import Walk

if TYPE_CHECKING:
    from overflowd.wire.dispatch import DecoderState

__all__ = ["FORMAT", "HEADER", "decode"]

FORMAT = "netflow-v9"

#: version, count, sysUpTime (ms), UNIX secs, sequence, source id.
HEADER = struct.Struct("!HHIIII")

TEMPLATE_FLOWSET = 0
OPTIONS_TEMPLATE_FLOWSET = 1
FIRST_DATA_FLOWSET = 256

#: template id, field count; options: template id, scope length, option length (bytes).
_TEMPLATE_HEADER = struct.Struct("!HH")
_OPTIONS_HEADER = struct.Struct("!HHH")


def decode(data: bytes, exporter: str, state: DecoderState, now: float) -> list[Any]:
    r = Reader(data, fmt=FORMAT, exporter=exporter)
    version, _count, uptime, unix_secs, _sequence, source_id = r.unpack(HEADER, "header")
    if version != 9:
        raise r.malformed(f"version {version} is not 9", offset=0)
    ctx = SetContext(FORMAT, exporter, source_id, unix_secs * 1000, uptime)
    records: list[Any] = []
    walk = Walk(FORMAT)
    end = len(data)
    # Each flowset is bounded by its own length and decoded on its own (walk.py): one that
    # fails loses only itself; a tail that is no flowset (Palo Alto and Cisco ACI pad the
    # datagram with zeros) ends the walk. Flowsets are 4-byte aligned, so fewer than 4 bytes
    # left can only be padding.
    while r.remaining() >= 4:
        start = r.offset
        flowset_id = r.u16()
        length = r.u16()
        if length < 4:
            short = r.malformed(f"flowset length {length} < 4", offset=start + 2)
            walk.tail(data, start, end, "trailing_bytes", short)
            break
        if length - 4 > r.remaining():
            walk.tail(data, start, end, "flowset_truncated", r.truncated("flowset", length - 4))
            break
        body = r.sub(length - 4, "flowset")
        try:
            if flowset_id == TEMPLATE_FLOWSET:
                _templates(body, ctx, state, now, records)
            elif flowset_id == OPTIONS_TEMPLATE_FLOWSET:
                _options_templates(body, ctx, state, now, records)
            elif flowset_id >= FIRST_DATA_FLOWSET:
                state.data_set(flowset_id, body, ctx, now, records)
            else:
                state.count("netflow-v9.reserved_flowsets")
        except WireDecodeError as exc:
            walk.failed("flowset", exc)
            continue
        walk.kept += 1
    else:
        if r.remaining():
            walk.tail(data, r.offset, end, "trailing_bytes", r.malformed("bytes after flowsets"))
    walk.finish(state, records)
    # Held data whose template has arrived (in this datagram or an earlier one of the exporter) is
    # replayed only now: after the options data of the datagram has announced its sampling, and
    # only if the datagram was not refused (what is not replayed stays held).
    state.replay_deferred(exporter, records)
    return records


def _templates(r: Reader, ctx: SetContext, state: DecoderState, now: float, out: list[Any]) -> None:
    cache = state.templates
    limits = state.limits
    data = r.data
    end = r.offset + r.remaining()  # this set's end
    serial = state.datagram_serial
    while r.remaining() >= 4:
        start = r.offset
        template_id, field_count = r.unpack(_TEMPLATE_HEADER, "template header")
        if template_id < FIRST_DATA_FLOWSET:
            raise r.malformed(f"template id {template_id} < 256", offset=start)
        if field_count * 4 > r.remaining():
            raise r.truncated("template fields", field_count * 4)
        key = _key(ctx, template_id)
        # A re-announcement (every refresh) is recognised by its bytes: no parse, no compile.
        known = cache.refresh(key, data, start, end, is_options=False)
        if known:
            r.skip(known - 4, "template fields")
            continue
        if field_count == 0:
            # Nothing to learn and nothing lost: skip it, not the datagram.
            cache.refuse(key, "no_fields")
            continue
        if field_count > limits.max_template_fields:
            state.count("templates.refused_too_many_fields")
            r.skip(field_count * 4, "template fields")
            cache.refuse(key, "too_many_fields")
            continue
        if not cache.admit(key, field_count, now, serial):
            r.skip(field_count * 4, "template fields")
            continue
        fields = []
        for _ in range(field_count):
            element = r.u16()
            length = r.u16()
            if length == 0:
                # Exporters send e.g. element 0 of length 0 as filler: it occupies no bytes
                # of a record, so the template is decodable as it stands.
                state.count("templates.zero_length_fields")
            fields.append(FieldSpec(element, length))
        _learn(
            state, key, Template(FORMAT, template_id, fields, wire=data[start : r.offset]), now, out
        )
    r.skip(r.remaining(), "padding")


def _options_templates(
    r: Reader, ctx: SetContext, state: DecoderState, now: float, out: list[Any]
) -> None:
    cache = state.templates
    limits = state.limits
    data = r.data
    end = r.offset + r.remaining()  # this set's end
    serial = state.datagram_serial
    # An options template record is 6 + 4n bytes; the flowset pads to 4 bytes, so fewer than
    # 6 bytes left is padding.
    while r.remaining() >= 6:
        start = r.offset
        template_id, scope_length, option_length = r.unpack(_OPTIONS_HEADER, "template header")
        if template_id < FIRST_DATA_FLOWSET:
            raise r.malformed(f"options template id {template_id} < 256", offset=start)
        if scope_length % 4 or option_length % 4:
            raise r.malformed("options template lengths not multiples of 4", offset=start + 2)
        size = scope_length + option_length
        if size > r.remaining():
            raise r.truncated("options template fields", size)
        key = _key(ctx, template_id)
        known = cache.refresh(key, data, start, end, is_options=True)
        if known:
            r.skip(known - 6, "options template fields")
            continue
        field_count = size // 4
        if field_count == 0:
            cache.refuse(key, "no_fields")
            continue
        if field_count > limits.max_template_fields:
            state.count("templates.refused_too_many_fields")
            r.skip(size, "options template fields")
            cache.refuse(key, "too_many_fields")
            continue
        if not cache.admit(key, field_count, now, serial):
            r.skip(size, "options template fields")
            continue
        fields = []
        scope_count = scope_length // 4
        for index in range(field_count):
            element = r.u16()
            length = r.u16()
            scope = index < scope_count
            if length == 0:
                # Juniper sends the System scope (type 1) with length 0: a scope with no
                # value, which RFC 3954 does not forbid and which costs no record bytes.
                state.count(
                    "templates.zero_length_scope_fields"
                    if scope
                    else "templates.zero_length_fields"
                )
            fields.append(FieldSpec(element, length, scope=scope))
        template = Template(
            FORMAT,
            template_id,
            fields,
            scope_count=scope_count,
            is_options=True,
            wire=data[start : r.offset],
        )
        _learn(state, key, template, now, out)
    r.skip(r.remaining(), "padding")


def _learn(
    state: DecoderState, key: TemplateKey, template: Template, now: float, out: list[Any]
) -> None:
    if template.fixed_length == 0:
        # Every field has length 0: records of no bytes carry nothing and cannot be counted.
        state.templates.refuse(key, "empty_record")
        return
    state.learn_template(key, template, now, out)


def _key(ctx: SetContext, template_id: int) -> TemplateKey:
    return (ctx.fmt, ctx.exporter, ctx.domain, template_id)
