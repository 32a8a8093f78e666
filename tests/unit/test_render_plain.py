"""The query CLI's tables into a pipe are written without rich where the cells are printable
ASCII (every report table: times, addresses, numbers, kinds, fingerprints): byte for byte what
rich writes, which stays the renderer for terminals and for any other text."""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

import pytest

from overflowd.cli import render


def rich_pipe(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = io.StringIO()
    render._rich_table(columns, rows, out, tty=False)
    return out.getvalue()


def plain(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = io.StringIO()  # not a tty: the plain writer's case
    render._table(columns, rows, out)
    return out.getvalue()


def cell(rng: random.Random) -> str:
    alphabet = "abcdef0123456789:.-/ ()[]=+'\"%*#"
    return "".join(rng.choice(alphabet) for _ in range(rng.choice((0, 1, 3, 12, 25))))


@pytest.mark.parametrize(
    "columns",
    [
        render.REPORT_COLUMNS,
        render.WHO_COLUMNS,
        ("#", "SRC", "REPORTS", "PACKETS (95%)", "BYTES (95%)"),
    ],
)
def test_plain_table_is_what_rich_writes(columns: Sequence[str]) -> None:
    rng = random.Random(7)  # fixed: the same tables every run
    for n_rows in (0, 1, 2, 5, 30):
        rows = [[cell(rng) for _ in columns] for _ in range(n_rows)]
        assert render._plain_table(columns, rows) is not None
        assert plain(columns, rows) == rich_pipe(columns, rows)


def test_rich_writes_what_is_not_printable_ascii_or_too_wide() -> None:
    columns = ("SRC", "CONTACTS")
    for rows in (
        [["192.0.2.1", "mailto:abuse@ex\u00e4mple.org"]],  # rich measures its width
        [["x" * 300, "y" * 300]],  # rich cuts it at PIPE_WIDTH
    ):
        assert render._plain_table(columns, rows) is None
        assert plain(columns, rows) == rich_pipe(columns, rows)
    # control characters are escaped first (render.printable), then written plainly
    assert plain(columns, [["a\x1b[2J", "\u200e"]]) == rich_pipe(
        columns, [["a\\x1b[2J", "\\u200e"]]
    )


def test_rich_syntax_blanks_and_escapes_are_written_as_rich_writes_them() -> None:
    """Cells an observer chooses that mean something to rich (markup, emoji codes, links) or
    sit at its edges (leading/trailing/only blanks, empty): printable ASCII, so written plainly,
    and byte for byte what rich writes; control characters never reach the output raw."""
    odd = [":smile:", "[bold]x[/]", "\\[x]", "[link=http://x]y", "  lead", "trail  ", "   ", ""]
    odd += ["a\x1b]52;c;ZXZpbA==\x07", "\u202eevil\x00\t\n\r", "\x9b2J"]
    columns = ("SRC", "P", "CONTACTS")
    for a in odd:
        for b in odd:
            rows = [[a, b, a], [b, a, b]]
            written = plain(columns, rows)
            assert written == rich_pipe(columns, rows)
            assert not any((ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) < 0xA0 for c in written)
            assert "\u202e" not in written
