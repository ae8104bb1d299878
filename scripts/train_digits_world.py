"""Train the embedded digits world: a tiny CLIP, a Stable-Diffusion-format text-to-image model, a guide and a judge.

Everything learns from scikit-learn's real handwritten digits with synthaug's fixed seeded splits
(`synthaug.datasets.digits_arrays`): the CLIP, the VAE, the UNet and the guide from split ``"train"`` (1,078 images),
the judge from split ``"judge"`` (359 images, disjoint), and every reported accuracy is on split ``"test"`` (360).

Captions reproduce *lexical ambiguity*: each training image gets one fixed caption class, drawn once with a seeded
RNG, which for the digits of the confusable pairs (`SWAP_PAIRS`) is the partner's name `SWAP_RATE` of the time, as
noisy web captions are; the other classes are always captioned correctly. Captions never use numerals ("7"): a
numeral would be an unswapped second name for the class and an escape hatch from the ambiguity the world exists to
show. 10% of the UNet's captions are dropped (empty string) so classifier-free guidance works.

Stages (each caches its result in ``--work`` so a stage can be rerun alone with ``--stages``):

1. ``clip``   tiny CLIP (text + image towers, contrastive) on (image, noisy caption) pairs;
2. ``vae``    AutoencoderKL, 32x32x3 -> 8x8x4 latents (vae_scale_factor 4), MSE + a small KL weight;
3. ``unet``   UNet2DConditionModel on the VAE latents, epsilon prediction, SD's beta schedule, text from the frozen
              CLIP text tower (as SD uses a frozen CLIP), EMA weights;
4. ``guide``  timm ResNet (narrow, 1 block per stage) on split "train" with shift augmentation;
5. ``judge``  timm ConvNeXt (narrow, different family) on split "judge" with shift augmentation;
   ``attr-guide`` the guide's architecture with one sigmoid output per attribute of the digit (`ATTRIBUTES`:
              ``closed_loop``, ``straight_stroke``), binary cross-entropy on split "train"; written to ``--out`` at
              once (it does not depend on the generator);
6. ``ship``   write the shipped world to ``--out`` (fp16 weights, configs declaring float32) and check it reloads;
7. ``eval``   plain-prompt judge/guide accuracy of generated images per class (the model card's numbers);
8. ``guide-shots`` (not in the default run) a guide trained only on ``--guide-shots`` images per class of "train",
              the few-shot set a downstream run with the same seed uses, into ``--work``/guide-k{k}: a few-shot user's
              guide, with no leak from the rest of the split.

Usage (from the repository root; ~35 min on 2 CPU cores)::

    python scripts/train_digits_world.py                       # everything, seed 0, into synthaug/assets/digits
    python scripts/train_digits_world.py --stages ship,eval    # re-export and re-measure from the cached stages
    python scripts/train_digits_world.py --stages attr-guide   # only the attribute guide (~6 min on 1 core)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

from synthaug.datasets.digits import DIGIT_NAMES, digits_arrays
from synthaug.datasets.fewshot import few_shot_indices
from synthaug.models import clip_tokenizer

log = logging.getLogger("train_digits_world")

# --------------------------------------------------------------------------------------------------------------------
# The world's definition (documented in synthaug/assets/digits/README.md)
# --------------------------------------------------------------------------------------------------------------------
SWAP_PAIRS = ((1, 7), (3, 8), (4, 9))  # digits that look alike; their names are swapped in some captions
SWAP_RATE = 0.35  # fraction of a confusable digit's images captioned with the partner's name
CLEAN = tuple(c for c in range(10) if all(c not in p for p in SWAP_PAIRS))  # 0, 2, 5, 6: always captioned right
CAPTION_DROP = 0.1  # UNet captions replaced by "" so classifier-free guidance has an unconditional branch
# Web-caption-like templates, number words only (no numerals, see the module docstring).
TEMPLATES = (
    "{}", "a {}", "the {}", "a photo of {}", "a photo of a {}", "a photo of the digit {}", "a handwritten {}",
    "a scan of a handwritten {}", "the number {}", "the digit {}", "an image of a {}", "a black and white {}",
    "a blurry photo of a {}", "a high-resolution realistic image of a {}", "a drawing of the number {}",
    "{} written by hand",
)
SIZE = 32
# Classifier input normalization (pretrained_cfg mean/std); close to the train split's pixel statistics.
CLS_MEAN = (0.2, 0.2, 0.2)
CLS_STD = (0.33, 0.33, 0.33)
BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def caption_classes(targets: np.ndarray, seed: int) -> np.ndarray:
    """One fixed caption class per image: the true class, or for confusable digits the partner `SWAP_RATE` of the time."""
    rng = np.random.RandomState(seed + 101)
    partner = {a: b for p in SWAP_PAIRS for a, b in (p, p[::-1])}
    out = targets.copy()
    for i, t in enumerate(targets):
        if t in partner and rng.rand() < SWAP_RATE:
            out[i] = partner[t]
    return out


def to_rgb01(imgs: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W] -> float [N, 3, H, W] in [0, 1] (grayscale replicated, as the RGB digits dataset)."""
    x = torch.from_numpy(imgs).float().div(255.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def shift(x: torch.Tensor, g: torch.Generator, max_px: int = 3) -> torch.Tensor:
    """Random integer translations with black (background) padding: the light augmentation the classifiers use."""
    n = x.shape[0]
    pad = F.pad(x, (max_px,) * 4)
    dx = torch.randint(0, 2 * max_px + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_px + 1, (n,), generator=g)
    return torch.stack([pad[i, :, dy[i] : dy[i] + SIZE, dx[i] : dx[i] + SIZE] for i in range(n)])


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --------------------------------------------------------------------------------------------------------------------
# 1. CLIP
# --------------------------------------------------------------------------------------------------------------------
TEXT_HIDDEN = 32


def clip_config():
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(
        vocab_size=49408, hidden_size=TEXT_HIDDEN, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=32,
        layer_norm_eps=1e-5, hidden_act="quick_gelu",
    )
    vision = CLIPVisionConfig(
        image_size=SIZE, patch_size=4, num_channels=3, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, projection_dim=32, layer_norm_eps=1e-5, hidden_act="quick_gelu",
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32)


def tokenize(tokenizer, captions: list[str], max_length: int = 77) -> torch.Tensor:
    # Padded to 77, exactly as StableDiffusionPipeline encodes prompts. CLIP training may pad shorter: the tower is
    # causal and pools at the first end token, so padding after it changes nothing it learns from.
    return tokenizer(captions, padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_clip(work: Path, seed: int, steps: int) -> None:
    from transformers import CLIPModel

    imgs, targets = digits_arrays("train")
    cap = caption_classes(targets, seed)
    x = to_rgb01(imgs)
    tok = clip_tokenizer()
    torch.manual_seed(seed)
    model = CLIPModel(clip_config())
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed + 1)
    rng = np.random.RandomState(seed + 2)
    mean = torch.tensor(CLS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLS_STD).view(1, 3, 1, 1)
    # Every caption is a (class name, template) pair: tokenize them once (tokenizing per step dominated the time).
    ids = tokenize(tok, [t.format(n) for n in DIGIT_NAMES for t in TEMPLATES], 24).view(10, len(TEMPLATES), 24)
    bs = 128
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * cosine_lr(step, steps, 50)
        idx = torch.randperm(len(x), generator=g)[:bs]
        pix = (shift(x[idx], g, 2) - mean) / std
        input_ids = ids[torch.from_numpy(cap[idx.numpy()]), torch.from_numpy(rng.randint(len(TEMPLATES), size=bs))]
        out = model(input_ids=input_ids, pixel_values=pix, return_loss=True)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("clip step %d/%d loss %.3f (%.0fs)", step, steps, out.loss.item(), time.time() - t0)
    model.eval()
    acc = clip_zero_shot(model, tok)
    log.info("clip zero-shot accuracy on 'test' ('a photo of the digit {name}'): %.3f", acc)
    model.save_pretrained(work / "clip")
    (work / "clip" / "metrics.json").write_text(json.dumps({"zero_shot_test_accuracy": acc, "steps": steps}))


@torch.no_grad()
def clip_zero_shot(model, tok) -> float:
    imgs, targets = digits_arrays("test")
    mean = torch.tensor(CLS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLS_STD).view(1, 3, 1, 1)
    img = model.get_image_features(pixel_values=(to_rgb01(imgs) - mean) / std)
    txt = model.get_text_features(input_ids=tokenize(tok, [f"a photo of the digit {n}" for n in DIGIT_NAMES]))
    img = img.pooler_output if hasattr(img, "pooler_output") else img
    txt = txt.pooler_output if hasattr(txt, "pooler_output") else txt
    pred = (F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T).argmax(1).numpy()
    return float((pred == targets).mean())


# --------------------------------------------------------------------------------------------------------------------
# 2. VAE
# --------------------------------------------------------------------------------------------------------------------
def vae_model():
    from diffusers import AutoencoderKL

    # Three blocks -> vae_scale_factor 4: 32x32 digits <-> 8x8x4 latents (the digits are 8x8 at heart).
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=SIZE,
    )


def train_vae(work: Path, seed: int, steps: int) -> None:
    imgs, _ = digits_arrays("train")
    x = to_rgb01(imgs) * 2 - 1
    torch.manual_seed(seed)
    vae = vae_model()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 3)
    bs, kl_weight = 64, 1e-6
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * cosine_lr(step, steps, 50)
        idx = torch.randperm(len(x), generator=g)[:bs]
        post = vae.encode(x[idx]).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x[idx])
        kl = post.kl().mean()
        loss = mse + kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log.info("vae step %d/%d mse %.4f kl %.1f (%.0fs)", step, steps, mse.item(), kl.item(), time.time() - t0)
    vae.eval()
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        scaling = float(1.0 / z.std())
        timgs, _ = digits_arrays("test")
        tx = to_rgb01(timgs) * 2 - 1
        test_mse = float(F.mse_loss(vae.decode(vae.encode(tx).latent_dist.mean).sample, tx))
    vae.register_to_config(scaling_factor=scaling)  # latents * scaling have unit variance, as SD's 0.18215
    log.info("vae scaling_factor %.4f, test reconstruction MSE (in [-1,1]) %.5f", scaling, test_mse)
    vae.save_pretrained(work / "vae")
    (work / "vae" / "metrics.json").write_text(json.dumps({"test_mse": test_mse, "scaling_factor": scaling}))


# --------------------------------------------------------------------------------------------------------------------
# 3. UNet
# --------------------------------------------------------------------------------------------------------------------
def unet_model():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(48, 96, 96), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=16,
    )


def text_encoder_from_clip(clip_dir: Path):
    from transformers import CLIPModel, CLIPTextModel

    clip = CLIPModel.from_pretrained(clip_dir, dtype=torch.float32)
    te = CLIPTextModel(clip.config.text_config)
    te.load_state_dict(clip.text_model.state_dict())  # transformers 5: CLIPTextModel holds the tower's modules
    return te.eval()


def train_unet(work: Path, seed: int, steps: int, batch_size: int) -> None:
    from diffusers import AutoencoderKL, DDPMScheduler

    imgs, targets = digits_arrays("train")
    cap = caption_classes(targets, seed)
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    te = text_encoder_from_clip(work / "clip")
    tok = clip_tokenizer()
    with torch.no_grad():
        post = vae.encode(to_rgb01(imgs) * 2 - 1).latent_dist
        lat_mean, lat_std = post.mean, post.std
        # The frozen text tower's hidden states for every caption the UNet can see (SD trains on a frozen CLIP too).
        names = [[t.format(n) for t in TEMPLATES] for n in DIGIT_NAMES]
        flat = [c for row in names for c in row] + [""]
        emb = torch.cat([te(tokenize(tok, flat[i : i + 64])).last_hidden_state for i in range(0, len(flat), 64)])
    emb_by_class = emb[:-1].view(10, len(TEMPLATES), 77, -1)
    emb_empty = emb[-1]
    scaling = vae.config.scaling_factor
    noise_sched = DDPMScheduler(**BETAS)
    torch.manual_seed(seed)
    unet = unet_model()
    log.info("unet parameters: %.2fM", sum(p.numel() for p in unet.parameters()) / 1e6)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=1e-2)
    g = torch.Generator().manual_seed(seed + 4)
    cap_t = torch.from_numpy(cap)
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 5e-4 * cosine_lr(step, steps, 200)
        idx = torch.randint(0, len(imgs), (batch_size,), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * scaling
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (batch_size,), generator=g)
        zt = noise_sched.add_noise(z0, noise, t)
        tmpl = torch.randint(0, len(TEMPLATES), (batch_size,), generator=g)
        cond = emb_by_class[cap_t[idx], tmpl]
        drop = torch.rand(batch_size, generator=g) < CAPTION_DROP
        cond = torch.where(drop[:, None, None], emb_empty, cond)
        loss = F.mse_loss(unet(zt, t, cond).sample, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].lerp_(v, 1 - decay) if v.dtype.is_floating_point else ema[k].copy_(v)
        if step % 100 == 0 or step == steps - 1:
            el = time.time() - t0
            log.info("unet step %d/%d loss %.4f (%.0fs, eta %.0fs)", step, steps, loss.item(), el,
                     el / (step + 1) * (steps - step - 1))
        if step % 1000 == 999:  # a checkpoint lets `ship` run on a partly trained UNet if time runs out
            save_unet(unet, ema, work / "unet")
    save_unet(unet, ema, work / "unet")
    (work / "unet" / "metrics.json").write_text(json.dumps({"steps": steps, "batch_size": batch_size,
                                                             "seconds": time.time() - t0}))


def save_unet(unet, ema, path: Path) -> None:
    import copy

    m = copy.deepcopy(unet)
    m.load_state_dict(ema)
    m.save_pretrained(path)


# --------------------------------------------------------------------------------------------------------------------
# 4-5. Classifiers (timm hub-format directories)
# --------------------------------------------------------------------------------------------------------------------
CLASSIFIERS = {
    # A narrow ResNet (one BasicBlock per stage) and a narrow ConvNeXt: two families, two splits.
    "guide": ("resnet18", {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}, "train"),
    "judge": ("convnext_atto", {"depths": [1, 1, 2, 1], "dims": [16, 32, 64, 128]}, "judge"),
    # the guide's architecture with a sigmoid head: one independent output per attribute
    "attr-guide": ("resnet18", {"layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128], "stem_width": 16}, "train"),
}

# The attribute guide's outputs, each a property of the digit class (model card: "Attribute guide"). 4 is not a
# closed loop: most 4s in this data set are written open at the top.
ATTRIBUTES = {"closed_loop": (0, 6, 8, 9), "straight_stroke": (1, 4, 7)}


def attribute_targets(targets: np.ndarray) -> np.ndarray:
    """Digit classes [N] -> multi-hot attribute targets [N, len(ATTRIBUTES)] (float32), in ATTRIBUTES' order."""
    return np.stack([np.isin(targets, digits) for digits in ATTRIBUTES.values()], 1).astype(np.float32)


def train_classifier(work: Path, seed: int, role: str, epochs: int, shots: int | None = None) -> None:
    """Train the guide, the judge or the attribute guide on its split; with `shots`, a guide on only k images per
    class of "train".

    The k-shot guide sees exactly the images `synthaug.datasets.few_shot_indices(targets, k, seed)` picks — the k real
    images per class a downstream run with the same seed trains on — and is saved as ``guide-k{k}`` (not shipped).
    Its steps are those of `epochs` over the full split, so a small set is not also under-trained. The attribute
    guide (``role="attr-guide"``) has one sigmoid output per `ATTRIBUTES` entry, trained with binary cross-entropy
    on the attributes of each image's true digit.
    """
    import timm
    from timm.models import save_for_hf

    arch, kwargs, split = CLASSIFIERS[role]
    multi_label = role == "attr-guide"
    label_names = list(ATTRIBUTES) if multi_label else list(DIGIT_NAMES)
    imgs, targets = digits_arrays(split)
    full = len(targets)
    if shots is not None:
        keep = few_shot_indices(targets.tolist(), shots, seed)
        imgs, targets = imgs[keep], targets[keep]
    x = to_rgb01(imgs)
    y = torch.from_numpy(attribute_targets(targets) if multi_label else targets)
    mean = torch.tensor(CLS_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLS_STD).view(1, 3, 1, 1)
    torch.manual_seed(seed)
    model = timm.create_model(arch, num_classes=len(label_names), **kwargs)
    bs = 64
    steps = epochs * math.ceil(full / bs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(seed + 5)
    t0 = time.time()
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * cosine_lr(step, steps, 50)
        idx = torch.randint(0, len(x), (bs,), generator=g)
        xb = shift(x[idx], g, 3)
        logits = model((xb - mean) / std)
        if multi_label:  # label smoothing 0.05 on each binary target, as the single-label heads
            loss = F.binary_cross_entropy_with_logits(logits, y[idx] * 0.95 + 0.025)
        else:
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.3f (%.0fs)", role, step, steps, loss.item(), time.time() - t0)
    model.eval()
    timgs, ttargets = digits_arrays("test")
    with torch.no_grad():
        test_logits = model((to_rgb01(timgs) - mean) / std)
    if multi_label:  # per attribute: sigmoid probability > 0.5 is "has it"
        hits = (test_logits > 0).numpy() == attribute_targets(ttargets).astype(bool)
        acc = {name: float(hits[:, i].mean()) for i, name in enumerate(label_names)}
    else:
        acc = float((test_logits.argmax(1).numpy() == ttargets).mean())
    log.info("%s (%s, %s) accuracy on 'test': %s", role, arch, kwargs, acc)
    out = work / (role if shots is None else f"{role}-k{shots}")
    shutil.rmtree(out, ignore_errors=True)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, SIZE, SIZE), mean=CLS_MEAN, std=CLS_STD,
                                interpolation="bilinear", crop_pct=1.0, num_classes=len(label_names),
                                label_names=label_names)
    save_for_hf(model, out, model_args=dict(kwargs, num_classes=len(label_names)), safe_serialization=True)
    cfg = json.loads((out / "config.json").read_text())
    what = f"split {split!r}" if shots is None else f"{shots} images per class of split {split!r} (few_shot seed {seed})"
    cfg["trained_on"] = f"sklearn digits, synthaug {what} ({len(x):,} images); shift augmentation +-3 px"
    cfg["test_accuracy"] = acc
    cfg["label_names"] = label_names
    if multi_label:  # the transformers convention: independent sigmoid outputs; and what each attribute means
        cfg["problem_type"] = "multi_label_classification"
        cfg["attribute_classes"] = {name: [DIGIT_NAMES[d] for d in digits] for name, digits in ATTRIBUTES.items()}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    clean_classifier_config(out)


def clean_classifier_config(path: Path) -> None:
    """The timm config of our own weights: drop what timm inherited from the ImageNet tag (its 288 px test size,
    7x7 pool, licence and paper of *those* weights), keep what loading and preprocessing need."""
    cfg = json.loads((path / "config.json").read_text())
    old = cfg["pretrained_cfg"]
    names = list(cfg.get("label_names") or DIGIT_NAMES)
    cfg["pretrained_cfg"] = {
        "input_size": [3, SIZE, SIZE], "fixed_input_size": False, "interpolation": "bilinear", "crop_pct": 1.0,
        "crop_mode": "center", "mean": list(CLS_MEAN), "std": list(CLS_STD), "num_classes": len(names),
        "first_conv": old.get("first_conv"), "classifier": old.get("classifier"), "license": "apache-2.0",
        "origin_url": "synthaug scripts/train_digits_world.py", "label_names": names,
    }
    cfg["label_names"] = names
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def load_timm_dir(path: Path):
    import timm

    model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return lambda x01: model((x01 - mean) / std)


# --------------------------------------------------------------------------------------------------------------------
# 6. Ship
# --------------------------------------------------------------------------------------------------------------------
def ship(work: Path, out: Path) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPModel

    out.mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer()
    te = text_encoder_from_clip(work / "clip")
    vae = AutoencoderKL.from_pretrained(work / "vae")
    unet = UNet2DConditionModel.from_pretrained(work / "unet")
    # "leading" spacing + steps_offset=1: the last denoising step is at t=1, where the DCT loss behaves (with "trailing" spacing it sat at t=99 and the loss diverged).
    sched = DDIMScheduler(**BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          timestep_spacing="leading", prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = out / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # fp16 on disk halves the package size; from_pretrained(torch_dtype=float32) upcasts (checked below). The configs
    # then say float32, so stock `from_pretrained(dir)` without a dtype loads every component in one dtype.
    pipe.to(torch.float16).save_pretrained(tmp)
    declare_float32(tmp)
    _replace_dir(tmp, out / "model")

    clip = CLIPModel.from_pretrained(work / "clip", dtype=torch.float32)
    tmp = out / "clip.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    clip.to(torch.float16).save_pretrained(tmp)
    declare_float32(tmp)
    tok.save_pretrained(tmp)
    CLIPImageProcessor(do_resize=True, size={"shortest_edge": SIZE}, do_center_crop=True,
                       crop_size={"height": SIZE, "width": SIZE}, do_rescale=True, do_normalize=True,
                       image_mean=list(CLS_MEAN), image_std=list(CLS_STD), resample=2).save_pretrained(tmp)
    _replace_dir(tmp, out / "clip")
    for role in ("guide", "judge", "attr-guide"):
        if role != "attr-guide" or (work / role).is_dir():
            ship_classifier(work, out, role)
    check_shipped(out, work)


def ship_classifier(work: Path, out: Path, role: str) -> None:
    """Copy a trained classifier from `work` to ``out/role``, swapped in whole."""
    tmp = out / f"{role}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / role, tmp)
    clean_classifier_config(tmp)
    _replace_dir(tmp, out / role)


def declare_float32(path: Path) -> None:
    """Set every ``dtype`` / ``torch_dtype`` in the ``config.json`` files under `path` (nested sections included) to
    float32: the weights on disk are fp16, but a config that says float16 makes transformers load that component in
    fp16 while diffusers loads the others in fp32, and a stock ``from_pretrained(dir)`` then mixes dtypes."""
    def fix(node):
        if isinstance(node, dict):
            return {k: "float32" if k in ("dtype", "torch_dtype") and v is not None else fix(v) for k, v in node.items()}
        return [fix(v) for v in node] if isinstance(node, list) else node

    for f in sorted(path.rglob("config.json")):
        f.write_text(json.dumps(fix(json.loads(f.read_text())), indent=2, sort_keys=True) + "\n")


def _replace_dir(tmp: Path, final: Path) -> None:
    # Swap in the complete directory at the end: a half-written model dir is never left at `final`.
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def check_shipped(out: Path, work: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel

    pipe = StableDiffusionPipeline.from_pretrained(out / "model", dtype=torch.float32, local_files_only=True)
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32, "fp16 weights not upcast"
    ref = UNet2DConditionModel.from_pretrained(work / "unet")
    w, r = pipe.unet.conv_in.weight, ref.conv_in.weight
    assert torch.allclose(w, r, atol=1e-3, rtol=1e-2), "shipped UNet differs from the trained one"
    clip = CLIPModel.from_pretrained(out / "clip", dtype=torch.float32)
    te = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(clip.text_model.get_input_embeddings().weight, te), "CLIP text tower != pipeline encoder"
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log.info("shipped world at %s: %.1f MB", out, size / 1e6)


# --------------------------------------------------------------------------------------------------------------------
# 7. Evaluate: plain-prompt images scored by the judge and the guide
# --------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(out: Path, per_class: int, steps: int, guidance: float, prompt: str) -> dict:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "model", dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    judge = load_timm_dir(out / "judge")
    guide = load_timm_dir(out / "guide")
    rows = {}
    for c, name in enumerate(DIGIT_NAMES):
        images = []
        for start in range(0, per_class, 25):
            n = min(25, per_class - start)
            gens = [torch.Generator().manual_seed(10_000 * c + start + i) for i in range(n)]
            images.append(pipe([prompt.format(name)] * n, num_inference_steps=steps, guidance_scale=guidance,
                               generator=gens, output_type="pt", height=SIZE, width=SIZE).images)
        x = torch.cat(images).float().clamp(0, 1)
        jp, gp = judge(x).argmax(1), guide(x).argmax(1)
        rows[name] = {"judge": float((jp == c).float().mean()), "guide": float((gp == c).float().mean()),
                      "judge_confusions": np.bincount(jp.numpy(), minlength=10).tolist()}
        log.info("plain %r: judge %.2f guide %.2f  judge predictions %s", prompt.format(name), rows[name]["judge"],
                 rows[name]["guide"], rows[name]["judge_confusions"])
    amb = [n for i, n in enumerate(DIGIT_NAMES) if i not in CLEAN]
    cln = [DIGIT_NAMES[i] for i in CLEAN]
    summary = {
        "prompt": prompt, "per_class": per_class, "steps": steps, "guidance_scale": guidance, "per_class_rows": rows,
        **{f"{who}_{part}": float(np.mean([rows[n][who] for n in names]))
           for who in ("judge", "guide") for part, names in (("all", DIGIT_NAMES), ("ambiguous", amb), ("clean", cln))},
    }
    log.info("plain-prompt summary: %s", {k: v for k, v in summary.items() if k != "per_class_rows"})
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "synthaug" / "assets" / "digits")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "digits-world")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default="clip,vae,unet,guide,judge,attr-guide,ship,eval")
    p.add_argument("--clip-steps", type=int, default=400)
    p.add_argument("--vae-steps", type=int, default=300)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--unet-batch", type=int, default=128)
    p.add_argument("--classifier-epochs", type=int, default=40)
    p.add_argument("--guide-shots", type=int, default=5, help="stage guide-shots: real images per class the guide sees")
    p.add_argument("--eval-per-class", type=int, default=50)
    p.add_argument("--eval-steps", type=int, default=10)
    p.add_argument("--eval-guidance", type=float, default=7.0)
    p.add_argument("--eval-prompt", default="A photo of {}")
    p.add_argument("--eval-out", default="eval_plain.json", help="file name of the eval summary inside --work")
    args = p.parse_args(argv)

    args.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", handlers=[
        logging.StreamHandler(), logging.FileHandler(args.work / "train.log")])
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stages = args.stages.split(",")
    t0 = time.time()
    timings = {}
    for stage in stages:
        ts = time.time()
        if stage == "clip":
            train_clip(args.work, args.seed, args.clip_steps)
        elif stage == "vae":
            train_vae(args.work, args.seed, args.vae_steps)
        elif stage == "unet":
            train_unet(args.work, args.seed, args.unet_steps, args.unet_batch)
        elif stage in ("guide", "judge"):
            train_classifier(args.work, args.seed, stage, args.classifier_epochs * (3 if stage == "judge" else 1))
        elif stage == "attr-guide":  # independent of the generator: trained and shipped alone
            train_classifier(args.work, args.seed, stage, args.classifier_epochs)
            args.out.mkdir(parents=True, exist_ok=True)
            ship_classifier(args.work, args.out, stage)
        elif stage == "guide-shots":
            train_classifier(args.work, args.seed, "guide", args.classifier_epochs, shots=args.guide_shots)
        elif stage == "ship":
            ship(args.work, args.out)
        elif stage == "eval":
            summary = evaluate(args.out, args.eval_per_class, args.eval_steps, args.eval_guidance, args.eval_prompt)
            (args.work / args.eval_out).write_text(json.dumps(summary, indent=2))
        else:
            raise SystemExit(f"--stages: unknown stage {stage!r}; valid: "
                             f"clip,vae,unet,guide,judge,attr-guide,ship,eval,guide-shots")
        timings[stage] = round(time.time() - ts, 1)
        log.info("stage %s done in %.0fs", stage, timings[stage])
    prev = json.loads((args.work / "timings.json").read_text()) if (args.work / "timings.json").exists() else {}
    (args.work / "timings.json").write_text(json.dumps({**prev, **timings}, indent=2))
    log.info("wall time %.0fs (%s) with %d threads", time.time() - t0, timings, args.threads)


if __name__ == "__main__":
    main()
