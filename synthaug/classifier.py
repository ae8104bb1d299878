"""Classifiers: a timm / transformers / torchvision model or a local checkpoint -> a frozen, differentiable `Classifier`.

Consumes a classifier *source* string (timm name, ``hf-hub:`` id, transformers id, torchvision name, local directory,
``ARCH@checkpoint`` file, or the embedded ``digits-guide`` / ``digits-judge``) and produces a `Classifier`: an
`nn.Module` that maps images in [0, 1] to logits, with its `labels`, its `data_config` (the model's own eval
preprocessing), a differentiable `preprocess` built from torch ops, penultimate `features`, and a `trained_on` note.

The wrapped model is frozen (``eval()``, ``requires_grad_(False)``, and it stays in eval mode even if a parent calls
``.train()``), yet gradients flow to the *input images*: DCT backpropagates the guide's cross-entropy through the
decoded image into a token (DESIGN.md §2).

Nothing here downloads when offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``): weights that are not on disk
give a one-line `UserError` naming `classifier`, the value and the fix, never a hub stack trace.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import UserError
from .models import ASSETS, offline, resolve_device, resolve_dtype

# Embedded classifiers: names that resolve to timm hub-format directories shipped inside the package.
EMBEDDED_CLASSIFIERS = {"digits-guide": ASSETS / "digits" / "guide", "digits-judge": ASSETS / "digits" / "judge"}

# Hub models whose loading needs more than the stock class, and what each was trained on (DESIGN.md §7).
# "mean": an MAE ViT whose head sits on mean-pooled patch tokens, LayerNorm applied *after* pooling (the reference
# code's `vitmae.CustomViTForImageClassification`), not on the stock HF ViT's normed CLS token.
KNOWN_MODELS: dict[str, dict[str, str | None]] = {
    "vesteinn/vit-mae-cub": {
        "pooling": "mean",
        "trained_on": "the FULL CUB-200-2011 train split (MAE ViT fine-tuned on all 5,994 training images): "
        "few-shot results guided by it are not leak-free",
    },
    "vesteinn/vit-mae-inat21": {
        "pooling": "mean",
        "trained_on": "the FULL iNaturalist 2021 train split (MAE ViT fine-tuned on all ~2.7M training images): "
        "few-shot results on iNat guided by it are not leak-free",
    },
    "google/vit-large-patch16-224": {
        "pooling": None,
        "trained_on": "ImageNet-21k pre-training, then the full ImageNet-1k train split",
    },
}

PREFIXES = ("timm:", "hf-hub:", "local-dir:", "transformers:", "vit-mae:", "torchvision:")

# PIL resample codes (what HF preprocessor_config.json stores) -> timm interpolation names.
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
# timm interpolation names -> F.interpolate modes. PIL's lanczos/hamming/box have no torch kernel: the closest
# antialiased kernel stands in (documented approximation; none of the default guides uses them).
_TORCH_MODES = {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest-exact", "lanczos": "bicubic",
                "hamming": "bilinear", "box": "bilinear"}
_HELP = ("a timm name ('resnet50'), 'hf-hub:ORG/NAME', a transformers id ('google/vit-large-patch16-224'), "
         "'torchvision:NAME', a local directory, 'ARCH@CHECKPOINT' or 'digits-guide'/'digits-judge'")


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
def _last_linear(module: nn.Module) -> nn.Linear | None:
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


class _HFLogits(nn.Module):
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

    Attributes:
        labels, source, trained_on, data_config, kind (``"timm"``, ``"transformers"``, ``"vit-mae"``,
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
    ):
        super().__init__()
        if _is_transformers_model(model):
            model = _HFLogits(model)  # logits live in `.logits` of a ModelOutput
        self.model = model
        self.kind = kind or ("timm" if hasattr(model, "forward_head") and hasattr(model, "pretrained_cfg") else
                             "transformers" if isinstance(model, _HFLogits) else
                             "vit-mae" if isinstance(model, MeanPoolViT) else "custom")
        if data_config is None:
            if not hasattr(model, "pretrained_cfg"):
                raise ValueError("`data_config` is required for a model without a timm `pretrained_cfg`.")
            data_config = _timm_data_config(model)
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
        own = list(model_labels) if model_labels is not None else _model_labels(model)
        self.labels = _resolve_labels(labels, own, self._num_outputs(), source)
        self.source = source
        self.trained_on = trained_on or "unknown"

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
        head = _last_linear(self.model)
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
        head = _last_linear(self.model)
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
        """Class probabilities ``[B, num_classes]`` (float32, on the model's device), without gradients.

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
            out.append(self.model(x).float().softmax(-1))
        return torch.cat(out) if out else torch.zeros(0, self.num_classes, device=self.device)

    def extra_repr(self) -> str:
        return (f"source={self.source!r}, kind={self.kind!r}, num_classes={self.num_classes}, "
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


def _model_labels(model: nn.Module) -> list[str] | None:
    """Class names the model declares: timm ``label_names`` (+ descriptions), HF ``id2label``; None if it has none."""
    inner = model.model if isinstance(model, _HFLogits) else model
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
class _Loaded:
    """What a loader resolved: the module to wrap, its eval preprocessing, its class names, what it was trained on."""

    model: nn.Module
    data_config: dict[str, Any]
    trained_on: str
    kind: str
    labels: list[str] | None = None  # None -> whatever the model's config declares


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

    1. An embedded name: ``"digits-guide"``, ``"digits-judge"`` (timm directories shipped in the package).
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
    4. An existing local directory: ``config.json`` with ``"architecture"`` -> timm (``local-dir:``); with
       ``"model_type"`` -> transformers (+ ``preprocessor_config.json``). A known MAE id in its ``_name_or_path``, or
       the reference code's ``CustomViTForImageClassification`` in ``architectures``, selects mean pooling. A file
       without ``ARCH@`` is refused with that syntax in the message.
    5. A timm registry name (``"resnet50"``, ``"vit_base_patch16_224.augreg_in21k_ft_in1k"``): pretrained weights.
    6. A hub id ``"ORG/NAME"``: the known MAE guides (``vesteinn/vit-mae-cub``, ``vesteinn/vit-mae-inat21``) use mean
       pooling; otherwise the repo's ``config.json`` decides: ``"architecture"`` -> timm, else transformers.

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
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"`classifier` must be {_HELP}, but is {source!r}.")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if local_files_only is None:
        local_files_only = offline()
    loaded = _resolve(source.strip(), local_files_only)
    loaded.model.to(device=dev, dtype=torch_dtype)
    return Classifier(loaded.model, labels, loaded.data_config, source=source, trained_on=trained_on or loaded.trained_on,
                      kind=loaded.kind, model_labels=loaded.labels)


def _resolve(source: str, local_files_only: bool) -> _Loaded:
    """`source` -> the loader that applies (order documented in `load_classifier`)."""
    # 1. embedded
    if source in EMBEDDED_CLASSIFIERS:
        path = EMBEDDED_CLASSIFIERS[source]
        if not (path / "config.json").is_file():
            raise UserError(
                f"`classifier` {source!r} is an embedded model but its weights are missing at {path}: reinstall "
                f"synthaug, or rebuild them with `python scripts/train_digits_world.py`."
            )
        return _load_timm_dir(source, path)
    # 2. explicit prefixes
    if source.startswith(PREFIXES):
        prefix, _, rest = source.partition(":")
        if not rest:
            raise UserError(f"`classifier` {source!r} names nothing after '{prefix}:': pass e.g. '{prefix}:NAME'.")
        if prefix in ("timm", "torchvision"):
            arch, at, ckpt = rest.partition("@")
            if at:
                return _load_checkpoint(source, prefix, arch, ckpt)
            return _load_timm_pretrained(source, rest, local_files_only) if prefix == "timm" else \
                _load_torchvision(source, rest, local_files_only)
        if prefix == "hf-hub":
            return _load_timm_pretrained(source, "hf-hub:" + rest, local_files_only)
        if prefix == "local-dir":
            return _load_dir(source, Path(rest).expanduser())
        pooling = "mean" if prefix == "vit-mae" else None
        if Path(rest).expanduser().is_dir():
            return _load_transformers(source, str(Path(rest).expanduser()), True, pooling)
        _check_hub_id(source, rest)
        return _load_transformers(source, rest, local_files_only, pooling or _known(rest).get("pooling"))
    # 3. ARCH@checkpoint
    arch, at, ckpt = source.partition("@")
    if at and "/" not in arch and not Path(source).exists():
        return _load_checkpoint(source, "timm", arch, ckpt)
    # 4. local path
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_dir(source, path)
    if path.is_file():
        raise UserError(
            f"`classifier` {source!r} is a checkpoint file without an architecture: pass 'ARCH@{source}' "
            f"(a timm architecture, e.g. 'resnet18@{source}') or 'torchvision:ARCH@{source}'."
        )
    # 5. timm registry name
    import timm

    if "/" not in source and timm.is_model(source):
        return _load_timm_pretrained(source, source, local_files_only)
    # 6. hub id
    if source.count("/") == 1 and not source.startswith((".", "/", "~")) and " " not in source:
        if _known(source).get("pooling") == "mean":
            return _load_transformers(source, source, local_files_only, "mean")
        if "architecture" in _hub_config(source, source, local_files_only):
            return _load_timm_pretrained(source, "hf-hub:" + source, local_files_only)
        return _load_transformers(source, source, local_files_only, None)
    if source.startswith((".", "/", "~")) or os.sep in source:
        raise UserError(f"`classifier` {source!r} does not exist: pass an existing directory, or {_HELP}.")
    raise UserError(f"`classifier` {source!r} is not a known classifier: pass {_HELP}.")


def _known(hub_id: str) -> dict[str, str | None]:
    """KNOWN_MODELS entry of a hub id (``@revision`` ignored), or of a path that ends in one; else {}."""
    hub_id = hub_id.split("@")[0].rstrip("/")
    return next((v for k, v in KNOWN_MODELS.items() if hub_id == k or hub_id.endswith("/" + k)), {})


def _check_hub_id(source: str, hub_id: str) -> None:
    if hub_id.startswith((".", "/", "~")) or hub_id.split("@")[0].count("/") != 1:
        raise UserError(
            f"`classifier` {source!r} is neither an existing directory nor a hub id 'ORG/NAME': check the path."
        )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _not_cached(source: str, what: str) -> UserError:
    return UserError(
        f"`classifier` {source!r}: {what} is not on this machine and the hub is offline (HF_HUB_OFFLINE=1 or "
        f"local_files_only): download it first on a machine with network, or pass a local directory."
    )


def _hub_file(source: str, repo_id: str, filename: str, local_files_only: bool, required: bool = True) -> str | None:
    """A file of a hub repo (``repo@revision`` allowed), from the cache when offline; None if optional and absent."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, _, revision = repo_id.partition("@")
    try:
        return hf_hub_download(repo, filename, revision=revision or None, local_files_only=local_files_only)
    except LocalEntryNotFoundError:  # offline and not cached (a subclass of EntryNotFoundError: caught first)
        if not required:
            return None
        raise _not_cached(source, f"{repo}/{filename}") from None
    except EntryNotFoundError:
        if not required:
            return None
        raise UserError(f"`classifier` {source!r}: the hub repo {repo!r} has no {filename}.") from None
    except OSError as e:  # repository not found, gated, network down
        raise UserError(
            f"`classifier` {source!r} could not be fetched ({_first_line(e)}): check the id, log in for gated "
            f"models, or pass a local directory."
        ) from None


def _hub_config(source: str, repo_id: str, local_files_only: bool) -> dict[str, Any]:
    return _read_json(Path(_hub_file(source, repo_id, "config.json", local_files_only)))  # type: ignore[arg-type]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"`classifier`: {path} is unreadable ({_first_line(e)}): re-save the model.") from None


def _load_dir(source: str, path: Path) -> _Loaded:
    """A local directory: timm hub format or transformers ``save_pretrained`` format, told apart by config.json."""
    if not path.is_dir():
        raise UserError(f"`classifier` {source!r}: directory {str(path)!r} does not exist.")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(
            f"`classifier` {source!r} is a directory without config.json: pass a timm directory "
            f"(timm.models.save_for_hf) or a transformers one (save_pretrained)."
        )
    config = _read_json(config_file)
    if "architecture" in config:
        return _load_timm_dir(source, path)
    if "model_type" in config:
        origin = str(config.get("_name_or_path") or "")  # a snapshot of a known hub model keeps its id here
        pooling = _known(origin).get("pooling")
        if "CustomViTForImageClassification" in (config.get("architectures") or []):
            pooling = "mean"  # saved from the reference code's mean-pooling class
        return _load_transformers(source, str(path), True, pooling, origin=origin)
    raise UserError(
        f"`classifier` {source!r}: {config_file} has neither 'architecture' (timm) nor 'model_type' (transformers)."
    )


# --------------------------------------------------------------------------------------------------------------------
# timm
# --------------------------------------------------------------------------------------------------------------------
def _timm_data_config(model: nn.Module) -> dict[str, Any]:
    from timm.data import resolve_model_data_config

    return resolve_model_data_config(model)


def _timm_labels(model: nn.Module) -> list[str] | None:
    """A timm model's class names; ImageNet heads get their descriptions ("tench, Tinca tinca") from timm."""
    own = _model_labels(model)
    if own is not None:
        return own
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(model)
    if not subset:
        return None
    info = ImageNetInfo(subset)
    descriptions = info.label_descriptions(as_dict=True)
    return [descriptions.get(n, n) for n in info.label_names()]


def _load_timm_dir(source: str, path: Path) -> _Loaded:
    import timm

    config = _read_json(path / "config.json")
    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise UserError(
            f"`classifier` {source!r}: config.json names architecture {arch!r}, which this timm ({timm.__version__}) "
            f"does not know: upgrade timm or re-export the model."
        )
    try:
        model = timm.create_model("local-dir:" + str(path.resolve()), pretrained=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(
            f"`classifier` {source!r}: the timm directory {str(path)!r} could not be loaded ({_first_line(e)}): "
            f"it needs config.json and model.safetensors (or pytorch_model.bin) as timm.models.save_for_hf writes."
        ) from None
    note = config.get("trained_on") or f"unknown: the timm directory {path} declares no 'trained_on'"
    return _Loaded(model, _timm_data_config(model), str(note), "timm", _timm_labels(model))


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
        path = _torch_hub_cached(cfg["url"])
        return path if path.is_file() else None
    return Path(cfg["file"]) if cfg.get("file") and Path(cfg["file"]).is_file() else None


def _torch_hub_cached(url: str) -> Path:
    """Where `torch.hub.load_state_dict_from_url` keeps `url` (what timm and torchvision download into)."""
    from urllib.parse import urlparse

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _load_timm_pretrained(source: str, name: str, local_files_only: bool) -> _Loaded:
    """A timm registry name with pretrained weights, or ``hf-hub:ORG/NAME``.

    Offline, timm is pointed at the files already on disk (a cached hub snapshot loads as ``local-dir:``, registry
    weights through a ``file`` overlay), so that ``local_files_only=True`` holds even where HF_HUB_OFFLINE is unset.
    """
    import timm

    create_name, kwargs = name, {}
    if name.startswith("hf-hub:"):
        repo = name.removeprefix("hf-hub:")
        _check_hub_id(source, repo)
        config_file = _hub_file(source, repo, "config.json", local_files_only)  # absent offline -> clear UserError
        config = _read_json(Path(config_file))  # type: ignore[arg-type]
        note = config.get("trained_on") or f"unknown: see the model card of {repo}"
        if local_files_only:
            if not any(_hub_file(source, repo, n, True, required=False)
                       for n in ("model.safetensors", "pytorch_model.bin")):
                raise _not_cached(source, f"the weights of {repo}")
            create_name = "local-dir:" + str(Path(config_file).parent)  # type: ignore[arg-type]
    else:
        if not timm.is_model(name):
            raise UserError(f"`classifier` {source!r} is not a timm model: see `timm.list_models()`.")
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # an invalid tag
            cfg = None
        if cfg is None:
            raise UserError(
                f"`classifier` {source!r}: timm has no pretrained weights {name!r}: pick one listed by "
                f"`timm.list_pretrained('{name.split('.')[0]}*')`, or pass 'ARCH@CHECKPOINT' with your own weights."
            )
        cfg = cfg.to_dict()
        note = f"unknown: pretrained timm weights {name!r} (tag {cfg.get('tag')!r}; its model card says which data)"
        if local_files_only:
            cached = _timm_cached_weights(cfg)
            if cached is None:
                raise _not_cached(source, f"the timm weights {cfg.get('hf_hub_id') or cfg.get('url') or name!r}")
            kwargs = {"pretrained_cfg_overlay": {"file": str(cached)}}
    try:
        model = timm.create_model(create_name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise UserError(
            f"`classifier` {source!r} could not be loaded ({_first_line(e)}): download it first, or pass a local "
            f"directory."
        ) from None
    return _Loaded(model, _timm_data_config(model), str(note), "timm", _timm_labels(model))


# --------------------------------------------------------------------------------------------------------------------
# Checkpoint files (ARCH@PATH)
# --------------------------------------------------------------------------------------------------------------------
def _read_state_dict(source: str, path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise UserError(f"`classifier` {source!r}: checkpoint file {str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- unpickling refusals, truncated or foreign files: all the user's to fix
        raise UserError(
            f"`classifier` {source!r}: checkpoint {str(path)!r} could not be read ({_first_line(e)}): save a plain "
            f"state dict (torch.save(model.state_dict(), path) or safetensors)."
        ) from None
    if isinstance(sd, dict) and not all(isinstance(v, Tensor) for v in sd.values()):
        for key in ("state_dict", "model", "model_state_dict", "module"):  # training checkpoints wrap the weights
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise UserError(
            f"`classifier` {source!r}: checkpoint {str(path)!r} holds no state dict of tensors: save "
            f"model.state_dict()."
        )
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


def _load_checkpoint(source: str, library: str, arch: str, ckpt: str) -> _Loaded:
    path = Path(ckpt).expanduser()
    labels = None
    if library == "timm":
        import timm

        if not timm.is_model(arch):
            raise UserError(
                f"`classifier` {source!r}: {arch!r} is not a timm architecture: see timm.list_models(), or write "
                f"'torchvision:{arch}@{ckpt}' for a torchvision one."
            )
        sd = _read_state_dict(source, path)
        model = timm.create_model(arch, pretrained=False)
        head = model.pretrained_cfg.get("classifier")
        num = _head_classes(model, sd, head if isinstance(head, str) else None)
        if num is not None and num != model.num_classes:
            model.reset_classifier(num)
        data_config = _timm_data_config(model)
        labels = _timm_labels(model)
    else:
        import torchvision

        if arch not in torchvision.models.list_models():
            raise UserError(
                f"`classifier` {source!r}: {arch!r} is not a torchvision model: see torchvision.models.list_models()."
            )
        sd = _read_state_dict(source, path)
        model = torchvision.models.get_model(arch, weights=None)
        num = _head_classes(model, sd, None)
        if num is not None and num != _last_linear(model).out_features:
            model = torchvision.models.get_model(arch, weights=None, num_classes=num)
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        data_config = _torchvision_data_config(weights)
        labels = list(weights.meta.get("categories") or []) or None
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise UserError(
            f"`classifier` {source!r}: checkpoint {str(path)!r} does not fit architecture {arch!r} ({detail}): "
            f"name the architecture it was trained with."
        ) from None
    return _Loaded(model, data_config, f"unknown: checkpoint {path} (pass trained_on= to record what it saw)",
                   library, labels)


# --------------------------------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------------------------------
def _torchvision_data_config(weights: Any) -> dict[str, Any]:
    """torchvision's ``ImageClassification`` preset (resize shorter side, center crop, normalize) as a data config."""
    t = weights.transforms()
    crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
    resize = t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
    return {"input_size": (3, int(crop), int(crop)), "interpolation": t.interpolation.value, "mean": tuple(t.mean),
            "std": tuple(t.std), "crop_pct": int(crop) / int(resize), "crop_mode": "center"}


def _load_torchvision(source: str, name: str, local_files_only: bool) -> _Loaded:
    import torchvision

    arch, _, tag = name.partition(".")
    if arch not in torchvision.models.list_models():
        raise UserError(
            f"`classifier` {source!r}: {arch!r} is not a torchvision model: see torchvision.models.list_models()."
        )
    enum = torchvision.models.get_model_weights(arch)
    try:
        weights = enum.verify(tag) if tag else enum.DEFAULT
    except (KeyError, ValueError):  # enum lookup of an unknown name
        raise UserError(
            f"`classifier` {source!r}: {arch} has no weights {tag!r}: use one of {', '.join(w.name for w in enum)}."
        ) from None
    cached = _torch_hub_cached(weights.url)
    if local_files_only and not cached.is_file():
        raise _not_cached(source, f"the torchvision weights {weights} ({cached})")
    try:
        model = torchvision.models.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as e:  # URLError is an OSError
        raise UserError(
            f"`classifier` {source!r} could not be loaded ({_first_line(e)}): download the weights first, or pass "
            f"'torchvision:{arch}@CHECKPOINT'."
        ) from None
    return _Loaded(model, _torchvision_data_config(weights), f"torchvision weights {weights} (the dataset is in the "
                   f"name)", "torchvision", list(weights.meta["categories"]))


# --------------------------------------------------------------------------------------------------------------------
# transformers
# --------------------------------------------------------------------------------------------------------------------
def _hf_data_config(source: str, pp: dict[str, Any]) -> dict[str, Any]:
    """An HF image processor config -> the equivalent timm data config (same resize, crop and normalization)."""
    resample = pp.get("resample", 2)
    interpolation = _PIL_RESAMPLE.get(resample, resample if isinstance(resample, str) else "bilinear")
    if pp.get("do_normalize", True):
        mean, std = tuple(pp.get("image_mean") or ()), tuple(pp.get("image_std") or ())
        if len(mean) != 3 or len(std) != 3:
            raise UserError(f"`classifier` {source!r}: its preprocessor_config.json has no 3-channel image_mean/std.")
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
    raise UserError(
        f"`classifier` {source!r}: preprocessor size {size} is not supported (shortest_edge or height/width): "
        f"pass a model whose processor resizes to a fixed size."
    )


def _load_transformers(
    source: str, name: str, local_files_only: bool, pooling: str | None, origin: str = ""
) -> _Loaded:
    """A transformers image classifier (hub id or local ``save_pretrained`` directory); ``pooling="mean"``: MAE ViT.

    `origin`: the hub id a local directory was saved from (its config's ``_name_or_path``), for the trained_on note.
    """
    local = Path(name).is_dir()
    if local:
        pp_file: str | None = str(Path(name) / "preprocessor_config.json")
        if not Path(pp_file).is_file():
            pp_file = None
    else:
        _hub_config(source, name, local_files_only)  # absent offline -> one clear message, before transformers
        pp_file = _hub_file(source, name, "preprocessor_config.json", local_files_only, required=False)
    if pp_file is None:
        raise UserError(
            f"`classifier` {source!r} has no preprocessor_config.json, so its resize and mean/std are unknown: save "
            f"the image processor beside the model (processor.save_pretrained(dir))."
        )
    data_config = _hf_data_config(source, _read_json(Path(pp_file)))

    from transformers import AutoModelForImageClassification, ViTForImageClassification

    repo, _, revision = (name, "", "") if local else name.partition("@")
    cls = ViTForImageClassification if pooling == "mean" else AutoModelForImageClassification
    try:
        model = cls.from_pretrained(repo, revision=revision or None, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"`classifier` {source!r} could not be loaded as a transformers image classifier ({_first_line(e)}): "
            f"pass a directory written by save_pretrained, or the hub id of an image-classification model."
        ) from None
    hub_id = repo if not local else (origin or name)
    note = _known(hub_id).get("trained_on") or f"unknown: see the model card of {hub_id}"
    if pooling == "mean":
        if model.config.model_type != "vit":
            raise UserError(
                f"`classifier` {source!r}: mean pooling ('vit-mae:') needs an HF ViT checkpoint, but its model_type "
                f"is {model.config.model_type!r}: drop the 'vit-mae:' prefix."
            )
        return _Loaded(MeanPoolViT(model), data_config, str(note), "vit-mae", _model_labels(model))
    return _Loaded(_HFLogits(model), data_config, str(note), "transformers", _model_labels(model))
