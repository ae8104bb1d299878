"""Few-shot subsets: the same k images per class for the same seed."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torchvision.datasets import VisionDataset

from ..errors import UserError


# --------------------------------------------------------------------------------------------------------------------
# Few-shot subsets
# --------------------------------------------------------------------------------------------------------------------
def few_shot_indices(targets: Sequence[int], shots: int, seed: int = 0, *, allow_fewer: bool = False) -> list[int]:
    """Indices of `shots` samples per class, the same ones for the same seed, ascending.

    Each class draws from its own seeded permutation (seeded by ``(seed, class)``), so the k-shot set is contained
    in the (k+1)-shot set and does not change when other classes are added or removed.

    Args:
        targets: the class of each sample.
        shots: samples per class (>= 0).
        seed: selects which samples.
        allow_fewer: take every sample of a class that has fewer than `shots` (default: error).

    >>> few_shot_indices([0, 0, 0, 1, 1, 1], shots=1, seed=0)
    [2, 5]
    """
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 0:
        raise UserError(f"`shots` must be an integer >= 0 but is {shots!r}.")
    targets = np.asarray(targets, dtype=np.int64)
    chosen: list[int] = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        if len(idx) < shots and not allow_fewer:
            raise UserError(f"`shots` is {shots} but class {int(c)} has only {len(idx)} samples in this split: "
                            f"use shots <= {len(idx)} or allow_fewer=True.")
        perm = np.random.default_rng([int(seed), int(c)]).permutation(idx)
        chosen.extend(perm[:shots].tolist())
    return sorted(chosen)


class FewShot(VisionDataset):
    """`shots` real images per class of `dataset`, seeded (see `few_shot_indices`), with the same attributes.

    >>> ds = few_shot(Digits(split="train"), shots=3, seed=0)
    >>> len(ds)
    30
    """

    def __init__(self, dataset: Any, shots: int, seed: int = 0, *, allow_fewer: bool = False) -> None:
        super().__init__(getattr(dataset, "root", None))
        self.dataset, self.shots, self.seed = dataset, shots, seed
        self.indices = few_shot_indices(dataset.targets, shots, seed, allow_fewer=allow_fewer)
        self.classes = list(dataset.classes)
        self.class_to_idx = dict(dataset.class_to_idx)
        self.targets = [int(dataset.targets[i]) for i in self.indices]
        samples = getattr(dataset, "samples", None)
        self.samples = [samples[i] for i in self.indices] if samples is not None else []

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        return self.dataset[self.indices[index]]

    def extra_repr(self) -> str:
        return f"Shots: {self.shots} per class, seed {self.seed}\nOf: {type(self.dataset).__name__}"


def few_shot(dataset: Any, shots: int, seed: int = 0, *, allow_fewer: bool = False) -> FewShot:
    """`shots` images per class of `dataset`: the same images for the same seed (a `FewShot` view).

    >>> len(few_shot(Digits(split="test"), shots=2, seed=1))
    20
    """
    return FewShot(dataset, shots, seed, allow_fewer=allow_fewer)
