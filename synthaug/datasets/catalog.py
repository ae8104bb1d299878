"""Dataset names: resolve ``--dataset`` (``cub``, ``inat50``, ``digits``, a folder, a torchvision set) to a dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import UserError
from .base import _check_split, _not_found
from .cub import CUB200
from .digits import DIGITS_SPLITS, Digits
from .folder import ImageFolder
from .imagenet import ImageNet
from .inat import INat2021
from .tvsets import TORCHVISION_SETS, torchvision_dataset

# --------------------------------------------------------------------------------------------------------------------
# Names -> datasets
# --------------------------------------------------------------------------------------------------------------------
DATASETS: dict[str, Callable[..., Any]] = {
    "digits": Digits,
    "cub": CUB200,
    "inat": INat2021,
    "imagenet": ImageNet,
    "imagefolder": ImageFolder,
}


ALIASES = {"cub200": "cub", "inat2021": "inat", "inat21": "inat", "flowers": "flowers102", "pets": "oxfordiiitpet",
           "aircraft": "fgvcaircraft", "food": "food101", "cars": "stanfordcars", "folder": "imagefolder"}


DATASET_NAMES = (*DATASETS, *TORCHVISION_SETS)


def get_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                transform: Callable | None = None, **kw: Any) -> Any:
    """The real dataset called `name` ("digits", "cub", "inat", "imagenet", "imagefolder", or a torchvision set).

    Args:
        name: one of `DATASET_NAMES` (case-insensitive; aliases like "pets", "cars" accepted).
        root: dataset folder (ignored for "digits").
        split: the split to read.
        transform: applied to each PIL image.
        **kw: passed to the dataset class (e.g. ``subset="inat179"`` for iNat).

    >>> ds = get_dataset("digits", split="test")
    >>> len(ds.classes)
    10
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    key = ALIASES.get(key, key)
    if key not in DATASETS and key not in TORCHVISION_SETS:
        raise UserError(f"`dataset` must be one of {', '.join(DATASET_NAMES)} but is {name!r}: fix the name.")
    if key == "digits":
        _check_split(split, tuple(DIGITS_SPLITS), "digits")
        return Digits(root, split=split, transform=transform, **kw)
    if root is None:
        raise UserError(f"`root` is required for dataset {name!r}: pass the folder that holds it (--root PATH).")
    if not Path(root).expanduser().exists():
        raise _not_found(root, "an existing folder", "Check the --root path.")
    if key in TORCHVISION_SETS:
        return torchvision_dataset(key, root, split, transform, **kw)
    if key == "imagefolder" and split == "train" and not (Path(root) / "train").is_dir():
        split = None  # a plain class-folder tree has no split folders: read the root itself
    return DATASETS[key](root, split, transform, **kw)
