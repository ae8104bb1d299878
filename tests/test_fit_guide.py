"""Few-shot guides (`synthaug.classifier.fit`, `synthaug.classifier.probe`, `synthaug fit-guide`): fitted on the
user's k images, saved as a folder that `load_classifier` and `--guide DIR` take, loadable with transformers alone,
deterministic, and refusing bad input in one line before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synthaug.classifier import load_classifier
from synthaug.classifier.fit import FitRecord, fit_dataset_guide, fit_guide
from synthaug.classifier.probe import load_backbone
from synthaug.cli import main
from synthaug.datasets import Digits
from synthaug.datasets.fewshot import few_shot_indices
from synthaug.errors import UserError


@pytest.fixture(scope="module")
def digits():
    return Digits(split="train")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, digits):
    out = tmp_path_factory.mktemp("guides") / "k3"
    guide, record = fit_dataset_guide(digits, out, shots=3, shots_seed=0, dataset_name="digits", split="train")
    return out, guide, record


def _batch(ds, n=40):
    return torch.stack([torch.from_numpy(np.array(ds[i][0])).permute(2, 0, 1).float() / 255 for i in range(n)])


def test_a_fitted_guide_classifies_held_out_digits_and_records_its_shots(fitted, digits):
    out, guide, record = fitted
    test = Digits(split="test")
    x = _batch(test, 120)
    acc = float((guide.predict(x).argmax(-1) == torch.tensor(test.targets[:120])).float().mean())
    assert acc > 0.7  # a 3-shot probe on the world's CLIP (chance: 0.1)
    saved = json.loads((out / "guide.json").read_text())
    assert saved["indices"] == few_shot_indices(digits.targets, 3, 0)  # the user's own images, as SynthAugDataset
    assert saved["paths"][0].startswith("digits/train/") and saved["shots"] == 3 and saved["shots_seed"] == 0
    assert set(saved["loo_per_class"]) == set(digits.classes) and 0 < saved["loo_accuracy"] <= 1
    assert 0 < saved["selected_loo_accuracy"] <= 1 and saved["why_no_loo"] is None  # nested, and the chosen one's
    assert {c["features"] for c in saved["candidates"]} == {"pooled", "projected", "patch_mean"}
    assert FitRecord.read(out) == record


def test_the_saved_folder_loads_as_a_guide_with_the_same_outputs(fitted):
    out, guide, _ = fitted
    loaded = load_classifier(str(out), device="cpu")
    x = torch.rand(4, 3, 32, 32, requires_grad=True)
    assert loaded.labels == guide.labels and loaded.kind == "probe"
    torch.testing.assert_close(loaded(x), guide(x), rtol=0, atol=1e-5)
    loaded(x)[:, 2].sum().backward()  # DCT backpropagates through the guide into the image
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loaded.parameters())
    assert loaded.features(x).shape[0] == 4  # the trust check's guide-space features


def test_the_folder_runs_with_transformers_alone_as_its_docstring_says(fitted):
    from safetensors.torch import load_file
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    out, guide, _ = fitted
    config = json.loads((out / "config.json").read_text())
    vision = CLIPVisionModelWithProjection.from_pretrained(out / "backbone")
    head = load_file(out / "head.safetensors")
    image = Digits(split="test")[0][0]
    pixel_values = CLIPImageProcessor.from_pretrained(out / "backbone")(image, return_tensors="pt").pixel_values
    with torch.no_grad():
        out_v = vision.vision_model(pixel_values)
        feats = {"pooled": out_v.pooler_output, "projected": vision.visual_projection(out_v.pooler_output),
                 "patch_mean": out_v.last_hidden_state[:, 1:].mean(1)}[config["features"]]
        logits = F.normalize(feats, dim=-1) @ head["weight"].T + head["bias"]
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255
    torch.testing.assert_close(logits, guide(x), rtol=0, atol=1e-4)


def test_the_same_shots_give_the_same_bytes(tmp_path, digits):
    idx = few_shot_indices(digits.targets, 2, seed=1)
    images, targets = [digits[i][0] for i in idx], [digits.targets[i] for i in idx]
    _, record = fit_guide(images, targets, digits.classes, tmp_path / "a")
    fit_guide(images, targets, digits.classes, tmp_path / "b")
    # two shots per class: the held-out estimate exists, with the default setting (one shot left to choose on)
    assert record.loo_accuracy is not None and "default setting" in record.why_no_loo
    assert (tmp_path / "a" / "head.safetensors").read_bytes() == (tmp_path / "b" / "head.safetensors").read_bytes()


def test_one_shot_per_class_fits_with_no_leave_one_out_estimate(tmp_path, digits):
    _, record = fit_dataset_guide(digits, tmp_path / "k1", shots=1)
    assert record.loo_accuracy is None and "one shot per class" in record.why_no_loo
    assert record.features == "pooled" and record.candidates == []


def test_a_prototype_head_is_cosine_class_means(digits):
    idx = few_shot_indices(digits.targets, 2, seed=0)
    guide, record = fit_guide([digits[i][0] for i in idx], [digits.targets[i] for i in idx], digits.classes,
                              head="prototype", features="projected", augment=0)
    assert record.head == "prototype" and record.features == "projected"
    assert guide.model.head.bias.abs().max() == 0
    norms = guide.model.head.weight.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, record.strength))


def test_a_fixed_strength_replaces_leave_one_outs_choice_and_shrinks_the_weights(digits):
    idx = few_shot_indices(digits.targets, 3, seed=0)
    images, targets = [digits[i][0] for i in idx], [digits.targets[i] for i in idx]
    weak, weak_rec = fit_guide(images, targets, digits.classes, features="pooled", strength=1e-4, augment=0)
    strong, strong_rec = fit_guide(images, targets, digits.classes, features="pooled", strength=1e-1, augment=0)
    assert weak_rec.strength == 1e-4 and strong_rec.strength == 1e-1
    assert {c["strength"] for c in strong_rec.candidates} == {1e-1}  # nothing else was tried
    assert strong.model.head.weight.norm() < 0.5 * weak.model.head.weight.norm()  # the penalty is the one given
    x = torch.stack([torch.from_numpy(np.array(digits[i][0])).permute(2, 0, 1).float() / 255 for i in range(40)])
    assert F.softmax(strong(x), -1).amax(-1).mean() < F.softmax(weak(x), -1).amax(-1).mean()  # less sure


def test_a_class_selection_fits_only_those_classes(digits):
    guide, record = fit_dataset_guide(digits, None, shots=2, classes=[7, 1])
    assert guide.labels == ["seven", "one"] and record.labels == ["seven", "one"]
    assert all(digits.targets[i] in (1, 7) for i in record.indices)


def test_a_timm_backbone_and_a_transformers_vit_backbone(tmp_path, digits):
    import timm
    from timm.models import save_for_hf
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    save_for_hf(timm.create_model("test_efficientnet", num_classes=0), str(tmp_path / "timm"),
                data_config={"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                             "interpolation": "bilinear", "crop_pct": 1.0}, safe_serialization=True)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37)).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    idx = few_shot_indices(digits.targets, 2, seed=0)
    images, targets = [digits[i][0] for i in idx], [digits.targets[i] for i in idx]
    for name, kinds in (("timm", {"pooled"}), ("vit", {"pooled", "patch_mean"})):
        guide, record = fit_guide(images, targets, digits.classes, tmp_path / f"guide-{name}",
                                  backbone=str(tmp_path / name), augment=1)
        assert {c["features"] for c in record.candidates} == kinds
        loaded = load_classifier(str(tmp_path / f"guide-{name}"), device="cpu")
        x = torch.rand(2, 3, 32, 32)
        torch.testing.assert_close(loaded(x), guide(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    ({"shots": 0}, r"`shots` must be an integer >= 1"),
    ({"shots": 500}, r"`shots` is 500 but class 0 \('zero'\) has fewer images"),
    ({"shots": 2, "backbone": "/no/such/dir"}, r"`backbone` '/no/such/dir' does not exist"),
    ({"shots": 2, "backbone": "not_a_timm_model_name"}, r"`backbone` 'not_a_timm_model_name' is not a timm model"),
    ({"shots": 2, "backbone": "org/not-cached"}, r"org/not-cached"),
    ({"shots": 2, "head": "svm"}, r"`head` must be one of linear, prototype but is 'svm'"),
    ({"shots": 2, "strength": 0.0}, r"`strength` must be a finite number > 0 .* but is 0.0"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, digits, kwargs, match):
    with pytest.raises(UserError, match=match):
        fit_dataset_guide(digits, tmp_path / "g", **kwargs)
    assert not (tmp_path / "g").exists()  # nothing half-written


def test_a_dataset_without_labels_is_refused(tmp_path):
    class Unlabelled:
        classes = ()
        targets = ()

    with pytest.raises(UserError, match="has no labels"):
        fit_dataset_guide(Unlabelled(), tmp_path / "g", shots=1)


def test_an_existing_folder_is_replaced_only_when_it_is_a_guide_and_asked(tmp_path, digits, fitted):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="exists and is not empty"):
        fit_dataset_guide(digits, other, shots=1)
    with pytest.raises(UserError, match="is not a guide folder"):
        fit_dataset_guide(digits, other, shots=1, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep"
    fit_dataset_guide(digits, tmp_path / "g", shots=1)
    _, record = fit_dataset_guide(digits, tmp_path / "g", shots=2, overwrite=True)
    assert FitRecord.read(tmp_path / "g").shots == 2 == record.shots
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".old-*"))


def test_the_cli_fits_prints_leave_one_out_and_refuses_bad_input(tmp_path, capsys):
    assert main(["fit-guide", "--dataset", "digits", "--shots", "2", "--out", str(tmp_path / "g")]) == 0
    printed = capsys.readouterr().out
    assert "leave-one-out accuracy" in printed and f"--guide {tmp_path / 'g'}" in printed
    assert main(["fit-guide", "--dataset", "digits", "--shots", "0", "--out", str(tmp_path / "h")]) == 2
    assert "`--shots` must be >= 1" in capsys.readouterr().err
    assert main(["fit-guide", "--dataset", "nope", "--shots", "1", "--out", str(tmp_path / "h")]) == 2


def test_the_digits_backbone_gives_every_feature_kind():
    backbone, data_config = load_backbone("digits")
    feats = backbone.all_features(torch.rand(2, 3, 32, 32))
    assert {k: v.shape[-1] for k, v in feats.items()} == {"pooled": 64, "projected": 32, "patch_mean": 64}
    assert data_config["input_size"] == (3, 32, 32)


# --------------------------------------------------------------------------------------------------------------------
# `guide: fit` in a build, and the one notion of the user's k real images
# --------------------------------------------------------------------------------------------------------------------
def _fit_build(out, world, **extra):
    import buildworld as bw

    model, _ = world
    return bw.config(out, model, "fit", **{"guide_fit.backbone": "digits", "shots": 2, "baseline": False,
                                           "per_class": 2, **extra})


def test_a_build_fits_its_guide_on_its_own_shots_once_and_resumes_without_refitting(tmp_path, world, monkeypatch):
    import buildworld as bw

    from synthaug.builder import build
    from synthaug.classifier import fit as fit_module
    from synthaug.commands import inspect

    out = tmp_path / "b"
    assert build(_fit_build(out, world), progress=False).ok
    record = FitRecord.read(out / "guide")
    shots = json.loads((out / "shots.json").read_text())
    digits = Digits(split="train")
    assert record.indices == shots["indices"] == few_shot_indices(digits.targets, 2, 0)  # one notion of "the k"
    assert record.labels == digits.classes  # every class, in the dataset's order: logit c is class c
    assert load_classifier(str(out / "guide")).num_classes == 10
    assert "leave-one-out" in inspect(out).summary()
    first = bw.snapshot(out)
    # a resume (one shard lost) never refits: its tokens were steered by the guide on disk
    next((out / "meta").glob("*_stats.json")).unlink()
    monkeypatch.setattr(fit_module, "fit_guide", lambda *a, **k: pytest.fail("refitted on resume"))
    assert build(_fit_build(out, world), progress=False).ok
    assert bw.snapshot(out) == first


def test_the_same_build_with_a_fitted_guide_gives_the_same_bytes(tmp_path, world):
    import buildworld as bw

    from synthaug.builder import build

    for name in ("a", "b"):
        assert build(_fit_build(tmp_path / name, world, classes="0"), progress=False).ok
    assert bw.snapshot(tmp_path / "a") == bw.snapshot(tmp_path / "b")


def test_other_shots_refit_only_with_overwrite(tmp_path, world):
    from synthaug.builder import build

    out = tmp_path / "b"
    assert build(_fit_build(out, world, classes="0"), progress=False).ok
    with pytest.raises(UserError, match=r"different config \(shots: 2 -> 3\).*--overwrite"):
        build(_fit_build(out, world, classes="0", shots=3), progress=False)
    assert build(_fit_build(out, world, classes="0", shots=3), overwrite=True, progress=False).ok
    assert FitRecord.read(out / "guide").shots == 3
    fixed = _fit_build(out, world, classes="0", shots=3, **{"guide_fit.strength": 0.01})
    assert build(fixed, overwrite=True, progress=False).ok  # a fixed penalty is a different guide: refitted
    assert FitRecord.read(out / "guide").strength == 0.01


def test_fit_needs_dct_and_enough_shots_and_an_existing_backbone(tmp_path, world):
    from synthaug.builder import build

    with pytest.raises(UserError, match=r"`guide` 'fit' fits a few-shot guide that steers DCT tokens, but `method` "
                                        r"is 'ti'"):
        build(_fit_build(tmp_path / "a", world, method="ti"), progress=False)
    with pytest.raises(UserError, match=r"`shots` is 900 but class 0 \('zero'\) has \d+ images in split 'train' "
                                        r"\(`guide` 'fit' fits on 900 of every class\)"):
        build(_fit_build(tmp_path / "b", world, shots=900), progress=False)
    with pytest.raises(UserError, match=r"`guide_fit.strength` must be > 0 \(or null: chosen by leave-one-out"):
        build(_fit_build(tmp_path / "c", world, **{"guide_fit.strength": -1.0}), progress=False)
    with pytest.raises(UserError, match=r"`guide_fit.backbone` '/no/such' does not exist"):
        build(_fit_build(tmp_path / "c", world, **{"guide_fit.backbone": "/no/such"}), progress=False)
    assert not any((tmp_path / n).exists() and any((tmp_path / n).iterdir()) for n in "abc")


@pytest.mark.parametrize("old, new", [("mcti.shots", "shots"), ("generate.shots", "shots"),
                                      ("generate.shots_seed", "shots_seed"), ("dct.trust_shots", "shots")])
def test_the_old_shots_keys_name_the_new_one(old, new):
    from synthaug.config import load_config

    with pytest.raises(UserError, match=rf"`{old}` is now the top-level `{new}`.*--set {new}="):
        load_config(overrides={old: 3})


def test_a_backbone_loaders_error_names_the_backbone_once(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"^`backbone` '.*': its config\.json has neither 'architecture' \(timm\) nor "
                                        r"'model_type' \(transformers\)\.$"):
        load_backbone(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"^`backbone` '.*': .*config\.json is unreadable"):
        load_backbone(tmp_path)
