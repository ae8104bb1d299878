"""MC-TI paper (003) Table 1 on a dataset: N-shot classification with class tokens, TI vs MC-TI vs CLIP prototypes.

    python pipelines/reproduce_mcti.py --dataset digits --shots 1,2,4,5,8,16 --seeds 0,1,2 --results RESULTS.md

For each seed and N: draw N training images per class (the build's own seeded few-shot draw), learn one token per
class with TI (``--steps`` updates) and MC-TI (the same TI run continued for ``--extra-steps`` joint updates,
Eq. 5), and classify the test split with "a photo of a S_k" (Eq. 6). The ``prototype`` row is the mean CLIP image
feature of the N shots per class: no text, no training — the floor a token method must clear. The table (mean ± std
over seeds, accuracy %) goes to stdout, to ``--out`` (markdown + JSON rows), and with ``--results FILE`` into the
block ``<!-- synthaug:mcti-DATASET begin/end -->`` of FILE (nothing else in it changes).

Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from synthaug.atomic import write_text
from synthaug.cli import configure_logging
from synthaug.config import MCTIConfig
from synthaug.errors import UserError


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits", help="a synthaug dataset name (digits, cub, ...)")
    parser.add_argument("--root", help="dataset root on disk (not for digits)")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--model", default="digits", help="diffusers model (hub id, directory, 'digits')")
    parser.add_argument("--clip", default=None, help="the CLIP paired with the model's text encoder (default: digits)")
    parser.add_argument("--shots", type=_ints, default=(1, 2, 4, 5, 8, 16))
    parser.add_argument("--seeds", type=_ints, default=(0, 1, 2))
    parser.add_argument("--methods", default="prototype,ti,mcti")
    parser.add_argument("--steps", type=int, default=MCTIConfig.steps, help="TI steps (the MC-TI warm-up)")
    parser.add_argument("--extra-steps", type=int, default=MCTIConfig.extra_steps, help="MC-TI joint steps")
    parser.add_argument("--lr", type=float, default=MCTIConfig.lr)
    parser.add_argument("--batch-size", type=int, default=MCTIConfig.batch_size)
    parser.add_argument("--alpha", type=float, default=MCTIConfig.alpha)
    parser.add_argument("--beta", type=float, default=MCTIConfig.beta)
    parser.add_argument("--scale", type=float, default=MCTIConfig.scale)
    parser.add_argument("--init-token", default=MCTIConfig.init_token)
    parser.add_argument("--max-test", type=int, default=None, help="evaluate on a seeded subset of the test split")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="out/mcti", help="folder for mcti-DATASET.md / .json")
    parser.add_argument("--results", help="markdown file whose synthaug:mcti-DATASET block gets the table")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    configure_logging(timestamps=True)
    command = shlex.join(["python", "pipelines/reproduce_mcti.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        from synthaug.datasets.catalog import get_dataset
        from synthaug.evaluate.shots import evaluate_shots
        from synthaug.evaluate.tables import format_table
        from synthaug.models import load_diffusion
        from synthaug.tokens.clip import load_clip

        config = MCTIConfig(steps=args.steps, extra_steps=args.extra_steps, lr=args.lr, batch_size=args.batch_size,
                            alpha=args.alpha, beta=args.beta, scale=args.scale, init_token=args.init_token)
        train = get_dataset(args.dataset, args.root, split=args.train_split)
        test = get_dataset(args.dataset, args.root, split=args.test_split)
        pipe = load_diffusion(args.model, device=args.device)
        clip = load_clip(args.clip, pipe)
        t0 = time.perf_counter()
        rows = evaluate_shots(pipe, clip, train, test, shots=args.shots, seeds=args.seeds,
                              methods=tuple(args.methods.split(",")), config=config, max_test=args.max_test,
                              progress=not args.quiet)
        seconds = time.perf_counter() - t0
    except UserError as e:
        print(f"reproduce_mcti: error: {e}", file=sys.stderr)
        return 2

    n_test = rows[0]["n_test"] if rows else 0
    table = format_table(rows, markdown=True)
    markdown = "\n".join([
        f"### MC-TI: N-shot classification with class tokens ({args.dataset}, {n_test} test images)", "",
        f"`{command}`", "",
        (f"Accuracy (%) on the {args.test_split} split, mean ± std over seeds {list(args.seeds)}; tokens classify "
        f"with \"a photo of a S_k\" (Eq. 6). TI: {args.steps} steps; MC-TI: the same TI token + {args.extra_steps} "
        f"joint steps (alpha {args.alpha}, beta {args.beta}, s {args.scale}, lr {args.lr}, batch {args.batch_size}). "
        f"prototype: mean CLIP image feature of the N shots. Wall time {seconds / 60:.0f} min."), "",
        table,
    ]) + "\n"
    out = Path(args.out)
    write_text(out / f"mcti-{args.dataset}.md", markdown)
    write_text(out / f"mcti-{args.dataset}.json", json.dumps(rows, indent=1))
    if args.results:
        from synthaug.report import write_results_block

        write_results_block(Path(args.results), f"mcti-{args.dataset}", markdown)
    print(table)
    print(f"\nwrote {out / f'mcti-{args.dataset}.md'}" + (f" and the mcti-{args.dataset} block of {args.results}"
                                                          if args.results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
