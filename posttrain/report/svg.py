"""Line charts as inline SVG: no plotting library, no script, nothing fetched when the page opens.

A chart is a set of :class:`Line` s on one pair of axes (x: the optimizer step). Lines are drawn as
polylines broken where a value is missing (a non-finite figure is written as null); lines with few points
and evaluation lines get a marker per point, each with a tooltip (an SVG ``<title>``) giving its step and
value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999",
           "#882255", "#117733", "#332288", "#DDCC77", "#44AA99", "#AA4499")  # fmt: skip
"""One colour per run: the Okabe-Ito palette, then six of Paul Tol's muted ones (both told apart by
colour-blind readers), so a frontier of up to 14 curves repeats none."""
DASHES = ("", "6 3", "2 3", "8 3 2 3")
"""One dash pattern per figure of a chart that shows several (a run's chosen and rejected rewards)."""

WIDTH, HEIGHT = 420, 250
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 28, 34


@dataclass(frozen=True)
class Line:
    """One series: ``points`` are (step, value), value None where it is missing."""

    label: str
    colour: str
    points: list[tuple[float, float | None]]
    dash: str = ""
    markers: bool = False
    """A marker per point (evaluations): open circles, joined by a thin dotted line."""
    faint: bool = False
    """Drawn thin and pale, without markers (a frontier method's runs other than its best)."""


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high].

    >>> nice_ticks(0.0, 1.0)
    [0.0, 0.25, 0.5, 0.75, 1.0]
    >>> [number(t) for t in nice_ticks(3.0, 3.0)]
    ['2.6', '2.8', '3', '3.2', '3.4']
    """
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0, 1.0]
    if high - low <= 1e-12 * max(1.0, abs(high)):
        pad = abs(high) * 0.1 if high else 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(value)
        value = first + step * len(ticks)
    if ticks[-1] < high - step * 1e-9:
        ticks.append(value)
    return ticks


def number(value: float) -> str:
    """A short label: 0.0003 -> 3e-04, 12500 -> 1.25e+04, 0.25 -> 0.25, 2.0 -> 2.

    >>> [number(v) for v in (0.0003, 12500.0, 0.25, 2.0, -1.5, 0.0)]
    ['3e-04', '1.25e+04', '0.25', '2', '-1.5', '0']
    """
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"
    text = f"{value:.4g}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def tick_label(value: float, step: float) -> str:
    """A tick's label, with the decimals its spacing needs (ticks 0.0005 apart near 6.232 stay distinct).

    >>> [tick_label(v, 0.0005) for v in (6.2315, 6.232)], [tick_label(v, 0.25) for v in (0.25, 0.5, 0.75)]
    (['6.2315', '6.232'], ['0.25', '0.5', '0.75'])
    >>> tick_label(0.0002, 0.0001), tick_label(25000.0, 5000.0)
    ('2e-04', '2.5e+04')
    """
    if value == 0 or abs(value) >= 1e4 or abs(value) < 1e-3 or step <= 0:
        return number(value)
    decimals = next(d for d in range(12) if abs(round(step, d) - step) <= 1e-9 * step)  # 0.25 -> 2
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


MAX_POINTS = 1000
"""Points drawn per line at most: a longer run is drawn from every k-th point (and its last), so that a page
of many charts stays a few MB whatever the number of steps."""


def thin(points: list[tuple[float, float | None]], limit: int = MAX_POINTS) -> list[tuple[float, float | None]]:
    """Every k-th point and the last one, at most about ``limit``; a missing value is always kept (a gap).

    >>> len(thin([(float(i), 1.0) for i in range(10_000)])), thin([(0.0, 1.0), (1.0, 2.0)])
    (1001, [(0.0, 1.0), (1.0, 2.0)])
    """
    if len(points) <= limit:
        return points
    k = math.ceil(len(points) / limit)
    return [p for i, p in enumerate(points) if i % k == 0 or i == len(points) - 1 or p[1] is None]


def _segments(points: list[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    out: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None or not math.isfinite(y):
            if out[-1]:
                out.append([])
            continue
        out[-1].append((x, y))
    return [s for s in out if s]


def chart(title: str, lines: list[Line], note: str = "", x_label: str = "step") -> str:
    """An SVG line chart of ``lines`` (x: ``x_label``, the step by default); an empty string when no line has a
    finite value."""
    values = [(x, y) for line in lines for x, y in line.points if y is not None and math.isfinite(y)]
    if not values:
        return ""
    xs, ys = [x for x, _ in values], [y for _, y in values]
    x_ticks = nice_ticks(min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1)
    y_ticks = nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return TOP + plot_h - (y - y0) / (y1 - y0) * plot_h

    parts = [
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img" aria-label="{escape(title)}">',
        f'<text class="title" x="{LEFT}" y="16">{escape(title)}</text>',
    ]
    for y in y_ticks:
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{py(y):.1f}" y2="{py(y):.1f}"/>')
        label = tick_label(y, y_ticks[1] - y_ticks[0])
        parts.append(f'<text class="tick" x="{LEFT - 4}" y="{py(y) + 3:.1f}" text-anchor="end">{label}</text>')
    for x in x_ticks:
        parts.append(f'<text class="tick" x="{px(x):.1f}" y="{HEIGHT - BOTTOM + 13}" text-anchor="middle">'
                     f"{tick_label(x, x_ticks[1] - x_ticks[0])}</text>")  # fmt: skip
    parts.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}"/>')
    parts.append(f'<text class="axis" x="{LEFT + plot_w / 2:.0f}" y="{HEIGHT - 4}" text-anchor="middle">'
                 f"{escape(x_label)}</text>")  # fmt: skip
    for line in lines:
        few = len(line.points) <= 40
        for segment in _segments(thin(line.points)):
            coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in segment)
            dash = "2 2" if line.markers else line.dash
            style = f' stroke-dasharray="{dash}"' if dash else ""
            width = 1.2 if line.markers else 1.0 if line.faint else 1.8
            style += ' stroke-opacity="0.3"' if line.faint else ""
            parts.append(f'<polyline fill="none" stroke="{line.colour}" stroke-width="{width}"{style} '
                         f'points="{coords}"><title>{escape(line.label)}</title></polyline>')  # fmt: skip
            if (line.markers or few) and not line.faint:
                fill = "white" if line.markers else line.colour
                radius = 3 if line.markers else 2
                for x, y in segment:
                    parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="{radius}" fill="{fill}" '
                                 f'stroke="{line.colour}"><title>{escape(line.label)}: {escape(x_label)} {number(x)}: '
                                 f"{y:.6g}</title></circle>")  # fmt: skip
    if note:
        parts.append(f'<text class="note" x="{WIDTH - RIGHT}" y="16" text-anchor="end">{escape(note)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def swatch(colour: str, dash: str = "", marker: bool = False) -> str:
    """A short sample of a line, for legends written in HTML next to the charts."""
    style = f' stroke-dasharray="{dash}"' if dash else ""
    circle = f'<circle cx="14" cy="6" r="3" fill="white" stroke="{colour}"/>' if marker else ""
    return (f'<svg class="swatch" width="28" height="12" viewBox="0 0 28 12"><line x1="0" x2="28" y1="6" y2="6" '
            f'stroke="{colour}" stroke-width="2"{style}/>{circle}</svg>')  # fmt: skip
