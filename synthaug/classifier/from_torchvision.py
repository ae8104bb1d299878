"""Classifiers from torchvision's model zoo."""

from __future__ import annotations

from typing import Any

from ..errors import SourceError, first_line
from .base import LoadedClassifier
from .from_timm import torch_hub_cached
from .hub import not_cached


# --------------------------------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------------------------------
def torchvision_data_config(weights: Any) -> dict[str, Any]:
    """torchvision's ``ImageClassification`` preset (resize shorter side, center crop, normalize) as a data config."""
    t = weights.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    return {"input_size": (3, int(crop), int(crop)), "interpolation": t.interpolation.value, "mean": tuple(t.mean),
            "std": tuple(t.std), "crop_pct": int(crop) / int(resize), "crop_mode": "center"}


def load_torchvision(name: str, local_files_only: bool) -> LoadedClassifier:
    import torchvision

    arch, _, tag = name.partition(".")
    if arch not in torchvision.models.list_models():
        raise SourceError(f"{arch!r} is not a torchvision model: see torchvision.models.list_models().")
    enum = torchvision.models.get_model_weights(arch)
    try:
        weights = enum.verify(tag) if tag else enum.DEFAULT
    except (KeyError, ValueError):  # enum lookup of an unknown name
        raise SourceError(f"{arch} has no weights {tag!r}: use one of {', '.join(w.name for w in enum)}.") from None
    cached = torch_hub_cached(weights.url)
    if local_files_only and not cached.is_file():
        raise not_cached(f"the torchvision weights {weights} ({cached})")
    try:
        model = torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise SourceError(f"could not be loaded ({first_line(e)}): download the weights first, or pass "
                          f"'torchvision:{arch}@CHECKPOINT'.") from None
    return LoadedClassifier(model, torchvision_data_config(weights),
                            f"torchvision weights {weights} (the dataset is in the name)", "torchvision",
                            list(weights.meta["categories"]))
