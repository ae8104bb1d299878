"""How a token's trust verdict depends on the check's own seed and size (RESULTS.md "How stable is a verdict?").

Loads a finished DCT build's pipeline, guide and tokens, draws the user's k real images per class as a build does
(``few_shot_indices(targets, k, shots_seed)``), and runs `check_token_trust` for every class in the guide's and in
CLIP's feature space, once per ``IMAGES:SEED`` run. Prints one line per run and space: per class ``ok``/``NO`` and the
token's / the plain prompt's check images that landed on the class.

    python scripts/experiments/trust_stability.py build/digits-k5guide --shots 5 --runs 8:0 8:1 8:2 32:1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch

    from synthaug.classifier.load import load_classifier
    from synthaug.config import load_config
    from synthaug.datasets.catalog import get_dataset
    from synthaug.datasets.fewshot import few_shot_indices
    from synthaug.generation import generate
    from synthaug.models import load_diffusion
    from synthaug.tokens.clip import default_clip_model, image_features, load_clip
    from synthaug.tokens.io import add_tokens, load_tokens
    from synthaug.tokens.trust import check_token_trust

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("build", type=Path, help="a finished DCT build")
    p.add_argument("--shots", type=int, default=5, help="real images per class the check reads (the build's shots)")
    p.add_argument("--shots-seed", type=int, default=0, help="the seed that picks them (shots_seed)")
    p.add_argument("--runs", nargs="+", default=["8:0", "8:1", "8:2"], metavar="IMAGES:SEED",
                   help="check images per prompt and the check's base seed (dct.trust_images, dct.seed)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    cfg = load_config(args.build / "config.yaml")
    pipe = load_diffusion(cfg.model, device="cpu", dtype=cfg.dtype, scheduler=cfg.scheduler)
    guide = load_classifier(cfg.guide, device="cpu")
    add_tokens(pipe, load_tokens(args.build / "tokens" / "tokens.safetensors"))
    clip_source = cfg.mcti.clip_model if cfg.mcti.clip_model is not None else default_clip_model(cfg.model)
    clip = load_clip(clip_source)
    dataset = get_dataset(cfg.dataset, cfg.root, cfg.split)
    real: dict[int, list] = {}
    for i in few_shot_indices(dataset.targets, args.shots, args.shots_seed, allow_fewer=True):
        real.setdefault(int(dataset.targets[i]), []).append(dataset[i][0])
    classes = json.loads((args.build / "classes.json").read_text())
    spaces = {"guide": None, "clip": lambda x: image_features(clip, x)}
    for run in args.runs:
        images, seed = (int(v) for v in run.split(":"))
        for name, features in spaces.items():
            cells = []
            for c in classes:
                v = check_token_trust(pipe, guide, class_index=c["index"], label=c["name"], token=c["token"],
                                      real_images=real, config=cfg.generate, images=images, seed=seed,
                                      features=features, features_name=name, generate=generate)
                cells.append(f"{c['name']}:{'ok' if v.trusted else 'NO'}"
                             f"({round(v.token_on_class * images)}/{round(v.plain_on_class * images)})")
            print(f"images={images} seed={seed} {name}: {' '.join(cells)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
