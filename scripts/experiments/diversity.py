"""How varied the images a learner trains on are, and how much of the real class they cover (RESULTS.md, "Why
correct DCT images teach less").

For every method of a build (and the same with the guide's confidence filter) it takes exactly the images a training
row takes (`SynthAugDataset(methods=[m], min_confidence=..., synthetic_per_class=N)`: the first N per class in
sample-index order) and measures, per class, in two feature spaces — the judge's penultimate features and the
digits CLIP's image embedding (neither steered the tokens; both L2-normalised):

- ``spread``: mean pairwise cosine distance between the class's synthetic images;
- ``vendi``: the Vendi score, exp of the entropy of the eigenvalues of their cosine-similarity matrix / n: the
  effective number of distinct images (1 = all the same, n = all orthogonal);
- ``to_real``: mean cosine distance from each synthetic image to its nearest real image of the class;
- ``coverage``: the share of the class's real images that have a synthetic image nearer than their 3rd-nearest real
  neighbour (Naeem et al.'s coverage: how much of the real class the synthetic set reaches);
- ``judge``: the judge's accuracy on them.

The real images are the ``--real-split`` (default ``judge``: the judge's own split, never trained on by the
generator, the guides or a downstream learner; analysis only, nothing here chooses a setting).

    python scripts/experiments/diversity.py build/digits-clipk3 --keep 100 --json build/digits-clipk3/eval/diversity.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def vendi(feats: torch.Tensor) -> float:
    """exp(entropy of the eigenvalues of K / n), K the cosine-similarity matrix of `feats` (rows L2-normalised)."""
    n = len(feats)
    if n == 0:
        return float("nan")
    w = torch.linalg.eigvalsh((feats @ feats.T / n).double()).clamp_min(0)
    w = w[w > 1e-12]
    return float(torch.exp(-(w * w.log()).sum()))


def class_metrics(syn: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    sim = syn @ syn.T
    n = len(syn)
    spread = float((1 - sim)[~torch.eye(n, dtype=torch.bool)].mean()) if n > 1 else float("nan")
    to_real = float((1 - (syn @ real.T).max(dim=1).values).mean())
    rr = 1 - real @ real.T
    rr.fill_diagonal_(float("inf"))
    radius = rr.topk(3, dim=1, largest=False).values[:, -1]  # each real image's 3rd-nearest real neighbour
    nearest_syn = (1 - real @ syn.T).min(dim=1).values
    return {"spread": spread, "vendi": vendi(syn), "to_real": to_real,
            "coverage": float((nearest_syn < radius).float().mean())}


def main(argv: list[str] | None = None) -> None:
    from synthaug.classifier import load_classifier
    from synthaug.datasets import Digits
    from synthaug.mix import SynthAugDataset
    from synthaug.tokens.clip import image_features, load_clip

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("build", type=Path)
    p.add_argument("--keep", type=int, default=100, help="images per class, as a training row takes them")
    p.add_argument("--min-confidence", type=float, default=0.9, help="the filtered variant's threshold")
    p.add_argument("--methods", default="sd,dct")
    p.add_argument("--real-split", default="judge")
    p.add_argument("--judge", default="digits-judge")
    p.add_argument("--json", type=Path, help="write every number here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    judge = load_classifier(args.judge, device="cpu")
    clip = load_clip(None)
    real = Digits(split=args.real_split)
    to_t = lambda im: torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
    real_x = torch.stack([to_t(real[i][0]) for i in range(len(real))])
    real_y = torch.tensor(real.targets)

    def spaces(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"judge": F.normalize(judge.features(x), dim=-1), "clip": image_features(clip, x)}

    real_f = spaces(real_x)
    results: dict[str, dict] = {}
    for method in args.methods.split(","):
        for conf in (None, args.min_confidence):
            name = method + ("" if conf is None else f"+conf{conf:g}")
            ds = SynthAugDataset(args.build, methods=[method], min_confidence=conf, synthetic_per_class=args.keep)
            x = torch.stack([to_t(ds[i][0]) for i in range(len(ds))])
            y = torch.tensor([ds.source(i).target for i in range(len(ds))])
            feats = spaces(x)
            with torch.no_grad():
                right = (judge.predict(x).argmax(-1) == y).float()
            per_class = {}
            for c in sorted(set(y.tolist())):
                m = y == c
                per_class[real.classes[c]] = {
                    "n": int(m.sum()), "judge": float(right[m].mean()),
                    **{f"{s}_{k}": v for s in feats for k, v in
                       class_metrics(feats[s][m], real_f[s][real_y == c]).items()}}
            keys = next(iter(per_class.values())).keys()
            results[name] = {"mean": {k: float(np.mean([pc[k] for pc in per_class.values()])) for k in keys},
                             "per_class": per_class}
    cols = ["n", "judge", "judge_spread", "judge_vendi", "judge_to_real", "judge_coverage", "clip_spread",
            "clip_vendi", "clip_to_real", "clip_coverage"]
    print("| set | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r['mean'][c]:.3f}" if c != "n" else f"{r['mean'][c]:.0f}"
                                            for c in cols) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
