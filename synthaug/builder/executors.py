"""Where class jobs run: in this process (``run.executor: local``) or on Ray actors, one per GPU, with retries.

On Ray the driver never waits on something that may not come: it starts no more actors than the cluster's nodes can
hold (``run.num_workers`` above that is capped, with a warning), hands jobs only to actors that have answered (an
actor that Ray cannot place, e.g. the replacement of one lost with its node, simply gets none), stops an actor whose
running job shows no progress for ``run.job_timeout_s`` and retries the job on another, and gives up with the resume
command when no actor has been able to start for that long.

One retry policy serves both executors: `retryable` says whether an error may be retried (a `UserError` or a full
disk ends the build at once: retrying cannot fix them) and `Tracker.failed` counts the attempts against
``run.max_retries`` and records the job in ``failures.json`` once they are spent.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
import traceback
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import BuildConfig, RunConfig, to_dict
from ..errors import WRITE_ERRNOS, UserError
from ..layout import ClassJob, images_on_disk, resume_command, token_done
from ..token_methods import get_method
from ..tokens.progress import step_postfix
from .cluster import ray_session
from .hooks import WorkerHooks
from .worker import ClassWorker, QueueReport

logger = logging.getLogger(__name__)

# How long the driver waits for at least one actor to answer before it gives up on the cluster: never less than this,
# because an actor's first answer comes after its process has imported torch and diffusers (tens of seconds on a
# loaded machine), even when `run.job_timeout_s` is set lower to catch stuck jobs sooner.
WORKER_START_GRACE_S = 600.0


# --------------------------------------------------------------------------------------------------------------------
# Progress and bookkeeping on the driver
# --------------------------------------------------------------------------------------------------------------------
class Tracker:
    """Progress bars over classes and images, fed by worker events; attempts, errors and failures of the jobs."""

    def __init__(self, enabled: bool, jobs: list[ClassJob], all_jobs: list[ClassJob], out: Path, max_retries: int
                 ) -> None:
        from tqdm.auto import tqdm

        images_total = sum(t.size for j in all_jobs for t in j.shards)
        images_done = images_on_disk(out, all_jobs)
        self.classes = tqdm(total=len(all_jobs), initial=len(all_jobs) - len(jobs), desc="classes", unit="class",
                            disable=not enabled, position=0, dynamic_ncols=True)
        self.images = tqdm(total=images_total, initial=images_done, desc="images ", unit="img", disable=not enabled,
                           position=1, dynamic_ncols=True)
        self.shard_progress: dict[int, int] = {}
        self.learning: dict[int, dict[str, Any]] = {}  # class index -> its token's newest "step" event
        self.started: set[tuple[int, int]] = set()
        self.max_retries = max_retries
        self.attempts: Counter[int] = Counter()
        self.errors: dict[int, list[str]] = {}
        self.results: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.workers = 0
        self.last_event: dict[int, float] = {}  # class index -> time.monotonic() of its newest progress event
        # Ray: seconds from the executor's start to a running Ray (started or attached), and to the first worker
        # able to take a job (its process started, torch and diffusers imported); None where not (yet) reached
        self.ray_seconds: float | None = None
        self.first_worker_seconds: float | None = None

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
        if "class_index" in ev:
            self.last_event[ev["class_index"]] = time.monotonic()
        if kind == "start":
            self.started.add((ev["class_index"], ev["attempt"]))
        elif kind in ("images", "shard"):
            done = ev["done"] if kind == "images" else ev["images"]
            prev = self.shard_progress.get(ev["shard"], 0)
            if done > prev:  # a retried shard counts from zero again: the bar only moves past what it showed
                self.images.update(done - prev)
                self.shard_progress[ev["shard"]] = done
        elif kind == "step":  # one token-learning iteration: shown on the class bar, never logged
            self.learning[ev["class_index"]] = ev
            others = len(self.learning) - 1
            self.classes.set_postfix_str(f"class {ev['class_index']} step {ev['step'] + 1}/{ev['total']}: "
                                         f"{step_postfix(ev)}" + (f" (+{others} learning)" if others else ""))
        elif kind == "token":
            self.learning.pop(ev["class_index"], None)
            self.classes.set_postfix_str(f"class {ev['class_index']}: {ev.get('steps')} steps "
                                         f"({ev.get('stop_reason') or 'done'})")

    def succeeded(self, result: dict[str, Any]) -> None:
        self.results.append(result)
        self.classes.update(1)

    def failed(self, job: ClassJob, error: str) -> bool:
        """Record a failed attempt; True when the job may be tried again."""
        self.attempts[job.class_index] += 1
        self.errors.setdefault(job.class_index, []).append(error)
        n = self.attempts[job.class_index]
        first = error.strip().splitlines()[-1] if error.strip() else "?"
        if n <= self.max_retries:
            logger.warning("class %d (%s) failed (attempt %d of %d), retrying: %s", job.class_index, job.name, n,
                           self.max_retries + 1, first[:300])
            return True
        logger.error("class %d (%s) failed %d time(s), giving up: %s", job.class_index, job.name, n, first[:300])
        self._record_failure(job, error)
        return False

    def abandon(self, job: ClassJob, error: str) -> None:
        """Record a job that was not (or no longer) tried because no worker could run it."""
        self.errors.setdefault(job.class_index, []).append(error)
        self._record_failure(job, error)

    def _record_failure(self, job: ClassJob, error: str) -> None:
        self.failures.append({"class_index": job.class_index, "name": job.name,
                              "attempts": self.attempts[job.class_index], "error": error[-8000:],
                              "errors": [e[-2000:] for e in self.errors[job.class_index]]})

    def close(self) -> None:
        self.images.close()
        self.classes.close()


def retryable(error: BaseException) -> bool:
    """The retry policy of both executors: a failed job is tried again unless retrying cannot fix it — bad input
    that only a loaded model reveals (`UserError`), a full disk or a read-only folder (`build` says so in one line)."""
    if isinstance(error, UserError):
        return False
    return not (isinstance(error, OSError) and error.errno in WRITE_ERRNOS)


def batches_tokens(config: BuildConfig) -> bool:
    """Whether a worker may learn several classes' tokens in one batch (the method's `batches`:
    ``dct.classes_per_batch``)."""
    return get_method(config.method).batches(config)


def companions_wanted(config: BuildConfig) -> int:
    """How many other jobs' tokens the Ray executor hands an actor with each job: enough for two full batches, so
    that a class that stops early is replaced (continuous batching). For ``auto``, `AUTO_COMPANIONS_BATCH` until an
    actor reports the batch it resolved on its GPU (`RayExecutor.finished` then raises it)."""
    per_batch = config.dct.classes_per_batch
    return 2 * per_batch - 1 if isinstance(per_batch, int) else 2 * AUTO_COMPANIONS_BATCH - 1


# The batch `companions_wanted` assumes for ``dct.classes_per_batch: auto`` (the actor resolves the real one).
AUTO_COMPANIONS_BATCH = 8


def run_local(config: BuildConfig, out: Path, jobs: list[ClassJob], classes: list, tracker: Tracker) -> None:
    """Run the jobs one after the other in this process, with the same worker and retry rules as on Ray.

    (``run.job_timeout_s`` does not apply: a job cannot be stopped from inside its own process.)
    """
    hooks = WorkerHooks.from_env()
    threads = config.run.cpus_per_worker if _resolved_device(config.device) == "cpu" else None
    worker = ClassWorker(to_dict(config), str(out), classes, [j.class_index for j in jobs], report=tracker.event,
                         threads=threads, hooks=hooks, in_ray=False)
    tracker.workers = 1
    together = batches_tokens(config)
    try:
        for i, job in enumerate(jobs):
            # dct.classes_per_batch: the first job learns every later job's token too, many classes per batch
            companions = jobs[i + 1:] if together else []
            for attempt in itertools.count():
                try:
                    tracker.succeeded(worker.run(job, attempt, companions))
                    break
                except Exception as e:
                    if not retryable(e):
                        raise
                    if not tracker.failed(job, traceback.format_exc()):
                        break
    finally:
        worker.close()


def _resolved_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


@dataclass(frozen=True)
class WorkerPlan:
    """How many Ray actors to start and what each asks for."""

    count: int
    options: dict[str, Any]  # the actor's resources
    device: str
    threads: int | None
    capped: str | None = None  # the one-line warning when `run.num_workers` asked for more than fits


def plan_workers(nodes: list[Mapping[str, float]], run: RunConfig, device: str, jobs: int) -> WorkerPlan:
    """Fit the actors to the cluster's alive nodes (their total resources): one per GPU, or, without GPUs (or with
    ``device: cpu``), one per ``run.cpus_per_worker`` CPUs *of one node* — an actor cannot span nodes.

    Raises:
        UserError: no node has ``run.cpus_per_worker`` CPUs (no actor could ever start).
    """
    gpus = [int(n.get("GPU", 0)) for n in nodes]
    if sum(gpus) and not device.startswith("cpu"):
        capacity, options = sum(gpus), {"num_gpus": 1}
        room, device, threads = f"{capacity} GPU(s)", "cuda", None  # Ray shows each actor only its own GPU
    else:
        cpus = [int(n.get("CPU", 0)) for n in nodes]
        capacity = sum(c // run.cpus_per_worker for c in cpus)
        if not capacity:
            raise UserError(f"`run.cpus_per_worker` is {run.cpus_per_worker} but no node of the Ray cluster has that "
                            f"many CPUs (the largest has {max(cpus, default=0)}): lower it "
                            f"(--set run.cpus_per_worker={max(1, max(cpus, default=1))}).")
        options = {"num_cpus": run.cpus_per_worker}
        room = f"{sum(cpus)} CPUs on {len(cpus)} node(s), {run.cpus_per_worker} per worker"
        device, threads = "cpu", run.cpus_per_worker
    capped = None
    if run.num_workers and run.num_workers > capacity:
        capped = (f"`run.num_workers` is {run.num_workers} but the Ray cluster has room for {capacity} worker(s) "
                  f"({room}): starting {capacity} (pass --num-workers {capacity} to silence this).")
    count = max(1, min(run.num_workers or capacity, capacity, jobs))
    return WorkerPlan(count, options, device, threads, capped)


def in_flight(run: RunConfig, workers: int) -> tuple[int, int]:
    """How many class jobs may be submitted at once, in all and per actor.

    One per actor by default: a job is handed out only when an actor is free, so a long job never waits behind
    another on a busy actor while a second actor sits idle (class jobs differ 10-100x in length where early stopping
    ends some tokens at once); handing the next job over costs a few milliseconds. ``run.max_in_flight`` above the
    actor count queues jobs on the actors (to hide a slow link to a remote cluster).
    """
    total = run.max_in_flight or workers
    return total, max(1, math.ceil(total / workers))


@dataclass
class _Slot:
    """One actor of the build and the jobs submitted to it (it runs them one at a time, in order)."""

    handle: Any
    ping: Any  # the readiness call's ref until the actor has answered once; None after
    started: float  # time.monotonic() when the actor was requested
    refs: deque = field(default_factory=deque)  # job refs in submission order; refs[0] is the running one
    head_since: float = 0.0  # when refs[0] became the running job
    start_failures: int = 0  # actors of this slot that died before answering, in a row

    @property
    def ready(self) -> bool:
        return self.handle is not None and self.ping is None


class RayExecutor:
    """Run class jobs on Ray actors with a bounded number in flight; retry failed, stuck and orphaned jobs.

    `run` is the loop, in numbered steps; the methods below it are its parts. One instance runs one build's jobs
    inside a Ray session (`ray_session`).
    """

    def __init__(self, ray: Any, config: BuildConfig, out: Path, jobs: list[ClassJob], classes: list,
                 tracker: Tracker, entered: float) -> None:
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.run_config, self.tracker, self.entered = ray, config.run, tracker, entered
        run = config.run
        # Workers: as many as the nodes hold (one per GPU, or cpus_per_worker CPU slots each).
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        self.plan = plan_workers(nodes, run, config.device, len(jobs))
        if self.plan.capped:
            logger.warning("%s", self.plan.capped)
        self.max_in_flight, self.per_actor = in_flight(run, self.plan.count)
        logger.info("ray: %d %s worker(s), up to %d class jobs in flight", self.plan.count,
                    "GPU" if "num_gpus" in self.plan.options else "CPU", self.max_in_flight)
        # Progress events go through a queue actor with 0 CPUs (it never takes a worker's slot), kept on the
        # driver's node: losing another node must not lose the progress that stuck-job detection relies on.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self.actor_cls = ray.remote(ClassWorker).options(max_restarts=0, max_task_retries=0, **self.plan.options)
        self.worker_args = (to_dict(config), str(out), classes, [j.class_index for j in jobs])
        self.hooks = WorkerHooks.from_env()
        self.spawned = 0
        self.max_spawned = self.plan.count + len(jobs) * (run.max_retries + 1)  # a bound on replacements
        self.pending: deque[ClassJob] = deque(jobs)
        self.unstarted: Counter[int] = Counter()
        self.submissions: Counter[int] = Counter()
        self.inflight: dict[Any, tuple[ClassJob, int, _Slot, int]] = {}  # ref -> (job, slot index, slot, attempt)
        self.pings: dict[Any, int] = {}
        self.out = out
        self.together, self.companions_wanted = batches_tokens(config), companions_wanted(config)
        self.claims: dict[Any, list[int]] = {}  # job ref -> classes whose tokens that call learns besides its own
        self.claimed: set[int] = set()
        self.slots: list[_Slot] = []
        self.no_worker_since: float | None = time.monotonic()
        self.last_start_error = ""

    def run(self) -> None:
        """Until every job succeeded, failed every retry, or was given up for want of a worker."""
        ray, tracker = self.ray, self.tracker
        # 1. Start the actors
        self.slots = [self.spawn() for _ in range(self.plan.count)]
        self.pings = {s.ping: i for i, s in enumerate(self.slots)}
        tracker.workers = self.plan.count
        try:
            while self.pending or self.inflight:
                # 2. Keep up to max_in_flight jobs submitted, each to the least busy actor that has answered.
                self.submit(time.monotonic())
                waiting = [*self.inflight, *self.pings]
                done, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
                if done:
                    done, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
                self.drain()
                now = time.monotonic()
                # 3. Actors that answered (or died starting), then results; a failed job is retried.
                for ref in done:
                    if ref in self.pings:
                        self.answered(ref)
                    elif ref in self.inflight:  # else its slot was retired while the result was on its way
                        self.finished(ref, now)
                # 4. A running job without progress for job_timeout_s: stop its actor, retry the job elsewhere.
                self.stop_stuck(now)
                # 5. No actor able to take a job for too long (the cluster lost its nodes, or cannot place any).
                self.give_up_without_workers(now)
            self.drain()
        finally:
            for slot in self.slots:
                with contextlib.suppress(Exception):
                    ray.kill(slot.handle)
            with contextlib.suppress(Exception):
                self.queue.shutdown(force=True)

    def spawn(self, failures: int = 0) -> _Slot:
        """Request one actor; it takes jobs once its readiness call (``ping``) has answered."""
        self.spawned += 1
        handle = self.actor_cls.remote(*self.worker_args, report=QueueReport(self.queue), device=self.plan.device,
                                       threads=self.plan.threads, hooks=self.hooks, in_ray=True)
        return _Slot(handle, handle.ping.remote(), time.monotonic(), start_failures=failures)

    def submit(self, now: float) -> None:
        """Hand pending jobs to the least busy actors that have answered, up to the in-flight bounds."""
        while self.pending and len(self.inflight) < self.max_in_flight:
            ready = [i for i, s in enumerate(self.slots) if s.ready and len(s.refs) < self.per_actor]
            if not ready:
                return
            # a job whose token another actor is learning waits for that call to end: by then its token is on disk
            # (or its own job learns it), and no two actors learn one class
            job = next((j for j in self.pending if j.class_index not in self.claimed), None)
            if job is None:
                return
            i = min(ready, key=lambda i: len(self.slots[i].refs))
            self.pending.remove(job)
            attempt = self.submissions[job.class_index]
            self.submissions[job.class_index] += 1
            companions = self.companions(job)
            ref = self.slots[i].handle.run.remote(job, attempt, companions)
            self.claims[ref] = [j.class_index for j in companions]
            self.claimed.update(self.claims[ref])
            if not self.slots[i].refs:
                self.slots[i].head_since = now
            self.slots[i].refs.append(ref)
            self.inflight[ref] = (job, i, self.slots[i], attempt)

    def companions(self, job: ClassJob) -> list[ClassJob]:
        """``dct.classes_per_batch``: pending jobs whose tokens `job`'s actor learns in the same batches (none
        that another actor is learning, none whose token is on disk)."""
        if not self.together:
            return []
        free = (j for j in self.pending if j.class_index not in self.claimed and j is not job
                and not token_done(self.out, j.class_index))
        return list(itertools.islice(free, self.companions_wanted))  # stats only as many files as it takes

    def release(self, ref: Any) -> None:
        """The call `ref` ended: the tokens it was to learn are on disk, or their own jobs learn them."""
        self.claimed.difference_update(self.claims.pop(ref, ()))

    def drain(self) -> None:
        """Feed the progress events the workers queued to the tracker."""
        with contextlib.suppress(Exception):
            size = self.queue.qsize()
            if size:
                for ev in self.queue.get_nowait_batch(size):
                    self.tracker.event(ev)

    def answered(self, ref: Any) -> None:
        """An actor's readiness call returned: it takes jobs from now on, or it died starting and is replaced."""
        from ray.exceptions import RayError

        i = self.pings.pop(ref)
        try:
            self.ray.get(ref)
        except RayError as e:
            self.last_start_error = f"{type(e).__name__}: {e}"
            self.retire(i, f"it died before it could take a job: {str(e).strip().splitlines()[0][:200]}",
                        start_failed=True)
            return
        self.slots[i].ping = None
        if self.tracker.first_worker_seconds is None:
            self.tracker.first_worker_seconds = time.monotonic() - self.entered
            logger.info("ray: running after %.1fs, first worker ready after %.1fs", self.tracker.ray_seconds,
                        self.tracker.first_worker_seconds)

    def finished(self, ref: Any, now: float) -> None:
        """A job's call returned: record its result, or its failure (retried within `run.max_retries`)."""
        from ray.exceptions import RayActorError, RayError, RayTaskError

        job, i, slot, attempt = self.inflight.pop(ref)
        self.release(ref)
        if slot.refs and slot.refs[0] == ref:
            slot.refs.popleft()
            slot.head_since = now  # the next job runs from now on
        elif ref in slot.refs:
            slot.refs.remove(ref)
        try:
            result = self.ray.get(ref)
            self.tracker.succeeded(result)
            per_batch = result.get("classes_per_batch") or 0
            if self.together and per_batch > 1:  # `auto` as an actor resolved it: hand out two batches' worth
                self.companions_wanted = max(self.companions_wanted, 2 * per_batch - 1)
            return
        except RayTaskError as e:
            if not retryable(e.cause):
                raise e.cause from None  # bad input seen only with the models loaded, or no room to write
            error = str(e)
        except RayActorError as e:
            error = f"worker process died: {e}"
            if self.slots[i] is slot and slot.handle is not None:
                self.retire(i, "its process died")
            if (job.class_index, attempt) not in self.tracker.started and \
                    self.unstarted[job.class_index] <= self.run_config.max_retries:
                self.unstarted[job.class_index] += 1
                self.pending.appendleft(job)  # it was only queued on the dead actor: not an attempt
                return
        except RayError as e:
            error = f"{type(e).__name__}: {e}"
        if self.tracker.failed(job, error):
            self.pending.append(job)

    def stop_stuck(self, now: float) -> None:
        """Stop the actor of a running job that showed no progress for ``run.job_timeout_s``; retry the job."""
        timeout = self.run_config.job_timeout_s
        for i, slot in enumerate(self.slots):
            if not slot.refs or slot.handle is None:
                continue
            job = self.inflight[slot.refs[0]][0]
            heard = [self.tracker.last_event.get(c, 0.0) for c in (job.class_index, *self.claims.get(slot.refs[0], ()))]
            quiet = now - max(slot.head_since, *heard)  # a class learned alongside counts as the job's progress
            if quiet > timeout:
                ref = slot.refs.popleft()
                self.inflight.pop(ref)
                self.release(ref)
                error = f"no progress for {quiet:.0f}s (run.job_timeout_s={timeout:g}): worker {i} was stopped"
                self.retire(i, f"class {job.class_index} made no progress for {quiet:.0f}s")
                if self.tracker.failed(job, error):
                    self.pending.append(job)

    def give_up_without_workers(self, now: float) -> None:
        """Abandon the pending jobs when no actor could take one for too long, or every actor failed to start."""
        slots = self.slots
        if any(s.ready for s in slots) or self.inflight or not self.pending:
            self.no_worker_since = None
            return
        if self.no_worker_since is None:
            self.no_worker_since = now
            return
        gone = all(s.handle is None for s in slots)
        if not gone and now - self.no_worker_since <= max(self.run_config.job_timeout_s, WORKER_START_GRACE_S):
            return
        why = ("every worker failed to start" if gone else
               f"no Ray worker could start for {now - self.no_worker_since:.0f}s (the cluster has no free "
               f"{'GPU' if 'num_gpus' in self.plan.options else 'CPU'} slot for one)")
        logger.error("%s: giving up on %d class job(s)", why, len(self.pending))
        for job in self.pending:
            self.tracker.abandon(job, f"{why}{': ' + self.last_start_error if self.last_start_error else ''}")
        self.pending.clear()

    def retire(self, i: int, why: str, start_failed: bool = False) -> None:
        """Stop slot i's actor, put its jobs that never started back, and start a replacement (within bounds).

        A job that had started stays in flight: its call fails with the actor, and that failure is its attempt.
        """
        slot = self.slots[i]
        with contextlib.suppress(Exception):
            self.ray.kill(slot.handle, no_restart=True)
        self.pings.pop(slot.ping, None)
        for ref in reversed(slot.refs):
            job, _, _, attempt = self.inflight[ref]
            if (job.class_index, attempt) not in self.tracker.started:
                del self.inflight[ref]
                self.release(ref)
                self.pending.appendleft(job)
        failures = slot.start_failures + 1 if start_failed else 0
        if failures > self.run_config.max_retries or self.spawned >= self.max_spawned:
            logger.error("worker %d is not replaced (%s)", i, why)
            self.slots[i] = _Slot(None, None, time.monotonic())
            return
        self.slots[i] = self.spawn(failures)
        self.pings[self.slots[i].ping] = i
        logger.warning("worker %d replaced (%s)", i, why)


def run_ray(config: BuildConfig, out: Path, jobs: list[ClassJob], classes: list, tracker: Tracker) -> None:
    """Run the jobs on Ray actors (`RayExecutor`) inside a Ray session: the caller's, a cluster's, or a local one."""
    entered = time.monotonic()
    with ray_session(config.run.ray_address, f"resume with: {resume_command(out)}") as ray:
        tracker.ray_seconds = time.monotonic() - entered
        RayExecutor(ray, config, out, jobs, classes, tracker, entered).run()
