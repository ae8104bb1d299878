"""Class-mixed, shuffled WebDataset shards of a finished build, for streaming at scale.

A build writes one class of one method per shard (so that any worker can redo any class job); streamed with a shard
shuffle and a small sample buffer, such shards give batches of one class. `reshard` reads a build's index and writes
its samples again, in one seeded global order, into shards of a chosen size (``{dest}/train-00000.tar``, ...), with
the same members a build writes (`synthaug.shards.sample_members`) and timm's ``_info.json`` and wids'
``shards.wids.json`` beside them. It is resumable: the plan (`RESHARD_FILE`) is written first, each tar atomically,
and a rerun with the same settings writes only the tars that are missing. ``synthaug export OUT --format
webdataset`` runs it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write, write_text
from .errors import UserError
from .index import open_build
from .layout import EXPORT_DIR, INFO_FILE, WIDS_INDEX_FILE
from .shards import FORMAT_VERSION, TAR_GROUP, TAR_MODE, TAR_MTIME, TAR_USER, ShardReader, sample_members

logger = logging.getLogger(__name__)


RESHARD_FILE = "reshard.json"  # the settings and the shard sizes, written before any tar


SPLIT = "train"  # in every file name (``train-00000.tar``): the split Hugging Face `datasets` infers from it


@dataclass(frozen=True)
class ReshardResult:
    """What `reshard` wrote."""

    dest: Path
    num_samples: int
    num_shards: int
    shards_written: int  # this run (the rest were there from an earlier run with the same settings)


def reshard(out: str | os.PathLike, dest: str | os.PathLike | None = None, *, samples_per_shard: int = 1000,
            seed: int = 0, methods: list[str] | None = None) -> ReshardResult:
    """Write the samples of a build again as class-mixed shards in one seeded random order.

    Args:
        out: a finished build folder.
        dest: where the shards go; default ``out/export/webdataset``. A folder holding another reshard's plan is
            refused (choose another, or delete it).
        samples_per_shard: samples per tar (the last one holds the rest).
        seed: the shuffle's seed: the same build, seed and size give byte-identical tars.
        methods: which methods' samples (e.g. ``["dct"]``); default the build's own method (its ``train`` split).

    Returns:
        `ReshardResult`.

    >>> reshard("out/digits", samples_per_shard=256, seed=0)  # doctest: +SKIP
    ReshardResult(dest=PosixPath('out/digits/export/webdataset'), num_samples=1000, num_shards=4, shards_written=4)
    """
    import numpy as np
    import webdataset as wds

    # 1. Check inputs (before any work)
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard <= 0:
        raise UserError(f"`samples_per_shard` must be an integer > 0 but is {samples_per_shard!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"`seed` must be an integer >= 0 but is {seed!r}.")
    build = open_build(out)
    if methods is None:
        own = build.config.get("method")
        methods = [own] if own in build.methods else build.methods
    methods = build.select_methods(methods)
    dest = Path(dest) if dest is not None else build.root / EXPORT_DIR / "webdataset"

    # 2. The plan: one seeded permutation of the selected rows (the index is sorted by key, so the order depends on
    #    the rows only), cut into shards
    table = build.index
    rows = [r for r in table.to_pylist() if r["method"] in set(methods)]
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    bounds = list(range(0, len(order), samples_per_shard))
    sizes = [min(samples_per_shard, len(order) - lo) for lo in bounds]
    plan = {"source": str(build.root.resolve()), "num_samples": len(rows), "methods": methods, "seed": seed,
            "samples_per_shard": samples_per_shard, "shard_lengths": sizes}
    _claim(dest, plan)

    # 3. The tars that are missing, each written atomically
    reader = ShardReader(build.root)
    written = 0
    try:
        for i, lo in enumerate(bounds):
            path = dest / _tar_name(i)
            if path.is_file():
                continue
            with atomic_write(path, "wb") as f:
                writer = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_GROUP,
                                       mode=TAR_MODE)
                for r in order[lo : lo + samples_per_shard]:
                    row = rows[r]
                    data = reader.read(int(row["shard"]), int(row["offset"]), int(row["size"]), row["sha256"])
                    writer.write(sample_members(row, data))
                writer.close()
            written += 1
    finally:
        reader.close()

    # 4. The readers' indexes: timm's _info.json, wids' shard list (urls relative to `dest`)
    files = [_tar_name(i) for i in range(len(bounds))]
    num_classes = max([len(build.classes)] + [int(c["index"]) + 1 for c in build.classes])
    info = {"name": "synthaug", "version": FORMAT_VERSION, "num_classes": num_classes,
            "splits": {SPLIT: {"name": SPLIT, "num_samples": len(rows), "filenames": files, "shard_lengths": sizes}}}
    write_text(dest / INFO_FILE, json.dumps(info, indent=1) + "\n")
    wids = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": f"synthaug-{SPLIT}",
            "shardlist": [{"url": f, "nsamples": n} for f, n in zip(files, sizes)]}
    write_text(dest / WIDS_INDEX_FILE, json.dumps(wids, indent=1) + "\n")
    logger.info("%s: %d samples of %s in %d shards (%d written now)", dest, len(rows), ", ".join(methods),
                len(files), written)
    return ReshardResult(dest=dest, num_samples=len(rows), num_shards=len(files), shards_written=written)


def _tar_name(i: int) -> str:
    return f"{SPLIT}-{i:05d}.tar"


def _claim(dest: Path, plan: dict) -> None:
    """Write the plan into `dest`, or check that the plan already there is this one (then the run resumes)."""
    path = dest / RESHARD_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old != plan:
            changed = sorted(k for k in plan if not isinstance(old, dict) or old.get(k) != plan[k])
            raise UserError(f"`dest` {str(dest)!r} holds a reshard with other settings ({', '.join(changed)} "
                            f"differ): choose another --dest, or delete that folder to write it anew.")
        return
    if dest.is_dir() and any(dest.iterdir()):
        raise UserError(f"`dest` {str(dest)!r} is not empty and holds no reshard ({RESHARD_FILE}): choose a new or "
                        f"empty folder.")
    dest.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(plan, indent=1) + "\n")
