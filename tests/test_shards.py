"""Shard writer, merge, random access and integrity checks (webdataset/img2dataset-style: exact files and counts)."""

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synthaug.errors import UserError
from synthaug.generation import GeneratedImage
from synthaug.index import load_index, merge_index, verify
from synthaug.layout import rebuild_hint, sample_key, shard_done, shard_paths
from synthaug.shards import ShardError, ShardReader, encode_image, read_sample, write_shard

SIZE = 16


def make_sample(class_index, index, method="dct", guide_prob=0.9):
    rng = np.random.default_rng([class_index, index, len(method)])
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    return GeneratedImage(
        image=image, class_index=class_index, class_name=f"bird {class_index}", method=method, index=index,
        prompt=f"A photo of <synthaug-{class_index:03d}> bird {class_index}", seed=1000 * class_index + index,
        token_sha256=None if method == "sd" else "ab" * 32, model_id="tiny", scheduler="DDIMScheduler", steps=10,
        guidance_scale=7.0, height=SIZE, width=SIZE, guide_prob=guide_prob, guide_top5=[class_index, 0, 1, 2, 3],
    )


def build(out, *, baseline=True, image_format="png", quality=95):
    """Shards 0-1: dct images of classes 0 and 1; shard 2: the sd baseline of class 1."""
    write_shard(out, 0, [make_sample(0, i) for i in range(3)], image_format=image_format, quality=quality)
    write_shard(out, 1, [make_sample(1, i) for i in range(4)], image_format=image_format, quality=quality)
    if baseline:
        write_shard(out, 2, [make_sample(1, i, "sd") for i in range(4)], image_format=image_format, quality=quality)
    return merge_index(out, classes=[{"index": 0, "name": "bird 0", "token": "<synthaug-000>"},
                                     {"index": 1, "name": "bird 1", "token": "<synthaug-001>"}])


def test_sample_key_has_method_prefix_and_no_dots():
    assert sample_key("dct", 17, 42) == "dct-c017-s00042"
    assert "." not in sample_key("mcti", 1234, 123456)
    with pytest.raises(ValueError, match="`method` must be"):
        sample_key("d.ct", 0, 0)


def test_write_shard_exact_files_members_and_rows(tmp_path):
    stats = write_shard(tmp_path, 3, [make_sample(0, i) for i in range(3)])
    # the tar alone in shards/ (what directory readers open), named by its split; the rest in meta/
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["dct-00003.tar"]
    assert sorted(p.name for p in (tmp_path / "meta").iterdir()) == ["_dct-00003_stats.json", "dct-00003.parquet"]
    assert shard_done(tmp_path, 3, "dct") and not shard_done(tmp_path, 2, "dct") and not shard_done(tmp_path, 3, "sd")
    with tarfile.open(tmp_path / "shards" / "dct-00003.tar") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [f"dct-c000-s0000{i}.{ext}" for i in range(3)
                                             for ext in ("cls", "json", "png", "txt")]
        assert tf.extractfile("dct-c000-s00001.txt").read() == b"A photo of <synthaug-000> bird 0"
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname) for m in members} == {(946684800, 0, 0, 0o444, "synthaug")}
        assert tf.extractfile("dct-c000-s00001.cls").read() == b"0"
        meta = json.loads(tf.extractfile("dct-c000-s00001.json").read())
        png = tf.extractfile("dct-c000-s00001.png").read()
    assert meta["key"] == "dct-c000-s00001" and meta["seed"] == 1 and meta["guide_top5"] == [0, 0, 1, 2, 3]
    assert png == encode_image(make_sample(0, 1).image, "png")

    rows = pq.read_table(tmp_path / "meta" / "dct-00003.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["dct-c000-s00000", "dct-c000-s00001", "dct-c000-s00002"]
    expected_cols = {"key", "class_index", "class_name", "method", "prompt", "seed", "token_sha256", "model_id",
                     "scheduler", "scheduler_config", "steps", "guidance_scale", "height", "width", "guide_prob",
                     "guide_top5", "guide_soft_classes", "guide_soft_probs", "judge_prob", "shard", "shard_path",
                     "offset", "size", "sha256", "index", "image_format"}
    assert set(rows[0]) == expected_cols
    assert rows[1]["shard"] == 3 and rows[1]["judge_prob"] is None and rows[1]["guide_prob"] == 0.9
    assert rows[1]["shard_path"] == "shards/dct-00003.tar"
    # offset/size locate exactly the image bytes, and the sha256 is theirs
    data = read_sample(tmp_path / rows[1]["shard_path"], rows[1]["offset"], rows[1]["size"])
    assert data == png and hashlib.sha256(data).hexdigest() == rows[1]["sha256"]

    on_disk = json.loads((tmp_path / "meta" / "_dct-00003_stats.json").read_text())
    assert on_disk["num_samples"] == stats.num_samples == 3 and on_disk["method"] == "dct"
    assert on_disk["classes"] == {"0": 3} and on_disk["methods"] == {"dct": 3}
    assert on_disk["quality"] is None and on_disk["image_format"] == "png"
    assert on_disk["tar_bytes"] == (tmp_path / "shards" / "dct-00003.tar").stat().st_size
    assert on_disk["tar_sha256"] == hashlib.sha256((tmp_path / "shards" / "dct-00003.tar").read_bytes()).hexdigest()


def test_a_shard_holds_one_method(tmp_path):
    with pytest.raises(ValueError, match="made with method 'sd' but shard 0 holds 'dct'"):
        write_shard(tmp_path, 0, [make_sample(0, 0), make_sample(0, 1, "sd")])
    assert not shard_done(tmp_path, 0, "dct") and not list((tmp_path / "shards").iterdir())


def test_rebuild_gives_identical_bytes(tmp_path):
    build(tmp_path / "a")
    build(tmp_path / "b")
    names = ["shards/dct-00000.tar", "meta/dct-00000.parquet", "meta/_dct-00000_stats.json", "shards/sd-00002.tar",
             "index.parquet", "_info.json", "shards.wids.json", "classes.json"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # rewriting a shard in place gives the same bytes too
    before = (tmp_path / "a" / "shards" / "dct-00001.tar").read_bytes()
    write_shard(tmp_path / "a", 1, [make_sample(1, i) for i in range(4)])
    assert (tmp_path / "a" / "shards" / "dct-00001.tar").read_bytes() == before


def test_failed_write_leaves_nothing_and_stats_only_last(tmp_path):
    def broken():
        yield make_sample(0, 0)
        yield make_sample(0, 1)
        raise RuntimeError("generator died")

    write_shard(tmp_path, 0, [make_sample(0, i) for i in range(2)])
    with pytest.raises(RuntimeError, match="generator died"):
        write_shard(tmp_path, 0, broken())
    # the old stats file went first, so the half-rewritten shard is not "done"; no temp files remain
    assert not shard_done(tmp_path, 0, "dct")
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.startswith(".tmp-")]
    assert not (tmp_path / "meta" / "_dct-00000_stats.json").exists()


@pytest.mark.parametrize("fmt,quality", [("jpg", 80), ("webp", 70)])
def test_lossy_formats_record_quality(tmp_path, fmt, quality):
    build(tmp_path, baseline=False, image_format=fmt, quality=quality)
    stats = json.loads((tmp_path / "meta" / "_dct-00000_stats.json").read_text())
    assert stats["image_format"] == fmt and stats["quality"] == quality
    with tarfile.open(tmp_path / "shards" / "dct-00000.tar") as tf:
        assert f"dct-c000-s00000.{fmt}" in tf.getnames()
    row = load_index(tmp_path).to_pylist()[0]
    tar = shard_paths(tmp_path, row["shard"], row["method"]).tar
    img = Image.open(io.BytesIO(read_sample(tar, row["offset"], row["size"])))
    assert img.size == (SIZE, SIZE) and row["image_format"] == fmt


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="`shards.image_format` must be one of png, jpg, webp but is 'gif'"):
        write_shard(tmp_path, 0, [make_sample(0, 0)], image_format="gif")
    with pytest.raises(UserError, match="`shards.quality` must be an integer in 1..100 but is 0"):
        write_shard(tmp_path, 0, [make_sample(0, 0)], quality=0)
    with pytest.raises(TypeError, match="lacks attribute.*seed"):
        write_shard(tmp_path, 0, [object()])
    with pytest.raises(ValueError, match="duplicate key 'dct-c000-s00000'"):
        write_shard(tmp_path, 0, [make_sample(0, 0), make_sample(0, 0)])
    assert not shard_done(tmp_path, 0, "dct")


def test_merge_index_sorted_rows_classes_and_timm_info(tmp_path):
    result = build(tmp_path)
    index = pq.read_table(tmp_path / "index.parquet").to_pylist()
    keys = [r["key"] for r in index]
    assert keys == sorted(keys) and len(keys) == 11 == result.num_samples
    assert keys[:4] == ["dct-c000-s00000", "dct-c000-s00001", "dct-c000-s00002", "dct-c001-s00000"]
    assert json.loads((tmp_path / "classes.json").read_text())[1] == {"index": 1, "name": "bird 1",
                                                                       "token": "<synthaug-001>"}
    info = json.loads((tmp_path / "_info.json").read_text())
    assert info["name"] == "synthaug" and info["num_classes"] == 2
    assert info["splits"]["train"] == {"name": "train", "num_samples": 11,
                                       "filenames": ["shards/dct-00000.tar", "shards/dct-00001.tar",
                                                     "shards/sd-00002.tar"],
                                       "shard_lengths": [3, 4, 4]}
    assert info["splits"]["dct"]["filenames"] == ["shards/dct-00000.tar", "shards/dct-00001.tar"]
    assert info["splits"]["sd"] == {"name": "sd", "num_samples": 4, "filenames": ["shards/sd-00002.tar"],
                                    "shard_lengths": [4]}

    merge_index(tmp_path, train_methods=["dct"])
    info = json.loads((tmp_path / "_info.json").read_text())
    assert info["splits"]["train"]["num_samples"] == 7
    wids = json.loads((tmp_path / "shards.wids.json").read_text())
    assert wids["wids_version"] == 1 and wids["shardlist"] == [{"url": "shards/dct-00000.tar", "nsamples": 3},
                                                               {"url": "shards/dct-00001.tar", "nsamples": 4}]


def test_merge_errors(tmp_path):
    with pytest.raises(UserError, match="No finished shards in .*run `synthaug build` first"):
        merge_index(tmp_path)
    write_shard(tmp_path, 0, [make_sample(0, 0), make_sample(0, 1)])
    write_shard(tmp_path, 1, [make_sample(0, 1)])  # a stale shard repeating a key
    with pytest.raises(ShardError, match=r"Key 'dct-c000-s00001' appears in shards \[0, 1\]"):
        merge_index(tmp_path)



def test_webdataset_reads_our_shards(tmp_path):
    import webdataset as wds

    build(tmp_path)
    urls = [str(tmp_path / "shards" / name) for name in ("dct-00000.tar", "dct-00001.tar", "sd-00002.tar")]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples][:3] == ["dct-c000-s00000", "dct-c000-s00001", "dct-c000-s00002"]
    assert len(samples) == 11
    assert [s["cls"] for s in samples] == [0] * 3 + [1] * 8
    assert samples[4]["png"].size == (SIZE, SIZE) and samples[4]["json"]["method"] == "dct"
    assert samples[-1]["json"]["method"] == "sd" and "token_sha256" not in samples[-1]["json"]
    assert samples[0]["txt"] == "A photo of <synthaug-000> bird 0"


def test_timm_create_dataset_reads_build_via_info(tmp_path):
    from timm.data import create_dataset

    build(tmp_path)
    ds = create_dataset("wds/synthaug", root=str(tmp_path), split="train")
    items = list(ds)
    assert len(ds) == 11 and len(items) == 11
    assert sorted(t for _, t in items) == [0] * 3 + [1] * 8
    assert all(img.size == (SIZE, SIZE) and img.mode == "RGB" for img, _ in items)
    sd = list(create_dataset("wds/synthaug", root=str(tmp_path), split="sd"))
    assert [t for _, t in sd] == [1] * 4


def test_truncated_and_corrupt_shards_are_named_with_the_rebuild_command(tmp_path):
    build(tmp_path)
    assert verify(tmp_path) == []
    rows = [r for r in load_index(tmp_path).to_pylist() if r["shard"] == 1]
    tar = tmp_path / "shards" / "dct-00001.tar"
    last = max(rows, key=lambda r: r["offset"])

    # corrupt one byte of one image: sha256 check catches it, reading still works
    data = bytearray(tar.read_bytes())
    data[rows[0]["offset"] + 20] ^= 0xFF
    tar.write_bytes(bytes(data))
    problems = verify(tmp_path)
    assert len(problems) == 1 and "shards/dct-00001.tar: 1 image(s) fail their sha256 (first: dct-c001-s00000)" \
        in problems[0]
    assert rebuild_hint(tmp_path, 1, "dct") in problems[0]
    with pytest.raises(ShardError, match="dct-00001.tar is corrupt.*delete .*meta/_dct-00001_stats.json and rerun "
                                         "`synthaug build"):
        ShardReader(tmp_path).read(1, rows[0]["offset"], rows[0]["size"], sha256=rows[0]["sha256"])

    # truncate it: a one-seek read past the end says so, naming the shard and the command
    tar.write_bytes(bytes(data[: last["offset"] + 10]))
    with pytest.raises(ShardError, match=r"Shard .*dct-00001\.tar is truncated .*: delete .*meta/_dct-00001_stats\.json "
                                         r"and rerun `synthaug build --config .*config\.yaml`"):
        read_sample(tar, last["offset"], last["size"])
    assert any("shards/dct-00001.tar:" in p and "truncated" in p for p in verify(tmp_path, check_sha256=False))

    # a missing shard, and an unfinished one (tar without stats)
    tar.unlink()
    (tmp_path / "meta" / "_sd-00002_stats.json").unlink()
    problems = verify(tmp_path)
    assert any(p.startswith("shards/dct-00001.tar: missing") for p in problems)
    assert any(p.startswith("sd-00002: unfinished") for p in problems)
    assert any("index.parquet: 4 rows of shard 00002, the shard has 0" in p for p in problems)
    with pytest.raises(ShardError, match="dct-00001.tar is missing"):
        read_sample(tar, 0, 10)


def test_shard_reader_reopens_after_pickle(tmp_path):
    import pickle

    build(tmp_path, baseline=False)
    row = load_index(tmp_path).to_pylist()[5]
    reader = ShardReader(tmp_path)
    first = reader.read(row["shard"], row["offset"], row["size"], row["sha256"])
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fds == {} and clone.read(row["shard"], row["offset"], row["size"]) == first
    reader.close()


def test_check_shard_finds_a_truncated_tar_and_a_changed_parquet(tmp_path):
    from synthaug.layout import check_shard

    build(tmp_path, baseline=False)
    assert check_shard(tmp_path, 0, "dct") is None and check_shard(tmp_path, 1, "dct") is None
    tar = shard_paths(tmp_path, 0, "dct").tar
    tar.write_bytes(tar.read_bytes()[:-512])
    assert check_shard(tmp_path, 0, "dct") == \
        f"its tar has {tar.stat().st_size} bytes, the stats say {tar.stat().st_size + 512}"
    parquet = shard_paths(tmp_path, 1, "dct").parquet
    parquet.write_bytes(parquet.read_bytes().replace(b"bird 1", b"bird 7"))
    assert check_shard(tmp_path, 1, "dct") == "its parquet file differs from the one recorded in the stats"
    shard_paths(tmp_path, 1, "dct").stats.write_text("[]")
    assert check_shard(tmp_path, 1, "dct").startswith("its stats file is unreadable")
    tar.unlink()
    assert check_shard(tmp_path, 0, "dct") == "its tar is missing"


def test_layout_names_the_damaged_shards_of_the_planned_jobs_and_skips_the_unfinished(tmp_path):
    from synthaug.layout import ClassJob, ShardTask, damaged_shards

    build(tmp_path, baseline=False)
    tasks = [ShardTask(shard_id=i, method="dct", class_index=i, chunk=0, start=0, stop=n) for i, n in ((0, 3), (1, 4))]
    not_written = ShardTask(shard_id=5, method="dct", class_index=1, chunk=1, start=4, stop=8)  # no stats: not done
    jobs = [ClassJob(0, "bird 0", "<synthaug-000>", (tasks[0],)),
            ClassJob(1, "bird 1", "<synthaug-001>", (tasks[1], not_written))]
    assert damaged_shards(tmp_path, jobs) == []
    tar = shard_paths(tmp_path, 1, "dct").tar
    tar.write_bytes(tar.read_bytes()[:-512])
    size = tar.stat().st_size
    assert damaged_shards(tmp_path, jobs) == [(tasks[1], f"its tar has {size} bytes, the stats say {size + 512}")]


def test_the_judge_rewrites_the_index_under_the_build_lock(tmp_path):
    from synthaug.evaluate import write_judge_prob
    from synthaug.layout import build_lock

    build(tmp_path)
    index = tmp_path / "index.parquet"
    before = index.read_bytes()
    with build_lock(tmp_path):  # a build (or another evaluation) holds the folder
        with pytest.raises(UserError, match=r"is in use by another synthaug process right now .*: wait for the build "
                                            r"to finish, then evaluate again"):
            write_judge_prob(tmp_path, {"dct-c000-s00000": 0.5}, judge="j")
        assert index.read_bytes() == before
    write_judge_prob(tmp_path, {"dct-c000-s00000": 0.5}, judge="j")
    probs = pq.read_table(index).column("judge_prob").to_pylist()
    assert probs[0] == 0.5 and probs[1:] == [None] * 10


def test_a_format_1_build_is_refused_by_the_readers_in_one_line(tmp_path):
    build(tmp_path)
    (tmp_path / "shards" / "00000.tar").write_bytes(b"")  # the old name of a shard
    with pytest.raises(UserError, match=r"holds a build in synthaug's format 1 .*which this version neither resumes nor "
                                        r"reads: rebuild it with `synthaug build --config .* --overwrite`"):
        load_index(tmp_path)
    assert verify(tmp_path)[0].startswith("`out` ")


def test_a_stats_file_with_wrong_fields_is_named_as_damaged_with_what_to_run(tmp_path):
    import json

    from synthaug.layout import ShardStats, check_shard, shard_paths

    build(tmp_path)
    stats = shard_paths(tmp_path, 1, "dct").stats
    good = json.loads(stats.read_text())
    for data, match in [({"foo": 1}, r"damaged: fields shard, method, .* missing"),
                        ([1, 2], "damaged: not a JSON object"),
                        ({**good, "first_key": 3}, "first_key must be a string but is '3'")]:
        stats.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=match):
            ShardStats.load(stats)
    stats.write_text(json.dumps({"foo": 1}))
    assert check_shard(tmp_path, 1, "dct") is not None
    problems = verify(tmp_path)
    assert any(p.startswith("meta/") and "stats file unreadable (damaged: fields shard" in p and "delete" in p
               and "rerun `synthaug build --config" in p for p in problems), problems
    assert not any("__init__" in p for p in problems)


def test_a_format_2_build_is_refused_in_one_line_and_its_files_are_build_files(tmp_path):
    from synthaug.layout import build_files

    build(tmp_path)
    (tmp_path / "meta" / "_dct-00000_stats.json").rename(tmp_path / "meta" / "dct-00000_stats.json")  # format 2's name
    with pytest.raises(UserError, match=r"holds a build in synthaug's format 2 \(meta/dct-00000_stats.json, .*\), which "
                                        r"this version neither resumes nor reads: rebuild it with `synthaug build "
                                        r"--config .*config.yaml --overwrite`"):
        load_index(tmp_path)
    assert tmp_path / "meta" / "dct-00000_stats.json" in build_files(tmp_path)  # --overwrite clears it by name
