"""Bad input to `build`: one-line UserError naming the argument, before any model loads; nothing marked done."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import buildworld as bw
import pytest

from synthaug.builder.driver import build
from synthaug.config import dump_yaml
from synthaug.errors import UserError


@pytest.fixture(scope="module")
def guide3(tmp_path_factory):
    _, guide = bw.save_world(bw.shared_dir(tmp_path_factory, "world"), num_classes=3)
    return guide


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch):
    """Validation must fail before any weights load: loading a model in these tests is itself a failure."""
    import synthaug.classifier
    import synthaug.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(synthaug.models, "load_diffusion", refuse)
    monkeypatch.setattr(synthaug.classifier, "load_classifier", refuse)


def _nothing_done(out):
    """No config, token, shard or index: the folder says nothing was built."""
    if not out.exists():
        return True
    names = {p.name for p in out.rglob("*")}
    return not names & {"config.yaml", "plan.json", "index.parquet", "classes.json"} and not any(
        n.endswith((".safetensors", "_stats.json", ".tar")) for n in names)


def _cfg(tmp_path, world, **extra):
    return bw.config(tmp_path / "out", *world, **extra)


def _sub(cfg, section, **changes):
    return replace(cfg, **{section: replace(getattr(cfg, section), **changes)})


# Each case: (id, how to make the config from a valid one, the message it must give).
CASES = [
    ("unknown-dataset", lambda c, t, w: replace(c, dataset="mnist-2"), r"`dataset` must be one of .* but is 'mnist-2'"),
    ("missing-root", lambda c, t, w: replace(c, dataset="cub", root=str(t / "nope")),
     r"Dataset not found or corrupted at .*nope"),
    ("bad-root-layout", lambda c, t, w: replace(c, dataset="cub", root=str(t)),
     r"Dataset not found or corrupted at .*: expected .*Point `root` at the extracted CUB_200_2011 folder"),
    ("unknown-class-name", lambda c, t, w: replace(c, classes="0,eleven"), r"`classes` entry 'eleven' is not a class"),
    ("class-range", lambda c, t, w: replace(c, classes="0-12"), r"`classes` range '0-12' is not within 0-9"),
    ("per-class-zero", lambda c, t, w: replace(c, per_class=0), r"`per_class` must be > 0 but is 0"),
    ("size-not-multiple-of-8", lambda c, t, w: _sub(c, "generate", height=30),
     r"`generate.height` and `generate.width` have to be positive and divisible by 8 but are 30 and 32"),
    ("unknown-scheduler", lambda c, t, w: replace(c, scheduler="turbo"), r"`scheduler` must be one of .* 'turbo'"),
    ("unknown-spacing", lambda c, t, w: replace(c, timestep_spacing="even"),
     r"`timestep_spacing` must be one of leading, linspace, trailing \(or null for the model.s\) but is .even."),
    ("bad-device", lambda c, t, w: replace(c, device="tpu:0"), r"`device` must be 'auto', 'cpu', 'cuda'"),
    ("bad-dtype", lambda c, t, w: replace(c, dtype="fp8"), r"`dtype` must be one of .* but is 'fp8'"),
    ("missing-model", lambda c, t, w: replace(c, model=str(t / "no-model")), r"`model` .*no-model.* does not exist"),
    ("model-dir-not-diffusers", lambda c, t, w: replace(c, model=str(w[1])),
     r"`model` .* has no model_index.json"),
    ("missing-guide", lambda c, t, w: replace(c, guide=str(t / "no-guide")), r"`guide` .*no-guide.* does not exist"),
    ("guide-dir-without-config", lambda c, t, w: replace(c, guide=str(t)),
     r"`guide` .* is a directory without config.json"),
    ("too-many-shots", lambda c, t, w: replace(c, method="ti", shots=500),
     r"`shots` is 500 but class 0 \('zero'\) has \d+ images in split 'train'"),
    ("zero-workers", lambda c, t, w: _sub(c, "run", num_workers=0), r"`run.num_workers` must be > 0"),
    ("unknown-method", lambda c, t, w: replace(c, method="lora"), r"`method` must be one of dct, ti, mcti"),
    # a CLIP whose text tower is not the model's text encoder: refused from the configs alone (this one has no weights)
    ("mcti-clip-mismatch", lambda c, t, w: _sub(replace(c, method="mcti"), "mcti", clip_model=_clip_config(t, 768)),
     (r"`mcti.clip_model` .* does not pair with `model` .*: its text tower is 768-d but the model's text encoder is "
      r"32-d\. Use the CLIP whose text tower is the model's text encoder")),
]


def _clip_config(folder, width):
    """A CLIP directory with a config only: enough for the pairing check, which loads nothing."""
    import json

    d = folder / f"clip{width}"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"text_config": {"hidden_size": width, "num_hidden_layers": 12}}))
    return str(d)


def test_mcti_clip_defaults_to_the_text_encoders_own(tmp_path):
    import json

    from synthaug.tokens.clip import default_clip_model

    for width, clip in ((768, "openai/clip-vit-large-patch14"), (1024, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")):
        (tmp_path / str(width) / "text_encoder").mkdir(parents=True)
        (tmp_path / str(width) / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": width}))
        assert default_clip_model(str(tmp_path / str(width))) == clip
    assert default_clip_model("digits") is None  # the embedded world's own CLIP
    assert default_clip_model("stabilityai/stable-diffusion-2-1-base") == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


@pytest.mark.parametrize("make,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_nothing_is_done(tmp_path, world, make, match):
    cfg = make(_cfg(tmp_path, world), tmp_path, world)
    with pytest.raises(UserError, match=match) as info:
        build(cfg, progress=False)
    assert "\n" not in str(info.value)
    assert _nothing_done(tmp_path / "out")


def test_guide_with_the_wrong_label_count(tmp_path, world, guide3):
    with pytest.raises(UserError, match=r"`guide` .*guide3.* predicts 3 classes but dataset 'digits' has 10: pass a "
                                        r"guide trained on this dataset's classes"):
        build(replace(_cfg(tmp_path, world), guide=str(guide3)), progress=False)
    assert _nothing_done(tmp_path / "out")


def test_output_that_is_a_file(tmp_path, world):
    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(UserError, match=r"`out` .* is a file, not a folder"):
        build(_cfg(tmp_path, world), progress=False)
    assert (tmp_path / "out").read_text() == "not a folder"


def test_output_folder_with_other_files(tmp_path, world):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "holiday.jpg").write_bytes(b"\xff\xd8")
    for overwrite in (False, True):  # --overwrite never deletes a folder that is not a synthaug build
        with pytest.raises(UserError, match=r"is not empty and holds no synthaug build .*found holiday.jpg"):
            build(_cfg(tmp_path, world), overwrite=overwrite, progress=False)
    assert (tmp_path / "out" / "holiday.jpg").is_file() and _nothing_done(tmp_path / "out")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_output_not_writable(tmp_path, world):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(UserError, match=r"`out` .* is not writable"):
            build(bw.config(locked / "out", *world), progress=False)
    finally:
        locked.chmod(0o700)


def test_existing_build_with_another_config_is_refused(tmp_path, world):
    out = tmp_path / "out"
    out.mkdir()
    old = _cfg(tmp_path, world)
    (out / "config.yaml").write_text(dump_yaml(old))
    (out / "tokens").mkdir()
    (out / "tokens" / "000.safetensors").write_bytes(b"a token of the old build")
    new = _sub(replace(old, per_class=5), "dct", lr=0.01)
    with pytest.raises(UserError, match=r"holds a build made with a different config \(dct.lr: 0.001 -> 0.01; "
                                        r"per_class: 4 -> 5\): pass --overwrite to discard it"):
        build(new, progress=False)
    assert (out / "config.yaml").read_text() == dump_yaml(old)
    assert (out / "tokens" / "000.safetensors").read_bytes() == b"a token of the old build"
    assert not (out / "plan.json").exists()


def test_ray_missing_is_one_line_naming_the_extra_and_the_flag(tmp_path, world, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(UserError, match=r'Ray is not installed .*: install it with `pip install "synthaug\[ray\]"`, '
                                        r"or pass --executor local"):
        build(_cfg(tmp_path, world, **{"run.executor": "ray"}), progress=False)
    assert _nothing_done(tmp_path / "out")


def test_executor_auto_takes_ray_only_where_it_is_installed(monkeypatch, caplog):
    import logging

    from synthaug.builder.cluster import resolve_executor
    from synthaug.config import RunConfig

    assert RunConfig().executor == "auto" and resolve_executor(RunConfig(executor="local")) == "local"
    assert resolve_executor(RunConfig()) == "ray"  # installed here
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with caplog.at_level(logging.INFO, logger="synthaug.builder.cluster"):
        assert resolve_executor(RunConfig()) == "local"
    assert 'Ray is not installed, so the build runs in this process (`pip install "synthaug[ray]"`' in caplog.text
    assert resolve_executor(RunConfig(ray_address="auto")) == "ray"  # a cluster needs Ray: `import_ray` says so


def test_ray_not_installed_is_said_once_per_build(tmp_path, world, monkeypatch, caplog):
    import logging

    from synthaug.builder.driver import build

    monkeypatch.setitem(sys.modules, "ray", None)
    cfg = bw.config(tmp_path / "out", *world, classes="0", per_class=2, baseline=False, **{"run.executor": "auto"})
    with caplog.at_level(logging.INFO, logger="synthaug"):
        assert build(cfg, progress=False).executor == "local"
    assert caplog.text.count("Ray is not installed") == 1


def test_cli_prints_the_error_on_one_line_and_exits_2(tmp_path, world):
    cfg_file = bw.write_config(tmp_path / "config.yaml", tmp_path / "out", *world)
    done = subprocess.run([sys.executable, "-m", "synthaug.cli", "build", "--config", str(cfg_file), "--classes",
                           "0,eleven"], cwd=bw.REPO, env=bw.cli_env(), capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("synthaug build: error: `classes` entry 'eleven' is not a class")
    assert "Traceback" not in done.stderr
    assert _nothing_done(tmp_path / "out")


# --------------------------------------------------------------------------------------------------------------------
# --overwrite discards synthaug builds only; config.yaml of a build that made nothing is replaceable
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config_text,reason", [
    ("", r"its config.yaml holds NoneType"),
    ("name: my project\nversion: 2\n", r"its config.yaml lacks dataset, model, guide, method"),
    (("dataset: digits\nmodel: x\nguide: y\nmethod: dct\nper_class: 1\nout: o\ndct: {}\ngenerate: {}\nshards: {}\n"
      "run: {}\nextra: 1\n"), r"its config.yaml is not a config of this synthaug: Unknown config key\(s\) extra"),
    ("[1, 2\n", r"its config.yaml is not readable YAML"),
])
def test_overwrite_refuses_a_folder_that_is_not_a_build(tmp_path, world, config_text, reason):
    out = tmp_path / "out"
    (out / "src").mkdir(parents=True)
    (out / "config.yaml").write_text(config_text)
    (out / "src" / "main.py").write_text("print('mine')\n")
    (out / "index.parquet").write_bytes(b"a file with a build's name")
    before = sorted((str(p.relative_to(out)), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    for overwrite in (True, False):
        with pytest.raises(UserError, match=r"`out` .* holds a config.yaml but is not a synthaug build \(" + reason):
            build(_cfg(tmp_path, world), overwrite=overwrite, progress=False)
    assert sorted((str(p.relative_to(out)), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before


def test_overwrite_needs_a_plan_to_prove_the_build(tmp_path, world):
    cfg = _cfg(tmp_path, world)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(dump_yaml(replace(cfg, per_class=9)))  # a copied config.yaml, no plan.json
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"has a synthaug config.yaml but no readable plan.json, so it is not proven"):
        build(cfg, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"


def _planned_folder(cfg):
    """A folder as a build leaves it when it failed before finishing its first job: config.yaml and plan.json."""
    from synthaug.builder.plan import plan, plan_file
    from synthaug.builder.validate import check_build
    from synthaug.layout import write_plan

    checked = check_build(cfg, False)
    checked.out.mkdir(parents=True)
    (checked.out / "config.yaml").write_text(dump_yaml(cfg))
    write_plan(checked.out, plan_file(cfg, checked.class_names, plan(cfg, checked.class_names, checked.selected)))
    return checked.out


def test_a_build_that_made_nothing_takes_a_corrected_config(tmp_path, world):
    from synthaug.builder.validate import check_build

    old = _sub(_cfg(tmp_path, world), "dct", lr=0.5)
    out = _planned_folder(old)
    fixed = _sub(old, "dct", lr=0.001)
    assert check_build(fixed, False).mode == "replace"
    # with a token made, a change that concerns tokens is refused; one that concerns only images is not, until a
    # shard is finished
    (out / "tokens").mkdir()
    (out / "tokens" / "000.safetensors").write_bytes(b"token")
    with pytest.raises(UserError, match=r"holds a build made with a different config \(dct.lr: 0.5 -> 0.001\)"):
        check_build(fixed, False)
    more = _sub(replace(old, per_class=6), "shards", quality=80)
    assert check_build(more, False).mode == "replace"
    assert check_build(_sub(old, "dct", trust="fallback"), False).mode == "replace"  # the tokens stay valid
    assert check_build(replace(_sub(old, "dct", trust="fallback", trust_images=4), shots=3, shots_seed=2),
                       False).mode == "replace"  # the user's k images decide only the verdict and real starts
    (out / "meta").mkdir()
    (out / "meta" / "_dct-00000_stats.json").write_text("{}")
    with pytest.raises(UserError, match=r"different config \(per_class: 4 -> 6; shards.quality: 95 -> 80\)"):
        check_build(more, False)
    assert check_build(old, False).mode == "resume"
    # a build in the first format (shards/00000.tar with its parquet and stats beside it) is refused in one line
    (out / "shards").mkdir()
    (out / "shards" / "00000_stats.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds a build in synthaug's format 1 .*: rebuild it with `synthaug build "
                                        r"--config .*config.yaml --overwrite`"):
        check_build(old, False)


def test_output_not_writable_is_found_by_trying(tmp_path, world, monkeypatch):
    """Permission bits say nothing for root (and nothing of read-only mounts): the check writes a probe file."""
    if os.name != "posix":
        pytest.skip("needs POSIX permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    monkeypatch.setattr(os, "access", lambda *a, **k: True)  # what root is told
    try:
        if os.geteuid() == 0:  # root writes through 0o500: use a folder nobody can write
            target = next((p for p in ("/sys", "/proc/sys") if Path(p).is_dir() and not _can_create(Path(p))), None)
            if target is None:
                pytest.skip("no unwritable folder for root here")
            out = Path(target) / "synthaug-out"
        else:
            out = locked / "out"
        with pytest.raises(UserError, match=r"`out` .* is not writable \(.*\): choose a folder you can write to"):
            build(bw.config(out, *world), progress=False)
        assert not out.exists()
    finally:
        locked.chmod(0o700)


def _can_create(folder):
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, world, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=rf"`device` is '{device}' but this machine has no usable CUDA GPU"):
            build(replace(_cfg(tmp_path, world), device=device), progress=False)
    assert _nothing_done(tmp_path / "out")


def _image_folder(root, names):
    from PIL import Image

    for n in names:
        (root / n).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / n / f"{i}.png")
    return root


def test_a_changed_dataset_is_refused_on_resume_naming_the_classes(tmp_path, world, guide3):
    data = _image_folder(tmp_path / "data", ["000.zero", "001.one", "002.two"])
    cfg = replace(_cfg(tmp_path, world), dataset="imagefolder", root=str(data), classes=None,
                  guide=str(guide3))
    out = _planned_folder(cfg)
    (out / "tokens").mkdir()
    (out / "tokens" / "000.safetensors").write_bytes(b"token of 'zero'")
    (data / "001.one").rename(data / "001.uno")
    with pytest.raises(UserError, match=r"`dataset` 'imagefolder' at .* changed since the build in .* was planned "
                                        r"\(class 1 was 'one', now 'uno'\); its tokens and shards are filed by "
                                        r"class index") as info:
        build(cfg, progress=False)
    assert "\n" not in str(info.value)
    _image_folder(data, ["003.zz"])
    with pytest.raises(UserError, match=r"class 1 was 'one', now 'uno'; added 'zz'"):
        build(cfg, progress=False)
    assert (out / "tokens" / "000.safetensors").read_bytes() == b"token of 'zero'"


# --------------------------------------------------------------------------------------------------------------------
# Untrusted files: weights are read as tensors only
# --------------------------------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this runs a command: what a hostile weights file does under torch.load(weights_only=False)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_fid_weights_never_run_code_from_the_file(tmp_path, monkeypatch):
    import torch

    pytest.importorskip("torch_fidelity")
    from synthaug.evaluate.fid import INCEPTION_FILE, inception_extractor

    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": _RunsCode(marker)}, evil)
    with pytest.raises(UserError, match=r"`inception_weights` .*weights.pth' is not a plain weights file \(torch.load "
                                        r"with weights_only=True refused it") as info:
        inception_extractor(evil, device="cpu")
    assert "\n" not in str(info.value) and not marker.exists()
    # the default cache path gets the same treatment
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / INCEPTION_FILE).write_bytes(evil.read_bytes())
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    with pytest.raises(UserError, match=r"is not a plain weights file"):
        inception_extractor(None, device="cpu")
    assert not marker.exists()
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match=r"holds list, not a state dict of tensors"):
        inception_extractor(tmp_path / "list.pth", device="cpu")
    torch.save({"conv.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match=r"is not torch-fidelity's Inception-v3 FID weights"):
        inception_extractor(tmp_path / "other.pth", device="cpu")


def test_fid_weights_that_are_plain_tensors_load(tmp_path):
    import torch

    pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from synthaug.evaluate.fid import inception_extractor

    class _Unloaded(FeatureExtractorInceptionV3):  # random weights with the real keys and shapes
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    torch.save({}, tmp_path / "empty.pth")
    torch.manual_seed(0)
    state = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    torch.save(state.state_dict(), tmp_path / "weights.pth")
    extractor = inception_extractor(tmp_path / "weights.pth", device="cpu")
    assert torch.equal(extractor.module.fc.weight, state.fc.weight)
    assert extractor(torch.rand(1, 3, 32, 32)).shape == (1, 2048)
