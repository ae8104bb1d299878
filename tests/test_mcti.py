"""TI / MC-TI token learning and token classification on tiny random models (mechanics, not learning quality)."""

import copy
import json

import pytest
import torch
from PIL import Image

from synthaug.config import MCTIConfig
from synthaug.errors import UserError
from synthaug.evaluate.shots import evaluate_shots
from synthaug.evaluate.tables import format_table
from synthaug.tokens.clip import (
    CLASSIFY_TEMPLATE,
    ClipPreprocess,
    class_features,
    classify,
    image_features,
    load_clip,
    text_prototypes,
)
from synthaug.tokens.mcti import learn_mcti_token
from synthaug.tokens.text import token_name


def tiny_clip(seed: int = 0, text_hidden: int = 32, text_layers: int = 2):
    """A random CLIPModel whose text tower has the tiny pipeline's text encoder's shape (hidden 32, 2 layers)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"hidden_size": text_hidden, "intermediate_size": 37, "num_attention_heads": 4,
                     "num_hidden_layers": text_layers, "vocab_size": 49408, "max_position_embeddings": 77,
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return CLIPModel(cfg).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def world():
    """A tiny pipeline whose text encoder *is* the tiny CLIP's text tower (the pairing MC-TI assumes)."""
    from synthaug.testing import tiny_pipeline

    pipe = tiny_pipeline(seed=0)
    clip = tiny_clip()
    pipe.text_encoder.load_state_dict(clip.text_model.state_dict())
    return pipe, clip


def _images(k: int, n: int = 2, size: int = 32):
    """n distinct solid-ish images for class k."""
    g = torch.Generator().manual_seed(k)
    out = []
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 80 + 40 * k + 10 * i).clamp(0, 255).to(torch.uint8)
        out.append(Image.fromarray(arr.numpy()))
    return out


@pytest.fixture(scope="module")
def few_shot():
    return {k: _images(k) for k in range(3)}


def cfg(**kw):
    base = {"steps": 2, "extra_steps": 2, "batch_size": 2, "lr": 1e-2, "seed": 0}
    base.update(kw)
    return MCTIConfig(**base)


def _trace(pipe, clip, imgs, k, config, **kw):
    vecs = []
    res = learn_mcti_token(pipe, clip, imgs, k, config, callback=lambda s, v: vecs.append(v.cpu().clone()), **kw)
    return res, vecs


# --------------------------------------------------------------------------------------------------------------------
# Token-only training
# --------------------------------------------------------------------------------------------------------------------
def test_only_the_token_trains_and_the_pipeline_is_untouched(world, few_shot):
    pipe, clip = world
    before = {f"{m}.{n}": p.detach().clone() for m in ("text_encoder", "unet", "vae")
              for n, p in getattr(pipe, m).state_dict().items()}
    vocab = dict(pipe.tokenizer.get_vocab())

    res, vecs = _trace(pipe, clip, few_shot, 0, cfg(), method="mcti")

    after = {f"{m}.{n}": p for m in ("text_encoder", "unet", "vae") for n, p in getattr(pipe, m).state_dict().items()}
    assert after.keys() == before.keys()
    changed = [n for n, p in before.items() if not torch.equal(after[n], p)]
    assert changed == []  # every weight, every embedding row bit-identical
    assert pipe.tokenizer.get_vocab() == vocab  # the tokenizer learned S_k in a copy
    assert not any(p.requires_grad for m in (pipe.text_encoder, pipe.unet, pipe.vae) for p in m.parameters())
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("a", add_special_tokens=False).input_ids[0]]
    assert not torch.equal(vecs[0], init) and torch.equal(vecs[-1], res.embedding[0])  # ... while the token trained
    assert res.embedding.shape == (1, 32) and res.embedding.dtype == torch.float32
    assert res.warmup_embedding.shape == (1, 32)

    # Generating with it: add_tokens (on a copy of the text side) changes the token's own row and nothing else.
    from types import SimpleNamespace

    from synthaug.tokens.io import add_tokens

    gen = SimpleNamespace(tokenizer=copy.deepcopy(pipe.tokenizer), text_encoder=copy.deepcopy(pipe.text_encoder))
    add_tokens(gen, {res.token: res.embedding})
    w = gen.text_encoder.get_input_embeddings().weight
    tid = gen.tokenizer.convert_tokens_to_ids(res.token)
    assert tid == len(vocab) and torch.equal(w[tid], res.embedding[0])
    assert torch.equal(w[:tid], pipe.text_encoder.get_input_embeddings().weight)


def test_regularizer_gradient_reaches_the_token(world, few_shot):
    pipe, clip = world
    # alpha=0, no warm-up: the regularizer (Eq. 3-4) is the only loss, so any change of the token is its gradient.
    res, vecs = _trace(pipe, clip, few_shot, 1, cfg(steps=0, extra_steps=1, alpha=0.0, beta=1.0))
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer("a", add_special_tokens=False).input_ids[0]]
    assert res.history[0]["loss_mse"] is None and res.history[0]["loss_reg"] > 0
    assert not torch.equal(vecs[0], init.cpu())

    # and directly: the gradient of L_reg w.r.t. the spliced token is finite and non-zero
    from synthaug.tokens.clip import text_features
    from synthaug.tokens.text import splice_tokens, tokenize

    vec = torch.nn.Parameter(init.detach().clone())
    tok = copy.deepcopy(pipe.tokenizer)
    tok.add_tokens([token_name(1)])
    tid = tok.convert_tokens_to_ids(token_name(1))
    enc = tokenize(tok, [CLASSIFY_TEMPLATE.format(token=token_name(1))], torch.device("cpu"))
    with splice_tokens(pipe.text_encoder, {tid: vec}):
        g = text_features(clip, pipe.text_encoder, tok, enc)
    feats = class_features(clip, few_shot)
    logits = 10.0 * g @ torch.stack([feats[k][0] for k in range(3)]).T
    torch.nn.functional.cross_entropy(logits, torch.tensor([1])).backward()
    assert vec.grad is not None and torch.isfinite(vec.grad).all() and vec.grad.abs().sum() > 0


def test_mcti_with_beta_zero_is_ti_step_for_step(world, few_shot):
    pipe, clip = world
    ti, ti_vecs = _trace(pipe, clip, few_shot, 2, cfg(steps=3, extra_steps=0), method="ti")
    mc, mc_vecs = _trace(pipe, clip, few_shot, 2, cfg(steps=1, extra_steps=2, beta=0.0), method="mcti")
    assert len(ti_vecs) == len(mc_vecs) == 3
    for a, b in zip(ti_vecs, mc_vecs):
        assert torch.equal(a, b)
    assert [h["loss_mse"] for h in ti.history] == [h["loss_mse"] for h in mc.history]
    assert torch.equal(ti.embedding, mc.embedding)
    assert mc.history[-1]["loss_reg"] is not None  # still logged


def test_warmup_switches_at_the_configured_step(world, few_shot):
    pipe, clip = world
    _, ti_vecs = _trace(pipe, clip, few_shot, 0, cfg(steps=3, extra_steps=0), method="ti")
    mc, mc_vecs = _trace(pipe, clip, few_shot, 0, cfg(steps=2, extra_steps=2, beta=1.0), method="mcti")
    assert [h["phase"] for h in mc.history] == ["ti"] * 2 + ["mcti"] * 2
    assert [h["loss_reg"] is None for h in mc.history] == [True] * 2 + [False] * 2
    for i in range(2):  # the warm-up is plain TI ...
        assert torch.equal(ti_vecs[i], mc_vecs[i])
    assert not torch.equal(ti_vecs[2], mc_vecs[2])  # ... and the regularizer acts from update 2 on
    assert torch.equal(mc.warmup_embedding[0], ti_vecs[1])  # the TI token is kept
    assert mc.metadata["ti_steps"] == "2" and mc.metadata["mcti_steps"] == "2" and mc.steps == 4
    ti_only = learn_mcti_token(pipe, clip, few_shot, 0, cfg(steps=1, extra_steps=7), method="ti")
    assert ti_only.steps == 1 and {h["phase"] for h in ti_only.history} == {"ti"}  # TI ignores extra_steps
    assert ti_only.warmup_embedding is None


def test_a_class_job_needs_only_its_own_images_given_features(world, few_shot):
    pipe, clip = world
    feats = class_features(clip, few_shot)  # once, for every class job
    full = learn_mcti_token(pipe, clip, few_shot, 1, cfg(steps=1, extra_steps=1))
    job = learn_mcti_token(pipe, clip, {1: few_shot[1]}, 1, cfg(steps=1, extra_steps=1), features=feats)
    assert torch.equal(full.embedding, job.embedding) and job.metadata["num_classes"] == "3"
    with pytest.raises(UserError, match=r"`features` has no entry for `class_index` 1"):
        learn_mcti_token(pipe, clip, {1: few_shot[1]}, 1, cfg(), features={0: feats[0], 2: feats[2]})


def test_same_config_same_token_bytes(world, few_shot, tmp_path):
    pipe, clip = world
    a = learn_mcti_token(pipe, clip, few_shot, 1, cfg(steps=1, extra_steps=1), label="one")
    b = learn_mcti_token(pipe, clip, few_shot, 1, cfg(steps=1, extra_steps=1), label="one")
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    c = learn_mcti_token(pipe, clip, few_shot, 1, cfg(steps=1, extra_steps=1, seed=1), label="one")
    assert not torch.equal(a.embedding, c.embedding)


def test_token_file_is_diffusers_textual_inversion_format(world, few_shot, tmp_path):
    from safetensors import safe_open

    from synthaug.testing import tiny_pipeline

    pipe, clip = world
    res = learn_mcti_token(pipe, clip, few_shot, 2, cfg(), label="two")
    path = tmp_path / "002.safetensors"
    res.save(path)
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == [res.token]
        t = f.get_tensor(res.token)
        meta = f.metadata()
    assert t.shape == (1, 32) and t.dtype == torch.float32 and torch.equal(t, res.embedding)
    assert meta["method"] == "mcti" and meta["label"] == "two" and meta["class_index"] == "2"
    assert meta["format"] == "diffusers-textual-inversion"
    from synthaug.tokens.io import load_tokens

    assert list(load_tokens(path)) == [res.token] and torch.equal(load_tokens(path)[res.token], res.embedding)
    assert all(isinstance(v, str) for v in meta.values())
    fresh = tiny_pipeline(seed=0)
    fresh.load_textual_inversion(str(path))  # the stock diffusers loader takes it
    tid = fresh.tokenizer.convert_tokens_to_ids(res.token)
    assert torch.equal(fresh.text_encoder.get_input_embeddings().weight[tid], res.embedding[0])


# --------------------------------------------------------------------------------------------------------------------
# Classification (Eq. 6)
# --------------------------------------------------------------------------------------------------------------------
def test_classify_shapes_and_probabilities(world, few_shot):
    pipe, clip = world
    tokens = {token_name(k): torch.randn(1, 32, generator=torch.Generator().manual_seed(k)) for k in range(3)}
    images = few_shot[0] + few_shot[1]
    n_vocab = len(pipe.tokenizer)
    probs = classify(clip, tokens, images, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    assert probs.shape == (4, 3) and probs.dtype == torch.float32
    assert (probs >= 0).all() and torch.allclose(probs.sum(-1), torch.ones(4), atol=1e-6)
    sharp = classify(clip, tokens, images, scale=100.0, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    assert torch.equal(sharp.argmax(-1), probs.argmax(-1))  # s changes confidence, never the decision
    assert len(pipe.tokenizer) == n_vocab  # classification adds tokens to a copy only
    # tokens unknown to the tokenizer, CLIP's own text tower, float tensor images: same contract
    fresh = {"<never-seen-a>": torch.randn(32), "<never-seen-b>": torch.randn(32)}
    x = torch.rand(3, 3, 40, 48)
    p2 = classify(clip, fresh, x)
    assert p2.shape == (3, 2) and torch.allclose(p2.sum(-1), torch.ones(3), atol=1e-6)


def test_token_features_match_clip_text_features_for_a_real_word(world):
    """Splicing a word's own embedding as a token gives CLIP's own text feature (pooling + projection are right)."""
    pipe, clip = world
    tok = pipe.tokenizer
    cat_id = tok("cat", add_special_tokens=False).input_ids[0]
    cat = clip.text_model.get_input_embeddings().weight[cat_id]
    ours = text_prototypes(clip, {"<cat-token>": cat})
    ids = tok(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = clip.get_text_features(input_ids=ids)
    ref = getattr(out, "pooler_output", out)
    assert torch.allclose(ours, torch.nn.functional.normalize(ref, dim=-1), atol=1e-5)


def test_image_features_normalised_and_preprocessing_from_config(world, few_shot):
    _, clip = world
    f = image_features(clip, few_shot[0])
    assert f.shape == (2, 16) and torch.allclose(f.norm(dim=-1), torch.ones(2), atol=1e-5)
    pre = ClipPreprocess.from_clip(clip)
    assert pre.size == 32 and pre.crop == (32, 32)
    x = pre([Image.new("RGB", (64, 40), (255, 0, 0))])
    assert x.shape == (1, 3, 32, 32)


# --------------------------------------------------------------------------------------------------------------------
# Loading CLIP
# --------------------------------------------------------------------------------------------------------------------
def test_load_clip_from_a_local_directory(world, tmp_path):
    pipe, clip = world
    clip.save_pretrained(tmp_path / "clip")
    (tmp_path / "clip" / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3}))
    from synthaug.models import clip_tokenizer

    clip_tokenizer().save_pretrained(tmp_path / "clip")
    loaded = load_clip(str(tmp_path / "clip"), pipe)
    assert loaded.synthaug_preprocess == ClipPreprocess(36, (32, 32), (0.5,) * 3, (0.5,) * 3, resample=3)
    assert loaded.synthaug_tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(loaded.text_projection.weight, clip.text_projection.weight)


def test_load_clip_errors(world, tmp_path, monkeypatch):
    pipe, _ = world
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"`mcti.clip_model` 'nobody/no-such-clip' could not be loaded.*download"):
        load_clip("nobody/no-such-clip")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"local path without config.json"):
        load_clip(str(tmp_path / "empty"))
    monkeypatch.setattr("synthaug.tokens.clip.DIGITS_CLIP", tmp_path / "absent")
    with pytest.raises(UserError, match=r"embedded digits CLIP.*train_digits_world"):
        load_clip(None)
    wide = tiny_clip(text_hidden=48)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(UserError, match=r"does not pair.*48-d.*32-d"):
        load_clip(str(tmp_path / "wide"), pipe)
    # SD 2.x: as wide as the encoder, one layer deeper (the encoder is the tower cut to its penultimate layer)
    deep = tiny_clip(text_layers=3)
    deep.save_pretrained(tmp_path / "deep")
    with pytest.raises(UserError, match=r"does not pair.*text tower has 3 layers but the pipeline's text encoder has "
                                        r"2.*method 'ti'"):
        load_clip(str(tmp_path / "deep"), pipe)


# --------------------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------------------
def test_bad_input_is_a_user_error(world, few_shot):
    pipe, clip = world
    with pytest.raises(UserError, match=r"`method` must be one of ti, mcti but is 'dct'"):
        learn_mcti_token(pipe, clip, few_shot, 0, cfg(), method="dct")
    with pytest.raises(UserError, match=r"`class_index` 7 has no few-shot images"):
        learn_mcti_token(pipe, clip, few_shot, 7, cfg())
    with pytest.raises(UserError, match=r"needs at least 2 classes"):
        learn_mcti_token(pipe, clip, {0: few_shot[0]}, 0, cfg())
    with pytest.raises(UserError, match=r"`clip` is None"):
        learn_mcti_token(pipe, None, few_shot, 0, cfg())
    with pytest.raises(UserError, match=r"Token 'cat' is already a word of the tokenizer's vocabulary"):
        learn_mcti_token(pipe, clip, few_shot, 0, cfg(), token="cat")
    with pytest.raises(UserError, match=r"`mcti.init_token` 'red panda' must be a single token"):
        learn_mcti_token(pipe, clip, few_shot, 0, cfg(init_token="red panda"))
    with pytest.raises(UserError, match=r"`mcti.steps` \(0\) \+ `mcti.extra_steps` \(0\) is 0"):
        learn_mcti_token(pipe, clip, few_shot, 0, cfg(steps=0, extra_steps=0))
    with pytest.raises(UserError, match=r"`mcti.alpha` and `mcti.beta` are both 0"):
        learn_mcti_token(pipe, clip, few_shot, 0, cfg(alpha=0.0, beta=0.0))
    with pytest.raises(UserError, match=r"`mcti.lr` must be a positive number but is 0.0"):
        learn_mcti_token(pipe, clip, few_shot, 0, cfg(lr=0.0))
    with pytest.raises(UserError, match=r"`tokens` entry '<t>' has 8 values but the text encoder embeds in 32"):
        classify(clip, {"<t>": torch.zeros(8)}, few_shot[0])
    with pytest.raises(UserError, match=r"`tokens` is empty"):
        classify(clip, {}, few_shot[0])
    with pytest.raises(UserError, match=r"`scale` must be > 0"):
        classify(clip, {"<t>": torch.zeros(32)}, few_shot[0], scale=0)


# --------------------------------------------------------------------------------------------------------------------
# N-shot evaluation
# --------------------------------------------------------------------------------------------------------------------
class _TinySet:
    """torchvision-style: `targets` and (image, target) items."""

    def __init__(self, n_per_class: int, offset: int = 0):
        self.targets = [k for k in range(3) for _ in range(n_per_class)]
        self.items = [(_images(k, n_per_class + offset)[offset + i], k) for k in range(3) for i in range(n_per_class)]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.items[i]


def test_evaluate_shots_table(world):
    pipe, clip = world
    train, test = _TinySet(3), _TinySet(2, offset=3)
    rows = evaluate_shots(pipe, clip, train, test, shots=(1, 2), seeds=(0,), config=cfg(steps=1, extra_steps=1))
    assert len(rows) == 2 * 3
    assert {(r["method"], r["shots"], r["seed"]) for r in rows} == {
        (m, n, 0) for m in ("prototype", "ti", "mcti") for n in (1, 2)}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["n_test"] == 6 for r in rows)
    # the TI row is MC-TI's warm-up token: a standalone TI run with the same config gives the same accuracy
    ti_rows = evaluate_shots(pipe, clip, train, test, shots=(1, 2), seeds=(0,), methods=("ti",),
                             config=cfg(steps=1, extra_steps=1))
    assert [r["accuracy"] for r in ti_rows] == [r["accuracy"] for r in rows if r["method"] == "ti"]
    table = format_table(rows, markdown=True)
    assert table.splitlines()[0] == "| method | 1-shot | 2-shot |"
    assert [line.split(" |")[0] for line in table.splitlines()[2:]] == ["| prototype", "| ti", "| mcti"]
    with pytest.raises(UserError, match=r"`methods` must be among prototype, ti, mcti but include \['dct'\]"):
        evaluate_shots(pipe, clip, train, test, methods=("dct",))
    stranger = _TinySet(1)
    stranger.items[0] = (stranger.items[0][0], 5)
    with pytest.raises(UserError, match=r"`test` has classes \[5\] that `train` lacks"):
        evaluate_shots(pipe, clip, train, stranger, methods=("prototype",))


def test_format_table_mean_and_std_over_seeds():
    rows = [{"method": "mcti", "shots": 5, "seed": s, "accuracy": a} for s, a in enumerate((0.5, 0.7))]
    rows.append({"method": "ti", "shots": 1, "seed": 0, "accuracy": 0.25})
    assert format_table(rows, markdown=True).splitlines() == [
        "| method | 1-shot | 5-shot |", "| --- | --- | --- |", "| mcti |  | 60.0 ± 14.1 |", "| ti | 25.0 |  |"]
