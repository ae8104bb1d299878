"""The named override sets a build's config starts from: presets, their per-dataset variants, seed sets, and the
defaults that follow from the method and from the dataset (`synthaug.config.load_config` applies them; keys are
dotted config keys, as on the command line).
"""

from __future__ import annotations

from typing import Any

# The paper's two training prompts (DCT appendix D / §3 "Design choices"), with `{token}` for S_c and `{label}`.
PAPER_PROMPTS = ("A high-resolution realistic image of a {token} {label}", "A photo of {token} {label}")


# Named override sets, applied over the dataset's defaults (a dataset's `PRESET_VARIANTS` entry replaces them there).
# `paper`: DCT appendix D. `fast`: below.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {
        "dct.num_inference_steps": 50, "dct.guidance_scale": 7.0, "dct.height": 512, "dct.width": 512,
        "dct.batch_size": 5, "dct.lr": None, "dct.grad_clip": 1.0, "dct.max_steps": 200, "dct.patience": 20,
        "dct.patience_min_accuracy": 0.5, "dct.stop_all_correct": True, "dct.prompts": list(PAPER_PROMPTS),
        "dct.grad_steps": 1, "generate.num_inference_steps": 50, "generate.guidance_scale": 7.0,
        # not the paper's setting but its memory: 4.5 GiB instead of 23.5 GiB per SD-1.5 update at 512 px in bf16,
        # for about two more forwards of the last UNet call and of the decoder per update (BENCHMARKS.md)
        "dct.checkpointing": True,
        "generate.height": 512, "generate.width": 512,
    },
}
# `fast`: the paper's settings at half the UNet evaluations or fewer. DPM-Solver++ (2M), diffusers' multistep solver,
# at 20 denoising steps per token update (0.4x the paper's 50 PNDM steps) and 25 per image (0.5x); the stopping rules
# stay the paper's (on the digits world a patience of 10 stopped "eight" after 11 updates at +2 judge points, where the
# default rules ran 51 updates for +22; tune seeds).
# Weights load in bf16 on CUDA where supported (`dtype: auto`, as for every preset); the token always trains in fp32.
# BENCHMARKS.md "Cost model" has the TFLOP per image and per update on SD-1.5; RESULTS.md "The fast preset" the
# acceptance measurement on the digits world.
PRESETS["fast"] = {
    **PRESETS["paper"],
    "scheduler": "dpmsolver++", "dct.num_inference_steps": 20, "generate.num_inference_steps": 25,
}

# A preset's values for one dataset, used there instead of the preset's generic ones (they sit on that dataset's own
# defaults). Digits: a world whose defaults already differ from the paper's (32 px, 10 denoising steps, 60 updates);
# "fast" makes the same relative cut there: DPM-Solver++ at 5 steps for the token and the images, spaced from t=999
# (the model's "leading" spacing starts 5 steps at t=831: +10.0 judge points on the six ambiguous classes' tune seeds,
# against +13.4 with "linspace" and +13.0 for the default), and the world's own stopping rules (on tune seeds, 30
# updates gave "one" +4 where 60 gave +12; patience 10 gave "eight" +2; RESULTS.md "The fast preset").
PRESET_VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "fast": {
        "digits": {"scheduler": "dpmsolver++", "timestep_spacing": "linspace", "dct.num_inference_steps": 5,
                   "generate.num_inference_steps": 5},
    },
}

# Named seed sets. Settings are chosen by looking at numbers from `tune` seeds; every number reported comes from
# `report` seeds. A set fixes the base seeds of token training and validation (dct.seed, mcti.seed) and of the images
# (generate.seed); every noise seed is hashed from (purpose, base seed, class, index), so two sets share no noise.
SEED_SETS: dict[str, dict[str, int]] = {
    "tune": {"dct.seed": 0, "mcti.seed": 0, "generate.seed": 0},
    "report": {"dct.seed": 1, "mcti.seed": 1, "generate.seed": 1},
}

# Defaults that follow from the method (applied like the dataset's). TI/MC-TI tokens stand for the whole class, as in
# MC-TI's "A photo of a S*" (their class names may be unknown); a DCT token stands beside the class name. The label
# form stays available: --set 'generate.prompt=A photo of {token} {label}'.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "ti": {"generate.prompt": "A photo of a {token}"},
    "mcti": {"generate.prompt": "A photo of a {token}"},
}

# Defaults that follow from the dataset (applied under the preset, the file and the overrides): what a user of that
# dataset expects without writing a config. Hub ids cannot be loaded offline; their loading path is
# tested with local stand-ins.
_BIRD_GUIDE = {"dct.init_token": "bird", "mcti.init_token": "bird"}
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "model": "digits", "guide": "digits-guide", "dct.height": 32, "dct.width": 32, "generate.height": 32,
        "generate.width": 32, "dct.num_inference_steps": 10, "generate.num_inference_steps": 10,
        "generate.batch_size": 50, "dct.max_steps": 60, "dct.lr": 3e-3, "dct.batch_size": 8,
        # RESULTS.md "Making the tokens help": train on the generation prompt only (the paper's second
        # prompt is off this world's caption distribution and made the loss oscillate), classify every step's
        # predicted clean image, keep the token that validates best on held-out seeds
        "dct.prompts": ["A photo of {token} {label}"], "dct.x0_weight": 1.0, "dct.select": "val",
        "shards.samples_per_shard": 100, "run.cpus_per_worker": 1,  # tiny models: 1 thread per actor, 1 actor per CPU
        "mcti.steps": 200, "mcti.extra_steps": 100,  # RESULTS.md "MC-TI": 200 TI steps suffice at 32 px
        "mcti.flip_p": 0.0,  # digits are not mirror-symmetric
    },
    "cub": {"preset": "paper", "model": "CompVis/stable-diffusion-v1-4", "guide": "vesteinn/vit-mae-cub",
            "guide_trained_on": "CUB-200-2011 full train split (5,994 images): few-shot results are not leak-free",
            **_BIRD_GUIDE},
    "inat": {"preset": "paper", "model": "CompVis/stable-diffusion-v1-4", "guide": "vesteinn/vit-mae-inat21",
             "guide_trained_on": "iNaturalist 2021 train split"},  # plants, fungi, insects too: init "a"
    "imagenet": {"preset": "paper", "model": "CompVis/stable-diffusion-v1-4", "guide": "google/vit-large-patch16-224",
                 "guide_trained_on": "ImageNet-21k pre-training, ImageNet-1k train split fine-tuning"},
}
