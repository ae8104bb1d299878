"""The `synthaug` command line: argv -> exactly one public function per subcommand.

User errors (`UserError`) print on one line and exit 2, without a traceback. Heavy libraries are imported inside the
subcommands so that `synthaug --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .errors import UserError
from .token_methods import method_names

log = logging.getLogger("synthaug")

EPILOG = """examples:
  synthaug build --dataset digits --per-class 100 --baseline          # the embedded world, on a CPU
  synthaug build --dataset cub --root data/CUB_200_2011 --per-class 100 --out out/cub
  synthaug build --config configs/cub.yaml --set model=stabilityai/stable-diffusion-2-1-base
  synthaug evaluate out/digits --judge digits-judge
  synthaug report out/digits
"""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like every other user error: ``synthaug build: error: ...``, exit 2;
    no abbreviated flags (``--per-clas 3`` is an error, not ``--per-class 3``), the subcommands' parsers too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------------------------------------------------
# Shared options
# --------------------------------------------------------------------------------------------------------------------
# The one table from flags to config keys: every flag that sets a config key, with its argparse settings. A flag's
# value lands in its key (a flag left out changes nothing); `--set KEY=VALUE` reaches every other key.
CONFIG_FLAGS: dict[str, tuple[str, dict]] = {
    "--dataset": ("dataset", {"help": "digits | cub | inat | imagenet | imagefolder | a torchvision set name"}),
    "--root": ("root", {"help": "dataset root on disk (not needed for digits)"}),
    "--classes": ("classes", {"help": "class selection: indices/ranges '0-9,17' or names 'seven,one'"}),
    "--model": ("model", {"help": "diffusers hub id, local save_pretrained dir, or 'digits'"}),
    "--scheduler": ("scheduler", {"help": "ddim | pndm | euler | euler_a | dpmsolver++ | lms (default: the model's "
                                          "own)"}),
    "--guide": ("guide", {"help": "classifier that steers DCT tokens: timm name, hf-hub:id, torchvision:name, dir, "
                                  "..., or 'fit' (build: a few-shot guide fitted on the --shots images)"}),
    "--method": ("method", {"choices": list(method_names()), "help": "how class tokens are learned (default dct)"}),
    "--device": ("device", {"help": "auto | cpu | cuda | cuda:N"}),
    "--out": ("out", {"help": "output directory (default out/DATASET)"}),
    "--per-class": ("per_class", {"type": int, "help": "images per class (default 100)"}),
    "-n": ("per_class", {"type": int, "help": "images per class"}),
    "--baseline": ("baseline", {"action": "store_const", "const": True,
                                "help": "also generate plain-prompt images with the same seeds"}),
    "--shots": ("shots", {"type": int, "help": "the user's k real images per class (TI/MC-TI learn from them, "
                                                "--guide fit fits on them, the trust check and real starts read them)"}),
    "--keep-confidence": ("generate.keep_confidence", {"type": float, "help": "keep only images the guide gives at "
                                                       "least this probability, generating more seeds as needed"}),
    "--shots-seed": ("shots_seed", {"type": int, "help": "the seed that draws the --shots images"}),
    "--executor": ("run.executor", {"choices": ["auto", "ray", "local"], "help": "ray (one actor per GPU), local "
                                    "(in this process), or auto (the default: Ray when installed)"}),
    "--ray-address": ("run.ray_address", {"help": "attach to a Ray cluster ('auto' or an address); default starts "
                                                  "a local one"}),
    "--num-workers": ("run.num_workers", {"type": int, "help": "actors (default: one per GPU, or "
                                                               "CPUs/cpus_per_worker)"}),
    "--guide-target": ("guide_target", {"metavar": "TARGET", "help": (
        "'class' (default: one token per class) or 'attribute:NAME[=0|1]': one attribute token from a multi-label "
        "guide's output NAME, towards 1 (has it, the default) or 0, e.g. --guide digits-attr-guide --guide-target "
        "attribute:closed_loop")}),
}

# The flags every subcommand that loads a config takes; each subcommand adds its own from the table.
SHARED_FLAGS = ("--dataset", "--root", "--classes", "--model", "--scheduler", "--guide", "--method", "--device",
                "--out")


def _config_options(p: argparse.ArgumentParser, *own: str) -> None:
    g = p.add_argument_group("configuration (YAML keys = config field names; CLI flags override the file; "
                             "`synthaug config --explain KEY` documents a key)")
    g.add_argument("--config", help="YAML config file (see configs/); keys equal BuildConfig field names")
    g.add_argument("--preset", help="named override set over the dataset's defaults: 'paper' (DCT appendix D), "
                   "'fast' (DPM-Solver++, half the UNet calls or fewer; README 'Presets')")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, dotted for sections: --set dct.lr=0.001 --set per_class=10")
    for flag in (*SHARED_FLAGS, *own):
        key, kwargs = CONFIG_FLAGS[flag]
        if "action" not in kwargs and "choices" not in kwargs:
            kwargs = {"metavar": key.rpartition(".")[2].upper(), **kwargs}
        (g if flag in SHARED_FLAGS else p).add_argument(flag, dest=key, **kwargs)


def config_overrides(args: argparse.Namespace, extra: dict | None = None) -> dict:
    """The config keys the flags set (`CONFIG_FLAGS`), then `extra`, then ``--set``."""
    from .config import parse_overrides

    out = {key: v for key, _ in CONFIG_FLAGS.values() if (v := getattr(args, key, None)) is not None}
    out.update(extra or {})
    out.update(parse_overrides(args.overrides))
    return out


def _load_config(args: argparse.Namespace, extra: dict | None = None):
    from .config import load_config

    return load_config(args.config, config_overrides(args, extra), preset=args.preset)


def _check_root(cfg) -> None:
    """The dataset root a build reads, checked before the builder (torch, diffusers) is imported."""
    from .dataset_names import dataset_key

    if dataset_key(cfg.dataset) == "digits":
        return
    if cfg.root is None:
        raise UserError(f"`root` is required for dataset {cfg.dataset!r}: pass the folder that holds it "
                        f"(--root PATH).")
    if not Path(cfg.root).expanduser().exists():
        raise UserError(f"`root` {cfg.root!r} does not exist: pass the folder that holds dataset {cfg.dataset!r} "
                        f"(--root PATH).")


# --------------------------------------------------------------------------------------------------------------------
# Subcommands
# --------------------------------------------------------------------------------------------------------------------
def cmd_build(args: argparse.Namespace) -> int:
    cfg = _load_config(args)  # names, values and paths first: a typo costs no torch import
    _check_root(cfg)
    from .builder import BuildFailed, build

    try:
        result = build(cfg, overwrite=args.overwrite, progress=not args.quiet)
    except BuildFailed as e:  # some class jobs failed every retry: summary + the command that resumes, exit 1
        print(e.result.summary(), file=sys.stderr)
        return 1
    print(result.summary())
    return 0 if result.ok else 1


def cmd_learn(args: argparse.Namespace) -> int:
    from .commands import learn_tokens

    cfg = _load_config(args)
    results = learn_tokens(cfg, out=args.tokens_out, progress=not args.quiet)
    for r in results:
        what = r.metadata.get("target") or f"class {r.class_index:>4} {r.label!r}"  # an attribute token: its target
        how = (f"{r.updates} updates ({r.steps} measurements), stop={r.stop_reason}, best step {r.best_step}"
               if hasattr(r, "stop_reason") else f"{r.steps} updates")  # DCT records its stop and kept step
        print(f"{r.token}  {what}: {how}, {r.seconds:.1f}s")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .commands import generate_to_folder

    extra = {}
    if args.tokens and Path(args.tokens).is_file():  # an attribute token file says its target itself
        from .tokens.io import token_metadata

        target = token_metadata(Path(args.tokens)).get("target")
        if target:
            extra["guide_target"] = target
    cfg = _load_config(args, extra)
    n = generate_to_folder(cfg, tokens=args.tokens, dest=args.dest, progress=not args.quiet)
    print(f"wrote {n} images to {args.dest}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .commands import inspect

    result = inspect(args.out_dir, verify=args.verify)
    print(result.summary())
    return 0 if result.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    if args.verify and args.format != "webdataset":
        raise UserError(f"`--verify` checks an export of the images, but `--format` is {args.format!r}: add "
                        "--format webdataset.")
    if args.format == "webdataset":
        from .reshard import default_dest, reshard, verify_export

        if args.verify:
            problems = verify_export(args.dest if args.dest is not None else default_dest(args.out_dir))
            print("\n".join(problems) if problems else "export verified: every tar matches its plan")
            return 1 if problems else 0
        methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
        result = reshard(args.out_dir, args.dest, samples_per_shard=args.samples_per_shard, seed=args.seed,
                         methods=methods)
        print(f"wrote {result.num_samples} samples in {result.num_shards} class-mixed shards to {result.dest} "
              f"({result.shards_written} written now)")
        return 0
    from .commands import export_tokens

    paths = export_tokens(args.out_dir, format=args.format, dest=args.dest)
    where = paths[0].parent if paths else args.dest or args.out_dir
    print(f"wrote {len(paths)} {args.format} embeddings to {where}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_judge, format_table

    result = evaluate_judge(args.out_dir, judge=args.judge, device=args.device or "auto", batch_size=args.batch_size,
                            class_map=args.class_map, restrict_to_shared=args.restrict_to_shared,
                            progress=not args.quiet, allow_guide_judge=args.allow_guide_judge)
    print(format_table(result, per_class=args.per_class))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .evaluate import format_table, train_downstream

    shots = [int(s) for s in args.shots.split(",")]
    result = train_downstream(args.out_dir, real=args.real, root=args.root, shots=shots, seeds=args.seeds,
                              synthetic_per_class=args.synthetic_per_class, mode=args.mode, p=args.p,
                              min_confidence=args.min_confidence, targets=args.targets,
                              temperature=args.temperature, arch=args.arch, epochs=args.epochs,
                              test_split=args.test_split, class_map=args.class_map,
                              device=args.device or "auto", progress=not args.quiet)
    print(format_table(result))
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    from .evaluate import compute_fid, format_table

    result = compute_fid(args.out_dir, real=args.real, root=args.root, split=args.split, features=args.features,
                         inception_weights=args.inception_weights, max_images=args.max_images,
                         device=args.device or "auto", progress=not args.quiet)
    print(format_table(result))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(args.out_dir)
    print(f"report: {path}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from .commands import classify_images

    result = classify_images(args.out_dir, images=args.images, root=args.root, split=args.split,
                             device=args.device or "auto")
    print(result.summary())
    return 0


def cmd_fit_guide(args: argparse.Namespace) -> int:
    from .classifier.fit import default_backbone, fit_dataset_guide
    from .datasets.catalog import get_dataset

    if args.shots < 1:  # before the dataset or any model loads
        raise UserError(f"`--shots` must be >= 1 (real images per class the guide is fitted on) but is {args.shots}.")
    dataset = get_dataset(args.dataset, args.root, split=args.split)
    backbone = args.backbone or default_backbone(args.dataset)
    _, record = fit_dataset_guide(dataset, args.out, shots=args.shots, shots_seed=args.shots_seed, backbone=backbone,
                                  head=args.head, strength=args.strength, dataset_name=args.dataset,
                                  split=args.split, device=args.device, overwrite=args.overwrite)
    print(record.summary())
    print(f"wrote {args.out} (use it with --guide {args.out})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config_docs import explain

    print(explain(args.explain, build=args.build))
    return 0


# --------------------------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="synthaug", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Class-accurate synthetic training sets from text-to-image diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"synthaug {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("build", help="learn class tokens, generate images, write shards + index (resumable)",
                       description="Learn one token per class, generate --per-class images per class (and with "
                       "--baseline the plain-prompt images on the same seeds), write WebDataset shards and the "
                       "parquet index. Re-running on an existing --out resumes.")
    _config_options(p, "--per-class", "--baseline", "--shots", "--shots-seed", "--keep-confidence", "--executor",
                    "--ray-address", "--num-workers")
    p.add_argument("--overwrite", action="store_true", help="discard an existing --out built with another config")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("learn", help="learn class tokens (any --method) for a few classes (no images)")
    _config_options(p, "--guide-target")
    p.add_argument("--tokens-out", required=True, help="directory for the token files")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("generate", help="generate PNGs for a few classes with learned tokens (and the plain prompt)")
    _config_options(p, "-n", "--baseline")
    p.add_argument("--tokens", help="token file or directory written by `synthaug learn` (omit: plain prompt only)")
    p.add_argument("--dest", required=True, help="folder for the PNGs and metadata.jsonl")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", help="counts per class and method, config, failures of a build")
    p.add_argument("out_dir")
    p.add_argument("--verify", action="store_true", help="check every image's sha256 against the index")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("export", help="export a build's tokens for other tools, or its images as class-mixed shards")
    p.add_argument("out_dir")
    p.add_argument("--format", default="a1111", choices=["a1111", "diffusers", "webdataset"],
                   help="a1111 / diffusers: the tokens; webdataset: the images again, shuffled into class-mixed shards")
    p.add_argument("--dest", help="destination folder (default OUT/export/FORMAT)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="webdataset: samples per tar")
    p.add_argument("--seed", type=int, default=0, help="webdataset: the shuffle's seed")
    p.add_argument("--methods", help="webdataset: methods to include, e.g. dct,sd (default: the build's own)")
    p.add_argument("--verify", action="store_true",
                   help="webdataset: check the export's tars against its plan (sizes, sha256, the build's index)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="judge accuracy of the generated images (paper Table 1)")
    p.add_argument("out_dir")
    p.add_argument("--judge", required=True, help="classifier that scores the images; must not be the guide")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--class-map", help="JSON file {build class name: judge label} when the label sets differ")
    p.add_argument("--restrict-to-shared", action="store_true", help="judge over the labels both sets share (iNat179)")
    p.add_argument("--per-class", action="store_true", help="print the per-class table too")
    p.add_argument("--allow-guide-judge", action="store_true",
                   help="score with the build's own guide (refused otherwise: its accuracy is flattered)")
    p.add_argument("--device")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="few-shot training with k real + N synthetic per class (paper Table 2)")
    p.add_argument("out_dir")
    p.add_argument("--real", required=True, help="real dataset name (digits, cub, ...)")
    p.add_argument("--root", help="real dataset root")
    p.add_argument("--shots", default="0,3,9", help="comma-separated real images per class")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--synthetic-per-class", type=int)
    p.add_argument("--mode", default="ratio", choices=("concat", "ratio", "replace"),
                   help="how real and synthetic images mix (SynthAugDataset modes). Default ratio with --p 0.5: the "
                        "few-shot setting that measured best (RESULTS.md); concat is the paper's Table 2 protocol")
    p.add_argument("--p", type=float, default=0.5, help="ratio: synthetic share of each epoch; replace: swap odds")
    p.add_argument("--min-confidence", type=float, help="keep synthetic images with guide probability >= this")
    p.add_argument("--targets", default="hard", choices=("hard", "soft"),
                   help="soft: synthetic images train towards the guide's recorded probabilities (soft cross-entropy), "
                        "real ones towards their label")
    p.add_argument("--temperature", type=float, default=1.0, help="soft targets: guide probabilities ** (1 / this)")
    p.add_argument("--arch", help="timm architecture (default: a small CNN fit for the image size), or linear: "
                                  "logistic regression on the pixels")
    p.add_argument("--epochs", type=int)
    p.add_argument("--test-split", help="real split to test on (default: test, or val where there is no test split)")
    p.add_argument("--class-map", help="build class -> real class when names differ: inat179, inat179:ROOT, or a "
                                       "JSON file {build name: real name}")
    p.add_argument("--device")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("fid", help="FID/KID of generated vs real images (paper Tables 3/5)")
    p.add_argument("out_dir")
    p.add_argument("--real", required=True)
    p.add_argument("--root")
    p.add_argument("--features", default="inception", help="inception | guide | judge | a classifier source")
    p.add_argument("--split", default="train", help="real split to compare against")
    p.add_argument("--inception-weights", help="local Inception-v3 FID weights file (no download happens)")
    p.add_argument("--max-images", type=int, help="cap images per method")
    p.add_argument("--device")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("report", help="write OUT/report/index.html with galleries and tables")
    p.add_argument("out_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("classify", help="classify images with MC-TI/TI tokens as a CLIP classifier (MC-TI Eq. 6)")
    p.add_argument("out_dir")
    p.add_argument("--images", help="image folder or dataset name")
    p.add_argument("--root")
    p.add_argument("--split", default="test")
    p.add_argument("--device")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("fit-guide", help="fit a few-shot guide on a frozen backbone from k real images per class",
                       description="Fit a linear (or cosine-prototype) head on a frozen backbone's features of "
                       "--shots real images per class (the images SynthAugDataset(shots=k, seed=shots_seed) mixes "
                       "in), choosing features and strength by leave-one-out on the shots; the folder it writes is "
                       "a guide for `synthaug build --guide DIR`.")
    p.add_argument("--dataset", required=True, help="the real dataset (digits, cub, imagefolder, ...)")
    p.add_argument("--root", help="dataset folder (not needed for digits)")
    p.add_argument("--split", default="train", help="the split the shots are drawn from (default: train)")
    p.add_argument("--shots", type=int, required=True, help="real images per class")
    p.add_argument("--shots-seed", type=int, default=0, help="the seed that draws them (default 0)")
    p.add_argument("--out", required=True, help="the guide folder to write")
    p.add_argument("--backbone", help="'digits', a CLIP / DINOv2 / transformers hub id or folder, or a timm name "
                   "(default: the embedded CLIP for digits, else openai/clip-vit-large-patch14)")
    p.add_argument("--head", choices=("linear", "prototype"), default="linear", help="default: linear")
    p.add_argument("--strength", type=float, help="fix the L2 strength (linear) or logit scale (prototype) instead "
                   "of leave-one-out's choice; a stronger penalty can resist a steered token better")
    p.add_argument("--device", default="cpu", help="where the backbone runs (cpu, cuda, cuda:1)")
    p.add_argument("--overwrite", action="store_true", help="replace a guide fitted at --out before")
    p.set_defaults(func=cmd_fit_guide)

    p = sub.add_parser("config", help="explain a config key: its documentation, type, default (and a build's value)")
    p.add_argument("--explain", required=True, metavar="KEY", help="a config key (dct.lr) or a section (dct)")
    p.add_argument("--build", metavar="DIR", help="also print the value the build in DIR used")
    p.set_defaults(func=cmd_config)

    for p in sub.choices.values():  # every command takes -v and -q, before or after its name
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def configure_logging(verbose: bool = False, *, timestamps: bool = False) -> None:
    """Log synthaug's own lines at INFO and its dependencies' (timm's "Loading pretrained weights ...", diffusers,
    Ray) from WARNING up; with `verbose`, everything from DEBUG. What the CLI and `pipelines/` call first.

    >>> configure_logging(timestamps=True)
    """
    fmt = ("%(asctime)s " if timestamps else "") + "%(levelname)s %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format=fmt)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed on one line
        return e.code if isinstance(e.code, int) else 2
    configure_logging(verbose=args.verbose)
    try:
        return args.func(args)
    except UserError as e:
        print(f"synthaug {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"synthaug {args.command}: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
