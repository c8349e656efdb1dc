"""Plots of the network over time, drawn as SVG on the server: pure functions.

Each function takes numbers and labels and returns one SVG document (text).
The page shows them as ``<img>`` (an image cannot run script, whatever it
holds), and ``/plots/<name>.svg`` serves them to anyone who wants the
picture without the page.  Every label comes from the network (a GPU model
or a region is whatever a stranger's advert says), so every piece of text is
made safe here, in one place (:func:`text`): characters XML cannot carry are
dropped, the rest escaped, and the length capped.  No clock: the time axis
comes from the points and ``now_ms``.
"""

from __future__ import annotations

import html
import math
import re
import time
from collections.abc import Callable, Sequence

WIDTH, HEIGHT = 640, 240
PAD_L, PAD_R, PAD_T, PAD_B = 56, 12, 28, 40
PALETTE = ("#5ea8ff", "#3ecf8e", "#f5b94a", "#ff6b6b", "#b38cff", "#3cc6d9", "#ff8ac2", "#a7b1c2")
label_chars_max = 40
#: XML 1.0 refuses these characters even escaped: controls (but tab, newline), surrogates, U+FFFE/U+FFFF.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
Fmt = Callable[[float], str]


def text(s: object, limit: int = label_chars_max) -> str:
    """Any value as safe SVG text: XML-clean, escaped, at most ``limit`` characters (then an ellipsis)."""
    t = _NOT_XML.sub("", str(s))
    if len(t) > limit:
        t = t[: limit - 1] + "…"
    return html.escape(t, quote=True)


def fmt_int(v: float) -> str:
    return f"{round(v):,}"


def compact(v: float) -> str:
    """A tick label: 3 significant digits, k/M/G for large numbers."""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def lamport_scale(max_lamports: float) -> tuple[float, str]:
    """The unit to plot an amount in: SOL from 0.01 SOL up, else lamports."""
    return (1e9, "SOL") if max_lamports >= 1e7 else (1.0, "lamports")


def fmt_lamports(v: float) -> str:
    """Lamports as people read them: SOL above 0.001 SOL."""
    if abs(v) >= 1_000_000:
        return f"{v / 1e9:,.4g} SOL"
    return f"{int(v):,} lamports"


def nice_max(v: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is at least ``v`` (1 for nothing)."""
    if v <= 0 or not math.isfinite(v):
        return 1.0
    p = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 5, 10):
        if m * p >= v:
            return float(m * p)
    return float(10 * p)


def _svg(title: str, body: list[str], width: int = WIDTH, height: int = HEIGHT) -> str:
    t = text(title, 80)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{t}" font-family="system-ui, sans-serif" font-size="11">'
            f'<title>{t}</title><rect width="{width}" height="{height}" fill="#171b24"/>'
            f'<text x="{PAD_L}" y="17" font-size="13" font-weight="600" fill="#e6e9ef">{t}</text>'
            + "".join(body) + "</svg>")


def _empty(title: str, message: str) -> str:
    return _svg(title, [(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#8b93a7">'
                         f'{text(message, 80)}</text>')])


def _time_label(t_ms: int, span_ms: int) -> str:
    tm = time.gmtime(t_ms / 1000)
    if span_ms > 2 * 86_400_000:
        return time.strftime("%m-%d", tm)
    return time.strftime("%H:%M", tm)


def _y_max(v: float, integer: bool) -> float:
    """The top of the y axis: a nice number; at least 4 for counts, so every tick is a whole number."""
    m = nice_max(v)
    return max(4.0, m) if integer and m < 4 else m


def _y_axis(y_max: float, plot_h: int) -> list[str]:
    out = []
    for i in range(5):
        v = y_max * i / 4
        y = PAD_T + plot_h - plot_h * i / 4
        out.append(f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#262c39"/>'
                   f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#8b93a7">{text(compact(v), 8)}</text>')
    return out


def line_chart(title: str, series: Sequence[tuple[str, Sequence[tuple[int, float]]]], *, now_ms: int,
               window_ms: int, fmt: Fmt = fmt_int, empty: str = "no data yet", integer: bool = True) -> str:
    """Step lines over ``[now - window, now]``, one per labelled series, with a legend."""
    start = now_ms - window_ms
    series = [(label, [(t, v) for t, v in pts if t >= start]) for label, pts in series]
    series = [(label, pts) for label, pts in series if pts][: len(PALETTE)]
    if not series:
        return _empty(title, empty)
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B
    legend_rows = (len(series) + 1) // 2
    height = HEIGHT + 14 * (legend_rows - 1)
    y_max = _y_max(max(v for _, pts in series for _, v in pts), integer)
    t0 = min(t for _, pts in series for t, _ in pts)
    span = max(now_ms - t0, 60_000)

    def x(t: int) -> float:
        return PAD_L + plot_w * (t - t0) / span

    def y(v: float) -> float:
        return PAD_T + plot_h - plot_h * v / y_max

    body = _y_axis(y_max, plot_h)
    for i in range(3):
        t = t0 + span * i // 2
        body.append(f'<text x="{x(t):.1f}" y="{HEIGHT - PAD_B + 14}" text-anchor="middle" fill="#8b93a7">'
                    f'{text(_time_label(t, span))}</text>')
    for n, (label, pts) in enumerate(series):
        color = PALETTE[n % len(PALETTE)]
        d = [f"M{x(pts[0][0]):.1f},{y(pts[0][1]):.1f}"]
        for t1, v1 in pts[1:]:
            d.append(f"H{x(t1):.1f}V{y(v1):.1f}")
        d.append(f"H{x(now_ms):.1f}")
        body.append(f'<path d="{"".join(d)}" fill="none" stroke="{color}" stroke-width="2">'
                    f'<title>{text(label)}: {text(fmt(pts[-1][1]), 24)}</title></path>')
        lx = PAD_L + (n % 2) * (plot_w // 2)
        ly = HEIGHT - 10 + (n // 2) * 14
        body.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                    f'<text x="{lx + 14}" y="{ly + 1}" fill="#e6e9ef">{text(label, 30)} '
                    f'({text(fmt(pts[-1][1]), 16)})</text>')
    return _svg(title, body, height=height)


def bar_chart(title: str, points: Sequence[tuple[int, float]], *, bucket_ms: int, fmt: Fmt = fmt_int,
              empty: str = "nothing yet", integer: bool = True) -> str:
    """One bar per time bucket (jobs per hour, payouts per day)."""
    if not points or not any(v for _, v in points):
        return _empty(title, empty)
    plot_w, plot_h = WIDTH - PAD_L - PAD_R, HEIGHT - PAD_T - PAD_B
    y_max = _y_max(max(v for _, v in points), integer)
    slot = plot_w / len(points)
    body = _y_axis(y_max, plot_h)
    span = points[-1][0] - points[0][0] + bucket_ms
    step = max(1, len(points) // 6)
    for i, (t, v) in enumerate(points):
        h = plot_h * v / y_max
        bx = PAD_L + i * slot
        if v:
            body.append(f'<rect x="{bx + slot * 0.15:.1f}" y="{PAD_T + plot_h - h:.1f}" width="{slot * 0.7:.1f}" '
                        f'height="{h:.1f}" fill="{PALETTE[0]}"><title>{text(_time_label(t, span))}: '
                        f'{text(fmt(v), 24)}</title></rect>')
        if i % step == 0 or i == len(points) - 1:
            body.append(f'<text x="{bx + slot / 2:.1f}" y="{HEIGHT - PAD_B + 16}" text-anchor="middle" '
                        f'fill="#8b93a7">{text(_time_label(t, span))}</text>')
    return _svg(title, body)


def hbar_chart(title: str, rows: Sequence[tuple[str, float]], *, fmt: Fmt = fmt_int,
               empty: str = "nobody yet") -> str:
    """Horizontal bars, largest first (top earners)."""
    rows = [(label, v) for label, v in rows if v > 0][:8]
    if not rows:
        return _empty(title, empty)
    v_max = max(v for _, v in rows)
    left, right = 170, 150
    bar_w = WIDTH - left - right
    row_h = (HEIGHT - PAD_T - 8) / max(len(rows), 4)
    body = []
    for i, (label, v) in enumerate(rows):
        y = PAD_T + i * row_h
        w = max(1.0, bar_w * v / v_max)
        body.append(f'<text x="{left - 8}" y="{y + row_h * 0.62:.1f}" text-anchor="end" fill="#e6e9ef">'
                    f'{text(label, 24)}</text>'
                    f'<rect x="{left}" y="{y + row_h * 0.15:.1f}" width="{w:.1f}" height="{row_h * 0.7:.1f}" '
                    f'fill="{PALETTE[1]}"/>'
                    f'<text x="{left + w + 6:.1f}" y="{y + row_h * 0.62:.1f}" fill="#e6e9ef">{text(fmt(v), 24)}</text>')
    return _svg(title, body)
