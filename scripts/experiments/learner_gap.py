"""Why do linear and kernel learners on 8x8 pixels rank DCT images above plain-prompt ones while the Table 2 CNN ties?

The two protocols differ in the learner and in five settings around it. This study trains both kinds of learner on
the same data (k real digits per class from the train split, drawn by `few_shot_indices` with the draw's seed, plus the
first N synthetic images per class of one method of a build; the same real images for sd and dct in every draw) and
moves one setting at a time from the Table 2 protocol towards the pixel learners' one:

- scikit-learn learners (logistic regression, RBF SVM, random forest, 1-NN) on grey pixels at 8x8 (box-averaged from
  the 32 px images) or 32x32, standardised, the real and synthetic images simply concatenated — or, with
  ``--balance``, weighted so that the synthetic images carry half of the total weight, as ``ratio`` mixing with
  p = 0.5 gives them half of every epoch (1-NN takes no weights and is left out then);
- the Table 2 CNN (`synthaug.evaluate.downstream`'s default: resnet10t, widths 16-128, AdamW 2e-3, weight decay 0.05,
  batch 64, 5% warm-up and cosine decay, ImageNet normalisation, random crops with edge padding of size/8) trained in
  memory, with the settings `--cnn` names changed: ``size=8`` (the 8x8 grey pixels, replicated to RGB), ``norm=none``
  ([0, 1] pixels), ``aug=none``, ``mix=concat`` (every image uniformly, instead of synthetic images as a fraction `p`
  of every batch), ``steps=N``, ``syn=N`` (synthetic images per class).

Everything is tested on the real test split. Prints, per learner and k, the mean top-1 of real-only, sd and dct and
the paired dct - sd difference with its 95% t-interval over draws, and writes every cell to ``--out``.

    python scripts/experiments/learner_gap.py out/digits-report --shots 1,3,5 --draws 10 --out gap.json
    python scripts/experiments/learner_gap.py out/digits-report --shots 3 --draws 5 --sklearn none \\
        --cnn base --cnn size=8 --cnn aug=none --cnn mix=concat,syn=20 --out gap-cnn.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
from scipy import stats

SKLEARN = ("logreg", "svm", "forest", "1nn")
CNN_BASE = {"size": 32, "norm": "imagenet", "aug": "crop", "mix": "ratio", "p": 0.5, "steps": 200, "syn": 100}


def grey(images: np.ndarray, size: int) -> np.ndarray:
    """[N, 32, 32, 3] uint8 -> [N, size, size] float in [0, 1]: channel mean, then box average down to `size`."""
    g = images.astype(np.float64).mean(axis=-1) / 255.0
    f = g.shape[1] // size
    return g.reshape(len(g), size, f, size, f).mean(axis=(2, 4))


def load_synthetic(build: Path, method: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `per_class` images per class of `method` ([N, H, W, 3] uint8) and their classes."""
    from synthaug.mix import SynthAugDataset

    ds = SynthAugDataset(build, methods=[method], synthetic_per_class=per_class)
    images = np.stack([np.asarray(ds.load_synthetic(r).convert("RGB")) for r in range(len(ds))])
    return images, np.asarray(ds.synthetic["class_index"], dtype=np.int64)


def sklearn_top1(name: str, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int,
                 weight: np.ndarray | None = None) -> float:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    model = {"logreg": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
             "svm": lambda: make_pipeline(StandardScaler(), SVC()),
             "forest": lambda: RandomForestClassifier(n_estimators=200, random_state=seed),
             "1nn": lambda: KNeighborsClassifier(n_neighbors=1)}[name]()
    if weight is None:
        model.fit(x.reshape(len(x), -1), y)
    else:
        last = model.steps[-1][0] + "__sample_weight" if hasattr(model, "steps") else "sample_weight"
        model.fit(x.reshape(len(x), -1), y, **{last: weight})
    return float((model.predict(x_test.reshape(len(x_test), -1)) == y_test).mean())


def cnn_top1(cfg: dict, real: tuple[np.ndarray, np.ndarray], syn: tuple[np.ndarray, np.ndarray] | None,
             test: tuple[np.ndarray, np.ndarray], seed: int) -> float:
    """The Table 2 CNN trained in memory on [N, S, S] grey images in [0, 1] (replicated to RGB), with `cfg`."""
    import torch
    from torch import nn

    from synthaug.evaluate.downstream import build_model, default_arch

    def tensor(a):
        t = torch.from_numpy(a).float()[:, None].expand(-1, 3, -1, -1)
        if cfg["norm"] == "imagenet":
            mean = torch.tensor((0.485, 0.456, 0.406))[None, :, None, None]
            std = torch.tensor((0.229, 0.224, 0.225))[None, :, None, None]
            t = (t - mean) / std
        return t.contiguous()

    torch.manual_seed(seed)
    arch, kwargs = default_arch(32)
    model = build_model(arch, 10, kwargs, None)
    xr, yr = tensor(real[0]), torch.from_numpy(real[1])
    xs, ys = (tensor(syn[0]), torch.from_numpy(syn[1])) if syn is not None else (xr[:0], yr[:0])
    g = torch.Generator().manual_seed(seed)
    size, steps, bs = cfg["size"], cfg["steps"], 64
    pad = max(1, size // 8)

    def batch():
        if len(xs) == 0 or len(xr) == 0 or cfg["mix"] == "concat":
            x_all, y_all = torch.cat([xr, xs]), torch.cat([yr, ys])
            i = torch.randint(len(x_all), (bs,), generator=g)
            return x_all[i], y_all[i]
        from_syn = torch.rand(bs, generator=g) < cfg["p"]
        i_r = torch.randint(len(xr), (bs,), generator=g)
        i_s = torch.randint(len(xs), (bs,), generator=g)
        x = torch.where(from_syn[:, None, None, None], xs[i_s], xr[i_r])
        return x, torch.where(from_syn, ys[i_s], yr[i_r])

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    for _ in range(steps):
        x, y = batch()
        if cfg["aug"] == "crop":
            x = nn.functional.pad(x, (pad,) * 4, mode="replicate")
            dx, dy = torch.randint(2 * pad + 1, (2, len(x)), generator=g)
            x = torch.stack([x[j, :, dy[j]:dy[j] + size, dx[j]:dx[j] + size] for j in range(len(x))])
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(c).argmax(-1) for c in tensor(test[0]).split(256)])
    return float((pred == torch.from_numpy(test[1])).float().mean())


def parse_cnn(spec: str) -> dict:
    cfg = dict(CNN_BASE)
    for part in filter(None, spec.split(",")):
        if part == "base":
            continue
        key, _, value = part.partition("=")
        if key not in cfg:
            raise SystemExit(f"--cnn {spec!r}: unknown setting {key!r}; known: {', '.join(cfg)}")
        cfg[key] = type(CNN_BASE[key])(value)
    return cfg


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds]) * 100
    if len(d) < 2:
        return "n/a"
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    p = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).pvalue if d.std() > 0 else 1.0
    return f"{d.mean():+.1f} ± {half:.1f} (p = {p:.2g})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--shots", default="1,3,5")
    parser.add_argument("--draws", type=int, default=10, help="seeds of the real draw (and of the learner)")
    parser.add_argument("--first-draw", type=int, default=0)
    parser.add_argument("--synthetic-per-class", type=int, default=20, help="for the scikit-learn learners")
    parser.add_argument("--sklearn", default=",".join(SKLEARN), help="learners, or 'none'")
    parser.add_argument("--pixels", type=int, default=8, help="scikit-learn input size: 8 or 32")
    parser.add_argument("--balance", action="store_true", help="scikit-learn: synthetic images get half the weight")
    parser.add_argument("--cnn", action="append", default=[], help="a CNN setting, e.g. base or size=8,aug=none")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="JSON of every cell (resumed when present)")
    args = parser.parse_args()

    import torch

    from synthaug.datasets.digits import digits_arrays
    from synthaug.datasets.fewshot import few_shot_indices

    torch.set_num_threads(args.threads)
    shots = [int(k) for k in args.shots.split(",")]
    draws = range(args.first_draw, args.first_draw + args.draws)
    learners = [] if args.sklearn == "none" else args.sklearn.split(",")
    if args.balance:
        learners = [x for x in learners if x != "1nn"]
    cnns = {spec: parse_cnn(spec) for spec in args.cnn}
    train32, y_train = digits_arrays("train")
    test32, y_test = digits_arrays(args.test_split)
    rgb = {m: load_synthetic(args.build, m, max([args.synthetic_per_class] + [c["syn"] for c in cnns.values()]))
           for m in ("sd", "dct")}

    def syn(method: str, per_class: int, size: int):
        images, classes = rgb[method]
        keep = np.concatenate([np.flatnonzero(classes == c)[:per_class] for c in range(10)])
        return grey(images[keep], size), classes[keep]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    cells = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for k in shots:
        for d in draws:
            idx = few_shot_indices(y_train.tolist(), k, d) if k else []
            for learner in learners + list(cnns):
                for method in ("real", "sd", "dct"):
                    if method == "real" and k == 0:
                        continue
                    name = learner if learner in SKLEARN else f"cnn[{learner}]"
                    px = f"{args.pixels}{' balanced' if args.balance else ''}" if learner in SKLEARN else ""
                    key = f"{name}|{px}|{k}|{d}|{method}"
                    if key in cells:
                        continue
                    t0 = time.perf_counter()
                    size = args.pixels if learner in SKLEARN else cnns[learner]["size"]
                    per_class = args.synthetic_per_class if learner in SKLEARN else cnns[learner]["syn"]
                    real = (grey(np.repeat(train32[idx][..., None], 3, -1), size), y_train[idx])
                    test = (grey(np.repeat(test32[..., None], 3, -1), size), y_test)
                    s = None if method == "real" else syn(method, per_class, size)
                    if learner in SKLEARN:
                        x = real[0] if s is None else np.concatenate([real[0], s[0]])
                        y = real[1] if s is None else np.concatenate([real[1], s[1]])
                        weight = None
                        if args.balance and s is not None and len(real[1]):
                            weight = np.concatenate([np.full(len(real[1]), 1.0 / len(real[1])),
                                                     np.full(len(s[1]), 1.0 / len(s[1]))]) * len(y) / 2
                        top1 = sklearn_top1(learner, x, y, *test, seed=d, weight=weight)
                    else:
                        top1 = cnn_top1(cnns[learner], real, s, test, seed=d)
                    cells[key] = top1
                    args.out.write_text(json.dumps(cells, indent=1))
                    print(f"{key}: {100 * top1:.1f} ({time.perf_counter() - t0:.1f} s)", flush=True)

    # Summary: learner x k -> real, sd, dct means and the paired dct - sd.
    table: dict[tuple[str, str, int], dict[str, dict[int, float]]] = {}
    for key, top1 in cells.items():
        name, px, k, d, method = key.split("|")
        table.setdefault((name, px, int(k)), {}).setdefault(method, {})[int(d)] = top1
    print("\n| learner | k | draws | real | sd | dct | dct - sd (paired, 95% CI) | dct - real |\n|---|---|---|---|---|---|---|---|")
    for (name, px, k), by in sorted(table.items()):
        mean = {m: f"{100 * np.mean(list(v.values())):.1f}" for m, v in by.items()}
        label = f"{name} {px.split()[0]}x{px}" if px else name
        print(f"| {label} | {k} | {len(by.get('dct', {}))} | {mean.get('real', '-')} | {mean.get('sd', '-')} | "
              f"{mean.get('dct', '-')} | {paired(by.get('dct', {}), by.get('sd', {}))} | "
              f"{paired(by.get('dct', {}), by['real']) if 'real' in by else '-'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
