"""A plain wheel install runs the main job: ``pip install synthaug-*.whl`` (no extra), then ``synthaug build --dataset
digits``, with neither scikit-learn nor Ray importable."""

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_without_extras_builds_the_digits_world(tmp_path):
    # 1. The wheel, from the sources (the installed setuptools: no download)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("synthaug-*.whl"))
    # 2. A fresh environment that reuses this one's torch, diffusers, ... but installs synthaug from the wheel alone
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    # 3. Optional packages out of reach: an import of either fails as if they were not installed
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("sklearn", "ray"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not installed')\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(blocked), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(env_dir / "bin" / "synthaug"), "build", "--dataset", "digits", "--classes", "0", "--per-class", "2",
         "--out", str(tmp_path / "out"), "--set", "dct.max_steps=1", "--set", "dct.batch_size=2",
         "--set", "dct.val_batch_size=2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    where = subprocess.run([str(python), "-c", "import synthaug; print(synthaug.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(site), where  # the wheel's copy ran, not the source tree
    assert "Ray is not installed, so the build runs in this process" in done.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["dct-00000.tar"]
