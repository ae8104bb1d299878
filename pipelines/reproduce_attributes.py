"""Attribute tokens (the DCT paper's "Face attributes", on the digits world): does a token learned from one output
of a multi-label guide make the generator produce the attribute, as an independent judge sees it?

    python pipelines/reproduce_attributes.py --out /tmp/attributes --set seeds=report --results RESULTS.md

For every attribute of the guide (``--attributes``, default all of its outputs) and every value (``--values``,
default ``1,0``):

1. learn the attribute token with `synthaug.commands.learn_tokens` (``guide_target = "attribute:NAME=V"``, the
   prompt has no class name: ``--prompt``, default ``"A photo of {token}"``); a token file already in
   ``OUT/tokens`` is loaded, not learned again;
2. generate ``-n`` images with the token, and ``-n`` with the plain prompt (the token dropped) on the same seeds;
3. the judge (``--judge``, default ``digits-judge``, a digit classifier that never guides) predicts each image's
   digit, mapped to the attribute by the guide's ``attribute_classes`` (its config.json; the digits world's model
   card); attribute accuracy = the fraction of images whose judged digit has the wanted value, with a 95% paired
   bootstrap interval over image seeds (4,000 draws) for token, plain and their difference. The guide's own verdict
   (sigmoid > 0.5) is reported beside it, labelled self-scored.

Writes ``OUT/attributes.json`` and ``OUT/attributes.md``; with ``--results FILE`` the table also replaces the block
``<!-- synthaug:attributes-digits begin/end -->`` of FILE. Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from synthaug.atomic import write_text
from synthaug.classifier import load_classifier
from synthaug.classifier.source import config_file
from synthaug.cli import configure_logging
from synthaug.commands import learn_tokens
from synthaug.config import load_config, parse_overrides, replace, to_dict
from synthaug.errors import UserError
from synthaug.generation import image_seed
from synthaug.models import load_diffusion
from synthaug.report import rerun_command, write_results_block
from synthaug.target import parse_guide_target
from synthaug.tokens import add_tokens
from synthaug.tokens.text import render_prompt

DRAWS = 4000


def bootstrap(token: np.ndarray, plain: np.ndarray, draws: int = DRAWS, seed: int = 0) -> dict[str, list[float]]:
    """95% intervals (percent) of the token's, the plain prompt's and their paired difference's mean, resampling
    image seeds with replacement (the same resample for both: the images are paired by seed)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(token), size=(draws, len(token)))
    t, p = token[idx].mean(1) * 100, plain[idx].mean(1) * 100
    return {name: [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]
            for name, x in (("token", t), ("plain", p), ("delta", t - p))}


def attribute_classes(guide: str, given: str | None) -> dict[str, list[str]]:
    """{attribute: judge labels that have it}: ``--attribute-classes`` JSON, else the guide's config.json."""
    if given is not None:
        try:
            data = json.loads(given)
        except ValueError:
            raise UserError(f"`--attribute-classes` {given[:60]!r} is not JSON: pass e.g. "
                            "'{\"closed_loop\": [\"zero\", \"six\"]}'.") from None
    else:
        path = config_file(guide)
        data = json.loads(path.read_text()).get("attribute_classes") if path is not None else None
        if not data:
            raise UserError(f"`--guide` {guide!r} declares no attribute_classes in its config.json: pass "
                            "--attribute-classes '{\"NAME\": [judge labels with it], ...}'.")
    return {str(k): [str(v) for v in vs] for k, vs in data.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the tokens and the results")
    parser.add_argument("--guide", default="digits-attr-guide", help="multi-label guide (sigmoid outputs)")
    parser.add_argument("--judge", default="digits-judge", help="independent digit classifier (never guides)")
    parser.add_argument("--attributes", help="comma-separated guide outputs (default: all)")
    parser.add_argument("--values", default="1,0", help="attribute values to learn tokens for")
    parser.add_argument("--attribute-classes", help="JSON {attribute: [judge labels]} (default: the guide's config)")
    parser.add_argument("--prompt", default="A photo of {token}", help="training and generation template")
    parser.add_argument("-n", type=int, default=200, help="images per token (and plain) on the same seeds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set seeds=report --set dct.max_steps=30")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", help="markdown file whose synthaug:attributes-digits block gets the table")
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(timestamps=True)
    command = rerun_command("pipelines/reproduce_attributes.py", argv)
    out = Path(args.out)
    try:
        if args.n <= 0:
            raise UserError(f"`-n` must be > 0 but is {args.n}.")
        base = load_config(overrides={"dataset": "digits", "guide": args.guide, "device": args.device,
                                      "dct.prompts": [args.prompt], "generate.prompt": args.prompt,
                                      **parse_overrides(args.overrides)})
        classes = attribute_classes(args.guide, args.attribute_classes)
        names = args.attributes.split(",") if args.attributes else list(classes)
        targets = [parse_guide_target(f"attribute:{a}={v}", "--attributes/--values")
                   for a in names for v in args.values.split(",")]
        missing = [t.attribute for t in targets if t.attribute not in classes]
        if missing:
            raise UserError(f"`--attributes` {missing[0]!r} has no entry in the attribute classes "
                            f"({', '.join(classes)}): pass --attribute-classes.")
        results = [learn_tokens(replace(base, guide_target=str(t)), out=out / "tokens", progress=not args.quiet)[0]
                   for t in targets]
        pipe = load_diffusion(base.model, device=base.device, dtype=base.dtype, scheduler=base.scheduler,
                              timestep_spacing=base.timestep_spacing)
        judge = load_classifier(args.judge, device=pipe.device)
        guide = load_classifier(args.guide, device=pipe.device)
    except UserError as e:
        print(f"reproduce_attributes: error: {e}", file=sys.stderr)
        return 2

    add_tokens(pipe, {r.token: r.embedding for r in results})
    seeds_of = 0  # every variant's image i uses image_seed(generate.seed, 0, i): all paired on the same seeds

    pipe.set_progress_bar_config(disable=True)
    g = base.generate

    def judged(token: str | None) -> tuple[list[str], torch.Tensor]:
        # the stock pipeline call, image i on noise seed image_seed(generate.seed, 0, i) for every variant
        prompt, pil = render_prompt(g.prompt, "", token), []
        for lo in range(0, args.n, g.batch_size):
            ids = range(lo, min(lo + g.batch_size, args.n))
            gens = [torch.Generator("cpu").manual_seed(image_seed(g.seed, seeds_of, i)) for i in ids]
            pil += pipe([prompt] * len(ids), num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale,
                        height=g.height, width=g.width, generator=gens).images
        digits = [judge.labels[i] for i in judge.predict(pil).argmax(-1).tolist()]
        return digits, torch.sigmoid(guide(torch.stack([_to_tensor(p) for p in pil])).detach())

    plain_digits, plain_guide = judged(None)
    rows = []
    for t, r in zip(targets, results):
        digits, guide_probs = judged(r.token)
        col = guide.labels.index(t.attribute)
        with_it = set(classes[t.attribute])
        tok = np.array([d in with_it for d in digits]) == bool(t.value)
        plain = np.array([d in with_it for d in plain_digits]) == bool(t.value)
        g_tok = ((guide_probs[:, col] > 0.5) == bool(t.value)).float().mean().item()
        g_plain = ((plain_guide[:, col] > 0.5) == bool(t.value)).float().mean().item()
        rows.append({"target": str(t), "token": r.token, "steps": r.steps, "stop_reason": r.stop_reason,
                     "best_step": r.best_step, "judge_token": float(tok.mean() * 100),
                     "judge_plain": float(plain.mean() * 100), "ci": bootstrap(tok.astype(float), plain.astype(float)),
                     "guide_token": g_tok * 100, "guide_plain": g_plain * 100,
                     "token_digits": {d: digits.count(d) for d in sorted(set(digits))}})
    summary = {"command": command, "n": args.n, "judge": args.judge, "guide": args.guide, "prompt": args.prompt,
               "seeds": base.seeds, "dct_seed": base.dct.seed, "generate_seed": base.generate.seed,
               "attribute_classes": classes, "dct": to_dict(base.dct), "plain_digits": {d: plain_digits.count(d) for d in sorted(set(plain_digits))},
               "rows": rows}
    markdown = _table(summary)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "attributes.json", json.dumps(summary, indent=2) + "\n")
    write_text(out / "attributes.md", markdown)
    if args.results:
        write_results_block(Path(args.results), "attributes-digits", markdown)
    print(markdown)
    return 0


def _to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def _table(s: dict) -> str:
    lines = [f"`{s['command']}`", "",
             (f"{s['n']} images per row on seeds {s['seeds'] or 'as set'} (dct.seed {s['dct_seed']}, generate.seed "
              f"{s['generate_seed']}); prompt {s['prompt']!r}, the plain prompt is the same without the token. Judge "
              f"`{s['judge']}` (never guides), its digit mapped to the attribute by "
              f"{json.dumps(s['attribute_classes'])}. 95% paired bootstrap intervals over image seeds."), "",
             ("| target | plain, judge % | token, judge % | token - plain | guide % plain -> token (self-scored) | "
              "steps (stop) |"), "| --- | --- | --- | --- | --- | --- |"]
    for r in s["rows"]:
        ci = r["ci"]
        lines.append(f"| `{r['target']}` | {r['judge_plain']:.1f} [{ci['plain'][0]:.1f}, {ci['plain'][1]:.1f}] | "
                     f"{r['judge_token']:.1f} [{ci['token'][0]:.1f}, {ci['token'][1]:.1f}] | "
                     f"{r['judge_token'] - r['judge_plain']:+.1f} [{ci['delta'][0]:+.1f}, {ci['delta'][1]:+.1f}] | "
                     f"{r['guide_plain']:.1f} -> {r['guide_token']:.1f} | {r['steps']} ({r['stop_reason']}) |")
    lines += ["", f"Judged digits, plain prompt: {json.dumps(s['plain_digits'])}"]
    lines += [f"Judged digits, `{r['target']}` token: {json.dumps(r['token_digits'])}" for r in s["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
