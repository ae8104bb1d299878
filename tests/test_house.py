"""The package's shape, as ARCHITECTURE.md states it: no import cycle, no module over 900 lines, no private name
imported from another module, the build folder's files parsed by `synthaug.layout` alone, and the checks a build runs
before any work free of the worker stack."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "synthaug"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported module, imported name or "") of every import in `path`, function-local ones included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "") if sub in mods else (target, alias.name))
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names]
    return found


def test_no_import_cycle_between_modules():
    mods = _modules()
    graph = {m: {t for t, _ in _imports(m, p, mods) if t in mods and not (m.startswith(t + ".") or t.startswith(
        m + "."))} for m, p in mods.items() if p.name != "__init__.py"}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, ()):
            assert state.get(t) != 1, f"import cycle: {' -> '.join([*trail[trail.index(t):], t])}"
            if t not in state:
                visit(t, [*trail, t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


def test_no_module_over_900_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines()))
            > 900}
    assert not long


def test_no_private_name_crosses_a_module():
    mods = _modules()
    crossing = [f"{p.relative_to(PACKAGE)} imports {t}.{n}" for m, p in mods.items() for t, n in _imports(m, p, mods)
                if t.startswith("synthaug") and n.startswith("_") and not n.startswith("__")]
    assert not crossing


def test_only_layout_parses_the_build_folders_config_and_plan():
    readers = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "layout.py"
               and re.search(r"""(CONFIG_FILE|PLAN_FILE|["']config\.yaml["']|["']plan\.json["'])\)?\s*\)?\.read_text""",
                             p.read_text())]
    assert not readers


def test_the_checks_before_a_build_import_no_worker_model_or_ray():
    mods = _modules()
    heavy = {"synthaug.builder.worker", "synthaug.builder.executors", "synthaug.generation", "diffusers"}
    for name, allowed in (("synthaug.builder.validate", set()), ("synthaug.layout", set()),
                          ("synthaug.builder.cluster", {"ray"})):  # where Ray comes from, imported when asked for
        imported = {t.partition(".")[0] if not t.startswith("synthaug") else t
                    for t, _ in _imports(name, mods[name], mods)}
        assert not imported & (heavy | {"ray"}) - allowed, name
