"""Generation: pipeline + tokens + prompt template + seeds -> images with per-sample metadata.

Consumes a stock `StableDiffusionPipeline` whose tokenizer already knows the class tokens (`synthaug.tokens.add_tokens`
or diffusers' own ``pipe.load_textual_inversion``) and produces `GeneratedImage`s: the PIL image plus everything an
index row records (ARCHITECTURE.md, "The build folder"). Each image has its own ``torch.Generator`` seeded by
`image_seed`, so an image's pixels depend only on (seed, class, index, prompt, token, settings) — not on the batch it
was generated in, nor on the worker that made it. The plain-prompt baseline (``token=None``, method ``"sd"``) uses the identical seeds, so a DCT
image and its baseline differ only by the token.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import GenerateConfig
from .errors import UserError
from .tokens.text import embedding_sha256, render_prompt

if TYPE_CHECKING:
    import PIL.Image
    import torch
    from diffusers import StableDiffusionPipeline


def image_seed(seed: int, class_index: int, index: int) -> int:
    """The noise seed of image `index` of class `class_index`: stable across processes, machines and Python versions.

    A hash (not ``seed + index``) so that neighbouring classes never share noise, and the value fits in int64 (the
    index column type) and in ``torch.Generator.manual_seed``.

    >>> image_seed(0, 3, 7) == image_seed(0, 3, 7) != image_seed(0, 3, 8)
    True
    """
    digest = hashlib.sha256(f"synthaug-image:{int(seed)}:{int(class_index)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # [0, 2**63)


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
    progress: bool = False,
) -> list[GeneratedImage]:
    """Generate images `indices` of one class with the stock pipeline ``__call__``.

    Args:
        pipe: a `StableDiffusionPipeline`; `token`, if given, must already be in its tokenizer.
        class_index: the class's index (part of every image's seed).
        label: the clean class name that fills ``{label}``.
        token: the class token (e.g. ``"<synthaug-000>"``), or None for the plain-prompt baseline.
        indices: which images of the class to make; image ``i`` always gets seed ``image_seed(config.seed, class, i)``.
        config: prompt template, steps, guidance, size, batch size, base seed.
        method: recorded in the metadata; default ``"dct"`` with a token, ``"sd"`` without.
        classifier: optional guide; fills `guide_prob` / `guide_top5`, scored on the 8-bit image as saved.
        progress: show a tqdm bar over batches.

    Returns:
        One `GeneratedImage` per index, in the order of `indices`.

    >>> images = generate(pipe, class_index=3, label="three", token="<synthaug-003>", indices=range(8))
    """
    import torch

    # 1. Check inputs
    if not isinstance(label, str) or not label.strip():
        raise UserError(f"`label` must be a non-empty class name but is {label!r}.")
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
    if config.batch_size <= 0:
        raise UserError(f"`batch_size` must be > 0 but is {config.batch_size}.")
    token_sha = None
    if token is not None:
        if token not in pipe.tokenizer.get_added_vocab():
            raise UserError(
                f"`token` {token!r} is not in the pipeline's tokenizer: add it first with "
                f"synthaug.tokens.add_tokens(pipe, load_tokens(path)) or pipe.load_textual_inversion(path)."
            )

        token_id = pipe.tokenizer.convert_tokens_to_ids(token)
        token_sha = embedding_sha256(pipe.text_encoder.get_input_embeddings().weight[token_id])
    method = method or ("dct" if token is not None else "sd")
    prompt = render_prompt(config.prompt, label, token)
    model_id = str(getattr(pipe, "synthaug_model_id", None) or pipe.config.get("_name_or_path", "") or "unknown")

    # 2. Generate in batches; one CPU generator per image, so the noise is the same on every device and batch size
    out: list[GeneratedImage] = []
    batches = [indices[i : i + config.batch_size] for i in range(0, len(indices), config.batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(indices), desc=f"generate {method} {label}", unit="img")
    try:
        for batch in batches:
            seeds = [image_seed(config.seed, class_index, i) for i in batch]
            generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
            result = pipe(
                prompt=[prompt] * len(batch), num_inference_steps=config.num_inference_steps,
                guidance_scale=config.guidance_scale, height=config.height, width=config.width,
                generator=generators, output_type="np",
            )
            # Exactly the pipeline's own PIL conversion (round to 8 bit), so these are the bytes output_type="pil"
            # would give; the guide scores the same 8-bit pixels a later reader of the PNG sees.
            pils = pipe.image_processor.numpy_to_pil(result.images)
            probs = top5 = None
            if classifier is not None:
                probs, top5 = _score(classifier, pils, class_index)

            # 3. Record per-sample metadata
            for j, (i, seed, image) in enumerate(zip(batch, seeds, pils)):
                out.append(GeneratedImage(
                    image=image, class_index=class_index, class_name=label, method=method, index=i, prompt=prompt,
                    seed=seed, token_sha256=token_sha, model_id=model_id, scheduler=type(pipe.scheduler).__name__,
                    steps=config.num_inference_steps, guidance_scale=float(config.guidance_scale),
                    height=config.height, width=config.width,
                    guide_prob=None if probs is None else probs[j], guide_top5=None if top5 is None else top5[j],
                ))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return out


def _score(classifier: torch.nn.Module, images: list, class_index: int) -> tuple[list[float], list[list[int]]]:
    """Target-class probability and top-5 classes of 8-bit PIL images under `classifier` (images in [0, 1])."""
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
    return probs[:, class_index].tolist(), top.tolist()
