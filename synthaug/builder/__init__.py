"""The build: config -> plan of class jobs -> Ray actors (one per GPU) or in-process; resume, retry.

`plan` (class jobs and shard ids, a pure function of the config) -> `validate` (every input checked before a model
loads) -> `executors` (local or Ray, with retries) running `worker.ClassWorker` -> `driver.build` (bookkeeping, lock,
final index). The package is named ``builder`` so that ``synthaug.build`` stays the function.
"""

from .driver import BuildFailed, BuildResult, build
from .plan import ClassJob, ShardTask, methods_of, plan, shard_id
from .validate import guide_num_classes
from .worker import ClassWorker

__all__ = ["BuildFailed", "BuildResult", "ClassJob", "ClassWorker", "ShardTask", "build", "guide_num_classes",
           "methods_of", "plan", "shard_id"]
