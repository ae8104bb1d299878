"""What a hostile or careless user does to a build folder and its inputs: each case reproduces one finding of an
adversarial round and holds the fixed behaviour (a one-line error, a check that catches the damage, or nothing
deleted or written that synthaug did not make).

Tiny offline world (`buildworld`): 3 digit classes, 4 images each + the baseline, 2 images per shard.
"""

import shutil
import tarfile

import buildworld as bw
import pytest

from synthaug.builder.driver import build
from synthaug.commands import inspect
from synthaug.errors import UserError


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _small(out, world, **extra):
    """One class, two images, no baseline: the cheapest real build."""
    return bw.config(out, *world, classes="0", per_class=2, baseline=False, **extra)


# --------------------------------------------------------------------------------------------------------------------
# verify: every recorded checksum is compared
# --------------------------------------------------------------------------------------------------------------------
def test_a_changed_label_member_fails_verify_and_is_redone_on_resume(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    tar = out / "shards" / "dct-00001.tar"
    with tarfile.open(tar) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(".cls"))
    data = bytearray(tar.read_bytes())
    assert data[member.offset_data:member.offset_data + 1] == b"0"
    data[member.offset_data] = ord("7")  # the sample now claims class 7; the tar keeps its size
    tar.write_bytes(bytes(data))
    result = inspect(out, verify=True)
    assert not result.ok and any("dct-00001.tar" in p and "sha256" in p and "label" in p for p in result.problems)
    resumed = build(bw.config(out, *world), progress=False)  # index.parquet still there: the finished-build path
    assert resumed.images_new == 2 and bw.snapshot(out) == bw.snapshot(reference)


def test_a_changed_index_row_fails_verify(tmp_path, reference):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = _copy(reference, tmp_path / "build")
    table = pq.read_table(out / "index.parquet")
    labels = table.column("class_index").to_pylist()
    labels[5] = (labels[5] + 1) % 3  # SynthAugDataset would serve the wrong label for this sample
    table = table.set_column(table.column_names.index("class_index"), "class_index",
                             pa.array(labels, table.schema.field("class_index").type))
    pq.write_table(table, out / "index.parquet")
    result = inspect(out, verify=True)
    key = table.column("key")[5].as_py()
    assert not result.ok and any("index.parquet" in p and key in p and "differ" in p for p in result.problems)


def test_a_replaced_token_file_fails_verify(tmp_path, reference):
    import torch

    from synthaug.tokens.io import load_tokens, save_tokens

    out = _copy(reference, tmp_path / "build")
    token = load_tokens(out / "tokens" / "001.safetensors")["<synthaug-001>"]
    save_tokens({"<synthaug-001>": token + 1e-3}, out / "tokens" / "001.safetensors")
    problems = inspect(out, verify=True).problems
    assert any("001.safetensors" in p and "token_sha256" in p for p in problems)
    assert any("tokens.safetensors" in p and "<synthaug-001>" in p for p in problems)
    # the all-tokens file alone
    out2 = _copy(reference, tmp_path / "build2")
    every = load_tokens(out2 / "tokens" / "tokens.safetensors")
    every["<synthaug-002>"] = torch.zeros_like(every["<synthaug-002>"])
    save_tokens(every, out2 / "tokens" / "tokens.safetensors")
    problems = inspect(out2, verify=True).problems
    assert len(problems) == 1 and "tokens.safetensors" in problems[0] and "<synthaug-002>" in problems[0]


# --------------------------------------------------------------------------------------------------------------------
# --overwrite: resumable, and only inside the folder
# --------------------------------------------------------------------------------------------------------------------
def test_an_interrupted_overwrite_is_finished_by_the_same_command(tmp_path, world, reference, monkeypatch):
    from synthaug import layout

    out = _copy(reference, tmp_path / "build")
    real_write = layout.write_text

    def interrupted(path, text):  # Ctrl-C after the clearing deleted every build file, config.yaml included
        if path.name == "config.yaml":
            raise KeyboardInterrupt
        real_write(path, text)

    monkeypatch.setattr(layout, "write_text", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build(_small(out, world), overwrite=True, progress=False)
    monkeypatch.setattr(layout, "write_text", real_write)
    assert not (out / "config.yaml").exists()
    with pytest.raises(UserError, match=r"`out` .* `--overwrite` was interrupted .*: rerun with --overwrite"):
        build(_small(out, world), progress=False)
    result = build(_small(out, world), overwrite=True, progress=False)
    assert result.ok and result.images == 2 and not (out / ".overwriting").exists()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["dct-00000.tar"]
    assert sorted(p.name for p in (out / "meta").iterdir()) == ["_dct-00000_stats.json", "dct-00000.parquet"]


# --------------------------------------------------------------------------------------------------------------------
# A model folder never runs its own code
# --------------------------------------------------------------------------------------------------------------------
_HOSTILE = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\nfrom transformers import ViTConfig as Cfg\n"


def _with_auto_map(folder, config_name, marker):
    import json

    (folder / "hostile.py").write_text(_HOSTILE.format(marker=str(marker)))
    config = json.loads((folder / config_name).read_text())
    config["auto_map"] = {"AutoConfig": "hostile.Cfg", "AutoModelForImageClassification": "hostile.Cfg"}
    (folder / config_name).write_text(json.dumps(config))


def test_a_guide_or_judge_with_auto_map_is_refused_without_running_it(tmp_path):
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from synthaug.classifier import load_classifier

    torch.manual_seed(0)
    guide = tmp_path / "guide"
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=37, num_labels=3)).save_pretrained(guide)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(guide)
    assert load_classifier(str(guide), device="cpu").kind == "transformers"
    marker = tmp_path / "ran.txt"
    _with_auto_map(guide, "config.json", marker)
    with pytest.raises(UserError, match=r"`classifier` .*guide.*: its config.json has `auto_map` \(AutoConfig: "
                                        r"hostile.Cfg.*synthaug never runs a model's own code"):
        load_classifier(str(guide), device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("config_name", ["config.json", "tokenizer_config.json"])
def test_a_clip_model_with_auto_map_is_refused_without_running_it(tmp_path, config_name):
    from synthaug.tokens.clip import load_clip

    clip = bw.save_clip(tmp_path)
    if config_name == "tokenizer_config.json":
        (clip / config_name).write_text("{}")
    marker = tmp_path / "ran.txt"
    _with_auto_map(clip, config_name, marker)
    with pytest.raises(UserError, match=rf"`mcti.clip_model` .*: its {config_name} has `auto_map`"):
        load_clip(str(clip))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------------
# Sizes and plans that cannot be
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "match"), [
    ({"per_class": 10_000_000_000}, r"`per_class` must be <= 10,000,000 \(images per class\) but is 10,000,000,000"),
    ({"per_class": 5_000_000, "shards.samples_per_shard": 1},
     r"`shards.samples_per_shard` 1 gives 5,000,000 shards per class .* raise shards.samples_per_shard"),
])
def test_a_huge_per_class_is_refused_at_once(tmp_path, world, extra, match):
    import time

    t0 = time.perf_counter()
    with pytest.raises(UserError, match=match):
        build(bw.config(tmp_path / "out", *world, **extra), progress=False)
    assert time.perf_counter() - t0 < 5 and not (tmp_path / "out").exists()


def _edit_plan(out, edit):
    import json

    data = json.loads((out / "plan.json").read_text())
    edit(data)
    (out / "plan.json").write_text(json.dumps(data))


def test_a_cut_plan_is_not_a_complete_build(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    _edit_plan(out, lambda d: d.update(jobs=d["jobs"][:1]))
    assert not inspect(out).complete
    result = build(bw.config(out, *world), progress=False)  # the full path: the plan is written again
    assert result.ok and (result.classes, result.classes_done, result.images_new) == (3, 3, 0)
    assert bw.snapshot(out) == bw.snapshot(reference)


@pytest.mark.parametrize("damage", ["huge-shard-id", "missing-chunk"])
def test_a_damaged_plan_is_not_trusted(tmp_path, world, reference, damage):
    from synthaug.layout import read_plan

    out = _copy(reference, tmp_path / "build")
    if damage == "huge-shard-id":
        _edit_plan(out, lambda d: d["jobs"][0]["shards"][0].update(shard_id=10**400))
    else:
        _edit_plan(out, lambda d: d["jobs"][1].update(shards=d["jobs"][1]["shards"][1:]))
    assert read_plan(out) is None
    with pytest.raises(UserError, match=r"has no readable plan.json"):
        inspect(out)
    result = build(bw.config(out, *world), progress=False)
    assert result.ok and result.images_new == 0 and bw.snapshot(out) == bw.snapshot(reference)


# --------------------------------------------------------------------------------------------------------------------
# Ray addresses that lead nowhere: seconds and one line, not minutes and a traceback
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("address", "match"), [
    ("127.0.0.1:1", r"`run.ray_address` '127.0.0.1:1': nothing accepts connections there .*ray start --head"),
    ("ray://127.0.0.1:1", r"`run.ray_address` 'ray://127.0.0.1:1': nothing accepts connections there"),
    ("http//nowhere", r"`run.ray_address` 'http//nowhere' is not an address Ray takes: pass 'auto'"),
    ("localhost:99999", r"`run.ray_address` 'localhost:99999' is not an address Ray takes"),
])
def test_an_unreachable_or_invalid_ray_address_fails_in_seconds(tmp_path, world, address, match):
    import time

    t0 = time.perf_counter()
    with pytest.raises(UserError, match=match):
        build(bw.config(tmp_path / "out", *world, **{"run.executor": "ray", "run.ray_address": address}),
              progress=False)
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "out" / "config.yaml").exists()


def test_the_cli_says_an_unreachable_ray_address_on_one_line(tmp_path, world, capsys):
    from synthaug.cli import main

    cfg_file = bw.write_config(tmp_path / "config.yaml", tmp_path / "out", *world)
    assert main(["build", "--config", str(cfg_file), "--executor", "ray", "--ray-address", "127.0.0.1:1", "-q"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("synthaug build: error: `run.ray_address` '127.0.0.1:1': nothing "
                                               "accepts connections there")


def test_an_unreachable_ray_address_on_resume_names_the_resume_command(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    (out / "meta" / "_dct-00003_stats.json").unlink()
    with pytest.raises(UserError, match=r"nothing accepts connections there .* resume with: synthaug build --config "):
        build(bw.config(out, *world, **{"run.executor": "ray", "run.ray_address": "127.0.0.1:1"}), progress=False)


def test_ray_failing_to_attach_or_start_is_one_line(tmp_path, monkeypatch):
    import ray

    from synthaug.builder import cluster

    def refuse(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance.\nmore lines")

    monkeypatch.setattr(ray, "init", refuse)
    attach = r"^`run.ray_address` 'auto': Ray could not attach \(ConnectionError: Could not find any running Ray " \
             r"instance.\): .*then resume with: X\.$"
    with pytest.raises(UserError, match=attach), cluster.ray_session("auto", "resume with: X"):
        pass
    monkeypatch.setattr(cluster, "init_local_ray", lambda ray: refuse())
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    start = r"^`run.executor` 'ray': a local Ray could not start .*--executor local; then resume with: X\.$"
    with pytest.raises(UserError, match=start), cluster.ray_session(None, "resume with: X"):
        pass


# --------------------------------------------------------------------------------------------------------------------
# Damaged files are not trusted
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("field", "value"), [("tar", "../../../../etc/passwd"), ("num_samples", -5),
                                              ("parquet_sha256", "x"), ("shard", 4)])
def test_a_damaged_stats_file_is_redone_and_never_copied(tmp_path, world, reference, field, value):
    import json

    out = _copy(reference, tmp_path / "build")
    stats = out / "meta" / "_dct-00003_stats.json"
    data = json.loads(stats.read_text())
    data[field] = value
    stats.write_text(json.dumps(data))
    assert any("00003" in p and "stats file unreadable" in p for p in inspect(out, verify=True).problems)
    result = build(bw.config(out, *world), progress=False)
    assert result.ok and result.images_new == 2
    assert bw.snapshot(out) == bw.snapshot(reference) and "passwd" not in (out / "_info.json").read_text()


# --------------------------------------------------------------------------------------------------------------------
# Token files in the wrong place, or damaged
# --------------------------------------------------------------------------------------------------------------------
def test_a_token_file_holding_another_class_token_is_refused(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    shutil.copy(out / "tokens" / "000.safetensors", out / "tokens" / "001.safetensors")
    assert any("001.safetensors" in p and "<synthaug-001>" in p for p in inspect(out, verify=True).problems)
    (out / "tokens" / "tokens.safetensors").unlink()  # the finishing step runs again
    with pytest.raises(UserError, match=r"Token file .*001.safetensors holds <synthaug-000>, but its class's token "
                                        r"is <synthaug-001>: delete .*001.safetensors and rerun `synthaug build "
                                        r"--config .*` \(the token is learned again\)"):
        build(bw.config(out, *world), progress=False)
    assert not (out / "tokens" / "tokens.safetensors").exists()


def test_a_damaged_token_file_says_delete_it_and_run_again(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    (out / "tokens" / "002.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (out / "meta" / "_dct-00005_stats.json").unlink()  # class 2 has work left: its worker loads the token
    with pytest.raises(UserError, match=r"Token file .*002.safetensors.* is not a valid safetensors file .*: "
                                        r"delete .*002.safetensors and rerun `synthaug build --config"):
        build(bw.config(out, *world), progress=False)


# --------------------------------------------------------------------------------------------------------------------
# A full disk, a read-only folder: one line, and a resume that makes the same bytes
# --------------------------------------------------------------------------------------------------------------------
def _full_disk(monkeypatch, *suffixes):
    """`os.replace` of atomic writes to names ending in one of `suffixes` fails as on a full disk."""
    import errno
    import os

    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(suffixes):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("suffixes", [(".tar",), (".tar", "failures.json"), ("index.parquet",)])
def test_a_full_disk_is_one_line_and_the_resume_is_identical(tmp_path, world, reference, monkeypatch, suffixes):
    from synthaug.builder.driver import BuildFailed

    out = _copy(reference, tmp_path / "build")
    (out / "meta" / "_dct-00003_stats.json").unlink()
    resume = r"resume with: synthaug build --config "
    with monkeypatch.context() as m:
        _full_disk(m, *suffixes)
        if suffixes == (".tar",):  # the job fails every retry: failures.json and the resume line (exit 1)
            with pytest.raises(BuildFailed, match=r"failed every retry .*" + resume):
                build(bw.config(out, *world), progress=False)
            assert "No space left on device" in (out / "failures.json").read_text()
        else:  # nothing more can be written: one line with the resume command (exit 2)
            with pytest.raises(UserError, match=rf"^`out` .*: No space left on device \(.*{suffixes[-1]}\): free "
                                                rf"space there \(or make it writable\), then {resume}"):
                build(bw.config(out, *world), progress=False)
    result = build(bw.config(out, *world), progress=False)
    assert result.ok and bw.snapshot(out) == bw.snapshot(reference)


def _read_only(monkeypatch, folder):
    """Creating anything under `folder` fails as on a read-only file system (root ignores permission bits)."""
    import errno
    import os

    real_mkdir, real_open = os.mkdir, os.open

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return (real_mkdir if refuse.mkdir else real_open)(path, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        refuse.mkdir = True
        return refuse(path, *args, **kwargs)

    def open_(path, *args, **kwargs):
        refuse.mkdir = False
        return refuse(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


def test_report_and_export_to_a_read_only_folder_are_one_line(tmp_path, reference, monkeypatch):
    from synthaug.commands import export_tokens
    from synthaug.report import write_report

    locked = tmp_path / "locked"
    _read_only(monkeypatch, locked)
    with pytest.raises(UserError, match=r"^`out` .*locked/report': Read-only file system .*: pass --out a folder you "
                                        r"can write to"):
        write_report(reference, out=locked / "report", progress=False)
    with pytest.raises(UserError, match=r"^`dest` .*locked/export': Read-only file system .*: pass --dest a folder"):
        export_tokens(reference, dest=locked / "export")


def test_export_checks_every_token_before_writing_any(tmp_path, reference):
    from synthaug.commands import export_tokens

    out = _copy(reference, tmp_path / "build")
    (out / "tokens" / "002.safetensors").write_bytes(b"damaged")
    with pytest.raises(UserError, match=r"002.safetensors"):
        export_tokens(out, dest=tmp_path / "export")
    assert not (tmp_path / "export").exists()


# --------------------------------------------------------------------------------------------------------------------
# Only what synthaug wrote is deleted, and only inside --out
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("linked", ["tokens", "shards", "meta"])
def test_overwrite_refuses_a_linked_tokens_or_shards_folder(tmp_path, world, reference, linked):
    out = _copy(reference, tmp_path / "build")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(out / linked, elsewhere)
    (out / linked).symlink_to(elsewhere)
    (elsewhere / ".tmp-dct-00000.tar.abcdefgh").write_bytes(b"x")
    before = sorted(p.name for p in elsewhere.iterdir())
    with pytest.raises(UserError, match=rf"`out` .*: {linked}/ is a symbolic link to .*elsewhere, and --overwrite "
                                        r"deletes only inside the build folder"):
        build(_small(out, world), overwrite=True, progress=False)
    assert sorted(p.name for p in elsewhere.iterdir()) == before


def test_a_resume_keeps_a_users_tmp_files(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    mine = [out / ".tmp-notes", out / "tokens" / ".tmp-backup.safetensors", out / "shards" / ".tmp-x"]
    leftovers = [out / ".tmp-plan.json.k2j4h1x_", out / "shards" / ".tmp-dct-00003.tar.a1b2c3d4"]
    for p in mine + leftovers:
        p.write_bytes(b"x")
    (out / "meta" / "_dct-00003_stats.json").unlink()
    assert build(bw.config(out, *world), progress=False).ok
    assert all(p.exists() for p in mine) and not any(p.exists() for p in leftovers)


@pytest.mark.parametrize("kind", ["dangling-link", "link-to-a-file", "directory"])
def test_a_lock_that_is_not_a_file_is_one_line(tmp_path, world, kind):
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "outside-lock"
    if kind == "link-to-a-file":
        target.write_text("a user's file")
    if kind == "directory":
        (out / ".lock").mkdir()
    else:
        (out / ".lock").symlink_to(target)
    with pytest.raises(UserError, match=r"`out` .*: its lock file .*\.lock cannot be opened .*: remove .*\.lock and "
                                        r"run again"):
        build(_small(out, world), progress=False)
    assert (target.read_text() == "a user's file") if kind == "link-to-a-file" else not target.exists()


def test_generate_never_overwrites_an_earlier_runs_metadata(tmp_path, world):
    from synthaug.commands import generate_to_folder

    dest = tmp_path / "images"
    dest.mkdir()
    (dest / "metadata.jsonl").write_text('{"key": "mine"}\n')
    with pytest.raises(UserError, match=r"`--dest` .*images' already holds metadata.jsonl .*: pass a new or empty "
                                        r"folder"):
        generate_to_folder(_small(tmp_path / "out", world), tokens=None, dest=str(dest), progress=False)
    assert (dest / "metadata.jsonl").read_text() == '{"key": "mine"}\n'


def test_a_decompression_bomb_in_a_shard_is_one_line(reference, monkeypatch):
    from PIL import Image

    from synthaug.mix import SynthAugDataset
    from synthaug.shards import ShardError

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 32x32 image now claims 10x PIL's limit
    with pytest.raises(ShardError, match=r"Image .* cannot be decoded \(Image size \(1024 pixels\) exceeds limit"):
        SynthAugDataset(reference)[0]


# --------------------------------------------------------------------------------------------------------------------
# Bad input caught before any work, and never guessed
# --------------------------------------------------------------------------------------------------------------------
def test_a_class_folder_without_a_name_is_refused_before_any_work(tmp_path):
    from PIL import Image

    from synthaug.datasets.catalog import get_dataset

    for folder in ("000.Cat", "001."):
        (tmp_path / "data" / folder).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / folder / "a.png")
    with pytest.raises(UserError, match=r"`root` .*: class folder '001.' has no name once its number prefix is "
                                        r"dropped .*: rename it, e.g. to '001.Some_class'"):
        get_dataset("imagefolder", str(tmp_path / "data"), None)


def test_a_class_name_that_matches_two_classes_is_refused():
    from synthaug.datasets.select import select_classes

    names = ["Cat", "cat", "dog"]
    assert select_classes(names, "cat") == [1] and select_classes(names, "Cat") == [0]
    assert select_classes(names, "DOG") == [2]
    with pytest.raises(UserError, match=r"`classes` entry 'CAT' matches 2 classes \(0 'Cat', 1 'cat'\): give the "
                                        r"exact name or the index"):
        select_classes(names, "CAT")


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    from synthaug.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("per_class: 10\ndct:\n  lr: 0.001\nper_class: 1000\n")
    with pytest.raises(UserError, match=r"`--config` .*c.yaml' is not valid YAML: key 'per_class' is given twice "
                                        r"\(lines 1 and 4\): keep one"):
        load_config(path)
    path.write_text("dct:\n  lr: 0.001\n  lr: 0.01\n")
    with pytest.raises(UserError, match=r"key 'lr' is given twice \(lines 2 and 3\)"):
        load_config(path)


def test_a_build_with_a_damaged_config_says_how_to_go_on(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    (out / "config.yaml").write_text("dataset: [unclosed\n")
    with pytest.raises(UserError, match=r"`out` .* holds a synthaug build whose config.yaml is damaged \(its "
                                        r"config.yaml is not readable YAML.*\): restore config.yaml to resume it, or "
                                        r"pass --overwrite"):
        build(_small(out, world), progress=False)
    result = build(_small(out, world), overwrite=True, progress=False)
    assert result.ok and result.images == 2


def test_inspect_prints_no_terminal_escape_codes(tmp_path, reference):
    import json

    out = _copy(reference, tmp_path / "build")
    plan = json.loads((out / "plan.json").read_text())
    plan["jobs"][0]["name"] = "zero\x1b]0;pwned\x07\x1b[2J"
    (out / "plan.json").write_text(json.dumps(plan))
    (out / "failures.json").write_text(json.dumps({"failed": [{"class_index": 1, "name": "\x1b[31mone",
                                                              "attempts": 1, "error": "boom\x1b[0m"}]}))
    text = inspect(out).summary()
    assert "\x1b" not in text and "\x07" not in text
    assert "zero\\x1b]0;pwned" in text and "boom\\x1b[0m" in text


def test_another_cpus_per_worker_is_refused_on_a_cpu_resume(tmp_path, world, reference):
    """On CPU the thread count changes float results: a resume must not mix images of two thread counts."""
    out = _copy(reference, tmp_path / "build")
    (out / "meta" / "_dct-00003_stats.json").unlink()
    with pytest.raises(UserError, match=r"`run.cpus_per_worker` 1 -> 2: on CPU it is each worker's torch thread "
                                        r"count.*resume with --set run.cpus_per_worker=1, or pass --overwrite"):
        build(bw.config(out, *world, **{"run.cpus_per_worker": 2}), progress=False)
    # a finished build has nothing left to mix: it stays finished
    assert build(bw.config(reference, *world, **{"run.cpus_per_worker": 2}), progress=False).executor == "none"


def test_overwrite_keeps_a_users_tmp_files(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    mine = [out / ".tmp-notes", out / "shards" / ".tmp-dct-00003.tar.mine", out / "tokens" / ".tmp-x.safetensors"]
    for p in mine:
        p.write_bytes(b"x")
    leftover = out / "tokens" / ".tmp-001.safetensors.q9w8e7r6"
    leftover.write_bytes(b"x")
    assert build(_small(out, world), overwrite=True, progress=False).ok
    assert all(p.read_bytes() == b"x" for p in mine) and not leftover.exists()


def test_an_overwrite_interrupted_before_deleting_anything_is_not_a_finished_build(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    (out / ".overwriting").write_text("")  # killed right after the marker was written
    with pytest.raises(UserError, match=r"`--overwrite` was interrupted"):
        build(bw.config(out, *world), progress=False)
