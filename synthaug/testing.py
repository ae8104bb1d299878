"""Worlds for tests and benchmarks: tiny pipelines with the real wiring, and the real SD-1.5 / SD-2.1 layouts and ViT guides with random weights.

Mechanics, memory and speed only: the tiny SD pipeline, tiny timm guide and tiny build overrides; the exact SD-1.5
and SD-2.1-v architectures (`sd_pipeline`, `sd_configs`) and ViT-B/16 guides (`vit_guide`: the ``vit-mae-cub``
mean-pooled head, or a plain ViT).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .datasets.digits import DIGIT_NAMES
from .models import clip_tokenizer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline


# --------------------------------------------------------------------------------------------------------------------
# Tiny models for tests (random weights: mechanics only; nothing learns with them)
# --------------------------------------------------------------------------------------------------------------------
def tiny_pipeline(seed: int = 0, *, sample_size: int = 32, hidden_size: int = 32) -> StableDiffusionPipeline:
    """A random-weight Stable Diffusion pipeline built from configs, in the manner of diffusers' tests.

    UNet (32, 64) channels with cross-attention, a two-block VAE (latents at half resolution), a 2-layer CLIP text
    encoder over the real CLIP tokenizer, DDIM with SD's schedule. ~0.1 s per 10-step batch of 4 at 32 px on a CPU.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size // 2, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden_size, norm_num_groups=32, attention_head_dim=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=sample_size,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=hidden_size, intermediate_size=37,
        layer_norm_eps=1e-5, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tokenizer),
        max_position_embeddings=77, projection_dim=hidden_size,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.synthaug_model_id = f"tiny-{seed}"
    return pipe


def save_tiny_world(root: Path, num_classes: int = 10) -> tuple[Path, Path]:
    """Write ``root/model`` (tiny SD pipeline, save_pretrained) and ``root/guide`` (tiny timm model, hub format)."""
    import timm
    from timm.models import save_for_hf

    model = root / "model"
    if not (model / "model_index.json").is_file():
        tiny_pipeline(seed=0).save_pretrained(model)
    guide = root / f"guide{num_classes}"
    if not (guide / "config.json").is_file():
        torch.manual_seed(0)
        net = timm.create_model("test_efficientnet", num_classes=num_classes)
        labels = list(DIGIT_NAMES[:num_classes]) if num_classes <= 10 else [f"c{i}" for i in range(num_classes)]
        save_for_hf(net, str(guide), model_config={"label_names": labels, "trained_on": "nothing (random weights)"},
                    data_config={"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bilinear"},
                    safe_serialization=True)
    return model, guide


def tiny_build_overrides(out: Path, model: Path, guide: Path, **extra) -> dict:
    """Config overrides of a tiny build: 3 digit classes, 4 images each + the baseline, 2 images per shard."""
    base = {
        "dataset": "digits", "model": str(model), "guide": str(guide), "out": str(out), "classes": "0-2",
        "per_class": 4, "baseline": True, "device": "cpu", "dtype": "float32",
        "dct.height": 32, "dct.width": 32, "dct.num_inference_steps": 2, "dct.max_steps": 2, "dct.batch_size": 2,
        "dct.lr": 1e-3,
        "generate.height": 32, "generate.width": 32, "generate.num_inference_steps": 2, "generate.batch_size": 2,
        "shards.samples_per_shard": 2, "run.executor": "local", "run.cpus_per_worker": 1, "run.max_retries": 2,
    }
    base.update(extra)
    return base


# --------------------------------------------------------------------------------------------------------------------
# The real Stable Diffusion layouts, random weights (mechanics, dtypes, memory and speed; never accuracy)
# --------------------------------------------------------------------------------------------------------------------
SD_LAYOUTS = ("sd15", "sd21")

# The architectures of the hub repos' unet/, vae/ and text_encoder/ config.json and scheduler/scheduler_config.json:
# sd15 = stable-diffusion-v1-5 (CLIP ViT-L/14 text tower, PNDM as shipped), sd21 = stable-diffusion-2-1 (OpenCLIP
# ViT-H/14 text tower with its last layer dropped, per-block heads, linear projections, upcast attention, DDIM with
# v-prediction as shipped).
_UNET_COMMON = {
    "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "out_channels": 4,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5, "norm_num_groups": 32,
}
_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512], "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32,
}
_SCHEDULER_COMMON = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                     "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                     "steps_offset": 1, "trained_betas": None}
_LAYOUTS = {
    "sd15": {
        "unet": {**_UNET_COMMON, "attention_head_dim": 8, "cross_attention_dim": 768, "sample_size": 64},
        "vae": {**_VAE, "sample_size": 512},
        "text_encoder": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                         "num_hidden_layers": 12, "projection_dim": 768, "hidden_act": "quick_gelu"},
        "scheduler": ("PNDMScheduler", {**_SCHEDULER_COMMON}),
        "pad_token": None,  # pads with the end-of-text token
    },
    "sd21": {
        "unet": {**_UNET_COMMON, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
                 "sample_size": 96, "use_linear_projection": True, "upcast_attention": True},
        "vae": {**_VAE, "sample_size": 768},
        "text_encoder": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                         "num_hidden_layers": 23, "projection_dim": 512, "hidden_act": "gelu"},
        "scheduler": ("DDIMScheduler", {**_SCHEDULER_COMMON, "prediction_type": "v_prediction"}),
        "pad_token": "!",
    },
}
_TEXT_COMMON = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "bos_token_id": 0,
                "eos_token_id": 2, "pad_token_id": 1, "attention_dropout": 0.0, "dropout": 0.0}


def _layout(layout: str) -> dict:
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(SD_LAYOUTS)} but is {layout!r}")
    return _LAYOUTS[layout]


def sd_configs(layout: str = "sd15", *, sample_size: int | None = None) -> dict[str, dict]:
    """The ``unet``, ``vae`` and ``text_encoder`` config dicts of a Stable Diffusion layout (``"sd15"``, ``"sd21"``).

    ``UNet2DConditionModel.from_config(c["unet"])``, ``AutoencoderKL.from_config(c["vae"])``,
    ``CLIPTextModel(CLIPTextConfig(**c["text_encoder"]))``; under ``torch.device("meta")`` they cost no memory.
    `sample_size` overrides the UNet's (latent side; the pipeline's default image side is 8x it).
    """
    spec = _layout(layout)
    unet = dict(spec["unet"])
    if sample_size is not None:
        unet["sample_size"] = sample_size
    return {"unet": unet, "vae": dict(spec["vae"]), "text_encoder": {**_TEXT_COMMON, **spec["text_encoder"]}}


def sd_scheduler(layout: str = "sd15"):
    """The scheduler the layout's repo ships (SD-1.5: PNDM; SD-2.1: DDIM with v-prediction)."""
    import diffusers

    name, config = _layout(layout)["scheduler"]
    return getattr(diffusers, name).from_config(config)


def sd_pipeline(layout: str = "sd15", *, sample_size: int = 64, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", seed: int = 0, scheduler=None) -> StableDiffusionPipeline:
    """A `StableDiffusionPipeline` with the exact SD-1.5 or SD-2.1 (v-prediction) architecture and random weights.

    Nothing is downloaded: the modules are built from `sd_configs`, the tokenizer is the real CLIP BPE
    (`clip_tokenizer`; SD-2.1's pads with "!"), the scheduler is the one the repo ships unless `scheduler` is given.
    Weights are drawn fast and reproducibly from `seed` (uniform, std 1/sqrt(fan-in); norms 1, biases 0), so
    activations keep a sane scale through 16-bit dtypes. Mechanics, dtypes, memory and speed only: random weights
    say nothing about accuracy. ~1.1e9 (SD-1.5) / ~1.3e9 (SD-2.1) parameters: 4-5 GB in fp32.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = sd_configs(layout, sample_size=sample_size)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    generator = torch.Generator().manual_seed(seed)
    for module in (unet, vae, text_encoder):
        _random_init(module, generator, dtype)
    tokenizer = clip_tokenizer()
    if _layout(layout)["pad_token"] is not None:
        tokenizer.pad_token = _layout(layout)["pad_token"]
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler if scheduler is not None else sd_scheduler(layout),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(device)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.synthaug_model_id = f"random-{layout}-{seed}"
    return pipe


def _random_init(module: torch.nn.Module, generator: torch.Generator, dtype: torch.dtype) -> None:
    """Materialise a meta-device module on the CPU with reproducible random weights (see `sd_pipeline`)."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                bound = 3 ** 0.5 * p[0].numel() ** -0.5  # uniform with std 1/sqrt(fan-in): cheaper than normal
                p.uniform_(-bound, bound, generator=generator)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        for name, b in module.named_buffers():
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1]).expand_as(b))
            else:
                raise AssertionError(f"unexpected buffer {name} in {type(module).__name__}")
    if dtype != torch.float32:
        module.to(dtype)


def vit_guide(kind: str = "mae-cub", num_classes: int = 200, *, seed: int = 0, labels: list[str] | None = None):
    """A transformers ViT-B/16 (224 px, patch 16, 12 x 768) image classifier with random weights.

    ``kind="mae-cub"``: the ``vesteinn/vit-mae-cub`` architecture, whose head reads mean-pooled patch tokens (load it
    with the ``vit-mae:`` prefix, see `synthaug.classifier.base.MeanPoolViT`); ``"vit"``: a plain
    `ViTForImageClassification` (CLS token). `labels`: the class names (``id2label``); default ``class 000``...
    Save with `save_vit_guide` and load with `load_classifier`.
    """
    from transformers import ViTConfig, ViTForImageClassification

    if kind not in ("mae-cub", "vit"):
        raise ValueError(f"kind must be 'mae-cub' or 'vit' but is {kind!r}")
    labels = labels if labels is not None else [f"class {i:03d}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ValueError(f"{len(labels)} labels for {num_classes} classes")
    torch.manual_seed(seed)
    config = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, num_labels=num_classes, id2label=dict(enumerate(labels)),
                       label2id={name: i for i, name in enumerate(labels)})
    return ViTForImageClassification(config).eval()


def save_vit_guide(root: Path, kind: str = "mae-cub", num_classes: int = 200, labels: list[str] | None = None) -> str:
    """Write `vit_guide` and its image processor (ViTImageProcessor defaults: 224 px) to ``root/vit-{kind}``; return
    the `load_classifier` source (``"vit-mae:DIR"`` for the MAE layout, the directory itself for the plain ViT)."""
    from transformers import ViTImageProcessor

    out = Path(root) / f"vit-{kind}-{num_classes}"
    if not (out / "config.json").is_file():
        vit_guide(kind, num_classes, labels=labels).save_pretrained(out)
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(out)
    return f"vit-mae:{out}" if kind == "mae-cub" else str(out)
