"""Reading one config value: a YAML or ``--set`` value converted to its field's declared type (`coerce`), or a
one-line `UserError` naming the key. What `synthaug.config` builds its dataclasses with."""

from __future__ import annotations

import math
from typing import Any, get_args, get_origin

from .errors import UserError

# Keys where "auto" means null: the value is chosen when the work runs. Key -> what the key accepts.
AUTO_KEYS = {"generate.batch_size": "an integer > 0, or auto (null) to fit the GPU's free memory",
             "dct.classes_per_batch": "an integer > 0, or auto (null) to fit the GPU's free memory",
             "generate.compile": "true, false, or auto (null; on with CUDA, off elsewhere)",
             "channels_last": "true, false, or auto (null; on with CUDA, off elsewhere)"}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise a UserError naming the key."""
    if key in AUTO_KEYS and value is not None:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return None
        try:
            return coerce(value, get_args(tp)[0], key + " ")  # a key outside AUTO_KEYS: no recursion
        except UserError:
            raise UserError(f"`{key}` must be {AUTO_KEYS[key]} but is {short(value)}.") from None
    origin, args = get_origin(tp), get_args(tp)
    if value is None:
        if type(None) in args or tp is Any:
            return None
        raise UserError(f"`{key}` may not be null: give a value of type {getattr(tp, '__name__', tp)}.")
    if args and type(None) in args:  # Optional[X]
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str) or (args[0] in (int, float) and isinstance(value, (int, float))
                                      and not isinstance(value, bool)):
            value = [value]  # one value for a list of one: `generate.strength: 0.6`
        if not isinstance(value, (list, tuple)):
            raise UserError(f"`{key}` must be a list but is {short(value)}.")
        return tuple(coerce(v, args[0], key) for v in value)
    if isinstance(value, (list, tuple, dict, set)):
        kind = "a mapping" if isinstance(value, dict) else "a list"
        raise UserError(f"`{key}` must be a single value, not {kind}: {short(value)}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise UserError(f"`{key}` must be true or false but is {short(value)}.")
    if tp in (int, float):
        if isinstance(value, bool):
            raise UserError(f"`{key}` must be a number but is {value!r}.")
        try:
            out = tp(value)
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"`{key}` must be {'an integer' if tp is int else 'a number'} but is {short(value)}."
                            ) from None
        if tp is int and isinstance(value, float) and value != out:
            raise UserError(f"`{key}` must be an integer but is {value!r}.")
        if tp is float and not math.isfinite(out):
            raise UserError(f"`{key}` must be a finite number but is {out!r}.")
        return out
    if tp is str:
        return str(value)
    return value


def short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."
