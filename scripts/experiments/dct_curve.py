"""Judge accuracy on held-out seeds along one DCT token's training run, on the embedded digits world (RESULTS.md).

Learns the token of one class with the digits defaults (plus `--set` overrides), snapshots ``v_c`` every `--every`
updates through `learn_dct_token`'s callback, then generates `--n` images per snapshot on the generation seeds
(`synthaug.generation.image_seed`, never the training seeds) and scores them with the independent judge and with the
guide (self-scoring). Shows whether more updates help, and whether the guide and the judge agree along the way.

    python scripts/dct_curve.py --cls 9 --set dct.max_steps=80 --set dct.patience=0 --set dct.stop_all_correct=false
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> dict:
    from synthaug.classifier.load import load_classifier
    from synthaug.config import load_config, parse_overrides
    from synthaug.datasets.digits import DIGIT_NAMES
    from synthaug.generation import image_seed
    from synthaug.models import load_diffusion
    from synthaug.tokens.dct import learn_dct_token
    from synthaug.tokens.io import add_tokens

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cls", type=int, default=9, help="class index (digit)")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. dct.max_steps=80")
    p.add_argument("--every", type=int, default=10, help="snapshot every this many updates")
    p.add_argument("--n", type=int, default=50, help="images per snapshot")
    p.add_argument("--gen", default="A photo of {token} {label}", help="generation prompt template")
    p.add_argument("--out", type=Path, help="JSON of every number")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    cfg = load_config(overrides={"dataset": "digits", **parse_overrides(args.set)})
    pipe = load_diffusion(cfg.model, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    guide, judge = load_classifier(cfg.guide, device="cpu"), load_classifier("digits-judge", device="cpu")
    c, name = args.cls, DIGIT_NAMES[args.cls]
    snaps: dict = {}

    def snapshot(entry: dict, v: torch.Tensor) -> None:
        if entry["step"] % args.every == 0:
            snaps[entry["step"]] = (v.clone(), entry["loss"], entry["accuracy"])

    t0 = time.time()
    result = learn_dct_token(pipe, guide, c, name, cfg.dct, callback=snapshot)
    seconds = time.time() - t0
    snaps["kept"] = (result.embedding.reshape(-1), None, None)

    def score(prompt: str) -> tuple[float, float]:
        generators = [torch.Generator().manual_seed(image_seed(cfg.generate.seed, c, i)) for i in range(args.n)]
        x = pipe(prompt, num_images_per_prompt=args.n, generator=generators, output_type="pt",
                 num_inference_steps=cfg.generate.num_inference_steps, guidance_scale=cfg.generate.guidance_scale,
                 height=cfg.generate.height, width=cfg.generate.width).images
        with torch.no_grad():
            return ((judge(x).argmax(-1) == c).float().mean().item(), (guide(x).argmax(-1) == c).float().mean().item())

    plain = score(args.gen.replace("{token}", "").replace("{label}", name).replace("  ", " ").strip())
    out = {"class": c, "set": args.set, "plain_judge": plain[0], "plain_guide": plain[1], "steps": result.steps,
           "stop": result.stop_reason, "kept_step": result.best_step, "token_seconds": round(seconds, 1), "curve": []}
    print(f"class {c} {name}: plain judge {plain[0]:.2f} guide {plain[1]:.2f}")
    print("| update | train loss | train acc | judge | guide (self) |\n|---|---|---|---|---|")
    for k, (v, loss, acc) in snaps.items():
        token = f"<curve-{k}>"
        add_tokens(pipe, {token: v.reshape(1, -1)})
        j, g = score(args.gen.replace("{token}", token).replace("{label}", name))
        out["curve"].append({"step": k, "train_loss": loss, "train_acc": acc, "judge": j, "guide": g})
        label = f"kept ({result.best_step})" if k == "kept" else k
        print(f"| {label} | {'' if loss is None else f'{loss:.2f}'} | {'' if acc is None else f'{acc:.2f}'} | "
              f"{j:.2f} | {g:.2f} |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
