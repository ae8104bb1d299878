"""The build plan: class jobs and their shard tasks, a pure function of the config (``plan.json`` holds it; the
build folder's reader and writer of that file is `synthaug.layout`, which also defines `ClassJob` and `ShardTask`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..config import BuildConfig
from ..layout import ClassJob, Plan, ShardTask, token_string

__all__ = ["ClassJob", "ShardTask", "methods_of", "plan", "plan_file", "shard_id"]



def methods_of(config: BuildConfig) -> tuple[str, ...]:
    """The methods a build writes, in shard-id order: the token method, then ``"sd"`` with ``baseline``."""
    return (config.method,) + (("sd",) if config.baseline else ())


def shard_id(method_slot: int, class_index: int, chunk: int, *, num_classes: int, chunks_per_class: int) -> int:
    """Shard id of (method, class, chunk): the same for every worker, every run, every class selection.

    Ids run through the classes of the first method, then of the second, so with every class selected they are
    dense: ``0 .. methods x classes x chunks - 1``.

    >>> shard_id(1, 2, 0, num_classes=10, chunks_per_class=3)
    36
    """
    return (method_slot * num_classes + class_index) * chunks_per_class + chunk


def plan(config: BuildConfig, class_names: Sequence[str], selected: Sequence[int]) -> list[ClassJob]:
    """The class jobs of a build: for each selected class, its token and its shards (all methods).

    Args:
        config: the build config (method, baseline, per_class, shards.samples_per_shard).
        class_names: every class of the dataset, by index (shard ids depend on their count, not on the selection).
        selected: the class indices to build.

    >>> jobs = plan(BuildConfig(per_class=250, baseline=True), [str(i) for i in range(10)], [3])
    >>> [(s.shard_id, s.method, s.start, s.stop) for s in jobs[0].shards]  # doctest: +NORMALIZE_WHITESPACE
    [(3, 'dct', 0, 250), (13, 'sd', 0, 250)]
    """
    per_shard = config.shards.samples_per_shard
    chunks = math.ceil(config.per_class / per_shard)
    jobs = []
    for c in selected:
        tasks = []
        for slot, method in enumerate(methods_of(config)):
            for k in range(chunks):
                sid = shard_id(slot, c, k, num_classes=len(class_names), chunks_per_class=chunks)
                tasks.append(ShardTask(sid, method, c, k, k * per_shard, min(config.per_class, (k + 1) * per_shard)))
        jobs.append(ClassJob(c, class_names[c], token_string(c), tuple(tasks)))
    return jobs


def plan_file(config: BuildConfig, class_names: Sequence[str], jobs: Sequence[ClassJob]) -> Plan:
    """What ``plan.json`` records of a build: the dataset's classes, the methods, the images per class, the jobs."""
    return Plan(tuple(class_names), len(class_names), methods_of(config), config.per_class, tuple(jobs))
