"""The differentiable image operations of DCT's loss: the straight-through clamp and the augmentations of
expectation over transformations (``dct.augment``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Expectation over transformations (config.augment > 0). An earlier digits world measured ±1 px shifts on 8 px
# digits (1/8 of the side) and Gaussian noise sigma 0.1 as the best single lever with the one-step gradient; the
# shift scales with size.
AUGMENT_SHIFT = 0.125
AUGMENT_NOISE = 0.1


def clamp01(x: torch.Tensor, straight_through: bool) -> torch.Tensor:
    """Clamp to [0, 1]. Straight-through: the forward value is exactly the clamp, the gradient is the identity."""
    if not straight_through:
        return x.clamp(0, 1)
    return x.clamp(0, 1).detach() + (x - x.detach())


def augment(images: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
    """`copies` differentiable random views of every image: a shift of up to ±AUGMENT_SHIFT of the side (the border
    pixels, i.e. the background, fill the gap) plus Gaussian noise of std AUGMENT_NOISE. ``[B*copies, C, H, W]``,
    the copies of image b adjacent. Randomness from the CPU `generator`, so it is the same on every device."""
    return augment_views(images, augment_draws(images.shape, copies, generator))


def augment_draws(shape: torch.Size | tuple[int, ...], copies: int,
                  generator: torch.Generator) -> tuple[list[list[int]], torch.Tensor]:
    """The random part of `augment` for a batch of `shape` ``[B, C, H, W]``: (shifts, noise), drawn once per batch
    so that micro-batches (slices of both) see exactly the draws of the whole batch."""
    b, c, h, w = shape
    s = max(1, round(AUGMENT_SHIFT * min(h, w)))
    shifts = torch.randint(-s, s + 1, (b * copies, 2), generator=generator).tolist()
    return shifts, torch.randn((b * copies, c, h, w), generator=generator)


def augment_views(images: torch.Tensor, draws: tuple[list[list[int]], torch.Tensor]) -> torch.Tensor:
    shifts, noise = draws
    b, _, h, w = images.shape
    copies = len(shifts) // b
    s = max(1, round(AUGMENT_SHIFT * min(h, w)))
    padded = F.pad(images, (s, s, s, s), mode="replicate")
    views = [padded[k // copies, :, s + dy : s + dy + h, s + dx : s + dx + w] for k, (dy, dx) in enumerate(shifts)]
    return clamp01(torch.stack(views) + AUGMENT_NOISE * noise.to(images), True)
