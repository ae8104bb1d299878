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
