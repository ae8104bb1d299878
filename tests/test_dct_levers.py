"""DCT's keep/stop/step-size levers (`DCTConfig.patience_metric`, `lr_schedule`, `extend_steps`) on the tiny world.

Each lever is off by default; with it on, the token's history shows what it did: the learning rate of every update,
the update where validation patience stops, the updates taken past ``max_steps`` while the validation score rises.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_tokens import Guide, Rigged, cfg

from synthaug.config import load_config
from synthaug.errors import UserError
from synthaug.tokens.dct import learn_dct_token


class ValRising(Rigged):
    """Every training image right; the validation batch (3 images, the training one has 2) right with a class
    probability that grows with every validation: each validated token scores better than all before it."""

    def __init__(self):
        super().__init__([True, True])
        self.calls = 0

    def forward(self, images):
        if images.shape[0] != 3:
            return self.logits[: images.shape[0]] + 0.0 * images.sum()
        self.calls += 1
        logits = torch.zeros(3, 10)
        logits[:, 3] = float(self.calls)
        return logits + 0.0 * images.sum()


def test_cosine_lr_decays_to_the_floor_and_constant_stays(tiny_pipe):
    result = learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=5, lr=0.05, lr_schedule="cosine",
                                                                 lr_floor=0.1))
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.005)
    assert lrs[2] == pytest.approx(0.05 * (0.1 + 0.9 * 0.5))  # half way down the cosine
    assert all(a > b for a, b in itertools.pairwise(lrs))
    constant = learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(max_steps=5, lr=0.05))
    assert [h["lr"] for h in constant.history] == [0.05] * 5
    # the optimiser took the smaller steps: the same first update, a different token after the decayed ones
    assert not torch.equal(result.embedding, constant.embedding)


def test_cosine_lr_stays_at_the_floor_past_max_steps(tiny_pipe):
    result = learn_dct_token(tiny_pipe, ValRising(), 3, "three",
                             cfg(max_steps=3, lr=0.05, lr_schedule="cosine", lr_floor=0.2, select="val", val_every=1,
                                 val_batch_size=3, extend_steps=2))
    assert [h["lr"] for h in result.history] == pytest.approx([0.05, 0.03, 0.01, 0.01, 0.01])


@pytest.mark.parametrize(("val_every", "patience", "steps"), [(1, 2, 3), (2, 3, 5)])
def test_val_patience_stops_at_the_first_validation_that_many_updates_after_the_best(tiny_pipe, val_every,
                                                                                      patience, steps):
    # blind to the image: every token validates the same, so the initial one stays best; no image is right, so the
    # loss rule (which needs patience_min_accuracy of the batch right) would never stop
    blind = Rigged([False, False, False])
    args = {"max_steps": 10, "select": "val", "val_every": val_every, "val_batch_size": 3, "patience": patience}
    result = learn_dct_token(tiny_pipe, blind, 3, "three", cfg(**args, patience_metric="val"))
    assert (result.stop_reason, result.steps, result.best_step) == ("patience", steps, 0)
    assert "val_accuracy" in result.history[-1]
    on_loss = learn_dct_token(tiny_pipe, blind, 3, "three", cfg(**args))
    assert (on_loss.stop_reason, on_loss.steps) == ("max_steps", 10)


def test_val_patience_restarts_when_validation_improves(tiny_pipe):
    result = learn_dct_token(tiny_pipe, ValRising(), 3, "three",
                             cfg(max_steps=6, select="val", val_every=1, val_batch_size=3, patience=2,
                                 patience_metric="val"))
    assert (result.stop_reason, result.steps, result.best_step) == ("max_steps", 6, 5)


def test_extend_steps_only_while_the_validation_score_rises(tiny_pipe):
    args = {"max_steps": 3, "select": "val", "val_every": 1, "val_batch_size": 3, "extend_steps": 4,
            "extend_window": 2}
    rising = learn_dct_token(tiny_pipe, ValRising(), 3, "three", cfg(**args))
    assert (rising.stop_reason, rising.steps, rising.best_step) == ("max_steps", 7, 6)  # to max_steps + extend_steps
    flat = learn_dct_token(tiny_pipe, Rigged([False, False, False]), 3, "three", cfg(**args))
    assert (flat.stop_reason, flat.steps, flat.best_step) == ("max_steps", 3, 0)  # best 2 updates old at the cap
    off = learn_dct_token(tiny_pipe, ValRising(), 3, "three", cfg(**{**args, "extend_steps": 0}))
    assert (off.stop_reason, off.steps) == ("max_steps", 3)


def test_the_progress_bar_follows_an_extension_past_max_steps(tiny_pipe, monkeypatch):
    from synthaug.tokens import dct

    bars, real = [], dct.progress_bar
    monkeypatch.setattr(dct, "progress_bar", lambda *args: bars.append(real(*args)) or bars[-1])
    args = {"max_steps": 3, "select": "val", "val_every": 1, "val_batch_size": 3, "extend_steps": 4,
            "extend_window": 2}
    learn_dct_token(tiny_pipe, ValRising(), 3, "three", cfg(**args), progress=True)
    assert (bars[0].bar.n, bars[0].bar.total) == (7, 7)  # not 7 of 3


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"patience_metric": "train"}, r"`dct.patience_metric` must be one of loss, val but is 'train'"),
        ({"lr_schedule": "step"}, r"`dct.lr_schedule` must be one of constant, cosine but is 'step'"),
        ({"lr_floor": 1.5}, r"`dct.lr_floor` must be in \[0, 1\] \(a fraction of dct.lr\) but is 1.5"),
        ({"lr_floor": math.nan}, r"`dct.lr_floor` must be in \[0, 1\]"),
        ({"extend_window": 0}, r"`dct.extend_steps` must be >= 0 and `dct.extend_window` > 0 but are 0 and 0"),
        ({"patience_metric": "val"}, r"`dct.patience_metric` 'val' reads the validation score.*set dct.select=val"),
        ({"extend_steps": 5}, r"`dct.extend_steps` 5 reads the validation score.*set dct.select=val"),
    ],
)
def test_bad_lever_values_are_refused_before_any_model_runs(tiny_pipe, config, match):
    with pytest.raises(UserError, match=match):
        learn_dct_token(tiny_pipe, Guide(), 3, "three", cfg(**config))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"dct.lr_schedule": "linear"}, r"`dct.lr_schedule` must be one of constant, cosine but is 'linear'"),
        ({"dct.lr_floor": 2}, r"`dct.lr_floor` must be in \[0, 1\]"),
        ({"dct.extend_window": 0}, r"`dct.extend_window` must be > 0 but is 0"),
        ({"dct.select": "min_loss", "dct.patience_metric": "val"}, r"set dct.select=val too"),
    ],
)
def test_bad_lever_values_are_refused_by_the_config(overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(overrides={"dataset": "digits", **overrides})
