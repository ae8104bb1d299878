"""The class worker: load models once, then learn (or load) a class token and write the class's shards."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..classifier.load import load_classifier
from ..classifier.source import check_label_agreement
from ..config import from_dict
from ..datasets.catalog import get_dataset
from ..datasets.fewshot import shots_by_class
from ..errors import UserError
from ..generation import generate, real_start_images
from ..layout import (
    fits_guide,
    fitted_guide_id,
    guide_source,
    resume_command,
    token_done,
    token_path,
)
from ..models import load_diffusion
from ..token_methods import TokenMethod, get_method
from ..tokens.io import add_tokens
from ..tokens.trust import TrustVerdict, kept_or_checked
from .hooks import WorkerHooks
from .images import ClassImages
from .plan import ClassJob

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# The worker: the same class in-process and as a Ray actor
# --------------------------------------------------------------------------------------------------------------------
class ClassWorker:
    """Runs class jobs. Models load once, on the first job, and stay for the next ones.

    The local executor runs one in-process; the Ray executor wraps it with ``ray.remote`` (one actor per GPU). The
    constructor only picks the config's token method (`synthaug.token_methods.get_method`: every method call below
    goes to that one object) and loads nothing, so a broken model or dataset shows up as a failed job with its error.

    Args:
        config: the build config as a plain dict (`synthaug.config.to_dict`); plain data crosses process borders.
        out: the build directory (shared storage when actors run on other machines).
        classes: the dataset's classes, each as its names (`synthaug.datasets.class_aliases`); the loaded guide's
            labels are checked against them (the guide's logit c must be class c).
        selected: the classes of the build (a method that learns from the learned classes' k real images, TI, loads
            only theirs; one that reads every class's, MC-TI, loads all).
        report: called with progress events (dicts); the Ray executor passes one that feeds a queue.
        device: overrides ``config.device`` (a Ray actor sees its one GPU as ``cuda``).
        threads: CPU threads for torch while the worker runs; the same count gives the same bytes on CPU.
        hooks: callbacks at fixed points of each job (`WorkerHooks`), imported on the first job.
        in_ray: whether this runs as a Ray actor (for hooks: a crash there ends the process).
        overlap_writes: encode and write batch i's images on a background thread while batch i+1 generates
            (`synthaug.shards.ShardWriter`); False writes them in line (the same bytes; benchmarks compare the two).
        models: models already loaded (``{"pipe", "guide"}``, plus ``"shots"`` and what the method's `prepare` adds
            where it needs them), instead of loading them from the config on the first job (benchmarks and tests
            that reuse one pipeline).
    """

    def __init__(self, config: dict[str, Any], out: str, classes: Sequence[str | Sequence[str]],
                 selected: Sequence[int] = (), *,
                 report: Callable | None = None, device: str | None = None, threads: int | None = None,
                 hooks: WorkerHooks | None = None, in_ray: bool = False, overlap_writes: bool = True,
                 models: dict[str, Any] | None = None) -> None:
        self.config = from_dict(config)
        self.method: TokenMethod = get_method(self.config.method)  # picked once: no branch on its name below
        self.out = Path(out)
        self.classes = [c if isinstance(c, str) else tuple(c) for c in classes]
        self.selected = list(selected)
        self._report = report or (lambda event: None)
        self.device = device or self.config.device
        self.threads = threads
        self.hooks = hooks
        self.hook_settings = dict(hooks.settings) if hooks else {}
        self.in_ray = in_ray
        self._models: dict[str, Any] | None = models
        self._threads_before: int | None = None
        self._images = ClassImages(self.out, self.config, report=self._report, hook=self._hook,
                                   overlap_writes=overlap_writes)

    def ping(self) -> int:
        """The worker's process id (the driver asks after a crash whether the actor came back)."""
        return os.getpid()

    def close(self) -> None:
        """Drop the models and give back the thread setting (in-process use)."""
        self._models = None
        self._images.close()
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
        pipe = load_diffusion(cfg.model, device=self.device, dtype=cfg.dtype, scheduler=cfg.scheduler,
                              timestep_spacing=cfg.timestep_spacing, channels_last=cfg.channels_last)
        guide = load_classifier(guide_source(cfg, self.out), device=pipe.device, trained_on=cfg.guide_trained_on)
        if fits_guide(cfg):  # token files name a fitted guide by its content, not by the folder it sits in
            guide.source = guide_source(cfg, fit=fitted_guide_id(self.out))
        check_label_agreement(self.classes, labels=guide.labels, count=guide.num_classes, what="guide",
                              source=cfg.guide, dataset=cfg.dataset)
        models: dict[str, Any] = {"pipe": pipe, "guide": guide}
        if self.method.shots is not None:  # the k real images it learns from (of every class, or of the build's)
            models["shots"] = self._shots(None if self.method.shots == "all" else self.selected)
        models.update(self.method.prepare(cfg, models))
        if cfg.generate.init == "real":
            models["init_images"] = self._init_images()
        self._models = models
        return models

    def _shots(self, classes: Sequence[int] | None = None) -> dict[int, list[Any]]:
        """The user's k real images of `classes` (None: of every class), ``{class: [image, ...]}``."""
        cfg = self.config
        return shots_by_class(get_dataset(cfg.dataset, cfg.root, cfg.split), cfg.shots, cfg.shots_seed, classes)

    def _init_images(self) -> dict[int, dict[int, Any]]:
        """generate.init "real": each selected class's real start images, by their index in the split."""
        cfg = self.config
        return real_start_images(get_dataset(cfg.dataset, cfg.root, cfg.split), cfg.shots, cfg.shots_seed,
                                 self.selected or range(len(self.classes)))

    # -- one class job ----------------------------------------------------------------------------------------------
    def run(self, job: ClassJob, attempt: int = 0, companions: Sequence[ClassJob] = ()) -> dict[str, Any]:
        """Learn or load the class token, then write every unfinished shard of the class.

        `companions`: class jobs whose tokens may be learned in the same denoising batches as this job's
        (``dct.classes_per_batch``): their token files are written as each class finishes, and their own jobs then
        find them (their shards are not written here). Ignored unless the method batches (`TokenMethod.batches`)
        and more than one class fits a batch, and on a retry (`attempt` > 0).

        Returns:
            ``{"class_index", "token_learned", "token_seconds", "shards_written", "images", "seconds", "pid",
            "batch_size", "compile_seconds", "generate_seconds", "write_seconds", "write_wait_seconds",
            "classes_per_batch"}`` (`classes_per_batch`: the classes per token batch this worker resolved, None
            before it learned tokens together):
            `compile_seconds` is the UNet's compile time (``generate.compile``; in the worker's first job with shards
            to write, 0 otherwise), `generate_seconds` the wall time of generating and writing the shards (without
            the compile), `write_seconds` the time spent encoding and writing images, `write_wait_seconds` the part
            of it generation waited for (near 0 when the writer keeps up in the background).
        """
        started = time.perf_counter()
        c = job.class_index
        self._report({"kind": "start", "class_index": c, "attempt": attempt})
        self._hook("on_job_start", job, attempt)
        models = self._load()
        # a retry learns its own token alone: whatever failed the batch must not fail it again
        batched = self._learn_tokens_together([job, *companions], models) if companions and not attempt else {}
        learned, token_seconds = self._ensure_token(job, models)
        learned, token_seconds = learned or c in batched, token_seconds + batched.get(c, 0.0)
        verdict = self._ensure_trust(job, models)
        plain = verdict is not None and not verdict.trusted and self.method.trust(self.config) == "fallback"
        if plain:
            logger.warning("class %d (%s): token not trusted, generating with the plain prompt (dct.trust=fallback): "
                           "%s", job.class_index, job.name, verdict.describe())
        stats = self._images.write(job, models, plain=plain)
        return {"class_index": c, "token_learned": learned, "token_seconds": token_seconds, **stats,
                "classes_per_batch": models.get("classes_per_batch"),
                "seconds": time.perf_counter() - started, "pid": os.getpid()}

    def _ensure_trust(self, job: ClassJob, models: dict[str, Any]) -> TrustVerdict | None:
        """The class token's trust verdict (`kept_or_checked`), None when the method's tokens are not checked."""
        if self.method.trust(self.config) == "off":
            return None
        return kept_or_checked(self.out, job, models, self.config, real_images=self._shots, generate=generate)

    def _learn_tokens_together(self, jobs: Sequence[ClassJob], models: dict[str, Any]) -> dict[int, float]:
        """The method's batches (``dct.classes_per_batch``): learn the missing tokens of `jobs` several classes per
        batch and save each as its class finishes. Returns the seconds each learned class took, its share of the
        wall time. Out of memory at this batch leaves the rest to their own jobs, which learn them one at a time; any
        other error fails this job (whose retry learns its token alone).
        """
        import torch

        cfg, method = self.config, self.method
        todo = [j for j in jobs if not token_done(self.out, j.class_index)]
        if not method.batches(cfg) or len(todo) < 2:
            return {}
        if "classes_per_batch" not in models:
            models["classes_per_batch"] = method.classes_per_batch(cfg, models, todo[0])
        if models["classes_per_batch"] < 2:
            return {}
        seconds: dict[int, float] = {}
        started = time.perf_counter()
        try:
            for job, result in method.learn_batch(cfg, models, todo, models["classes_per_batch"], self._step):
                if isinstance(result, UserError):
                    raise result
                self._save_token(job, result, result.seconds)
                seconds[job.class_index] = result.seconds
        except torch.OutOfMemoryError as e:  # the classes left go one by one (any other error fails the job)
            logger.warning("learning %d class tokens together stopped after %d (%s: %s); the rest are learned one "
                           "at a time", len(todo), len(seconds), type(e).__name__, str(e).splitlines()[0][:200])
        logger.info("%d class tokens learned %d per batch in %.1fs", len(seconds), models["classes_per_batch"],
                    time.perf_counter() - started)
        return seconds

    def _ensure_token(self, job: ClassJob, models: dict[str, Any]) -> tuple[bool, float]:
        """Learn and save the class token unless its file exists; then put the saved token into the pipeline.

        Generation always uses the token as read back from its file, so a resumed build and an uninterrupted one
        generate from the very same values.
        """
        learned, seconds = False, 0.0
        if not token_done(self.out, job.class_index):
            t0 = time.perf_counter()
            result = self.method.learn(self.config, models, job, self._step)
            seconds, learned = time.perf_counter() - t0, True
            self._save_token(job, result, seconds)
        add_tokens(models["pipe"], load_class_token(token_path(self.out, job.class_index), job.token, self.out,
                                                    self.method))
        return learned, seconds

    def _save_token(self, job: ClassJob, result: Any, seconds: float) -> None:
        """A learned token into its file (the ``on_token_learned`` hook first), reported as a ``"token"`` event."""
        self._hook("on_token_learned", job)
        self.method.save(result, token_path(self.out, job.class_index))
        self._report({"kind": "token", "class_index": job.class_index, "steps": getattr(result, "steps", None),
                      "stop_reason": getattr(result, "stop_reason", None), "seconds": seconds})

    def _step(self, info: dict[str, Any]) -> None:
        """A token-learning iteration (`synthaug.tokens.progress.StepProgress`'s dict) as a ``"step"`` event."""
        self._report({"kind": "step", **info})

    def _hook(self, point: str, *args: Any) -> None:
        if self.hooks is None:
            return
        fn = getattr(self.hooks.load(), point, None)
        if fn is not None:
            fn(self, *args)


class QueueReport:
    """A picklable progress callback for Ray actors: puts events on a `ray.util.queue.Queue`; never fails a job."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def __call__(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):  # progress is best effort: a lost event must not fail the work
            self.queue.put_nowait(event)


def load_class_token(path: Path, token: str, out: str | Path, method: TokenMethod) -> dict[str, Any]:
    """A class's token file (read by the build's `method`), which must hold exactly that class's token. Raises
    `UserError` (naming the file, what it holds, and that deleting it makes the build learn the token again) for a
    damaged or misplaced file."""
    fix = f"delete {path} and rerun `{resume_command(out)}` (the token is learned again)"
    try:
        tokens = method.load(path)
    except UserError as e:
        raise UserError(f"{str(e).rstrip('.').removesuffix(': write it again')}: {fix}.") from None
    if list(tokens) != [token]:
        held = ", ".join(list(tokens)[:3]) or "no token"
        raise UserError(f"Token file {path} holds {held}, but its class's token is {token}: {fix}.")
    return tokens
