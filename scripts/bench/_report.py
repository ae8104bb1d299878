"""Write one section of BENCHMARKS.md (or RESULTS.md) in place, keeping every other section as it is."""

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
