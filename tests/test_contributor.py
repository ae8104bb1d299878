"""What a contributor touches, as ARCHITECTURE.md ("Adding a token method or a guide loader") names it: a token method
is one module that registers a `TokenMethod` (plus its line in `METHOD_MODULES`), a guide loader one entry in
`classifier.load.LOADERS`; nothing else in the package lists the methods or branches on their names."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import buildworld as bw
import pytest

from synthaug import token_methods
from synthaug.token_methods import METHOD_MODULES, TokenMethod, get_method, method_names, register_method

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "synthaug"
ARCHITECTURE = (REPO / "ARCHITECTURE.md").read_text()


@pytest.fixture
def toy_method(monkeypatch):
    """A fifth token method, defined and registered here, in a test module: no package file is edited. Its token is
    the embedding of the word "a" (nothing is trained), saved and loaded with the package's token file functions."""
    for name in METHOD_MODULES:  # registered before the registry is copied: the copy is dropped after the test
        get_method(name)
    monkeypatch.setattr(token_methods, "_REGISTERED", dict(token_methods._REGISTERED))

    @register_method
    class Toy(TokenMethod):
        name = "toy"
        learned: ClassVar[list[int]] = []

        def learn(self, config, models, job, progress):
            from synthaug.tokens.text import token_embedding

            pipe = models["pipe"]
            (word,) = pipe.tokenizer("a", add_special_tokens=False).input_ids
            Toy.learned.append(job.class_index)
            embedding = token_embedding(pipe.text_encoder).weight[word].detach().float().cpu().clone().view(1, -1)
            return SimpleNamespace(token=job.token, class_index=job.class_index, label=job.name, steps=0,
                                   embedding=embedding, metadata={}, seconds=0.0)

        def save(self, result, path):
            from synthaug.tokens.io import save_tokens

            save_tokens({result.token: result.embedding}, path, {"method": self.name})

        def load(self, path):
            from synthaug.tokens.io import load_tokens

            return load_tokens(path)

    return Toy


def test_a_method_registered_from_outside_the_package_builds_and_learns(tmp_path, world, toy_method):
    """`validate`, the build (plan, worker, shards, index) and ``synthaug learn`` reach the method through the
    registry alone."""
    from synthaug import build
    from synthaug.builder.validate import check_build
    from synthaug.commands import inspect, learn_tokens

    assert "toy" in method_names() and get_method("toy").name == "toy"
    cfg = bw.config(tmp_path / "build", *world, method="toy", classes="0-1", per_class=2, baseline=False)
    assert check_build(cfg, False).selected == [0, 1]
    result = build(cfg, progress=False)
    assert result.ok and result.tokens_new == 2 and result.images == 4 and toy_method.learned == [0, 1]
    classes = json.loads((tmp_path / "build" / "classes.json").read_text())
    assert [(c["token"], c["method"]) for c in classes] == [("<synthaug-000>", "toy"), ("<synthaug-001>", "toy")]
    assert sorted(p.name for p in (tmp_path / "build" / "shards").iterdir()) == ["toy-00000.tar", "toy-00001.tar"]
    assert inspect(tmp_path / "build", verify=True).ok
    learned = learn_tokens(bw.config(tmp_path / "unused", *world, method="toy", classes="3"), out=tmp_path / "tokens",
                           progress=False)
    assert [r.token for r in learned] == ["<synthaug-003>"] and (tmp_path / "tokens" / "003.safetensors").is_file()


def test_an_unknown_method_is_one_line_naming_the_registered_ones(tmp_path, world):
    from synthaug.errors import UserError

    with pytest.raises(UserError, match=r"^`method` must be one of dct, ti, mcti but is 'lora'\.$"):
        bw.config(tmp_path / "o", *world, method="lora")


def test_every_registered_method_has_its_module_and_architecture_names_them():
    assert "`token_methods.py`" in ARCHITECTURE and "`METHOD_MODULES`" in ARCHITECTURE
    for name, module in METHOD_MODULES.items():
        path = REPO / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"{name}: {module} has no file"
        assert f"`{path.relative_to(PACKAGE / 'tokens').as_posix().removesuffix('.py')}`" in ARCHITECTURE or \
            f"`{path.name}`" in ARCHITECTURE, f"ARCHITECTURE.md does not name {path.name}"
        method = get_method(name)
        assert type(method).__module__ == module and method.name == name


# Files that may name a token method: the registry, the methods' own modules, and the `dct` config section's rules
# (its settings apply to DCT alone; `synthaug.config` refuses them for another method before torch loads).
ALLOWED = {"token_methods.py", "config.py", *(m.removeprefix("synthaug.").replace(".", "/") + ".py"
                                              for m in METHOD_MODULES.values())}


def _method_branches(path: Path) -> list[int]:
    """Lines that compare a config's ``method`` with a string (``cfg.method == "dct"``, ``config.method in (...)``)."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            on_method = any(isinstance(s, ast.Attribute) and s.attr == "method" and (
                (isinstance(s.value, ast.Name) and s.value.id in ("cfg", "config")) or
                (isinstance(s.value, ast.Attribute) and s.value.attr == "config")) for s in sides)
            literal = any(isinstance(s, ast.Constant) and isinstance(s.value, str) or
                          isinstance(s, (ast.Tuple, ast.List, ast.Set)) for s in sides)
            if on_method and literal:
                lines.append(node.lineno)
    return lines


def test_nothing_outside_the_registry_branches_on_the_method_name():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in ALLOWED and (lines := _method_branches(path)):
            found[rel] = lines
    assert not found, f"branches on the method's name outside the registry: {found}"


def test_a_guide_loader_is_one_entry_of_the_loaders_table(monkeypatch, world):
    """`load_classifier` dispatches through `LOADERS` alone: replacing one entry (from a test) changes what loads."""
    from synthaug.classifier import load
    from synthaug.classifier.base import LoadedClassifier

    assert "classifier/load.LOADERS" in ARCHITECTURE and "classifier/source.parse_source" in ARCHITECTURE
    real = load.LOADERS["dir"]
    calls = []

    def mine(src, local_files_only) -> LoadedClassifier:
        calls.append(src.text)
        return real(src, local_files_only)

    monkeypatch.setitem(load.LOADERS, "dir", mine)
    guide = load.load_classifier(str(world[1]), device="cpu")
    assert calls == [str(world[1])] and guide.num_classes == 10
