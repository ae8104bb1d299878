"""`merge_index` streams the shards' rows into index.parquet: the same bytes as sorting every row in memory, row
groups bounded, overlapping shards sorted in memory, the judge's verdicts carried over."""

from __future__ import annotations

from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from synthaug import index as index_module
from synthaug.index import merge_index
from synthaug.shards import index_schema, write_shard


def _sample(c: int, i: int, method: str = "dct", shade: int = 0):
    return SimpleNamespace(
        image=Image.new("RGB", (8, 8), (10 * c, i, shade)), class_index=c, class_name=f"class {c}", method=method,
        index=i, prompt=f"a photo of class {c}", seed=i, token_sha256=None if method == "sd" else "0" * 64,
        model_id="m", scheduler="ddim", steps=2, guidance_scale=7.0, height=8, width=8, guide_prob=0.5,
        guide_top5=[c])


def _in_memory(out) -> pa.Table:
    """What the index must hold: every shard's rows, sorted by key (the definition, all in memory)."""
    tables = [pq.read_table(p).cast(index_schema()) for p in sorted((out / "meta").glob("*.parquet"))]
    return pa.concat_tables(tables).sort_by([("key", "ascending")])


def _write_build(out, shard_rows: dict[int, list]) -> None:
    for sid, samples in shard_rows.items():
        write_shard(out, sid, samples)


def test_streamed_index_has_the_bytes_of_sorting_everything_in_memory(tmp_path):
    # shard ids out of key order (as a plan with a baseline makes them), several classes and methods
    _write_build(tmp_path, {0: [_sample(1, i) for i in range(3)], 1: [_sample(0, i) for i in range(2)],
                            2: [_sample(0, i, "sd") for i in range(2)], 3: [_sample(12, i) for i in range(2)]})
    result = merge_index(tmp_path)
    want = pa.BufferOutputStream()
    pq.write_table(_in_memory(tmp_path), want)
    assert (tmp_path / "index.parquet").read_bytes() == want.getvalue().to_pybytes()
    assert result.num_samples == 9
    assert pq.ParquetFile(tmp_path / "index.parquet").metadata.num_row_groups == 1


def test_row_groups_are_bounded_and_overlapping_shards_are_sorted_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "INDEX_ROW_GROUP", 4)
    # shards 0 and 1 interleave (even and odd indices of class 0): no key repeats, but the ranges overlap
    _write_build(tmp_path, {0: [_sample(0, i) for i in range(0, 10, 2)], 1: [_sample(0, i) for i in range(1, 10, 2)],
                            2: [_sample(1, i) for i in range(3)]})
    merge_index(tmp_path)
    f = pq.ParquetFile(tmp_path / "index.parquet")
    assert [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)] == [4, 4, 4, 1]
    assert f.read().equals(_in_memory(tmp_path))
    # disjoint shards stream: the same rows, the same row groups
    for p in [*(tmp_path / "shards").glob("dct-0000[01]*"), *(tmp_path / "meta").glob("dct-0000[01]*")]:
        p.unlink()
    _write_build(tmp_path, {0: [_sample(0, i) for i in range(5)], 1: [_sample(0, i) for i in range(5, 10)]})
    merge_index(tmp_path)
    f = pq.ParquetFile(tmp_path / "index.parquet")
    assert [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)] == [4, 4, 4, 1]
    assert f.read().equals(_in_memory(tmp_path))


@pytest.mark.parametrize("row_group", [4, index_module.INDEX_ROW_GROUP])
def test_judge_verdicts_survive_a_rebuilt_index_for_unchanged_images_only(tmp_path, monkeypatch, row_group):
    monkeypatch.setattr(index_module, "INDEX_ROW_GROUP", row_group)
    _write_build(tmp_path, {0: [_sample(0, i) for i in range(4)], 1: [_sample(1, i) for i in range(4)],
                            2: [_sample(2, i) for i in range(4)]})
    merge_index(tmp_path)
    index = pq.read_table(tmp_path / "index.parquet")
    verdicts = pa.array([None if i % 5 == 0 else i / 100 for i in range(index.num_rows)], pa.float64())
    i = index.schema.get_field_index("judge_prob")
    index = index.set_column(i, index.schema.field(i), verdicts).replace_schema_metadata({b"synthaug.judge": b"j1"})
    pq.write_table(index, tmp_path / "index.parquet")  # what `synthaug evaluate` leaves
    _write_build(tmp_path, {1: [_sample(1, i, shade=99) for i in range(4)]})  # class 1 regenerated: new bytes
    merge_index(tmp_path)
    new = pq.read_table(tmp_path / "index.parquet")
    assert new.schema.metadata == {b"synthaug.judge": b"j1"}
    got = dict(zip(new.column("key").to_pylist(), new.column("judge_prob").to_pylist()))
    want = {k: (None if k.startswith("dct-c001") else v)
            for k, v in zip(index.column("key").to_pylist(), verdicts.to_pylist())}
    assert got == want


def test_the_dataset_card_is_written_rewritten_and_deleted_by_name_a_users_readme_never(tmp_path, caplog):
    from synthaug.layout import build_files, clear_build

    _write_build(tmp_path, {0: [_sample(0, 0)], 1: [_sample(0, 0, "sd")]})
    merge_index(tmp_path, classes=[{"index": 0, "name": "zero"}], train_methods=["dct"])
    card = (tmp_path / "README.md").read_text()
    assert "path: shards/dct-*.tar" in card and "path: shards/sd-*.tar" in card and "'0': zero" in card
    assert card.index("split: dct") < card.index("split: sd")  # the build's own method first
    assert tmp_path / "README.md" in build_files(tmp_path)
    merge_index(tmp_path, classes=[{"index": 0, "name": "nought"}], train_methods=["dct"])
    assert "'0': nought" in (tmp_path / "README.md").read_text()  # a finished build rewrites its card

    mine = tmp_path / "mine"
    _write_build(mine, {0: [_sample(0, 0)]})
    (mine / "README.md").write_text("# my notes\n")
    merge_index(mine, classes=[{"index": 0, "name": "zero"}])
    assert (mine / "README.md").read_text() == "# my notes\n" and "is not synthaug's dataset card" in caplog.text
    assert mine / "README.md" not in build_files(mine)
    (mine / "plan.json").write_text("{}")
    assert "README.md" in clear_build(mine) and (mine / "README.md").is_file()
