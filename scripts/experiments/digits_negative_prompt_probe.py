"""Probe: can the embedded digits world's generator make class-pure images from the *partner* name as a negative prompt?

On an earlier prototype digits world, classifier-free guidance with the caption partner's name as the negative
prompt reached +13.6 to +16.9 points. This repeats it on the shipped world: 50 images per ambiguous class ("A photo of
one", negative prompt none / "seven" / "A photo of seven"), CFG 7 and 12, generation seeds of
`synthaug.generation.image_seed`, scored by the independent judge. Prints one line per setting (RESULTS.md).

    python scripts/digits_negative_prompt_probe.py
"""

from __future__ import annotations

import numpy as np
import torch

PARTNER = {1: 7, 7: 1, 3: 8, 8: 3, 4: 9, 9: 4}


def main() -> None:
    from synthaug.classifier.load import load_classifier
    from synthaug.datasets.digits import DIGIT_NAMES
    from synthaug.generation import image_seed
    from synthaug.models import load_diffusion

    torch.set_num_threads(1)
    pipe = load_diffusion("digits", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    judge = load_classifier("digits-judge", device="cpu")
    n = 50
    print("| CFG | negative prompt | " + " | ".join(DIGIT_NAMES[c] for c in PARTNER) + " | mean |")
    print("|---|---|" + "---|" * (len(PARTNER) + 1))
    for cfg in (7.0, 12.0):
        for kind in ("none", "partner name", "A photo of partner"):
            accs = []
            for c in PARTNER:
                partner = DIGIT_NAMES[PARTNER[c]]
                negative = {"none": None, "partner name": partner, "A photo of partner": f"A photo of {partner}"}[kind]
                generators = [torch.Generator().manual_seed(image_seed(0, c, i)) for i in range(n)]
                x = pipe(f"A photo of {DIGIT_NAMES[c]}", negative_prompt=negative, num_images_per_prompt=n,
                         generator=generators, num_inference_steps=10, guidance_scale=cfg, height=32, width=32,
                         output_type="pt").images
                with torch.no_grad():
                    accs.append((judge(x).argmax(-1) == c).float().mean().item())
            print(f"| {cfg:g} | {kind} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {np.mean(accs):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
