"""A guide's accuracy on the digits test split, the share of test images it gives at least a confidence threshold,
and its accuracy on those (RESULTS.md, "The k-shot user": what a 0.9 filter means for each guide).

    python scripts/experiments/guide_test_accuracy.py build/guides/clip-k1 build/guides/clip-k3 build/guides/clip-k5
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    from synthaug.classifier import load_classifier
    from synthaug.datasets import Digits

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("guides", nargs="+", help="classifier sources (folders, embedded names, 'A,B' ensembles)")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = Digits(split=args.split)
    x = torch.stack([torch.from_numpy(np.array(data[i][0])).permute(2, 0, 1).float() / 255 for i in range(len(data))])
    y = torch.tensor(data.targets)
    print(f"| guide | accuracy | share >= {args.threshold:g} | accuracy there |")
    print("|---|---:|---:|---:|")
    for source in args.guides:
        probs = load_classifier(source, device="cpu").predict(x)
        right = probs.argmax(-1) == y
        sure = probs.max(-1).values >= args.threshold
        there = f"{100 * float(right[sure].float().mean()):.1f}%" if sure.any() else "n/a"
        print(f"| {source} | {100 * float(right.float().mean()):.1f}% | {100 * float(sure.float().mean()):.0f}% | "
              f"{there} |")


if __name__ == "__main__":
    main()
