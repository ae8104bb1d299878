"""Reading images for evaluation: a build's or a dataset's images as resized, normalised batches on the model's device."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..index import BuildView
from ..shards import ShardReader, decode_image

if TYPE_CHECKING:
    from PIL import Image


class ImageReader:
    """Decoded images of a build by index row: one positioned read each, checked against the row's sha256."""

    def __init__(self, build: BuildView) -> None:
        self._reader = ShardReader(build.root)

    def __call__(self, row: Mapping[str, Any]) -> Image.Image:
        data = self._reader.read(int(row["shard"]), int(row["offset"]), int(row["size"]), row.get("sha256"))
        return decode_image(data, where=str(row["key"]))

    def close(self) -> None:
        self._reader.close()


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [0, 1] (the classifier contract)."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def iter_image_batches(
    build: BuildView, rows: Sequence[Mapping[str, Any]], batch_size: int, *, size: tuple[int, int] | None = None,
    progress: bool = False, desc: str = "images",
) -> Iterator[tuple[list[Mapping[str, Any]], torch.Tensor]]:
    """Yield ``(rows, images [B, 3, H, W] in [0, 1])``; a batch is cut early where the image size changes.

    `size` resizes every image to (height, width) (used where real and generated sizes must agree).
    """
    from tqdm.auto import tqdm

    read = ImageReader(build)
    batch_rows: list[Mapping[str, Any]] = []
    batch: list[torch.Tensor] = []
    try:
        for row in tqdm(rows, desc=desc, disable=not progress, leave=False):
            img = read(row)
            if size is not None:
                img = resize_center_crop(img, size)
            t = image_to_tensor(img)
            if batch and (t.shape != batch[0].shape or len(batch) == batch_size):
                yield batch_rows, torch.stack(batch)
                batch_rows, batch = [], []
            batch_rows.append(row)
            batch.append(t)
        if batch:
            yield batch_rows, torch.stack(batch)
    finally:
        read.close()


def resize_center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize the shorter side to fit (height, width), then center-crop: what torchvision's Resize+CenterCrop do."""
    from PIL import Image

    h, w = size
    if img.size == (w, h):
        return img
    scale = max(h / img.height, w / img.width)
    nw, nh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - w) // 2, (nh - h) // 2
    return img.crop((left, top, left + w, top + h))


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32
