"""Cost model: where the time of a token update and of an image goes, in FLOPs, and how fast this device runs it.

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on the meta device, so the exact SD-1.5 / SD-2.1
architectures (`synthaug.testing.sd_configs`) and the ``vesteinn/vit-mae-cub`` guide architecture cost no memory and
no time to count at 512 px. Each component is counted once per image: the UNet (forward; forward + backward to its
inputs, weights frozen), the VAE decoder, the guide, the text encoder. The per-image and per-update totals are then
composed from a config's settings exactly as `synthaug.generation.generate` and `synthaug.tokens.dct.learn_dct_token`
call the components (classifier-free guidance doubles the UNet batch; ``grad_steps`` calls carry gradient; the x0
loss decodes and classifies every earlier step's predicted image; validation samples ``val_batch_size`` images every
``val_every`` updates; checkpointing recomputes each gradient-carrying forward once).

With ``--time-size`` it also times one image and one update of the random-weight SD-scale world at that size on this
device, and prints the FLOP rate reached against a large matmul's rate on the same device (the practical peak).

Usage (writes the "Cost model" section of BENCHMARKS.md with --write):

    nice -n 15 .venv/bin/python scripts/bench/cost.py --time-size 64 --write
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from _report import command_line, publish
from torch.utils.flop_counter import FlopCounterMode

from synthaug.classifier import load_classifier
from synthaug.config import PRESETS, DCTConfig, GenerateConfig, load_config
from synthaug.testing import save_vit_guide, sd_configs, sd_pipeline
from synthaug.tokens import learn_dct_token

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SECTION = "## Cost model"
GUIDE_SIZE = 224  # ViT-B/16 guides (vit-mae-cub, vit-mae-inat21) classify at 224 px


@dataclass(frozen=True)
class Parts:
    """FLOPs of each component for one image (batch 1) at one image size."""

    unet_f: float
    unet_fb: float
    vae_f: float
    vae_fb: float
    guide_f: float
    guide_fb: float
    text_f: float
    text_fb: float


def _count(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def count_parts(layout: str, size: int) -> Parts:
    """FLOPs per image of every component of `layout` at `size` px, counted on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, ViTConfig, ViTForImageClassification

    c = sd_configs(layout, sample_size=size // 8)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(c["unet"]).requires_grad_(False)
        vae = AutoencoderKL.from_config(c["vae"]).requires_grad_(False)
        text = CLIPTextModel(CLIPTextConfig(**c["text_encoder"])).requires_grad_(False)
        guide = ViTForImageClassification(ViTConfig(image_size=GUIDE_SIZE, num_labels=200)).requires_grad_(False)
        latents = torch.randn(1, 4, size // 8, size // 8)
        cond = torch.randn(1, 77, c["text_encoder"]["hidden_size"])
        t = torch.tensor([500])
        ids = torch.zeros(1, 77, dtype=torch.long)
        pixels = torch.randn(1, 3, GUIDE_SIZE, GUIDE_SIZE)

    def unet_fb():
        x, h = latents.clone().requires_grad_(), cond.clone().requires_grad_()
        unet(x, t, encoder_hidden_states=h).sample.sum().backward()

    def vae_fb():
        x = latents.clone().requires_grad_()
        vae.decode(x).sample.sum().backward()

    def guide_fb():
        x = pixels.clone().requires_grad_()
        guide(pixel_values=x).logits.sum().backward()

    def text_fb():  # the gradient enters at the token embeddings (the class token's vector), as in DCT
        hook = text.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
        try:
            text(ids).last_hidden_state.sum().backward()
        finally:
            hook.remove()

    return Parts(
        unet_f=_count(lambda: unet(latents, t, encoder_hidden_states=cond)), unet_fb=_count(unet_fb),
        vae_f=_count(lambda: vae.decode(latents)), vae_fb=_count(vae_fb),
        guide_f=_count(lambda: guide(pixel_values=pixels)), guide_fb=_count(guide_fb),
        text_f=_count(lambda: text(ids)), text_fb=_count(text_fb),
    )


def image_flops(p: Parts, g: GenerateConfig) -> float:
    """One generated image: T UNet calls (x2 with classifier-free guidance), one decode, its share of the prompts
    (``batch_size`` None, chosen from free memory at run time, counts as 1: the upper bound of that share)."""
    cfg = 2 if g.guidance_scale > 1 else 1
    return g.num_inference_steps * cfg * p.unet_f + p.vae_f + cfg * p.text_f / max(g.batch_size or 1, 1)


def update_flops(p: Parts, d: DCTConfig, *, checkpointing: bool = False) -> dict[str, float]:
    """One token update of `learn_dct_token`, by part (validation amortised over `val_every` updates)."""
    cfg = 2 if d.guidance_scale > 1 else 1
    T, B, g = d.num_inference_steps, d.batch_size, min(d.grad_steps, d.num_inference_steps)
    copies = max(d.augment, 1)
    parts: dict[str, float] = {}
    if d.x0_weight > 0:  # every step builds a one-step graph; each earlier step also decodes and classifies its x0
        parts["unet"] = T * cfg * B * (p.unet_fb + (p.unet_f if checkpointing else 0))
        parts["x0 decode + guide"] = (T - g) * B * (p.vae_fb + copies * p.guide_fb)
    else:
        parts["unet"] = (T - g) * cfg * B * p.unet_f + g * cfg * B * (p.unet_fb + (p.unet_f if checkpointing else 0))
    parts["decode + guide"] = B * (p.vae_fb + (p.vae_f if checkpointing else 0) + copies * p.guide_fb)
    parts["text encoder"] = p.text_fb + (p.text_f if cfg == 2 else 0)
    if d.select == "val":
        v = d.val_batch_size
        parts["validation"] = (T * cfg * v * p.unet_f + v * (p.vae_f + p.guide_f) + p.text_f) / d.val_every
    return parts


def matmul_rate(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of an n x n matmul on `device`: the practical peak the model's rate is compared with."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n ** 3 * calls / (time.perf_counter() - start)


def time_world(layout: str, size: int, steps: int, device: str) -> tuple[float, float, Parts]:
    """Seconds for one generated image and one DCT update of the random SD-scale world at `size` px."""
    pipe = sd_pipeline(layout, sample_size=size // 8, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        guide = load_classifier(save_vit_guide(Path(tmp) / "guide", "mae-cub", num_classes=10), device=device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    pipe("a photo of a bird", num_inference_steps=1, height=size, width=size, generator=gen)  # warm-up
    start = time.perf_counter()
    pipe("a photo of a bird", num_inference_steps=steps, height=size, width=size, guidance_scale=7.0,
         generator=torch.Generator(device="cpu").manual_seed(1))
    image_s = time.perf_counter() - start
    cfg = DCTConfig(max_steps=1, batch_size=1, num_inference_steps=steps, height=size, width=size,
                    stop_all_correct=False, patience=0)
    start = time.perf_counter()
    learn_dct_token(pipe, guide, 3, "bird", cfg)
    update_s = time.perf_counter() - start
    return image_s, update_s, count_parts(layout, size)


def preset_configs(name: str):
    """The settings a name stands for: ``DATASET:PRESET`` (``cub:fast``, ``digits:fast``: the preset on that
    dataset), a preset alone (``paper``), or a dataset's default settings (``cub``, ``digits``)."""
    if ":" in name:
        dataset, preset = name.split(":", 1)
        return load_config(preset=preset, overrides={"dataset": dataset})
    return load_config(preset=name) if name in PRESETS else load_config(overrides={"dataset": name})


def unet_calls(cfg) -> tuple[int, float]:
    """UNet calls per image and per update (each on the classifier-free-guidance batch), as `generate` and
    `learn_dct_token` count them (``unet_evals`` in token files): T per image; T per update, plus the validation's
    T every ``val_every`` updates."""
    d = cfg.dct
    per_update = d.num_inference_steps + (d.num_inference_steps / d.val_every if d.select == "val" else 0)
    return cfg.generate.num_inference_steps, per_update


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layouts", default="sd15,sd21")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--presets", default="cub,cub:fast,digits,digits:fast",
                        help="comma-separated datasets (their default settings), presets, or DATASET:PRESET pairs")
    parser.add_argument("--time-size", type=int, default=0, help="also time the SD-scale world at this size (0: no)")
    parser.add_argument("--time-steps", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", action="store_true", help="write the Cost model section of BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    rows = [("| layout | preset | TFLOP / image | TFLOP / update | of which UNet | decode + guide | x0 | validation | "
            "UNet calls / image | UNet calls / update | updates at most |"),
            "| --- | --- | --- | --- | --- | --- | --- | --- | ---: | ---: | ---: |"]
    parts_by_layout = {}
    for layout in args.layouts.split(","):
        parts = parts_by_layout[layout] = count_parts(layout, args.size)
        for preset in args.presets.split(","):
            cfg = preset_configs(preset)
            d = replace(cfg.dct, height=args.size, width=args.size)
            up = update_flops(parts, d, checkpointing=d.checkpointing)
            rows.append(f"| {layout} | {preset} | {image_flops(parts, cfg.generate) / 1e12:.1f} | "
                        f"{sum(up.values()) / 1e12:.1f} | {up['unet'] / 1e12:.1f} | "
                        f"{up['decode + guide'] / 1e12:.2f} | {up.get('x0 decode + guide', 0) / 1e12:.1f} | "
                        f"{up.get('validation', 0) / 1e12:.1f} | {unet_calls(cfg)[0]} | {unet_calls(cfg)[1]:g} | "
                        f"{cfg.dct.max_steps} |")
    first = args.layouts.split(",")[0]
    p = parts_by_layout[first]
    notes = [
        (f"Per image at {args.size} px, batch 1 ({first}): UNet forward {p.unet_f / 1e9:.0f} GFLOP "
        f"(forward + backward to its inputs {p.unet_fb / 1e9:.0f}), VAE decode {p.vae_f / 1e9:.0f} "
        f"({p.vae_fb / 1e9:.0f}), guide ViT-B/16 at {GUIDE_SIZE} px {p.guide_f / 1e9:.1f} ({p.guide_fb / 1e9:.1f}), "
        f"text encoder {p.text_f / 1e9:.1f} ({p.text_fb / 1e9:.1f})."),
        ("An update's UNet share is the denoising chain of `batch_size` seeds with classifier-free guidance; the "
        "gradient-carrying calls cost forward + backward. A token costs this times its number of updates (at most "
        "`dct.max_steps`)."),
        ("Presets: `cub` and `digits` are those datasets' default settings (`cub` = the `paper` preset: PNDM, 50 "
         "steps); `:fast` adds the `fast` preset (DPM-Solver++ 2M; on SD 20 steps for the token and 25 for the "
         "images, on digits 5 and 5; the stopping rules unchanged). Every row is costed at the same image size "
         "(the digits rows: SD at the digits world's settings). FLOPs do not depend on the dtype: `fast` "
         "loads bf16 weights on CUDA like every preset (`dtype: auto`), which changes the time per FLOP, not the "
         "count. UNet calls: each on the classifier-free-guidance batch, as `unet_evals` in token files counts them."),
    ]
    if args.time_size:
        layout = args.layouts.split(",")[0]
        image_s, update_s, small = time_world(layout, args.time_size, args.time_steps, args.device)
        g = GenerateConfig(num_inference_steps=args.time_steps, guidance_scale=7.0, batch_size=1)
        d = DCTConfig(max_steps=1, batch_size=1, num_inference_steps=args.time_steps)
        img_f, upd_f = image_flops(small, g), sum(update_flops(small, d).values())
        peak = matmul_rate(torch.float32, args.device)
        notes.append(
            f"Timed on this machine ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"{args.device}, fp32) at {args.time_size} px, {args.time_steps} steps, CFG 7, batch 1: "
            f"{image_s:.2f} s/image ({img_f / image_s / 1e9:.1f} GFLOP/s), {update_s:.2f} s/update "
            f"({upd_f / update_s / 1e9:.1f} GFLOP/s, validation and bookkeeping included); a 2048^2 fp32 matmul runs "
            f"at {peak / 1e9:.1f} GFLOP/s, so generation reaches {img_f / image_s / peak:.0%} and the update "
            f"{upd_f / update_s / peak:.0%} of this device's practical peak.")
    notes.append("GPU rates (512 px, bf16, s/image, s/update, fraction of the H100's matmul rate): \"On one GPU\" and "
                 "\"A CUB build on one GPU\".")
    publish(SECTION, rows, notes, command_line(), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
