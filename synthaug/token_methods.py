"""The token methods, as one registry: a method's name -> the object that learns, checks, saves and loads its tokens.

Every way of learning a class token (DCT, TI, MC-TI) is one `TokenMethod`. Its module defines it and registers it
with ``@register_method`` (the way timm's ``@register_model`` does); `METHOD_MODULES` names that module, one line
per method, so the names are known without importing torch: `synthaug.config.validate` and the CLI refuse a
misspelt ``method`` from this table before anything heavy loads. `get_method` imports the module the first time a
method is asked for (the build's worker, `builder.validate`, the executors and ``synthaug learn`` ask) and returns
its registered object; the caller keeps that one object and never branches on the method's name again.

A new method is one new file and one line here::

    # synthaug/tokens/mine.py
    @register_method
    class Mine(TokenMethod):
        name = "mine"
        shots = "selected"  # it learns from each learned class's k real images
        def learn(self, config, models, job, progress): ...
        def save(self, result, path): ...
        def load(self, path): ...

    # METHOD_MODULES
    "mine": "synthaug.tokens.mine",

A method registered at run time (a test, a plug-in that calls `register_method` itself) needs no line: it is known
in every process that imported its module (an in-process build; Ray actors import only what `METHOD_MODULES` names).

No torch here, and nothing from the package but `errors`: this is a foundation module.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar

from .errors import UserError

# One line per method: its name -> the module that defines and registers it (imported by `get_method`).
METHOD_MODULES: dict[str, str] = {
    "dct": "synthaug.tokens.dct_batch",
    "ti": "synthaug.tokens.mcti",
    "mcti": "synthaug.tokens.mcti",
}

_REGISTERED: dict[str, TokenMethod] = {}


class TokenMethod:
    """What every token method declares and does. A worker picks its build's method once (`get_method`) and calls
    only these; the defaults suit a method that learns one class at a time from nothing but the pipeline.

    Declared needs (class attributes):
        name: the ``method`` value, also the shards' split name (``METHOD-NNNNN``) and the index's ``method``.
        shots: whose k real images (``shots`` / ``shots_seed``) it learns from: None (none), ``"selected"`` (each
            class it learns), ``"all"`` (every class of the dataset, e.g. a regularizer that compares classes). The
            worker hands them over as ``models["shots"]``, ``{class_index: [PIL image, ...]}``.
        steered: it is steered by the guide (the guide's labels must be the dataset's classes before it learns;
            ``synthaug learn`` loads the guide only for such a method).

    `models`, in every call below, is the worker's dict of loaded inputs: ``"pipe"`` (the diffusion pipeline),
    ``"guide"`` (the loaded guide), ``"shots"`` (when `shots` is set), and whatever `prepare` added. `job` is any
    object with ``class_index``, ``name`` and ``token`` (a build's `ClassJob`). `config` is the whole `BuildConfig`.
    """

    name: ClassVar[str] = ""
    shots: ClassVar[str | None] = None
    steered: ClassVar[bool] = False

    # -- before any work ------------------------------------------------------------------------------------------
    def check(self, config: Any, *, dataset: Any, class_names: list[str], selected: list[int]) -> None:
        """Raise a one-line `UserError` for what the method cannot learn from: checks that need the dataset (its
        split's images per class) but no model. Runs before a build writes anything, and in ``synthaug learn``."""

    def trust(self, config: Any) -> str:
        """The trust check of its tokens (``"off"``, ``"warn"``, ``"fallback"``): only a guide-steered method's
        tokens are checked against the real images."""
        return "off"

    # -- once per worker ------------------------------------------------------------------------------------------
    def prepare(self, config: Any, models: dict[str, Any]) -> dict[str, Any]:
        """Inputs beyond the pipeline, the guide and the shots, loaded once per worker (a CLIP, class features)."""
        return {}

    # -- learning ------------------------------------------------------------------------------------------------
    def learn(self, config: Any, models: dict[str, Any], job: Any, progress: Any) -> Any:
        """One class's token (a result `save` writes). `progress`: True/False for a bar, or a callable fed one dict
        per iteration (`synthaug.tokens.progress`)."""
        raise NotImplementedError(f"token method {self.name!r} defines no learn()")

    def batches(self, config: Any) -> bool:
        """Whether the config asks for several classes' tokens in one batch (`learn_batch`)."""
        return False

    def classes_per_batch(self, config: Any, models: dict[str, Any], job: Any) -> int:
        """The classes one batch learns on this worker's device (1: the method learns one class at a time)."""
        return 1

    def learn_batch(self, config: Any, models: dict[str, Any], jobs: Iterable[Any], classes_per_batch: int,
                    progress: Any) -> Iterator[tuple[Any, Any]]:
        """``(job, result)`` for each of `jobs` as its token finishes, `classes_per_batch` classes per batch; a
        result may be a `UserError` (that class's bad input)."""
        raise NotImplementedError(f"token method {self.name!r} learns one class at a time")

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, result: Any, path: Path) -> None:
        """Write `result` as a token file (diffusers' textual-inversion format, atomically)."""
        raise NotImplementedError(f"token method {self.name!r} defines no save()")

    def load(self, path: Path) -> dict[str, Any]:
        """A token file -> ``{token: embedding}``; `UserError` when it is damaged."""
        raise NotImplementedError(f"token method {self.name!r} defines no load()")


def register_method(cls: type[TokenMethod]) -> type[TokenMethod]:
    """Class decorator: register one instance of a `TokenMethod` subclass under its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    _REGISTERED[cls.name] = cls()
    return cls


def method_names() -> tuple[str, ...]:
    """Every method's name: those of `METHOD_MODULES`, then any registered at run time."""
    return tuple(METHOD_MODULES) + tuple(n for n in _REGISTERED if n not in METHOD_MODULES)


def get_method(name: str) -> TokenMethod:
    """The registered method `name` (its module imported on first use). Raises `UserError` naming the methods."""
    if name not in _REGISTERED and name in METHOD_MODULES:
        importlib.import_module(METHOD_MODULES[name])  # the module registers it
    if name not in _REGISTERED:
        raise UserError(f"`method` must be one of {', '.join(method_names())} but is {name!r}.")
    return _REGISTERED[name]
