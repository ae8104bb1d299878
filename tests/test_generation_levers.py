"""Generation levers: prompt variety (generate.prompts), real-anchored generation (generate.init: real) and
multi-vector class tokens (dct/mcti num_vectors): options, per-row records, determinism, resume, stock loading."""

from __future__ import annotations

import dataclasses
import shutil

import buildworld as bw
import numpy as np
import pytest
import torch
from PIL import Image

from synthaug.config import DCTConfig, GenerateConfig, MCTIConfig, load_config, strength_steps
from synthaug.errors import UserError
from synthaug.generation import generate
from synthaug.tokens.dct import learn_dct_token
from synthaug.tokens.io import add_tokens, load_tokens, save_token
from synthaug.tokens.mcti import learn_mcti_token
from synthaug.tokens.text import vector_ids

TOKEN = "<synthaug-003>"
TEMPLATES = ("A photo of {token} {label}", "A sketch of {token} {label}", "A blurry photo of {token} {label}")


def gen_config(**kw) -> GenerateConfig:
    return GenerateConfig(**{"num_inference_steps": 4, "height": 16, "width": 16, "batch_size": 3, **kw})


def reals(n: int = 3) -> dict[int, Image.Image]:
    """`n` real start images of one class, by made-up indices in a split (8x8: generate resizes them)."""
    return {10 * i + 7: Image.fromarray((np.random.RandomState(i).rand(8, 8, 3) * 255).astype("uint8"))
            for i in range(n)}


def pixels(images) -> list[np.ndarray]:
    return [np.asarray(im.image) for im in images]


@pytest.fixture(scope="module")
def pipe():
    from synthaug.testing import tiny_pipeline

    p = tiny_pipeline(seed=0)
    add_tokens(p, {TOKEN: 50 * torch.randn(2, 32, generator=torch.Generator().manual_seed(0))})  # two vectors
    return p


# ---- configuration -------------------------------------------------------------------------------------------------
def test_lever_defaults_keep_todays_generation():
    g = GenerateConfig()
    assert (g.prompts, g.init, DCTConfig().num_vectors, MCTIConfig().num_vectors) == ((), "noise", 1, 1)


def test_strength_takes_one_value_or_a_range_of_whole_steps():
    assert load_config(overrides={"generate.strength": 0.6}).generate.strength == (0.6,)
    assert load_config(overrides={"generate.strength": [0.5, 0.9]}).generate.strength == (0.5, 0.9)
    assert strength_steps((0.5, 0.9), 10) == [5, 6, 7, 8, 9]
    assert strength_steps((0.75,), 10) == [7]


REAL = {"generate.init": "real"}


@pytest.mark.parametrize("overrides, match", [
    ({"generate.init": "image"}, r"`generate.init` must be one of noise, real but is 'image'"),
    ({**REAL, "generate.strength": [0.9, 0.5]}, r"`generate.strength` must be one value in \(0, 1\] or a range"),
    ({**REAL, "generate.strength": 1.5}, r"`generate.strength` must be one value in \(0, 1\]"),
    ({**REAL, "generate.strength": 0.05, "generate.num_inference_steps": 10}, r"leaves no denoising step"),
    ({**REAL, "generate.strength": [0.61, 0.68], "generate.num_inference_steps": 10}, r"leaves no denoising step"),
    ({"shots": 0}, r"`shots` must be > 0"),
    ({"generate.prompts": ["A photo of {label}"]}, r"`generate.prompts` entry 'A photo of \{label\}' has no \{token\}"),
    ({"generate.prompts": ["A photo of {token}"], "baseline": True}, r"`baseline` needs a class name in every"),
    ({"dct.num_vectors": 0}, r"`dct.num_vectors` must be > 0"),
    ({"mcti.num_vectors": 0}, r"`mcti.num_vectors` must be > 0"),
])
def test_bad_lever_values_are_one_line_errors(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(overrides=overrides)


# ---- prompt variety ------------------------------------------------------------------------------------------------
def test_each_image_draws_its_prompt_by_its_seed_and_records_it(pipe):
    config = gen_config(prompts=TEMPLATES)
    images = generate(pipe, class_index=3, label="three", token=TOKEN, indices=range(6), config=config)
    assert len({im.prompt_index for im in images}) > 1
    for im in images:
        assert im.prompt == TEMPLATES[im.prompt_index].replace("{token}", TOKEN).replace("{label}", "three")
        assert (im.init_index, im.strength) == (None, None)
    # the draw and the pixels depend on the image alone: other batches, a subset, give the same
    again = generate(pipe, class_index=3, label="three", token=TOKEN, indices=[4, 5],
                     config=dataclasses.replace(config, batch_size=1))
    assert [im.prompt for im in again] == [im.prompt for im in images[4:]]
    assert all(np.array_equal(a, b) for a, b in zip(pixels(again), pixels(images[4:])))
    # the baseline draws the same templates on the same seeds, without the token
    plain = generate(pipe, class_index=3, label="three", token=None, indices=range(6), config=config)
    assert [im.prompt_index for im in plain] == [im.prompt_index for im in images]
    assert all(TOKEN not in im.prompt for im in plain)


# ---- real-anchored generation --------------------------------------------------------------------------------------
def test_real_start_draws_source_and_strength_per_image_and_records_them(pipe):
    config = gen_config(init="real", strength=(0.25, 1.0))
    starts = reals()
    images = generate(pipe, class_index=3, label="three", token=TOKEN, indices=range(6), config=config,
                      init_images=starts)
    assert all(im.init_index in starts and im.strength in (0.25, 0.5, 0.75, 1.0) for im in images)
    assert len({im.strength for im in images}) > 1 and len({im.init_index for im in images}) > 1
    again = generate(pipe, class_index=3, label="three", token=TOKEN, indices=[5, 2],
                     config=dataclasses.replace(config, batch_size=2), init_images=starts)
    assert [(im.init_index, im.strength) for im in again] == [(images[i].init_index, images[i].strength) for i in (5, 2)]
    assert all(np.array_equal(a, b) for a, b in zip(pixels(again), pixels([images[5], images[2]])))
    # the start image is what the image is made from: other real images give other pixels, noise others again
    other = {k: Image.fromarray(255 - np.asarray(im)) for k, im in starts.items()}
    changed = generate(pipe, class_index=3, label="three", token=TOKEN, indices=range(6), config=config,
                       init_images=other)
    noise = generate(pipe, class_index=3, label="three", token=TOKEN, indices=range(6), config=gen_config())
    low = [i for i, im in enumerate(images) if im.strength < 1.0]
    assert all(not np.array_equal(pixels(changed)[i], pixels(images)[i]) for i in low)
    assert all(not np.array_equal(pixels(noise)[i], pixels(images)[i]) for i in range(6))


def test_real_start_without_images_is_a_one_line_error(pipe):
    with pytest.raises(UserError, match=r"`init_images` is empty but generate.init is 'real'"):
        generate(pipe, class_index=3, label="three", token=TOKEN, indices=range(2), config=gen_config(init="real"))


# ---- multi-vector tokens -------------------------------------------------------------------------------------------
def test_multi_vector_token_file_loads_in_stock_diffusers_and_generates_the_same(pipe, tmp_path):
    from synthaug.testing import tiny_pipeline
    from synthaug.tokens.dct import TokenResult

    emb = 50 * torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    result = TokenResult(token="<synthaug-004>", class_index=4, label="four", embedding=emb, steps=0,
                         stop_reason="max_steps", best_step=0, history=[], seconds=0.0, unet_evals=0, metadata={})
    save_token(result, tmp_path / "004.safetensors")
    assert load_tokens(tmp_path / "004.safetensors")["<synthaug-004>"].shape == (3, 32)
    ours, stock = tiny_pipeline(seed=0), tiny_pipeline(seed=0)
    add_tokens(ours, load_tokens(tmp_path / "004.safetensors"))
    stock.load_textual_inversion(str(tmp_path / "004.safetensors"))
    assert stock.maybe_convert_prompt("a <synthaug-004> four", stock.tokenizer) == \
        "a <synthaug-004> <synthaug-004>_1 <synthaug-004>_2 four"
    for p in (ours, stock):
        rows = p.text_encoder.get_input_embeddings().weight[vector_ids(p.tokenizer, "<synthaug-004>")]
        assert torch.equal(rows, emb)
    kw = {"class_index": 4, "label": "four", "token": "<synthaug-004>", "indices": range(2), "config": gen_config()}
    a, b = generate(ours, **kw), generate(stock, **kw)
    assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b)))
    assert a[0].token_sha256 == b[0].token_sha256


def test_dct_learns_n_vectors_and_leaves_the_pipeline_as_it_was(tiny_pipe):
    from test_tokens import Guide, cfg, state

    before, size = state(tiny_pipe), len(tiny_pipe.tokenizer)  # the session's pipeline: other tests added tokens
    result = learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=2, num_vectors=2))
    assert result.embedding.shape == (2, 32)
    assert not torch.equal(result.embedding[0], result.embedding[1])  # each vector got its own gradient
    after = state(tiny_pipe)
    assert all(torch.equal(before[k], after[k]) for k in before) and len(tiny_pipe.tokenizer) == size
    assert result.metadata["config"]["num_vectors"] == 2


def test_ti_learns_n_vectors():
    from test_mcti import _images, tiny_clip

    from synthaug.testing import tiny_pipeline

    pipe, clip = tiny_pipeline(seed=0), tiny_clip()
    pipe.text_encoder.load_state_dict(clip.text_model.state_dict())
    config = MCTIConfig(steps=2, extra_steps=0, batch_size=2, lr=1e-2, num_vectors=3)
    result = learn_mcti_token(pipe, None, {0: _images(0)}, 0, config, method="ti")
    assert result.embedding.shape == (3, 32) and result.metadata["num_vectors"] == "3"


# ---- builds: determinism and resume for each lever -----------------------------------------------------------------
LEVERS = {
    "prompts": {"generate.prompts": list(TEMPLATES)},
    "init-real": {"generate.init": "real", "generate.strength": [0.5, 1.0], "shots": 2},
    "num-vectors": {"dct.num_vectors": 2},
}


@pytest.mark.parametrize("lever", list(LEVERS))
def test_a_lever_build_is_deterministic_and_resumes_to_the_same_bytes(lever, tmp_path, world):
    from synthaug import build
    from synthaug.index import load_index, verify

    extra = {"classes": "0", "per_class": 2, "shards.samples_per_shard": 1, **LEVERS[lever]}
    first, second = tmp_path / "a", tmp_path / "b"
    build(bw.config(first, *world, **extra), progress=False)
    table = load_index(first)
    columns = {"prompts": ["prompt_index"], "init-real": ["init_index", "strength"], "num-vectors": []}[lever]
    assert [c for c in ("prompt_index", "init_index", "strength") if c in table.column_names] == columns
    assert all(v is not None for c in columns for v in table.column(c).to_pylist())
    assert verify(first) == []  # every check of `inspect --verify` holds with the lever's columns
    if lever == "num-vectors":
        assert load_tokens(first / "tokens" / "000.safetensors")["<synthaug-000>"].shape == (2, 32)
    # a copy that lost its token, a token shard, a baseline shard and its index: the resume learns and draws them
    # again from the same config and seeds, byte for byte
    shutil.copytree(first, second)
    (second / "tokens" / "000.safetensors").unlink()
    for shard in ("dct-00001", "sd-00021"):  # dct class 0 chunk 1; sd class 0 chunk 1
        (second / "meta" / f"_{shard}_stats.json").unlink()
        (second / "shards" / f"{shard}.tar").unlink()
    (second / "index.parquet").unlink()
    build(bw.config(second, *world, **extra), progress=False)
    assert bw.snapshot(second) == bw.snapshot(first)


def test_a_build_without_levers_has_the_columns_it_always_had(reference):
    from synthaug.index import load_index
    from synthaug.shards import index_schema

    assert load_index(reference).schema.names == index_schema().names
