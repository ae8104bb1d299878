"""Test set-up: never touch a hub, keep CPU threads modest, build tiny models once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Worker hooks that inject faults when a test sets SYNTHAUG_TEST_* (tests/faults.py); inert otherwise.
os.environ.setdefault("SYNTHAUG_WORKER_HOOKS", os.path.join(os.path.dirname(os.path.abspath(__file__)), "faults.py"))
# Compiled kernels of this run only: inductor's cache (synthaug's default is a persistent user folder) is not shared
# with earlier runs or other processes, so a run with the CPU's instruction set capped (ATEN_CPU_CAPABILITY=avx2 ...)
# compiles its own kernels. Under such a cap, one suite run that reused a shared cache got black images from the
# compiled UNet; with a cache of its own the same test passed.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="synthaug-test-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], True)

import buildworld as bw
import pytest
import torch

# One thread: on 2 contended cores two threads made a tiny UNet call ~30x slower (measured).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe():
    """A random-weight tiny Stable Diffusion pipeline (mechanics only: random weights don't learn)."""
    from synthaug.testing import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The tiny build world saved once per session: ``(model dir, guide dir)`` (`buildworld.save_world`)."""
    return bw.save_world(bw.shared_dir(tmp_path_factory, "world"))


@pytest.fixture(scope="session")
def reference(tmp_path_factory, world):
    """A finished tiny build, made once per session, that tests copy and compare against."""
    return bw.reference_build(tmp_path_factory, *world)
