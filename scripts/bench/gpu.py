"""One command for a GPU: generation and token-update rates on the SD-scale world, before and after the fast path.

Run by ``scripts/bench/gpu.sh`` (which also finds the packages a bare GPU machine lacks). On the random-weight SD-1.5
layout (`synthaug.testing.sd_pipeline`; nothing is downloaded) at 512 px in bf16, with a random ViT-B/16 guide, it
measures in one process and prints one table, a row at a time as it goes and the whole table at the end:

- the machine: the GPU, torch, CUDA, diffusers, and a bf16 8192^3 matmul's rate (the card's practical peak);
- DCT token updates (``learn_dct_token``, stopping rules off) at the ``paper`` and ``fast`` presets: seconds per
  update (the median of the updates after the first, which autotunes) and ``torch.cuda.max_memory_allocated``
  (weights included), with NCHW weights (before) and channels-last ones (the default on CUDA);
- generation at 50 steps, CFG 7, batch 16 and 64, seconds per image: a stock ``pipe()`` call and synthaug's build
  path (`ClassWorker.run`: the guide's scores, PNG encoding, shard writing), NCHW eager (the old default) and
  channels-last with the compiled UNet (the default on CUDA), the compile time apart;
- many classes per batch of token updates (``dct.classes_per_batch`` 1, 4, auto): seconds per class-update at the
  paper preset, one full batch of classes (at most 16).

Rows run cheapest first; once ``--budget`` seconds have passed, the rest print as skipped, so the command ends within
8 minutes on an H100 even with a cold compile cache. ``--tiny`` runs every row on the tiny random world on the CPU
(16 px, 2 steps, batches 1 and 2, the compile with ``aot_eager``): a check that the code paths run, not a measurement.

    scripts/bench/gpu.sh            # on the GPU machine
    scripts/bench/gpu.sh --tiny     # anywhere, in under a minute
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # a copy of the repository runs without installing synthaug
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

GIB = 2**30
LABEL, CLASS = "bird", 0


@dataclass(frozen=True)
class Scale:
    """What one run measures at: the real scale on a GPU, or the tiny world that only checks the code paths run."""

    device: str
    dtype: torch.dtype
    size: int
    steps: int
    batches: tuple[int, ...]
    updates: int  # iterations of each token run; the first update's interval is dropped
    dct: dict = field(default_factory=dict)  # overrides of the presets' dct settings
    compile_options: dict = field(default_factory=dict)
    threads: int | None = None  # torch CPU threads (tiny: 1; two on contended cores made tiny UNet calls ~30x slower)


FULL = Scale("cuda", torch.bfloat16, 512, 50, (16, 64), updates=4)
TINY = Scale("cpu", torch.float32, 16, 2, (1, 2), updates=3,
             dct={"height": 16, "width": 16, "batch_size": 2, "num_inference_steps": 3},
             compile_options={"backend": "aot_eager"}, threads=1)


class Table:
    """Rows ``(what, value, memory, note)``, each printed as it is measured; `markdown` gives the whole table."""

    def __init__(self, budget: float, echo: Callable[[str], None] = print) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.started, self.budget, self.echo = time.perf_counter(), budget, echo

    def add(self, what: str, value: str, memory: str = "", note: str = "") -> None:
        self.rows.append((what, value, memory, note))
        self.echo(f"[{time.perf_counter() - self.started:5.0f} s] {what}: {value} {memory} {note}".rstrip())

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.started <= self.budget:
            return False
        self.add(what, "skipped", note=f"past the {self.budget:.0f} s budget")
        return True

    def markdown(self) -> str:
        lines = ["| what | value | max_memory_allocated | note |", "| --- | ---: | ---: | --- |"]
        return "\n".join(lines + [f"| {' | '.join(r)} |" for r in self.rows])


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(device: str, fn: Callable[[], object]) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------------------------
class TinyGuide(torch.nn.Module):
    """A 10-class conv guide for the tiny run (the full run uses the ViT-B/16 of the CUB guide's shape)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(4, 10))
        self.labels = [f"class {i}" for i in range(10)]
        self.requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def world(scale: Scale, tmp: Path):
    from synthaug.testing import sd_pipeline, tiny_pipeline

    if scale.device == "cpu":
        return tiny_pipeline(seed=0, sample_size=scale.size), TinyGuide()
    from synthaug.classifier import load_classifier
    from synthaug.testing import save_vit_guide

    pipe = sd_pipeline("sd15", sample_size=scale.size // 8, dtype=scale.dtype, device=scale.device)
    guide = load_classifier(save_vit_guide(tmp / "guide", "mae-cub", num_classes=200), device=scale.device)
    return pipe, guide


def machine(scale: Scale, table: Table) -> None:
    import diffusers
    import transformers

    versions = (f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
                f"{transformers.__version__}, Python {platform.python_version()}")
    if scale.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        table.add("machine", f"{props.name}, {props.total_memory / GIB:.0f} GiB", note=f"CUDA {torch.version.cuda}; "
                  f"{versions}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
        n, dtype = 8192, torch.bfloat16
    else:
        table.add("machine", f"{platform.machine()} CPU", note=f"{versions}; torch threads: {torch.get_num_threads()}")
        n, dtype = 512, torch.float32
    a = torch.randn(n, n, device=scale.device, dtype=dtype)
    b = torch.randn(n, n, device=scale.device, dtype=dtype)
    torch.matmul(a, b)
    reps = 20 if scale.device == "cuda" else 3
    seconds = _timed(scale.device, lambda: [torch.matmul(a, b) for _ in range(reps)]) / reps
    table.add(f"{str(dtype).removeprefix('torch.')} matmul {n}^3", f"{2 * n**3 / seconds / 1e12:.3g} TFLOP/s")


# --------------------------------------------------------------------------------------------------------------------
# Token updates
# --------------------------------------------------------------------------------------------------------------------
def preset_dct(preset: str, scale: Scale):
    """The preset's `DCTConfig` and scheduler (the generic values, not a dataset's variant), stopping rules off."""
    from synthaug.config import PRESETS, DCTConfig

    values = PRESETS[preset]
    dct = {k.removeprefix("dct."): tuple(v) if isinstance(v, list) else v for k, v in values.items()
           if k.startswith("dct.")}
    dct.update(scale.dct, max_steps=scale.updates, stop_all_correct=False, patience=0)
    return DCTConfig(**dct), values.get("scheduler")


def token_updates(pipe, guide, scale: Scale, table: Table) -> None:
    from synthaug.models import set_channels_last, set_scheduler
    from synthaug.tokens.dct import learn_dct_token

    shipped = pipe.scheduler
    for preset, nhwc, when in (("paper", False, "NCHW (before)"), ("paper", True, "channels-last (default)"),
                               ("fast", False, "NCHW (before)"), ("fast", True, "channels-last (default)")):
        what = f"DCT update, {preset} preset, {when}"
        if table.over_budget(what):
            continue
        config, scheduler = preset_dct(preset, scale)
        set_scheduler(pipe, scheduler)
        set_channels_last(pipe, nhwc)
        stamps: list[float] = []

        def stamp(entry, v, stamps: list[float] = stamps) -> None:
            _sync(scale.device)
            stamps.append(time.perf_counter())

        if scale.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        learn_dct_token(pipe, guide, CLASS, LABEL, config, callback=stamp)
        pipe.scheduler = shipped
        per_update = statistics.median(b - a for a, b in itertools.pairwise(stamps[1:]))
        memory = f"{torch.cuda.max_memory_allocated() / GIB:.2f} GiB" if scale.device == "cuda" else ""
        table.add(what, f"{per_update:.2f} s / update", memory,
                  f"batch {config.batch_size}, T = {config.num_inference_steps}, checkpointing "
                  f"{'on' if config.checkpointing else 'off'}; median of the {len(stamps) - 2} update(s) after the first")
    set_channels_last(pipe, False)


def classes_per_batch(pipe, guide, scale: Scale, table: Table) -> None:
    """Seconds per class-update at the paper preset with 1, 4 and `auto` classes in one denoising batch: one full
    batch of classes (at most `MAX_BENCH_CLASSES`), each running `scale.updates` updates, timed whole."""
    from synthaug.models import set_channels_last, set_scheduler
    from synthaug.tokens.dct_batch import DCTJob, classes_per_batch_for, learn_dct_tokens

    config, scheduler = preset_dct("paper", scale)
    shipped = pipe.scheduler
    set_scheduler(pipe, scheduler)
    set_channels_last(pipe, scale.device == "cuda")
    labels = list(getattr(guide, "labels", None) or [])
    for setting in ("1", "4", "auto"):
        what = f"DCT class-update, dct.classes_per_batch {setting}"
        if table.over_budget(what):
            continue
        chosen = classes_per_batch_for(pipe, guide, config, DCTJob(CLASS, LABEL), setting if setting == "auto"
                                       else int(setting))
        n = min(chosen, MAX_BENCH_CLASSES)
        jobs = [DCTJob(c, labels[c] if c < len(labels) else LABEL) for c in range(n)]
        if scale.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        results: list = []
        seconds = _timed(scale.device, lambda jobs=jobs, n=n, results=results: results.extend(
            learn_dct_tokens(pipe, guide, jobs, config, classes_per_batch=n)))
        updates = sum(r.updates for _, r in results)
        memory = f"{torch.cuda.max_memory_allocated() / GIB:.2f} GiB" if scale.device == "cuda" else ""
        table.add(what, f"{seconds / updates:.2f} s / class-update", memory,
                  f"{n} classes x batch {config.batch_size}{f' (auto chose {chosen})' if chosen != n else ''}, "
                  f"{updates} class-updates in {seconds:.1f}s, first included")
    pipe.scheduler = shipped
    set_channels_last(pipe, False)


# Classes the classes-per-batch rows run at most (an `auto` that fits more is measured at this many).
MAX_BENCH_CLASSES = 16


# --------------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------------
def generation(pipe, guide, scale: Scale, tmp: Path, table: Table) -> None:
    import synthaug.builder.images as images_module
    from synthaug.builder.plan import ClassJob, ShardTask
    from synthaug.builder.worker import ClassWorker
    from synthaug.config import load_config, to_dict
    from synthaug.generation import compile_cache_dir, image_seed
    from synthaug.models import set_channels_last
    from synthaug.tokens.io import save_tokens
    from synthaug.tokens.text import render_prompt, token_name

    token = token_name(CLASS)
    bird = pipe.tokenizer.encode("bird", add_special_tokens=False)[0]
    embedding = pipe.text_encoder.get_input_embeddings().weight[bird].detach().float().cpu().clone()[None]
    base = {"generate.height": scale.size, "generate.width": scale.size, "generate.num_inference_steps": scale.steps,
            "device": scale.device, "classes": str(CLASS)}
    prompt = render_prompt(load_config().generate.prompt, LABEL, token)
    cache = compile_cache_dir()
    cache_state = "warm" if os.path.isdir(cache) and os.listdir(cache) else "cold"

    def bare(batch: int, steps: int = scale.steps) -> None:
        generators = [torch.Generator().manual_seed(image_seed(0, CLASS, i)) for i in range(batch)]
        pipe(prompt=[prompt] * batch, generator=generators, num_inference_steps=steps, guidance_scale=7.0,
             height=scale.size, width=scale.size, output_type="pil")

    bare.pipe = pipe

    def build(batch: int, compiled: bool, run: str) -> dict:
        cfg = load_config(overrides={**base, "generate.batch_size": batch, "generate.compile": compiled,
                                     "shards.samples_per_shard": batch})
        out = tmp / f"out-{run}"
        save_tokens({token: embedding}, out / "tokens" / f"{CLASS:03d}.safetensors")
        worker = ClassWorker(to_dict(cfg), str(out), [LABEL], [CLASS], models={"pipe": pipe, "guide": guide})
        job = ClassJob(class_index=CLASS, name=LABEL, token=token, shards=(ShardTask(0, "dct", CLASS, 0, 0, batch),))
        _sync(scale.device)
        return worker.run(job)

    rows = ((False, False, "NCHW, eager (before)"), (True, True, "channels-last, compiled (default)"))
    original = images_module.compile_unet
    if scale.compile_options:  # the worker compiles with these (aot_eager on the tiny run)
        images_module.compile_unet = lambda *a, **k: original(*a, **{**scale.compile_options, **k})
    try:
        _generation_rows(rows, scale, table, bare, build, cache, cache_state)
    finally:
        images_module.compile_unet = original
        set_channels_last(pipe, False)


def _generation_rows(rows, scale: Scale, table: Table, bare, build, cache: str, cache_state: str) -> None:
    from synthaug.models import set_channels_last

    pipe = bare.pipe
    for nhwc, compiled, when in rows:
        set_channels_last(pipe, nhwc)
        for batch in scale.batches:
            if table.over_budget(f"generation, {when}, batch {batch}"):
                continue
            bare(batch, steps=2)  # the first call at a batch size picks its kernels: ~2x slower
            seconds = _timed(scale.device, lambda b=batch: bare(b))
            table.add(f"generation, bare pipe(), {'channels-last' if nhwc else 'NCHW'} eager, batch {batch}",
                      f"{seconds / batch:.3f} s / image")
            result = build(batch, compiled, f"{int(nhwc)}-{batch}")
            note = (f"compiled in {result['compile_seconds']:.0f} s ({cache_state} cache {cache})"
                    if compiled else "")
            table.add(f"generation, build, {when}, batch {batch}",
                      f"{result['generate_seconds'] / batch:.3f} s / image", note=note)


def main(argv: list[str] | None = None, echo: Callable[[str], None] = print) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny world on the CPU: the code paths, no numbers")
    parser.add_argument("--budget", type=float, default=420.0,
                        help="seconds after which the remaining rows print as skipped (default 420)")
    parser.add_argument("--batches", type=lambda s: tuple(int(b) for b in s.split(",")), default=None,
                        help="generation batch sizes, comma-separated (default 16,64; tiny: 1,2)")
    args = parser.parse_args(argv)
    scale = TINY if args.tiny else FULL
    if args.batches:
        scale = replace(scale, batches=args.batches)
    if scale.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on a GPU machine, or pass --tiny to check the code paths on the CPU")
    table = Table(args.budget, echo)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(scale.threads or threads)
        with tempfile.TemporaryDirectory(prefix="synthaug-gpu-bench-") as tmp:
            machine(scale, table)
            pipe, guide = world(scale, Path(tmp))
            token_updates(pipe, guide, scale, table)
            classes_per_batch(pipe, guide, scale, table)
            generation(pipe, guide, scale, Path(tmp), table)
    finally:
        torch.set_num_threads(threads)
    text = table.markdown()
    echo("\n" + text)
    return text


if __name__ == "__main__":
    main()
    raise SystemExit(0)
