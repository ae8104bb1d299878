"""Dataset names: resolve ``--dataset`` (``cub``, ``inat50``, ``digits``, a folder, a torchvision set) to a dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..dataset_names import ALIASES, DATASET_NAMES, SUBSETS, TORCHVISION_SETS, check_dataset_name, dataset_key
from ..errors import UserError
from .base import ImageList, not_found
from .cub import CUB200
from .digits import Digits
from .folder import ImageFolder
from .imagenet import ImageNet
from .inat import INat2021
from .tvsets import torchvision_dataset

# --------------------------------------------------------------------------------------------------------------------
# Names -> datasets
# --------------------------------------------------------------------------------------------------------------------
DATASETS: dict[str, type[ImageList]] = {
    "digits": Digits,
    "cub": CUB200,
    "inat": INat2021,
    "imagenet": ImageNet,
    "imagefolder": ImageFolder,
}

# The names (`DATASET_NAMES`, `ALIASES`, `SUBSETS`) live in `synthaug.dataset_names`, readable without torch.
__all__ = ["ALIASES", "DATASETS", "DATASET_NAMES", "SUBSETS", "check_split", "dataset_splits", "default_test_split",
           "get_dataset"]


def dataset_splits(name: str) -> tuple[str, ...] | None:
    """The splits dataset `name` has (its class's `SPLITS`; None: any sub-folder, for ``imagefolder``).

    >>> dataset_splits("inat")
    ('train', 'train_full', 'val')
    """
    key = dataset_key(name)
    key = SUBSETS[key][0] if key in SUBSETS else key
    if key in TORCHVISION_SETS:
        splits = TORCHVISION_SETS[key][1]
        return ("train", *splits) if "train" not in splits else splits  # "train" reads "trainval" there
    return DATASETS[key].SPLITS if key in DATASETS else None  # each dataset class declares its own


def default_test_split(name: str) -> str:
    """The split a dataset's models are tested on: ``test`` where it has one, else ``val`` (iNat 2021, ImageNet).

    >>> default_test_split("imagenet"), default_test_split("cub")
    ('val', 'test')
    """
    splits = dataset_splits(name)
    return "test" if splits is None or "test" in splits else "val"


def check_split(name: str, split: str | None, argument: str = "split") -> str | None:
    """`split` if dataset `name` has it, else a `UserError` naming the valid choices."""
    splits = dataset_splits(name)
    if split is not None and splits is not None and split not in splits:
        raise UserError(f"`{argument}` must be one of {', '.join(splits)} for dataset {name!r} but is {split!r}: "
                        f"pick one of those.")
    return split


def get_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                transform: Callable | None = None, **kw: Any) -> Any:
    """The real dataset called `name` ("digits", "cub", "inat", "inat179", "inat50", "imagenet", "imagefolder", or a
    torchvision set).

    Args:
        name: one of `DATASET_NAMES` (case-insensitive; aliases like "pets", "cars" accepted).
        root: dataset folder (ignored for "digits").
        split: the split to read.
        transform: applied to each PIL image.
        **kw: passed to the dataset class (e.g. ``subset_seed=1`` for "inat50").

    >>> ds = get_dataset("digits", split="test")
    >>> len(ds.classes)
    10
    """
    key = dataset_key(name)
    if key in SUBSETS:
        key, subset_kw = SUBSETS[key]
        kw = {**subset_kw, **kw}
    if key not in DATASETS and key not in TORCHVISION_SETS:
        check_dataset_name(name)
    check_split(name, split)
    if key == "digits":
        return Digits(root, split=split, transform=transform, **kw)
    if root is None:
        raise UserError(f"`root` is required for dataset {name!r}: pass the folder that holds it (--root PATH).")
    if not Path(root).expanduser().exists():
        raise not_found(root, "an existing folder", "Check the --root path.")
    if key in TORCHVISION_SETS:
        return torchvision_dataset(key, root, split, transform, **kw)
    if key == "imagefolder" and split == "train" and not (Path(root) / "train").is_dir():
        split = None  # a plain class-folder tree has no split folders: read the root itself
    return DATASETS[key](root, split, transform, **kw)
