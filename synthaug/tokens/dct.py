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
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..config import DCTConfig, check_dct_levers
from ..errors import UserError
from ..target import CLASS, GuideTarget, check_label_free, parse_guide_target
from .augment import augment_draws, augment_views, clamp01
from .progress import bar_update, progress_bar
from .text import encode, render_prompt, spell_token, splice_tokens, token_name, tokenize, tokenizer_with, vector_names
from .x0 import predicted_x0, scheduler_predicts_x0, x0_from_alphas_works

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

STOP_REASONS = ("all_correct", "patience", "max_steps")


@dataclass
class TokenResult:
    """A learned class token and how it was learned.

    `history` has one entry per training iteration ``i`` (generate, classify, then maybe update; batch element
    b always uses ``config.prompts[b % len(prompts)]``): ``step``, ``loss`` (the optimised objective, Eq. 4),
    ``accuracy`` and ``target_prob`` (mean softmax probability of the class; for an attribute target the fraction
    and mean sigmoid probability of the wanted value) measured on ``v_c`` *before* update ``i``, then
    ``grad_norm`` (before clipping; None if no update followed), ``lr``, ``updated`` and ``nonfinite`` (the update was
    skipped because the loss or gradient was not finite), with fp16 models ``loss_scale``; with ``select="val"``
    ``val_accuracy`` and ``val_prob`` where validated. `best_step` indexes the entry whose ``v_c`` was kept.
    """

    token: str
    class_index: int
    label: str
    embedding: torch.Tensor  # [num_vectors, dim] fp32, CPU (diffusers multi-vector TI layout; [1, dim] by default)
    steps: int  # training iterations run (= len(history)): measurements, one more than `updates` when the last one
    # stopped the loop
    stop_reason: str  # "all_correct" | "patience" | "max_steps"
    best_step: int  # the iteration whose v_c is `embedding`
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    unet_evals: int = 0  # UNet forward calls (each on the CFG batch of 2 x batch_size latents)
    updates: int = 0  # optimizer updates of v_c made (history entries with "updated"; non-finite ones skipped)
    metadata: dict = field(default_factory=dict)  # model id, guide source + trained_on, config; "target" (attributes)


# --------------------------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------------------------
def learn_dct_token(
    pipe: StableDiffusionPipeline,
    classifier: torch.nn.Module,
    class_index: int | None = None,
    label: str | None = None,
    config: DCTConfig = DCTConfig(),  # noqa: B008 (frozen, so a shared default is safe)
    *,
    token: str | None = None,
    progress: bool | Callable[[dict], None] = False,
    callback: Callable[[dict, torch.Tensor], None] | None = None,
    checkpointing: bool | None = None,
    val_prompt: str | None = None,
    target: str | GuideTarget | None = None,
) -> TokenResult:
    """Learn the discriminative class token ``S_c`` of one class (DCT §3, appendix D), or an attribute token.

    The pipeline is left exactly as it was: no weight, embedding row, tokenizer entry or grad/train flag changes.
    To generate with the token afterwards, ``add_tokens(pipe, {result.token: result.embedding})``.

    Args:
        pipe: a Stable Diffusion pipeline (UNet/VAE may be fp16/bf16 on CUDA; ``v_c`` and Adam stay fp32).
        classifier: the guide, ``forward(images [B, 3, H, W] in [0, 1]) -> logits``; it does its own resizing and
            normalisation (ψ_C in Eq. 4). Frozen during training.
        class_index: the target class, an index into the classifier's logits (attribute targets: omit it; the
            attribute's output index is looked up by name and used in its place, e.g. for the training seeds).
        label: the clean class name used in the prompts (``{label}``); attribute tokens have none, so their
            prompts (``config.prompts``, `val_prompt`) must not ask for one: ``"A photo of {token}"``.
        config: every knob (`synthaug.config.DCTConfig`): steps, batch, lr, grad_steps, guidance, stopping, selection.
            ``grad_steps`` counts UNet calls at the end of the scheduler's own timesteps (2nd-order schedulers make
            two calls per step).
        token: the token string; default `token_name(class_index)`.
        progress: True: a tqdm bar over training iterations, its postfix the loss, the batch accuracy and the stop
            rules' state (`Keeper.state`); a callable: called instead after every iteration with `StepProgress`'s
            dict (class index, label, step, total, loss, accuracy, val_accuracy, state).
        callback: called after each iteration's measurement as ``callback(history_entry, v_c)`` (``v_c`` a detached
            fp32 CPU copy of the embedding that was measured: ``[dim]``, or ``[num_vectors, dim]``), before the update.
        checkpointing: overrides ``config.checkpointing`` (None: the config's): recompute activations during
            backward instead of storing them — see `DCTConfig.checkpointing`.
        val_prompt: the template ``select="val"`` generates with: the prompt the token will be used with (builds and
            ``synthaug learn`` pass ``generate.prompt``); None: ``config.prompts[0]``.
        target: what the guide is steered towards (`synthaug.target`): None or ``"class"`` (cross-entropy to
            `class_index`, argmax correct), or ``"attribute:NAME[=0|1]"`` for a multi-label guide (binary
            cross-entropy of output NAME, looked up in ``classifier.labels``, towards 1 or 0; an image is correct when
            the sigmoid probability of that value is > 0.5, for stopping, validation and selection alike). The
            default token is then ``"<synthaug-NAME-1>"`` and the result's metadata records ``"target"``.

    Returns:
        A `TokenResult`. With ``config.select == "min_loss"`` the kept embedding is the measured one with the lowest
        loss; with ``"last"`` the last measured one. Stopping because the whole batch was correct keeps that
        iteration's ``v_c`` in both modes.

    >>> result = learn_dct_token(pipe, guide, 3, "three", DCTConfig(max_steps=30))
    >>> add_tokens(pipe, {result.token: result.embedding})
    >>> attr = learn_dct_token(pipe, attr_guide, config=DCTConfig(prompts=("A photo of {token}",)),
    ...                        val_prompt="A photo of {token}", target="attribute:closed_loop=1")
    """
    started = time.perf_counter()
    # 1. Check every input before any model work; a tokenizer that knows S_c (a copy: the pipeline's stays as it was)
    plan = plan_token(pipe, classifier, class_index, label, config, token=token, checkpointing=checkpointing,
                      val_prompt=val_prompt, target=target)
    run, label, class_index = plan.run, plan.label, plan.run.class_index

    with frozen(pipe.unet, pipe.vae, pipe.text_encoder, classifier), block_checkpointing(run), torch.enable_grad():
        # 2-3. v_c, its optimizer, the tokenized prompts (`start_token`)
        v_c, optimizer, prompt_inputs, val_inputs, augment_generator = start_token(plan)

        # 4. Training loop: one iteration = generate a batch, classify it, maybe stop, else update v_c
        keeper, history, unet_evals = Keeper(config, v_c), [], 0
        bar = progress_bar(progress, config.max_steps, label, class_index)
        for step in range(config.max_steps + config.extend_steps):
            optimizer.zero_grad(set_to_none=True)
            if config.lr_schedule != "constant":
                optimizer.param_groups[0]["lr"] = scheduled_lr(config, step)

            # 4.1 C = τ(P) with v_c at S_c's positions, the only tensor that carries gradient. With the x0 loss or
            #     micro-batches the denoising sees a detached leaf copy: every partial loss goes into the leaf at once
            #     (one graph in memory at a time), and the leaf's gradient goes through the text encoder once, in 4.7.
            text = encode_with(run, v_c, prompt_inputs)  # [len(prompts), L, D]
            seeds = train_seeds(config, class_index, step)
            chunks = chunk_bounds(len(seeds), config.micro_batch)
            leaf = text.detach().requires_grad_() if config.x0_weight > 0 or len(chunks) > 1 else None
            draws = augment_draws((len(seeds), pipe.vae.config.out_channels, config.height, config.width),
                                  config.augment, augment_generator) if config.augment > 0 else None

            # 4.2-4.4 Per micro-batch (the whole batch unless dct.micro_batch is set): z_T on fixed seeds -> z_0 with
            #     CFG and gradient skipping -> x = D(z_0) -> min_{v_c} CE(C(ψ_C(x(p))), 1_c)                Eq. (4)
            #     With several micro-batches each one's share of the loss is back-propagated at once: the sum of
            #     the shares' gradients is the whole batch's gradient.
            x0_values: list[float] = []
            loss, loss_value, logit_parts = None, 0.0, []
            for lo, hi in chunks:
                part, part_logits, calls = _forward(run, leaf if leaf is not None else text, seeds, lo, hi, draws,
                                                    x0_values, warn=step == 0 and lo == 0)
                unet_evals += calls
                loss_value += part.item()
                logit_parts.append(part_logits.detach())
                if len(chunks) == 1:
                    loss = part  # back-propagated in 4.7, only if the loop goes on
                elif math.isfinite(loss_value):
                    run.scaler.scale(part).backward()
                del part, part_logits
            target_prob, correct = guide_scores(run, torch.cat(logit_parts))

            # 4.5 Record the measurement of v_c *before* this iteration's update
            entry = history_entry(step, loss_value, correct, target_prob, x0_values, optimizer.param_groups[0]["lr"])
            history.append(entry)

            # 4.6 Keep the best v_c so far (config.select) and stop by the paper's three rules (appendix D)
            stop, calls = keep_or_stop(run, keeper, entry, v_c, val_inputs, callback)
            unet_evals += calls
            if stop:
                bar_update(bar, entry, keeper)
                break

            # 4.7 Update v_c: backward, clip the *unscaled* gradient after backward, skip non-finite updates
            if math.isfinite(loss_value):
                entry.update(update_token(run, optimizer, v_c, loss, text, leaf))
            del loss, text, leaf  # free the graph
            bar_update(bar, entry, keeper)
        if bar is not None:
            bar.close()

    # 5. Result: the kept embedding on the CPU in fp32, and what produced it
    return token_result(plan, keeper, history, started, unet_evals)


@dataclass
class TokenPlan:
    """One token's checked inputs (`plan_token`): its run, token and label, and the tokenizer that knows the token."""

    run: TokenRun
    token: str
    label: str
    tokenizer: Any
    spelled: str  # the token as prompts spell it: "S_c", or multi-vector "S_c S_c_1 ..." (diffusers' spelling)
    val_prompt: str


def plan_token(pipe: StableDiffusionPipeline, classifier: torch.nn.Module, class_index: int | None, label: str | None,
               config: DCTConfig, *, token: str | None, checkpointing: bool | None, val_prompt: str | None,
               target: str | GuideTarget | None) -> TokenPlan:
    """Step 1 of `learn_dct_token` (same arguments): every input checked before any model work. Raises `UserError`."""
    target, class_index, label = resolve_target(classifier, target, class_index, label)
    token = token if token is not None else token_name(class_index) if target.is_class else target.token
    val_prompt = val_prompt if val_prompt is not None else config.prompts[0] if config.prompts else ""
    tokenizer = check_inputs(pipe, classifier, class_index, label, config, token, val_prompt, target)
    spelled = spell_token(token, config.num_vectors)
    run = TokenRun(pipe, classifier, config, class_index, tokenizer.convert_tokens_to_ids(spelled.split()),
                   pipe._execution_device, pipe.text_encoder.dtype,  # the pipeline's latents are in the prompts' dtype
                   config.checkpointing if checkpointing is None else checkpointing, loss_scaler(pipe), target=target)
    return TokenPlan(run, token, label, tokenizer, spelled, val_prompt)


def start_token(plan: TokenPlan) -> tuple[torch.nn.Parameter, torch.optim.Adam, dict, dict | None, torch.Generator]:
    """Steps 2-3 of `learn_dct_token`, with the models frozen: ``(v_c, its Adam, the training prompts' inputs, the
    validation prompt's (select="val"), the augmentation generator)``; sets ``plan.run.uncond`` (CFG)."""
    run, tokenizer, spelled, label = plan.run, plan.tokenizer, plan.spelled, plan.label
    pipe, config = run.pipe, run.config
    # 2. v_c: a standalone fp32 parameter, initialised from the embedding of `init_token` ("bird" / "a", §3);
    #    [dim], or [num_vectors, dim] with every vector so initialised
    init_id = tokenizer.encode(config.init_token, add_special_tokens=False)[0]
    init = pipe.text_encoder.get_input_embeddings().weight[init_id].detach().to(run.device, torch.float32)
    v_c = torch.nn.Parameter(init.clone() if config.num_vectors == 1 else init.repeat(config.num_vectors, 1))
    optimizer = torch.optim.Adam([v_c], lr=config.learning_rate)

    # 3. Prompts, padded to model_max_length as at inference: batch element b gets prompts[b % len(prompts)], so
    #    every update's loss is measured on the same prompt mix (and losses compare across updates). Validation
    #    uses the generation prompt. The unconditional embedding does not depend on v_c: once, without a graph.
    prompt_inputs = tokenize(tokenizer, [render_prompt(p, label, spelled) for p in config.prompts], run.device)
    val_inputs = (tokenize(tokenizer, [render_prompt(plan.val_prompt, label, spelled)], run.device)
                  if config.select == "val" else None)
    if run.do_cfg:
        with torch.no_grad():
            run.uncond = encode(pipe.text_encoder, tokenize(tokenizer, [""], run.device)).to(run.dtype)
    augment_generator = torch.Generator(device="cpu").manual_seed(dct_seed("augment", config.seed, run.class_index, 0))
    return v_c, optimizer, prompt_inputs, val_inputs, augment_generator


def token_result(plan: TokenPlan, keeper: Keeper, history: list[dict], started: float, unet_evals: int) -> TokenResult:
    """Step 5 of `learn_dct_token`: the `TokenResult` of a finished training (`started`: its `time.perf_counter`)."""
    run = plan.run
    pipe, classifier, config = run.pipe, run.classifier, run.config
    metadata = {
        "model_id": str(getattr(pipe, "synthaug_model_id", None) or pipe.config.get("_name_or_path", "") or "unknown"),
        "guide": str(getattr(classifier, "source", type(classifier).__name__)),
        "guide_trained_on": str(getattr(classifier, "trained_on", "unknown")),
        "scheduler": type(pipe.scheduler).__name__,
        "unet_dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "checkpointing": run.checkpointing,
        "config": {k: v for k, v in dataclasses.asdict(config).items()  # single-vector tokens' files keep their bytes
                   if k not in UNRECORDED_KEYS and (k != "num_vectors" or config.num_vectors != 1)},
    }
    if not run.target.is_class:  # class tokens' metadata (and so their files' bytes) stay as they were
        metadata["target"] = str(run.target)
    return TokenResult(
        token=plan.token, class_index=run.class_index, label=plan.label,
        embedding=keeper.kept.detach().to("cpu", torch.float32).reshape(config.num_vectors, -1).clone(),
        steps=len(history), stop_reason=keeper.stop_reason, best_step=keeper.kept_step, history=history,
        seconds=time.perf_counter() - started, unet_evals=unet_evals, metadata=metadata,
        updates=sum(bool(e.get("updated")) for e in history),
    )


# --------------------------------------------------------------------------------------------------------------------
# The levers, one helper each
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class TokenRun:
    """What every step of one token's training shares: the models, the config, the target, where tensors live."""

    pipe: StableDiffusionPipeline
    classifier: torch.nn.Module
    config: DCTConfig
    class_index: int
    token_ids: list[int]  # S_c's vectors' ids (one but for multi-vector tokens)
    device: torch.device
    dtype: torch.dtype  # of the text embeddings; the pipeline runs its latents in it
    checkpointing: bool
    scaler: torch.amp.GradScaler  # loss scaling for fp16 models; a no-op for every other dtype
    uncond: torch.Tensor | None = None  # [1, L, D] embedding of "" (CFG only), no graph
    target: GuideTarget = CLASS  # the class (class_index), or the attribute whose output is class_index

    @property
    def do_cfg(self) -> bool:
        return self.config.guidance_scale > 1.0  # diffusers' convention: guidance_scale 1 means no CFG


class Keeper:
    """Which measured ``v_c`` to keep (``config.select``) and when to stop (the paper's three rules, appendix D).

    Rule 1: the whole batch is classified right (with ``select="val"``: the held-out seeds too, since a few training
    seeds all right says little). Rule 2: no loss improvement for ``patience`` updates while at least
    ``patience_min_accuracy`` of the batch is right (``patience_metric="val"``: no better validation score for
    ``patience`` updates, checked where validated). Rule 3: ``max_steps``, or with ``extend_steps`` the first
    validation at or past it whose kept token is ``extend_window`` or more updates old (at the latest
    ``max_steps + extend_steps``). ``min_loss`` keeps the lowest-loss ``v_c`` (the reference code), ``last`` the last
    measured one, ``val`` the one the guide scores best on the held-out seeds (accuracy, then mean probability; the
    initial ``v_c`` competes too); a ``v_c`` that stops by rule 1 is kept unless ``val`` found a better one.
    """

    def __init__(self, config: DCTConfig, v_c: torch.Tensor):
        self.config = config
        self.kept, self.kept_step, self.stop_reason = v_c.detach().clone(), 0, "max_steps"
        self.best_loss, self.since_best = math.inf, 0
        self.best_val: tuple[float, float] | None = None
        self.batch_correct = self.out_of_patience = self.last_step = self.at_cap = self.validated_now = False
        self.step, self.stopped = 0, None  # the latest measured iteration, the rule that stopped after it (or None)

    def _keep(self, v_c: torch.Tensor, step: int) -> None:
        self.kept, self.kept_step = v_c.detach().clone(), step

    def measured(self, step: int, loss: float, accuracy: float, v_c: torch.Tensor) -> bool:
        """Take iteration `step`'s loss and batch accuracy; True when ``v_c`` is to be validated now."""
        c = self.config
        self.step, self.stopped = step, None
        if math.isfinite(loss) and loss < self.best_loss:
            self.best_loss, self.since_best = loss, 0
            if c.select == "min_loss":
                self._keep(v_c, step)
        else:
            self.since_best += 1
        self.batch_correct = c.stop_all_correct and accuracy == 1.0
        self.out_of_patience = (c.patience_metric == "loss" and c.patience > 0 and self.since_best >= c.patience
                                and accuracy >= c.patience_min_accuracy)
        self.last_step = step == c.max_steps + c.extend_steps - 1
        self.at_cap, self.validated_now = step == c.max_steps - 1, False
        return c.select == "val" and math.isfinite(loss) and (
            step % c.val_every == 0 or self.batch_correct or self.out_of_patience or self.last_step or self.at_cap)

    def validated(self, step: int, val: tuple[float, float], v_c: torch.Tensor) -> None:
        if self.best_val is None or val > self.best_val:
            self.best_val = val
            self._keep(v_c, step)
        c, self.validated_now = self.config, True
        if c.patience_metric == "val" and c.patience > 0 and step - self.kept_step >= c.patience:
            self.out_of_patience = True

    def stop(self, step: int, v_c: torch.Tensor, val_accuracy: float = 1.0) -> str | None:
        """The stop reason after iteration `step`, or None to update and go on."""
        if self.batch_correct and val_accuracy == 1.0:
            stop = "all_correct"
            if self.config.select != "val":  # this v_c reached the goal: keep it (val: only if it validates best)
                self._keep(v_c, step)
        elif self.out_of_patience:
            stop = "patience"
        elif self.last_step or (step >= self.config.max_steps - 1 and self.validated_now
                                and step - self.kept_step >= self.config.extend_window):
            stop = "max_steps"  # no update after the last measurement: it could never be measured or kept
        else:
            return None
        self.stop_reason = self.stopped = stop
        if stop != "all_correct" and self.config.select == "last":
            self._keep(v_c, step)
        return stop

    def state(self) -> str:
        """The stop rules' state after the latest iteration, for progress displays: the rule that stopped it, else how
        near the patience rule is (``patience 3/20``), the best validation so far and the step of the kept token."""
        c = self.config
        if self.stopped is not None:
            return f"stopped: {self.stopped}"
        parts = []
        if c.patience > 0:
            waited = self.since_best if c.patience_metric == "loss" else self.step - self.kept_step
            parts.append(f"patience {waited}/{c.patience}")
        if self.best_val is not None:
            parts.append(f"best val {self.best_val[0]:.2f}")
        if c.select != "last":
            parts.append(f"kept step {self.kept_step}")
        return ", ".join(parts)


def history_entry(step: int, loss_value: float, correct: torch.Tensor, target_prob: torch.Tensor,
                  x0_values: list[float], lr: float) -> dict:
    """Step 4.5 of `learn_dct_token`: the history entry of iteration `step`'s measurement, before its update."""
    return {"step": step, "loss": loss_value, "accuracy": correct.float().mean().item(),
            "x0_loss": sum(x0_values) if x0_values else None, "target_prob": target_prob.mean().item(),
            "grad_norm": None, "lr": lr, "updated": False, "nonfinite": not math.isfinite(loss_value)}


def keep_or_stop(run: TokenRun, keeper: Keeper, entry: dict, v_c: torch.Tensor, val_inputs: dict | None,
                 callback: Callable[[dict, torch.Tensor], None] | None) -> tuple[bool, int]:
    """Step 4.6 of `learn_dct_token`: give the keeper the measurement in `entry` (validating ``v_c`` when due, into
    `entry`), call `callback`, decide. Returns (stop now, the validation's UNet calls)."""
    step, calls = entry["step"], 0
    if keeper.measured(step, entry["loss"], entry["accuracy"], v_c):
        val, calls = validate_token(run, v_c.detach(), val_inputs)
        entry["val_accuracy"], entry["val_prob"] = val
        keeper.validated(step, val, v_c)
    if callback is not None:
        callback(entry, v_c.detach().to("cpu", torch.float32).clone())
    return keeper.stop(step, v_c, entry.get("val_accuracy", 1.0)) is not None, calls


def scheduled_lr(config: DCTConfig, step: int) -> float:
    """``lr_schedule="cosine"``: the learning rate of update `step`, from ``lr`` at update 0 down half a cosine to
    ``lr_floor x lr`` at update ``max_steps - 1``, and that floor for any update after it."""
    progress = min(step / max(config.max_steps - 1, 1), 1.0)
    return config.learning_rate * (config.lr_floor + (1 - config.lr_floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def encode_with(run: TokenRun, v: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """C = τ(P): the prompt's hidden states ``[1, L, D]`` with `v` at S_c's positions, in the pipeline's dtype."""
    with splice_tokens(run.pipe.text_encoder, dict(zip(run.token_ids, v.reshape(len(run.token_ids), -1)))):
        return encode(run.pipe.text_encoder, inputs).to(run.dtype)


def initial_latents(run: TokenRun, seeds: list[int]) -> tuple[torch.Tensor, dict]:
    """z_T of every seed (a CPU generator each, so every device draws the same noise) and the scheduler's step
    kwargs; sets the scheduler's timesteps first (``init_noise_sigma`` depends on them: Euler, LMS)."""
    pipe, c = run.pipe, run.config
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    pipe.scheduler.set_timesteps(c.num_inference_steps, device=run.device)
    latents = pipe.prepare_latents(len(seeds), pipe.unet.config.in_channels, c.height, c.width, run.dtype, run.device,
                                   generators)
    return latents, pipe.prepare_extra_step_kwargs(generators, 0.0)


def _timestep_cond(run: TokenRun, batch: int) -> torch.Tensor | None:
    """Guidance-distilled UNets (LCM) take w as an input; None for every other UNet."""
    dim = run.pipe.unet.config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.tensor(run.config.guidance_scale - 1).repeat(batch)
    return run.pipe.get_guidance_scale_embedding(w, embedding_dim=dim).to(device=run.device, dtype=run.dtype)


def denoise(run: TokenRun, latents: torch.Tensor, text: torch.Tensor, step_kwargs: dict, *, grad_steps: int,
             x0_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
             ) -> tuple[torch.Tensor, int]:
    """z_T -> z_0 over the scheduler's timesteps, with classifier-free guidance (Eq. 3) when ``guidance_scale > 1``.

    `text` ``[1, L, D]`` conditions every latent, or ``[B, L, D]`` latent b. Only the last `grad_steps` UNet calls build a graph (0: none, for
    validation), so memory does not grow with T; any scheduler works, the split is over its own timesteps. With
    `x0_hook`, every earlier call builds a graph too, and ``x0_hook(noise_pred, t, latents)`` back-propagates its loss
    at once; the sampling chain continues from the detached prediction. Returns (z_0, UNet calls).
    """
    pipe, b = run.pipe, latents.shape[0]
    cond = text if text.shape[0] == b else text.expand(b, -1, -1)
    hidden = torch.cat([run.uncond.expand(b, -1, -1), cond]) if run.do_cfg else cond
    timestep_cond = _timestep_cond(run, b)
    timesteps = pipe.scheduler.timesteps
    first_grad = len(timesteps) - min(grad_steps, len(timesteps))
    for i, t in enumerate(timesteps):
        x0_step = x0_hook is not None and i < first_grad
        with torch.set_grad_enabled(i >= first_grad or x0_step):
            h = hidden if i >= first_grad or x0_step else hidden.detach()
            model_input = pipe.scheduler.scale_model_input(torch.cat([latents] * 2) if run.do_cfg else latents, t)
            noise_pred = _unet(pipe.unet, model_input, t, h, timestep_cond,
                               run.checkpointing and (i >= first_grad or x0_step))
            if run.do_cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + run.config.guidance_scale * (noise_text - noise_uncond)  # Eq. (3)
            if x0_step:
                x0_hook(noise_pred, t, latents)
                noise_pred = noise_pred.detach()
            latents = pipe.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
    return latents, len(timesteps)


def _forward(run: TokenRun, text: torch.Tensor, seeds: list[int], lo: int, hi: int,
             draws: tuple[list[list[int]], torch.Tensor] | None, x0_values: list[float], warn: bool = False,
             ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Steps 4.2-4.4 for the micro-batch ``seeds[lo:hi]``: its share ``(hi - lo) / len(seeds)`` of the batch's loss
    (Eq. 4, straight-through clamped images), the guide's logits, and the UNet calls made."""
    c, pipe = run.config, run.pipe
    share = (hi - lo) / len(seeds)
    # z_T ~ N(0, I) on fixed seeds: the same batch every update (fresh noise diverged)
    latents, step_kwargs = initial_latents(run, seeds[lo:hi])
    if warn and c.x0_weight == 0:
        warn_if_last_step_is_noisy(pipe.scheduler, pipe.scheduler.timesteps)
    # z_T -> z_0 with CFG (Eq. 3). Gradient skipping (§3, Fig. 3): only the last `grad_steps` UNet calls carry
    # gradient. With the x0 loss, every earlier step also classifies its predicted clean image.
    x0_hook = _x0_hook(run, step_kwargs, x0_values, share) if c.x0_weight > 0 else None
    if text.shape[0] > 1:  # element b: prompt b % len(prompts); slices, whose graph the x0 steps can each reuse
        text = torch.cat([text[b % len(text) : b % len(text) + 1] for b in range(lo, hi)])
    latents, calls = denoise(run, latents, text, step_kwargs, grad_steps=c.grad_steps, x0_hook=x0_hook)
    images = clamp01(decode_images(run, latents), c.straight_through_clamp)
    sliced = None if draws is None else (draws[0][lo * c.augment : hi * c.augment],
                                         draws[1][lo * c.augment : hi * c.augment])
    loss, logits = dct_loss(run, images, sliced)
    return (loss if share == 1.0 else loss * share), logits, calls


def chunk_bounds(n: int, size: int | None) -> list[tuple[int, int]]:
    """``[(lo, hi), ...]`` covering ``range(n)`` in slices of `size` (None: one slice)."""
    size = n if size is None else size
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _x0_hook(run: TokenRun, step_kwargs: dict, values: list[float], share: float = 1.0) -> Callable:
    """The x0 loss of the steps before the gradient-carrying ones: ``x0_weight`` x their mean cross-entropy, each
    step's loss back-propagated as soon as it is computed (into the leaf text embedding only: nothing before the step
    carries a graph); its value appended to `values`. `share`: the micro-batch's fraction of the batch."""
    weight = x0_step_weight(run, share)

    def hook(noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> None:
        loss = weight * guide_loss(run, classify(run.classifier, x0_images(run, noise_pred, t, latents, step_kwargs)))
        values.append(loss.item())
        if math.isfinite(values[-1]):
            run.scaler.scale(loss).backward()

    return hook


def x0_step_weight(run: TokenRun, share: float = 1.0) -> float:
    """The weight of one step's x0 loss: ``x0_weight`` over the steps that have one (their mean), x `share`."""
    timesteps = len(run.pipe.scheduler.timesteps)
    return run.config.x0_weight / max(timesteps - min(run.config.grad_steps, timesteps), 1) * share


def x0_images(run: TokenRun, noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
              step_kwargs: dict) -> torch.Tensor:
    """One step's predicted clean image x̂_0 (`synthaug.tokens.x0.predicted_x0`), decoded and clamped, for the guide's
    x0 loss."""
    x0 = predicted_x0(run.pipe.scheduler, noise_pred, t, latents, step_kwargs)
    return clamp01(decode_images(run, x0), run.config.straight_through_clamp)


def loss_scaler(pipe) -> torch.amp.GradScaler:
    """A `torch.amp.GradScaler` when the UNet or VAE is fp16 (the per-pixel cross-entropy's gradients underflow fp16
    through them without it); disabled (every call a no-op) otherwise, bf16 included (fp32's exponent range)."""
    fp16 = torch.float16 in (pipe.unet.dtype, pipe.vae.dtype)
    device = pipe._execution_device.type
    return torch.amp.GradScaler(device if device in ("cuda", "cpu") else "cuda", enabled=fp16)


def dct_loss(run: TokenRun, images: torch.Tensor,
             draws: tuple[list[list[int]], torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (4): the guide's cross-entropy to the class (ψ_C, its own resize/normalise, lives in its forward); with
    EOT, the mean over the shifted, noised copies of every image (`draws`, from `augment_draws`). Returns (loss,
    logits of the plain images)."""
    logits = check_class_range(run, classify(run.classifier, images))
    if draws is not None:
        aug_logits = classify(run.classifier, augment_views(images, draws))
        return guide_loss(run, aug_logits), logits
    return guide_loss(run, logits), logits


def check_class_range(run: TokenRun, logits: torch.Tensor) -> torch.Tensor:
    """`logits`, once checked to have an output for ``run.class_index``. Raises `UserError`."""
    if logits.shape[-1] <= run.class_index:
        raise UserError(
            f"`class_index` {run.class_index} is out of range for the guide classifier, which has "
            f"{logits.shape[-1]} classes: pass an index below {logits.shape[-1]}."
        )
    return logits


def validate_token(run: TokenRun, v: torch.Tensor,
                   inputs: dict[str, torch.Tensor]) -> tuple[tuple[float, float], int]:
    """Guide accuracy and mean class probability of `v` on the held-out validation seeds: the training forward
    (same CFG, scheduler, size) without gradient. Returns ((accuracy, probability), UNet calls)."""
    c = run.config
    seeds = [dct_seed("val", c.seed, run.class_index, b) for b in range(c.val_batch_size)]
    parts, calls = [], 0
    with torch.no_grad():
        text = encode_with(run, v, inputs)
        for lo, hi in chunk_bounds(len(seeds), c.micro_batch):
            latents, step_kwargs = initial_latents(run, seeds[lo:hi])
            latents, n = denoise(run, latents, text, step_kwargs, grad_steps=0)
            parts.append(classify(run.classifier, _decode(run.pipe, latents).clamp(0, 1)))
            calls += n
        prob, correct = guide_scores(run, torch.cat(parts))
    return (float(correct.float().mean()), float(prob.mean())), calls


def update_token(run: TokenRun, optimizer: torch.optim.Optimizer, v_c: torch.Tensor, loss: torch.Tensor | None,
                 text: torch.Tensor, leaf: torch.Tensor | None) -> dict:
    """Backward (`loss` None: the micro-batches did theirs), unscale (fp16), clip the *unscaled* gradient, step unless
    it is not finite (fp16: the loss scale then shrinks, as GradScaler does). Returns the history fields
    ``grad_norm``, ``loss_scale`` (fp16 only) and ``updated`` or ``nonfinite``."""
    if loss is not None:
        run.scaler.scale(loss).backward()
    if leaf is not None:  # every micro-batch's and x0 step's gradient, through the text encoder once
        text.backward(leaf.grad)
    fields = {"loss_scale": run.scaler.get_scale()} if run.scaler.is_enabled() else {}
    run.scaler.unscale_(optimizer)
    grad_clip = run.config.grad_clip
    max_norm = grad_clip if grad_clip and grad_clip > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_([v_c], max_norm).item()
    if math.isfinite(grad_norm):
        run.scaler.step(optimizer)
        fields["updated"] = True
    else:
        fields["nonfinite"] = True
    run.scaler.update()
    return {"grad_norm": grad_norm, **fields}


def check_inputs(pipe, classifier, class_index: int, label: str, config: DCTConfig, token: str, val_prompt: str,
                  target: GuideTarget = CLASS):
    """Every user-facing rule `learn_dct_token` can check before running a model. Raises `UserError`.

    Returns the tokenizer that knows `token`: the pipeline's own if it does already, else a copy."""
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
    if not isinstance(label, str) or not (label.strip() or not target.is_class):
        raise UserError(f"`label` must be a non-empty class name but is {label!r}.")
    if target.is_class and getattr(classifier, "multi_label", False):
        raise UserError(f"`classifier` {getattr(classifier, 'source', '')!r} is multi-label (one sigmoid output per "
                        f"attribute), so a class token's cross-entropy means nothing to it: pass target="
                        f"'attribute:NAME' (--guide-target) with one of {', '.join(classifier.labels[:10])}, or a "
                        f"single-label guide.")
    if not label.strip():  # an attribute token without a class label: no template may ask for one
        check_label_free((*config.prompts, *([val_prompt] if config.select == "val" else [])), target)
    positive = {"max_steps": config.max_steps, "batch_size": config.batch_size,
                "num_inference_steps": config.num_inference_steps}
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"`dct.{key}` must be > 0 but is {value!r}.")
    if config.micro_batch is not None and (isinstance(config.micro_batch, bool) or config.micro_batch <= 0):
        raise UserError(f"`dct.micro_batch` must be > 0 (or null for the whole batch) but is {config.micro_batch!r}.")
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
    check_dct_levers(config)
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
    if isinstance(config.num_vectors, bool) or not isinstance(config.num_vectors, int) or config.num_vectors < 1:
        raise UserError(f"`dct.num_vectors` must be an integer >= 1 but is {config.num_vectors!r}.")
    tokenizer = tokenizer_with(tokenizer, vector_names(token, config.num_vectors))
    token_id = tokenizer.convert_tokens_to_ids(vector_names(token, config.num_vectors)[-1])  # all in, if the last is
    if config.select == "val" and "{token}" not in val_prompt:
        raise UserError(f"`val_prompt` {val_prompt!r} (the generation prompt) has no {{token}} placeholder: validation "
                        f"must measure the token; add one where S_c goes.")
    for p in (*config.prompts, *([val_prompt] if config.select == "val" else [])):
        spelled = render_prompt(p, label, spell_token(token, config.num_vectors))
        if not bool((tokenize(tokenizer, [spelled], "cpu")["input_ids"] == token_id).any()):
            raise UserError(
                f"`dct.prompts` entry {render_prompt(p, label, token)!r} is longer than the tokenizer's "
                f"{tokenizer.model_max_length} tokens and the class token {token!r} was cut off: shorten the prompt "
                f"or the label.")
    if (config.x0_weight > 0 and not x0_from_alphas_works(pipe.scheduler)
            and not scheduler_predicts_x0(pipe.scheduler, config.num_inference_steps)):
        raise UserError(
            f"`dct.x0_weight` {config.x0_weight} needs the predicted clean image of every step, and "
            f"{type(pipe.scheduler).__name__} neither returns one nor has a DDPM noise schedule to compute it from: "
            f"use --scheduler ddim (or euler, pndm), or set dct.x0_weight=0.")
    return tokenizer


def warn_if_last_step_is_noisy(scheduler, timesteps: torch.Tensor) -> None:
    # Measured on an earlier digits world without the x0 loss: with "trailing" spacing the last gradient-carrying step
    # sat at t=99 and the loss diverged; at t~1 it did not. Without the x0 loss the gradient only sees the final
    # step(s), so they must be nearly clean. (With it, every step's predicted image is classified: 5 DPM-Solver++
    # steps ending at t=200 trained well on the current world.)
    total = getattr(scheduler.config, "num_train_timesteps", 1000)
    last = float(timesteps[-1])
    if last > 0.05 * total:
        logger.warning(
            "The scheduler's last timestep is %g of %d: without the x0 loss DCT's gradient flows through the final "
            "denoising step(s) only and diverged when that step was this noisy. Use more steps, "
            "timestep_spacing='leading' (SD's default), or dct.x0_weight > 0.", last, total)


def _unet(unet, model_input, t, hidden, timestep_cond, checkpoint: bool) -> torch.Tensor:
    def run(x, h):
        return unet(x, t, encoder_hidden_states=h, timestep_cond=timestep_cond, return_dict=False)[0]

    if checkpoint:
        return torch.utils.checkpoint.checkpoint(run, model_input, hidden, use_reentrant=False)
    return run(model_input, hidden)


def decode_images(run: TokenRun, latents: torch.Tensor) -> torch.Tensor:
    """`_decode` with gradient. With checkpointing, one image at a time, each under its own checkpoint: the decoder's
    activations exist for one image at a time, in the forward and when recomputed in the backward."""
    if not (run.checkpointing and torch.is_grad_enabled()):
        return _decode(run.pipe, latents)
    return torch.cat([torch.utils.checkpoint.checkpoint(_decode, run.pipe, z, use_reentrant=False)
                      for z in latents.split(1)])


@contextlib.contextmanager
def block_checkpointing(run: TokenRun) -> Iterator[None]:
    """With ``run.checkpointing``: diffusers' own per-block gradient checkpointing in the UNet and the VAE for the
    duration (inside the per-call checkpoints, a recomputed call holds one block's activations at a time); every
    module's setting is restored afterwards."""
    models = [m for m in (run.pipe.unet, run.pipe.vae) if getattr(m, "_supports_gradient_checkpointing", False)]
    if not run.checkpointing or not models:
        yield
        return
    missing = object()
    saved = [(m, m.gradient_checkpointing, m.__dict__.get("_gradient_checkpointing_func", missing))
             for model in models for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    try:
        for model in models:
            model.enable_gradient_checkpointing()
        yield
    finally:
        for m, flag, func in saved:
            m.gradient_checkpointing = flag
            if func is missing:
                m.__dict__.pop("_gradient_checkpointing_func", None)
            else:
                m.__dict__["_gradient_checkpointing_func"] = func


def _decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents to fp32 images in [0, 1] (unclamped), as the pipeline's postprocessing maps them."""
    vae_in = (latents / pipe.vae.config.scaling_factor).to(pipe.vae.dtype)
    return pipe.vae.decode(vae_in, return_dict=False)[0].float() / 2 + 0.5


def classify(classifier: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """fp32 logits of fp32 images in [0, 1], run on the classifier's own device and dtype."""
    param = next(iter(classifier.parameters()), None)
    if param is not None:
        dtype = param.dtype if param.is_floating_point() else images.dtype
        images = images.to(device=param.device, dtype=dtype)
    return classifier(images).float()


def _targets(logits: torch.Tensor, class_index: int) -> torch.Tensor:
    return torch.full((logits.shape[0],), class_index, dtype=torch.long, device=logits.device)


def guide_loss(run: TokenRun, logits: torch.Tensor) -> torch.Tensor:
    """The objective on the guide's logits: cross-entropy to the class (Eq. 4); for an attribute target, the binary
    cross-entropy of the attribute's output (``run.class_index``) towards the wanted value."""
    if run.target.is_class:
        return F.cross_entropy(logits, _targets(logits, run.class_index))
    column = logits[:, run.class_index]
    return F.binary_cross_entropy_with_logits(column, torch.full_like(column, float(run.target.value)))


def guide_scores(run: TokenRun, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: (probability of the target, correct). Class: the softmax probability of the class and argmax ==
    class. Attribute: the sigmoid probability of the wanted value (``1 - p`` for ``=0``) and that probability > 0.5."""
    if run.target.is_class:
        probs = logits.float().softmax(-1)
        return probs[:, run.class_index], probs.argmax(-1) == run.class_index
    p = torch.sigmoid(logits[:, run.class_index].float())
    p = p if run.target.value == 1 else 1 - p
    return p, p > 0.5


def resolve_target(classifier, target, class_index, label) -> tuple[GuideTarget, int | None, str | None]:
    """(target, the guide output it steers, label): a class target passes `class_index` and `label` through; an
    attribute target looks its output up by name in ``classifier.labels`` (a multi-label guide's) and has no label
    unless one is given. Raises `UserError`."""
    target = parse_guide_target(target, "target")
    if target.is_class:
        return target, class_index, label
    labels = getattr(classifier, "labels", None)
    source = str(getattr(classifier, "source", "") or type(classifier).__name__)
    if labels is None:
        raise UserError(f"`target` {str(target)!r} is looked up by name in the classifier's labels, but "
                        f"{source!r} has none: wrap it in synthaug.classifier.Classifier(model, labels=[...], "
                        f"multi_label=True).")
    index = target.output_index(labels, multi_label=bool(getattr(classifier, "multi_label", False)), source=source,
                                what="classifier", arg="target")
    if class_index is not None and class_index != index:
        raise UserError(f"`class_index` {class_index!r} disagrees with `target` {str(target)!r}, which is output "
                        f"{index} of the classifier: omit class_index for attribute tokens.")
    return target, index, label if label is not None else ""


# DCTConfig fields of the trust check (synthaug.tokens.trust), which runs after the token is learned, and of the
# speed alone (classes learned in one denoising batch, `synthaug.tokens.dct_batch`): not recorded in the token file,
# whose bytes do not depend on them.
TRUST_KEYS = ("trust", "trust_images")
UNRECORDED_KEYS = (*TRUST_KEYS, "classes_per_batch")


def train_seeds(config: DCTConfig, class_index: int, step: int) -> list[int]:
    """The seeds of training iteration `step`: the same ones every iteration with ``fixed_seeds``."""
    first = 0 if config.fixed_seeds else step * config.batch_size
    return [dct_seed("train", config.seed, class_index, first + b) for b in range(config.batch_size)]


def dct_seed(kind: str, seed: int, class_index: int, index: int) -> int:
    """Training seeds, from (config.seed, class): hashed like `generate.image_seed` but in their own namespace."""
    digest = hashlib.sha256(f"synthaug-dct-{kind}:{int(seed)}:{int(class_index)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@contextlib.contextmanager
def frozen(*modules: torch.nn.Module) -> Iterator[None]:
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
