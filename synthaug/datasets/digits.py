"""The embedded digits world's real images: scikit-learn's 8x8 handwritten digits (their file ships in the package)
upsampled to 32 px RGB, with train, judge and test splits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from .base import ImageList

# --------------------------------------------------------------------------------------------------------------------
# The embedded digits world (scripts/train_digits_world.py trains its models)
# --------------------------------------------------------------------------------------------------------------------
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# Seeded split of scikit-learn's 1,797 digits: the world's models (generator, CLIP, guide) train on "train"; the judge
# trains on "judge" (disjoint, so the judge never shares the guide's data); "test" is held out for evaluation and
# few-shot experiments.
DIGITS_SPLITS = {"train": (0.0, 0.6), "judge": (0.6, 0.8), "test": (0.8, 1.0)}


DIGITS_SPLIT_SEED = 0


DIGITS_SIZE = 32  # 8x8 digits upsampled (bilinear) to the size the pipeline likes


# scikit-learn's `load_digits` file (the UCI test set, 1,797 rows of 64 pixels in 0..16 and the digit), shipped in the
# package so that the embedded world needs no scikit-learn: the same bytes, read the way `load_digits` reads them.
DIGITS_CSV = Path(__file__).resolve().parent.parent / "assets" / "digits" / "data" / "digits.csv.gz"


def load_digit_images() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as scikit-learn's ``load_digits()`` gives them: float images ``[N, 8, 8]`` (0..16) and int
    targets."""
    data = np.loadtxt(DIGITS_CSV, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def digits_arrays(split: str, size: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, size, size]`` (white digit on black, 0-255) and int64 targets of a digits split."""
    if split not in DIGITS_SPLITS:
        raise ValueError(f"`split` must be one of {', '.join(DIGITS_SPLITS)} but is {split!r}.")
    images, target = load_digit_images()
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(target))
    lo, hi = DIGITS_SPLITS[split]
    idx = order[int(lo * len(order)) : int(hi * len(order))]
    imgs = (images[idx] / 16.0 * 255.0).round().astype(np.uint8)
    if size != 8:
        imgs = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in imgs])
    return imgs, target[idx].astype(np.int64)


class Digits(ImageList):
    """scikit-learn's real handwritten digits (their file ships in synthaug; no download) as 32x32 RGB images.

    Args:
        root: ignored (the data ships with scikit-learn); kept for the torchvision signature.
        split: ``"train"`` (60%, the world's models learn from it), ``"judge"`` (20%, the judge's own data) or
            ``"test"`` (20%, held out).
        transform: applied to the PIL image.
        target_transform: applied to the int target.

    >>> ds = Digits(split="test")
    >>> img, target = ds[0]
    """

    classes: ClassVar[list[str]] = list(DIGIT_NAMES)
    SPLITS = tuple(DIGITS_SPLITS)

    def __init__(self, root: str | None = None, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None) -> None:
        super().__init__(root or "<sklearn digits>", transform=transform, target_transform=target_transform)
        self.split = split
        self._images, targets = digits_arrays(split)
        self.targets = targets.tolist()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(f"digits/{split}/{i:04d}", t) for i, t in enumerate(self.targets)]

    def _load(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self._images[index]).convert("RGB"), self.targets[index]

    def extra_repr(self) -> str:
        return f"Split: {self.split}"
