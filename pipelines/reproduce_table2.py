"""Paper Table 2 on a build: classifiers trained on k real + N synthetic images per class, tested on real images.

    python pipelines/reproduce_table2.py out/digits --shots 0,3,9,15 --seeds 3 --results RESULTS.md
    python pipelines/reproduce_table2.py out/cub --real inat179 --root data/inat   # the paper's iNat179 rows

For every method in the build (sd, dct, ...) and for real images alone, every k and every seed, a timm classifier is
trained on `SynthAugDataset` and tested on the real test split (`synthaug.evaluate.train_downstream`). The k real
images are the same for every method at a given seed. Each cell is saved as it finishes
(``eval/downstream/cells/*.json``): rerunning the same command resumes. The real dataset defaults to the one the
build was made from (its config's ``dataset``/``root``).

Writes ``eval/downstream.json``/``.csv`` and ``eval/table2.md`` (command line + tables); with ``--results FILE`` also
the block ``<!-- synthaug:table2-NAME begin/end -->`` of FILE (nothing else in it changes).

**The extended table** (``--row``, repeatable): each row is one synthetic set, ``NAME=BUILD[:METHOD][,KEY=VALUE...]``
— a method of a build folder (without ``:METHOD``, the build's own) with `DownstreamConfig` settings of its own —
so a row for any generation lever is a build made with it, and a row for a training lever is a setting::

    python pipelines/reproduce_table2.py --shots 0,1,3,5,9,15 --seeds 5 --mode ratio --p 0.5 --out out/t2x \
        --row sd=out/digits-report:sd --row sd+conf=out/digits-report:sd,min_confidence=0.9 \
        --row dct=out/digits-report:dct --row dct+soft=out/digits-report:dct,targets=soft \
        --row dct+init=out/digits-init:dct --learners cnn,linear --against sd,sd+conf

A value is YAML, so a row may hold a flow mapping: ``--row "hard-dct=out/b:sd,class_methods={four: dct, nine: dct}"``
(token images for two classes, plain ones for the rest), ``--row best100=out/b:sd,rank=confidence`` (the 100 images
per class the guide is surest of).

Real images alone are a row of their own (``real``, from the first row's build). Every row trains with the same
seeds, the same k real images per seed and `--synthetic-per-class` images; each learner (``cnn``: the default timm
CNN; ``linear``: logistic regression on the pixels, ``arch=linear``) gets its own folder ``OUT/LEARNER/ROW``, and the
table gives each row's mean with its 95% t-interval and its paired difference to every ``--against`` row
(`synthaug.evaluate.paired`); ``OUT/table2.md`` holds it.

Exit status: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from synthaug.atomic import write_text
from synthaug.cli import configure_logging
from synthaug.errors import UserError
from synthaug.evaluate.downstream import DownstreamConfig, train_downstream
from synthaug.evaluate.tables import format_table
from synthaug.index import open_build
from synthaug.report import rerun_command, write_results_block


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,3,9 but got {text!r}") from None


# Settings a row may not change: they define the table (every row shares them) or only where it runs.
TABLE_KEYS = ("shots", "seeds", "methods", "include_real", "device", "num_workers")
LEARNERS = {"cnn": {}, "linear": {"arch": "linear"}}


def _split_settings(text: str) -> list[str]:
    """Split at the commas outside YAML brackets, so a value may be a flow list or mapping (``{nine: dct}``)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_row(text: str) -> tuple[str, str, str | None, dict]:
    """``NAME=BUILD[:METHOD][,KEY=VALUE...]`` -> (name, build, method, DownstreamConfig overrides)."""
    import dataclasses

    import yaml

    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise UserError(f"`--row` {text!r} must look like NAME=BUILD[:METHOD][,KEY=VALUE...], e.g. "
                        "sd+conf=out/digits-report:sd,min_confidence=0.9.")
    where, *settings = _split_settings(rest)
    build, _, method = where.rpartition(":") if ":" in where else (where, "", "")
    fields = {f.name for f in dataclasses.fields(DownstreamConfig)} - set(TABLE_KEYS)
    overrides = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise UserError(f"`--row` {text!r}: {item!r} is not KEY=VALUE with KEY a DownstreamConfig setting a "
                            f"row may change ({', '.join(sorted(fields))}).")
        overrides[key] = yaml.safe_load(value)
    return name.strip(), build, method or None, overrides


def run_rows(args, command: str) -> int:
    """The extended table: every `--row` x learner, real images alone, and the paired comparisons."""
    from synthaug.evaluate.paired import compare_rows, format_comparison, load_row_cells

    rows = [parse_row(r) for r in args.row]
    names = [r[0] for r in rows]
    if len(set(names)) != len(names) or "real" in names:
        raise UserError(f"`--row` names must be unique and not 'real' (real images alone are a row already): "
                        f"{', '.join(names)}.")
    against = [a for a in (args.against or "").split(",") if a]
    unknown = [a for a in against if a not in names + ["real"]]
    if unknown:
        raise UserError(f"`--against` {', '.join(unknown)} is not a row: pass names of --row (or real).")
    learners = [x for x in args.learners.split(",") if x]
    bad = [x for x in learners if x not in LEARNERS]
    if bad:
        raise UserError(f"`--learners` {', '.join(bad)} unknown: use {', '.join(LEARNERS)}.")
    out = Path(args.out or "out/table2")
    pretrained = {"true": True, "false": False}.get(str(args.pretrained).lower(), args.pretrained)
    # real images alone: a row wherever some k > 0 (at k = 0 there is nothing to train on)
    real_row = [("real", rows[0][1], None, {})] if any(args.shots) else []
    if not real_row and "real" in against:
        raise UserError("`--against real` needs some --shots above 0: at k = 0 there are no real images alone.")
    markdown = [f"### Table 2, extended: {', '.join(names)} ({', '.join(learners)})", "", f"`{command}`", ""]
    for learner in learners:
        tables = {}
        for name, build, method, overrides in real_row + rows:
            view = open_build(build)
            real = args.real or view.config.get("dataset")
            root = args.root if args.root is not None else (view.config.get("root") if not args.real else None)
            settings = {
                "train_split": args.train_split, "test_split": args.test_split, "shots": args.shots,
                "seeds": args.seeds, "shots_seed": args.shots_seed, "synthetic_per_class": args.synthetic_per_class,
                "mode": args.mode, "p": args.p, "min_confidence": args.min_confidence, "class_map": args.class_map,
                "arch": args.arch, "arch_kwargs": args.arch_kwargs, "pretrained": pretrained, "steps": args.steps,
                "batch_size": args.batch_size, "lr": args.lr, "device": args.device, "num_workers": args.workers,
                "image_size": args.image_size,
            }
            settings.update(LEARNERS[learner])
            if learner == "linear":
                settings.update(arch_kwargs=None, pretrained=False, image_size=args.linear_size or args.image_size)
            settings.update(overrides)
            own = method or view.config.get("method") or "dct"  # a row without :METHOD: the build's own
            config = DownstreamConfig(**settings, methods=[] if name == "real" else [own], include_real=name == "real")
            folder = out / learner / name
            train_downstream(view.root, real, config, root=root, out=folder, progress=not args.quiet)
            tables[name] = load_row_cells([folder], "real" if name == "real" else config.methods[0])
        stats, diffs = compare_rows(tables, against)
        markdown += [format_comparison(stats, diffs, title=f"learner: {learner}"), ""]
    text = "\n".join(markdown)
    write_text(out / "table2.md", text)
    if args.results:
        write_results_block(Path(args.results), f"table2x-{out.name}", text)
    print(text + f"\nwrote {out / 'table2.md'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", nargs="?", help="build directory (synthaug build --out); with --row: none")
    parser.add_argument("--real", help="real dataset name (default: the build's dataset)")
    parser.add_argument("--root", help="real dataset root (default: the build's root)")
    parser.add_argument("--train-split", help="real training split (default train)")
    parser.add_argument("--test-split", help="real test split (default: test, or val for iNat 2021 and ImageNet)")
    parser.add_argument("--class-map", help="build class -> real class when they differ: a JSON file, 'inat179' or "
                                            "'inat179:INAT_ROOT' (default: by name; iNat179 maps CUB names itself)")
    parser.add_argument("--methods", help="comma-separated build methods (default: all)")
    parser.add_argument("--shots", type=_ints, default=[0, 3, 9, 15], help="real images per class (default 0,3,9,15)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    parser.add_argument("--shots-seed", type=int, help="draw the k real images with this seed in every cell (default: "
                                                       "the cell's seed), e.g. the images a few-shot guide saw")
    parser.add_argument("--synthetic-per-class", type=int, default=100)
    parser.add_argument("--mode", default="concat", choices=("concat", "ratio", "replace"),
                        help="how real and synthetic images mix (SynthAugDataset; default concat)")
    parser.add_argument("--p", type=float, default=0.5, help="ratio: synthetic share of each epoch; replace: swap odds")
    parser.add_argument("--min-confidence", type=float, help="keep synthetic images with guide probability >= this")
    parser.add_argument("--out", help="result folder (default BUILD/eval); one per mixing setting")
    parser.add_argument("--arch", help="timm architecture (default: a small ResNet for <= 64 px images)")
    parser.add_argument("--arch-kwargs", type=json.loads, default=None, help='JSON, e.g. \'{"channels": [16,32,64,128]}\'')
    parser.add_argument("--pretrained", default="auto", help="auto | true | false | checkpoint path (never downloads)")
    parser.add_argument("--steps", type=int, help="optimizer steps per cell (default: 10 epochs of N synthetic per class)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--results", help="markdown file whose synthaug:table2-NAME block gets the tables")
    parser.add_argument("--image-size", type=int, help="training resolution (default: the build's image size)")
    parser.add_argument("--row", action="append", default=[],
                        help="NAME=BUILD[:METHOD][,KEY=VALUE...]: one row of the extended table (repeatable)")
    parser.add_argument("--learners", default="cnn", help="with --row: cnn, linear or cnn,linear")
    parser.add_argument("--linear-size", type=int, help="with --row: the linear learner's pixel size (default: "
                                                        "--image-size)")
    parser.add_argument("--against", default="", help="with --row: rows every row is compared with, e.g. sd,sd+conf")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    configure_logging(timestamps=True)
    command = rerun_command("pipelines/reproduce_table2.py", argv)
    pretrained = {"true": True, "false": False}.get(str(args.pretrained).lower(), args.pretrained)
    if args.row:
        if args.build:
            parser.error("pass either a build or --row, not both (a row names its build)")
        try:
            return run_rows(args, command)
        except UserError as e:
            print(f"reproduce_table2: error: {e}", file=sys.stderr)
            return 2
    if not args.build:
        parser.error("a build directory (or --row) is required")
    try:
        view = open_build(args.build)
        real = args.real or view.config.get("dataset")
        if not real:
            raise UserError(f"`--real` is needed: the build at {view.root} records no dataset in config.yaml.")
        root = args.root if args.root is not None else (view.config.get("root") if not args.real else None)
        config = DownstreamConfig(
            train_split=args.train_split, test_split=args.test_split,
            methods=args.methods.split(",") if args.methods else None, shots=args.shots, seeds=args.seeds,
            shots_seed=args.shots_seed,
            synthetic_per_class=args.synthetic_per_class, mode=args.mode, p=args.p,
            min_confidence=args.min_confidence, class_map=args.class_map, arch=args.arch,
            arch_kwargs=args.arch_kwargs, pretrained=pretrained, steps=args.steps, batch_size=args.batch_size,
            lr=args.lr, device=args.device, num_workers=args.workers, image_size=args.image_size,
        )
        result = train_downstream(view.root, real, config, root=root, out=args.out, progress=not args.quiet)
    except UserError as e:
        print(f"reproduce_table2: error: {e}", file=sys.stderr)
        return 2

    name = view.root.resolve().name
    seconds = sum(c.seconds for c in result.cells)
    steps = sorted({c.steps for c in result.cells})
    mixing = f"mixing: {args.mode}" + (f" p={args.p}" if args.mode != "concat" else "") + (
        f", synthetic images with guide probability >= {args.min_confidence}" if args.min_confidence is not None else "")
    markdown = "\n".join([
        f"### Table 2: few-shot training with synthetic images ({name})", "", f"`{command}`", "",
        format_table(result, markdown=True), "",
        (f"{len(result.cells)} cells, {'/'.join(map(str, steps))} steps each, {seconds / 60:.1f} min of training in "
         f"all; {mixing}."),
    ]) + "\n"
    out = (Path(args.out) if args.out else view.root / "eval") / "table2.md"
    write_text(out, markdown)
    if args.results:
        write_results_block(Path(args.results), f"table2-{name}", markdown)
    print(format_table(result))
    print(f"\nwrote {out}" + (f" and the table2-{name} block of {args.results}" if args.results else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
