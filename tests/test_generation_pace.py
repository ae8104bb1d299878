"""Generation at the pipeline's pace: SDPA attention, the batch from free memory, the compiled UNet, and shards
written on a background thread with the very same bytes."""

from __future__ import annotations

import functools
import hashlib
import logging
import types

import numpy as np
import pytest
import torch
from torch import nn

import synthaug.builder.images as images_module
from synthaug import generation
from synthaug.builder.plan import ClassJob, ShardTask
from synthaug.builder.worker import ClassWorker
from synthaug.config import GenerateConfig, load_config, to_dict
from synthaug.errors import UserError
from synthaug.generation import batch_size_for, batch_sizes, compile_unet, generate, use_unet
from synthaug.layout import shard_paths
from synthaug.shards import ShardWriter, write_shard
from synthaug.tokens.io import save_tokens

SIZE = 16


class Guide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
        self.requires_grad_(False).eval()

    def forward(self, images):
        return self.net(images)


def gen_config(**kw) -> GenerateConfig:
    return GenerateConfig(**{"num_inference_steps": 2, "height": SIZE, "width": SIZE, "batch_size": 2, **kw})


# --------------------------------------------------------------------------------------------------------------------
# SDPA
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["sd15", "sd21"])
def test_sd_layouts_attend_with_sdpa(layout):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from synthaug.testing import sd_configs

    c = sd_configs(layout)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel.from_config(c["unet"]), AutoencoderKL.from_config(c["vae"])
    for module in (unet, vae):
        kinds = {type(p).__name__ for p in module.attn_processors.values()}
        assert kinds == {AttnProcessor2_0.__name__}, f"{type(module).__name__} attends with {kinds}"


def test_loaded_pipeline_generates_through_scaled_dot_product_attention(world, monkeypatch):
    """The UNet, the VAE and the text encoder of a pipeline as `load_diffusion` gives it all call torch's SDPA."""
    from synthaug.models import load_diffusion

    pipe = load_diffusion(str(world[0]), device="cpu", dtype="float32")
    calls: dict[str, int] = {"unet": 0, "vae": 0, "text_encoder": 0}
    current: list[str] = []

    def leave(*args) -> None:
        current.pop()

    for name in calls:
        module = pipe.vae.decoder if name == "vae" else getattr(pipe, name)  # the pipeline calls vae.decode()
        module.register_forward_pre_hook(lambda *a, n=name: current.append(n))
        module.register_forward_hook(leave)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls[current[-1]] += 1
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    generate(pipe, class_index=0, label="zero", token=None, indices=[0], config=gen_config(height=32, width=32))
    assert all(n > 0 for n in calls.values()), calls


# --------------------------------------------------------------------------------------------------------------------
# Batch size from free memory
# --------------------------------------------------------------------------------------------------------------------
def test_batch_size_for_reads_free_cuda_memory(monkeypatch, caplog):
    gib = 2**30
    cuda_pipe = types.SimpleNamespace(device=torch.device("cuda:0"))
    probed = []
    monkeypatch.setattr(generation, "probe_memory", lambda pipe, cfg: probed.append((cfg.height, cfg.width))
                        or (int(1.5 * gib), int(0.5 * gib)))
    monkeypatch.setattr(generation, "free_cuda_memory", lambda device: 20 * gib)
    with caplog.at_level(logging.INFO, logger="synthaug.generation"):
        assert batch_size_for(cuda_pipe, GenerateConfig(batch_size=None, height=512, width=512)) == 11  # (18-.5)/1.5
    assert probed == [(512, 512)]
    assert "generate.batch_size auto: 11 (20.0 GiB free on cuda:0, 1.50 GiB per image + 0.50 GiB fixed" in caplog.text
    monkeypatch.setattr(generation, "free_cuda_memory", lambda device: 80 * gib)
    assert batch_size_for(cuda_pipe, GenerateConfig(batch_size=None)) == 47
    assert batch_size_for(cuda_pipe, GenerateConfig(batch_size=6)) == 6  # a number is taken as it is, no probe
    assert len(probed) == 2
    cpu_pipe = types.SimpleNamespace(device=torch.device("cpu"))
    assert batch_size_for(cpu_pipe, GenerateConfig(batch_size=None)) == generation.CPU_BATCH_SIZE == 8


@pytest.mark.parametrize(("value", "expected"), [("auto", None), (None, None), (12, 12), ("12", 12)])
def test_batch_size_config_accepts_auto(value, expected):
    assert load_config(overrides={"generate.batch_size": value}).generate.batch_size == expected


@pytest.mark.parametrize(("value", "match"), [
    ("lots", (r"^`generate.batch_size` must be an integer > 0, or auto \(null\) to fit the GPU's free memory but "
              r"is 'lots'\.$")),
    (2.5, r"but is 2.5\.$"),
    (0, r"^`generate.batch_size` must be > 0 \(or auto to fit the GPU's free memory\) but is 0\.$"),
])
def test_bad_batch_size_is_one_line(value, match):
    with pytest.raises(UserError, match=match):
        load_config(overrides={"generate.batch_size": value})


def test_generate_without_a_batch_size_uses_the_cpu_default(tiny_pipe):
    one = generate(tiny_pipe, class_index=1, label="one", token=None, indices=range(3), config=gen_config())
    auto = generate(tiny_pipe, class_index=1, label="one", token=None, indices=range(3),
                    config=gen_config(batch_size=None))
    for a, b in zip(one, auto):
        assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 1


def test_batch_sizes():
    assert batch_sizes(0, 10, 4) == [4, 4, 2]
    assert batch_sizes(100, 103, 8) == [3]
    assert batch_sizes(4, 8, 2) == [2, 2]


# --------------------------------------------------------------------------------------------------------------------
# Compiled UNet
# --------------------------------------------------------------------------------------------------------------------
def _compiled_matches_eager(pipe, **options):
    import torch._dynamo

    cfg = gen_config()
    eager = generate(pipe, class_index=3, label="three", token=None, indices=range(3), config=cfg)
    unet, seconds = compile_unet(pipe, cfg, batch_sizes(0, 3, 2), **options)
    assert seconds > 0 and pipe.unet is not unet
    with torch._dynamo.config.patch(error_on_recompile=True), use_unet(pipe, unet):  # every shape compiled up front
        assert pipe.unet is unet
        compiled = generate(pipe, class_index=3, label="three", token=None, indices=range(3), config=cfg)
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # token learning keeps the eager UNet
    for a, b in zip(eager, compiled):
        assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 1


@pytest.mark.slow
def test_inductor_compiled_unet_gives_the_eager_images(tiny_pipe):
    # inductor on CPU compiles C++ kernels: minutes on a small machine (8 min for this tiny UNet on 2 busy cores).
    # With aot_eager, and channels-last as on CUDA: test_fast_path.
    _compiled_matches_eager(tiny_pipe)


# --------------------------------------------------------------------------------------------------------------------
# The worker: compile time apart, shards written behind generation with the same bytes
# --------------------------------------------------------------------------------------------------------------------
def _run_worker(tiny_pipe, out, **kw):
    from synthaug.tokens.text import token_name

    sets = kw.pop("set", {})
    cfg = load_config(overrides={"generate.height": SIZE, "generate.width": SIZE, "generate.num_inference_steps": 2,
                                 "generate.batch_size": 2, "shards.samples_per_shard": 3, "device": "cpu", **sets})
    token = token_name(4)
    save_tokens({token: torch.randn(1, 32, generator=torch.Generator().manual_seed(0))},
                out / "tokens" / "004.safetensors")
    shards = (ShardTask(10, "dct", 4, 0, 0, 3), ShardTask(11, "dct", 4, 1, 3, 5), ShardTask(12, "sd", 4, 0, 0, 3))
    events = []
    worker = ClassWorker(to_dict(cfg), str(out), [str(i) for i in range(10)], [4], report=events.append,
                         models={"pipe": tiny_pipe, "guide": Guide()}, **kw)
    result = worker.run(ClassJob(4, "four", token, shards))
    return result, events


def _digest(out, shard_ids):
    methods = {12: "sd"}  # as `_run_worker` plans them; every other shard here is "dct"
    return {i: [hashlib.sha256(p.read_bytes()).hexdigest() for p in (shard_paths(out, i, methods.get(i, "dct")).tar,
                                                                     shard_paths(out, i, methods.get(i, "dct")).parquet,
                                                                     shard_paths(out, i, methods.get(i, "dct")).stats)]
            for i in shard_ids}


def test_shards_written_behind_generation_have_the_inline_bytes(tiny_pipe, tmp_path):
    behind, events = _run_worker(tiny_pipe, tmp_path / "a")
    inline, _ = _run_worker(tiny_pipe, tmp_path / "b", overlap_writes=False)
    assert _digest(tmp_path / "a", [10, 11, 12]) == _digest(tmp_path / "b", [10, 11, 12])
    assert behind["shards_written"] == inline["shards_written"] == [10, 11, 12] and behind["images"] == 8
    assert behind["batch_size"] == 2 and behind["compile_seconds"] == 0.0
    assert behind["write_seconds"] > 0 and 0 <= behind["write_wait_seconds"] <= behind["generate_seconds"]
    assert inline["write_wait_seconds"] >= inline["write_seconds"] > 0  # in line, generation waits for every write
    # each shard is reported once it is on disk, in order, after its last batch was generated
    kinds = [(e["kind"], e.get("shard")) for e in events if e["kind"] in ("images", "shard")]
    for shard in (10, 11, 12):
        last_batch = max(i for i, k in enumerate(kinds) if k == ("images", shard))
        assert kinds.index(("shard", shard)) > last_batch
    assert [s for k, s in kinds if k == "shard"] == [10, 11, 12]
    assert not list((tmp_path / "a" / "shards").glob(".tmp-*"))


def test_a_build_reports_the_compile_time_apart(tmp_path, world, monkeypatch):
    import buildworld as bw

    from synthaug import build

    monkeypatch.setattr(images_module, "compile_unet", functools.partial(compile_unet, backend="aot_eager"))
    compiled = build(bw.config(tmp_path / "a", *world, **{"classes": "0", "generate.compile": True}), progress=False)
    assert compiled.ok and compiled.compile_seconds > 0
    assert f"(UNet compile {compiled.compile_seconds:.1f}s)" in compiled.summary()
    eager = build(bw.config(tmp_path / "b", *world, classes="0"), progress=False)
    assert eager.compile_seconds == 0.0 and "compile" not in eager.summary()


def test_worker_compiles_once_and_reports_the_compile_time_apart(tiny_pipe, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(images_module, "compile_unet", functools.partial(compile_unet, backend="aot_eager"))
    with caplog.at_level(logging.INFO, logger="synthaug.builder.images"):
        result, events = _run_worker(tiny_pipe, tmp_path / "c", set={"generate.compile": True})
    assert result["compile_seconds"] > 0 and result["generate_seconds"] > 0
    assert "generate.compile: UNet compiled for batch sizes [2, 1] in" in caplog.text
    assert next(e for e in events if e["kind"] == "compile")["seconds"] == result["compile_seconds"]
    eager, _ = _run_worker(tiny_pipe, tmp_path / "d")
    assert eager["images"] == result["images"] == 8
    for shard in (10, 11, 12):  # the same images, up to float rounding
        a, b = _pixels(tmp_path / "c", shard), _pixels(tmp_path / "d", shard)
        assert a.keys() == b.keys() and all(np.abs(a[k] - b[k]).max() <= 1 for k in a)


def _pixels(out, shard):
    import io
    import tarfile

    from PIL import Image

    with tarfile.open(shard_paths(out, shard, "sd" if shard == 12 else "dct").tar) as tf:  # `_run_worker`'s plan
        return {m.name: np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())), dtype=int)
                for m in tf.getmembers() if m.name.endswith(".png")}


# --------------------------------------------------------------------------------------------------------------------
# ShardWriter
# --------------------------------------------------------------------------------------------------------------------
def _images(n, method="dct"):
    from PIL import Image

    rng = np.random.default_rng(0)
    return [generation.GeneratedImage(
        image=Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)), class_index=1, class_name="one",
        method=method, index=i, prompt="p", seed=i, token_sha256=None, model_id="m", scheduler="s", steps=1,
        guidance_scale=7.0, height=8, width=8, guide_prob=None, guide_top5=None) for i in range(n)]


@pytest.mark.parametrize(("background", "encode_threads"), [(True, 1), (False, 1), (True, 3)])
def test_shard_writer_writes_write_shards_bytes(tmp_path, background, encode_threads):
    images = _images(5)
    write_shard(tmp_path / "ref", 0, images)
    with ShardWriter(tmp_path / "w", background=background, max_pending=1, encode_threads=encode_threads) as writer:
        writer.begin(0)
        writer.put(images[:2])
        writer.put(images[2:])
        writer.end()
        done = writer.drain()
        assert [i for i, _ in done] == [0] and done[0][1].num_samples == 5 and writer.finished() == []
    assert _digest(tmp_path / "ref", [0]) == _digest(tmp_path / "w", [0])


@pytest.mark.parametrize("background", [True, False])
def test_shard_writer_error_reaches_the_caller_and_leaves_no_file(tmp_path, background):
    images = _images(2)
    with pytest.raises((RuntimeError, ValueError), match="duplicate key 'dct-c001-s00000'"), \
            ShardWriter(tmp_path, background=background) as writer:
        writer.begin(3)
        writer.put(images)
        writer.put(images[:1])  # the same key again
        writer.end()
        writer.drain()
    assert not (tmp_path / "shards").exists() or list((tmp_path / "shards").iterdir()) == []


def test_shard_writer_names_what_a_sample_lacks(tmp_path):
    with pytest.raises(RuntimeError, match=r"sample 0 \(str\) lacks attribute\(s\) image"), \
            ShardWriter(tmp_path, encode_threads=2) as writer:
        writer.begin(0)
        writer.put(["not an image"])
        writer.end()
        writer.drain()


def test_shard_writer_drops_the_open_shard_when_the_caller_fails(tmp_path):
    images = _images(4)
    with pytest.raises(KeyError), ShardWriter(tmp_path) as writer:
        writer.begin(0)
        writer.put(images[:2])
        writer.end()
        writer.begin(1)
        writer.put(images[2:])
        raise KeyError("generation failed")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["dct-00000.tar"]
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == ["_dct-00000_stats.json", "dct-00000.parquet"]
