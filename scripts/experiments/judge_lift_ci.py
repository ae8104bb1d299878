"""The judge lift of a build with its 95% interval over image seeds, from `synthaug evaluate`'s per-image verdicts.

Reads ``BUILD/eval/judge_images.parquet`` (one row per image: method, class, seed, judge top-1) and pairs each token
image with the plain-prompt image of the same (class, seed). The lift is the mean over classes of the per-class
difference in judge top-1; its interval is a paired bootstrap that resamples seeds within each class (4,000 draws).
"Errors fixed" is the lift over the plain prompt's error rate. Prints one line per class group (RESULTS.md).

    python scripts/experiments/judge_lift_ci.py out/digits-report --groups "ambiguous=1,3,4,7,8,9"
    python scripts/experiments/judge_lift_ci.py out/digits-report-n2 --baseline-build out/digits-report
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def paired(build: Path, method: str, baseline: str,
           baseline_build: Path | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per class: (baseline top-1, method top-1) as 0/1 arrays over the seeds both have, in seed order.

    `baseline_build`: take the baseline's verdicts from this build instead (same seeds): for a build made without
    ``--baseline``, or to pair two builds' tokens (``--baseline dct``: tokens learned again with other settings).
    """
    def verdicts(folder: Path, which: str) -> dict[int, dict[int, float]]:
        rows = pq.read_table(folder / "eval" / "judge_images.parquet",
                             columns=["method", "class_index", "seed", "top1"]).to_pylist()
        by: dict[int, dict[int, float]] = {}
        for r in rows:
            if r["method"] == which:
                by.setdefault(r["class_index"], {})[r["seed"]] = float(r["top1"])
        return by

    ours, theirs = verdicts(build, method), verdicts(baseline_build or build, baseline)
    out = {}
    for c in sorted(set(ours) & set(theirs)):
        seeds = sorted(set(ours[c]) & set(theirs[c]))
        if seeds:
            out[c] = (np.array([theirs[c][s] for s in seeds]), np.array([ours[c][s] for s in seeds]))
    if not out:
        raise SystemExit(f"{build}: no {method!r} images paired with {baseline!r} ones; run `synthaug evaluate` first.")
    return out


def summary(pairs: dict[int, tuple[np.ndarray, np.ndarray]], classes: list[int], draws: int, seed: int) -> str:
    base = np.mean([pairs[c][0].mean() for c in classes])
    lift = np.mean([pairs[c][1].mean() - pairs[c][0].mean() for c in classes])
    rng = np.random.default_rng(seed)
    boot = np.empty(draws)
    for i in range(draws):
        per_class = []
        for c in classes:
            b, m = pairs[c]
            pick = rng.integers(0, len(b), len(b))
            per_class.append(m[pick].mean() - b[pick].mean())
        boot[i] = np.mean(per_class)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    fixed = sum(int(((pairs[c][1] == 1) & (pairs[c][0] == 0)).sum()) for c in classes)
    broken = sum(int(((pairs[c][1] == 0) & (pairs[c][0] == 1)).sum()) for c in classes)
    share = f"{lift / (1 - base):.0%}" if base < 1 else "-"
    return (f"plain {100 * base:.1f}, token {100 * (base + lift):.1f}, lift {100 * lift:+.1f} "
            f"[95% CI {100 * lo:+.1f}, {100 * hi:+.1f}], errors fixed {share}, {fixed} fixed / {broken} broken")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--method", default="dct")
    parser.add_argument("--baseline", default="sd")
    parser.add_argument("--groups", action="append", default=[], metavar="NAME=C,C,...",
                        help="named class groups besides 'all', e.g. ambiguous=1,3,4,7,8,9")
    parser.add_argument("--baseline-build", type=Path, help="take the baseline images' verdicts from this build "
                        "(same seeds), for a build made without --baseline")
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pairs = paired(args.build, args.method, args.baseline, args.baseline_build)
    groups = {"all": sorted(pairs)}
    for g in args.groups:
        name, _, classes = g.partition("=")
        groups[name] = [int(c) for c in classes.split(",")]
    for name, classes in groups.items():
        print(f"{name}: {summary(pairs, classes, args.draws, args.seed)}")
    worst = min(pairs, key=lambda c: pairs[c][1].mean() - pairs[c][0].mean())
    print(f"worst class: {worst} ({100 * (pairs[worst][1].mean() - pairs[worst][0].mean()):+.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
