"""Textual inversion (TI) and Multi-Class Textual Inversion (MC-TI): few-shot images -> one token per class.

MC-TI: learn each class token with plain TI first (the warm-up: ``MCTIConfig.steps``), then keep training it for
``MCTIConfig.extra_steps`` with ``α·L_mse + β·L_reg`` (Eq. 5), where ``L_reg`` (Eq. 3-4) is the cross-entropy of the
token's CLIP text feature against one randomly drawn few-shot image feature per class. Image features are computed
once. Each class token is an independent job.

What we do on purpose:

- the token is a standalone fp32 parameter spliced into the embedding output by a forward hook; the pipeline is left
  exactly as it was found (`synthaug.tokens.add_tokens` puts learned tokens into a pipeline for generation);
- the warm-up schedule is real: TI steps, then joint steps (the public reference code parses a warm-up option and
  never uses it);
- Eq. 3 as printed puts ``s`` outside ``exp`` (where it cancels between numerator and denominator); we implement
  the intended ``softmax(s · cos)``, CLIP's logit scale;
- the pooled text feature is taken at the first end-of-text token ourselves: checkpoints with the legacy
  ``eos_token_id: 2`` in their config (SD 1.x's text encoder among them) pool at the *largest* token id, which is
  the new class token, not the end of the prompt.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MCTIConfig
from ..datasets.fewshot import check_shots
from ..errors import UserError
from ..token_methods import TokenMethod, register_method
from .clip import (
    CLASSIFY_TEMPLATE,
    check_clip_pairing,
    check_clip_path,
    check_paired,
    class_features,
    load_clip,
    text_features,
)
from .io import load_tokens, save_tokens
from .text import (
    encode,
    single_token_id,
    spell_token,
    splice_tokens,
    token_embedding,
    token_name,
    tokenize,
    tokenizer_with,
    vector_names,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

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


METHODS = ("ti", "mcti")


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
        embedding: the learned embedding, ``[num_vectors, dim]`` fp32 on the CPU (``[1, dim]`` by default).
        warmup_embedding: for MC-TI, the token at the end of the TI warm-up (exactly the token ``method="ti"`` with
            the same config learns), as `embedding`; None for TI.
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
    flip_p: float | None = None,
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
        flip_p: random horizontal flip probability; None: ``config.flip_p`` (textual inversion's 0.5; the digits
            world's 0, since digits are not mirror-symmetric).
        templates: TI prompt templates with ``{token}``.
        progress: show a tqdm bar.
        callback: called as ``callback(step, token_vector)`` after each update (tests, monitoring).

    Returns:
        `MCTIResult` with the embedding (and for MC-TI the warm-up embedding), per-step history and metadata.

    >>> res = learn_mcti_token(pipe, clip, {0: imgs0, 1: imgs1}, 0, MCTIConfig(steps=300, extra_steps=100))
    ...  # doctest: +SKIP
    >>> res.save("tokens/000.safetensors")  # doctest: +SKIP
    """
    # 1. Decide every option and check every input before any model work; a tokenizer that knows the token (a copy:
    #    the pipeline's stays as it was)
    config = config or MCTIConfig()
    flip_p = config.flip_p if flip_p is None else flip_p
    classes = _check_inputs(pipe, clip, images_by_class, class_index, config, method, features)
    ti_steps = config.steps
    joint_steps = config.extra_steps if method == "mcti" else 0
    token = token or token_name(class_index)
    n = config.num_vectors
    spelled = spell_token(token, n)  # S_k, or its n vectors as diffusers spells a multi-vector token
    tokenizer = tokenizer_with(pipe.tokenizer, vector_names(token, n))
    init_id = single_token_id(tokenizer, config.init_token, "mcti.init_token")
    if method == "mcti":
        _check_features(features if features is not None else images_by_class, classes)
    device = pipe.unet.device
    resolution = resolution or int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)

    # 2. The token: a standalone fp32 parameter ([dim], or [n, dim]), each vector initialised from `init_token`'s
    #    embedding. AdamW with torch's default weight decay (0.01), as the TI implementations MC-TI builds on use it.
    init = token_embedding(pipe.text_encoder).weight[init_id].detach().float().clone()
    init = init if n == 1 else init.repeat(n, 1)
    vec = torch.nn.Parameter(init.to(device))
    optimizer = torch.optim.AdamW([vec], lr=config.lr)
    scaler = _loss_scaler(pipe)
    rows = _TokenRows(pipe.text_encoder, tokenizer.convert_tokens_to_ids(vector_names(token, n)), vec)

    # 3. Precompute what does not change: VAE posteriors of this class's images (and mirrors), image features. Each
    #    loss draws from its own stream: the regularizer's draws never shift the L_mse draws, so that MC-TI with β=0
    #    is TI, update for update.
    own = list(images_by_class[class_index])
    l_mse = _MseLoss(pipe, tokenizer, rows, own, resolution, flip_p, templates, spelled, config.batch_size,
                     _generator(config.seed, class_index, 0))
    l_reg = None
    if method == "mcti":
        feats = features if features is not None else class_features(clip, images_by_class)
        l_reg = _RegLoss(clip, tokenizer, rows, feats, classes, class_index, spelled, config.scale,
                         _generator(config.seed, class_index, 1))

    # 4. Train: TI warm-up, then the joint loss (Eq. 5)
    history: list[dict[str, Any]] = []
    warmup = init.cpu().clone().view(n, -1) if ti_steps == 0 and method == "mcti" else None
    total = ti_steps + joint_steps
    bar = _progress(total, progress, f"{method} {token}")
    start = time.perf_counter()
    for step in range(total):
        phase = "ti" if step < ti_steps else "mcti"
        optimizer.zero_grad(set_to_none=True)
        loss_mse, loss_reg, loss = _losses(phase, config, l_mse, l_reg)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        history.append({"step": step, "phase": phase,
                        "loss_mse": None if loss_mse is None else loss_mse.item(),
                        "loss_reg": None if loss_reg is None else loss_reg.item(), "loss": float(loss.detach())})
        if method == "mcti" and step + 1 == ti_steps:
            warmup = vec.detach().float().cpu().clone().view(n, -1)
        if callback is not None:
            callback(step, vec.detach())
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", phase=phase)
    bar.close()
    seconds = time.perf_counter() - start
    if not bool(torch.isfinite(vec).all()):
        raise RuntimeError(f"token {token} became non-finite during {method} training (lr {config.lr}); "
                           f"lower `mcti.lr` or use fp32/bf16 weights.")

    # 5. The result (the pipeline is untouched: `add_tokens` puts the token in for generation)
    embedding = vec.detach().float().cpu().clone().view(n, -1)
    last = history[-1] if history else {}
    metadata = {
        "method": method, "token": token, "class_index": class_index, "label": label or "",
        "steps": total, "ti_steps": ti_steps, "mcti_steps": joint_steps, "lr": config.lr,
        "batch_size": config.batch_size, "alpha": config.alpha, "beta": config.beta if method == "mcti" else 0.0,
        "scale": config.scale, "init_token": config.init_token, "seed": config.seed,
        "shots": len(own), "num_classes": len(classes), "resolution": resolution, "flip_p": flip_p,
        "final_loss_mse": last.get("loss_mse"), "final_loss_reg": last.get("loss_reg"),
        "model_id": getattr(pipe, "synthaug_model_id", ""), "clip_id": getattr(clip, "synthaug_id", "") if clip else "",
        **({"num_vectors": n} if n != 1 else {}),  # single-vector tokens' files keep their bytes
    }
    return MCTIResult(token=token, class_index=class_index, label=label, method=method, embedding=embedding,
                      warmup_embedding=warmup if method == "mcti" else None, steps=total, history=history,
                      seconds=seconds, metadata={k: "" if v is None else str(v) for k, v in metadata.items()})


# --------------------------------------------------------------------------------------------------------------------
# The two losses and one update's loss
# --------------------------------------------------------------------------------------------------------------------
class _TokenRows:
    """The token's vectors spliced into the text encoder's embedding output while text is encoded."""

    def __init__(self, text_encoder: torch.nn.Module, ids: list[int], vec: torch.nn.Parameter) -> None:
        self.text_encoder, self.ids, self.vec = text_encoder, ids, vec

    def spliced(self):
        return splice_tokens(self.text_encoder, dict(zip(self.ids, self.vec.view(len(self.ids), -1))))


class _MseLoss:
    """Eq. 1: ``||ε - ε_θ(z_t, t, τ_φ(P))||²`` on VAE latents of random shots, random templates and timesteps.

    The VAE posteriors of the class's images (and of their mirrors when flips are on) are computed once: sampling
    ``mean + std·ε`` per step equals re-encoding.
    """

    def __init__(self, pipe: StableDiffusionPipeline, tokenizer, rows: _TokenRows, images: list[Any], resolution: int,
                 flip_p: float, templates: Sequence[str], spelled: str, batch_size: int,
                 generator: torch.Generator) -> None:
        from diffusers import DDPMScheduler

        self.pipe, self.tokenizer, self.rows, self.templates, self.spelled = pipe, tokenizer, rows, templates, spelled
        self.flip_p, self.batch_size, self.gen, self.shots = flip_p, batch_size, generator, len(images)
        self.device = pipe.unet.device
        pix = _pixels(images, resolution)
        self.mean, self.std = _latent_stats(pipe, pix)
        if flip_p > 0:
            self.mean_f, self.std_f = _latent_stats(pipe, pix.flip(-1))
        vae_cfg = pipe.vae.config
        self.scaling = float(vae_cfg.scaling_factor)
        self.shift = float(getattr(vae_cfg, "shift_factor", None) or 0.0)
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.num_train_t = int(self.scheduler.config.num_train_timesteps)
        self.queue: list[int] = []

    def batch_indices(self, n: int) -> list[int]:
        """Epochs over the few shots in a seeded order, like a shuffling DataLoader over a repeated dataset."""
        while len(self.queue) < n:
            self.queue.extend(torch.randperm(self.shots, generator=self.gen).tolist())
        return [self.queue.pop(0) for _ in range(n)]

    def __call__(self) -> torch.Tensor:
        gen, device, unet, scheduler = self.gen, self.device, self.pipe.unet, self.scheduler
        idx = self.batch_indices(self.batch_size)
        prompts = [self.templates[int(i)].format(token=self.spelled)
                   for i in torch.randint(len(self.templates), (len(idx),), generator=gen)]
        flips = (torch.rand(len(idx), generator=gen) < self.flip_p).tolist() if self.flip_p > 0 else [False] * len(idx)
        mu = torch.stack([(self.mean_f if f else self.mean)[i] for i, f in zip(idx, flips)])
        sd = torch.stack([(self.std_f if f else self.std)[i] for i, f in zip(idx, flips)])
        eps_z = torch.randn(mu.shape, generator=gen).to(device)
        latents = (mu + sd * eps_z - self.shift) * self.scaling
        noise = torch.randn(latents.shape, generator=gen).to(device)
        t = torch.randint(0, self.num_train_t, (len(idx),), generator=gen).to(device)
        noisy = scheduler.add_noise(latents, noise, t)
        with self.rows.spliced():
            cond = encode(self.rows.text_encoder, tokenize(self.tokenizer, prompts, device))
        pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=cond.to(unet.dtype)).sample
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
        return F.mse_loss(pred.float(), target.float())


class _RegLoss:
    """Eq. 3-4: one random few-shot feature per class as temporary prototypes ``f_j``; ``g_k`` from "a photo of a
    S_k"; the cross-entropy of ``softmax_j(s·cos(g_k, f_j))`` to class k. (Eq. 3 prints s outside exp, where it
    cancels; the intended logits are ``s·cos``, CLIP's logit scale.)"""

    def __init__(self, clip: CLIPModel, tokenizer, rows: _TokenRows, features: dict[int, torch.Tensor],
                 classes: list[int], class_index: int, spelled: str, scale: float, generator: torch.Generator) -> None:
        device = rows.vec.device
        self.clip, self.tokenizer, self.rows, self.classes, self.scale, self.gen = (clip, tokenizer, rows, classes,
                                                                                   scale, generator)
        self.feats = {k: features[k].to(device, torch.float32) for k in classes}
        self.target = torch.tensor([classes.index(class_index)], device=device)
        self.enc = tokenize(tokenizer, [CLASSIFY_TEMPLATE.format(token=spelled)], device)

    def __call__(self) -> torch.Tensor:
        feats = self.feats
        protos = torch.stack([feats[k][torch.randint(len(feats[k]), (1,), generator=self.gen).item()]
                              for k in self.classes])
        with self.rows.spliced():
            g = text_features(self.clip, self.rows.text_encoder, self.tokenizer, self.enc)
        return F.cross_entropy(self.scale * g @ protos.T, self.target)


def _losses(phase: str, config: MCTIConfig, l_mse: _MseLoss, l_reg: _RegLoss | None
            ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """One update's ``(L_mse, L_reg, loss)``: ``L_mse`` in the TI phase, ``α·L_mse + β·L_reg`` (Eq. 5) in the joint
    one; a loss whose weight is 0 is not computed (``L_mse``) or kept out of the graph (``L_reg``, still logged), so
    that β=0 reproduces TI bit for bit."""
    if phase == "ti":
        loss_mse = l_mse()
        return loss_mse, None, loss_mse
    loss_mse = l_mse() if config.alpha != 0 else None
    if config.beta != 0:
        loss_reg = l_reg()
    else:
        with torch.no_grad():
            loss_reg = l_reg()
    loss = config.alpha * loss_mse if loss_mse is not None else 0.0
    if config.beta != 0:
        loss = loss + config.beta * loss_reg
    return loss_mse, loss_reg, loss


def _loss_scaler(pipe: StableDiffusionPipeline) -> torch.amp.GradScaler:
    # fp16 weights need loss scaling for the token's gradient to survive; bf16 and fp32 do not.
    device = pipe.unet.device
    use_scaler = device.type == "cuda" and torch.float16 in (pipe.unet.dtype, pipe.text_encoder.dtype)
    return torch.amp.GradScaler(device.type, enabled=use_scaler)


# --------------------------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------------------------
def _check_inputs(pipe: StableDiffusionPipeline, clip: CLIPModel | None, images_by_class: dict[int, Sequence[Any]],
                  class_index: int, config: MCTIConfig, method: str,
                  features: dict[int, torch.Tensor] | None) -> list[int]:
    """Every check that needs no model work; returns the K classes of the regularizer: those of `features` when
    given (a distributed job then needs only its own class's images), else those of `images_by_class`."""
    if method not in METHODS:
        raise UserError(f"`method` must be one of {', '.join(METHODS)} but is {method!r}.")
    if class_index not in images_by_class or len(images_by_class[class_index]) == 0:
        raise UserError(f"`class_index` {class_index} has no few-shot images in `images_by_class` (classes "
                        f"{sorted(images_by_class)[:10]}...): pass at least one image for it.")
    _check_config(config, method)
    if config.steps + (config.extra_steps if method == "mcti" else 0) == 0:
        raise UserError(f"`mcti.steps` ({config.steps}) + `mcti.extra_steps` ({config.extra_steps}) is 0 for method "
                        f"{method!r}: nothing would be learned; set `mcti.steps` > 0.")
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
    return classes


def _check_features(features_or_images: dict[int, Sequence[Any]], classes: list[int]) -> None:
    """Every class of the regularizer needs at least one feature (one image when features are computed here)."""
    empty = [k for k in classes if len(features_or_images[k]) == 0]
    if empty:
        raise UserError(f"`features` of classes {empty[:10]} are empty: every class needs at least one image.")


def _check_config(config: MCTIConfig, method: str) -> None:
    """The MC-TI rules `synthaug.config.validate` does not check (it runs without knowing the method's needs)."""
    if not config.lr > 0 or not math.isfinite(config.lr):
        raise UserError(f"`mcti.lr` must be a positive number but is {config.lr!r}: the paper uses 5e-4.")
    if config.batch_size <= 0:
        raise UserError(f"`mcti.batch_size` must be > 0 but is {config.batch_size!r}.")
    if isinstance(config.num_vectors, bool) or not isinstance(config.num_vectors, int) or config.num_vectors < 1:
        raise UserError(f"`mcti.num_vectors` must be an integer >= 1 but is {config.num_vectors!r}.")
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
# The methods, registered: what a build's worker and `synthaug learn` call
# --------------------------------------------------------------------------------------------------------------------
@register_method
class TI(TokenMethod):
    """Textual inversion: each learned class's token from its own k real images (``mcti.*``: the warm-up alone)."""

    name = "ti"
    shots = "selected"

    def check(self, config, *, dataset, class_names, selected) -> None:
        need = range(len(class_names)) if self.shots == "all" else selected
        check_shots(dataset, config.shots, need, class_names, config.split, f"method {self.name!r} learns from")
        _check_config(config.mcti, self.name)

    def learn(self, config, models, job, progress) -> MCTIResult:
        return learn_mcti_token(models["pipe"], models.get("clip"), models["shots"], job.class_index, config.mcti,
                                method=self.name, token=job.token, label=job.name, features=models.get("features"))

    def save(self, result, path) -> None:
        result.save(path)

    def load(self, path) -> dict:
        return load_tokens(path)


@register_method
class MCTI(TI):
    """MC-TI: the TI warm-up, then joint steps with the CLIP regularizer that discriminates every class from the
    others: it reads every class's k real images and the CLIP paired with the model's text encoder."""

    name = "mcti"
    shots = "all"

    def check(self, config, *, dataset, class_names, selected) -> None:
        super().check(config, dataset=dataset, class_names=class_names, selected=selected)
        if len(class_names) < 2:
            raise UserError("`method` 'mcti' needs at least 2 classes (its regularizer discriminates between them): "
                            "use method 'ti'.")
        check_clip_pairing(config.model, config.mcti.clip_model)
        check_clip_path(config.mcti.clip_model)

    def prepare(self, config, models) -> dict:
        clip = load_clip(config.mcti.clip_model, models["pipe"])
        return {"clip": clip, "features": class_features(clip, models["shots"])}
