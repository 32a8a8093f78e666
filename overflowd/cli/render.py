"""Rendering answers for people (a rich table) and scripts (JSON lines, CSV).

Every renderer takes the answer objects of `overflowd.answers` (the API's and ``--json``'s),
never store rows, so a local and a ``--remote`` answer print alike. Times shown are the
FLOW's (first seen, in UTC), not when this node stored the report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from overflowd.answers import PROTO_NAMES

#: Rich wraps to the terminal; into a pipe it would wrap at 80 columns and cut addresses.
PIPE_WIDTH = 500


def json_lines(objects: Iterable[dict[str, Any]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    for obj in objects:
        out.write(json.dumps(obj, separators=(", ", ": ")) + "\n")
    out.flush()


def printable(text: str) -> str:
    """``text`` with control and format characters (ESC, BEL, C1, bidi overrides) written as
    ``\\xNN``/``\\uNNNN``: an observer's contacts and point, and a node's whole answer, are
    an attacker's text, and a terminal obeys ESC ] 52 (clipboard), ESC [ 2 J and the like."""
    if text.isprintable():
        return text
    return "".join(
        c if unicodedata.category(c) not in ("Cc", "Cf") else ascii(c)[1:-1] for c in text
    )


#: Numeric columns are right-aligned.
_NUMERIC = ("PACKETS", "BYTES", "REPORTS", "DUR", "SPORT", "DPORT", "P")


def _plain_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str | None:
    """The table as rich writes it into a pipe (no box, columns two spaces apart, numbers to
    the right, each line's trailing blanks cut), without importing rich (a tenth of a second
    of every ``overflowd-query reports | grep``: issue #16); None where only rich would get it
    right: a cell that is not printable ASCII (its widths are rich's business) or a table
    wider than PIPE_WIDTH (rich cuts it)."""
    cells = [list(columns), *(list(r) for r in rows)]
    if any(not (c.isascii() and c.isprintable()) for row in cells for c in row):
        return None
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    if sum(widths) + 2 * (len(widths) - 1) > PIPE_WIDTH:
        return None
    right = [name in _NUMERIC for name in columns]
    return "".join(
        "  ".join(
            # rich strips a right-aligned cell's trailing blanks, then aligns it
            c.rstrip().rjust(w) if r else c.ljust(w)
            for c, w, r in zip(row, widths, right, strict=True)
        ).rstrip()
        + "\n"
        for row in cells
    )


def _table(columns: Sequence[str], rows: Iterable[Sequence[str]], out: TextIO) -> None:
    tty = out.isatty()
    if not tty:
        escaped = [[printable(cell) for cell in row] for row in rows]
        plain = _plain_table(columns, escaped)
        if plain is not None:
            out.write(plain)
            out.flush()
            return
        rows = escaped
    _rich_table(columns, rows, out, tty)


def _rich_table(
    columns: Sequence[str], rows: Iterable[Sequence[str]], out: TextIO, tty: bool
) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Into a pipe: no colours, no rules, no padding after the last column (grep, cut, awk).
    console = Console(
        file=out if tty else io.StringIO(), width=None if tty else PIPE_WIDTH, highlight=False
    )
    table = Table(box=box.SIMPLE_HEAD if tty else None, show_edge=False, pad_edge=False)
    for name in columns:
        numeric = name in _NUMERIC
        table.add_column(name, justify="right" if numeric else "left", no_wrap=True)
    for row in rows:
        # Text, not str: rich reads a str as markup ("[/x]" raised MarkupError, "[link=...]"
        # made a hidden link)
        table.add_row(*(Text(printable(cell)) for cell in row))
    if tty:
        console.print(table)
        return
    with console.capture() as captured:
        console.print(table)
    out.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    out.flush()


def _time(rfc3339: str) -> str:
    """'2007-11-14 22:13:19' for people (UTC, whole seconds)."""
    return rfc3339[:19].replace("T", " ")


def _proto(number: int) -> str:
    return PROTO_NAMES.get(number, str(number))


def _count(value: float | None) -> str:
    """An estimate for people: 3 significant digits with k/M/G (nfdump's way); None (JSON's
    unbounded) is 'inf'."""
    if value is None or not math.isfinite(value):
        return "inf"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _interval(est: dict[str, Any]) -> str:
    """'12.3k (8.1k-18.0k)' from an Interval's JSON; an unbounded end is '∞'."""
    high = est["high"]
    return (
        f"{_count(est['estimate'])} ({_count(est['low'])}-{_count(high)})"
    )


# -- reports ----------------------------------------------------------------------------------

REPORT_COLUMNS = (
    "FLOW START (UTC)", "DUR", "SRC", "SPORT", "DST", "DPORT", "PROTO", "PACKETS", "BYTES",
    "P", "KIND", "OBSERVER", "TRUST", "ID",
)  # fmt: skip
REPORT_CSV = (
    "first", "last", "src", "sport", "dst", "dport", "proto", "packets", "bytes",
    "probability", "interval", "kind", "observer", "trust", "via", "received", "seq", "id",
)  # fmt: skip


def _report_cells(obj: dict[str, Any]) -> list[str]:
    r = obj["report"]
    fl = r["flow"]
    duration_s = max(0, fl["last_ms"] - fl["first_ms"]) / 1000
    return [
        _time(fl["first"]),
        f"{duration_s:.0f}s" if duration_s >= 1 else f"{duration_s:.1f}s",
        fl["src"],
        str(fl["sport"]),
        fl["dst"],
        str(fl["dport"]),
        _proto(fl["proto"]),
        str(fl["packets"]),
        str(fl["bytes"]),
        f"{r['sampling']['probability']:.3g}",
        r["kind"],
        r["observer"]["fingerprint"],
        obj["trust"] or ("own" if obj["via"] == "local" else "-"),
        r["id"][:12],
    ]


def reports_table(objects: Sequence[dict[str, Any]], out: TextIO | None = None) -> None:
    _table(REPORT_COLUMNS, (_report_cells(o) for o in objects), out or sys.stdout)


def report_line(obj: dict[str, Any]) -> str:
    """One report as one line of fixed columns, for --follow (a table cannot stream)."""
    c = [printable(cell) for cell in _report_cells(obj)]
    return (
        f"{c[0]}  {c[1]:>5}  {c[2] + ':' + c[3]:>41} > {c[4] + ':' + c[5]:<41} {c[6]:<5} "
        f"{c[7]:>10} {c[8]:>12}  p={c[9]:<7} {c[10]} {c[11]} {c[12]} {c[13]}"
    )


def reports_csv(objects: Iterable[dict[str, Any]], out: TextIO | None = None) -> None:
    csv.writer(out or sys.stdout, lineterminator="\n").writerow(REPORT_CSV)
    reports_csv_rows(objects, out)


def reports_csv_rows(objects: Iterable[dict[str, Any]], out: TextIO | None = None) -> None:
    """Rows without the header (--follow goes on under the first answer's header)."""
    stream = out or sys.stdout
    writer = csv.writer(stream, lineterminator="\n")
    for obj in objects:
        r = obj["report"]
        fl, s = r["flow"], r["sampling"]
        writer.writerow(
            [
                fl["first"], fl["last"], fl["src"], fl["sport"], fl["dst"], fl["dport"],
                fl["proto"], fl["packets"], fl["bytes"], s["probability"], s["interval"],
                r["kind"], r["observer"]["key"], obj["trust"] or "", obj["via"],
                obj["received"], obj["seq"], r["id"],
            ]
        )  # fmt: skip
    stream.flush()


# -- who ---------------------------------------------------------------------------------------

WHO_COLUMNS = (
    "OBSERVER", "POINT", "TRUST", "CONTACTS", "REPORTS", "PACKETS (95%)", "BYTES (95%)",
    "FIRST SEEN", "LAST SEEN", "TOP SOURCES", "CONTACTS FROM DNS",
)  # fmt: skip
WHO_CSV = (
    "observer", "fingerprint", "point", "trust", "contacts", "reports",
    "packets", "packets_low", "packets_high", "bytes", "bytes_low", "bytes_high",
    "first", "last", "top_sources", "dns_contacts",
)  # fmt: skip


def who_table(objects: Sequence[dict[str, Any]], out: TextIO | None = None) -> None:
    rows = (
        [
            o["observer"]["fingerprint"],
            o["observer"]["point"] or "-",
            o["trust"] or "-",
            " ".join(o["contacts"]) or "-",
            str(o["reports"]),
            _interval(o["packets"]),
            _interval(o["bytes"]),
            _time(o["first"]),
            _time(o["last"]),
            " ".join(
                f"{s['prefix']}({_count(s['packets']['estimate'])})" for s in o["top_sources"]
            )
            or "-",
            _dns_contacts(o.get("registry")) or "-",
        ]
        for o in objects
    )
    _table(WHO_COLUMNS, rows, out or sys.stdout)


def _dns_contacts(registry: Sequence[dict[str, Any]] | None) -> str:
    """'192.0.2.0/24 mailto:noc@... abuse@...; 2001:db8::/48 (timeout)': per network, the
    record's contacts (only if it names the observer's key), then the abuse zones'."""
    cells = []
    for r in registry or ():
        contacts = [*r["contacts"], *(c for c in r["abuse_contacts"] if c not in r["contacts"])]
        note = f" ({r['error']})" if r["error"] else ""
        cells.append(f"{r['network']} {' '.join(contacts) or '-'}{note}")
    return "; ".join(cells)


#: What a spreadsheet reads as a formula at the start of a cell (OWASP "CSV injection").
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_text(text: str) -> str:
    """An attacker's free text (an observer's contacts, point) for a CSV cell: a leading
    quote makes ``=cmd|' /C calc'!A0`` text in Excel and LibreOffice, not a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def _high(value: float | None) -> str:
    return "" if value is None else repr(value)


def who_csv(objects: Iterable[dict[str, Any]], out: TextIO | None = None) -> None:
    writer = csv.writer(out or sys.stdout, lineterminator="\n")
    writer.writerow(WHO_CSV)
    for o in objects:
        p, b = o["packets"], o["bytes"]
        writer.writerow(
            [
                o["observer"]["key"], o["observer"]["fingerprint"],
                csv_text(o["observer"]["point"]), o["trust"] or "",
                csv_text(" ".join(o["contacts"])), o["reports"],
                p["estimate"], p["low"], _high(p["high"]), b["estimate"], b["low"],
                _high(b["high"]), o["first"], o["last"],
                " ".join(s["prefix"] for s in o["top_sources"]),
                csv_text(_dns_contacts(o.get("registry"))),
            ]
        )  # fmt: skip


# -- top ---------------------------------------------------------------------------------------

TOP_CSV = (
    "rank", "by", "key", "name", "reports", "packets", "packets_low", "packets_high",
    "bytes", "bytes_low", "bytes_high",
)  # fmt: skip


def top_table(objects: Sequence[dict[str, Any]], out: TextIO | None = None) -> None:
    by = objects[0]["by"] if objects else ""
    rows = (
        [
            "" if o["rank"] is None else str(o["rank"]),
            str(o["key"]) + (f" ({o['name']})" if o["name"] else ""),
            str(o["reports"]),
            _interval(o["packets"]),
            _interval(o["bytes"]),
        ]
        for o in objects
    )
    _table(
        ("#", by.upper() or "KEY", "REPORTS", "PACKETS (95%)", "BYTES (95%)"),
        rows,
        out or sys.stdout,
    )


def top_csv(objects: Iterable[dict[str, Any]], out: TextIO | None = None) -> None:
    writer = csv.writer(out or sys.stdout, lineterminator="\n")
    writer.writerow(TOP_CSV)
    for o in objects:
        p, b = o["packets"], o["bytes"]
        writer.writerow(
            [
                "" if o["rank"] is None else o["rank"], o["by"], o["key"], o["name"] or "",
                o["reports"], p["estimate"], p["low"], _high(p["high"]), b["estimate"],
                b["low"], _high(b["high"]),
            ]
        )  # fmt: skip
