"""The one exception type for user errors.

Every message names the argument, the value received, what is valid, and the fix (ARCHITECTURE.md, "Bad input"). The CLI prints a
`UserError` on one line and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user (argument, config key, dataset root, model path). Printed on one line by the CLI."""
