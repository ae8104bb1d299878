"""Worker hooks: a module whose functions every class job calls at fixed points (`WorkerHooks`), named by the
environment variable ``SYNTHAUG_WORKER_HOOKS``: tracing, and fault injection in tests."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ..errors import UserError

HOOKS_ENV = "SYNTHAUG_WORKER_HOOKS"


HOOK_POINTS = ("on_job_start", "on_token_learned", "on_shard_written")


_LOADED_HOOKS: dict[str, ModuleType] = {}  # one import per process, however many workers it runs


@dataclass(frozen=True)
class WorkerHooks:
    """A module whose functions a worker calls at fixed points of every class job (tracing, fault injection in tests).

    Named by the environment variable ``SYNTHAUG_WORKER_HOOKS`` on the driver: a module name on ``sys.path`` or the
    path of a ``.py`` file (on shared storage when workers run on other machines). The module may define any of

    - ``on_job_start(worker, job, attempt)``: before the job loads models or learns anything;
    - ``on_token_learned(worker, job)``: the token is learned, its file not yet written;
    - ``on_shard_written(worker, job, shard_id)``: a shard is complete on disk (its ``_stats.json`` included);

    and ``SETTINGS``, names of environment variables that the driver reads and hands to every worker as
    ``worker.hook_settings`` (so they reach Ray actors of a cluster started elsewhere). `worker` is the
    `ClassWorker` (``worker.out``, ``worker.in_ray``, ``worker.hook_settings``), `job` the `ClassJob`. An exception
    in a hook fails the job like any other error. Without the variable no hook runs.

    Attributes:
        module: the module name or ``.py`` path.
        settings: the values of the module's ``SETTINGS`` found in the driver's environment.
    """

    module: str
    settings: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WorkerHooks | None:
        """The hooks the environment names (importing the module once here, so a wrong name fails before any job)."""
        environ = os.environ if environ is None else environ
        spec = environ.get(HOOKS_ENV, "").strip()
        if not spec:
            return None
        names = getattr(_import_hooks(spec), "SETTINGS", ())
        return cls(spec, {k: environ[k] for k in names if k in environ})

    def load(self) -> ModuleType:
        return _import_hooks(self.module)


def _import_hooks(spec: str) -> ModuleType:
    if spec in _LOADED_HOOKS:
        return _LOADED_HOOKS[spec]
    try:
        if spec.endswith(".py"):
            path = Path(spec).expanduser().resolve()
            loader = importlib.util.spec_from_file_location(f"_synthaug_hooks_{path.stem}", path)
            if loader is None or not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(spec)
    except Exception as e:  # noqa: BLE001 (any import failure is a bad setting)
        raise UserError(f"`{HOOKS_ENV}` {spec!r} cannot be imported ({type(e).__name__}: {e}): name a module on "
                        f"sys.path or a .py file, or unset {HOOKS_ENV}.") from None
    unknown = sorted(n for n in vars(module) if n.startswith("on_") and n not in HOOK_POINTS)
    if unknown:
        raise UserError(f"`{HOOKS_ENV}` {spec!r} defines {', '.join(unknown)}, which no worker calls: the hook "
                        f"points are {', '.join(HOOK_POINTS)}.")
    _LOADED_HOOKS[spec] = module
    return module
