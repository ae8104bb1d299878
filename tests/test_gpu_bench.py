"""The one-command GPU benchmark (scripts/bench/gpu.sh -> gpu.py), checked on the CPU: its tiny mode runs every row's
code path, the time budget turns the rest into skipped rows, and the shell wrapper finds or names what is missing."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from synthaug.generation import COMPILE_CACHE_ENV

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "scripts" / "bench" / "gpu.sh"

DCT_ROWS = [f"DCT update, {p} preset, {w}" for p in ("paper", "fast")
            for w in ("NCHW (before)", "channels-last (default)")]
CLASS_ROWS = [f"DCT class-update, dct.classes_per_batch {s}" for s in ("1", "4", "auto")]


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("synthaug_bench_gpu", ROOT / "scripts" / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _rows(text: str) -> dict[str, list[str]]:
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()[2:]]
    return {r[0]: r[1:] for r in rows}


def test_the_tiny_run_prints_every_row_of_the_table(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv(COMPILE_CACHE_ENV, default_cache_dir())  # as importing diffusers leaves it
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    echoed: list[str] = []
    rows = _rows(_gpu_bench().main(["--tiny", "--batches", "2"], echo=echoed.append))
    generation = ["generation, bare pipe(), NCHW eager, batch 2", "generation, build, NCHW, eager (before), batch 2",
                  "generation, bare pipe(), channels-last eager, batch 2",
                  "generation, build, channels-last, compiled (default), batch 2"]
    assert list(rows) == ["machine", "float32 matmul 512^3", *DCT_ROWS, *CLASS_ROWS, *generation]
    for what in DCT_ROWS:
        value, unit = rows[what][0].split(" ", 1)
        assert float(value) > 0 and unit == "s / update" and "batch 2, T = 3, checkpointing on" in rows[what][2]
    for what in generation:
        value, unit = rows[what][0].split(" ", 1)
        assert float(value) > 0 and unit == "s / image"
    assert rows[generation[-1]][2].startswith("compiled in ")
    assert str(tmp_path / "synthaug" / "torchinductor") in rows[generation[-1]][2]
    for what in CLASS_ROWS:
        value, unit = rows[what][0].split(" ", 1)
        assert float(value) > 0 and unit == "s / class-update"
    assert rows[CLASS_ROWS[1]][2].startswith("4 classes x batch 2") and "(auto chose" not in rows[CLASS_ROWS[2]][2]
    assert sum(line.startswith("[") for line in echoed) == len(rows)  # each row printed as it was measured


def test_rows_past_the_budget_print_as_skipped():
    rows = _rows(_gpu_bench().main(["--tiny", "--budget", "0"], echo=lambda line: None))
    skipped = [w for w, (value, _, note) in rows.items() if value == "skipped"]
    assert skipped == [w for w in rows if w not in ("machine", "float32 matmul 512^3")]
    assert len(skipped) == 11 and all(rows[w][2] == "past the 0 s budget" for w in skipped)


def _gpu_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_SH), *args], check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_gpu_sh_runs_with_the_packages_at_hand():
    done = _gpu_sh("--check", PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    assert f"ready: {sys.executable}" in done.stdout and f"PYTHONPATH={ROOT}:" in done.stdout


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs a virtual environment's base interpreter")
def test_gpu_sh_names_what_is_missing_and_where_to_put_the_wheels(tmp_path):
    bare = Path(sys.base_prefix) / "bin" / "python3"  # the interpreter without the venv's packages
    done = _gpu_sh(PYTHON=str(bare), SYNTHAUG_WHEELS=str(tmp_path / "wheels"))
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.startswith(f"gpu.sh: {bare} lacks torch ")
    assert f"bring their wheels as {tmp_path / 'wheels'} (the pip download command is at the top of" in done.stderr
