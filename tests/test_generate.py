"""Generation: seeds, prompts, reproducible bytes, the baseline on identical seeds, per-sample metadata."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from synthaug.config import GenerateConfig
from synthaug.errors import UserError
from synthaug.generation import GeneratedImage, generate, image_seed
from synthaug.testing import tiny_pipeline
from synthaug.tokens.io import add_tokens
from synthaug.tokens.text import embedding_sha256, render_prompt

SIZE = 16
TOKEN = "<synthaug-003>"


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(seed=0)
    # A large random embedding, so the token visibly changes even a random tiny model's output.
    add_tokens(p, {TOKEN: 50 * torch.randn(1, 32, generator=torch.Generator().manual_seed(0))})
    return p


class Guide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 7))
        self.labels, self.source, self.trained_on = [str(i) for i in range(7)], "test-guide", "nothing"
        self.requires_grad_(False).eval()

    def forward(self, images):
        return self.net(images) * 10.0


def gen_config(**kw) -> GenerateConfig:
    base = {"num_inference_steps": 3, "height": SIZE, "width": SIZE, "batch_size": 2}
    base.update(kw)
    return GenerateConfig(**base)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_image_seed_is_stable_across_processes():
    # Pinned values: a seed must never change between versions, machines or processes (resume relies on it).
    assert image_seed(0, 0, 0) == 7549311139609492502
    assert image_seed(0, 3, 7) == 3933939065013193192
    code = "from synthaug.generation import image_seed; print(image_seed(1, 3, 7))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == image_seed(1, 3, 7) == 4504089984516691759
    seeds = {image_seed(0, c, i) for c in range(10) for i in range(100)}
    assert len(seeds) == 1000 and all(0 <= s < 2**63 for s in seeds)


def test_render_prompt():
    assert render_prompt("A photo of {token} {label}", "three", TOKEN) == f"A photo of {TOKEN} three"
    assert render_prompt("A photo of {token} {label}", "three", None) == "A photo of three"
    assert render_prompt("  {label} by {token}  ", "a {weird} name", None) == "a {weird} name by"
    with pytest.raises(UserError, match=r"has no \{token\} placeholder"):
        render_prompt("A photo of {label}", "three", TOKEN)


def test_same_seeds_same_bytes(pipe):
    a = generate(pipe, class_index=3, label="three", token=TOKEN, indices=[0, 1, 2], config=gen_config())
    b = generate(pipe, class_index=3, label="three", token=TOKEN, indices=[0, 1, 2], config=gen_config())
    assert [png(x.image) for x in a] == [png(y.image) for y in b]
    assert len({png(x.image) for x in a}) == 3  # different indices, different images
    other = generate(pipe, class_index=4, label="three", token=TOKEN, indices=[0], config=gen_config())
    assert png(other[0].image) != png(a[0].image)  # the class is part of the seed


def test_baseline_shares_seeds_with_token_images(pipe):
    dct = generate(pipe, class_index=3, label="three", token=TOKEN, indices=[5, 6], config=gen_config())
    sd = generate(pipe, class_index=3, label="three", token=None, indices=[5, 6], config=gen_config())
    assert [x.seed for x in dct] == [y.seed for y in sd] == [image_seed(0, 3, 5), image_seed(0, 3, 6)]
    assert [x.method for x in dct] == ["dct", "dct"] and [y.method for y in sd] == ["sd", "sd"]
    assert dct[0].prompt == f"A photo of {TOKEN} three" and sd[0].prompt == "A photo of three"
    assert sd[0].token_sha256 is None
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert dct[0].token_sha256 == embedding_sha256(weight[pipe.tokenizer.convert_tokens_to_ids(TOKEN)])
    assert png(dct[0].image) != png(sd[0].image)  # only the token differs
    mcti = generate(pipe, class_index=3, label="three", token=TOKEN, indices=[5], config=gen_config(), method="mcti")
    assert mcti[0].method == "mcti" and png(mcti[0].image) == png(dct[0].image)


def test_batch_size_does_not_change_images(pipe):
    one = generate(pipe, class_index=2, label="two", token=TOKEN, indices=[0, 1, 2], config=gen_config(batch_size=1))
    three = generate(pipe, class_index=2, label="two", token=TOKEN, indices=[0, 1, 2], config=gen_config(batch_size=3))
    two = generate(pipe, class_index=2, label="two", token=TOKEN, indices=[2, 0, 1], config=gen_config(batch_size=2))
    for x, y in zip(one, three):
        a, b = np.asarray(x.image, dtype=int), np.asarray(y.image, dtype=int)
        assert np.abs(a - b).max() <= 1  # batched float kernels may round a pixel differently, never more
    assert [z.index for z in two] == [2, 0, 1]  # results follow the order of `indices`
    assert np.abs(np.asarray(two[0].image, dtype=int) - np.asarray(one[2].image, dtype=int)).max() <= 1


def test_metadata_and_guide_scores(pipe):
    guide = Guide()
    images = generate(pipe, class_index=3, label="three", token=TOKEN, indices=[0, 1], config=gen_config(seed=7),
                      classifier=guide)
    x = images[0]
    assert isinstance(x, GeneratedImage)
    assert (x.class_index, x.class_name, x.index, x.seed) == (3, "three", 0, image_seed(7, 3, 0))
    assert (x.model_id, x.scheduler, x.steps, x.guidance_scale, x.height, x.width) == (
        "tiny-0", "DDIMScheduler", 3, 7.0, SIZE, SIZE)
    assert x.image.size == (SIZE, SIZE) and x.image.mode == "RGB"
    # the guide scores the 8-bit pixels that will be saved
    pixels = torch.from_numpy(np.asarray(x.image)).permute(2, 0, 1)[None].float() / 255
    probs = guide(pixels).softmax(-1)[0]
    assert x.guide_prob == pytest.approx(probs[3].item(), rel=1e-5)
    assert x.guide_top5 == probs.topk(5).indices.tolist()
    # the soft label: the top soft_top_k classes, then the target when the guide did not rank it among them
    assert x.guide_soft_classes[:5] == probs.topk(5).indices.tolist()
    assert x.guide_soft_probs == pytest.approx(probs[x.guide_soft_classes].tolist(), rel=1e-5)
    assert len(x.guide_soft_classes) == 5 + (3 not in probs.topk(5).indices.tolist())
    two = generate(pipe, class_index=3, label="three", token=TOKEN, indices=[0], classifier=guide,
                   config=gen_config(seed=7, soft_top_k=2))[0]
    top2 = probs.topk(2).indices.tolist()
    assert two.guide_soft_classes == (top2 if 3 in top2 else [*top2, 3])
    assert two.guide_soft_probs == pytest.approx(probs[two.guide_soft_classes].tolist(), rel=1e-5)
    plain = generate(pipe, class_index=3, label="three", token=TOKEN, indices=[0], config=gen_config(seed=7))
    assert plain[0].guide_prob is None and plain[0].guide_top5 is None and plain[0].guide_soft_probs is None
    assert png(plain[0].image) == png(x.image)


def test_progress_bar(pipe, capsys):
    generate(pipe, class_index=3, label="three", token=None, indices=[0], config=gen_config(), progress=True)
    assert "generate sd three" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"token": "<synthaug-999>"}, r"`token` '<synthaug-999>' is not in the pipeline's tokenizer: add it first"),
        ({"indices": []}, r"`indices` is empty"),
        ({"indices": [0, -1]}, r"`indices` must be non-negative integers but contains -1"),
        ({"label": ""}, r"`label` must be a non-empty class name"),
        ({"config": gen_config(height=20)}, r"divisible by 8 but are 20 and 16"),
    ],
)
def test_bad_input(pipe, kwargs, match):
    args = {"class_index": 3, "label": "three", "token": TOKEN, "indices": [0], "config": gen_config()}
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        generate(pipe, **args)


# --------------------------------------------------------------------------------------------------------------------
# generate.keep_confidence: a build of images that pass the guide, deterministic and resumable
# --------------------------------------------------------------------------------------------------------------------
def _kept_build(out, world, **extra):
    import buildworld as bw

    return bw.config(out, *world, **{"generate.keep_confidence": 0.1, "classes": "0-1", **extra})


def test_keep_confidence_keeps_per_class_images_that_pass_the_guide_and_resumes_to_the_same_bytes(tmp_path, world):
    import buildworld as bw

    from synthaug.builder import build
    from synthaug.commands import inspect
    from synthaug.index import load_index

    out = tmp_path / "kept"
    assert build(_kept_build(out, world), progress=False).ok
    rows = load_index(out).to_pylist()
    for c in (0, 1):
        for m in ("dct", "sd"):
            mine = sorted(r["index"] for r in rows if r["class_index"] == c and r["method"] == m)
            assert len(mine) == 4 and len(set(mine)) == 4  # per_class images, distinct seeds
    assert all(r["guide_prob"] >= 0.1 for r in rows)
    assert max(r["index"] for r in rows) >= 4  # some seeds were dropped (a random guide: ~half pass)
    summary = inspect(out).summary()
    assert "generations per kept image" in summary
    first = bw.snapshot(out)
    # lose the second shard of a class (its start seed comes from the first shard on disk) and the first of another
    stats = sorted((out / "meta").glob("*_stats.json"))
    for p in (stats[1], stats[2]):
        p.unlink()
    assert build(_kept_build(out, world), progress=False).ok
    assert bw.snapshot(out) == first


def test_keep_confidence_past_max_attempts_keeps_the_rest_with_a_warning(tmp_path, world, caplog):
    from synthaug.builder import build
    from synthaug.index import load_index

    out = tmp_path / "short"
    with caplog.at_level("WARNING"):
        assert build(_kept_build(out, world, classes="0", baseline=False, **{"generate.keep_confidence": 0.99,
                                                                            "generate.max_attempts": 3}),
                     progress=False).ok
    rows = load_index(out).to_pylist()
    assert sorted(r["index"] for r in rows) == [3, 4, 5, 6]  # nothing passes 0.99: the first seeds past the limit
    assert "kept below generate.keep_confidence 0.99 after 3 seeds" in caplog.text


def test_keep_confidence_must_be_a_probability():
    from synthaug.config import BuildConfig, GenerateConfig, validate

    with pytest.raises(UserError, match=r"`generate.keep_confidence` must be in \[0, 1\)"):
        validate(BuildConfig(generate=GenerateConfig(keep_confidence=1.0)))


def test_keep_confidence_keeps_the_images_a_filtered_training_row_takes_from_an_unfiltered_build(tmp_path, world):
    from synthaug.builder import build
    from synthaug.index import load_index

    assert build(_kept_build(tmp_path / "all", world, **{"generate.keep_confidence": None, "per_class": 8}),
                 progress=False).ok
    assert build(_kept_build(tmp_path / "kept", world, per_class=2), progress=False).ok
    everything = load_index(tmp_path / "all").to_pylist()
    for c in (0, 1):
        for m in ("dct", "sd"):
            passing = sorted((r["index"], r["sha256"]) for r in everything if r["class_index"] == c
                             and r["method"] == m and r["guide_prob"] >= 0.1)[:2]
            kept = sorted((r["index"], r["sha256"]) for r in load_index(tmp_path / "kept").to_pylist()
                          if r["class_index"] == c and r["method"] == m)
            assert kept == passing


def test_scheduler_config_is_strict_json_that_rebuilds_the_scheduler():
    """DPM-Solver's default ``lambda_min_clipped`` is -inf, which diffusers writes as ``-Infinity`` (not JSON)."""
    import json

    from diffusers import DPMSolverMultistepScheduler

    from synthaug.generation import scheduler_config_json

    def refuse(name):
        raise ValueError(name)

    text = scheduler_config_json(DPMSolverMultistepScheduler())
    again = DPMSolverMultistepScheduler.from_config(json.loads(text, parse_constant=refuse))
    assert again.config.lambda_min_clipped == float("-inf")  # left out: from_config gives the default back
    settings = {k: v for k, v in dict(DPMSolverMultistepScheduler().config).items() if not k.startswith("_")}
    assert {k: again.config[k] for k in settings} == settings
    odd = json.loads(scheduler_config_json(DPMSolverMultistepScheduler(lambda_min_clipped=float("inf"))),
                     parse_constant=refuse)
    assert odd["lambda_min_clipped"] == "Infinity" and float(odd["lambda_min_clipped"]) == float("inf")
