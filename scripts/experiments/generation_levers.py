"""Judge accuracy of build variants against a base build's plain-prompt images on the same seeds (RESULTS.md
"Generation levers on tune seeds").

Each variant is a build folder next to BASE made from BASE's resolved config plus the variant's overrides. When the
overrides change only the images (``generate.*``), the variant starts from a copy of BASE's config, plan and tokens,
so its images use the very tokens BASE learned (a build whose tokens exist and whose change is image-only generates at
once); otherwise (``dct.num_vectors``...) it learns its own. Every variant is judged (`synthaug evaluate`), and each
of its methods is paired with BASE's ``sd`` images of the same (class, seed): per-class judge top-1 and the lift over
all selected classes with a 95% paired bootstrap interval (`judge_lift_ci.summary`).

    python scripts/experiments/generation_levers.py out/lv-base --judge digits-judge \
        --variant real-75 generate.init=real generate.strength=0.75 --variant n2 dct.num_vectors=2
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge_lift_ci import summary

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def verdicts(build: Path) -> dict[tuple[str, int, int], float]:
    """(method, class, seed) -> judge top-1 (0/1) of a judged build."""
    rows = pq.read_table(build / "eval" / "judge_images.parquet",
                         columns=["method", "class_index", "seed", "top1"]).to_pylist()
    return {(r["method"], r["class_index"], r["seed"]): float(r["top1"]) for r in rows}


def make_variant(base: Path, out: Path, overrides: dict, judge: str) -> None:
    from synthaug import build
    from synthaug.config import load_config
    from synthaug.evaluate import evaluate_judge

    if not (out / "index.parquet").is_file():
        if all(k.startswith("generate.") for k in overrides) and not out.exists():
            out.mkdir(parents=True)
            for name in ("config.yaml", "plan.json"):
                shutil.copy2(base / name, out / name)
            shutil.copytree(base / "tokens", out / "tokens")
        config = load_config(base / "config.yaml", {**overrides, "out": str(out)})
        result = build(config, progress=False)
        if not result.ok:
            raise SystemExit(f"variant {out} failed: {result}")
    if not (out / "eval" / "judge_images.parquet").is_file():
        evaluate_judge(out, judge, progress=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", type=Path, help="a finished build with the baseline (--baseline)")
    parser.add_argument("--judge", default="digits-judge")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="a variant: its name, then its config overrides")
    parser.add_argument("--classes", default=None, help="comma-separated class indices to summarise (default all)")
    parser.add_argument("--draws", type=int, default=4000)
    args = parser.parse_args()

    from synthaug.config import parse_overrides
    from synthaug.evaluate import evaluate_judge

    if not (args.base / "eval" / "judge_images.parquet").is_file():
        evaluate_judge(args.base, args.judge, progress=False)
    base = verdicts(args.base)
    classes = (sorted({c for (m, c, _) in base if m == "sd"}) if args.classes is None
               else [int(c) for c in args.classes.split(",")])
    runs = [("base", args.base)]
    for name, *pairs in args.variant:
        out = args.base.parent / f"{args.base.name}-{name}"
        make_variant(args.base, out, parse_overrides(pairs), args.judge)
        runs.append((name, out))
    import numpy as np

    header = "| variant | method | " + " | ".join(NAMES[c] for c in classes) + " | lift over base sd [95% CI] |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, out in runs:
        got = verdicts(out)
        for method in sorted({m for (m, _, _) in got}):
            pairs = {}
            for c in classes:
                seeds = sorted(s for (m, k, s) in got if m == method and k == c and ("sd", c, s) in base)
                pairs[c] = (np.array([base[("sd", c, s)] for s in seeds]), np.array([got[(method, c, s)] for s in seeds]))
            cells = " | ".join(f"{100 * pairs[c][1].mean():.0f}" for c in classes)
            print(f"| {name} | {method} | {cells} | {summary(pairs, classes, args.draws, 0)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
