"""Stock readers open a build folder as they are, each with the one-liner the README shows.

A build of two DCT shards and one plain-prompt (``sd``) shard, written by `write_shard` + `merge_index` exactly as a
build writes them; each reader must see every sample, the right label and the split (method) it belongs to.
"""

import json

import pytest
from test_shards import SIZE, make_sample

from synthaug.index import merge_index
from synthaug.shards import write_shard


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    write_shard(out, 0, [make_sample(0, i) for i in range(3)])
    write_shard(out, 1, [make_sample(1, i) for i in range(4)])
    write_shard(out, 2, [make_sample(1, i, "sd") for i in range(4)])
    merge_index(out, classes=[{"index": 0, "name": "bird 0"}, {"index": 1, "name": "bird 1"}], train_methods=["dct"])
    return out


def test_huggingface_datasets_reads_one_split_per_method(out):
    datasets = pytest.importorskip("datasets", reason="Hugging Face `datasets` is not installed")

    # the shards folder as it is: only tars there, so the webdataset builder reads every file
    whole = datasets.load_dataset("webdataset", data_dir=str(out / "shards"), split="train")
    assert whole.num_rows == 11
    # the documented pattern: one split per method, from the name each tar carries
    ds = datasets.load_dataset("webdataset", data_files={"dct": str(out / "shards/dct-*.tar"),
                                                         "sd": str(out / "shards/sd-*.tar")})
    assert {k: v.num_rows for k, v in ds.items()} == {"dct": 7, "sd": 4}
    assert ds["dct"]["cls"] == [0, 0, 0, 1, 1, 1, 1] and ds["sd"]["cls"] == [1] * 4
    first = ds["dct"][0]
    assert first["__key__"] == "dct-c000-s00000" and first["png"].size == (SIZE, SIZE)
    assert first["txt"] == "A photo of <synthaug-000> bird 0" and first["json"]["method"] == "dct"


@pytest.mark.ray
def test_ray_data_reads_the_shards_folder(out):
    pytest.importorskip("pandas", reason="Ray Data needs pandas: pip install 'synthaug[ray]'")
    ray = pytest.importorskip("ray")
    import ray.data  # noqa: F811 (the submodule, on the package imported above)

    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        rows = ray.data.read_webdataset(str(out / "shards"), decoder=None).take_all()
    finally:
        ray.shutdown()
    assert len(rows) == 11
    by_method = {}
    for r in rows:
        meta = json.loads(r["json"])
        by_method.setdefault(meta["method"], []).append(int(r["cls"]))
        assert r["txt"].decode() == meta["prompt"]
    assert sorted(by_method["dct"]) == [0] * 3 + [1] * 4 and by_method["sd"] == [1] * 4


def test_webdataset_webloader_reads_a_split_by_pattern(out):
    import webdataset as wds

    ds = (wds.WebDataset(str(out / "shards/dct-{00000..00001}.tar"), shardshuffle=False, empty_check=False)
          .decode("torchrgb").to_tuple("png", "cls"))
    batches = list(wds.WebLoader(ds, batch_size=4, num_workers=0))
    assert [b[0].shape[0] for b in batches] == [4, 3]
    assert [int(t) for b in batches for t in b[1]] == [0, 0, 0, 1, 1, 1, 1]


def test_wids_index_lists_the_train_split(out):
    wids = pytest.importorskip("wids", reason="wids (webdataset's random-access reader) is not installed")

    ds = wids.ShardListDataset(str(out / "shards.wids.json"))
    assert len(ds) == 7 and ds[4][".cls"] in (b"1", 1, "1")


def test_timm_reads_each_split(out):
    from timm.data import create_dataset

    assert len(create_dataset("wds/synthaug", root=str(out), split="train")) == 7  # the build's own method
    assert [t for _, t in create_dataset("wds/synthaug", root=str(out), split="sd")] == [1] * 4


# --------------------------------------------------------------------------------------------------------------------
# A real tiny build (`reference`: DCT + the --baseline plain prompt, 3 classes, 4 images each)
# --------------------------------------------------------------------------------------------------------------------
def test_whole_folder_parquet_readers_read_meta(reference):
    """pyarrow and pandas read ``meta/`` as one dataset: the stats files are named so they skip them."""
    import pyarrow.parquet as pq

    table = pq.read_table(reference / "meta")
    assert table.num_rows == 24 and sorted(table.column("key").to_pylist()) == sorted(
        pq.read_table(reference / "index.parquet").column("key").to_pylist())
    pd = pytest.importorskip("pandas")
    assert len(pd.read_parquet(reference / "meta")) == 24


def _strict(text):
    """json.loads that refuses NaN and the infinities, as JavaScript's JSON.parse does."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_every_json_of_a_build_is_strict_and_the_sidecar_carries_the_soft_label(reference):
    import tarfile

    import pyarrow.parquet as pq

    for path in sorted(reference.rglob("*.json")):
        _strict(path.read_text())
    rows = {r["key"]: r for r in pq.read_table(reference / "index.parquet").to_pylist()}
    for r in rows.values():
        _strict(r["scheduler_config"])
    seen = 0
    for tar in sorted((reference / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    meta = _strict(tf.extractfile(m).read())
                    row = rows[meta["key"]]
                    assert meta["guide_soft_classes"] == row["guide_soft_classes"] is not None
                    assert meta["guide_soft_probs"] == pytest.approx(row["guide_soft_probs"], rel=1e-6)
                    seen += 1
    assert seen == 24


def test_huggingface_load_dataset_on_the_build_folder_gives_splits_and_class_names(reference):
    datasets = pytest.importorskip("datasets", reason="Hugging Face `datasets` is not installed")

    ds = datasets.load_dataset(str(reference))
    assert {k: v.num_rows for k, v in ds.items()} == {"dct": 12, "sd": 12}
    cls = ds["dct"].features["cls"]
    assert isinstance(cls, datasets.ClassLabel) and cls.names == ["zero", "one", "two"]  # _info.json's num_classes
    first = ds["sd"][0]
    assert first["__key__"] == "sd-c000-s00000" and cls.int2str(first["cls"]) == "zero"
    assert first["png"].size == (32, 32) and first["json"]["method"] == "sd"
    assert len(first["json"]["guide_soft_probs"]) == len(first["json"]["guide_soft_classes"]) > 0
