"""Many classes' DCT tokens in one denoising batch: `learn_dct_tokens`.

`synthaug.tokens.dct.learn_dct_token` runs the denoising chain of one class at a time, at ``dct.batch_size`` seeds
(twice that with classifier-free guidance): far too small a batch to keep a GPU busy. Here every UNet call carries
the seeds of up to ``classes_per_batch`` classes, each with its own token embedding, prompts, loss, gradient,
clipping, Adam state, learning-rate schedule, keeper, stopping rules, validation and progress: the losses of the
classes are summed before one backward, and since no class's loss depends on another's embedding, each embedding
gets exactly its own class's gradient. A class that stops leaves the batch at once and the next class takes its
place (continuous batching), so the batch stays full while classes are left. Each class's `TokenResult` is what
`learn_dct_token` makes with the same seeds — the same seeds, prompts, Adam state, learning rate, keeper and
validation, whenever the class joins — up to the float rounding of the larger batch: the UNet's and the VAE's kernels
round differently at another batch size (on CPU in fp32 about 1e-6 of a call's output), and gradient steps carry that
rounding forward, so it grows with the updates; where two steps' losses nearly tie, the keeper may keep a neighbouring
step. On the digits world (``--preset fast``, classes 0-3 at 3 per batch, class 3 joining as 0 and 2 stop) it stayed
at most 1e-4 of the largest component with the same stop and kept step on one CPU; on another a class kept the step
before. The metadata of a token that shared UNet calls records with which classes (``batched_with``: their tokens).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from ..config import DCTConfig
from ..device import auto_batch_size, free_cuda_memory
from ..errors import UserError
from ..target import GuideTarget
from ..token_methods import TokenMethod, register_method
from .augment import augment_draws, clamp01
from .clip import check_clip_path
from .dct import (
    Keeper,
    TokenPlan,
    TokenResult,
    TokenRun,
    block_checkpointing,
    check_class_range,
    chunk_bounds,
    classify,
    dct_loss,
    decode_images,
    denoise,
    encode_with,
    frozen,
    guide_loss,
    guide_scores,
    history_entry,
    initial_latents,
    keep_or_stop,
    learn_dct_token,
    plan_token,
    scheduled_lr,
    start_token,
    token_result,
    train_seeds,
    update_token,
    warn_if_last_step_is_noisy,
    x0_images,
    x0_step_weight,
)
from .io import load_tokens, save_token
from .progress import bar_update, progress_bar

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

AUTO_MAX_CLASSES = 64  # `classes_per_batch` auto: at most this many classes (x dct.batch_size seeds) per UNet call


@dataclass(frozen=True)
class DCTJob:
    """One token for `learn_dct_tokens` to learn: `learn_dct_token`'s per-class arguments.

    Args:
        class_index: the target class, an index into the guide's logits (None for an attribute `target`).
        label: the clean class name the prompts' ``{label}`` takes.
        token: the token string; None: ``token_name(class_index)`` (an attribute target's own name).
        target: None or ``"class"``, or ``"attribute:NAME[=0|1]"`` (see `learn_dct_token`).
    """

    class_index: int | None
    label: str | None
    token: str | None = None
    target: str | GuideTarget | None = None


def learn_dct_tokens(
    pipe: StableDiffusionPipeline,
    classifier: torch.nn.Module,
    jobs: Iterable[DCTJob],
    config: DCTConfig = DCTConfig(),  # noqa: B008 (frozen, so a shared default is safe)
    *,
    classes_per_batch: int | str | None = None,
    progress: bool | Callable[[dict], None] = False,
    callback: Callable[[DCTJob, dict, torch.Tensor], None] | None = None,
    checkpointing: bool | None = None,
    val_prompt: str | None = None,
) -> Iterator[tuple[DCTJob, TokenResult | UserError]]:
    """Learn the DCT tokens of many classes, up to `classes_per_batch` of them in every UNet call.

    Every job's token is learned as ``learn_dct_token(pipe, classifier, job.class_index, job.label, config,
    token=job.token, target=job.target, checkpointing=checkpointing, val_prompt=val_prompt)`` learns it, with the same
    seeds, updates, stopping step and kept step; the embedding and the history's numbers equal that call's up to the
    float rounding of a larger batch (see the module docstring: it grows with the updates, and a near tie of two
    steps' losses can move the kept step by one). A result whose class shared UNet calls records the other classes'
    tokens in ``metadata["batched_with"]``. With `classes_per_batch` 1 the jobs go through `learn_dct_token` one after
    another.

    The batch holds up to `classes_per_batch` classes at once; when one stops (its own stopping rules), the next job
    takes its place before the next denoising chain (continuous batching), so every UNet call carries
    ``classes_per_batch x config.batch_size`` seeds (twice that with classifier-free guidance) while jobs are left.
    `jobs` is read lazily, one job whenever a place is free. Validation (``select="val"``) runs per class. The
    pipeline must not change while the generator is suspended (no `add_tokens`, no scheduler swap): add the tokens
    once it is exhausted.

    Args:
        pipe: a Stable Diffusion pipeline, left exactly as it was found (see `learn_dct_token`).
        classifier: the guide, ``forward(images [B, 3, H, W] in [0, 1]) -> logits``, frozen during training.
        jobs: the tokens to learn (`DCTJob`); results come back in the order the classes finish.
        config: every knob (`synthaug.config.DCTConfig`), shared by all jobs.
        classes_per_batch: classes per denoising batch: an integer >= 1, or ``"auto"`` (on CUDA as many as fit in
            free memory, measured once by `classes_per_batch_for`; 1 elsewhere). None: ``config.classes_per_batch``.
        progress: True: a tqdm bar per class over its training iterations (see `learn_dct_token`); a callable: called
            instead after every class's iteration with its `StepProgress` dict (its ``class_index`` the job's).
        callback: called after each class's iteration's measurement as ``callback(job, history_entry, v_c)``
            (``v_c`` a detached fp32 CPU copy of the measured embedding), before its update.
        checkpointing: overrides ``config.checkpointing`` for every job (None: the config's).
        val_prompt: the template ``select="val"`` generates with (None: ``config.prompts[0]``).

    Yields:
        ``(job, result)`` as soon as the job's class finishes: the very `DCTJob` object taken from `jobs`, and its
        `TokenResult`, or the `UserError` that failed that job alone (a wrong label, token or class index; raised
        while checking the job, or when the guide first scores it). The other classes go on unchanged. Any other
        exception (out of memory, a broken model) ends the generator: the jobs not yet yielded are unfinished.

    Raises:
        UserError: at the call, for a `classes_per_batch` that is not an integer >= 1 or ``"auto"``.

    >>> jobs = [DCTJob(c, name, token=token_name(c)) for c, name in enumerate(class_names)]
    >>> for job, result in learn_dct_tokens(pipe, guide, jobs, config, classes_per_batch=8):
    ...     if isinstance(result, UserError):
    ...         raise result
    ...     save_token(result, f"tokens/{job.class_index:03d}.safetensors")
    """
    check_classes_per_batch(config.classes_per_batch if classes_per_batch is None else classes_per_batch,
                            "dct.classes_per_batch" if classes_per_batch is None else "classes_per_batch")
    wanted = config.classes_per_batch if classes_per_batch is None else classes_per_batch
    return _learn(pipe, classifier, iter(jobs), config, wanted, progress=progress, callback=callback,
                  checkpointing=checkpointing, val_prompt=val_prompt)


def check_classes_per_batch(value: object, key: str = "dct.classes_per_batch") -> None:
    """Raise a one-line `UserError` naming `key` unless `value` is an integer >= 1, ``"auto"`` or None (auto)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"`{key}` must be an integer >= 1 (classes per denoising batch), or auto to fit the GPU's "
                        f"free memory, but is {value!r}: pass e.g. {key}=8.")


def classes_per_batch_for(pipe: StableDiffusionPipeline, classifier: torch.nn.Module, config: DCTConfig,
                          job: DCTJob, wanted: int | str | None = None) -> int:
    """The classes per batch `learn_dct_tokens` uses: `wanted` (None: ``config.classes_per_batch``) if a number;
    for auto, on CUDA the most whose training iteration fits in free memory (`probe_token_memory` with `job`'s class,
    `synthaug.device.auto_batch_size`, at most `AUTO_MAX_CLASSES`), and 1 elsewhere."""
    wanted = config.classes_per_batch if wanted is None else wanted
    if isinstance(wanted, int):
        return wanted
    device = pipe._execution_device
    if device.type != "cuda":
        return 1
    per_class, fixed = probe_token_memory(pipe, classifier, config, job)
    free = free_cuda_memory(device)
    n = auto_batch_size(free, per_class, fixed, max_batch=AUTO_MAX_CLASSES)
    logger.info("dct.classes_per_batch auto: %d (%.1f GiB free on %s, %.2f GiB per class + %.2f GiB fixed at batch "
                "%d, %dx%d)", n, free / 2**30, device, per_class / 2**30, fixed / 2**30, config.batch_size,
                config.height, config.width)
    return n


def probe_token_memory(pipe: StableDiffusionPipeline, classifier: torch.nn.Module, config: DCTConfig,
                       job: DCTJob) -> tuple[int, int]:
    """Bytes one class's training iteration needs beyond the weights, and the part that does not grow with the
    classes, on CUDA: two updates of `job`'s class, alone and twice side by side, with the config's batch, size,
    gradient steps and levers (with ``select="val"`` a validation before the first update, while the graph is held)
    over a chain shortened to the gradient-carrying steps (the steps without a graph hold no memory afterwards). The
    difference of the allocator's peaks is the per-class cost. Returns ``(per_class, fixed)``."""
    device = pipe._execution_device
    probe = replace(config, max_steps=2, extend_steps=0, val_every=1, patience=0, patience_metric="loss",
                    stop_all_correct=False, num_inference_steps=min(config.num_inference_steps, config.grad_steps + 1))
    peaks = []
    for n in (1, 2):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _, result in _learn(pipe, classifier, iter([job] * n), probe, n):
            if isinstance(result, UserError):
                raise result
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_class = max(1, peaks[1] - peaks[0])
    return per_class, max(0, peaks[0] - per_class)


@dataclass(eq=False)
class _Learner:
    """One class's training inside the batch: what `learn_dct_token` keeps in its locals."""

    job: DCTJob
    plan: TokenPlan
    v_c: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    prompt_inputs: dict
    val_inputs: dict | None
    augment_generator: torch.Generator
    keeper: Keeper
    started: float
    bar: object = None
    step: int = 0
    unet_evals: int = 0
    history: list[dict] = field(default_factory=list)
    batched_with: set[str] = field(default_factory=set)  # the tokens of the classes that shared its UNet calls

    @property
    def run(self) -> TokenRun:
        return self.plan.run


@dataclass(eq=False)
class _Pass:
    """One training iteration of one class in the batch: its text, leaf, draws and what its forward measured."""

    learner: _Learner
    text: torch.Tensor
    leaf: torch.Tensor | None
    draws: tuple[list[list[int]], torch.Tensor] | None
    seeds: list[int]
    loss: torch.Tensor | None = None
    loss_value: float = 0.0
    logits: list[torch.Tensor] = field(default_factory=list)
    x0_values: list[float] = field(default_factory=list)
    error: UserError | None = None


def _learn(pipe, classifier, jobs: Iterator[DCTJob], config: DCTConfig, wanted: int | str | None, *,
           progress: bool = False, callback=None, checkpointing: bool | None = None,
           val_prompt: str | None = None) -> Iterator[tuple[DCTJob, TokenResult | UserError]]:
    """`learn_dct_tokens` once its arguments are checked: the generator it returns."""
    first = next(jobs, None)
    if first is None:
        return
    size = classes_per_batch_for(pipe, classifier, config, first, wanted)
    if size == 1:  # today's path, one class after another
        for job in itertools.chain([first], jobs):
            report = None if callback is None else (lambda entry, v, job=job: callback(job, entry, v))
            try:
                result = learn_dct_token(pipe, classifier, job.class_index, job.label, config, token=job.token,
                                         progress=progress, callback=report, checkpointing=checkpointing,
                                         val_prompt=val_prompt, target=job.target)
            except UserError as e:
                result = e
            yield job, result
        return

    pending = itertools.chain([first], jobs)
    active: list[_Learner] = []
    checkpointed = False
    with frozen(pipe.unet, pipe.vae, pipe.text_encoder, classifier), contextlib.ExitStack() as stack, \
            torch.enable_grad():
        while True:
            while len(active) < size and (job := next(pending, None)) is not None:
                try:
                    plan = plan_token(pipe, classifier, job.class_index, job.label, config, token=job.token,
                                      checkpointing=checkpointing, val_prompt=val_prompt, target=job.target)
                except UserError as e:
                    yield job, e
                    continue
                if not checkpointed:  # the models' own gradient checkpointing, once for all classes
                    stack.enter_context(block_checkpointing(plan.run))
                    checkpointed = True
                v_c, optimizer, prompt_inputs, val_inputs, augment_generator = start_token(plan)
                active.append(_Learner(job, plan, v_c, optimizer, prompt_inputs, val_inputs, augment_generator,
                                       Keeper(config, v_c), time.perf_counter(),
                                       progress_bar(progress, config.max_steps, plan.label,
                                                    plan.run.class_index)))
            if not active:
                return
            for learner, result in _iteration(active, callback):
                active.remove(learner)
                if learner.bar is not None:
                    learner.bar.close()
                yield learner.job, result


def _iteration(active: list[_Learner], callback) -> list[tuple[_Learner, TokenResult | UserError]]:
    """One training iteration of every class in `active` (`learn_dct_token`'s step 4, the classes' seeds in one
    batch). Returns the classes that finished, with their result or error, in batch order."""
    config, pipe = active[0].run.config, active[0].run.pipe
    chunks = chunk_bounds(config.batch_size, config.micro_batch)
    passes = []
    for learner in active:
        learner.optimizer.zero_grad(set_to_none=True)
        if config.lr_schedule != "constant":
            learner.optimizer.param_groups[0]["lr"] = scheduled_lr(config, learner.step)
        text = encode_with(learner.run, learner.v_c, learner.prompt_inputs)  # [len(prompts), L, D]
        leaf = text.detach().requires_grad_() if config.x0_weight > 0 or len(chunks) > 1 else None
        draws = augment_draws((config.batch_size, pipe.vae.config.out_channels, config.height, config.width),
                              config.augment, learner.augment_generator) if config.augment > 0 else None
        passes.append(_Pass(learner, text, leaf, draws, train_seeds(config, learner.run.class_index, learner.step)))
    for learner in active:  # the batch's composition, recorded in each token (its rounding depends on it)
        learner.batched_with.update(other.plan.token for other in active if other is not learner)

    # Per micro-batch (the whole batch unless dct.micro_batch is set), every class's share of it in one chain
    for lo, hi in chunks:
        live = [p for p in passes if p.error is None]
        if not live:
            break
        parts = _forward(live, lo, hi, warn=lo == 0 and any(p.learner.step == 0 for p in live))
        scaled = []
        for p, (part, logits, calls) in zip(live, parts):
            p.learner.unet_evals += calls
            if part is None:
                continue
            p.loss_value += part.item()
            p.logits.append(logits.detach())
            if len(chunks) == 1:
                p.loss = part  # back-propagated below, only if the class goes on
            elif math.isfinite(p.loss_value):
                scaled.append(p.learner.run.scaler.scale(part))
        if scaled:
            torch.stack(scaled).sum().backward()
        del parts, scaled

    finished: list[tuple[_Learner, TokenResult | UserError]] = []
    going_on = []
    for p in passes:
        learner = p.learner
        if p.error is not None:
            finished.append((learner, p.error))
        elif _measure(p, callback):
            result = token_result(learner.plan, learner.keeper, learner.history, learner.started, learner.unet_evals)
            if learner.batched_with:
                result.metadata["batched_with"] = sorted(learner.batched_with)
            finished.append((learner, result))
        else:
            going_on.append(p)

    # Update every class that goes on: one backward of the summed (scaled) losses, then each its own clip and step
    losses = [p.learner.run.scaler.scale(p.loss) for p in going_on
              if p.loss is not None and math.isfinite(p.loss_value)]
    if losses:
        torch.stack(losses).sum().backward()
    del losses
    for p in going_on:
        learner, entry = p.learner, p.learner.history[-1]
        if math.isfinite(p.loss_value):
            entry.update(update_token(learner.run, learner.optimizer, learner.v_c, None, p.text, p.leaf))
        bar_update(learner.bar, entry, learner.keeper)
        learner.step += 1
    return finished


def _measure(p: _Pass, callback) -> bool:
    """`learn_dct_token`'s steps 4.5-4.6 for one class: record the measurement, keep, validate, stop. True: stop."""
    learner, run = p.learner, p.learner.run
    target_prob, correct = guide_scores(run, torch.cat(p.logits))
    entry = history_entry(learner.step, p.loss_value, correct, target_prob, p.x0_values,
                          learner.optimizer.param_groups[0]["lr"])
    learner.history.append(entry)
    report = None if callback is None else (lambda e, v: callback(learner.job, e, v))
    stop, calls = keep_or_stop(run, learner.keeper, entry, learner.v_c, learner.val_inputs, report)
    learner.unet_evals += calls
    if stop:  # always by the last step (rule 3)
        bar_update(learner.bar, entry, learner.keeper)
    return stop


def _forward(live: list[_Pass], lo: int, hi: int, warn: bool,
             ) -> list[tuple[torch.Tensor | None, torch.Tensor | None, int]]:
    """`learn_dct_token`'s steps 4.2-4.4 for the micro-batch ``seeds[lo:hi]`` of every class in `live`, in one
    denoising chain: per class its share of its loss (None after a `UserError`, then recorded in its pass), its
    guide's logits and the UNet calls its seeds took part in."""
    run = live[0].learner.run  # what every class shares: the models, the config, the unconditional embedding
    c = run.config
    share, m = (hi - lo) / c.batch_size, hi - lo
    latents, step_kwargs = initial_latents(run, [s for p in live for s in p.seeds[lo:hi]])
    if warn and c.x0_weight == 0:
        warn_if_last_step_is_noisy(run.pipe.scheduler, run.pipe.scheduler.timesteps)
    # element b of a class: its prompt b % len(prompts); slices, whose graph the x0 steps can each reuse
    sources = [p.leaf if p.leaf is not None else p.text for p in live]
    text = torch.cat([src[b % len(src) : b % len(src) + 1] for src in sources for b in range(lo, hi)])

    def x0_hook(noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor) -> None:
        images, weight, scaled = x0_images(run, noise_pred, t, latents, step_kwargs), x0_step_weight(run, share), []
        for k, p in enumerate(live):
            if p.error is not None:
                continue
            try:
                logits = classify(run.classifier, images[k * m : (k + 1) * m])
                loss = weight * guide_loss(p.learner.run, check_class_range(p.learner.run, logits))
            except UserError as e:
                p.error = e
                continue
            p.x0_values.append(loss.item())
            if math.isfinite(p.x0_values[-1]):
                scaled.append(p.learner.run.scaler.scale(loss))
        if scaled:
            torch.stack(scaled).sum().backward()

    latents, calls = denoise(run, latents, text, step_kwargs, grad_steps=c.grad_steps,
                             x0_hook=x0_hook if c.x0_weight > 0 else None)
    images = clamp01(decode_images(run, latents), c.straight_through_clamp)
    out = []
    for k, p in enumerate(live):
        if p.error is not None:
            out.append((None, None, calls))
            continue
        draws = None if p.draws is None else (p.draws[0][lo * c.augment : hi * c.augment],
                                              p.draws[1][lo * c.augment : hi * c.augment])
        try:
            loss, logits = dct_loss(p.learner.run, images[k * m : (k + 1) * m], draws)
        except UserError as e:
            p.error = e
            out.append((None, None, calls))
            continue
        out.append((loss if share == 1.0 else loss * share, logits, calls))
    return out


# --------------------------------------------------------------------------------------------------------------------
# The method, registered: what a build's worker and `synthaug learn` call
# --------------------------------------------------------------------------------------------------------------------
@register_method
class DCT(TokenMethod):
    """DCT: a class token steered by the guide (`learn_dct_token`), several classes per batch with
    ``dct.classes_per_batch`` (`learn_dct_tokens`); its tokens may be checked against the real images
    (``dct.trust``, `synthaug.tokens.trust`)."""

    name = "dct"
    steered = True

    def check(self, config, *, dataset, class_names, selected) -> None:
        if config.dct.trust != "off" and config.dct.trust_features == "clip":  # the trust check reads a CLIP
            check_clip_path(config.mcti.clip_model)

    def trust(self, config) -> str:
        return config.dct.trust

    def learn(self, config, models, job, progress) -> TokenResult:
        return learn_dct_token(models["pipe"], models["guide"], job.class_index, job.name, config.dct,
                               token=job.token, val_prompt=config.generate.prompt, progress=progress)

    def batches(self, config) -> bool:
        return config.dct.classes_per_batch != 1

    def classes_per_batch(self, config, models, job) -> int:
        return classes_per_batch_for(models["pipe"], models["guide"], config.dct,
                                     DCTJob(job.class_index, job.name, token=job.token))

    def learn_batch(self, config, models, jobs, classes_per_batch, progress):
        by_index = {j.class_index: j for j in jobs}
        learned = learn_dct_tokens(models["pipe"], models["guide"],
                                   (DCTJob(j.class_index, j.name, token=j.token) for j in by_index.values()),
                                   config.dct, classes_per_batch=classes_per_batch, val_prompt=config.generate.prompt,
                                   progress=progress)
        for dct_job, result in learned:
            yield by_index[dct_job.class_index], result

    def save(self, result, path) -> None:
        save_token(result, path)

    def load(self, path) -> dict:
        return load_tokens(path)
