"""Log lines for people (plain, the default) or for journald and log shippers (JSON lines).

``--log-format json`` writes one JSON object a line: ``time`` (RFC 3339, UTC, milliseconds),
``level``, ``logger``, ``message``, then the structured fields. The house style logs an event
name and ``key=value`` pairs (``daemon.stopping signal=SIGTERM``): those become ``event`` and
one field each, so a query never parses messages; ``extra=`` attributes are fields too. A
message may carry text from the network, so each line is bounded and escaped by ``json.dumps``
(no raw newline can forge a second line), and the fields are read from the record's
template, each argument only ever one field's whole value (a peer's text holding
``peer=evil`` is not a field). Plain lines escape control characters for the same reason.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from typing import Any, TextIO

FORMATS = ("plain", "json")
PLAIN = "%(asctime)s %(levelname)s %(name)s %(message)s"

#: Longest message kept whole in a JSON line; the rest is cut and marked.
MAX_MESSAGE_CHARS = 8192
#: ``key=value`` fields parsed out of one message at most.
MAX_FIELDS = 32

_BASE = ("time", "level", "logger", "message", "event")
_EVENT = re.compile(r"^([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+)(?=\s|$)")
_FIELD = re.compile(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_.]*)=(\S*)")
#: Attributes every LogRecord has: anything else on a record came from ``extra=``.
_RECORD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


#: One %-conversion of a logging template (a mapping key, flags, width, precision, type).
_SPEC = re.compile(r"%(\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[diouxXeEfFgGcrsa%]")
#: Stands for argument N in the template while its fields are parsed: no space, no "=".
_ARG = re.compile(r"\x00(\d+)\x00")
#: Longest field value kept whole (a value is an argument now, not a word of the message).
MAX_VALUE_CHARS = 1024
#: Escaped in plain lines: every control character and line separator (a network string's
#: newline would forge a second line).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _cut(text: str, limit: int) -> str:
    return text[:limit] + "...(cut)" if len(text) > limit else text


def _fields(record: logging.LogRecord) -> tuple[str | None, list[tuple[str, str]]]:
    """The event and ``key=value`` fields of the record's *template*: an argument is only ever
    a value (whole), so text from the network cannot add, hide or rename a field or the event.
    A template whose arguments cannot be matched to its conversions gives no fields."""
    msg, args = record.msg, record.args
    if not isinstance(msg, str):
        return None, []
    values: list[str] = []
    if args:
        if not isinstance(args, tuple):
            return None, []
        parts: list[str] = []
        pos = 0
        for m in _SPEC.finditer(msg):
            parts.append(msg[pos:m.start()])
            pos = m.end()
            if m.group(0) == "%%":
                parts.append("%")
                continue
            if m.group(1) or "*" in m.group(0) or len(values) >= len(args):
                return None, []
            try:
                values.append(m.group(0) % (args[len(values)],))
            except (TypeError, ValueError, OverflowError):
                return None, []
            parts.append(f"\x00{len(values) - 1}\x00")
        if len(values) != len(args):
            return None, []
        parts.append(msg[pos:])
        shadow = "".join(parts)
    else:
        shadow = msg  # logging does not %-format a record without arguments
    event = _EVENT.match(shadow)
    if not event:
        return None, []
    fields = [
        (key, _cut(_ARG.sub(lambda a: values[int(a.group(1))], value), MAX_VALUE_CHARS))
        for key, value in _FIELD.findall(shadow)[:MAX_FIELDS]
    ]
    return event.group(1), fields


class PlainFormatter(logging.Formatter):
    """``PLAIN``, the message bounded and its control characters escaped: one line a record
    (a traceback, which is ours, keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = _cut(record.message, MAX_MESSAGE_CHARS)
        record.message = _CONTROL.sub(lambda c: repr(c.group(0))[1:-1], message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = _cut(record.getMessage(), MAX_MESSAGE_CHARS)
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        doc: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        event, fields = _fields(record)
        if event is not None:
            doc["event"] = event
            for key, value in fields:
                if key not in _BASE:
                    doc.setdefault(key, value)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key not in _BASE:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


def configure(level: int, fmt: str = "plain", stream: TextIO | None = None) -> None:
    """The root logger's one handler, in ``fmt`` (``plain`` or ``json``); like
    ``logging.basicConfig``, nothing changes if the root logger has handlers already."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else PlainFormatter(PLAIN))
    logging.basicConfig(level=level, handlers=[handler])
