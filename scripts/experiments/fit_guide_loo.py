"""How far `synthaug fit-guide`'s leave-one-out estimate lies from the fitted guide's test accuracy (RESULTS.md, "The
k-shot user").

For each k and each draw of the k shots per class (``shots_seed`` 0..n-1), fit the guide on the digits "train" split
exactly as ``synthaug fit-guide`` does, and score it on the "test" split; print per k the mean test accuracy, the
mean leave-one-out estimate and the mean and largest |estimate - test| over the draws.

    python scripts/experiments/fit_guide_loo.py --shots 1,3,5,9 --draws 10
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    from synthaug.classifier.fit import fit_dataset_guide
    from synthaug.datasets import Digits

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shots", default="1,3,5,9")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--head", default="linear")
    p.add_argument("--backbone", default="digits")
    p.add_argument("--json", help="write every draw here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train, test = Digits(split="train"), Digits(split="test")
    x = torch.stack([torch.from_numpy(np.array(test[i][0])).permute(2, 0, 1).float() / 255 for i in range(len(test))])
    y = torch.tensor(test.targets)
    rows = []
    print("| k | test accuracy | leave-one-out (nested) | mean abs gap | largest gap | the chosen setting's own "
          "leave-one-out | features chosen |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for k in [int(v) for v in args.shots.split(",")]:
        mine = []
        for seed in range(args.draws):
            guide, record = fit_dataset_guide(train, None, shots=k, shots_seed=seed, backbone=args.backbone,
                                              head=args.head)
            acc = float((guide.predict(x).argmax(-1) == y).float().mean())
            mine.append({"k": k, "seed": seed, "test": acc, "loo": record.loo_accuracy, "features": record.features,
                         "selected": record.selected_loo_accuracy, "strength": record.strength})
        rows += mine
        test_acc = np.array([r["test"] for r in mine])
        loo = np.array([np.nan if r["loo"] is None else r["loo"] for r in mine])
        gap = np.abs(loo - test_acc)
        sel = np.array([np.nan if r["selected"] is None else r["selected"] for r in mine])
        feats = ", ".join(f"{f} {sum(r['features'] == f for r in mine)}" for f in sorted({r["features"] for r in mine}))
        fmt = (lambda v: "n/a" if np.isnan(v) else f"{100 * v:.1f}")
        print(f"| {k} | {100 * test_acc.mean():.1f} ± {100 * test_acc.std(ddof=1):.1f} | "
              f"{fmt(np.nanmean(loo)) if not np.isnan(loo).all() else 'n/a'} | "
              f"{fmt(np.nanmean(gap)) if not np.isnan(gap).all() else 'n/a'} | "
              f"{fmt(np.nanmax(gap)) if not np.isnan(gap).all() else 'n/a'} | "
              f"{fmt(np.nanmean(sel)) if not np.isnan(sel).all() else 'n/a'} | {feats} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
