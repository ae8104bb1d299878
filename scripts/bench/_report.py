"""A benchmark's section of BENCHMARKS.md: composed, printed, and (with --write) written in place."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from synthaug.atomic import write_text

ROOT = Path(__file__).resolve().parents[2]
HEADER = "# Benchmarks\n\nMeasured on the machines named in each section, with the command that produced it.\n"


def write_section(section: str, text: str, path: Path = ROOT / "BENCHMARKS.md") -> None:
    """Replace the section whose heading line is `section` (up to the next ``## `` heading) by `text`, or append it."""
    old = path.read_text() if path.exists() else HEADER
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = pattern.sub(lambda m: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    write_text(path, new)


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as BENCHMARKS.md quotes it: `nice -n N` where it runs niced, the interpreter
    relative to the repository where it lives there, the script, then its arguments as typed (or `argv`)."""
    niceness = os.nice(0)
    python = Path(os.path.abspath(sys.executable))
    if python.is_relative_to(ROOT):
        python = python.relative_to(ROOT)
    return (f"nice -n {niceness} " if niceness > 0 else "") + shlex.join([str(python), sys.argv[0], *(sys.argv[1:] if argv is None else argv)])


def publish(section: str, body: list[str], notes: list[str], command: str, write: bool) -> str:
    """Print the section (heading, `body` lines, `notes` as bullets, the command) and write it when `write`."""
    text = "\n".join([section, "", *body, "", *[f"- {n}" for n in notes], "", "Command:", "", "```", command.strip(),
                      "```", ""])
    print(text)
    if write:
        write_section(section, text)
    return text
