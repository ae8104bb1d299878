"""The report's charts as PNG images, drawn with PIL (the report's one image library; no plotting dependency).

- `bar_chart`: per class, one bar per method, side by side (the summary at the top of the report: judge top-1 or the
  guide's mean probability, plain prompt against the build's method, the worst classes first);
- `heatmap`: a confusion matrix, rows the true classes, columns the judge's predictions, each row normalised;
- `histograms`: one value's distribution per method, on shared bins in [0, 1].

Each returns a `PIL.Image.Image`; `synthaug.report` embeds it as a data URI.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

# One colour per method, in the report's method order (baseline first): grey for the plain prompt, then blue,
# orange, green, purple.
PALETTE = ["#8c959f", "#0969da", "#bc4c00", "#1a7f37", "#8250df"]
_INK, _GRID = "#24292f", "#d0d7de"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def _legend(draw, x: int, y: int, methods: Sequence[str], font) -> None:
    for i, m in enumerate(methods):
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=PALETTE[i % len(PALETTE)])
        draw.text((x + 14, y), m, fill=_INK, font=font)
        x += 24 + int(draw.textlength(m, font=font))


def bar_chart(rows: Sequence[tuple[str, Sequence[float | None]]], methods: Sequence[str], title: str) -> Image.Image:
    """Horizontal bars in [0, 1]: one row per label, one bar per method (None: no bar), a legend and a 0-100% axis.

    Args:
        rows: ``(label, values)`` in display order, `values` aligned with `methods`.
        methods: the methods, in the order of their bars and colours.
        title: the chart's heading.
    """
    from PIL import Image, ImageDraw

    font, small = _font(13), _font(11)
    bar, label_w, plot_w, top = 6, 170, 420, 46
    row_h = bar * max(len(methods), 1) + 6
    img = Image.new("RGB", (label_w + plot_w + 60, top + row_h * len(rows) + 26), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill=_INK, font=font)
    _legend(d, 8, 24, methods, small)
    for pct in range(0, 101, 25):  # the axis: vertical grid lines, labelled below
        x = label_w + plot_w * pct // 100
        d.line([x, top, x, top + row_h * len(rows)], fill=_GRID)
        d.text((x - 10, top + row_h * len(rows) + 6), f"{pct}%", fill=_INK, font=small)
    for r, (label, values) in enumerate(rows):
        y = top + r * row_h + 3
        d.text((8, y), label[:26], fill=_INK, font=small)
        for i, v in enumerate(values):
            if v is None:
                continue
            x1 = label_w + round(plot_w * min(max(v, 0.0), 1.0))
            d.rectangle([label_w, y + i * bar, max(x1, label_w + 1), y + (i + 1) * bar - 1],
                        fill=PALETTE[i % len(PALETTE)])
    return img


def heatmap(matrix: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str], title: str) -> Image.Image:
    """A matrix of values in [0, 1] as shades of blue (white 0, dark 1), labelled where the labels fit (up to 40)."""
    from PIL import Image, ImageDraw

    font, small = _font(13), _font(10)
    n_r, n_c = len(rows), len(cols)
    cell = max(4, min(24, 640 // max(n_r, n_c, 1)))
    labelled = max(n_r, n_c) <= 40
    margin = min(110, 16 + 7 * max(map(len, [*rows, *cols]), default=0)) if labelled else 20  # the longest label
    img = Image.new("RGB", (margin + cell * n_c + 12, 28 + margin + cell * n_r + 12), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill=_INK, font=font)
    x0, y0 = margin, 28 + margin
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            shade = round(255 * (1 - min(max(v, 0.0), 1.0)))
            d.rectangle([x0 + j * cell, y0 + i * cell, x0 + (j + 1) * cell - 1, y0 + (i + 1) * cell - 1],
                        fill=(shade, shade + (255 - shade) // 3, 255))
    d.rectangle([x0 - 1, y0 - 1, x0 + cell * n_c, y0 + cell * n_r], outline=_GRID)
    if labelled:
        for i, name in enumerate(rows):
            d.text((4, y0 + i * cell + max(cell // 2 - 6, 0)), name[:16], fill=_INK, font=small)
        for j, name in enumerate(cols):  # column labels written downwards, one letter under the other would not fit
            label = Image.new("RGB", (margin - 4, cell), "white")
            ImageDraw.Draw(label).text((2, max(cell // 2 - 6, 0)), name[:16], fill=_INK, font=small)
            img.paste(label.rotate(90, expand=True), (x0 + j * cell, 28))
    return img


def histograms(values: Sequence[Sequence[float]], methods: Sequence[str], title: str, bins: int = 20
               ) -> Image.Image:
    """Each method's values in [0, 1] on `bins` shared bins, as the share of its images per bin, side by side."""
    from PIL import Image, ImageDraw

    font, small = _font(13), _font(11)
    plot_w, plot_h, left, top = 480, 160, 40, 46
    counts = []
    for vals in values:
        c = [0] * bins
        for v in vals:
            c[min(int(min(max(v, 0.0), 1.0) * bins), bins - 1)] += 1
        counts.append([n / max(len(vals), 1) for n in c])
    peak = max((max(c) for c in counts if c), default=1.0) or 1.0
    img = Image.new("RGB", (left + plot_w + 20, top + plot_h + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((8, 6), title, fill=_INK, font=font)
    _legend(d, 8, 24, methods, small)
    d.line([left, top + plot_h, left + plot_w, top + plot_h], fill=_INK)
    for tick in range(0, 11, 2):
        x = left + plot_w * tick // 10
        d.text((x - 8, top + plot_h + 6), f"{tick / 10:.1f}", fill=_INK, font=small)
    width = plot_w / bins / max(len(methods), 1)
    for i, c in enumerate(counts):
        for b, share in enumerate(c):
            if share <= 0:
                continue
            x = left + b * plot_w / bins + i * width
            # a share too small for a whole pixel still shows as one (PIL refuses a rectangle of negative height)
            height = max(1, round(plot_h * share / peak))
            d.rectangle([round(x), top + plot_h - height, max(round(x), round(x + width) - 1), top + plot_h - 1],
                        fill=PALETTE[i % len(PALETTE)])
    return img
