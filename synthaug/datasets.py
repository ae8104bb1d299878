"""Real datasets, in torchvision's conventions.

Consumes a dataset root on disk (or nothing, for the embedded digits) and produces torchvision-style datasets:
``(root, split="train", transform=None, target_transform=None, *, extras)``, attributes `classes` (clean names),
`class_to_idx`, `samples`, `targets`, `extra_repr()`, and ``__getitem__ -> (image, target)``.

- `CUB200`: the CUB_200_2011 layout; `INat2021`: torchvision's ``2021_train_mini``/``2021_valid`` layout with the
  paper's subsets (``"inat179"``: species shared with CUB, ``"inat50"``: a seeded per-supercategory sample);
  `ImageNet`: ``train/``/``val/`` class folders + class names; `ImageFolder`: any ``class/image`` tree;
  `torchvision_dataset`: Flowers102, OxfordIIITPet, FGVCAircraft, Food101, DTD, EuroSAT, StanfordCars (never
  downloads unless asked); `Digits`: the embedded world.
- `get_dataset(name, root, split)` resolves a name (what ``synthaug build --dataset`` uses);
  `few_shot_indices` / `few_shot` pick the same k images per class for the same seed.

Missing or malformed data raises `UserError`: "Dataset not found or corrupted at {root}: expected {file}. {fix}".
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torchvision.datasets import VisionDataset

from .errors import UserError

# --------------------------------------------------------------------------------------------------------------------
# The embedded digits world (DESIGN.md §6)
# --------------------------------------------------------------------------------------------------------------------
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Seeded split of scikit-learn's 1,797 digits: the world's models (generator, CLIP, guide) train on "train"; the judge
# trains on "judge" (disjoint, so the judge never shares the guide's data); "test" is held out for evaluation and
# few-shot experiments.
DIGITS_SPLITS = {"train": (0.0, 0.6), "judge": (0.6, 0.8), "test": (0.8, 1.0)}
DIGITS_SPLIT_SEED = 0
DIGITS_SIZE = 32  # 8x8 digits upsampled (bilinear) to the size the pipeline likes


def digits_arrays(split: str, size: int = DIGITS_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, size, size]`` (white digit on black, 0-255) and int64 targets of a digits split."""
    from sklearn.datasets import load_digits

    if split not in DIGITS_SPLITS:
        raise ValueError(f"`split` must be one of {', '.join(DIGITS_SPLITS)} but is {split!r}.")
    d = load_digits()
    order = np.random.RandomState(DIGITS_SPLIT_SEED).permutation(len(d.target))
    lo, hi = DIGITS_SPLITS[split]
    idx = order[int(lo * len(order)) : int(hi * len(order))]
    imgs = (d.images[idx] / 16.0 * 255.0).round().astype(np.uint8)
    if size != 8:
        imgs = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in imgs])
    return imgs, d.target[idx].astype(np.int64)


class Digits(VisionDataset):
    """scikit-learn's real handwritten digits (shipped inside scikit-learn; no download) as 32x32 RGB images.

    Args:
        root: ignored (the data ships with scikit-learn); kept for the torchvision signature.
        split: ``"train"`` (60%, the world's models learn from it), ``"judge"`` (20%, the judge's own data) or
            ``"test"`` (20%, held out).
        transform: applied to the PIL image.
        target_transform: applied to the int target.

    >>> ds = Digits(split="test")
    >>> img, target = ds[0]
    """

    classes = list(DIGIT_NAMES)

    def __init__(self, root: str | None = None, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None) -> None:
        super().__init__(root or "<sklearn digits>", transform=transform, target_transform=target_transform)
        self.split = split
        self._images, targets = digits_arrays(split)
        self.targets = targets.tolist()
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(f"digits/{split}/{i:04d}", t) for i, t in enumerate(self.targets)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img = Image.fromarray(self._images[index]).convert("RGB")
        target = self.targets[index]
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def extra_repr(self) -> str:
        return f"Split: {self.split}"


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------------
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def clean_class_name(name: str) -> str:
    """A class name fit for a prompt: drop a numeric ``001.`` prefix, underscores to spaces, collapse whitespace.

    >>> clean_class_name("001.Black_footed_Albatross")
    'Black footed Albatross'
    """
    name = re.sub(r"^\d+[.]", "", name.strip())
    return " ".join(name.replace("_", " ").split())


def normalize_name(name: str) -> str:
    """Loose key for matching names across datasets: case, possessive 's, punctuation and grey/gray ignored.

    >>> normalize_name("Brewer's Blackbird") == normalize_name("Brewer_Blackbird")
    True
    """
    s = re.sub(r"['\u2019]s\b", "", name.lower())
    s = re.sub(r"[^a-z0-9]+", " ", s)
    s = re.sub(r"\bgrey\b", "gray", s)
    return " ".join(s.split())


def _not_found(root: Any, expected: str, fix: str = "") -> UserError:
    msg = f"Dataset not found or corrupted at {root}: expected {expected}."
    return UserError(f"{msg} {fix}".strip())


def pil_loader(path: str | os.PathLike) -> Image.Image:
    """Open an image file as RGB (CUB and iNat hold a few grayscale/CMYK files)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class _ImageList(VisionDataset):
    """A list of ``(path, target)`` samples with named classes; the shared body of the file-backed datasets."""

    split: str

    def _set_samples(self, classes: list[str], samples: list[tuple[str, int]]) -> None:
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.samples = samples
        self.targets = [t for _, t in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        path, target = self.samples[index]
        try:
            img = self.loader(path)
        except FileNotFoundError:
            raise _not_found(self.root, f"image file {path}", "Re-extract the dataset.") from None
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def extra_repr(self) -> str:
        return f"Split: {self.split}\nClasses: {len(self.classes)}"


def _check_split(split: str, valid: Sequence[str], what: str) -> str:
    if split not in valid:
        raise UserError(f"`split` for {what} must be one of {', '.join(valid)} but is {split!r}.")
    return split


# --------------------------------------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------------------------------------
# classes.txt of CUB_200_2011, in order (class 1 first). iNat179 matches iNat species against these names.
CUB_FOLDER_NAMES = tuple(f"{i + 1:03d}.{n}" for i, n in enumerate("""
Black_footed_Albatross Laysan_Albatross Sooty_Albatross Groove_billed_Ani Crested_Auklet Least_Auklet
Parakeet_Auklet Rhinoceros_Auklet Brewer_Blackbird Red_winged_Blackbird Rusty_Blackbird
Yellow_headed_Blackbird Bobolink Indigo_Bunting Lazuli_Bunting Painted_Bunting Cardinal Spotted_Catbird
Gray_Catbird Yellow_breasted_Chat Eastern_Towhee Chuck_will_Widow Brandt_Cormorant Red_faced_Cormorant
Pelagic_Cormorant Bronzed_Cowbird Shiny_Cowbird Brown_Creeper American_Crow Fish_Crow Black_billed_Cuckoo
Mangrove_Cuckoo Yellow_billed_Cuckoo Gray_crowned_Rosy_Finch Purple_Finch Northern_Flicker
Acadian_Flycatcher Great_Crested_Flycatcher Least_Flycatcher Olive_sided_Flycatcher
Scissor_tailed_Flycatcher Vermilion_Flycatcher Yellow_bellied_Flycatcher Frigatebird Northern_Fulmar Gadwall
American_Goldfinch European_Goldfinch Boat_tailed_Grackle Eared_Grebe Horned_Grebe Pied_billed_Grebe
Western_Grebe Blue_Grosbeak Evening_Grosbeak Pine_Grosbeak Rose_breasted_Grosbeak Pigeon_Guillemot
California_Gull Glaucous_winged_Gull Heermann_Gull Herring_Gull Ivory_Gull Ring_billed_Gull
Slaty_backed_Gull Western_Gull Anna_Hummingbird Ruby_throated_Hummingbird Rufous_Hummingbird Green_Violetear
Long_tailed_Jaeger Pomarine_Jaeger Blue_Jay Florida_Jay Green_Jay Dark_eyed_Junco Tropical_Kingbird
Gray_Kingbird Belted_Kingfisher Green_Kingfisher Pied_Kingfisher Ringed_Kingfisher White_breasted_Kingfisher
Red_legged_Kittiwake Horned_Lark Pacific_Loon Mallard Western_Meadowlark Hooded_Merganser
Red_breasted_Merganser Mockingbird Nighthawk Clark_Nutcracker White_breasted_Nuthatch Baltimore_Oriole
Hooded_Oriole Orchard_Oriole Scott_Oriole Ovenbird Brown_Pelican White_Pelican Western_Wood_Pewee Sayornis
American_Pipit Whip_poor_Will Horned_Puffin Common_Raven White_necked_Raven American_Redstart Geococcyx
Loggerhead_Shrike Great_Grey_Shrike Baird_Sparrow Black_throated_Sparrow Brewer_Sparrow Chipping_Sparrow
Clay_colored_Sparrow House_Sparrow Field_Sparrow Fox_Sparrow Grasshopper_Sparrow Harris_Sparrow
Henslow_Sparrow Le_Conte_Sparrow Lincoln_Sparrow Nelson_Sharp_tailed_Sparrow Savannah_Sparrow
Seaside_Sparrow Song_Sparrow Tree_Sparrow Vesper_Sparrow White_crowned_Sparrow White_throated_Sparrow
Cape_Glossy_Starling Bank_Swallow Barn_Swallow Cliff_Swallow Tree_Swallow Scarlet_Tanager Summer_Tanager
Artic_Tern Black_Tern Caspian_Tern Common_Tern Elegant_Tern Forsters_Tern Least_Tern Green_tailed_Towhee
Brown_Thrasher Sage_Thrasher Black_capped_Vireo Blue_headed_Vireo Philadelphia_Vireo Red_eyed_Vireo
Warbling_Vireo White_eyed_Vireo Yellow_throated_Vireo Bay_breasted_Warbler Black_and_white_Warbler
Black_throated_Blue_Warbler Blue_winged_Warbler Canada_Warbler Cape_May_Warbler Cerulean_Warbler
Chestnut_sided_Warbler Golden_winged_Warbler Hooded_Warbler Kentucky_Warbler Magnolia_Warbler
Mourning_Warbler Myrtle_Warbler Nashville_Warbler Orange_crowned_Warbler Palm_Warbler Pine_Warbler
Prairie_Warbler Prothonotary_Warbler Swainson_Warbler Tennessee_Warbler Wilson_Warbler Worm_eating_Warbler
Yellow_Warbler Northern_Waterthrush Louisiana_Waterthrush Bohemian_Waxwing Cedar_Waxwing
American_Three_toed_Woodpecker Pileated_Woodpecker Red_bellied_Woodpecker Red_cockaded_Woodpecker
Red_headed_Woodpecker Downy_Woodpecker Bewick_Wren Cactus_Wren Carolina_Wren House_Wren Marsh_Wren Rock_Wren
Winter_Wren Common_Yellowthroat
""".split()))  # noqa: SIM905 (a block of names reads better than 200 quoted strings)

# CUB names that differ from iNat 2021's common names beyond case/punctuation/possessives (typos, old names,
# genus-level classes). Sayornis (a genus of three phoebes) has no single species and stays unmatched.
CUB_TO_INAT_NAME = {
    "Artic Tern": "Arctic Tern",
    "Cardinal": "Northern Cardinal",
    "Mockingbird": "Northern Mockingbird",
    "Nighthawk": "Common Nighthawk",
    "Geococcyx": "Greater Roadrunner",
    "Florida Jay": "Florida Scrub-Jay",
    "Frigatebird": "Magnificent Frigatebird",
    "Tree Sparrow": "American Tree Sparrow",
    "Myrtle Warbler": "Yellow-rumped Warbler",
    "Whip poor Will": "Eastern Whip-poor-will",
    "Green Violetear": "Mexican Violetear",
    "Nelson Sharp tailed Sparrow": "Nelson's Sparrow",
    "Le Conte Sparrow": "LeConte's Sparrow",
    "Cape Glossy Starling": "Cape Starling",
    "Forsters Tern": "Forster's Tern",
    "Great Grey Shrike": "Northern Shrike",
}


class CUB200(_ImageList):
    """Caltech-UCSD Birds-200-2011 from its own layout (``images.txt``, ``classes.txt``, ``image_class_labels.txt``,
    ``train_test_split.txt``, ``images/``).

    Args:
        root: the ``CUB_200_2011`` folder (or the folder that contains it).
        split: ``"train"`` (5,994 images), ``"test"`` (5,794) or ``"all"``.
        transform: applied to the PIL image.
        target_transform: applied to the int target (class id - 1).
        loader: image loader; RGB PIL by default.

    Attributes:
        classes: clean names (``001.Black_footed_Albatross`` -> ``Black footed Albatross``).
        folder_names: the raw names from ``classes.txt``.
        image_ids: CUB image id of each sample.

    >>> ds = CUB200("data/CUB_200_2011", split="train")  # doctest: +SKIP
    >>> ds.classes[0]  # doctest: +SKIP
    'Black footed Albatross'
    """

    FILES = ("images.txt", "classes.txt", "image_class_labels.txt", "train_test_split.txt")

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None, *, loader: Callable | None = None) -> None:
        root = Path(root).expanduser()
        if not (root / "images.txt").is_file() and (root / "CUB_200_2011" / "images.txt").is_file():
            root = root / "CUB_200_2011"
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        self.split = _check_split(split, ("train", "test", "all"), "CUB200")
        self.loader = loader or pil_loader
        for name in self.FILES:
            if not (root / name).is_file():
                raise _not_found(root, name, "Point `root` at the extracted CUB_200_2011 folder.")
        if not (root / "images").is_dir():
            raise _not_found(root, "the images/ folder", "Point `root` at the extracted CUB_200_2011 folder.")
        paths = self._table(root, "images.txt")
        class_rows = self._table(root, "classes.txt")
        labels = self._table(root, "image_class_labels.txt")
        is_train = self._table(root, "train_test_split.txt")
        self.folder_names = [class_rows[i] for i in sorted(class_rows)]
        if sorted(class_rows) != list(range(1, len(class_rows) + 1)):
            raise _not_found(root, "classes.txt to number classes 1..N without gaps")
        samples, ids = [], []
        for image_id in sorted(paths):
            if image_id not in labels or image_id not in is_train:
                missing = "image_class_labels.txt" if image_id not in labels else "train_test_split.txt"
                raise _not_found(root, f"{missing} to list image id {image_id} (it is in images.txt)")
            label, flag = labels[image_id], is_train[image_id]
            if not label.isdigit() or not 1 <= int(label) <= len(class_rows) or flag not in ("0", "1"):
                raise _not_found(root, f"image id {image_id} to have a class in 1..{len(class_rows)} and a split "
                                       f"flag 0/1, got {label!r} and {flag!r}")
            if self.split == "all" or (flag == "1") == (self.split == "train"):
                samples.append((str(root / "images" / paths[image_id]), int(label) - 1))
                ids.append(image_id)
        self.image_ids = ids
        self._set_samples([clean_class_name(n) for n in self.folder_names], samples)

    @staticmethod
    def _table(root: Path, name: str) -> dict[int, str]:
        """``<id> <value>`` lines -> {id: value}; a malformed line names the file and the line."""
        out = {}
        for n, line in enumerate((root / name).read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2 or not parts[0].isdigit():
                raise _not_found(root, f"{name} line {n} to read '<id> <value>' but it is {line!r}")
            out[int(parts[0])] = parts[1].strip()
        if not out:
            raise _not_found(root, f"{name} to list entries, but it is empty")
        return out


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


class INat2021(_ImageList):
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

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None, *, subset: str | Sequence[str] | None = None,
                 subset_seed: int = 0, subset_size: int = 50, names: str = "auto",
                 loader: Callable | None = None) -> None:
        root = Path(root).expanduser()
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        self.split = _check_split(split, tuple(INAT_VERSIONS), "INat2021")
        if names not in ("auto", "common", "scientific"):
            raise UserError(f"`names` must be one of auto, common, scientific but is {names!r}.")
        self.loader = loader or pil_loader
        version = INAT_VERSIONS[split]
        folder = root / version if (root / version).is_dir() else root / _INAT_ALT_DIRS[version]
        if not folder.is_dir():
            raise _not_found(root, f"the folder {version}/ (torchvision's layout) or {_INAT_ALT_DIRS[version]}/",
                             "Extract iNat's archive there, or pass the folder that contains it.")
        dirs = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if not dirs:
            raise _not_found(root, f"one folder per species in {folder}")
        taxa = []
        for i, d in enumerate(dirs):
            pieces = d.split("_")
            if len(pieces) != 8 or not pieces[0].isdigit():
                raise _not_found(root, f"species folders named like 00000_Animalia_…_Genus_species, found {d!r}")
            taxa.append(pieces)
        meta = self._categories(root)
        common = [meta.get(d, {}).get("common_name") for d in dirs]
        if names == "common" and not all(common):
            raise _not_found(root, "iNat's annotation file with common names (categories.json, train_mini.json or "
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
                    raise _not_found(root, f"{name} to be valid JSON ({e})") from None
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
                raise _not_found(root, "iNat's annotation file (categories.json, train_mini.json or val.json)",
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


class ImageNet(_ImageList):
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

    def __init__(self, root: str | os.PathLike, split: str = "train", transform: Callable | None = None,
                 target_transform: Callable | None = None, *, names_file: str | os.PathLike | None = None,
                 loader: Callable | None = None) -> None:
        root = Path(root).expanduser()
        super().__init__(str(root), transform=transform, target_transform=target_transform)
        self.split = _check_split(split, ("train", "val"), "ImageNet")
        self.loader = loader or pil_loader
        folder = root / split
        if not folder.is_dir():
            raise _not_found(root, f"the folder {split}/ with one sub-folder per class (n01440764/ …)")
        wnids = sorted(d.name for d in os.scandir(folder) if d.is_dir())
        if not wnids:
            flat = any(f.lower().endswith(IMG_EXTENSIONS) for f in os.listdir(folder))
            raise _not_found(root, f"{split}/ to hold one folder per class",
                             "The val images are flat: sort them into class folders (the usual valprep.sh)."
                             if flat else "")
        if names_file is None and (root / "LOC_synset_mapping.txt").is_file():
            names_file = root / "LOC_synset_mapping.txt"
        names = imagenet_class_names(names_file)
        unknown = [w for w in wnids if w not in names]
        if unknown:
            raise _not_found(root, f"class folders named by WordNet id, found {unknown[0]!r}",
                             "Pass `names_file` mapping folder names to class names, or use ImageFolder.")
        self.wnids = wnids
        samples = []
        for target, w in enumerate(wnids):
            for f in sorted(os.listdir(folder / w)):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((str(folder / w / f), target))
        self._set_samples([names[w] for w in wnids], samples)


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


# --------------------------------------------------------------------------------------------------------------------
# torchvision's fine-grained sets
# --------------------------------------------------------------------------------------------------------------------
# name -> (torchvision class, valid splits). "train" maps to "trainval" for sets whose training split has that name.
TORCHVISION_SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "flowers102": ("Flowers102", ("train", "val", "test")),
    "oxfordiiitpet": ("OxfordIIITPet", ("trainval", "test")),
    "fgvcaircraft": ("FGVCAircraft", ("train", "val", "trainval", "test")),
    "food101": ("Food101", ("train", "test")),
    "dtd": ("DTD", ("train", "val", "test")),
    "eurosat": ("EuroSAT", ("train", "test")),
    "stanfordcars": ("StanfordCars", ("train", "test")),
}
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
    _check_split(split, splits, cls_name)
    cls = getattr(tvd, cls_name)
    args: dict[str, Any] = dict(transform=transform, target_transform=target_transform, download=download, **kw)
    if key != "eurosat":
        args["split"] = split
    try:
        ds = cls(str(Path(root).expanduser()), **args)
    except RuntimeError as e:
        raise _not_found(root, f"torchvision's {cls_name} files ({str(e).splitlines()[0]})",
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


# --------------------------------------------------------------------------------------------------------------------
# Names -> datasets
# --------------------------------------------------------------------------------------------------------------------
DATASETS: dict[str, Callable[..., Any]] = {
    "digits": Digits,
    "cub": CUB200,
    "inat": INat2021,
    "imagenet": ImageNet,
    "imagefolder": ImageFolder,
}
ALIASES = {"cub200": "cub", "inat2021": "inat", "inat21": "inat", "flowers": "flowers102", "pets": "oxfordiiitpet",
           "aircraft": "fgvcaircraft", "food": "food101", "cars": "stanfordcars", "folder": "imagefolder"}
DATASET_NAMES = (*DATASETS, *TORCHVISION_SETS)


def get_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                transform: Callable | None = None, **kw: Any) -> Any:
    """The real dataset called `name` ("digits", "cub", "inat", "imagenet", "imagefolder", or a torchvision set).

    Args:
        name: one of `DATASET_NAMES` (case-insensitive; aliases like "pets", "cars" accepted).
        root: dataset folder (ignored for "digits").
        split: the split to read.
        transform: applied to each PIL image.
        **kw: passed to the dataset class (e.g. ``subset="inat179"`` for iNat).

    >>> ds = get_dataset("digits", split="test")
    >>> len(ds.classes)
    10
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    key = ALIASES.get(key, key)
    if key not in DATASETS and key not in TORCHVISION_SETS:
        raise UserError(f"`dataset` must be one of {', '.join(DATASET_NAMES)} but is {name!r}: fix the name.")
    if key == "digits":
        _check_split(split, tuple(DIGITS_SPLITS), "digits")
        return Digits(root, split=split, transform=transform, **kw)
    if root is None:
        raise UserError(f"`root` is required for dataset {name!r}: pass the folder that holds it (--root PATH).")
    if not Path(root).expanduser().exists():
        raise _not_found(root, "an existing folder", "Check the --root path.")
    if key in TORCHVISION_SETS:
        return torchvision_dataset(key, root, split, transform, **kw)
    if key == "imagefolder" and split == "train" and not (Path(root) / "train").is_dir():
        split = None  # a plain class-folder tree has no split folders: read the root itself
    return DATASETS[key](root, split, transform, **kw)
