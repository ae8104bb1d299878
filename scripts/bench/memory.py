"""Peak memory of one DCT update on the real Stable Diffusion layouts, counted without a GPU.

The command behind BENCHMARKS.md "Memory at 512 px". `learn_dct_token` runs unchanged on the SD-1.5 / SD-2.1
architectures (`synthaug.testing.sd_pipeline` layouts) and the MAE ViT-B/16 guide, for two iterations (measure, update,
measure), under a `TorchDispatchMode` that counts the bytes of every live tensor storage: each operator's outputs are
counted once per storage (views share it) from the moment they exist until Python frees them, rounded up to 512 bytes
as CUDA's caching allocator rounds a block. The peak of that count plus the weights is the peak the same tensors
occupy, i.e. what ``torch.cuda.max_memory_allocated`` reports for them.

``count`` runs it on fake tensors (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes and storages, no
data), so the full 512-px update costs seconds and no memory; ``.item()`` on a fake tensor answers 1 (the update is
not skipped; the stopping rules are off for the count). ``validate`` runs the same count on real CPU tensors at sizes
a CPU can afford and compares it with the process's measured peak RSS (VmHWM after resetting it, glibc set to return
freed memory at once); ``table`` prints the BENCHMARKS.md table.

    python scripts/bench/memory.py count --layout sd15 --size 512 --dtype bfloat16 --micro-batch 1 --checkpointing
    python scripts/bench/memory.py table
    python scripts/bench/memory.py validate

Not counted, and only a GPU can show: the CUDA context (~0.3-0.5 GiB, outside max_memory_allocated), cuDNN/cuBLAS
workspaces and the CUDA attention kernels' own temporaries (the count follows the CPU kernels' outputs; both store
the attention output and its log-sum-exp, not the attention matrix), and the caching allocator's fragmentation
(torch.cuda.max_memory_reserved).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from synthaug.classifier.base import Classifier, MeanPoolViT
from synthaug.config import PAPER_PROMPTS, DCTConfig
from synthaug.testing import sd_configs, sd_pipeline, sd_scheduler, vit_guide
from synthaug.tokens.dct import learn_dct_token

GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The guide's eval transform: vesteinn/vit-mae-cub reads 224-px images (ViTImageProcessor-style warp, mean/std 0.5)
GUIDE_DATA_CONFIG = {"input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.5, 0.5, 0.5),
                     "std": (0.5, 0.5, 0.5), "crop_pct": 1.0, "crop_mode": "squash"}


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensor storages that the code under it allocates and that are still alive.

    Storages that exist when the mode starts (the weights) are never counted; `answer_scalars` makes ``.item()``
    answer 1 (1.0, `answer_bool`), for fake tensors, which have no values.
    """

    def __init__(self, *, answer_scalars: bool = False, answer_bool: bool = True, round_to: int = 512):
        super().__init__()
        self.answer_scalars, self.answer_bool, self.round_to = answer_scalars, answer_bool, round_to
        self.live = self.peak = 0
        self._tracked: set[int] = set()
        self._ignored: set[int] = set()

    def ignore(self, tensors) -> None:
        for t in tensors:
            self._ignored.add(id(t.untyped_storage()))

    def _track(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (sparse, some wrappers)
            return
        key = id(storage)
        if key in self._tracked or key in self._ignored:
            return
        size = -(-storage.nbytes() // self.round_to) * self.round_to
        self._tracked.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._tracked.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.answer_scalars and func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            return self.answer_bool if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 1
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def build(layout: str, size: int, dtype: torch.dtype, num_classes: int = 200):
    """The pipeline (exact layout, `dtype`) and the MAE ViT-B/16 guide (fp32, as builds load it)."""
    pipe = sd_pipeline(layout, sample_size=size // 8, dtype=dtype)
    guide = Classifier(MeanPoolViT(vit_guide("mae-cub", num_classes)), data_config=GUIDE_DATA_CONFIG,
                       source="vit-mae:random", kind="vit-mae")
    return pipe, guide.requires_grad_(False).eval()


def build_fake(layout: str, size: int, dtype: torch.dtype, num_classes: int = 200):
    """`build` with fake weights: the same modules, built under FakeTensorMode (no memory, no init time)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from synthaug.models import clip_tokenizer

    configs = sd_configs(layout, sample_size=size // 8)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # created in `dtype`: fake parameters cannot be converted in place afterwards
    try:
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"], torch_dtype=dtype))
    finally:
        torch.set_default_dtype(default)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
                                   scheduler=sd_scheduler(layout), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    guide = Classifier(MeanPoolViT(vit_guide("mae-cub", num_classes)), data_config=GUIDE_DATA_CONFIG,
                       source="vit-mae:random", kind="vit-mae")
    return pipe, guide.requires_grad_(False).eval()


def dct_config(size: int, batch: int, steps: int, grad_steps: int, micro_batch: int | None,
               checkpointing: bool) -> DCTConfig:
    """The paper preset's update (two prompts, CFG 7), two iterations, the stopping rules off."""
    return DCTConfig(max_steps=2, batch_size=batch, num_inference_steps=steps, grad_steps=grad_steps,
                     guidance_scale=7.0, height=size, width=size, prompts=PAPER_PROMPTS, init_token="bird",
                     stop_all_correct=False, patience=0, micro_batch=micro_batch, checkpointing=checkpointing)


def weight_bytes(*modules: torch.nn.Module, round_to: int = 512) -> int:
    seen = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            seen[id(t.untyped_storage())] = -(-t.untyped_storage().nbytes() // round_to) * round_to
    return sum(seen.values())


def count(layout: str, size: int, dtype: str, batch: int, steps: int, grad_steps: int, micro_batch: int | None,
          checkpointing: bool, fake: bool = True) -> dict:
    """One paper-preset update's peak bytes: weights + the peak of the live tensors the update allocates."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch_dtype = DTYPES[dtype]
    config = dct_config(size, batch, steps, grad_steps, micro_batch, checkpointing)
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    started = time.perf_counter()
    if fake_mode is not None:
        # initialisers call .item(); "no" ends torch's truncated-normal rejection loop
        with fake_mode, LiveBytes(answer_scalars=True, answer_bool=False):
            pipe, guide = build_fake(layout, size, torch_dtype)
    else:
        pipe, guide = build(layout, size, torch_dtype)
    modules = (pipe.unet, pipe.vae, pipe.text_encoder, guide)
    weights = weight_bytes(*modules)
    counter = LiveBytes(answer_scalars=fake)
    counter.ignore([t for m in modules for t in [*m.parameters(), *m.buffers()]])
    gc.collect()
    with fake_mode if fake_mode is not None else _nothing(), counter:
        result = learn_dct_token(pipe, guide, 0, "Black footed Albatross", config)
    assert [h["updated"] for h in result.history] == [True, False], result.history
    return {"layout": layout, "size": size, "dtype": dtype, "batch": batch, "steps": steps, "grad_steps": grad_steps,
            "micro_batch": micro_batch, "checkpointing": checkpointing, "fake": fake, "weights_bytes": weights,
            "update_peak_bytes": counter.peak, "peak_bytes": weights + counter.peak,
            "peak_gib": round((weights + counter.peak) / GIB, 2), "seconds": round(time.perf_counter() - started, 1)}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------------------------------
# Validation against measured peak RSS
# --------------------------------------------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _RSSSampled(LiveBytes):
    """`LiveBytes` that also reads the process's RSS whenever the count has moved by 4 MiB: the smallest
    ``RSS - count`` seen is the memory the count does not cover (weights, interpreter, the previous run's leftovers
    that this one frees), so ``peak RSS - that`` is the peak the counted tensors caused."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.min_offset, self._last = float("inf"), -(2**40)

    def _track(self, t: torch.Tensor) -> None:
        super()._track(t)
        if abs(self.live - self._last) >= 4 * 2**20:
            self._last = self.live
            self.min_offset = min(self.min_offset, _rss_kib("VmRSS") * 1024 - self.live)


def measure(layout: str, size: int, batch: int, steps: int, micro_batch: int | None, checkpointing: bool) -> dict:
    """Real fp32 CPU run: the live-bytes count of the update (weights excluded) and the process's peak RSS (VmHWM,
    reset through /proc/self/clear_refs) less the RSS the count does not cover (`_RSSSampled`)."""
    torch.manual_seed(0)
    pipe, guide = build(layout, size, torch.float32)
    config = dct_config(size, batch, steps, 1, micro_batch, checkpointing)
    warm = dct_config(size, batch, steps, 1, micro_batch, checkpointing)
    learn_dct_token(pipe, guide, 0, "Black footed Albatross", warm)  # first-call allocations, lazy imports, oneDNN
    gc.collect()
    counter = _RSSSampled(round_to=1)
    counter.ignore([t for m in (pipe.unet, pipe.vae, pipe.text_encoder, guide) for t in [*m.parameters(), *m.buffers()]])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_kib("VmRSS") * 1024
    with counter:
        learn_dct_token(pipe, guide, 0, "Black footed Albatross", config)
    peak = _rss_kib("VmHWM") * 1024
    return {"counted_bytes": counter.peak, "rss_peak_delta_bytes": peak - min(before, counter.min_offset),
            "rss_over_before_bytes": peak - before}


def validate(args) -> list[dict]:
    rows = []
    for layout, size, micro, ckpt in [("sd15", 64, None, False), ("sd15", 128, None, False),
                                      ("sd15", 128, 1, False), ("sd15", 128, None, True), ("sd21", 128, None, False)]:
        fake = count(layout, size, "float32", args.batch, args.val_steps, 1, micro, ckpt, fake=True)
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
               "MALLOC_ARENA_MAX": "1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, __file__, "measure", "--layout", layout, "--size", str(size), "--batch",
               str(args.batch), "--steps", str(args.val_steps)] + (["--micro-batch", str(micro)] if micro else []) + (
            ["--checkpointing"] if ckpt else [])
        real = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        row = {"layout": layout, "size": size, "micro_batch": micro, "checkpointing": ckpt,
               "fake_count_mib": fake["update_peak_bytes"] / 2**20, "real_count_mib": real["counted_bytes"] / 2**20,
               "rss_mib": real["rss_peak_delta_bytes"] / 2**20}
        row["rss_over_count"] = row["rss_mib"] / row["real_count_mib"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    _print_table(["layout", "px", "micro_batch", "checkpointing", "counted, fake (MiB)", "counted, real (MiB)",
                  "peak RSS increase (MiB)", "RSS / count"],
                 [[r["layout"], r["size"], r["micro_batch"] or "batch", r["checkpointing"], f"{r['fake_count_mib']:.0f}",
                   f"{r['real_count_mib']:.0f}", f"{r['rss_mib']:.0f}", f"{r['rss_over_count']:.2f}"] for r in rows])
    return rows


# (layout, micro_batch, checkpointing, grad_steps, T). T = 50 where a row's fake run takes minutes; the micro-batch rows
# with grad_steps=1 run T = 5 (5x the UNet calls per micro-batched update): with grad_steps=1 the peak does not depend
# on T (sd15, whole batch: T = 3 and T = 50 differ by 0.2 MB, PNDM's stored model outputs).
TABLE = [
    ("sd15", None, False, 1, 50), ("sd15", None, True, 1, 50), ("sd15", 1, False, 1, 5), ("sd15", 1, True, 1, 5),
    ("sd15", None, False, 50, 50), ("sd15", None, True, 50, 50),
    ("sd21", None, False, 1, 50), ("sd21", None, True, 1, 50), ("sd21", 1, False, 1, 5), ("sd21", 1, True, 1, 5),
]


def table(args) -> None:
    rows = []
    for layout, micro, ckpt, grad_steps, steps in TABLE:
        r = count(layout, args.size, args.dtype, args.batch, steps, grad_steps, micro, ckpt)
        print(json.dumps(r), flush=True)
        rows.append(r)
    _print_table(["layout", "micro_batch", "checkpointing", "grad_steps", "T counted", "weights (GiB)", "peak (GiB)"],
                 [["SD-1.5" if r["layout"] == "sd15" else "SD-2.1-v", r["micro_batch"] or r["batch"],
                   "yes" if r["checkpointing"] else "no", r["grad_steps"], r["steps"], f"{r['weights_bytes'] / GIB:.2f}",
                   f"**{r['peak_gib']:.2f}**"] for r in rows])


def _print_table(header: list[str], rows: list[list]) -> None:
    """A markdown table, after a blank line."""
    print("\n| " + " | ".join(header) + " |\n|" + " --- |" * len(header))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["count", "table", "validate", "measure"])
    p.add_argument("--layout", default="sd15", choices=["sd15", "sd21"])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=5)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--val-steps", type=int, default=2, help="T of the real CPU runs of `validate`")
    p.add_argument("--grad-steps", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--checkpointing", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.what == "count":
        print(json.dumps(count(args.layout, args.size, args.dtype, args.batch, args.steps, args.grad_steps,
                               args.micro_batch, args.checkpointing)))
    elif args.what == "measure":
        print(json.dumps(measure(args.layout, args.size, args.batch, args.steps, args.micro_batch, args.checkpointing)))
    elif args.what == "table":
        table(args)
    else:
        args.batch = 2 if args.batch == 5 else args.batch
        validate(args)


if __name__ == "__main__":
    main()
