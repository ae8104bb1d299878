"""WebDataset shards, their per-shard index, and random access into them (ARCHITECTURE.md, "The build folder").

Consumes generated images with their metadata (any object with the attributes of `synthaug.generation.GeneratedImage`)
and produces, per shard id chosen by the build planner::

    shards/dct-00003.tar         WebDataset: "dct-c017-s00042.png" (or .jpg/.webp), ".cls", ".json", ".txt" per
                                 sample (the tar's name carries its split: the method that made its images)
    meta/dct-00003.parquet       one row per sample: metadata + the image's byte `offset`/`size` in the tar + `sha256`
    meta/_dct-00003_stats.json   written LAST: "shard done" ("_": whole-folder parquet readers of meta/ skip it)

What is here: the writer (`write_shard`, and `ShardWriter`, which encodes and writes batch by batch on a background
thread), and random access (`read_sample` reads one
image with one positioned read; `ShardReader`, `decode_image`). The build-wide files are `synthaug.index`'s:
`merge_index` writes ``index.parquet``, ``classes.json``, ``_info.json`` and ``shards.wids.json`` from these shards,
and `synthaug.index.verify` checks every byte against the recorded sha256. What a stats file records (`ShardStats`)
and whether a finished shard still matches it (`check_shard`) are `synthaug.layout`'s, the owner of "done".

Every file is written atomically (synthaug.atomic) and tar members carry a fixed mtime/uid/gid/mode, so the same
images give byte-identical shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_write, write_text
from .errors import UserError
from .jsonfmt import dumps
from .layout import (
    BUILD_FORMAT,
    META_DIR,
    SHARDS_DIR,
    ShardPaths,
    ShardStats,
    parse_shard_name,
    rebuild_hint,
    sample_key,
    shard_paths,
    shard_tars,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image

logger = logging.getLogger(__name__)


FORMAT_VERSION = BUILD_FORMAT


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


# Index columns a sample's ``.json`` member leaves out (see `_ShardFile.add`).
JSON_LEFT_OUT = ("judge_prob", "token_sha256")


class ShardError(UserError):
    """A shard on disk is missing, truncated or corrupt. The message names it and the command that rebuilds it."""


# --------------------------------------------------------------------------------------------------------------------
# The index schema
# --------------------------------------------------------------------------------------------------------------------
# Columns a row has only when a generation lever made them, after the others: `prompt_index` (generate.prompts),
# `init_index` and `strength` (generate.init "real"). A build without the levers keeps the columns it always had.
OPTIONAL_COLUMNS = ("prompt_index", "init_index", "strength")


def index_schema(optional: Iterable[str] = ()) -> pa.Schema:
    """Columns of the per-shard parquet files and of ``index.parquet`` (ARCHITECTURE.md, plus `index`, `image_format`),
    with those of `OPTIONAL_COLUMNS` named in `optional`.

    `token_sha256` is null for the plain-prompt baseline, `guide_prob`/`guide_top5` are null when no guide scored the
    image, and so are `guide_soft_classes`/`guide_soft_probs` (the guide's soft label: its `generate.soft_top_k` most
    likely classes, then the target class when it is not among them, and their probabilities; null too in builds
    made before they were recorded), `judge_prob` is null until an evaluation fills it. `scheduler_config` is the
    JSON of the scheduler's diffusers config (``getattr(diffusers, row["scheduler"]).from_config(
    json.loads(row["scheduler_config"]))`` rebuilds it; null when the writer did not record it). `shard_path` is the
    tar relative to the build folder; `offset`/`size` locate the image bytes inside it.
    """
    import pyarrow as pa

    extra = {"prompt_index": pa.int64(), "init_index": pa.int64(), "strength": pa.float64()}
    wanted = set(optional)
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
        ("scheduler_config", pa.string()),
        ("steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("guide_prob", pa.float64()),
        ("guide_top5", pa.list_(pa.int64())),
        ("guide_soft_classes", pa.list_(pa.int64())),
        ("guide_soft_probs", pa.list_(pa.float32())),
        ("judge_prob", pa.float64()),
        ("image_format", pa.string()),
        ("shard", pa.int64()),
        ("shard_path", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("sha256", pa.string()),
        *((c, extra[c]) for c in OPTIONAL_COLUMNS if c in wanted),
    ])


# Columns added to the index after builds were made with it: an older table gets them as nulls (`conform`).
LATER_COLUMNS = ("guide_soft_classes", "guide_soft_probs")


def optional_columns(names: Iterable[str]) -> tuple[str, ...]:
    """The optional columns among `names`, in schema order."""
    names = set(names)
    return tuple(c for c in OPTIONAL_COLUMNS if c in names)


def conform(table: pa.Table, optional: Iterable[str] = ()) -> pa.Table:
    """`table` (a shard's parquet or an index) in ``index_schema(optional)``: the optional columns it lacks, and the
    columns added since it was written (`LATER_COLUMNS`), filled with nulls, the rest cast, so every build reads."""
    import pyarrow as pa

    schema = index_schema(optional)
    for name in schema.names:
        if name not in table.column_names and (name in OPTIONAL_COLUMNS or name in LATER_COLUMNS):
            table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
    if table.column_names != schema.names:
        table = table.select(schema.names)
    return table.cast(schema)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _opt_ints(v: Any) -> list[int] | None:
    return None if v is None else [int(x) for x in v]


def _opt_floats(v: Any) -> list[float] | None:
    return None if v is None else [float(x) for x in v]


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


# The fields `_describe` gives a sample, in its order: the index columns known before the sample is in a tar.
ROW_FIELDS = ("key", "class_index", "class_name", "method", "index", "prompt", "seed", "token_sha256", "model_id",
              "scheduler", "scheduler_config", "steps", "guidance_scale", "height", "width", "guide_prob",
              "guide_top5", "judge_prob", "image_format")


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
        "scheduler_config": _opt_str(getattr(sample, "scheduler_config", None)),
        "steps": int(sample.steps),
        "guidance_scale": float(sample.guidance_scale),
        "height": int(sample.height),
        "width": int(sample.width),
        "guide_prob": _opt_float(sample.guide_prob),
        "guide_top5": _top5(sample.guide_top5),
        "guide_soft_classes": _opt_ints(getattr(sample, "guide_soft_classes", None)),
        "guide_soft_probs": _opt_floats(getattr(sample, "guide_soft_probs", None)),
        "judge_prob": _opt_float(getattr(sample, "judge_prob", None)),
        "image_format": image_format,
        **{c: getattr(sample, c) for c in OPTIONAL_COLUMNS if getattr(sample, c, None) is not None},
    }


def sample_members(row: dict[str, Any], data: bytes) -> dict[str, Any]:
    """The tar members of one sample (a `webdataset.TarWriter` dict): the image bytes, ``.cls``, ``.json`` (the row's
    fields that `write_shard` describes, but `JSON_LEFT_OUT`, with the soft label: strict JSON, each probability in
    float32's shortest form) and ``.txt`` (the prompt). Index rows give the same members back, so `synthaug.reshard`
    writes samples exactly as a build does."""
    # Every method's samples carry the same JSON types, or readers that infer a schema from one shard (Hugging Face
    # `datasets` reads the last split's first examples) fail on the others: the token's hash, null for the plain
    # prompt, stays in the index; the judge's verdict comes later.
    meta = {k: row[k] for k in ROW_FIELDS if k not in JSON_LEFT_OUT}
    probs = row.get("guide_soft_probs")  # float32 in the index: its shortest decimal, not float64's 0.1000000015
    meta.update(guide_soft_classes=row.get("guide_soft_classes"),
                guide_soft_probs=probs and [float(str(np.float32(p))) for p in probs])
    return {
        "__key__": row["key"],
        row["image_format"]: data,
        "cls": str(row["class_index"]).encode("ascii"),
        "json": dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode(),
        "txt": row["prompt"].encode(),
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
    stays at one image. Members are ``{key}.cls`` (the class index as ASCII), ``{key}.json`` (the metadata row),
    ``{key}.{png|jpg|webp}`` and ``{key}.txt`` (the prompt, the caption img2dataset and OpenCLIP read), with fixed
    mtime/uid/gid/mode. All samples of a shard share one method, which names its files (``shards/dct-00003.tar``).
    `ShardWriter` writes the same bytes on a background thread.

    Args:
        out: the build directory; the tar goes to ``out/shards/``, the parquet and stats files to ``out/meta/``.
        shard_id: chosen by the build planner (a deterministic function of class and chunk).
        samples: objects with the attributes of `synthaug.generation.GeneratedImage`.
        image_format: ``"png"``, ``"jpg"`` or ``"webp"``.
        quality: JPEG/WebP quality 1-100 (recorded in the stats; unused for PNG).

    Returns:
        The `ShardStats` written to ``meta/_{method}-{id:05d}_stats.json``.

    >>> stats = write_shard("out", 0, images)  # doctest: +SKIP
    >>> stats.num_samples, shard_done("out", 0, "dct")  # doctest: +SKIP
    (8, True)
    """
    shard = _ShardFile(out, shard_id, image_format, quality)
    try:
        for sample in samples:
            shard.add(sample)
    except BaseException as e:
        shard.abort(e)
        raise
    return shard.close()


def _check_format(image_format: str, quality: int) -> None:
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"`shards.image_format` must be one of {', '.join(IMAGE_FORMATS)} but is {image_format!r}.")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise UserError(f"`shards.quality` must be an integer in 1..100 but is {quality!r}.")


class _ShardFile:
    """One shard being written: `add` samples one by one, then `close` (or `abort`, which leaves nothing behind).

    The files open at the first sample, whose method names them (``shards/{method}-{id:05d}.tar``).
    """

    def __init__(self, out: str | os.PathLike, shard_id: int, image_format: str, quality: int) -> None:
        _check_format(image_format, quality)
        self.out, self.shard_id, self.image_format, self.quality = out, shard_id, image_format, quality
        self.method: str | None = None
        self.paths: ShardPaths | None = None
        self.rows: list[dict[str, Any]] = []
        self.keys: set[str] = set()
        self._stack = contextlib.ExitStack()

    def _open(self, method: str) -> None:
        import webdataset as wds

        self.method, self.paths = method, shard_paths(self.out, self.shard_id, method)
        # A stale stats file from an earlier attempt must not survive a rewrite: remove it before touching the tar, so
        # a crash mid-rewrite leaves the shard "not done" rather than "done" with mismatched files.
        self.paths.stats.unlink(missing_ok=True)
        self.paths.tar.parent.mkdir(parents=True, exist_ok=True)
        self.paths.stats.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._stack.enter_context(atomic_write(self.paths.tar, "w+b"))
        self._hashing = _HashingWriter(self._file)
        self._writer = wds.TarWriter(self._hashing, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_GROUP,
                                     mode=TAR_MODE)

    def add(self, sample: Any, data: bytes | None = None) -> None:
        """Stream one sample into the tar (hashing the bytes as they pass); `data`: its image already encoded."""
        row = _describe(sample, len(self.rows), self.image_format)
        if self.method is None:
            self._open(row["method"])
        elif row["method"] != self.method:
            raise ValueError(f"sample {row['key']!r} is made with method {row['method']!r} but shard {self.shard_id} "
                             f"holds {self.method!r}: every method has shards of its own (its split).")
        if row["key"] in self.keys:
            raise ValueError(f"duplicate key {row['key']!r} in shard {self.shard_id}: every (method, class, index) "
                             "must appear once.")
        self.keys.add(row["key"])
        if data is None:
            data = encode_image(sample.image, self.image_format, self.quality)
        self._writer.write(sample_members(row, data))
        row["sha256"] = hashlib.sha256(data).hexdigest()
        row["size"] = len(data)
        self.rows.append(row)

    def abort(self, error: BaseException) -> None:
        """Drop the temporary tar: nothing of this attempt stays on disk."""
        if self.paths is None:  # never opened: nothing on disk
            return
        self._hashing.discard()
        self._stack.__exit__(type(error), error, error.__traceback__)

    def close(self) -> ShardStats:
        """Finish the tar, then write the parquet rows and, last, the stats file."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows, image_format, shard_id, paths = self.rows, self.image_format, self.shard_id, self.paths
        if paths is None:
            raise ValueError(f"shard {shard_id} got no samples: the planner should not create empty shards.")
        try:
            self._writer.close()
            # 2. Locate every image inside the tar from the headers just written (tarfile seeks over the data).
            self._file.seek(0)
            with tarfile.open(fileobj=self._file, mode="r:") as tf:
                located = {m.name: (m.offset_data, m.size) for m in tf.getmembers()}
        except BaseException as e:
            self.abort(e)
            raise
        self._stack.close()  # the tar is complete: rename it into place
        for row in rows:
            offset, size = located[f"{row['key']}.{image_format}"]
            if size != row["size"]:  # would mean the tar writer changed the bytes: never ship such a shard
                raise RuntimeError(f"tar member {row['key']}.{image_format} has {size} bytes, expected {row['size']}")
            row["shard"] = shard_id
            row["shard_path"] = f"{SHARDS_DIR}/{paths.tar.name}"
            row["offset"] = offset
        tar_bytes, tar_sha = self._hashing.nbytes, self._hashing.sha.hexdigest()

        # 3. Parquet rows, in tar order.
        table = pa.Table.from_pylist(rows, schema=index_schema(optional_columns(set().union(*rows))))
        buf = io.BytesIO()
        pq.write_table(table, buf)
        with atomic_write(paths.parquet, "wb") as f:
            f.write(buf.getvalue())

        # 4. Stats, last: from now on the shard counts as done.
        stats = ShardStats(
            shard=shard_id,
            method=self.method,
            num_samples=len(rows),
            tar=f"{SHARDS_DIR}/{paths.tar.name}",  # "/" on every OS: _info.json is read by timm anywhere
            tar_bytes=tar_bytes,
            tar_sha256=tar_sha,
            parquet=f"{META_DIR}/{paths.parquet.name}",
            parquet_sha256=hashlib.sha256(buf.getvalue()).hexdigest(),
            image_format=image_format,
            quality=None if image_format == "png" else self.quality,
            classes={str(k): v for k, v in sorted(Counter(r["class_index"] for r in rows).items())},
            methods=dict(sorted(Counter(r["method"] for r in rows).items())),
            first_key=rows[0]["key"],
            last_key=rows[-1]["key"],
        )
        write_text(paths.stats, stats.to_json())
        return stats


_BEGIN, _END, _STOP = object(), object(), object()


class ShardWriter:
    """Writes shards batch by batch, on a background thread, so encoding and writing overlap generation.

    The caller opens a shard with `begin`, hands over its samples with `put` (any number of batches) and closes it
    with `end`; the writer encodes and writes them exactly as `write_shard` does (same bytes, same atomic files, the
    stats file last). A bounded queue of `max_pending` batches keeps memory at a few batches: `put` waits only when
    the writer is that far behind. `finished` and `drain` give the shards complete on disk, so the caller can report
    them (and a resumed build skips them); an error on the writer thread is raised by the caller's next call. Leaving
    the ``with`` block on an exception drops the shard in progress (no partial file stays).

    Args:
        out: the build directory.
        image_format, quality: as for `write_shard`.
        background: False writes in the caller's thread (same bytes; for comparison and debugging).
        max_pending: batches that may wait for the writer.
        encode_threads: threads that encode a batch's images at once (Pillow releases the GIL while it compresses);
            the tar still receives them in order. 1 encodes on the writer thread itself.

    Attributes:
        write_seconds: time spent encoding and writing (on whichever thread did it).
        wait_seconds: time the caller spent waiting for the writer (a full queue, `drain`, the final flush; in line:
            all of the writing).

    >>> with ShardWriter("out") as writer:  # doctest: +SKIP
    ...     writer.begin(0)
    ...     writer.put(images[:8]); writer.put(images[8:])
    ...     writer.end()
    ...     done = writer.drain()  # [(0, ShardStats(...))]
    """

    def __init__(self, out: str | os.PathLike, *, image_format: str = "png", quality: int = 95,
                 background: bool = True, max_pending: int = 2, encode_threads: int = 1) -> None:
        import queue
        from concurrent.futures import ThreadPoolExecutor

        _check_format(image_format, quality)
        for name, value in (("max_pending", max_pending), ("encode_threads", encode_threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"`{name}` must be an integer >= 1 but is {value!r}.")
        self._pool = ThreadPoolExecutor(encode_threads, "synthaug-encode") if encode_threads > 1 else None
        self.out, self.image_format, self.quality, self.background = out, image_format, quality, background
        self.write_seconds = self.wait_seconds = 0.0
        self._open: int | None = None  # shard id between begin and end (caller's view)
        self._current: _ShardFile | None = None  # the shard being written (writer's view)
        self._ended = 0  # shards ended by the caller
        self._done: list[tuple[int, ShardStats]] = []
        self._reported = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending + 2)  # + begin/end markers
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name=f"synthaug-shard-writer-{id(self):x}", daemon=True)
            self._thread.start()

    # -- caller side --------------------------------------------------------------------------------------------
    def begin(self, shard_id: int) -> None:
        """Start shard `shard_id` (the previous one must be ended)."""
        if self._open is not None:
            raise RuntimeError(f"shard {self._open} is still open: call end() before beginning shard {shard_id}")
        self._open = shard_id
        self._send((_BEGIN, shard_id))

    def put(self, samples: Iterable[Any]) -> None:
        """Hand over samples of the open shard (a list: it crosses to the writer thread as it is)."""
        if self._open is None:
            raise RuntimeError("no shard is open: call begin(shard_id) first")
        self._send(list(samples))

    def end(self) -> None:
        """Close the open shard; it is complete on disk once `finished`/`drain` lists it."""
        if self._open is None:
            raise RuntimeError("no shard is open: call begin(shard_id) first")
        self._open = None
        self._ended += 1
        self._send(_END)

    def finished(self) -> list[tuple[int, ShardStats]]:
        """``(shard_id, stats)`` of the shards completed since the last call; never waits."""
        self._raise()
        with self._cond:
            new = self._done[self._reported:]
            self._reported = len(self._done)
        return new

    def drain(self) -> list[tuple[int, ShardStats]]:
        """Wait until every ended shard is complete on disk; then as `finished`."""
        t0 = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._error is not None or len(self._done) == self._ended)
        self.wait_seconds += time.perf_counter() - t0
        return self.finished()

    def close(self, error: BaseException | None = None) -> None:
        """Stop the writer thread; with `error` (or a shard still open) the shard in progress is dropped."""
        if error is None and self._open is not None:
            error = RuntimeError(f"shard {self._open} was never ended")
        if self._thread is not None:
            if self._thread.is_alive():
                self._queue.put((_STOP, error))
                t0 = time.perf_counter()
                self._thread.join()
                self.wait_seconds += time.perf_counter() - t0
            self._thread = None
        else:
            self._stop(error)
        self._open = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if error is None:
            self._raise()

    def __enter__(self) -> ShardWriter:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)

    def _send(self, item: Any) -> None:
        self._raise()
        t0 = time.perf_counter()
        if self._thread is None:  # in line: the caller waits for all of it
            try:
                self._handle(item)
            finally:
                self.wait_seconds += time.perf_counter() - t0
            return
        import queue

        while True:
            try:
                self._queue.put(item, timeout=0.5)
                break
            except queue.Full:
                self._raise()  # the writer died with the queue full: nobody will take the item
        self.wait_seconds += time.perf_counter() - t0

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing a shard failed: {type(self._error).__name__}: {self._error}") \
                from self._error

    # -- writer side --------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, tuple) and item[0] is _STOP:
                self._stop(item[1])
                return
            if self._error is not None:
                continue  # drop what arrives after a failure; the caller raises on its next call
            try:
                self._handle(item)
            except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
                self._fail(e)

    def _handle(self, item: Any) -> None:
        t0 = time.perf_counter()
        try:
            if isinstance(item, tuple) and item[0] is _BEGIN:
                self._current = _ShardFile(self.out, item[1], self.image_format, self.quality)
            elif item is _END:
                shard, self._current = self._current, None
                stats = shard.close()
                with self._cond:
                    self._done.append((shard.shard_id, stats))
                    self._cond.notify_all()
            else:
                encoded = self._pool.map(self._encode, item) if self._pool is not None else [None] * len(item)
                for sample, data in zip(item, encoded):
                    self._current.add(sample, data)
        except BaseException as e:
            if self._current is not None:
                self._current.abort(e)
                self._current = None
            raise
        finally:
            self.write_seconds += time.perf_counter() - t0

    def _encode(self, sample: Any) -> bytes | None:
        image = getattr(sample, "image", None)  # None: `add` names what the sample lacks
        return None if image is None else encode_image(image, self.image_format, self.quality)

    def _fail(self, error: BaseException) -> None:
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def _stop(self, error: BaseException | None) -> None:
        if self._current is not None:
            self._current.abort(error or RuntimeError("the shard writer was closed with a shard open"))
            self._current = None


# --------------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------------
def _shard_of(tar_path: Path) -> tuple[Path, int, str] | None:
    """(build dir, shard id, method) of ``…/out/shards/dct-00003.tar``; None for a tar outside a build."""
    parsed = parse_shard_name(tar_path.stem) if tar_path.suffix == ".tar" else None
    if parsed and tar_path.parent.name == SHARDS_DIR:
        return tar_path.parent.parent, *parsed
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
    >>> data = read_sample(f"out/digits/{row['shard_path']}", row["offset"], row["size"])  # doctest: +SKIP
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
        if path is None:  # one listing of the shards folder names every tar; a shard it lacks is missing
            self._paths = shard_tars(self.out)
            path = self._paths.get(shard)
            if path is None:
                raise ShardError(f"Shard {shard} of {self.out} is missing (no {self.out / SHARDS_DIR}/*-{shard:05d}.tar):"
                                 f" rerun `synthaug build --config {self.out / 'config.yaml'}` to make it again.")
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
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        # a bomb: a header claiming far more pixels than PIL allows (Image.MAX_IMAGE_PIXELS), never a synthaug image
        raise ShardError(f"Image {where} cannot be decoded ({e}).") from None
    return img.convert(mode) if mode and img.mode != mode else img


