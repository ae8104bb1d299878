"""`load_classifier`: resolve a classifier source string to the loader that builds it.

`parse_source` names the source's kind; `LOADERS` maps each kind to its loader. Loaders and the hub helpers raise a
`SourceError` that says what is wrong without naming the source; `load_classifier` adds "`classifier` SOURCE:" once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import SourceError, UserError
from ..layout import guide_members
from ..models import offline, resolve_device, resolve_dtype
from .base import Classifier, LoadedClassifier
from .from_checkpoint import load_checkpoint
from .from_timm import load_timm_dir, load_timm_pretrained
from .from_torchvision import load_torchvision
from .from_transformers import load_transformers
from .hub import check_hub_id, hub_config, known_model, read_json
from .probe import is_probe_config, load_probe
from .source import HELP, ClassifierSource, declared_multi_label, parse_source


def load_classifier(
    source: str | os.PathLike,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype = torch.float32,
    labels: Sequence[str] | None = None,
    trained_on: str | None = None,
    local_files_only: bool | None = None,
) -> Classifier:
    """Load a classifier, frozen, on `device`, with its labels and its own eval preprocessing.

    `source` is resolved in this order (the first rule that applies wins):

    1. An embedded name: ``"digits-guide"``, ``"digits-judge"``, ``"digits-attr-guide"`` (multi-label: one sigmoid
       output per attribute of the digit) (timm directories shipped in the package).
    2. An explicit prefix:
       ``"timm:NAME"`` (timm registry, pretrained weights; ``NAME`` may carry a tag, ``"resnet50.a1_in1k"``),
       ``"hf-hub:ORG/NAME"`` (a timm model on the hub, ``@revision`` allowed),
       ``"local-dir:PATH"`` (a timm or transformers directory),
       ``"transformers:ID_OR_PATH"`` (``AutoModelForImageClassification``),
       ``"vit-mae:ID_OR_PATH"`` (an HF ViT checkpoint whose head reads mean-pooled patch tokens, see `MeanPoolViT`),
       ``"torchvision:NAME"`` or ``"torchvision:NAME.WEIGHTS"`` (``torchvision.models.get_model``, default weights).
    3. A checkpoint file with its architecture: ``"ARCH@PATH"`` (timm), ``"timm:ARCH@PATH"`` or
       ``"torchvision:ARCH@PATH"``. ``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt``/``.tar`` read with
       ``torch.load(weights_only=True)``; a ``state_dict``/``model`` entry and ``module.`` prefixes are unwrapped. The
       class count is read from the checkpoint's head; preprocessing is the architecture's default pretrained config
       (timm) or its default weights' transforms (torchvision).
    4. An existing local directory: a few-shot guide folder written by ``synthaug fit-guide``
       (`synthaug.classifier.probe`); ``config.json`` with ``"architecture"`` -> timm (``local-dir:``); with
       ``"model_type"`` -> transformers (+ ``preprocessor_config.json``). A known MAE id in its ``_name_or_path``, or
       the reference code's ``CustomViTForImageClassification`` in ``architectures``, selects mean pooling. A file
       without ``ARCH@`` is refused with that syntax in the message.
    5. A timm registry name (``"resnet50"``, ``"vit_base_patch16_224.augreg_in21k_ft_in1k"``): pretrained weights.
    6. A hub id ``"ORG/NAME"``: the known MAE guides (``vesteinn/vit-mae-cub``, ``vesteinn/vit-mae-inat21``) use mean
       pooling; otherwise the repo's ``config.json`` decides: ``"architecture"`` -> timm, else transformers.

    Several sources joined by commas, ``"A,B"``, load as one `GuideEnsemble` (each by these rules; a local path that
    holds a comma is one source).

    Args:
        source: see above.
        device: ``"auto"`` (CUDA if present), ``"cpu"``, ``"cuda:1"``...
        dtype: weights dtype (logits are returned in fp32 whatever it is).
        labels: class names overriding the model's own (timm ``label_names``, ``id2label``, torchvision
            ``categories``); their count must equal the model's outputs. Without any: ``class_0, class_1, ...``.
        trained_on: note of what data the model saw; default: the source's own note (embedded models, known hub
            models, a ``trained_on`` key in config.json) or ``"unknown: ..."``.
        local_files_only: never touch the network; default follows ``HF_HUB_OFFLINE``.

    Returns:
        A frozen `Classifier` in eval mode.

    >>> guide = load_classifier("digits-guide", device="cpu")
    >>> guide.labels[:3]
    ['zero', 'one', 'two']
    """
    members = guide_members(os.fspath(source)) if isinstance(source, (str, os.PathLike)) else [source]
    if len(members) > 1:  # "A,B": an ensemble, each guide loaded by these rules
        from .ensemble import GuideEnsemble

        return GuideEnsemble([load_classifier(m, device=device, dtype=dtype, labels=labels, trained_on=trained_on,
                                              local_files_only=local_files_only) for m in members])
    src = parse_source(source)  # refuses an empty or non-string source
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if local_files_only is None:
        local_files_only = offline()
    try:
        loaded = LOADERS[src.kind](src, local_files_only)
    except SourceError as e:  # the loaders say what is wrong; the argument and the source are named here, once
        raise UserError(f"`classifier` {src.text!r}: {e}") from None
    loaded.model.to(device=dev, dtype=torch_dtype)
    return Classifier(loaded.model, labels, loaded.data_config, source=src.text, trained_on=trained_on or loaded.trained_on,
                      kind=loaded.kind, model_labels=loaded.labels, multi_label=declared_multi_label(src) or None)


def _embedded(src: ClassifierSource, local_files_only: bool) -> LoadedClassifier:
    if not (src.path / "config.json").is_file():
        raise SourceError(f"an embedded model whose weights are missing at {src.path}: reinstall synthaug, or rebuild "
                          f"them with `python scripts/train_digits_world.py`.")
    return load_timm_dir(src.path)


def _transformers(src: ClassifierSource, local_files_only: bool) -> LoadedClassifier:
    pooling = "mean" if src.kind == "vit-mae" else None
    if src.path is not None:
        return load_transformers(str(src.path), True, pooling)
    check_hub_id(src.target)
    return load_transformers(src.target, local_files_only, pooling or known_model(src.target).get("pooling"))


def _file(src: ClassifierSource, local_files_only: bool) -> LoadedClassifier:
    raise SourceError(f"a checkpoint file without an architecture: pass 'ARCH@{src.text}' (a timm architecture, "
                      f"e.g. 'resnet18@{src.text}') or 'torchvision:ARCH@{src.text}'.")


def _name(src: ClassifierSource, local_files_only: bool) -> LoadedClassifier:
    """A bare name: the timm registry, else a hub id (its config.json decides timm or transformers)."""
    import timm

    name = src.text
    if "/" not in name and timm.is_model(name):
        return load_timm_pretrained(name, local_files_only)
    if src.hub_id is not None:
        if known_model(name).get("pooling") == "mean":
            return load_transformers(name, local_files_only, "mean")
        if "architecture" in hub_config(name, local_files_only):
            return load_timm_pretrained("hf-hub:" + name, local_files_only)
        return load_transformers(name, local_files_only, None)
    if name.startswith((".", "/", "~")) or os.sep in name:
        raise SourceError(f"no such directory: pass an existing directory, or {HELP}.")
    raise SourceError(f"not a known classifier: pass {HELP}.")


# A source's kind (`parse_source`) -> its loader; a new kind of source is one loader and one row here.
LOADERS: dict[str, Callable[[ClassifierSource, bool], LoadedClassifier]] = {
    "embedded": _embedded,
    "checkpoint": lambda src, lfo: load_checkpoint(src.family, src.arch, src.target),
    "timm": lambda src, lfo: load_timm_pretrained(src.target, lfo),
    "torchvision": lambda src, lfo: load_torchvision(src.target, lfo),
    "hf-hub": lambda src, lfo: load_timm_pretrained("hf-hub:" + src.target, lfo),
    "dir": lambda src, lfo: _load_dir(src.path),
    "transformers": _transformers,
    "vit-mae": _transformers,
    "file": _file,
    "name": _name,
}


def _load_dir(path: Path) -> LoadedClassifier:
    """A local directory: a probe folder, timm hub format or transformers ``save_pretrained`` format, told apart by
    config.json."""
    if not path.is_dir():
        raise SourceError(f"directory {str(path)!r} does not exist.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SourceError("the directory has no config.json: pass a timm directory (timm.models.save_for_hf) or a "
                          "transformers one (save_pretrained).")
    config = read_json(config_file)
    if is_probe_config(config):
        return load_probe(path)
    if "architecture" in config:
        return load_timm_dir(path)
    if "model_type" in config:
        origin = str(config.get("_name_or_path") or "")  # a snapshot of a known hub model keeps its id here
        pooling = known_model(origin).get("pooling")
        if "CustomViTForImageClassification" in (config.get("architectures") or []):
            pooling = "mean"  # saved from the reference code's mean-pooling class
        return load_transformers(str(path), True, pooling, origin=origin)
    raise SourceError(f"{config_file} has neither 'architecture' (timm) nor 'model_type' (transformers).")
