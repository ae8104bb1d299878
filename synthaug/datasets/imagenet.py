"""ImageNet: ``train/``/``val/`` class folders with human-readable class names."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError
from .base import IMG_EXTENSIONS, ImageList, check_split_of, not_found, pil_loader


# --------------------------------------------------------------------------------------------------------------------
# ImageNet and generic class folders
# --------------------------------------------------------------------------------------------------------------------
def imagenet_class_names(names_file: str | os.PathLike | None = None) -> dict[str, str]:
    """WordNet id -> first lemma ("n01440764" -> "tench").

    From `names_file` (``LOC_synset_mapping.txt`` style: ``n01440764 tench, Tinca tinca``), else from the synset
    list that ships inside timm (read as a file, without importing timm).
    """
    if names_file is None:
        import importlib.util

        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("ImageNet class names need `names_file` (LOC_synset_mapping.txt) or timm installed.")
        names_file = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / \
            "imagenet_synset_to_lemma.txt"
    out = {}
    for line in Path(names_file).read_text().splitlines():
        parts = line.strip().split(maxsplit=1)
        if len(parts) == 2:
            out[parts[0]] = parts[1].split(",")[0].strip()
    return out


class ImageNet(ImageList):
    """ImageNet-1k as ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG`` with readable class names.

    Class order is the sorted WordNet ids (timm's and torchvision's order). Names come from `names_file`, else
    ``root/LOC_synset_mapping.txt`` (Kaggle's), else the synset list inside timm; the first lemma is kept.

    Args:
        root: the folder with ``train/`` and ``val/``.
        split: ``"train"`` or ``"val"``.
        transform, target_transform: as in torchvision.
        names_file: ``<wnid> <names>`` per line.
        loader: image loader; RGB PIL by default.

    >>> ds = ImageNet("data/imagenet", split="val")  # doctest: +SKIP
    >>> ds.classes[0]  # doctest: +SKIP
    'tench'
    """

    SPLITS = ("train", "val")

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None, *, names_file: str | os.PathLike | None = None,
                 loader: Callable | None = None) -> None:
        root = Path(root).expanduser()
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        self.split = check_split_of(split, self.SPLITS, "ImageNet")
        self.loader = loader or pil_loader
        folder = root / split
        if not folder.is_dir():
            raise not_found(root, f"the folder {split}/ with one sub-folder per class (n01440764/ …)")
        wnids = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if not wnids:
            flat = any(f.lower().endswith(IMG_EXTENSIONS) for f in os.listdir(folder))
            raise not_found(root, f"{split}/ to hold one folder per class",
                            "The val images are flat: sort them into class folders (the usual valprep.sh)."
                             if flat else "")
        if names_file is None and (root / "LOC_synset_mapping.txt").is_file():
            names_file = root / "LOC_synset_mapping.txt"
        names = imagenet_class_names(names_file)
        unknown = [w for w in wnids if w not in names]
        if unknown:
            raise not_found(root, f"class folders named by WordNet id, found {unknown[0]!r}",
                            "Pass `names_file` mapping folder names to class names, or use ImageFolder.")
        self.wnids = wnids
        samples = []
        for target, w in enumerate(wnids):
            for f in sorted(os.listdir(folder / w)):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((str(folder / w / f), target))
        self._set_samples([names[w] for w in wnids], samples)
