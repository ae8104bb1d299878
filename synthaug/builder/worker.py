"""The class worker: load models once, then learn (or load) a class token and write the class's shards."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from ..classifier.load import load_classifier
from ..config import from_dict
from ..datasets.catalog import get_dataset
from ..datasets.fewshot import few_shot_indices
from ..errors import UserError
from ..generation import generate
from ..layout import shard_done, token_path
from ..models import load_diffusion
from ..shards import write_shard
from ..tokens.clip import class_features, load_clip
from ..tokens.dct import learn_dct_token
from ..tokens.io import add_tokens, load_tokens, save_token
from ..tokens.mcti import learn_mcti_token
from .plan import ClassJob, ShardTask

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Hooks: optional callbacks at fixed points of a class job
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# The worker: the same class in-process and as a Ray actor
# --------------------------------------------------------------------------------------------------------------------
class ClassWorker:
    """Runs class jobs. Models load once, on the first job, and stay for the next ones.

    The local executor runs one in-process; the Ray executor wraps it with ``ray.remote`` (one actor per GPU). The
    constructor does nothing that can fail, so a broken model or dataset shows up as a failed job with its error.

    Args:
        config: the build config as a plain dict (`synthaug.config.to_dict`); plain data crosses process borders.
        out: the build directory (shared storage when actors run on other machines).
        num_classes: the dataset's class count (the guide must predict exactly these).
        selected: the classes of the build (TI loads only their few-shot images; MC-TI loads every class's).
        report: called with progress events (dicts); the Ray executor passes one that feeds a queue.
        device: overrides ``config.device`` (a Ray actor sees its one GPU as ``cuda``).
        threads: CPU threads for torch while the worker runs; the same count gives the same bytes on CPU.
        hooks: callbacks at fixed points of each job (`WorkerHooks`), imported on the first job.
        in_ray: whether this runs as a Ray actor (for hooks: a crash there ends the process).
    """

    def __init__(self, config: dict[str, Any], out: str, num_classes: int, selected: Sequence[int] = (), *,
                 report: Callable | None = None, device: str | None = None, threads: int | None = None,
                 hooks: WorkerHooks | None = None, in_ray: bool = False) -> None:
        self.config = from_dict(config)
        self.out = Path(out)
        self.num_classes = num_classes
        self.selected = list(selected)
        self._report = report or (lambda event: None)
        self.device = device or self.config.device
        self.threads = threads
        self.hooks = hooks
        self.hook_settings = dict(hooks.settings) if hooks else {}
        self.in_ray = in_ray
        self._models: dict[str, Any] | None = None
        self._threads_before: int | None = None

    def ping(self) -> int:
        """The worker's process id (the driver asks after a crash whether the actor came back)."""
        return os.getpid()

    def close(self) -> None:
        """Drop the models and give back the thread setting (in-process use)."""
        self._models = None
        if self._threads_before is not None:
            import torch

            torch.set_num_threads(self._threads_before)
            self._threads_before = None

    # -- models, once per worker ----------------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        if self._models is not None:
            return self._models
        import torch


        cfg = self.config
        if self.threads:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(self.threads)
        pipe = load_diffusion(cfg.model, device=self.device, dtype=cfg.dtype, scheduler=cfg.scheduler)
        guide = load_classifier(cfg.guide, device=pipe.device, trained_on=cfg.guide_trained_on)
        if guide.num_classes != self.num_classes:
            raise UserError(f"`guide` {cfg.guide!r} predicts {guide.num_classes} classes but dataset "
                            f"{cfg.dataset!r} has {self.num_classes}: pass a guide trained on this dataset's classes.")
        models: dict[str, Any] = {"pipe": pipe, "guide": guide}
        if cfg.method in ("ti", "mcti"):
            models.update(self._few_shot(pipe))
        self._models = models
        return models

    def _few_shot(self, pipe: Any) -> dict[str, Any]:
        """The few-shot images TI/MC-TI learn from (MC-TI: of every class; its regularizer needs them all)."""
        cfg = self.config
        dataset = get_dataset(cfg.dataset, cfg.root, cfg.split)
        wanted = None if cfg.method == "mcti" else set(self.selected)
        images: dict[int, list[Any]] = {}
        for i in few_shot_indices(dataset.targets, cfg.mcti.shots, cfg.mcti.seed, allow_fewer=True):
            target = int(dataset.targets[i])
            if wanted is None or target in wanted:
                images.setdefault(target, []).append(dataset[i][0])
        extra: dict[str, Any] = {"images_by_class": images, "clip": None, "features": None}
        if cfg.method == "mcti":

            extra["clip"] = load_clip(cfg.mcti.clip_model, pipe)
            extra["features"] = class_features(extra["clip"], images)
        return extra

    # -- one class job ----------------------------------------------------------------------------------------------
    def run(self, job: ClassJob, attempt: int = 0) -> dict[str, Any]:
        """Learn or load the class token, then write every unfinished shard of the class.

        Returns:
            ``{"class_index", "token_learned", "token_seconds", "shards_written", "images", "seconds", "pid"}``.
        """
        started = time.perf_counter()
        c = job.class_index
        self._report({"kind": "start", "class_index": c, "attempt": attempt})
        self._hook("on_job_start", job, attempt)
        models = self._load()
        learned, token_seconds = self._ensure_token(job, models)

        written, images = [], 0
        for task in job.shards:
            if shard_done(self.out, task.shard_id):
                continue
            write_shard(self.out, task.shard_id, self._samples(job, task, models),
                        image_format=self.config.shards.image_format, quality=self.config.shards.quality)
            written.append(task.shard_id)
            images += task.size
            self._report({"kind": "shard", "class_index": c, "shard": task.shard_id, "images": task.size})
            self._hook("on_shard_written", job, task.shard_id)
        return {"class_index": c, "token_learned": learned, "token_seconds": token_seconds,
                "shards_written": written, "images": images, "seconds": time.perf_counter() - started,
                "pid": os.getpid()}

    def _ensure_token(self, job: ClassJob, models: dict[str, Any]) -> tuple[bool, float]:
        """Learn and save the class token unless its file exists; then put the saved token into the pipeline.

        Generation always uses the token as read back from its file, so a resumed build and an uninterrupted one
        generate from the very same values.
        """
        cfg, pipe, path = self.config, models["pipe"], token_path(self.out, job.class_index)
        learned, seconds = False, 0.0
        if not path.is_file():
            t0 = time.perf_counter()
            if cfg.method == "dct":

                result = learn_dct_token(pipe, models["guide"], job.class_index, job.name, cfg.dct, token=job.token,
                                         val_prompt=cfg.generate.prompt)
            else:

                result = learn_mcti_token(pipe, models["clip"], models["images_by_class"], job.class_index, cfg.mcti,
                                          method=cfg.method, token=job.token, label=job.name,
                                          features=models["features"])
            seconds = time.perf_counter() - t0
            self._hook("on_token_learned", job)
            if hasattr(result, "save"):
                result.save(path)
            else:
                save_token(result, path)
            learned = True
            self._report({"kind": "token", "class_index": job.class_index, "steps": getattr(result, "steps", None),
                          "stop_reason": getattr(result, "stop_reason", None), "seconds": seconds})
        add_tokens(pipe, load_tokens(path))
        return learned, seconds

    def _samples(self, job: ClassJob, task: ShardTask, models: dict[str, Any]):
        """The shard's images, generated batch by batch (memory stays at one batch) with progress after each.

        Batches start at the shard's first index, exactly as `generate` would split the whole range itself.
        """
        gen = self.config.generate
        token = None if task.method == "sd" else job.token
        for lo in range(task.start, task.stop, gen.batch_size):
            hi = min(lo + gen.batch_size, task.stop)
            yield from generate(models["pipe"], class_index=job.class_index, label=job.name, token=token,
                                indices=range(lo, hi), config=gen, method=task.method, classifier=models["guide"])
            self._report({"kind": "images", "class_index": job.class_index, "shard": task.shard_id,
                          "done": hi - task.start})

    def _hook(self, point: str, *args: Any) -> None:
        if self.hooks is None:
            return
        fn = getattr(self.hooks.load(), point, None)
        if fn is not None:
            fn(self, *args)


class _QueueReport:
    """A picklable progress callback for Ray actors: puts events on a `ray.util.queue.Queue`; never fails a job."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # progress is best effort: a lost event must not fail the work
            self.queue.put_nowait(event)
