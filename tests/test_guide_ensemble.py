"""Guide ensembles (`synthaug.classifier.ensemble`): ``"A,B"`` loads as one guide whose probability is the
normalised geometric mean of its members', whose loss a token must lower for every member, and which a build takes
like any guide (a fitted one among them)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from synthaug.classifier import load_classifier
from synthaug.classifier.ensemble import GuideEnsemble
from synthaug.classifier.fit import fit_dataset_guide
from synthaug.datasets import Digits
from synthaug.errors import UserError


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "k2"
    fit_dataset_guide(Digits(split="train"), out, shots=2)
    return str(out)


def test_a_comma_list_is_one_guide_with_the_members_geometric_mean(probe):
    ens = load_classifier(f"digits-guide,{probe}", device="cpu")
    a, b = load_classifier("digits-guide", device="cpu"), load_classifier(probe, device="cpu")
    assert isinstance(ens, GuideEnsemble) and ens.labels == a.labels and ens.num_classes == 10
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    geo = (a.predict(x).log() + b.predict(x).log()).div(2).exp()
    torch.testing.assert_close(ens.predict(x), geo / geo.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)
    target = torch.tensor([1, 1, 1])
    loss = F.cross_entropy(ens(x), target)
    mean_ce = (F.cross_entropy(a(x), target) + F.cross_entropy(b(x), target)) / 2
    assert loss.item() <= mean_ce.item() + 1e-6  # mean CE + log Z, Z <= 1
    loss.backward()
    assert x.grad.abs().sum() > 0 and not any(p.requires_grad for p in ens.parameters())
    assert ens.features(x).shape == (3, a.features(x).shape[1] + b.features(x).shape[1])
    assert ens.source == f"digits-guide,{probe}"


def test_members_must_share_their_labels(tmp_path):
    fit_dataset_guide(Digits(split="train"), tmp_path / "two", shots=1, classes=[0, 1])
    with pytest.raises(UserError, match="must have the same labels in the same order"):
        load_classifier(f"digits-guide,{tmp_path / 'two'}", device="cpu")


def test_a_build_steers_with_a_fitted_guide_and_another_together(tmp_path, world):
    import buildworld as bw

    from synthaug.builder import build
    from synthaug.tokens.io import token_metadata

    model, guide = world
    out = tmp_path / "b"
    cfg = bw.config(out, model, f"fit,{guide}", **{"guide_fit.backbone": "digits", "shots": 2, "classes": "0",
                                                      "per_class": 2, "baseline": False})
    assert build(cfg, progress=False).ok
    recorded = token_metadata(out / "tokens" / "000.safetensors")["guide"]
    assert recorded.startswith("fit:") and recorded.endswith(f",{guide}")
    assert json.loads((out / "guide" / "guide.json").read_text())["shots"] == 2
