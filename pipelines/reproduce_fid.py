"""Paper Tables 3/5 on a build: FID and KID of each method's images against real images, per feature space.

    python pipelines/reproduce_fid.py out/digits --features judge,guide --results RESULTS.md

Feature spaces (`synthaug.evaluate.compute_fid`): ``inception`` (the standard FID Inception-v3; its weights file must
be on disk, see ``--inception-weights``), ``guide`` (the build's guide classifier, the paper's Table 5 variant),
``judge`` (the judge of the last ``synthaug evaluate``, or ``--judge``), or any classifier source. The real dataset
defaults to the one the build was made from. KID's subset size adapts to small sets.

Writes ``eval/fid*.json``/``.csv`` and ``eval/fid.md`` (command line + tables); with ``--results FILE`` also the
block ``<!-- synthaug:fid-NAME begin/end -->`` of FILE (nothing else in it changes).

Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from synthaug.atomic import write_text
from synthaug.cli import configure_logging
from synthaug.errors import UserError
from synthaug.evaluate.fid import compute_fid
from synthaug.evaluate.tables import format_table
from synthaug.index import open_build
from synthaug.report import rerun_command, write_results_block


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", help="build directory (synthaug build --out)")
    parser.add_argument("--real", help="real dataset name (default: the build's dataset)")
    parser.add_argument("--root", help="real dataset root (default: the build's root)")
    parser.add_argument("--split", default="train", help="real split to compare with (default train)")
    parser.add_argument("--features", default="judge,guide",
                        help="comma-separated: inception, guide, judge, or classifier sources (default judge,guide)")
    parser.add_argument("--judge", help="classifier for --features judge (default: the last `synthaug evaluate`'s)")
    parser.add_argument("--inception-weights", help="path of weights-inception-2015-12-05-6726825d.pth")
    parser.add_argument("--max-images", type=int, help="at most this many images per set")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", help="markdown file whose synthaug:fid-NAME block gets the tables")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    configure_logging(timestamps=True)
    command = rerun_command("pipelines/reproduce_fid.py", argv)
    try:
        view = open_build(args.build)
        real = args.real or view.config.get("dataset")
        if not real:
            raise UserError(f"`--real` is needed: the build at {view.root} records no dataset in config.yaml.")
        root = args.root if args.root is not None else (view.config.get("root") if not args.real else None)
        results = []
        for features in [f.strip() for f in args.features.split(",") if f.strip()]:
            if features == "judge" and args.judge:
                features = args.judge
            results.append(compute_fid(
                view.root, real, root=root, split=args.split, features=features,
                inception_weights=args.inception_weights, max_images=args.max_images, device=args.device,
                batch_size=args.batch_size, progress=not args.quiet,
            ))
    except UserError as e:
        print(f"reproduce_fid: error: {e}", file=sys.stderr)
        return 2

    name = view.root.resolve().name
    parts = [f"### FID/KID of generated vs real images ({name})", "", f"`{command}`"]
    for r in results:
        parts += ["", format_table(r, markdown=True)]
    markdown = "\n".join(parts) + "\n"
    out = view.root / "eval" / "fid.md"
    write_text(out, markdown)
    if args.results:
        write_results_block(Path(args.results), f"fid-{name}", markdown)
    print("\n\n".join(format_table(r) for r in results))
    print(f"\nwrote {out}" + (f" and the fid-{name} block of {args.results}" if args.results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
