"""The package's shape, as ARCHITECTURE.md states it: no import cycle (between modules, through package
`__init__` files and function-local imports too, nor between packages), no module over 900 lines, no private name
imported from another module, the build folder's files parsed by `synthaug.layout` alone, the checks a build runs
before any work free of the worker stack, and every module in ARCHITECTURE.md's layer table, importing only rows
above its own."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

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


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules importing it runs: every import, function-local ones included, and the packages above
    an imported module (Python runs ``a/__init__.py`` before ``a.b``), but not the importer's own packages, which
    are already running when it is."""
    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        for t, _ in _imports(m, p, mods):
            parts = t.split(".")
            graph.setdefault(m, set()).update(
                up for i in range(2, len(parts) + 1) if (up := ".".join(parts[:i])) in mods
                and up != m and not m.startswith(up + "."))
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path back to its start, or None."""
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return [*trail[trail.index(t):], t]
            if t not in state and (found := visit(t, [*trail, t])):
                return found
        state[m] = 2
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, [m]))), None)


def _package(module: str) -> str:
    """The top-level part of synthaug a module belongs to: ``synthaug.tokens.dct`` -> ``synthaug.tokens``."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_modules():
    cycle = _cycle(_graph(_modules()))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_no_import_loop_between_packages():
    packages: dict[str, set[str]] = {}
    for m, targets in _graph(_modules()).items():
        packages.setdefault(_package(m), set()).update(_package(t) for t in targets if _package(t) != _package(m))
    loop = _cycle(packages)
    assert loop is None, f"package import loop: {' -> '.join(loop)}"


def test_a_loop_through_a_package_init_is_a_cycle(tmp_path):
    # a -> b.c runs b/__init__ first, which imports b.d, which imports a: the loop the packages' graph must see
    (tmp_path / "b").mkdir()
    files = {"a.py": "from .b.c import x\n", "b/__init__.py": "from .d import y\n", "b/c.py": "x = 1\n",
             "b/d.py": "def y():\n    from ..a import x\n"}
    for rel, text in files.items():
        (tmp_path / rel).write_text(text)
    mods = {"synthaug.a": tmp_path / "a.py", "synthaug.b": tmp_path / "b/__init__.py",
            "synthaug.b.c": tmp_path / "b/c.py", "synthaug.b.d": tmp_path / "b/d.py"}
    assert _cycle(_graph(mods)) == ["synthaug.a", "synthaug.b", "synthaug.b.d", "synthaug.a"]


def _layer_rows() -> list[str]:
    """The modules of ARCHITECTURE.md's layer table, top to bottom (``errors.py``, ..., ``tokens/``, ...)."""
    doc = (PACKAGE.parent / "ARCHITECTURE.md").read_text()
    return re.findall(r"^\| \w+ \| `([^`]+)` \|", doc, re.MULTILINE)


def _row(module: str, rows: list[str]) -> int | None:
    rel = module.removeprefix("synthaug.").replace(".", "/")
    return next((i for i, name in enumerate(rows)
                 if name == f"{rel}.py" or (name.endswith("/") and f"{rel}/".startswith(name))), None)


def test_every_module_has_a_layer_row_and_imports_only_rows_above_its_own():
    """ARCHITECTURE.md, "Layers": a module imports only from the rows above its own (a package's row: its modules
    import each other too), function-local imports included."""
    rows, mods = _layer_rows(), _modules()
    assert not [m for m in mods if m not in ("synthaug", "synthaug.__main__") and _row(m, rows) is None]
    down = [(m, t) for m, targets in _graph(mods).items() for t in sorted(targets)
            if (rm := _row(m, rows)) is not None and (rt := _row(t, rows)) is not None and rt > rm]
    assert not down, f"imports of a row below the importer's: {down}"


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


def test_the_package_root_exports_the_library_api_only():
    import synthaug

    mods = _modules()
    # every name resolves in the module it is exported from, without importing it (torch stays unloaded)
    for name, module in {**synthaug._EXPORTS, **synthaug._ELSEWHERE}.items():
        tree = ast.parse(mods[f"synthaug.{module}"].read_text())
        defined = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        defined |= {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
        assert name in defined, f"synthaug.{name} is not defined in synthaug.{module}"
    # the command line's helpers and the testing world are not the library's: their modules are where they live
    assert not {"cli", "commands", "testing"} & set(synthaug._EXPORTS.values())
    assert set(synthaug._ELSEWHERE) == {"configure_logging", "learn_tokens", "export_tokens", "generate_to_folder",
                                        "tiny_pipeline"}
    with pytest.raises(AttributeError, match=r"'tiny_pipeline': it is not part of the library API, import it from "
                                             r"synthaug\.testing"):
        synthaug.tiny_pipeline  # noqa: B018
