"""The executors' rules that need no cluster: how many Ray actors fit, worker hooks, the no-progress setting."""

from __future__ import annotations

import pytest

from synthaug.builder.executors import in_flight, plan_workers
from synthaug.builder.hooks import HOOKS_ENV, WorkerHooks
from synthaug.config import RunConfig, load_config
from synthaug.errors import UserError


def _run(**kw) -> RunConfig:
    return RunConfig(**kw)


@pytest.mark.parametrize(("nodes", "run", "device", "count", "capped"), [
    # one actor per GPU; asking for more than the GPUs is capped with a message
    ([{"CPU": 8, "GPU": 2}], {}, "auto", 2, False),
    ([{"CPU": 8, "GPU": 2}, {"CPU": 8, "GPU": 1}], {"num_workers": 5}, "cuda", 3, True),
    ([{"CPU": 8, "GPU": 2}], {"num_workers": 1}, "auto", 1, False),
    # without GPUs (or with device cpu): cpus_per_worker slots of one node each; an actor cannot span nodes
    ([{"CPU": 8, "GPU": 2}], {"cpus_per_worker": 2}, "cpu", 4, False),
    ([{"CPU": 3}, {"CPU": 3}], {"cpus_per_worker": 2}, "auto", 2, False),
    ([{"CPU": 3}, {"CPU": 3}], {"cpus_per_worker": 2, "num_workers": 3}, "auto", 2, True),
    ([{"CPU": 2}], {"cpus_per_worker": 1, "num_workers": 2}, "auto", 2, False),
])
def test_workers_never_exceed_what_the_nodes_hold(nodes, run, device, count, capped):
    plan = plan_workers(nodes, _run(**run), device, jobs=100)
    assert plan.count == count
    assert (plan.capped is not None) == capped
    if capped:
        assert "\n" not in plan.capped and f"room for {count} worker(s)" in plan.capped
        assert f"--num-workers {count}" in plan.capped


def test_workers_are_no_more_than_jobs_and_a_node_too_small_is_refused():
    assert plan_workers([{"CPU": 16}], _run(cpus_per_worker=1), "cpu", jobs=3).count == 3
    with pytest.raises(UserError, match=r"`run.cpus_per_worker` is 4 but no node of the Ray cluster has that many "
                                        r"CPUs \(the largest has 3\): lower it \(--set run.cpus_per_worker=3\)"):
        plan_workers([{"CPU": 3}, {"CPU": 3}], _run(cpus_per_worker=4), "cpu", jobs=3)


@pytest.mark.parametrize(("max_in_flight", "workers", "expected"), [
    (None, 1, (1, 1)), (None, 4, (4, 1)),  # default: a job goes only to a free actor
    (8, 4, (8, 2)), (5, 2, (5, 3)), (1, 3, (1, 1)),  # explicit: queued on the actors, never fewer than one each
])
def test_jobs_in_flight_default_to_one_per_free_actor(max_in_flight, workers, expected):
    assert in_flight(_run(max_in_flight=max_in_flight), workers) == expected


@pytest.mark.parametrize("value", [0, -5, "soon", float("nan"), float("inf")])
def test_job_timeout_must_be_a_positive_number(value):
    with pytest.raises(UserError, match=r"^`run\.job_timeout_s` must be"):
        load_config(overrides={"run.job_timeout_s": value})
    assert load_config(overrides={"run.job_timeout_s": 30}).run.job_timeout_s == 30


def test_worker_hooks_from_a_file_carry_only_their_settings(tmp_path):
    hooks_file = tmp_path / "myhooks.py"
    hooks_file.write_text('SETTINGS = ("MY_HOOK_A",)\ncalls = []\n'
                          'def on_shard_written(worker, job, shard_id):\n    calls.append(shard_id)\n')
    hooks = WorkerHooks.from_env({HOOKS_ENV: str(hooks_file), "MY_HOOK_A": "1", "OTHER": "x"})
    assert hooks == WorkerHooks(str(hooks_file), {"MY_HOOK_A": "1"})
    assert hooks.load().calls == [] and hooks.load() is hooks.load()  # imported once per process
    assert WorkerHooks.from_env({}) is None and WorkerHooks.from_env({HOOKS_ENV: " "}) is None


def test_bad_worker_hooks_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=rf"^`{HOOKS_ENV}` 'no_such_hooks_module' cannot be imported "
                                        r"\(ModuleNotFoundError: .*\): name a module on sys.path or a .py file"):
        WorkerHooks.from_env({HOOKS_ENV: "no_such_hooks_module"})
    with pytest.raises(UserError, match=r"cannot be imported \(FileNotFoundError"):
        WorkerHooks.from_env({HOOKS_ENV: str(tmp_path / "missing.py")})
    typo = tmp_path / "typo.py"
    typo.write_text("def on_shard_done(worker, job, shard_id):\n    pass\n")
    with pytest.raises(UserError, match=r"defines on_shard_done, which no worker calls: the hook points are "
                                        r"on_job_start, on_token_learned, on_shard_written"):
        WorkerHooks.from_env({HOOKS_ENV: str(typo)})
