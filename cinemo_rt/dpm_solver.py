"""DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2): a second-order multistep sampler in
data-prediction form, the second entry of `samplers.SAMPLERS`.

With VP coefficients alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t), lambda_t = log(alpha_t / sigma_t) and
x0_t = (x_t - sigma_t eps) / alpha_t, each step s -> t (h = lambda_t - lambda_s) is

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,      D = x0_s                      (first order)
                                                                 D = x0_s + (x0_s - x0_prev) / (2 r),
                                                                 r = h_prev / h                (second order)

the first step first order (no history yet) and the last step first order to sigma = 0 (x_0 = x0 estimate).
Timesteps are "linspace" spaced from 999 down, as diffusers' `DPMSolverMultistepScheduler` defaults
(algorithm "dpmsolver++", order 2, "midpoint", final sigma zero), which tests/test_samplers.py checks it against.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .schedule import NUM_TRAIN_TIMESTEPS


def dpm_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Descending 'linspace' timesteps: round(linspace(0, T - 1, steps + 1)) reversed, without the 0."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"number of sampling steps must be in 1..{num_train_timesteps}; got {steps}")
    return [int(t) for t in np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1]]


def dpmpp_2m(x_T: torch.Tensor, steps: int, alphas_cumprod: torch.Tensor, *, eta: float = 0.0,
             generator: torch.Generator | None = None, callback=None):
    """DPM-Solver++(2M) from x_T as a sampler generator (`sampling.py`): yields (x_t, t), receives eps,
    returns x_0. Deterministic: eta must be 0 and the generator is unused (the signature is every sampler's)."""
    if eta != 0:
        raise ValueError("eta applies to the ddim sampler only; DPM-Solver++(2M) is deterministic (use eta 0)")
    timesteps = dpm_timesteps(steps, len(alphas_cumprod))
    # Host-side float64 coefficients per timestep; the last entry is the end point sigma = 0 (alpha = 1).
    alphas = [float(alphas_cumprod[t]) ** 0.5 for t in timesteps] + [1.0]
    sigmas = [(1.0 - float(alphas_cumprod[t])) ** 0.5 for t in timesteps] + [0.0]
    lambdas = [math.log(a / s) if s > 0 else math.inf for a, s in zip(alphas, sigmas)]
    coef_dtype = torch.promote_types(x_T.dtype, torch.float32)

    def coef(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=coef_dtype)  # 0-d: does not promote an fp16 x

    t_batches = [torch.full((x_T.shape[0],), t, dtype=torch.long, device=x_T.device) for t in timesteps]
    x, previous_x0 = x_T, None
    for i, t in enumerate(timesteps):
        eps = yield x, t_batches[i]
        x0 = (x - coef(sigmas[i]) * eps) / coef(alphas[i])
        last = i == len(timesteps) - 1
        if last:
            x = x0  # sigma_next = 0: the step lands on the data estimate
        else:
            h = lambdas[i + 1] - lambdas[i]
            d = x0
            if previous_x0 is not None:
                r = (lambdas[i] - lambdas[i - 1]) / h
                d = x0 + coef(0.5 / r) * (x0 - previous_x0)
            x = coef(sigmas[i + 1] / sigmas[i]) * x - coef(alphas[i + 1] * math.expm1(-h)) * d
        previous_x0 = x0
        if callback is not None:
            callback(i, t, x)
    return x
