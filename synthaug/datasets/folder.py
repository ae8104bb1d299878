"""Any ``root/class/image`` tree, through torchvision's `ImageFolder` walk, in synthaug's dataset conventions."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .base import IMG_EXTENSIONS, _ImageList, _not_found, clean_class_name, pil_loader


class ImageFolder(_ImageList):
    """Any ``class_name/image`` tree (torchvision's ImageFolder layout), with cleaned class names.

    Args:
        root: the dataset folder.
        split: a sub-folder of `root` to read (``root/train/<class>/…``), or None to read `root` itself.
        transform, target_transform: as in torchvision.
        loader: image loader; RGB PIL by default.

    >>> ds = ImageFolder("data/my_birds", split="train")  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, *, loader: Callable | None = None) -> None:
        root = Path(root).expanduser()
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        self.split = split if split is not None else "-"
        self.loader = loader or pil_loader
        folder = root if split is None else root / split
        if not folder.is_dir():
            raise _not_found(root, f"{folder}/<class>/<image>",
                             "Pass split=None to read the root itself." if split is not None else "")
        self.folder_names = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if not self.folder_names:
            raise _not_found(root, f"one sub-folder per class in {folder}")
        samples = []
        for target, d in enumerate(self.folder_names):
            for dirpath, _, files in sorted(os.walk(folder / d, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(IMG_EXTENSIONS):
                        samples.append((os.path.join(dirpath, f), target))
        if not samples:
            raise _not_found(root, f"image files ({', '.join(IMG_EXTENSIONS)}) under {folder}/<class>/")
        self._set_samples([clean_class_name(n) for n in self.folder_names], samples)
