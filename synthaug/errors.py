"""The one exception type for user errors.

Every message names the argument, the value received, what is valid, and the fix (ARCHITECTURE.md, "Bad input"). The CLI prints a
`UserError` on one line and exits 2; anything else is a bug and keeps its traceback.

Also here: `SourceError`, what is wrong with a model source, the source named once by the caller that knows it;
`first_line`, an exception's first line, for quoting; `write_errors`, a write the machine refuses (full disk,
read-only folder) as one such line.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator


class UserError(ValueError):
    """Bad input from the user (argument, config key, dataset root, model path). Printed on one line by the CLI."""


class SourceError(UserError):
    """What is wrong with a model source, worded without naming it: the caller that knows the argument and the source
    (`load_classifier`, `load_backbone`) puts "`classifier` 'SOURCE': " in front, once."""


def first_line(e: BaseException, *, typed: bool = False) -> str:
    """The first line of an exception's message (at most 200 characters), for a one-line `UserError` that quotes it;
    the exception's type when the message is empty, and in front of it (``Type: line``) with `typed`.

    >>> first_line(OSError("disk full\\nmore"), typed=True)
    'OSError: disk full'
    """
    text = str(e).strip()
    if not text:
        return type(e).__name__
    line = text.splitlines()[0][:200]
    return f"{type(e).__name__}: {line}" if typed else line


# What the machine, not the code, refuses to a write: a full disk or quota, a read-only folder or file system.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


@contextlib.contextmanager
def write_errors(what: str, fix: str) -> Iterator[None]:
    """Turn a write the machine refuses (`WRITE_ERRNOS`) into a one-line `UserError`: ``{what}: {reason} ({file}):
    {fix}.`` Any other error keeps its traceback.

    >>> with write_errors("`dest` 'export/'", "pass a folder you can write to"):  # doctest: +SKIP
    ...     write_tokens()
    """
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(f"{what}: {e.strerror or e}{where}: {fix}.") from None


def require(module: str, what: str, extra: str = "eval", alternative: str = ""):
    """Import the optional dependency `module` for `what`, or raise a one-line `UserError` naming the extra that
    installs it (and `alternative`, a way that needs no install). Called before any work, so a missing extra is a
    line, not a traceback a minute into a run.

    >>> require("json", "a test").__name__
    'json'
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"{what} needs {module.split('.')[0]}, which is not installed ({e}): "
                        f"pip install \"synthaug[{extra}]\"{', or ' + alternative if alternative else ''}.") from None
