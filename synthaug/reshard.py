"""Class-mixed, shuffled WebDataset shards of a finished build, for streaming at scale.

A build writes one class of one method per shard (so that any worker can redo any class job); streamed with a shard
shuffle and a small sample buffer, such shards give batches of one class. `reshard` reads a build's index and writes
its samples again, in one seeded global order, into shards of a chosen size (``{dest}/train-00000.tar``, ...), with
the same members a build writes (`synthaug.shards.sample_members`) and timm's ``_info.json`` and wids'
``shards.wids.json`` beside them. It is resumable: the plan (`RESHARD_FILE`) is written first, each tar atomically
and then its size and sha256 into the plan, and a rerun with the same settings writes only the tars that are missing
or do not match their plan (a truncated one, one written while the plan could not record it), after removing the
temporaries of a killed run. The plan records the build it came from (the sha256 of its ``index.parquet``): an export
of a build that changed since (``build --overwrite``) is written again, never served stale. ``synthaug export OUT
--format webdataset`` runs it; `verify_export` (``export --verify``, ``inspect --verify`` for the default folder)
checks an export's tars against its plan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import atomic_write, write_text
from .errors import UserError, write_errors
from .index import open_build
from .layout import (
    EXPORT_DIR,
    INDEX_FILE,
    INFO_FILE,
    LOCK_FILE,
    WIDS_INDEX_FILE,
    build_lock,
    build_tmp_name,
    check_export_dest,
)
from .shards import FORMAT_VERSION, TAR_GROUP, TAR_MODE, TAR_MTIME, TAR_USER, ShardReader, sample_members

logger = logging.getLogger(__name__)


RESHARD_FILE = "reshard.json"  # the settings and the shard sizes, written before any tar; each tar's size and sha256


# What the user chose; the rest of a plan (`_DERIVED`) follows from the build: when only that differs, the build
# changed since the export, which is then written again
_SETTINGS = ("source", "methods", "seed", "samples_per_shard")
_DERIVED = ("num_samples", "shard_lengths", "index_sha256")


SPLIT = "train"  # in every file name (``train-00000.tar``): the split Hugging Face `datasets` infers from it


@dataclass(frozen=True)
class ReshardResult:
    """What `reshard` wrote."""

    dest: Path
    num_samples: int
    num_shards: int
    shards_written: int  # this run (the rest were there from an earlier run with the same settings)


def default_dest(out: str | os.PathLike) -> Path:
    """Where `reshard` writes when no `dest` is given: ``out/export/webdataset``."""
    return Path(out) / EXPORT_DIR / "webdataset"


def reshard(out: str | os.PathLike, dest: str | os.PathLike | None = None, *, samples_per_shard: int = 1000,
            seed: int = 0, methods: list[str] | None = None) -> ReshardResult:
    """Write the samples of a build again as class-mixed shards in one seeded random order.

    Args:
        out: a finished build folder.
        dest: where the shards go; default ``out/export/webdataset``. A folder holding another reshard's plan is
            refused (choose another, or delete it), and so are a file and a folder inside the build's ``shards/``,
            ``tokens/`` or ``meta/``.
        samples_per_shard: samples per tar (the last one holds the rest).
        seed: the shuffle's seed: the same build, seed and size give byte-identical tars.
        methods: which methods' samples (e.g. ``["dct"]``); default the build's own method (its ``train`` split).

    Returns:
        `ReshardResult`.

    >>> reshard("out/digits", samples_per_shard=256, seed=0)  # doctest: +SKIP
    ReshardResult(dest=PosixPath('out/digits/export/webdataset'), num_samples=1000, num_shards=4, shards_written=4)
    """
    import numpy as np

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
    dest = check_export_dest(build.root, dest if dest is not None else default_dest(build.root),
                             str(default_dest(build.root)))

    # 2. The plan: one seeded permutation of the selected rows (the index is sorted by key, so the order depends on
    #    the rows only), cut into shards; the index's sha256 says which build the tars hold
    table = build.index
    rows = [r for r in table.to_pylist() if r["method"] in set(methods)]
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    bounds = list(range(0, len(order), samples_per_shard))
    sizes = [min(samples_per_shard, len(order) - lo) for lo in bounds]
    plan = {"source": str(build.root.resolve()), "num_samples": len(rows), "methods": methods, "seed": seed,
            "samples_per_shard": samples_per_shard, "shard_lengths": sizes,
            "index_sha256": _file_sha256(build.root / INDEX_FILE)}
    fix = "pass --dest a folder you can write to (and with free space)"
    with write_errors(f"`dest` {str(dest)!r}", fix):
        dest.mkdir(parents=True, exist_ok=True)
    with write_errors(f"`dest` {str(dest)!r}", fix), \
            build_lock(dest, "wait for the other export to finish, or choose another --dest"):
        return _write(build, dest, plan, rows, order, bounds)


def _write(build: Any, dest: Path, plan: dict, rows: list[dict], order: list[int], bounds: list[int]) -> ReshardResult:
    """Steps 3-4 of `reshard`, under the lock of `dest`."""
    import webdataset as wds

    # 3. The plan claimed (a kill's temporaries gone), then the tars that are missing or differ from it, each written
    #    atomically and then recorded in the plan
    _remove_temporaries(dest)
    recorded = _claim(dest, plan)
    reader = ShardReader(build.root)
    written = 0
    samples_per_shard, sizes = plan["samples_per_shard"], plan["shard_lengths"]
    try:
        for i, lo in enumerate(bounds):
            path = dest / _tar_name(i)
            if path.is_file():
                problem = _tar_problem(path, recorded.get(path.name))
                if problem is None:
                    continue
                logger.warning("%s %s: it is written again", path, problem)
            with atomic_write(path, "wb") as f:
                writer = wds.TarWriter(f, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_GROUP,
                                       mode=TAR_MODE)
                for r in order[lo : lo + samples_per_shard]:
                    row = rows[r]
                    data = reader.read(int(row["shard"]), int(row["offset"]), int(row["size"]), row["sha256"])
                    writer.write(sample_members(row, data))
                writer.close()
            recorded[path.name] = {"size": path.stat().st_size, "sha256": _file_sha256(path)}
            _write_plan(dest, plan, recorded)
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
    logger.info("%s: %d samples of %s in %d shards (%d written now)", dest, len(rows), ", ".join(plan["methods"]),
                len(files), written)
    return ReshardResult(dest=dest, num_samples=len(rows), num_shards=len(files), shards_written=written)


def verify_export(dest: str | os.PathLike) -> list[str]:
    """Check an export (`reshard`'s `dest`) against its plan: every tar there, of the size and sha256 recorded, and
    made from the build's current index. Returns the problems, one line each with what to run (empty: all good)."""
    dest = Path(dest)
    path = dest / RESHARD_FILE
    try:
        plan = _read_plan(path)
    except ValueError as e:
        return [f"{path}: {e}; delete {dest} and export again."]
    rerun = export_command(dest, plan)
    problems = []
    index = Path(plan["source"]) / INDEX_FILE
    if index.is_file() and _file_sha256(index) != plan["index_sha256"]:
        problems.append(f"{dest}: made from another build of {plan['source']} (its index changed since): "
                        f"run `{rerun}` to export it again.")
    recorded = plan["tars"]
    for i in range(len(plan["shard_lengths"])):
        tar = dest / _tar_name(i)
        problem = _tar_problem(tar, recorded.get(tar.name)) if tar.is_file() else "is missing"
        if problem is not None:
            problems.append(f"{tar} {problem}: run `{rerun}` to write it again.")
    return problems


def export_command(dest: Path, plan: dict) -> str:
    """The ``synthaug export`` command that writes (or resumes) the export `plan` describes into `dest`."""
    return (f"synthaug export {shlex.quote(plan['source'])} --format webdataset --dest {shlex.quote(str(dest))} "
            f"--samples-per-shard {plan['samples_per_shard']} --seed {plan['seed']} "
            f"--methods {shlex.quote(','.join(plan['methods']))}")


def _tar_name(i: int) -> str:
    return f"{SPLIT}-{i:05d}.tar"


_TAR_RE = re.compile(rf"{SPLIT}-\d{{5,}}\.tar")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tar_problem(path: Path, record: dict | None) -> str | None:
    """Why the tar at `path` is not the one its plan recorded (None: it is)."""
    if record is None:
        return "is not recorded in the plan (its run was killed as it finished)"
    size = path.stat().st_size
    if size != record["size"]:
        return f"has {size} bytes, its plan {record['size']}"
    if _file_sha256(path) != record["sha256"]:
        return "does not match its plan's sha256"
    return None


def _remove_temporaries(dest: Path) -> None:
    """Delete the temporaries of `reshard`'s own atomic writes that a killed run left (under the lock: no other
    export of `dest` is writing them)."""
    ours = {RESHARD_FILE, INFO_FILE, WIDS_INDEX_FILE}
    for p in dest.iterdir():
        name = build_tmp_name(p.name)
        if name is not None and (name in ours or _TAR_RE.fullmatch(name)) and p.is_file():
            p.unlink()
            logger.info("%s: removed %s, left by an export that was stopped", dest, p.name)


def _read_plan(path: Path) -> dict:
    """A ``reshard.json`` checked field by field with types (``tars``: only the records that are well formed).
    Raises ValueError naming what is damaged."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable or not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError("damaged (not a JSON object)")  # noqa: TRY004 (damage of one kind to its caller)

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    checks = {"source": lambda v: isinstance(v, str), "seed": count, "num_samples": count,
              "samples_per_shard": lambda v: count(v) and v > 0,
              "methods": lambda v: isinstance(v, list) and all(isinstance(m, str) for m in v),
              "shard_lengths": lambda v: isinstance(v, list) and all(count(n) for n in v),
              "index_sha256": lambda v: isinstance(v, str) and bool(_SHA256_RE.fullmatch(v))}
    for key, ok in checks.items():
        if key not in data and key == "index_sha256":  # a plan written before the plan recorded its build
            data[key] = ""
            continue
        if key not in data or not ok(data[key]):
            raise ValueError(f"damaged (field {key!r} is {data.get(key, 'missing')!r})")
    tars = data.get("tars", {})
    # a damaged tar record is not the plan's damage: that tar alone is unverified, and written again
    data["tars"] = {name: rec for name, rec in tars.items() if _TAR_RE.fullmatch(str(name)) and isinstance(rec, dict)
                    and count(rec.get("size")) and isinstance(rec.get("sha256"), str)
                    and _SHA256_RE.fullmatch(rec["sha256"])} if isinstance(tars, dict) else {}
    return data


def _write_plan(dest: Path, plan: dict, recorded: dict[str, dict]) -> None:
    write_text(dest / RESHARD_FILE, json.dumps({**plan, "tars": dict(sorted(recorded.items()))}, indent=1) + "\n")


def _claim(dest: Path, plan: dict) -> dict[str, dict]:
    """Write the plan into `dest`, or check that the plan already there is this one (then the run resumes). Returns
    the tars the plan there recorded (name -> size, sha256). A plan of the same settings made from a build that changed
    since (another index) is replaced, and the tars it recorded are deleted first."""
    path = dest / RESHARD_FILE
    if path.is_file():
        try:
            old = _read_plan(path)
        except ValueError as e:
            raise UserError(f"`dest` {str(dest)!r}: its {RESHARD_FILE} is {e}: delete that folder to write the "
                            f"export anew, or choose another --dest.") from None
        changed = [k for k in _SETTINGS if old[k] != plan[k]]
        if changed:
            raise UserError(f"`dest` {str(dest)!r} holds a reshard with other settings ({', '.join(changed)} "
                            f"differ): choose another --dest, or delete that folder to write it anew.")
        if all(old[k] == plan[k] for k in _DERIVED):
            return old["tars"]
        logger.warning("%s: exported from %s before the build changed (its index differs): exporting it again", dest,
                       plan["source"])
        for name in [_tar_name(i) for i in range(len(old["shard_lengths"]))] + [INFO_FILE, WIDS_INDEX_FILE]:
            (dest / name).unlink(missing_ok=True)
        _write_plan(dest, plan, {})
        return {}
    if any(p.name != LOCK_FILE for p in dest.iterdir()):
        raise UserError(f"`dest` {str(dest)!r} is not empty and holds no reshard ({RESHARD_FILE}): choose a new or "
                        f"empty folder.")
    _write_plan(dest, plan, {})
    return {}
