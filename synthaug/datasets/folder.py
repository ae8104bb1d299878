"""Any ``root/class/image`` tree, through torchvision's `ImageFolder` walk, in synthaug's dataset conventions."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from torchvision.datasets.folder import find_classes, make_dataset

from ..errors import UserError
from ..names import clean_class_name
from .base import IMG_EXTENSIONS, ImageList, not_found, pil_loader


class ImageFolder(ImageList):
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
            raise not_found(root, f"{folder}/<class>/<image>",
                            "Pass split=None to read the root itself." if split is not None else "")
        try:
            self.folder_names, class_to_idx = find_classes(str(folder))
        except FileNotFoundError:
            raise not_found(root, f"one sub-folder per class in {folder}") from None
        samples = make_dataset(str(folder), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise not_found(root, f"image files ({', '.join(IMG_EXTENSIONS)}) under {folder}/<class>/")
        names = [clean_class_name(n) for n in self.folder_names]
        unnamed = [f for f, n in zip(self.folder_names, names) if not n]
        if unnamed:  # a prompt needs a class name: refused here, before any class of the build is made
            raise UserError(f"`root` {str(root)!r}: class folder {unnamed[0]!r} has no name once its number prefix is "
                            f"dropped (prompts say 'a photo of <name>'): rename it, e.g. to "
                            f"'{unnamed[0].rstrip('.')}.Some_class'.")
        self._set_samples(names, samples)
