"""Hand-made build directories for the evaluation and report tests (written with the real shards API)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from PIL import Image
from torch import nn

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
STEP = 20  # ColorJudge reads a class from the red channel: red = STEP * class


def color_image(value: int, size: int = 8, green: int = 0) -> Image.Image:
    """A solid image whose red channel encodes `value` (what `ColorJudge` predicts)."""
    return Image.new("RGB", (size, size), (STEP * value, green, 0))


class ColorJudge(nn.Module):
    """A judge that is right exactly where the image says: logits[c] = -(c - red / STEP)^2.

    Its top-1 is the encoded value p; its top-5 are the classes within distance 2 of p (for 2 <= p <= 7).
    """

    def __init__(self, labels=DIGITS, source: str = "color-judge", trained_on: str = "hand-made") -> None:
        super().__init__()
        self.labels, self.source, self.trained_on = list(labels), source, trained_on
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)  # gives the module a device and dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = x[:, 0].mean(dim=(1, 2)) * 255.0 / STEP
        c = torch.arange(len(self.labels), device=x.device, dtype=x.dtype)
        return -self.scale * (c[None] - p[:, None]) ** 2

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1).flatten(1)


def make_build(root: Path, samples: list[dict], *, classes: list[str] = DIGITS, guide: str = "digits-guide",
               histories: dict[int, list[dict]] | None = None) -> Path:
    """Write a build directory: shards (one per (method, class)), index.parquet, classes.json, config.yaml.

    Each sample dict holds ``method, class_index, index, image`` and optionally ``seed`` (default: the index, so
    methods share seeds), ``guide_prob`` and the soft label ``guide_soft_classes``/``guide_soft_probs``. `histories` adds token files with a training history per class.
    """
    from synthaug.index import merge_index
    from synthaug.shards import write_shard

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple[str, int], list] = {}
    for s in samples:
        img = s["image"]
        groups.setdefault((s["method"], s["class_index"]), []).append(SimpleNamespace(
            image=img, class_index=s["class_index"], class_name=classes[s["class_index"]], method=s["method"],
            index=s["index"], prompt=f"A photo of {classes[s['class_index']]}", seed=s.get("seed", s["index"]),
            token_sha256=None if s["method"] == "sd" else "0" * 64, model_id="test-model", scheduler="ddim", steps=10,
            guidance_scale=7.0, height=img.height, width=img.width, guide_prob=s.get("guide_prob"), guide_top5=None,
            guide_soft_classes=s.get("guide_soft_classes"), guide_soft_probs=s.get("guide_soft_probs"),
        ))
    for sid, (_, items) in enumerate(sorted(groups.items())):
        write_shard(root, sid, sorted(items, key=lambda x: x.index))
    class_rows = [{"index": i, "name": n, "token": f"<synthaug-{i:03d}>", "steps": 3, "stop_reason": "all_correct"}
                  for i, n in enumerate(classes)]
    merge_index(root, classes=class_rows)
    (root / "config.yaml").write_text(yaml.safe_dump({"dataset": "digits", "model": "test-model", "guide": guide}))
    if histories:
        from synthaug.tokens.dct import TokenResult
        from synthaug.tokens.io import save_token

        for ci, history in histories.items():
            result = TokenResult(
                token=f"<synthaug-{ci:03d}>", class_index=ci, label=classes[ci], embedding=torch.zeros(1, 4),
                steps=len(history), stop_reason="patience", best_step=min(range(len(history)),
                                                                          key=lambda i: history[i]["loss"]),
                history=history, metadata={"model_id": "test-model", "guide": guide},
            )
            save_token(result, root / "tokens" / f"{ci:03d}.safetensors")
    return root


class ImageList(torch.utils.data.Dataset):
    """A torchvision-style real dataset from PIL images and targets."""

    def __init__(self, images: list[Image.Image], targets: list[int], classes: list[str] = DIGITS) -> None:
        self.images, self.targets, self.classes = images, list(targets), list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]
