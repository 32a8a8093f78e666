"""IPFIX (RFC 7011) messages: header, template and options template sets (with withdrawal),
data sets, enterprise-specific and variable-length fields. A set that fails, or a tail that is
no set (zero padding), is counted and the rest of the message kept (:mod:`overflowd.wire.walk`).

Pure: no I/O.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from overflowd.wire.reader import Reader, TruncatedError, WireDecodeError
from overflowd.wire.templates import FieldSpec, SetContext, Template, TemplateKey
from overflowd.wire.walk import Walk

if TYPE_CHECKING:
    from overflowd.wire.dispatch import DecoderState

__all__ = ["FORMAT", "HEADER", "decode"]

FORMAT = "ipfix"

#: version, length, export time (s), sequence, observation domain id (RFC 7011 §3.1).
HEADER = struct.Struct("!HHIII")

TEMPLATE_SET = 2
OPTIONS_TEMPLATE_SET = 3
FIRST_DATA_SET = 256
ENTERPRISE_BIT = 0x8000

#: template id, field count (RFC 7011 §3.4.1).
_TEMPLATE_HEADER = struct.Struct("!HH")


def decode(data: bytes, exporter: str, state: DecoderState, now: float) -> list[Any]:
    outer = Reader(data, fmt=FORMAT, exporter=exporter)
    version, length, export_time, _sequence, domain = outer.unpack(HEADER, "message header")
    if version != 10:
        raise outer.malformed(f"version {version} is not 10", offset=0)
    if length < HEADER.size:
        raise outer.malformed(f"message length {length} < {HEADER.size}", offset=2)
    if length > len(data):
        raise TruncatedError(
            f"message length {length} but datagram has {len(data)} bytes",
            fmt=FORMAT,
            offset=2,
            exporter=exporter,
        )
    if length < len(data):
        # One message per UDP datagram (RFC 7011 §10.3.2); bytes after it are not IPFIX.
        state.defect(FORMAT, "trailing_bytes" if any(data[length:]) else "trailing_padding")
    r = Reader(data, fmt=FORMAT, exporter=exporter, start=HEADER.size, end=length)
    ctx = SetContext(FORMAT, exporter, domain, export_time * 1000, None)
    records: list[Any] = []
    walk = Walk(FORMAT)
    # Each set is bounded by its own length and decoded on its own (walk.py): one that fails
    # loses only itself; a tail that is no set (zeros after the last set: RFC 7011 §3.3.1 puts
    # padding inside sets, some exporters pad the message) ends the walk.
    while not r.at_end():
        start = r.offset
        if r.remaining() < 4:
            walk.tail(data, start, length, "trailing_bytes", r.truncated("set header", 4))
            break
        set_id = r.u16()
        set_length = r.u16()
        if set_length < 4:
            error = r.malformed(f"set length {set_length} < 4", offset=start + 2)
            walk.tail(data, start, length, "trailing_bytes", error)
            break
        if set_length - 4 > r.remaining():
            walk.tail(data, start, length, "set_truncated", r.truncated("set", set_length - 4))
            break
        body = r.sub(set_length - 4, "set")
        try:
            if set_id == TEMPLATE_SET:
                _templates(body, ctx, state, now, records, options=False)
            elif set_id == OPTIONS_TEMPLATE_SET:
                _templates(body, ctx, state, now, records, options=True)
            elif set_id >= FIRST_DATA_SET:
                state.data_set(set_id, body, ctx, now, records)
            else:
                # Set ids 0, 1 (NetFlow v9) and 4–255 are reserved (RFC 7011 §3.3.2).
                state.count("ipfix.reserved_sets")
        except WireDecodeError as exc:
            walk.failed("set", exc)
            continue
        walk.kept += 1
    walk.finish(state, records)
    # Held data whose template has arrived (in this message or an earlier one of the exporter) is
    # replayed only now: after the options data of the message has announced its sampling, and
    # only if the message was not refused (what is not replayed stays held).
    state.replay_deferred(exporter, records)
    return records


def _templates(
    r: Reader,
    ctx: SetContext,
    state: DecoderState,
    now: float,
    out: list[Any],
    *,
    options: bool,
) -> None:
    cache = state.templates
    limits = state.limits
    data = r.data
    end = r.offset + r.remaining()  # this set's end
    serial = state.datagram_serial
    # Every template record starts with 4 bytes; padding is shorter (RFC 7011 §3.3.1).
    while r.remaining() >= 4:
        start = r.offset
        template_id, field_count = r.unpack(_TEMPLATE_HEADER, "template header")
        if field_count == 0:
            # Withdrawal (RFC 7011 §8.1): the set's own id as template id withdraws all
            # templates of that kind for the domain.
            all_id = OPTIONS_TEMPLATE_SET if options else TEMPLATE_SET
            if template_id == all_id:
                cache.withdraw_all(FORMAT, ctx.exporter, ctx.domain, options=options)
            elif template_id >= FIRST_DATA_SET:
                cache.withdraw(_key(ctx, template_id))
            else:
                raise r.malformed(f"withdrawal of template id {template_id}", offset=start)
            continue
        if template_id < FIRST_DATA_SET:
            raise r.malformed(f"template id {template_id} < 256", offset=start)
        scope_count = 0
        if options:
            scope_count = r.u16()
            if not 1 <= scope_count <= field_count:
                raise r.malformed(
                    f"scope field count {scope_count} of {field_count} fields", offset=start + 4
                )
        # Each field specifier is at least 4 bytes: refuse impossible counts before looping.
        if field_count * 4 > r.remaining():
            raise r.truncated("template fields", field_count * 4)
        key = _key(ctx, template_id)
        # A re-announcement (every refresh) is recognised by its bytes: no parse, no compile.
        known = cache.refresh(key, data, start, end, is_options=options)
        if known:
            r.skip(known - (r.offset - start), "template fields")
            continue
        if field_count > limits.max_template_fields:
            state.count("templates.refused_too_many_fields")
            _skip_fields(r, field_count)
            cache.refuse(key, "too_many_fields")
            continue
        if not cache.admit(key, field_count, now, serial):
            _skip_fields(r, field_count)
            continue
        fields = []
        for _ in range(field_count):
            element = r.u16()
            length = r.u16()
            enterprise = 0
            if element & ENTERPRISE_BIT:
                element &= ~ENTERPRISE_BIT
                enterprise = r.u32()
            if length == 0:
                # A field that occupies no bytes of a record (exporters send element 0 of
                # length 0 as filler): the template is decodable as it stands.
                state.count("templates.zero_length_fields")
            fields.append(FieldSpec(element, length, enterprise))
        template = Template(
            FORMAT,
            template_id,
            fields,
            scope_count=scope_count,
            is_options=options,
            wire=data[start : r.offset],
        )
        if template.fixed_length == 0:
            # Every field has length 0: records of no bytes carry nothing and cannot be counted.
            cache.refuse(key, "empty_record")
            continue
        state.learn_template(key, template, now, out)
    r.skip(r.remaining(), "padding")


def _skip_fields(r: Reader, count: int) -> None:
    """Move past ``count`` field specifiers of a template not learned (4 bytes, 8 with the
    enterprise bit)."""
    for _ in range(count):
        element = r.u16()
        r.skip(6 if element & ENTERPRISE_BIT else 2, "field specifier")


def _key(ctx: SetContext, template_id: int) -> TemplateKey:
    return (ctx.fmt, ctx.exporter, ctx.domain, template_id)
