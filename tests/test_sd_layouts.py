"""The real Stable Diffusion layouts, as a new user runs them: SD-1.5 (PNDM, cross-attention 768, CLIP ViT-L text
tower) and SD-2.1 (v-prediction, per-block heads, linear projections, upcast attention, OpenCLIP-H text tower) with
random weights saved by ``save_pretrained``, guided by a ViT-B/16 (MAE mean-pooled, and plain), through
``synthaug build``: one DCT update, generation, a shard. 64 px on the CPU; the 512-px memory accounting is
``scripts/bench/memory.py`` (a benchmark, not a test).
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from synthaug.datasets.digits import DIGIT_NAMES
from synthaug.testing import SD_LAYOUTS, save_vit_guide, sd_configs, sd_pipeline, sd_scheduler

# Parameter counts of the published checkpoints' modules (unet / vae / text_encoder): the layouts are the real ones.
PARAMETERS = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
}


@pytest.mark.parametrize("layout", SD_LAYOUTS)
def test_layouts_are_the_published_architectures(layout):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = sd_configs(layout)
    with torch.device("meta"):
        modules = {"unet": UNet2DConditionModel.from_config(configs["unet"]),
                   "vae": AutoencoderKL.from_config(configs["vae"]),
                   "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))}
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()} == PARAMETERS[layout]
    scheduler = sd_scheduler(layout)
    if layout == "sd15":
        assert type(scheduler).__name__ == "PNDMScheduler" and scheduler.config.prediction_type == "epsilon"
        assert modules["unet"].config.cross_attention_dim == 768 and not modules["unet"].config.upcast_attention
    else:
        assert type(scheduler).__name__ == "DDIMScheduler" and scheduler.config.prediction_type == "v_prediction"
        unet = modules["unet"].config
        assert list(unet.attention_head_dim) == [5, 10, 20, 20] and unet.use_linear_projection
        assert unet.upcast_attention and unet.cross_attention_dim == 1024


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``save_pretrained`` folders of both layouts (fp16 on disk: half the bytes; builds load them in fp32) and the
    two guides, with the digits' class names."""
    root = tmp_path_factory.mktemp("sd-layouts")
    out = {}
    for layout in SD_LAYOUTS:
        pipe = sd_pipeline(layout, sample_size=8, dtype=torch.float16)
        pipe.save_pretrained(root / layout)
        del pipe
        gc.collect()
        out[layout] = root / layout
    out["mae-cub"] = save_vit_guide(root, "mae-cub", 10, labels=list(DIGIT_NAMES))
    out["vit"] = save_vit_guide(root, "vit", 10, labels=list(DIGIT_NAMES))
    return out


@pytest.mark.parametrize(("layout", "guide", "levers"), [
    ("sd15", "mae-cub", {"dct.checkpointing": True}),  # diffusers' block checkpointing in the real UNet and VAE
    ("sd21", "vit", {"dct.micro_batch": 1}),
])
def test_build_on_the_real_layout(saved, tmp_path, layout, guide, levers):
    """One class: two DCT measurements around one update (the paper's two prompts, CFG), one image, one shard."""
    from synthaug import build
    from synthaug.config import load_config
    from synthaug.index import load_index
    from synthaug.tokens.io import token_metadata

    config = load_config(overrides={
        "dataset": "digits", "classes": "3", "model": str(saved[layout]), "guide": saved[guide],
        "out": str(tmp_path / "out"), "per_class": 1, "baseline": False, "device": "cpu", "dtype": "float32",
        "dct.height": 64, "dct.width": 64, "dct.num_inference_steps": 1, "dct.max_steps": 2, "dct.batch_size": 2,
        "dct.prompts": ["A high-resolution realistic image of a {token} {label}", "A photo of {token} {label}"],
        "dct.guidance_scale": 7.0, "dct.stop_all_correct": False,  # random guides may call the batch right at once
        "dct.select": "min_loss", "dct.x0_weight": 0.0, "dct.lr": None,  # the paper's method, not digits' levers
        "generate.height": 64, "generate.width": 64, "generate.num_inference_steps": 1, "generate.batch_size": 1,
        "generate.guidance_scale": 7.0, "shards.samples_per_shard": 1, "run.executor": "local",
        "run.cpus_per_worker": 1, **levers,
    })
    result = build(config, progress=False)
    table = load_index(result.out).to_pylist()
    assert [(r["class_name"], r["method"]) for r in table] == [("three", "dct")]
    assert table[0]["height"] == 64 and table[0]["scheduler"] == ("PNDMScheduler" if layout == "sd15" else
                                                                 "DDIMScheduler")
    meta = token_metadata(Path(result.out) / "tokens" / "003.safetensors")
    assert int(meta["steps"]) == 2  # measured, updated, measured
