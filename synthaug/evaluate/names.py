"""Matching a judge's (or a real dataset's) label names to a build's classes."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..datasets.inat import INat2021, inat179_class_map
from ..errors import UserError
from ..names import normalize_name

log = logging.getLogger(__name__)

ClassMap = Mapping[str, "str | Sequence[str]"]


# --------------------------------------------------------------------------------------------------------------------
# Judge class mapping (the paper's iNat179 protocol: a judge with another label set, matched by clean name)
# --------------------------------------------------------------------------------------------------------------------
_GENERIC_LABEL = re.compile(r"(label|class)? ?\d+")


@dataclass(frozen=True)
class ClassMapping:
    """Which judge output scores each build class."""

    build_to_judge: dict[int, int]  # build class index -> judge label index (only shared classes)
    shared: int  # classes the judge can score
    total: int  # classes in the build
    unmapped: tuple[str, ...]  # build class names the judge does not know (left out of every score)
    by: str  # "identity" (same labels), "name" (clean-name match), "map" (user mapping), "index" (unnamed labels)


def map_classes(
    build_names: Sequence[str], judge_labels: Sequence[str], class_map: ClassMap | None = None
) -> ClassMapping:
    """Match build classes to judge labels: identical lists, a user mapping, or clean names (`normalize_name`).

    Args:
        build_names: the build's class names, by class index.
        judge_labels: the judge's output labels, by output index.
        class_map: optional build name -> judge label, or -> several names of one class, the first the judge knows
            wins (e.g. CUB common names -> iNat common, scientific and folder names: `resolve_class_map("inat179")`).

    >>> map_classes(["Black footed Albatross", "Dodo"], ["dog", "black_footed_albatross"]).build_to_judge
    {0: 1}
    """
    build_clean = [normalize_name(n) for n in build_names]
    judge_clean = [normalize_name(lb) for lb in judge_labels]
    lookup: dict[str, int] = {}
    for j, name in enumerate(judge_clean):
        lookup.setdefault(name, j)  # the first of duplicate labels wins

    if class_map:
        by_clean = {normalize_name(k): v for k, v in class_map.items()}
        mapping = {}
        for i, name in enumerate(build_clean):
            if name not in by_clean:
                continue
            targets = [by_clean[name]] if isinstance(by_clean[name], str) else list(by_clean[name])
            hit = next((lookup[normalize_name(t)] for t in targets if normalize_name(t) in lookup), None)
            if hit is not None:
                mapping[i] = hit
            elif isinstance(by_clean[name], str):  # one name, spelled by the user: a typo is refused
                raise UserError(
                    f"`class_map` maps {build_names[i]!r} to {by_clean[name]!r}, which is not a judge label: use one "
                    f"of the judge's labels (e.g. {', '.join(map(repr, list(judge_labels)[:3]))})."
                )
        by = "map"
    elif build_clean == judge_clean:
        mapping, by = {i: i for i in range(len(build_clean))}, "identity"
    else:
        mapping = {i: lookup[n] for i, n in enumerate(build_clean) if n in lookup}
        by = "name"
        if not mapping and len(judge_clean) == len(build_clean) and all(
            _GENERIC_LABEL.fullmatch(n) for n in judge_clean
        ):
            # The judge carries no label names (``LABEL_0`` ...): its outputs can only be trusted to follow the
            # build's class order, which is what a judge trained on the same dataset does.
            warnings.warn("The judge's labels carry no class names; matching build classes by index.", stacklevel=3)
            mapping, by = {i: i for i in range(len(build_clean))}, "index"
    if not mapping:
        raise UserError(
            f"The judge shares no class names with the build (build: {', '.join(map(repr, build_names[:3]))}...; "
            f"judge: {', '.join(map(repr, list(judge_labels)[:3]))}...): pass `class_map` (build name -> judge "
            "label) or a judge trained on these classes."
        )
    unmapped = tuple(build_names[i] for i in range(len(build_names)) if i not in mapping)
    return ClassMapping(mapping, len(mapping), len(build_names), unmapped, by)


def map_build_classes(classes: Sequence[Mapping], labels: Sequence[str], class_map: ClassMap | None = None
                      ) -> ClassMapping:
    """`map_classes` for a build's ``classes.json`` rows, keyed by their class index (a build of selected classes
    lists only those, with the dataset's indices)."""
    ordered = sorted(classes, key=lambda c: int(c["index"]))
    mapping = map_classes([str(c["name"]) for c in ordered], labels, class_map)
    index = [int(c["index"]) for c in ordered]
    return dataclasses.replace(mapping, build_to_judge={index[i]: j for i, j in mapping.build_to_judge.items()})


def resolve_class_map(class_map: ClassMap | str | os.PathLike | None) -> tuple[dict[str, list[str]] | None, list[str]]:
    """A class map from any of its forms, and the build names it knows have no counterpart.

    Forms: None; a mapping build name -> label (or -> several names of one class); a JSON file of one; ``"inat179"``
    (the shipped CUB -> iNat common-name map); ``"inat179:ROOT"`` (the same, read against the iNat 2021 copy at ROOT:
    each CUB class maps to the species' common, scientific and folder names, and the CUB names with no iNat species
    are returned as unmatched).

    >>> resolve_class_map("inat179")[0]["Artic Tern"]
    ['Arctic Tern']
    """
    if class_map is None or isinstance(class_map, Mapping):
        if not class_map:
            return None, []
        return {str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in class_map.items()}, []
    text = os.fspath(class_map)
    if text == "inat179" or text.startswith("inat179:"):
        root = text.partition(":")[2]
        if not root:
            return inat179_class_map()
        if not Path(root).expanduser().is_dir():
            raise UserError(f"`class_map` {text!r} names no folder: pass 'inat179:ROOT' with ROOT holding iNat 2021 "
                            "(2021_valid/ or 2021_train_mini/ and an annotation file), or plain 'inat179'.")
        split = "val" if any((Path(root).expanduser() / d).is_dir() for d in ("2021_valid", "val")) else "train"
        return inat179_class_map(INat2021(root, split=split, subset="inat179"))
    p = Path(text)
    if not p.is_file():
        raise UserError(f"`class_map` {text!r} does not exist: pass a JSON file {{build name: judge label}}, "
                        "'inat179' or 'inat179:ROOT'.")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"`class_map` {text!r} is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise UserError(f"`class_map` {text!r} must hold a JSON object {{build name: judge label}}.")
    return {str(k): [v] if isinstance(v, str) else [str(x) for x in v] for k, v in data.items()}, []
