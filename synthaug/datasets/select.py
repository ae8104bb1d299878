"""Class selection: which classes of a dataset a run covers.

One function for every stage (`synthaug learn`, `synthaug generate`, `synthaug build`), so a selection such as
``sample:N`` picks the same classes wherever it is used.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import UserError
from ..names import normalize_name
from .inat import per_supercategory_sample


def select_classes(dataset: Any, selection: str | None) -> list[int]:
    """Class indices of `dataset` from a selection string, ascending and without repeats.

    Args:
        dataset: a dataset with `classes` (and `supercategories`, one per class, where it has them, as `INat2021`
            does), or a plain sequence of class names.
        selection: comma-separated indices (``17``), inclusive ranges (``0-9``), class names (case and ``_``/space
            insensitive, ``Black footed Albatross``), and ``sample:N`` or ``sample:N:SEED`` — a seeded draw of N
            classes, spread evenly over the supercategories when the dataset has them (the paper's iNat50), uniform
            otherwise. None or empty: every class.

    >>> select_classes(["zero", "one", "two", "three", "four", "five", "six", "seven"], "0-2,seven")
    [0, 1, 2, 7]
    """
    if hasattr(dataset, "classes"):
        class_names = [str(c) for c in dataset.classes]
        supercategories = getattr(dataset, "supercategories", None)
    else:
        class_names, supercategories = [str(c) for c in dataset], None
    n = len(class_names)
    if selection is None or not str(selection).strip():
        return list(range(n))
    # A name matches its own class exactly; otherwise by `normalize_name`, which must then name one class only.
    exact = {name: i for i, name in reversed(list(enumerate(class_names)))}
    by_name: dict[str, list[int]] = {}
    for i, name in enumerate(class_names):
        by_name.setdefault(normalize_name(name), []).append(i)
    chosen: set[int] = set()
    for part in str(selection).split(","):
        part = part.strip()
        if m := re.fullmatch(r"(\d+)\s*-\s*(\d+)", part):
            lo, hi = int(m.group(1)), int(m.group(2))
            if lo > hi or hi >= n:
                raise UserError(f"`classes` range {part!r} is not within 0-{n - 1} (low-high, low <= high): the dataset "
                                f"has {n} classes; e.g. '0-{min(9, n - 1)}'.")
            chosen.update(range(lo, hi + 1))
        elif part.isdigit():
            if int(part) >= n:
                raise UserError(f"`classes` index {part} is out of range: the dataset has {n} classes (0-{n - 1}).")
            chosen.add(int(part))
        elif m := re.fullmatch(r"sample:(\d+)(?::(\d+))?", part):
            k, seed = int(m.group(1)), int(m.group(2) or 0)
            if not 0 < k <= n:
                raise UserError(f"`classes` {part!r} asks for {k} classes but the dataset has {n}: use 1..{n}.")
            chosen.update(_sample_classes(n, k, seed, supercategories))
        elif part in exact:
            chosen.add(exact[part])
        elif (same := by_name.get(normalize_name(part))) is not None:
            if len(same) > 1:
                raise UserError(f"`classes` entry {part!r} matches {len(same)} classes "
                                f"({', '.join(f'{i} {class_names[i]!r}' for i in same[:4])}): give the exact name "
                                f"or the index, e.g. '{same[0]}'.")
            chosen.add(same[0])
        else:
            close = difflib.get_close_matches(part, list(class_names), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UserError(f"`classes` entry {part!r} is not a class of this dataset: use indices/ranges like '0-9,17' "
                            f"or class names such as {class_names[0]!r}.{hint}")
    return sorted(chosen)


def _sample_classes(n: int, k: int, seed: int, supercategories: Sequence[str] | None) -> list[int]:
    if supercategories is not None and len(supercategories) == n:
        return per_supercategory_sample(supercategories, k, seed)
    return sorted(np.random.default_rng(seed).choice(n, size=k, replace=False).tolist())
