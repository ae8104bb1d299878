"""The README's k-shot figure: test accuracy per row of the k-shot tables, with 95% intervals over training seeds,
one panel per learner, drawn with PIL alone (no plotting dependency).

Reads the cells `pipelines/reproduce_table2.py --row ... --out DIR` saved (``DIR/LEARNER/ROW/downstream/cells``) for
each ``K=DIR`` given.

    python scripts/experiments/kshot_figure.py 1=build/digits-clipk1/eval/t2k1 3=build/digits-clipk3b/eval/t2k3 \
        5=build/digits-clipk5/eval/t2k5 --rows real,sd,sd+conf,sd+best,dct,dct+conf,dct+best --out scripts/experiments/figures/kshot.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

COLORS = {"real": (150, 150, 150), "sd": (120, 160, 220), "sd+conf": (40, 90, 190), "dct": (240, 170, 110),
          "dct+conf": (210, 100, 30), "mix+conf": (120, 170, 90), "dct+cliptrust": (170, 120, 200),
          "sd+best": (20, 40, 110), "dct+best": (150, 60, 10), "lowacc+best": (60, 130, 60)}


def row_stats(folder: Path, row: str, k: int) -> tuple[float, float, float] | None:
    """(mean, low, high) of the row's test top-1 at k over seeds, in %, or None when it was not trained."""
    from synthaug.evaluate.paired import load_row_cells, t_interval

    path = folder / row
    if not (path / "downstream" / "cells").is_dir():
        return None
    cells = load_row_cells([path], "real" if row == "real" else None).get(k, {})
    values = [100 * c.top1 for c in cells.values()]
    if not values:
        return None
    mean, half = t_interval(values)
    return mean, mean - half, mean + half


def main(argv: list[str] | None = None) -> None:
    from PIL import Image, ImageDraw, ImageFont

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tables", nargs="+", help="K=DIR: a reproduce_table2 --out folder per k")
    p.add_argument("--rows", default="real,sd,sd+conf,sd+best,dct,dct+conf,dct+best")
    p.add_argument("--learners", default="cnn,linear")
    p.add_argument("--lo", type=float, default=60.0, help="the y axis starts here (%)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    tables = [(int(t.split("=", 1)[0]), Path(t.split("=", 1)[1])) for t in args.tables]
    rows, learners = args.rows.split(","), args.learners.split(",")
    font = ImageFont.load_default()
    group = max(90, 14 * len(rows) + 10)  # one group of bars per k
    panel_w, h, left, top, bottom = 120 + group * len(tables), 300, 46, 30, 40
    img = Image.new("RGB", (panel_w * len(learners), h + 26), "white")
    d = ImageDraw.Draw(img)
    y_of = lambda v: top + (100 - v) / (100 - args.lo) * (h - top - bottom)
    for li, learner in enumerate(learners):
        x0 = li * panel_w + left
        d.text((x0, 8), f"learner: {learner}", fill="black", font=font)
        for v in range(int(args.lo), 101, 10):
            d.line([(x0, y_of(v)), (x0 + panel_w - left - 10, y_of(v))], fill=(230, 230, 230))
            d.text((x0 - 30, y_of(v) - 5), f"{v}%", fill="black", font=font)
        bar = (group - 10) / len(rows)
        for ki, (k, folder) in enumerate(tables):
            gx = x0 + 10 + ki * group
            d.text((gx + group / 2 - 20, h - bottom + 8), f"k = {k}", fill="black", font=font)
            for ri, row in enumerate(rows):
                s = row_stats(folder / learner, row, k)
                if s is None:
                    continue
                mean, lo, hi = s
                bx = gx + ri * bar
                d.rectangle([bx, y_of(max(mean, args.lo)), bx + bar - 2, y_of(args.lo)],
                            fill=COLORS.get(row, (100, 100, 100)))
                mid = bx + (bar - 2) / 2
                d.line([(mid, y_of(min(hi, 100))), (mid, y_of(max(lo, args.lo)))], fill="black")
    lx = 10
    for row in rows:
        d.rectangle([lx, h + 8, lx + 10, h + 18], fill=COLORS.get(row, (100, 100, 100)))
        d.text((lx + 14, h + 7), row, fill="black", font=font)
        lx += 20 + 7 * len(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    img.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
