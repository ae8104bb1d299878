"""Attribute tokens: DCT steered by one output of a multi-label (sigmoid) guide, with a binary cross-entropy.

What a user relies on: ``attribute:NAME[=0|1]`` pushes the named output's logit up (=1) or down (=0); "correct"
means the sigmoid probability of the wanted value is above 0.5, not the argmax; bad targets are refused in one line
before any model work, naming the valid attributes; the token file records the target; class tokens are unchanged.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from synthaug.classifier import Classifier
from synthaug.config import DCTConfig, load_config
from synthaug.errors import UserError
from synthaug.target import GuideTarget, parse_guide_target
from synthaug.tokens import learn_dct_token, save_token, token_metadata
from synthaug.tokens.io import load_tokens

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "A photo of {token}"


def _guide(bias=(0.0, 0.0), multi_label: bool = True, seed: int = 0) -> Classifier:
    """A small multi-label guide: a linear head on 8x8 images, outputs ``round`` and ``tall``."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    with torch.no_grad():
        net[1].weight.mul_(10.0)
        net[1].bias.copy_(torch.tensor(bias))
    data = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
            "crop_pct": 1.0}
    return Classifier(net, labels=["round", "tall"], data_config=data, source="test-attr", multi_label=multi_label)


def _config(**kw) -> DCTConfig:
    base = {"max_steps": 2, "batch_size": 2, "num_inference_steps": 2, "guidance_scale": 1.0, "height": 32,
            "width": 32, "prompts": (PROMPT,), "lr": 1e-3, "stop_all_correct": False, "patience": 0}
    return DCTConfig(**{**base, **kw})


def test_target_strings():
    assert parse_guide_target("attribute:closed_loop") == GuideTarget("closed_loop", 1)
    assert parse_guide_target(" attribute:closed_loop=0 ") == GuideTarget("closed_loop", 0)
    assert parse_guide_target(None).is_class and parse_guide_target("class").is_class
    t = parse_guide_target("attribute:closed loop=1")
    assert str(t) == "attribute:closed loop=1" and t.token == "<synthaug-closed_loop-1>"


@pytest.mark.parametrize("text, match", [
    ("attribute:closed_loop=2", r"an attribute is 0 or 1: pass 'attribute:closed_loop=1'"),
    ("attribute:", r"names no attribute"),
    ("color:red", r"must be 'class' \(the default\) or 'attribute:NAME\[=0\|1\]'"),
])
def test_bad_target_strings_are_one_line(text, match):
    with pytest.raises(UserError, match=match) as e:
        parse_guide_target(text)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"`guide_target`"):  # the config refuses it before anything loads
        load_config(overrides={"guide_target": text})


@pytest.mark.parametrize("value", [1, 0])
def test_the_gradient_moves_the_attribute_logit_towards_the_wanted_value(tiny_pipe, value):
    guide = _guide()
    result = learn_dct_token(tiny_pipe, guide, config=_config(max_steps=3, select="last"),
                             target=f"attribute:tall={value}")
    probs = [h["target_prob"] for h in result.history]  # sigmoid probability of the wanted value, same seeds
    assert probs[2] > probs[1] > probs[0], probs
    assert result.class_index == 1 and result.label == "" and result.token == f"<synthaug-tall-{value}>"
    losses = [h["loss"] for h in result.history]
    assert losses[2] < losses[0]


def test_correct_means_sigmoid_above_one_half_not_argmax(tiny_pipe):
    # "round" always present (logit +5), "tall" always larger (+12): the argmax would say "tall" for every image
    guide = _guide(bias=(5.0, 12.0))
    with torch.no_grad():
        guide.model[1].weight.zero_()
    done = learn_dct_token(tiny_pipe, guide, config=_config(max_steps=4, stop_all_correct=True),
                           target="attribute:round")
    assert done.stop_reason == "all_correct" and done.steps == 1
    assert done.history[0]["accuracy"] == 1.0 and done.history[0]["target_prob"] == pytest.approx(1 / (1 + np.exp(-5)))
    lacks = learn_dct_token(tiny_pipe, guide, config=_config(max_steps=2, stop_all_correct=True),
                            target="attribute:round=0")
    assert lacks.stop_reason == "max_steps" and [h["accuracy"] for h in lacks.history] == [0.0, 0.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "attribute:wide"}, (r"`target` names attribute 'wide', which `classifier` 'test-attr' does not "
                                    r"have: pass one of its outputs: round, tall\.")),
    ({"target": "attribute:tall", "class_index": 0}, r"`class_index` 0 disagrees with `target`"),
    ({"target": "attribute:tall", "config": _config(prompts=("A photo of {token} {label}",))},
     r"has a \{label\} placeholder, but attribute token 'attribute:tall=1' has no class label"),
    ({"class_index": 0, "label": "round"}, r"is multi-label .* pass target='attribute:NAME'"),
])
def test_bad_attribute_inputs_are_refused_in_one_line(tiny_pipe, kwargs, match):
    with pytest.raises(UserError, match=match) as e:
        learn_dct_token(tiny_pipe, _guide(), **{"config": _config(), **kwargs})
    assert "\n" not in str(e.value)


def test_an_attribute_target_on_a_single_label_guide_is_refused(tiny_pipe):
    with pytest.raises(UserError, match=r"needs a multi-label guide .* is single-label \(softmax over 2 classes\)"):
        learn_dct_token(tiny_pipe, _guide(multi_label=False), config=_config(), target="attribute:tall")


def test_learn_refuses_bad_targets_before_loading_models(tmp_path, monkeypatch):
    from synthaug import commands

    monkeypatch.setattr(commands, "load_diffusion", lambda *a, **k: pytest.fail("a model loaded before the check"))
    cfg = {"dct.prompts": [PROMPT], "generate.prompt": PROMPT}
    with pytest.raises(UserError, match=r"pass one of its outputs: closed_loop, straight_stroke\."):
        commands.learn_tokens(load_config(overrides={**cfg, "guide": "digits-attr-guide",
                                                     "guide_target": "attribute:open_loop"}), out=tmp_path)
    with pytest.raises(UserError, match=r"`guide` 'digits-guide' is single-label"):
        commands.learn_tokens(load_config(overrides={**cfg, "guide_target": "attribute:closed_loop"}), out=tmp_path)
    with pytest.raises(UserError, match=r"has a \{label\} placeholder"):
        commands.learn_tokens(load_config(overrides={"guide": "digits-attr-guide",
                                                     "guide_target": "attribute:closed_loop"}), out=tmp_path)


def test_the_cli_flag_reaches_the_config_and_errors_are_one_line(tmp_path, capsys):
    from synthaug.cli import main

    assert main(["learn", "--guide", "digits-attr-guide", "--guide-target", "attribute:closed_loop=2",
                 "--tokens-out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "an attribute is 0 or 1" in err


def test_the_token_file_records_the_target_and_loads_in_stock_diffusers(tiny_pipe, tmp_path):
    result = learn_dct_token(tiny_pipe, _guide(), config=_config(max_steps=1), target="attribute:round=0")
    path = tmp_path / "round.safetensors"
    save_token(result, path)
    meta = token_metadata(path)
    assert meta["target"] == "attribute:round=0" and meta["class_index"] == "0" and meta["token"] == "<synthaug-round-0>"
    assert list(load_tokens(path)) == ["<synthaug-round-0>"]


def test_class_tokens_are_unchanged(tiny_pipe, tmp_path):
    guide = _guide(multi_label=False)
    plain = learn_dct_token(tiny_pipe, guide, 1, "tall", _config())
    explicit = learn_dct_token(tiny_pipe, guide, 1, "tall", _config(), target="class")
    assert torch.equal(plain.embedding, explicit.embedding) and plain.history == explicit.history
    assert "target" not in plain.metadata
    save_token(plain, tmp_path / "001.safetensors")
    assert "target" not in token_metadata(tmp_path / "001.safetensors")
    # the history reads the softmax: accuracy is the argmax's, target_prob the class's softmax probability
    assert 0.0 <= plain.history[0]["target_prob"] <= 1.0


def test_the_embedded_attribute_guide_reads_real_digits():
    from synthaug.classifier import load_classifier
    from synthaug.datasets.digits import digits_arrays

    guide = load_classifier("digits-attr-guide", device="cpu")
    assert guide.multi_label and guide.labels == ["closed_loop", "straight_stroke"]
    assert not load_classifier("digits-guide", device="cpu").multi_label
    imgs, targets = digits_arrays("test")
    x = torch.from_numpy(imgs).float().div(255)[:, None].expand(-1, 3, -1, -1)
    probs = guide.predict(x)  # a multi-label classifier predicts each output's sigmoid, not a softmax
    assert not torch.allclose(probs.sum(-1), torch.ones(len(x)))
    has = (probs > 0.5).numpy()
    assert (has[:, 0] == np.isin(targets, (0, 6, 8, 9))).mean() > 0.95
    assert (has[:, 1] == np.isin(targets, (1, 4, 7))).mean() > 0.95


def test_the_world_script_declares_float32_in_fp16_saved_configs(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = importlib.util.spec_from_file_location("train_digits_world", ROOT / "scripts" / "train_digits_world.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64, max_position_embeddings=8))
    model.to(torch.float16).save_pretrained(tmp_path / "te")
    assert CLIPTextModel.from_pretrained(tmp_path / "te").dtype == torch.float16  # what ship() used to leave
    script.declare_float32(tmp_path)
    assert CLIPTextModel.from_pretrained(tmp_path / "te").dtype == torch.float32


def test_a_build_refuses_an_attribute_target(tmp_path):
    from synthaug import build

    cfg = load_config(overrides={"guide": "digits-attr-guide", "guide_target": "attribute:closed_loop",
                                 "out": str(tmp_path / "b"), "run.executor": "local"})
    with pytest.raises(UserError, match=r"a build learns a token per class: run `synthaug learn --guide-target"):
        build(cfg, progress=False)
    assert not (tmp_path / "b").exists()


def test_generate_takes_an_attribute_token_without_a_label(tiny_pipe):
    from synthaug.config import GenerateConfig
    from synthaug.generation import generate

    config = GenerateConfig(prompt=PROMPT, num_inference_steps=2, height=32, width=32, batch_size=2)
    plain = generate(tiny_pipe, class_index=0, label="", token=None, indices=range(2), config=config)
    assert [im.prompt for im in plain] == ["A photo of", "A photo of"]
    with pytest.raises(UserError, match=r"`label` must be a non-empty class name but is ''"):
        generate(tiny_pipe, class_index=0, label="", token=None, indices=range(1),
                 config=GenerateConfig(num_inference_steps=2, height=32, width=32))


def test_synthaug_generate_writes_an_attribute_tokens_images_and_the_plain_ones_on_the_same_seeds(
        tiny_pipe, tmp_path, monkeypatch):
    import copy
    import json

    from PIL import Image

    from synthaug import commands
    from synthaug.generation import generate

    path = tmp_path / "attribute-round-1.safetensors"
    save_token(learn_dct_token(tiny_pipe, _guide(), config=_config(max_steps=1), target="attribute:round=1"), path)
    sets = {"generate.num_inference_steps": 2, "generate.height": 32, "generate.width": 32,
            "generate.batch_size": 2, "per_class": 2, "baseline": True, "device": "cpu"}

    monkeypatch.setattr(commands, "load_diffusion", lambda *a, **k: pytest.fail("a model loaded before the check"))
    with pytest.raises(UserError, match=r"has a \{label\} placeholder"):  # the default prompt names the class
        commands.generate_to_folder(load_config(overrides=sets), tokens=str(path), dest=str(tmp_path / "x"))

    pipe = copy.deepcopy(tiny_pipe)
    monkeypatch.setattr(commands, "load_diffusion", lambda *a, **k: pipe)
    dest = tmp_path / "images"
    config = load_config(overrides={**sets, "generate.prompt": PROMPT, "guide_target": "attribute:round=1"})
    assert commands.generate_to_folder(config, tokens=str(path), dest=str(dest), progress=False) == 4
    rows = [json.loads(line) for line in (dest / "metadata.jsonl").read_text().splitlines()]
    assert [(r["key"], r["prompt"]) for r in rows] == [
        ("dct-round-1-s00000", "A photo of <synthaug-round-1>"), ("dct-round-1-s00001", "A photo of <synthaug-round-1>"),
        ("sd-round-1-s00000", "A photo of"), ("sd-round-1-s00001", "A photo of")]
    assert {r["target"] for r in rows} == {"attribute:round=1"}
    # the plain images are image_seed(generate.seed, 0, i): what reproduce_attributes pairs the token's images with
    again = generate(pipe, class_index=0, label="", token=None, indices=range(2), config=config.generate)
    for i, im in enumerate(again):
        assert np.array_equal(np.asarray(Image.open(dest / f"sd-round-1-s{i:05d}.png").convert("RGB")),
                              np.asarray(im.image))


def test_the_generate_command_takes_the_target_from_an_attribute_token_file(tiny_pipe, tmp_path, monkeypatch):
    from synthaug import commands
    from synthaug.cli import main

    path = tmp_path / "attribute-round-0.safetensors"
    save_token(learn_dct_token(tiny_pipe, _guide(), config=_config(max_steps=1), target="attribute:round=0"), path)
    seen = []
    monkeypatch.setattr(commands, "generate_to_folder", lambda config, **kw: seen.append(config) or 0)
    assert main(["generate", "--tokens", str(path), "--dest", str(tmp_path / "imgs"), "--baseline", "-n", "3",
                 "--set", f"generate.prompt={PROMPT}"]) == 0
    assert (seen[0].guide_target, seen[0].baseline, seen[0].per_class) == ("attribute:round=0", True, 3)
