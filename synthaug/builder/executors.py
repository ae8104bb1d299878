"""Where class jobs run: in this process (``run.executor: local``) or on Ray actors, one per GPU, with retries.

On Ray the driver never waits on something that may not come: it starts no more actors than the cluster's nodes can
hold (``run.num_workers`` above that is capped, with a warning), hands jobs only to actors that have answered (an
actor that Ray cannot place, e.g. the replacement of one lost with its node, simply gets none), stops an actor whose
running job shows no progress for ``run.job_timeout_s`` and retries the job on another, and gives up with the resume
command when no actor has been able to start for that long. A `UserError` from a worker ends the build at once:
retrying bad input cannot fix it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import BuildConfig, RunConfig, to_dict
from ..errors import WRITE_ERRNOS, UserError
from ..layout import resume_command, shard_done
from .plan import ClassJob
from .worker import ClassWorker, WorkerHooks, _QueueReport

logger = logging.getLogger(__name__)

INSTALL_RAY = 'pip install "synthaug[ray]"'

REAPER = Path(__file__).with_name("_reaper.py")  # run as a file: `python -m` would import torch first

# How long the driver waits for at least one actor to answer before it gives up on the cluster: never less than this,
# because an actor's first answer comes after its process has imported torch and diffusers (tens of seconds on a
# loaded machine), even when `run.job_timeout_s` is set lower to catch stuck jobs sooner.
WORKER_START_GRACE_S = 600.0


# --------------------------------------------------------------------------------------------------------------------
# Progress and bookkeeping on the driver
# --------------------------------------------------------------------------------------------------------------------
class _Tracker:
    """Progress bars over classes and images, fed by worker events; attempts, errors and failures of the jobs."""

    def __init__(self, enabled: bool, jobs: list[ClassJob], all_jobs: list[ClassJob], out: Path, max_retries: int
                 ) -> None:
        from tqdm.auto import tqdm

        images_total = sum(t.size for j in all_jobs for t in j.shards)
        images_done = sum(t.size for j in all_jobs for t in j.shards if shard_done(out, t.shard_id))
        self.classes = tqdm(total=len(all_jobs), initial=len(all_jobs) - len(jobs), desc="classes", unit="class",
                            disable=not enabled, position=0, dynamic_ncols=True)
        self.images = tqdm(total=images_total, initial=images_done, desc="images ", unit="img", disable=not enabled,
                           position=1, dynamic_ncols=True)
        self.shard_progress: dict[int, int] = {}
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
        elif kind == "token":
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


def _run_local(config: BuildConfig, out: Path, jobs: list[ClassJob], classes: list, tracker: _Tracker) -> None:
    """Run the jobs one after the other in this process, with the same worker and retry rules as on Ray.

    (``run.job_timeout_s`` does not apply: a job cannot be stopped from inside its own process.)
    """
    hooks = WorkerHooks.from_env()
    threads = config.run.cpus_per_worker if _resolved_device(config.device) == "cpu" else None
    worker = ClassWorker(to_dict(config), str(out), classes, [j.class_index for j in jobs], report=tracker.event,
                         threads=threads, hooks=hooks, in_ray=False)
    tracker.workers = 1
    try:
        for job in jobs:
            attempt = 0
            while True:
                try:
                    tracker.succeeded(worker.run(job, attempt))
                    break
                except UserError:
                    raise  # bad input found only once a model was loaded: retrying cannot fix it
                except OSError as e:
                    if e.errno in WRITE_ERRNOS:
                        raise  # a full disk or a read-only folder: retrying cannot fix it (`build` says so)
                    if not tracker.failed(job, traceback.format_exc()):
                        break
                except Exception:  # noqa: BLE001 (any failure of a job is recorded and retried, as on Ray)
                    if not tracker.failed(job, traceback.format_exc()):
                        break
                attempt += 1
    finally:
        worker.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _resolved_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(":")[0]


# --------------------------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------------------------
def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"`run.executor` is 'ray' but Ray is not installed ({e}): install it with "
                          f"`{INSTALL_RAY}`, or pass --executor local to build in this process.") from e
    return ray


class _Reaper:
    """Start the reaper (`synthaug.builder._reaper`) before a local Ray; close it after ``ray.shutdown()``.

    A SIGKILLed driver leaves some of the processes its local Ray spawned running; the reaper, a separate process
    watching the driver through a pipe, terminates them when the pipe closes.
    """

    def __init__(self) -> None:
        existing: list[str] = []
        with contextlib.suppress(Exception):  # without psutil the reaper keeps nothing out; it still only kills kids
            import psutil

            existing = [str(p.pid) for p in psutil.Process().children()]
        self.proc = subprocess.Popen(
            [sys.executable, str(REAPER), str(os.getpid()), *existing], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=15)


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Raise logger `name` to ERROR for the duration of the block."""
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _init_local_ray(ray: Any, attempts: int = 3, **kwargs: Any) -> None:
    """Start a local Ray: a new cluster even where `ray start` left one running (attaching is what ``ray_address``
    is for), without the dashboard, which a build does not need.

    The raylet gives its metrics agent a hard-coded 15 s to start (ray-project/ray#65983); on a loaded machine the
    agent can miss that and Ray fails with "The current node timed out during startup". That is worth another try.
    """
    for attempt in range(1, attempts + 1):
        try:
            # Ray turns token authentication on for a new local cluster and says so at WARNING on every start. The
            # cluster is this build's own and lives as long as the build: keep the protection, drop the notice.
            with _quiet_logger("ray._private.authentication.authentication_token_setup"):
                ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, **kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            logger.warning("local Ray did not start in time (attempt %d of %d; a loaded machine?): trying again",
                           attempt, attempts)
            with contextlib.suppress(Exception):
                ray.shutdown()


# How long the address probe waits for a Ray cluster's port to accept a connection.
RAY_PROBE_TIMEOUT_S = 5.0


def check_ray_address(address: str | None, resume: str) -> None:
    """Fail in seconds, on one line, where Ray would spend minutes: an address of no form Ray takes, or a
    ``host:port`` / ``ray://host:port`` whose port accepts no connection (Ray itself retries a dead GCS address for
    ~14 minutes, then raises a traceback). ``auto`` and ``local`` are Ray's to resolve (`_ray_session`).

    `resume` ends each message: how to run the build again once the cluster is up.
    """
    if not address or address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in target:
        raise UserError(f"`run.ray_address` {address!r} is not an address Ray takes: pass 'auto' (the cluster "
                        f"`ray start` runs on this machine), 'HOST:PORT' (its GCS, port 6379 by default) or "
                        f"'ray://HOST:10001' (Ray Client), or leave it unset for a local Ray.")
    try:
        socket.create_connection((host, int(port)), timeout=RAY_PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"`run.ray_address` {address!r}: nothing accepts connections there ({e.strerror or e}): start "
                        f"the cluster (`ray start --head`) or fix the address, then {resume}.") from None


@contextlib.contextmanager
def _ray_session(address: str | None, resume: str = "run the same command again"):
    """Use the caller's Ray session if there is one; else attach to `address`; else start a local Ray (and stop it).

    Ray failing to attach or to start is one `UserError` line ending with `resume`, not Ray's traceback.
    """
    ray = _import_ray()
    if ray.is_initialized():  # the caller's session: neither started nor stopped here
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS")  # `ray job submit` sets RAY_ADDRESS for its driver
    if address:
        check_ray_address(address, resume)
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:  # noqa: BLE001 (Ray raises ConnectionError, ValueError or a bare Exception here)
            with contextlib.suppress(Exception):
                ray.shutdown()
            raise UserError(f"`run.ray_address` {address!r}: Ray could not attach ({_first_line(e)}): start the "
                            f"cluster (`ray start --head`) or fix the address, then {resume}.") from None
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    reaper = _Reaper()
    try:
        try:
            _init_local_ray(ray)
        except Exception as e:  # noqa: BLE001 (Ray raises a bare Exception when its processes do not come up)
            raise UserError(f"`run.executor` 'ray': a local Ray could not start ({_first_line(e)}): check free memory "
                            f"and /dev/shm, or pass --executor local; then {resume}.") from None
        yield ray
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        reaper.close()


@dataclass(frozen=True)
class _WorkerPlan:
    """How many Ray actors to start and what each asks for."""

    count: int
    options: dict[str, Any]  # the actor's resources
    device: str
    threads: int | None
    capped: str | None = None  # the one-line warning when `run.num_workers` asked for more than fits


def _plan_workers(nodes: list[Mapping[str, float]], run: RunConfig, device: str, jobs: int) -> _WorkerPlan:
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
    return _WorkerPlan(count, options, device, threads, capped)


def _in_flight(run: RunConfig, workers: int) -> tuple[int, int]:
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


def _run_ray(config: BuildConfig, out: Path, jobs: list[ClassJob], classes: list, tracker: _Tracker) -> None:
    """Run the jobs on Ray actors with a bounded number in flight; retry failed, stuck and orphaned jobs."""
    run = config.run
    hooks = WorkerHooks.from_env()
    entered = time.monotonic()
    with _ray_session(run.ray_address, f"resume with: {resume_command(out)}") as ray:
        tracker.ray_seconds = time.monotonic() - entered
        from ray.exceptions import RayActorError, RayError, RayTaskError
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # 1. Workers: as many as the nodes hold (one per GPU, or cpus_per_worker CPU slots each).
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        plan = _plan_workers(nodes, run, config.device, len(jobs))
        if plan.capped:
            logger.warning("%s", plan.capped)
        n = plan.count
        max_in_flight, per_actor = _in_flight(run, n)
        logger.info("ray: %d %s worker(s), up to %d class jobs in flight", n, "GPU" if "num_gpus" in plan.options
                    else "CPU", max_in_flight)
        # Progress events go through a queue actor with 0 CPUs (it never takes a worker's slot), kept on the
        # driver's node: losing another node must not lose the progress that stuck-job detection relies on.
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
        queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        actor_cls = ray.remote(ClassWorker).options(max_restarts=0, max_task_retries=0, **plan.options)
        report = _QueueReport(queue)
        config_dict = to_dict(config)
        selected = [j.class_index for j in jobs]
        spawned = 0
        max_spawned = n + len(jobs) * (run.max_retries + 1)  # a bound on replacements

        def spawn(failures: int = 0) -> _Slot:
            nonlocal spawned
            spawned += 1
            handle = actor_cls.remote(config_dict, str(out), classes, selected, report=report,
                                      device=plan.device, threads=plan.threads, hooks=hooks, in_ray=True)
            return _Slot(handle, handle.ping.remote(), time.monotonic(), start_failures=failures)

        slots = [spawn() for _ in range(n)]
        tracker.workers = n
        pending: deque[ClassJob] = deque(jobs)
        unstarted: Counter[int] = Counter()
        submissions: Counter[int] = Counter()
        inflight: dict[Any, tuple[ClassJob, int, _Slot, int]] = {}  # job ref -> (job, slot index, slot, attempt)
        pings: dict[Any, int] = {s.ping: i for i, s in enumerate(slots)}
        no_worker_since: float | None = time.monotonic()
        last_start_error = ""

        def drain() -> None:
            with contextlib.suppress(Exception):
                size = queue.qsize()
                if size:
                    for ev in queue.get_nowait_batch(size):
                        tracker.event(ev)

        def retire(i: int, why: str, start_failed: bool = False) -> None:
            """Stop slot i's actor, put its jobs that never started back, and start a replacement (within bounds).

            A job that had started stays in flight: its call fails with the actor, and that failure is its attempt.
            """
            slot = slots[i]
            with contextlib.suppress(Exception):
                ray.kill(slot.handle, no_restart=True)
            pings.pop(slot.ping, None)
            for ref in reversed(slot.refs):
                job, _, _, attempt = inflight[ref]
                if (job.class_index, attempt) not in tracker.started:
                    del inflight[ref]
                    pending.appendleft(job)
            failures = slot.start_failures + 1 if start_failed else 0
            if failures > run.max_retries or spawned >= max_spawned:
                logger.error("worker %d is not replaced (%s)", i, why)
                slots[i] = _Slot(None, None, time.monotonic())
                return
            slots[i] = spawn(failures)
            pings[slots[i].ping] = i
            logger.warning("worker %d replaced (%s)", i, why)

        try:
            while pending or inflight:
                now = time.monotonic()
                # 2. Keep up to max_in_flight jobs submitted, each to the least busy actor that has answered.
                while pending and len(inflight) < max_in_flight:
                    ready = [i for i, s in enumerate(slots) if s.ready and len(s.refs) < per_actor]
                    if not ready:
                        break
                    i = min(ready, key=lambda i: len(slots[i].refs))
                    job = pending.popleft()
                    attempt = submissions[job.class_index]
                    submissions[job.class_index] += 1
                    ref = slots[i].handle.run.remote(job, attempt)
                    if not slots[i].refs:
                        slots[i].head_since = now
                    slots[i].refs.append(ref)
                    inflight[ref] = (job, i, slots[i], attempt)
                waiting = [*inflight, *pings]
                done, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
                if done:
                    done, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
                drain()
                now = time.monotonic()
                # 3. Actors that answered (or died starting), then results; a failed job is retried.
                for ref in done:
                    if ref in pings:
                        i = pings.pop(ref)
                        try:
                            ray.get(ref)
                            slots[i].ping = None
                            if tracker.first_worker_seconds is None:
                                tracker.first_worker_seconds = time.monotonic() - entered
                                logger.info("ray: running after %.1fs, first worker ready after %.1fs",
                                            tracker.ray_seconds, tracker.first_worker_seconds)
                        except RayError as e:
                            last_start_error = f"{type(e).__name__}: {e}"
                            retire(i, f"it died before it could take a job: {str(e).strip().splitlines()[0][:200]}",
                                   start_failed=True)
                        continue
                    if ref not in inflight:  # its slot was retired while the result was on its way
                        continue
                    job, i, slot, attempt = inflight.pop(ref)
                    if slot.refs and slot.refs[0] == ref:
                        slot.refs.popleft()
                        slot.head_since = now  # the next job runs from now on
                    elif ref in slot.refs:
                        slot.refs.remove(ref)
                    try:
                        tracker.succeeded(ray.get(ref))
                        continue
                    except RayTaskError as e:
                        if isinstance(e.cause, UserError):
                            raise e.cause from None  # bad input seen only with the models loaded: not retryable
                        error = str(e)
                    except RayActorError as e:
                        error = f"worker process died: {e}"
                        if slots[i] is slot and slot.handle is not None:
                            retire(i, "its process died")
                        if (job.class_index, attempt) not in tracker.started and \
                                unstarted[job.class_index] <= run.max_retries:
                            unstarted[job.class_index] += 1
                            pending.appendleft(job)  # it was only queued on the dead actor: not an attempt
                            continue
                    except RayError as e:
                        error = f"{type(e).__name__}: {e}"
                    if tracker.failed(job, error):
                        pending.append(job)
                # 4. A running job without progress for job_timeout_s: stop its actor, retry the job elsewhere.
                for i, slot in enumerate(slots):
                    if not slot.refs or slot.handle is None:
                        continue
                    job = inflight[slot.refs[0]][0]
                    quiet = now - max(slot.head_since, tracker.last_event.get(job.class_index, 0.0))
                    if quiet > run.job_timeout_s:
                        inflight.pop(slot.refs.popleft())
                        error = (f"no progress for {quiet:.0f}s (run.job_timeout_s={run.job_timeout_s:g}): "
                                 f"worker {i} was stopped")
                        retire(i, f"class {job.class_index} made no progress for {quiet:.0f}s")
                        if tracker.failed(job, error):
                            pending.append(job)
                # 5. No actor able to take a job for too long (the cluster lost its nodes, or cannot place any).
                if any(s.ready for s in slots) or inflight or not pending:
                    no_worker_since = None
                elif no_worker_since is None:
                    no_worker_since = now
                elif all(s.handle is None for s in slots) or \
                        now - no_worker_since > max(run.job_timeout_s, WORKER_START_GRACE_S):
                    why = ("every worker failed to start" if all(s.handle is None for s in slots) else
                           f"no Ray worker could start for {now - no_worker_since:.0f}s (the cluster has no free "
                           f"{'GPU' if 'num_gpus' in plan.options else 'CPU'} slot for one)")
                    logger.error("%s: giving up on %d class job(s)", why, len(pending))
                    for job in pending:
                        tracker.abandon(job, f"{why}{': ' + last_start_error if last_start_error else ''}")
                    pending.clear()
            drain()
        finally:
            for slot in slots:
                with contextlib.suppress(Exception):
                    ray.kill(slot.handle)
            with contextlib.suppress(Exception):
                queue.shutdown(force=True)
