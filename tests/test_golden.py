"""Golden builds: the same config and seeds give the same images, release after release, on every CPU.

Each case builds a small folder through the public `build` and compares it with ``tests/golden/``:

- ``NAME.json`` holds, for each machine the case was recorded on, the machine (CPU model, its vector instruction set
  flags, torch's kernel capability, the ISA-limiting environment variables, the torch version) and the index's
  ``key -> sha256`` column as built there;
- ``NAME.npz`` holds the reference pixels of every image (``img/KEY``, uint8 HxWx3) and every learned token
  (``tok/TOKEN``, float32), as built on the first recording machine.

On a recorded machine the image bytes must match exactly: "deterministic" means identical bytes on the same machine
and software. Elsewhere float kernels differ (AVX2 vs AVX-512 vs AMX, another torch), so images may land a least
significant bit apart; there every image must match the reference pixels within `PIXEL_MAX_DIFF` per channel value
and `PIXEL_MEAN_DIFF` on average, and every token within `TOKEN_RTOL` of its largest component. Measured on an
AVX-512 machine against the same build with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2``: 12 of 48 images changed, every changed pixel by exactly 1/255 (mean difference at
most 0.0007/255), tokens by at most 7e-7 of their largest component. A real change of behaviour (another seed,
prompt, step or guidance) moves far more, and fails everywhere (`test_a_changed_image_fails_on_every_machine`).

A change to these images is a change of what users get from the same command: it must be deliberate, and the
fixtures re-recorded in the same commit with ``python tests/test_golden.py [CASE ...]`` (replaces the fixtures with
this machine's build). ``python tests/test_golden.py --add-machine [CASE ...]`` keeps the reference and adds this
machine's exact hashes, after checking its images are within the tolerance (a CI machine of another CPU kind).
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import buildworld as bw

GOLDEN = Path(__file__).parent / "golden"

PIXEL_MAX_DIFF = 2  # per channel value, out of 255
PIXEL_MEAN_DIFF = 0.05  # mean absolute difference of one image, out of 255
TOKEN_RTOL = 1e-5  # of the token's largest absolute component

# The variables that cap the instruction sets torch, oneDNN and MKL use (they change float results).
ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")

# name -> (world: "tiny" or "digits", config overrides)
CASES: dict[str, tuple[str, dict]] = {
    # the tiny random world: DCT with the baseline (every shard method), 3 classes, 2 images per shard
    "tiny-dct": ("tiny", {}),
    "tiny-ti": ("tiny", {"method": "ti", "classes": "0-1", "per_class": 2, "baseline": False,
                         "shots": 2, "mcti.steps": 2, "mcti.extra_steps": 0, "mcti.batch_size": 2}),
    "tiny-mcti": ("tiny", {"method": "mcti", "classes": "0-1", "per_class": 2, "baseline": False,
                           "shots": 2, "mcti.steps": 2, "mcti.extra_steps": 2, "mcti.batch_size": 2}),
    # the embedded digits world with its own defaults (x0 loss, validation selection), fewer updates
    "digits-dct": ("digits", {"classes": "6-7", "per_class": 4, "baseline": True, "dct.max_steps": 3,
                              "dct.val_every": 2, "dct.val_batch_size": 4, "run.executor": "local",
                              "run.cpus_per_worker": 1, "device": "cpu"}),
}


def machine() -> dict:
    """What decides the float kernels a build runs: the CPU, its vector ISA, torch's choice of kernels, torch."""
    import torch

    model, flags = "unknown", []
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        if m := re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE):
            model = m.group(1).strip()
        ids = [re.search(rf"^{k}\s*:\s*(.+)$", cpuinfo, re.MULTILINE) for k in ("vendor_id", "cpu family", "model")]
        model += " (" + " ".join(m.group(1).strip() for m in ids if m) + ")"  # "AMD EPYC" names no generation
        if m := re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE):
            flags = sorted({f for f in m.group(1).split() if re.match(r"(avx|amx|fma|f16c)", f)})
    except OSError:  # not Linux: the model alone
        import platform

        model = platform.processor() or platform.machine()
    return {"cpu": model, "isa": " ".join(flags), "capability": torch.backends.cpu.get_cpu_capability(),
            "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}, "torch": torch.__version__}


def _config(name: str, root: Path):
    from synthaug.config import load_config

    world, extra = CASES[name]
    out = root / name
    if world == "digits":
        return load_config(overrides={"dataset": "digits", "out": str(out), **extra})
    model, guide = bw.save_world(root / "world")
    if extra.get("method") == "mcti":
        extra = {**extra, "mcti.clip_model": str(bw.save_clip(root / "world"))}
    return bw.config(out, model, guide, **extra)


def _build(name: str, root: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The case's build: ``key -> sha256`` and the arrays the npz fixture holds (``img/KEY``, ``tok/TOKEN``)."""
    from safetensors.numpy import load_file

    from synthaug import build
    from synthaug.index import load_index
    from synthaug.shards import ShardReader

    out = build(_config(name, root), progress=False).out
    rows = load_index(out).to_pylist()
    reader = ShardReader(out)
    arrays = {f"img/{r['key']}": np.asarray(reader.read_image(r["shard"], r["offset"], r["size"])) for r in rows}
    reader.close()
    tokens = Path(out) / "tokens" / "tokens.safetensors"
    if tokens.exists():
        arrays.update({f"tok/{k}": v.astype(np.float32) for k, v in load_file(tokens).items()})
    return {r["key"]: r["sha256"] for r in rows}, arrays


def load_fixture(name: str) -> tuple[dict, dict[str, np.ndarray]]:
    record = json.loads((GOLDEN / f"{name}.json").read_text())
    with np.load(GOLDEN / f"{name}.npz") as z:
        return record, {k: z[k] for k in z.files}


def compare(want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> list[str]:
    """What differs beyond the cross-CPU tolerance between reference arrays and a build's (empty: all within)."""
    problems = []
    if sorted(want) != sorted(got):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        return [(f"the build wrote other samples or tokens than the golden one (missing {missing[:3]}, "
                 f"extra {extra[:3]})")]
    for key in sorted(want):
        a, b = want[key], got[key]
        if a.shape != b.shape:
            problems.append(f"{key}: shape {b.shape}, golden {a.shape}")
        elif key.startswith("img/"):
            diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
            if diff.max() > PIXEL_MAX_DIFF or diff.mean() > PIXEL_MEAN_DIFF:
                problems.append(f"{key}: max pixel difference {diff.max()}/255, mean {diff.mean():.4f}/255 "
                                f"(tolerance {PIXEL_MAX_DIFF}, {PIXEL_MEAN_DIFF})")
        else:
            scale = float(np.abs(a).max()) or 1.0
            err = float(np.abs(a - b).max()) / scale
            if err > TOKEN_RTOL:
                problems.append(f"{key}: differs by {err:.2e} of its largest component (tolerance {TOKEN_RTOL})")
    return problems


def recorded_hashes(record: dict, here: dict) -> dict[str, str] | None:
    """The exact hashes recorded on this very machine and software, or None."""
    for entry in record["machines"]:
        if entry["machine"] == here:
            return entry["sha256"]
    return None


@pytest.mark.parametrize("name", list(CASES))
def test_build_matches_the_recorded_golden_build(name, tmp_path_factory):
    """Exact bytes on a recorded machine; the reference pixels and tokens within tolerance on every machine."""
    record, want = load_fixture(name)
    hashes, got = _build(name, bw.shared_dir(tmp_path_factory, "golden"))
    problems = compare(want, got)
    assert not problems, f"{len(problems)} differences beyond the cross-CPU tolerance: {problems[:3]}"
    exact = recorded_hashes(record, machine())
    if exact is not None:  # the recording machine: nothing may move, not even a least significant bit
        changed = [k for k in exact if hashes.get(k) != exact[k]]
        assert sorted(hashes) == sorted(exact) and not changed, \
            f"{len(changed)} of {len(exact)} images changed bytes on the recording machine, e.g. {changed[:3]}"


def test_a_changed_image_fails_on_every_machine():
    """The tolerance admits a least-significant-bit difference and nothing that a change of behaviour makes: one
    image replaced by its neighbour seed's, or one pixel moved by 3/255, or one token component moved by 1e-4 of
    the token, each fails."""
    _, want = load_fixture("tiny-dct")
    assert not compare(want, dict(want))
    images = sorted(k for k in want if k.startswith("img/"))
    lsb = dict(want)
    lsb[images[0]] = want[images[0]].copy()
    lsb[images[0]][0, 0, 0] ^= 1  # a least significant bit: another CPU's kernels
    assert not compare(want, lsb)
    assert np.asarray(lsb[images[0]]).tobytes() != np.asarray(want[images[0]]).tobytes()  # but not the same bytes

    other_seed = {**want, images[0]: want[images[1]]}
    assert [p.split(":")[0] for p in compare(want, other_seed)] == [images[0]]
    pixel = dict(want)
    pixel[images[2]] = want[images[2]].copy()
    pixel[images[2]][5, 5, 1] = (int(pixel[images[2]][5, 5, 1]) + 3) % 256
    assert [p.split(":")[0] for p in compare(want, pixel)] == [images[2]]
    token = next(k for k in want if k.startswith("tok/"))
    moved = {**want, token: want[token] + 1e-4 * np.abs(want[token]).max() * (np.arange(want[token].size) == 0)
             .reshape(want[token].shape)}
    assert [p.split(":")[0] for p in compare(want, moved)] == [token]
    assert "missing" in compare(want, {k: v for k, v in want.items() if k != images[-1]})[0]


def test_machine_identity_sees_the_instruction_set_caps(monkeypatch):
    """Capping the vector ISA (how a CPU of another kind is imitated) makes this another machine: the golden check
    then compares within tolerance instead of requiring the recorded bytes."""
    here = machine()
    cap = "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2" else "AVX2"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert machine() != here and machine()["isa_env"]["ONEDNN_MAX_CPU_ISA"] == cap
    record = {"machines": [{"machine": here, "sha256": {"k": "0"}}]}
    assert recorded_hashes(record, machine()) is None and recorded_hashes(record, here) == {"k": "0"}


def _record(cases: list[str], add_machine: bool) -> None:
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    here = machine()
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            hashes, arrays = _build(case, Path(tmp))
            if add_machine:
                record, want = load_fixture(case)
                problems = compare(want, arrays)
                if problems:
                    sys.exit(f"{case}: this machine's build is not within tolerance of the reference: {problems[:3]}")
                record["machines"] = [m for m in record["machines"] if m["machine"] != here]
            else:
                record = {"machines": []}
                buf = io.BytesIO()
                np.savez_compressed(buf, **arrays)
                (GOLDEN / f"{case}.npz").write_bytes(buf.getvalue())
            record["machines"].append({"machine": here, "sha256": dict(sorted(hashes.items()))})
            (GOLDEN / f"{case}.json").write_text(json.dumps(record, indent=1) + "\n")
            print(f"{case}: {len(hashes)} images, {len(record['machines'])} machine(s)")


if __name__ == "__main__":  # re-record the fixtures (only for a deliberate change of the output)
    args = sys.argv[1:]
    add = "--add-machine" in args
    _record([a for a in args if a != "--add-machine"] or list(CASES), add)
