"""DCT vs plain prompt on the embedded digits world: judge accuracy on the same seeds (RESULTS.md, "Digits world").

For each class: learn a DCT token with the guide (the digits defaults of `synthaug.config`, or `--set` overrides),
then generate `--per-class` images with the plain prompt and with the token on identical seeds
(`synthaug.generation.generate`), and score both with the independent judge (trained on another split, another
architecture) and with the guide (self-scoring, flattering by construction). Writes a JSON of every number and prints
a markdown table.

    python scripts/digits_first_numbers.py --per-class 50 --out build/digits-first-numbers.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]

CLEAN = (0, 2, 5, 6)  # never swapped in the world's captions (synthaug/assets/digits/README.md)


def _scores(classifier, images, class_index: int) -> list[int]:
    x = torch.stack([torch.from_numpy(np.asarray(g.image, dtype=np.float32) / 255.0).permute(2, 0, 1)
                     for g in images])
    with torch.no_grad():
        return (classifier(x).argmax(-1) == class_index).int().tolist()


def main(argv: list[str] | None = None) -> dict:
    from synthaug.classifier.load import load_classifier
    from synthaug.config import load_config, parse_overrides
    from synthaug.datasets.digits import DIGIT_NAMES
    from synthaug.generation import generate
    from synthaug.models import load_diffusion
    from synthaug.tokens.dct import learn_dct_token
    from synthaug.tokens.io import add_tokens

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--classes", default="0-9", help="e.g. 0-9 or 1,7")
    p.add_argument("--set", action="append", default=[], help="config override, e.g. dct.max_steps=30")
    p.add_argument("--judge", default="digits-judge", help="the independent classifier that scores the images")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "build" / "digits-first-numbers.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_config(overrides={"dataset": "digits", **parse_overrides(args.set)})
    lo_hi = args.classes.split("-")
    classes = list(range(int(lo_hi[0]), int(lo_hi[1]) + 1)) if len(lo_hi) == 2 else [int(c) for c in args.classes.split(",")]
    # `--set scheduler=...` and `--set timestep_spacing=...` as in a build
    pipe = load_diffusion(cfg.model, device="cpu", scheduler=cfg.scheduler, timestep_spacing=cfg.timestep_spacing)
    guide = load_classifier(cfg.guide, device="cpu")
    judge = load_classifier(args.judge, device="cpu")
    rows = []
    started = time.time()
    for c in classes:
        name = DIGIT_NAMES[c]
        t0 = time.time()
        result = learn_dct_token(pipe, guide, c, name, cfg.dct)
        token_seconds = time.time() - t0
        add_tokens(pipe, {result.token: result.embedding})
        indices = range(args.per_class)
        plain = generate(pipe, class_index=c, label=name, token=None, indices=indices, config=cfg.generate)
        dct = generate(pipe, class_index=c, label=name, token=result.token, indices=indices, config=cfg.generate)
        jp, jd = _scores(judge, plain, c), _scores(judge, dct, c)
        gp, gd = _scores(guide, plain, c), _scores(guide, dct, c)
        row = {"class": c, "name": name, "kind": "clean" if c in CLEAN else "ambiguous",
               "judge_plain": float(np.mean(jp)), "judge_dct": float(np.mean(jd)),
               "guide_plain": float(np.mean(gp)), "guide_dct": float(np.mean(gd)),
               "fixed": int(sum(1 for a, b in zip(jp, jd) if not a and b)),
               "broken": int(sum(1 for a, b in zip(jp, jd) if a and not b)),
               "token_steps": result.steps, "stop_reason": result.stop_reason, "best_step": result.best_step,
               "token_seconds": round(token_seconds, 1)}
        print(json.dumps(row), flush=True)
        row["history"] = result.history  # per update: loss, accuracy, lr, val_accuracy/val_prob where validated
        rows.append(row)
    summary = {"config": {"dct": cfg.dct.__dict__, "generate": cfg.generate.__dict__}, "per_class": args.per_class,
               "rows": rows, "seconds": round(time.time() - started, 1)}
    for kind in ("all", "ambiguous", "clean"):
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        if sel:
            summary[kind] = {k: float(np.mean([r[k] for r in sel]))
                             for k in ("judge_plain", "judge_dct", "guide_plain", "guide_dct")}
            summary[kind].update(fixed=sum(r["fixed"] for r in sel), broken=sum(r["broken"] for r in sel))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, default=str))
    print(markdown(summary))
    return summary


def markdown(summary: dict) -> str:
    lines = [("| class | kind | judge plain | judge DCT | fixed / broken | guide plain | guide DCT (self-scoring) | "
             "token steps (stop) |"), "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        lines.append(f"| {r['class']} {r['name']} | {r['kind']} | {r['judge_plain']:.2f} | {r['judge_dct']:.2f} | "
                     f"{r['fixed']} / {r['broken']} | {r['guide_plain']:.2f} | {r['guide_dct']:.2f} | "
                     f"{r['token_steps']} ({r['stop_reason']}) |")
    for kind in ("all", "ambiguous", "clean"):
        if kind in summary:
            s = summary[kind]
            lines.append(f"| **{kind}** | | **{s['judge_plain']:.3f}** | **{s['judge_dct']:.3f}** | "
                         f"{s['fixed']} / {s['broken']} | {s['guide_plain']:.3f} | {s['guide_dct']:.3f} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
