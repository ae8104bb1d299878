"""The build on Ray: the same bytes as the local executor, more workers than fit capped, dead and stuck actors
retried, bad input failing at once, failures recorded, and a SIGKILLed driver that started its own local Ray leaves no
Ray process behind.

One local Ray cluster (2 CPUs) serves the module; the orphan test starts its own in a subprocess driver.
"""

import json
import logging
import time

import buildworld as bw
import pytest

from synthaug.builder.driver import BuildFailed, build
from synthaug.commands import inspect
from synthaug.errors import UserError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

RAY = {"run.executor": "ray", "run.num_workers": 2, "run.cpus_per_worker": 1}
ONE = {**RAY, "run.num_workers": 1}  # failure tests: one actor (each actor process pays the torch/diffusers imports)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray for the module; `build` uses the session it finds and leaves it running."""
    from synthaug.builder.cluster import init_local_ray

    started = not ray.is_initialized()
    if started:
        init_local_ray(ray, num_cpus=2)  # retries Ray's own startup timeout on a loaded machine
    yield ray
    if started:
        ray.shutdown()


def test_ray_and_local_executors_write_identical_bytes(tmp_path, world, reference, cluster, caplog):
    """Also: asking for more workers than the cluster holds (4 x 1 CPU on 2 CPUs) is capped with a warning."""
    out = tmp_path / "build"
    with caplog.at_level(logging.WARNING, logger="synthaug.builder.executors"):
        result = build(bw.config(out, *world, **{**RAY, "run.num_workers": 4}), progress=False)
    assert result.ok and result.executor == "ray" and result.workers == 2
    # start-up, reported apart: the caller's Ray runs already; its first actor answers before the build ends
    assert 0 <= result.ray_seconds < 1 and result.ray_seconds <= result.first_worker_seconds <= result.seconds
    assert "`run.num_workers` is 4 but the Ray cluster has room for 2 worker(s)" in caplog.text
    assert bw.snapshot(out) == bw.snapshot(reference)
    assert ray.is_initialized()  # the caller's session stays up
    assert not [a for a in ray.util.list_named_actors()]  # and holds no leftover actor of ours by name


def test_an_actor_that_dies_mid_job_is_retried(tmp_path, world, reference, cluster, monkeypatch):
    monkeypatch.setenv("SYNTHAUG_TEST_FAIL_ONCE", "class:1")
    out = tmp_path / "build"
    result = build(bw.config(out, *world, **ONE), progress=False)
    assert result.ok
    died = int((out / ".test-failed-once-c001").read_text())  # the pid of the worker process that exited
    assert died != __import__("os").getpid()
    assert bw.snapshot(out) == bw.snapshot(reference)


def test_a_build_whose_worker_calls_die_at_a_seeded_ten_percent_ends_with_the_same_bytes(tmp_path, world, reference,
                                                                                         cluster, monkeypatch):
    """Chaos: a seeded 10% of the workers' hook calls end their process with `os._exit` — here (seed 6) class 0's
    actor dies with its token learned but not saved, and again after writing shard 1; the retries end the same."""
    monkeypatch.setenv("SYNTHAUG_TEST_CHAOS", "6:0.1")
    out = tmp_path / "build"
    result = build(bw.config(out, *world, **RAY, **{"run.max_retries": 4}), progress=False)
    assert result.ok
    died = sorted(p.name for p in out.glob(".test-chaos-*"))
    assert died == [".test-chaos-shard-00001", ".test-chaos-token-c000"]
    assert all(int((out / name).read_text()) != __import__("os").getpid() for name in died)  # worker processes
    assert bw.snapshot(out) == bw.snapshot(reference)


def test_a_job_without_progress_is_stopped_and_retried_on_another_worker(tmp_path, world, reference, cluster,
                                                                         monkeypatch, caplog):
    """Class 1's job hangs after its first shard (once): after run.job_timeout_s its worker is stopped, a new one
    takes the job, and the build ends with the uninterrupted build's bytes."""
    paused = tmp_path / "paused"
    monkeypatch.setenv("SYNTHAUG_TEST_PAUSE", "shard:1")
    monkeypatch.setenv("SYNTHAUG_TEST_PAUSE_FILE", str(paused))
    out = tmp_path / "build"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="synthaug.builder"):
        result = build(bw.config(out, *world, **ONE, **{"run.job_timeout_s": 30}), progress=False)
    assert result.ok and paused.is_file()
    hung = json.loads(paused.read_text())["pid"]
    assert "class 1 made no progress for 3" in caplog.text and "attempt 1 of 3" in caplog.text
    assert time.monotonic() - started < 300
    assert not pytest.importorskip("psutil").pid_exists(hung)  # the stuck worker process was stopped
    assert bw.snapshot(out) == bw.snapshot(reference)


def test_bad_input_found_by_a_worker_fails_at_once_without_retries(tmp_path, world, cluster, monkeypatch, caplog):
    """A `UserError` raised in an actor (here: the guide's label count, seen only once it is loaded) ends the build
    on its first occurrence with the one-line message; nothing is retried."""
    from synthaug.builder import validate

    _, guide3 = bw.save_world(world[0].parent, num_classes=3)
    monkeypatch.setattr(validate, "guide_num_classes", lambda source: None)
    out = tmp_path / "build"
    with caplog.at_level(logging.WARNING, logger="synthaug.builder"), \
            pytest.raises(UserError, match=r"^`guide` .*guide3.* predicts 3 classes but dataset 'digits' has 10: "
                                           r"pass a guide trained on this dataset's classes \(its logit c must be class c\)\.$") as info:
        build(bw.config(out, world[0], guide3, **ONE, **{"run.max_retries": 5}), progress=False)
    assert "\n" not in str(info.value)
    assert "retrying" not in caplog.text
    assert not (out / "config.yaml").exists()  # nothing was made: the corrected command starts afresh


def test_a_job_that_fails_every_retry_is_recorded(tmp_path, world, cluster, monkeypatch):
    monkeypatch.setenv("SYNTHAUG_TEST_FAIL_ALWAYS", "class:2")
    out = tmp_path / "build"
    with pytest.raises(BuildFailed, match=r"failed every retry \(classes 2;.*resume with: synthaug build --config"):
        build(bw.config(out, *world, **ONE, **{"run.max_retries": 1, "classes": "1-2"}), progress=False)
    (failed,) = json.loads((out / "failures.json").read_text())["failed"]
    assert failed["class_index"] == 2 and failed["attempts"] == 2
    assert "SYNTHAUG_TEST_FAIL_ALWAYS" in failed["error"] and len(failed["errors"]) == 2
    state = inspect(out)
    assert not state.complete and [c["shards_done"] for c in state.classes] == [4, 0]
    assert not (out / "index.parquet").exists()


@pytest.mark.slow
def test_sigkilled_driver_leaves_no_ray_processes_and_the_build_resumes(tmp_path, world, reference):
    """`synthaug build` on a local Ray, SIGKILLed after class 0: nothing of Ray survives it and the build resumes to
    the uninterrupted bytes. On the way, what the user saw (with Ray's token authentication at its default) has no
    notices from Ray, accelerate, diffusers, transformers or timm."""
    import re

    psutil = pytest.importorskip("psutil")
    out = tmp_path / "build"
    cfg_file = bw.write_config(tmp_path / "config.yaml", out, *world, **RAY)
    marker, log = tmp_path / "paused", tmp_path / "build.log"
    proc = bw.start_build(cfg_file, log, SYNTHAUG_TEST_PAUSE="shard:1", SYNTHAUG_TEST_PAUSE_FILE=str(marker),
                          RAY_AUTH_MODE=None, HOME=str(tmp_path / "home"))  # Ray keeps its cluster token under ~/.ray
    try:
        bw.wait_for(marker, proc, 600, log)
        time.sleep(1.0)  # let the reaper record the last processes Ray started
        ours = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in ours), "the driver started no local Ray"
        bw.sigkill(proc)
        _, alive = psutil.wait_procs(ours, timeout=30)
        survivors = [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in alive if p.is_running()]
    finally:
        if proc.poll() is None:
            proc.kill()
    for p in alive:  # clean up what this test caused, by process id, before failing
        try:
            p.kill()
        except psutil.Error:
            pass
    assert not survivors, f"processes left behind by the SIGKILLed driver: {survivors}"
    foreign = [line for line in log.read_text().splitlines()
               if re.search(r"WARNING [\w.]+\.py:\d+ --|Warning:|accelerate|Token authentication|checkpoint", line)]
    assert not foreign, foreign[:5]
    # the interrupted build resumes (here in-process, on the local executor) to the same bytes
    assert build(bw.config(out, *world), progress=False).ok
    assert bw.snapshot(out) == bw.snapshot(reference)


def test_reaper_ends_what_a_sigkilled_driver_started_and_nothing_else(tmp_path):
    """`synthaug.builder._reaper` as a process of its own: once the driver dies it kills the driver's descendants
    born after it started, and leaves alone those that existed before (its KEEP pids)."""
    import subprocess
    import sys

    from synthaug.builder.cluster import REAPER

    psutil = pytest.importorskip("psutil")
    pids = tmp_path / "pids"
    driver = subprocess.Popen([sys.executable, "-c", f"""
import os, subprocess, sys, time
before = subprocess.Popen(["sleep", "600"])
reaper = subprocess.Popen([sys.executable, {str(REAPER)!r}, str(os.getpid()), str(before.pid)],
                          stdin=subprocess.PIPE, start_new_session=True)
after = subprocess.Popen(["sleep", "600"])
time.sleep(4)  # the reaper imports psutil (or Ray's copy) and records the tree
open({str(pids)!r}, "w").write(f"{{before.pid}} {{after.pid}} {{reaper.pid}}")
time.sleep(600)
"""], cwd=bw.REPO)
    procs = []
    try:
        deadline = time.monotonic() + 60
        while not pids.exists() and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
        procs = [psutil.Process(int(p)) for p in pids.read_text().split()]
        before, after, reaper = procs
        bw.sigkill(driver)
        psutil.wait_procs([after, reaper], timeout=30)
        assert not after.is_running(), "the reaper left the driver's child running"
        assert not reaper.is_running(), "the reaper did not end with the driver"
        assert before.is_running(), "the reaper killed a process that existed before it started"
    finally:
        if driver.poll() is None:
            driver.kill()
        for p in procs:  # what this test started, by pid
            try:
                p.kill()
            except psutil.Error:
                pass


def test_ray_actors_learn_classes_together(tmp_path, world, reference, cluster):
    """dct.classes_per_batch on Ray: an actor learns the tokens of the jobs it is handed beside its own in shared
    batches, no class twice; tokens and images equal the one-at-a-time build's up to float rounding."""
    out = tmp_path / "build"
    result = build(bw.config(out, *world, **{**RAY, "dct.classes_per_batch": 2}), progress=False)
    assert result.ok and result.tokens_new == 3
    bw.assert_same_within_float_rounding(out, reference)
