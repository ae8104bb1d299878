"""The config's documentation, read from the ``Attributes:`` section of each config dataclass's docstring (the single
source: a field is documented where its class is defined, and nowhere else). `explain` answers
``synthaug config --explain KEY``.

>>> print(explain("dct.lr"))  # doctest: +SKIP
>>> print(explain("dct"))  # every key of the section, one line each  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import textwrap
from pathlib import Path
from typing import Any

from .config import BuildConfig, closest_keys
from .errors import UserError
from .presets import DATASET_DEFAULTS, METHOD_DEFAULTS, PRESETS

# The config's sections: the fields of `BuildConfig` that are config dataclasses themselves.
SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(BuildConfig)  # type: ignore[misc]
                             if f.default_factory is not dataclasses.MISSING}
_ENTRY = re.compile(r"^    (\w+): ?(.*)$")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: its documentation}`` from the ``Attributes:`` section of `cls`'s docstring (Google style: one entry
    per field, continuation lines indented further), continuation lines joined.

    >>> field_docs(DCTConfig)["lr"]  # doctest: +SKIP
    "Adam's learning rate for the token; null: ``0.00025 * batch_size``, the paper's recommendation."
    """
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if line.strip() == "Attributes:"), len(lines))
    docs: dict[str, str] = {}
    name = None
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break  # the next section of the docstring
        entry = _ENTRY.match(line)
        if entry:
            name = entry.group(1)
            docs[name] = entry.group(2).strip()
        elif name and line.startswith("        "):
            docs[name] += " " + line.strip()
    return docs


def config_keys() -> dict[str, tuple[type, dataclasses.Field]]:
    """Every dotted config key (``"per_class"``, ``"dct.lr"``) -> (the dataclass that defines it, its field)."""
    keys = {}
    for f in dataclasses.fields(BuildConfig):
        keys[f.name] = (BuildConfig, f)
        if f.name in SECTIONS:
            keys.update({f"{f.name}.{g.name}": (SECTIONS[f.name], g) for g in dataclasses.fields(SECTIONS[f.name])})
    return keys


def explain(key: str, build: str | os.PathLike | None = None) -> str:
    """The documentation of config key `key`: for a field (``"dct.lr"``, ``"per_class"``) its text, type, default
    and the defaults that datasets, methods and presets give it; for a section (``"dct"``) each of its keys on one
    line. With `build` (a build folder), also the value that build used, read from its ``config.yaml``.

    Raises:
        UserError: `key` is not a config key (one line naming the closest ones), or `build` is not a build folder.

    >>> print(explain("dct.max_steps", build="out/digits"))  # doctest: +SKIP
    """
    keys = config_keys()
    if key not in keys:
        close = closest_keys(key, keys) or sorted(SECTIONS)
        raise UserError(f"Unknown config key {key!r}: the closest valid keys are {', '.join(close)} "
                        f"(`synthaug config --explain SECTION` lists a section's keys).")
    recorded = _build_config(build) if build is not None else None
    if key in SECTIONS:
        return _explain_section(key, recorded)
    cls, f = keys[key]
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    out = [f"{key}: {f.type} (default {_show(default)})"]
    out += textwrap.wrap(field_docs(cls).get(f.name, "(not documented)"), 100, initial_indent="    ",
                         subsequent_indent="    ")
    others = _other_defaults(key)
    if others:
        out.append(f"    other defaults: {others}")
    if recorded is not None:
        out.append(f"    in the build {build}: {_recorded(recorded, key)}")
    return "\n".join(out)


def _explain_section(section: str, recorded: dict | None) -> str:
    cls = SECTIONS[section]
    summary = inspect.cleandoc(cls.__doc__ or "").splitlines()[0]
    out = [f"{section}: {summary}"]
    docs = field_docs(cls)
    width = max(len(f"{section}.{f.name}") for f in dataclasses.fields(cls))
    for f in dataclasses.fields(cls):
        key = f"{section}.{f.name}"
        line = f"  {key:<{width}}  {_first_sentence(docs.get(f.name, '(not documented)'), 115 - width)}"
        if recorded is not None:
            line += f" [this build: {_recorded(recorded, key)}]"
        out.append(line)
    return "\n".join(out)


def _first_sentence(text: str, limit: int) -> str:
    """The first sentence of `text`, cut to `limit` characters."""
    sentence = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 3].rstrip() + "..."


def _other_defaults(key: str) -> str:
    """Where a dataset, a method or a preset sets `key` (``"dataset digits: 0.003, preset paper: null"``)."""
    sets = [(f"dataset {name}", values) for name, values in DATASET_DEFAULTS.items()]
    sets += [(f"method {name}", values) for name, values in METHOD_DEFAULTS.items()]
    sets += [(f"preset {name}", values) for name, values in PRESETS.items()]
    return ", ".join(f"{where}: {_show(values[key])}" for where, values in sets if key in values)


def _build_config(build: str | os.PathLike) -> dict:
    from .layout import CONFIG_FILE

    path = Path(build) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"`--build` {str(build)!r} is not a synthaug build (no {CONFIG_FILE}): pass the --out folder "
                        f"of a build.")
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"{path} is unreadable ({' '.join(str(e).split())[:200]}).") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds {type(data).__name__}, not a mapping of config keys.")
    return data


def _recorded(data: dict, key: str) -> str:
    value: Any = data
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return "not recorded (its config.yaml predates the key: the default applied)"
        value = value[part]
    return _show(value)


def _show(value: Any) -> str:
    """A value as YAML and JSON write it: null, true, 0.003, "a", ["x", "y"]."""
    return json.dumps(list(value) if isinstance(value, tuple) else value, ensure_ascii=False)
