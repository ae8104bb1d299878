"""Everything `build` checks before a model loads or Ray starts: the config, the output folder, the guide, the dataset."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..atomic import TMP_PREFIX
from ..classifier.source import check_label_agreement, declared_labels, parse_source
from ..config import BuildConfig, diff, from_dict, get, validate
from ..datasets.base import class_aliases
from ..datasets.catalog import get_dataset
from ..datasets.select import select_classes
from ..errors import UserError
from ..layout import CONFIG_FILE, LOCK_FILE
from ..models import resolve_device, resolve_dtype, resolve_model_path
from .executors import _import_ray
from .plan import _Prepared, plan

# Config keys that may change between a build and its resumption: where and how the work runs, not what it makes.
RESUMABLE_KEYS = ("run", "out")


def _check_out(out: Path, config: BuildConfig, overwrite: bool) -> str:
    """What to do with the output folder: "new", "resume" or "overwrite". Writes nothing."""
    if out.exists() and not out.is_dir():
        raise UserError(f"`out` {str(out)!r} is a file, not a folder: pass a new or empty folder, or a build folder.")
    if out.is_dir():
        cfg_file = out / CONFIG_FILE
        if cfg_file.is_file():
            import yaml

            try:
                old = from_dict(yaml.safe_load(cfg_file.read_text()) or {})
            except (UserError, yaml.YAMLError, TypeError, AttributeError) as e:
                if overwrite:
                    return "overwrite"
                raise UserError(f"`out` {str(out)!r} holds a {CONFIG_FILE} that is not a synthaug build config "
                                f"({str(e).splitlines()[0][:120]}): pass --overwrite to start over, or another --out."
                                ) from None
            if overwrite:
                return "overwrite"
            changed = diff(old, config, ignore=RESUMABLE_KEYS)
            if changed:

                shown = "; ".join(f"{k}: {_short(get(old, k))} -> {_short(get(config, k))}" for k in changed[:6])
                more = f" (+{len(changed) - 6} more)" if len(changed) > 6 else ""
                raise UserError(f"`out` {str(out)!r} holds a build made with a different config ({shown}{more}): "
                                f"pass --overwrite to discard it and start over, or choose another --out.")
            return "resume"
        extra = [p.name for p in out.iterdir() if p.name != LOCK_FILE and not p.name.startswith(TMP_PREFIX)]
        if extra:
            raise UserError(f"`out` {str(out)!r} is not empty and holds no synthaug build (no {CONFIG_FILE}; found "
                            f"{', '.join(sorted(extra)[:3])}): choose a new or empty folder.")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"`out` {str(out)!r} is not writable ({probe} does not allow writing): choose a folder you "
                        f"can write to.")
    return "new"


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


def _prepare(config: BuildConfig, overwrite: bool) -> _Prepared:
    """Validate every input of a build (DESIGN.md §5). Raises `UserError`; loads no model, starts no Ray."""
    # 1. Config rules (a config built in code never went through load_config)
    validate(config)
    if config.run.num_workers is not None and config.run.num_workers <= 0:
        raise UserError(f"`run.num_workers` must be > 0 (or null for one per GPU) but is {config.run.num_workers}.")
    if config.run.max_in_flight is not None and config.run.max_in_flight <= 0:
        raise UserError(f"`run.max_in_flight` must be > 0 (or null for 2 x workers) but is {config.run.max_in_flight}.")
    # 2. The executor exists
    if config.run.executor == "ray":
        _import_ray()
    # 3. The output folder: new, resumable, or refused
    out = Path(config.out).expanduser()
    mode = _check_out(out, config, overwrite)
    # 4. Device, dtype, model

    resolve_dtype(config.dtype, resolve_device(config.device))
    resolve_model_path(config.model)
    # 5. Dataset root and layout, class selection

    dataset = get_dataset(config.dataset, config.root, config.split)
    class_names = [str(c) for c in dataset.classes]
    if not class_names:
        raise UserError(f"`dataset` {config.dataset!r} at {config.root!r} has no classes: check --root.")
    selected = select_classes(dataset, config.classes)
    # 6. The guide exists, and its labels are the dataset's classes: DCT steers class c towards logit c
    _check_guide(config.guide)
    n_guide = guide_num_classes(config.guide)
    check_label_agreement(class_aliases(dataset), labels=declared_labels(config.guide)[0] if n_guide else None,
                          count=n_guide, what="guide", source=config.guide, dataset=config.dataset)
    # 7. What the method needs
    if config.method in ("ti", "mcti"):
        counts = Counter(int(t) for t in dataset.targets)
        need = range(len(class_names)) if config.method == "mcti" else selected
        short = [c for c in need if counts.get(c, 0) < config.mcti.shots]
        if short:
            c = short[0]
            raise UserError(f"`mcti.shots` is {config.mcti.shots} but class {c} ({class_names[c]!r}) has "
                            f"{counts.get(c, 0)} images in split {config.split!r}: lower --shots or pick another split.")
        if config.method == "mcti" and len(class_names) < 2:
            raise UserError("`method` 'mcti' needs at least 2 classes (its regularizer discriminates between them): "
                            "use method 'ti'.")
        if config.method == "mcti" and config.mcti.clip_model is not None:
            p = Path(config.mcti.clip_model).expanduser()
            if config.mcti.clip_model.startswith((".", "/", "~")) and not p.exists():
                raise UserError(f"`mcti.clip_model` {config.mcti.clip_model!r} does not exist: pass a CLIPModel "
                                f"directory or a hub id like 'openai/clip-vit-large-patch14'.")
    return _Prepared(config, out, mode, class_names, selected, plan(config, class_names, selected))
