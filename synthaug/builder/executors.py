"""Where class jobs run: in this process (``run.executor: local``) or on Ray actors, one per GPU, with retries."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import traceback
from collections import Counter, deque
from pathlib import Path
from typing import Any

from ..config import BuildConfig, to_dict
from ..errors import UserError
from ..layout import _shard_done
from .plan import ClassJob
from .worker import ClassWorker, _QueueReport

logger = logging.getLogger(__name__)

INSTALL_RAY = 'pip install "synthaug[ray]"'

REAPER = Path(__file__).with_name("_reaper.py")  # run as a file: `python -m` would import torch first


# --------------------------------------------------------------------------------------------------------------------
# Progress and bookkeeping on the driver
# --------------------------------------------------------------------------------------------------------------------
class _Tracker:
    """Progress bars over classes and images, fed by worker events; attempts, errors and failures of the jobs."""

    def __init__(self, enabled: bool, jobs: list[ClassJob], all_jobs: list[ClassJob], out: Path, max_retries: int
                 ) -> None:
        from tqdm.auto import tqdm

        images_total = sum(t.size for j in all_jobs for t in j.shards)
        images_done = sum(t.size for j in all_jobs for t in j.shards if _shard_done(out, t.shard_id))
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

    def event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("kind")
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
        self.failures.append({"class_index": job.class_index, "name": job.name, "attempts": n,
                              "error": error[-8000:], "errors": [e[-2000:] for e in self.errors[job.class_index]]})
        return False

    def close(self) -> None:
        self.images.close()
        self.classes.close()


def _run_local(config: BuildConfig, out: Path, jobs: list[ClassJob], num_classes: int, tracker: _Tracker,
               test_env: dict[str, str]) -> None:
    """Run the jobs one after the other in this process, with the same worker and retry rules as on Ray."""
    threads = config.run.cpus_per_worker if _resolved_device(config.device) == "cpu" else None
    worker = ClassWorker(to_dict(config), str(out), num_classes, [j.class_index for j in jobs], report=tracker.event,
                         threads=threads, test_env=test_env, in_ray=False)
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
                except Exception:  # noqa: BLE001 (any failure of a job is recorded and retried, as on Ray)
                    if not tracker.failed(job, traceback.format_exc()):
                        break
                attempt += 1
    finally:
        worker.close()


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


def _init_local_ray(ray: Any, attempts: int = 3, **kwargs: Any) -> None:
    """Start a local Ray: a new cluster even where `ray start` left one running (attaching is what ``ray_address``
    is for), without the dashboard, which a build does not need.

    The raylet gives its metrics agent a hard-coded 15 s to start (ray-project/ray#65983); on a loaded machine the
    agent can miss that and Ray fails with "The current node timed out during startup". That is worth another try.
    """
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, **kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise
            logger.warning("local Ray did not start in time (attempt %d of %d; a loaded machine?): trying again",
                           attempt, attempts)
            with contextlib.suppress(Exception):
                ray.shutdown()


@contextlib.contextmanager
def _ray_session(address: str | None):
    """Use the caller's Ray session if there is one; else attach to `address`; else start a local Ray (and stop it)."""
    ray = _import_ray()
    if ray.is_initialized():  # the caller's session: neither started nor stopped here
        yield ray
        return
    address = address or os.environ.get("RAY_ADDRESS")  # `ray job submit` sets RAY_ADDRESS for its driver
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    reaper = _Reaper()
    try:
        _init_local_ray(ray)
        yield ray
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()
        reaper.close()


def _run_ray(config: BuildConfig, out: Path, jobs: list[ClassJob], num_classes: int, tracker: _Tracker,
             test_env: dict[str, str]) -> None:
    """Run the jobs on Ray actors with a bounded number in flight; retry failed jobs, dead actors included."""
    run = config.run
    with _ray_session(run.ray_address) as ray:
        from ray.exceptions import RayActorError, RayError, RayTaskError
        from ray.util.queue import Queue

        # 1. Workers: one actor per GPU; without GPUs (or with device cpu), actors of cpus_per_worker CPU slots.
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if not config.device.startswith("cpu") else 0
        if gpus:
            n = run.num_workers or gpus
            options: dict[str, Any] = {"num_gpus": 1}
            device, threads = "cuda", None  # Ray shows each actor only its own GPU, as cuda:0
        else:
            cpus = int(resources.get("CPU", 0))
            if run.cpus_per_worker > cpus:
                raise UserError(f"`run.cpus_per_worker` is {run.cpus_per_worker} but the Ray cluster has {cpus} CPUs: "
                                f"lower it (--set run.cpus_per_worker={max(1, cpus)}).")
            n = run.num_workers or max(1, cpus // run.cpus_per_worker)
            options = {"num_cpus": run.cpus_per_worker}
            device, threads = "cpu", run.cpus_per_worker
        n = max(1, min(n, len(jobs)))
        max_in_flight = run.max_in_flight or 2 * n
        logger.info("ray: %d %s worker(s), up to %d class jobs in flight", n, "GPU" if gpus else "CPU", max_in_flight)
        queue = Queue(actor_options={"num_cpus": 0})  # progress events; 0 CPUs so it never takes a worker's slot
        actor_cls = ray.remote(ClassWorker).options(max_restarts=run.max_retries, max_task_retries=0, **options)
        report = _QueueReport(queue)
        config_dict = to_dict(config)
        selected = [j.class_index for j in jobs]

        def spawn():
            return actor_cls.remote(config_dict, str(out), num_classes, selected, report=report, device=device,
                                    threads=threads, test_env=test_env, in_ray=True)

        actors = [spawn() for _ in range(n)]
        tracker.workers = n
        load = [0] * n
        spawned = n
        pending: deque[ClassJob] = deque(jobs)
        submissions: Counter[int] = Counter()
        unstarted: Counter[int] = Counter()
        inflight: dict[Any, tuple[ClassJob, int, Any, int]] = {}

        def drain() -> None:
            with contextlib.suppress(Exception):
                size = queue.qsize()
                if size:
                    for ev in queue.get_nowait_batch(size):
                        tracker.event(ev)

        try:
            while pending or inflight:
                # 2. Keep up to max_in_flight jobs submitted, each to the least busy actor.
                while pending and len(inflight) < max_in_flight:
                    job = pending.popleft()
                    slot = min(range(n), key=load.__getitem__)
                    attempt = submissions[job.class_index]
                    submissions[job.class_index] += 1
                    ref = actors[slot].run.remote(job, attempt)
                    inflight[ref] = (job, slot, actors[slot], attempt)
                    load[slot] += 1
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
                if ready:
                    ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)
                drain()
                # 3. Collect results; a failure is retried (a job that never started on a dead actor is free).
                for ref in ready:
                    job, slot, handle, attempt = inflight.pop(ref)
                    load[slot] -= 1
                    try:
                        tracker.succeeded(ray.get(ref))
                        continue
                    except RayTaskError as e:
                        if isinstance(e.cause, UserError):
                            raise e.cause from None  # bad input seen only with the models loaded: not retryable
                        error = str(e)
                    except RayActorError as e:
                        error = f"worker process died: {e}"
                        if actors[slot] is handle and not _actor_alive(ray, handle):
                            with contextlib.suppress(Exception):
                                ray.kill(handle)
                            if spawned < n + len(jobs) * (run.max_retries + 1):  # a bound on replacements
                                actors[slot] = spawn()
                                spawned += 1
                                logger.warning("replaced dead worker %d", slot)
                        started = (job.class_index, attempt) in tracker.started
                        if not started and unstarted[job.class_index] <= run.max_retries:
                            unstarted[job.class_index] += 1
                            pending.appendleft(job)  # it was only queued on the dead actor: not an attempt
                            continue
                    except RayError as e:
                        error = f"{type(e).__name__}: {e}"
                    if tracker.failed(job, error):
                        pending.append(job)
            drain()
        finally:
            for a in actors:
                with contextlib.suppress(Exception):
                    ray.kill(a)
            with contextlib.suppress(Exception):
                queue.shutdown(force=True)


def _actor_alive(ray: Any, handle: Any) -> bool:
    """Whether an actor answers (after a crash Ray restarts it up to ``max_restarts`` times, then it stays dead)."""
    try:
        ray.get(handle.ping.remote(), timeout=120)
        return True
    except Exception:  # noqa: BLE001 (dead, restarting too slowly, or unreachable: all mean "replace it")
        return False
