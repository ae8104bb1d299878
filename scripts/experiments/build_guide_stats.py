"""What a build's index already says about its images and tokens, without running a model (RESULTS.md, "Making the tokens help").

Per method and class: the guide's top-1 on the generated images (from the stored ``guide_top5``: the guide scoring its
own images, to set beside the judge's numbers from `synthaug evaluate`); how many images a guide-confidence filter
keeps and, when `synthaug evaluate` has run, how many of those the judge calls right (``judge_prob`` >= 0.5); and per
token the updates run, the stop rule and the kept update (token metadata). With ``--keep N``: per method and class,
how many images (in sample-index order) it took for the filter to keep N, and the UNet calls the tokens cost.

    python scripts/build_guide_stats.py out/digits-i8 --min-confidence 0.9
    python scripts/experiments/build_guide_stats.py out/digits-report200 --keep 100
    python scripts/experiments/build_guide_stats.py out/tune-k3 --choose-below 0.5
    python scripts/experiments/build_guide_stats.py out/digits-k1 --rank 100

With ``--rank N``: per method, the guide probability of each class's N-th surest image (what ``rank="confidence"``
with ``synthetic_per_class=N`` amounts to as a threshold: min / median / max over the classes) and, after `synthaug
evaluate`, the share of those N per class the judge calls right, against the first N by sample index.

With ``--choose-below A`` (on a tune-seed build with ``--baseline``): the classes whose plain-prompt acceptance (the
share of ``sd`` images the guide gives >= --min-confidence) is below A — DCT only where plain prompts fail — printed
as the ``class_methods`` value of a `reproduce_table2.py` row (``--row NAME=BUILD:sd,class_methods={...}``).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import pyarrow.parquet as pq

    from synthaug.tokens.io import token_metadata

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("build", type=Path)
    p.add_argument("--min-confidence", type=float, default=0.9)
    p.add_argument("--keep", type=int, help="also: images generated until the filter kept this many per class")
    p.add_argument("--rank", type=int, metavar="N", help="also: the N surest images per class (rank='confidence')")
    p.add_argument("--choose-below", type=float, metavar="A",
                   help="also: the classes whose plain-prompt acceptance is below A, as a class_methods value")
    args = p.parse_args(argv)

    rows = pq.read_table(args.build / "index.parquet").to_pylist()
    guide_right, total, kept, kept_right = (defaultdict(int) for _ in range(4))
    for r in rows:
        key = (r["method"], r["class_index"])
        total[key] += 1
        guide_right[key] += bool(r["guide_top5"]) and r["guide_top5"][0] == r["class_index"]
        if r["guide_prob"] is not None and r["guide_prob"] >= args.min_confidence:
            kept[key] += 1
            kept_right[key] += r.get("judge_prob") is not None and r["judge_prob"] >= 0.5
    methods = sorted({m for m, _ in total})
    classes = sorted({c for _, c in total})
    print(f"| class | {' | '.join(f'guide top-1 {m}' for m in methods)} | "
          f"{' | '.join(f'kept at >= {args.min_confidence} {m}' for m in methods)} | token updates (stop), kept |")
    print("|---" * (1 + 2 * len(methods) + 1) + "|")
    for c in classes:
        token = args.build / "tokens" / f"{c:03d}.safetensors"
        meta = token_metadata(token) if token.is_file() else {}
        tok = f"{meta['steps']} ({meta['stop_reason']}), {meta['best_step']}" if meta else "-"
        print(f"| {c} | " + " | ".join(f"{100 * guide_right[(m, c)] / total[(m, c)]:.0f}" for m in methods) + " | "
              + " | ".join(str(kept[(m, c)]) for m in methods) + f" | {tok} |")
    for m in methods:
        n = sum(v for (mm, _), v in total.items() if mm == m)
        g = sum(v for (mm, _), v in guide_right.items() if mm == m)
        k = sum(v for (mm, _), v in kept.items() if mm == m)
        kr = sum(v for (mm, _), v in kept_right.items() if mm == m)
        print(f"{m}: guide top-1 {100 * g / n:.1f}% of {n}; kept at >= {args.min_confidence}: {k} "
              f"({100 * kr / max(k, 1):.1f}% right by the judge)")
    if args.keep:
        for m in methods:
            needed = []
            for c in classes:
                mine = sorted((r for r in rows if r["method"] == m and r["class_index"] == c), key=lambda r: r["index"])
                passed = [i for i, r in enumerate(mine, 1)
                          if r["guide_prob"] is not None and r["guide_prob"] >= args.min_confidence]
                needed.append(str(passed[args.keep - 1]) if len(passed) >= args.keep
                              else f"{len(passed)} kept of {len(mine)}")
            print(f"{m}: images generated to keep {args.keep} per class: {', '.join(needed)}")
        evals = [int(token_metadata(t).get("unet_evals", 0)) for t in sorted((args.build / "tokens").glob("[0-9]*.safetensors"))]
        print(f"tokens: {len(evals)} files, {sum(evals)} UNet calls to learn them (unet_evals)")
    if args.rank:
        def prob(r):
            return -1.0 if r["guide_prob"] is None else r["guide_prob"]

        for m in methods:
            cut, surest, first = [], [], []
            for c in classes:
                mine = [r for r in rows if r["method"] == m and r["class_index"] == c]
                best = sorted(mine, key=lambda r: (-prob(r), r["index"]))[:args.rank]
                cut.append(prob(best[-1]))
                surest += [r.get("judge_prob") is not None and r["judge_prob"] >= 0.5 for r in best]
                first += [r.get("judge_prob") is not None and r["judge_prob"] >= 0.5
                          for r in sorted(mine, key=lambda r: r["index"])[:args.rank]]
            print(f"{m}: the {args.rank}-th surest image per class has guide probability {min(cut):.2f} / "
                  f"{statistics.median(cut):.2f} / {max(cut):.2f} (min / median / max); right by the judge: "
                  f"{100 * sum(surest) / len(surest):.1f}% of the surest, {100 * sum(first) / len(first):.1f}% of "
                  f"the first {args.rank}")
    if args.choose_below is not None:
        if not any(m == "sd" for m, _ in total):
            raise SystemExit("--choose-below needs the plain-prompt images: a build made with --baseline")
        names = {r["class_index"]: r["class_name"] for r in rows}
        share = {c: kept[("sd", c)] / total[("sd", c)] for c in classes if total[("sd", c)]}
        low = [c for c in classes if share.get(c, 1.0) < args.choose_below]
        print("plain acceptance: " + ", ".join(f"{names[c]} {share[c]:.2f}" for c in classes if c in share))
        print(f"below {args.choose_below}: " + (", ".join(names[c] for c in low) or "none"))
        print("class_methods={" + ", ".join(f"{names[c]}: dct" for c in low) + "}")


if __name__ == "__main__":
    main()
