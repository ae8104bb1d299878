"""`load_classifier`: resolve a classifier source string to the loader that builds it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import UserError
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
    loaded = _resolve(src, local_files_only)
    loaded.model.to(device=dev, dtype=torch_dtype)
    return Classifier(loaded.model, labels, loaded.data_config, source=src.text, trained_on=trained_on or loaded.trained_on,
                      kind=loaded.kind, model_labels=loaded.labels, multi_label=declared_multi_label(src) or None)


def _resolve(src: ClassifierSource, local_files_only: bool) -> LoadedClassifier:
    """The loader for a parsed source (the rules are `parse_source`'s, documented in `load_classifier`)."""
    source = src.text
    if src.kind == "embedded":
        if not (src.path / "config.json").is_file():
            raise UserError(
                f"`classifier` {source!r} is an embedded model but its weights are missing at {src.path}: reinstall "
                f"synthaug, or rebuild them with `python scripts/train_digits_world.py`."
            )
        return load_timm_dir(source, src.path)
    if src.kind == "checkpoint":
        return load_checkpoint(source, src.family, src.arch, src.target)
    if src.kind == "timm":
        return load_timm_pretrained(source, src.target, local_files_only)
    if src.kind == "torchvision":
        return load_torchvision(source, src.target, local_files_only)
    if src.kind == "hf-hub":
        return load_timm_pretrained(source, "hf-hub:" + src.target, local_files_only)
    if src.kind == "dir":
        return _load_dir(source, src.path)
    if src.kind in ("transformers", "vit-mae"):
        pooling = "mean" if src.kind == "vit-mae" else None
        if src.path is not None:
            return load_transformers(source, str(src.path), True, pooling)
        check_hub_id(source, src.target)
        return load_transformers(source, src.target, local_files_only,
                                 pooling or known_model(src.target).get("pooling"))
    if src.kind == "file":
        raise UserError(
            f"`classifier` {source!r} is a checkpoint file without an architecture: pass 'ARCH@{source}' "
            f"(a timm architecture, e.g. 'resnet18@{source}') or 'torchvision:ARCH@{source}'."
        )
    # a bare name: the timm registry, else a hub id
    import timm

    if "/" not in source and timm.is_model(source):
        return load_timm_pretrained(source, source, local_files_only)
    if src.hub_id is not None:
        if known_model(source).get("pooling") == "mean":
            return load_transformers(source, source, local_files_only, "mean")
        if "architecture" in hub_config(source, source, local_files_only):
            return load_timm_pretrained(source, "hf-hub:" + source, local_files_only)
        return load_transformers(source, source, local_files_only, None)
    if source.startswith((".", "/", "~")) or os.sep in source:
        raise UserError(f"`classifier` {source!r} does not exist: pass an existing directory, or {HELP}.")
    raise UserError(f"`classifier` {source!r} is not a known classifier: pass {HELP}.")


def _load_dir(source: str, path: Path) -> LoadedClassifier:
    """A local directory: timm hub format or transformers ``save_pretrained`` format, told apart by config.json."""
    if not path.is_dir():
        raise UserError(f"`classifier` {source!r}: directory {str(path)!r} does not exist.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"`classifier` {source!r} is a directory without config.json: pass a timm directory "
            f"(timm.models.save_for_hf) or a transformers one (save_pretrained)."
        )
    config = read_json(config_file)
    if is_probe_config(config):
        return load_probe(source, path)
    if "architecture" in config:
        return load_timm_dir(source, path)
    if "model_type" in config:
        origin = str(config.get("_name_or_path") or "")  # a snapshot of a known hub model keeps its id here
        pooling = known_model(origin).get("pooling")
        if "CustomViTForImageClassification" in (config.get("architectures") or []):
            pooling = "mean"  # saved from the reference code's mean-pooling class
        return load_transformers(source, str(path), True, pooling, origin=origin)
    raise UserError(
        f"`classifier` {source!r}: {config_file} has neither 'architecture' (timm) nor 'model_type' (transformers)."
    )
