"""Strict JSON: non-finite floats become null at any depth, and nothing writes NaN or Infinity."""

import json
import math

from synthaug.jsonfmt import dumps, finite


def test_non_finite_floats_are_null_at_any_depth():
    obj = {"loss": math.nan, "history": [{"acc": 1.0, "lr": math.inf}], "pair": (1, -math.inf), "name": "nan"}
    assert finite(obj) == {"loss": None, "history": [{"acc": 1.0, "lr": None}], "pair": [1, None], "name": "nan"}
    text = dumps(obj, sort_keys=True)
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["history"][0] == {"acc": 1.0, "lr": None}
