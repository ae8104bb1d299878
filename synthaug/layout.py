"""The build folder's format: file names, token and shard naming, done-markers.

Pure path logic with no torch import, shared by the builder (which writes a build), the readers (`synthaug.shards`,
`synthaug.mix`, `synthaug.evaluate`, `synthaug.report`) and the CLI. A build folder::

    out/config.yaml  plan.json  tokens/<class>.safetensors  tokens/tokens.safetensors
    out/shards/00003.tar  00003.parquet  00003_stats.json (written last: "shard done")
    out/index.parquet  classes.json  _info.json  [failures.json]  [eval/]  [report/]
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


# What a finished build has beyond its tokens and shards; removed when a resumed build has work to do, so that no
# file claims a completeness the folder does not have.
FINAL_FILES = ("index.parquet", "_info.json", "classes.json", f"{TOKENS_DIR}/{ALL_TOKENS_FILE}")


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


INDEX_FILE = "index.parquet"


INFO_FILE = "_info.json"


CLASSES_FILE = "classes.json"


KNOWN_METHODS = ("dct", "sd", "ti", "mcti")


_METHOD_RE = re.compile(r"[a-z0-9_]+")


def rebuild_hint(out: str | os.PathLike, shard_id: int) -> str:
    """How a user rebuilds one shard; the only place that spells the command (the build planner owns the command).

    The planner redoes every shard whose stats file is absent, so deleting the stats file and resuming is enough.

    >>> rebuild_hint("out/cub", 3)
    'delete out/cub/shards/00003_stats.json and rerun `synthaug build --config out/cub/config.yaml`'
    """
    out = Path(out)
    stats = out / SHARDS_DIR / f"{shard_id:05d}_stats.json"
    return f"delete {stats} and rerun `synthaug build --config {out / 'config.yaml'}`"


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


@dataclass(frozen=True)
class ShardPaths:
    """The three files of one shard."""

    tar: Path
    parquet: Path
    stats: Path


def shard_paths(out: str | os.PathLike, shard_id: int) -> ShardPaths:
    """``out/shards/{id:05d}.tar``, ``.parquet`` and ``_stats.json``.

    >>> shard_paths("out", 3).tar.name
    '00003.tar'
    """
    if isinstance(shard_id, bool) or not isinstance(shard_id, int) or shard_id < 0:
        raise ValueError(f"`shard_id` must be an integer >= 0 but is {shard_id!r}.")
    d = Path(out) / SHARDS_DIR
    return ShardPaths(d / f"{shard_id:05d}.tar", d / f"{shard_id:05d}.parquet", d / f"{shard_id:05d}_stats.json")


def shard_done(out: str | os.PathLike, shard_id: int) -> bool:
    """True when the shard's stats file exists (it is written last, after the tar and the parquet).

    >>> shard_done("out/does-not-exist", 0)
    False
    """
    return shard_paths(out, shard_id).stats.is_file()


def done_shard_ids(out: str | os.PathLike) -> list[int]:
    """Ids of every finished shard under ``out/shards``, ascending."""
    d = Path(out) / SHARDS_DIR
    if not d.is_dir():
        return []
    ids = []
    for p in d.glob("*_stats.json"):
        m = re.fullmatch(r"(\d{5,})_stats\.json", p.name)
        if m:
            ids.append(int(m.group(1)))
    return sorted(ids)


EVAL_DIR = "eval"


REPORT_DIR = "report"


EXPORT_DIR = "export"


# Folders of what other subcommands derive from a build (evaluate, report, export): never emptied by a build, since
# a user may keep files of their own there too.
DERIVED_DIRS = (EVAL_DIR, REPORT_DIR, EXPORT_DIR)


# --------------------------------------------------------------------------------------------------------------------
# What a build wrote, by name: the only files `build --overwrite` deletes
# --------------------------------------------------------------------------------------------------------------------
TOP_FILES = (CONFIG_FILE, PLAN_FILE, CLASSES_FILE, INFO_FILE, INDEX_FILE, FAILURES_FILE)


_TOKEN_FILE_RE = re.compile(r"\d{3,}\.safetensors")


_TRUST_FILE_RE = re.compile(r"\d{3,}_trust\.json")


_SHARD_FILE_RE = re.compile(r"\d{5,}(\.tar|\.parquet|_stats\.json)")


def build_files(out: str | os.PathLike) -> list[Path]:
    """Every file in `out` whose name says a build wrote it; nothing else (a user's own files keep their place).

    Top level: ``config.yaml``, ``plan.json``, ``classes.json``, ``_info.json``, ``index.parquet``, ``failures.json``
    and leftover ``.tmp-*`` files of atomic writes; ``tokens/``: ``NNN.safetensors``, ``NNN_trust.json``,
    ``tokens.safetensors``;
    ``shards/``: ``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json``. Folders are never listed, and the lock file
    is not a build output. Files only: a directory with a build file's name is not one.
    """
    out = Path(out)
    found = []
    for folder, wanted in ((out, lambda n: n in TOP_FILES),
                           (out / TOKENS_DIR, lambda n: n == ALL_TOKENS_FILE or bool(_TOKEN_FILE_RE.fullmatch(n) or
                                                                             _TRUST_FILE_RE.fullmatch(n))),
                           (out / SHARDS_DIR, lambda n: bool(_SHARD_FILE_RE.fullmatch(n)))):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if (wanted(p.name) or p.name.startswith(TMP_PREFIX)) and (p.is_file() or p.is_symlink()):
                found.append(p)
    return found


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
    f = open(Path(out) / LOCK_FILE, "a+")  # noqa: SIM115 (held for the whole block)
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"`out` {str(out)!r} is in use by another synthaug process right now (a build, or an "
                            f"evaluation writing its index): {fix}.") from None
        yield
    finally:
        f.close()
