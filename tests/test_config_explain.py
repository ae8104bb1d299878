"""The config's documentation: every field documented in its dataclass's docstring, and `synthaug config --explain`."""

import dataclasses
import textwrap

import pytest

from synthaug.cli import main
from synthaug.config import BuildConfig, DCTConfig, dump_yaml, load_config
from synthaug.config_docs import SECTIONS, config_keys, explain, field_docs

CONFIG_CLASSES = [BuildConfig, *SECTIONS.values()]


@pytest.mark.parametrize("cls", CONFIG_CLASSES, ids=lambda c: c.__name__)
def test_every_config_field_has_exactly_one_attributes_entry(cls):
    docs = field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    assert sorted(docs) == sorted(names), "the Attributes: section and the fields differ"
    assert all(len(docs[n]) > 10 for n in names), [n for n in names if len(docs[n]) <= 10]


def test_field_docs_joins_continuation_lines_and_stops_at_the_next_section():
    class Doc:
        """Summary.

        Attributes:
            a: first line
                and its continuation.
            b: one line.

        Example:
            c: not an attribute.
        """

    assert field_docs(Doc) == {"a": "first line and its continuation.", "b": "one line."}


def test_explain_a_key_prints_its_text_type_default_and_other_defaults(capsys):
    assert main(["config", "--explain", "dct.select"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == 'dct.select: str (default "min_loss")'
    body = " ".join(line.strip() for line in lines[1:] if not line.strip().startswith("other defaults:"))
    assert body == field_docs(DCTConfig)["select"]  # the docstring entry, all of it (it spans several lines)
    assert "a token that only fits its training seeds is never kept" in body
    assert "other defaults: dataset digits: \"val\"" in out

    text = explain("dct.lr")
    assert text.startswith("dct.lr: float | None (default null)\n")
    assert "dataset digits: 0.003" in text and "preset paper: null" in text


def test_explain_a_section_lists_each_key_on_one_line():
    lines = explain("dct").splitlines()
    assert lines[0].startswith("dct: Discriminative Class Token learning")
    assert [line.split()[0] for line in lines[1:]] == [f"dct.{f.name}" for f in dataclasses.fields(DCTConfig)]
    assert all(len(line) <= 119 for line in lines)
    max_steps = next(line for line in lines if line.split()[0] == "dct.max_steps")
    assert max_steps.split(None, 1)[1] == "Stopping rule 3: the most token updates (the paper stops after 200)."


def test_explain_an_unknown_key_is_one_line_naming_the_closest_keys(capsys):
    assert main(["config", "--explain", "dct.lrr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Unknown config key 'dct.lrr'" in err and "dct.lr, dct.lr_floor" in err


def test_explain_with_build_prints_the_value_that_build_used(tmp_path, capsys):
    build = tmp_path / "build"
    build.mkdir()
    (build / "config.yaml").write_text(dump_yaml(load_config(None, {"dct.lr": 0.007, "per_class": 3})))
    assert main(["config", "--explain", "dct.lr", "--build", str(build)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"    in the build {build}: 0.007"
    section = explain("dct", build=build).splitlines()
    assert next(line for line in section if line.split()[0] == "dct.lr").endswith("[this build: 0.007]")
    assert explain("per_class", build=build).endswith(": 3")

    (build / "config.yaml").write_text(textwrap.dedent("""\
        dataset: digits
        dct: {max_steps: 9}
    """))  # a config.yaml from before a key existed
    assert explain("dct.max_steps", build=build).endswith(": 9")
    assert "not recorded" in explain("dct.lr", build=build)

    assert main(["config", "--explain", "dct.lr", "--build", str(tmp_path / "none")]) == 2
    assert "is not a synthaug build (no config.yaml)" in capsys.readouterr().err


def test_every_key_explains():
    for key in config_keys():
        text = explain(key)
        assert text.startswith(f"{key}: ") and "(not documented)" not in text
