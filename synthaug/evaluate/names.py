"""Matching a judge's label names to a build's classes."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


# --------------------------------------------------------------------------------------------------------------------
# Judge class mapping (the paper's iNat179 protocol: a judge with another label set, matched by clean name)
# --------------------------------------------------------------------------------------------------------------------
def clean_label(name: str) -> str:
    """A label as a comparable key: ``"001.Black_footed_Albatross"`` -> ``"black footed albatross"``.

    >>> clean_label("001.Black_footed_Albatross")
    'black footed albatross'
    """
    s = re.sub(r"^\s*\d+\s*[.\-_:)]+\s*", "", str(name))  # numbered prefixes: "001.", "3 - ", "12_"
    s = re.sub(r"[_\-]+", " ", s)
    return re.sub(r"\s+", " ", s).strip().lower()


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
    build_names: Sequence[str], judge_labels: Sequence[str], class_map: Mapping[str, str] | None = None
) -> ClassMapping:
    """Match build classes to judge labels: identical lists, a user mapping, or clean names.

    Args:
        build_names: the build's class names, by class index.
        judge_labels: the judge's output labels, by output index.
        class_map: optional build name -> judge label (e.g. CUB common names -> iNat species).

    >>> map_classes(["Black footed Albatross", "Dodo"], ["dog", "black_footed_albatross"]).build_to_judge
    {0: 1}
    """
    build_clean = [clean_label(n) for n in build_names]
    judge_clean = [clean_label(lb) for lb in judge_labels]
    lookup: dict[str, int] = {}
    for j, name in enumerate(judge_clean):
        lookup.setdefault(name, j)  # the first of duplicate labels wins

    if class_map:
        by_clean = {clean_label(k): v for k, v in class_map.items()}
        mapping = {}
        for i, name in enumerate(build_clean):
            if name not in by_clean:
                continue
            target = clean_label(by_clean[name])
            if target not in lookup:
                raise UserError(
                    f"`class_map` maps {build_names[i]!r} to {by_clean[name]!r}, which is not a judge label: use one "
                    f"of the judge's labels (e.g. {', '.join(map(repr, list(judge_labels)[:3]))})."
                )
            mapping[i] = lookup[target]
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


def _load_class_map(class_map: Mapping[str, str] | str | os.PathLike | None) -> dict[str, str] | None:
    if class_map is None or isinstance(class_map, Mapping):
        return dict(class_map) if class_map else None
    p = Path(class_map)
    if not p.is_file():
        raise UserError(f"`class_map` {str(class_map)!r} does not exist: pass a JSON file {{build name: judge label}}.")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"`class_map` {str(class_map)!r} is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise UserError(f"`class_map` {str(class_map)!r} must hold a JSON object {{build name: judge label}}.")
    return {str(k): str(v) for k, v in data.items()}


def _same_source(a: str | None, b: str | None) -> bool:
    """Whether two classifier sources name the same model (hub ids case-insensitively, local paths resolved)."""
    if not a or not b:
        return False

    def norm(s: str) -> str:
        s = s.strip()
        for prefix in ("hf-hub:", "hf_hub:", "timm:", "timm/"):
            if s.lower().startswith(prefix):
                s = s[len(prefix):]
        p = Path(s).expanduser()
        if p.exists():
            return str(p.resolve())
        return s.rstrip("/").lower()

    return norm(a) == norm(b)
