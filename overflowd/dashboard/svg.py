"""Server-rendered SVG charts: no JavaScript, no library, nothing fetched.

Every text that reaches a chart (a series name is an exporter address, an observer's
fingerprint) is escaped here. The charts are small (a few hundred points): a polyline per
series, stacked areas for the victim view, axes with a handful of labelled ticks.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from html import escape

#: Colour-blind friendly (Okabe-Ito), then greys.
PALETTE = (
    "#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000",
    "#777777", "#aaaaaa",
)  # fmt: skip
WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 22, 24


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def number(value: float | None) -> str:
    """A number for people: 1.23 k, 4.5 M; '-' for none."""
    if value is None or not math.isfinite(value):
        return "-" if value is None else "∞"
    for limit, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def _clock(t: float, span: float) -> str:
    # A flow "ending" past year 9999 (its observer's word, and anyone can sign) must not
    # make the chart a 500: such a time is labelled in seconds.
    try:
        when = dt.datetime.fromtimestamp(t, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return f"{t:.0f}"
    return when.strftime("%H:%M:%S" if span < 600 else "%H:%M" if span < 2 * 86400 else "%m-%d")


def _frame(title: str, unit: str, t0: float, t1: float, top: float) -> list[str]:
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(title)}" '
        'font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<text x="{LEFT}" y="14" font-weight="bold">{escape(title)}</text>',
        f'<text x="{WIDTH - RIGHT}" y="14" text-anchor="end" fill="#555">{escape(unit)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>',
    ]
    for i in range(5):
        value = top * i / 4
        y = TOP + h - h * i / 4
        out.append(f'<line x1="{LEFT}" x2="{LEFT + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(
            f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{escape(number(value))}</text>'
        )
    span = max(t1 - t0, 1e-9)
    for i in range(5):
        t = t0 + span * i / 4
        x = LEFT + w * i / 4
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        out.append(
            f'<text x="{x:.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">{_clock(t, span)}</text>'
        )
    return out


def _nice(top: float) -> float:
    if top <= 0 or not math.isfinite(top):
        return 1.0
    step = 10.0 ** math.floor(math.log10(top))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if top <= m * step:
            return m * step
    return 10 * step


def empty(title: str, why: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} 60" width="{WIDTH}" '
        f'height="60" font-family="sans-serif" font-size="11"><title>{escape(title)}</title>'
        f'<text x="{LEFT}" y="14" font-weight="bold">{escape(title)}</text>'
        f'<text x="{LEFT}" y="40" fill="#777">{escape(why)}</text></svg>'
    )


def line_chart(
    title: str, unit: str, lines: Sequence[tuple[str, Sequence[tuple[float, float | None]]]]
) -> str:
    """One polyline per (name, points); a None value breaks its line."""
    times = [t for _, pts in lines for t, _ in pts]
    values = [v for _, pts in lines for _, v in pts if v is not None and math.isfinite(v)]
    if len(set(times)) < 2:
        return empty(title, "not enough samples yet (one every 10 s)")
    t0, t1 = min(times), max(times)
    top = _nice(max(values, default=0.0))
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = _frame(title, unit, t0, t1, top)

    def xy(t: float, v: float) -> str:
        return f"{LEFT + w * (t - t0) / (t1 - t0):.1f},{TOP + h - h * min(v, top) / top:.1f}"

    for i, (_, pts) in enumerate(lines):
        runs: list[list[str]] = [[]]
        for t, v in pts:
            if v is None or not math.isfinite(v):
                runs.append([])
            else:
                runs[-1].append(xy(t, v))
        for run in runs:
            if len(run) >= 2:
                out.append(
                    f'<polyline fill="none" stroke="{color(i)}" stroke-width="1.5" '
                    f'points="{" ".join(run)}"/>'
                )
            elif len(run) == 1:
                x, y = run[0].split(",")
                out.append(f'<circle cx="{x}" cy="{y}" r="1.5" fill="{color(i)}"/>')
    out.append("</svg>")
    return "".join(out)


def stacked_chart(
    title: str,
    unit: str,
    times: Sequence[float],
    stacks: Sequence[tuple[str, Sequence[float]]],
    band: tuple[Sequence[float], Sequence[float | None]] | None = None,
    note: str = "",
) -> str:
    """Areas stacked in order (name, value per time) and the 95% band of the total (low,
    high per time; high None: unbounded, drawn to the top) as a dashed outline; ``note``
    (what is not drawn) under the title."""
    if not times or not stacks:
        return empty(title, note or "no reports match")
    t0, t1 = times[0], times[-1]
    if t1 <= t0:
        t1 = t0 + 1
    totals = [sum(s[1][i] for s in stacks) for i in range(len(times))]
    highs = [v for v in (band[1] if band else []) if v is not None and math.isfinite(v)]
    top = _nice(max([*totals, *highs], default=0.0))
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    out = _frame(title, unit, t0, t1, top)
    if note:
        out.append(
            f'<text class="outside" x="{WIDTH - RIGHT - 4}" y="{TOP + 12}" text-anchor="end" '
            f'fill="#a00">{escape(note)}</text>'
        )

    def x(t: float) -> float:
        return LEFT + w * (t - t0) / (t1 - t0)

    def y(v: float) -> float:
        return TOP + h - h * min(max(v, 0.0), top) / top

    base = [0.0] * len(times)
    for i, (name, values) in enumerate(stacks):
        upper = [b + v for b, v in zip(base, values, strict=True)]
        forward = [f"{x(t):.1f},{y(u):.1f}" for t, u in zip(times, upper, strict=True)]
        back = [f"{x(t):.1f},{y(b):.1f}" for t, b in zip(times, base, strict=True)][::-1]
        out.append(
            f'<polygon fill="{color(i)}" fill-opacity="0.55" stroke="{color(i)}" '
            f'stroke-width="1" points="{" ".join(forward + back)}">'
            f"<title>{escape(name)}</title></polygon>"
        )
        base = upper
    if band is not None:
        lows, his = band
        for seq in (lows, [top if v is None or not math.isfinite(v) else v for v in his]):
            pts = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in zip(times, seq, strict=True))
            out.append(
                f'<polyline fill="none" stroke="#333" stroke-dasharray="4 3" points="{pts}"/>'
            )
    out.append("</svg>")
    return "".join(out)


__all__ = ["PALETTE", "color", "empty", "line_chart", "number", "stacked_chart"]
