"""A benchmark's section of BENCHMARKS.md: composed, printed, and (with --write) written in place."""

from __future__ import annotations

import re
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


def publish(section: str, body: list[str], notes: list[str], command: str, write: bool) -> str:
    """Print the section (heading, `body` lines, `notes` as bullets, the command) and write it when `write`."""
    text = "\n".join([section, "", *body, "", *[f"- {n}" for n in notes], "", "Command:", "", "```", command.strip(),
                      "```", ""])
    print(text)
    if write:
        write_section(section, text)
    return text
