"""Benchmark: the build driver at scale — a plan of up to 10,000 class jobs and an index of up to 1,000,000 rows.

The real `synthaug.build` runs (validation, plan, local executor, bookkeeping, `merge_index`, classes.json) with a
fake worker: instead of learning tokens and generating images it writes a zero token and real shards of tiny solid
8x8 PNGs through `write_shard`. Each size runs in a fresh process; it reports the driver's peak resident memory above
what the process held before `build` (imports and the fake worker's own buffers included, so an upper bound), the
time of `merge_index` within the build; then, in another fresh process, `merge_index` alone on the finished build:
its time and its peak resident memory above the process's start (the merge's own footprint).

    nice -n 15 .venv/bin/python scripts/bench/driver_scale.py --classes 1000 3000 10000 --per-class 100 --work /tmp/ds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

IMAGE_SIDE = 8


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _preload() -> None:
    """Import what the driver and the merge import lazily, so that "above start" counts data, not code."""
    import pyarrow.compute
    import pyarrow.dataset
    import pyarrow.parquet  # noqa: F401
    import webdataset  # noqa: F401


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@dataclass
class FakeImage:
    """Stands in for synthaug.generation.GeneratedImage (same attributes)."""

    image: object
    class_index: int
    class_name: str
    method: str
    index: int
    prompt: str
    seed: int
    token_sha256: str | None = "0" * 64
    model_id: str = "bench"
    scheduler: str = "DDIMScheduler"
    steps: int = 50
    guidance_scale: float = 7.0
    height: int = IMAGE_SIDE
    width: int = IMAGE_SIDE
    guide_prob: float | None = 0.5
    guide_top5: list[int] | None = None


def make_world(work: Path, classes: int) -> tuple[Path, Path, Path]:
    """An ImageFolder of `classes` folders (one tiny image each), a tiny pipeline, a tiny guide with as many labels."""
    import timm
    import torch
    from PIL import Image
    from timm.models import save_for_hf

    from synthaug.testing import tiny_pipeline

    root, model, guide = work / "data", work / "model", work / f"guide{classes}"
    names = [f"c{i:05d}" for i in range(classes)]
    if not (root / names[-1] / "0.png").is_file():
        img = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (10, 20, 30))
        for name in names:
            (root / name).mkdir(parents=True, exist_ok=True)
            img.save(root / name / "0.png")
    if not (model / "model_index.json").is_file():
        tiny_pipeline(seed=0).save_pretrained(model)
    if not (guide / "config.json").is_file():
        torch.manual_seed(0)
        net = timm.create_model("test_efficientnet", num_classes=classes)
        save_for_hf(net, str(guide), model_config={"label_names": names, "trained_on": "nothing (random weights)"},
                    data_config={"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear"},
                    safe_serialization=True)
    return root, model, guide


def one(work: Path, classes: int, world_classes: int, per_class: int) -> dict:
    """One size, in this process: build with the fake worker; measure memory and the merge."""
    import torch
    from PIL import Image

    from synthaug.builder import driver, executors
    from synthaug.builder.worker import ClassWorker
    from synthaug.config import load_config
    from synthaug.layout import shard_done, token_path
    from synthaug.shards import write_shard
    from synthaug.tokens.dct import TokenResult
    from synthaug.tokens.io import save_token

    image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (200, 100, 0))

    class FakeWorker(ClassWorker):
        def run(self, job, attempt=0):
            self._report({"kind": "start", "class_index": job.class_index, "attempt": attempt})
            path = token_path(self.out, job.class_index)
            if not path.is_file():
                save_token(TokenResult(token=job.token, class_index=job.class_index, label=job.name,
                                       embedding=torch.zeros(1, 32), steps=1, stop_reason="max_steps", best_step=0,
                                       metadata={"model_id": "bench", "guide": "bench"}), path)
            for task in job.shards:
                if not shard_done(self.out, task.shard_id, task.method):
                    write_shard(self.out, task.shard_id, (
                        FakeImage(image, job.class_index, job.name, task.method, i, f"a photo of {job.name}", i)
                        for i in range(task.start, task.stop)))
                    self._report({"kind": "shard", "class_index": job.class_index, "shard": task.shard_id,
                                  "images": task.size})
            return {"class_index": job.class_index}

    executors.ClassWorker = FakeWorker
    root, model, guide = make_world(work, world_classes)
    out = work / f"build{classes}"
    config = load_config(overrides={
        "dataset": "imagefolder", "root": str(root), "model": str(model), "guide": str(guide), "out": str(out),
        "classes": f"0-{classes - 1}", "per_class": per_class, "device": "cpu", "dtype": "float32",
        "shards.samples_per_shard": per_class, "run.executor": "local", "run.cpus_per_worker": 1,
    })
    merge = {}
    real_merge = driver.merge_index

    def timed_merge(*args, **kwargs):
        before, t = _rss_mib(), time.perf_counter()
        result = real_merge(*args, **kwargs)
        merge.update(seconds=time.perf_counter() - t, rss_before_mib=before, peak_mib=_peak_mib())
        return result

    driver.merge_index = timed_merge
    _preload()
    base = _rss_mib()
    t = time.perf_counter()
    result = driver.build(config, progress=False, overwrite=True)
    return {"classes": classes, "rows": result.images, "build_seconds": time.perf_counter() - t,
            "base_rss_mib": base, "peak_mib": _peak_mib(), "driver_peak_above_base_mib": _peak_mib() - base,
            "merge_seconds": merge["seconds"], "merge_peak_above_base_mib": merge["peak_mib"] - base,
            "index_bytes": (out / "index.parquet").stat().st_size}


def merge_only(out: Path) -> dict:
    """`merge_index` alone on a finished build, in a fresh process: time and peak memory above the start."""
    import json as _json

    from synthaug.index import merge_index

    classes = _json.loads((out / "classes.json").read_text())
    _preload()
    base = _rss_mib()
    t = time.perf_counter()
    result = merge_index(out, classes, train_methods=["dct"])
    return {"rows": result.num_samples, "merge_alone_seconds": time.perf_counter() - t,
            "merge_alone_peak_above_base_mib": _peak_mib() - base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[1000, 3000, 10000])
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (the world and the builds)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--merge-only", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    world = max(args.classes)
    if args.one:
        print(json.dumps(one(args.work, args.one, world, args.per_class)))
        return
    if args.merge_only:
        print(json.dumps(merge_only(args.work / f"build{args.merge_only}")))
        return
    rows = []
    for n in args.classes:  # a fresh process per size: peak memory is per process
        cmd = [sys.executable, __file__, "--work", str(args.work), "--per-class", str(args.per_class),
               "--classes", *map(str, args.classes), "--one", str(n)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        cmd[-2:] = ["--merge-only", str(n)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows[-1].update(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| class jobs | index rows | build with fake work (s) | driver peak RSS above start | merge_index in the "
          "build (s) | merge_index alone (s) | its peak RSS above start | index.parquet |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['classes']:,} | {r['rows']:,} | {r['build_seconds']:.0f} | "
              f"{r['driver_peak_above_base_mib']:.0f} MiB | {r['merge_seconds']:.1f} | "
              f"{r['merge_alone_seconds']:.1f} | {r['merge_alone_peak_above_base_mib']:.0f} MiB | "
              f"{r['index_bytes'] / 2**20:.1f} MiB |")


if __name__ == "__main__":
    main()
