"""torchvision's fine-grained datasets (Flowers102, OxfordIIITPet, FGVCAircraft, Food101, DTD, EuroSAT, StanfordCars), never downloaded unless asked."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..dataset_names import TORCHVISION_SETS
from ..errors import UserError
from ..names import clean_class_name
from .base import check_split_of, not_found

# --------------------------------------------------------------------------------------------------------------------
# torchvision's fine-grained sets
# --------------------------------------------------------------------------------------------------------------------
# name -> (torchvision class, valid splits): `synthaug.dataset_names.TORCHVISION_SETS`, readable without torch.


EUROSAT_TEST_FRACTION = 0.2  # torchvision's EuroSAT has no split: a seeded per-class 80/20 split is made here


EUROSAT_SPLIT_SEED = 0


def torchvision_dataset(name: str, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                        target_transform: Callable | None = None, *, download: bool = False, **kw: Any) -> Any:
    """A torchvision fine-grained dataset with this module's attributes added: clean `classes`, `class_to_idx`,
    `targets`, `samples` (where torchvision keeps the paths). Never downloads unless `download=True`.

    >>> ds = torchvision_dataset("food101", "data", split="test")  # doctest: +SKIP
    >>> ds.classes[0]  # doctest: +SKIP
    'apple pie'
    """
    import torchvision.datasets as tvd

    key = name.lower().replace("-", "").replace("_", "")
    if key not in TORCHVISION_SETS:
        raise UserError(f"`name` must be one of {', '.join(TORCHVISION_SETS)} but is {name!r}.")
    cls_name, splits = TORCHVISION_SETS[key]
    if split == "train" and "train" not in splits:
        split = "trainval"
    check_split_of(split, splits, cls_name)
    cls = getattr(tvd, cls_name)
    args: dict[str, Any] = dict(transform=transform, target_transform=target_transform, download=download, **kw)
    if key != "eurosat":
        args["split"] = split
    try:
        ds = cls(str(Path(root).expanduser()), **args)
    except RuntimeError as e:
        raise not_found(root, f"torchvision's {cls_name} files ({str(e).splitlines()[0]})",
                        "Pass download=True once (needs network) or point `root` at the folder that holds them.")\
            from None
    raw = list(getattr(ds, "classes", None) or [])
    if key == "eurosat":  # "AnnualCrop" -> "Annual Crop"
        classes = [re.sub(r"(?<=[a-z])(?=[A-Z])", " ", c) for c in raw]
        _eurosat_split(ds, split)
    else:
        classes = [clean_class_name(c) for c in raw]
    if hasattr(ds, "_samples"):  # StanfordCars
        samples = [(str(p), int(t)) for p, t in ds._samples]
    elif hasattr(ds, "samples"):  # EuroSAT (an ImageFolder)
        samples = [(str(p), int(t)) for p, t in ds.samples]
    else:
        samples = [(str(p), int(t)) for p, t in zip(ds._image_files, ds._labels)]
    ds.folder_names = raw
    ds.classes = classes
    ds.class_to_idx = {c: i for i, c in enumerate(classes)}
    ds.samples = samples
    ds.targets = [t for _, t in samples]
    ds.split = split
    return ds


def _eurosat_split(ds: Any, split: str) -> None:
    """Keep a seeded per-class 80/20 part of an EuroSAT ImageFolder, in place (same images for the same data)."""
    keep = []
    targets = np.asarray(ds.targets)
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        perm = np.random.default_rng([EUROSAT_SPLIT_SEED, int(c)]).permutation(idx)
        n_test = round(len(idx) * EUROSAT_TEST_FRACTION)
        keep.extend((perm[:n_test] if split == "test" else perm[n_test:]).tolist())
    keep.sort()
    ds.samples = [ds.samples[i] for i in keep]
    ds.imgs = ds.samples
    ds.targets = [ds.targets[i] for i in keep]
