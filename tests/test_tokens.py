"""DCT token learning mechanics on random tiny models (random weights ignore the text, so a token cannot learn
there), and token files.

Every behaviour here is one a user relies on: only v_c changes, gradients flow through the last `grad_steps`
denoising steps only, any scheduler works, training reproduces inference, stopping and selection follow the paper
and the config, token files load in stock diffusers and give the same images as synthaug's own generation.
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from torch import nn

from synthaug.config import DCTConfig, GenerateConfig
from synthaug.errors import UserError
from synthaug.generation import generate
from synthaug.models import set_scheduler
from synthaug.testing import tiny_pipeline
from synthaug.tokens.augment import augment, clamp01
from synthaug.tokens.dct import dct_seed, learn_dct_token
from synthaug.tokens.io import add_tokens, load_tokens, save_token, save_tokens, token_metadata
from synthaug.tokens.text import embedding_sha256, token_name

SIZE = 16  # tiny pipeline, 8x8 latents: the fastest size that still runs the real code path


@pytest.fixture(scope="module")
def own_pipe():
    """A tiny pipeline this module may mutate (schedulers, added tokens) without touching the shared fixture."""
    return tiny_pipeline(seed=0)


class Guide(nn.Module):
    """A small frozen conv classifier with the synthaug classifier attributes."""

    def __init__(self, num_classes: int = 10, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, num_classes))
        self.labels = [f"class {i}" for i in range(num_classes)]
        self.source = "test-guide"
        self.trained_on = "nothing (random weights)"
        self.requires_grad_(False).eval()

    def forward(self, images):
        return self.net(images) * 10.0


class Rigged(nn.Module):
    """Fixed logits per batch position, independent of the image (zero gradient): makes the loss constant."""

    def __init__(self, correct: list[bool], class_index: int = 3, num_classes: int = 10):
        super().__init__()
        logits = torch.zeros(len(correct), num_classes)
        for b, ok in enumerate(correct):
            logits[b, class_index if ok else (class_index + 1) % num_classes] = 5.0
        self.register_buffer("logits", logits)
        self.labels = [str(i) for i in range(num_classes)]
        self.source, self.trained_on = "rigged", "nothing"

    def forward(self, images):
        return self.logits[: images.shape[0]] + 0.0 * images.sum()


def cfg(**kw) -> DCTConfig:
    base = {"max_steps": 3, "batch_size": 2, "num_inference_steps": 3, "height": SIZE, "width": SIZE,
            "stop_all_correct": False, "patience": 0, "lr": 0.05}
    base.update(kw)
    return DCTConfig(**base)


def init_row(pipe, word: str = "a") -> torch.Tensor:
    ids = pipe.tokenizer.encode(word, add_special_tokens=False)
    return pipe.text_encoder.get_input_embeddings().weight[ids[0]].detach().float().reshape(1, -1).clone()


def state(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for name in ("unet", "vae", "text_encoder"):
        for k, v in getattr(pipe, name).state_dict().items():
            out[f"{name}.{k}"] = v.detach().clone()
    return out


# --------------------------------------------------------------------------------------------------------------------
# Learning
# --------------------------------------------------------------------------------------------------------------------
def test_token_name():
    assert token_name(0) == "<synthaug-000>"
    assert token_name(123) == "<synthaug-123>"
    with pytest.raises(UserError, match="class_index"):
        token_name(-1)


def test_only_v_c_changes_and_pipe_is_left_clean(tiny_pipe):
    guide = Guide()
    before, guide_before = state(tiny_pipe), {k: v.clone() for k, v in guide.state_dict().items()}
    vocab = len(tiny_pipe.tokenizer)
    flags = [(m.training, [p.requires_grad for p in m.parameters()]) for m in (tiny_pipe.unet, guide)]

    result = learn_dct_token(tiny_pipe, guide, 3, "three", cfg(select="last"))

    after = state(tiny_pipe)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "a model weight or embedding row changed"
    assert all(torch.equal(v, guide.state_dict()[k]) for k, v in guide_before.items())
    assert len(tiny_pipe.tokenizer) == vocab and "<synthaug-003>" not in tiny_pipe.tokenizer.get_vocab()
    assert [(m.training, [p.requires_grad for p in m.parameters()]) for m in (tiny_pipe.unet, guide)] == flags
    assert all(h["updated"] for h in result.history[:-1])
    # v_c moved away from its initialisation ("a") and comes back as [1, dim] fp32 on the CPU
    assert not torch.equal(result.embedding, init_row(tiny_pipe, "a"))
    assert result.embedding.shape == (1, tiny_pipe.text_encoder.config.hidden_size)
    assert result.embedding.dtype == torch.float32 and result.embedding.device.type == "cpu"
    assert result.token == "<synthaug-003>" and result.class_index == 3 and result.label == "three"
    assert result.metadata["guide"] == "test-guide" and result.metadata["model_id"] == "tiny-0"
    assert result.metadata["guide_trained_on"] == "nothing (random weights)"


def test_init_from_init_token(tiny_pipe):
    # max_steps=1: measured once, never updated, so the kept token is exactly the initialisation
    result = learn_dct_token(tiny_pipe, Guide(), 1, "one", cfg(max_steps=1, init_token="bird"))
    assert torch.equal(result.embedding, init_row(tiny_pipe, "bird"))
    assert result.steps == 1 and result.stop_reason == "max_steps" and result.best_step == 0
    assert result.updates == 0  # one measurement, and no update after the last one


@pytest.mark.parametrize("grad_steps", [1, 2, 4])
def test_gradient_flows_through_last_grad_steps_only(tiny_pipe, grad_steps):
    calls = []
    handle = tiny_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    try:
        result = learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=2, num_inference_steps=4,
                                                                      grad_steps=grad_steps))
    finally:
        handle.remove()
    per_iteration = [False] * (4 - grad_steps) + [True] * grad_steps
    assert calls == per_iteration * 2  # earlier steps under no_grad: no graph is built for them
    assert result.unet_evals == 8


def test_cfg_batch_and_max_length_padding(tiny_pipe):
    unet_batches, text_shapes = [], []
    h1 = tiny_pipe.unet.register_forward_pre_hook(lambda m, a: unet_batches.append(a[0].shape[0]))
    h2 = tiny_pipe.text_encoder.register_forward_pre_hook(
        lambda m, a, kw: text_shapes.append(tuple((a[0] if a else kw["input_ids"]).shape)), with_kwargs=True)
    try:
        learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=1, batch_size=3))
        assert set(unet_batches) == {6}  # uncond + cond
        unet_batches.clear()
        learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=1, batch_size=3, guidance_scale=1.0))
        assert set(unet_batches) == {3}  # guidance 1: no CFG, as in diffusers
    finally:
        h1.remove()
        h2.remove()
    # the unconditional prompt, then the paper's 2 prompts at once; every one padded to the max length
    assert set(text_shapes) == {(1, tiny_pipe.tokenizer.model_max_length), (2, tiny_pipe.tokenizer.model_max_length)}


def test_saved_activations_gradient_skipping_vs_full_backprop(tiny_pipe):
    """Gradient skipping holds one step's activations; full backprop holds T; checkpointing shrinks full backprop."""
    params = {p.data_ptr() for m in (tiny_pipe.unet, tiny_pipe.vae, tiny_pipe.text_encoder) for p in m.parameters()}

    def saved_bytes(checkpointing=False, **kw) -> tuple[int, list[float]]:
        seen: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            r = learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=2, num_inference_steps=6, **kw),
                                checkpointing=checkpointing)
        return sum(seen.values()), [h["loss"] for h in r.history]

    one, losses_one = saved_bytes(grad_steps=1)
    full, losses_full = saved_bytes(grad_steps=6)
    ckpt, losses_ckpt = saved_bytes(grad_steps=6, checkpointing=True)
    assert one < 0.5 * full, (one, full)
    assert ckpt < 0.5 * full, (ckpt, full)
    assert losses_one[0] == losses_full[0]  # same forward; only the graph differs
    assert losses_ckpt == pytest.approx(losses_full, rel=1e-5)  # checkpointing changes memory, not the maths


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "dpmsolver++"])
def test_any_scheduler(own_pipe, scheduler):
    original = own_pipe.scheduler
    set_scheduler(own_pipe, scheduler)
    name = type(own_pipe.scheduler).__name__
    try:
        result = learn_dct_token(own_pipe, Guide(), 3, "three", cfg(max_steps=3, num_inference_steps=4))
    finally:
        own_pipe.scheduler = original
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert [h["updated"] for h in result.history] == [True, True, False]
    assert all(h["grad_norm"] is not None and h["grad_norm"] > 0 for h in result.history[:2])
    assert result.metadata["scheduler"] == name


def test_deterministic_on_cpu(tiny_pipe):
    a = learn_dct_token(tiny_pipe, Guide(), 5, "five", cfg(max_steps=2, augment=2))
    b = learn_dct_token(tiny_pipe, Guide(), 5, "five", cfg(max_steps=2, augment=2))
    assert torch.equal(a.embedding, b.embedding)
    assert a.history == b.history
    c = learn_dct_token(tiny_pipe, Guide(), 5, "five", cfg(max_steps=1, augment=2, seed=1))
    assert c.history[0]["loss"] != a.history[0]["loss"]


def test_fixed_seeds_reuse_the_training_batch(tiny_pipe):
    def classifier_inputs(**kw) -> list[torch.Tensor]:
        guide, seen = Guide(), []
        guide.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        # a vanishing learning rate keeps v_c (and so the images) essentially constant across updates
        learn_dct_token(tiny_pipe, guide, 3, "three", cfg(max_steps=3, lr=1e-12, prompts=("A photo of {token} {label}",),
                                                          **kw))
        return seen

    fixed = classifier_inputs(fixed_seeds=True)
    assert torch.allclose(fixed[0], fixed[1], atol=1e-5) and torch.allclose(fixed[0], fixed[2], atol=1e-5)
    fresh = classifier_inputs(fixed_seeds=False)
    assert torch.allclose(fresh[0], fixed[0], atol=1e-5)  # the first batch is the same ...
    assert (fresh[1] - fresh[0]).abs().max() > 1e-2  # ... then every update draws new noise


def test_training_forward_equals_stock_pipeline(tiny_pipe):
    """Padding, CFG, scheduler calls, decoding: the images training scores are the images inference makes."""
    guide = Guide()
    seen = []
    guide.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    config = cfg(max_steps=1, batch_size=2, num_inference_steps=4, init_token="bird")
    result = learn_dct_token(tiny_pipe, guide, 3, "three", config)

    pipe = tiny_pipeline(seed=0)
    add_tokens(pipe, {"<synthaug-003>": init_row(pipe, "bird")})
    generators = [torch.Generator().manual_seed(dct_seed("train", config.seed, 3, b)) for b in range(2)]
    prompts = [p.format(token="<synthaug-003>", label="three") for p in config.prompts]  # element b: prompt b % 2
    images = pipe(prompts, num_inference_steps=4, guidance_scale=config.guidance_scale, height=SIZE, width=SIZE,
                  generator=generators, output_type="pt").images
    assert torch.allclose(images, seen[0], atol=1e-5)
    loss = nn.functional.cross_entropy(guide(images), torch.tensor([3, 3]))
    assert loss.item() == pytest.approx(result.history[0]["loss"], rel=1e-5)


def test_every_batch_element_has_its_prompt_in_every_update(tiny_pipe):
    """Element b is conditioned on prompts[b % len(prompts)] in every update and micro-batch, so every update's loss
    is measured on the same prompt mix."""
    conds = []
    handle = tiny_pipe.unet.register_forward_pre_hook(
        lambda m, a, kw: conds.append(kw["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=2, batch_size=3, num_inference_steps=1))
        learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=1, batch_size=3, num_inference_steps=1,
                                                             micro_batch=2))
    finally:
        handle.remove()
    first, second, micro_a, micro_b = conds  # one UNet call per update; CFG rows [uncond x B, cond x B]
    for c in (first, second):
        cond = c[3:]
        assert torch.equal(cond[0], cond[2]) and not torch.equal(cond[0], cond[1])
    assert not torch.equal(first[3:], second[3:])  # v_c moved between the updates; the prompt mix did not
    assert torch.equal(torch.cat([micro_a[2:], micro_b[1:]]), first[3:])  # micro-batches 2 + 1 keep b % 2


def test_validation_uses_the_generation_prompt(tiny_pipe):
    ids = []
    handle = tiny_pipe.text_encoder.register_forward_pre_hook(
        lambda m, a, kw: ids.append((a[0] if a else kw["input_ids"]).clone()), with_kwargs=True)
    try:
        learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=1, select="val", val_batch_size=2),
                        val_prompt="a drawing of {token} {label}")
    finally:
        handle.remove()
    texts = [tiny_pipe.tokenizer.decode(row, skip_special_tokens=True) for batch in ids for row in batch]
    assert "a drawing of three" in texts  # the token is not in the pipeline's own tokenizer: decoded without it
    with pytest.raises(UserError, match=r"`val_prompt` 'a drawing of \{label\}' .* has no \{token\}"):
        learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=1, select="val"), val_prompt="a drawing of {label}")


# --------------------------------------------------------------------------------------------------------------------
# Stopping and selection
# --------------------------------------------------------------------------------------------------------------------
def test_stop_all_correct_keeps_that_step(tiny_pipe):
    result = learn_dct_token(tiny_pipe, Rigged([True, True]), 3, "three", cfg(max_steps=5, stop_all_correct=True))
    assert (result.stop_reason, result.steps, result.best_step) == ("all_correct", 1, 0)
    assert torch.equal(result.embedding, init_row(tiny_pipe))
    assert result.history[0]["accuracy"] == 1.0 and result.history[0]["updated"] is False
    assert result.unet_evals == 3


def test_stop_patience_needs_min_accuracy(tiny_pipe):
    # constant logits: the loss never improves after step 0; half the batch is correct
    rigged = Rigged([True, False])
    result = learn_dct_token(tiny_pipe, rigged, 3, "three", cfg(max_steps=10, patience=2))
    assert (result.stop_reason, result.steps, result.best_step) == ("patience", 3, 0)
    assert [h["accuracy"] for h in result.history] == [0.5, 0.5, 0.5]
    result = learn_dct_token(tiny_pipe, rigged, 3, "three", cfg(max_steps=3, patience=2, patience_min_accuracy=0.75))
    assert (result.stop_reason, result.steps) == ("max_steps", 3)
    result = learn_dct_token(tiny_pipe, rigged, 3, "three", cfg(max_steps=3, patience=0))  # 0 disables rule 2
    assert (result.stop_reason, result.steps) == ("max_steps", 3)


@pytest.mark.parametrize("select", ["min_loss", "last"])
def test_selection(tiny_pipe, select):
    snapshots = []
    result = learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=4, lr=0.5, select=select),
                             callback=lambda entry, v: snapshots.append(v))
    losses = [h["loss"] for h in result.history]
    assert len(snapshots) == result.steps == 4
    if select == "min_loss":
        assert result.best_step == losses.index(min(losses))
    else:
        assert result.best_step == 3
    assert torch.equal(result.embedding, snapshots[result.best_step].reshape(1, -1))


def test_val_selection_keeps_the_token_that_validates_best(tiny_pipe):
    snapshots = []
    result = learn_dct_token(tiny_pipe, Guide(), 3, "three",
                             cfg(max_steps=5, lr=0.5, select="val", val_every=2, val_batch_size=3),
                             callback=lambda entry, v: snapshots.append(v))
    validated = [h for h in result.history if "val_accuracy" in h]
    assert [h["step"] for h in validated] == [0, 2, 4]  # every val_every updates, and the last measured token
    best = max(validated, key=lambda h: (h["val_accuracy"], h["val_prob"]))
    assert result.best_step == best["step"]
    assert torch.equal(result.embedding, snapshots[result.best_step].reshape(1, -1))
    assert all(0.0 <= h["val_prob"] <= 1.0 for h in validated)


def test_val_selection_never_trades_the_initial_token_for_one_that_does_not_validate_better(tiny_pipe):
    # a classifier blind to the image: every token validates equally, so the initial one (step 0) stays
    rigged = Rigged([False, False, False])
    result = learn_dct_token(tiny_pipe, rigged, 3, "three", cfg(max_steps=4, select="val", val_every=1, val_batch_size=3))
    assert result.best_step == 0
    assert torch.equal(result.embedding, init_row(tiny_pipe))


def test_val_selection_with_the_batch_all_correct_still_validates(tiny_pipe):
    result = learn_dct_token(tiny_pipe, Rigged([True, True, True]), 3, "three",
                             cfg(max_steps=4, select="val", val_every=3, val_batch_size=3, stop_all_correct=True))
    assert result.stop_reason == "all_correct" and result.steps == 1
    assert result.history[0]["val_accuracy"] == 1.0 and result.best_step == 0


def test_val_selection_stops_on_all_correct_only_if_the_val_seeds_are_right_too(tiny_pipe):
    class TrainRightValWrong(Rigged):  # the 2 training images right, the 3 validation images wrong
        def forward(self, images):
            n = images.shape[0]
            return (self.logits[:n] if n == 2 else self.logits[2:2 + n]) + 0.0 * images.sum()

    guide = TrainRightValWrong([True, True, False, False, False])
    result = learn_dct_token(tiny_pipe, guide, 3, "three",
                             cfg(max_steps=3, select="val", val_every=1, val_batch_size=3, stop_all_correct=True))
    assert result.stop_reason == "max_steps" and result.steps == 3
    assert [h["accuracy"] for h in result.history] == [1.0, 1.0, 1.0]
    assert [h["val_accuracy"] for h in result.history] == [0.0, 0.0, 0.0]


def test_grad_clip_after_backward_on_unscaled_gradients(tiny_pipe, monkeypatch):
    real, calls = torch.nn.utils.clip_grad_norm_, []

    def spy(params, max_norm, *args, **kwargs):
        (p,) = params
        assert p.grad is not None  # called after backward
        before = p.grad.norm().item()
        total = real(params, max_norm, *args, **kwargs)
        calls.append((before, total.item(), p.grad.norm().item(), max_norm))
        return total

    class Loud(Guide):  # large logits -> gradient norms far above the clip
        def forward(self, images):
            return super().forward(images) * 1e6

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    result = learn_dct_token(tiny_pipe, Loud(), 3, "three", cfg(max_steps=3, grad_clip=1.0))
    assert len(calls) == 2
    for (before, total, after, max_norm), entry in zip(calls, result.history):
        assert max_norm == 1.0 and before > 1.0 and after <= 1.0 + 1e-4
        assert entry["grad_norm"] == pytest.approx(before, rel=1e-5) == total  # the raw norm is recorded


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def test_nonfinite_gradient_skips_the_update(tiny_pipe):
    class Poisoned(Guide):
        def forward(self, images):
            return super().forward(_NaNGrad.apply(images))

    result = learn_dct_token(tiny_pipe, Poisoned(), 3, "three", cfg(max_steps=3, select="last"))
    assert [h["nonfinite"] for h in result.history[:2]] == [True, True]
    assert not any(h["updated"] for h in result.history)
    assert torch.equal(result.embedding, init_row(tiny_pipe))


def test_nonfinite_loss_is_never_selected(tiny_pipe):
    class NaNLogits(Guide):
        def forward(self, images):
            return super().forward(images) * float("nan")

    result = learn_dct_token(tiny_pipe, NaNLogits(), 3, "three", cfg(max_steps=2))
    assert all(h["nonfinite"] and h["grad_norm"] is None for h in result.history)
    assert torch.equal(result.embedding, init_row(tiny_pipe)) and result.best_step == 0


def test_straight_through_clamp_keeps_gradient():
    x = torch.tensor([-0.5, 0.25, 1.5], requires_grad=True)
    y = clamp01(x, True)
    assert y.tolist() == [0.0, 0.25, 1.0]  # forward value is exactly the clamp
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]
    x.grad = None
    clamp01(x, False).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]  # a hard clamp kills saturated pixels' gradient


def test_augment_views():
    images = torch.rand(2, 3, SIZE, SIZE, requires_grad=True)
    views = augment(images, 3, torch.Generator().manual_seed(0))
    assert views.shape == (6, 3, SIZE, SIZE) and views.min() >= 0 and views.max() <= 1
    again = augment(images, 3, torch.Generator().manual_seed(0))
    assert torch.equal(views, again)
    assert not torch.equal(views[0], views[1])  # copies differ
    views.sum().backward()
    assert images.grad.abs().sum() > 0  # differentiable


def test_augment_in_training(tiny_pipe):
    guide, batches = Guide(), []
    guide.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    result = learn_dct_token(tiny_pipe, guide, 3, "three", cfg(max_steps=2, augment=4))
    assert batches == [2, 8, 2, 8]  # clean batch (accuracy) + 4 views per image (the EOT loss)
    assert result.history[0]["updated"]


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_x0_loss_adds_gradient_but_leaves_the_sampling_chain_alone(own_pipe, scheduler):
    original = own_pipe.scheduler
    set_scheduler(own_pipe, scheduler)
    try:
        plain = learn_dct_token(own_pipe, Guide(), 3, "three", cfg(max_steps=2, num_inference_steps=4))
        x0 = learn_dct_token(own_pipe, Guide(), 3, "three", cfg(max_steps=2, num_inference_steps=4, x0_weight=1.0))
    finally:
        own_pipe.scheduler = original
    # update 0 measures the same images: the side computation drew no noise (euler_a is ancestral) and left the
    # scheduler's state alone
    assert x0.history[0]["loss"] == plain.history[0]["loss"]
    assert plain.history[0]["x0_loss"] is None and x0.history[0]["x0_loss"] > 0
    # ... but the update is a different one: the x0 term carries gradient to v_c
    assert x0.history[0]["grad_norm"] != pytest.approx(plain.history[0]["grad_norm"])
    assert not torch.allclose(x0.embedding, plain.embedding)


def test_x0_loss_with_every_step_carrying_gradient_is_the_plain_update(tiny_pipe):
    # grad_steps = T leaves no step for the x0 term: only the route of the gradient (a detached leaf, then the text
    # encoder once) differs, and it must give the same update
    plain = learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=2, grad_steps=3))
    leaf = learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=2, grad_steps=3, x0_weight=1.0))
    assert leaf.history[0]["x0_loss"] is None
    assert torch.allclose(leaf.embedding, plain.embedding, atol=1e-6)
    assert leaf.history[1]["loss"] == pytest.approx(plain.history[1]["loss"], rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_from_alphas_is_ddims_prediction(prediction_type):
    from diffusers import DDIMScheduler

    from synthaug.tokens.x0 import x0_from_alphas

    ddim = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    ddim.set_timesteps(10)
    sample, output = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in ddim.timesteps[[0, 5, -1]]:
        want = ddim.step(output, t, sample).pred_original_sample
        assert torch.allclose(x0_from_alphas(ddim, output, t, sample), want, atol=1e-5)


def test_x0_loss_works_with_pndm(own_pipe):
    """PNDM (SD-1.x's shipped scheduler) returns no predicted clean image: it comes from the noise schedule."""
    original = own_pipe.scheduler
    set_scheduler(own_pipe, "pndm")
    try:
        plain = learn_dct_token(own_pipe, Guide(), 3, "three", cfg(max_steps=2, num_inference_steps=4))
        x0 = learn_dct_token(own_pipe, Guide(), 3, "three", cfg(max_steps=2, num_inference_steps=4, x0_weight=1.0))
    finally:
        own_pipe.scheduler = original
    assert x0.history[0]["loss"] == plain.history[0]["loss"]  # the sampling chain is untouched
    assert x0.history[0]["x0_loss"] > 0 and x0.history[0]["updated"]
    assert x0.history[0]["grad_norm"] != pytest.approx(plain.history[0]["grad_norm"])


def test_x0_loss_refused_up_front_without_a_predicted_clean_image(own_pipe):
    from diffusers import EulerDiscreteScheduler

    class NoX0(EulerDiscreteScheduler):  # sigma-scaled inputs, and a step that returns no pred_original_sample
        def step(self, *args, **kwargs):
            return (super().step(*args, **kwargs).prev_sample,)

    original = own_pipe.scheduler
    own_pipe.scheduler = NoX0.from_config(original.config)
    calls = []
    handle = own_pipe.unet.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(UserError, match=r"`dct.x0_weight` 1.0 needs .* NoX0 neither returns one .* "
                                            r"--scheduler ddim"):
            learn_dct_token(own_pipe, Guide(), 3, "three", cfg(max_steps=1, num_inference_steps=4, x0_weight=1.0))
    finally:
        own_pipe.scheduler = original
        handle.remove()
    assert not calls  # before any model work


def test_fp16_scales_the_loss_so_the_gradient_does_not_underflow(monkeypatch):
    """fp16 UNet/VAE: a GradScaler-style loss scale keeps the per-pixel gradients above fp16's underflow; without
    it (scaler disabled) this guide's small gradients flush to zero in the fp16 backward."""
    from synthaug.tokens import dct

    class Faint(Guide):  # a guide with small logits: small per-pixel gradients, as real 512-px guides give
        def forward(self, images):
            return self.net(images) * 1e-3

    pipe = tiny_pipeline(seed=0)
    fp32, _ = first_gradient(monkeypatch, pipe, Faint(), cfg(max_steps=2, grad_clip=0.0))
    pipe.to(torch.float16)
    scaled, entry = first_gradient(monkeypatch, pipe, Faint(), cfg(max_steps=2, grad_clip=0.0))
    assert entry["loss_scale"] == 65536.0 and entry["updated"]
    assert torch.dot(scaled, fp32) / (scaled.norm() * fp32.norm()) > 0.95  # (F.cosine_similarity clamps at 1e-8)
    monkeypatch.setattr(dct, "loss_scaler", lambda pipe: torch.amp.GradScaler("cpu", enabled=False))
    unscaled, _ = first_gradient(monkeypatch, pipe, Faint(), cfg(max_steps=2, grad_clip=0.0))
    assert unscaled.norm() < 0.5 * fp32.norm()


def test_mixed_precision_token_path_stays_fp32():
    pipe = tiny_pipeline(seed=0)
    pipe.unet.to(torch.bfloat16)
    pipe.vae.to(torch.bfloat16)
    pipe.text_encoder.to(torch.bfloat16)
    result = learn_dct_token(pipe, Guide(), 3, "three", cfg(max_steps=2))
    assert result.embedding.dtype == torch.float32
    assert result.history[0]["updated"] and result.history[0]["grad_norm"] > 0
    assert result.metadata["unet_dtype"] == "bfloat16"


def first_gradient(monkeypatch, pipe, guide, config, **kw) -> tuple[torch.Tensor, dict]:
    """The gradient of v_c at the first update (captured where it is clipped) and the first history entry."""
    grads = []
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        grads.append(params[0].grad.detach().clone())
        return clip(params, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    result = learn_dct_token(pipe, guide, 3, "three", config, **kw)
    monkeypatch.undo()
    return grads[0], result.history[0]


@pytest.mark.parametrize("extra", [{}, {"augment": 2}, {"x0_weight": 1.0, "num_inference_steps": 4}],
                         ids=["plain", "augment", "x0"])
def test_micro_batches_accumulate_the_whole_batch_gradient(tiny_pipe, monkeypatch, extra):
    whole, entry = first_gradient(monkeypatch, tiny_pipe, Guide(), cfg(max_steps=2, batch_size=5, **extra))
    assert whole.abs().sum() > 0
    for micro in (1, 2):  # 2 splits 5 seeds unevenly (2 + 2 + 1)
        grad, e = first_gradient(monkeypatch, tiny_pipe, Guide(), cfg(max_steps=2, batch_size=5, micro_batch=micro,
                                                                      **extra))
        assert torch.allclose(grad, whole, rtol=1e-4, atol=1e-7), (micro, (grad - whole).abs().max())
        assert e["loss"] == pytest.approx(entry["loss"], rel=1e-5)
        assert e["accuracy"] == entry["accuracy"] and e["target_prob"] == pytest.approx(entry["target_prob"], rel=1e-5)
        if "x0_weight" in extra:
            assert e["x0_loss"] == pytest.approx(entry["x0_loss"], rel=1e-5)


def test_micro_batches_bound_the_graph_to_one_micro_batch(tiny_pipe):
    """The UNet and VAE see micro-batches: the largest gradient-carrying UNet batch is 2 x micro_batch (CFG)."""
    batches = []
    handle = tiny_pipe.unet.register_forward_pre_hook(
        lambda m, a: batches.append((a[0].shape[0], torch.is_grad_enabled())))
    try:
        learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=1, batch_size=5, micro_batch=2,
                                                             select="val", val_batch_size=3, val_every=1))
    finally:
        handle.remove()
    assert {b for b, grad in batches if grad} == {4, 2}  # seeds 2 + 2 + 1, uncond + cond
    assert {b for b, grad in batches if not grad} == {4, 2}  # validation in micro-batches too (2 + 1)


def test_checkpointing_same_gradient_and_pipeline_flags_restored(tiny_pipe, monkeypatch):
    plain, _ = first_gradient(monkeypatch, tiny_pipe, Guide(), cfg(max_steps=2, batch_size=3))
    seen = []
    handle = tiny_pipe.vae.decoder.register_forward_pre_hook(lambda m, a: seen.append(
        (a[0].shape[0], m.gradient_checkpointing, torch.is_grad_enabled())))
    try:
        ckpt, _ = first_gradient(monkeypatch, tiny_pipe, Guide(), cfg(max_steps=2, batch_size=3, checkpointing=True))
    finally:
        handle.remove()
    assert torch.allclose(ckpt, plain, rtol=1e-3, atol=1e-6)  # the images decode one by one: float noise only
    assert {b for b, _, grad in seen if grad} == {1} and all(flag for _, flag, _ in seen)
    assert not tiny_pipe.unet.is_gradient_checkpointing and not tiny_pipe.vae.is_gradient_checkpointing


def test_progress_bar_and_callback(tiny_pipe, capsys):
    entries = []
    learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=2), progress=True,
                    callback=lambda e, v: entries.append(dict(e)))
    assert [e["step"] for e in entries] == [0, 1]
    assert "DCT three" in capsys.readouterr().err


def test_progress_reports_every_step_with_loss_accuracy_and_the_stop_rules_state(tiny_pipe, capsys):
    """A callable `progress` gets one dict per iteration (the build's step events); the bar's postfix shows the same:
    loss, batch accuracy, the patience count and the kept step, then the rule that stopped."""
    infos = []
    config = cfg(max_steps=4, patience=1, patience_min_accuracy=0.0)
    result = learn_dct_token(tiny_pipe, Guide(), 3, "three", config, progress=infos.append)
    assert [i["step"] for i in infos] == list(range(result.steps))
    assert {(i["class_index"], i["label"], i["total"]) for i in infos} == {(3, "three", 4)}
    assert all(isinstance(i["loss"], float) and 0.0 <= i["accuracy"] <= 1.0 for i in infos)
    assert infos[0]["state"] == "patience 0/1, kept step 0"
    assert infos[-1]["state"] == f"stopped: {result.stop_reason}"
    assert capsys.readouterr().err == ""  # a callable replaces the bar

    learn_dct_token(tiny_pipe, Guide(), 3, "three", config, progress=True)
    err = capsys.readouterr().err
    assert "loss " in err and "acc " in err and f"stopped: {result.stop_reason}" in err


@pytest.mark.parametrize(
    ("kwargs", "config", "match"),
    [
        ({"class_index": 10}, {}, r"`class_index` 10 is out of range .* 10 classes"),
        ({"class_index": -1}, {}, r"`class_index` must be a non-negative integer"),
        ({"label": " "}, {}, r"`label` must be a non-empty"),
        ({"token": "bird"}, {}, r"`token` 'bird' is already a word"),
        ({}, {"init_token": "blue jay"}, r"`dct.init_token` 'blue jay' is 2 tokens"),
        ({}, {"height": 20}, r"divisible by 8 but are 20 and 16"),
        ({}, {"grad_steps": 4}, r"`dct.grad_steps` must be between 1 and dct.num_inference_steps \(3\)"),
        ({}, {"prompts": ("A photo of {label}",)}, r"has no \{token\} placeholder"),
        ({}, {"select": "best"}, r"`dct.select` must be one of min_loss, last, val"),
        ({}, {"select": "val", "val_every": 0}, r"`dct.val_batch_size` and `dct.val_every` must be > 0"),
        ({}, {"lr": -1.0}, r"`dct.lr` must be > 0"),
        ({}, {"x0_weight": -0.5}, r"`dct.x0_weight` must be a finite number >= 0"),
        ({}, {"prompts": ("word " * 80 + "{token} {label}",)}, r"cut off"),
        ({}, {"micro_batch": 0}, r"`dct.micro_batch` must be > 0 \(or null for the whole batch\)"),
    ],
)
def test_bad_input(tiny_pipe, kwargs, config, match):
    args = {"class_index": 3, "label": "three"}
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        learn_dct_token(tiny_pipe, Guide(), args.pop("class_index"), args.pop("label"), cfg(**config), **args)


def test_class_index_beyond_unlabelled_classifier(tiny_pipe):
    guide = Guide(num_classes=4)
    del guide.labels  # a bare nn.Module: the range is only known from its logits
    with pytest.raises(UserError, match=r"`class_index` 7 is out of range .* 4 classes"):
        learn_dct_token(tiny_pipe, guide, 7, "seven", cfg(max_steps=1))


# --------------------------------------------------------------------------------------------------------------------
# Token files and adding tokens
# --------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learned(tiny_pipe):
    return learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=2, select="last"))


def test_save_token_format(learned, tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "tokens" / "003.safetensors"
    save_token(learned, path)
    raw = load_file(path)
    assert list(raw) == ["<synthaug-003>"] and raw["<synthaug-003>"].shape == (1, 32)
    assert raw["<synthaug-003>"].dtype == torch.float32
    meta = token_metadata(path)
    assert {k: meta[k] for k in ("class_index", "label", "steps", "stop_reason", "best_step")} == {
        "class_index": "3", "label": "three", "steps": "2", "stop_reason": "max_steps", "best_step": "1"}
    assert meta["model_id"] == "tiny-0" and meta["guide"] == "test-guide"
    assert meta["guide_trained_on"] == "nothing (random weights)"
    assert json.loads(meta["config"])["max_steps"] == 2
    assert len(json.loads(meta["history"])) == 2
    assert torch.equal(load_tokens(path)["<synthaug-003>"], learned.embedding)
    first = path.read_bytes()
    save_token(learned, path)
    assert path.read_bytes() == first  # same result, same bytes
    assert [p.name for p in path.parent.iterdir()] == ["003.safetensors"]  # no temporary files left


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_stock_load_textual_inversion_gives_the_same_images(learned, tmp_path):
    path = tmp_path / "003.safetensors"
    save_token(learned, path)
    gen = GenerateConfig(num_inference_steps=3, height=SIZE, width=SIZE, batch_size=2)

    ours = tiny_pipeline(seed=0)
    add_tokens(ours, load_tokens(path))
    mine = generate(ours, class_index=3, label="three", token=learned.token, indices=[0, 1], config=gen)

    stock = tiny_pipeline(seed=0)
    stock.load_textual_inversion(str(path))  # diffusers' own loader, nothing of synthaug
    theirs = generate(stock, class_index=3, label="three", token=learned.token, indices=[0, 1], config=gen)

    assert [_png(a.image) for a in mine] == [_png(b.image) for b in theirs]
    assert mine[0].token_sha256 == theirs[0].token_sha256 == embedding_sha256(learned.embedding)


def test_save_tokens_many_in_one_file(learned, tmp_path):
    other = torch.randn(1, 32)
    path = tmp_path / "tokens.safetensors"
    save_tokens([learned], path, metadata={"model_id": "tiny-0", "per_class": 10})
    meta = token_metadata(path)
    assert json.loads(meta["classes"])[0]["stop_reason"] == "max_steps" and meta["per_class"] == "10"
    save_tokens({"<synthaug-003>": learned.embedding, "<synthaug-004>": other}, path)
    tokens = load_tokens(path)
    assert list(tokens) == ["<synthaug-003>", "<synthaug-004>"]
    assert torch.equal(tokens["<synthaug-004>"], other)

    stock = tiny_pipeline(seed=0)
    stock.load_textual_inversion(list(tokens.values()), token=list(tokens))  # one stock call for all tokens
    weight = stock.text_encoder.get_input_embeddings().weight
    for token, emb in tokens.items():
        assert torch.equal(weight[stock.tokenizer.convert_tokens_to_ids(token)], emb[0])

    with pytest.raises(UserError, match="twice"):
        save_tokens([learned, learned], path)
    with pytest.raises(UserError, match="empty"):
        save_tokens([], path)


def test_add_tokens(own_pipe):
    weight = own_pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    a, b = torch.randn(1, 32, generator=torch.Generator().manual_seed(1)), torch.randn(32)
    rng = torch.get_rng_state()
    add_tokens(own_pipe, {"<t-a>": a, "<t-b>": b})
    assert torch.equal(torch.get_rng_state(), rng)  # resizing drew no numbers from the global RNG
    new = own_pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(new[: weight.shape[0]], weight)  # every existing row bit-identical
    assert torch.equal(new[own_pipe.tokenizer.convert_tokens_to_ids("<t-a>")], a[0])
    assert torch.equal(new[own_pipe.tokenizer.convert_tokens_to_ids("<t-b>")], b)
    assert not new.requires_grad
    size = len(own_pipe.tokenizer)
    add_tokens(own_pipe, {"<t-a>": b})  # re-adding overwrites the row, does not grow the vocabulary
    assert len(own_pipe.tokenizer) == size
    assert torch.equal(own_pipe.text_encoder.get_input_embeddings().weight[size - 2], b)
    assert own_pipe.tokenizer("x <t-a> y").input_ids[2] == own_pipe.tokenizer.convert_tokens_to_ids("<t-a>")
    with pytest.raises(UserError, match="already a word"):
        add_tokens(own_pipe, {"bird": a})
    with pytest.raises(UserError, match=r"shape \(1, 16\) but this text encoder takes \[n, 32\]"):
        add_tokens(own_pipe, {"<t-c>": torch.zeros(1, 16)})


def test_learning_an_already_added_token(own_pipe):
    """A pipeline that already holds the token (e.g. loaded for generation) can learn it again; its row is untouched."""
    add_tokens(own_pipe, {"<synthaug-009>": torch.zeros(1, 32)})
    result = learn_dct_token(own_pipe, Guide(), 9, "nine", cfg(max_steps=2, select="last"))
    row = own_pipe.text_encoder.get_input_embeddings().weight[own_pipe.tokenizer.convert_tokens_to_ids("<synthaug-009>")]
    assert torch.equal(row, torch.zeros(32))
    assert not torch.equal(result.embedding, torch.zeros(1, 32))  # v_c started from "a", not from the row


def test_load_tokens_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_tokens(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_tokens(bad)
    from safetensors.torch import save_file

    save_file({"<multi>": torch.zeros(2, 32)}, tmp_path / "multi.safetensors")  # diffusers' multi-vector layout
    assert load_tokens(tmp_path / "multi.safetensors")["<multi>"].shape == (2, 32)
    save_file({"<cube>": torch.zeros(2, 2, 32)}, tmp_path / "cube.safetensors")
    with pytest.raises(UserError, match=r"has shape \(2, 2, 32\); textual-inversion tokens are \[n, dim\]"):
        load_tokens(tmp_path / "cube.safetensors")
    # a diffusers-style directory holding learned_embeds.safetensors
    save_file({"<x>": torch.ones(32)}, tmp_path / "learned_embeds.safetensors")
    assert load_tokens(tmp_path)["<x>"].shape == (1, 32)


def test_warns_when_the_last_step_is_noisy(own_pipe, caplog):
    from diffusers import DDIMScheduler

    original = own_pipe.scheduler
    own_pipe.scheduler = DDIMScheduler.from_config(original.config, timestep_spacing="trailing")
    try:
        learn_dct_token(own_pipe, Guide(), 3, "three", cfg(max_steps=1))
        assert "last timestep is 332 of 1000" in caplog.text
        caplog.clear()
        # the x0 loss classifies every step's predicted image: the last step may be noisy
        learn_dct_token(own_pipe, Guide(), 3, "three", cfg(max_steps=1, x0_weight=1.0))
        assert "last timestep" not in caplog.text
    finally:
        own_pipe.scheduler = original
    learn_dct_token(own_pipe, Guide(), 3, "three", cfg(max_steps=1))  # SD's leading spacing ends at t=1
    assert "last timestep" not in caplog.text
