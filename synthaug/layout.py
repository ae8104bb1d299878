"""The build folder's format: file names, token and shard naming, done-markers.

Pure path logic with no torch import, shared by the builder (which writes a build), the readers (`synthaug.shards`,
`synthaug.mix`, `synthaug.evaluate`, `synthaug.report`) and the CLI. A build folder::

    out/config.yaml  plan.json  tokens/<class>.safetensors  tokens/tokens.safetensors
    out/shards/dct-00003.tar  (tars only: the folder that stock WebDataset readers are pointed at)
    out/meta/dct-00003.parquet  dct-00003_stats.json (written last: "shard done")
    out/index.parquet  classes.json  _info.json  shards.wids.json  [failures.json]  [eval/]  [report/]

A shard's name carries its split, the method that made its images (``dct-00003``): Hugging Face ``datasets``, timm
and Ray Data all tell splits apart by file name, and a folder of tars only is what their directory readers expect.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from .atomic import TMP_PREFIX
from .errors import UserError

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
# in ``shards/``, ``meta/`` for the rest (a format-1 folder is told apart by its file names: `legacy_build_error`).
BUILD_FORMAT = 2


INDEX_FILE = "index.parquet"


INFO_FILE = "_info.json"


CLASSES_FILE = "classes.json"


KNOWN_METHODS = ("dct", "sd", "ti", "mcti")


_METHOD_RE = re.compile(r"[a-z0-9_]+")


def rebuild_hint(out: str | os.PathLike, shard_id: int, method: str) -> str:
    """How a user rebuilds one shard; the only place that spells the command (the build planner owns the command).

    The planner redoes every shard whose stats file is absent, so deleting the stats file and resuming is enough.

    >>> rebuild_hint("out/cub", 3, "dct")
    'delete out/cub/meta/dct-00003_stats.json and rerun `synthaug build --config out/cub/config.yaml`'
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
    """``out/shards/{method}-{id:05d}.tar``, ``out/meta/{method}-{id:05d}.parquet`` and ``..._stats.json``.

    >>> shard_paths("out", 3, "dct").tar.as_posix()
    'out/shards/dct-00003.tar'
    """
    name = shard_name(shard_id, method)
    out = Path(out)
    meta = out / META_DIR
    return ShardPaths(out / SHARDS_DIR / f"{name}.tar", meta / f"{name}.parquet", meta / f"{name}_stats.json")


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
        if p.name.endswith("_stats.json") and (parsed := parse_shard_name(p.name[: -len("_stats.json")])):
            found[parsed[0]] = parsed[1]
    return dict(sorted(found.items()))


def done_shard_ids(out: str | os.PathLike) -> list[int]:
    """Ids of every finished shard of `out`, ascending."""
    return list(done_shards(out))


def shard_tars(out: str | os.PathLike) -> dict[int, Path]:
    """``{id: tar path}`` of every shard tar in ``out/shards`` (one listing), for readers that know only the id."""
    d = Path(out) / SHARDS_DIR
    if not d.is_dir():
        return {}
    return {parsed[0]: p for p in sorted(d.iterdir())
            if p.suffix == ".tar" and (parsed := parse_shard_name(p.stem))}


_LEGACY_SHARD_RE = re.compile(r"\d{5,}(\.tar|\.parquet|_stats\.json)")


def legacy_build_error(out: str | os.PathLike) -> UserError | None:
    """The refusal for a build folder in format 1 (``shards/00003.tar``), or None when `out` is not one."""
    d = Path(out) / SHARDS_DIR
    if not d.is_dir() or not any(_LEGACY_SHARD_RE.fullmatch(p.name) for p in d.iterdir()):
        return None
    return UserError(f"`out` {str(out)!r} holds a build in synthaug's format 1 (shards/00000.tar, with its parquet "
                     f"and stats files beside it), which this version neither resumes nor reads: rebuild it with "
                     f"`synthaug build --config {Path(out) / CONFIG_FILE} --overwrite`, or read it with synthaug "
                     f"0.1.0.")


EVAL_DIR = "eval"


REPORT_DIR = "report"


EXPORT_DIR = "export"


# Folders of what other subcommands derive from a build (evaluate, report, export): never emptied by a build, since
# a user may keep files of their own there too.
DERIVED_DIRS = (EVAL_DIR, REPORT_DIR, EXPORT_DIR)


# --------------------------------------------------------------------------------------------------------------------
# What a build wrote, by name: the only files `build --overwrite` deletes
# --------------------------------------------------------------------------------------------------------------------
TOP_FILES = (CONFIG_FILE, PLAN_FILE, CLASSES_FILE, INFO_FILE, INDEX_FILE, FAILURES_FILE, WIDS_INDEX_FILE)


_TOKEN_FILE_RE = re.compile(r"\d{3,}\.safetensors")


_TRUST_FILE_RE = re.compile(r"\d{3,}_trust\.json")


_SHARD_FILE_RE = re.compile(r"[a-z0-9_]+-\d{5,}\.tar")


_META_FILE_RE = re.compile(r"[a-z0-9_]+-\d{5,}(\.parquet|_stats\.json)")


def build_files(out: str | os.PathLike) -> list[Path]:
    """Every file in `out` whose name says a build wrote it; nothing else (a user's own files keep their place).

    Top level: ``config.yaml``, ``plan.json``, ``classes.json``, ``_info.json``, ``shards.wids.json``,
    ``index.parquet``, ``failures.json``; ``tokens/``: ``NNN.safetensors``, ``NNN_trust.json``,
    ``tokens.safetensors``; ``shards/``:
    ``METHOD-NNNNN.tar`` (format 1's ``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json`` too); ``meta/``:
    ``METHOD-NNNNN.parquet``, ``METHOD-NNNNN_stats.json``; in each, the leftovers of atomic writes of those names
    (``.tmp-NAME.XXXXXXXX``, see `build_tmp_name`): a user's own ``.tmp-notes`` is not one. Folders are never listed,
    and a ``tokens/``, ``shards/`` or ``meta/`` that is a symbolic link is not entered (its files are not in `out`).
    The lock file is not a build output. Files only: a directory with a build file's name is not one.
    """
    out = Path(out)
    found = []
    for folder, wanted in ((out, lambda n: n in TOP_FILES),
                           (out / TOKENS_DIR, lambda n: n == ALL_TOKENS_FILE or bool(_TOKEN_FILE_RE.fullmatch(n) or
                                                                             _TRUST_FILE_RE.fullmatch(n))),
                           (out / SHARDS_DIR,
                            lambda n: bool(_SHARD_FILE_RE.fullmatch(n) or _LEGACY_SHARD_RE.fullmatch(n))),
                           (out / META_DIR, lambda n: bool(_META_FILE_RE.fullmatch(n)))):
        if not folder.is_dir() or (folder != out and folder.is_symlink()):
            continue
        for p in sorted(folder.iterdir()):
            tmp = build_tmp_name(p.name)
            if (wanted(p.name) or (tmp is not None and wanted(tmp))) and (p.is_file() or p.is_symlink()):
                found.append(p)
    return found


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


def work_done(out: str | os.PathLike) -> bool:
    """True when `out` holds a class token or a finished shard: something a config change would invalidate."""
    out = Path(out)
    tokens = out / TOKENS_DIR
    if tokens.is_dir() and any(_TOKEN_FILE_RE.fullmatch(p.name) for p in tokens.iterdir()):
        return True
    return bool(done_shard_ids(out))


@contextlib.contextmanager
def build_lock(out: str | os.PathLike, fix: str = "wait for it to finish, or choose another --out"):
    """The build folder's exclusive lock (``.lock``): held by a build for its whole run and by anything that rewrites
    a build's files (an evaluation writing its verdicts into the index). The OS releases it when the process dies,
    even by SIGKILL. Raises `UserError` (ending with `fix`) when another process holds it.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; two writers in the same folder are the user's call
        yield
        return
    path = Path(out) / LOCK_FILE
    try:
        # O_NOFOLLOW: a .lock that is a symbolic link (dangling or not) must not make a file outside `out`
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        raise UserError(f"`out` {str(out)!r}: its lock file {path} cannot be opened ({e.strerror or e}; a folder or a "
                        f"symbolic link there is not a lock file): remove {path} and run again.") from None
    f = os.fdopen(fd, "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"`out` {str(out)!r} is in use by another synthaug process right now (a build, or an "
                            f"evaluation writing its index): {fix}.") from None
        yield
    finally:
        f.close()
