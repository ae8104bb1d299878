"""Models: the offline CLIP tokenizer, local-directory loading, offline errors, dtype/device choice, schedulers."""

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
