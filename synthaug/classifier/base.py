"""The `Classifier` wrapper: a frozen model mapping images in [0, 1] to logits, differentiable with respect to its input, with its labels and eval preprocessing."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UserError

# PIL resample codes (what HF preprocessor_config.json stores) -> timm interpolation names.
PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


# timm interpolation names -> F.interpolate modes. PIL's lanczos/hamming/box have no torch kernel: the closest
# antialiased kernel stands in (documented approximation; none of the default guides uses them).
_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact", "lanczos": "bicubic",
                "hamming": "bilinear", "box": "bilinear"}


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing with torch ops (differentiable), equal to timm's eval transform on a PIL image
# --------------------------------------------------------------------------------------------------------------------
def _scale_sizes(img_size: tuple[int, int], crop_pct: float) -> tuple[int, int]:
    # timm: floor(size / crop_pct). The epsilon only rescues ratios that were themselves derived from integers
    # (torchvision's crop/resize, HF's crop/size), where float error could floor 256 to 255.
    return tuple(math.floor(s / crop_pct + 1e-6) for s in img_size)  # type: ignore[return-value]


def _resize(x: Tensor, size: Sequence[int], interpolation: str) -> Tensor:
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x  # torchvision returns the image untouched too
    mode = _TORCH_MODES.get(interpolation, "bicubic")
    if mode == "nearest-exact":  # PIL's NEAREST samples pixel centres, which is torch's "nearest-exact"
        return F.interpolate(x, size=size, mode=mode)
    # antialias=True is PIL's filter in both directions: a widened kernel when downsizing, and for bicubic the a=-0.5
    # kernel that PIL uses when upsizing (torch's non-antialiased bicubic uses a=-0.75).
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


def _center_crop_or_pad(x: Tensor, size: tuple[int, int], fill: Tensor | None = None) -> Tensor:
    """torchvision's `center_crop` (Python rounding, zero padding when too small); `fill` pads with a colour."""
    h, w = x.shape[-2:]
    ch, cw = size
    if ch > h or cw > w:
        pads = [(cw - w) // 2 if cw > w else 0, (cw - w + 1) // 2 if cw > w else 0,
                (ch - h) // 2 if ch > h else 0, (ch - h + 1) // 2 if ch > h else 0]
        if fill is None:
            x = F.pad(x, pads)
        else:
            f = fill.view(1, -1, 1, 1).to(x)
            x = F.pad(x - f, pads) + f
        h, w = x.shape[-2:]
        if (h, w) == (ch, cw):
            return x
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)  # Python rounding, as torchvision
    return x[..., top : top + ch, left : left + cw]


def eval_transform(images: Tensor, data_config: dict[str, Any]) -> Tensor:
    """timm's eval transform (``create_transform(**data_config)``) as differentiable torch ops on a batch.

    Resize (shorter side to ``input_size / crop_pct`` for ``crop_mode="center"``; both sides for ``"squash"``; longer
    side for ``"border"``), center crop (or pad) to ``input_size``, normalize with ``mean``/``std``. Pixel values stay
    in [0, 1] after resizing through a straight-through clamp: the forward pass matches PIL's clipping, the backward
    pass still reaches saturated pixels (a hard clamp zeroes their gradient).

    Args:
        images: float ``[B, C, H, W]`` in [0, 1].
        data_config: ``input_size`` (C, H, W), ``interpolation``, ``mean``, ``std``, ``crop_pct``, optional ``crop_mode``.

    Returns:
        float ``[B, C, input_size[1], input_size[2]]``, normalized.
    """
    _, out_h, out_w = data_config["input_size"]
    img_size = (int(out_h), int(out_w))
    crop_pct = float(data_config.get("crop_pct") or 0.875)
    interpolation = data_config.get("interpolation", "bilinear")
    crop_mode = data_config.get("crop_mode") or "center"
    mean = torch.tensor(data_config["mean"], dtype=images.dtype, device=images.device)
    std = torch.tensor(data_config["std"], dtype=images.dtype, device=images.device)
    scale = _scale_sizes(img_size, crop_pct)
    h, w = images.shape[-2:]
    fill = None
    if crop_mode == "squash":
        x = _resize(images, scale, interpolation)
    elif crop_mode == "border":  # timm ResizeKeepRatio(longest=1) + CenterCropOrPad(fill=mean colour)
        ratio = max(h / scale[0], w / scale[1])
        x = _resize(images, (round(h / ratio), round(w / ratio)), interpolation)
        fill = torch.tensor([round(255 * v) / 255 for v in data_config["mean"]], dtype=images.dtype)
    elif scale[0] == scale[1]:  # torchvision Resize(int): shorter side to `scale`, longer side truncated
        s = scale[0]
        if h <= w:
            x = _resize(images, (s, int(s * w / h)), interpolation)
        else:
            x = _resize(images, (int(s * h / w), s), interpolation)
    else:  # timm ResizeKeepRatio(longest=0): shorter side matched, sizes rounded
        ratio = min(h / scale[0], w / scale[1])
        x = _resize(images, (round(h / ratio), round(w / ratio)), interpolation)
    if x is not images:
        x = x + (x.clamp(0, 1) - x).detach()  # straight-through clamp: PIL clips resized pixels to [0, 255]
    x = _center_crop_or_pad(x, img_size, fill)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# --------------------------------------------------------------------------------------------------------------------
# The Classifier
# --------------------------------------------------------------------------------------------------------------------
def last_linear(module: nn.Module) -> nn.Linear | None:
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


class HFLogits(nn.Module):
    """A transformers image classifier as ``pixel_values -> logits`` (a tensor, not a ModelOutput)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).logits


class MeanPoolViT(nn.Module):
    """An HF ViT classifier whose head reads mean-pooled patch tokens (MAE fine-tuning), e.g. ``vesteinn/vit-mae-cub``.

    The checkpoint has the stock `ViTForImageClassification` layout, so the stock class loads it; only the forward
    differs. Reference (``vitmae.CustomViTForImageClassification`` in the DCT code, and MAE's ``global_pool``):
    encoder output -> drop the CLS token -> mean over patches -> the ViT's final LayerNorm -> classifier. The stock
    HF forward instead applies that LayerNorm to every token and classifies the CLS token, which gives wrong logits
    for these weights.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.vit = model.vit
        self.fc_norm = model.vit.layernorm  # MAE applies its final norm after pooling (MAE's `fc_norm`)
        self.vit.layernorm = nn.Identity()  # so `last_hidden_state` is the raw encoder output
        self.classifier = model.classifier
        self.config = model.config

    def forward_features(self, pixel_values: Tensor) -> Tensor:
        tokens = self.vit(pixel_values=pixel_values).last_hidden_state
        return self.fc_norm(tokens[:, 1:, :].mean(dim=1))  # token 0 is CLS; the head never saw it

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.classifier(self.forward_features(pixel_values))


class Classifier(nn.Module):
    """A frozen image classifier on images in [0, 1], with its labels and its own preprocessing.

    Build one with `load_classifier`; the constructor wraps any in-process model (tests, custom code).

    Args:
        model: ``model(x) -> logits [B, num_classes]`` for a normalized batch; a timm model, a torchvision model,
            `MeanPoolViT`, or a transformers model (its ``.logits`` is taken).
        labels: class names, index-aligned with the logits; None -> the model's own (timm ``label_names``,
            ``config.id2label``) or ``class_0 ...``.
        data_config: ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``, ``crop_pct`` (and ``crop_mode``);
            None -> resolved from a timm model's ``pretrained_cfg``.
        source: what the user passed (recorded in outputs).
        trained_on: what data the model was trained on (recorded in token files and results).
        kind: where it came from; None -> guessed from the model's type.
        model_labels: class names the source declares when the model does not carry them (torchvision categories);
            used when `labels` is None and their count matches.
        multi_label: the outputs are independent sigmoid attributes, not softmax classes (DCT then learns attribute
            tokens, ``target="attribute:NAME"``); None -> the model config's ``problem_type ==
            "multi_label_classification"`` (transformers' convention; `load_classifier` reads it from a timm
            directory's config.json too), else False.

    Attributes:
        labels, source, trained_on, data_config, multi_label, kind (``"timm"``, ``"transformers"``, ``"vit-mae"``,
        ``"torchvision"``, ``"custom"``).

    >>> import timm
    >>> clf = Classifier(timm.create_model("resnet18", num_classes=3), labels=["cat", "dog", "bird"])
    >>> clf(torch.rand(2, 3, 64, 64)).shape
    torch.Size([2, 3])
    """

    def __init__(
        self,
        model: nn.Module,
        labels: Sequence[str] | None = None,
        data_config: dict[str, Any] | None = None,
        *,
        source: str = "",
        trained_on: str | None = None,
        kind: str | None = None,
        model_labels: Sequence[str] | None = None,
        multi_label: bool | None = None,
    ):
        super().__init__()
        if _is_transformers_model(model):
            model = HFLogits(model)  # logits live in `.logits` of a ModelOutput
        self.model = model
        self.kind = kind or ("timm" if hasattr(model, "forward_head") and hasattr(model, "pretrained_cfg") else
                             "transformers" if isinstance(model, HFLogits) else
                             "vit-mae" if isinstance(model, MeanPoolViT) else "custom")
        if data_config is None:
            if not hasattr(model, "pretrained_cfg"):
                raise ValueError("`data_config` is required for a model without a timm `pretrained_cfg`.")
            data_config = timm_data_config(model)
        self.data_config = {
            "input_size": tuple(int(v) for v in data_config["input_size"]),
            "interpolation": str(data_config.get("interpolation", "bilinear")),
            "mean": tuple(float(v) for v in data_config["mean"]),
            "std": tuple(float(v) for v in data_config["std"]),
            "crop_pct": float(data_config.get("crop_pct") or 0.875),
            "crop_mode": str(data_config.get("crop_mode") or "center"),
        }
        model.requires_grad_(False)
        self.eval()
        own = list(model_labels) if model_labels is not None else labels_of_model(model)
        self.labels = _resolve_labels(labels, own, self._num_outputs(), source)
        self.source = source
        self.trained_on = trained_on or "unknown"
        if multi_label is None:
            problem = getattr(getattr(model, "config", None), "problem_type", None)
            multi_label = problem == "multi_label_classification"
        self.multi_label = bool(multi_label)

    # The wrapped model must never leave eval mode: a parent's .train() would otherwise switch BatchNorm to batch
    # statistics (and update running stats) inside the DCT loop.
    def train(self, mode: bool = True) -> Classifier:
        return super().train(False)

    def _num_outputs(self) -> int:
        n = getattr(self.model, "num_classes", None)
        if isinstance(n, int) and n > 0:
            return n
        config = getattr(self.model, "config", None)
        if config is not None and getattr(config, "num_labels", None):
            return int(config.num_labels)
        head = last_linear(self.model)
        if head is not None:
            return head.out_features
        c, h, w = self.data_config["input_size"]
        p = next(self.model.parameters())
        with torch.no_grad():  # a head that is no Linear (e.g. a 1x1 conv): one forward tells the count
            return int(self.model(torch.zeros(1, c, h, w, device=p.device, dtype=p.dtype)).shape[-1])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, images: Tensor) -> Tensor:
        """Images float ``[B, 3, H, W]`` in [0, 1] (any size) -> the model's input. Differentiable.

        The model's eval transform (resize, center crop, normalize; see `eval_transform`) computed in fp32 on the
        model's device, then cast to the model's dtype. uint8 images are scaled by 1/255; 1-channel images are
        repeated to the model's channel count.
        """
        if images.ndim != 4:
            raise ValueError(f"`images` must be a batch [B, C, H, W] but has shape {tuple(images.shape)}.")
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        x = images.to(device=self.device, dtype=torch.float32)
        channels = self.data_config["input_size"][0]
        if x.shape[1] == 1 and channels != 1:
            x = x.expand(-1, channels, -1, -1)
        return eval_transform(x, self.data_config).to(self.dtype)

    def forward(self, images: Tensor) -> Tensor:
        """Images in [0, 1] -> float32 logits ``[B, num_classes]`` (gradients reach `images`, never the weights)."""
        return self.model(self.preprocess(images)).float()

    def features(self, images: Tensor) -> Tensor:
        """Penultimate pooled features ``[B, D]`` (the classifier head's input), e.g. for FID on guide activations."""
        x = self.preprocess(images)
        if hasattr(self.model, "forward_head"):  # timm
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True).flatten(1).float()
        if isinstance(self.model, MeanPoolViT):
            return self.model.forward_features(x).float()
        head = last_linear(self.model)
        if head is None:
            raise NotImplementedError(f"{type(self.model).__name__} has no linear head to read features from.")
        captured: list[Tensor] = []
        handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[-1].flatten(1).float()

    @torch.no_grad()
    def predict(self, images: Tensor | Sequence[Any], batch_size: int = 256) -> Tensor:
        """Class probabilities ``[B, num_classes]`` (float32, on the model's device), without gradients: the softmax,
        or for a `multi_label` classifier each output's own sigmoid (rows then need not sum to 1).

        Args:
            images: a float ``[B, C, H, W]`` batch in [0, 1] (or uint8), or a sequence of PIL images / ``[C, H, W]``
                tensors, whose sizes may differ.
            batch_size: images per forward pass (inputs are preprocessed chunk by chunk, so memory stays bounded).
        """
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i : i + batch_size]
            if isinstance(chunk, Tensor):
                x = self.preprocess(chunk)
            else:  # one by one: sizes may differ
                x = torch.cat([self.preprocess(_to_tensor(im)[None]) for im in chunk])
            logits = self.model(x).float()
            out.append(logits.sigmoid() if self.multi_label else logits.softmax(-1))
        return torch.cat(out) if out else torch.zeros(0, self.num_classes, device=self.device)

    def extra_repr(self) -> str:
        return (f"source={self.source!r}, kind={self.kind!r}, num_classes={self.num_classes}, "
                f"{'multi_label=True, ' if self.multi_label else ''}"
                f"input_size={self.data_config['input_size']}, trained_on={self.trained_on!r}")


def _is_transformers_model(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:  # not imported -> cannot be one; avoids a slow import
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _to_tensor(image: Any) -> Tensor:
    if isinstance(image, Tensor):
        return image.float() / 255.0 if image.dtype == torch.uint8 else image
    from torchvision.transforms.functional import pil_to_tensor

    if not hasattr(image, "convert"):  # numpy HWC
        import numpy as np
        from PIL import Image

        image = Image.fromarray(np.asarray(image))
    return pil_to_tensor(image.convert("RGB")).float() / 255.0


def labels_of_model(model: nn.Module) -> list[str] | None:
    """Class names the model declares: timm ``label_names`` (+ descriptions), HF ``id2label``; None if it has none."""
    inner = model.model if isinstance(model, HFLogits) else model
    cfg = getattr(inner, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("label_names"):
        names = cfg["label_names"]
        if isinstance(names, dict):
            names = [names[k] for k in sorted(names, key=int)]
        descriptions = cfg.get("label_descriptions") or {}
        return [descriptions.get(n, n) for n in names]
    config = getattr(inner, "config", None)
    id2label = getattr(config, "id2label", None)
    if id2label:
        names = [id2label[k] for k in sorted(id2label, key=int)]
        if not all(n == f"LABEL_{i}" for i, n in enumerate(names)):  # transformers' placeholder names
            return names
    return None


def _resolve_labels(labels: Sequence[str] | None, own: list[str] | None, num: int, source: str) -> list[str]:
    if labels is not None:
        labels = [str(v) for v in labels]
        if len(labels) != num:
            raise UserError(
                f"`labels` has {len(labels)} names but `classifier` {source!r} has {num} outputs: pass exactly one "
                f"name per output, in logit order."
            )
        return labels
    if own is not None and len(own) == num:
        return [str(v) for v in own]
    return [f"class_{i}" for i in range(num)]


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LoadedClassifier:
    """What a loader resolved: the module to wrap, its eval preprocessing, its class names, what it was trained on."""

    model: nn.Module
    data_config: dict[str, Any]
    trained_on: str
    kind: str
    labels: list[str] | None = None  # None -> whatever the model's config declares


# --------------------------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------------------------
def timm_data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)
