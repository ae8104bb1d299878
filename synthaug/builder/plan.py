"""The build plan: class jobs and their shard tasks, a pure function of the config, saved as ``plan.json``."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

from ..atomic import write_text
from ..config import BuildConfig
from ..layout import PLAN_FILE, token_string

PLAN_VERSION = 1


# --------------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardTask:
    """One shard of one class job: images ``start..stop-1`` of `class_index` made with `method`."""

    shard_id: int
    method: str
    class_index: int
    chunk: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ClassJob:
    """Learn (or load) the token of one class, then write its shards."""

    class_index: int
    name: str
    token: str
    shards: tuple[ShardTask, ...]


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


def _write_plan(out: Path, prep: _Prepared) -> None:
    """``plan.json``: the class jobs of the build, so `inspect` and a finished-build resume need no dataset scan."""
    data = {
        "format_version": PLAN_VERSION, "num_classes": len(prep.class_names),
        "methods": list(methods_of(prep.config)), "per_class": prep.config.per_class,
        "classes": list(prep.class_names),
        "jobs": [{"class_index": j.class_index, "name": j.name, "token": j.token,
                  "shards": [asdict(t) for t in j.shards]} for j in prep.jobs],
    }
    text = json.dumps(data, indent=1) + "\n"
    path = out / PLAN_FILE
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)


def _read_plan(out: Path) -> list[ClassJob] | None:
    """The class jobs of ``plan.json``; None when it is missing or not a plan this version wrote.

    Every number is checked to be a non-negative integer (a shard id below `MAX_SHARD_ID`) and every name a string:
    file names are made from the class and shard ids, so a plan file must not be able to name a path. Each job must
    be whole: for every planned method, chunks ``0..n-1`` covering images ``0..per_class-1`` of a class below
    ``num_classes``. A plan that fails any check is not this build's plan.
    """
    try:
        data = json.loads((out / PLAN_FILE).read_text())
        if not isinstance(data, dict) or data.get("format_version") != PLAN_VERSION:
            return None
        per_class, methods, num_classes = data["per_class"], data["methods"], data["num_classes"]
        if not _index(per_class) or not _index(num_classes) or not isinstance(methods, list) or not methods:
            return None
        jobs = []
        for j in data["jobs"]:
            tasks = []
            for t in j["shards"]:
                task = ShardTask(**t)
                if not all(_index(getattr(task, k)) for k in ("shard_id", "class_index", "chunk", "start", "stop")) \
                        or not isinstance(task.method, str) or task.stop <= task.start or task.shard_id > MAX_SHARD_ID:
                    return None
                tasks.append(task)
            job = ClassJob(j["class_index"], j["name"], j["token"], tuple(tasks))
            if not _index(job.class_index) or not isinstance(job.name, str) or job.token != token_string(
                    job.class_index) or any(t.class_index != job.class_index for t in tasks) \
                    or job.class_index >= num_classes or not _whole(tasks, methods, per_class):
                return None
            jobs.append(job)
        if len({j.class_index for j in jobs}) != len(jobs):
            return None
        return jobs
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# Shard ids are planned densely (`shard_id`); a larger one in plan.json is damage, and would make a file name too long.
MAX_SHARD_ID = 2**31 - 1


def _whole(tasks: list[ShardTask], methods: list, per_class: int) -> bool:
    """True when `tasks` are, for each of `methods`, chunks 0, 1, ... covering images 0..per_class-1 in order."""
    for method in methods:
        mine = [t for t in tasks if t.method == method]
        if [t.chunk for t in mine] != list(range(len(mine))) or not mine or mine[0].start != 0 \
                or mine[-1].stop != per_class or any(a.stop != b.start for a, b in pairwise(mine)):
            return False
    return all(t.method in methods for t in tasks)


def _read_plan_classes(out: Path) -> tuple[int, dict[int, str], list[str] | None] | None:
    """What ``plan.json`` says of the dataset: its class count, the planned classes' names by index, and (in plans
    written since the field exists) every class name; None when there is no readable plan."""
    jobs = _read_plan(out)
    if jobs is None:
        return None
    data = json.loads((out / PLAN_FILE).read_text())
    names = data.get("classes")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        names = None
    num = data.get("num_classes")
    if not _index(num):
        return None
    return num, {j.class_index: j.name for j in jobs}, names


def _index(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# --------------------------------------------------------------------------------------------------------------------
# A validated build: what `builder.validate` hands the driver
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class _Prepared:
    config: BuildConfig
    out: Path
    mode: str  # "new" | "resume" | "overwrite"
    class_names: list[str]
    selected: list[int]
    jobs: list[ClassJob]
    # every name each class goes by (`class_aliases`): a loaded guide's labels are checked against them
    class_aliases: list[tuple[str, ...]] = field(default_factory=list)
