"""The command line: instant help, one-line user errors with exit 2, every subcommand registered."""

import subprocess
import sys

import pytest

from synthaug.cli import build_parser, main

SUBCOMMANDS = ["build", "learn", "generate", "inspect", "export", "evaluate", "train", "fid", "report", "classify"]


def test_help_lists_every_subcommand_without_heavy_imports():
    code = ("import sys; from synthaug.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    text = build_parser().format_help()
    for cmd in SUBCOMMANDS:
        assert cmd in text


@pytest.mark.parametrize(
    "argv, match",
    [
        (["build", "--set", "per_class=0", "--executor", "local"], "`per_class` must be > 0 but is 0"),
        (["build", "--set", "dct.lrr=1"], r"Unknown config key\(s\) dct.lrr"),
        (["classify", "/nonexistent/build"], "has no config.yaml"),
        (["report", "/nonexistent/build"], "nonexistent"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"synthaug {argv[0]}: error:")
    assert match.replace("\\", "") in err or __import__("re").search(match, err)
