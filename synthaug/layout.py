"""The build folder: its one owner. File names, token and shard naming, done-markers, the one reader and writer of
``config.yaml`` and ``plan.json``, and what clearing a build deletes. The one answer to "what is done": a token
file (`token_done`), a shard's stats file (`shard_done`, `pending_shards`) whose shard still matches it
(`check_shard`, `damaged_shards`), a trust verdict that reads (`kept_verdict`), a class job (`job_done`), a finished
build (`build_finished`).

No torch import; shared by the builder (which writes a build), the readers (`synthaug.shards`, `synthaug.index`,
`synthaug.mix`, `synthaug.evaluate`, `synthaug.report`) and the CLI: none of them spells a path of the folder or
parses one of its files itself. A build folder::

    out/config.yaml  plan.json  tokens/<class>.safetensors  tokens/tokens.safetensors
    out/shards/dct-00003.tar  (tars only: the folder that stock WebDataset readers are pointed at)
    out/meta/dct-00003.parquet  _dct-00003_stats.json (written last: "shard done"; the leading "_" makes
        whole-folder parquet readers, which skip "_" and "." names, read the parquet files alone)
    out/README.md  (the dataset card: Hugging Face ``datasets.load_dataset(out)`` gives one split per method)
    out/index.parquet  classes.json  _info.json  shards.wids.json  [failures.json]  [eval/]  [report/]

A shard's name carries its split, the method that made its images (``dct-00003``): Hugging Face ``datasets``, timm
and Ray Data all tell splits apart by file name, and a folder of tars only is what their directory readers expect.

Also here: the format version (`BUILD_FORMAT`; a format-1 or 2 folder is refused: `legacy_build_error`), the records
`plan.json` holds (`ClassJob`, `ShardTask`) and a stats file's (`ShardStats`, named `STATS_PREFIX`...), what
`--overwrite` may delete (`clear_build`) and the `.overwriting` marker, the order a build puts its config and plan
down in (`begin_build`), the card's name and marker (`CARD_FILE`, `is_build_card`), the build lock (`build_lock`),
the resume command, ``shots.json``, the fitted guide's folder and what a `guide` value names (`guide_members`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
from collections.abc import Callable, Iterable
from dataclasses import MISSING, asdict, dataclass, fields
from itertools import pairwise
from pathlib import Path
from typing import Any

from .atomic import TMP_PREFIX, write_text
from .config import BuildConfig, dump_yaml, from_dict
from .errors import UserError
from .jsonfmt import dumps
from .token_methods import method_names

CONFIG_FILE = "config.yaml"


PLAN_FILE = "plan.json"


FAILURES_FILE = "failures.json"


TOKENS_DIR = "tokens"


ALL_TOKENS_FILE = "tokens.safetensors"


LOCK_FILE = ".lock"


# Written by `build --overwrite` before it deletes anything and removed once the new config.yaml is on disk: a folder
# holding it is a build whose clearing was interrupted, which a rerun of `--overwrite` finishes.
OVERWRITE_MARKER = ".overwriting"


# What a finished build has beyond its tokens and shards; removed when a resumed build has work to do, so that no
# file claims a completeness the folder does not have.
FINAL_FILES = ("index.parquet", "_info.json", "shards.wids.json", "classes.json", f"{TOKENS_DIR}/{ALL_TOKENS_FILE}")


# The token string of class c: a new word that can never collide with the tokenizer's vocabulary.
TOKEN_FORMAT = "<synthaug-{:03d}>"


def token_string(class_index: int) -> str:
    """``"<synthaug-007>"`` for class 7 (`synthaug.tokens.token_name` is the same, with its argument checked)."""
    return TOKEN_FORMAT.format(class_index)


def trust_path(out: str | os.PathLike, class_index: int) -> Path:
    """``out/tokens/{class:03d}_trust.json``: a class token's trust verdict (``dct.trust``), written after the token."""
    return Path(out) / TOKENS_DIR / f"{class_index:03d}_trust.json"


def token_path(out: str | os.PathLike, class_index: int) -> Path:
    """``out/tokens/{class:03d}.safetensors``: the token file of one class (its presence means "token done")."""
    return Path(out) / TOKENS_DIR / f"{class_index:03d}.safetensors"


def resume_command(out: str | os.PathLike) -> str:
    """The command that resumes the build in `out` (its own ``config.yaml`` holds every setting)."""
    return f"synthaug build --config {shlex.quote(str(Path(out) / CONFIG_FILE))}"


SHARDS_DIR = "shards"


# The per-shard parquet rows and done-markers: beside `SHARDS_DIR`, not in it, because directory readers of
# WebDataset (Hugging Face ``datasets``, Ray Data) open every file of the folder they are given as a tar.
META_DIR = "meta"


# The index of the tars that ``wids.ShardListDataset`` (webdataset's random-access reader) opens.
WIDS_INDEX_FILE = "shards.wids.json"


# Version of the build folder's format, recorded in ``_info.json`` (`version`) and every stats file
# (`format_version`). 1: ``shards/00003.tar`` with the parquet and stats files beside it; 2: split-named tars alone
# in ``shards/``, ``meta/`` for the rest; 3: the stats files named ``meta/_dct-00003_stats.json`` (a name that
# pyarrow, pandas, Spark and duckdb skip when they read ``meta/`` as one parquet dataset), a strict-JSON sidecar
# with the soft labels, and the dataset card. Older folders are told apart by their file names (`legacy_build_error`).
BUILD_FORMAT = 3


# What a stats file's name adds to its shard's name: ``_`` before, ``_stats.json`` after.
STATS_PREFIX, STATS_SUFFIX = "_", "_stats.json"


# The dataset card at the build's root: YAML front matter (`configs`, `dataset_info`) that Hugging Face ``datasets``
# reads, so ``load_dataset(out)`` gives one split per method and ``cls`` as a ``ClassLabel`` with the class names.
CARD_FILE = "README.md"


INDEX_FILE = "index.parquet"
INFO_FILE = "_info.json"
CLASSES_FILE = "classes.json"

KNOWN_METHODS = tuple(dict.fromkeys(("dct", "sd", *method_names())))  # what a shard is named by: sd, the plain prompt


_METHOD_RE = re.compile(r"[a-z0-9_]+")


def rebuild_hint(out: str | os.PathLike, shard_id: int, method: str) -> str:
    """How a user rebuilds one shard; the only place that spells the command (the build planner owns the command).

    The planner redoes every shard whose stats file is absent, so deleting the stats file and resuming is enough.

    >>> rebuild_hint("out/cub", 3, "dct")
    'delete out/cub/meta/_dct-00003_stats.json and rerun `synthaug build --config out/cub/config.yaml`'
    """
    out = Path(out)
    return f"delete {shard_paths(out, shard_id, method).stats} and rerun `synthaug build --config {out / 'config.yaml'}`"


# --------------------------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------------------------
def sample_key(method: str, class_index: int, index: int) -> str:
    """The WebDataset key of one sample: ``{method}-c{class:03d}-s{index:05d}`` (no dots: WebDataset splits there).

    >>> sample_key("dct", 17, 42)
    'dct-c017-s00042'
    """
    if not isinstance(method, str) or not _METHOD_RE.fullmatch(method):
        raise ValueError(f"`method` must be lower-case letters, digits or '_' (e.g. 'dct') but is {method!r}.")
    if int(class_index) < 0 or int(index) < 0:
        raise ValueError(f"`class_index` and `index` must be >= 0 but are {class_index} and {index}.")
    return f"{method}-c{int(class_index):03d}-s{int(index):05d}"


def shard_name(shard_id: int, method: str) -> str:
    """``{method}-{id:05d}``: the name of a shard's files (its method is its split, as in ``NAME-SPLIT-NNNNN.tar``).

    >>> shard_name(3, "dct")
    'dct-00003'
    """
    if isinstance(shard_id, bool) or not isinstance(shard_id, int) or shard_id < 0:
        raise ValueError(f"`shard_id` must be an integer >= 0 but is {shard_id!r}.")
    if not isinstance(method, str) or not _METHOD_RE.fullmatch(method):
        raise ValueError(f"`method` must be lower-case letters, digits or '_' (e.g. 'dct') but is {method!r}.")
    return f"{method}-{shard_id:05d}"


_SHARD_NAME_RE = re.compile(r"([a-z0-9_]+)-(\d{5,})")


def parse_shard_name(name: str) -> tuple[int, str] | None:
    """(id, method) of a shard name such as ``"dct-00003"``; None for any other string."""
    m = _SHARD_NAME_RE.fullmatch(name)
    return (int(m.group(2)), m.group(1)) if m else None


@dataclass(frozen=True)
class ShardPaths:
    """The three files of one shard."""

    tar: Path
    parquet: Path
    stats: Path


def shard_paths(out: str | os.PathLike, shard_id: int, method: str) -> ShardPaths:
    """``out/shards/{method}-{id:05d}.tar``, ``out/meta/{method}-{id:05d}.parquet`` and
    ``out/meta/_{method}-{id:05d}_stats.json``.

    >>> shard_paths("out", 3, "dct").tar.as_posix()
    'out/shards/dct-00003.tar'
    """
    name = shard_name(shard_id, method)
    out = Path(out)
    meta = out / META_DIR
    return ShardPaths(out / SHARDS_DIR / f"{name}.tar", meta / f"{name}.parquet",
                      meta / f"{STATS_PREFIX}{name}{STATS_SUFFIX}")


def shard_done(out: str | os.PathLike, shard_id: int, method: str) -> bool:
    """True when the shard's stats file exists (it is written last, after the tar and the parquet).

    >>> shard_done("out/does-not-exist", 0, "dct")
    False
    """
    return shard_paths(out, shard_id, method).stats.is_file()


def done_shards(out: str | os.PathLike) -> dict[int, str]:
    """``{id: method}`` of every finished shard of `out` (one listing of ``out/meta``), ids ascending."""
    d = Path(out) / META_DIR
    if not d.is_dir():
        return {}
    found = {}
    for p in d.iterdir():
        n = p.name
        if n.startswith(STATS_PREFIX) and n.endswith(STATS_SUFFIX) and \
                (parsed := parse_shard_name(n[len(STATS_PREFIX): -len(STATS_SUFFIX)])):
            found[parsed[0]] = parsed[1]
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------------------------------------------------
# Is a shard done: its stats file (the done-marker, written last) and whether the shard's files still match it
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardStats:
    """Contents of ``meta/_{method}-{id:05d}_stats.json``: what the shard holds and the checksums of its files."""

    shard: int
    method: str  # the split in the shard's name: every sample of a shard is made with one method
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
    format_version: int = BUILD_FORMAT

    def to_json(self) -> str:
        return dumps(asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: str | os.PathLike) -> ShardStats:
        """Read and check a stats file. Raises ValueError for one no shard writer wrote: a field of the wrong type or
        sign, a sha256 that is not one, or file names other than the shard's own (they are copied into
        ``_info.json``, so they must not be able to name another path)."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or (missing := [f.name for f in fields(cls) if f.name not in data
                                                      and f.default is MISSING]):
            raise ValueError("damaged: " + (f"fields {', '.join(missing)} missing" if isinstance(data, dict) else
                                            f"not a JSON object but {type(data).__name__}"))
        st = cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        if bad := [n for n in ("image_format", "first_key", "last_key") if not isinstance(getattr(st, n), str)]:
            raise ValueError(f"{bad[0]} must be a string but is {str(getattr(st, bad[0]))[:80]!r}")
        if not _count(st.shard) or not _count(st.num_samples) or not st.num_samples or not _count(st.tar_bytes):
            raise ValueError(f"shard, num_samples and tar_bytes must be integers >= 0 (num_samples > 0) but are "
                             f"{st.shard!r}, {st.num_samples!r} and {st.tar_bytes!r}")
        if not isinstance(st.method, str) or not re.fullmatch(r"[a-z0-9_]+", st.method):
            raise ValueError(f"method must be a method name but is {str(st.method)[:80]!r}")
        own = shard_paths(".", st.shard, st.method)
        if (Path(path).name != own.stats.name) or st.tar != f"{SHARDS_DIR}/{own.tar.name}" or \
                st.parquet != f"{META_DIR}/{own.parquet.name}":
            raise ValueError(f"it names shard {st.shard!r}, tar {str(st.tar)[:80]!r} and parquet "
                             f"{str(st.parquet)[:80]!r}, not the shard's own files")
        for name in ("tar_sha256", "parquet_sha256"):
            if not isinstance(getattr(st, name), str) or not re.fullmatch(r"[0-9a-f]{64}", getattr(st, name)):
                raise ValueError(f"{name} is not a sha256 hex digest: {str(getattr(st, name))[:80]!r}")
        for name in ("classes", "methods"):
            counts = getattr(st, name)
            if not isinstance(counts, dict) or not all(isinstance(k, str) and _count(v) for k, v in counts.items()):
                raise ValueError(f"{name} must map names to counts >= 0 but is {str(counts)[:80]}")
        return st


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_shard(out: str | os.PathLike, shard_id: int, method: str) -> str | None:
    """Why a shard marked done cannot be trusted, or None when it can: the cheap check a resumed build makes.

    Compares the tar's size and the parquet file's sha256 with what ``_stats.json`` recorded when the shard was
    written (the parquet is small). The tar is read only when it was modified after its stats file (which is written
    last): then its sha256 must match too, so a member changed in place (a label, say) is caught without hashing
    every tar on every resume. `verify` checks every tar and every image's bytes.
    """
    paths = shard_paths(out, shard_id, method)
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
    try:
        changed_later = paths.tar.stat().st_mtime_ns > paths.stats.stat().st_mtime_ns
    except OSError:
        return "its stats file is missing"
    if changed_later and sha256_of(paths.tar) != str(st.tar_sha256):
        return "its tar was changed after the shard was written (its sha256 differs from the stats)"
    sha = sha256_of(paths.parquet)
    if sha is None:
        return "its parquet file is missing"
    if sha != expected_sha:
        return "its parquet file differs from the one recorded in the stats"
    return None


def sha256_of(path: Path) -> str | None:
    """sha256 of a file's bytes, read in 1 MiB blocks; None when it cannot be read."""
    sha = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
    except OSError:
        return None
    return sha.hexdigest()


def damaged_shards(out: str | os.PathLike, jobs: Iterable[ClassJob], *, unmark: bool = False
                   ) -> list[tuple[ShardTask, str]]:
    """(shard task, problem) of every planned shard marked done whose files do not match its stats (`check_shard`);
    `unmark`: take their done-markers, so that their jobs write them again."""
    damaged = [(t, problem) for j in jobs for t in j.shards
               if shard_done(out, t.shard_id, t.method) and (problem := check_shard(out, t.shard_id, t.method))]
    for task, _ in damaged if unmark else ():
        shard_paths(out, task.shard_id, task.method).stats.unlink(missing_ok=True)
    return damaged


def shard_tars(out: str | os.PathLike) -> dict[int, Path]:
    """``{id: tar path}`` of every shard tar in ``out/shards`` (one listing), for readers that know only the id."""
    d = Path(out) / SHARDS_DIR
    if not d.is_dir():
        return {}
    return {parsed[0]: p for p in sorted(d.iterdir())
            if p.suffix == ".tar" and (parsed := parse_shard_name(p.stem))}


_LEGACY_SHARD_RE = re.compile(r"\d{5,}(\.tar|\.parquet|_stats\.json)")


# Format 2's done-marker: ``meta/dct-00003_stats.json``, without format 3's leading "_".
_FORMAT2_STATS_RE = re.compile(r"[a-z0-9][a-z0-9_]*-\d{5,}_stats\.json")


def legacy_build_error(out: str | os.PathLike) -> UserError | None:
    """The refusal for a build folder in format 1 (``shards/00003.tar``) or 2 (``meta/dct-00003_stats.json``), or
    None when `out` is not one."""
    shards, meta = Path(out) / SHARDS_DIR, Path(out) / META_DIR
    if shards.is_dir() and any(_LEGACY_SHARD_RE.fullmatch(p.name) for p in shards.iterdir()):
        old = "1 (shards/00000.tar, with its parquet and stats files beside it)"
    elif meta.is_dir() and any(_FORMAT2_STATS_RE.fullmatch(p.name) for p in meta.iterdir()):
        old = "2 (meta/dct-00000_stats.json, a name that whole-folder parquet readers do not skip)"
    else:
        return None
    return UserError(f"`out` {str(out)!r} holds a build in synthaug's format {old}, which this version neither "
                     f"resumes nor reads: rebuild it with `synthaug build --config {Path(out) / CONFIG_FILE} "
                     f"--overwrite`, or read it with the synthaug that made it.")


EVAL_DIR = "eval"


# What `evaluate_judge` writes under eval/ besides its result: one row per image (class, top-1 prediction, probability).
JUDGE_IMAGES_FILE = "judge_images.parquet"


REPORT_DIR = "report"


EXPORT_DIR = "export"


def check_export_dest(out: str | os.PathLike, dest: str | os.PathLike, default: str) -> Path:
    """`dest` of an export of the build in `out`, checked before any work: not a file, and outside the build's own
    ``shards/``, ``tokens/`` and ``meta/`` (whose readers take every file there as the build's). `default` names the
    usual folder in the fix. Raises `UserError`."""
    dest, out = Path(dest).expanduser(), Path(out)
    fix = f"pass --dest a new or empty folder, e.g. {default}"
    if dest.exists() and not dest.is_dir():
        raise UserError(f"`dest` {str(dest)!r} is a file, not a folder: {fix}.")
    for above in [dest, *dest.parents]:  # a file where a parent folder must go: mkdir would say FileExistsError
        if above.exists() and not above.is_dir():
            raise UserError(f"`dest` {str(dest)!r}: {str(above)!r} is a file, not a folder: {fix}.")
    where = dest.resolve()
    for name in (SHARDS_DIR, TOKENS_DIR, META_DIR):
        own = (out / name).resolve()
        if where == own or own in where.parents:
            raise UserError(f"`dest` {str(dest)!r} is inside the build's {name}/, which holds only what the build "
                            f"writes: {fix}.")
    return dest


# Folders of what other subcommands derive from a build (evaluate, report, export): never emptied by a build, since
# a user may keep files of their own there too.
DERIVED_DIRS = (EVAL_DIR, REPORT_DIR, EXPORT_DIR)


# --------------------------------------------------------------------------------------------------------------------
# What a build wrote, by name: the only files `build --overwrite` deletes
# --------------------------------------------------------------------------------------------------------------------
# Which real images were the user's k per class (the build's `shots` / `shots_seed`): indices and sample paths.
SHOTS_FILE = "shots.json"


# ``guide: fit``: the few-shot guide fitted on those images, written once into the build folder and reused on resume.
GUIDE_DIR = "guide"


# The fitted guide's own record of its fit; a ``guide/`` folder without it is not synthaug's.
GUIDE_RECORD_FILE = "guide.json"


TOP_FILES = (CONFIG_FILE, PLAN_FILE, CLASSES_FILE, INFO_FILE, INDEX_FILE, FAILURES_FILE, WIDS_INDEX_FILE, SHOTS_FILE)


_TOKEN_FILE_RE = re.compile(r"\d{3,}\.safetensors")


_TRUST_FILE_RE = re.compile(r"\d{3,}_trust\.json")


_SHARD_FILE_RE = re.compile(r"[a-z0-9_]+-\d{5,}\.tar")


_META_FILE_RE = re.compile(r"_?[a-z0-9_]+-\d{5,}(\.parquet|_stats\.json)")  # format 2's stats names too


def build_files(out: str | os.PathLike) -> list[Path]:
    """Every file in `out` whose name says a build wrote it; nothing else (a user's own files keep their place).

    Top level: ``config.yaml``, ``plan.json``, ``classes.json``, ``_info.json``, ``shards.wids.json``,
    ``index.parquet``, ``failures.json``, ``README.md`` when it is the dataset card a build wrote (`is_build_card`:
    a user's own README stays); ``tokens/``: ``NNN.safetensors``, ``NNN_trust.json``, ``tokens.safetensors``;
    ``shards/``: ``METHOD-NNNNN.tar`` (format 1's ``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json`` too);
    ``meta/``: ``METHOD-NNNNN.parquet``, ``_METHOD-NNNNN_stats.json`` (format 2's ``METHOD-NNNNN_stats.json`` too);
    in each, the leftovers of atomic writes of those names (``.tmp-NAME.XXXXXXXX``, see `build_tmp_name`): a user's
    own ``.tmp-notes`` is not one. Folders are never listed,
    and a ``tokens/``, ``shards/`` or ``meta/`` that is a symbolic link is not entered (its files are not in `out`).
    The lock file is not a build output. Files only: a directory with a build file's name is not one.
    """
    out = Path(out)
    found = []
    for folder, wanted in ((out, lambda n: n in TOP_FILES or n == CARD_FILE),
                           (out / TOKENS_DIR, lambda n: n == ALL_TOKENS_FILE or bool(_TOKEN_FILE_RE.fullmatch(n) or
                                                                             _TRUST_FILE_RE.fullmatch(n))),
                           (out / SHARDS_DIR,
                            lambda n: bool(_SHARD_FILE_RE.fullmatch(n) or _LEGACY_SHARD_RE.fullmatch(n))),
                           (out / META_DIR, lambda n: bool(_META_FILE_RE.fullmatch(n)))):
        if not folder.is_dir() or (folder != out and folder.is_symlink()):
            continue
        for p in sorted(folder.iterdir()):
            tmp = build_tmp_name(p.name)
            if (wanted(p.name) or (tmp is not None and wanted(tmp))) and (p.is_file() or p.is_symlink()) and \
                    (CARD_FILE not in (p.name, tmp) or folder != out or is_build_card(p)):
                found.append(p)
    return found


# The line that marks a dataset card as the one a build writes (and rewrites, and `--overwrite` deletes).
CARD_MARKER = "<!-- synthaug build card: written by `synthaug build`, rewritten when the build finishes -->"


def is_build_card(path: str | os.PathLike) -> bool:
    """True when `path` is a file holding `CARD_MARKER` in its first 64 KiB (never through a symbolic link)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return CARD_MARKER.encode() in f.read(65536)
    except OSError:
        return False


_TMP_RE = re.compile(re.escape(TMP_PREFIX) + r"(.+)\.[A-Za-z0-9_]{8}")


def build_tmp_name(name: str) -> str | None:
    """The file an atomic write's temporary name stands for (``.tmp-00003.tar.k2j4h1x_`` -> ``00003.tar``), else None.

    >>> build_tmp_name(".tmp-plan.json.a1b2c3d4"), build_tmp_name(".tmp-my-notes")
    ('plan.json', None)
    """
    m = _TMP_RE.fullmatch(name)
    return m.group(1) if m else None


def linked_build_dirs(out: str | os.PathLike) -> list[Path]:
    """``tokens/``, ``shards/`` and ``meta/`` of `out` that are symbolic links (whose files live outside `out`)."""
    return [Path(out) / d for d in (TOKENS_DIR, SHARDS_DIR, META_DIR) if (Path(out) / d).is_symlink()]


def class_token_files(out: str | os.PathLike) -> list[Path]:
    """The per-class token files of `out` (``tokens/NNN.safetensors``), sorted by class."""
    folder = Path(out) / TOKENS_DIR
    return sorted(p for p in folder.iterdir() if _TOKEN_FILE_RE.fullmatch(p.name)) if folder.is_dir() else []


def work_done(out: str | os.PathLike) -> bool:
    """True when `out` holds a class token or a finished shard: something a config change would invalidate."""
    return bool(class_token_files(out)) or bool(done_shards(out))


@contextlib.contextmanager
def build_lock(out: str | os.PathLike, fix: str = "wait for it to finish, or choose another --out"):
    """The build folder's exclusive lock (``.lock``, a `filelock.FileLock`: ``flock`` on POSIX, ``msvcrt`` on
    Windows): held by a build for its whole run and by anything that rewrites a build's files (an evaluation writing
    its verdicts into the index). The OS releases it when the process dies, even by SIGKILL. Raises `UserError`
    (ending with `fix`) when another process holds it.

    Never through a link: a ``.lock`` that is a symbolic link (dangling or not) or a folder is refused before the
    lock is taken, so taking it can neither create nor truncate a file outside `out` (older filelock releases open
    the path without ``O_NOFOLLOW``).
    """
    import filelock

    path = Path(out) / LOCK_FILE
    fix_lock = f"remove {path} and run again"
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UserError(f"`out` {str(out)!r}: its lock file {path} cannot be opened (a folder or a symbolic link "
                        f"there is not a lock file): {fix_lock}.")
    lock = filelock.FileLock(str(path), timeout=0, mode=0o666)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise UserError(f"`out` {str(out)!r} is in use by another synthaug process right now (a build, or an "
                        f"evaluation writing its index): {fix}.") from None
    except OSError as e:
        raise UserError(f"`out` {str(out)!r}: its lock file {path} cannot be opened ({e.strerror or e}; a folder or "
                        f"a symbolic link there is not a lock file): {fix_lock}.") from None
    try:
        yield
    finally:
        lock.release()


# --------------------------------------------------------------------------------------------------------------------
# config.yaml: the build's resolved config, written before any work
# --------------------------------------------------------------------------------------------------------------------
# The keys every config.yaml a build writes holds (the whole resolved config): a folder whose config.yaml lacks
# them was not made by `synthaug build`.
BUILD_CONFIG_KEYS = ("dataset", "model", "guide", "method", "per_class", "out", "dct", "generate", "shards", "run")


def write_config(out: str | os.PathLike, config: BuildConfig) -> None:
    """Write ``config.yaml`` (atomically): the resolved config every later command of the build reads back."""
    write_text(Path(out) / CONFIG_FILE, dump_yaml(config))


def _load_config(out: str | os.PathLike) -> tuple[dict[str, Any] | None, str]:
    """The one reader of ``config.yaml``: the mapping it holds, or None and why there is none."""
    import yaml

    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        return None, f"no {CONFIG_FILE}"
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        return None, f"its {CONFIG_FILE} is not readable YAML: {str(e).splitlines()[0][:100]}"
    if not isinstance(data, dict):
        return None, f"its {CONFIG_FILE} holds {type(data).__name__}, not the config mapping a build writes"
    return data, ""


def read_config(out: str | os.PathLike, *, what: str = "out", missing_ok: bool = False) -> dict[str, Any]:
    """``config.yaml`` of a build folder as the nested mapping it holds (what `inspect`, `evaluate` and the readers
    show); ``{}`` for a folder without one when `missing_ok`.

    Raises:
        UserError: `out` holds no readable config; the message names the argument `what` and says what to pass.
    """
    data, why = _load_config(out)
    if data is None and missing_ok and not (Path(out) / CONFIG_FILE).exists():
        return {}
    if data is None:
        raise UserError(f"`{what}` {str(out)!r} is not a synthaug build ({why}): pass the --out folder of "
                        f"`synthaug build`.")
    return data


def read_build_config(out: str | os.PathLike) -> tuple[BuildConfig | None, str]:
    """The `BuildConfig` of the build in `out`, or None and why ``out/config.yaml`` is not one of this synthaug."""
    data, why = _load_config(out)
    if data is None:
        return None, why
    missing = [k for k in BUILD_CONFIG_KEYS if k not in data]
    if missing:
        return None, f"its {CONFIG_FILE} lacks {', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"
    try:
        return from_dict(data), ""
    except UserError as e:
        return None, f"its {CONFIG_FILE} is not a config of this synthaug: {str(e)[:120]}"


# --------------------------------------------------------------------------------------------------------------------
# plan.json: the class jobs of a build
# --------------------------------------------------------------------------------------------------------------------
PLAN_VERSION = 1

# Shard ids are planned densely; a larger one in plan.json is damage, and would make a file name too long.
MAX_SHARD_ID = 2**31 - 1


@dataclass(frozen=True)
class ShardTask:
    """One shard of one class job: images ``start..stop-1`` of `class_index` made with `method`."""

    shard_id: int
    method: str
    class_index: int
    chunk: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ClassJob:
    """Learn (or load) the token of one class, then write its shards."""

    class_index: int
    name: str
    token: str
    shards: tuple[ShardTask, ...]


@dataclass(frozen=True)
class Plan:
    """What ``plan.json`` holds: the dataset's classes (by index), the methods, the images per class, the jobs."""

    class_names: tuple[str, ...] | None  # None in plans written before every name was recorded
    num_classes: int
    methods: tuple[str, ...]
    per_class: int
    jobs: tuple[ClassJob, ...]


def write_plan(out: str | os.PathLike, plan: Plan) -> None:
    """Write ``plan.json`` (atomically, and only when it changes), so `inspect` and a finished-build resume need no
    dataset scan."""
    data = {
        "format_version": PLAN_VERSION, "num_classes": plan.num_classes, "methods": list(plan.methods),
        "per_class": plan.per_class, "classes": list(plan.class_names or ()),
        "jobs": [{"class_index": j.class_index, "name": j.name, "token": j.token,
                  "shards": [asdict(t) for t in j.shards]} for j in plan.jobs],
    }
    text = dumps(data, indent=1) + "\n"
    path = Path(out) / PLAN_FILE
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)


def read_plan(out: str | os.PathLike) -> Plan | None:
    """``plan.json`` of `out`; None when it is missing or not a plan this version wrote.

    Every number is checked to be a non-negative integer (a shard id below `MAX_SHARD_ID`) and every name a string:
    file names are made from the class and shard ids, so a plan file must not be able to name a path. Each job must
    be whole: for every planned method, chunks ``0..n-1`` covering images ``0..per_class-1`` of a class below
    ``num_classes``, and the token of its class. A plan that fails any check is not this build's plan.
    """
    try:
        data = json.loads((Path(out) / PLAN_FILE).read_text())
        if not isinstance(data, dict) or data.get("format_version") != PLAN_VERSION:
            return None
        per_class, methods, num_classes = data["per_class"], data["methods"], data["num_classes"]
        if not _index(per_class) or not _index(num_classes) or not isinstance(methods, list) or not methods \
                or not all(isinstance(m, str) for m in methods):
            return None
        jobs = []
        for j in data["jobs"]:
            tasks = []
            for t in j["shards"]:
                task = ShardTask(**t)
                if not all(_index(getattr(task, k)) for k in ("shard_id", "class_index", "chunk", "start", "stop")) \
                        or not isinstance(task.method, str) or task.stop <= task.start or task.shard_id > MAX_SHARD_ID:
                    return None
                tasks.append(task)
            job = ClassJob(j["class_index"], j["name"], j["token"], tuple(tasks))
            if not _index(job.class_index) or not isinstance(job.name, str) or job.token != token_string(
                    job.class_index) or any(t.class_index != job.class_index for t in tasks) \
                    or job.class_index >= num_classes or not _whole(tasks, methods, per_class):
                return None
            jobs.append(job)
        if len({j.class_index for j in jobs}) != len(jobs):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    names = data.get("classes")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        names = None
    return Plan(tuple(names) if names is not None else None, num_classes, tuple(methods), per_class, tuple(jobs))


def _whole(tasks: list[ShardTask], methods: list, per_class: int) -> bool:
    """True when `tasks` are, for each of `methods`, chunks 0, 1, ... covering images 0..per_class-1 in order."""
    for method in methods:
        mine = [t for t in tasks if t.method == method]
        if [t.chunk for t in mine] != list(range(len(mine))) or not mine or mine[0].start != 0 \
                or mine[-1].stop != per_class or any(a.stop != b.start for a, b in pairwise(mine)):
            return False
    return all(t.method in methods for t in tasks)


def _index(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


# --------------------------------------------------------------------------------------------------------------------
# Clearing: what `build --overwrite` and a restart delete (build files only, by name)
# --------------------------------------------------------------------------------------------------------------------
def clear_build(out: str | os.PathLike) -> list[str]:
    """Discard a build for ``--overwrite`` (the caller proved the folder is one): delete the files a build writes,
    by name (`build_files`), and nothing else. Returns what was kept: the user's own files and the outputs of other
    subcommands (eval/, report/, export/); the lock stays.

    Resumable: ``.overwriting`` is written first and removed only once the new config.yaml is on disk
    (`begin_build`), and config.yaml and plan.json go last, so a clearing cut short by Ctrl-C or a kill is finished
    by the same command.
    """
    out = Path(out)
    write_text(out / OVERWRITE_MARKER, "synthaug build --overwrite is clearing this folder\n")
    last = (out / PLAN_FILE, out / CONFIG_FILE)
    for p in [p for p in build_files(out) if p not in last] + [p for p in last if p.is_file()]:
        p.unlink(missing_ok=True)
    guide = fitted_guide_dir(out)
    if guide.is_dir() and not guide.is_symlink() and (guide / GUIDE_RECORD_FILE).is_file():
        import shutil

        shutil.rmtree(guide)  # a guide ``guide: fit`` wrote (its record says so): the new config fits its own
    kept = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir()
                  if p.name not in (LOCK_FILE, TOKENS_DIR, SHARDS_DIR, META_DIR, OVERWRITE_MARKER))
    for d in (TOKENS_DIR, SHARDS_DIR, META_DIR):
        if (out / d).is_dir():
            kept += [f"{d}/{p.name}" for p in sorted((out / d).iterdir())]
    return kept


def begin_build(out: str | os.PathLike, config: BuildConfig, plan: Plan, mode: str) -> list[str]:
    """Put a build's config and plan on disk before any work, in the order that keeps every step resumable.

    `mode` is what the checks decided for the folder: ``"new"``, ``"resume"`` (config.yaml stays as it is),
    ``"replace"`` (a build of another config that made nothing its change would invalidate) or ``"overwrite"``
    (`clear_build` first). Leftover temporary files of atomic writes a killed run left behind are removed (a user's
    own ``.tmp-*`` files do not have their names, `build_tmp_name`). Returns what ``--overwrite`` kept.
    """
    out = Path(out)
    kept = clear_build(out) if mode == "overwrite" else []
    if mode != "resume":
        write_config(out, config)
    write_plan(out, plan)
    (out / OVERWRITE_MARKER).unlink(missing_ok=True)  # the clearing, if any, is complete: this is the new build
    for p in build_files(out):
        if p.name.startswith(TMP_PREFIX):
            with contextlib.suppress(OSError):
                p.unlink()
    return kept


# What is done: the one answer the driver, the executors and the workers ask for
def token_done(out: str | os.PathLike, class_index: int) -> bool:
    """True when the class's token file exists (whole: it is written atomically)."""
    return token_path(out, class_index).is_file()


def pending_shards(out: str | os.PathLike, job: ClassJob) -> list[ShardTask]:
    """The job's shards not yet done (no stats file), in plan order."""
    return [t for t in job.shards if not shard_done(out, t.shard_id, t.method)]


def kept_verdict(out: str | os.PathLike, class_index: int, read: Callable[[Path], Any]) -> tuple[Any, str | None]:
    """``(verdict, None)``: the class's trust verdict as `read` (its file's reader, raising `ValueError` on damage)
    reads it; or ``(None, why)``, why being "missing" or "damaged (...)"."""
    path = trust_path(out, class_index)
    if not path.is_file():
        return None, "missing"
    try:
        return read(path), None
    except ValueError as e:
        return None, f"damaged ({e})"


def job_done(out: str | os.PathLike, job: ClassJob, verdict: Callable[[Path], Any] | None = None) -> bool:
    """True when the class job's token and every one of its shards are on disk and, where the build keeps trust
    verdicts (`verdict`: their reader), the class's verdict reads (`kept_verdict`)."""
    return token_done(out, job.class_index) and not pending_shards(out, job) and \
        (verdict is None or kept_verdict(out, job.class_index, verdict)[1] is None)


def build_finished(out: str | os.PathLike, jobs: list[ClassJob], verdict: Callable[[Path], Any] | None = None) -> bool:
    """True when `out` holds the finished build of `jobs`: every job done (`job_done`), no shard damaged, the final
    files there and the index written after the last shard."""
    out = Path(out)
    if not jobs or not all(job_done(out, j, verdict) for j in jobs) or damaged_shards(out, jobs) \
            or any(not (out / f).is_file() for f in FINAL_FILES):
        return False
    newest = max(shard_paths(out, t.shard_id, t.method).stats.stat().st_mtime for j in jobs for t in j.shards)
    return (out / INDEX_FILE).stat().st_mtime >= newest


def images_on_disk(out: str | os.PathLike, jobs: Iterable[ClassJob]) -> int:
    """Images of `jobs` in finished shards."""
    return sum(t.size for j in jobs for t in j.shards if shard_done(out, t.shard_id, t.method))


def tokens_on_disk(out: str | os.PathLike, jobs: Iterable[ClassJob]) -> int:
    """Class tokens of `jobs` on disk."""
    return sum(token_done(out, j.class_index) for j in jobs)


def forget_build(out: str | os.PathLike) -> None:
    """Take back config.yaml and plan.json of a build that made nothing, so that a corrected command starts afresh
    instead of being refused as "a different config"."""
    if not work_done(out):
        for name in (CONFIG_FILE, PLAN_FILE):
            (Path(out) / name).unlink(missing_ok=True)


def fitted_guide_dir(out: str | os.PathLike) -> Path:
    """Where ``guide: fit`` writes the build's few-shot guide (``out/guide``)."""
    return Path(out) / GUIDE_DIR


def guide_members(guide: str) -> list[str]:
    """The guides of a ``guide`` value: ``"A,B"`` is an ensemble of two (a local path holding a comma is one)."""
    if "," not in guide or Path(guide).expanduser().exists():
        return [guide.strip()]
    return [s.strip() for s in guide.split(",") if s.strip()]


def fits_guide(config: BuildConfig) -> bool:
    """Whether the build fits a few-shot guide (``guide: fit``, alone or in an ensemble)."""
    return "fit" in guide_members(config.guide)


def guide_source(config: BuildConfig, out: str | os.PathLike | None = None, *, fit: str | None = None) -> str:
    """The classifier source a build's guide loads from: its ``guide``, with ``fit`` replaced by the build's fitted
    guide folder (or by `fit`, e.g. the fitted guide's `fitted_guide_id` for the name token files record)."""
    if not fits_guide(config):
        return config.guide
    folder = fit if fit is not None else str(fitted_guide_dir(config.out if out is None else out))
    return ",".join(folder if s == "fit" else s for s in guide_members(config.guide))


def fitted_guide_id(out: str | os.PathLike) -> str:
    """A fitted guide's name in token files and the index: ``fit:`` and the first 16 hex digits of the sha256 of its
    head and config (the backbone is named in its config.json), the same wherever the build folder lies."""
    import hashlib

    guide = fitted_guide_dir(out)
    digest = hashlib.sha256()
    for name in ("config.json", "head.safetensors"):
        digest.update((guide / name).read_bytes())
    return f"fit:{digest.hexdigest()[:16]}"


def write_shots(out: str | os.PathLike, record: dict[str, Any]) -> None:
    """``shots.json``: the user's k real images per class that every stage of the build read (atomically)."""
    write_text(Path(out) / SHOTS_FILE, json.dumps(record, indent=1, allow_nan=False) + "\n")


def read_shots(out: str | os.PathLike) -> dict[str, Any] | None:
    """A build's ``shots.json``, or None when absent or unreadable (builds made before it was written)."""
    try:
        data = json.loads((Path(out) / SHOTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
