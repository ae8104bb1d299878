"""Discriminative Class Tokens: pipeline + classifier + class -> one token.

Consumes a `StableDiffusionPipeline`, a frozen classifier (``forward(images in [0, 1]) -> logits``, with `labels`,
`source`, `trained_on`) and a class, and produces a `TokenResult`: the learned embedding ``v_c`` of a new token
``S_c`` plus its training history. Tokens are saved in diffusers' textual-inversion format (``{token: [1, dim]}`` in
safetensors), so stock ``pipe.load_textual_inversion(path)`` loads them.

How a token is learned (`learn_dct_token`): generate a batch of images from "A photo of S_c {label}" with classifier-
free guidance, decode, classify, and minimise the cross-entropy to the class (Eq. 4) with respect to ``v_c`` only.
Differences from the public reference code, on purpose: ``v_c`` is a standalone fp32 parameter spliced into the text
encoder's input embeddings by a hook, so no model weight or other embedding row can change; the pipeline is left
exactly as it was found (its tokenizer and text encoder do not even learn the token — call `add_tokens` to generate
with it); gradients are clipped after backward; the number of gradient-carrying denoising steps is a setting
(``grad_steps``) that works with any diffusers scheduler; prompts are padded as at inference; the decoded image is
clamped straight-through (a hard clamp zeroes the gradient of saturated pixels).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..config import DCTConfig
from ..errors import UserError
from .text import encode, render_prompt, splice_tokens, token_name, tokenize

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

STOP_REASONS = ("all_correct", "patience", "max_steps")


# Expectation over transformations (config.augment > 0). NOTES.md measured ±1 px shifts on 8 px digits (1/8 of the
# side) and Gaussian noise sigma 0.1 as the best single lever with the one-step gradient; the shift scales with size.
AUGMENT_SHIFT = 0.125


AUGMENT_NOISE = 0.1


@dataclass
class TokenResult:
    """A learned class token and how it was learned.

    `history` has one entry per training iteration ``i`` (generate, classify, then maybe update): ``step``,
    ``prompt`` (index into ``config.prompts``), ``loss`` (the optimised objective, Eq. 4), ``accuracy`` and
    ``target_prob`` (mean softmax probability of the class) measured on ``v_c`` *before* update ``i``, then
    ``grad_norm`` (before clipping; None if no update followed), ``lr``, ``updated`` and ``nonfinite`` (the update was
    skipped because the loss or gradient was not finite). `best_step` indexes the entry whose ``v_c`` was kept.
    """

    token: str
    class_index: int
    label: str
    embedding: torch.Tensor  # [1, dim] fp32, CPU
    steps: int  # training iterations run (= len(history))
    stop_reason: str  # "all_correct" | "patience" | "max_steps"
    best_step: int  # the iteration whose v_c is `embedding`
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    unet_evals: int = 0  # UNet forward calls (each on the CFG batch of 2 x batch_size latents)
    metadata: dict = field(default_factory=dict)  # model id, guide source + trained_on, config


# --------------------------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------------------------
def learn_dct_token(
    pipe: StableDiffusionPipeline,
    classifier: torch.nn.Module,
    class_index: int,
    label: str,
    config: DCTConfig = DCTConfig(),  # noqa: B008 (frozen, so a shared default is safe)
    *,
    token: str | None = None,
    progress: bool = False,
    callback: Callable[[dict, torch.Tensor], None] | None = None,
    checkpointing: bool = False,
) -> TokenResult:
    """Learn the discriminative class token ``S_c`` of one class (DCT §3, appendix D).

    The pipeline is left exactly as it was: no weight, embedding row, tokenizer entry or grad/train flag changes.
    To generate with the token afterwards, ``add_tokens(pipe, {result.token: result.embedding})``.

    Args:
        pipe: a Stable Diffusion pipeline (UNet/VAE may be fp16/bf16 on CUDA; ``v_c`` and Adam stay fp32).
        classifier: the guide, ``forward(images [B, 3, H, W] in [0, 1]) -> logits``; it does its own resizing and
            normalisation (ψ_C in Eq. 4). Frozen during training.
        class_index: the target class, an index into the classifier's logits.
        label: the clean class name used in the prompts (``{label}``).
        config: every knob (`synthaug.config.DCTConfig`): steps, batch, lr, grad_steps, guidance, stopping, selection.
            ``grad_steps`` counts UNet calls at the end of the scheduler's own timesteps (2nd-order schedulers make
            two calls per step).
        token: the token string; default `token_name(class_index)`.
        progress: show a tqdm bar over training iterations.
        callback: called after each iteration's measurement as ``callback(history_entry, v_c)`` (``v_c`` a detached
            fp32 CPU copy of the embedding that was measured), before the update.
        checkpointing: recompute the activations of gradient-carrying UNet calls during backward instead of storing
            them (torch.utils.checkpoint) — makes ``grad_steps`` > 1 affordable at ~1 extra UNet pass per step.

    Returns:
        A `TokenResult`. With ``config.select == "min_loss"`` the kept embedding is the measured one with the lowest
        loss; with ``"last"`` the last measured one. Stopping because the whole batch was correct keeps that
        iteration's ``v_c`` in both modes.

    >>> result = learn_dct_token(pipe, guide, 3, "three", DCTConfig(max_steps=30))
    >>> add_tokens(pipe, {result.token: result.embedding})
    """
    started = time.perf_counter()

    # 1. Check inputs (before any model work)
    token = token if token is not None else token_name(class_index)
    _check_inputs(pipe, classifier, class_index, label, config, token)
    device = pipe._execution_device
    do_cfg = config.guidance_scale > 1.0  # diffusers' convention: guidance_scale 1 means no CFG
    text_dtype = pipe.text_encoder.dtype  # the pipeline runs its latents in the prompt embeddings' dtype

    with _frozen(pipe.unet, pipe.vae, pipe.text_encoder, classifier), torch.enable_grad():
        # 2. A tokenizer that knows S_c. A copy: the pipeline's own tokenizer stays as it was.
        tokenizer = pipe.tokenizer
        if token not in tokenizer.get_added_vocab():
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.add_tokens(token)
        token_id = tokenizer.convert_tokens_to_ids(token)

        # 3. v_c: a standalone fp32 parameter, initialised from the embedding of `init_token` ("bird" / "a", §3)
        embeddings = pipe.text_encoder.get_input_embeddings()
        init_id = tokenizer.encode(config.init_token, add_special_tokens=False)[0]
        v_c = torch.nn.Parameter(embeddings.weight[init_id].detach().to(device=device, dtype=torch.float32).clone())
        optimizer = torch.optim.Adam([v_c], lr=config.learning_rate)

        # 4. Encode the prompts: padded to model_max_length exactly as the pipeline does at inference. The
        #    unconditional embedding does not depend on v_c: computed once, without a graph.
        prompts = [render_prompt(p, label, token) for p in config.prompts]
        prompt_inputs = [tokenize(tokenizer, [p], device) for p in prompts]
        for p, inputs in zip(prompts, prompt_inputs):
            if not bool((inputs["input_ids"] == token_id).any()):
                raise UserError(
                    f"`dct.prompts` entry {p!r} is longer than the tokenizer's {tokenizer.model_max_length} tokens and "
                    f"the class token {token!r} was cut off: shorten the prompt or the label."
                )
        uncond = None
        if do_cfg:
            with torch.no_grad():
                uncond = encode(pipe.text_encoder, tokenize(tokenizer, [""], device)).to(text_dtype)
        timestep_cond = None
        if pipe.unet.config.time_cond_proj_dim is not None:  # guidance-distilled UNets (LCM) take w as an input
            w = torch.tensor(config.guidance_scale - 1).repeat(config.batch_size)
            timestep_cond = pipe.get_guidance_scale_embedding(
                w, embedding_dim=pipe.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=text_dtype)
        augment_generator = torch.Generator(device="cpu").manual_seed(_seed("augment", config.seed, class_index, 0))

        def validate(v: torch.Tensor) -> tuple[float, float]:
            """Guide accuracy and mean class probability of `v` on the held-out validation seeds (no gradient)."""
            nonlocal unet_evals
            seeds = [_seed("val", config.seed, class_index, b) for b in range(config.val_batch_size)]
            with torch.no_grad(), splice_tokens(pipe.text_encoder, {token_id: v}):
                text = encode(pipe.text_encoder, prompt_inputs[0]).to(text_dtype)
            images, calls = _sample(pipe, text, uncond, seeds, config, device, text_dtype)
            unet_evals += calls
            with torch.no_grad():
                probs = _classify(classifier, images).softmax(-1)
            return (float((probs.argmax(-1) == class_index).float().mean()), float(probs[:, class_index].mean()))

        # 5. Training loop: one iteration = generate a batch, classify it, maybe stop, else update v_c
        history: list[dict] = []
        best_val: tuple[float, float] | None = None
        best_loss, since_best = math.inf, 0
        kept, kept_step, stop_reason = v_c.detach().clone(), 0, "max_steps"
        unet_evals = 0
        bar = _progress_bar(progress, config.max_steps, label)
        for step in range(config.max_steps):
            optimizer.zero_grad(set_to_none=True)
            prompt_index = step % len(prompts)  # the paper's two prompts, cycled (§3 "Number of prompts")

            # 5.1 Text conditioning with v_c spliced in at S_c's positions (the only tensor that carries gradient).
            #     With the x0 loss, the denoising sees a detached leaf copy of it: every step's loss is back-propagated
            #     into the leaf as soon as it is computed (one step's graph in memory at a time), and the leaf's
            #     gradient goes through the text encoder once, in 5.8.
            with splice_tokens(pipe.text_encoder, {token_id: v_c}):
                text_cond = encode(pipe.text_encoder, prompt_inputs[prompt_index]).to(text_dtype)
            cond_leaf = text_cond.detach().requires_grad_() if config.x0_weight > 0 else None
            cond = (cond_leaf if cond_leaf is not None else text_cond).expand(config.batch_size, -1, -1)
            hidden = torch.cat([uncond.expand(config.batch_size, -1, -1), cond]) if do_cfg else cond

            # 5.2 Seeds and initial noise. Fixed seeds: the same batch every update (NOTES.md: fresh noise diverged).
            seeds = [_seed("train", config.seed, class_index, b + (0 if config.fixed_seeds else step * config.batch_size))
                     for b in range(config.batch_size)]
            generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
            pipe.scheduler.set_timesteps(config.num_inference_steps, device=device)
            timesteps = pipe.scheduler.timesteps
            if step == 0:
                _warn_if_last_step_is_noisy(pipe.scheduler, timesteps)
            # prepare_latents after set_timesteps: init_noise_sigma depends on the schedule (Euler, LMS)
            latents = pipe.prepare_latents(config.batch_size, pipe.unet.config.in_channels, config.height,
                                           config.width, text_dtype, device, generators)
            extra_step_kwargs = pipe.prepare_extra_step_kwargs(generators, 0.0)

            # 5.3 Denoise. Gradient skipping (§3, Fig. 3): all but the last `grad_steps` UNet calls run without a
            #     graph, so memory does not grow with T. Works for any scheduler: the split is over its own timesteps.
            #     With the x0 loss, each earlier step also classifies its own predicted clean image, the gradient
            #     going through that step's UNet call only (its input latents carry none).
            first_grad = len(timesteps) - min(config.grad_steps, len(timesteps))
            x0_losses: list[float] = []
            for i, t in enumerate(timesteps):
                x0_step = config.x0_weight > 0 and i < first_grad
                with torch.set_grad_enabled(i >= first_grad or x0_step):
                    h = hidden if i >= first_grad or x0_step else hidden.detach()
                    model_input = torch.cat([latents] * 2) if do_cfg else latents
                    model_input = pipe.scheduler.scale_model_input(model_input, t)
                    noise_pred = _unet(pipe.unet, model_input, t, h, timestep_cond, checkpointing and i >= first_grad)
                    unet_evals += 1
                    if do_cfg:
                        noise_uncond, noise_text = noise_pred.chunk(2)
                        noise_pred = noise_uncond + config.guidance_scale * (noise_text - noise_uncond)  # Eq. (3)
                    if not x0_step:
                        latents = pipe.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                        continue
                    # The x0 comes from a copy of the scheduler (multistep schedulers keep model outputs as state:
                    # the real one must only ever see detached tensors); the sampling chain is untouched.
                    x0 = getattr(copy.deepcopy(pipe.scheduler).step(noise_pred, t, latents,
                                                                   **_fork_generators(extra_step_kwargs)),
                                 "pred_original_sample", None)
                    if x0 is None:
                        raise UserError(
                            f"`dct.x0_weight` needs a scheduler whose step returns pred_original_sample, and "
                            f"{type(pipe.scheduler).__name__} does not: use --scheduler ddim (or euler), or set "
                            f"dct.x0_weight=0.")
                    latents = pipe.scheduler.step(noise_pred.detach(), t, latents, **extra_step_kwargs,
                                                  return_dict=False)[0]
                    x0_images = _clamp01(_decode(pipe, x0), config.straight_through_clamp)
                    x0_logits = _classify(classifier, x0_images)
                    x0_loss = config.x0_weight / first_grad * F.cross_entropy(x0_logits, _targets(x0_logits, class_index))
                    x0_losses.append(x0_loss.item())
                    if math.isfinite(x0_losses[-1]):
                        x0_loss.backward()  # into cond_leaf only: nothing before this step carries a graph
                    del x0, x0_images, x0_logits, x0_loss

            # 5.4 Decode and map [-1, 1] -> [0, 1], clamped straight-through (a hard clamp kills the gradient of
            #     every saturated pixel; NOTES.md measured whole updates lost to it)
            images = _clamp01(_decode(pipe, latents), config.straight_through_clamp)

            # 5.5 Classify and take the cross-entropy to the target class:
            #     min_{v_c} CE(C(ψ_C(x(p))), 1_c)                                                            Eq. (4)
            #     (ψ_C, the classifier's own resize/normalise, lives in its forward.) With EOT, the mean CE over
            #     `augment` shifted, noised copies of every image.
            logits = _classify(classifier, images)
            if logits.shape[-1] <= class_index:
                raise UserError(
                    f"`class_index` {class_index} is out of range for the guide classifier, which has "
                    f"{logits.shape[-1]} classes: pass an index below {logits.shape[-1]}."
                )
            if config.augment > 0:
                aug_logits = _classify(classifier, _augment(images, config.augment, augment_generator))
                loss = F.cross_entropy(aug_logits, _targets(aug_logits, class_index))
            else:
                loss = F.cross_entropy(logits, _targets(logits, class_index))
            with torch.no_grad():
                probs = logits.detach().float().softmax(-1)
                accuracy = (probs.argmax(-1) == class_index).float().mean().item()
                target_prob = probs[:, class_index].mean().item()
            loss_value = loss.item()

            # 5.6 Book-keeping: the measurement above is of v_c *before* this iteration's update
            entry = {"step": step, "prompt": prompt_index, "loss": loss_value, "accuracy": accuracy,
                     "x0_loss": sum(x0_losses) if x0_losses else None,
                     "target_prob": target_prob, "grad_norm": None, "lr": optimizer.param_groups[0]["lr"],
                     "updated": False, "nonfinite": not math.isfinite(loss_value)}
            history.append(entry)
            if math.isfinite(loss_value) and loss_value < best_loss:
                best_loss, since_best = loss_value, 0
                if config.select == "min_loss":  # the reference code keeps the lowest-loss token (NOTES.md)
                    kept, kept_step = v_c.detach().clone(), step
            else:
                since_best += 1
            # the paper's three stopping rules (appendix D), checked in 5.7
            batch_correct = config.stop_all_correct and accuracy == 1.0
            out_of_patience = (config.patience > 0 and since_best >= config.patience
                               and accuracy >= config.patience_min_accuracy)
            last_step = step == config.max_steps - 1
            if config.select == "val" and math.isfinite(loss_value) and (
                    step % config.val_every == 0 or batch_correct or out_of_patience or last_step):
                val = validate(v_c.detach())
                entry["val_accuracy"], entry["val_prob"] = val
                if best_val is None or val > best_val:
                    best_val, kept, kept_step = val, v_c.detach().clone(), step
            if callback is not None:
                callback(entry, v_c.detach().to("cpu", torch.float32).clone())

            # 5.7 Early stopping, the paper's three rules (appendix D)
            stop = None
            # (with select="val" the held-out seeds must be all correct too: 8 training seeds all right says little
            # about a class at 86%, RESULTS.md "three")
            if batch_correct and entry.get("val_accuracy", 1.0) == 1.0:
                stop = "all_correct"
                if config.select != "val":  # this v_c reached the goal: keep it (val: only if it validates best)
                    kept, kept_step = v_c.detach().clone(), step
            elif out_of_patience:
                stop = "patience"
            elif last_step:
                stop = "max_steps"  # no update after the last measurement: it could never be measured or kept
            if stop is not None:
                stop_reason = stop
                if stop != "all_correct" and config.select == "last":
                    kept, kept_step = v_c.detach().clone(), step
                _bar_update(bar, entry)
                break

            # 5.8 Update v_c: backward, clip the *unscaled* gradient after backward, skip non-finite updates
            if math.isfinite(loss_value):
                loss.backward()
                if cond_leaf is not None:  # the final image's and every step's x0 gradient, through the encoder once
                    text_cond.backward(cond_leaf.grad)
                max_norm = config.grad_clip if config.grad_clip and config.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_([v_c], max_norm).item()
                entry["grad_norm"] = grad_norm
                if math.isfinite(grad_norm):
                    optimizer.step()
                    entry["updated"] = True
                else:
                    entry["nonfinite"] = True
            del loss, logits, images, latents, hidden, cond, text_cond, cond_leaf, noise_pred  # free the graph
            _bar_update(bar, entry)
        if bar is not None:
            bar.close()

    # 6. Result: the kept embedding on the CPU in fp32, and what produced it
    metadata = {
        "model_id": str(getattr(pipe, "synthaug_model_id", None) or pipe.config.get("_name_or_path", "") or "unknown"),
        "guide": str(getattr(classifier, "source", type(classifier).__name__)),
        "guide_trained_on": str(getattr(classifier, "trained_on", "unknown")),
        "scheduler": type(pipe.scheduler).__name__,
        "unet_dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "checkpointing": checkpointing,
        "config": dataclasses.asdict(config),
    }
    return TokenResult(
        token=token, class_index=class_index, label=label,
        embedding=kept.detach().to("cpu", torch.float32).reshape(1, -1).clone(),
        steps=len(history), stop_reason=stop_reason, best_step=kept_step, history=history,
        seconds=time.perf_counter() - started, unet_evals=unet_evals, metadata=metadata,
    )


def _check_inputs(pipe, classifier, class_index: int, label: str, config: DCTConfig, token: str) -> None:
    """Every user-facing rule `learn_dct_token` can check before running a model. Raises `UserError`."""
    if not isinstance(config, DCTConfig):
        raise UserError(f"`config` must be a synthaug.config.DCTConfig but is {type(config).__name__}.")
    if isinstance(class_index, bool) or not isinstance(class_index, int) or class_index < 0:
        raise UserError(f"`class_index` must be a non-negative integer but is {class_index!r}.")
    labels = getattr(classifier, "labels", None)
    if labels is not None and class_index >= len(labels):
        raise UserError(
            f"`class_index` {class_index} is out of range for the guide classifier, which has {len(labels)} classes: "
            f"pass an index below {len(labels)}."
        )
    if not isinstance(label, str) or not label.strip():
        raise UserError(f"`label` must be a non-empty class name but is {label!r}.")
    positive = {"max_steps": config.max_steps, "batch_size": config.batch_size,
                "num_inference_steps": config.num_inference_steps}
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"`dct.{key}` must be > 0 but is {value!r}.")
    if not 1 <= config.grad_steps <= config.num_inference_steps:
        raise UserError(
            f"`dct.grad_steps` must be between 1 and dct.num_inference_steps ({config.num_inference_steps}) but is "
            f"{config.grad_steps}."
        )
    h, w = config.height, config.width
    if h <= 0 or w <= 0 or h % 8 or w % 8:
        raise UserError(f"`dct.height` and `dct.width` have to be positive and divisible by 8 but are {h} and {w}.")
    if config.select not in ("min_loss", "last", "val"):
        raise UserError(f"`dct.select` must be one of min_loss, last, val but is {config.select!r}.")
    if config.select == "val" and (config.val_batch_size <= 0 or config.val_every <= 0):
        raise UserError(f"`dct.val_batch_size` and `dct.val_every` must be > 0 with dct.select=val but are "
                        f"{config.val_batch_size} and {config.val_every}.")
    if config.augment < 0:
        raise UserError(f"`dct.augment` must be >= 0 but is {config.augment!r}.")
    if not (config.x0_weight >= 0 and math.isfinite(config.x0_weight)):
        raise UserError(f"`dct.x0_weight` must be a finite number >= 0 (0 turns the x0 loss off) but is "
                        f"{config.x0_weight!r}.")
    if config.learning_rate <= 0:
        raise UserError(f"`dct.lr` must be > 0 (or null for 0.00025 x batch_size) but is {config.lr!r}.")
    if not config.prompts:
        raise UserError("`dct.prompts` is empty: give at least one template such as 'A photo of {token} {label}'.")
    for p in config.prompts:
        if "{token}" not in p:
            raise UserError(f"`dct.prompts` entry {p!r} has no {{token}} placeholder: add one where S_c goes.")
    tokenizer = pipe.tokenizer
    if not token or token != token.strip():
        raise UserError(f"`token` must be a non-empty string without surrounding spaces but is {token!r}.")
    if token in tokenizer.get_vocab() and token not in tokenizer.get_added_vocab():
        raise UserError(
            f"`token` {token!r} is already a word of the tokenizer's vocabulary: learning it would overwrite that "
            f"word. Use a fresh string such as {token_name(class_index)!r}."
        )
    init_ids = tokenizer.encode(config.init_token, add_special_tokens=False)
    if len(init_ids) != 1:
        raise UserError(
            f"`dct.init_token` {config.init_token!r} is {len(init_ids)} tokens, not one: pick a single-token word "
            f"such as 'bird' (bird classifiers) or 'a' (general ones)."
        )


def _warn_if_last_step_is_noisy(scheduler, timesteps: torch.Tensor) -> None:
    # NOTES.md: with "trailing" spacing the last gradient-carrying step sat at t=99 and the loss diverged; at t~1 it
    # did not. The gradient only sees the final step(s), so they must be nearly clean.
    total = getattr(scheduler.config, "num_train_timesteps", 1000)
    last = float(timesteps[-1])
    if last > 0.05 * total:
        logger.warning(
            "The scheduler's last timestep is %g of %d: DCT's gradient flows through the final denoising step(s) only "
            "and diverged when that step was this noisy. Prefer timestep_spacing='leading' (SD's default).", last, total)


def _unet(unet, model_input, t, hidden, timestep_cond, checkpoint: bool) -> torch.Tensor:
    def run(x, h):
        return unet(x, t, encoder_hidden_states=h, timestep_cond=timestep_cond, return_dict=False)[0]

    if checkpoint:
        import torch.utils.checkpoint

        return torch.utils.checkpoint.checkpoint(run, model_input, hidden, use_reentrant=False)
    return run(model_input, hidden)


def _sample(pipe, text: torch.Tensor, uncond: torch.Tensor | None, seeds: list[int], config: DCTConfig,
            device: torch.device, text_dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Images ``[B, 3, H, W]`` in [0, 1] from text hidden states ``[1, L, D]`` on `seeds`, without gradient: the
    training forward of `learn_dct_token` (same CFG, scheduler, size), for validation. Returns (images, UNet calls)."""
    b = len(seeds)
    do_cfg = uncond is not None
    timestep_cond = None
    if pipe.unet.config.time_cond_proj_dim is not None:
        w = torch.tensor(config.guidance_scale - 1).repeat(b)
        timestep_cond = pipe.get_guidance_scale_embedding(
            w, embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device=device, dtype=text_dtype)
    with torch.no_grad():
        cond = text.expand(b, -1, -1)
        hidden = torch.cat([uncond.expand(b, -1, -1), cond]) if do_cfg else cond
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        pipe.scheduler.set_timesteps(config.num_inference_steps, device=device)
        latents = pipe.prepare_latents(b, pipe.unet.config.in_channels, config.height, config.width, text_dtype,
                                       device, generators)
        extra_step_kwargs = pipe.prepare_extra_step_kwargs(generators, 0.0)
        calls = 0
        for t in pipe.scheduler.timesteps:
            model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if do_cfg else latents, t)
            noise_pred = _unet(pipe.unet, model_input, t, hidden, timestep_cond, False)
            calls += 1
            if do_cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + config.guidance_scale * (noise_text - noise_uncond)
            latents = pipe.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
        return _decode(pipe, latents).clamp(0, 1), calls


def _fork_generators(kwargs: dict) -> dict:
    """`kwargs` with its ``generator`` (one or a list) replaced by copies in the same state: a side computation (the
    x0 loss's scheduler step) then draws no random numbers from the real sampling chain's generators."""
    def fork(g: torch.Generator) -> torch.Generator:
        clone = torch.Generator(device=g.device)
        clone.set_state(g.get_state())
        return clone

    g = kwargs.get("generator")
    if g is None:
        return kwargs
    return {**kwargs, "generator": [fork(x) for x in g] if isinstance(g, list) else fork(g)}


def _decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to fp32 images in [0, 1] (unclamped), as the pipeline's postprocessing maps them."""
    vae_in = (latents / pipe.vae.config.scaling_factor).to(pipe.vae.dtype)
    return pipe.vae.decode(vae_in, return_dict=False)[0].float() / 2 + 0.5


def _clamp01(x: torch.Tensor, straight_through: bool) -> torch.Tensor:
    """Clamp to [0, 1]. Straight-through: the forward value is exactly the clamp, the gradient is the identity."""
    if not straight_through:
        return x.clamp(0, 1)
    return x.clamp(0, 1).detach() + (x - x.detach())


def _augment(images: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
    """`copies` differentiable random views of every image: a shift of up to ±AUGMENT_SHIFT of the side (the border
    pixels, i.e. the background, fill the gap) plus Gaussian noise of std AUGMENT_NOISE. ``[B*copies, C, H, W]``,
    the copies of image b adjacent. Randomness from the CPU `generator`, so it is the same on every device."""
    b, c, h, w = images.shape
    s = max(1, round(AUGMENT_SHIFT * min(h, w)))
    padded = F.pad(images, (s, s, s, s), mode="replicate")
    shifts = torch.randint(-s, s + 1, (b * copies, 2), generator=generator).tolist()
    noise = torch.randn((b * copies, c, h, w), generator=generator).to(images)
    views = [padded[k // copies, :, s + dy : s + dy + h, s + dx : s + dx + w] for k, (dy, dx) in enumerate(shifts)]
    return _clamp01(torch.stack(views) + AUGMENT_NOISE * noise, True)


def _classify(classifier: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """fp32 logits of fp32 images in [0, 1], run on the classifier's own device and dtype."""
    param = next(iter(classifier.parameters()), None)
    if param is not None:
        dtype = param.dtype if param.is_floating_point() else images.dtype
        images = images.to(device=param.device, dtype=dtype)
    return classifier(images).float()


def _targets(logits: torch.Tensor, class_index: int) -> torch.Tensor:
    return torch.full((logits.shape[0],), class_index, dtype=torch.long, device=logits.device)


def _seed(kind: str, seed: int, class_index: int, index: int) -> int:
    """Training seeds, from (config.seed, class): hashed like `generate.image_seed` but in their own namespace."""
    digest = hashlib.sha256(f"synthaug-dct-{kind}:{int(seed)}:{int(class_index)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@contextlib.contextmanager
def _frozen(*modules: torch.nn.Module) -> Iterator[None]:
    """eval() and requires_grad_(False) for the duration; every module's flags are restored afterwards."""
    saved = [(m, m.training, [(p, p.requires_grad) for p in m.parameters()]) for m in modules]
    try:
        for m in modules:
            m.eval().requires_grad_(False)
        yield
    finally:
        for m, training, flags in saved:
            m.train(training)
            for p, flag in flags:
                p.requires_grad_(flag)


def _progress_bar(enabled: bool, total: int, label: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"DCT {label}", unit="step")


def _bar_update(bar, entry: dict) -> None:
    if bar is not None:
        bar.set_postfix(loss=f"{entry['loss']:.3f}", acc=f"{entry['accuracy']:.2f}")
        bar.update(1)
