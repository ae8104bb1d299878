"""Everything `build` checks before a model loads or Ray starts: the config, the output folder, the guide, the dataset.

`check_build` runs the checks once per build and returns what they found (`CheckedBuild`); it makes no plan and
writes nothing. No Ray import here unless the build runs on Ray (`cluster.import_ray` is itself a check), and no
worker, model or pipeline import.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import TMP_PREFIX
from ..classifier.source import check_label_agreement, declared_labels, parse_source
from ..config import BuildConfig, diff, get, resolve_auto
from ..datasets.base import class_aliases
from ..datasets.catalog import get_dataset
from ..datasets.fewshot import check_shots
from ..datasets.select import select_classes
from ..errors import UserError
from ..layout import (
    CONFIG_FILE,
    LOCK_FILE,
    OVERWRITE_MARKER,
    PLAN_FILE,
    done_shards,
    fits_guide,
    guide_members,
    legacy_build_error,
    linked_build_dirs,
    read_build_config,
    read_plan,
    resume_command,
    work_done,
)
from ..models import check_device, cuda_available, resolve_device, resolve_dtype, resolve_model_path
from ..target import parse_guide_target
from ..token_methods import get_method
from .cluster import check_ray_address, import_ray, resolve_executor

# Config keys that may change between a build and its resumption: where and how the work runs, not what it makes.
# One exception (`_existing_build`): on CPU, `run.cpus_per_worker` is the torch thread count, and the thread count
# changes float results in their last bits, so it may change only while nothing was made.
RESUMABLE_KEYS = ("run", "out")


@dataclass
class CheckedBuild:
    """What `check_build` found: the folder, what to do with it, the dataset's classes and the selection."""

    out: Path
    mode: str  # "new" | "resume" | "replace" | "overwrite" (`_check_out`)
    class_names: list[str]
    selected: list[int]
    # every name each class goes by (`class_aliases`): a loaded guide's labels are checked against them
    class_aliases: list[tuple[str, ...]] = field(default_factory=list)


def same_work_diff(old: BuildConfig, new: BuildConfig) -> list[str]:
    """The keys by which `new` would do other work than the build `old` (its auto switches resolved on this
    machine; the `RESUMABLE_KEYS` left out)."""
    cuda = cuda_available()
    return diff(resolve_auto(old, cuda=cuda), resolve_auto(new, cuda=cuda), ignore=RESUMABLE_KEYS)


# Config keys that decide only the images, not the tokens: they may change while no shard is finished yet
# (`dct.trust` picks which prompt a class's images use; the trust check's own settings decide its verdict, which a
# worker checks again when they differ from the ones it was checked with).
SHARD_ONLY_KEYS = ("generate", "shards", "per_class", "baseline", "dct.trust", "dct.trust_images",
                   "dct.trust_features")

# The user's k real images: for a method that does not learn from them (DCT) with a given guide they decide only
# the images (real starts) and the trust verdict; TI / MC-TI learn their tokens from them, and ``guide: fit`` fits
# the guide that steers them.
SHOTS_KEYS = ("shots", "shots_seed")

def _check_out(out: Path, config: BuildConfig, overwrite: bool) -> str:
    """What to do with the output folder. Writes nothing but a probe file it removes again.

    Returns ``"new"`` (empty or absent), ``"resume"`` (a build of this config), ``"replace"`` (a build of another
    config that made nothing its change would invalidate: its config.yaml and plan.json are rewritten) or
    ``"overwrite"`` (a proven build, discarded by `--overwrite`: only the files a build writes are deleted).
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"`out` {str(out)!r} is a file, not a folder: pass a new or empty folder, or a build folder.")
    mode = "new"
    if out.is_dir() and (out / OVERWRITE_MARKER).is_file():
        if not overwrite:
            raise UserError(f"`out` {str(out)!r} holds a build whose `--overwrite` was interrupted while clearing it "
                            f"({OVERWRITE_MARKER}): rerun with --overwrite to finish, or choose another --out.")
        mode = "overwrite"
    elif out.is_dir():
        if (out / CONFIG_FILE).exists():
            mode = _existing_build(out, config, overwrite)
        else:
            extra = [p.name for p in out.iterdir() if p.name != LOCK_FILE and not p.name.startswith(TMP_PREFIX)]
            if extra:
                raise UserError(f"`out` {str(out)!r} is not empty and holds no synthaug build (no {CONFIG_FILE}; found "
                                f"{', '.join(sorted(extra)[:3])}): choose a new or empty folder.")
    linked = linked_build_dirs(out) if mode == "overwrite" else []
    if linked:
        raise UserError(f"`out` {str(out)!r}: {linked[0].name}/ is a symbolic link to {os.path.realpath(linked[0])}, "
                        f"and --overwrite deletes only inside the build folder: remove the link (and what it points "
                        f"to, if it is yours to discard), or choose another --out.")
    _check_writable(out)
    return mode


def _existing_build(out: Path, config: BuildConfig, overwrite: bool) -> str:
    old, why_not = read_build_config(out)
    has_plan = read_plan(out) is not None
    if old is None and has_plan:  # a build (its plan proves it) whose config.yaml was damaged
        if overwrite:
            return "overwrite"
        raise UserError(f"`out` {str(out)!r} holds a synthaug build whose {CONFIG_FILE} is damaged ({why_not}): "
                        f"restore {CONFIG_FILE} to resume it, or pass --overwrite to discard the build and start "
                        f"over, or choose another --out.")
    if old is None:
        raise UserError(f"`out` {str(out)!r} holds a {CONFIG_FILE} but is not a synthaug build ({why_not}); "
                        f"{'--overwrite discards synthaug builds only, so ' if overwrite else ''}nothing there was "
                        f"touched: choose another --out.")
    if overwrite:
        if not has_plan:
            raise UserError(f"`out` {str(out)!r} has a synthaug {CONFIG_FILE} but no readable {PLAN_FILE}, so it is "
                            f"not proven to be a build and --overwrite deletes nothing there: choose another --out, "
                            f"or run without --overwrite to resume it.")
        return "overwrite"
    if (legacy := legacy_build_error(out)) is not None:
        raise legacy
    changed = same_work_diff(old, config)
    if not changed and old.run.cpus_per_worker != config.run.cpus_per_worker and work_done(out) \
            and resolve_device(config.device).type == "cpu":
        was = old.run.cpus_per_worker
        raise UserError(f"`run.cpus_per_worker` {was} -> {config.run.cpus_per_worker}: on CPU it is each worker's "
                        f"torch thread count, which changes the last bits of float results, so tokens and images made "
                        f"from now on would not match those already in {str(out)!r}: resume with --set "
                        f"run.cpus_per_worker={was}, or pass --overwrite to start over.")
    if not changed:
        return "resume"
    if has_plan and not work_done(out):
        return "replace"  # nothing was made with the old config: the corrected command simply starts
    learns_from_shots = get_method(config.method).shots is not None
    shard_only = SHARD_ONLY_KEYS + (SHOTS_KEYS if not learns_from_shots and not fits_guide(config) else ())
    if has_plan and not done_shards(out) and all(
            any(k == s or k.startswith(s + ".") for s in shard_only) for k in changed):
        return "replace"  # the tokens stay valid: only how many images, and how they are made and stored, changed
    shown = "; ".join(f"{k}: {_short(get(old, k))} -> {_short(get(config, k))}" for k in changed[:6])
    more = f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
    raise UserError(f"`out` {str(out)!r} holds a build made with a different config ({shown}{more}): "
                    f"pass --overwrite to discard it and start over, or choose another --out.")


def _check_writable(out: Path) -> None:
    """Write (and remove) a probe file where the build will first write: permission bits do not tell (root ignores
    them, a read-only mount or a full disk does not show in them)."""
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"`out` {str(out)!r} is not writable ({probe} is a file, not a folder): choose another --out.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + "probe.", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(f"`out` {str(out)!r} is not writable ({probe}: {e.strerror or e}): choose a folder you can "
                        f"write to.") from None


def _check_dataset_unchanged(out: Path, config: BuildConfig, class_names: list[str]) -> None:
    """Refuse to resume a build whose dataset's classes changed: tokens and shards are filed by class index."""
    stored = read_plan(out)
    if stored is None:
        return
    names = stored.class_names
    problems = []
    if names is not None:
        renamed = [(i, a, b) for i, (a, b) in enumerate(zip(names, class_names)) if a != b]
        problems += [f"class {i} was {a!r}, now {b!r}" for i, a, b in renamed[:3]]
        if len(renamed) > 3:
            problems.append(f"{len(renamed) - 3} more renamed")
        if len(class_names) > len(names):
            added = class_names[len(names):]
            problems.append(f"added {', '.join(repr(n) for n in added[:3])}{', ...' if len(added) > 3 else ''}")
        elif len(class_names) < len(names):
            gone = names[len(class_names):]
            problems.append(f"gone {', '.join(repr(n) for n in gone[:3])}{', ...' if len(gone) > 3 else ''}")
    else:  # a plan from before every name was recorded: its class count and its classes' names
        if stored.num_classes != len(class_names):
            problems.append(f"{stored.num_classes} classes then, {len(class_names)} now")
        planned = {j.class_index: j.name for j in stored.jobs}
        renamed = [(i, a) for i, a in sorted(planned.items()) if i >= len(class_names) or class_names[i] != a]
        problems += [f"class {i} was {a!r}, now {class_names[i]!r}" if i < len(class_names) else
                     f"class {i} ({a!r}) is gone" for i, a in renamed[:3]]
    if problems:
        raise UserError(f"`dataset` {config.dataset!r} at {config.root!r} changed since the build in {str(out)!r} was "
                        f"planned ({'; '.join(problems)}); its tokens and shards are filed by class index, so "
                        f"resuming would file them under other classes: restore the dataset, choose another --out, or "
                        f"pass --overwrite to start over.")


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def guide_num_classes(source: str) -> int | None:
    """The guide's label count read from its config file, without loading weights; None when that is not possible.

    Reads ``config.json`` of the embedded classifiers, of local timm / transformers directories, and of hub models
    already in the local Hugging Face cache (``num_classes`` for timm, ``id2label`` / ``num_labels`` for
    transformers). Registry names, torchvision names and bare checkpoints return None: the worker checks them
    after loading.

    >>> guide_num_classes("digits-guide")  # doctest: +SKIP
    10
    """
    return declared_labels(source)[1]


def _check_guide(source: str) -> None:
    """The cheap part of loading a guide: an embedded name has its files, a local path exists and has a config."""
    src = source.strip()
    if not src:
        raise UserError("`guide` is empty: pass a classifier (a timm name, 'hf-hub:ORG/NAME', a transformers id, a "
                        "local directory, or 'digits-guide').")
    parsed = parse_source(src)
    if parsed.kind == "embedded":
        if not (parsed.path / "config.json").is_file():
            raise UserError(f"`guide` {src!r} is an embedded classifier but its weights are missing at "
                            f"{parsed.path}: rebuild them with `python scripts/train_digits_world.py`.")
        return
    p = parsed.path or Path(parsed.target).expanduser()
    if (parsed.kind == "dir" or parsed.target.startswith((".", "/", "~"))) and not p.exists():
        raise UserError(f"`guide` {source!r} does not exist: pass an existing classifier directory or checkpoint, a "
                        f"hub id, or a timm name.")
    if p.is_dir() and not (p / "config.json").is_file():
        raise UserError(f"`guide` {source!r} is a directory without config.json: pass a timm directory "
                        f"(timm.models.save_for_hf) or a transformers one (save_pretrained).")


def _check_backbone(backbone: str | None) -> None:
    """A fitted guide's backbone given as a path exists (hub ids and timm names are checked when they load)."""
    if backbone is not None and backbone.startswith((".", "/", "~")) and not Path(backbone).expanduser().is_dir():
        raise UserError(f"`guide_fit.backbone` {backbone!r} does not exist: pass a backbone folder "
                        f"(save_pretrained or timm's hub format), a hub id, a timm name, or null for the CLIP paired "
                        f"with the model.")


def check_build(config: BuildConfig, overwrite: bool) -> CheckedBuild:
    """Check every input of a build whose config passed `synthaug.config.validate`. Raises `UserError`; loads no
    model, starts no Ray, writes nothing but a probe file it removes again."""
    # 1. A build learns class tokens
    if config.guide_target is not None and not parse_guide_target(config.guide_target).is_class:
        raise UserError(f"`guide_target` {config.guide_target!r} learns one attribute token, but a build learns a "
                        f"token per class: run `synthaug learn --guide-target {config.guide_target}`, or drop it.")
    # 2. The executor exists (`auto` takes Ray only where it is installed)
    if resolve_executor(config.run, say=False) == "ray":
        import_ray()
    # 3. The output folder: new, resumable, or refused
    out = Path(config.out).expanduser()
    mode = _check_out(out, config, overwrite)
    if config.run.executor == "ray" and not import_ray().is_initialized():  # a caller's own session is theirs
        check_ray_address(config.run.ray_address or os.environ.get("RAY_ADDRESS"),
                          f"resume with: {resume_command(out)}" if mode == "resume" else "run the same command again")
    # 4. Device, dtype, model
    device = resolve_device(config.device)
    if resolve_executor(config.run, say=False) == "local" or not (config.run.ray_address
                                                                   or os.environ.get("RAY_ADDRESS")):
        # (on a Ray cluster the driver is not part of, the GPUs are the cluster's: the Ray executor checks them)
        check_device(device, config.device, local=config.run.executor == "local")
    resolve_dtype(config.dtype, device)
    resolve_model_path(config.model)
    # 5. Dataset root and layout, class selection; on resume, the same classes as when the build was planned
    dataset = get_dataset(config.dataset, config.root, config.split)
    class_names = [str(c) for c in dataset.classes]
    if not class_names:
        raise UserError(f"`dataset` {config.dataset!r} at {config.root!r} has no classes: check --root.")
    if mode == "resume" and work_done(out):
        _check_dataset_unchanged(out, config, class_names)
    selected = select_classes(dataset, config.classes)
    # 6. The guide exists, and its labels are the dataset's classes: DCT steers class c towards logit c (a fitted
    # guide is fitted on every class of the dataset, in its order, from `shots` images of each)
    for member in guide_members(config.guide):  # each guide of an ensemble ("A,B")
        if member == "fit":
            check_shots(dataset, config.shots, range(len(class_names)), class_names, config.split,
                        "`guide` 'fit' fits on")
            _check_backbone(config.guide_fit.backbone)
            continue
        _check_guide(member)
        n_guide = guide_num_classes(member)
        check_label_agreement(class_aliases(dataset), labels=declared_labels(member)[0] if n_guide else None,
                              count=n_guide, what="guide", source=member, dataset=config.dataset)
    # 7. What the method needs (its k real images, a CLIP, its own settings)
    get_method(config.method).check(config, dataset=dataset, class_names=class_names, selected=selected)
    return CheckedBuild(out, mode, class_names, selected, class_aliases(dataset))
