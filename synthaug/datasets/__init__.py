"""Real datasets, in torchvision's conventions.

Each dataset takes ``(root, split="train", transform=None, target_transform=None, *, extras)`` and has `classes`
(clean names), `class_to_idx`, `samples`, `targets`, `extra_repr()` and ``__getitem__ -> (image, target)``.

- `CUB200`: the CUB_200_2011 layout; `INat2021`: torchvision's ``2021_train_mini``/``2021_valid`` layout with the
  paper's subsets (``"inat179"``: species shared with CUB, ``"inat50"``: a seeded per-supercategory sample);
  `ImageNet`: ``train/``/``val/`` class folders + class names; `ImageFolder`: any ``class/image`` tree;
  `torchvision_dataset`: Flowers102, OxfordIIITPet, FGVCAircraft, Food101, DTD, EuroSAT, StanfordCars (never
  downloads unless asked); `Digits`: the embedded world.
- `get_dataset(name, root, split)` resolves a name (what ``synthaug build --dataset`` uses; ``inat179`` and
  ``inat50`` name the paper's iNat subsets); `dataset_splits` / `default_test_split` / `check_split` say which
  splits a dataset has (iNat 2021 and ImageNet: train/val, no test);
  `select_classes(dataset, selection)` picks a run's classes; `few_shot_indices` / `few_shot` pick the same k images
  per class for the same seed.

Missing or malformed data raises `UserError`: "Dataset not found or corrupted at {root}: expected {file}. {fix}".

One file per dataset (`digits`, `cub`, `inat`, `imagenet`, `folder`, `tvsets`); `base`: the shared image-list
dataset and name cleaning; `catalog.get_dataset(name, root, split)` (a dataset's splits: its class's `SPLITS`);
`fewshot`: seeded k-shot subsets, the user's k real images by class (`shots_by_class`) and the check that a split
has them (`check_shots`); `select.select_classes(dataset, selection)`: one selection rule for every stage.
"""

from ..names import clean_class_name, normalize_name
from .base import IMG_EXTENSIONS, class_aliases, pil_loader
from .catalog import (
    ALIASES,
    DATASET_NAMES,
    DATASETS,
    SUBSETS,
    check_split,
    dataset_splits,
    default_test_split,
    get_dataset,
)
from .cub import CUB200, CUB_FOLDER_NAMES, CUB_TO_INAT_NAME
from .digits import DIGIT_NAMES, DIGITS_SIZE, DIGITS_SPLITS, Digits, digits_arrays
from .fewshot import FewShot, few_shot, few_shot_indices, stratified_indices, targets_of
from .folder import ImageFolder
from .imagenet import ImageNet, imagenet_class_names
from .inat import (
    INAT_SUPERCATEGORIES,
    INAT_VERSIONS,
    INat2021,
    inat179_class_map,
    inat_supercategory,
    per_supercategory_sample,
)
from .select import select_classes
from .tvsets import TORCHVISION_SETS, torchvision_dataset

__all__ = [
    "ALIASES",
    "CUB200",
    "CUB_FOLDER_NAMES",
    "CUB_TO_INAT_NAME",
    "DATASETS",
    "DATASET_NAMES",
    "DIGITS_SIZE",
    "DIGITS_SPLITS",
    "DIGIT_NAMES",
    "IMG_EXTENSIONS",
    "INAT_SUPERCATEGORIES",
    "INAT_VERSIONS",
    "SUBSETS",
    "TORCHVISION_SETS",
    "Digits",
    "FewShot",
    "INat2021",
    "ImageFolder",
    "ImageNet",
    "check_split",
    "class_aliases",
    "clean_class_name",
    "dataset_splits",
    "default_test_split",
    "digits_arrays",
    "few_shot",
    "few_shot_indices",
    "get_dataset",
    "imagenet_class_names",
    "inat179_class_map",
    "inat_supercategory",
    "normalize_name",
    "per_supercategory_sample",
    "pil_loader",
    "select_classes",
    "stratified_indices",
    "targets_of",
    "torchvision_dataset",
]
