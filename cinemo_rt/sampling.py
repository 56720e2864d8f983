"""Samplers and classifier-free guidance (SPEC section 1, steps 6-7).

Structure (k-diffusion style): one denoiser contract, `model_fn(x_t, t) -> eps` with x_t (B, 4, F, h, w)
and t (B,) long. Model functions are built by wrapping: `cfg_model_fn` turns Cinemo's UNet contract
`unet_fn(x_t, t, text, z1, motion_id)` (any backend's `unet`) into one, `epsilon_model_fn` turns a
v-predicting one into an eps-predicting one; further wrappers (step caching, guidance truncation) stack
the same way. A sampler is a free function `(model_fn, x_T, steps, alphas_cumprod, *, eta, generator,
callback) -> x_0` registered in `samplers.SAMPLERS`: DDIM (default, the original's) and DPM-Solver++(2M).
`invert` runs DDIM backwards over the same model functions (video editing, SPEC 10).

Settings in force in the original (`DDIMScheduler` as configured by Cinemo): epsilon prediction, no
clipping or thresholding, final alpha = alphas_cumprod[0] (set_alpha_to_one=False), eta 0. A checkpoint whose
scheduler config says `"prediction_type": "v_prediction"` (the bundled demo model) returns v instead; the
`epsilon_model_fn` wrapper converts it into eps and the samplers never see the difference.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .samplers import DEFAULT_SAMPLER, SAMPLERS, load_sampler, needs_unconditional
from .schedule import PREDICTION_TYPES, ddim_timesteps, make_schedule

__all__ = ["ddim_timesteps", "ddim_step", "ddim_sample", "cfg_model_fn", "epsilon_model_fn", "sample", "invert",
           "SAMPLERS", "PREDICTION_TYPES", "needs_unconditional"]

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor], None]


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


def epsilon_model_fn(model_fn: ModelFn, prediction_type: str, alphas_cumprod: torch.Tensor) -> ModelFn:
    """`model_fn` returning `prediction_type` -> a model function returning eps (the samplers' contract)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    if prediction_type == "epsilon":
        return model_fn
    tables: dict[torch.device, torch.Tensor] = {}  # the float64 table, once per device

    def eps_model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        table = tables.setdefault(x_t.device, alphas_cumprod.to(x_t.device))
        a_t = table[t].view(-1, *([1] * (x_t.dim() - 1)))  # (B, 1, 1, 1, 1) float64, no host sync
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        v = model_fn(x_t, t)
        return (a_t.sqrt().to(dtype) * v + (1.0 - a_t).sqrt().to(dtype) * x_t).to(x_t.dtype)

    return eps_model


def ddim_sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    timesteps: Sequence[int],
    alphas_cumprod: torch.Tensor,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Run DDIM from x_T over descending `timesteps` (Python ints); returns x_0 in x_T's dtype.
    `model_fn` returns eps, or v where prediction_type is "v_prediction".

    Each step goes to the next listed timestep and the last one to t_prev = -1 (final alpha); for the
    'leading' spacing this equals diffusers' t - num_train_timesteps // steps. No host sync in the loop."""
    model_fn = epsilon_model_fn(model_fn, prediction_type, alphas_cumprod)
    timesteps = [int(t) for t in timesteps]
    batch = x_T.shape[0]
    # All (B,) timestep tensors up front: the loop issues no host-to-device copies of its own.
    t_batches = [torch.full((batch,), t, dtype=torch.long, device=x_T.device) for t in timesteps]
    x_t = x_T
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x_t = ddim_step(model_fn(x_t, t_batches[i]), t, t_prev, x_t, alphas_cumprod, eta=eta, generator=generator)
        if callback is not None:
            callback(i, t, x_t)
    return x_t


def ddim(model_fn: ModelFn, x_T: torch.Tensor, steps: int, alphas_cumprod: torch.Tensor, *, eta: float = 0.0,
         generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """The original's sampler: DDIM over `steps` 'leading'-spaced timesteps."""
    return ddim_sample(model_fn, x_T, ddim_timesteps(steps, len(alphas_cumprod)).tolist(), alphas_cumprod,
                       eta=eta, generator=generator, callback=callback)


def cfg_model_fn(
    unet_fn: UNetFn,
    *,
    text: torch.Tensor,
    text_uncond: torch.Tensor | None,
    z1: torch.Tensor,
    motion_id: torch.Tensor,
    guidance: float,
) -> ModelFn:
    """Classifier-free guidance as a `model_fn(x_t, t) -> eps` closure over `unet_fn`.

    One doubled batch per call, unconditional half first (as `cat([negative, positive])` in the original);
    z1 and the motion id are in both halves: the image latent conditions the unconditional branch too.
    eps = eps_u + g * (eps_c - eps_u). With g == 1 that is eps_c, so the unconditional half is skipped."""
    if not needs_unconditional(guidance):
        return lambda x_t, t: unet_fn(x_t, t, text, z1, motion_id)
    if text_uncond is None:
        raise ValueError("classifier-free guidance (guidance != 1) needs text_uncond (the negative prompt)")
    # Conditioning is fixed over the loop: double it once.
    text_both = torch.cat([text_uncond, text])  # (2B, 77, D)
    z1_both = torch.cat([z1, z1])  # (2B, 4, 1, h, w)
    motion_both = torch.cat([motion_id, motion_id])  # (2B,)

    def guided(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = unet_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), text_both, z1_both, motion_both)
        eps_u, eps_c = eps.chunk(2)  # (B, 4, F, h, w) each
        return eps_u + guidance * (eps_c - eps_u)

    return guided


def sample(
    unet_fn: UNetFn,
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
    fewer_calls=None,
    cache_coefficients: Sequence[float] | None = None,
) -> torch.Tensor:
    """Cinemo's denoising loop: `sampler` (DDIM by default) with `steps` steps and CFG of scale `guidance`.

    x_T (B, 4, F, h, w) initial noise (DCTInit output); z1 (B, 4, 1, h, w); text, text_uncond
    (B, 77, D); motion_id (B,) float. Returns the residual latents x_0 (B, 4, F, h, w). `fewer_calls`
    (a `request.FewerCalls`; None: off, `cfg_model_fn` exactly) adds step caching / guidance truncation with
    the checkpoint's `cache_coefficients` (`fewer_calls.py`), under the raw model output of any sampler."""
    from .fewer_calls import IDENTITY, wrap_model_fn  # it builds on cfg_model_fn, defined above
    from .request import FewerCalls

    run = load_sampler(sampler)
    alphas_cumprod = make_schedule()
    model_fn = wrap_model_fn(unet_fn, fewer_calls or FewerCalls(), text=text, text_uncond=text_uncond, z1=z1,
                             motion_id=motion_id, guidance=guidance, steps=steps,
                             coefficients=cache_coefficients or IDENTITY)
    model_fn = epsilon_model_fn(model_fn, prediction_type, alphas_cumprod)
    return run(model_fn, x_T, steps, alphas_cumprod, eta=eta, generator=generator, callback=callback)


def invert(
    unet_fn: UNetFn,
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
) -> torch.Tensor:
    """DDIM inversion, the counterpart of `sample` (SPEC 10; the original's `VideoGenInversionPipeline`):
    residual latents x_0 (B, 4, F, h, w) -> the initial latents x_T that DDIM sampling with the same
    conditioning maps back to about x_0. Same contract, CFG and dtype rules as `sample`.

    The sampling timesteps are visited in ascending order, t_k = k * (1000 // steps) + 1; each step is a DDIM
    step run backwards, from s = t_k - 1000 // steps (alphas_cumprod[0] = 0.9999 when s < 0, not 1) up to
    t_k, with the model evaluated at the *destination* t_k on the latent still at level s (the
    null-text-inversion convention the original uses). That update is `ddim_step(eps, s, t_k, x)` exactly.
    A v-predicting model's output is turned into eps at t_k, the timestep the model is told."""
    alphas_cumprod = make_schedule()
    # CFG and v -> eps as in `sample`, never step caching: every inversion step runs the UNet.
    model_fn = epsilon_model_fn(cfg_model_fn(unet_fn, text=text, text_uncond=text_uncond, z1=z1, motion_id=motion_id,
                                             guidance=guidance), prediction_type, alphas_cumprod)
    ascending = ddim_timesteps(steps, len(alphas_cumprod)).flip(0).tolist()
    ratio = len(alphas_cumprod) // steps
    batch = x_0.shape[0]
    t_batches = [torch.full((batch,), t, dtype=torch.long, device=x_0.device) for t in ascending]
    x = x_0
    for i, t in enumerate(ascending):
        x = ddim_step(model_fn(x, t_batches[i]), t - ratio, t, x, alphas_cumprod)
        if callback is not None:
            callback(i, t, x)
    return x
