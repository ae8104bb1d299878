"""Many classes' DCT tokens in one denoising batch (`learn_dct_tokens`, ``dct.classes_per_batch``) on the tiny world.

Every class's token, history, stopping step and kept step must be what `learn_dct_token` gives it alone with the same
seeds; classes that stop leave the batch to the next job (continuous batching) and come back as they finish; a class
that fails does not disturb the others.
"""

from __future__ import annotations

import types

import pytest
import torch
from test_tokens import Guide, cfg

from synthaug.config import DCTConfig, diff, from_dict, load_config, resolve_auto, to_dict
from synthaug.errors import UserError
from synthaug.tokens import dct_batch
from synthaug.tokens.dct import learn_dct_token
from synthaug.tokens.dct_batch import DCTJob, classes_per_batch_for, learn_dct_tokens
from synthaug.tokens.io import save_token, token_metadata

# Batched tokens against tokens learned alone, on CPU in fp32: of the embedding's largest component, and the loss.
# Measured at most 1e-5 (most classes bit-identical) with checkpointing, the x0 loss and grad_steps 2 over 6 updates.
EMBED_RTOL = 1e-4
LOSS_ATOL = 1e-5

# patience 1 on the random tiny world: classes 1 and 5 stop after 2 iterations, class 3 runs all 6
STOPPING = {"max_steps": 6, "patience": 1, "patience_min_accuracy": 0.0}


def alone(pipe, guide, jobs, config):
    return {job.class_index: learn_dct_token(pipe, guide, job.class_index, job.label, config, token=job.token,
                                             target=job.target) for job in jobs}


def assert_same(batched, single):
    assert (batched.token, batched.class_index, batched.label) == (single.token, single.class_index, single.label)
    assert (batched.steps, batched.best_step, batched.stop_reason, batched.updates, batched.unet_evals) == (
        single.steps, single.best_step, single.stop_reason, single.updates, single.unet_evals)
    scale = single.embedding.abs().max()
    assert (batched.embedding - single.embedding).abs().max() <= EMBED_RTOL * scale
    assert {k: v for k, v in batched.metadata.items() if k != "batched_with"} == single.metadata
    for b, s in zip(batched.history, single.history, strict=True):
        assert b.keys() == s.keys()
        for key, value in s.items():
            if isinstance(value, float) and key not in ("accuracy", "lr", "val_accuracy"):
                assert b[key] == pytest.approx(value, abs=LOSS_ATOL, rel=1e-4), key
            else:
                assert b[key] == value, key


def active_counts(steps: list[int], size: int) -> list[int]:
    """Classes in the batch at every iteration, for jobs taking `steps` iterations each, by continuous batching."""
    pending, active, counts = list(steps), [], []
    while pending or active:
        while pending and len(active) < size:
            active.append(pending.pop(0))
        counts.append(len(active))
        active = [s - 1 for s in active if s > 1]
    return counts


def test_batched_tokens_equal_tokens_learned_alone_and_come_back_as_each_class_finishes(tiny_pipe):
    guide, config = Guide(), cfg(**STOPPING)
    jobs = [DCTJob(c, f"class {c}") for c in (1, 3, 5)]
    single = alone(tiny_pipe, guide, jobs, config)
    steps = [single[j.class_index].steps for j in jobs]
    assert steps == [2, 6, 2]  # different stops: class 5 takes class 1's place after 2 iterations

    rows, seen, pulled = [], [], []
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        results = learn_dct_tokens(tiny_pipe, guide, (pulled.append(job) or job for job in jobs), config,
                                   classes_per_batch=2,
                                   callback=lambda job, entry, v: seen.append((job.class_index, entry["step"])))
        order = []
        for job, result in results:
            assert job in jobs and not isinstance(result, Exception)
            assert len(pulled) == {1: 2, 5: 3, 3: 3}[job.class_index]  # a job is taken when a place is free
            # handed back as soon as its class stops: the long class 3 is still mid-way when 1 and 5 come back
            done_3 = max((s for c, s in seen if c == 3), default=-1)
            assert done_3 == {1: 1, 5: 3, 3: 5}[job.class_index]
            order.append(job.class_index)
            assert_same(result, single[job.class_index])
    finally:
        hook.remove()
    assert order == [1, 5, 3]
    # every UNet call carries every active class's seeds: 2 classes x 2 seeds x 2 (CFG) until only class 3 is left
    calls = config.num_inference_steps
    assert rows == [n * config.batch_size * 2 for n in active_counts(steps, 2) for _ in range(calls)]
    assert rows[: 4 * calls] == [8] * (4 * calls)


def test_a_class_that_joins_a_running_batch_sees_its_solo_inputs_and_records_the_batch(tiny_pipe, tmp_path):
    guide, config = Guide(), cfg(**STOPPING, lr_schedule="cosine", select="val", val_every=1)
    jobs = [DCTJob(c, f"class {c}") for c in (1, 3, 5)]
    single = alone(tiny_pipe, guide, jobs, config)
    joined = []
    results = dict(learn_dct_tokens(tiny_pipe, guide, jobs, config, classes_per_batch=2,
                                    callback=lambda job, entry, v: joined.append((job.class_index, entry["step"]))))
    # class 5 joins at class 3's third iteration: its step 0 (schedule, Adam state, seeds, validation) is its own
    assert joined.index((5, 0)) > joined.index((3, 1))
    for job, result in results.items():
        assert_same(result, single[job.class_index])
    assert {j.class_index: r.metadata["batched_with"] for j, r in results.items()} == {
        1: ["<synthaug-003>"], 3: ["<synthaug-001>", "<synthaug-005>"], 5: ["<synthaug-003>"]}
    save_token(results[jobs[2]], tmp_path / "005.safetensors")
    assert token_metadata(tmp_path / "005.safetensors")["batched_with"] == '["<synthaug-003>"]'


def test_batched_tokens_with_the_levers_on(tiny_pipe):
    # the x0 loss (a graph per step, back-propagated at once), micro-batches, augmentation, two prompts, validation
    # selection and a cosine schedule: every per-class piece of state the batch has to keep apart
    guide = Guide()
    config = cfg(**STOPPING, x0_weight=0.5, micro_batch=1, augment=2, select="val", val_every=2, val_batch_size=3,
                 prompts=("A photo of {token} {label}", "a {token}"), lr_schedule="cosine", grad_steps=2)
    jobs = [DCTJob(c, f"class {c}") for c in (5, 1, 3)]
    single = alone(tiny_pipe, guide, jobs, config)
    assert [single[job.class_index].steps for job in jobs] == [3, 2, 2]  # class 3 joins at class 5's third step
    batched = dict(learn_dct_tokens(tiny_pipe, guide, jobs, config, classes_per_batch=2))
    assert [job.class_index for job in batched] == [1, 5, 3]
    for job, result in batched.items():
        assert_same(result, single[job.class_index])
    assert all("val_accuracy" in result.history[0] for result in batched.values())


def test_a_failing_class_does_not_disturb_the_others(tiny_pipe):
    guide = Guide()
    blind = Guide()
    blind.labels = None  # no class count to check up front: class 12 fails when the guide first scores it
    config = cfg(**STOPPING)
    jobs = [DCTJob(3, "three"), DCTJob(12, "twelve"), DCTJob(4, "four", token="bird"), DCTJob(5, "five")]
    single = alone(tiny_pipe, blind, [jobs[0], jobs[3]], config)
    results = list(learn_dct_tokens(tiny_pipe, blind, jobs, config, classes_per_batch=2))
    by_class = {job.class_index: result for job, result in results}
    # 12 fails in its first iteration, then 4 as it takes 12's place
    assert [job.class_index for job, _ in results] == [12, 4, 5, 3]
    assert isinstance(by_class[12], UserError) and "`class_index` 12 is out of range" in str(by_class[12])
    assert isinstance(by_class[4], UserError) and "already a word of the tokenizer's vocabulary" in str(by_class[4])
    for c in (3, 5):
        assert_same(by_class[c], single[c])
    # one at a time the failures come back the same way
    one = {job.class_index: result
           for job, result in learn_dct_tokens(tiny_pipe, guide, jobs[2:3], config, classes_per_batch=1)}
    assert isinstance(one[4], UserError)


def test_one_class_per_batch_is_learn_dct_token_exactly(tiny_pipe):
    config = cfg(max_steps=2)
    jobs = [DCTJob(2, "two"), DCTJob(6, "six", token="<six>")]
    single = alone(tiny_pipe, Guide(), jobs, config)
    seen = []
    results = list(learn_dct_tokens(tiny_pipe, Guide(), jobs, config,
                                    callback=lambda job, entry, v: seen.append((job.class_index, entry["step"]))))
    assert [job for job, _ in results] == jobs
    for job, result in results:
        assert torch.equal(result.embedding, single[job.class_index].embedding)
        assert result.history == single[job.class_index].history
    assert seen == [(2, 0), (2, 1), (6, 0), (6, 1)]


def test_classes_per_batch_leaves_the_token_file_unchanged(tiny_pipe, tmp_path):
    config = cfg(max_steps=1)
    (_, result), = learn_dct_tokens(tiny_pipe, Guide(), [DCTJob(3, "three")], config, classes_per_batch=2)
    save_token(result, tmp_path / "batched.safetensors")
    save_token(learn_dct_token(tiny_pipe, Guide(), 3, "three", config), tmp_path / "alone.safetensors")
    assert "classes_per_batch" not in token_metadata(tmp_path / "batched.safetensors")["config"]
    assert (tmp_path / "batched.safetensors").read_bytes() == (tmp_path / "alone.safetensors").read_bytes()


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "many", "2"])
def test_bad_classes_per_batch_is_refused_in_one_line(tiny_pipe, value):
    with pytest.raises(UserError, match=r"^`classes_per_batch` must be an integer >= 1 \(classes per denoising "
                                        r"batch\), or auto .* but is .*: pass e\.g\. classes_per_batch=8\.$"):
        learn_dct_tokens(tiny_pipe, Guide(), [DCTJob(3, "three")], cfg(), classes_per_batch=value)
    with pytest.raises(UserError, match=r"^`dct.classes_per_batch` must be an integer >= 1 .*dct.classes_per_batch=8"):
        learn_dct_tokens(tiny_pipe, Guide(), [DCTJob(3, "three")], cfg(classes_per_batch=value))


@pytest.mark.parametrize(
    ("value", "match"),
    [(0, r"`dct.classes_per_batch` must be > 0 \(or auto to fit the GPU's free memory\) but is 0\.$"),
     ("some", r"`dct.classes_per_batch` must be an integer > 0, or auto \(null\) to fit the GPU's free memory "
              + r"but is 'some'\.$"),
     (2.5, r"`dct.classes_per_batch` must be an integer > 0, or auto")],
)
def test_bad_classes_per_batch_is_refused_by_the_config(value, match):
    with pytest.raises(UserError, match=match) as error:
        load_config(overrides={"dataset": "digits", "dct.classes_per_batch": value})
    assert "\n" not in str(error.value)


def test_classes_per_batch_config_auto_and_resume():
    assert DCTConfig().classes_per_batch == 1
    auto = load_config(overrides={"dataset": "digits", "dct.classes_per_batch": "auto"})
    assert auto.dct.classes_per_batch is None
    assert load_config(overrides={"dataset": "digits", "dct.classes_per_batch": 4}).dct.classes_per_batch == 4
    # a CPU machine runs auto as 1: a build made with 1 resumes there with auto; a folder written before the key
    # existed reads as 1. Another number is another config, as dct.micro_batch is (float rounding changes the tokens)
    written = to_dict(load_config(overrides={"dataset": "digits"}))
    del written["dct"]["classes_per_batch"]
    old = from_dict(written)
    assert old.dct.classes_per_batch == 1
    assert diff(resolve_auto(old, cuda=False), resolve_auto(auto, cuda=False)) == []
    assert diff(resolve_auto(old, cuda=True), resolve_auto(auto, cuda=True)) == ["dct.classes_per_batch"]
    four = load_config(overrides={"dataset": "digits", "dct.classes_per_batch": 4})
    assert diff(resolve_auto(old, cuda=False), resolve_auto(four, cuda=False)) == ["dct.classes_per_batch"]


def test_auto_classes_per_batch_fits_free_cuda_memory(monkeypatch, tiny_pipe):
    gib = 2**30
    job, probed = DCTJob(3, "three"), []
    monkeypatch.setattr(dct_batch, "probe_token_memory", lambda pipe, guide, config, job: probed.append(job)
                        or (2 * gib, gib))
    monkeypatch.setattr(dct_batch, "free_cuda_memory", lambda device: 40 * gib)
    cuda_pipe = types.SimpleNamespace(_execution_device=torch.device("cuda:0"))
    assert classes_per_batch_for(cuda_pipe, Guide(), cfg(classes_per_batch=None), job) == 17  # (36 - 1) // 2
    assert probed == [job]
    monkeypatch.setattr(dct_batch, "free_cuda_memory", lambda device: 400 * gib)
    assert classes_per_batch_for(cuda_pipe, Guide(), cfg(), job, "auto") == dct_batch.AUTO_MAX_CLASSES
    assert classes_per_batch_for(cuda_pipe, Guide(), cfg(classes_per_batch=None), job, 3) == 3  # no probe
    assert len(probed) == 2
    assert classes_per_batch_for(tiny_pipe, Guide(), cfg(classes_per_batch=None), job) == 1  # CPU: no probe
    assert len(probed) == 2


def test_the_memory_probe_trains_one_class_then_two(monkeypatch, tiny_pipe):
    # the allocator's readings faked (no CUDA here): the probe's two runs, alone and side by side, really train
    peaks, widths = iter([6 * 2**30, 9 * 2**30]), []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: next(peaks))
    hook = tiny_pipe.unet.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[0]))
    try:
        config = cfg(num_inference_steps=4, select="val", val_batch_size=3, x0_weight=0.5)
        assert dct_batch.probe_token_memory(tiny_pipe, Guide(), config, DCTJob(3, "three")) == (3 * 2**30, 2 * 2**30)
    finally:
        hook.remove()
    # 2 updates of a chain cut to grad_steps + 1 = 2 UNet calls, with a validation of 3 seeds before each update
    train, val = [2 * 2] * 2, [3 * 2] * 2
    side_by_side = [2 * w for w in train] + val + val
    assert widths == [*train, *val, *train, *val, *side_by_side, *side_by_side]


def test_batched_progress_reports_each_class_steps_with_its_own_stop_state(tiny_pipe):
    """A callable `progress` gets every class's iterations, each with its class index and its own stop rules'
    state, the same as the class learned alone reports."""
    guide, config = Guide(), cfg(**STOPPING)
    jobs = [DCTJob(c, f"class {c}") for c in (1, 3, 5)]
    alone_infos = {c: [] for c in (1, 3, 5)}
    for job in jobs:
        learn_dct_token(tiny_pipe, guide, job.class_index, job.label, config, progress=alone_infos[job.class_index].append)
    infos = []
    results = dict(learn_dct_tokens(tiny_pipe, guide, jobs, config, classes_per_batch=2, progress=infos.append))
    for job in jobs:
        mine = [i for i in infos if i["class_index"] == job.class_index]
        assert [i["step"] for i in mine] == list(range(results[job].steps))
        assert [i["state"] for i in mine] == [i["state"] for i in alone_infos[job.class_index]]
        assert mine[-1]["state"] == f"stopped: {results[job].stop_reason}"

