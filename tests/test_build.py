"""The build (local executor): plan, layout, resume, retries, failures, inspect, export, SIGKILL + resume.

Tiny offline world: a random tiny SD pipeline and a tiny timm guide saved to a temp folder, 3 digit classes, 4 images
per class plus the plain-prompt baseline, 2 images per shard (12 shards, 24 images).
"""

import json
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import buildworld as bw
import pytest
import torch

from synthaug.builder.driver import BuildFailed, build
from synthaug.builder.plan import plan, shard_id
from synthaug.commands import export_tokens, inspect
from synthaug.config import BuildConfig, ShardConfig
from synthaug.datasets.select import select_classes
from synthaug.errors import UserError
from synthaug.layout import resume_command


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


# --------------------------------------------------------------------------------------------------------------------
# Plan and class selection
# --------------------------------------------------------------------------------------------------------------------
def test_shard_ids_are_a_function_of_method_class_chunk_only():
    names = [f"c{i}" for i in range(7)]
    cfg = BuildConfig(per_class=5, baseline=True, shards=ShardConfig(samples_per_shard=2))  # chunks 0-1, 2-3, 4
    full = plan(cfg, names, range(7))
    ids = [t.shard_id for j in full for t in j.shards]
    assert sorted(ids) == list(range(2 * 7 * 3))  # dense and unique with every class selected
    some = plan(cfg, names, [2, 5])
    by_key = {(t.method, t.class_index, t.chunk): t.shard_id for j in full for t in j.shards}
    assert all(by_key[(t.method, t.class_index, t.chunk)] == t.shard_id for j in some for t in j.shards)
    job = some[0]
    assert job.token == "<synthaug-002>" and job.name == "c2"
    assert [(t.method, t.start, t.stop) for t in job.shards] == [
        ("dct", 0, 2), ("dct", 2, 4), ("dct", 4, 5), ("sd", 0, 2), ("sd", 2, 4), ("sd", 4, 5)]
    assert shard_id(1, 2, 0, num_classes=7, chunks_per_class=3) == 27


def test_select_classes_forms():
    names = list(bw.DIGITS)
    assert select_classes(names, None) == list(range(10))
    assert select_classes(names, "0-2,7,7,three") == [0, 1, 2, 3, 7]
    assert select_classes(names, "Seven, 9") == [7, 9]
    drawn = select_classes(names, "sample:4:1")
    assert len(drawn) == 4 and drawn == select_classes(names, "sample:4:1")
    grouped = SimpleNamespace(classes=names, supercategories=["a"] * 5 + ["b"] * 5)
    spread = select_classes(grouped, "sample:2")
    assert len(spread) == 2 and min(spread) < 5 <= max(spread)  # one per supercategory


@pytest.mark.parametrize("selection,match", [
    ("eleven", r"`classes` entry 'eleven' is not a class"), ("sevn", r"Did you mean 'seven'"),
    ("3-1", r"`classes` range '3-1'"), ("0-10", r"`classes` range '0-10' is not within 0-9"),
    ("12", r"`classes` index 12 is out of range"), ("sample:11", r"asks for 11 classes"),
])
def test_select_classes_errors(selection, match):
    with pytest.raises(UserError, match=match):
        select_classes(list(bw.DIGITS), selection)


# --------------------------------------------------------------------------------------------------------------------
# A build and its layout
# --------------------------------------------------------------------------------------------------------------------
def test_build_writes_the_documented_layout(reference):
    import pyarrow.parquet as pq

    out = reference
    assert (out / "config.yaml").is_file() and (out / "plan.json").is_file()
    assert sorted(p.name for p in (out / "tokens").iterdir()) == [
        "000.safetensors", "001.safetensors", "002.safetensors", "tokens.safetensors"]
    stats = sorted(p.name for p in (out / "meta").glob("*_stats.json"))
    # dct shards of classes 0-2 are 0..5 (2 chunks each); sd shards start after all 10 classes: 20..25
    assert stats == [f"_dct-{i:05d}_stats.json" for i in range(6)] + [f"_sd-{i:05d}_stats.json" for i in range(20, 26)]
    assert sorted(p.name for p in (out / "shards").iterdir()) == [p[1:].replace("_stats.json", ".tar") for p in stats]
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert len(rows) == 24
    assert rows[0]["key"] == "dct-c000-s00000" and rows[-1]["key"] == "sd-c002-s00003"
    assert {r["method"] for r in rows} == {"dct", "sd"}
    assert all(r["token_sha256"] is None for r in rows if r["method"] == "sd")
    assert all(r["guide_prob"] is not None for r in rows)
    classes = json.loads((out / "classes.json").read_text())
    assert [c["index"] for c in classes] == [0, 1, 2]
    assert classes[1]["name"] == "one" and classes[1]["token"] == "<synthaug-001>"
    assert classes[1]["steps"] == 2 and classes[1]["stop_reason"] in ("all_correct", "patience", "max_steps")
    assert classes[1]["updates"] == 1  # measured, updated, measured: the last measurement is followed by no update
    assert classes[1]["images"] == {"dct": 4, "sd": 4}
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 12  # the baseline stays out of the train split
    assert info["splits"]["sd"]["num_samples"] == 12
    assert json.loads((out / "shards.wids.json").read_text())["shardlist"][0] == {"url": "shards/dct-00000.tar",
                                                                                 "nsamples": 2}
    assert not (out / "failures.json").exists()


def test_an_index_row_alone_regenerates_its_image_with_stock_diffusers(reference, world):
    """The row names the model, prompt, seed, steps, guidance, size and every scheduler setting: a stock pipeline with
    the class token makes the same image again (up to float rounding)."""
    import io

    import diffusers
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    row = next(r for r in pq.read_table(reference / "index.parquet").to_pylist() if r["method"] == "dct")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(world[0], safety_checker=None)
    pipe.scheduler = getattr(diffusers, row["scheduler"]).from_config(json.loads(row["scheduler_config"]))
    pipe.load_textual_inversion(str(reference / "tokens" / f"{row['class_index']:03d}.safetensors"))
    pipe.set_progress_bar_config(disable=True)
    again = pipe(row["prompt"], num_inference_steps=row["steps"], guidance_scale=row["guidance_scale"],
                 height=row["height"], width=row["width"], generator=torch.Generator().manual_seed(row["seed"])).images[0]
    with open(reference / row["shard_path"], "rb") as f:
        f.seek(row["offset"])
        stored = Image.open(io.BytesIO(f.read(row["size"]))).convert("RGB")
    assert np.abs(np.asarray(again, dtype=int) - np.asarray(stored, dtype=int)).max() <= 2


def test_resuming_a_finished_build_does_nothing_quickly(reference, world):
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    result = build(bw.config(reference, *world, **{"run.executor": "ray"}), progress=False)  # run.* may change
    assert time.perf_counter() - t0 < 5
    assert result.ok and result.resumed and result.executor == "none"
    assert (result.images, result.images_new, result.tokens_new) == (24, 0, 0)
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*") if p.is_file()} == before


def test_resume_redoes_exactly_the_missing_work(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    (out / "tokens" / "002.safetensors").unlink()
    (out / "meta" / "_dct-00003_stats.json").unlink()  # shard 3 = dct class 1 chunk 1: "not done"
    (out / "shards" / "dct-00003.tar").write_bytes(b"garbage from a killed run")
    (out / "index.parquet").unlink()
    result = build(bw.config(out, *world), progress=False)
    assert result.ok and result.resumed and result.executor == "local"
    assert (result.tokens_new, result.images_new) == (1, 2)
    assert bw.snapshot(out) == bw.snapshot(reference)


def test_a_folder_built_before_the_auto_switches_resumes_where_auto_means_the_same(tmp_path, world, reference):
    """A config.yaml written before `generate.compile` and `channels_last` became auto (``compile: false``, no
    ``channels_last``) resumes without CUDA, where auto means off; forcing compile on is a change of the images."""
    import yaml

    out = _copy(reference, tmp_path / "build")
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["generate"]["compile"] = False
    saved.pop("channels_last", None)
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    (out / "meta" / "_dct-00003_stats.json").unlink()
    result = build(bw.config(out, *world), progress=False)
    assert result.ok and result.resumed and result.images_new == 2
    with pytest.raises(UserError, match=r"generate\.compile"):
        build(bw.config(out, *world, **{"generate.compile": True}), progress=False)


def test_resume_redoes_a_damaged_shard(tmp_path, world, reference):
    """A shard marked done whose tar is truncated, or whose parquet changed, is made again on resume."""
    out = _copy(reference, tmp_path / "build")
    tar = out / "shards" / "dct-00003.tar"
    tar.write_bytes(tar.read_bytes()[:1000])  # truncated: a disk that filled up, a copy cut short
    parquet = out / "meta" / "sd-00021.parquet"
    parquet.write_bytes(parquet.read_bytes() + b"\0")
    result = build(bw.config(out, *world), progress=False)  # index.parquet still there: the finished-build path
    assert result.ok and result.executor == "local" and result.images_new == 4 and result.tokens_new == 0
    assert bw.snapshot(out) == bw.snapshot(reference)


def test_overwrite_deletes_only_what_the_build_wrote(tmp_path, world, reference):
    out = _copy(reference, tmp_path / "build")
    mine = {"notes.txt": b"my notes", "shards/README": b"about the shards", "tokens/favourite.safetensors": b"x",
            "eval/judge.json": b"{}", "shards/dct-00003.tar.bak": b"a backup"}
    for name, data in mine.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    small = bw.config(out, *world, classes="0", per_class=2, baseline=False)
    result = build(small, overwrite=True, progress=False)
    assert result.ok and result.images == 2
    for name, data in mine.items():
        assert (out / name).read_bytes() == data, name
    assert sorted(p.name for p in (out / "tokens").iterdir()) == ["000.safetensors", "favourite.safetensors",
                                                                   "tokens.safetensors"]
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["README", "dct-00000.tar", "dct-00003.tar.bak"]
    assert sorted(p.name for p in (out / "meta").iterdir()) == ["_dct-00000_stats.json", "dct-00000.parquet"]


def test_a_build_that_made_nothing_reruns_with_corrected_values(tmp_path, world):
    """Failed before its first job finished (config.yaml and plan.json on disk, nothing else): the corrected command
    runs without --overwrite."""
    from synthaug.builder.plan import plan, plan_file
    from synthaug.builder.validate import check_build
    from synthaug.config import dump_yaml, replace
    from synthaug.layout import write_plan

    out = tmp_path / "build"
    good = bw.config(out, *world, classes="0", per_class=2, baseline=False)
    bad = replace(good, per_class=3, dct=replace(good.dct, lr=5.0))
    checked = check_build(bad, False)
    out.mkdir()
    (out / "config.yaml").write_text(dump_yaml(bad))
    write_plan(out, plan_file(bad, checked.class_names, plan(bad, checked.class_names, checked.selected)))
    result = build(good, progress=False)
    assert result.ok and not result.resumed and (result.tokens_new, result.images_new) == (1, 2)
    assert (out / "config.yaml").read_text() == dump_yaml(good)


def test_a_failed_attempt_is_retried_in_process(tmp_path, world, reference, monkeypatch):
    monkeypatch.setenv("SYNTHAUG_TEST_FAIL_ONCE", "class:1")
    out = tmp_path / "build"
    result = build(bw.config(out, *world), progress=False)
    assert result.ok
    assert (out / ".test-failed-once-c001").is_file()  # the failure really happened
    assert bw.snapshot(out) == bw.snapshot(reference)


def test_a_job_that_fails_every_retry_lands_in_failures_json(tmp_path, world, reference, monkeypatch):
    monkeypatch.setenv("SYNTHAUG_TEST_FAIL_ALWAYS", "class:1")
    out = tmp_path / "build"
    with pytest.raises(BuildFailed, match=r"1 class job\(s\) failed every retry .*resume with: synthaug build "
                                          r"--config .*config\.yaml") as info:
        build(bw.config(out, *world, **{"run.max_retries": 1}), progress=False)
    result = info.value.result
    assert not result.ok and result.classes_done == 2 and result.classes == 3
    failures = json.loads((out / "failures.json").read_text())
    assert failures["resume"] == resume_command(out)
    (failed,) = failures["failed"]
    assert failed["class_index"] == 1 and failed["attempts"] == 2 and "SYNTHAUG_TEST_FAIL_ALWAYS" in failed["error"]
    # nothing claims completeness: no index, no all-tokens file, class 1 has neither token nor shards
    assert not (out / "index.parquet").exists() and not (out / "tokens" / "tokens.safetensors").exists()
    assert not (out / "tokens" / "001.safetensors").exists()
    summary = inspect(out)
    assert not summary.ok and not summary.complete and summary.failures[0]["class_index"] == 1
    assert summary.counts["dct"] == {0: 4, 1: 0, 2: 4}
    # the failure gone, the same command finishes the build and clears failures.json
    monkeypatch.delenv("SYNTHAUG_TEST_FAIL_ALWAYS")
    assert build(bw.config(out, *world, **{"run.max_retries": 1}), progress=False).ok
    assert not (out / "failures.json").exists()
    assert bw.snapshot(out) == bw.snapshot(reference)


# --------------------------------------------------------------------------------------------------------------------
# inspect and export
# --------------------------------------------------------------------------------------------------------------------
def test_inspect_counts_and_verify(tmp_path, reference):
    import pyarrow.parquet as pq

    result = inspect(reference, verify=True)
    assert result.ok and result.complete and result.verified and result.problems == []
    assert result.counts == {"dct": {0: 4, 1: 4, 2: 4}, "sd": {0: 4, 1: 4, 2: 4}}
    assert (result.images, result.images_expected, result.shards_done, result.tokens_done) == (24, 24, 12, 3)
    assert result.classes[0]["steps"] == 2 and result.config["method"] == "dct"
    assert "complete" in result.summary() and "verify: OK" in result.summary()
    # a flipped byte inside an image is found
    out = _copy(reference, tmp_path / "build")
    row = pq.read_table(out / "meta" / "dct-00001.parquet").to_pylist()[1]
    tar = out / row["shard_path"]
    data = bytearray(tar.read_bytes())
    data[row["offset"] + row["size"] // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    bad = inspect(out, verify=True)
    assert not bad.ok and any("00001" in p and "sha256" in p for p in bad.problems)


def test_inspect_refuses_a_folder_that_is_not_a_build(tmp_path):
    with pytest.raises(UserError, match=r"`out` .* is not a synthaug build \(no config.yaml\)"):
        inspect(tmp_path)


def test_export_a1111_embeddings_load_in_diffusers(tmp_path, reference):
    import torch

    from synthaug.testing import tiny_pipeline
    from synthaug.tokens.io import load_tokens

    paths = export_tokens(reference, format="a1111", dest=tmp_path / "a1111")
    assert [p.name for p in paths] == ["synthaug-000.pt", "synthaug-001.pt", "synthaug-002.pt"]
    data = torch.load(paths[1], weights_only=True)
    assert data["string_to_token"] == {"*": 265} and data["name"] == "synthaug-001" and data["step"] == 2
    learned = load_tokens(reference / "tokens" / "001.safetensors")["<synthaug-001>"]
    assert torch.equal(data["string_to_param"]["*"], learned)
    pipe = tiny_pipeline(seed=0)
    pipe.load_textual_inversion(str(paths[1]), token="<one>")
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<one>")]
    assert torch.equal(row, learned[0])

    paths = export_tokens(reference, format="diffusers", dest=tmp_path / "diffusers")
    pipe.load_textual_inversion(str(paths[2]))
    assert "<synthaug-002>" in pipe.tokenizer.get_added_vocab()
    with pytest.raises(UserError, match=r"`format` must be one of a1111, diffusers but is 'ckpt'"):
        export_tokens(reference, format="ckpt")


def _replace_token(out, class_index, tensors):
    from synthaug.tokens.io import save_tokens

    path = out / "tokens" / f"{class_index:03d}.safetensors"
    path.unlink()
    save_tokens(tensors, path)
    return path


def test_export_writes_nothing_outside_dest_whatever_the_token_files_say(tmp_path, reference):
    import torch

    out = _copy(reference, tmp_path / "build")
    dest = tmp_path / "deep" / "dest"
    _replace_token(out, 1, {"<../../../evil>": torch.zeros(1, 32)})
    for fmt in ("a1111", "diffusers"):
        with pytest.raises(UserError, match=r"Token file .*001.safetensors' holds token '<../../../evil>' but class 1's "
                                            r"token is '<synthaug-001>'") as info:
            export_tokens(out, format=fmt, dest=dest)
        assert "\n" not in str(info.value)
    assert not list(tmp_path.rglob("*evil*"))
    # names come from the plan's class indices, never from strings in a file: a plan whose index is a path is refused
    plan_file = out / "plan.json"
    data = json.loads(plan_file.read_text())
    data["jobs"][0]["class_index"] = "../../x"
    plan_file.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"has no readable plan.json"):
        export_tokens(out, dest=dest)


def test_export_dest_is_a_folder_outside_the_builds_tokens_shards_and_meta(tmp_path, reference):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match=r"`dest` '.*a-file' is a file, not a folder: pass --dest a new or empty"):
        export_tokens(reference, dest=tmp_path / "a-file")
    for inside in ("tokens", "shards", "meta"):
        with pytest.raises(UserError, match=rf"`dest` .* is inside the build's {inside}/, which holds only what"):
            export_tokens(reference, format="diffusers", dest=reference / inside)
    assert sorted(p.name for p in (reference / "tokens").iterdir()) == [
        "000.safetensors", "001.safetensors", "002.safetensors", "tokens.safetensors"]


def test_inspect_verify_checks_the_export_of_the_images_against_its_plan(tmp_path, reference):
    from synthaug.reshard import default_dest, reshard

    out = _copy(reference, tmp_path / "build")
    reshard(out, samples_per_shard=4)
    assert inspect(out, verify=True).problems == []
    tar = default_dest(out) / "train-00001.tar"
    tar.write_bytes(tar.read_bytes()[:100])
    assert [p for p in inspect(out, verify=True).problems if "train-00001.tar has 100 bytes" in p
            and "run `synthaug export" in p]


def test_export_refuses_a_multi_token_file_in_one_line(tmp_path, reference):
    import torch

    out = _copy(reference, tmp_path / "build")
    _replace_token(out, 2, {"<synthaug-002>": torch.zeros(1, 32), "<synthaug-009>": torch.ones(1, 32)})
    with pytest.raises(UserError, match=r"Token file .*002.safetensors' holds 2 tokens \('<synthaug-002>', "
                                        r"'<synthaug-009>'\); a class token file holds one") as info:
        export_tokens(out, format="a1111", dest=tmp_path / "dest")
    assert "\n" not in str(info.value)


def test_a_token_file_whose_header_claims_a_huge_size_is_one_line(tmp_path, reference):
    import struct

    out = _copy(reference, tmp_path / "build")
    bad = out / "tokens" / "001.safetensors"
    bad.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(UserError, match=r"Token file .*001.safetensors.* is not a valid safetensors file") as info:
        export_tokens(out, format="a1111", dest=tmp_path / "dest")
    assert "\n" not in str(info.value)
    state = inspect(out)  # a damaged token file is reported, not a traceback
    assert state.classes[1]["steps"] is None and state.classes[0]["steps"] == 2
    from synthaug.tokens.io import token_metadata_or_empty

    assert token_metadata_or_empty(bad) == {}
    assert token_metadata_or_empty(out / "tokens" / "000.safetensors")["steps"] == "2"


# --------------------------------------------------------------------------------------------------------------------
# SIGKILL in the middle, then resume: the same bytes as an uninterrupted build
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_during_tokens_then_during_shards_then_resume(tmp_path, world, reference):
    out = tmp_path / "build"
    cfg_file = bw.write_config(tmp_path / "config.yaml", out, *world)
    marker, log = tmp_path / "paused", tmp_path / "build.log"

    # 1. Killed while class 1's token is learned but not yet saved: class 0 is complete, nothing of class 1 is.
    proc = bw.start_build(cfg_file, log, SYNTHAUG_TEST_PAUSE="token:1", SYNTHAUG_TEST_PAUSE_FILE=str(marker))
    bw.wait_for(marker, proc, 600, log)
    bw.sigkill(proc)
    assert (out / "config.yaml").is_file() and (out / "tokens" / "000.safetensors").is_file()
    assert not (out / "tokens" / "001.safetensors").exists() and not (out / "index.parquet").exists()
    assert not inspect(out).complete

    # 2. Killed after class 2's first shard: class 1 done now, class 2 has a token and one shard.
    marker.unlink()
    proc = bw.start_build(cfg_file, log, SYNTHAUG_TEST_PAUSE="shard:2", SYNTHAUG_TEST_PAUSE_FILE=str(marker))
    bw.wait_for(marker, proc, 600, log)
    bw.sigkill(proc)
    state = inspect(out)
    assert state.classes[1]["shards_done"] == 4 and state.classes[2]["shards_done"] == 1 and not state.complete

    # 3. The same command again finishes the build: byte-identical to the uninterrupted one.
    done = subprocess.run([sys.executable, "-m", "synthaug.cli", "build", "--config", str(cfg_file), "-q"],
                          cwd=bw.REPO, env=bw.cli_env(), capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "3/3 classes, 24 images" in done.stdout
    assert "checkpoint" not in done.stdout + done.stderr  # timm's INFO lines on loading the guide stay quiet
    assert bw.snapshot(out) == bw.snapshot(reference)
    assert inspect(out, verify=True).ok


def test_bad_input_found_only_after_loading_leaves_nothing(tmp_path, world, monkeypatch):
    """A guide whose label count no config file states is checked once loaded; the build then takes back its config."""
    import synthaug.builder.validate as dist

    _, guide3 = bw.save_world(world[0].parent, num_classes=3)
    monkeypatch.setattr(dist, "guide_num_classes", lambda source: None)
    out = tmp_path / "build"
    with pytest.raises(UserError, match=r"`guide` .*guide3.* predicts 3 classes but dataset 'digits' has 10"):
        build(bw.config(out, world[0], guide3), progress=False)
    assert not (out / "config.yaml").exists() and not (out / "plan.json").exists()
    assert not list(out.rglob("*.safetensors")) and not list(out.rglob("*.tar"))


def _reordered_digits_guide(dst):
    """The shipped digits guide with its label names in another order: same count, every logit the wrong class."""
    import json
    import shutil

    from synthaug.classifier.source import EMBEDDED_CLASSIFIERS

    shutil.copytree(EMBEDDED_CLASSIFIERS["digits-guide"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["label_names"] = cfg["label_names"][1:] + cfg["label_names"][:1]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_guide_labels_in_another_order_are_refused_once_loaded(tmp_path, world, monkeypatch):
    """A guide whose labels are known only once loaded (a hub model) is checked by name and order in the worker."""
    import synthaug.builder.validate as dist

    guide = _reordered_digits_guide(tmp_path / "guide")
    monkeypatch.setattr(dist, "guide_num_classes", lambda source: None)  # as for a hub id: no file to read first
    out = tmp_path / "build"
    with pytest.raises(UserError, match=r"`guide` .* labels its outputs differently from dataset 'digits' \(10 of 10 "
                                        r"differ; 0: dataset 'zero' vs guide 'one'"):
        build(bw.config(out, world[0], guide), progress=False)
    assert not (out / "config.yaml").exists() and not list(out.rglob("*.safetensors"))


def test_build_and_learn_show_token_learning_steps_and_quiet_shows_none(tmp_path, world, monkeypatch, capsys):
    """While a token learns, the worker reports every iteration as a "step" event and the class bar shows its step,
    loss, accuracy and stop state; ``-q`` (progress off) draws none of it, and the log keeps one line per class."""
    from synthaug.builder.executors import Tracker
    from synthaug.commands import learn_tokens

    events = []
    event = Tracker.event
    monkeypatch.setattr(Tracker, "event", lambda self, ev: events.append(ev) or event(self, ev))
    cfg = bw.config(tmp_path / "build", *world, per_class=2, baseline=False, **{"dct.patience": 3})
    assert build(cfg, progress=True).ok
    steps = [(e["class_index"], e["step"], e["total"]) for e in events if e["kind"] == "step"]
    assert steps == [(c, s, 2) for c in range(3) for s in range(2)]
    assert all(e["state"].startswith(("patience", "stopped")) for e in events if e["kind"] == "step")
    err = capsys.readouterr().err
    assert "class 0 step 1/2: loss " in err and "acc " in err and "patience 0/3" in err

    monkeypatch.undo()
    quiet = Tracker(False, [], [], tmp_path / "build", 0)
    for ev in events:
        quiet.event(ev)
    quiet.close()
    learn_tokens(bw.config(tmp_path / "b2", *world, classes="0", per_class=1, baseline=False),
                 out=tmp_path / "tokens", progress=False)
    assert capsys.readouterr().err == ""
    learn_tokens(bw.config(tmp_path / "b2", *world, classes="1", per_class=1, baseline=False),
                 out=tmp_path / "tokens", progress=True)
    assert "DCT one" in capsys.readouterr().err


def test_learn_refuses_a_guide_whose_labels_are_in_another_order(tmp_path, world):
    from synthaug.commands import learn_tokens

    guide = _reordered_digits_guide(tmp_path / "guide")
    with pytest.raises(UserError, match=r"labels its outputs differently from dataset 'digits'"):
        learn_tokens(bw.config(tmp_path / "unused", world[0], guide, classes="0"), out=tmp_path / "tokens",
                     progress=False)
    assert not (tmp_path / "tokens").exists()


@pytest.mark.parametrize("name,dataset,guide,init", [
    ("cub", "cub", "vesteinn/vit-mae-cub", "bird"), ("inat", "inat", "vesteinn/vit-mae-inat21", "a"),
    ("inat50", "inat", "vesteinn/vit-mae-inat21", "a"), ("inat179", "cub", "vesteinn/vit-mae-cub", "bird"),
    ("imagenet", "imagenet", "google/vit-large-patch16-224", "a"), ("digits", "digits", "digits-guide", "a"),
])
def test_shipped_configs_load(name, dataset, guide, init):
    from synthaug.config import load_config

    cfg = load_config(bw.REPO / "configs" / f"{name}.yaml")
    assert (cfg.dataset, cfg.guide, cfg.dct.init_token) == (dataset, guide, init)
    assert cfg.model == ("digits" if name == "digits" else "CompVis/stable-diffusion-v1-4")
    if name != "digits":  # the paper's settings
        assert (cfg.dct.num_inference_steps, cfg.dct.height, cfg.dct.batch_size, cfg.dct.max_steps) == (50, 512, 5, 200)
    if name == "inat50":
        assert cfg.classes == "sample:50:0"


@pytest.mark.parametrize("method,steps", [("ti", 2), ("mcti", 4)])
def test_ti_and_mcti_builds(tmp_path, world, method, steps):
    """The few-shot methods run through the same class jobs: tokens from real digits, then images, shards, index."""
    import pyarrow.parquet as pq

    clip = bw.save_clip(world[0].parent)
    out = tmp_path / "build"
    result = build(bw.config(out, *world, method=method, classes="0-1", per_class=2, baseline=False,
                             **{"shots": 2, "mcti.steps": 2, "mcti.extra_steps": 2, "mcti.batch_size": 2,
                                "mcti.clip_model": str(clip)}), progress=False)
    assert result.ok and result.tokens_new == 2 and result.images == 4
    classes = json.loads((out / "classes.json").read_text())
    assert [(c["token"], c["method"], c["steps"]) for c in classes] == [
        ("<synthaug-000>", method, steps), ("<synthaug-001>", method, steps)]
    rows = pq.read_table(out / "index.parquet").to_pylist()
    assert [r["key"] for r in rows] == [f"{method}-c000-s00000", f"{method}-c000-s00001", f"{method}-c001-s00000",
                                        f"{method}-c001-s00001"]
    assert inspect(out, verify=True).ok


@pytest.mark.parametrize("method,steps", [("ti", 2), ("mcti", 4)])
def test_learn_ti_and_mcti(tmp_path, world, method, steps, capsys):
    """`synthaug learn --method ti|mcti` learns the few-shot tokens from the dataset's k real images, as a build's
    worker does (the same tokens, within float rounding of the thread count), and reads them back on a rerun."""
    from synthaug.cli import main
    from synthaug.tokens.io import load_tokens

    clip = bw.save_clip(world[0].parent)
    few = {"shots": 2, "mcti.steps": 2, "mcti.extra_steps": 2, "mcti.batch_size": 2, "mcti.clip_model": str(clip)}
    cfg = bw.write_config(tmp_path / "config.yaml", tmp_path / "unused", *world, method=method, classes="0-1",
                          baseline=False, **few)
    argv = ["learn", "--config", str(cfg), "--tokens-out", str(tmp_path / "tokens"), "-q"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("s:")[0].rpartition(",")[0] for line in lines] == [
        f"<synthaug-000>  class    0 'zero': {steps} updates", f"<synthaug-001>  class    1 'one': {steps} updates"]
    assert build(bw.config(tmp_path / "build", *world, method=method, classes="0-1", per_class=1, baseline=False,
                           **few), progress=False).ok
    for c in (0, 1):
        (token, learned), = load_tokens(tmp_path / "tokens" / f"{c:03d}.safetensors").items()
        (built_token, built), = load_tokens(tmp_path / "build" / "tokens" / f"{c:03d}.safetensors").items()
        assert token == built_token == f"<synthaug-00{c}>"
        assert torch.allclose(learned, built, rtol=0, atol=1e-5 * float(built.abs().max()))
    assert main(argv) == 0 and " 0.0s" in capsys.readouterr().out  # read back, not learned again
    assert sorted(load_tokens(tmp_path / "tokens" / "tokens.safetensors")) == ["<synthaug-000>", "<synthaug-001>"]


def test_ray_job_entry_point_exit_codes(tmp_path, world, reference, monkeypatch, capsys):
    """pipelines/ray_build.py: 0 when done, 1 when jobs failed every retry (with the resume command), 2 on bad input."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ray_build", bw.REPO / "pipelines" / "ray_build.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    out = _copy(reference, tmp_path / "build")
    (out / "tokens" / "001.safetensors").unlink()
    cfg_file = bw.write_config(tmp_path / "config.yaml", out, *world, **{"run.max_retries": 0})
    monkeypatch.setenv("SYNTHAUG_TEST_FAIL_ALWAYS", "class:1")
    assert entry.main(["--config", str(cfg_file), "--executor", "local", "-q"]) == 1
    assert "resume with: synthaug build --config" in capsys.readouterr().err
    monkeypatch.delenv("SYNTHAUG_TEST_FAIL_ALWAYS")
    assert entry.main(["--config", str(cfg_file), "--executor", "local", "-q"]) == 0
    assert "3/3 classes, 24 images" in capsys.readouterr().out
    assert bw.snapshot(out) == bw.snapshot(reference)
    assert entry.main(["--config", str(cfg_file), "--set", f"out={tmp_path / 'other'}", "--set", "classes=0,eleven",
                       "--executor", "local", "-q"]) == 2
    assert capsys.readouterr().err.startswith("ray_build: error: `classes` entry 'eleven'")


def test_sample_selection_is_the_same_in_learn_generate_and_build(tmp_path, world, monkeypatch):
    """`classes: sample:N` on a dataset with supercategories draws the same classes in every stage."""
    from synthaug.commands import generate_to_folder, learn_tokens
    from synthaug.datasets.digits import Digits
    from synthaug.datasets.inat import per_supercategory_sample
    from synthaug.index import load_index

    groups = ["even", "odd"] * 5
    monkeypatch.setattr(Digits, "supercategories", groups, raising=False)
    expected = per_supercategory_sample(groups, 2, 3)
    assert expected != select_classes(list(bw.DIGITS), "sample:2:3")  # the uniform draw would differ
    cfg = bw.config(tmp_path / "build", *world, classes="sample:2:3", per_class=1, baseline=False,
                    **{"dct.max_steps": 1})

    learned = learn_tokens(cfg, out=tmp_path / "tokens", progress=False)
    assert sorted(r.class_index for r in learned) == expected
    again = learn_tokens(cfg, out=tmp_path / "tokens", progress=False)  # the files are read back, nothing relearned
    assert [(r.token, r.class_index, r.label, r.steps, r.best_step, r.history, r.metadata["guide"]) for r in again] \
        == [(r.token, r.class_index, r.label, r.steps, r.best_step, r.history, r.metadata["guide"]) for r in learned]
    assert all(torch.equal(a.embedding, b.embedding) and a.seconds == 0.0 for a, b in zip(again, learned))
    generate_to_folder(cfg, tokens=str(tmp_path / "tokens"), dest=str(tmp_path / "images"), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "images" / "metadata.jsonl").read_text().splitlines()]
    assert sorted({r["class_index"] for r in rows}) == expected
    build(cfg, progress=False)
    assert sorted(set(load_index(tmp_path / "build").column("class_index").to_pylist())) == expected


def test_report_curve_takes_a_best_step_that_is_not_a_number():
    """A token file's metadata is read, not trusted: a best_step such as 'soon' draws no marker instead of failing."""
    from synthaug.report import svg_curve

    history = [{"step": 0, "loss": 1.0, "accuracy": 0.5}, {"step": 1, "loss": 0.5, "accuracy": 1.0}]
    assert "kept" in svg_curve(history, "1", "all_correct")
    for bad in ("soon", "1.5", None, "", [1]):
        svg = svg_curve(history, bad, "all_correct")
        assert svg.startswith("<svg") and "kept" not in svg


def test_inspect_and_export_refuse_a_config_yaml_that_is_not_a_mapping(tmp_path, reference):
    out = _copy(reference, tmp_path / "build")
    (out / "config.yaml").write_text("- a\n- list\n")
    for call in (lambda: inspect(out), lambda: export_tokens(out, dest=tmp_path / "dest")):
        with pytest.raises(UserError, match=r"is not a synthaug build \(its config.yaml holds list, not the config mapping"):
            call()


def test_classes_learned_together_give_the_tokens_learned_alone_and_resume(tmp_path, world, reference, caplog):
    """dct.classes_per_batch 2 on 3 classes (the third joins when one stops): the tokens and images of the
    one-at-a-time build up to float rounding; a build that lost a token and a shard resumes, learning what is missing
    together again."""
    import logging

    out = tmp_path / "build"
    with caplog.at_level(logging.INFO, logger="synthaug.builder.worker"):
        result = build(bw.config(out, *world, **{"dct.classes_per_batch": 2}), progress=False)
    assert result.ok and result.tokens_new == 3
    assert "3 class tokens learned 2 per batch" in caplog.text
    bw.assert_same_within_float_rounding(out, reference)
    (out / "tokens" / "001.safetensors").unlink()
    (out / "meta" / "_dct-00001_stats.json").unlink()
    result = build(bw.config(out, *world, **{"dct.classes_per_batch": 2}), progress=False)
    assert result.ok and result.resumed and result.tokens_new == 1
    bw.assert_same_within_float_rounding(out, reference)


# --------------------------------------------------------------------------------------------------------------------
# Chaos: a finished build with a seeded random share of its files deleted
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_a_build_with_a_random_share_of_its_files_deleted_resumes_to_the_same_bytes_redoing_exactly_those(
        tmp_path, world, reference, seed):
    import random

    from synthaug.layout import read_plan, shard_paths, token_path

    out = _copy(reference, tmp_path / "build")
    jobs = list(read_plan(out).jobs)
    files = []  # (what it belongs to, path): every shard's tar, parquet and stats file, every class token
    for j in jobs:
        files.append((("token", j.class_index), token_path(out, j.class_index)))
        for t in j.shards:
            paths = shard_paths(out, t.shard_id, t.method)
            files += [(("shard", t.shard_id, t.method, t.size), p) for p in (paths.tar, paths.parquet, paths.stats)]
    rng = random.Random(seed)
    gone = rng.sample(files, max(1, round(rng.uniform(0.1, 0.9) * len(files))))
    for _, path in gone:
        path.unlink()
    redone_shards = {what for what, _ in gone if what[0] == "shard"}
    redone_tokens = {what for what, _ in gone if what[0] == "token"}
    result = build(bw.config(out, *world), progress=False)
    assert result.ok and result.resumed
    assert result.images_new == sum(size for _, _, _, size in redone_shards)  # exactly what was deleted, no more
    assert result.tokens_new == len(redone_tokens)
    assert bw.snapshot(out) == bw.snapshot(reference)
