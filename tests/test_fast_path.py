"""The fast path on CUDA, exercised on CPU: channels-last UNet and VAE, the compiled UNet on by default with CUDA only,
and the persistent folder inductor caches compiled code in. Each lever changes images by float rounding only."""

from __future__ import annotations

import contextlib
import functools
import os

import numpy as np
import pytest
import torch
from test_generation_pace import gen_config
from test_tokens import Guide, cfg

import synthaug.builder.images as images_module
from synthaug.config import BuildConfig, load_config
from synthaug.errors import UserError
from synthaug.generation import COMPILE_CACHE_ENV, compile_cache_dir, compile_unet, compiles, generate, use_unet
from synthaug.models import set_channels_last
from synthaug.tokens.dct import learn_dct_token


@contextlib.contextmanager
def channels_last(pipe):
    set_channels_last(pipe)
    try:
        yield pipe
    finally:
        set_channels_last(pipe, False)  # the session's pipeline goes back as it was


def _pixels(images):
    return [np.asarray(g.image, dtype=int) for g in images]


def _close(a, b, tolerance=1):
    """8-bit images equal up to `tolerance` levels (float rounding of another kernel, seen through the 8-bit cast)."""
    assert len(a) == len(b) and all(np.abs(x - y).max() <= tolerance for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------------------------
# Channels-last
# --------------------------------------------------------------------------------------------------------------------
def test_channels_last_holds_unet_and_vae_weights_in_nhwc_and_goes_back(tiny_pipe):
    convs = [m.weight for model in (tiny_pipe.unet, tiny_pipe.vae) for m in model.modules()
             if isinstance(m, torch.nn.Conv2d)]
    with channels_last(tiny_pipe):
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert all(w.is_contiguous() for w in convs)


def test_channels_last_generates_the_nchw_images(tiny_pipe):
    config = gen_config()
    nchw = _pixels(generate(tiny_pipe, class_index=2, label="two", token=None, indices=range(3), config=config))
    with channels_last(tiny_pipe):
        nhwc = _pixels(generate(tiny_pipe, class_index=2, label="two", token=None, indices=range(3), config=config))
    _close(nchw, nhwc)


def test_channels_last_learns_the_nchw_token(tiny_pipe):
    # the update back-propagates through the channels-last UNet and VAE, checkpointing on: the same token
    config = cfg(max_steps=3, checkpointing=True)
    nchw = learn_dct_token(tiny_pipe, Guide(), 3, "three", config)
    with channels_last(tiny_pipe):
        nhwc = learn_dct_token(tiny_pipe, Guide(), 3, "three", config)
    assert nhwc.steps == nchw.steps and nhwc.best_step == nchw.best_step
    torch.testing.assert_close(nhwc.embedding, nchw.embedding, rtol=1e-4, atol=1e-5)
    for a, b in zip(nchw.history, nhwc.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_compiled_channels_last_unet_gives_the_eager_images(tiny_pipe, tmp_path, monkeypatch):
    # the default on CUDA, both levers at once, against the eager NCHW images; aot_eager: dynamo's graph capture and
    # the compile-once-per-shape logic without inductor's C++ build (the NCHW compiled UNet: test_generation_pace's
    # worker tests)
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(COMPILE_CACHE_ENV, default_cache_dir())  # as importing diffusers leaves it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = gen_config()
    eager = _pixels(generate(tiny_pipe, class_index=5, label="five", token=None, indices=range(3), config=config))
    with channels_last(tiny_pipe):
        unet, seconds = compile_unet(tiny_pipe, config, [2, 1], backend="aot_eager")
        assert seconds > 0 and tiny_pipe.unet is not unet
        with torch._dynamo.config.patch(error_on_recompile=True), use_unet(tiny_pipe, unet):  # shapes compiled ahead
            assert tiny_pipe.unet is unet
            fast = _pixels(generate(tiny_pipe, class_index=5, label="five", token=None, indices=range(3),
                                    config=config))
    assert type(tiny_pipe.unet).__name__ == "UNet2DConditionModel"  # token learning keeps the eager UNet
    _close(eager, fast)
    assert os.environ[COMPILE_CACHE_ENV] == str(tmp_path / "synthaug" / "torchinductor")


# --------------------------------------------------------------------------------------------------------------------
# Defaults: on with CUDA, off elsewhere; the config keys
# --------------------------------------------------------------------------------------------------------------------
def test_compile_is_on_by_default_with_cuda_only(tiny_pipe, monkeypatch):
    assert BuildConfig().generate.compile is None and BuildConfig().channels_last is None  # auto
    assert not compiles(tiny_pipe, gen_config())  # a CPU pipeline
    assert compiles(tiny_pipe, gen_config(compile=True))
    monkeypatch.setattr(type(tiny_pipe), "device", property(lambda self: torch.device("cuda")))
    assert compiles(tiny_pipe, gen_config()) and not compiles(tiny_pipe, gen_config(compile=False))


def test_load_diffusion_holds_channels_last_on_cuda_only(world):
    from synthaug.models import load_diffusion

    def nhwc(pipe):
        return pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)

    assert not nhwc(load_diffusion(world[0], device="cpu"))
    assert nhwc(load_diffusion(world[0], device="cpu", channels_last=True))


@pytest.mark.parametrize("key", ["generate.compile", "channels_last"])
def test_auto_levers_take_auto_true_false_and_refuse_the_rest(key):
    section, _, name = key.rpartition(".")

    def value(v):
        c = load_config(overrides={key: v})
        return getattr(getattr(c, section) if section else c, name)

    assert value("auto") is None and value(True) is True and value(False) is False
    with pytest.raises(UserError, match=rf"`{key}` must be true, false, or auto \(null; on with CUDA, off "
                                        rf"elsewhere\) but is 'fast'"):
        value("fast")


def test_the_compile_cache_is_a_persistent_user_folder_unless_inductors_own_setting_names_one(monkeypatch, tmp_path):
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert compile_cache_dir() == os.path.expanduser("~/.cache/synthaug/torchinductor")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == str(tmp_path / "synthaug" / "torchinductor")
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    assert compile_cache_dir() == str(tmp_path / "mine")
    # inductor's own default, which it writes into the variable when first asked (importing diffusers does): ours wins
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(COMPILE_CACHE_ENV, default_cache_dir())
    assert compile_cache_dir() == str(tmp_path / "synthaug" / "torchinductor")


def test_a_cpu_worker_leaves_the_unet_eager_by_default(tiny_pipe, tmp_path, monkeypatch):
    from test_generation_pace import _run_worker

    calls = []
    monkeypatch.setattr(images_module, "compile_unet",
                        lambda *a, **k: calls.append(1) or functools.partial(compile_unet, backend="aot_eager")(*a, **k))
    result, _ = _run_worker(tiny_pipe, tmp_path / "a")
    assert result["compile_seconds"] == 0.0 and not calls
