"""Dataset names without the datasets: what ``--dataset`` may be, checked with no torch or torchvision import.

`synthaug.datasets.catalog` resolves a name to a dataset; this module holds the names themselves (kinds, aliases,
the paper's named subsets, torchvision's sets and their splits), so that `synthaug.config.validate` and the CLI
refuse a misspelt name in milliseconds, before any heavy import.

`check_dataset_name` refuses an unknown name in one line, with the nearest names as a "did you mean".
"""

from __future__ import annotations

import difflib

from .errors import UserError

# The datasets synthaug reads itself (`synthaug.datasets`), by kind.
DATASET_KINDS = ("digits", "cub", "inat", "imagenet", "imagefolder")


ALIASES = {"cub200": "cub", "inat2021": "inat", "inat21": "inat", "flowers": "flowers102", "pets": "oxfordiiitpet",
           "aircraft": "fgvcaircraft", "food": "food101", "cars": "stanfordcars", "folder": "imagefolder"}


# Named subsets: a dataset name plus the keyword arguments that select the subset (the paper's iNat rows).
SUBSETS: dict[str, tuple[str, dict]] = {
    "inat179": ("inat", {"subset": "inat179"}),
    "inat50": ("inat", {"subset": "inat50"}),
}


# torchvision's fine-grained sets: name -> (torchvision class, valid splits). "train" maps to "trainval" for sets
# whose training split has that name.
TORCHVISION_SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "flowers102": ("Flowers102", ("train", "val", "test")),
    "oxfordiiitpet": ("OxfordIIITPet", ("trainval", "test")),
    "fgvcaircraft": ("FGVCAircraft", ("train", "val", "trainval", "test")),
    "food101": ("Food101", ("train", "test")),
    "dtd": ("DTD", ("train", "val", "test")),
    "eurosat": ("EuroSAT", ("train", "test")),
    "stanfordcars": ("StanfordCars", ("train", "test")),
}


DATASET_NAMES = (*DATASET_KINDS, *SUBSETS, *TORCHVISION_SETS)


def dataset_key(name: str) -> str:
    """The catalog key of a dataset name: lower case, without ``-``/``_``, aliases resolved.

    >>> dataset_key("CUB-200"), dataset_key("pets")
    ('cub200', 'oxfordiiitpet')
    """
    key = str(name).lower().replace("-", "").replace("_", "")
    return ALIASES.get(key, key)


def check_dataset_name(name: str, argument: str = "dataset") -> str:
    """`name` when it names a dataset, else a one-line `UserError` listing the names (and the nearest one).

    >>> check_dataset_name("digits")
    'digits'
    """
    key = dataset_key(name)
    if key in DATASET_KINDS or key in SUBSETS or key in TORCHVISION_SETS:
        return name
    near = difflib.get_close_matches(key, [*DATASET_NAMES, *ALIASES], n=1)
    hint = f"did you mean {near[0]!r}?" if near else "fix the name."
    raise UserError(f"`{argument}` must be one of {', '.join(DATASET_NAMES)} but is {name!r}: {hint}")
