"""Classifier source strings, read without loading a model: what a source names (`parse_source`), the labels its
config file declares (`declared_labels`), whether two sources are one model (`same_source`), and whether a guide's
labels are a dataset's classes (`check_label_agreement`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..models import ASSETS
from ..names import normalize_name

log = logging.getLogger(__name__)

# Embedded classifiers: names that resolve to timm hub-format directories shipped inside the package.
EMBEDDED_CLASSIFIERS = {"digits-guide": ASSETS / "digits" / "guide", "digits-judge": ASSETS / "digits" / "judge",
                        "digits-attr-guide": ASSETS / "digits" / "attr-guide"}  # multi-label: closed_loop, ...


PREFIXES = ("timm:", "hf-hub:", "local-dir:", "transformers:", "vit-mae:", "torchvision:")


HELP = ("a timm name ('resnet50'), 'hf-hub:ORG/NAME', a transformers id ('google/vit-large-patch16-224'), "
        "'torchvision:NAME', a local directory, 'ARCH@CHECKPOINT' or 'digits-guide'/'digits-judge'/"
        "'digits-attr-guide'")


@dataclass(frozen=True)
class ClassifierSource:
    """What a classifier source string names, before anything loads.

    kind: ``"embedded"`` (a shipped timm directory), ``"timm"`` (``timm:NAME``, the timm registry), ``"hf-hub"`` (a
    timm model on the hub), ``"dir"`` (a local timm or transformers directory), ``"transformers"`` / ``"vit-mae"``
    (an id or a directory for `AutoModelForImageClassification` / mean pooling), ``"torchvision"``
    (``torchvision:NAME[.WEIGHTS]``), ``"checkpoint"`` (``[timm:|torchvision:]ARCH@FILE``), ``"file"`` (a file
    without an architecture: refused when loaded), ``"name"`` (a bare timm registry name or hub id ``ORG/NAME``,
    told apart when loaded).
    """

    text: str  # the source as given, stripped
    kind: str
    target: str  # the name, hub id (``@revision`` kept) or path, prefix and checkpoint removed
    path: Path | None = None  # the local directory or file, when the source is one
    arch: str | None = None  # the architecture of a checkpoint
    family: str | None = None  # "timm" | "torchvision" for a checkpoint

    @property
    def hub_id(self) -> str | None:
        """``ORG/NAME`` when the source may be a hub repository (without ``@revision``), else None."""
        if self.path is not None or self.kind not in ("hf-hub", "transformers", "vit-mae", "name"):
            return None
        repo = self.target.split("@")[0]
        if repo.count("/") == 1 and not repo.startswith((".", "/", "~")) and " " not in repo:
            return repo
        return None


def parse_source(source: str | os.PathLike) -> ClassifierSource:
    """Read a classifier source string; the order of the rules is `load_classifier`'s. Loads nothing.

    >>> parse_source("timm:resnet18@ckpt.pth").kind, parse_source("digits-guide").kind
    ('checkpoint', 'embedded')
    """
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"`classifier` must be {HELP}, but is {source!r}.")
    text = source.strip()
    # 1. embedded
    if text in EMBEDDED_CLASSIFIERS:
        return ClassifierSource(text, "embedded", text, Path(EMBEDDED_CLASSIFIERS[text]))
    # 2. explicit prefixes
    if text.startswith(PREFIXES):
        prefix, _, rest = text.partition(":")
        if not rest:
            raise UserError(f"`classifier` {text!r} names nothing after '{prefix}:': pass e.g. '{prefix}:NAME'.")
        if prefix in ("timm", "torchvision"):
            arch, at, ckpt = rest.partition("@")
            if at:
                return ClassifierSource(text, "checkpoint", ckpt, Path(ckpt).expanduser(), arch, prefix)
            return ClassifierSource(text, prefix, rest)
        if prefix == "hf-hub":
            return ClassifierSource(text, "hf-hub", rest)
        local = Path(rest).expanduser()
        if prefix == "local-dir":
            return ClassifierSource(text, "dir", rest, local)
        return ClassifierSource(text, prefix, rest, local if local.is_dir() else None)
    # 3. ARCH@checkpoint
    arch, at, ckpt = text.partition("@")
    if at and "/" not in arch and not Path(text).exists():
        return ClassifierSource(text, "checkpoint", ckpt, Path(ckpt).expanduser(), arch, "timm")
    # 4. a local path
    path = Path(text).expanduser()
    if path.is_dir():
        return ClassifierSource(text, "dir", text, path)
    if path.is_file():
        return ClassifierSource(text, "file", text, path)
    # 5./6. a timm registry name or a hub id: told apart when loaded
    return ClassifierSource(text, "name", text)


def config_file(source: str | ClassifierSource) -> Path | None:
    """The source's ``config.json`` on this machine (a local directory, or a hub repo already in the HF cache), or
    None: registry names, torchvision names and checkpoints have none."""
    src = source if isinstance(source, ClassifierSource) else parse_source(source)
    if src.path is not None and src.kind in ("embedded", "dir", "transformers", "vit-mae"):
        return src.path / "config.json" if (src.path / "config.json").is_file() else None
    if src.hub_id is not None:
        with contextlib.suppress(Exception):  # an absent cache or hub library only means "check after loading"
            from huggingface_hub import try_to_load_from_cache

            repo, _, revision = src.target.partition("@")
            hit = try_to_load_from_cache(repo, "config.json", revision=revision or None)
            if isinstance(hit, str):
                return Path(hit)
    return None


def declared_labels(source: str | ClassifierSource) -> tuple[list[str] | None, int | None]:
    """``(labels, count)`` as the source's config file declares them, without loading weights.

    Labels: timm ``label_names`` (with ``label_descriptions``), transformers ``id2label`` (not the ``LABEL_i``
    placeholders). Count: ``num_classes`` (timm), else ``id2label`` / ``num_labels`` (transformers). ``(None, None)``
    when no config file is on this machine.

    >>> declared_labels("digits-guide")[0][:2]
    ['zero', 'one']
    """
    path = config_file(source)
    if path is None:
        return None, None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None
    labels: list[str] | None = None
    names = cfg.get("label_names")
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names, key=int)]
    if isinstance(names, list) and names:
        descriptions = cfg.get("label_descriptions") or {}
        labels = [str(descriptions.get(n, n)) for n in names]
    id2label = cfg.get("id2label")
    if labels is None and isinstance(id2label, dict) and id2label:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        if not all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            labels = names
    count = None
    if isinstance(cfg.get("num_classes"), int):
        count = cfg["num_classes"]
    elif isinstance(id2label, dict) and id2label:
        count = len(id2label)
    elif isinstance(cfg.get("num_labels"), int):
        count = cfg["num_labels"]
    if labels is not None and count is not None and len(labels) != count:
        labels = None  # a config at odds with itself: trust the head's size only
    return labels, count if count is not None else (len(labels) if labels else None)


def declared_multi_label(source: str | ClassifierSource) -> bool | None:
    """Whether the source's config file declares independent sigmoid outputs (``problem_type`` =
    ``"multi_label_classification"``, transformers' key, also read from timm directories); None when no config file
    is on this machine (then the loaded model's own config decides).

    >>> declared_multi_label("digits-attr-guide"), declared_multi_label("digits-guide")
    (True, False)
    """
    path = config_file(source)
    if path is None:
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return isinstance(cfg, dict) and cfg.get("problem_type") == "multi_label_classification"


def same_source(a: str | None, b: str | None) -> bool:
    """Whether two classifier sources name the same model (hub ids case-insensitively, local paths resolved).

    >>> same_source("hf-hub:timm/ResNet50.a1_in1k", "timm/resnet50.a1_in1k")
    True
    """
    if not a or not b:
        return False

    def key(s: str) -> str:
        try:
            src = parse_source(s)
        except UserError:
            return s
        if src.path is not None and src.path.exists():
            return str(src.path.resolve()) + (f"@{src.arch}" if src.arch else "")
        target = src.target.removeprefix("timm/") if src.kind in ("timm", "hf-hub", "name") else src.target
        return target.rstrip("/").lower()

    return key(a) == key(b)


def check_label_agreement(classes: Sequence[str | Sequence[str]], *, labels: Sequence[str] | None,
                          count: int | None, what: str, source: str, dataset: str) -> str:
    """Refuse a guide whose outputs are not the dataset's classes in the dataset's order (DCT steers class c towards
    logit c). Compares cleaned names (`normalize_name`) where the guide has labels; the count only otherwise, with a
    warning that says so. Returns how it checked: ``"labels"``, ``"count"`` or ``"none"`` (nothing declared).

    A class may be given as its names (``("Lumbricus terrestris", "00000_Animalia_..._Lumbricus_terrestris")``): a
    label agrees with any of them, whole or by one of its comma-separated parts (``"tench, Tinca tinca"`` is
    ``tench``). Labels that carry no names (``class_0``, ``LABEL_3``) count as no labels.

    >>> check_label_agreement(["Black footed Albatross"], labels=["001.Black_footed_Albatross"], count=1,
    ...                       what="guide", source="g", dataset="cub")
    'labels'
    """
    n = len(classes)
    if labels is not None and _named(labels):
        if len(labels) != n:
            raise UserError(f"`{what}` {source!r} predicts {len(labels)} classes but dataset {dataset!r} has {n}: "
                            f"pass a {what} trained on this dataset's classes (its logit c must be class c).")
        differ = [(i, c, lb) for i, (c, lb) in enumerate(zip(classes, labels)) if not _agrees(c, lb)]
        if differ:
            shown = "; ".join(f"{i}: dataset {_first(c)!r} vs {what} {lb!r}" for i, c, lb in differ[:3])
            raise UserError(f"`{what}` {source!r} labels its outputs differently from dataset {dataset!r} "
                            f"({len(differ)} of {n} differ; {shown}): pass a {what} whose logit c is the dataset's "
                            f"class c, in the dataset's order.")
        return "labels"
    if count is None:
        return "none"
    if count != n:
        raise UserError(f"`{what}` {source!r} predicts {count} classes but dataset {dataset!r} has {n}: pass a "
                        f"{what} trained on this dataset's classes (its logit c must be class c).")
    log.warning("`%s` %r declares no label names: only its class count (%d) is checked against dataset %r, not its "
                "class order", what, source, count, dataset)
    return "count"


def _first(names: str | Sequence[str]) -> str:
    return names if isinstance(names, str) else names[0]


def _agrees(names: str | Sequence[str], label: str) -> bool:
    keys = {normalize_name(n) for n in ([names] if isinstance(names, str) else names)}
    label_keys = {normalize_name(label)} | {normalize_name(part) for part in str(label).split(",")}
    return bool(keys & label_keys)


def _named(labels: Sequence[str]) -> bool:
    """Whether labels carry class names (not ``class_0``/``LABEL_0``/``0`` placeholders)."""
    keys = [normalize_name(lb) for lb in labels]
    return not all(k in (f"class {i}", f"label {i}", str(i)) for i, k in enumerate(keys))


__all__ = ["EMBEDDED_CLASSIFIERS", "HELP", "PREFIXES", "ClassifierSource", "check_label_agreement", "config_file",
           "declared_labels", "declared_multi_label", "parse_source", "same_source"]
