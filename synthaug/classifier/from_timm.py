"""Classifiers from timm: model names, ``hf-hub:`` ids, cached pretrained weights and local timm folders."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SourceError, first_line
from .base import LoadedClassifier, labels_of_model, timm_data_config
from .hub import check_hub_id, hub_file, not_cached, read_json


def timm_labels(model: nn.Module) -> list[str] | None:
    """A timm model's class names; ImageNet heads get their descriptions ("tench, Tinca tinca") from timm."""
    own = labels_of_model(model)
    if own is not None:
        return own
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if not subset:
        return None
    info = ImageNetInfo(subset)
    descriptions = info.label_descriptions(as_dict=True)
    return [descriptions.get(n, n) for n in info.label_names()]


def load_timm_dir(path: Path) -> LoadedClassifier:
    import timm

    config = read_json(path / "config.json")
    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise SourceError(
            f"config.json names architecture {arch!r}, which this timm ({timm.__version__}) "
            f"does not know: upgrade timm or re-export the model."
        )
    try:
        model = timm.create_model("local-dir:" + str(path.resolve()), pretrained=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise SourceError(
            f"the timm directory {str(path)!r} could not be loaded ({first_line(e)}): "
            f"it needs config.json and model.safetensors (or pytorch_model.bin) as timm.models.save_for_hf writes."
        ) from None
    note = config.get("trained_on") or f"unknown: the timm directory {path} declares no 'trained_on'"
    return LoadedClassifier(model, timm_data_config(model), str(note), "timm", timm_labels(model))


def _timm_cached_weights(cfg: dict[str, Any]) -> Path | None:
    """timm's pretrained weights for `cfg` if on disk (HF cache, or torch hub cache for URL weights), else None."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for n in names:
            hit = try_to_load_from_cache(repo, n, revision=revision or None)
            if isinstance(hit, str):
                return Path(hit)
        return None
    if cfg.get("url"):
        path = torch_hub_cached(cfg["url"])
        return path if path.is_file() else None
    return Path(cfg["file"]) if cfg.get("file") and Path(cfg["file"]).is_file() else None


def torch_hub_cached(url: str) -> Path:
    """Where `torch.hub.load_state_dict_from_url` keeps `url` (what timm and torchvision download into)."""
    from urllib.parse import urlparse

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def load_timm_pretrained(name: str, local_files_only: bool) -> LoadedClassifier:
    """A timm registry name with pretrained weights, or ``hf-hub:ORG/NAME``.

    Offline, timm is pointed at the files already on disk (a cached hub snapshot loads as ``local-dir:``, registry
    weights through a ``file`` overlay), so that ``local_files_only=True`` holds even where HF_HUB_OFFLINE is unset.
    """
    import timm

    create_name, kwargs = name, {}
    if name.startswith("hf-hub:"):
        repo = name.removeprefix("hf-hub:")
        check_hub_id(repo)
        config_file = hub_file(repo, "config.json", local_files_only)  # absent offline -> clear UserError
        config = read_json(Path(config_file))  # type: ignore[arg-type]
        note = config.get("trained_on") or f"unknown: see the model card of {repo}"
        if local_files_only:
            if not any(hub_file(repo, n, True, required=False)
                       for n in ("model.safetensors", "pytorch_model.bin")):
                raise not_cached(f"the weights of {repo}")
            create_name = "local-dir:" + str(Path(config_file).parent)  # type: ignore[arg-type]
    else:
        if not timm.is_model(name):
            raise SourceError("not a timm model: see `timm.list_models()`.")
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # an invalid tag
            cfg = None
        if cfg is None:
            raise SourceError(
                f"timm has no pretrained weights {name!r}: pick one listed by "
                f"`timm.list_pretrained('{name.split('.')[0]}*')`, or pass 'ARCH@CHECKPOINT' with your own weights."
            )
        cfg = cfg.to_dict()
        note = f"unknown: pretrained timm weights {name!r} (tag {cfg.get('tag')!r}; its model card says which data)"
        if local_files_only:
            cached = _timm_cached_weights(cfg)
            if cached is None:
                raise not_cached(f"the timm weights {cfg.get('hf_hub_id') or cfg.get('url') or name!r}")
            kwargs = {"pretrained_cfg_overlay": {"file": str(cached)}}
    try:
        model = timm.create_model(create_name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise SourceError(f"could not be loaded ({first_line(e)}): download it first, or pass a local directory."
                          ) from None
    return LoadedClassifier(model, timm_data_config(model), str(note), "timm", timm_labels(model))
