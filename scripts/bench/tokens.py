"""Benchmark: DCT token learning cost — gradient skipping (grad_steps=1) vs backprop through every denoising step.

On the random tiny pipeline (synthaug.models.tiny_pipeline) and a small random conv guide, at 32 px:

- seconds per training iteration (generate a batch, classify, backward, update), median over alternating rounds, in
  wall time and in this process's CPU time (the fairer clock on a shared machine);
- activation memory held for backward: the bytes of every distinct tensor autograd saves during one iteration's
  forward (torch.autograd.graph.saved_tensors_hooks; model weights excluded). Exact and device-independent: it is
  what backprop keeps alive at the peak, whatever the allocator does;
- UNet evaluations per iteration and per learned token.

Random weights learn nothing, so this measures cost, not quality. Usage (writes the "Token learning"
section of BENCHMARKS.md with --write):

    nice -n 15 .venv/bin/python scripts/bench/tokens.py --steps 20 --batch 4 --size 32 --write
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _report import command_line, publish
from torch import nn

from synthaug.config import DCTConfig
from synthaug.testing import tiny_pipeline
from synthaug.tokens.dct import learn_dct_token

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Token learning"


class Guide(nn.Module):
    """A small random conv classifier standing in for the guide (cost only)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
        self.labels, self.source, self.trained_on = [str(i) for i in range(10)], "bench-guide", "nothing"
        self.requires_grad_(False).eval()

    def forward(self, images):
        return self.net(images)


def config(args, grad_steps: int, max_steps: int) -> DCTConfig:
    return DCTConfig(max_steps=max_steps, batch_size=args.batch, num_inference_steps=args.steps, grad_steps=grad_steps,
                     height=args.size, width=args.size, stop_all_correct=False, patience=0, lr=1e-3)


def saved_bytes(pipe, guide, cfg: DCTConfig, checkpointing: bool) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in one iteration's forward (= held for backward)."""
    params = {p.untyped_storage().data_ptr() for m in (pipe.unet, pipe.vae, pipe.text_encoder, guide)
              for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    # max_steps=1: one forward with its graph, then the run stops before backward, so no storage is freed and
    # reused while counting (distinct pointers = distinct live tensors).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learn_dct_token(pipe, guide, 3, "three", dataclasses.replace(cfg, max_steps=1), checkpointing=checkpointing)
    return sum(seen.values())


def timed(pipe, guide, cfg: DCTConfig, checkpointing: bool) -> tuple[float, float, int, int]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = learn_dct_token(pipe, guide, 3, "three", cfg, checkpointing=checkpointing)
    return time.perf_counter() - wall, time.process_time() - cpu, result.steps, result.unet_evals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="denoising steps T during training")
    parser.add_argument("--batch", type=int, default=4, help="seeds per update")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--iterations", type=int, default=4, help="training iterations per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: no contention on 2 cores)")
    parser.add_argument("--write", action="store_true", help="replace the 'Token learning' section of BENCHMARKS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe, guide = tiny_pipeline(seed=0, sample_size=args.size), Guide()
    variants = [("gradient skipping (grad_steps=1)", 1, False),
                (f"full backprop (grad_steps={args.steps})", args.steps, False),
                ("gradient skipping + activation checkpointing", 1, True),
                (f"full backprop + activation checkpointing (grad_steps={args.steps})", args.steps, True)]
    learn_dct_token(pipe, guide, 3, "three", config(args, 1, 1))  # warm-up (first-call allocations, lazy imports)

    memory = {name: saved_bytes(pipe, guide, config(args, g, 1), ck) for name, g, ck in variants}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in variants}
    evals: dict[str, tuple[int, int]] = {}
    for _ in range(args.rounds):
        for name, g, ck in variants:
            wall, cpu, steps, unet = timed(pipe, guide, config(args, g, args.iterations), ck)
            times[name].append((wall / steps, cpu / steps))
            evals[name] = (steps, unet)

    # Checkpointing keeps only each UNet call's inputs; during backward it recomputes one call at a time, so its peak
    # is what it holds plus one call's activations — the difference between the two skipping variants.
    one_call = memory[variants[0][0]] - memory[variants[2][0]]
    rows = []
    for name, g, ck in variants:
        wall = statistics.median(t[0] for t in times[name])
        cpu = statistics.median(t[1] for t in times[name])
        steps, unet = evals[name]
        per_iteration = unet / steps + (g if ck else 0)  # checkpointing re-runs each gradient-carrying UNet call once
        peak = memory[name] + (one_call if ck else 0)
        rows.append((name, wall, cpu, memory[name], peak, per_iteration))
    base = rows[0][4]

    header = (f"Tiny random pipeline ({args.size} px, latents {args.size // 2} px), batch {args.batch}, CFG 7, "
              f"T = {args.steps} DDIM steps, {args.iterations} iterations x {args.rounds} rounds, "
              f"{args.threads} torch thread(s), torch {torch.__version__}, {platform.processor() or platform.machine()}"
              f", CPU.")
    table = [("| variant | s / iteration (wall) | s / iteration (CPU) | saved for backward | peak activations | "
              "vs skipping | UNet evals / iteration |"), "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, wall, cpu, mem, peak, unet in rows:
        table.append(f"| {name} | {wall:.2f} | {cpu:.2f} | {mem / 2**20:.1f} MiB | {peak / 2**20:.1f} MiB | "
                     f"{peak / base:.2f}x | {unet:g} |")
    skip, full, full_ck = rows[0], rows[1], rows[3]
    notes = [
        (f"Gradient skipping holds **{skip[4] / full[4]:.3f}x** the activation memory of full backprop at T = "
         f"{args.steps} (target <= 0.3x) and runs an iteration in {skip[2] / full[2]:.2f}x the CPU time."),
        (f"Activation checkpointing (`learn_dct_token(..., checkpointing=True)`) brings full backprop down to "
         f"{full_ck[4] / skip[4]:.2f}x the skipping peak at {full_ck[2] / skip[2]:.2f}x its CPU time: deeper "
         f"gradients (+9.2 judge points on an earlier digits world) become a time question, not a memory one. "
         f"Peak = saved + one recomputed UNet call ({one_call / 2**20:.1f} MiB here) for checkpointed variants."),
        ("UNet evaluations per learned token = T x iterations (each on the CFG batch of 2 x batch latents), plus "
         "grad_steps more per update with checkpointing: at the paper's T = 50 that is 350 for its average 7 "
         "iterations and 10,000 at the 200-iteration cap."),
        ("Saved-for-backward bytes are counted with `torch.autograd.graph.saved_tensors_hooks` over one iteration's "
         "forward (distinct storages, model weights excluded): exact, and the same on any device."),
    ]
    publish(SECTION, [header, "", *table], notes, command_line(argv), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
