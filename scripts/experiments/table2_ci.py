"""Table 2 with intervals: mean top-1 and its 95% t-interval over seeds, and a paired test per cell.

Reads the cells `synthaug train` / `pipelines/reproduce_table2.py` saved (``DIR/downstream/cells/*.json``, one per
method, k and seed; several DIRs are pooled) and prints, per k: each method's mean top-1 ± the half-width of its 95%
t-interval over seeds, and for the token method against each other method the mean paired difference (same k, same
seed, hence the same k real images), its 95% t-interval and the two-sided paired t-test p-value.

    python scripts/experiments/table2_ci.py out/digits-report/eval/t2 --method dct

With ``NAME=DIR[:METHOD]`` arguments instead, each is a named row (the cells of one method in DIR; folders of
different builds or settings pair up on the same real images), and every row is compared with each ``--against`` row
(`synthaug.evaluate.paired`; ``pipelines/reproduce_table2.py --row`` writes such folders, ``OUT/LEARNER/ROW``):

    python scripts/experiments/table2_ci.py real=out/t2x/cnn/real:real sd=out/t2x/cnn/sd \
        sd+conf=out/t2x/cnn/sd+conf dct=out/t2x/cnn/dct --against sd,sd+conf
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from scipy import stats

from synthaug.evaluate.paired import t_interval


def load_cells(dirs: list[Path]) -> dict[tuple[str, int], dict[int, float]]:
    """(method, k) -> {seed: top-1}; the same cell found twice must agree."""
    cells: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for d in dirs:
        for f in sorted((d / "downstream" / "cells").glob("*.json")):
            c = json.loads(f.read_text())
            key, seed = (c["method"], int(c["shots"])), int(c["seed"])
            if seed in cells[key] and cells[key][seed] != c["top1"]:
                raise SystemExit(f"{f}: {key} seed {seed} differs from the same cell in another folder")
            cells[key][seed] = float(c["top1"])
    if not cells:
        raise SystemExit(f"no cells under {', '.join(map(str, dirs))}: pass eval folders of reproduce_table2.py")
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="eval folders (reproduce_table2.py --out), or NAME=DIR[:METHOD] rows")
    parser.add_argument("--method", default="dct", help="the method compared with every other one")
    parser.add_argument("--against", default="sd", help="with named rows: the rows every row is compared with")
    args = parser.parse_args()
    if any("=" in d for d in args.dirs):
        from synthaug.evaluate.paired import compare_rows, format_comparison, load_row_cells

        rows = {}
        for d in args.dirs:
            name, _, where = d.partition("=")
            folder, _, method = where.rpartition(":") if ":" in where else (where, "", "")
            rows[name] = load_row_cells([folder], method or None)
        print(format_comparison(*compare_rows(rows, [a for a in args.against.split(",") if a])))
        return 0
    cells = load_cells([Path(d) for d in args.dirs])
    methods = sorted({m for m, _ in cells}, key=lambda m: (m != "real", m != "sd", m))
    for k in sorted({k for _, k in cells}):
        parts = []
        for m in methods:
            if (m, k) in cells:
                mean, half = t_interval(list(cells[(m, k)].values()))
                parts.append(f"{m} {100 * mean:.1f} ± {100 * half:.1f} (n={len(cells[(m, k)])})")
        print(f"k={k}: " + ", ".join(parts))
        mine = cells.get((args.method, k), {})
        for m in methods:
            if m == args.method or (m, k) not in cells:
                continue
            seeds = sorted(set(mine) & set(cells[(m, k)]))
            if len(seeds) < 2:
                continue
            diff = [mine[s] - cells[(m, k)][s] for s in seeds]
            mean, half = t_interval(diff)
            p = stats.ttest_rel([mine[s] for s in seeds], [cells[(m, k)][s] for s in seeds]).pvalue
            print(f"    {args.method} - {m}: {100 * mean:+.1f} ± {100 * half:.1f} (paired over {len(seeds)} seeds, "
                  f"p = {p:.2g})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
