"""The build: config -> checks -> plan of class jobs -> Ray actors (one per GPU) or in-process; resume, retry.

Named parts, wired by `driver.build` (lock, bookkeeping, the final index), the way img2dataset wires its reader,
downloader, writer and distributor:

- `validate.check_build`: every input checked once, before a model loads (no worker, model or Ray import);
- `plan.plan`: the class jobs and their shard ids, a pure function of the config;
- `cluster`: where Ray comes from (installed, attached, started) — no worker import;
- `executors.run_local` / `executors.run_ray` (`RayExecutor`): where jobs run, with one retry policy
  (`executors.retryable`, `executors.Tracker`);
- `worker.ClassWorker`: one class job — its token, then its shards.

The build folder's paths and files (``config.yaml``, ``plan.json``, tokens, shards) belong to `synthaug.layout`.
The package is named ``builder`` so that ``synthaug.build`` stays the function.

More of each part: `cluster` probes a Ray address before any work; `executors.Tracker` draws the progress bars
from the workers' events (classes, images, and the token's step, loss, accuracy and stop state while it learns);
`worker.ClassWorker` learns the token through the build's token method (`synthaug.token_methods.get_method`, picked
once) and writes the images through `images.ClassImages`; `hooks.WorkerHooks` (optional, named by
``SYNTHAUG_WORKER_HOOKS``) are called at fixed points of each job; `_reaper` is a watchdog process that ends what a
SIGKILLed driver's local Ray left. What is done is `synthaug.layout`'s answer (`job_done`, `build_finished`).
"""

from .driver import BuildFailed, BuildResult, build
from .plan import ClassJob, ShardTask, methods_of, plan, shard_id
from .validate import CheckedBuild, check_build, guide_num_classes
from .worker import ClassWorker

__all__ = ["BuildFailed", "BuildResult", "CheckedBuild", "ClassJob", "ClassWorker", "ShardTask", "build",
           "check_build", "guide_num_classes", "methods_of", "plan", "shard_id"]
