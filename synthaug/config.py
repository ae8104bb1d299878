"""Configuration: frozen dataclasses, one per stage, validated up front.

Consumes ``configs/*.yaml`` + CLI ``--set key=value`` overrides and produces a frozen `BuildConfig`; the resolved
config is written as ``out/config.yaml`` before any work. YAML keys equal field names (nested sections as mappings,
``dct.lr`` on the command line); unknown keys are an error. Presets (``paper``, ``fast``) are named override sets
applied over the dataset's defaults and before the file's own keys; a preset may carry its own values for a dataset
(`PRESET_VARIANTS`), used there instead of its generic ones. The tables live in `synthaug.presets`. Each config
dataclass documents its fields in its ``Attributes:`` section, which ``synthaug config --explain KEY`` prints.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, get_type_hints

from .config_values import coerce, short
from .dataset_names import check_dataset_name
from .errors import UserError
from .presets import DATASET_DEFAULTS, METHOD_DEFAULTS, PAPER_PROMPTS, PRESET_VARIANTS, PRESETS, SEED_SETS
from .target import parse_guide_target
from .token_methods import method_names

# Schedulers by the names users type; each maps to (diffusers class name, extra config overrides).
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "lms": ("LMSDiscreteScheduler", {}),
}

# diffusers' `timestep_spacing` values, which every scheduler named above accepts
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def check_scheduler(scheduler: str | None, timestep_spacing: str | None = None) -> None:
    """`scheduler` is a name in `SCHEDULERS` and `timestep_spacing` one of `TIMESTEP_SPACINGS` (None: the model's).
    Raises `UserError`."""
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise UserError(f"`scheduler` must be one of {', '.join(SCHEDULERS)} but is {scheduler!r}.")
    if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
        raise UserError(f"`timestep_spacing` must be one of {', '.join(TIMESTEP_SPACINGS)} (or null for the model's) "
                        f"but is {timestep_spacing!r}.")


@dataclass(frozen=True)
class DCTConfig:
    """Discriminative Class Token learning (DCT §3, appendix D): the ``dct`` section.

    Attributes:
        max_steps: Stopping rule 3: the most token updates (the paper stops after 200). An integer > 0.
        batch_size: Seeds (images) per update; the paper picked 5 after trying 1-6 (appendix B). An integer > 0.
        lr: Adam's learning rate for the token; null: ``0.00025 * batch_size``, the paper's recommendation.
        grad_clip: The largest gradient norm, applied after backward on the unscaled gradient.
        grad_steps: Denoising steps that carry gradient, counted as UNet calls at the end of the scheduler's own
            timesteps (2nd-order schedulers make two calls per step); 1 is the paper's "gradient skipping".
        num_inference_steps: T, the denoising steps of each training image.
        guidance_scale: Classifier-free guidance scale during training, as at generation.
        height: Height in pixels of the training images.
        width: Width in pixels of the training images.
        prompts: Training prompts: batch element b gets ``prompts[b % len(prompts)]``; ``{token}`` is the class
            token S_c, ``{label}`` the clean class name. Default: the paper's two prompts.
        init_token: The word whose embedding initialises the token, one token of the tokenizer: "bird" for bird
            classifiers, "a" for general ones (paper §3).
        stop_all_correct: Stopping rule 1: stop when the guide classifies the whole batch (with ``select: val``,
            and the validation seeds) correctly.
        patience: Stopping rule 2: stop after this many updates without a lower loss (see `patience_metric`) ...
        patience_min_accuracy: ... while at least this fraction of the batch is correct (rule 2).
        fixed_seeds: true: every update uses the same batch of training seeds; false: fresh seeds per update
            (which diverged on digits).
        select: Which token to keep: "min_loss" (the measured token with the lowest loss, as the reference code),
            "last" (the last measured one), or "val": every `val_every` updates and at the stop, generate
            `val_batch_size` images from held-out seeds with the generation prompt, without gradient, and keep the
            token the guide scores best there (accuracy, then mean probability; the initial token competes too, so
            a token that only fits its training seeds is never kept).
        val_batch_size: With ``select: val``: images per validation.
        val_every: With ``select: val``: updates between validations.
        patience_metric: What rule 2 counts updates since: "loss" (the lowest training loss) or "val" (needs
            ``select: val``; the best validation score, and `patience_min_accuracy` then does not apply).
        lr_schedule: "constant", or "cosine": the learning rate decays from `lr` to ``lr_floor × lr`` over
            `max_steps` (half a cosine), then stays there.
        lr_floor: With ``lr_schedule: cosine``: the final learning rate as a fraction of `lr`.
        extend_steps: With ``select: val``: up to this many updates past `max_steps`, taken only while the kept
            token was found within the last `extend_window` updates (the validation score still rising at the
            cap); 0: none.
        extend_window: The window of `extend_steps`, in updates.
        augment: Copies of each image under random differentiable shifts and noise before the guide (expectation
            over transformation); 0: none.
        straight_through_clamp: true: clamp decoded images to [0, 1] forward and pass the gradient through
            unchanged backward; false: a hard clamp, which zeroes the gradient of saturated pixels.
        seed: Base seed of the training and validation noise (each seed is hashed from it, the class and the index).
        x0_weight: > 0: also classify the scheduler's predicted clean image (``pred_original_sample``) at every
            denoising step before the gradient-carrying ones, each through that step's UNet call only, and add
            ``x0_weight ×`` their mean cross-entropy: a gradient at the high-noise steps where the image's class is
            decided (RESULTS.md, "Making the tokens help"). 0: off, as in the paper.
        micro_batch: Memory lever (the maths is unchanged): put the batch through the graph this many seeds at a
            time, back-propagating each micro-batch's share of the loss at once (the summed gradient is the whole
            batch's); null: the whole batch at once.
        checkpointing: Memory lever (the maths is unchanged): recompute activations in the backward instead of
            storing them, for each gradient-carrying UNet call and each image's VAE decode as a whole and inside
            them diffusers' per-block checkpointing; about 2 extra forwards of those calls per update
            (BENCHMARKS.md "Memory at 512 px").
        trust: A per-class check of the learned token against the user's own real images
            (`synthaug.tokens.trust`): "off", "warn" (log a distrusted class) or "fallback" (generate a distrusted
            class with the plain prompt instead). Not part of the token: its file never records it.
        trust_images: Images the trust check makes with the token, and as many with the plain prompt.
        trust_features: The feature space in which the trust check asks whether the token's images land nearer the
            class's real images than the plain prompt's do: "guide" (the guide's penultimate features) or "clip"
            (the image tower of the CLIP `mcti.clip_model` names; null: the model's own, as MC-TI picks it). The
            guide's space can be fooled the way the guide is — a token that satisfies a weak guide lands "on the
            class" there; CLIP's image tower is not what steered the token.
        num_vectors: Embedding vectors of the class token: 1 is the paper's single embedding; n > 1 learns n
            vectors, spelled in prompts as diffusers' multi-vector textual inversion spells them
            ("<tok> <tok>_1 ... <tok>_{n-1}", written as one [n, dim] tensor that stock ``load_textual_inversion``
            expands).
        classes_per_batch: Classes whose tokens learn together, their seeds in one denoising batch
            (`synthaug.tokens.learn_dct_tokens`, continuous batching: a class that stops is replaced by the next):
            each token equals the one learned alone up to the float rounding of the larger batch, which updates carry
            forward (a near tie of two steps' losses can move the kept step by one; the token file records the
            classes it was batched with, ``batched_with``). 1 learns one class at a time (today's bytes); null or "auto": on CUDA as many as fit in free
            memory (measured once per worker), elsewhere 1. A build's worker learns the tokens of the jobs it is
            handed together (the local executor: every class; a Ray actor: two batches' worth beside its job).
    """

    max_steps: int = 200
    batch_size: int = 5
    lr: float | None = None
    grad_clip: float = 1.0
    grad_steps: int = 1
    num_inference_steps: int = 50
    guidance_scale: float = 7.0
    height: int = 512
    width: int = 512
    prompts: tuple[str, ...] = PAPER_PROMPTS
    init_token: str = "a"
    stop_all_correct: bool = True
    patience: int = 20
    patience_min_accuracy: float = 0.5
    fixed_seeds: bool = True
    select: str = "min_loss"
    val_batch_size: int = 16
    val_every: int = 5
    patience_metric: str = "loss"
    lr_schedule: str = "constant"
    lr_floor: float = 0.1
    extend_steps: int = 0
    extend_window: int = 10
    augment: int = 0
    straight_through_clamp: bool = True
    seed: int = 0
    x0_weight: float = 0.0
    micro_batch: int | None = None
    checkpointing: bool = False
    trust: str = "off"
    trust_images: int = 8
    trust_features: str = "guide"
    num_vectors: int = 1
    classes_per_batch: int | None = 1

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 0.00025 * self.batch_size


@dataclass(frozen=True)
class MCTIConfig:
    """Textual inversion and Multi-Class TI (MC-TI §3.2): the ``mcti`` section, used by ``method: ti`` and ``mcti``.

    Attributes:
        steps: Textual-inversion updates (the TI paper's schedule): all of TI, MC-TI's warm-up.
        extra_steps: MC-TI's joint-loss updates after the warm-up (``method: mcti`` only).
        lr: AdamW's learning rate for the token (the paper: 5e-4).
        batch_size: Images per update.
        alpha: Weight of the noise-prediction loss in MC-TI's joint loss (Eq. 5); >= 0.
        beta: Weight of the discriminative regularizer (Eq. 5); >= 0; 0: the joint updates are plain TI.
        scale: s in Eq. 3, the inverse softmax temperature of the regularizer; > 0.
        init_token: The word whose embedding initialises the token, one token of the tokenizer.
        clip_model: The CLIP whose image tower is paired with the text encoder (the regularizer and token
            classification need it); null: the one whose text tower is the model's text encoder (SD 1.x: CLIP
            ViT-L/14, SD 2.x: OpenCLIP ViT-H/14; the digits world's own on digits).
        flip_p: Probability of a random horizontal flip of a real image, as textual inversion trains (0.5); the
            digits world keeps 0, since a mirrored digit is another glyph or none.
        seed: Base seed of the training draws (images, templates, noise, timesteps).
        num_vectors: Embedding vectors of each class token, as `dct.num_vectors` (the TI paper's multi-vector S*).
    """

    steps: int = 3000
    extra_steps: int = 100
    lr: float = 5e-4
    batch_size: int = 4
    alpha: float = 1.0
    beta: float = 1.0
    scale: float = 10.0
    init_token: str = "a"
    clip_model: str | None = None
    flip_p: float = 0.5
    seed: int = 0
    num_vectors: int = 1


@dataclass(frozen=True)
class GenerateConfig:
    """Image generation with the learned tokens (and the plain prompt on the same seeds): the ``generate`` section.

    Attributes:
        prompt: The generation prompt, with ``{token}`` and ``{label}``; ``{token}`` is dropped for the plain-prompt
            baseline. TI/MC-TI builds default to "A photo of a {token}".
        num_inference_steps: Denoising steps per image.
        guidance_scale: Classifier-free guidance scale.
        height: Image height in pixels.
        width: Image width in pixels.
        batch_size: Images per pipeline call; null or "auto": on CUDA the most that fit in free memory (measured
            once per worker, `synthaug.generation.batch_size_for`), elsewhere 8. The batch changes no image beyond
            float rounding.
        seed: Base seed of the images: an image's seed is hashed from it, its class and its index
            (`synthaug.generation.image_seed`).
        compile: torch.compile the UNet once per worker, for generation only (token learning stays eager); the
            compile time is logged and returned apart from the generation time. null or "auto": on with CUDA
            (measured 0.254 against 0.35 s per image at batch 16 on an H100), off elsewhere (inductor's C++ build
            takes minutes on CPUs and gains little). Compiled code is cached on disk
            for every worker and rerun. The images equal the eager ones up to float rounding.
        soft_top_k: Classes whose guide probability each image keeps in the index (plus the target class): the
            soft labels ``SynthAugDataset(targets="soft")`` trains on; 0 keeps the target's alone.
        prompts: Prompt variety: templates with ``{token}`` and ``{label}`` (contexts, viewpoints, styles); each
            image draws one by its seed and its index row records which (``prompt_index``). Empty: every image uses
            `prompt`. Tokens are still learned on `dct.prompts`, as the paper does.
        init: Where an image starts: "noise" (text-to-image) or "real" (SDEdit / DA-Fusion: one of the class's
            build's `shots` real images, drawn per image by its seed, noised to `strength` and denoised with the class token
            in the prompt by diffusers' StableDiffusionImg2ImgPipeline on the loaded modules). The row records the
            real image's index in the dataset split (``init_index``) and the strength.
        keep_confidence: Keep only images the guide gives at least this probability of their class: the build
            walks a class's seeds in order, generating in batches on a fixed grid of seed indices, and keeps the
            first `per_class` that pass (a row's ``index`` is its seed index, so gaps show what was dropped);
            deterministic and resumable like every build. null: keep every image.
        max_attempts: With `keep_confidence`: the most seeds tried per class and method (null: 10 x `per_class`);
            past it, the class's remaining images are kept whatever their probability, with a warning.
        strength: With ``init: real``: one value, or [low, high]: each image draws a strength among those the
            scheduler can take, i/T for whole i in [low·T, high·T] with T = `num_inference_steps` (img2img denoises
            int(strength·T) steps; 1.0 = pure noise).
    """

    prompt: str = "A photo of {token} {label}"
    num_inference_steps: int = 50
    guidance_scale: float = 7.0
    height: int = 512
    width: int = 512
    batch_size: int | None = None
    seed: int = 0
    compile: bool | None = None
    soft_top_k: int = 5
    prompts: tuple[str, ...] = ()
    init: str = "noise"
    strength: tuple[float, ...] = (0.75,)
    keep_confidence: float | None = None
    max_attempts: int | None = None


@dataclass(frozen=True)
class ShardConfig:
    """WebDataset shards: the ``shards`` section.

    Attributes:
        samples_per_shard: A class's images are split into chunks of this size; one shard per chunk.
        image_format: "png", "jpg" or "webp".
        quality: jpg/webp quality (recorded in the stats); png ignores it.
    """

    samples_per_shard: int = 1000
    image_format: str = "png"
    quality: int = 95


@dataclass(frozen=True)
class RunConfig:
    """Where and how the work runs: the ``run`` section.

    Attributes:
        executor: "ray", "local" (in this process) or "auto" (Ray when installed, else local: said in one log line).
        ray_address: null: start a local Ray; "auto" or an address: attach to that cluster.
        num_workers: Actors; null: one per GPU, or one CPU actor per `cpus_per_worker` CPUs without GPUs.
        cpus_per_worker: CPU slots per actor when the cluster has no GPU.
        max_retries: A failed class job is retried this many times.
        max_in_flight: Jobs submitted but not finished; null: one per worker (a free one).
        job_timeout_s: Ray: a running job with no progress event (start, token, images, shard) for this many
            seconds is stopped and retried on another worker; token learning reports only when done, so keep it
            above that.
    """

    executor: str = "auto"
    ray_address: str | None = None
    num_workers: int | None = None
    cpus_per_worker: int = 2
    max_retries: int = 2
    max_in_flight: int | None = None
    job_timeout_s: float = 3600.0


@dataclass(frozen=True)
class GuideFitConfig:
    """The few-shot guide ``guide: fit`` fits (`synthaug.classifier.fit`): the ``guide_fit`` section.

    Attributes:
        backbone: The frozen backbone whose features the head reads: a CLIP, DINOv2 or other transformers vision
            model (hub id or folder), a timm name, or "digits"; null: the CLIP `mcti.clip_model` names (null there:
            the one paired with the model; the digits world's own on digits).
        head: "linear" (L2-regularised logistic regression; features and strength chosen by leave-one-out on the
            shots) or "prototype" (cosine class means).
        strength: The linear head's L2 strength (the prototype head's logit scale), fixed; null: chosen by
            leave-one-out on the shots, which picks for accuracy alone (the weakest penalty, mostly).
    """

    backbone: str | None = None
    head: str = "linear"
    strength: float | None = None


@dataclass(frozen=True)
class BuildConfig:
    """Everything `synthaug build` needs. YAML keys equal these field names; sections are mappings.

    Attributes:
        dataset: "digits", "cub", "inat", "imagenet", "imagefolder" or a torchvision set name; it also picks
            dataset defaults (model, guide, sizes).
        root: The dataset's folder on disk; null for the embedded digits.
        split: The dataset split the classes (and real images) come from.
        classes: The classes to build: "0-9,17" or comma-separated names; null: all.
        model: The diffusion model: a diffusers hub id, a local folder or an embedded name ("digits").
        scheduler: The sampler, one of ddim, pndm, euler, euler_a, dpmsolver++, lms; null keeps the model's.
        timestep_spacing: How the denoising steps are spread over the training timesteps, diffusers'
            ``timestep_spacing``: "leading", "linspace" or "trailing"; null keeps the model's (SD's and the digits
            world's: leading, which at 5 DPM-Solver++ steps starts at t=831 instead of pure noise).
        device: "auto", "cpu", "cuda" or "cuda:N".
        dtype: UNet and VAE weights' dtype: "auto" (on CUDA bf16 where supported, else fp16; fp32 on the CPU),
            "float32", "float16" or "bfloat16" ("fp32", "fp16", "bf16"); the token always trains in fp32.
        channels_last: UNet and VAE weights in channels-last (NHWC) memory, for generation and token learning
            (NCHW tensors cost transposes around cuDNN's convolutions). null or "auto": on with CUDA, off elsewhere.
            Values change by float rounding only.
        guide: The classifier that steers DCT tokens (a `synthaug.classifier.load_classifier` source), or "fit": a
            few-shot guide fitted on the build's `shots` real images per class (`guide_fit`), written to the build's
            ``guide/`` folder once and reused on every resume.
        guide_fit: How ``guide: fit`` fits its guide (`GuideFitConfig`).
        guide_trained_on: A note of what the guide saw; null: what the classifier source declares.
        guide_target: What the guide is steered towards (`synthaug.target`): null: the class (a token per selected
            class, the paper's main method); "attribute:NAME[=0|1]": one output of a multi-label guide
            (``synthaug learn`` only: one token).
        method: How tokens are learned: "dct", "ti" or "mcti" (a method of `synthaug.token_methods`).
        shots: The user's k real images per class: ``few_shot_indices(targets, shots, shots_seed)`` of the build's
            dataset split, the images ``SynthAugDataset(shots=k, seed=shots_seed)`` mixes in. Every stage that reads
            real images reads these: TI / MC-TI learn from them, ``guide: fit`` fits on them, the trust check
            (`dct.trust`) and real starts (``generate.init: real``) read them. ``build.json`` records which they
            are.
        shots_seed: The seed that picks them.
        per_class: Images generated per class (and per method).
        baseline: Also generate plain-prompt ("sd") images on the same seeds.
        seeds: A named seed set, "tune" or "report", that fixes `dct.seed`, `mcti.seed` and `generate.seed`; null:
            the seeds as set.
        out: The build folder (`load_config`'s default: ``out/DATASET``).
        dct: DCT token learning (`DCTConfig`).
        mcti: TI / MC-TI token learning (`MCTIConfig`).
        generate: Image generation (`GenerateConfig`).
        shards: WebDataset shards (`ShardConfig`).
        run: Where and how the work runs (`RunConfig`).
    """

    dataset: str = "digits"
    root: str | None = None
    split: str = "train"
    classes: str | None = None
    model: str = "digits"
    scheduler: str | None = None
    timestep_spacing: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    channels_last: bool | None = None
    dct: DCTConfig = field(default_factory=DCTConfig)
    mcti: MCTIConfig = field(default_factory=MCTIConfig)
    guide: str = "digits-guide"
    guide_trained_on: str | None = None
    guide_target: str | None = None
    guide_fit: GuideFitConfig = field(default_factory=GuideFitConfig)
    method: str = "dct"
    shots: int = 5
    shots_seed: int = 0
    per_class: int = 100
    baseline: bool = False
    seeds: str | None = None
    out: str = "out/digits"
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    run: RunConfig = field(default_factory=RunConfig)


VALID = {  # (``method``: the registered token methods, `synthaug.token_methods.method_names`)
    "run.executor": ("auto", "ray", "local"),
    "shards.image_format": ("png", "jpg", "webp"),
    "dct.select": ("min_loss", "last", "val"),
    "dct.patience_metric": ("loss", "val"),
    "dct.lr_schedule": ("constant", "cosine"),
    "dct.trust": ("off", "warn", "fallback"),
    "dct.trust_features": ("guide", "clip"),
    "guide_fit.head": ("linear", "prototype"),
    "generate.init": ("noise", "real"),
}


# --------------------------------------------------------------------------------------------------------------------
# Building a config from mappings and overrides
# --------------------------------------------------------------------------------------------------------------------
# Keys that became one top-level key: refused in one line naming it.
MOVED_KEYS = {"mcti.shots": "shots", "generate.shots": "shots", "generate.shots_seed": "shots_seed",
              "dct.trust_shots": "shots"}


def closest_keys(key: str, keys: Iterable[str]) -> list[str]:
    """The (up to 3) keys nearest to a misspelt `key`: what ``--set`` and ``config --explain`` suggest.

    >>> closest_keys("lrr", ["lr", "max_steps", "batch_size"])
    ['lr']
    """
    return difflib.get_close_matches(str(key), sorted(keys), n=3, cutoff=0.5)


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise UserError(f"Config key {prefix}{bad[0]!r} is not a string: config keys are field names such as "
                        f"{prefix}{min(names)}. Fix or remove it.")
    moved = [prefix + k for k in data if prefix + k in MOVED_KEYS]
    if moved:
        raise UserError(f"`{moved[0]}` is now the top-level `{MOVED_KEYS[moved[0]]}` (one setting for the user's k "
                        f"real images, read by every stage): use `{MOVED_KEYS[moved[0]]}: ...` in YAML, or --set "
                        f"{MOVED_KEYS[moved[0]]}=... / --{MOVED_KEYS[moved[0]].replace('_', '-')}.")
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"section `{prefix[:-1]}`" if prefix else "the config"
        near = closest_keys(unknown[0], names)
        hint = f"did you mean {', '.join(prefix + k for k in near)}? " if near else ""
        raise UserError(
            f"Unknown config key(s) {', '.join(prefix + k for k in unknown)} in {where}: {hint}valid keys are "
            f"{', '.join(sorted(names))}. Fix the spelling or remove them."
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"`{prefix}{name}` must be a mapping of its fields but is {value!r}.")
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    if not isinstance(key, str):
        raise UserError(f"Config key {key!r} is not a string: config keys are field names such as dct.lr.")
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise UserError(f"`--set {key}`: `{p}` is not a section.")
    node[parts[-1]] = value


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["dct.lr=0.001", "per_class=10"]`` -> ``{"dct.lr": 0.001, "per_class": 10}`` (values parsed as YAML)."""
    import yaml

    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"`--set` expects key=value but got {pair!r}: e.g. `--set dct.lr=0.001`.")
        key, raw = pair.split("=", 1)
        if not key.strip() or any(not part.strip() for part in key.split(".")):
            raise UserError(f"`--set` {pair!r} has an empty key{' part' if key.strip() else ''}: name the setting "
                            f"before the '=', e.g. `--set dct.lr=0.001`.")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _safe_load_unique(text: str) -> Any:
    """`yaml.safe_load`, except that a mapping giving one key twice is an error (YAML's last-wins would silently drop
    the first value)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in seen:
                    raise yaml.YAMLError(f"key {key!r} is given twice (lines {seen[key]} and {line}): keep one")
                if isinstance(key, (str, int, float, bool)):
                    seen[key] = line
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: plain data only


def load_config(
    path: str | os.PathLike | None = None,
    overrides: dict[str, Any] | None = None,
    *,
    preset: str | None = None,
) -> BuildConfig:
    """Resolve a `BuildConfig`: defaults <- dataset and method defaults <- preset <- YAML file <- overrides, then validate.

    >>> cfg = load_config(overrides={"per_class": 10, "dct.lr": 1e-3})
    >>> cfg.dct.learning_rate
    0.001
    """
    import yaml

    data: dict[str, Any] = {}
    file_data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"`--config` {str(path)!r} does not exist: pass a YAML file such as configs/digits.yaml.")
        try:
            file_data = _safe_load_unique(p.read_text()) or {}
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"`--config` {str(path)!r} cannot be read ({e}): pass a YAML text file.") from None
        except yaml.YAMLError as e:
            raise UserError(f"`--config` {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}.") from None
        if not isinstance(file_data, dict):
            raise UserError(f"`--config` {str(path)!r} must hold a mapping of config keys, not {type(file_data).__name__}.")
        bad = _non_string_key(file_data)
        if bad is not None:
            raise UserError(f"`--config` {str(path)!r}: key {bad} is not a string; config keys are field names such "
                            f"as per_class or dct.lr. Fix or remove it.")
    dataset = (overrides or {}).get("dataset", file_data.get("dataset", BuildConfig.dataset))
    ds_defaults = dict(DATASET_DEFAULTS.get(dataset, {}) if isinstance(dataset, str) else {})
    preset = preset or file_data.pop("preset", None) or ds_defaults.pop("preset", None)
    ds_defaults.pop("preset", None)
    for k, v in ds_defaults.items():
        _set_dotted(data, k, v)
    method = (overrides or {}).get("method", file_data.get("method", BuildConfig.method))
    for k, v in METHOD_DEFAULTS.get(method, {}).items() if isinstance(method, str) else ():
        _set_dotted(data, k, v)
    if preset is not None:
        if not isinstance(preset, str) or preset not in PRESETS:
            raise UserError(f"`preset` must be one of {', '.join(PRESETS)} but is {preset!r}.")
        variant = PRESET_VARIANTS.get(preset, {}).get(dataset) if isinstance(dataset, str) else None
        for k, v in (variant if variant is not None else PRESETS[preset]).items():
            _set_dotted(data, k, v)
    seeds = (overrides or {}).get("seeds", file_data.get("seeds"))
    if seeds is not None:
        if not isinstance(seeds, str) or seeds not in SEED_SETS:
            raise UserError(f"`seeds` must be one of {', '.join(SEED_SETS)} (or null) but is {seeds!r}.")
        for k, v in SEED_SETS[seeds].items():
            _set_dotted(data, k, v)
    _merge(data, file_data)
    for k, v in (overrides or {}).items():
        _set_dotted(data, k, v)
    if "out" not in data and isinstance(dataset, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", dataset):
        data["out"] = f"out/{dataset}"  # a cub build does not land in out/digits
    cfg = _build(BuildConfig, data)
    validate(cfg)
    return cfg


def _non_string_key(data: dict, prefix: str = "") -> str | None:
    """The dotted name of the first key that is not a string (YAML reads ``1:`` as an integer key), or None."""
    for k, v in data.items():
        if not isinstance(k, str):
            return f"{prefix}{k}"
        if isinstance(v, dict):
            bad = _non_string_key(v, f"{prefix}{k}.")
            if bad is not None:
                return bad
    return None


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def get(cfg: Any, dotted: str) -> Any:
    for p in dotted.split("."):
        cfg = getattr(cfg, p)
    return cfg


# Numbers where zero means nothing to do (every other number may be 0); None, where allowed, means "the default".
POSITIVE = ("per_class", "dct.max_steps", "dct.batch_size", "dct.num_inference_steps", "dct.val_batch_size",
            "dct.val_every", "dct.extend_window", "dct.lr", "dct.micro_batch", "dct.trust_images",
            "dct.classes_per_batch", "generate.batch_size", "generate.num_inference_steps", "generate.max_attempts",
            "shots", "dct.num_vectors", "mcti.num_vectors", "guide_fit.strength",
            "shards.samples_per_shard", "mcti.batch_size", "mcti.lr", "mcti.scale",
            "run.cpus_per_worker", "run.num_workers", "run.max_in_flight")

# Seeds are hashed into int64 noise seeds and stored in int64 columns.
SEED_LIMIT = 2**63

# The most images a build makes per class, and the most shards one class's images may take: the plan lists every
# shard (and plan.json holds it), so a mistyped --per-class must be refused, not enumerated until memory runs out.
MAX_PER_CLASS = 10_000_000
MAX_SHARDS_PER_CLASS = 100_000

# Upper bounds of counts where a larger value can only be a mistake (a typo runs for hours before failing), with what
# each counts: well above any real run (a batch of 4,096 seeds at 512 px is ~100 GiB of activations).
MAX_COUNTS = {
    **dict.fromkeys(("dct.batch_size", "dct.val_batch_size", "dct.micro_batch", "dct.classes_per_batch",
                     "dct.trust_images", "generate.batch_size", "mcti.batch_size"), (4_096, "a batch")),
    **dict.fromkeys(("dct.max_steps", "dct.extend_steps", "dct.extend_window", "dct.val_every", "dct.patience",
                     "mcti.steps", "mcti.extra_steps"), (10_000_000, "updates")),
    **dict.fromkeys(("dct.num_inference_steps", "generate.num_inference_steps"), (10_000, "denoising steps")),
    **dict.fromkeys(("dct.height", "dct.width", "generate.height", "generate.width"), (16_384, "pixels")),
    "shots": (1_000_000, "images per class"), "generate.max_attempts": (10 * MAX_PER_CLASS, "seeds per class"),
    "dct.augment": (4_096, "augmented views per image"),
    "shards.samples_per_shard": (MAX_PER_CLASS, "images per shard"),
    "run.num_workers": (100_000, "workers"), "run.max_in_flight": (1_000_000, "jobs"),
    "run.max_retries": (1_000, "retries"), "run.cpus_per_worker": (4_096, "CPUs"),
}

# Strings that name something and so cannot be empty.
NON_EMPTY = ("dataset", "split", "model", "device", "dtype", "guide", "out", "dct.init_token", "mcti.init_token",
             "generate.prompt")


def check_dct_levers(dct: DCTConfig) -> None:
    """The rules of DCT's keep/stop/step-size levers that tie fields together. Raises `UserError`."""
    for key in ("patience_metric", "lr_schedule"):  # also checked here: a DCTConfig built in code skips `validate`
        if getattr(dct, key) not in VALID[f"dct.{key}"]:
            raise UserError(f"`dct.{key}` must be one of {', '.join(VALID[f'dct.{key}'])} but is "
                            f"{getattr(dct, key)!r}.")
    if not 0.0 <= dct.lr_floor <= 1.0:
        raise UserError(f"`dct.lr_floor` must be in [0, 1] (a fraction of dct.lr) but is {dct.lr_floor!r}.")
    if dct.extend_steps < 0 or dct.extend_window <= 0:
        raise UserError(f"`dct.extend_steps` must be >= 0 and `dct.extend_window` > 0 but are {dct.extend_steps!r} "
                        f"and {dct.extend_window!r}.")
    for key, on in (("patience_metric", dct.patience_metric == "val"), ("extend_steps", dct.extend_steps > 0)):
        if on and dct.select != "val":
            raise UserError(f"`dct.{key}` {getattr(dct, key)!r} reads the validation score, which only "
                            f"dct.select=val measures: set dct.select=val too.")


def check_generate_levers(gen: GenerateConfig) -> None:
    """The rules of generation's prompt-variety and real-anchored levers. Raises `UserError`."""
    for p in gen.prompts:
        if not isinstance(p, str) or "{token}" not in p:
            raise UserError(f"`generate.prompts` entry {p!r} has no {{token}} placeholder: add one where the class "
                            f"token goes, e.g. 'A sketch of {{token}} {{label}}'.")
    if gen.keep_confidence is not None and not 0.0 <= gen.keep_confidence < 1.0:
        raise UserError(f"`generate.keep_confidence` must be in [0, 1) (a guide probability; null keeps every image) "
                        f"but is {gen.keep_confidence!r}.")
    if gen.init not in VALID["generate.init"]:
        raise UserError(f"`generate.init` must be one of {', '.join(VALID['generate.init'])} but is {gen.init!r}.")
    if gen.init != "real":
        return  # the strength is read only when an image starts from a real one
    s, steps = gen.strength, gen.num_inference_steps
    if len(s) not in (1, 2) or not all(0 < v <= 1 for v in s) or s[0] > s[-1]:
        raise UserError(f"`generate.strength` must be one value in (0, 1] or a range [low, high] with 0 < low <= high "
                        f"<= 1 but is {list(s)!r}: e.g. 0.75 or [0.5, 0.9].")
    if not strength_steps(s, steps):
        raise UserError(f"`generate.strength` {list(s)!r} leaves no denoising step at generate.num_inference_steps "
                        f"{steps} (img2img denoises int(strength x steps) steps, at least 1): raise the strength or "
                        f"the steps, e.g. strength {max(s[-1], 1 / steps):.2f}.")


def strength_steps(strength: tuple[float, ...], num_inference_steps: int) -> list[int]:
    """The denoising step counts an image may draw: ``int(strength * T)`` for one value, every whole count in
    ``[low * T, high * T]`` for a range (none below 1).

    >>> strength_steps((0.5, 0.9), 10)
    [5, 6, 7, 8, 9]
    """
    t = num_inference_steps
    if len(strength) == 1:
        n = min(int(t * strength[0]), t)
        return [n] if n >= 1 else []
    lo, hi = math.ceil(strength[0] * t - 1e-9), math.floor(strength[1] * t + 1e-9)
    return list(range(max(lo, 1), min(hi, t) + 1))


def validate(cfg: BuildConfig) -> None:
    """Every rule that can be checked without data or models. Raises `UserError`.

    Every value has its declared type (a config made in code never went through the YAML reader), every number is
    finite and >= 0, and the rules below hold; what needs the data, the models or the machine (dataset root, class
    selection, model and guide paths, dtype, a CUDA device) is `synthaug.builder.validate`'s.
    """
    _check_types(cfg, "")
    check_dataset_name(cfg.dataset)  # a misspelt name is refused here, before the CLI imports torch
    for key, valid in {"method": method_names(), **VALID}.items():
        v = get(cfg, key)
        if v not in valid:
            raise UserError(f"`{key}` must be one of {', '.join(valid)} but is {v!r}.")
    for key in POSITIVE:
        v = get(cfg, key)
        if v is not None and v <= 0:
            default = {"dct.lr": " (or null for 0.00025 x batch_size)", "run.num_workers": " (or null for one per GPU)",
                       "dct.micro_batch": " (or null for the whole batch)",
                       "run.max_in_flight": " (or null for one per worker)",
                       "guide_fit.strength": " (or null: chosen by leave-one-out on the shots)",
                       "generate.batch_size": " (or auto to fit the GPU's free memory)",
                       "dct.classes_per_batch": " (or auto to fit the GPU's free memory)"}.get(key, "")
            raise UserError(f"`{key}` must be > 0{default} but is {v!r}.")
    for key, value in flatten(to_dict(cfg)).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            raise UserError(f"`{key}` must be >= 0 but is {value!r}.")
    for key, (limit, what) in MAX_COUNTS.items():
        v = get(cfg, key)
        if isinstance(v, int) and not isinstance(v, bool) and v > limit:
            raise UserError(f"`{key}` must be <= {limit:,} ({what}) but is {v:,}: a value that large can only be a "
                            f"mistake; pass e.g. {key}={get(type(cfg)(), key) or 1}.")
    if cfg.per_class > MAX_PER_CLASS:
        raise UserError(f"`per_class` must be <= {MAX_PER_CLASS:,} (images per class) but is {cfg.per_class:,}: "
                        f"pass the number of images each class should get, e.g. --per-class 1000.")
    if -(-cfg.per_class // cfg.shards.samples_per_shard) > MAX_SHARDS_PER_CLASS:
        raise UserError(f"`shards.samples_per_shard` {cfg.shards.samples_per_shard} gives "
                        f"{-(-cfg.per_class // cfg.shards.samples_per_shard):,} shards per class for per_class "
                        f"{cfg.per_class:,}; at most {MAX_SHARDS_PER_CLASS:,} are planned: raise "
                        f"shards.samples_per_shard (e.g. 1000).")
    for key in ("dct.seed", "mcti.seed", "generate.seed"):
        if get(cfg, key) >= SEED_LIMIT:
            raise UserError(f"`{key}` must be < 2**63 (seeds are stored as int64) but is {get(cfg, key)}.")
    for key in NON_EMPTY:
        if not get(cfg, key).strip():
            raise UserError(f"`{key}` must not be empty.")
    if cfg.run.ray_address is not None and not cfg.run.ray_address.strip():
        raise UserError("`run.ray_address` must be null or an address ('auto', 'ray://host:10001') but is ''.")
    if cfg.seeds is not None:
        if cfg.seeds not in SEED_SETS:
            raise UserError(f"`seeds` must be one of {', '.join(SEED_SETS)} (or null) but is {cfg.seeds!r}.")
        for key, value in SEED_SETS[cfg.seeds].items():
            if get(cfg, key) != value:
                raise UserError(f"`seeds` is {cfg.seeds!r}, which fixes {key} to {value}, but {key} is "
                                f"{get(cfg, key)!r}: drop the {key} override, or set seeds to null.")
    if not 1 <= cfg.shards.quality <= 100:
        raise UserError(f"`shards.quality` must be in 1..100 but is {cfg.shards.quality!r}.")
    timeout = cfg.run.job_timeout_s
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float("inf"):
        raise UserError(f"`run.job_timeout_s` must be a number of seconds > 0 but is {timeout!r}: e.g. "
                        f"--set run.job_timeout_s=3600.")
    check_dct_levers(cfg.dct)
    if not 1 <= cfg.dct.grad_steps <= cfg.dct.num_inference_steps:
        raise UserError(
            f"`dct.grad_steps` must be between 1 and dct.num_inference_steps ({cfg.dct.num_inference_steps}) "
            f"but is {cfg.dct.grad_steps}."
        )
    for sec in ("dct", "generate"):
        h, w = get(cfg, f"{sec}.height"), get(cfg, f"{sec}.width")
        if h % 8 or w % 8 or h <= 0 or w <= 0:
            raise UserError(
                f"`{sec}.height` and `{sec}.width` have to be positive and divisible by 8 but are {h} and {w}: "
                f"use e.g. {max(8, h // 8 * 8)}."
            )
    if not 0 <= cfg.mcti.flip_p <= 1:
        raise UserError(f"`mcti.flip_p` must be in [0, 1] (a probability) but is {cfg.mcti.flip_p!r}.")
    if not 0 <= cfg.dct.patience_min_accuracy <= 1:
        raise UserError(f"`dct.patience_min_accuracy` must be in [0, 1] but is {cfg.dct.patience_min_accuracy!r}.")
    if cfg.mcti.alpha == 0 and cfg.mcti.beta == 0:
        raise UserError("`mcti.alpha` and `mcti.beta` are both 0, which leaves no loss to train on: set mcti.alpha "
                        "to 1 (plain TI) or both to 1 (MC-TI).")
    if not cfg.dct.prompts:
        raise UserError("`dct.prompts` must hold at least one prompt, e.g. ['A photo of {token} {label}'].")
    for p in cfg.dct.prompts:
        if "{token}" not in p:
            raise UserError(f"`dct.prompts` entry {p!r} has no {{token}} placeholder: add one where S_c goes.")
    if cfg.dct.trust != "off" and cfg.method != "dct":
        raise UserError(f"`dct.trust` {cfg.dct.trust!r} checks DCT tokens, but `method` is {cfg.method!r}: set "
                        "dct.trust=off, or method=dct.")
    if "{token}" not in cfg.generate.prompt:
        raise UserError(f"`generate.prompt` {cfg.generate.prompt!r} has no {{token}} placeholder: add one.")
    check_generate_levers(cfg.generate)
    for p in cfg.generate.prompts:
        if cfg.baseline and "{label}" not in p and parse_guide_target(cfg.guide_target).is_class:
            raise UserError(f"`baseline` needs a class name in every `generate.prompts` entry but {p!r} has no "
                            f"{{label}}: add one, or drop --baseline.")
    if cfg.baseline and "{label}" not in cfg.generate.prompt and parse_guide_target(cfg.guide_target).is_class:
        raise UserError(f"`baseline` needs a class name in `generate.prompt` {cfg.generate.prompt!r} (the plain prompt "
                        f"is that prompt without the token): add {{label}}, e.g. 'A photo of {{token}} {{label}}', or "
                        f"drop --baseline.")
    if cfg.guide_target is not None and not parse_guide_target(cfg.guide_target).is_class and cfg.method != "dct":
        raise UserError(f"`guide_target` {cfg.guide_target!r} steers a DCT guide, but `method` is {cfg.method!r}: "
                        f"use method dct, or drop guide_target.")
    if "fit" in [s.strip() for s in cfg.guide.split(",")] and cfg.method != "dct":
        raise UserError(f"`guide` 'fit' fits a few-shot guide that steers DCT tokens, but `method` is {cfg.method!r} "
                        f"(it learns from the real images directly): use method dct, or drop --guide fit.")
    check_scheduler(cfg.scheduler, cfg.timestep_spacing)
    if cfg.classes is not None and not re.fullmatch(r"[^,]+(,[^,]+)*", cfg.classes):
        raise UserError(f"`classes` must be like '0-9,17' or 'name1,name2' but is {cfg.classes!r}.")


def _check_types(obj: Any, prefix: str) -> None:
    """Every field holds its declared type: what `_coerce` gives back unchanged, with the same type."""
    if not is_dataclass(obj):
        raise UserError(f"`{prefix[:-1] or 'config'}` must be a section of the config but is {short(obj)}.")
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value, tp, key = getattr(obj, f.name), hints[f.name], prefix + f.name
        if is_dataclass(tp):
            _check_types(value, key + ".")
            continue
        coerced = coerce(value, tp, key)
        if type(coerced) is not type(value) or coerced != value:
            raise UserError(f"`{key}` must be of type {getattr(tp, '__name__', tp)} but is {short(value)}.")


# --------------------------------------------------------------------------------------------------------------------
# Writing and comparing
# --------------------------------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) — what ``out/config.yaml`` holds."""
    def conv(v):
        if is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def diff(a: BuildConfig | dict, b: BuildConfig | dict, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (the keys in `ignore` and below are skipped)."""
    fa = flatten(a if isinstance(a, dict) else to_dict(a))
    fb = flatten(b if isinstance(b, dict) else to_dict(b))
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys if fa.get(k) != fb.get(k) and not any(k == i or k.startswith(i + ".") for i in ignore)]


def resolve_auto(cfg: BuildConfig, *, cuda: bool) -> BuildConfig:
    """`cfg` with the switches whose None means "on with CUDA, off elsewhere" (``generate.compile``,
    ``channels_last``) set to what they are on a machine with (`cuda` True) or without CUDA, and without CUDA
    ``dct.classes_per_batch`` auto set to the 1 it is there.

    A resume compares what the work would do: a folder written before a switch became ``auto`` (its config.yaml
    says ``compile: false``) resumes on a CPU machine, where auto is off, as it was made.
    """
    on = cuda and cfg.device != "cpu"
    generate = cfg.generate if cfg.generate.compile is not None else replace(cfg.generate, compile=on)
    channels_last = on if cfg.channels_last is None else cfg.channels_last
    dct = cfg.dct if on or cfg.dct.classes_per_batch is not None else replace(cfg.dct, classes_per_batch=1)
    return replace(cfg, generate=generate, channels_last=channels_last, dct=dct)


def dump_yaml(cfg: BuildConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(data: dict[str, Any]) -> BuildConfig:
    """Inverse of `to_dict` (used to read ``out/config.yaml`` back)."""
    return _build(BuildConfig, data)


__all__ = [
    "PRESETS",
    "PRESET_VARIANTS",
    "SEED_SETS",
    "BuildConfig",
    "DCTConfig",
    "GenerateConfig",
    "MCTIConfig",
    "RunConfig",
    "ShardConfig",
    "diff",
    "dump_yaml",
    "from_dict",
    "load_config",
    "parse_overrides",
    "replace",
    "resolve_auto",
    "to_dict",
    "validate",
]
