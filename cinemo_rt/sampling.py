"""Samplers, inversion and the denoising loop over the step protocol of `model_calls.py` (paper section 3,
docs/METHOD.md).

A sampler is a generator function `(x_T, steps, alphas_cumprod, *, eta, generator, callback)` registered in
`samplers.SAMPLERS`: it yields `(x_t, t)` for every model evaluation it needs, receives eps, and returns x_0.
DDIM (default, the original's) is here, DPM-Solver++(2M) in `dpm_solver.py`. `denoising` composes, in this
one place, what turns those requests into UNet calls: classifier-free guidance and its truncation, the step
cache, v -> eps and the call counter. The result is one generator of `UNetCall`s per video that any loop can
drive: `run_with_unet` for the CLI, the server's runner for several videos batched per call. `inversion` runs
DDIM backwards over the same composition (video editing). `sample`, `invert`, `ddim_sample` are the
function-call faces of these generators.

Settings in force in the original (`DDIMScheduler` as configured by Cinemo): epsilon prediction, no
clipping or thresholding, final alpha = alphas_cumprod[0] (set_alpha_to_one=False), eta 0. A checkpoint whose
scheduler config says `"prediction_type": "v_prediction"` (the bundled demo model) returns v instead; the
`as_epsilon` wrapper converts it into eps and the samplers never see the difference.
"""

from __future__ import annotations

from typing import Callable, Generator, Sequence

import torch

from .fewer_calls import IDENTITY, CallCounter, fewer_calls_evaluation
from .model_calls import (Evaluate, ModelFn, UNetCall, UNetFn, as_epsilon, cfg_model_fn, epsilon_model_fn,
                          guided, relay, run_with_unet)
from .request import FewerCalls
from .samplers import DEFAULT_SAMPLER, SAMPLERS, load_sampler, needs_unconditional
from .schedule import PREDICTION_TYPES, ddim_timesteps, make_schedule

__all__ = ["ddim_timesteps", "ddim_step", "ddim", "ddim_steps", "ddim_sample", "cfg_model_fn", "epsilon_model_fn",
           "denoising", "inversion", "sample", "invert", "SAMPLERS", "PREDICTION_TYPES", "needs_unconditional"]

Callback = Callable[[int, int, torch.Tensor], None]
# A sampler's generator: yields (x_t, t) model requests, receives eps, returns x_0.
SamplerSteps = Generator[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]


def _alpha_bar(alphas_cumprod: torch.Tensor, t: int) -> float:
    # t < 0 is the step past the end: diffusers' final_alpha_cumprod = alphas_cumprod[0] when
    # set_alpha_to_one=False (0.9999 here, not 1.0).
    return float(alphas_cumprod[max(int(t), 0)])


def ddim_step(
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    x_t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    variance_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12):

        x_prev = sqrt(a_prev) * pred_x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * z,
        pred_x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t),
        sigma = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)            (eq. 16).

    t, t_prev are Python ints (t_prev < 0 on the last step); `alphas_cumprod` is the float64 CPU table.
    Scalar coefficients are computed in float64 on the host and cast to fp32 (fp64 for fp64 x_t); every
    tensor result is in x_t's dtype (fp16 for an fp16 model, as in the original, where 0-d fp32 alphas do
    not promote).
    z is `variance_noise` if given, else drawn from `generator` (only when sigma > 0)."""
    a_t = _alpha_bar(alphas_cumprod, t)
    a_prev = _alpha_bar(alphas_cumprod, t_prev)
    # eta 0 skips the variance term outright: run backwards (inversion, a_prev > a_t) its root is imaginary.
    sigma = eta * ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)) ** 0.5 if eta else 0.0

    # Coefficients as 0-d CPU tensors of at least fp32, like diffusers' fp32 alphas: a 0-d tensor does not
    # promote x_t (fp16 stays fp16) and is not rounded to fp16 first. Rounding them to fp16 instead changed
    # 17% of the fp16 outputs by 1 ulp against the original step; this way 0.01% (measured, 50 steps).
    coef_dtype = torch.promote_types(x_t.dtype, torch.float32)

    def coef(value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=coef_dtype)

    pred_x0 = (x_t - coef((1.0 - a_t) ** 0.5) * eps) / coef(a_t**0.5)
    direction = coef((1.0 - a_prev - sigma**2) ** 0.5) * eps
    x_prev = coef(a_prev**0.5) * pred_x0 + direction
    if eta > 0:
        if variance_noise is None:
            # Drawn on the generator's device, then moved (diffusers' randn_tensor does the same).
            noise_device = generator.device if generator is not None else x_t.device
            variance_noise = torch.randn(
                x_t.shape, generator=generator, device=noise_device, dtype=x_t.dtype
            ).to(x_t.device)
        x_prev = x_prev + coef(sigma) * variance_noise
    return x_prev


def ddim_steps(x_T: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor, *, eta: float = 0.0,
               generator: torch.Generator | None = None, callback: Callback | None = None) -> SamplerSteps:
    """DDIM from x_T over descending `timesteps` (Python ints), as a sampler generator; returns x_0 in x_T's
    dtype. Each step goes to the next listed timestep and the last one to t_prev = -1 (final alpha); for the
    'leading' spacing this equals diffusers' t - num_train_timesteps // steps. No host sync in the loop."""
    timesteps = [int(t) for t in timesteps]
    batch = x_T.shape[0]
    # All (B,) timestep tensors up front: the loop issues no host-to-device copies of its own.
    t_batches = [torch.full((batch,), t, dtype=torch.long, device=x_T.device) for t in timesteps]
    x_t = x_T
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        eps = yield x_t, t_batches[i]
        x_t = ddim_step(eps, t, t_prev, x_t, alphas_cumprod, eta=eta, generator=generator)
        if callback is not None:
            callback(i, t, x_t)
    return x_t


def ddim(x_T: torch.Tensor, steps: int, alphas_cumprod: torch.Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, callback: Callback | None = None) -> SamplerSteps:
    """The original's sampler: DDIM over `steps` 'leading'-spaced timesteps."""
    return (yield from ddim_steps(x_T, ddim_timesteps(steps, len(alphas_cumprod)).tolist(), alphas_cumprod,
                                  eta=eta, generator=generator, callback=callback))


def evaluated(steps: SamplerSteps, evaluate: Evaluate) -> Generator[UNetCall, torch.Tensor, torch.Tensor]:
    """A sampler's requests answered by `evaluate`: one generator of UNet calls, returning x_0."""
    try:
        x_t, t = next(steps)
        while True:
            eps = yield from evaluate(x_t, t)
            x_t, t = steps.send(eps)
    except StopIteration as done:
        return done.value


def ddim_sample(model_fn: ModelFn, x_T: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor, *,
                eta: float = 0.0, generator: torch.Generator | None = None,
                callback: Callback | None = None) -> torch.Tensor:
    """`ddim_steps` driven by a plain `model_fn(x_t, t) -> eps`."""
    steps = ddim_steps(x_T, timesteps, alphas_cumprod, eta=eta, generator=generator, callback=callback)
    try:
        x_t, t = next(steps)
        while True:
            x_t, t = steps.send(model_fn(x_t, t))
    except StopIteration as done:
        return done.value


def denoising(
    x_T: torch.Tensor,
    *,
    z1: torch.Tensor,
    text: torch.Tensor,
    text_uncond: torch.Tensor | None,
    motion_id: torch.Tensor,
    steps: int = 50,
    guidance: float = 7.5,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    prediction_type: str = "epsilon",
    sampler: str = DEFAULT_SAMPLER,
    fewer_calls: FewerCalls | None = None,
    cache_coefficients: Sequence[float] | None = None,
    counter: CallCounter | None = None,
) -> Generator[UNetCall, torch.Tensor, torch.Tensor]:
    """Cinemo's denoising loop for one batch of videos as a generator of UNet calls: `sampler` (DDIM by
    default) with `steps` steps, CFG of scale `guidance`, the request's `fewer_calls` (step caching with the
    checkpoint's `cache_coefficients`, guidance truncation; None: off, plain CFG exactly) under v -> eps, and
    `counter` counting single-image UNet calls. Drive it with `run_with_unet` or batch it with others.

    x_T (B, 4, F, h, w) initial noise (DCTInit output); z1 (B, 4, 1, h, w); text, text_uncond
    (B, 77, D); motion_id (B,) float. Returns the residual latents x_0 (B, 4, F, h, w)."""
    alphas_cumprod = make_schedule()
    evaluate = fewer_calls_evaluation(fewer_calls or FewerCalls(), text=text, text_uncond=text_uncond, z1=z1,
                                      motion_id=motion_id, guidance=guidance, steps=steps,
                                      coefficients=cache_coefficients or IDENTITY)
    evaluate = as_epsilon(evaluate, prediction_type, alphas_cumprod)
    sampler_steps = load_sampler(sampler)(x_T, steps, alphas_cumprod, eta=eta, generator=generator,
                                          callback=callback)
    return (yield from relay(evaluated(sampler_steps, evaluate), on_call=counter.count if counter else None))


def sample(unet_fn: UNetFn, x_T: torch.Tensor, **options) -> torch.Tensor:
    """`denoising` run to its end with `unet_fn`: the residual latents x_0 (B, 4, F, h, w)."""
    return run_with_unet(denoising(x_T, **options), unet_fn)


def inversion_steps(x_0: torch.Tensor, steps: int, alphas_cumprod: torch.Tensor,
                    callback: Callback | None = None) -> SamplerSteps:
    """DDIM inversion as a sampler generator (paper section 4.3, docs/METHOD.md): the sampling
    timesteps in ascending order, t_k = k * (1000 // steps) + 1; each step is a DDIM step run backwards, from
    s = t_k - 1000 // steps (alphas_cumprod[0] = 0.9999 when s < 0, not 1) up to t_k, with the model evaluated
    at the *destination* t_k on the latent still at level s (the null-text-inversion convention the original
    uses). That update is `ddim_step(eps, s, t_k, x)` exactly."""
    ascending = ddim_timesteps(steps, len(alphas_cumprod)).flip(0).tolist()
    ratio = len(alphas_cumprod) // steps
    batch = x_0.shape[0]
    t_batches = [torch.full((batch,), t, dtype=torch.long, device=x_0.device) for t in ascending]
    x = x_0
    for i, t in enumerate(ascending):
        eps = yield x, t_batches[i]
        x = ddim_step(eps, t - ratio, t, x, alphas_cumprod)
        if callback is not None:
            callback(i, t, x)
    return x


def inversion(
    x_0: torch.Tensor,
    *,
    z1: torch.Tensor,
    text: torch.Tensor,
    text_uncond: torch.Tensor | None,
    motion_id: torch.Tensor,
    steps: int = 50,
    guidance: float = 1.0,
    callback: Callback | None = None,
    prediction_type: str = "epsilon",
    counter: CallCounter | None = None,
) -> Generator[UNetCall, torch.Tensor, torch.Tensor]:
    """The counterpart of `denoising`: residual latents x_0 (B, 4, F, h, w) -> the initial latents x_T that
    DDIM sampling with the same conditioning maps back to about x_0, as a generator of UNet calls. CFG and
    v -> eps as in `denoising` (a v output is turned into eps at t_k, the timestep the model is told), never
    step caching: every inversion step runs the UNet."""
    alphas_cumprod = make_schedule()
    evaluate = as_epsilon(guided(text=text, text_uncond=text_uncond, z1=z1, motion_id=motion_id,
                                 guidance=guidance), prediction_type, alphas_cumprod)
    return (yield from relay(evaluated(inversion_steps(x_0, steps, alphas_cumprod, callback), evaluate),
                             on_call=counter.count if counter else None))


def invert(unet_fn: UNetFn, x_0: torch.Tensor, **options) -> torch.Tensor:
    """`inversion` run to its end with `unet_fn`: the initial latents x_T (B, 4, F, h, w)."""
    return run_with_unet(inversion(x_0, **options), unet_fn)
