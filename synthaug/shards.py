"""WebDataset shards, their per-shard index, and random access into them (ARCHITECTURE.md, "The build folder").

Consumes generated images with their metadata (any object with the attributes of `synthaug.generation.GeneratedImage`)
and produces, per shard id chosen by the build planner::

    shards/00003.tar          WebDataset: "dct-c017-s00042.png" (or .jpg/.webp), ".cls", ".json" per sample
    shards/00003.parquet      one row per sample: metadata + the image's byte `offset`/`size` in the tar + `sha256`
    shards/00003_stats.json   written LAST; its presence is what "shard done" means

`merge_index` then writes ``index.parquet`` (all rows, sorted by key), ``classes.json`` and ``_info.json`` (timm's
WebDataset info format, so ``timm.data.create_dataset("wds/synthaug", root=out, split="train")`` reads the build).
`read_sample` reads one image with one positioned read; `verify` checks every byte against the recorded sha256.

Every file is written atomically (synthaug.atomic) and tar members carry a fixed mtime/uid/gid/mode, so the same
images give byte-identical shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write, write_text
from .errors import UserError
from .layout import (
    CLASSES_FILE,
    INDEX_FILE,
    INFO_FILE,
    SHARDS_DIR,
    done_shard_ids,
    rebuild_hint,
    sample_key,
    shard_paths,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

logger = logging.getLogger(__name__)


FORMAT_VERSION = 1


# Fixed tar member attributes: a rebuild with the same config and seeds must give identical bytes.
TAR_MTIME = 946_684_800  # 2000-01-01T00:00:00Z


TAR_USER = TAR_GROUP = "synthaug"  # uid/gid stay 0 (tarfile's default)


TAR_MODE = 0o444


# File extension in the tar -> PIL format name. The extension is what WebDataset and timm decode by.
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


PNG_COMPRESS_LEVEL = 6  # PIL's default, made explicit because it decides the bytes


# Attributes every sample must carry (synthaug.generation.GeneratedImage); judge_prob is optional (filled later).
SAMPLE_FIELDS = ("image", "class_index", "class_name", "method", "index", "prompt", "seed", "token_sha256", "model_id",
                 "scheduler", "steps", "guidance_scale", "height", "width", "guide_prob", "guide_top5")


class ShardError(UserError):
    """A shard on disk is missing, truncated or corrupt. The message names it and the command that rebuilds it."""


# --------------------------------------------------------------------------------------------------------------------
# The index schema
# --------------------------------------------------------------------------------------------------------------------
def index_schema() -> pa.Schema:
    """Columns of the per-shard parquet files and of ``index.parquet`` (ARCHITECTURE.md, plus `index`, `image_format`).

    `token_sha256` is null for the plain-prompt baseline, `guide_prob`/`guide_top5` are null when no guide scored the
    image, `judge_prob` is null until an evaluation fills it. `offset`/`size` locate the image bytes inside the tar.
    """
    import pyarrow as pa

    return pa.schema([
        ("key", pa.string()),
        ("class_index", pa.int64()),
        ("class_name", pa.string()),
        ("method", pa.string()),
        ("index", pa.int64()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("token_sha256", pa.string()),
        ("model_id", pa.string()),
        ("scheduler", pa.string()),
        ("steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("guide_prob", pa.float64()),
        ("guide_top5", pa.list_(pa.int64())),
        ("judge_prob", pa.float64()),
        ("image_format", pa.string()),
        ("shard", pa.int64()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("sha256", pa.string()),
    ])


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _top5(v: Any) -> list[int] | None:
    """Class indices the guide ranked highest, best first. Accepts ints or (index, prob) pairs."""
    if v is None:
        return None
    out = []
    for item in v:
        if isinstance(item, (tuple, list)):  # (class_index, prob) pairs: keep the index, the order carries the rank
            item = item[0]
        out.append(int(item))
    return out


def _describe(sample: Any, position: int, image_format: str) -> dict[str, Any]:
    """Metadata row of one sample (without the tar location), from a GeneratedImage-like object."""
    missing = [f for f in SAMPLE_FIELDS if not hasattr(sample, f)]
    if missing:
        raise TypeError(
            f"sample {position} ({type(sample).__name__}) lacks attribute(s) {', '.join(missing)}: write_shard "
            f"expects objects like synthaug.generation.GeneratedImage with {', '.join(SAMPLE_FIELDS)}."
        )
    key = sample_key(sample.method, sample.class_index, sample.index)
    return {
        "key": key,
        "class_index": int(sample.class_index),
        "class_name": str(sample.class_name),
        "method": str(sample.method),
        "index": int(sample.index),
        "prompt": str(sample.prompt),
        "seed": int(sample.seed),
        "token_sha256": None if sample.token_sha256 is None else str(sample.token_sha256),
        "model_id": str(sample.model_id),
        "scheduler": str(sample.scheduler),
        "steps": int(sample.steps),
        "guidance_scale": float(sample.guidance_scale),
        "height": int(sample.height),
        "width": int(sample.width),
        "guide_prob": _opt_float(sample.guide_prob),
        "guide_top5": _top5(sample.guide_top5),
        "judge_prob": _opt_float(getattr(sample, "judge_prob", None)),
        "image_format": image_format,
    }


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------
def encode_image(image: Image.Image, image_format: str = "png", quality: int = 95) -> bytes:
    """Deterministic bytes of one image: PNG (lossless, compress level 6), JPEG or WebP at `quality`.

    >>> from PIL import Image
    >>> encode_image(Image.new("RGB", (8, 8)), "png")[:4]
    b'\\x89PNG'
    """
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"`shards.image_format` must be one of {', '.join(IMAGE_FORMATS)} but is {image_format!r}.")
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    elif image_format == "jpg":
        # JPEG has no alpha; subsampling and optimize are pinned so the bytes depend only on pixels and quality.
        image.convert("RGB").save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2,
                                  optimize=False)
    else:
        image.save(buf, format="WEBP", quality=quality, method=4, lossless=False)
    return buf.getvalue()


@dataclass(frozen=True)
class ShardStats:
    """Contents of ``{id:05d}_stats.json``: what the shard holds and the checksums of its files."""

    shard: int
    num_samples: int
    tar: str  # relative to the build directory, as in _info.json
    tar_bytes: int
    tar_sha256: str
    parquet: str
    parquet_sha256: str
    image_format: str
    quality: int | None  # None for PNG (lossless); the JPEG/WebP quality otherwise
    classes: dict[str, int]  # class_index (as a JSON key) -> samples
    methods: dict[str, int]
    first_key: str
    last_key: str
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardStats:
        data = json.loads(Path(path).read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class _HashingWriter:
    """File wrapper that hashes and counts every byte the tar writer streams through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.nbytes = f, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        if self.f is None:  # discarded: the temp file is gone, tarfile's finaliser may still try to write
            return len(data)
        self.sha.update(data)
        self.nbytes += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        if self.f is not None:
            self.f.flush()

    def discard(self) -> None:
        self.f = None


def write_shard(
    out: str | os.PathLike,
    shard_id: int,
    samples: Iterable[Any],
    *,
    image_format: str = "png",
    quality: int = 95,
) -> ShardStats:
    """Write one shard: the tar, its parquet rows, then its stats file (each atomically, the stats file last).

    Samples are streamed (a generator is fine): each image is encoded, written to the tar and dropped, so memory
    stays at one image. Members are ``{key}.{png|jpg|webp}``, ``{key}.cls`` (the class index as ASCII) and
    ``{key}.json`` (the metadata row), in that sorted order, with fixed mtime/uid/gid/mode.

    Args:
        out: the build directory; files go to ``out/shards/``.
        shard_id: chosen by the build planner (a deterministic function of class and chunk).
        samples: objects with the attributes of `synthaug.generation.GeneratedImage`.
        image_format: ``"png"``, ``"jpg"`` or ``"webp"``.
        quality: JPEG/WebP quality 1-100 (recorded in the stats; unused for PNG).

    Returns:
        The `ShardStats` written to ``{id:05d}_stats.json``.

    >>> stats = write_shard("out", 0, images)  # doctest: +SKIP
    >>> stats.num_samples, shard_done("out", 0)  # doctest: +SKIP
    (8, True)
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import webdataset as wds

    if image_format not in IMAGE_FORMATS:
        raise UserError(f"`shards.image_format` must be one of {', '.join(IMAGE_FORMATS)} but is {image_format!r}.")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UserError(f"`shards.quality` must be an integer in 1..100 but is {quality!r}.")
    paths = shard_paths(out, shard_id)
    # A stale stats file from an earlier attempt must not survive a rewrite: remove it before touching the tar, so a
    # crash mid-rewrite leaves the shard "not done" rather than "done" with mismatched files.
    paths.stats.unlink(missing_ok=True)

    # 1. Tar: stream every sample through webdataset's writer, hashing the bytes as they pass.
    rows: list[dict[str, Any]] = []
    keys: set[str] = set()
    with atomic_write(paths.tar, "w+b") as f:
        hashing = _HashingWriter(f)
        writer = wds.TarWriter(hashing, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_GROUP,
                               mode=TAR_MODE)
        try:
            for position, sample in enumerate(samples):
                row = _describe(sample, position, image_format)
                if row["key"] in keys:
                    raise ValueError(f"duplicate key {row['key']!r} in shard {shard_id}: every (method, class, index) "
                                     "must appear once.")
                keys.add(row["key"])
                data = encode_image(sample.image, image_format, quality)
                meta = {k: v for k, v in row.items() if k != "judge_prob"}
                meta_bytes = json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
                writer.write({
                    "__key__": row["key"],
                    image_format: data,
                    "cls": str(row["class_index"]).encode("ascii"),
                    "json": meta_bytes,
                })
                row["sha256"] = hashlib.sha256(data).hexdigest()
                row["size"] = len(data)
                rows.append(row)
            writer.close()
        except BaseException:
            hashing.discard()
            raise
        if not rows:
            raise ValueError(f"shard {shard_id} got no samples: the planner should not create empty shards.")
        # 2. Locate every image inside the tar from the headers just written (tarfile seeks over the data).
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:") as tf:
            located = {m.name: (m.offset_data, m.size) for m in tf.getmembers()}
    for row in rows:
        offset, size = located[f"{row['key']}.{image_format}"]
        if size != row["size"]:  # would mean the tar writer changed the bytes: never ship such a shard
            raise RuntimeError(f"tar member {row['key']}.{image_format} has {size} bytes, expected {row['size']}")
        row["shard"] = shard_id
        row["offset"] = offset
    tar_bytes, tar_sha = hashing.nbytes, hashing.sha.hexdigest()

    # 3. Parquet rows, in tar order.
    schema = index_schema()
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    with atomic_write(paths.parquet, "wb") as f:
        f.write(buf.getvalue())

    # 4. Stats, last: from now on the shard counts as done.
    stats = ShardStats(
        shard=shard_id,
        num_samples=len(rows),
        tar=f"{SHARDS_DIR}/{paths.tar.name}",  # "/" on every OS: _info.json is read by timm anywhere
        tar_bytes=tar_bytes,
        tar_sha256=tar_sha,
        parquet=f"{SHARDS_DIR}/{paths.parquet.name}",
        parquet_sha256=hashlib.sha256(buf.getvalue()).hexdigest(),
        image_format=image_format,
        quality=None if image_format == "png" else quality,
        classes={str(k): v for k, v in sorted(Counter(r["class_index"] for r in rows).items())},
        methods=dict(sorted(Counter(r["method"] for r in rows).items())),
        first_key=rows[0]["key"],
        last_key=rows[-1]["key"],
    )
    write_text(paths.stats, stats.to_json())
    return stats


def check_shard(out: str | os.PathLike, shard_id: int) -> str | None:
    """Why a shard marked done cannot be trusted, or None when it can: the cheap check a resumed build makes.

    Compares the tar's size and the parquet file's sha256 with what ``_stats.json`` recorded when the shard was
    written (the parquet is small; the tar is not read). `verify` checks every image's bytes too.
    """
    paths = shard_paths(out, shard_id)
    try:
        st = ShardStats.load(paths.stats)
        expected_bytes, expected_sha = int(st.tar_bytes), str(st.parquet_sha256)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return f"its stats file is unreadable ({type(e).__name__})"
    try:
        size = paths.tar.stat().st_size
    except OSError:
        return "its tar is missing"
    if size != expected_bytes:
        return f"its tar has {size} bytes, the stats say {expected_bytes}"
    sha = hashlib.sha256()
    try:
        with open(paths.parquet, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    except OSError:
        return "its parquet file is missing"
    if sha.hexdigest() != expected_sha:
        return "its parquet file differs from the one recorded in the stats"
    return None


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


INDEX_ROW_GROUP = 131_072  # rows per row group of index.parquet: the merge holds at most one row group of rows


def _shard_stats(out: Path, sid: int) -> ShardStats:
    """A finished shard's stats, with its tar and parquet present."""
    paths = shard_paths(out, sid)
    try:
        st = ShardStats.load(paths.stats)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ShardError(f"Shard stats {paths.stats} is unreadable ({e}): {rebuild_hint(out, sid)}.") from None
    if not paths.parquet.is_file() or not paths.tar.is_file():
        missing = paths.parquet if not paths.parquet.is_file() else paths.tar
        raise ShardError(f"Shard {sid:05d} is marked done but {missing} is missing: {rebuild_hint(out, sid)}.")
    return st


def _shard_rows(out: Path, st: ShardStats) -> pa.Table:
    """A finished shard's parquet rows in the index schema, checked against its stats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = shard_paths(out, st.shard).parquet
    try:
        t = pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as e:  # what pyarrow raises for a damaged file
        raise ShardError(f"Shard index {path} is corrupt ({e}): {rebuild_hint(out, st.shard)}.") from None
    if t.num_rows != st.num_samples:
        raise ShardError(f"Shard {st.shard:05d} has {t.num_rows} rows in {path.name} but its stats say "
                         f"{st.num_samples}: {rebuild_hint(out, st.shard)}.")
    return t.cast(index_schema())


def _read_done_shards(out: Path) -> tuple[list[ShardStats], pa.Table]:
    """Stats and parquet rows of every finished shard, checked against each other (all rows in memory)."""
    import pyarrow as pa

    stats = [_shard_stats(out, sid) for sid in done_shard_ids(out)]
    tables = [_shard_rows(out, st) for st in stats]
    table = pa.concat_tables(tables) if tables else index_schema().empty_table()
    return stats, table


class _Unsorted(Exception):
    """The shards' rows, read in the order of their first keys, are not strictly ascending (overlapping shards)."""


def _sorted_rows(out: Path, stats: list[ShardStats]):
    """Every shard's rows as one stream in ascending key order, shard by shard, without holding more than one shard.

    Shards are read in the order of their recorded first keys; the stream checks that keys strictly ascend inside
    each shard and across shards, and raises `_Unsorted` as soon as they do not (then the caller sorts in memory).
    """
    import pyarrow.compute as pc

    last = None
    for st in sorted(stats, key=lambda s: (s.first_key, s.shard)):
        t = _shard_rows(out, st)
        if not t.num_rows:
            continue
        keys = t.column("key")
        if last is not None and not keys[0].as_py() > last:
            raise _Unsorted
        if t.num_rows > 1 and not pc.all(pc.greater(keys.slice(1), keys.slice(0, t.num_rows - 1))).as_py():
            raise _Unsorted
        last = keys[-1].as_py()
        yield t


def _memory_sorted_rows(out: Path, stats: list[ShardStats]):
    """All rows sorted in memory: for shards whose key ranges overlap. A key in two shards is an error."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = pa.concat_tables([_shard_rows(out, st) for st in stats]).sort_by([("key", "ascending")])
    keys = table.column("key")
    if table.num_rows > 1:
        same = pc.equal(keys.slice(1), keys.slice(0, table.num_rows - 1))
        if pc.any(same).as_py():
            dupes = pc.unique(pc.filter(keys.slice(1), same))
            first = pc.min(dupes).as_py()
            where = table.filter(pc.equal(table.column("key"), first))
            shards = sorted(set(where.column("shard").to_pylist()))
            raise ShardError(f"Key {first!r} appears in shards {shards} ({len(dupes)} duplicate keys in all): "
                             f"delete the stale shard's files under {out / SHARDS_DIR} and rerun the build.")
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


def _write_index(path: Path, tables, verdicts: _Verdicts) -> tuple[int, int]:
    """Write `tables` (rows in final order) to `path` atomically, in row groups of `INDEX_ROW_GROUP` rows.

    Each row group is written from one contiguous chunk, so the bytes depend on the rows only, not on how they were
    read. Returns (rows, largest class index + 1).
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    schema = index_schema()
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
    """Merge the finished shards into ``index.parquet``, ``_info.json`` and (when given) ``classes.json``.

    The index is streamed: shards are read one at a time in key order and written in row groups of
    `INDEX_ROW_GROUP` rows, so memory stays at one row group however large the build (shards whose key ranges
    overlap, which a build never writes, are sorted in memory instead). The bytes depend on the rows only.

    ``_info.json`` follows timm's WebDataset reader (``timm/data/readers/reader_wds.py``)::

        {"name": "synthaug", "version": 1, "num_classes": K,
         "splits": {"train": {"name": "train", "num_samples": N, "filenames": ["shards/00000.tar", ...],
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
    stats = [_shard_stats(out, sid) for sid in done_shard_ids(out)]
    if not stats:
        raise UserError(f"No finished shards in {out / SHARDS_DIR} (no *_stats.json): run `synthaug build` first.")
    if classes is not None:
        for c in classes:
            if not isinstance(c, dict) or "index" not in c or "name" not in c:
                raise ValueError(f"`classes` entries must be dicts with 'index' and 'name' but got {c!r}.")
    # 1. The index: all rows, sorted by key, streamed shard by shard (a shard's keys ascend and shards cover
    # disjoint key ranges); shards whose ranges overlap are sorted in memory, where a key in two shards (a stale or
    # misplanned shard) is an error.
    verdicts = _Verdicts(out / INDEX_FILE)
    try:
        num_samples, top_class = _write_index(out / INDEX_FILE, _sorted_rows(out, stats), verdicts)
    except _Unsorted:
        logger.info("shards of %s overlap in keys: sorting the index in memory", out)
        num_samples, top_class = _write_index(out / INDEX_FILE, _memory_sorted_rows(out, stats), verdicts)

    # 2. classes.json
    classes_path = None
    if classes is not None:
        classes_path = out / CLASSES_FILE
        write_text(classes_path, json.dumps(sorted(classes, key=lambda c: int(c["index"])), indent=1,
                                            ensure_ascii=False) + "\n")

    # 3. _info.json (timm WebDataset format)
    train_set = None if train_methods is None else set(train_methods)
    train = []
    for s in stats:
        m = set(s.methods)
        if train_set is None or m <= train_set:
            train.append(s)
        elif m & train_set:
            raise UserError(f"Shard {s.shard:05d} mixes methods {sorted(m)} but `train_methods` is "
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
    write_text(out / INFO_FILE, json.dumps(info, indent=1) + "\n")
    return MergeResult(num_samples=num_samples, num_shards=len(stats),
                       splits={k: v["num_samples"] for k, v in splits.items()}, index=out / INDEX_FILE,
                       info=out / INFO_FILE, classes=classes_path)


def load_index(out: str | os.PathLike) -> pa.Table:
    """All rows of a build: ``index.parquet``, or (while a build is still running) the finished shards' rows.

    >>> rows = load_index("out/digits").to_pylist()  # doctest: +SKIP
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    path = out / INDEX_FILE
    if path.is_file():
        try:
            return pq.read_table(path).cast(index_schema())
        except (OSError, ValueError, pa.ArrowException) as e:
            raise ShardError(f"{path} is corrupt ({e}): rerun `synthaug build --config {out / 'config.yaml'}` to "
                             "merge it again from the shards.") from None
    stats, table = _read_done_shards(out)
    if not stats:
        raise UserError(f"No synthetic data at {out}: expected {INDEX_FILE} or finished shards under "
                        f"{out / SHARDS_DIR}. Run `synthaug build` first, or check the path.")
    logger.warning("%s has no %s yet; using the %d finished shards", out, INDEX_FILE, len(stats))
    return table.sort_by([("key", "ascending")])


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------
def _shard_of(tar_path: Path) -> tuple[Path, int] | None:
    """(build dir, shard id) of ``…/out/shards/00003.tar``; None for a tar outside a build."""
    m = re.fullmatch(r"(\d{5,})\.tar", tar_path.name)
    if m and tar_path.parent.name == SHARDS_DIR:
        return tar_path.parent.parent, int(m.group(1))
    return None


def _shard_error(tar_path: Path, problem: str) -> ShardError:
    where = _shard_of(tar_path)
    fix = rebuild_hint(*where) if where else "rebuild it"
    return ShardError(f"Shard {tar_path} {problem}: {fix}.")


def read_sample(tar_path: str | os.PathLike, offset: int, size: int) -> bytes:
    """The image bytes of one sample: one positioned read at (`offset`, `size`) from the index row; no extraction.

    Raises:
        ShardError: the tar is missing or ends before ``offset + size`` (truncated); the message names the shard
            and the command that rebuilds it.

    >>> row = load_index("out/digits").slice(0, 1).to_pylist()[0]  # doctest: +SKIP
    >>> data = read_sample(f"out/digits/shards/{row['shard']:05d}.tar", row["offset"], row["size"])  # doctest: +SKIP
    """
    tar_path = Path(tar_path)
    try:
        with open(tar_path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    except FileNotFoundError:
        raise _shard_error(tar_path, "is missing") from None
    if len(data) != size:
        raise _shard_error(tar_path, f"is truncated (wanted {size} bytes at offset {offset}, got {len(data)})")
    return data


class ShardReader:
    """Random access to the images of one build, with tar handles opened lazily in each process.

    A handle opened before a fork (DataLoader workers) is never reused in the child: the reader notices the new
    process id and opens its own. Reads use ``os.pread`` (no shared file position), so threads may share a reader.

    >>> reader = ShardReader("out/digits")  # doctest: +SKIP
    >>> data = reader.read(shard=0, offset=1536, size=1200, sha256=None)  # doctest: +SKIP
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out)
        self._fds: dict[int, int] = {}
        self._paths: dict[int, Path] = {}
        self._pid = os.getpid()

    def tar_path(self, shard: int) -> Path:
        path = self._paths.get(shard)
        if path is None:  # Path arithmetic costs more than the read itself on small images: do it once per shard
            path = self._paths[shard] = shard_paths(self.out, shard).tar
        return path

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()  # the parent's descriptors are not ours to use or close
        fd = self._fds.get(shard)
        if fd is None:
            try:
                fd = os.open(self.tar_path(shard), os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except FileNotFoundError:
                raise _shard_error(self.tar_path(shard), "is missing") from None
            self._fds[shard] = fd
        return fd

    def read(self, shard: int, offset: int, size: int, sha256: str | None = None) -> bytes:
        """Bytes at (`offset`, `size`) of shard `shard`; checked against `sha256` when given."""
        fd = self._fd(shard)
        if hasattr(os, "pread"):
            data = os.pread(fd, size, offset)
        else:  # Windows: no pread; seek + read on the private descriptor
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, size)
        if len(data) != size:
            raise _shard_error(self.tar_path(shard), f"is truncated (wanted {size} bytes at offset {offset}, "
                                                     f"got {len(data)})")
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise _shard_error(self.tar_path(shard), f"is corrupt (sha256 mismatch at offset {offset})")
        return data

    def read_image(self, shard: int, offset: int, size: int, *, sha256: str | None = None, key: str = "",
                   image_format: str | None = None, mode: str = "RGB") -> Image.Image:
        """`read`, then decode to a PIL image; undecodable bytes are reported as a corrupt shard."""
        data = self.read(shard, offset, size, sha256)
        try:
            return decode_image(data, mode=mode, image_format=image_format)
        except ShardError as e:
            raise _shard_error(self.tar_path(shard), f"is corrupt ({key or f'offset {offset}'}: {e})") from None

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:
        # Descriptors do not travel to other processes (spawn, Ray, pickle): each process opens its own.
        return {"out": self.out, "_fds": {}, "_paths": {}, "_pid": None}

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


def decode_image(data: bytes, *, where: str = "", mode: str = "RGB", image_format: str | None = None) -> Image.Image:
    """PIL image from encoded bytes, fully loaded and converted to `mode`; a decode failure names `where`.

    `image_format` (``png``/``jpg``/``webp``, from the index row) spares PIL from probing every format plugin.

    >>> from PIL import Image
    >>> decode_image(encode_image(Image.new("RGB", (4, 4)))).size
    (4, 4)
    """
    from PIL import Image, UnidentifiedImageError

    formats = [IMAGE_FORMATS[image_format]] if image_format in IMAGE_FORMATS else None
    try:
        img = Image.open(io.BytesIO(data), formats=formats)
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ShardError(f"Image {where} cannot be decoded ({e}).") from None
    return img.convert(mode) if mode and img.mode != mode else img


# --------------------------------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------------------------------
def verify(out: str | os.PathLike, *, check_sha256: bool = True) -> list[str]:
    """Problems found in a build's shards and index, one line each (empty list: all good).

    Checks, per finished shard: tar and parquet present, tar size as recorded, parquet rows = stats count, and
    (with `check_sha256`) every image's bytes against its sha256. Also: shards left unfinished (no stats file), and
    ``index.parquet`` rows against the shards. Each line names the shard and how to rebuild it.

    >>> verify("out/digits")  # doctest: +SKIP
    []
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    problems: list[str] = []
    done = done_shard_ids(out)
    shard_dir = out / SHARDS_DIR
    if shard_dir.is_dir():
        started = {int(m.group(1)) for p in shard_dir.iterdir() if (m := re.fullmatch(r"(\d{5,})\.(tar|parquet)",
                                                                                       p.name))}
        for sid in sorted(started - set(done)):
            problems.append(f"shards/{sid:05d}: unfinished (no {sid:05d}_stats.json); a resumed build "
                            f"(`synthaug build --config {out / 'config.yaml'}`) redoes it.")
    counts: dict[int, int] = {}
    for sid in done:
        paths = shard_paths(out, sid)
        hint = rebuild_hint(out, sid)
        try:
            st = ShardStats.load(paths.stats)
        except (OSError, ValueError, TypeError, KeyError) as e:
            problems.append(f"shards/{sid:05d}: stats file unreadable ({e}); {hint}.")
            continue
        if not paths.tar.is_file():
            problems.append(f"shards/{sid:05d}.tar: missing; {hint}.")
            continue
        if paths.tar.stat().st_size != st.tar_bytes:
            problems.append(f"shards/{sid:05d}.tar: {paths.tar.stat().st_size} bytes, stats say {st.tar_bytes} "
                            f"(truncated or overwritten); {hint}.")
        try:
            rows = pq.read_table(paths.parquet, columns=["key", "offset", "size", "sha256"]).to_pylist()
        except (OSError, ValueError, pa.ArrowException) as e:
            problems.append(f"shards/{sid:05d}.parquet: unreadable ({type(e).__name__}); {hint}.")
            continue
        counts[sid] = len(rows)
        if len(rows) != st.num_samples:
            problems.append(f"shards/{sid:05d}.parquet: {len(rows)} rows, stats say {st.num_samples}; {hint}.")
        if check_sha256:
            bad = []
            with open(paths.tar, "rb") as f:
                for r in rows:
                    f.seek(r["offset"])
                    data = f.read(r["size"])
                    if len(data) != r["size"] or hashlib.sha256(data).hexdigest() != r["sha256"]:
                        bad.append(r["key"])
            if bad:
                problems.append(f"shards/{sid:05d}.tar: {len(bad)} image(s) fail their sha256 (first: {bad[0]}); "
                                f"{hint}.")
    index = out / INDEX_FILE
    if index.is_file():
        try:
            shards = pq.read_table(index, columns=["shard"]).column("shard").to_pylist()
        except (OSError, ValueError, pa.ArrowException) as e:
            problems.append(f"{INDEX_FILE}: unreadable ({type(e).__name__}); rerun the build to merge it again.")
        else:
            in_index = Counter(shards)
            for sid in sorted(set(in_index) | set(counts)):
                if in_index.get(sid, 0) != counts.get(sid, 0):
                    problems.append(f"{INDEX_FILE}: {in_index.get(sid, 0)} rows of shard {sid:05d}, the shard has "
                                    f"{counts.get(sid, 0)}; rerun `synthaug build --config {out / 'config.yaml'}` "
                                    "to merge the index again.")
    elif done:
        problems.append(f"{INDEX_FILE}: missing; rerun `synthaug build --config {out / 'config.yaml'}` to merge it.")
    return problems


METHOD_ORDER = ("real", "sd", "ti", "mcti", "dct")  # table order: baselines first, the method last


def _method_sort_key(m: str) -> tuple[int, str]:
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
        return sorted(set(self.index.column("method").to_pylist()), key=_method_sort_key)

    @property
    def image_size(self) -> tuple[int, int]:
        """The most common (height, width) of the build's images."""
        sizes = Counter(zip(self.index.column("height").to_pylist(), self.index.column("width").to_pylist()))
        return sizes.most_common(1)[0][0] if sizes else (512, 512)

    def select_methods(self, methods: Sequence[str] | None) -> list[str]:
        """`methods` checked against the build's (None -> all of them, baseline order)."""
        present = self.methods
        unknown = [m for m in methods or () if m not in present]
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
    import yaml


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
    config = {}
    if (root / "config.yaml").is_file():
        config = yaml.safe_load((root / "config.yaml").read_text()) or {}
    return BuildView(root=root, classes=classes, index=index, config=config)
