"""Textual inversion (TI) and Multi-Class Textual Inversion (MC-TI), and classification with the learned tokens.

Consumes few-shot images per class, a Stable Diffusion pipeline and (for MC-TI and classification) a CLIP model whose
text tower is the pipeline's text encoder; produces one token embedding per class in the diffusers
textual-inversion format (``{token: tensor[1, dim]}`` safetensors), and per-class probabilities for images (Eq. 6).

MC-TI (paper 003, §3.2): learn each class token with plain TI first (the warm-up: ``MCTIConfig.steps``), then keep
training it for ``MCTIConfig.extra_steps`` with ``α·L_mse + β·L_reg`` (Eq. 5), where ``L_reg`` (Eq. 3-4) is the
cross-entropy of the token's CLIP text feature against one randomly drawn few-shot image feature per class. Image
features are computed once. Each class token is an independent job (the paper: "in parallel").

What we do on purpose (see also DESIGN.md §2, which applies to every token we train):

- the token is a standalone fp32 parameter spliced into the embedding output by a forward hook; the pipeline is left
  exactly as it was found (as with DCT tokens: the tokenizer learns the token in a copy; `synthaug.tokens.add_tokens`
  puts learned tokens into a pipeline for generation);
- the warm-up schedule is real: TI steps, then joint steps (the public reference code parses a warm-up option and
  never uses it);
- Eq. 3 as printed puts ``s`` outside ``exp`` (where it cancels between numerator and denominator); we implement
  the intended ``softmax(s · cos)``, CLIP's logit scale;
- the pooled text feature is taken at the first end-of-text token ourselves: checkpoints with the legacy
  ``eos_token_id: 2`` in their config (SD 1.x's text encoder among them) pool at the *largest* token id, which is
  the new class token, not the end of the prompt.

>>> from synthaug.mcti import learn_mcti_token, load_clip, classify
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .config import MCTIConfig
from .errors import UserError
from .models import ASSETS, offline
from .tokens import save_tokens, token_name

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from transformers import CLIPModel, CLIPTokenizer

log = logging.getLogger(__name__)

# The CLIP model of the embedded digits world: a CLIPModel whose text tower is the digits pipeline's text encoder.
DIGITS_CLIP = ASSETS / "digits" / "clip"

# Textual inversion's object templates (Gal et al.; diffusers' `imagenet_templates_small`): the 27 prompts that
# MC-TI's Fig. 4 visualises. `{token}` is the class pseudo-word S_k.
TI_TEMPLATES = (
    "a photo of a {token}", "a rendering of a {token}", "a cropped photo of the {token}", "the photo of a {token}",
    "a photo of a clean {token}", "a photo of a dirty {token}", "a dark photo of the {token}", "a photo of my {token}",
    "a photo of the cool {token}", "a close-up photo of a {token}", "a bright photo of the {token}",
    "a cropped photo of a {token}", "a photo of the {token}", "a good photo of the {token}", "a photo of one {token}",
    "a close-up photo of the {token}", "a rendition of the {token}", "a photo of the clean {token}",
    "a rendition of a {token}", "a photo of a nice {token}", "a good photo of a {token}", "a photo of the nice {token}",
    "a photo of the small {token}", "a photo of the weird {token}", "a photo of the large {token}",
    "a photo of a cool {token}", "a photo of a small {token}",
)
# T_1 of the paper: the template of the regularizer's text feature and of classification (CLIP's zero-shot habit).
CLASSIFY_TEMPLATE = "a photo of a {token}"

METHODS = ("ti", "mcti")
# OpenAI CLIP's normalisation, the default of CLIPImageProcessor when a checkpoint ships no preprocessor config.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class MCTIResult:
    """One learned class token.

    Attributes:
        token: the pseudo-word, e.g. ``"<synthaug-003>"``.
        class_index: the class it stands for.
        label: the class name, metadata only (MC-TI never puts it in a prompt: the method is semantic-agnostic).
        method: ``"ti"`` or ``"mcti"``.
        embedding: the learned embedding, ``[1, dim]`` fp32 on the CPU.
        warmup_embedding: for MC-TI, the token at the end of the TI warm-up (exactly the token ``method="ti"`` with
            the same config learns), ``[1, dim]`` fp32; None for TI.
        steps: optimizer updates done (warm-up + joint).
        history: one dict per update: ``step``, ``phase`` (``"ti"`` | ``"mcti"``), ``loss_mse``, ``loss_reg``
            (None where not computed), ``loss`` (what was minimised).
        seconds: wall time of the training loop.
        metadata: str -> str, written into the token file.
    """

    token: str
    class_index: int
    label: str | None
    method: str
    embedding: torch.Tensor
    warmup_embedding: torch.Tensor | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """Write the token in diffusers' textual-inversion format, as DCT tokens are (`synthaug.tokens.save_tokens`):
        ``pipe.load_textual_inversion(path)`` and `synthaug.tokens.load_tokens` read it.

        >>> result.save("out/tokens/003.safetensors")  # doctest: +SKIP
        """
        save_tokens({self.token: self.embedding}, path, self.metadata)


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
            tower), a local ``save_pretrained`` directory, or None for the embedded digits world's CLIP.
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
    try:
        clip = CLIPModel.from_pretrained(path, local_files_only=local_files_only)
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

        clip.synthaug_tokenizer = AutoTokenizer.from_pretrained(path)
    if pipe is not None:
        check_paired(clip, pipe.text_encoder)
    return clip


def _hub_dir(repo_id: str) -> str | None:
    """The cached snapshot folder of a hub model (for its preprocessor_config.json), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "preprocessor_config.json")
        return str(Path(hit).parent) if isinstance(hit, str) else None
    except (ImportError, OSError, ValueError):  # an absent cache or an older huggingface_hub only means "use the config's defaults"
        return None


def check_paired(clip: CLIPModel, text_encoder: torch.nn.Module) -> None:
    """Raise if CLIP's text projection cannot take the text encoder's features; log if the text towers differ."""
    hidden = _token_embedding(text_encoder).embedding_dim
    if clip.text_projection.in_features != hidden:
        raise UserError(
            f"`mcti.clip_model` {getattr(clip, 'synthaug_id', '?')!r} does not pair with the diffusion model: its text "
            f"projection takes {clip.text_projection.in_features}-d features but the text encoder is {hidden}-d. "
            f"Use the CLIP whose text tower is the pipeline's text encoder (SD 1.x: openai/clip-vit-large-patch14)."
        )
    a = _token_embedding(clip.text_model).weight
    b = _token_embedding(text_encoder).weight
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


# --------------------------------------------------------------------------------------------------------------------
# Text side: splicing token vectors into the embedding output, pooled CLIP text features
# --------------------------------------------------------------------------------------------------------------------
def _text_transformer(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """CLIPTextModel -> its CLIPTextTransformer; a CLIPTextTransformer (``clip.text_model``) -> itself."""
    return getattr(text_encoder, "text_model", text_encoder)


def _token_embedding(text_encoder: torch.nn.Module) -> torch.nn.Embedding:
    return _text_transformer(text_encoder).embeddings.token_embedding


@contextlib.contextmanager
def splice_tokens(text_encoder: torch.nn.Module, rows: dict[int, torch.Tensor]) -> Iterator[None]:
    """Within the block, token id ``i`` embeds to ``rows[i]`` (a ``[dim]`` tensor; gradients flow into it).

    The embedding matrix is neither read nor written for those ids (a pre-hook looks them up as row 0, a forward hook
    replaces the result), so a trained token is a standalone parameter, and ids the matrix has no row for (tokens
    added to a tokenizer copy only) work too. Many tokens cost one lookup (K class tokens at once for Eq. 6), not K.
    """
    emb = _token_embedding(text_encoder)
    keys = sorted(rows)
    key_t = torch.tensor(keys, dtype=torch.long, device=emb.weight.device)
    table = torch.stack([rows[k].reshape(-1) for k in keys])  # [K, dim], carries the tokens' gradients
    found: list[tuple[torch.Tensor, torch.Tensor]] = []

    def pre(module, args):
        ids = args[0]
        pos = torch.searchsorted(key_t, ids).clamp(max=len(keys) - 1)
        hit = key_t[pos] == ids
        found.append((hit, pos))
        return (ids.masked_fill(hit, 0), *args[1:])

    def post(module, args, output):
        hit, pos = found.pop()
        return torch.where(hit.unsqueeze(-1), table[pos].to(output.dtype), output)

    handles = [emb.register_forward_pre_hook(pre), emb.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _tokenize(tokenizer: CLIPTokenizer, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` ``[B, max_length]`` on `device`."""
    # Padded to the tokenizer's max length, exactly as the pipeline encodes prompts at inference (DESIGN.md §2).
    # A tokenizer saved without model_max_length reports 1e30 (NOTES.md): fall back to CLIP's 77.
    max_length = tokenizer.model_max_length if tokenizer.model_max_length <= 4096 else 77
    enc = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device)}


def _encode_hidden(text_encoder: torch.nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """The conditioning ``C = τ_φ(P)``: last hidden states (after the final layer norm), as SD pipelines use them."""
    # `StableDiffusionPipeline.encode_prompt` passes the mask only to encoders configured to use one.
    use_mask = getattr(getattr(text_encoder, "config", None), "use_attention_mask", False)
    return text_encoder(enc["input_ids"], attention_mask=enc["attention_mask"] if use_mask else None)[0]


def _pool_eos(hidden: torch.Tensor, input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    # The first end-of-text position (padding may repeat it). Not the config's `eos_token_id == 2` argmax rule, which
    # would pool at the new class token (the largest id) in SD 1.x's text encoder.
    pos = (input_ids == eos_token_id).int().argmax(dim=-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), pos]


def _text_features(clip: CLIPModel, text_encoder: torch.nn.Module, tokenizer: CLIPTokenizer,
                   enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """``g = τ_φ(P)``: the pooled text feature through CLIP's text projection, L2-normalised, fp32."""
    hidden = _encode_hidden(text_encoder, enc)
    pooled = _pool_eos(hidden, enc["input_ids"], tokenizer.eos_token_id)
    proj = clip.text_projection
    return F.normalize(proj(pooled.to(proj.weight.dtype)).float(), dim=-1)


def _single_token_id(tokenizer: CLIPTokenizer, word: str, what: str) -> int:
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise UserError(f"`{what}` {word!r} must be a single token of the tokenizer but splits into {len(ids)} "
                        f"tokens: use one common word such as 'a', 'object' or 'bird'.")
    return ids[0]


def _tokenizer_with(tokenizer: CLIPTokenizer, tokens: Sequence[str]) -> CLIPTokenizer:
    """`tokenizer` if it already knows `tokens` as added tokens, else a copy that does (the original stays as is)."""
    for t in tokens:
        if not isinstance(t, str) or not t or t != t.strip():
            raise UserError(f"Token {t!r} must be a non-empty string without surrounding spaces, e.g. '<synthaug-000>'.")
        if t in tokenizer.get_vocab() and t not in tokenizer.get_added_vocab():
            raise UserError(f"Token {t!r} is already a word of the tokenizer's vocabulary: a class token must be new. "
                            f"Rename it, e.g. {token_name(0)!r}.")
    missing = [t for t in tokens if t not in tokenizer.get_added_vocab()]
    if missing:
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.add_tokens(missing)
    return tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Learning one class token (TI / MC-TI)
# --------------------------------------------------------------------------------------------------------------------
def _generator(seed: int, *key: int) -> torch.Generator:
    # Per-class, per-purpose streams: the same (seed, class) gives the same draws whichever worker runs the job.
    state = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


def _pixels(images: Sequence[Any], size: int) -> torch.Tensor:
    """PIL or ``[3, H, W]`` [0,1] images -> ``[N, 3, size, size]`` in [-1, 1]: shortest edge resize, center crop."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    out = []
    for img in images:
        if not isinstance(img, torch.Tensor):
            img = img.convert("RGB")
        img = TF.resize(img, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
        img = TF.center_crop(img, [size, size])
        x = img.float() if isinstance(img, torch.Tensor) else TF.to_tensor(img)
        out.append(x.clamp(0, 1) * 2 - 1)
    return torch.stack(out)


@torch.no_grad()
def _latent_stats(pipe: StableDiffusionPipeline, pixels: torch.Tensor, chunk: int = 8):
    """Mean and std of the VAE posterior of each image, fp32: sampling ``mean + std·ε`` per step equals re-encoding."""
    vae = pipe.vae
    means, stds = [], []
    for i in range(0, len(pixels), chunk):
        dist = vae.encode(pixels[i : i + chunk].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def learn_mcti_token(
    pipe: StableDiffusionPipeline,
    clip: CLIPModel | None,
    images_by_class: dict[int, Sequence[Any]],
    class_index: int,
    config: MCTIConfig | None = None,
    *,
    method: str = "mcti",
    token: str | None = None,
    label: str | None = None,
    features: dict[int, torch.Tensor] | None = None,
    resolution: int | None = None,
    flip_p: float = 0.0,
    templates: Sequence[str] = TI_TEMPLATES,
    progress: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> MCTIResult:
    """Learn the token of one class with textual inversion, then (MC-TI) with the discriminative regularizer.

    Schedule: ``config.steps`` TI updates (Eq. 2: ``L_mse``, the warm-up), then, for ``method="mcti"``,
    ``config.extra_steps`` joint updates of ``α·L_mse + β·L_reg`` (Eq. 5). ``method="ti"`` is the warm-up alone.
    Only the token trains (AdamW, ``config.lr``). The pipeline is left exactly as it was found, tokenizer included;
    generate with the token after ``synthaug.tokens.add_tokens(pipe, {res.token: res.embedding})``.

    Args:
        pipe: a Stable Diffusion pipeline (`synthaug.models.load_diffusion`); frozen.
        clip: the CLIP paired with the pipeline's text encoder (`load_clip`); may be None for ``method="ti"``.
        images_by_class: the few-shot set ``{class_index: [images]}`` of all K classes (PIL, or ``[3, H, W]``
            tensors in [0, 1]); this class's images feed ``L_mse``, one random image per class the regularizer.
            With `features` given, only this class's images are needed.
        class_index: the class whose token is learned.
        config: `MCTIConfig` (steps, extra_steps, lr, batch_size, alpha, beta, scale, init_token, seed).
        method: ``"ti"`` or ``"mcti"``.
        token: the pseudo-word; default `token_name(class_index)`.
        label: the class name, recorded in metadata only.
        features: precomputed `class_features` of all K classes (computed once, shared by all class jobs); they
            define the classes of the regularizer.
        resolution: training image size; default the UNet's native size.
        flip_p: random horizontal flip probability (TI's default is 0.5; 0 here since digits and text are not
            mirror-symmetric).
        templates: TI prompt templates with ``{token}``.
        progress: show a tqdm bar.
        callback: called as ``callback(step, token_vector)`` after each update (tests, monitoring).

    Returns:
        `MCTIResult` with the embedding (and for MC-TI the warm-up embedding), per-step history and metadata.

    >>> res = learn_mcti_token(pipe, clip, {0: imgs0, 1: imgs1}, 0, MCTIConfig(steps=300, extra_steps=100))
    ...  # doctest: +SKIP
    >>> res.save("tokens/000.safetensors")  # doctest: +SKIP
    """
    from diffusers import DDPMScheduler

    # 1. Check inputs (before any work).
    config = config or MCTIConfig()
    if method not in METHODS:
        raise UserError(f"`method` must be one of {', '.join(METHODS)} but is {method!r}.")
    if class_index not in images_by_class or len(images_by_class[class_index]) == 0:
        raise UserError(f"`class_index` {class_index} has no few-shot images in `images_by_class` (classes "
                        f"{sorted(images_by_class)[:10]}...): pass at least one image for it.")
    _check_config(config, method)
    ti_steps = config.steps
    joint_steps = config.extra_steps if method == "mcti" else 0
    if ti_steps + joint_steps == 0:
        raise UserError(f"`mcti.steps` ({config.steps}) + `mcti.extra_steps` ({config.extra_steps}) is 0 for method "
                        f"{method!r}: nothing would be learned; set `mcti.steps` > 0.")
    # The K classes of the regularizer: those of `features` when given (a distributed job then needs only its own
    # class's images), else those of `images_by_class`.
    classes = sorted(features) if features is not None else sorted(images_by_class)
    if method == "mcti":
        if clip is None:
            raise UserError("`clip` is None but method 'mcti' needs the CLIP image tower: pass `load_clip(...)`.")
        if len(classes) < 2:
            raise UserError(f"method 'mcti' needs at least 2 classes in `images_by_class` (or `features`) but got "
                            f"{len(classes)}: the regularizer (Eq. 3-4) discriminates between classes; use method "
                            f"'ti' for one.")
        if class_index not in classes:
            raise UserError(f"`features` has no entry for `class_index` {class_index}: compute class_features over "
                            f"every class, this one included.")
        check_paired(clip, pipe.text_encoder)
    token = token or token_name(class_index)
    tokenizer = _tokenizer_with(pipe.tokenizer, [token])  # a copy that knows S_k; the pipeline's stays as it was
    text_encoder, unet = pipe.text_encoder, pipe.unet
    device = unet.device
    resolution = resolution or int(unet.config.sample_size) * int(pipe.vae_scale_factor)

    # 2. The token: a standalone fp32 parameter, initialised from `init_token`'s embedding.
    init_id = _single_token_id(tokenizer, config.init_token, "mcti.init_token")
    init = _token_embedding(text_encoder).weight[init_id].detach().float().clone()
    tid = tokenizer.convert_tokens_to_ids(token)
    vec = torch.nn.Parameter(init.to(device))
    # AdamW with torch's default weight decay (0.01), as the TI implementations MC-TI builds on use it.
    optimizer = torch.optim.AdamW([vec], lr=config.lr)
    # fp16 weights need loss scaling for the token's gradient to survive; bf16 and fp32 do not.
    use_scaler = device.type == "cuda" and torch.float16 in (unet.dtype, text_encoder.dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)

    # 3. Precompute what does not change: VAE posteriors of this class's images (and mirrors), image features.
    own = list(images_by_class[class_index])
    pix = _pixels(own, resolution)
    mean, std = _latent_stats(pipe, pix)
    if flip_p > 0:
        mean_f, std_f = _latent_stats(pipe, pix.flip(-1))
    vae_cfg = pipe.vae.config
    scaling, shift = float(vae_cfg.scaling_factor), float(getattr(vae_cfg, "shift_factor", None) or 0.0)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_train_t = int(noise_scheduler.config.num_train_timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    if method == "mcti":
        feats = features if features is not None else class_features(clip, images_by_class)
        empty = [k for k in classes if len(feats[k]) == 0]
        if empty:
            raise UserError(f"`features` of classes {empty[:10]} are empty: every class needs at least one image.")
        feats = {k: feats[k].to(device, torch.float32) for k in classes}
        target = torch.tensor([classes.index(class_index)], device=device)
        reg_enc = _tokenize(tokenizer, [CLASSIFY_TEMPLATE.format(token=token)], device)

    # Separate random streams: the regularizer's draws never shift the L_mse draws, so that MC-TI with β=0 is TI,
    # update for update.
    gen = _generator(config.seed, class_index, 0)
    gen_reg = _generator(config.seed, class_index, 1)
    queue: list[int] = []

    def batch_indices(n: int) -> list[int]:
        # Epochs over the few shots in a seeded order, like a shuffling DataLoader over a repeated dataset.
        while len(queue) < n:
            queue.extend(torch.randperm(len(own), generator=gen).tolist())
        return [queue.pop(0) for _ in range(n)]

    def l_mse() -> torch.Tensor:
        # Eq. 1: ||ε - ε_θ(z_t, t, τ_φ(P))||², VAE latents of random shots, random templates and timesteps.
        idx = batch_indices(config.batch_size)
        prompts = [templates[int(i)].format(token=token)
                   for i in torch.randint(len(templates), (len(idx),), generator=gen)]
        flips = (torch.rand(len(idx), generator=gen) < flip_p).tolist() if flip_p > 0 else [False] * len(idx)
        mu = torch.stack([(mean_f if f else mean)[i] for i, f in zip(idx, flips)])
        sd = torch.stack([(std_f if f else std)[i] for i, f in zip(idx, flips)])
        eps_z = torch.randn(mu.shape, generator=gen).to(device)
        latents = (mu + sd * eps_z - shift) * scaling
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, num_train_t, (len(idx),), generator=gen).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        with splice_tokens(text_encoder, {tid: vec}):
            cond = _encode_hidden(text_encoder, _tokenize(tokenizer, prompts, device))
        pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample
        target_ = noise if prediction_type == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
        return F.mse_loss(pred.float(), target_.float())

    def l_reg() -> torch.Tensor:
        # Eq. 3-4: one random few-shot feature per class as temporary prototypes f_j; g_k from "a photo of a S_k";
        # cross-entropy of softmax_j(s·cos(g_k, f_j)) to class k. (Eq. 3 prints s outside exp, where it cancels;
        # the intended logits are s·cos, CLIP's logit scale.)
        protos = torch.stack([feats[k][torch.randint(len(feats[k]), (1,), generator=gen_reg).item()]
                              for k in classes])
        with splice_tokens(text_encoder, {tid: vec}):
            g = _text_features(clip, text_encoder, tokenizer, reg_enc)
        logits = config.scale * g @ protos.T
        return F.cross_entropy(logits, target)

    # 4. Train: TI warm-up, then the joint loss (Eq. 5).
    history: list[dict[str, Any]] = []
    warmup = init.cpu().clone().view(1, -1) if ti_steps == 0 and method == "mcti" else None
    total = ti_steps + joint_steps
    bar = _progress(total, progress, f"{method} {token}")
    start = time.perf_counter()
    for step in range(total):
        phase = "ti" if step < ti_steps else "mcti"
        optimizer.zero_grad(set_to_none=True)
        if phase == "ti":
            loss_mse = l_mse()
            loss_reg = None
            loss = loss_mse
        else:
            loss_mse = l_mse() if config.alpha != 0 else None
            if config.beta != 0:
                loss_reg = l_reg()
            else:  # logged, but kept out of the graph so that β=0 reproduces TI bit for bit
                with torch.no_grad():
                    loss_reg = l_reg()
            loss = config.alpha * loss_mse if loss_mse is not None else 0.0
            if config.beta != 0:
                loss = loss + config.beta * loss_reg
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        history.append({"step": step, "phase": phase,
                        "loss_mse": None if loss_mse is None else loss_mse.item(),
                        "loss_reg": None if loss_reg is None else loss_reg.item(), "loss": float(loss.detach())})
        if method == "mcti" and step + 1 == ti_steps:
            warmup = vec.detach().float().cpu().clone().view(1, -1)
        if callback is not None:
            callback(step, vec.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", phase=phase)
    bar.close()
    seconds = time.perf_counter() - start
    if not bool(torch.isfinite(vec).all()):
        raise RuntimeError(f"token {token} became non-finite during {method} training (lr {config.lr}); "
                           f"lower `mcti.lr` or use fp32/bf16 weights.")

    # 5. The result (the pipeline is untouched: `add_tokens` puts the token in for generation).
    embedding = vec.detach().float().cpu().clone().view(1, -1)
    last = history[-1] if history else {}
    metadata = {
        "method": method, "token": token, "class_index": class_index, "label": label or "",
        "steps": total, "ti_steps": ti_steps, "mcti_steps": joint_steps, "lr": config.lr,
        "batch_size": config.batch_size, "alpha": config.alpha, "beta": config.beta if method == "mcti" else 0.0,
        "scale": config.scale, "init_token": config.init_token, "seed": config.seed,
        "shots": len(own), "num_classes": len(classes), "resolution": resolution, "flip_p": flip_p,
        "final_loss_mse": last.get("loss_mse"), "final_loss_reg": last.get("loss_reg"),
        "model_id": getattr(pipe, "synthaug_model_id", ""), "clip_id": getattr(clip, "synthaug_id", "") if clip else "",
    }
    return MCTIResult(token=token, class_index=class_index, label=label, method=method, embedding=embedding,
                      warmup_embedding=warmup if method == "mcti" else None, steps=total, history=history,
                      seconds=seconds, metadata={k: "" if v is None else str(v) for k, v in metadata.items()})


def _check_config(config: MCTIConfig, method: str) -> None:
    """The MC-TI rules `synthaug.config.validate` does not check (it runs without knowing the method's needs)."""
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise UserError(f"`mcti.lr` must be a positive number but is {config.lr!r}: the paper uses 5e-4.")
    if config.batch_size <= 0:
        raise UserError(f"`mcti.batch_size` must be > 0 but is {config.batch_size!r}.")
    if config.steps < 0 or config.extra_steps < 0:
        raise UserError(f"`mcti.steps` and `mcti.extra_steps` must be >= 0 but are {config.steps} and "
                        f"{config.extra_steps}.")
    if method == "mcti":
        if config.alpha < 0 or config.beta < 0:
            raise UserError(f"`mcti.alpha` and `mcti.beta` must be >= 0 but are {config.alpha} and {config.beta}: "
                            f"they weight the two losses of Eq. 5 (paper: 1 and 1).")
        if config.alpha == 0 and config.beta == 0 and config.extra_steps > 0:
            raise UserError("`mcti.alpha` and `mcti.beta` are both 0: the joint steps would minimise nothing; "
                            "set at least one > 0 (paper: alpha=1, beta=1).")
        if not config.scale > 0:
            raise UserError(f"`mcti.scale` must be > 0 but is {config.scale!r}: it is s of Eq. 3 (paper: 10).")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


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
        tokens: ``{token: embedding [1, dim] or [dim]}``, in class order (e.g. from `load_tokens`).
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
        from .models import clip_tokenizer

        tokenizer = clip_tokenizer()
    text_encoder = text_encoder if text_encoder is not None else clip.text_model
    emb = _token_embedding(text_encoder)
    tok = _tokenizer_with(tokenizer, list(tokens))
    rows = {}
    for name, vecs in tokens.items():
        v = torch.as_tensor(vecs).reshape(-1)
        if v.numel() != emb.embedding_dim:
            raise UserError(f"`tokens` entry {name!r} has {v.numel()} values but the text encoder embeds in "
                            f"{emb.embedding_dim}: the tokens were learned for a different model.")
        rows[tok.convert_tokens_to_ids(name)] = v.to(emb.weight.device)
    enc = _tokenize(tok, [template.format(token=t) for t in tokens], emb.weight.device)
    with splice_tokens(text_encoder, rows):
        return _text_features(clip, text_encoder, tok, enc).cpu()


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


# --------------------------------------------------------------------------------------------------------------------
# N-shot evaluation: TI vs MC-TI vs a CLIP-feature prototype baseline
# --------------------------------------------------------------------------------------------------------------------
def evaluate_shots(
    pipe: StableDiffusionPipeline,
    clip: CLIPModel,
    train: Any,
    test: Any,
    *,
    shots: Sequence[int] = (1, 2, 4, 5, 8, 16),
    seeds: Sequence[int] = (0, 1, 2),
    methods: Sequence[str] = ("prototype", "ti", "mcti"),
    config: MCTIConfig | None = None,
    scale: float | None = None,
    max_test: int | None = None,
    flip_p: float = 0.0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """N-shot classification accuracy on a test split, per method, shot count and seed (paper §4.1 protocol).

    For each seed and N, draw N training images per class, learn one token per class and classify the test split
    with Eq. 6. MC-TI's warm-up *is* TI with the same config, so one MC-TI run per class yields both the TI token
    (after the warm-up) and the MC-TI token. ``"prototype"`` is the class mean of the N CLIP image features (no
    text, no training): the baseline any few-shot token method must beat.

    Args:
        pipe, clip: the diffusion pipeline and its paired CLIP.
        train, test: torchvision-style datasets (``targets``, ``__getitem__ -> (PIL image or [3,H,W] tensor, int)``).
        shots, seeds: the grid.
        methods: any of ``"prototype"``, ``"ti"``, ``"mcti"``.
        config: `MCTIConfig` for token learning (``steps`` = TI steps; ``extra_steps`` = MC-TI joint steps).
        scale: s of Eq. 6 for the reported probabilities; accuracy does not depend on it.
        max_test: evaluate on the first `max_test` test images of a seeded permutation (None: all).
        flip_p: see `learn_mcti_token`.
        progress: tqdm bars.

    Returns:
        Rows ``{"method", "shots", "seed", "accuracy", "n_test", "seconds"}``; `format_table` renders them.

    >>> rows = evaluate_shots(pipe, clip, Digits(split="train"), Digits(split="test"), shots=(1, 5), seeds=(0,))
    ...  # doctest: +SKIP
    >>> print(format_table(rows))  # doctest: +SKIP
    """
    config = config or MCTIConfig()
    valid = ("prototype", "ti", "mcti")
    bad = [m for m in methods if m not in valid]
    if bad:
        raise UserError(f"`methods` must be among {', '.join(valid)} but include {bad}.")
    if any(int(n) <= 0 for n in shots):
        raise UserError(f"`shots` must all be > 0 but are {list(shots)}.")
    scale = config.scale if scale is None else scale
    classes = sorted({int(t) for t in train.targets})

    # Test features once, for every seed, N and method.
    order = list(range(len(test)))
    if max_test is not None and max_test < len(order):
        order = sorted(np.random.default_rng(12345).permutation(len(order))[:max_test].tolist())
    feats_chunks, test_y = [], []
    for start in range(0, len(order), 256):  # streamed: a large test split never sits in memory as images
        items = [test[i] for i in order[start : start + 256]]
        feats_chunks.append(image_features(clip, [x for x, _ in items]))
        test_y.extend(int(y) for _, y in items)
    unknown = sorted(set(test_y) - set(classes))
    if unknown:
        raise UserError(f"`test` has classes {unknown[:10]} that `train` lacks: both splits must share one label set.")
    test_feats = torch.cat(feats_chunks) if feats_chunks else torch.zeros(0, clip.visual_projection.out_features)
    test_targets = torch.tensor([classes.index(y) for y in test_y], dtype=torch.long)

    def accuracy(protos: torch.Tensor) -> float:
        probs = torch.softmax(scale * test_feats @ protos.T, dim=-1)
        return float((probs.argmax(-1) == test_targets).float().mean())

    rows: list[dict[str, Any]] = []
    learn = [m for m in methods if m in ("ti", "mcti")]
    for seed in seeds:
        for n in shots:
            # The build's own few-shot draw (nested: the 1-shot set is inside the 2-shot set, and so on).
            from .datasets import few_shot_indices

            picked: dict[int, list[int]] = {k: [] for k in classes}
            for i in few_shot_indices(train.targets, int(n), seed):
                picked[int(train.targets[i])].append(i)
            images = {k: [train[i][0] for i in idx] for k, idx in picked.items()}
            feats = class_features(clip, images)
            if "prototype" in methods:
                t0 = time.perf_counter()
                protos = F.normalize(torch.stack([feats[k].mean(0) for k in classes]), dim=-1)
                rows.append({"method": "prototype", "shots": int(n), "seed": seed, "accuracy": accuracy(protos),
                             "n_test": len(order), "seconds": time.perf_counter() - t0})
            if not learn:
                continue
            cfg = _replace(config, seed=seed)
            method = "mcti" if "mcti" in learn else "ti"
            tokens: dict[str, dict[str, torch.Tensor]] = {m: {} for m in learn}
            t0 = time.perf_counter()
            for k in classes:
                res = learn_mcti_token(pipe, clip if method == "mcti" else None, images, k, cfg, method=method,
                                       features=feats, flip_p=flip_p, progress=progress)
                if "mcti" in learn:
                    tokens["mcti"][res.token] = res.embedding
                if "ti" in learn:
                    tokens["ti"][res.token] = res.warmup_embedding if method == "mcti" else res.embedding
            seconds = time.perf_counter() - t0
            for m in learn:
                protos = text_prototypes(clip, tokens[m], text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
                rows.append({"method": m, "shots": int(n), "seed": seed, "accuracy": accuracy(protos),
                             "n_test": len(order), "seconds": seconds})
            log.info("seed %d, %d-shot: %s", seed, n,
                     ", ".join(f"{r['method']} {r['accuracy']:.3f}" for r in rows[-len(methods):]))
    return rows


def _replace(config: MCTIConfig, **changes: Any) -> MCTIConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table: one row per method, one column per N, cells ``mean ± std`` accuracy (%) over seeds.

    >>> print(format_table([{"method": "ti", "shots": 1, "seed": 0, "accuracy": 0.5}]))
    | method | 1-shot |
    | --- | --- |
    | ti | 50.0 |
    """
    shots = sorted({r["shots"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["| method | " + " | ".join(f"{n}-shot" for n in shots) + " |", "| --- |" + " --- |" * len(shots)]
    for m in methods:
        cells = []
        for n in shots:
            acc = [100 * r["accuracy"] for r in rows if r["method"] == m and r["shots"] == n]
            if not acc:
                cells.append("")
            elif len(acc) == 1:
                cells.append(f"{acc[0]:.1f}")
            else:
                cells.append(f"{np.mean(acc):.1f} ± {np.std(acc, ddof=1):.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "CLASSIFY_TEMPLATE",
    "TI_TEMPLATES",
    "ClipPreprocess",
    "MCTIResult",
    "check_paired",
    "class_features",
    "classify",
    "evaluate_shots",
    "format_table",
    "image_features",
    "learn_mcti_token",
    "load_clip",
    "splice_tokens",
    "text_prototypes",
]


# --------------------------------------------------------------------------------------------------------------------
# `synthaug classify`: a build's tokens as a CLIP classifier (Eq. 6)
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class ClassifyResult:
    """Per-image class probabilities under a build's tokens."""

    names: list[str]  # image ids (file names, or dataset sample ids)
    labels: list[str]  # class names, the columns of `probs`
    probs: torch.Tensor  # [N, K]
    targets: list[int] | None  # ground truth when the images came from a dataset

    @property
    def predictions(self) -> list[int]:
        return self.probs.argmax(-1).tolist()

    @property
    def accuracy(self) -> float | None:
        if self.targets is None:
            return None
        return sum(int(p == t) for p, t in zip(self.predictions, self.targets)) / max(1, len(self.targets))

    def summary(self) -> str:
        lines = [f"{n}\t{self.labels[p]}\t{float(self.probs[i, p]):.3f}"
                 for i, (n, p) in enumerate(zip(self.names[:20], self.predictions[:20]))]
        if len(self.names) > 20:
            lines.append(f"... {len(self.names) - 20} more")
        if self.accuracy is not None:
            lines.append(f"accuracy {self.accuracy:.3%} on {len(self.names)} images ({len(self.labels)} classes)")
        return "\n".join(lines)


def classify_images(build: str | os.PathLike, *, images: str | None = None, root: str | None = None,
                    split: str = "test", device: str = "auto", batch_size: int = 64) -> ClassifyResult:
    """Classify images with a TI/MC-TI build's tokens (Eq. 6) — what `synthaug classify` runs.

    Args:
        build: a build directory (``config.yaml`` + ``tokens/``) made with ``--method ti|mcti`` (DCT tokens work too).
        images: an image folder, or a dataset name (default: the build's dataset, `split`, with accuracy).
        root: the dataset root when `images` is a dataset name.
        split: the dataset split.

    >>> classify_images("out/digits-mcti").accuracy  # doctest: +SKIP
    """
    import yaml
    from PIL import Image

    from .config import from_dict
    from .datasets import get_dataset
    from .models import load_diffusion
    from .tokens import load_tokens

    out = Path(build)
    if not (out / "config.yaml").is_file():
        raise UserError(f"`build` {str(build)!r} has no config.yaml: pass a folder written by `synthaug build`.")
    cfg = from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    classes = json.loads((out / "classes.json").read_text()) if (out / "classes.json").is_file() else []
    files = sorted((out / "tokens").glob("[0-9][0-9][0-9]*.safetensors"))
    if not files:
        raise UserError(f"`build` {str(build)!r} has no learned tokens under tokens/: run `synthaug build` first.")
    tokens: dict[str, torch.Tensor] = {}
    for f in files:
        tokens.update(load_tokens(f))
    by_token = {c.get("token"): c.get("name") for c in classes}
    labels = [by_token.get(t, t) for t in tokens]
    targets = None
    if images is not None and Path(images).is_dir():
        paths = sorted(p for p in Path(images).rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not paths:
            raise UserError(f"`--images` {images!r} holds no .png/.jpg/.webp files: pass an image folder.")
        names, pil = [str(p.relative_to(images)) for p in paths], [Image.open(p).convert("RGB") for p in paths]
    else:
        ds = get_dataset(images or cfg.dataset, root or cfg.root, split)
        pil, ys = zip(*(ds[i] for i in range(len(ds))))
        pil, names = list(pil), [str(s[0]) for s in ds.samples]
        # Columns are the build's tokens; map dataset targets onto them (a build may cover a subset of classes).
        col = {int(token_name_index): j for j, token_name_index in enumerate(
            int(t.strip("<>").rsplit("-", 1)[-1]) for t in tokens)}
        keep = [i for i, y in enumerate(ys) if int(y) in col]
        pil, names, targets = [pil[i] for i in keep], [names[i] for i in keep], [col[int(ys[i])] for i in keep]
    pipe = load_diffusion(cfg.model, device=device, dtype="float32")
    clip = load_clip(cfg.mcti.clip_model, pipe)
    probs = classify(clip, tokens, pil, scale=cfg.mcti.scale, text_encoder=pipe.text_encoder,
                     tokenizer=pipe.tokenizer, batch_size=batch_size)
    return ClassifyResult(names=names, labels=labels, probs=probs.cpu(), targets=targets)
