"""CLIP for MC-TI: loading the model whose text tower is the pipeline's text encoder, image/text features, and classification with learned tokens (Eq. 6)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..classifier.hub import custom_code
from ..errors import UserError
from ..models import ASSETS, EMBEDDED_MODELS, clip_tokenizer, offline
from .text import encode, pool_eos, spell_token, splice_tokens, token_embedding, tokenize, tokenizer_with, vector_names

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from transformers import CLIPModel, CLIPTokenizer

log = logging.getLogger(__name__)


# The CLIP model of the embedded digits world: a CLIPModel whose text tower is the digits pipeline's text encoder.
DIGITS_CLIP = ASSETS / "digits" / "clip"


# The CLIP whose text tower is Stable Diffusion's text encoder, by the encoder's width: SD 1.x conditions on OpenAI's
# CLIP ViT-L/14 text tower (768-d), SD 2.x on OpenCLIP ViT-H/14's (1024-d; LAION's transformers port of it).
SD_CLIPS = {768: "openai/clip-vit-large-patch14", 1024: "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"}


def _config_file(source: str, filename: str) -> dict | None:
    """A JSON config of a local directory or a cached hub repo, read without loading anything; None if absent."""
    p = EMBEDDED_MODELS[source] if source in EMBEDDED_MODELS else Path(source).expanduser()
    try:
        if p.is_dir():
            return json.loads((p / filename).read_text()) if (p / filename).is_file() else None
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(source, filename)
        return json.loads(Path(hit).read_text()) if isinstance(hit, str) else None
    except (OSError, ValueError, ImportError):  # unreadable or not cached: the check after loading still runs
        return None


def _text_shape(config: dict | None) -> tuple[int, int] | None:
    """(width, layers) of a CLIP text tower config, or None."""
    if not isinstance(config, dict) or "hidden_size" not in config:
        return None
    return int(config["hidden_size"]), int(config.get("num_hidden_layers", 0))


def default_clip_model(model: str) -> str | None:
    """MC-TI's CLIP for a diffusion model when ``mcti.clip_model`` is null: the embedded world's own (None) for
    ``"digits"``, else the CLIP whose text tower is the model's text encoder (`SD_CLIPS`, by the encoder's width from
    its config; a hub id not in the cache by its name: ``stable-diffusion-2`` → OpenCLIP ViT-H/14, else ViT-L/14).

    >>> default_clip_model("CompVis/stable-diffusion-v1-4")
    'openai/clip-vit-large-patch14'
    """
    if model in EMBEDDED_MODELS:
        return None
    shape = _text_shape(_config_file(model, "text_encoder/config.json"))
    if shape is not None and shape[0] in SD_CLIPS:
        return SD_CLIPS[shape[0]]
    return SD_CLIPS[1024] if "stable-diffusion-2" in model.lower() else SD_CLIPS[768]


def check_clip_pairing(model: str, clip_model: str | None) -> None:
    """Refuse, before any model loads, a CLIP whose text tower cannot be the model's text encoder (`check_paired`
    on their configs: width and depth). Silent when a config cannot be read without a download."""
    clip_model = clip_model if clip_model is not None else default_clip_model(model)
    encoder = _text_shape(_config_file(model, "text_encoder/config.json"))
    clip_config = _config_file(str(DIGITS_CLIP) if clip_model is None else clip_model, "config.json")
    tower = _text_shape(clip_config.get("text_config") if isinstance(clip_config, dict) else None)
    if encoder is None or tower is None:
        return
    name = clip_model or "the digits CLIP"
    if tower[0] != encoder[0]:
        raise UserError(f"`mcti.clip_model` {name!r} does not pair with `model` {model!r}: its text tower is "
                        f"{tower[0]}-d but the model's text encoder is {encoder[0]}-d. Use the CLIP whose text tower "
                        f"is the model's text encoder ({SD_CLIPS.get(encoder[0], 'SD 1.x: ' + SD_CLIPS[768])}), or "
                        f"set mcti.clip_model to null to get it.")
    if tower[1] and encoder[1] and tower[1] != encoder[1]:
        raise UserError(f"`mcti.clip_model` {name!r} does not pair with `model` {model!r}: its text tower has "
                        f"{tower[1]} layers but the model's text encoder has {encoder[1]} (SD 2.x uses the "
                        f"penultimate layer). Use a model whose text encoder is a whole CLIP text tower (SD 1.x with "
                        f"{SD_CLIPS[768]}), or method 'ti', which needs no CLIP.")


def check_clip_path(clip_model: str | None) -> None:
    """Refuse, before any model loads, a ``mcti.clip_model`` given as a path that does not exist."""
    if clip_model is not None and clip_model.startswith((".", "/", "~")) and not Path(clip_model).expanduser().exists():
        raise UserError(f"`mcti.clip_model` {clip_model!r} does not exist: pass a CLIPModel directory or a hub id "
                        f"like 'openai/clip-vit-large-patch14'.")


# T_1 of the paper: the template of the regularizer's text feature and of classification (CLIP's zero-shot habit).
CLASSIFY_TEMPLATE = "a photo of a {token}"


# OpenAI CLIP's normalisation, the default of CLIPImageProcessor when a checkpoint ships no preprocessor config.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------------------------
# CLIP: loading and image features
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipPreprocess:
    """CLIPImageProcessor's recipe: shortest edge -> `size`, center crop, scale to [0, 1], normalise."""

    size: int | None  # shortest edge after resizing; None: no resize
    crop: tuple[int, int] | None  # center crop (height, width); None: no crop
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    resample: int = 3  # PIL's code, as in preprocessor_config.json: 0 nearest, 2 bilinear, 3 bicubic, 1 lanczos

    @classmethod
    def from_clip(cls, clip: CLIPModel, directory: str | Path | None = None) -> ClipPreprocess:
        """From ``preprocessor_config.json`` in `directory` if there is one, else from the vision config."""
        if directory is not None and (Path(directory) / "preprocessor_config.json").is_file():
            cfg = json.loads((Path(directory) / "preprocessor_config.json").read_text())
            size = cfg.get("size", clip.config.vision_config.image_size)
            size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
            crop = cfg.get("crop_size", size)
            crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
            return cls(
                int(size) if cfg.get("do_resize", True) else None,
                (int(crop[0]), int(crop[1])) if cfg.get("do_center_crop", True) else None,
                tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)) if cfg.get("do_normalize", True) else (0.0,) * 3,
                tuple(cfg.get("image_std", OPENAI_CLIP_STD)) if cfg.get("do_normalize", True) else (1.0,) * 3,
                int(cfg.get("resample", 3)),
            )
        s = int(clip.config.vision_config.image_size)
        return cls(s, (s, s))

    def __call__(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images, or float images ``[N, 3, H, W]`` in [0, 1] -> normalised pixel values ``[N, 3, *crop]``."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        mode = {0: InterpolationMode.NEAREST, 1: InterpolationMode.LANCZOS, 2: InterpolationMode.BILINEAR,
                3: InterpolationMode.BICUBIC}.get(self.resample, InterpolationMode.BICUBIC)
        if isinstance(images, torch.Tensor) and mode == InterpolationMode.LANCZOS:
            mode = InterpolationMode.BICUBIC  # tensors have no Lanczos in torchvision

        def one(img):
            if not isinstance(img, torch.Tensor):
                img = img.convert("RGB")
            if self.size is not None:
                img = TF.resize(img, self.size, interpolation=mode, antialias=True)
            if self.crop is not None:
                img = TF.center_crop(img, list(self.crop))
            return img if isinstance(img, torch.Tensor) else TF.to_tensor(img)

        x = torch.stack([one(img).float() for img in images])
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x - mean) / std


def load_clip(
    clip_model: str | None = None,
    pipe: StableDiffusionPipeline | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    local_files_only: bool | None = None,
) -> CLIPModel:
    """Load the CLIP model whose image tower pairs with the pipeline's text encoder (MC-TI's π_ψ and τ_φ).

    Args:
        clip_model: hub id (``"openai/clip-vit-large-patch14"`` pairs with SD 1.x: SD's text encoder *is* its text
            tower), a local ``save_pretrained`` directory, or None: the CLIP of `pipe`'s text encoder by its width
            (`SD_CLIPS`), the embedded digits world's CLIP otherwise.
        pipe: if given, the CLIP goes to its text encoder's device and dtype, and the pairing is checked (the text
            projection must accept the text encoder's hidden size; differing text weights are logged).
        device: overrides the device (default: the pipeline's, else CPU).
        dtype: overrides the dtype (default: the pipeline text encoder's, else fp32).
        local_files_only: never touch the network; default follows ``HF_HUB_OFFLINE`` (local directories never do).

    Returns:
        A frozen ``CLIPModel`` in eval mode, with ``synthaug_preprocess`` (a `ClipPreprocess`), ``synthaug_id`` and
        ``synthaug_tokenizer`` (the tokenizer saved beside the weights, or None).

    >>> clip = load_clip(None)  # the digits world's CLIP  # doctest: +SKIP
    """
    from transformers import CLIPModel

    if clip_model is None and pipe is not None and token_embedding(pipe.text_encoder).embedding_dim in SD_CLIPS:
        clip_model = SD_CLIPS[token_embedding(pipe.text_encoder).embedding_dim]  # a Stable Diffusion model's own
    if clip_model is None:
        if not (DIGITS_CLIP / "config.json").is_file():
            raise UserError(
                f"`mcti.clip_model` is null (the embedded digits CLIP) but its weights are missing at {DIGITS_CLIP}: "
                f"rebuild them with `python scripts/train_digits_world.py`, or pass a CLIP hub id / directory."
            )
        path, name = str(DIGITS_CLIP), "digits"
    else:
        p = Path(clip_model).expanduser()
        if p.exists() and not (p / "config.json").is_file():
            raise UserError(
                f"`mcti.clip_model` {clip_model!r} is a local path without config.json: pass a directory written by "
                f"`CLIPModel.save_pretrained`, or a hub id like 'openai/clip-vit-large-patch14'."
            )
        path, name = (str(p) if p.exists() else clip_model), clip_model
    if local_files_only is None:
        local_files_only = offline() or Path(path).exists()
    for name_ in ("config.json", "tokenizer_config.json"):
        code = custom_code(_json_or_none(Path(path) / name_))
        if code:
            raise UserError(f"`mcti.clip_model` {clip_model!r}: its {name_} has `auto_map` ({code}), i.e. Python code "
                            f"shipped with the model, and synthaug never runs a model's own code: pass a CLIPModel "
                            f"directory written by `CLIPModel.save_pretrained`, or a hub id.")
    try:
        clip = CLIPModel.from_pretrained(path, local_files_only=local_files_only, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (f"it is not in the local Hugging Face cache and the hub is offline: download it first with "
                f"`huggingface-cli download {clip_model}`, or pass a local directory") if local_files_only else \
            "pass a local CLIPModel directory or a valid hub id"
        raise UserError(f"`mcti.clip_model` {clip_model!r} could not be loaded ({first[:200]}): {hint}.") from None
    if device is None:
        device = pipe.text_encoder.device if pipe is not None else "cpu"
    if dtype is None:
        dtype = pipe.text_encoder.dtype if pipe is not None else torch.float32
    clip.to(device=device, dtype=dtype).requires_grad_(False).eval()
    clip.synthaug_preprocess = ClipPreprocess.from_clip(clip, path if Path(path).exists() else _hub_dir(path))
    clip.synthaug_id = name
    # A tokenizer saved beside the weights is the CLIP's own; otherwise the real CLIP BPE (SD 1.x's, OpenAI's).
    clip.synthaug_tokenizer = None
    if Path(path).exists() and any((Path(path) / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer

        clip.synthaug_tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if pipe is not None:
        check_paired(clip, pipe.text_encoder)
    return clip


def _json_or_none(path: Path) -> Any:
    """A local JSON file's content, or None (missing, unreadable: the loader that needs it says why)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _hub_dir(repo_id: str) -> str | None:
    """The cached snapshot folder of a hub model (for its preprocessor_config.json), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "preprocessor_config.json")
        return str(Path(hit).parent) if isinstance(hit, str) else None
    except (ImportError, OSError, ValueError):  # an absent cache or an older huggingface_hub only means "use the config's defaults"
        return None


def check_paired(clip: CLIPModel, text_encoder: torch.nn.Module) -> None:
    """Raise if CLIP's text projection cannot take the text encoder's features (width, or depth: a truncated tower);
    log if the text towers differ."""
    hidden = token_embedding(text_encoder).embedding_dim
    if clip.text_projection.in_features != hidden:
        raise UserError(
            f"`mcti.clip_model` {getattr(clip, 'synthaug_id', '?')!r} does not pair with the diffusion model: its text "
            f"projection takes {clip.text_projection.in_features}-d features but the text encoder is {hidden}-d. "
            f"Use the CLIP whose text tower is the pipeline's text encoder (SD 1.x: openai/clip-vit-large-patch14)."
        )
    clip_layers = getattr(getattr(clip.config, "text_config", None), "num_hidden_layers", None)
    enc_layers = getattr(getattr(text_encoder, "config", None), "num_hidden_layers", None)
    if clip_layers is not None and enc_layers is not None and clip_layers != enc_layers:
        # SD 2.x: the text encoder is OpenCLIP ViT-H's text tower cut to its penultimate layer (23 of 24). Its
        # features are not the ones CLIP's text projection was trained on, so Eq. 4's logits would mean nothing.
        raise UserError(
            f"`mcti.clip_model` {getattr(clip, 'synthaug_id', '?')!r} does not pair with the diffusion model: its "
            f"text tower has {clip_layers} layers but the pipeline's text encoder has {enc_layers} (SD 2.x uses the "
            f"penultimate layer). Use a model whose text encoder is a whole CLIP text tower (SD 1.x with "
            f"openai/clip-vit-large-patch14), or method 'ti', which needs no CLIP."
        )
    a = token_embedding(clip.text_model).weight
    b = token_embedding(text_encoder).weight
    n = min(a.shape[0], b.shape[0])
    if a.shape[1] != b.shape[1] or not torch.equal(a[:n].to(b.device, b.dtype), b[:n]):
        log.warning("CLIP %r's text tower differs from the pipeline's text encoder; MC-TI assumes they are the same "
                    "model (features from the pipeline's encoder go through CLIP's text projection).",
                    getattr(clip, "synthaug_id", "?"))


@torch.no_grad()
def image_features(
    clip: CLIPModel, images: Sequence[Image.Image] | torch.Tensor, *, batch_size: int = 64
) -> torch.Tensor:
    """L2-normalised CLIP image features ``f = π_ψ(I)`` (vision tower + visual projection), fp32 on the CPU.

    Args:
        clip: a `CLIPModel` (from `load_clip`, or any: preprocessing then follows its vision config).
        images: PIL images, or float images ``[N, 3, H, W]`` (or a list of ``[3, H, W]``) in [0, 1].
        batch_size: images per forward pass.

    >>> feats = image_features(clip, [img1, img2])  # doctest: +SKIP
    >>> feats.shape  # [2, projection_dim]  # doctest: +SKIP
    """
    pre = getattr(clip, "synthaug_preprocess", None) or ClipPreprocess.from_clip(clip)
    param = clip.visual_projection.weight
    out = []
    for i in range(0, len(images), batch_size):
        pixels = pre(images[i : i + batch_size]).to(param.device, param.dtype)
        pooled = clip.vision_model(pixel_values=pixels).pooler_output
        out.append(F.normalize(clip.visual_projection(pooled).float(), dim=-1).cpu())
    if not out:
        return torch.zeros(0, clip.visual_projection.out_features)
    return torch.cat(out)


def class_features(clip: CLIPModel, images_by_class: dict[int, Sequence[Any]]) -> dict[int, torch.Tensor]:
    """`image_features` of every class's few-shot images, computed once and shared by all class jobs.

    >>> feats = class_features(clip, {0: imgs0, 1: imgs1})  # doctest: +SKIP
    """
    return {k: image_features(clip, imgs) for k, imgs in sorted(images_by_class.items())}


def text_features(clip: CLIPModel, text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer,
                  enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """``g = τ_φ(P)``: the pooled text feature through CLIP's text projection, L2-normalised, fp32."""
    hidden = encode(text_encoder, enc)
    pooled = pool_eos(hidden, enc["input_ids"], tokenizer.eos_token_id)
    proj = clip.text_projection
    return F.normalize(proj(pooled.to(proj.weight.dtype)).float(), dim=-1)


# --------------------------------------------------------------------------------------------------------------------
# Classification with tokens (Eq. 6)
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def text_prototypes(
    clip: CLIPModel,
    tokens: dict[str, torch.Tensor],
    *,
    text_encoder: torch.nn.Module | None = None,
    tokenizer: CLIPTokenizer | None = None,
    template: str = CLASSIFY_TEMPLATE,
) -> torch.Tensor:
    """``g_k = τ_φ("a photo of a S_k")`` for each token, L2-normalised, ``[K, projection_dim]`` fp32 on the CPU.

    Args:
        clip: the paired CLIP (`load_clip`).
        tokens: ``{token: embedding [n, dim] or [dim]}``, in class order (e.g. from `load_tokens`).
        text_encoder: the text tower; default CLIP's own (identical to the pipeline's for SD 1.x and digits).
        tokenizer: default the tokenizer saved with the CLIP, else the real CLIP tokenizer
            (`synthaug.models.clip_tokenizer`). Not modified: tokens are added to a copy.
        template: prompt with ``{token}`` (the paper's T_1 by default).

    >>> protos = text_prototypes(clip, load_tokens("out/tokens/tokens.safetensors"))  # doctest: +SKIP
    """
    if not tokens:
        raise UserError("`tokens` is empty: pass {token: embedding}, e.g. load_tokens('out/tokens/tokens.safetensors').")
    if "{token}" not in template:
        raise UserError(f"`template` {template!r} has no {{token}} placeholder: e.g. 'a photo of a {{token}}'.")
    if tokenizer is None:
        tokenizer = getattr(clip, "synthaug_tokenizer", None)
    if tokenizer is None:

        tokenizer = clip_tokenizer()
    text_encoder = text_encoder if text_encoder is not None else clip.text_model
    emb = token_embedding(text_encoder)
    vectors = {}
    for name, vecs in tokens.items():
        v = torch.as_tensor(vecs)
        if v.numel() % emb.embedding_dim or not v.numel():
            raise UserError(f"`tokens` entry {name!r} has {v.numel()} values but the text encoder embeds in "
                            f"{emb.embedding_dim}: the tokens were learned for a different model.")
        vectors[name] = v.reshape(-1, emb.embedding_dim)  # [n, dim]: n > 1 for a multi-vector token
    tok = tokenizer_with(tokenizer, [w for name, v in vectors.items() for w in vector_names(name, len(v))])
    rows = {}
    for name, v in vectors.items():
        rows.update(zip(tok.convert_tokens_to_ids(vector_names(name, len(v))), v.to(emb.weight.device)))
    enc = tokenize(tok, [template.format(token=spell_token(t, len(v))) for t, v in vectors.items()],
                   emb.weight.device)
    with splice_tokens(text_encoder, rows):
        return text_features(clip, text_encoder, tok, enc).cpu()


def classify(
    clip: CLIPModel,
    tokens: dict[str, torch.Tensor],
    images: Sequence[Any] | torch.Tensor,
    *,
    scale: float = 10.0,
    text_encoder: torch.nn.Module | None = None,
    tokenizer: CLIPTokenizer | None = None,
    template: str = CLASSIFY_TEMPLATE,
    batch_size: int = 64,
) -> torch.Tensor:
    """Class probabilities of images under the learned tokens (Eq. 6): ``softmax_k(s · cos(g_k, f_I))``.

    Args:
        clip: the paired CLIP (`load_clip`).
        tokens: ``{token: embedding}``; the column order of the result is this dict's order.
        images: PIL images or float images ``[N, 3, H, W]`` in [0, 1].
        scale: s, the inverse temperature (the paper's s = 10; the argmax does not depend on it).
        text_encoder, tokenizer, template: see `text_prototypes`.
        batch_size: images per CLIP forward pass.

    Returns:
        ``[N, K]`` fp32 probabilities; each row sums to 1.

    >>> probs = classify(load_clip(None), load_tokens("out/digits/tokens/tokens.safetensors"), [img])
    ...  # doctest: +SKIP
    >>> probs.argmax(-1)  # doctest: +SKIP
    """
    if not scale > 0:
        raise UserError(f"`scale` must be > 0 but is {scale!r}: it is s of Eq. 6 (paper: 10).")
    protos = text_prototypes(clip, tokens, text_encoder=text_encoder, tokenizer=tokenizer, template=template)
    feats = image_features(clip, images, batch_size=batch_size)
    return torch.softmax(scale * feats @ protos.T, dim=-1)
