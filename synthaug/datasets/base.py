"""What every real dataset shares: image-list datasets in torchvision's conventions, class-name cleaning, the not-found error."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

from PIL import Image
from torchvision.datasets import VisionDataset

from ..errors import UserError

# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def not_found(root: Any, expected: str, fix: str = "") -> UserError:
    msg = f"Dataset not found or corrupted at {root}: expected {expected}."
    return UserError(f"{msg} {fix}".strip())


def pil_loader(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB (CUB and iNat hold a few grayscale/CMYK files)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class ImageList(VisionDataset):
    """A list of ``(path, target)`` samples with named classes; the shared body of the file-backed datasets."""

    split: str
    SPLITS: ClassVar[tuple[str, ...] | None] = None  # the splits a dataset has, declared once; None: any sub-folder

    def _set_samples(self, classes: list[str], samples: list[tuple[str, int]]) -> None:
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = samples
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img, target = self._load(index)
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def _load(self, index: int) -> tuple[Image.Image, int]:
        """The untransformed ``(PIL image, target)`` of sample `index`."""
        path, target = self.samples[index]
        try:
            return self.loader(path), target
        except FileNotFoundError:
            raise not_found(self.root, f"image file {path}", "Re-extract the dataset.") from None

    def extra_repr(self) -> str:
        return f"Split: {self.split}\nClasses: {len(self.classes)}"


def check_split_of(split: str, valid: Sequence[str], what: str) -> str:
    if split not in valid:
        raise UserError(f"`split` for {what} must be one of {', '.join(valid)} but is {split!r}.")
    return split


def class_aliases(dataset: Any) -> list[tuple[str, ...]]:
    """Every name each class of `dataset` goes by: its clean name, then the raw folder name, the scientific name
    (iNat) or the WordNet id (ImageNet) where the dataset has them. A classifier's label names one of them.

    >>> class_aliases(["zero", "one"])
    [('zero',), ('one',)]
    """
    classes = [str(c) for c in (dataset.classes if hasattr(dataset, "classes") else dataset)]
    extra = [getattr(dataset, a) for a in ("folder_names", "scientific_names", "wnids")
             if isinstance(getattr(dataset, a, None), Sequence) and len(getattr(dataset, a)) == len(classes)]
    return [tuple(dict.fromkeys([c, *(str(e[i]) for e in extra)])) for i, c in enumerate(classes)]
