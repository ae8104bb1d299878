"""Generation: pipeline + tokens + prompt template + seeds -> images with per-sample metadata.

Consumes a stock `StableDiffusionPipeline` whose tokenizer already knows the class tokens (`synthaug.tokens.add_tokens`
or diffusers' own ``pipe.load_textual_inversion``) and produces `GeneratedImage`s: the PIL image plus everything an
index row records (ARCHITECTURE.md, "The build folder"). Each image has its own ``torch.Generator`` seeded by
`image_seed`, so an image's pixels depend only on (seed, class, index, prompt, token, settings) — not on the batch it
was generated in, nor on the worker that made it. The plain-prompt baseline (``token=None``, method ``"sd"``) uses the identical seeds, so a DCT
image and its baseline differ only by the token.

What is here: `generate`, `image_seed`, `image_draw` (per-image draws of template, start image and strength);
`real_start_images` (real starts through diffusers' `StableDiffusionImg2ImgPipeline.from_pipe`); the batch from free
CUDA memory (`batch_size_for`, `probe_memory`; the arithmetic in `synthaug.device`); the UNet compiled for
generation, by default on CUDA (`compiles`, `compile_unet`, `use_unet`), its code cached on disk
(`compile_cache_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import GenerateConfig, check_generate_levers, strength_steps
from .datasets.fewshot import few_shot_indices
from .device import auto_batch_size, free_cuda_memory
from .errors import UserError
from .tokens.text import embedding_sha256, render_prompt, vector_ids

if TYPE_CHECKING:
    import PIL.Image
    import torch
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)


def image_seed(seed: int, class_index: int, index: int) -> int:
    """The noise seed of image `index` of class `class_index`: stable across processes, machines and Python versions.

    A hash (not ``seed + index``) so that neighbouring classes never share noise, and the value fits in int64 (the
    index column type) and in ``torch.Generator.manual_seed``.

    >>> image_seed(0, 3, 7) == image_seed(0, 3, 7) != image_seed(0, 3, 8)
    True
    """
    digest = hashlib.sha256(f"synthaug-image:{int(seed)}:{int(class_index)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # [0, 2**63)


def image_draw(purpose: str, seed: int, class_index: int, index: int, n: int) -> int:
    """A choice among `n` for image `index` of class `class_index` (its prompt template, its real source image, its
    strength): a pure function of these values, so a resumed or re-batched build draws the same, and each purpose
    draws independently of the others and of the image's noise.

    >>> image_draw("prompt", 0, 3, 7, 4) == image_draw("prompt", 0, 3, 7, 4)
    True
    """
    digest = hashlib.sha256(f"synthaug-{purpose}:{int(seed)}:{int(class_index)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % int(n)


@dataclass
class GeneratedImage:
    """One generated image and the metadata its index row records (ARCHITECTURE.md, "The build folder")."""

    image: PIL.Image.Image
    class_index: int
    class_name: str
    method: str  # "dct" | "sd" | "ti" | "mcti"
    index: int  # position of the image within its class (its seed is image_seed(config.seed, class_index, index))
    prompt: str
    seed: int
    token_sha256: str | None  # sha256 of the token's fp32 embedding as the text encoder holds it; None for "sd"
    model_id: str
    scheduler: str
    steps: int
    guidance_scale: float
    height: int
    width: int
    guide_prob: float | None  # probability the guide classifier gives the target class (None without a classifier)
    guide_top5: list[int] | None  # the guide's five most likely classes, most likely first
    # The scheduler's diffusers config as JSON (`scheduler_config_json`): with the rest of the row, what a stock
    # pipeline needs to make the same image again.
    scheduler_config: str | None = None
    # the guide's soft label, compact: its `generate.soft_top_k` most likely classes (most likely first), then the
    # target class when it is not among them, with their probabilities (None without a classifier)
    guide_soft_classes: list[int] | None = None
    guide_soft_probs: list[float] | None = None
    # Levers' records, None when the lever is off (the index then has no such column)
    prompt_index: int | None = None  # which of generate.prompts the image drew
    init_index: int | None = None  # generate.init "real": the real image it started from, its index in the split
    strength: float | None = None  # generate.init "real": the img2img strength it was denoised from


def generate(
    pipe: StableDiffusionPipeline,
    *,
    class_index: int,
    label: str,
    token: str | None,
    indices: Sequence[int],
    config: GenerateConfig = GenerateConfig(),  # noqa: B008 (frozen, so a shared default is safe)
    method: str | None = None,
    classifier: torch.nn.Module | None = None,
    init_images: Mapping[int, PIL.Image.Image] | None = None,
    progress: bool = False,
) -> list[GeneratedImage]:
    """Generate images `indices` of one class with the stock pipeline ``__call__``.

    With ``config.init == "real"`` each image starts from one of `init_images` instead of pure noise, through
    diffusers' ``StableDiffusionImg2ImgPipeline`` built on the same loaded modules (``from_pipe``); with
    ``config.prompts`` each image draws its prompt template. Every draw is a function of the image's seed
    (`image_draw`), so neither the batch nor the worker changes an image.

    Args:
        pipe: a `StableDiffusionPipeline`; `token`, if given, must already be in its tokenizer (a multi-vector
            token with its ``<token>_1``... vectors, which the pipeline puts in the prompt itself).
        class_index: the class's index (part of every image's seed).
        label: the clean class name that fills ``{label}``; ``""`` for a prompt without one (attribute tokens).
        token: the class token (e.g. ``"<synthaug-000>"``), or None for the plain-prompt baseline.
        indices: which images of the class to make; image ``i`` always gets seed ``image_seed(config.seed, class, i)``.
        config: prompt template(s), steps, guidance, size, batch size (None: `batch_size_for` picks it), base seed,
            init and strength.
        method: recorded in the metadata; default ``"dct"`` with a token, ``"sd"`` without.
        classifier: optional guide; fills `guide_prob`, `guide_top5` and the soft label (`guide_soft_classes`,
            `guide_soft_probs`: the top `config.soft_top_k` classes and the target), scored on the 8-bit image as
            saved.
        init_images: with ``config.init == "real"``, the class's real images by their index in the dataset split
            (resized to the config's size); each image starts from one of them.
        progress: show a tqdm bar over batches.

    Returns:
        One `GeneratedImage` per index, in the order of `indices`.

    >>> images = generate(pipe, class_index=3, label="three", token="<synthaug-003>", indices=range(8))
    """
    import numpy as np
    import torch

    # 1. Check inputs
    templates = list(config.prompts) or [config.prompt]
    if not isinstance(label, str) or (not label.strip() and any("{label}" in t for t in templates)):
        raise UserError(f"`label` must be a non-empty class name but is {label!r} (only a prompt without {{label}}, "
                        f"such as an attribute token's 'A photo of {{token}}', takes an empty one).")
    indices = list(indices)
    if not indices:
        raise UserError("`indices` is empty: pass the image indices to generate, e.g. range(100).")
    bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int) or i < 0]
    if bad:
        raise UserError(f"`indices` must be non-negative integers but contains {bad[0]!r}: pass e.g. range(100).")
    if config.height % 8 or config.width % 8 or config.height <= 0 or config.width <= 0:
        raise UserError(
            f"`height` and `width` have to be positive and divisible by 8 but are {config.height} and {config.width}."
        )
    if config.batch_size is not None and (isinstance(config.batch_size, bool) or not isinstance(config.batch_size, int)
                                          or config.batch_size <= 0):
        raise UserError(f"`generate.batch_size` must be an integer > 0 or null (auto) but is {config.batch_size!r}.")
    check_generate_levers(config)
    sources: list[tuple[int, PIL.Image.Image]] = []
    if config.init == "real":
        if not init_images:
            raise UserError("`init_images` is empty but generate.init is 'real', which starts each image from one of "
                            "the class's real images: pass them as {index_in_split: PIL image}, or set "
                            "generate.init=noise.")
        sources = [(int(k), _fit(init_images[k], config)) for k in sorted(init_images)]
    token_sha = None
    if token is not None:
        if token not in pipe.tokenizer.get_added_vocab():
            raise UserError(
                f"`token` {token!r} is not in the pipeline's tokenizer: add it first with "
                f"synthaug.tokens.add_tokens(pipe, load_tokens(path)) or pipe.load_textual_inversion(path)."
            )
        rows = pipe.text_encoder.get_input_embeddings().weight[vector_ids(pipe.tokenizer, token)]
        token_sha = embedding_sha256(rows)
    method = method or ("dct" if token is not None else "sd")
    prompts = [render_prompt(t, label, token) for t in templates]
    steps = strength_steps(config.strength, config.num_inference_steps)
    model_id = str(getattr(pipe, "synthaug_model_id", None) or pipe.config.get("_name_or_path", "") or "unknown")
    scheduler_config = scheduler_config_json(pipe.scheduler)

    # 2. Generate in batches; one CPU generator per image, so the noise is the same on every device and batch size
    out: list[GeneratedImage] = []
    batch_size = batch_size_for(pipe, config)
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    img2img = _img2img(pipe) if sources else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc=f"generate {method} {label}", unit="img")
    try:
        for batch in batches:
            plans = [_draw(config, class_index, i, len(prompts), len(sources), steps) for i in batch]
            seeds = [image_seed(config.seed, class_index, i) for i in batch]
            arrays: list[Any] = [None] * len(batch)
            # one pipeline call per strength (img2img takes one per call): a single one without a real start
            for strength in sorted({p.strength for p in plans}, key=lambda v: -1.0 if v is None else v):
                where = [j for j, p in enumerate(plans) if p.strength == strength]
                kwargs = {"prompt": [prompts[plans[j].prompt or 0] for j in where],
                          "num_inference_steps": config.num_inference_steps, "guidance_scale": config.guidance_scale,
                          "generator": [torch.Generator(device="cpu").manual_seed(seeds[j]) for j in where],
                          "output_type": "np"}
                if strength is None:
                    result = pipe(height=config.height, width=config.width, **kwargs)
                else:
                    result = img2img(image=[sources[plans[j].source][1] for j in where], strength=strength, **kwargs)
                for j, array in zip(where, result.images):
                    arrays[j] = array
            # Exactly the pipeline's own PIL conversion (round to 8 bit), so these are the bytes output_type="pil"
            # would give; the guide scores the same 8-bit pixels a later reader of the PNG sees.
            pils = pipe.image_processor.numpy_to_pil(np.stack(arrays))
            probs = top5 = soft = None
            if classifier is not None:
                probs, top5, soft = _score(classifier, pils, class_index, config.soft_top_k)

            # 3. Record per-sample metadata
            for j, (i, seed, image, plan) in enumerate(zip(batch, seeds, pils, plans)):
                out.append(GeneratedImage(
                    image=image, class_index=class_index, class_name=label, method=method, index=i,
                    prompt=prompts[plan.prompt or 0], seed=seed, token_sha256=token_sha, model_id=model_id,
                    scheduler=type(pipe.scheduler).__name__, steps=config.num_inference_steps,
                    guidance_scale=float(config.guidance_scale), height=config.height, width=config.width,
                    guide_prob=None if probs is None else probs[j], guide_top5=None if top5 is None else top5[j],
                    scheduler_config=scheduler_config,
                    guide_soft_classes=None if soft is None else soft[j][0],
                    guide_soft_probs=None if soft is None else soft[j][1],
                    prompt_index=plan.prompt, init_index=None if plan.source is None else sources[plan.source][0],
                    strength=plan.strength,
                ))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return out


def scheduler_config_json(scheduler: Any) -> str:
    """Every setting of a diffusers scheduler as sorted, strict JSON, without diffusers' bookkeeping keys
    (``_class_name``, ``_diffusers_version``): ``type(scheduler).from_config(json.loads(text))`` builds the same
    scheduler.

    JSON has no infinity, and diffusers' own ``scheduler_config.json`` writes ``-Infinity`` (DPM-Solver's
    ``lambda_min_clipped``), which JavaScript, polars and jq do not read. A non-finite setting equal to the
    scheduler's default is left out, so ``from_config`` gives it back; any other is written as the string
    ``"Infinity"``, ``"-Infinity"`` or ``"NaN"`` (``float(value)`` reads it).

    >>> from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    >>> '"timestep_spacing":"leading"' in scheduler_config_json(DDIMScheduler())
    True
    >>> "lambda_min_clipped" in scheduler_config_json(DPMSolverMultistepScheduler())
    False
    """
    import inspect
    import math

    from .jsonfmt import dumps

    defaults = {k: p.default for k, p in inspect.signature(type(scheduler).__init__).parameters.items()}
    config = {}
    for k, v in dict(scheduler.config).items():
        if k.startswith("_"):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            d = defaults.get(k)
            if isinstance(d, float) and (d == v or (math.isnan(d) and math.isnan(v))):
                continue
            v = "NaN" if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
        config[k] = v
    return dumps(config, sort_keys=True, separators=(",", ":"), default=list)


def real_start_images(dataset: Any, shots: int, shots_seed: int, classes: Sequence[int]) -> dict[int, dict[int, Any]]:
    """``generate.init: real``: the start images of each of `classes`, ``{class: {index in the split: image}}``.

    They are the class's `shots` images drawn with `shots_seed` (`few_shot_indices`, all of a class that has fewer):
    the build's ``shots``, the k real images per class that ``SynthAugDataset(shots=k, seed=shots_seed)`` mixes in.
    """
    wanted = set(classes)
    images: dict[int, dict[int, Any]] = {}
    for i in few_shot_indices(dataset.targets, shots, shots_seed, allow_fewer=True):
        target = int(dataset.targets[i])
        if target in wanted:
            images.setdefault(target, {})[i] = dataset[i][0]
    return images


@dataclass(frozen=True)
class _Plan:
    """What an image draws by its seed: its prompt template, its real source image and its strength (None: off)."""

    prompt: int | None
    source: int | None
    strength: float | None


def _draw(config: GenerateConfig, class_index: int, index: int, num_prompts: int, num_sources: int,
          steps: list[int]) -> _Plan:
    prompt = image_draw("prompt", config.seed, class_index, index, num_prompts) if config.prompts else None
    if not num_sources:
        return _Plan(prompt, None, None)
    source = image_draw("init", config.seed, class_index, index, num_sources)
    if len(config.strength) == 1:
        return _Plan(prompt, source, float(config.strength[0]))
    n, t = steps[image_draw("strength", config.seed, class_index, index, len(steps))], config.num_inference_steps
    strength = n / t
    while int(t * strength) < n:  # the float n / t may land a hair below n steps (0.29 * 100 = 28.999...)
        strength = math.nextafter(strength, 2.0)
    return _Plan(prompt, source, strength)


def _fit(image: PIL.Image.Image, config: GenerateConfig) -> PIL.Image.Image:
    """A real start image as the pipeline takes it: RGB at the config's size (bicubic, PIL's deterministic resize)."""
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (config.width, config.height):
        image = image.resize((config.width, config.height), Image.Resampling.BICUBIC)
    return image


def _img2img(pipe: StableDiffusionPipeline):
    """diffusers' img2img pipeline on `pipe`'s very modules (its UNet as it is now, a compiled one included)."""
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    img2img.set_progress_bar_config(**getattr(pipe, "_progress_bar_config", {}))
    return img2img


def _score(classifier: torch.nn.Module, images: list, class_index: int, top_k: int = 5
           ) -> tuple[list[float], list[list[int]], list[tuple[list[int], list[float]]]]:
    """Target-class probability, top-5 classes and the soft label (top `top_k` classes plus the target, with their
    probabilities) of 8-bit PIL images under `classifier` (images in [0, 1])."""
    import numpy as np
    import torch

    param = next(iter(classifier.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
    x = (x.float() / 255.0).to(device=device, dtype=dtype)
    with torch.no_grad():
        probs = classifier(x).float().softmax(-1)
    top = probs.topk(min(5, probs.shape[-1]), dim=-1).indices
    soft = []
    for row, ranked in zip(probs, probs.topk(min(top_k, probs.shape[-1]), dim=-1).indices.tolist()):
        classes = ranked if class_index in ranked else [*ranked, class_index]
        soft.append((classes, row[classes].tolist()))
    return probs[:, class_index].tolist(), top.tolist(), soft


# --------------------------------------------------------------------------------------------------------------------
# Batch size from free memory, and a compiled UNet
# --------------------------------------------------------------------------------------------------------------------
CPU_BATCH_SIZE = 8  # `generate.batch_size: null` off CUDA: the batch no longer matters for speed there


def probe_memory(pipe: StableDiffusionPipeline, config: GenerateConfig) -> tuple[int, int]:
    """Bytes one generated image needs beyond the weights, and the part that does not grow with the batch, on CUDA.

    Runs the two calls of a batch that hold the most memory, the UNet (twice the batch with classifier-free
    guidance) and the VAE decode, at batch 1 and 2 at the config's size, and reads the allocator's peak: the
    difference is the per-image cost, the rest the fixed cost. A fraction of a second at 512 px.

    Returns:
        ``(per_image_bytes, fixed_bytes)``.
    """
    import torch

    device = pipe.device
    peaks = []
    for n in (1, 2):
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            latents, t, states = _unet_inputs(pipe, config, n)
            pipe.unet(latents, t, encoder_hidden_states=states, return_dict=False)
            del states
            pipe.vae.decode(latents[:n] / pipe.vae.config.scaling_factor, return_dict=False)
            del latents
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    per_image = max(1, peaks[1] - peaks[0])
    return per_image, max(0, peaks[0] - per_image)


def batch_size_for(pipe: StableDiffusionPipeline, config: GenerateConfig) -> int:
    """The batch `generate` uses: ``config.batch_size``, or, when it is None (``auto``), on CUDA the largest batch
    that fits in free memory (`probe_memory`, `auto_batch_size`) and `CPU_BATCH_SIZE` elsewhere.

    Free memory counts what PyTorch's caching allocator holds but does not use (it is ours to reuse).
    """
    if config.batch_size is not None:
        return config.batch_size
    device = pipe.device
    if device.type != "cuda":
        return CPU_BATCH_SIZE
    per_image, fixed = probe_memory(pipe, config)
    free = free_cuda_memory(device)
    n = auto_batch_size(free, per_image, fixed)
    logger.info("generate.batch_size auto: %d (%.1f GiB free on %s, %.2f GiB per image + %.2f GiB fixed at %dx%d)",
                n, free / 2**30, device, per_image / 2**30, fixed / 2**30, config.height, config.width)
    return n


def _unet_inputs(pipe: StableDiffusionPipeline, config: GenerateConfig, n: int):
    """Latents, timestep and text states of the UNet call the pipeline makes for a batch of `n` images."""
    import torch

    unet, device, dtype = pipe.unet, pipe.device, pipe.unet.dtype
    rows = 2 * n if _uses_cfg(pipe, config) else n
    scale = pipe.vae_scale_factor
    latents = torch.randn(rows, unet.config.in_channels, config.height // scale, config.width // scale,
                          device=device, dtype=dtype)
    states = torch.randn(rows, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim, device=device,
                         dtype=dtype)
    pipe.scheduler.set_timesteps(config.num_inference_steps, device=device)
    return latents, pipe.scheduler.timesteps[0], states


def _uses_cfg(pipe: StableDiffusionPipeline, config: GenerateConfig) -> bool:
    # the pipeline's own rule (StableDiffusionPipeline.do_classifier_free_guidance)
    return config.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None


def batch_sizes(start: int, stop: int, batch_size: int) -> list[int]:
    """Sizes of the batches images ``start..stop-1`` are generated in (every batch full but the last).

    >>> batch_sizes(0, 10, 4)
    [4, 4, 2]
    """
    return [min(batch_size, stop - lo) for lo in range(start, stop, batch_size)]


def compiles(pipe: StableDiffusionPipeline, config: GenerateConfig) -> bool:
    """Whether generation compiles the UNet: ``config.compile``, or when it is None (``auto``) on CUDA only."""
    return config.compile if config.compile is not None else pipe.device.type == "cuda"


COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own setting; where it is set, synthaug keeps to it


def compile_cache_dir() -> str:
    """The folder inductor keeps compiled code in (its FX-graph, autograd and Triton caches): ``$TORCHINDUCTOR_CACHE_DIR``
    where set to another folder than inductor's default, else ``synthaug/torchinductor`` in the user's cache folder
    (``$XDG_CACHE_HOME`` or ``~/.cache``).

    Inductor's own default is a folder in the system's temp directory, which many machines empty at reboot; this one
    persists, so every worker on the machine and every rerun of a build loads the compiled kernels instead of
    compiling them again. It holds nothing but compiled code: deleting it (``rm -rf ~/.cache/synthaug/torchinductor``)
    only makes the next compile slow again.

    >>> compile_cache_dir().endswith("torchinductor")
    True
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    # inductor writes its default into the variable the first time it is asked (importing diffusers' pipelines asks):
    # that value is no one's choice
    chosen = os.environ.get(COMPILE_CACHE_ENV)
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return chosen
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "synthaug", "torchinductor")


def compile_unet(pipe: StableDiffusionPipeline, config: GenerateConfig, sizes: Sequence[int], **options: Any
                 ) -> tuple[torch.nn.Module, float]:
    """``torch.compile`` the pipeline's UNet for generation and compile it now for every batch size in `sizes`.

    The UNet is compiled with static shapes, once per batch size (a class's batches come in at most a few sizes,
    `batch_sizes`), by calling it on inputs of the shapes, dtypes and call signature the pipeline uses; generation
    then never waits for a compile. The pipeline keeps its eager UNet (token learning back-propagates through it):
    swap the compiled one in with `use_unet` while generating. Compiled code is cached in `compile_cache_dir`
    (set for this process unless ``$TORCHINDUCTOR_CACHE_DIR`` names another), so a second worker or a rerun loads it.

    Args:
        options: passed to ``torch.compile`` (e.g. ``mode="max-autotune"``, ``backend="aot_eager"``).

    Returns:
        ``(compiled_unet, seconds)``: the compiled module (it shares the UNet's weights) and the compile time.
    """
    import torch

    os.environ[COMPILE_CACHE_ENV] = compile_cache_dir()  # read by inductor when it first looks for a cached kernel
    compiled = torch.compile(pipe.unet, **{"dynamic": False, **options})
    t0 = time.perf_counter()
    with torch.no_grad():
        for n in sorted(set(sizes), reverse=True):
            latents, t, states = _unet_inputs(pipe, config, n)
            compiled(latents, t, encoder_hidden_states=states, timestep_cond=None, cross_attention_kwargs=None,
                     added_cond_kwargs=None, return_dict=False)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)
    return compiled, time.perf_counter() - t0


@contextlib.contextmanager
def use_unet(pipe: StableDiffusionPipeline, unet: torch.nn.Module | None) -> Iterator[StableDiffusionPipeline]:
    """Run the pipeline with `unet` (e.g. from `compile_unet`) inside the block; None keeps its own."""
    if unet is None:
        yield pipe
        return
    original = pipe.unet
    pipe.unet = unet
    try:
        yield pipe
    finally:
        pipe.unet = original
