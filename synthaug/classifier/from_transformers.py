"""Classifiers from transformers' image-classification models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import SourceError, first_line
from .base import PIL_RESAMPLE, HFLogits, LoadedClassifier, MeanPoolViT, labels_of_model
from .hub import custom_code, hub_config, hub_file, known_model, read_json


# --------------------------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------------------------
def hf_data_config(pp: dict[str, Any]) -> dict[str, Any]:
    """An HF image processor config -> the equivalent timm data config (same resize, crop and normalization)."""
    resample = pp.get("resample", 2)
    interpolation = PIL_RESAMPLE.get(resample, resample if isinstance(resample, str) else "bilinear")
    if pp.get("do_normalize", True):
        mean, std = tuple(pp.get("image_mean") or ()), tuple(pp.get("image_std") or ())
        if len(mean) != 3 or len(std) != 3:
            raise SourceError("its preprocessor_config.json has no 3-channel image_mean/std.")
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    size = pp.get("size", {"height": 224, "width": 224})
    crop = pp.get("crop_size") if pp.get("do_center_crop", "crop_size" in pp) else None
    if isinstance(size, int):  # legacy: an int meant "shortest edge" when a crop follows, a square otherwise
        size = {"shortest_edge": size} if crop else {"height": size, "width": size}
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    base = {"interpolation": interpolation, "mean": mean, "std": std}
    if "shortest_edge" in size:
        s = int(size["shortest_edge"])
        if pp.get("crop_pct") is not None:  # ConvNeXt: shorter side to s / crop_pct, crop s; a plain warp from 384
            if s >= 384:
                return {**base, "input_size": (3, s, s), "crop_pct": 1.0, "crop_mode": "squash"}
            return {**base, "input_size": (3, s, s), "crop_pct": s / int(s / pp["crop_pct"]), "crop_mode": "center"}
        ch, cw = (int(crop["height"]), int(crop["width"])) if crop else (s, s)
        return {**base, "input_size": (3, ch, cw), "crop_pct": min(ch, cw) / s, "crop_mode": "center"}
    if "height" in size and "width" in size:  # ViT, DeiT, BEiT: warp to (height, width), then an optional crop
        h = int(size["height"])
        ch, cw = (int(crop["height"]), int(crop["width"])) if crop else (h, int(size["width"]))
        return {**base, "input_size": (3, ch, cw), "crop_pct": ch / h, "crop_mode": "squash"}
    raise SourceError(
        f"preprocessor size {size} is not supported (shortest_edge or height/width): "
        f"pass a model whose processor resizes to a fixed size."
    )


def load_transformers(name: str, local_files_only: bool, pooling: str | None, origin: str = "") -> LoadedClassifier:
    """A transformers image classifier (hub id or local ``save_pretrained`` directory); ``pooling="mean"``: MAE ViT.

    `origin`: the hub id a local directory was saved from (its config's ``_name_or_path``), for the trained_on note.
    """
    local = Path(name).is_dir()
    if local:
        config = read_json(Path(name) / "config.json")
        pp_file: str | None = str(Path(name) / "preprocessor_config.json")
        if not Path(pp_file).is_file():
            pp_file = None
    else:
        config = hub_config(name, local_files_only)  # absent offline -> one clear message, before transformers
        pp_file = hub_file(name, "preprocessor_config.json", local_files_only, required=False)
    code = custom_code(config)
    if code:
        raise SourceError(
            f"its config.json has `auto_map` ({code}), i.e. Python code shipped with the "
            f"model, and synthaug never runs a model's own code: pass a model of a built-in transformers or timm "
            f"architecture."
        )
    if pp_file is None:
        raise SourceError("it has no preprocessor_config.json, so its resize and mean/std are unknown: save the "
                          "image processor beside the model (processor.save_pretrained(dir)).")
    data_config = hf_data_config(read_json(Path(pp_file)))

    from transformers import AutoModelForImageClassification, ViTForImageClassification

    repo, _, revision = (name, "", "") if local else name.partition("@")
    cls = ViTForImageClassification if pooling == "mean" else AutoModelForImageClassification
    try:
        model = cls.from_pretrained(repo, revision=revision or None, local_files_only=local_files_only,
                                    trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise SourceError(
            f"could not be loaded as a transformers image classifier ({first_line(e)}): "
            f"pass a directory written by save_pretrained, or the hub id of an image-classification model."
        ) from None
    hub_id = repo if not local else (origin or name)
    note = known_model(hub_id).get("trained_on") or f"unknown: see the model card of {hub_id}"
    if pooling == "mean":
        if model.config.model_type != "vit":
            raise SourceError(
                f"mean pooling ('vit-mae:') needs an HF ViT checkpoint, but its model_type "
                f"is {model.config.model_type!r}: drop the 'vit-mae:' prefix."
            )
        return LoadedClassifier(MeanPoolViT(model), data_config, str(note), "vit-mae", labels_of_model(model))
    return LoadedClassifier(HFLogits(model), data_config, str(note), "transformers", labels_of_model(model))
