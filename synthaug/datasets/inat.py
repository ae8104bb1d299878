"""iNaturalist 2021 in torchvision's layout, with the paper's species subsets and per-supercategory sampling."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..names import clean_class_name, normalize_name
from .base import IMG_EXTENSIONS, ImageList, check_split_of, not_found, pil_loader
from .cub import CUB_FOLDER_NAMES, CUB_TO_INAT_NAME

# --------------------------------------------------------------------------------------------------------------------
# iNaturalist 2021
# --------------------------------------------------------------------------------------------------------------------
INAT_VERSIONS = {"train": "2021_train_mini", "train_full": "2021_train", "val": "2021_valid"}


# The folder names in iNat's own archives, accepted beside torchvision's.
_INAT_ALT_DIRS = {"2021_train_mini": "train_mini", "2021_train": "train", "2021_valid": "val"}


INAT_SUPERCATEGORIES = ("Amphibians", "Animalia", "Arachnids", "Birds", "Fungi", "Insects", "Mammals", "Mollusks",
                        "Plants", "Ray-finned Fishes", "Reptiles")


_INAT_CLASS_SUPER = {"Aves": "Birds", "Mammalia": "Mammals", "Reptilia": "Reptiles", "Amphibia": "Amphibians",
                     "Actinopterygii": "Ray-finned Fishes", "Insecta": "Insects", "Arachnida": "Arachnids"}


def inat_supercategory(kingdom: str, phylum: str, klass: str) -> str:
    """iNat 2021's supercategory from a species' taxonomy (used when no annotation file gives it).

    >>> inat_supercategory("Animalia", "Chordata", "Aves")
    'Birds'
    """
    if kingdom == "Plantae" or kingdom == "Chromista":  # iNat files kelp and other algae with the plants
        return "Plants"
    if kingdom in ("Fungi", "Protozoa"):  # ... and slime moulds with the fungi
        return "Fungi"
    if klass in _INAT_CLASS_SUPER:
        return _INAT_CLASS_SUPER[klass]
    if phylum == "Mollusca":
        return "Mollusks"
    return "Animalia"


def per_supercategory_sample(supercategories: Sequence[str], n: int, seed: int = 0) -> list[int]:
    """Indices of `n` categories spread evenly over the supercategories (the paper's iNat50), seeded.

    Each supercategory gets ``n // S`` species, and ``n % S`` seeded supercategories one more; a supercategory
    with too few species passes its remainder on. Returned ascending.

    >>> per_supercategory_sample(["a", "a", "b", "b", "c"], 3, seed=0)
    [0, 2, 4]
    """
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(supercategories):
        groups.setdefault(s, []).append(i)
    if n > len(supercategories):
        raise UserError(f"cannot sample {n} species from {len(supercategories)}: use a smaller subset.")
    rng = np.random.default_rng(seed)
    names = sorted(groups)
    order = [names[i] for i in rng.permutation(len(names))]  # who gets the extra species
    quota = {s: n // len(names) + (1 if k < n % len(names) else 0) for k, s in enumerate(order)}
    picked: dict[str, list[int]] = {}
    left = 0
    for s in names:
        pool = groups[s]
        take = min(quota[s], len(pool))
        left += quota[s] - take
        picked[s] = sorted(rng.choice(pool, size=take, replace=False).tolist())
    while left:  # small supercategories cannot fill their quota: the others share it, in the seeded order
        for s in order:
            rest = sorted(set(groups[s]) - set(picked[s]))
            if left and rest:
                picked[s].append(int(rng.choice(rest)))
                left -= 1
    return sorted(i for v in picked.values() for i in v)


class INat2021(ImageList):
    """iNaturalist 2021 in torchvision's layout: ``root/2021_train_mini/<00000_Animalia_…_Genus_species>/*.jpg``
    and ``root/2021_valid/…`` (iNat's own ``train_mini/`` and ``val/`` folder names work too).

    Common names and supercategories come from iNat's annotation file when one is present
    (``root/categories.json``, ``root/train_mini.json`` or ``root/val.json``, as distributed by iNat); otherwise
    classes are scientific names ("Lumbricus terrestris") and supercategories are derived from the taxonomy.

    Args:
        root: the folder that holds ``2021_train_mini/`` / ``2021_valid/``.
        split: ``"train"`` (train_mini, the paper's), ``"train_full"`` or ``"val"``.
        transform, target_transform: as in torchvision.
        subset: ``None`` (all 10,000 species), ``"inat179"`` (species shared with CUB, in CUB order; needs the
            annotation file for common names), ``"inat50"`` (`subset_size` species spread over the 11
            supercategories, seeded by `subset_seed`), or a list of names (folder, scientific or common).
        subset_seed: seed of the ``"inat50"`` draw.
        subset_size: species in the ``"inat50"`` draw.
        names: ``"auto"`` (common names when available), ``"common"`` or ``"scientific"``.
        loader: image loader; RGB PIL by default.

    Attributes:
        folder_names, scientific_names, supercategories: per class. ``category_ids``: iNat id (0..9999) per class.
        cub_index: for ``"inat179"``, the CUB class index (0-based) of each class.
        unmatched: for ``"inat179"``, the CUB names with no iNat species.

    >>> ds = INat2021("data/inat", split="val", subset="inat50", subset_seed=0)  # doctest: +SKIP
    """

    SPLITS = tuple(INAT_VERSIONS)

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None, *, subset: str | Sequence[str] | None = None,
                 subset_seed: int = 0, subset_size: int = 50, names: str = "auto",
                 loader: Callable | None = None) -> None:
        root = Path(root).expanduser()
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        self.split = check_split_of(split, self.SPLITS, "INat2021")
        if names not in ("auto", "common", "scientific"):
            raise UserError(f"`names` must be one of auto, common, scientific but is {names!r}.")
        self.loader = loader or pil_loader
        version = INAT_VERSIONS[split]
        folder = root / version if (root / version).is_dir() else root / _INAT_ALT_DIRS[version]
        if not folder.is_dir():
            raise not_found(root, f"the folder {version}/ (torchvision's layout) or {_INAT_ALT_DIRS[version]}/",
                            "Extract iNat's archive there, or pass the folder that contains it.")
        dirs = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if not dirs:
            raise not_found(root, f"one folder per species in {folder}")
        taxa = []
        for i, d in enumerate(dirs):
            pieces = d.split("_")
            if len(pieces) != 8 or not pieces[0].isdigit():
                raise not_found(root, f"species folders named like 00000_Animalia_…_Genus_species, found {d!r}")
            taxa.append(pieces)
        meta = self._categories(root)
        common = [meta.get(d, {}).get("common_name") for d in dirs]
        if names == "common" and not all(common):
            raise not_found(root, "iNat's annotation file with common names (categories.json, train_mini.json or "
                                  "val.json)", "Add it, or pass names='scientific'.")
        use_common = names == "common" or (names == "auto" and all(common))
        scientific = [f"{p[6]} {p[7]}" for p in taxa]
        supercats = [meta.get(d, {}).get("supercategory") or inat_supercategory(p[1], p[2], p[3])
                     for d, p in zip(dirs, taxa)]
        self.cub_index: list[int] | None = None
        self.unmatched: list[str] = []
        chosen = self._select(root, subset, subset_seed, subset_size, dirs, scientific, common, supercats)
        self.subset = subset if isinstance(subset, str) or subset is None else "names"
        self.folder_names = [dirs[i] for i in chosen]
        self.scientific_names = [scientific[i] for i in chosen]
        self.supercategories = [supercats[i] for i in chosen]
        self.category_ids = [int(taxa[i][0]) for i in chosen]
        classes = [common[i] if use_common else scientific[i] for i in chosen]
        samples = []
        for target, d in enumerate(self.folder_names):
            for f in sorted(os.listdir(folder / d)):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((str(folder / d / f), target))
        self._set_samples(classes, samples)

    @staticmethod
    def _categories(root: Path) -> dict[str, dict[str, Any]]:
        """Category records keyed by image folder name, from the first annotation file found (or {})."""
        for name in ("categories.json", "train_mini.json", "val.json", "train.json"):
            p = root / name
            if p.is_file():
                try:
                    data = json.loads(p.read_text())
                except ValueError as e:
                    raise not_found(root, f"{name} to be valid JSON ({e})") from None
                cats = data["categories"] if isinstance(data, dict) else data
                return {c.get("image_dir_name") or f"{c['id']:05d}": c for c in cats}
        return {}

    def _select(self, root: Path, subset: Any, seed: int, size: int, dirs: list[str], scientific: list[str],
                common: list[str | None], supercats: list[str]) -> list[int]:
        if subset is None:
            return list(range(len(dirs)))
        if subset == "inat50":
            return per_supercategory_sample(supercats, size, seed)
        if subset == "inat179":
            if not all(common):
                raise not_found(root, "iNat's annotation file (categories.json, train_mini.json or val.json)",
                                "The 'inat179' subset matches CUB's names against iNat's common names.")
            by_name = {normalize_name(c): i for i, c in enumerate(common)}
            chosen, cub_index = [], []
            for k, folder in enumerate(CUB_FOLDER_NAMES):
                cub = clean_class_name(folder)
                i = by_name.get(normalize_name(CUB_TO_INAT_NAME.get(cub, cub)))
                if i is None:
                    self.unmatched.append(cub)
                else:
                    chosen.append(i)
                    cub_index.append(k)
            self.cub_index = cub_index
            return chosen
        if isinstance(subset, str):
            raise UserError(f"`subset` must be None, 'inat179', 'inat50' or a list of species names but is "
                            f"{subset!r}.")
        keys = {}
        for i, (d, s, c) in enumerate(zip(dirs, scientific, common)):
            for name in (d, s, c):
                if name:
                    keys.setdefault(normalize_name(name), i)
        chosen, missing = [], []
        for name in subset:
            i = keys.get(normalize_name(name))
            (missing.append(name) if i is None else chosen.append(i))
        if missing:
            raise UserError(f"`subset` names {missing[:5]} are not iNat 2021 species under {root}: use folder, "
                            "scientific or common names.")
        return chosen


def inat179_class_map(inat: Any | None = None) -> tuple[dict[str, list[str]], list[str]]:
    """CUB class name -> the names iNat 2021 gives the same species, and the CUB names no iNat species matches.

    With `inat` (an `INat2021` read with ``subset="inat179"``): each matched CUB class maps to the species' common
    name, scientific name and folder name, so a judge labelled by any of them can score it. Without it: only the
    common names of the shipped CUB -> iNat name map are known, and no name is reported unmatched.

    >>> inat179_class_map()[0]["Cardinal"]
    ['Northern Cardinal']
    """
    cub_names = [clean_class_name(f) for f in CUB_FOLDER_NAMES]
    if inat is None:
        return {c: [CUB_TO_INAT_NAME.get(c, c)] for c in cub_names}, []
    if getattr(inat, "cub_index", None) is None:
        raise UserError(f"`inat` ({type(inat).__name__}) is not the iNat179 subset: read it with "
                        "INat2021(root, subset='inat179').")
    out = {cub_names[k]: list(dict.fromkeys([inat.classes[j], inat.scientific_names[j], inat.folder_names[j]]))
           for j, k in enumerate(inat.cub_index)}
    return out, list(inat.unmatched)
