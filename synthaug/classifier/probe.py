"""Few-shot guides: a linear head on a frozen image backbone's features (`ProbeModel`), its folder format and loader.

A *probe* is what a user with a few photos per class fits instead of training a CNN from scratch: a frozen
foundation backbone (a CLIP image tower, a timm model, a transformers vision model such as DINOv2) and one linear
layer on its L2-normalised features. `synthaug.classifier.fit` fits one; `load_classifier(DIR)` loads the folder it
writes, which holds everything needed to run it (the backbone is copied in, so the folder can move)::

    DIR/config.json         {"synthaug_guide": "probe", "format_version": 1, "backbone": {"family": "clip",
                             "path": "backbone", "source": ...}, "features": "pooled", "num_classes": 10,
                             "label_names": [...], "data_config": {...}, "trained_on": ...}
    DIR/head.safetensors    {"weight": [num_classes, dim], "bias": [num_classes]}
    DIR/backbone/           the backbone: transformers ``save_pretrained`` (+ its preprocessor_config.json), or
                            timm's hub format (``timm.models.save_for_hf``)
    DIR/guide.json          how it was fitted (`synthaug.classifier.fit.FitRecord`): backbone, head, features,
                            strength, the shots (dataset indices, seed), leave-one-out accuracy per class

Without synthaug, a CLIP probe runs in three lines (``features: pooled``; ``projected`` reads ``.image_embeds`` of
``vision(pixel_values)``, ``patch_mean`` the mean of ``last_hidden_state[:, 1:]``)::

    vision = transformers.CLIPVisionModelWithProjection.from_pretrained("DIR/backbone")
    head = safetensors.torch.load_file("DIR/head.safetensors")
    logits = F.normalize(vision.vision_model(pixel_values).pooler_output, dim=-1) @ head["weight"].T + head["bias"]

(``pixel_values`` from ``CLIPImageProcessor.from_pretrained("DIR/backbone")``.) Why not a stock
``CLIPForImageClassification`` folder: that class classifies the mean of the patch tokens, with no post-layernorm
and no projection, and on the digits world a head there scored 15-20 points below one on the pooled output at one and
three shots per class; the features are chosen per fit (leave-one-out), so a fixed stock class cannot hold them all.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SourceError, UserError, first_line
from ..models import ASSETS
from .base import LoadedClassifier
from .hub import custom_code, hub_config, hub_file, read_json

log = logging.getLogger(__name__)


# The embedded digits world's CLIP (a whole CLIPModel; a probe reads its image tower): ``backbone="digits"``.
DIGITS_CLIP = ASSETS / "digits" / "clip"


PROBE_FORMAT = "probe"  # config.json's "synthaug_guide" value


PROBE_VERSION = 1


# What a backbone's features may be: the pooled output (CLIP: the CLS token after post-layernorm; DINOv2/ViT: its
# pooler; timm: `forward_head(pre_logits=True)`), CLIP's projected image embedding, or the mean of the patch tokens.
FEATURES = ("pooled", "projected", "patch_mean")


FAMILY_FEATURES = {"clip": FEATURES, "transformers": ("pooled", "patch_mean"), "timm": ("pooled",)}


@contextmanager
def _quiet_transformers():
    """transformers logs a load report when a CLIP vision tower is read out of a whole CLIPModel (the text tower's
    weights are 'unexpected'): expected here, so not shown."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


class Backbone(nn.Module):
    """A frozen image backbone whose `forward` gives features of one kind (`FEATURES`); `all_features` every kind.

    Args:
        model: a transformers ``CLIPVisionModelWithProjection`` (family ``"clip"``), another transformers vision model
            (``"transformers"``: ``pooler_output`` or the CLS token, and the patch tokens), or a timm model
            (``"timm"``).
        family: ``"clip"``, ``"transformers"`` or ``"timm"``.
        features: the kind `forward` returns.
    """

    def __init__(self, model: nn.Module, family: str, features: str = "pooled"):
        super().__init__()
        if family not in FAMILY_FEATURES:
            raise ValueError(f"`family` must be one of {', '.join(FAMILY_FEATURES)} but is {family!r}.")
        if features not in FAMILY_FEATURES[family]:
            raise ValueError(f"a {family} backbone gives {', '.join(FAMILY_FEATURES[family])} features, not "
                             f"{features!r}.")
        self.model = model
        self.family = family
        self.features = features
        model.requires_grad_(False)
        model.eval()

    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)  # frozen: BatchNorm/dropout never switch to training inside DCT's loop

    def all_features(self, pixel_values: Tensor) -> dict[str, Tensor]:
        """Every kind of feature this backbone gives, from one forward pass: ``{kind: [B, D]}``."""
        if self.family == "timm":
            return {"pooled": self.model.forward_head(self.model.forward_features(pixel_values), pre_logits=True)
                    .flatten(1)}
        if self.family == "clip":
            out = self.model.vision_model(pixel_values=pixel_values)
            pooled = out.pooler_output
            return {"pooled": pooled, "projected": self.model.visual_projection(pooled),
                    "patch_mean": out.last_hidden_state[:, 1:].mean(1)}
        out = self.model(pixel_values=pixel_values)
        tokens = out.last_hidden_state
        pooled = getattr(out, "pooler_output", None)
        if tokens.ndim != 3:  # a convolutional model (ConvNeXt, ResNet): pooled only
            return {"pooled": pooled.flatten(1) if pooled is not None else tokens.mean((-2, -1))}
        return {"pooled": (pooled if pooled is not None else tokens[:, 0]).flatten(1),
                "patch_mean": tokens[:, 1:].mean(1)}

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.all_features(pixel_values)[self.features]


class ProbeModel(nn.Module):
    """``head(normalize(backbone(x)))``: a few-shot guide's whole forward, differentiable with respect to `x`.

    Args:
        backbone: the frozen `Backbone` (its `features` are the ones the head reads).
        weight: ``[num_classes, dim]``; bias: ``[num_classes]``.
        labels: class names, index-aligned with the outputs.
    """

    def __init__(self, backbone: Backbone, weight: Tensor, bias: Tensor, labels: list[str] | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(weight)
            self.head.bias.copy_(bias)
        self.num_classes = int(weight.shape[0])
        self.label_names = list(labels) if labels is not None else None
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ProbeModel:
        return super().train(False)

    def forward(self, pixel_values: Tensor) -> Tensor:
        feats = self.backbone(pixel_values)
        return self.head(F.normalize(feats.to(self.head.weight.dtype), dim=-1))


# --------------------------------------------------------------------------------------------------------------------
# Backbones: loading one by name, saving it into a probe folder, loading it back
# --------------------------------------------------------------------------------------------------------------------
def _family_of_config(config: dict[str, Any]) -> str:
    if "architecture" in config:
        return "timm"
    if config.get("model_type") in ("clip", "clip_vision_model"):
        return "clip"
    if "model_type" in config:
        return "transformers"
    raise SourceError("its config.json has neither 'architecture' (timm) nor 'model_type' (transformers).")


def _load_hf_backbone(name: str, family: str, local_files_only: bool) -> tuple[nn.Module, dict]:
    """A transformers vision backbone and its timm-style data config (from its preprocessor_config.json)."""
    from transformers import AutoModel, CLIPVisionModelWithProjection

    from .from_transformers import hf_data_config

    local = Path(name).is_dir()
    pp = (str(Path(name) / "preprocessor_config.json") if (Path(name) / "preprocessor_config.json").is_file()
          else None) if local else hub_file(name, "preprocessor_config.json", local_files_only, required=False)
    if pp is None:
        raise SourceError("it has no preprocessor_config.json, so its resize and mean/std are unknown: save the "
                          "image processor beside the model (processor.save_pretrained(dir)).")
    cls = CLIPVisionModelWithProjection if family == "clip" else AutoModel
    try:
        with _quiet_transformers():
            model = cls.from_pretrained(name, local_files_only=local_files_only or local, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise SourceError(f"could not be loaded ({first_line(e)}): pass a directory written by save_pretrained, a "
                          f"cached hub id, or a timm name.") from None
    return model, hf_data_config(read_json(Path(pp)))


def load_backbone(source: str | os.PathLike, *, local_files_only: bool = True) -> tuple[Backbone, dict[str, Any]]:
    """A frozen feature backbone by name, and its eval data config (timm style: input_size, mean, std, ...).

    Args:
        source: ``"digits"`` (the embedded digits world's CLIP image tower); a local directory (a transformers
            ``save_pretrained`` folder — a whole ``CLIPModel`` gives its image tower — or a timm hub-format folder);
            ``"timm:NAME"`` or a timm registry name (pretrained weights, from the cache when offline); a hub id
            ``ORG/NAME`` (a CLIP, DINOv2 or any transformers vision model; from the HF cache when offline).
        local_files_only: never touch the network.

    >>> backbone, data_config = load_backbone("digits")
    >>> sorted(backbone.all_features(torch.rand(1, 3, 32, 32)))
    ['patch_mean', 'pooled', 'projected']
    """
    text = os.fspath(source).strip() if isinstance(source, (str, os.PathLike)) else ""
    if not text:
        raise UserError(f"`backbone` must be 'digits', a local directory, a timm name or a hub id, but is "
                        f"{source!r}.")
    if text == "digits":
        text = str(DIGITS_CLIP)
    try:
        return _load_backbone(text, local_files_only)
    except SourceError as e:  # the loaders say what is wrong; the argument and the source are named here, once
        raise UserError(f"`backbone` {text!r}: {e}") from None


def _load_backbone(text: str, local_files_only: bool) -> tuple[Backbone, dict[str, Any]]:
    from .from_timm import load_timm_dir, load_timm_pretrained

    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"`backbone` {text!r} is a directory without config.json: pass a transformers "
                            f"save_pretrained folder or a timm hub folder.")
        config = read_json(path / "config.json")
        code = custom_code(config)
        if code:
            raise UserError(f"`backbone` {text!r}: its config.json has `auto_map` ({code}), i.e. Python code shipped "
                            f"with the model, and synthaug never runs a model's own code.")
        family = _family_of_config(config)
        if family == "timm":
            loaded = load_timm_dir(path)
            return Backbone(loaded.model, "timm"), loaded.data_config
        model, data_config = _load_hf_backbone(str(path), family, True)
        return Backbone(model, family), data_config
    if text.startswith((".", "/", "~")) or os.sep in text and text.count("/") != 1:
        raise UserError(f"`backbone` {text!r} does not exist: pass an existing directory, 'digits', a timm name or "
                        f"a hub id.")
    if text.startswith("timm:") or "/" not in text:
        import timm

        name = text.removeprefix("timm:")
        if not timm.is_model(name):
            raise UserError(f"`backbone` {text!r} is not a timm model, a hub id or a local directory: pass one of "
                            f"those, or 'digits' for the embedded world's CLIP.")
        loaded = load_timm_pretrained(name, local_files_only)
        return Backbone(loaded.model, "timm"), loaded.data_config
    config = hub_config(text, local_files_only)  # absent offline: one line naming the download command
    family = "timm" if "architecture" in config else _family_of_config(config)
    if family == "timm":
        loaded = load_timm_pretrained("hf-hub:" + text, local_files_only)
        return Backbone(loaded.model, "timm"), loaded.data_config
    model, data_config = _load_hf_backbone(text, family, local_files_only)
    return Backbone(model, family), data_config


def save_backbone(backbone: Backbone, directory: Path, source_dir: str | None = None) -> None:
    """Write the backbone where a probe folder keeps it: transformers ``save_pretrained`` (with the source's
    preprocessor_config.json copied beside it) or timm's hub format."""
    directory.mkdir(parents=True, exist_ok=True)
    if backbone.family == "timm":
        from timm.models import save_for_hf

        save_for_hf(backbone.model, str(directory), safe_serialization=True)
        return
    with _quiet_transformers():
        backbone.model.save_pretrained(str(directory), safe_serialization=True)
    if source_dir is not None and (Path(source_dir) / "preprocessor_config.json").is_file():
        (directory / "preprocessor_config.json").write_text((Path(source_dir) / "preprocessor_config.json")
                                                             .read_text())


def is_probe_config(config: dict[str, Any]) -> bool:
    """Whether a directory's config.json is a probe folder's."""
    return isinstance(config, dict) and config.get("synthaug_guide") == PROBE_FORMAT


def load_probe(path: Path) -> LoadedClassifier:
    """The loader of a probe folder (``config.json`` with ``"synthaug_guide": "probe"``)."""
    from safetensors.torch import load_file

    config = read_json(path / "config.json")
    version = config.get("format_version")
    if version != PROBE_VERSION:
        raise SourceError(f"a probe folder of format {version!r}, but this synthaug reads format {PROBE_VERSION}: "
                          f"fit it again with `synthaug fit-guide`.")
    bb = config.get("backbone") or {}
    head_file = path / "head.safetensors"
    bb_dir = path / str(bb.get("path", "backbone"))
    if not head_file.is_file() or not bb_dir.is_dir():
        raise SourceError(f"a damaged probe folder: it needs head.safetensors and {bb.get('path', 'backbone')}/: fit "
                          f"it again with `synthaug fit-guide --overwrite`.")
    backbone, data_config = load_backbone(bb_dir, local_files_only=True)
    try:
        backbone = Backbone(backbone.model, backbone.family, str(config.get("features", "pooled")))
    except ValueError as e:
        raise SourceError(str(e)) from None
    head = load_file(str(head_file))
    labels = config.get("label_names")
    model = ProbeModel(backbone, head["weight"], head["bias"], labels)
    note = str(config.get("trained_on") or f"unknown: see {path / 'guide.json'}")
    return LoadedClassifier(model, dict(config.get("data_config") or data_config), note, "probe",
                            list(labels) if labels else None)


def write_probe(directory: Path, model: ProbeModel, data_config: dict[str, Any], *, source: str,
                source_dir: str | None, trained_on: str) -> None:
    """The probe folder's config.json, head.safetensors and backbone/ (guide.json is the fitter's)."""
    from safetensors.torch import save_file

    save_backbone(model.backbone, directory / "backbone", source_dir)
    save_file({"weight": model.head.weight.detach().float().cpu().contiguous(),
               "bias": model.head.bias.detach().float().cpu().contiguous()}, str(directory / "head.safetensors"))
    labels = model.label_names or [f"class_{i}" for i in range(model.num_classes)]
    config = {"synthaug_guide": PROBE_FORMAT, "format_version": PROBE_VERSION,
              "backbone": {"family": model.backbone.family, "path": "backbone", "source": source},
              "features": model.backbone.features, "normalize": True, "num_classes": model.num_classes,
              "label_names": labels, "data_config": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in data_config.items()},
              "trained_on": trained_on}
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
