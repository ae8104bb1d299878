"""A build's index: the per-shard parquet files merged into ``index.parquet``, read back, verified, and viewed.

`merge_index` streams the finished shards' parquet files in key order into ``index.parquet`` (carrying over judge
verdicts a previous evaluation wrote) and writes ``classes.json``, ``_info.json`` (timm's WebDataset info format, so
``timm.data.create_dataset("wds/synthaug", root=out, split="train")`` reads the build) and ``shards.wids.json``
(the shard index of ``wids.ShardListDataset``). `load_index` reads it,
`verify` checks every byte against the recorded sha256, and `open_build` gives the readers (`synthaug.mix`,
`synthaug.evaluate`, `synthaug.report`) a finished build's index, classes and config.

`train_methods`: the build's own methods, its ``train`` split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write, write_text
from .card import class_names, dataset_card
from .errors import UserError
from .jsonfmt import dumps
from .layout import (
    ALL_TOKENS_FILE,
    CARD_FILE,
    CLASSES_FILE,
    INDEX_FILE,
    INFO_FILE,
    META_DIR,
    SHARDS_DIR,
    TOKENS_DIR,
    WIDS_INDEX_FILE,
    ShardStats,
    done_shards,
    is_build_card,
    legacy_build_error,
    parse_shard_name,
    read_config,
    read_plan,
    rebuild_hint,
    resume_command,
    sha256_of,
    shard_name,
    shard_paths,
    token_path,
    token_string,
)
from .shards import FORMAT_VERSION, ShardError, conform, index_schema, optional_columns

if TYPE_CHECKING:
    import pyarrow as pa

INDEX_ROW_GROUP = 131_072  # rows per row group of index.parquet: the merge holds at most one row group of rows

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MergeResult:
    """What `merge_index` wrote."""

    num_samples: int
    num_shards: int
    splits: dict[str, int] = field(default_factory=dict)  # split name in _info.json -> samples
    index: Path | None = None
    info: Path | None = None
    classes: Path | None = None
    wids: Path | None = None


def _shard_stats(out: Path, sid: int, method: str) -> ShardStats:
    """A finished shard's stats, with its tar and parquet present."""
    paths = shard_paths(out, sid, method)
    hint = rebuild_hint(out, sid, method)
    try:
        st = ShardStats.load(paths.stats)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ShardError(f"Shard stats {paths.stats} is unreadable ({e}): {hint}.") from None
    if not paths.parquet.is_file() or not paths.tar.is_file():
        missing = paths.parquet if not paths.parquet.is_file() else paths.tar
        raise ShardError(f"Shard {shard_name(sid, method)} is marked done but {missing} is missing: {hint}.")
    return st


def _done_stats(out: Path) -> list[ShardStats]:
    """The stats of every finished shard of `out`, by id; a format-1 build is refused in one line."""
    if (legacy := legacy_build_error(out)) is not None:
        raise legacy
    return [_shard_stats(out, sid, method) for sid, method in done_shards(out).items()]


def _shard_rows(out: Path, st: ShardStats, optional: tuple[str, ...] | None = None) -> pa.Table:
    """A finished shard's parquet rows in the index schema (with the `optional` columns; None: its own), checked
    against its stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = shard_paths(out, st.shard, st.method).parquet
    try:
        t = pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as e:  # what pyarrow raises for a damaged file
        raise ShardError(f"Shard index {path} is corrupt ({e}): {rebuild_hint(out, st.shard, st.method)}.") from None
    if t.num_rows != st.num_samples:
        raise ShardError(f"Shard {shard_name(st.shard, st.method)} has {t.num_rows} rows in {path.name} but its "
                         f"stats say {st.num_samples}: {rebuild_hint(out, st.shard, st.method)}.")
    return conform(t, optional_columns(t.column_names) if optional is None else optional)


def _optional_of(out: Path, stats: list[ShardStats]) -> tuple[str, ...]:
    """The optional columns any of the shards has (read from the parquet footers only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names: set[str] = set()
    for st in stats:
        path = shard_paths(out, st.shard, st.method).parquet
        try:
            names.update(pq.read_schema(path).names)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise ShardError(f"Shard index {path} is corrupt ({e}): {rebuild_hint(out, st.shard, st.method)}.") from None
    return optional_columns(names)


def _read_done_shards(out: Path) -> tuple[list[ShardStats], pa.Table]:
    """Stats and parquet rows of every finished shard, checked against each other (all rows in memory)."""
    import pyarrow as pa

    stats = _done_stats(out)
    optional = _optional_of(out, stats)
    tables = [_shard_rows(out, st, optional) for st in stats]
    table = pa.concat_tables(tables) if tables else index_schema().empty_table()
    return stats, table


class _Unsorted(Exception):
    """The shards' rows, read in the order of their first keys, are not strictly ascending (overlapping shards)."""


def _sorted_rows(out: Path, stats: list[ShardStats], optional: tuple[str, ...] = ()):
    """Every shard's rows as one stream in ascending key order, shard by shard, without holding more than one shard.

    Shards are read in the order of their recorded first keys; the stream checks that keys strictly ascend inside
    each shard and across shards, and raises `_Unsorted` as soon as they do not (then the caller sorts in memory).
    """
    import pyarrow.compute as pc

    last = None
    for st in sorted(stats, key=lambda s: (s.first_key, s.shard)):
        t = _shard_rows(out, st, optional)
        if not t.num_rows:
            continue
        keys = t.column("key")
        if last is not None and not keys[0].as_py() > last:
            raise _Unsorted
        if t.num_rows > 1 and not pc.all(pc.greater(keys.slice(1), keys.slice(0, t.num_rows - 1))).as_py():
            raise _Unsorted
        last = keys[-1].as_py()
        yield t


def _memory_sorted_rows(out: Path, stats: list[ShardStats], optional: tuple[str, ...] = ()):
    """All rows sorted in memory: for shards whose key ranges overlap. A key in two shards is an error."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.concat_tables([_shard_rows(out, st, optional) for st in stats]).sort_by([("key", "ascending")])
    keys = table.column("key")
    if table.num_rows > 1:
        same = pc.equal(keys.slice(1), keys.slice(0, table.num_rows - 1))
        if pc.any(same).as_py():
            dupes = pc.unique(pc.filter(keys.slice(1), same))
            first = pc.min(dupes).as_py()
            where = table.filter(pc.equal(table.column("key"), first))
            shards = sorted(set(where.column("shard").to_pylist()))
            raise ShardError(f"Key {first!r} appears in shards {shards} ({len(dupes)} duplicate keys in all): "
                             f"delete the stale shard's files under {out / SHARDS_DIR} and {out / META_DIR} and rerun "
                             "the build.")
    yield table


class _Verdicts:
    """The judge's verdicts (``judge_prob``) of an index about to be replaced, keyed by (key, sha256).

    `synthaug evaluate` writes them into the index only, and a resumed or extended build must not drop them: a row
    whose key and image bytes are unchanged keeps its verdict. The old index is sorted by key, as the new one is, so
    each batch of new rows looks up only the old rows of its own key range.
    """

    def __init__(self, index_path: Path) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        self.table, self.judge = None, None
        if not index_path.is_file():
            return
        try:
            index = pq.ParquetFile(index_path)
            if not _may_hold_values(index, "judge_prob"):
                return
            judge = (index.schema_arrow.metadata or {}).get(b"synthaug.judge")
            columns = ["key", "sha256", "judge_prob"]
            old = pa.Table.from_batches([b.filter(pc.is_valid(b.column("judge_prob")))
                                         for b in index.iter_batches(columns=columns)],
                                        schema=pa.schema([index.schema_arrow.field(c) for c in columns]))
        except (pa.ArrowInvalid, KeyError, OSError):  # no verdicts (or an unreadable old index): nothing to carry
            return
        if old.num_rows:
            self.table = old.sort_by([("key", "ascending")]).combine_chunks()
            self.keys = self.table.column("key").chunk(0)
            self.judge = judge

    def __bool__(self) -> bool:
        return self.table is not None

    def column(self, keys, shas):
        """``judge_prob`` for rows (keys ascending) with these keys and sha256s: the old verdict, or null."""
        import bisect

        import pyarrow as pa
        import pyarrow.compute as pc

        old_keys = self.keys
        lo = bisect.bisect_left(_ArrowStrings(old_keys), keys[0].as_py())
        hi = bisect.bisect_right(_ArrowStrings(old_keys), keys[-1].as_py())
        old = self.table.slice(lo, hi - lo)
        if not old.num_rows:
            return pa.nulls(len(keys), pa.float64())
        joined = pc.binary_join_element_wise(old.column("key"), old.column("sha256"), "\x00")
        where = pc.index_in(pc.binary_join_element_wise(keys, shas, "\x00"), value_set=joined)
        return pc.take(old.column("judge_prob"), where).cast(pa.float64())


def _may_hold_values(parquet_file, column: str) -> bool:
    """False when the file's statistics prove `column` null in every row (then it need not be read at all)."""
    meta = parquet_file.metadata
    j = parquet_file.schema_arrow.get_field_index(column)
    if j < 0:
        raise KeyError(column)
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(j).statistics
        if stats is None or not stats.has_null_count or stats.null_count < meta.row_group(g).num_rows:
            return True
    return False


class _ArrowStrings:
    """A read-only sequence view of an Arrow string array, for `bisect` (one Python string per probe)."""

    def __init__(self, array) -> None:
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i: int) -> str:
        return self.array[i].as_py()


def _write_index(path: Path, tables, verdicts: _Verdicts, optional: tuple[str, ...] = ()) -> tuple[int, int]:
    """Write `tables` (rows in final order) to `path` atomically, in row groups of `INDEX_ROW_GROUP` rows.

    Each row group is written from one contiguous chunk, so the bytes depend on the rows only, not on how they were
    read. Returns (rows, largest class index + 1).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = index_schema(optional)
    if verdicts and verdicts.judge is not None:
        schema = schema.with_metadata({b"synthaug.judge": verdicts.judge})
    judge_i = schema.get_field_index("judge_prob")
    rows, top = 0, 0
    buffered: deque[pa.Table] = deque()  # the rows not written yet, as the shards' own tables (or slices of them)
    held = 0

    def flush(writer, final: bool) -> None:
        """Write full row groups (and, when final, the rest), each copied into one contiguous chunk."""
        nonlocal held
        while held >= INDEX_ROW_GROUP or (final and held):
            n, group = min(held, INDEX_ROW_GROUP), []
            while n:
                t = buffered.popleft()
                if t.num_rows > n:
                    buffered.appendleft(t.slice(n))
                    t = t.slice(0, n)
                group.append(t)
                n -= t.num_rows
            table = pa.concat_tables(group).combine_chunks()
            writer.write_table(table, row_group_size=INDEX_ROW_GROUP)
            held -= table.num_rows

    with atomic_write(path, "wb") as f, pq.ParquetWriter(f, schema) as writer:
        for t in tables:
            if verdicts:
                t = t.set_column(judge_i, schema.field(judge_i),
                                 verdicts.column(t.column("key").combine_chunks(),
                                                 t.column("sha256").combine_chunks()))
            t = t.replace_schema_metadata(schema.metadata)
            rows += t.num_rows
            biggest = pc.max(t.column("class_index")).as_py()
            if biggest is not None:
                top = max(top, biggest + 1)
            buffered.append(t)
            held += t.num_rows
            if held >= INDEX_ROW_GROUP:
                flush(writer, final=False)
        flush(writer, final=True)
    return rows, top


def _split(name: str, stats: list[ShardStats]) -> dict[str, Any]:
    return {
        "name": name,
        "num_samples": sum(s.num_samples for s in stats),
        "filenames": [s.tar for s in stats],
        "shard_lengths": [s.num_samples for s in stats],
    }


def merge_index(
    out: str | os.PathLike,
    classes: list[dict[str, Any]] | None = None,
    *,
    train_methods: Iterable[str] | None = None,
) -> MergeResult:
    """Merge the finished shards into ``index.parquet``, ``_info.json``, ``shards.wids.json`` and (when given)
    ``classes.json``.

    The index is streamed: shards are read one at a time in key order and written in row groups of
    `INDEX_ROW_GROUP` rows, so memory stays at one row group however large the build (shards whose key ranges
    overlap, which a build never writes, are sorted in memory instead). The bytes depend on the rows only.

    Why by hand and not ``pyarrow.dataset(...).sort_by("key")`` or duckdb's ``COPY ... ORDER BY``: pyarrow's sort
    materialises every row (a 200-class, 1000-per-class build with its baseline is 400k rows of prompts and scheduler
    configs, held twice while sorted), and duckdb is not a dependency; a build's shards already cover disjoint,
    ascending key ranges, so ordering them by first key and concatenating is the whole sort. The in-memory case
    above is ``Table.sort_by``, pyarrow's own.

    ``_info.json`` follows timm's WebDataset reader (``timm/data/readers/reader_wds.py``)::

        {"name": "synthaug", "version": 1, "num_classes": K,
         "splits": {"train": {"name": "train", "num_samples": N, "filenames": ["shards/dct-00000.tar", ...],
                              "shard_lengths": [n0, ...]},
                    "dct": {...}, "sd": {...}}}

    ``"train"`` holds the shards of `train_methods` (all methods when None); one split per method is added for
    every method whose shards hold only that method. Filenames are relative to `out` (timm joins them to ``root``);
    nothing depends on where `out` lives, so the same build elsewhere gives the same bytes.

    Args:
        out: the build directory.
        classes: ``[{"index": 0, "name": "Black footed Albatross", "token": "<synthaug-000>", ...}]``; written as
            ``classes.json`` sorted by index.
        train_methods: methods whose shards form the ``"train"`` split (e.g. ``["dct"]`` to keep the plain-prompt
            baseline out of it). A shard that mixes train and non-train methods cannot be split and is an error.

    >>> merge_index("out/digits", classes=[{"index": 0, "name": "zero"}])  # doctest: +SKIP
    MergeResult(num_samples=100, num_shards=10, ...)
    """
    out = Path(out)
    stats = _done_stats(out)
    if not stats:
        raise UserError(f"No finished shards in {out} (no {META_DIR}/*_stats.json): run `synthaug build` first.")
    if classes is not None:
        for c in classes:
            if not isinstance(c, dict) or "index" not in c or "name" not in c:
                raise ValueError(f"`classes` entries must be dicts with 'index' and 'name' but got {c!r}.")
    # 1. The index: all rows, sorted by key, streamed shard by shard (a shard's keys ascend and shards cover
    # disjoint key ranges); shards whose ranges overlap are sorted in memory, where a key in two shards (a stale or
    # misplanned shard) is an error.
    verdicts = _Verdicts(out / INDEX_FILE)
    optional = _optional_of(out, stats)
    try:
        num_samples, top_class = _write_index(out / INDEX_FILE, _sorted_rows(out, stats, optional), verdicts, optional)
    except _Unsorted:
        logger.info("shards of %s overlap in keys: sorting the index in memory", out)
        num_samples, top_class = _write_index(out / INDEX_FILE, _memory_sorted_rows(out, stats, optional), verdicts,
                                              optional)

    # 2. classes.json
    classes_path = None
    if classes is not None:
        classes_path = out / CLASSES_FILE
        write_text(classes_path, dumps(sorted(classes, key=lambda c: int(c["index"])), indent=1,
                                            ensure_ascii=False) + "\n")

    # 3. _info.json (timm WebDataset format)
    train_set = None if train_methods is None else set(train_methods)
    train = []
    for s in stats:
        m = set(s.methods)
        if train_set is None or m <= train_set:
            train.append(s)
        elif m & train_set:
            raise UserError(f"Shard {s.tar} mixes methods {sorted(m)} but `train_methods` is "
                            f"{sorted(train_set)}: write each method to its own shards, or pass train_methods=None.")
    splits = {"train": _split("train", train)}
    for method in sorted({m for s in stats for m in s.methods}):
        if method == "train":
            continue
        holding = [s for s in stats if method in s.methods]
        if all(set(s.methods) == {method} for s in holding):
            splits[method] = _split(method, holding)
        else:
            logger.info("no %r split in %s: some shards mix it with other methods", method, INFO_FILE)
    # Targets are dataset class indices, so a build of a class subset ("5,7") still needs num_classes > 7.
    num_classes = max([len(classes or []), top_class] + [int(c["index"]) + 1 for c in classes or []])
    info = {"name": "synthaug", "version": FORMAT_VERSION, "num_classes": num_classes, "splits": splits}
    write_text(out / INFO_FILE, dumps(info, indent=1) + "\n")

    # 4. shards.wids.json: the train split for wids (webdataset's random-access reader); urls relative to `out`
    wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "synthaug-train",
            "shardlist": [{"url": s.tar, "nsamples": s.num_samples} for s in train]}
    write_text(out / WIDS_INDEX_FILE, dumps(wids, indent=1) + "\n")

    # 5. README.md: the dataset card Hugging Face `datasets` reads (one split per method, `cls` with class names)
    _write_card(out, stats, classes, num_classes, [m for m in splits if m != "train"], train)
    return MergeResult(num_samples=num_samples, num_shards=len(stats),
                       splits={k: v["num_samples"] for k, v in splits.items()}, index=out / INDEX_FILE,
                       info=out / INFO_FILE, classes=classes_path, wids=out / WIDS_INDEX_FILE)


def _write_card(out: Path, stats: list[ShardStats], classes: list[dict[str, Any]] | None, num_classes: int,
                methods: list[str], train: list[ShardStats]) -> None:
    """``README.md`` (`synthaug.card`), unless a file of that name is not a card a build wrote (a user's own stays)."""
    card = out / CARD_FILE
    if (card.exists() or card.is_symlink()) and not is_build_card(card):
        logger.warning("%s is not synthaug's dataset card: left as it is (Hugging Face `datasets` reads the build "
                       "through it; move it away and rerun the build to have the card)", card)
        return
    plan = read_plan(out)
    names = dict(enumerate(plan.class_names or ())) if plan is not None else {}
    names.update({int(c["index"]): str(c["name"]) for c in classes or []})
    own = sorted({m for s in train for m in s.methods})
    try:
        dataset = read_config(out, missing_ok=True).get("dataset")
    except UserError:
        dataset = None
    formats = sorted({s.image_format for s in stats})
    title = f"synthaug build of {dataset}" if isinstance(dataset, str) else "synthaug build"
    write_text(card, dataset_card(methods=sorted(methods, key=lambda m: (m not in own, m)), image_formats=formats,
                                  names=class_names(num_classes, names), train=own, name=title))


def train_methods(out: str | os.PathLike) -> list[str] | None:
    """The build's own method(s): those of ``_info.json``'s ``train`` split (what timm's ``split="train"``, wids and
    `synthaug export` read), else ``config.yaml``'s `method` (a build still running); None when neither says (a
    folder of shards written by hand), which readers take as every method. The plain-prompt baseline of
    ``--baseline`` is never among them: it is there to be measured against, not trained on.

    >>> train_methods("out/digits")  # doctest: +SKIP
    ['dct']
    """
    out = Path(out)
    try:
        train = json.loads((out / INFO_FILE).read_text())["splits"]["train"]["filenames"]
        methods = [parsed[1] for f in train if (parsed := parse_shard_name(Path(str(f)).stem))]
        if len(methods) == len(train):
            return sorted(set(methods))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        method = read_config(out, missing_ok=True).get("method")
    except UserError:  # not a build's config.yaml: nothing to say which method is the build's own
        method = None
    return [method] if isinstance(method, str) else None


def load_index(out: str | os.PathLike) -> pa.Table:
    """All rows of a build: ``index.parquet``, or (while a build is still running) the finished shards' rows.

    >>> rows = load_index("out/digits").to_pylist()  # doctest: +SKIP
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    if (legacy := legacy_build_error(out)) is not None:
        raise legacy
    path = out / INDEX_FILE
    if path.is_file():
        try:
            table = pq.read_table(path)
            return conform(table, optional_columns(table.column_names))
        except (OSError, ValueError, pa.ArrowException) as e:
            raise ShardError(f"{path} is corrupt ({e}): rerun `{resume_command(out)}` to "
                             "merge it again from the shards.") from None
    stats, table = _read_done_shards(out)
    if not stats:
        raise UserError(f"No synthetic data at {out}: expected {INDEX_FILE} or finished shards under "
                        f"{out / SHARDS_DIR}. Run `synthaug build` first, or check the path.")
    logger.warning("%s has no %s yet; using the %d finished shards", out, INDEX_FILE, len(stats))
    return table.sort_by([("key", "ascending")])


# --------------------------------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------------------------------
def verify(out: str | os.PathLike, *, check_sha256: bool = True) -> list[str]:
    """Problems found in a build's shards and index, one line each (empty list: all good).

    Checks, per finished shard: tar and parquet present, tar size as recorded, the parquet's sha256 and rows against
    the stats, and (with `check_sha256`) the whole tar's sha256 (labels and metadata members too) and every image's
    bytes. Also: shards left unfinished (no stats file); ``index.parquet`` row by row against the shards' parquet
    files (every column but ``judge_prob``, which an evaluation adds); each class's token file against the
    ``token_sha256`` of its rows, and ``tokens/tokens.safetensors`` against the class files. Each line names the file
    and how to make it again.

    >>> verify("out/digits")  # doctest: +SKIP
    []
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    problems: list[str] = []
    if (legacy := legacy_build_error(out)) is not None:
        return [str(legacy)]
    done = done_shards(out)
    meta_dir = out / META_DIR
    if meta_dir.is_dir():
        started = {parsed for p in meta_dir.iterdir()
                   if p.suffix == ".parquet" and (parsed := parse_shard_name(p.stem)) is not None}
        for sid, method in sorted(started - set(done.items())):
            problems.append(f"{shard_name(sid, method)}: unfinished (no {META_DIR}/{shard_name(sid, method)}"
                            f"_stats.json); a resumed build (`{resume_command(out)}`) redoes it.")
    counts: dict[int, int] = {}
    for sid, method in done.items():
        paths = shard_paths(out, sid, method)
        hint = rebuild_hint(out, sid, method)
        tar, parquet = f"{SHARDS_DIR}/{paths.tar.name}", f"{META_DIR}/{paths.parquet.name}"
        try:
            st = ShardStats.load(paths.stats)
        except (OSError, ValueError, TypeError, KeyError) as e:
            problems.append(f"{META_DIR}/{paths.stats.name}: stats file unreadable ({e}); {hint}.")
            continue
        if not paths.tar.is_file():
            problems.append(f"{tar}: missing; {hint}.")
            continue
        if paths.tar.stat().st_size != st.tar_bytes:
            problems.append(f"{tar}: {paths.tar.stat().st_size} bytes, stats say {st.tar_bytes} "
                            f"(truncated or overwritten); {hint}.")
        try:
            rows = pq.read_table(paths.parquet, columns=["key", "offset", "size", "sha256"]).to_pylist()
        except (OSError, ValueError, pa.ArrowException) as e:
            problems.append(f"{parquet}: unreadable ({type(e).__name__}); {hint}.")
            continue
        counts[sid] = len(rows)
        if len(rows) != st.num_samples:
            problems.append(f"{parquet}: {len(rows)} rows, stats say {st.num_samples}; {hint}.")
        if sha256_of(paths.parquet) != st.parquet_sha256:
            problems.append(f"{parquet}: its sha256 differs from the one in its stats (changed after the shard was "
                            f"written); {hint}.")
        if check_sha256:
            bad, tar_sha = _check_tar(paths.tar, rows)
            if bad:
                problems.append(f"{tar}: {len(bad)} image(s) fail their sha256 (first: {bad[0]}); {hint}.")
            elif tar_sha != st.tar_sha256:
                problems.append(f"{tar}: its sha256 differs from the one in its stats (a label or metadata member was "
                                f"changed); {hint}.")
    index = out / INDEX_FILE
    remerge = f"delete {index} and rerun `{resume_command(out)}` to merge it again"
    if index.is_file():
        try:
            table = pq.read_table(index)
            table = conform(table, optional_columns(table.column_names)).drop_columns(["judge_prob"])
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            problems.append(f"{INDEX_FILE}: unreadable ({type(e).__name__}); {remerge}.")
        else:
            problems += _index_against_shards(out, table, counts, done, remerge)
            problems += _tokens_against_index(out, table)
    elif done:
        problems.append(f"{INDEX_FILE}: missing; rerun `{resume_command(out)}` to merge it.")
    return problems


def _check_tar(tar: Path, rows: list[dict]) -> tuple[list[str], str]:
    """(keys of the images that fail their sha256, the whole tar's sha256), in one sequential read of the tar."""
    bad: list[str] = []
    whole = hashlib.sha256()
    with open(tar, "rb") as f:
        pos = 0

        def read(n: int) -> bytes:
            nonlocal pos
            data = f.read(n)
            whole.update(data)
            pos += len(data)
            return data

        for r in sorted(rows, key=lambda r: r["offset"]):
            if r["offset"] < pos:  # overlapping rows: not what a shard writer makes; read this one on its own
                f.seek(r["offset"])
                data = f.read(r["size"])
                f.seek(pos)
            else:
                while pos < r["offset"] and read(min(1 << 20, r["offset"] - pos)):
                    pass
                data = read(r["size"])
            if len(data) != r["size"] or hashlib.sha256(data).hexdigest() != r["sha256"]:
                bad.append(r["key"])
        while read(1 << 20):
            pass
    return bad, whole.hexdigest()


def _index_against_shards(out: Path, table: pa.Table, counts: dict[int, int], methods: dict[int, str],
                          remerge: str) -> list[str]:
    """Problems of ``index.parquet`` (without ``judge_prob``) against the shards' own parquet files, row by row."""
    import pyarrow.parquet as pq

    problems = []
    in_index = Counter(table.column("shard").to_pylist())
    for sid in sorted(set(in_index) | set(counts)):
        if in_index.get(sid, 0) != counts.get(sid, 0):
            problems.append(f"{INDEX_FILE}: {in_index.get(sid, 0)} rows of shard {sid:05d}, the shard has "
                            f"{counts.get(sid, 0)}; {remerge}.")
    table = table.sort_by([("shard", "ascending"), ("key", "ascending")])
    start = 0
    for sid, n in sorted(in_index.items()):
        rows = table.slice(start, n)
        start += n
        if counts.get(sid) != n:
            continue  # already reported
        theirs = pq.read_table(shard_paths(out, sid, methods[sid]).parquet)
        theirs = conform(theirs, optional_columns(table.column_names))
        theirs = theirs.drop_columns(["judge_prob"]).sort_by([("key", "ascending")])
        if not rows.equals(theirs):
            first = next((rows.column("key")[i].as_py() for i in range(n)
                          if rows.slice(i, 1).to_pylist() != theirs.slice(i, 1).to_pylist()), "?")
            problems.append(f"{INDEX_FILE}: rows of shard {sid:05d} differ from the shard's own parquet (first: "
                            f"{first}); {remerge}.")
    return problems


def _tokens_against_index(out: Path, table: pa.Table) -> list[str]:
    """Problems of the token files: each class's file against the ``token_sha256`` its rows recorded, and the
    all-tokens file against the class files (a folder without ``tokens/`` has nothing to check)."""
    import numpy as np
    import pyarrow.compute as pc
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    problems: list[str] = []
    if not (out / TOKENS_DIR).is_dir():  # images without token files: shards written by hand, not by a build
        return problems
    recorded = table.filter(pc.is_valid(table.column("token_sha256"))).select(["class_index", "token_sha256"])
    by_class: dict[int, set[str]] = {}
    for c, sha in zip(recorded.column("class_index").to_pylist(), recorded.column("token_sha256").to_pylist()):
        by_class.setdefault(c, set()).add(sha)
    fix = f"rerun `{resume_command(out)}`"
    class_vectors = {}
    for c, shas in sorted(by_class.items()):
        path = token_path(out, c)
        again = f"delete {path} and every shard of class {c}, then {fix}"
        try:
            tensors = load_file(str(path))
            vector = np.asarray(tensors[token_string(c)], dtype="<f4").reshape(-1)
        except FileNotFoundError:
            problems.append(f"{TOKENS_DIR}/{path.name}: missing, but {len(shas)} token hash(es) of class {c} are in "
                            f"the index; {again}.")
            continue
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            problems.append(f"{TOKENS_DIR}/{path.name}: unreadable or without {token_string(c)} "
                            f"({type(e).__name__}); {again}.")
            continue
        class_vectors[token_string(c)] = vector
        if not shas <= _token_hashes(vector):
            problems.append(f"{TOKENS_DIR}/{path.name}: its token is not the one class {c}'s images were made with "
                            f"(token_sha256 differs); {again}.")
    all_path = out / TOKENS_DIR / ALL_TOKENS_FILE
    if class_vectors and all_path.is_file():
        try:
            every = {k: np.asarray(v, dtype="<f4").reshape(-1) for k, v in load_file(str(all_path)).items()}
        except (SafetensorError, OSError, ValueError) as e:
            every = None
            problems.append(f"{TOKENS_DIR}/{ALL_TOKENS_FILE}: unreadable ({type(e).__name__}); delete it and {fix}.")
        if every is not None:
            wrong = [t for t, v in class_vectors.items() if t not in every or not np.array_equal(every[t], v)]
            if wrong:
                problems.append(f"{TOKENS_DIR}/{ALL_TOKENS_FILE}: {len(wrong)} token(s) missing or differing from "
                                f"the class files (first: {wrong[0]}); delete it and {fix}.")
    return problems


def _token_hashes(vector) -> set[str]:
    """`embedding_sha256` of a fp32 token as a text encoder may hold it: fp32, or rounded to fp16 or bf16."""
    import numpy as np

    forms = [vector, vector.astype(np.float16).astype("<f4")]
    bits = vector.astype("<f4").view("<u4")
    # bf16: round to nearest even on the upper 16 bits, as torch does
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype("<u4")
    forms.append(rounded.view("<f4"))
    return {hashlib.sha256(np.ascontiguousarray(f, dtype="<f4").tobytes()).hexdigest() for f in forms}


METHOD_ORDER = ("real", "sd", "ti", "mcti", "dct")  # table order: baselines first, the method last


def method_sort_key(m: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m)


# --------------------------------------------------------------------------------------------------------------------
# Reading a build directory
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BuildView:
    """A build directory, read-only: its classes, index rows and resolved config."""

    root: Path
    classes: list[dict]  # classes.json
    index: pa.Table  # index.parquet (or, while a build runs, the finished shards' rows)
    config: dict  # out/config.yaml as a plain dict ({} when absent)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in sorted(self.classes, key=lambda c: c["index"])]

    @property
    def methods(self) -> list[str]:
        return sorted(set(self.index.column("method").to_pylist()), key=method_sort_key)

    @property
    def image_size(self) -> tuple[int, int]:
        """The most common (height, width) of the build's images."""
        sizes = Counter(zip(self.index.column("height").to_pylist(), self.index.column("width").to_pylist()))
        return sizes.most_common(1)[0][0] if sizes else (512, 512)

    def select_methods(self, methods: Sequence[str] | None) -> list[str]:
        """`methods` checked against the build's (None -> all of them, baseline order). ``"dct+sd"`` names one
        synthetic set of both methods' images (a cap of N per class takes them in turn)."""
        present = self.methods
        unknown = [m for m in methods or () if not all(part in present for part in m.split("+"))]
        if unknown:
            raise UserError(f"`methods` {', '.join(unknown)} not in the build at {self.root}: it has "
                            f"{', '.join(present)}.")
        return list(methods) if methods is not None else present

    def rows(self, methods: Sequence[str] | None = None) -> list[dict]:
        """Index rows as dicts (in index order: sorted by key), optionally only those of `methods`."""
        rows = self.index.to_pylist()
        if methods is not None:
            wanted = set(methods)
            rows = [r for r in rows if r["method"] in wanted]
        return rows


def open_build(root: str | os.PathLike) -> BuildView:
    """Open a build directory for evaluation (a finished one, or the finished shards of a running one).

    >>> build = open_build("out/digits")
    >>> build.methods
    ['sd', 'dct']
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"Build directory not found at {root}: run `synthaug build --out {root}` first.")
    if not (root / CLASSES_FILE).is_file():
        raise UserError(
            f"Build not found or unfinished at {root}: expected {CLASSES_FILE}. Run (or resume) "
            f"`synthaug build --out {root}` until it completes."
        )
    index = load_index(root)
    if index.num_rows == 0:
        raise UserError(f"The build at {root} holds no images: run (or resume) `synthaug build --out {root}`.")
    classes = json.loads((root / CLASSES_FILE).read_text())
    config = read_config(root, what="root", missing_ok=True)
    return BuildView(root=root, classes=classes, index=index, config=config)
