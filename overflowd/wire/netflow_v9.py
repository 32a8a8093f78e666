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
    # Data held for a template of this datagram is replayed only now, after the options data
    # of the datagram has announced its sampling.
    state.replay_deferred(records)
    walk.finish(state, records)
    return records


def _templates(r: Reader, ctx: SetContext, state: DecoderState, now: float, out: list[Any]) -> None:
    limits = state.limits
    while r.remaining() >= 4:
        start = r.offset
        template_id = r.u16()
        field_count = r.u16()
        if template_id < FIRST_DATA_FLOWSET:
            raise r.malformed(f"template id {template_id} < 256", offset=start)
        if field_count * 4 > r.remaining():
            raise r.truncated("template fields", field_count * 4)
        fields = []
        for _ in range(field_count):
            element = r.u16()
            length = r.u16()
            if length == 0:
                raise r.malformed(f"element {element} has length 0", offset=r.offset - 2)
            fields.append(FieldSpec(element, length))
        if field_count == 0:
            raise r.malformed("template without fields", offset=start)
        if field_count > limits.max_template_fields:
            state.count("templates.refused_too_many_fields")
            continue
        wire = r.data[start : r.offset]
        template = Template(FORMAT, template_id, fields, wire=wire)
        state.learn_template(_key(ctx, template_id), template, now, out)
    r.skip(r.remaining(), "padding")


def _options_templates(
    r: Reader, ctx: SetContext, state: DecoderState, now: float, out: list[Any]
) -> None:
    limits = state.limits
    # An options template record is 6 + 4n bytes; the flowset pads to 4 bytes, so fewer than
    # 6 bytes left is padding.
    while r.remaining() >= 6:
        start = r.offset
        template_id = r.u16()
        scope_length = r.u16()
        option_length = r.u16()
        if template_id < FIRST_DATA_FLOWSET:
            raise r.malformed(f"options template id {template_id} < 256", offset=start)
        if scope_length % 4 or option_length % 4:
            raise r.malformed("options template lengths not multiples of 4", offset=start + 2)
        fields = []
        with r.restrict_to(scope_length + option_length, "options template fields"):
            for index in range((scope_length + option_length) // 4):
                element = r.u16()
                length = r.u16()
                if length == 0:
                    raise r.malformed(f"field {element} has length 0", offset=r.offset - 2)
                fields.append(FieldSpec(element, length, scope=index < scope_length // 4))
        if not fields:
            raise r.malformed("options template without fields", offset=start)
        if len(fields) > limits.max_template_fields:
            state.count("templates.refused_too_many_fields")
            continue
        wire = r.data[start : r.offset]
        template = Template(
            FORMAT,
            template_id,
            fields,
            scope_count=scope_length // 4,
            is_options=True,
            wire=wire,
        )
        state.learn_template(_key(ctx, template_id), template, now, out)
    r.skip(r.remaining(), "padding")


def _key(ctx: SetContext, template_id: int) -> TemplateKey:
    return (ctx.fmt, ctx.exporter, ctx.domain, template_id)
