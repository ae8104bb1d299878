"""Strict JSON: what every JSON file (and JSON string) synthaug writes is made with.

Python's `json` writes ``NaN``, ``Infinity`` and ``-Infinity`` by default, which no JSON standard allows:
JavaScript's ``JSON.parse`` refuses them, polars' ``json_path_match`` returns null, jq rewrites them. Here a
non-finite float is written as ``null`` (a loss that never learned a number, a rate of no images) and anything that
would still hold one is refused (``allow_nan=False``), so a file is either strict JSON or not written.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """`obj` with every non-finite float (in dicts, lists and tuples, at any depth) replaced by None.

    >>> finite({"loss": float("nan"), "steps": [1.5, float("-inf")]})
    {'loss': None, 'steps': [1.5, None]}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` of `finite(obj)`, strict (``allow_nan=False``); `kwargs` as `json.dumps` takes them.

    >>> dumps({"p": float("inf")})
    '{"p": null}'
    """
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
