"""Log lines for people (plain, the default) or for journald and log shippers (JSON lines).

``--log-format json`` writes one JSON object a line: ``time`` (RFC 3339, UTC, milliseconds),
``level``, ``logger``, ``message``, then the structured fields. The house style logs an event
name and ``key=value`` pairs (``daemon.stopping signal=SIGTERM``): those become ``event`` and
one field each, so a query never parses messages; ``extra=`` attributes are fields too. A
message may carry text from the network, so each line is bounded and escaped by ``json.dumps``
(no raw newline can forge a second line).
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


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "...(cut)"
        when = dt.datetime.fromtimestamp(record.created, dt.UTC)
        doc: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        m = _EVENT.match(message)
        if m:
            doc["event"] = m.group(1)
            for key, value in _FIELD.findall(message)[:MAX_FIELDS]:
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
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN))
    logging.basicConfig(level=level, handlers=[handler])
