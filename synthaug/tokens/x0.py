"""The predicted clean image x̂_0 of a denoising step, which DCT's x0 loss (``dct.x0_weight``) classifies."""

from __future__ import annotations

import copy

import torch


def predicted_x0(scheduler, noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor,
                 step_kwargs: dict) -> torch.Tensor:
    """x̂_0 of the step at `t`: the scheduler's ``pred_original_sample``, from a copy of the scheduler (multistep
    schedulers keep model outputs as state: the real one must only ever see detached tensors) and copies of its
    generators, so the sampling chain is untouched. Schedulers that return none (PNDM, DPM-Solver) get it from ᾱ_t
    (`x0_from_alphas`)."""
    out = copy.deepcopy(scheduler).step(noise_pred, t, latents, **fork_generators(step_kwargs))
    x0 = getattr(out, "pred_original_sample", None)
    return x0 if x0 is not None else x0_from_alphas(scheduler, noise_pred, t, latents)


def x0_from_alphas(scheduler, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """x̂_0 of a DDPM-parameterised step, x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, from the model's output at (x_t, t):
    ε-prediction (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t); v-prediction sqrt(ᾱ_t) x_t - sqrt(1 - ᾱ_t) v̂; sample: x̂_0."""
    alpha = scheduler.alphas_cumprod[int(t)].to(device=sample.device, dtype=sample.dtype)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (sample - (1 - alpha) ** 0.5 * model_output) / alpha ** 0.5
    if kind == "v_prediction":
        return alpha ** 0.5 * sample - (1 - alpha) ** 0.5 * model_output
    return model_output


def x0_from_alphas_works(scheduler) -> bool:
    """Whether `x0_from_alphas` applies: discrete ᾱ_t and a model input that is x_t itself (not sigma-scaled)."""
    return (getattr(scheduler, "alphas_cumprod", None) is not None
            and float(getattr(scheduler, "init_noise_sigma", 1.0)) == 1.0
            and getattr(scheduler.config, "prediction_type", "epsilon") in ("epsilon", "v_prediction", "sample"))


def scheduler_predicts_x0(scheduler, num_inference_steps: int) -> bool:
    """Whether the scheduler's step returns ``pred_original_sample``: one step of a copy on a dummy latent."""
    probe = copy.deepcopy(scheduler)
    probe.set_timesteps(num_inference_steps, device="cpu")
    t = probe.timesteps[0]
    z = torch.zeros(1, 4, 8, 8)
    return getattr(probe.step(z, t, probe.scale_model_input(z, t)), "pred_original_sample", None) is not None


def fork_generators(kwargs: dict) -> dict:
    """`kwargs` with its ``generator`` (one or a list) replaced by copies in the same state: a side computation (the
    x0 loss's scheduler step) then draws no random numbers from the real sampling chain's generators."""
    def fork(g: torch.Generator) -> torch.Generator:
        clone = torch.Generator(device=g.device)
        clone.set_state(g.get_state())
        return clone

    g = kwargs.get("generator")
    if g is None:
        return kwargs
    return {**kwargs, "generator": [fork(x) for x in g] if isinstance(g, list) else fork(g)}
