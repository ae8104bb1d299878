"""Models: the offline CLIP tokenizer, local-directory loading, offline errors, dtype/device choice, schedulers."""

import numpy as np
import pytest
import torch

from synthaug.errors import UserError
from synthaug.models import clip_tokenizer, load_diffusion, resolve_dtype, set_scheduler


def test_offline_clip_tokenizer_matches_stable_diffusion():
    tok = clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a photo", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == tok.pad_token_id == 49407



def test_clip_tokenizer_leaves_no_files_and_each_call_is_independent(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    a, b = clip_tokenizer(), clip_tokenizer()
    a.add_tokens(["<synthaug-000>"])
    assert len(a) == 49409 and len(b) == 49408
    assert b("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert b.decode(b("a drawing of a cat").input_ids, skip_special_tokens=True) == "a drawing of a cat"
    assert list(tmp_path.iterdir()) == []  # the files it was built from are gone


def test_local_directory_roundtrip(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "sd")
    pipe = load_diffusion(str(tmp_path / "sd"), device="cpu", scheduler="euler")
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.unet.dtype == torch.float32 and not any(p.requires_grad for p in pipe.unet.parameters())
    a = tiny_pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    set_scheduler(pipe, "ddim")
    b = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
    assert (a == b).all()


def test_timestep_spacing_is_diffusers_own(tiny_pipe):
    """`timestep_spacing` reaches the scheduler's config: with a named scheduler, and alone on the model's own."""
    from diffusers import DPMSolverMultistepScheduler

    original = tiny_pipe.scheduler
    try:
        set_scheduler(tiny_pipe, "dpmsolver++", "linspace")
        assert isinstance(tiny_pipe.scheduler, DPMSolverMultistepScheduler)
        tiny_pipe.scheduler.set_timesteps(5)
        assert tiny_pipe.scheduler.timesteps.tolist() == [999, 799, 599, 400, 200]  # from pure noise
        set_scheduler(tiny_pipe, None, "trailing")  # the class stays, the spacing changes
        assert isinstance(tiny_pipe.scheduler, DPMSolverMultistepScheduler)
        assert tiny_pipe.scheduler.config.timestep_spacing == "trailing"
        assert tiny_pipe.scheduler.config.algorithm_type == "dpmsolver++"
        with pytest.raises(UserError, match=r"`timestep_spacing` must be one of leading, linspace, trailing \(or null for the model's\) but is 'x'\."):
            set_scheduler(tiny_pipe, None, "x")
    finally:
        tiny_pipe.scheduler = original


def test_offline_hub_id_gives_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"`model` 'CompVis/stable-diffusion-v1-4' could not be loaded .*huggingface-cli"):
        load_diffusion("CompVis/stable-diffusion-v1-4", device="cpu")


def test_bad_model_paths(tmp_path):
    with pytest.raises(UserError, match=r"has no model_index.json"):
        load_diffusion(str(tmp_path), device="cpu")
    with pytest.raises(UserError, match=r"does not exist"):
        load_diffusion(str(tmp_path / "missing" / "dir"), device="cpu")


def test_dtype_and_scheduler_choices():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match=r"`dtype` must be one of"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(UserError, match=r"`scheduler` must be one of"):
        set_scheduler(object(), "nope")


def test_stock_diffusers_loads_the_embedded_model_and_all_build_tokens(tmp_path):
    """What a diffusers user types: no dtype argument, and one documented call for tokens/tokens.safetensors."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from synthaug.models import ASSETS
    from synthaug.tokens.dct import TokenResult
    from synthaug.tokens.io import save_tokens

    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "digits" / "model")
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float32  # the shipped configs agree
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(3, 1, dim, generator=torch.Generator().manual_seed(0))
    results = [TokenResult(token=f"<synthaug-{i:03d}>", class_index=i, label=str(i), embedding=vectors[i], steps=1,
                           stop_reason="steps", best_step=0, history=[], metadata={}) for i in range(3)]
    save_tokens(results, tmp_path / "tokens.safetensors", {"model_id": "digits"})

    # The call the README documents:
    tokens = load_file(tmp_path / "tokens.safetensors")
    pipe.load_textual_inversion(list(tokens.values()), token=list(tokens.keys()))

    for i in range(3):
        ids = pipe.tokenizer(f"<synthaug-{i:03d}>", add_special_tokens=False).input_ids
        assert len(ids) == 1
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids[0]], vectors[i, 0])
    image = pipe("A photo of a <synthaug-001> seven", num_inference_steps=2, height=32, width=32,
                 output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
