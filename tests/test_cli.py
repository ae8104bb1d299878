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


REQUIRED = {"learn": ["--tokens-out", "t"], "generate": ["--dest", "d"], "evaluate": ["out", "--judge", "j"],
            "train": ["out", "--real", "digits"], "fid": ["out", "--real", "digits"], "inspect": ["out"],
            "export": ["out"], "report": ["out"], "classify": ["out"], "config": ["--explain", "dct.lr"]}


@pytest.mark.parametrize("cmd", [*SUBCOMMANDS, "config"])
def test_every_command_takes_quiet_and_verbose_after_its_name(cmd):
    required = REQUIRED.get(cmd, [])
    parser = build_parser()
    assert parser.parse_args([cmd, *required, "-q"]).quiet is True
    assert parser.parse_args([cmd, *required]).quiet is False
    assert parser.parse_args([cmd, *required, "-v"]).verbose is True
    assert parser.parse_args(["-v", cmd, *required]).verbose is True  # before the name, as before
    assert parser.parse_args([cmd, *required]).verbose is False


def test_abbreviated_flags_are_refused(capsys):
    assert main(["build", "--per-clas", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unrecognized arguments: --per-clas 3" in err
    assert main(["--verb", "report", "out"]) == 2


def test_a_misspelt_dataset_fails_in_one_line_without_importing_torch(tmp_path):
    code = ("import sys; from synthaug.cli import main; rc = main(['build', '--dataset', 'nope']); "
            "print(rc, sorted(m for m in ('torch', 'torchvision', 'diffusers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "2 []"
    assert done.stderr.strip() == ("synthaug build: error: `dataset` must be one of digits, cub, inat, imagenet, "
                                   "imagefolder, inat179, inat50, flowers102, oxfordiiitpet, fgvcaircraft, food101, "
                                   "dtd, eurosat, stanfordcars but is 'nope': fix the name.")
    code = code.replace("'nope'", f"'cub', '--root', {str(tmp_path / 'missing')!r}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "2 []" and "`root` " in done.stderr and "does not exist" in done.stderr


@pytest.mark.parametrize(
    "argv, match",
    [
        (["build", "--set", "per_class=0", "--executor", "local"], "`per_class` must be > 0 but is 0"),
        (["build", "--set", "dct.lrr=1"], r"Unknown config key\(s\) dct.lrr in section `dct`: did you mean dct.lr"),
        (["build", "--dataset", "cbu"], r"`dataset` must be one of .* but is 'cbu': did you mean 'cub'\?"),
        (["classify", "/nonexistent/build"], r"is not a synthaug build \(no config.yaml\)"),
        (["report", "/nonexistent/build"], "nonexistent"),
        (["build", "--set", "dataset=[a]"], "`dataset` must be a single value, not a list: ['a']"),
        (["build", "--set", "dct.lr=.nan"], "`dct.lr` must be a finite number but is nan"),
        (["build", "--set", "generate.guidance_scale=-2"], "`generate.guidance_scale` must be >= 0 but is -2.0"),
        (["build", "--per-class", "many"], "argument --per-class: invalid int value: 'many'"),
        (["build", "--method", "lora"], "argument --method: invalid choice: 'lora'"),
        (["fid", "/nonexistent/build"], "the following arguments are required: --real"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"synthaug {argv[0]}: error:")
    assert match.replace("\\", "") in err or __import__("re").search(match, err)


def test_yaml_with_an_integer_key_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("per_class: 3\n1: 2\n")
    assert main(["build", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "key 1 is not a string" in err


# Property: any build command line either validates or exits 2 with one line -- never a traceback. `build` is
# replaced by its validation (`check_build`: config, folder, device, model path, dataset, classes, guide), which is all
# that runs before work starts; the models never load.
def test_any_build_command_line_validates_or_exits_2_with_one_line(tmp_path, monkeypatch):
    import contextlib
    import io
    from types import SimpleNamespace

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import synthaug.builder
    from synthaug.builder.validate import check_build
    from synthaug.config import BuildConfig, flatten, to_dict, validate

    def validate_only(cfg, overwrite=False, progress=True):
        validate(cfg)
        check_build(cfg, overwrite)
        return SimpleNamespace(ok=True, summary=lambda: "valid")

    monkeypatch.setattr(synthaug.builder, "build", validate_only)
    monkeypatch.chdir(tmp_path)  # a relative --out lands here
    keys = sorted(flatten(to_dict(BuildConfig()))) + ["dct", "bogus"]
    text = st.one_of(
        st.sampled_from(["", "0", "-1", "3", "1e400", ".nan", ".inf", "-0.5", "2.5", "true", "null", "[a]", "{a: 1}",
                         "[1, 2", "cuda", "cuda:7", "cpu", "auto", "digits", "cub", "imagefolder", "x y", "0-2",
                         "seven,one", "sample:2", "dct", "ti", "png", "jpg", "val", "ray", "local", "{token}",
                         "A photo of {token} {label}", "/nonexistent", str(tmp_path / "o")]),
        st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=6),
    )
    flags = st.sampled_from(["--per-class", "--classes", "--device", "--dataset", "--root", "--num-workers", "--shots",
                             "--method", "--scheduler", "--model", "--guide", "--executor"])
    args = st.lists(st.one_of(st.tuples(flags, text).map(list),
                              st.tuples(st.just("--set"), st.tuples(st.sampled_from(keys), text).map("=".join)).map(
                                  list)), max_size=3)

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(args)
    def check(pairs):
        argv = ["build", "--executor", "local", "--out", str(tmp_path / "out")] + [a for p in pairs for a in p]
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(argv)
            except SystemExit as e:  # argparse
                code = e.code
        lines = [line for line in err.getvalue().splitlines() if line.startswith("synthaug")]
        assert code in (0, 2), (argv, code, err.getvalue())
        if code == 2:
            assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err.getvalue(), (argv, err.getvalue())
        else:
            assert out.getvalue().strip() == "valid"

    check()


@pytest.mark.parametrize(("verbose", "shown"), [
    (False, ["INFO building"]),
    (True, ["INFO Loading pretrained weights", "INFO building"]),
])
def test_logging_shows_synthaugs_lines_and_dependencies_only_when_verbose(verbose, shown):
    """What `synthaug ...` and the pipelines print: synthaug's INFO lines, not timm's ("Loading pretrained weights")
    or other dependencies' below WARNING, unless -v."""
    import subprocess
    import sys

    code = ("import logging; from synthaug.cli import configure_logging; "
            f"configure_logging(verbose={verbose}); "
            "logging.getLogger('timm.models._builder').info('Loading pretrained weights'); "
            "logging.getLogger('timm').warning('a real warning'); "
            "logging.getLogger('synthaug.builder.driver').info('building')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("INFO")] == shown
    assert "WARNING a real warning" in lines


def test_each_config_flag_sets_the_key_its_table_names():
    """One table maps flags to config keys: every key it names exists, and each subcommand's flags land there."""
    from synthaug.cli import CONFIG_FLAGS, build_parser, config_overrides
    from synthaug.config import BuildConfig, flatten, to_dict

    keys = set(flatten(to_dict(BuildConfig())))
    assert {key for key, _ in CONFIG_FLAGS.values()} <= keys
    args = build_parser().parse_args(["build", "--per-class", "7", "--baseline", "--shots", "3", "--executor", "local",
                                      "--ray-address", "auto", "--num-workers", "2", "--dataset", "digits",
                                      "--set", "dct.lr=0.1"])
    assert config_overrides(args) == {"per_class": 7, "baseline": True, "shots": 3, "run.executor": "local",
                                "run.ray_address": "auto", "run.num_workers": 2, "dataset": "digits", "dct.lr": 0.1}
    assert config_overrides(build_parser().parse_args(["build"])) == {}  # a flag left out changes nothing
    assert config_overrides(build_parser().parse_args(["generate", "--dest", "d", "-n", "4"])) == {"per_class": 4}
    args = build_parser().parse_args(["learn", "--tokens-out", "t", "--guide-target", "attribute:closed_loop"])
    assert config_overrides(args) == {"guide_target": "attribute:closed_loop"}
