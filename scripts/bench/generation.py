"""Generation at the pipeline's own pace: synthaug's build path against a bare stock ``pipe()`` loop.

On the SD-scale world (`synthaug.testing.sd_pipeline`: the exact SD-1.5 architecture, random weights) and a ViT-B/16
guide, in one process and interleaved (the order rotates every repeat, after one untimed warm-up round), it times

- ``bare``: a stock diffusers loop, ``pipe(prompt=[...], generator=[...], num_inference_steps, guidance_scale,
  output_type="pil")`` over the same seeds and the same batches that synthaug uses;
- ``build``: `synthaug.builder.worker.ClassWorker.run` on a class whose token file exists - what ``synthaug build``
  runs for each class: `generate` batch by batch, guide scores, PNG encoding and shard writing on the background
  `ShardWriter` thread;
- ``build, writes in line``: the same with the shards written on the generating thread (as before the overlap);
- ``build, compiled UNet`` (with ``--compile``): ``generate.compile=true``; its compile time is reported apart.

It prints seconds per image, images per second, the ratio to ``bare`` (median of the per-repeat ratios), peak memory
(CUDA: the allocator's peak; CPU: peak resident memory, sampled), the time spent in PNG encoding + shard writing and
the part of it the generating thread waited for, and the guide's time.

Usage (CUDA: 512 px, 50 steps, batch from free memory; CPU: a reduced size, few steps, a small batch):

    nice .venv/bin/python scripts/bench/generation.py --write
    nice .venv/bin/python scripts/bench/generation.py --compile --write
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch
from _report import command_line, publish

from synthaug.builder.plan import ClassJob, ShardTask
from synthaug.builder.worker import ClassWorker
from synthaug.classifier import load_classifier
from synthaug.config import load_config, to_dict
from synthaug.generation import batch_size_for, batch_sizes, image_seed
from synthaug.testing import save_vit_guide, sd_pipeline
from synthaug.tokens.io import save_tokens
from synthaug.tokens.text import render_prompt, token_name

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SECTION = "## Generation against a bare pipeline loop"
LABEL, CLASS = "bird", 0


class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 5 ms (CPU runs)."""

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class GuideTimer:
    """Wall time spent in the guide's forward (forward hooks; the caller's ``.tolist()`` syncs CUDA right after)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seconds, self._t0 = 0.0, 0.0
        module.register_forward_pre_hook(lambda *a: setattr(self, "_t0", time.perf_counter()))
        module.register_forward_hook(lambda *a: self._add())

    def _add(self) -> None:
        self.seconds += time.perf_counter() - self._t0


def encode_while_generating(size: int = 512, rounds: int = 200) -> tuple[float, float, float]:
    """Seconds to PNG-encode one `size` px noise image (random weights make noise, the worst case for zlib), and the
    median and largest delay of a 1 ms sleep on this thread while another thread encodes such images: a delay near
    1 ms means Pillow releases the GIL while it compresses, so the generating thread keeps launching GPU work."""
    import io

    import numpy as np
    from PIL import Image

    from synthaug.shards import encode_image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    t0 = time.perf_counter()
    encode_image(image)
    one = time.perf_counter() - t0
    stop = threading.Event()

    def encode() -> None:
        while not stop.is_set():
            image.save(io.BytesIO(), format="PNG", compress_level=6)

    thread = threading.Thread(target=encode, daemon=True)
    thread.start()
    delays = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        time.sleep(0.001)
        delays.append(time.perf_counter() - t0)
    stop.set()
    thread.join()
    return one, statistics.median(delays), max(delays)


def main() -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", default="sd15")
    parser.add_argument("--size", type=int, default=512 if cuda else 64)
    parser.add_argument("--steps", type=int, default=50 if cuda else 4)
    parser.add_argument("--batch", default="auto" if cuda else "2", help="generate.batch_size (auto: from memory)")
    parser.add_argument("--images", type=int, default=0, help="images per timed run (default: 3 batches + 1)")
    parser.add_argument("--per-shard", type=int, default=0, help="images per shard (default: half the images)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time generate.compile=true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--write", action="store_true", help=f"write the {SECTION[3:]!r} section of BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)

    # 1. The world: SD-1.5 at the size, a ViT-B/16 guide, a token file for the class
    tmp = Path(tempfile.mkdtemp(prefix="synthaug-bench-gen-"))
    pipe = sd_pipeline(args.layout, sample_size=args.size // 8, dtype=dtype, device=device)
    guide = load_classifier(save_vit_guide(tmp / "guide", "mae-cub", num_classes=10), device=device)
    guide_timer = GuideTimer(guide)
    token = token_name(CLASS)
    bird = pipe.tokenizer.convert_tokens_to_ids("bird</w>")
    embedding = pipe.text_encoder.get_input_embeddings().weight[bird].detach().float().cpu().clone()[None]
    overrides = {"generate.height": args.size, "generate.width": args.size, "generate.num_inference_steps": args.steps,
                 "generate.batch_size": args.batch, "device": device, "classes": str(CLASS)}
    config = load_config(overrides=overrides)
    batch = batch_size_for(pipe, config.generate)
    images = args.images or 3 * batch + 1
    per_shard = args.per_shard or max(1, images // 2)
    shards = tuple(ShardTask(shard_id=i, method="dct", class_index=CLASS, chunk=i, start=lo,
                             stop=min(lo + per_shard, images)) for i, lo in enumerate(range(0, images, per_shard)))
    job = ClassJob(class_index=CLASS, name=LABEL, token=token, shards=shards)
    config = load_config(overrides={**overrides, "generate.batch_size": batch, "shards.samples_per_shard": per_shard})

    # 2. The variants
    def worker(**kw) -> ClassWorker:
        cfg = to_dict(load_config(overrides={**overrides, "generate.batch_size": batch,
                                              "shards.samples_per_shard": per_shard, **kw.pop("set", {})}))
        return ClassWorker(cfg, str(tmp / "unused"), [LABEL], [CLASS], models={"pipe": pipe, "guide": guide}, **kw)

    workers = {"build": worker(), "build, writes in line": worker(overlap_writes=False)}
    if args.compile:
        workers["build, compiled UNet"] = worker(set={"generate.compile": True})
    prompt = render_prompt(config.generate.prompt, LABEL, token)

    def bare() -> dict:
        for task in shards:
            lo = task.start
            for n in batch_sizes(task.start, task.stop, batch):
                generators = [torch.Generator(device="cpu").manual_seed(image_seed(config.generate.seed, CLASS, i))
                              for i in range(lo, lo + n)]
                pipe(prompt=[prompt] * n, generator=generators, num_inference_steps=args.steps,
                     guidance_scale=config.generate.guidance_scale, height=args.size, width=args.size,
                     output_type="pil")
                lo += n
        return {}

    def build(w: ClassWorker, run: int) -> dict:
        w.out = tmp / f"out-{run}"
        save_tokens({token: embedding}, w.out / "tokens" / f"{CLASS:03d}.safetensors")
        result = w.run(job)
        assert result["images"] == images, result
        return result

    variants = {"bare": lambda run: bare(), **{name: (lambda run, w=w: build(w, run)) for name, w in workers.items()}}
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    extra: dict[str, list[dict]] = {n: [] for n in names}
    peaks: dict[str, int] = dict.fromkeys(names, 0)
    compile_seconds, run = 0.0, 0
    for rep in range(args.repeats + 1):  # round 0 warms up (and compiles), untimed
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            run += 1
            guide_timer.seconds = 0.0
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                result = variants[name](run)
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
            compile_seconds += result.get("compile_seconds", 0.0)
            if rep == 0:
                continue
            times[name].append(seconds - result.get("compile_seconds", 0.0))
            extra[name].append({**result, "guide_seconds": guide_timer.seconds})
            peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() if cuda else rss.peak)
            print(f"repeat {rep} {name}: {seconds:.2f} s", flush=True)

    # 3. Report
    ratios = {n: statistics.median(t / b for t, b in zip(times[n], times["bare"])) for n in names}
    rows = [("| path | s / image | images / s | ratio to bare (per repeat) | peak memory | encode + write s / image | "
             "of it waited | guide s / image |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n in names:
        per = statistics.median(times[n]) / images
        def cell(key: str, e: list[dict] = extra[n]) -> str:
            return f"{statistics.median(x[key] for x in e) / images:.4f}" if key in e[0] else "-"

        each = ", ".join(f"{t / b:.3f}" for t, b in zip(times[n], times["bare"]))
        rows.append(f"| {n} | {per:.3f} | {1 / per:.2f} | **{ratios[n]:.3f}** ({each}) | {peaks[n] / 2**30:.2f} GiB | "
                    f"{cell('write_seconds')} | {cell('write_wait_seconds')} | {cell('guide_seconds')} |")
    machine = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} CPU, " \
                                                         f"{torch.get_num_threads()} torch thread(s)"
    notes = [
        (f"{date.today()}, {machine}, torch {torch.__version__}: {args.layout} layout with random weights at "
         f"{args.size} px, {args.steps} steps ({type(pipe.scheduler).__name__}), guidance "
         f"{config.generate.guidance_scale}, {str(dtype).replace('torch.', '')}, batch {batch} "
         f"({'from free memory' if args.batch == 'auto' else 'as set'}); {images} images in {len(shards)} shards "
         f"per run, {args.repeats} interleaved repeats after a warm-up round; medians. Guide: ViT-B/16 (224 px)."),
        (f"`bare` took {min(times['bare']):.1f} to {max(times['bare']):.1f} s per run over the repeats (the load "
         f"of the machine: {os.getloadavg()[0]:.1f} at the end); the per-repeat ratios compare runs made back to back."),
        ("`bare` makes the same images from the same seeds and batches and keeps them as PIL images; the `build` "
         "paths also score them with the guide, PNG-encode them and write tar, parquet and stats files. "
         "Ratio: the median over repeats of (path time / bare time of the same repeat)."),
        ("`encode + write`: time in PNG encoding and shard writing (on the writer thread for `build`); `of it "
         "waited`: the part the generating thread waited for it (a full queue, a shard's end, the final flush)."),
    ]
    one, median_delay, max_delay = encode_while_generating()
    notes.append(f"PNG encoding of one 512 px noise image takes {one * 1e3:.0f} ms here; while another thread encodes "
                 f"such images, a 1 ms sleep on the generating thread takes {median_delay * 1e3:.1f} ms (median), "
                 f"{max_delay * 1e3:.1f} ms at most: Pillow releases the GIL while it compresses, so the generating "
                 "thread keeps launching GPU work (on CUDA the worker encodes on up to 4 threads).")
    if args.compile:
        notes.append(f"`generate.compile`: the UNet's compile for batch sizes "
                     f"{sorted(set(batch_sizes(0, per_shard, batch)), reverse=True)} took {compile_seconds:.1f} s "
                     f"(once per worker, excluded from the row above).")
    publish(SECTION, rows, notes, command_line(), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
