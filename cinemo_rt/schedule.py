"""Noise schedule of Cinemo (docs/METHOD.md, pipeline): linear betas 1e-4..0.02 over 1000 steps, DDIM 'leading' spacing.

Schedules are data built by pure functions; `tests/test_schedule_sampling.py` checks them against
`diffusers.DDIMScheduler` with the settings in force in the original pipeline.
"""

from __future__ import annotations

import torch

from .settings import NUM_TRAIN_TIMESTEPS

BETA_START = 1e-4
BETA_END = 0.02
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what a UNet may return (its scheduler config says which)


def make_schedule(
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) for linear betas, as a float64 CPU tensor (num_train_timesteps,).

    float64 so that every consumer (DDIM step in fp16/fp32, DCTInit in fp64) casts from one exact table.
    diffusers builds the same table in float32; the two agree to float32 rounding (~1e-6 relative)."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(
    steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, steps_offset: int = 1
) -> torch.Tensor:
    """Descending DDIM timesteps with diffusers' 'leading' spacing: 50 -> [981, 961, ..., 21, 1].

    t_i = i * (num_train_timesteps // steps) + steps_offset, i = steps-1 .. 0 (LongTensor, CPU)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(
            f"number of sampling steps must be in 1..{num_train_timesteps} "
            f"(the number of training timesteps); got {steps}"
        )
    step_ratio = num_train_timesteps // steps
    return (torch.arange(steps - 1, -1, -1, dtype=torch.long) * step_ratio) + steps_offset


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """Forward diffusion q(x_t | x_0): sqrt(alpha_bar) * x0 + sqrt(1 - alpha_bar) * noise (DDPM eq. 4).

    `alpha_bar` is a float or a tensor broadcastable against x0 (e.g. (B, 1, 1, 1, 1)); x0 broadcasts
    against noise, so a single frame (B, C, 1, H, W) noises into all frames of (B, C, F, H, W)."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
    # Coefficients from the float64 value, then cast: sqrt(1 - a) loses all precision if a is cast first.
    # Both terms run in the promoted dtype, as diffusers' add_noise does (fp64 z1 + fp32 noise -> fp64).
    dtype = torch.promote_types(x0.dtype, noise.dtype)
    sqrt_a = alpha_bar.sqrt().to(device=x0.device, dtype=dtype)
    sqrt_one_minus_a = (1.0 - alpha_bar).sqrt().to(device=x0.device, dtype=dtype)
    return sqrt_a * x0 + sqrt_one_minus_a * noise
