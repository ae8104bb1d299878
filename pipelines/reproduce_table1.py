"""Paper Table 1 on a build: judge accuracy of plain-prompt vs token images, paired on identical seeds.

    python pipelines/reproduce_table1.py out/digits --judge digits-judge --results RESULTS.md

1. The independent judge scores every image (`synthaug.evaluate.evaluate_judge`): ``eval/judge.json``,
   ``eval/judge_per_class.csv``, ``eval/judge_images.parquet``, and ``judge_prob`` written into ``index.parquet``.
2. Unless ``--no-guide``: the build's guide scores the same images as a second, *self-scoring* judge (into
   ``eval/guide/``; the index is left alone). The gap between the two is how much the tokens please the guide
   rather than fix the image.
3. The tables, with the command line that made them, go to ``eval/table1.md``; with ``--results FILE`` they also
   replace the block ``<!-- synthaug:table1-NAME begin/end -->`` of FILE (nothing else in it changes).

Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from synthaug.atomic import write_text
from synthaug.cli import configure_logging
from synthaug.errors import UserError
from synthaug.evaluate.judge import SelfScoringWarning, evaluate_judge
from synthaug.evaluate.tables import format_table
from synthaug.index import open_build
from synthaug.report import rerun_command, write_results_block


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", help="build directory (synthaug build --out)")
    parser.add_argument("--judge", required=True, help="independent classifier (digits-judge, timm name, hf-hub:id...)")
    parser.add_argument("--class-map", help="JSON {build class name: judge label} when the label sets differ")
    parser.add_argument("--restrict-to-shared", action="store_true",
                        help="judge over the labels it shares with the build only (closed set)")
    parser.add_argument("--no-guide", action="store_true", help="skip the self-scored guide row")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", help="markdown file whose synthaug:table1-NAME block gets the tables")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    configure_logging(timestamps=True)
    command = rerun_command("pipelines/reproduce_table1.py", argv)
    try:
        view = open_build(args.build)
        common = {"device": args.device, "batch_size": args.batch_size, "class_map": args.class_map,
                  "restrict_to_shared": args.restrict_to_shared, "progress": not args.quiet}
        guide_result = None
        if not args.no_guide and view.config.get("guide"):
            with warnings.catch_warnings():  # self-scoring is the point of this row: it is labelled, not a mistake
                warnings.simplefilter("ignore", SelfScoringWarning)
                guide_result = evaluate_judge(view.root, view.config["guide"], write_back=False,
                                              out=view.root / "eval" / "guide", **common)
        result = evaluate_judge(view.root, args.judge, **common)
    except UserError as e:
        print(f"reproduce_table1: error: {e}", file=sys.stderr)
        return 2

    name = view.root.resolve().name
    per_class = result.total_classes <= 20
    parts = [f"### Table 1: judge accuracy of generated images ({name})", "", f"`{command}`", "",
             format_table(result, markdown=True, per_class=per_class)]
    if guide_result is not None:
        parts += ["", "The guide as judge (self-scored: the tokens were optimised against it, so this flatters them):",
                  "", format_table(guide_result, markdown=True)]
    markdown = "\n".join(parts) + "\n"
    out = view.root / "eval" / "table1.md"
    write_text(out, markdown)
    if args.results:
        write_results_block(Path(args.results), f"table1-{name}", markdown)
    print(format_table(result, per_class=per_class))
    if guide_result is not None:
        print("\nGuide as judge (self-scored):\n" + format_table(guide_result))
    print(f"\nwrote {out}" + (f" and the table1-{name} block of {args.results}" if args.results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
