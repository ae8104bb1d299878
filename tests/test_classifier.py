"""Classifier loading: every source kind built locally (no downloads), preprocessing, freezing, gradients, errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from synthaug import classifier as clf_mod
from synthaug.classifier.base import Classifier, MeanPoolViT, eval_transform
from synthaug.classifier.from_timm import torch_hub_cached
from synthaug.classifier.load import load_classifier
from synthaug.errors import UserError

LABELS = ["cat", "dog", "bird"]
TIMM_DATA = {"input_size": (3, 48, 48), "crop_pct": 0.9, "interpolation": "bilinear"}


def _pil(h: int, w: int, seed: int = 0) -> Image.Image:
    """A smooth, textured RGB image (resizing pure noise would compare aliasing, not transforms)."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([np.sin(x / 5.0 + c) * np.cos(y / 7.0 - c) for c in range(3)], -1) * 100 + 128
    a = a + rng.randn(h, w, 3) * 20
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()[None] / 255.0


def _tiny_timm(num_classes: int = 3, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model("test_efficientnet", num_classes=num_classes)


def _save_timm_dir(path, model, **extra):
    from timm.models import save_for_hf

    config = {"label_names": LABELS, "trained_on": "digits train split (60%)", **extra}
    save_for_hf(model, str(path), model_config=config, data_config=TIMM_DATA, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def timm_dir(tmp_path_factory):
    return _save_timm_dir(tmp_path_factory.mktemp("timm") / "guide", _tiny_timm())


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    """A tiny transformers ViT classifier + ViTImageProcessor, saved the way hub repos are."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=37, num_labels=3, id2label=dict(enumerate(LABELS)),
                       label2id={n: i for i, n in enumerate(LABELS)})
    model = ViTForImageClassification(config).eval()
    # Non-trivial final LayerNorm so that "norm then pool" and "pool then norm" really differ.
    model.vit.layernorm.weight.data.uniform_(0.5, 1.5)
    model.vit.layernorm.bias.data.normal_(0, 0.5)
    path = tmp_path_factory.mktemp("vit") / "vit"
    model.save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}, resample=2, image_mean=[0.5, 0.4, 0.3],
                      image_std=[0.2, 0.25, 0.3]).save_pretrained(path)
    return path


def _fake_hf_cache(cache, repo_id: str, src_dir) -> None:
    """Lay `src_dir`'s files out as the Hugging Face cache holds a downloaded snapshot of `repo_id`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src_dir, repo / "snapshots" / commit)


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """An empty HF cache and torch hub dir: any weight a test asks for is absent (and HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


# --------------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize(("size", "input_size", "crop_pct"), [
    ((37, 50), (3, 48, 48), 0.9),  # upsizing, non-square image
    ((300, 260), (3, 40, 56), 0.875),  # downsizing (antialias), non-square target
    ((64, 64), (3, 64, 64), 1.0),  # already the right size: identity resize
])
def test_eval_transform_matches_timm_on_pil(interpolation, crop_mode, size, input_size, crop_pct):
    from timm.data import create_transform

    cfg = {"input_size": input_size, "interpolation": interpolation, "mean": (0.485, 0.456, 0.406),
           "std": (0.229, 0.224, 0.225), "crop_pct": crop_pct, "crop_mode": crop_mode}
    img = _pil(*size)
    ref = create_transform(**cfg)(img)
    out = eval_transform(_tensor(img), cfg)[0]
    assert out.shape == ref.shape
    # PIL rounds to uint8 between its two resize passes; that is the whole remaining difference (1/255/std ~ 0.017).
    assert (out - ref).abs().mean() < 0.01
    assert (out - ref).abs().max() < 0.12


def test_preprocess_uses_the_models_own_data_config(timm_dir):
    from timm.data import create_transform, resolve_data_config

    clf = load_classifier(str(timm_dir), device="cpu")
    assert clf.data_config["input_size"] == (3, 48, 48) and clf.data_config["crop_pct"] == 0.9
    assert clf.data_config["interpolation"] == "bilinear"
    img = _pil(41, 33, seed=1)
    ref = create_transform(**resolve_data_config(model=clf.model))(img)
    out = clf.preprocess(_tensor(img))[0]
    assert (out - ref).abs().max() < 0.03
    # uint8 input is scaled, same result
    u8 = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None]
    torch.testing.assert_close(clf.preprocess(u8), clf.preprocess(_tensor(img)))


# --------------------------------------------------------------------------------------------------------------------
# timm directories (the embedded digits format), freezing, gradients, features, predict
# --------------------------------------------------------------------------------------------------------------------
def test_timm_dir_labels_trained_on_and_logits(timm_dir):
    from timm.data import create_transform, resolve_data_config

    clf = load_classifier(str(timm_dir), device="cpu")
    assert clf.kind == "timm" and clf.source == str(timm_dir)
    assert clf.labels == LABELS and clf.num_classes == 3
    assert clf.trained_on == "digits train split (60%)"
    # the logits are those of the saved model on timm's own eval transform of the image
    ref_model = _tiny_timm().eval()
    img = _pil(50, 50, seed=2)
    with torch.no_grad():
        ref = ref_model(create_transform(**resolve_data_config(model=clf.model))(img)[None])
        out = clf(_tensor(img))
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)
    same = load_classifier("local-dir:" + str(timm_dir), device="cpu")
    torch.testing.assert_close(same(_tensor(img)), out)


def test_frozen_eval_and_gradient_reaches_only_the_input(timm_dir):
    clf = load_classifier(str(timm_dir), device="cpu")
    assert not clf.training and not clf.model.training
    assert all(not p.requires_grad for p in clf.parameters())
    clf.train()  # a parent module calling .train() must not switch BatchNorm to batch statistics
    assert not clf.training and not any(m.training for m in clf.modules())
    x = torch.rand(2, 3, 40, 40, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(clf(x), torch.tensor([0, 2]))
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in clf.parameters())
    # saturated pixels (exactly 1.0 everywhere) still get a gradient: the clamp after resizing is straight-through
    white = torch.ones(1, 3, 40, 40, requires_grad=True)
    clf(white)[0, 1].backward()
    assert white.grad.abs().sum() > 0


def test_features_are_the_heads_input_and_predict_is_softmax(timm_dir):
    clf = load_classifier(str(timm_dir), device="cpu")
    x = torch.rand(3, 3, 48, 48)
    feats = clf.features(x)
    assert feats.shape == (3, clf.model.num_features)
    torch.testing.assert_close(clf.model.get_classifier()(feats), clf(x), atol=1e-5, rtol=1e-5)
    probs = clf.predict(x, batch_size=2)
    torch.testing.assert_close(probs, clf(x).softmax(-1))
    assert not probs.requires_grad
    # PIL images of different sizes are preprocessed one by one
    pil_probs = clf.predict([_pil(48, 48, seed=3), _pil(30, 70, seed=4)])
    assert pil_probs.shape == (2, 3)
    torch.testing.assert_close(pil_probs.sum(-1), torch.ones(2))


def test_bf16_weights_still_give_fp32_logits_and_input_gradients(timm_dir):
    clf = load_classifier(str(timm_dir), device="cpu", dtype=torch.bfloat16)
    assert clf.dtype == torch.bfloat16
    x = torch.rand(1, 3, 48, 48, requires_grad=True)
    logits = clf(x)
    assert logits.dtype == torch.float32
    logits[0, 0].backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_labels_argument_overrides_and_trained_on_argument_wins(timm_dir):
    clf = load_classifier(str(timm_dir), device="cpu", labels=["a", "b", "c"], trained_on="my note")
    assert clf.labels == ["a", "b", "c"] and clf.trained_on == "my note"
    with pytest.raises(UserError, match=r"`labels` has 2 names but `classifier` .* has 3 outputs"):
        load_classifier(str(timm_dir), device="cpu", labels=["a", "b"])


def test_classifier_wraps_an_in_process_timm_model():
    clf = Classifier(_tiny_timm(num_classes=4), source="in-process")
    assert clf.labels == ["class_0", "class_1", "class_2", "class_3"] and clf.kind == "timm"
    assert clf.data_config["input_size"] == (3, 160, 160)  # test_efficientnet's own pretrained_cfg
    assert clf(torch.rand(1, 3, 20, 20)).shape == (1, 4)


def test_embedded_digits_missing_names_the_trainer_script(tmp_path, monkeypatch):
    monkeypatch.setitem(clf_mod.EMBEDDED_CLASSIFIERS, "digits-guide", tmp_path / "absent")
    with pytest.raises(UserError, match=r"`classifier` 'digits-guide': .*`python scripts/train_digits_world\.py"):
        load_classifier("digits-guide", device="cpu")


def test_embedded_digits_resolve_to_the_shipped_directories(timm_dir, monkeypatch):
    monkeypatch.setitem(clf_mod.EMBEDDED_CLASSIFIERS, "digits-judge", timm_dir)
    clf = load_classifier("digits-judge", device="cpu")
    assert clf.source == "digits-judge" and clf.labels == LABELS and clf.trained_on == "digits train split (60%)"


# --------------------------------------------------------------------------------------------------------------------
# Pretrained timm names / hf-hub ids, served from a (fake, local) Hugging Face cache
# --------------------------------------------------------------------------------------------------------------------
def test_timm_name_and_hf_hub_id_load_from_the_cache_offline(empty_caches, tmp_path):
    import timm

    repo_id = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id  # "timm/test_efficientnet.r160_in1k"
    with pytest.raises(UserError, match=r"`classifier` 'test_efficientnet': .* not on this machine .* download it"):
        load_classifier("test_efficientnet", device="cpu")
    model = _tiny_timm(num_classes=1000)
    src = tmp_path / "snapshot"
    from timm.models import save_for_hf

    save_for_hf(model, str(src), safe_serialization=True)
    _fake_hf_cache(empty_caches / "hf", repo_id, src)
    x = torch.rand(1, 3, 64, 64)
    by_name = load_classifier("test_efficientnet", device="cpu")
    assert by_name.num_classes == 1000 and by_name.labels[0] == "tench, Tinca tinca"  # timm's ImageNet names
    assert by_name.trained_on.startswith("unknown") and "r160_in1k" in by_name.trained_on
    by_hub = load_classifier("hf-hub:" + repo_id, device="cpu")
    by_id = load_classifier(repo_id, device="cpu")  # an ORG/NAME id whose config.json is timm's
    assert by_hub.kind == by_id.kind == "timm"
    torch.testing.assert_close(by_hub(x), by_name(x))
    torch.testing.assert_close(by_id(x), by_name(x))


def test_local_files_only_never_asks_timm_to_download(empty_caches, tmp_path, monkeypatch):
    import timm
    import timm.models._hub as timm_hub
    from huggingface_hub import constants
    from timm.models import save_for_hf

    repo_id = timm.models.get_pretrained_cfg("test_efficientnet").hf_hub_id
    save_for_hf(_tiny_timm(num_classes=1000), str(tmp_path / "snapshot"), safe_serialization=True)
    _fake_hf_cache(empty_caches / "hf", repo_id, tmp_path / "snapshot")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as on a machine with network

    def no_network(*args, **kwargs):
        raise AssertionError("timm was asked to download")

    monkeypatch.setattr(timm_hub, "hf_hub_download", no_network)
    assert load_classifier("test_efficientnet", device="cpu", local_files_only=True).num_classes == 1000
    assert load_classifier("hf-hub:" + repo_id, device="cpu", local_files_only=True).num_classes == 1000


# --------------------------------------------------------------------------------------------------------------------
# transformers, and the MAE ViT whose head reads mean-pooled patch tokens
# --------------------------------------------------------------------------------------------------------------------
def test_transformers_dir_matches_the_models_own_processor(vit_dir):
    from transformers import ViTForImageClassification, ViTImageProcessor

    clf = load_classifier(str(vit_dir), device="cpu")
    assert clf.kind == "transformers" and clf.labels == LABELS
    assert clf.data_config["input_size"] == (3, 32, 32) and clf.data_config["crop_mode"] == "squash"
    assert clf.data_config["mean"] == (0.5, 0.4, 0.3)
    ref_model = ViTForImageClassification.from_pretrained(vit_dir).eval()
    img = _pil(45, 60, seed=5)
    pixel_values = ViTImageProcessor.from_pretrained(vit_dir)(img, return_tensors="pt").pixel_values
    with torch.no_grad():
        ref = ref_model(pixel_values=pixel_values).logits
        out = clf(_tensor(img))
    torch.testing.assert_close(out, ref, atol=0.02, rtol=0.01)
    feats = clf.features(_tensor(img))
    torch.testing.assert_close(ref_model.classifier(feats), out, atol=1e-5, rtol=1e-5)
    assert load_classifier("transformers:" + str(vit_dir), device="cpu").kind == "transformers"


def _mean_pool_reference(model, pixel_values):
    """The reference code's CustomViTForImageClassification: raw encoder output -> mean of patch tokens -> LN -> head."""
    captured = []
    handle = model.vit.layernorm.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    with torch.no_grad():
        stock = model(pixel_values=pixel_values).logits
    handle.remove()
    tokens = captured[0]
    with torch.no_grad():
        return model.classifier(model.vit.layernorm(tokens[:, 1:].mean(1))), stock


def test_vit_mae_mean_pooling_matches_the_reference_forward(vit_dir):
    from transformers import ViTForImageClassification

    clf = load_classifier("vit-mae:" + str(vit_dir), device="cpu")
    assert clf.kind == "vit-mae" and isinstance(clf.model, MeanPoolViT) and clf.labels == LABELS
    x = torch.rand(2, 3, 32, 32)
    ref, stock = _mean_pool_reference(ViTForImageClassification.from_pretrained(vit_dir).eval(), clf.preprocess(x))
    out = clf(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - stock).abs().max() > 1e-2  # the stock CLS pooling really is different
    torch.testing.assert_close(clf.model.classifier(clf.features(x)), out, atol=1e-5, rtol=1e-5)
    xg = x.clone().requires_grad_(True)
    clf(xg)[:, 1].sum().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in clf.parameters())


def test_mean_pooling_is_detected_from_the_saved_config(vit_dir, tmp_path):
    d = tmp_path / "custom"
    shutil.copytree(vit_dir, d)
    config = json.loads((d / "config.json").read_text())
    config["architectures"] = ["CustomViTForImageClassification"]
    (d / "config.json").write_text(json.dumps(config))
    assert load_classifier(str(d), device="cpu").kind == "vit-mae"
    config["architectures"] = ["ViTForImageClassification"]
    config["_name_or_path"] = "vesteinn/vit-mae-cub"  # a local snapshot of the CUB guide
    (d / "config.json").write_text(json.dumps(config))
    clf = load_classifier(str(d), device="cpu")
    assert clf.kind == "vit-mae" and "FULL CUB-200-2011 train split" in clf.trained_on


def test_cub_guide_hub_id_offline(vit_dir, empty_caches):
    with pytest.raises(UserError, match=r"`classifier` 'vesteinn/vit-mae-cub': .*not on this machine.*download it"):
        load_classifier("vesteinn/vit-mae-cub", device="cpu")
    _fake_hf_cache(empty_caches / "hf", "vesteinn/vit-mae-cub", vit_dir)
    clf = load_classifier("vesteinn/vit-mae-cub", device="cpu")
    assert clf.kind == "vit-mae" and clf.labels == LABELS
    assert "FULL CUB-200-2011 train split" in clf.trained_on and "not leak-free" in clf.trained_on
    assert load_classifier("transformers:vesteinn/vit-mae-cub", device="cpu").kind == "vit-mae"


def test_transformers_dir_without_processor_is_refused(vit_dir, tmp_path):
    d = tmp_path / "noproc"
    shutil.copytree(vit_dir, d)
    (d / "preprocessor_config.json").unlink()
    with pytest.raises(UserError, match=r"`classifier` .* has no preprocessor_config\.json.*save_pretrained"):
        load_classifier(str(d), device="cpu")


# --------------------------------------------------------------------------------------------------------------------
# torchvision and checkpoint files
# --------------------------------------------------------------------------------------------------------------------
def test_torchvision_default_weights_from_the_torch_hub_cache(empty_caches):
    import torchvision

    with pytest.raises(UserError, match=r"`classifier` 'torchvision:mobilenet_v3_small': .*not on this machine"):
        load_classifier("torchvision:mobilenet_v3_small", device="cpu")
    weights = torchvision.models.MobileNet_V3_Small_Weights.DEFAULT
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small().eval()
    cached = torch_hub_cached(weights.url)
    cached.parent.mkdir(parents=True)
    torch.save(model.state_dict(), cached)
    clf = load_classifier("torchvision:mobilenet_v3_small", device="cpu")
    assert clf.kind == "torchvision" and clf.labels == weights.meta["categories"]
    assert clf.data_config["input_size"] == (3, 224, 224) and clf.data_config["crop_pct"] == 224 / 256
    assert "MobileNet_V3_Small_Weights.IMAGENET1K_V1" in clf.trained_on
    img = _pil(250, 300, seed=6)
    with torch.no_grad():
        ref = model(weights.transforms()(_tensor(img)))
    torch.testing.assert_close(clf(_tensor(img)), ref, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(model.classifier[-1](clf.features(_tensor(img))), ref, atol=1e-3, rtol=1e-3)


def test_checkpoint_files_with_their_architecture(tmp_path):
    import torchvision

    model = _tiny_timm(num_classes=5, seed=1).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}, "epoch": 3},
               tmp_path / "train.pth")
    from safetensors.torch import save_file

    save_file(model.state_dict(), tmp_path / "w.safetensors")
    x = torch.rand(2, 3, 60, 60)
    a = load_classifier(f"test_efficientnet@{tmp_path / 'w.safetensors'}", device="cpu")
    b = load_classifier(f"timm:test_efficientnet@{tmp_path / 'train.pth'}", device="cpu", labels=list("vwxyz"))
    assert a.num_classes == 5 and a.labels[0] == "class_0" and b.labels == list("vwxyz")  # count read from the head
    assert a.trained_on.startswith("unknown: checkpoint")
    torch.testing.assert_close(a(x), b(x))
    with torch.no_grad():
        torch.testing.assert_close(a(x), model(a.preprocess(x)))
    torch.manual_seed(0)
    tv = torchvision.models.mobilenet_v3_small(num_classes=4).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    c = load_classifier(f"torchvision:mobilenet_v3_small@{tmp_path / 'tv.pt'}", device="cpu")
    assert c.kind == "torchvision" and c.num_classes == 4 and c.data_config["input_size"] == (3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(c(x), tv(c.preprocess(x)))


def test_checkpoint_errors(tmp_path):
    model = _tiny_timm()
    torch.save(model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(UserError, match=r"checkpoint file without an architecture: pass 'ARCH@"):
        load_classifier(str(tmp_path / "w.pth"), device="cpu")
    with pytest.raises(UserError, match=r"does not fit architecture 'test_resnet'"):
        load_classifier(f"test_resnet@{tmp_path / 'w.pth'}", device="cpu")
    with pytest.raises(UserError, match=r"checkpoint file .*nope\.pth' does not exist"):
        load_classifier(f"test_efficientnet@{tmp_path / 'nope.pth'}", device="cpu")
    with pytest.raises(UserError, match=r"'no_such_arch' is not a timm architecture"):
        load_classifier(f"no_such_arch@{tmp_path / 'w.pth'}", device="cpu")
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a pickled module, not a state dict
    with pytest.raises(UserError, match=r"could not be read .*save a plain state dict"):
        load_classifier(f"test_efficientnet@{tmp_path / 'pickled.pth'}", device="cpu")


# --------------------------------------------------------------------------------------------------------------------
# Bad sources
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "message"), [
    ("", r"`classifier` must be a timm name"),
    ("not_a_model_xyz", r"`classifier` 'not_a_model_xyz': not a known classifier: pass a timm name"),
    ("./no/such/dir", r"`classifier` './no/such/dir': no such directory: pass an existing directory"),
    ("resnet18.no_such_tag", r"timm has no pretrained weights 'resnet18\.no_such_tag'"),
    ("torchvision:no_such_net", r"'no_such_net' is not a torchvision model"),
    ("torchvision:resnet18.NO_SUCH", r"resnet18 has no weights 'NO_SUCH': use one of IMAGENET1K_V1"),
    ("timm:", r"names nothing after 'timm:'"),
    ("someone/absent-model", r"`classifier` 'someone/absent-model': .*not on this machine.*download it"),
])
def test_bad_sources_name_the_argument_value_and_fix(source, message, empty_caches):
    with pytest.raises(UserError, match=message):
        load_classifier(source, device="cpu")


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"`classifier` '.*': the directory has no config\.json: pass a timm directory"):
        load_classifier(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"has neither 'architecture' \(timm\) nor 'model_type'"):
        load_classifier(str(tmp_path), device="cpu")


def test_source_parsing_labels_and_agreement(timm_dir, caplog):
    from synthaug.classifier.source import check_label_agreement, declared_labels, parse_source, same_source

    assert parse_source("timm:resnet18@ck.pth").arch == "resnet18"
    assert parse_source(str(timm_dir)).kind == "dir" and parse_source("org/name").hub_id == "org/name"
    assert same_source("hf-hub:timm/ResNet18.a1_in1k", "timm/resnet18.a1_in1k")
    assert declared_labels(str(timm_dir)) == (LABELS, 3)
    ok = {"labels": LABELS, "count": 3, "what": "guide", "source": "g", "dataset": "d"}
    assert check_label_agreement([n.upper() for n in LABELS], **ok) == "labels"  # cleaned names agree
    swapped = [LABELS[1], LABELS[0], LABELS[2]]
    with pytest.raises(UserError, match=rf"2 of 3 differ; 0: dataset '{LABELS[1]}' vs guide '{LABELS[0]}'"):
        check_label_agreement(swapped, **ok)
    # A class given by all its names agrees with a label that is any of them (iNat folders, ImageNet descriptions)
    assert check_label_agreement([("tench", "n01440764")], labels=["tench, Tinca tinca"], count=1, what="guide",
                                 source="g", dataset="imagenet") == "labels"
    with caplog.at_level("WARNING"):
        assert check_label_agreement(swapped, labels=["class_0", "class_1", "class_2"], count=3, what="guide",
                                     source="g", dataset="d") == "count"
    assert "only its class count" in caplog.text
    with pytest.raises(UserError, match="predicts 4 classes but dataset 'd' has 3"):
        check_label_agreement(LABELS, labels=None, count=4, what="guide", source="g", dataset="d")


def test_every_kind_of_source_has_one_loader_and_its_error_gets_the_source_once(monkeypatch):
    from synthaug.classifier import load as load_mod
    from synthaug.classifier.source import parse_source
    from synthaug.errors import SourceError

    kinds = {parse_source(s).kind for s in ("digits-guide", "timm:resnet18", "hf-hub:org/name", "org/name",
                                            "transformers:org/name", "vit-mae:org/name", "torchvision:resnet18",
                                            "resnet18@ckpt.pth", "resnet18")}
    assert kinds <= set(load_mod.LOADERS)

    def refuses(src, local_files_only):
        raise SourceError("timm has no pretrained weights 'resnet18.nope'.")

    monkeypatch.setitem(load_mod.LOADERS, "timm", refuses)
    with pytest.raises(UserError, match=r"^`classifier` 'timm:resnet18\.nope': timm has no pretrained weights "
                                        r"'resnet18\.nope'\.$"):
        load_classifier("timm:resnet18.nope", device="cpu")
