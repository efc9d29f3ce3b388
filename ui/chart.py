"""The loss chart, drawn on the server as an SVG: the training loss per step (thin), its moving average (bold) and the
validation loss (points), on axes with a few round ticks that never overlap; and the image-validation scores."""

from __future__ import annotations

import html
import math

W, H = 640, 230
LEFT, RIGHT, TOP, BOTTOM = 58, 14, 12, 34
MAX_POINTS = 1500  # more points than pixels only slow the page


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round values covering [lo, hi] (1, 2 or 5 times a power of ten apart)."""
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with its start-up bias removed (TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _label(v: float) -> str:
    return f"{v:.3g}"


def loss_chart(losses: list[tuple[int, float]], val: list[tuple[int, float]]) -> str:
    """The chart as HTML; a line of text before the first step."""
    points = [(s, v) for s, v in losses if math.isfinite(v)]
    vals = [(s, v) for s, v in val if math.isfinite(v)]
    if not points and not vals:
        return '<div id="loss-chart" class="empty">The loss appears here once the steps begin.</div>'
    steps = [s for s, _ in points + vals]
    ys = [v for _, v in points + vals]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    pad = (max(ys) - min(ys)) * 0.08 or abs(ys[0]) * 0.1 or 0.1
    y0, y1 = min(ys) - pad, max(ys) + pad

    def x(s):
        return LEFT + (s - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def y(v):
        return TOP + (y1 - v) / (y1 - y0) * (H - TOP - BOTTOM)

    parts = [_axes(x0, x1, y0, y1, x, y)]
    if points:
        every = max(1, len(points) // MAX_POINTS)
        shown = points[::every]
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in shown)
        avg = " ".join(f"{x(s):.1f},{y(v):.1f}" for (s, _), v in zip(shown, smooth([v for _, v in shown])))
        parts.append(f'<polyline class="loss-raw" points="{line}" fill="none" stroke="#f97316" '
                     'stroke-opacity="0.35" stroke-width="1"/>')
        parts.append(f'<polyline class="loss-avg" points="{avg}" fill="none" stroke="#ea580c" stroke-width="2"/>')
    for s, v in vals:
        parts.append(f'<circle class="loss-val" cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="#2563eb"/>')
    legend = "training loss (thin), its moving average (bold)" + (", validation loss (blue)" if vals else "")
    return (f'<div id="loss-chart"><svg viewBox="0 0 {W} {H}" width="100%" role="img" '
            f'aria-label="Loss by step: {html.escape(legend)}">{"".join(parts)}</svg>'
            f'<div class="chart-legend">{html.escape(legend)}</div></div>')


def _axes(x0, x1, y0, y1, x, y) -> str:
    out = [f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" '
           'stroke="#d4d4d8"/>']
    for t in nice_ticks(y0, y1, 4):
        out.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(t):.1f}" y2="{y(t):.1f}" stroke="#e4e4e7"/>'
                   f'<text x="{LEFT - 6}" y="{y(t) + 4:.1f}" text-anchor="end" font-size="11" '
                   f'fill="currentColor">{_label(t)}</text>')
    for t in nice_ticks(x0, x1, 5):
        if t == int(t):
            out.append(f'<text x="{x(t):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle" font-size="11" '
                       f'fill="currentColor">{int(t)}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 4}" text-anchor="middle" font-size="11" '
               'fill="currentColor">step</text>')
    return "".join(out)


SCORE_SERIES = (  # (key, label, colour, stroke width): the combined score bold, its parts thin
    ("score", "combined score", "#7c3aed", 2.5), ("likeness", "likeness", "#059669", 1.2),
    ("adherence", "adherence", "#2563eb", 1.2), ("preservation", "preservation", "#d97706", 1.2),
    ("copying", "copying", "#dc2626", 1.2))


def score_chart(scores: list[tuple[int, dict]], best_step: int = 0, select_by: str = "") -> str:
    """The image-validation scores by step (the combined score and each part measured), points joined by lines, and
    the step of the best file (what --select-by picked) marked; a line of text before the first validation."""
    rows = [(s, {k: v for k, v in parts.items() if math.isfinite(v)}) for s, parts in scores]
    rows = [(s, parts) for s, parts in rows if parts]
    if not rows:
        return ('<div id="score-chart" class="empty">The image scores appear here after the first validation '
                '(Image scorer in "Validation and the best file").</div>')
    steps = [s for s, _ in rows]
    values = [v for _, parts in rows for v in parts.values()]
    x0, x1 = 0, max(max(steps), 1)  # from step 0: a single validation is not drawn at the chart's edge
    y0, y1 = min(0.0, min(values)), max(1.0, max(values))

    def x(s):
        return LEFT + (s - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def y(v):
        return TOP + (y1 - v) / (y1 - y0) * (H - TOP - BOTTOM)

    parts_svg, legend = [_axes(x0, x1, y0, y1, x, y)], []
    if best_step in steps:
        parts_svg.append(f'<line class="score-best" x1="{x(best_step):.1f}" x2="{x(best_step):.1f}" y1="{TOP}" '
                         f'y2="{H - BOTTOM}" stroke="#7c3aed" stroke-dasharray="4 3"/>')
    for key, label, colour, width in SCORE_SERIES[1:] + SCORE_SERIES[:1]:  # the combined score drawn on top
        pts = [(s, parts[key]) for s, parts in rows if key in parts]
        if not pts:
            continue
        legend.append(f'<span style="color:{colour}">■</span> {label}')
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in pts)
        parts_svg.append(f'<polyline class="score-line score-{key}" points="{line}" fill="none" stroke="{colour}" '
                         f'stroke-width="{width}"/>')
        parts_svg += [f'<circle class="score-point score-{key}" cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" '
                      f'fill="{colour}"><title>step {s}: {label} {v:.3f}</title></circle>' for s, v in pts]
    if best_step in steps:
        by = {"images": "the combined score", "loss": "the validation loss"}.get(select_by, select_by)
        legend.append(f"dashed: the best file, step {best_step}" + (f" (picked by {by})" if by else ""))
    text = "Image-validation scores by step: " + ", ".join(k for k, *_ in SCORE_SERIES)
    return (f'<div id="score-chart"><svg viewBox="0 0 {W} {H}" width="100%" role="img" '
            f'aria-label="{html.escape(text)}">{"".join(parts_svg)}</svg>'
            f'<div class="chart-legend">{" · ".join(legend)}</div></div>')
