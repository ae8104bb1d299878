"""Benchmark: SynthAugDataset random access vs torchvision ImageFolder over the same PNGs; shard writes vs a folder.

Both sides see the same images (random RGB noise resized up, so PNGs are realistically incompressible), the same
random index order, warm page cache, one process, no transform beyond decoding to an RGB PIL image. Rounds alternate
(ImageFolder, shards, ImageFolder, …) so background load hits both alike; the median round is reported, in wall time
and in this process's CPU time (the fairer clock on a shared machine).

    nice -n 15 .venv/bin/python scripts/bench_dataset.py --images 2000 --size 128
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass
class FakeImage:
    """Stands in for synthaug.generation.GeneratedImage (same attributes)."""

    image: Image.Image
    class_index: int
    class_name: str
    method: str
    index: int
    prompt: str = "A photo of <synthaug> bird"
    seed: int = 0
    token_sha256: str | None = None
    model_id: str = "bench"
    scheduler: str = "DDIMScheduler"
    steps: int = 50
    guidance_scale: float = 7.0
    height: int = 0
    width: int = 0
    guide_prob: float | None = 0.9
    guide_top5: list[int] | None = None


def make_images(n: int, size: int, classes: int) -> list[FakeImage]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        c = i % classes
        # low-res noise upsampled: smooth-ish content, PNG sizes closer to real photos than pure noise
        small = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        out.append(FakeImage(img, c, f"class {c}", "dct", i // classes, seed=i, height=size, width=size))
    return out


def write_folder(samples: list[FakeImage], root: Path) -> tuple[float, float]:
    from synthaug.shards import PNG_COMPRESS_LEVEL

    t, c = time.perf_counter(), time.process_time()
    for s in samples:
        d = root / f"{s.class_index:03d}"
        d.mkdir(parents=True, exist_ok=True)
        s.image.save(d / f"{s.index:05d}.png", compress_level=PNG_COMPRESS_LEVEL)
    return time.perf_counter() - t, time.process_time() - c


def write_shards(samples: list[FakeImage], out: Path, per_shard: int) -> tuple[float, float]:
    """Everything a build writes per image: tar (atomic, fsync), parquet, stats, then the merged index."""
    from synthaug.index import merge_index
    from synthaug.shards import write_shard

    t, c = time.perf_counter(), time.process_time()
    for sid, start in enumerate(range(0, len(samples), per_shard)):
        write_shard(out, sid, samples[start : start + per_shard])
    merge_index(out)
    return time.perf_counter() - t, time.process_time() - c


def rate(n: int, times: list[tuple[float, float]], which: int) -> float:
    return n / statistics.median(t[which] for t in times)


def read_all(ds, order: np.ndarray) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to read every item in `order`."""
    t, c = time.perf_counter(), time.process_time()
    for i in order:
        img, _ = ds[int(i)]
        img.load()
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed afterwards)")
    args = ap.parse_args()

    import torchvision

    from synthaug.mix import SynthAugDataset

    work = Path(args.workdir or tempfile.mkdtemp(prefix="synthaug-bench-"))
    try:
        samples = make_images(args.images, args.size, args.classes)
        # writes: alternate so both see the same background load; fresh directories each round
        folder_t, shard_t = [], []
        for r in range(max(1, args.rounds // 2)):
            folder_t.append(write_folder(samples, work / f"folder{r}"))
            shard_t.append(write_shards(samples, work / f"out{r}", args.per_shard))
        folder, out = work / "folder0", work / "out0"
        png_bytes = sum(p.stat().st_size for p in folder.rglob("*.png"))
        tar_bytes = sum(p.stat().st_size for p in (out / "shards").glob("*.tar"))

        ours = SynthAugDataset(out, methods="all")  # every image written, as the ImageFolder holds
        theirs = torchvision.datasets.ImageFolder(str(folder))
        assert len(ours) == len(theirs) == args.images
        order = np.random.default_rng(1).permutation(args.images)
        n = args.images
        read_all(ours, order[:200])  # warm both (page cache, imports)
        read_all(theirs, order[:200])
        tv_t, our_t = [], []
        for _ in range(args.rounds):
            tv_t.append(read_all(theirs, order))
            our_t.append(read_all(ours, order))
        n = args.images
        print(f"images: {n} x {args.size}px RGB PNG, {args.classes} classes, {args.per_shard} per shard, "
              f"{args.rounds} read rounds, {max(1, args.rounds // 2)} write rounds (medians)")
        print("| measure | torchvision / folder | synthaug shards | ratio |")
        print("| --- | --- | --- | --- |")
        for label, a, b in (("random-access read", tv_t, our_t), ("write incl. PNG encode", folder_t, shard_t)):
            for which, clock in ((0, "wall"), (1, "CPU")):
                ra, rb = rate(n, a, which), rate(n, b, which)
                print(f"| {label}, {clock} (images/s) | {ra:,.0f} | {rb:,.0f} | {rb / ra:.2f}x |")
        print(f"| bytes on disk | {png_bytes:,} in {n} files | {tar_bytes:,} in "
              f"{len(list((out / 'shards').glob('*.tar')))} tars (+ parquet, stats) | {tar_bytes / png_bytes:.3f}x |")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
