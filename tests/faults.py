"""Fault injection for the build tests, as worker hooks (`synthaug.builder.hooks.WorkerHooks`).

conftest.py names this file in ``SYNTHAUG_WORKER_HOOKS`` for the whole session; a fault acts only while its setting
is in the driver's environment (a test sets it with ``monkeypatch.setenv``, or in a CLI subprocess's environment):

    SYNTHAUG_TEST_PAUSE=token:C        class C's job stops for good after learning its token, before saving it
    SYNTHAUG_TEST_PAUSE=shard:C        class C's job stops for good after writing its first shard
    SYNTHAUG_TEST_PAUSE_FILE=P         written when a pause begins ({"pid", "node_id"}: the test's cue to SIGKILL the
                                       build or remove the node); while P exists, no job pauses again, so a retried
                                       job runs through
    SYNTHAUG_TEST_FAIL_ONCE=class:C    class C's first attempt dies after its first shard (a Ray worker process exits,
                                       as on a segfault or an OOM kill; in-process it raises)
    SYNTHAUG_TEST_FAIL_ALWAYS=class:C  every attempt of class C raises before doing anything
    SYNTHAUG_TEST_CHAOS=SEED:RATE      every hook call (a job's start, a token learned but not saved, a shard written)
                                       dies once with probability RATE, drawn from a hash of SEED and the call: a Ray
                                       worker process exits (`os._exit`), in-process it raises; the retry goes past it
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

SETTINGS = ("SYNTHAUG_TEST_PAUSE", "SYNTHAUG_TEST_PAUSE_FILE", "SYNTHAUG_TEST_FAIL_ONCE", "SYNTHAUG_TEST_FAIL_ALWAYS",
            "SYNTHAUG_TEST_CHAOS")

logger = logging.getLogger(__name__)


def chaos_dies(seed: str, call: str, rate: float) -> bool:
    """Whether `call` is one that ``SYNTHAUG_TEST_CHAOS=SEED:RATE`` kills (once): a hash, so any process agrees."""
    digest = hashlib.sha256(f"{seed}:{call}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < rate


def _chaos(worker, call: str) -> None:
    setting = worker.hook_settings.get("SYNTHAUG_TEST_CHAOS")
    if not setting:
        return
    seed, rate = setting.split(":")
    marker = worker.out / f".test-chaos-{call}"
    if not chaos_dies(seed, call, float(rate)) or marker.exists():
        return
    marker.write_text(str(os.getpid()))
    if worker.in_ray:
        os._exit(1)
    raise RuntimeError(f"injected failure at {call} (SYNTHAUG_TEST_CHAOS)")


def on_job_start(worker, job, attempt: int) -> None:
    _chaos(worker, f"start-c{job.class_index:03d}")
    if worker.hook_settings.get("SYNTHAUG_TEST_FAIL_ALWAYS") == f"class:{job.class_index}":
        raise RuntimeError(f"injected failure of class {job.class_index} (SYNTHAUG_TEST_FAIL_ALWAYS)")


def on_token_learned(worker, job) -> None:
    _chaos(worker, f"token-c{job.class_index:03d}")
    _pause(worker, "token", job.class_index)


def on_shard_written(worker, job, shard_id: int) -> None:
    _chaos(worker, f"shard-{shard_id:05d}")
    _pause(worker, "shard", job.class_index)
    if worker.hook_settings.get("SYNTHAUG_TEST_FAIL_ONCE") == f"class:{job.class_index}":
        marker = worker.out / f".test-failed-once-c{job.class_index:03d}"
        if marker.exists():
            return
        marker.write_text(str(os.getpid()))
        if worker.in_ray:
            os._exit(1)
        raise RuntimeError(f"injected failure of class {job.class_index} (SYNTHAUG_TEST_FAIL_ONCE)")


def _pause(worker, point: str, class_index: int) -> None:
    settings = worker.hook_settings
    if settings.get("SYNTHAUG_TEST_PAUSE") != f"{point}:{class_index}":
        return
    marker = settings.get("SYNTHAUG_TEST_PAUSE_FILE")
    if marker:
        if Path(marker).exists():
            return  # paused once already: this is the retry
        node_id = None
        if worker.in_ray:
            import ray

            node_id = ray.get_runtime_context().get_node_id()
        tmp = Path(f"{marker}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"pid": os.getpid(), "node_id": node_id}))
        tmp.replace(marker)  # whole or absent: the test reads it as soon as it appears
    logger.warning("test pause at %s of class %d (pid %d)", point, class_index, os.getpid())
    while True:  # until the test kills the build, the worker or its node
        time.sleep(1)
