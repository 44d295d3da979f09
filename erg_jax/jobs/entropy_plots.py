"""Small line plots and heatmaps drawn with Pillow alone (no matplotlib in the core
install): panels of curves with labelled axes, ticks and a legend, and panels of
matrices on one colour scale with a colour bar. Each returns an (H, W, 3) uint8 image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# matplotlib's tab10: distinct, readable on white
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
# viridis at five stops, interpolated linearly
VIRIDIS = np.array(
    [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64
)
INK, GRID, WHITE = (20, 20, 20), (225, 225, 225), (255, 255, 255)
PANEL = (360, 250)  # width, height of one panel
MARGIN = dict(left=64, right=12, top=26, bottom=40)


def _font(size: int = 12):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (steps of 1, 2 or 5 x 10^k)."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(count - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _vertical(img, text: str, centre: tuple[float, float], font) -> None:
    """Draws text turned a quarter left (a y-axis label) centred at ``centre``."""
    from PIL import Image, ImageDraw

    left, top, right, bottom = ImageDraw.Draw(img).textbbox((0, 0), text, font=font)
    label = Image.new("RGB", (right - left + 2, bottom - top + 2), WHITE)
    ImageDraw.Draw(label).text((1 - left, 1 - top), text, fill=INK, font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (int(centre[0] - label.width / 2), int(centre[1] - label.height / 2)))


def _frame(img, draw, box, title: str, xlabel: str, ylabel: str, font, small):
    x0, y0, x1, y1 = box
    draw.rectangle(box, outline=INK)
    draw.text(((x0 + x1) / 2, y0 - 6), title, fill=INK, font=font, anchor="md")
    draw.text(((x0 + x1) / 2, y1 + 20), xlabel, fill=INK, font=small, anchor="mt")
    _vertical(img, ylabel, (x0 - 46, (y0 + y1) / 2), small)


def line_panels(
    panels: Sequence[dict],
    *,
    xlabel: str,
    ylabel: str,
    xlog: bool = False,
    columns: int = 3,
    ylim: tuple[float, float] | None = None,
) -> np.ndarray:
    """Panels of curves sharing axes' labels (and, by default, their y range).

    Args:
      panels: each {"title": str, "x": (n,), "curves": [(label, (n,) values), ...]}.
      xlabel, ylabel: axis labels; xlog: a log-scaled x axis (x > 0).
      columns: panels per row.
      ylim: the y range; None: the range of every panel's values.

    Returns:
      (H, W, 3) uint8.
    """
    from PIL import Image, ImageDraw

    font, small = _font(13), _font(11)
    values = [np.asarray(v, np.float64) for p in panels for _, v in p["curves"]]
    lo, hi = ylim or (min(float(v.min()) for v in values), max(float(v.max()) for v in values))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    cols = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / cols)
    labels = [label for label, _ in panels[0]["curves"]]
    per_row = max(1, (cols * PANEL[0] - 20) // 90)  # legend entries a row
    legend_h = 22 * math.ceil(len(labels) / per_row)
    img = Image.new("RGB", (cols * PANEL[0], rows * PANEL[1] + legend_h), WHITE)
    draw = ImageDraw.Draw(img)
    for i, p in enumerate(panels):
        ox, oy = (i % cols) * PANEL[0], (i // cols) * PANEL[1]
        box = (
            ox + MARGIN["left"],
            oy + MARGIN["top"],
            ox + PANEL[0] - MARGIN["right"],
            oy + PANEL[1] - MARGIN["bottom"],
        )
        x = np.asarray(p["x"], np.float64)
        fx = np.log10 if xlog else (lambda a: a)
        xa, xb = float(fx(x.min())), float(fx(x.max()))
        xb = xb if xb > xa else xa + 1.0

        def px(v, box=box, xa=xa, xb=xb, fx=fx):
            return box[0] + (fx(v) - xa) / (xb - xa) * (box[2] - box[0])

        def py(v, box=box):
            return box[3] - (v - lo) / (hi - lo) * (box[3] - box[1])

        for tick in nice_ticks(lo, hi):
            y = py(tick)
            draw.line((box[0], y, box[2], y), fill=GRID)
            draw.text((box[0] - 4, y), _fmt(tick), fill=INK, font=small, anchor="rm")
        xticks = x if len(x) <= 6 else x[:: math.ceil(len(x) / 6)]
        for tick in xticks:
            draw.text((px(tick), box[3] + 4), _fmt(float(tick)), fill=INK, font=small, anchor="mt")
        _frame(img, draw, box, p["title"], xlabel, ylabel, font, small)
        for j, (_, v) in enumerate(p["curves"]):
            pts = [(px(a), py(b)) for a, b in zip(x, np.asarray(v, np.float64), strict=True)]
            colour = PALETTE[j % len(PALETTE)]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            for a, b in pts:
                draw.ellipse((a - 2, b - 2, a + 2, b + 2), fill=colour)
    for j, label in enumerate(labels):  # one legend for all panels
        lx = 10 + (j % per_row) * 90
        ly = rows * PANEL[1] + 4 + 22 * (j // per_row)
        draw.line((lx, ly + 7, lx + 18, ly + 7), fill=PALETTE[j % len(PALETTE)], width=3)
        draw.text((lx + 24, ly), label, fill=INK, font=small)
    return np.asarray(img)


def draw_width(text: str, font) -> int:
    """Pixels ``text`` takes in ``font``."""
    from PIL import Image, ImageDraw

    left, _, right, _ = ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    return int(right - left)


def colormap(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Viridis colours (..., 3) uint8 of values on [lo, hi]."""
    u = np.clip((np.asarray(values, np.float64) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    pos = u * (len(VIRIDIS) - 1)
    i = np.minimum(pos.astype(int), len(VIRIDIS) - 2)
    frac = (pos - i)[..., None]
    return (VIRIDIS[i] * (1 - frac) + VIRIDIS[i + 1] * frac).round().astype(np.uint8)


def heatmap_panels(
    panels: Sequence[tuple[str, np.ndarray]],
    *,
    xlabel: str,
    ylabel: str,
    columns: int = 3,
    cell: int = 28,
) -> np.ndarray:
    """Matrices (rows x columns) side by side on one colour scale, values in each cell.

    Args:
      panels: (title, (r, c) matrix) pairs, all of one shape.
      xlabel, ylabel: what the columns and the rows index (0, 1, ...).
      cell: pixels a cell.

    Returns:
      (H, W, 3) uint8, a colour bar with the scale's ends underneath.
    """
    from PIL import Image, ImageDraw

    font, small = _font(13), _font(10)
    mats = [np.asarray(m, np.float64) for _, m in panels]
    lo, hi = min(float(m.min()) for m in mats), max(float(m.max()) for m in mats)
    r, c = mats[0].shape
    cell = max(cell, 10)
    widths = [draw_width(title, font) for title, _ in panels]
    pw, ph = max([c * cell, 120] + widths) + 70, r * cell + 70
    cols = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / cols)
    img = Image.new("RGB", (cols * pw, rows * ph + 44), WHITE)
    draw = ImageDraw.Draw(img)
    for i, (title, _) in enumerate(panels):
        ox, oy = (i % cols) * pw + 50, (i // cols) * ph + 26
        colours = colormap(mats[i], lo, hi)
        for a in range(r):
            for b in range(c):
                x, y = ox + b * cell, oy + a * cell
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=tuple(colours[a, b]))
                if cell >= 24:
                    light = (mats[i][a, b] - lo) / max(hi - lo, 1e-12) < 0.6
                    draw.text(
                        (x + cell / 2, y + cell / 2),
                        f"{mats[i][a, b]:.2f}",
                        fill=WHITE if light else INK,
                        font=_font(9),
                        anchor="mm",
                    )
            draw.text((ox - 4, oy + (a + 0.5) * cell), str(a), fill=INK, font=small, anchor="rm")
        for b in range(c):
            draw.text(
                (ox + (b + 0.5) * cell, oy + r * cell + 3),
                str(b),
                fill=INK,
                font=small,
                anchor="mt",
            )
        draw.text((ox, oy - 6), title, fill=INK, font=font, anchor="ld")
        draw.text(
            (ox + c * cell / 2, oy + r * cell + 18), xlabel, fill=INK, font=small, anchor="mt"
        )
        _vertical(img, ylabel, (ox - 30, oy + r * cell / 2), small)
    bar = colormap(np.linspace(lo, hi, 200), lo, hi)
    by = rows * ph + 8
    for j in range(200):
        draw.line((60 + j, by, 60 + j, by + 12), fill=tuple(bar[j]))
    draw.text((56, by + 6), _fmt(lo), fill=INK, font=small, anchor="rm")
    draw.text((264, by + 6), _fmt(hi), fill=INK, font=small, anchor="lm")
    return np.asarray(img)
