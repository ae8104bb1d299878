"""Few-shot subsets: the same k images per class for the same seed."""

from __future__ import annotations

from collections import Counter
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


def sample_paths(dataset: Any, indices: Sequence[int]) -> list[str]:
    """The sample paths (or ids) of `indices`, where the dataset lists them (torchvision's ``samples``); [] else.

    >>> sample_paths(Digits(split="train"), [0, 5])  # doctest: +SKIP
    ['digits/train/0000', 'digits/train/0005']
    """
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return []
    return [str(samples[i][0] if isinstance(samples[i], (tuple, list)) else samples[i]) for i in indices]


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


def stratified_indices(targets: Sequence[int], n: int, seed: int = 0) -> list[int]:
    """`n` indices spread evenly over the classes of `targets` (class sizes permitting), seeded; ascending.

    Classes take turns in a seeded order, each giving its next image of a seeded permutation, so every class gets
    ``n // C`` or one more (a class with too few images passes its turn on). All indices when ``n >= len(targets)``.

    >>> stratified_indices([0, 0, 0, 1, 1, 1], 4, seed=0)
    [0, 2, 3, 4]
    """
    targets = [int(t) for t in targets]
    if n >= len(targets):
        return list(range(len(targets)))
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(t, []).append(i)
    classes = sorted(groups)
    order = [classes[i] for i in np.random.default_rng([seed, 0]).permutation(len(classes))]
    pools = {c: np.random.default_rng([seed, 1, c]).permutation(groups[c]).tolist() for c in classes}
    picked: list[int] = []
    depth = 0
    while len(picked) < n:
        for c in order:
            if depth < len(pools[c]) and len(picked) < n:
                picked.append(pools[c][depth])
        depth += 1
    return sorted(picked)


def targets_of(dataset: Any) -> list[int]:
    """The class of every sample without loading images: `targets`, or through a torch `Subset`."""
    if hasattr(dataset, "targets"):
        return [int(t) for t in dataset.targets]
    if hasattr(dataset, "dataset") and hasattr(dataset, "indices") and hasattr(dataset.dataset, "targets"):
        return [int(dataset.dataset.targets[i]) for i in dataset.indices]
    raise UserError(f"`real` ({type(dataset).__name__}) has no `targets`: pass a synthaug.datasets / torchvision "
                    "dataset, or a torch Subset of one.")


def shots_by_class(dataset: Any, shots: int, seed: int = 0, classes: Sequence[int] | None = None
                   ) -> dict[int, list[Any]]:
    """The user's k real images (`few_shot_indices`, fewer where a class has fewer) as ``{class: [image, ...]}``,
    of `classes` only when given: what the token methods learn from and the trust check compares with."""
    wanted = None if classes is None else set(classes)
    images: dict[int, list[Any]] = {}
    for i in few_shot_indices(dataset.targets, shots, seed, allow_fewer=True):
        target = int(dataset.targets[i])
        if wanted is None or target in wanted:
            images.setdefault(target, []).append(dataset[i][0])
    return images


def check_shots(dataset: Any, shots: int, need: Sequence[int], class_names: Sequence[str], split: str,
                who: str) -> None:
    """Every class in `need` has `shots` images in the dataset's split, or a one-line `UserError` naming the first
    that has fewer (`who` says what reads them)."""
    counts = Counter(int(t) for t in dataset.targets)
    short = [c for c in need if counts.get(c, 0) < shots]
    if short:
        c = short[0]
        raise UserError(f"`shots` is {shots} but class {c} ({class_names[c]!r}) has {counts.get(c, 0)} images "
                        f"in split {split!r} ({who} {shots} of every class): lower --shots or pick another split.")
