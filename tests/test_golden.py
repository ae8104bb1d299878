"""Golden builds: the same config and seeds give the very same image bytes, release after release.

Each case builds a small folder through the public `build` and compares its index's ``key -> sha256`` column with
``tests/golden/*.json``. A change to one of these hashes is a change of what users get from the same command: it must
be deliberate, and the fixture re-recorded with ``python tests/test_golden.py`` in the same commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import buildworld as bw

GOLDEN = Path(__file__).parent / "golden"

# name -> (world: "tiny" or "digits", config overrides)
CASES: dict[str, tuple[str, dict]] = {
    # the tiny random world: DCT with the baseline (every shard method), 3 classes, 2 images per shard
    "tiny-dct": ("tiny", {}),
    "tiny-ti": ("tiny", {"method": "ti", "classes": "0-1", "per_class": 2, "baseline": False,
                         "mcti.shots": 2, "mcti.steps": 2, "mcti.extra_steps": 0, "mcti.batch_size": 2}),
    "tiny-mcti": ("tiny", {"method": "mcti", "classes": "0-1", "per_class": 2, "baseline": False,
                           "mcti.shots": 2, "mcti.steps": 2, "mcti.extra_steps": 2, "mcti.batch_size": 2}),
    # the embedded digits world with its own defaults (x0 loss, validation selection), fewer updates
    "digits-dct": ("digits", {"classes": "6-7", "per_class": 4, "baseline": True, "dct.max_steps": 3,
                              "dct.val_every": 2, "dct.val_batch_size": 4, "run.executor": "local",
                              "run.cpus_per_worker": 1, "device": "cpu"}),
}


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


def _hashes(name: str, root: Path) -> dict[str, str]:
    from synthaug import build
    from synthaug.index import load_index

    result = build(_config(name, root), progress=False)
    table = load_index(result.out)
    return dict(zip(table.column("key").to_pylist(), table.column("sha256").to_pylist()))


@pytest.mark.parametrize("name", list(CASES))
def test_build_bytes_match_the_recorded_golden_build(name, tmp_path_factory):
    want = json.loads((GOLDEN / f"{name}.json").read_text())
    got = _hashes(name, bw.shared_dir(tmp_path_factory, "golden"))
    assert sorted(got) == sorted(want), "the build wrote other samples than the golden one"
    changed = [k for k in want if got[k] != want[k]]
    assert not changed, f"{len(changed)} of {len(want)} images changed bytes, e.g. {changed[:3]}"


if __name__ == "__main__":  # re-record the fixtures (only for a deliberate change of the output)
    import tempfile

    GOLDEN.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case in (sys.argv[1:] or CASES):
            hashes = _hashes(case, Path(tmp))
            (GOLDEN / f"{case}.json").write_text(json.dumps(dict(sorted(hashes.items())), indent=1) + "\n")
            print(f"{case}: {len(hashes)} images")
