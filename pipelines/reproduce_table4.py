"""Paper Table 4 (appendix B): judge accuracy and mean updates of DCT tokens per training batch size.

    python pipelines/reproduce_table4.py --out out/table4 --judge digits-judge --results RESULTS.md
    python pipelines/reproduce_table4.py --out out/t4-cub --dataset cub --root data/CUB_200_2011 --class-list cub \
        --judge JUDGE

For every batch size b (seeds per DCT update): one build of the same classes, seeds and settings but
``dct.batch_size=b`` (``OUT/b{b}``, resumable: rerunning the same command finishes it), then the judge scores its
token images (`synthaug.evaluate.evaluate_judge`). A row: b, the judge's top-1 on the token images (and on the
plain-prompt images, the same for every b), and the mean number of updates a token made before it stopped. The
batch sizes default to the paper's 1-6; ``--class-list cub|inat|imagenet`` selects appendix B's difficult classes
(`APPENDIX_B`), 20 images each as there. The default is the embedded digits world (`--dataset digits`, its guide);
``--set KEY=VALUE`` overrides any config key.

Writes ``OUT/table4.md`` and ``OUT/table4.json``; with ``--results FILE`` also the block
``<!-- synthaug:table4-NAME begin/end -->`` of FILE (nothing else in it changes).

Exit status: 0 done, 1 a build failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from synthaug import build, load_config
from synthaug.atomic import write_text
from synthaug.cli import configure_logging
from synthaug.config import parse_overrides
from synthaug.errors import UserError
from synthaug.evaluate.judge import evaluate_judge
from synthaug.index import open_build
from synthaug.report import rerun_command, write_results_block

# Appendix B's classes per dataset, as the paper names them (its CUB list names "Spotted Catbird" twice: once here).
APPENDIX_B = {
    "cub": ("Chuck will Widow", "Grasshopper Sparrow", "Pied Kingfisher", "Scissor tailed Flycatcher",
            "Worm eating Warbler", "Rhinoceros Auklet", "Gadwall", "Mourning Warbler", "Spotted Catbird",
            "Olive sided Flycatcher", "Blue Grosbeak", "Black billed Cuckoo", "Brown Pelican", "White necked Raven",
            "Tree Swallow", "Black throated Sparrow", "Pied billed Grebe", "Horned Grebe", "Heermann Gull"),
    "inat": ("grosbeak weaver", "skeleton weed", "ribbon jumping spider", "common garden orb-web spinner",
             "glass shrimp", "crevice swift", "eastern spiny lizard", "double-barred finch", "speckled swimming crab",
             "new zealand cockle", "common wall lizard", "red-bordered pixie", "old mans beard",
             "rough-mantled doris", "green shore crab", "ear fungus", "european common cuttlefish",
             "argentine black-and-white tegu", "cassins vireo", "steenbok"),
    "imagenet": ("trilobite", "kite", "eft", "bullfrog", "Gila monster", "crane", "Japanese spaniel", "drake", "quail",
                 "Scotch terrier", "curly-coated retriever", "English setter", "American chameleon", "brass",
                 "bonnet", "amphibian", "ashcan", "horizontal bar", "iron", "slot", "spindle", "sundial",
                 "steel drum", "gong", "coffee mug", "vault", "axolotl", "tiger cat", "bearskin"),
}


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,3,5 but got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, e.g. 1,3,5, but got {text!r}")
    return values


def run(out: Path, batch_sizes: Sequence[int], judge: str, overrides: dict, *, progress: bool = True) -> list[dict]:
    """One build per batch size under `out`, scored by `judge`; the table's rows."""
    rows = []
    for b in batch_sizes:
        config = load_config(overrides={**overrides, "out": str(out / f"b{b}"), "dct.batch_size": b})
        result = build(config, progress=progress)
        if not result.ok:
            raise RuntimeError(f"the build for batch size {b} failed: {result.summary()}")
        judged = {m.method: m for m in evaluate_judge(out / f"b{b}", judge, write_back=False,
                                                      progress=progress).methods}
        method = config.method
        updates = [c["updates"] for c in open_build(out / f"b{b}").classes if c.get("updates") is not None]
        rows.append({"batch_size": b, "classes": len(updates),
                     "mean_updates": float(np.mean(updates)) if updates else None,
                     "token_top1": judged[method].top1 if method in judged else None,
                     "plain_top1": judged["sd"].top1 if "sd" in judged else None,
                     "images": judged[method].images if method in judged else 0})
    return rows


def markdown(rows: list[dict], command: str, title: str) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [f"### Table 4: DCT batch size ({title})", "", f"`{command}`", "",
             "| batch size | judge top-1, token (%) | judge top-1, plain prompt (%) | mean updates | images |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        updates = "-" if r["mean_updates"] is None else f"{r['mean_updates']:.1f}"
        lines.append(f"| {r['batch_size']} | {pct(r['token_top1'])} | {pct(r['plain_top1'])} | {updates} | "
                     f"{r['images']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for one build per batch size and the table")
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 2, 3, 4, 5, 6],
                        help="DCT batch sizes (default 1-6, the paper's)")
    parser.add_argument("--judge", default="digits-judge", help="independent classifier (default digits-judge)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--classes", help="class selection (default: the dataset's defaults)")
    parser.add_argument("--class-list", choices=sorted(APPENDIX_B),
                        help="appendix B's classes of that dataset (instead of --classes)")
    parser.add_argument("--root", help="dataset root (CUB, iNat, ImageNet)")
    parser.add_argument("--per-class", type=int, default=20, help="images per class (default 20)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="any config key, e.g. --set dct.max_steps=30")
    parser.add_argument("--results", help="markdown file whose synthaug:table4-NAME block gets the table")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    configure_logging(timestamps=True)
    command = rerun_command("pipelines/reproduce_table4.py", argv)
    out = Path(args.out)
    try:
        if args.class_list and args.classes:
            raise UserError(f"`--class-list` {args.class_list!r} and `--classes` {args.classes!r} both select classes: "
                            "pass one of them.")
        classes = ",".join(APPENDIX_B[args.class_list]) if args.class_list else args.classes
        overrides = {"dataset": args.dataset, "per_class": args.per_class, "baseline": True,
                     **({"classes": classes} if classes else {}), **({"root": args.root} if args.root else {}),
                     **parse_overrides(args.overrides)}
        rows = run(out, args.batch_sizes, args.judge, overrides, progress=not args.quiet)
    except UserError as e:
        print(f"reproduce_table4: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"reproduce_table4: {e}", file=sys.stderr)
        return 1
    text = markdown(rows, command, out.resolve().name)
    write_text(out / "table4.md", text)
    write_text(out / "table4.json", json.dumps(rows, indent=2) + "\n")
    if args.results:
        write_results_block(Path(args.results), f"table4-{out.resolve().name}", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
