"""Few-shot classification with learned tokens (the MC-TI paper's table): accuracy per k over seeds."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..config import MCTIConfig
from ..datasets.fewshot import few_shot_indices
from ..errors import UserError
from ..tokens.clip import class_features, image_features, text_prototypes
from ..tokens.mcti import learn_mcti_token

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

log = logging.getLogger(__name__)


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
        Rows ``{"method", "shots", "seed", "accuracy", "n_test", "seconds"}``; `synthaug.evaluate.format_table` renders them.

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
            cfg = dataclasses.replace(config, seed=seed)
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
