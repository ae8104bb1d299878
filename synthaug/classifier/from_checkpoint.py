"""Classifiers from a local ``ARCH@checkpoint`` file: a timm architecture with a saved state dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SourceError, first_line
from .base import LoadedClassifier, last_linear
from .from_timm import timm_data_config, timm_labels
from .from_torchvision import torchvision_data_config


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint files (ARCH@PATH)
# --------------------------------------------------------------------------------------------------------------------
def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise SourceError(f"checkpoint file {str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- unpickling refusals, truncated or foreign files: all the user's to fix
        raise SourceError(
            f"checkpoint {str(path)!r} could not be read ({first_line(e)}): save a plain "
            f"state dict (torch.save(model.state_dict(), path) or safetensors)."
        ) from None
    if isinstance(sd, dict) and not all(isinstance(v, Tensor) for v in sd.values()):
        for key in ("state_dict", "model", "model_state_dict", "module"):  # training checkpoints wrap the weights
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise SourceError(f"checkpoint {str(path)!r} holds no state dict of tensors: save model.state_dict().")
    for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel / torch.compile wrappers
        if all(k.startswith(prefix) for k in sd):
            sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    return sd


def _head_classes(model: nn.Module, sd: dict[str, Tensor], head_name: str | None) -> int | None:
    """The class count a checkpoint was trained with: rows of its head weight (named, or the last Linear)."""
    names = [head_name] if head_name else []
    names += [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    for name in names:
        w = sd.get(f"{name}.weight")
        if w is not None and w.ndim >= 2:
            return int(w.shape[0])
    return None


def load_checkpoint(library: str, arch: str, ckpt: str) -> LoadedClassifier:
    path = Path(ckpt).expanduser()
    labels = None
    if library == "timm":
        import timm

        if not timm.is_model(arch):
            raise SourceError(
                f"{arch!r} is not a timm architecture: see timm.list_models(), or write "
                f"'torchvision:{arch}@{ckpt}' for a torchvision one."
            )
        sd = _read_state_dict(path)
        model = timm.create_model(arch, pretrained=False)
        head = model.pretrained_cfg.get("classifier")
        num = _head_classes(model, sd, head if isinstance(head, str) else None)
        if num is not None and num != model.num_classes:
            model.reset_classifier(num)
        data_config = timm_data_config(model)
        labels = timm_labels(model)
    else:
        import torchvision

        if arch not in torchvision.models.list_models():
            raise SourceError(f"{arch!r} is not a torchvision model: see torchvision.models.list_models().")
        sd = _read_state_dict(path)
        model = torchvision.models.get_model(arch, weights=None)
        num = _head_classes(model, sd, None)
        if num is not None and num != last_linear(model).out_features:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num)
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        data_config = torchvision_data_config(weights)
        labels = list(weights.meta.get("categories") or []) or None
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise SourceError(
            f"checkpoint {str(path)!r} does not fit architecture {arch!r} ({detail}): "
            f"name the architecture it was trained with."
        ) from None
    return LoadedClassifier(model, data_config, f"unknown: checkpoint {path} (pass trained_on= to record what it saw)",
                            library, labels)
