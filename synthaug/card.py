"""The dataset card of a build: ``out/README.md``, which Hugging Face ``datasets`` reads a local folder's layout from.

Consumes what `synthaug.index.merge_index` knows of a finished build (its methods, the class names, the image
format) and produces the card's text: YAML front matter with ``configs`` (one split per method, over
``shards/METHOD-*.tar``) and ``dataset_info.features`` (the sample's members as the WebDataset builder yields them:
``cls`` a ``ClassLabel`` with the class names, the image, ``txt``, and ``json`` with the sidecar's fields and types),
then a short human-readable body. So ``datasets.load_dataset("out/digits")`` gives ``dct`` and ``sd`` splits whose
``cls`` feature knows its names (``ds["dct"].features["cls"].int2str(3)``), and the Hub shows the same on upload.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import yaml

from .layout import CARD_MARKER, SHARDS_DIR
from .shards import JSON_LEFT_OUT, LATER_COLUMNS, ROW_FIELDS, index_schema

# Arrow types of the index -> the dtype names of Hugging Face `datasets` features.
_DTYPES = {"string": "string", "int64": "int64", "double": "float64", "float": "float32", "bool": "bool"}


def _feature(name: str, arrow_type) -> dict:
    """One feature in the card's YAML form (lists as ``sequence``, which every `datasets` version reads)."""
    t = str(arrow_type)
    if t.startswith("list<"):
        return {"name": name, "sequence": _DTYPES[str(arrow_type.value_type)]}
    return {"name": name, "dtype": _DTYPES[t]}


def sidecar_features() -> list[dict]:
    """The fields of a sample's ``.json`` member (`synthaug.shards.sample_members`) as card features, by name."""
    schema = index_schema()
    names = [k for k in ROW_FIELDS if k not in JSON_LEFT_OUT] + list(LATER_COLUMNS)
    return [_feature(n, schema.field(n).type) for n in sorted(names)]


def class_names(num_classes: int, names: Mapping[int, str]) -> list[str]:
    """A name for every class index ``0..num_classes-1`` (``ClassLabel`` needs them all, distinct): `names`'s, else
    ``"class N"``; a name already taken gets its index appended.

    >>> class_names(3, {0: "zero", 2: "zero"})
    ['zero', 'class 1', 'zero (2)']
    """
    out: list[str] = []
    for i in range(num_classes):
        name = str(names.get(i, f"class {i}"))
        out.append(name if name not in out else f"{name} ({i})")
    return out


def dataset_card(*, methods: Sequence[str], names: Sequence[str], image_formats: Sequence[str], train: Sequence[str],
                 name: str = "synthaug build") -> str:
    """The text of ``README.md`` for a build of `methods` (its splits, in this order), class `names` (index order)
    and images in `image_formats` (the image member's extensions: one, unless the build changed
    ``shards.image_format``); `train` are the build's own methods, said in the body.

    >>> print(dataset_card(methods=["dct"], names=["zero"], image_formats=["png"], train=["dct"]).splitlines()[2])
    - config_name: default
    """
    features = [
        *({"name": f, "dtype": "image"} for f in image_formats),
        {"name": "cls", "dtype": {"class_label": {"names": {str(i): n for i, n in enumerate(names)}}}},
        {"name": "json", "struct": sidecar_features()},
        {"name": "txt", "dtype": "string"},
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
    ]
    meta = {
        "configs": [{"config_name": "default",
                     "data_files": [{"split": m, "path": f"{SHARDS_DIR}/{m}-*.tar"} for m in methods]}],
        "dataset_info": {"features": features},
        "tags": ["synthetic", "synthaug", "webdataset"],
    }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    splits = ", ".join(f"`{m}`" for m in methods)
    own = ", ".join(f"`{m}`" for m in train) or "every method"
    return (f"---\n{front}---\n{CARD_MARKER}\n\n# {name}\n\n"
            f"Synthetic images made by synthaug, as WebDataset shards in `{SHARDS_DIR}/` (one split per method: "
            f"{splits}; the build's own: {own}, the others are there to compare against). {len(names)} classes.\n\n"
            f"```python\nimport datasets\nds = datasets.load_dataset(\"path/to/this/folder\")\n"
            f"ds[{methods[0]!r}].features[\"cls\"].names[:5]\n```\n\n"
            "Each sample: the image, `cls` (the class index), `txt` (the prompt) and `json` (its index row: seed, "
            "scheduler and its config, the guide's probability and soft label). `index.parquet` holds every row, "
            "with the byte offset of each image in its tar.\n")
