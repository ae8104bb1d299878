"""A tiny offline world for build tests: a saved random tiny pipeline, a saved tiny timm guide, small configs."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
REPO = Path(__file__).resolve().parents[1]


def save_world(root: Path, num_classes: int = 10) -> tuple[Path, Path]:
    """Write ``root/model`` (tiny SD pipeline) and ``root/guide{n}`` (tiny timm model); see `save_tiny_world`."""
    from synthaug.testing import save_tiny_world

    return save_tiny_world(root, num_classes)


def overrides(out: Path, model: Path, guide: Path, **extra) -> dict:
    """Config overrides of a tiny build; see `synthaug.testing.tiny_build_overrides`."""
    from synthaug.testing import tiny_build_overrides

    return tiny_build_overrides(out, model, guide, **extra)


def config(out: Path, model: Path, guide: Path, **extra):
    from synthaug.config import load_config

    return load_config(overrides=overrides(out, model, guide, **extra))


def snapshot(out: Path) -> dict[str, str]:
    """sha256 of every file a build wrote, by relative path (config.yaml names the folder; dotfiles are runtime).

    Snapshots compare builds made on one machine (in-process, in subprocesses, on local Ray actors): the same bytes
    are promised there. Across CPU kinds only `tests/test_golden.py`'s tolerance holds."""
    out = Path(out)
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "config.yaml"
            and not any(part.startswith(".") for part in p.relative_to(out).parts)}


def cli_env(**extra: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a test's own Ray is not the CLI's
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_AUTH_MODE": "disabled",
                "PYTHONUNBUFFERED": "1"})
    env.update({k: v for k, v in extra.items() if v is not None})
    for k in [k for k, v in extra.items() if v is None]:  # None: unset, e.g. RAY_AUTH_MODE=None for Ray's default
        env.pop(k, None)
    return env


def start_build(config_file: Path, log: Path, **env: str | None) -> subprocess.Popen:
    """``python -m synthaug.cli build --config FILE -q`` in the background, output to `log`."""
    return subprocess.Popen([sys.executable, "-m", "synthaug.cli", "build", "--config", str(config_file), "-q"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO, env=cli_env(**env))


def wait_for(path: Path, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Wait until `path` exists (the build reached its pause); fail with the build's log if it ended first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"build ended (rc {proc.returncode}) before pausing:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"build did not pause within {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder shared by every test module of the session (the world and the reference build are made once)."""
    d = tmp_path_factory.getbasetemp() / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def reference_build(tmp_path_factory, model: Path, guide: Path) -> Path:
    """The uninterrupted local build every other build of the same config is compared with (made once a session)."""
    from synthaug.builder.driver import build

    out = shared_dir(tmp_path_factory, "reference") / "build"
    if not (out / "index.parquet").is_file():
        build(config(out, model, guide), progress=False)
    return out


def write_config(path: Path, out: Path, model: Path, guide: Path, **extra) -> Path:
    """A YAML config file holding the whole resolved config (what `--config` reads)."""
    from synthaug.config import dump_yaml

    path.write_text(dump_yaml(config(out, model, guide, **extra)))
    return path


def save_clip(root: Path) -> Path:
    """A random tiny CLIPModel whose text tower has the tiny pipeline's shape (hidden 32), saved for `mcti.clip_model`."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    path = root / "clip"
    if not (path / "config.json").is_file():
        torch.manual_seed(0)
        cfg = CLIPConfig(
            text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2,
                         "vocab_size": 49408, "max_position_embeddings": 77, "bos_token_id": 49406,
                         "eos_token_id": 49407, "pad_token_id": 49407},
            vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                           "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
            projection_dim=16,
        )
        CLIPModel(cfg).save_pretrained(path)
    return path


def assert_same_within_float_rounding(out: Path, reference: Path, token_rtol: float = 1e-4) -> None:
    """Builds whose tokens were learned by another route (several classes per batch): every token within `token_rtol`
    of its largest component, every image within 2/255 per value, the same files. Same-machine bytes are not
    promised there: a larger batch rounds differently."""
    import io

    import numpy as np
    from PIL import Image

    from synthaug.index import load_index
    from synthaug.shards import read_sample
    from synthaug.tokens.io import load_tokens

    assert sorted(snapshot(out)) == sorted(snapshot(reference))
    for path in sorted((reference / "tokens").glob("[0-9][0-9][0-9].safetensors")):
        (name, ref), = load_tokens(path).items()
        got = load_tokens(out / "tokens" / path.name)[name]
        assert (got - ref).abs().max() <= token_rtol * ref.abs().max(), path.name
    for row in load_index(reference).to_pylist():
        a, b = (np.asarray(Image.open(io.BytesIO(read_sample(root / row["shard_path"], row["offset"], row["size"]))),
                           dtype=np.int16) for root in (reference, out))
        assert np.abs(a - b).max() <= 2, row["key"]
