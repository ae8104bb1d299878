"""`synthaug export --format webdataset`: a build's samples again, shuffled into class-mixed shards of a chosen size."""

import json

import pytest
import webdataset as wds
from test_shards import make_sample

from synthaug.errors import UserError
from synthaug.index import merge_index
from synthaug.reshard import reshard
from synthaug.shards import write_shard


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """Four classes, one shard each (as a build writes them), plus the plain-prompt baseline of class 0."""
    out = tmp_path_factory.mktemp("build")
    for c in range(4):
        write_shard(out, c, [make_sample(c, i) for i in range(6)])
    write_shard(out, 10, [make_sample(0, i, "sd") for i in range(6)])
    merge_index(out, classes=[{"index": c, "name": f"bird {c}"} for c in range(4)], train_methods=["dct"])
    (out / "config.yaml").write_text("method: dct\n")
    return out


def _read(dest):
    return [(s["__key__"], s["cls"], s["txt"]) for s in
            wds.WebDataset([str(p) for p in sorted(dest.glob("train-*.tar"))], shardshuffle=False).decode()]


def test_shards_are_class_mixed_complete_and_seeded(out, tmp_path):
    result = reshard(out, tmp_path / "a", samples_per_shard=5, seed=0)
    assert (result.num_samples, result.num_shards, result.shards_written) == (24, 5, 5)
    samples = _read(tmp_path / "a")
    assert sorted(k for k, _, _ in samples) == sorted(f"dct-c{c:03d}-s{i:05d}" for c in range(4) for i in range(6))
    assert all(cls == int(k[5:8]) and txt.startswith("A photo of") for k, cls, txt in samples)
    by_shard = [{cls for _, cls, _ in samples[i : i + 5]} for i in range(0, 24, 5)]
    assert all(len(classes) >= 2 for classes in by_shard)  # a build's own shards hold one class each
    info = json.loads((tmp_path / "a" / "_info.json").read_text())
    assert info["splits"]["train"]["shard_lengths"] == [5, 5, 5, 5, 4]
    assert json.loads((tmp_path / "a" / "shards.wids.json").read_text())["shardlist"][4] == {
        "url": "train-00004.tar", "nsamples": 4}
    # the same seed gives the same bytes; another seed another order
    reshard(out, tmp_path / "b", samples_per_shard=5, seed=0)
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in info["splits"]["train"]
               ["filenames"])
    reshard(out, tmp_path / "c", samples_per_shard=5, seed=1)
    assert [k for k, _, _ in _read(tmp_path / "c")] != [k for k, _, _ in samples]


def test_a_rerun_writes_only_the_missing_shards_and_other_settings_are_refused(out, tmp_path):
    dest = tmp_path / "mixed"
    reshard(out, dest, samples_per_shard=8, seed=3, methods=["dct", "sd"])
    before = (dest / "train-00001.tar").read_bytes()
    (dest / "train-00001.tar").unlink()  # a run killed before this shard
    again = reshard(out, dest, samples_per_shard=8, seed=3, methods=["dct", "sd"])
    assert (again.num_samples, again.shards_written) == (30, 1)
    assert (dest / "train-00001.tar").read_bytes() == before
    with pytest.raises(UserError, match=r"holds a reshard with other settings \(seed differ\): choose another --dest"):
        reshard(out, dest, samples_per_shard=8, seed=4, methods=["dct", "sd"])
    with pytest.raises(UserError, match="`samples_per_shard` must be an integer > 0 but is 0"):
        reshard(out, tmp_path / "x", samples_per_shard=0)


def _copy(out, where):
    import shutil

    shutil.copytree(out, where)
    return where


def test_an_export_of_a_build_that_changed_since_is_written_again(out, tmp_path):
    from synthaug.reshard import verify_export

    src = _copy(out, tmp_path / "build")
    dest = tmp_path / "mixed"
    reshard(src, dest, samples_per_shard=5)
    stale = (dest / "train-00000.tar").read_bytes()
    # `build --overwrite` made other images: other bytes, another index
    write_shard(src, 1, [make_sample(1, i, guide_prob=0.5) for i in range(6)])
    merge_index(src, classes=[{"index": c, "name": f"bird {c}"} for c in range(4)], train_methods=["dct"])
    assert any("made from another build" in p and "--format webdataset --dest" in p for p in verify_export(dest))
    again = reshard(src, dest, samples_per_shard=5)
    assert again.shards_written == again.num_shards == 5
    fresh = reshard(src, tmp_path / "fresh", samples_per_shard=5)
    assert all((dest / f).read_bytes() == (tmp_path / "fresh" / f).read_bytes()
               for f in ["reshard.json", "_info.json", *(f"train-{i:05d}.tar" for i in range(fresh.num_shards))])
    assert (dest / "train-00000.tar").read_bytes() != stale and verify_export(dest) == []
    assert json.loads((dest / "reshard.json").read_text())["index_sha256"] != ""


def test_a_rerun_keeps_only_tars_that_match_their_plan_and_removes_a_kill_s_temporaries(out, tmp_path):
    from synthaug.reshard import verify_export

    dest = tmp_path / "mixed"
    reshard(out, dest, samples_per_shard=5)
    good = {p.name: p.read_bytes() for p in dest.iterdir() if p.name != ".lock"}  # the lock: empty, runtime only
    (dest / "train-00001.tar").write_bytes(good["train-00001.tar"][:100])  # truncated
    plan = json.loads((dest / "reshard.json").read_text())
    del plan["tars"]["train-00002.tar"]  # killed after its rename, before the plan recorded it
    plan["tars"]["train-00003.tar"]["sha256"] = "not a digest"  # a damaged record: that tar alone is unverified
    (dest / "reshard.json").write_text(json.dumps(plan))
    (dest / ".tmp-train-00004.tar.k2j4h1x_").write_bytes(b"half a tar")  # a kill -9 mid-write
    (dest / ".tmp-notes").write_text("the user's own")
    problems = verify_export(dest)
    assert any("train-00001.tar has 100 bytes, its plan" in p for p in problems)
    assert any("train-00002.tar is not recorded in the plan" in p for p in problems)
    again = reshard(out, dest, samples_per_shard=5)
    assert again.shards_written == 3  # 1, 2 and 3; 0 and 4 were verified and kept
    assert {p.name: p.read_bytes() for p in dest.iterdir() if p.name != ".lock"} == {
        **good, ".tmp-notes": b"the user's own"}
    assert verify_export(dest) == []


def test_dest_must_be_a_folder_outside_the_builds_own(out, tmp_path):
    from synthaug.layout import META_DIR, SHARDS_DIR, TOKENS_DIR

    src = _copy(out, tmp_path / "build")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match=r"`dest` '.*a-file' is a file, not a folder: pass --dest a new or empty"):
        reshard(src, tmp_path / "a-file")
    with pytest.raises(UserError, match=r"'.*a-file' is a file, not a folder"):
        reshard(src, tmp_path / "a-file" / "below")
    for inside in (SHARDS_DIR, TOKENS_DIR, META_DIR):
        (src / inside).mkdir(exist_ok=True)
        with pytest.raises(UserError, match=rf"`dest` .* is inside the build's {inside}/, which holds only what"):
            reshard(src, src / inside / "mixed")
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "reshard.json").write_text('{"seed": "0"}')
    with pytest.raises(UserError, match=r"its reshard.json is damaged \(field 'source' is 'missing'\): delete"):
        reshard(src, tmp_path / "damaged")


def test_export_verify_on_the_command_line(out, tmp_path, capsys):
    from synthaug.cli import main

    dest = tmp_path / "mixed"
    reshard(out, dest, samples_per_shard=5)
    args = ["export", str(out), "--format", "webdataset", "--dest", str(dest), "--verify"]
    assert main(args) == 0 and "every tar matches its plan" in capsys.readouterr().out
    (dest / "train-00002.tar").unlink()
    assert main(args) == 1
    assert "train-00002.tar is missing: run `synthaug export" in capsys.readouterr().out
    assert main(["export", str(out), "--verify"]) == 2
    assert "`--verify` checks an export of the images" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_export_with_a_random_share_of_its_files_deleted_or_truncated_resumes_to_the_same_bytes(out, tmp_path, seed):
    import random

    dest = tmp_path / "mixed"
    reshard(out, dest, samples_per_shard=3, seed=5)
    before = {p.name: p.read_bytes() for p in dest.iterdir() if p.name != ".lock"}
    rng = random.Random(seed)
    files = sorted(n for n in before if n != "reshard.json")  # the tars, _info.json and shards.wids.json
    hit = rng.sample(files, max(1, round(rng.uniform(0.1, 0.9) * len(files))))
    for name in hit:
        if rng.random() < 0.5:
            (dest / name).unlink()
        else:  # a truncated copy, as a full disk or a copy that was stopped leaves it
            (dest / name).write_bytes(before[name][: rng.randrange(len(before[name]))])
    (dest / f".tmp-{files[0]}.{rng.randrange(10**7, 10**8)}").write_bytes(b"a kill -9 mid-write")
    again = reshard(out, dest, samples_per_shard=3, seed=5)
    assert again.shards_written == sum(n.endswith(".tar") for n in hit)  # exactly the damaged ones
    assert {p.name: p.read_bytes() for p in dest.iterdir() if p.name != ".lock"} == before
