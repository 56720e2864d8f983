"""The pipeline's stages over any `Backend`: condition -> initial noise -> sample -> decode (docs/METHOD.md, pipeline).

Each is a plain function, so a new mode recombines them: video editing supplies its own initial latents and
first frame to `denoise`; serving stacks several requests' `Conditioning` along the batch (every stage works
on a batch B) and runs their CFG halves in one UNet call. Pipeline policy lives here, once, above the
backends: the posterior sample and the latent scaling, the decoder's chunking, uint8 conversion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Generator

import torch

from .backends.base import Backend
from .components import images_to_uint8, tokenize
from .dctinit import check_kernel_contract
from .request import DCTInit, Request
from .fewer_calls import CallCounter
from .model_calls import UNetCall, run_with_unet
from .sampling import denoising as sampler_denoising
from .sampling import inversion, needs_unconditional
from .settings import DECODE_CHUNK

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conditioning:
    """Everything the UNet is conditioned on, on the backend's device: z1 (B, 4, 1, h, w) scaled, at the VAE
    encoder's precision (DCTInit mixes it in float64), text and text_uncond (B, 77, D) in the UNet's dtype
    (text_uncond None without CFG), motion_id (B,) float32."""

    z1: torch.Tensor
    text: torch.Tensor
    text_uncond: torch.Tensor | None
    motion_id: torch.Tensor


def _posterior_sample(backend: Backend, mean: torch.Tensor, std: torch.Tensor,
                      generator: torch.Generator) -> torch.Tensor:
    """The reference's `.latent_dist.sample() * scaling_factor`, its noise drawn on the CPU generator."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
    return (mean + std * eps) * backend.info.scaling_factor


def encode_z1(backend: Backend, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Posterior *sample* (as the reference's `.sample()`), scaled: (B, 4, 1, h, w)."""
    mean, std = backend.vae_encoder(pixels)
    return _posterior_sample(backend, mean, std, generator).unsqueeze(2)


def encode_frames(backend: Backend, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The frames of a video (N, 3, H, W) -> scaled latents (1, 4, N, h, w), posterior samples as `encode_z1`.

    One frame per VAE-encoder call: the VAE encoder is per-frame (no temporal layers), and every backend's
    graph runs batch 1 (TensorRT's static profile is 1), so 16 frames need no wider export. The noise of all
    N frames is one draw, as the reference's one batched `.sample()`. Returned dense in the pipeline's (B, C, F,
    h, w) order, not as a view of the frames-first encoder output: everything downstream (inversion, DCTInit's
    kernel) takes that layout."""
    parts = [backend.vae_encoder(pixels[i:i + 1]) for i in range(pixels.shape[0])]
    mean = torch.cat([m for m, _ in parts])
    std = torch.cat([s for _, s in parts])
    return _posterior_sample(backend, mean, std, generator).permute(1, 0, 2, 3).unsqueeze(0).contiguous()


def encode_prompts(backend: Backend, tokenizer, prompt: str, negative_prompt: str, guidance: float):
    """-> (text, text_uncond) each (1, 77, D); text_uncond is None when guidance needs no unconditional half."""
    uncond = needs_unconditional(guidance)
    ids, _ = tokenize(tokenizer, [negative_prompt or "", prompt] if uncond else [prompt])
    embeddings = backend.text_encoder(ids).to(backend.dtype)
    return (embeddings[1:], embeddings[:1]) if uncond else (embeddings, None)


def motion_ids(backend: Backend, request: Request, batch: int = 1) -> torch.Tensor:
    return torch.full((batch,), request.motion, dtype=torch.float32, device=backend.device)


def initial_noise(z1: torch.Tensor, frames: int, generator: torch.Generator, dct: DCTInit | None,
                  dct_init: Callable, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Gaussian noise (B, 4, frames, h, w), with DCTInit's low frequencies from z1 unless `dct` is None."""
    b, c, _, h, w = z1.shape
    # Drawn on the CPU generator whatever the device, so a seed means the same video everywhere.
    noise = torch.randn((b, c, frames, h, w), generator=generator, dtype=torch.float32).to(z1.device)
    return mix_low_frequencies(z1, noise, dct, dct_init, alphas_cumprod)


def mix_low_frequencies(z1: torch.Tensor, noise: torch.Tensor, dct: DCTInit | None, dct_init: Callable,
                        alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """DCTInit of `noise` (B, 4, F, h, w) towards z1, or `noise` itself when `dct` is None. Editing passes the
    inverted latents of a clip as the noise (docs/METHOD.md, editing). The tensors pass the CUDA kernel's preconditions
    here on every device (`check_kernel_contract`), so the CPU suite proves what a GPU run hands the kernel."""
    if dct is None:
        return noise
    z1, noise = z1.float(), noise.float()
    check_kernel_contract(z1, noise, dct.fraction)
    return dct_init(z1, noise, float(alphas_cumprod[dct.tau]), dct.fraction)


def denoising(backend: Backend, conditioning: Conditioning, x_T: torch.Tensor, request: Request,
              generator: torch.Generator, callback=None, *, counter: CallCounter | None = None,
              cache_coefficients: tuple[float, ...] | None = None) -> Generator[UNetCall, torch.Tensor, torch.Tensor]:
    """The sampler named by the request with CFG, as a generator of UNet calls for the backend's UNet
    (`model_calls.py`) -> residual latents x_0, with the request's `fewer_calls` (step cache with the
    checkpoint's `cache_coefficients`, guidance truncation); `counter` counts the single-image UNet calls.
    Latents that turn NaN or infinite raise `NonFiniteError` after the loop, naming the first such step."""
    c = conditioning
    dtype = backend.dtype
    watch = NonFiniteWatch(backend.device, callback)
    x_0 = yield from sampler_denoising(
        x_T.to(backend.device, dtype), z1=c.z1.to(dtype), text=c.text, text_uncond=c.text_uncond,
        motion_id=c.motion_id, steps=request.steps, guidance=request.guidance, eta=request.eta,
        generator=generator, callback=watch, prediction_type=backend.info.prediction_type,
        sampler=request.sampler, fewer_calls=request.fewer_calls, cache_coefficients=cache_coefficients,
        counter=counter)
    watch.check(request.steps)
    return x_0


def denoise(backend: Backend, conditioning: Conditioning, x_T: torch.Tensor, request: Request,
            generator: torch.Generator, callback=None, **options) -> torch.Tensor:
    """`denoising` run to its end on the backend's UNet, one video batch alone."""
    return run_with_unet(denoising(backend, conditioning, x_T, request, generator, callback, **options),
                         backend.unet)


class NonFiniteError(ValueError):
    """The denoising produced NaN or infinite latents (broken weights, or an overflow in low precision)."""


class NonFiniteWatch:
    """A denoising callback that records the first step whose latents hold NaN or inf, on the device and
    without a host sync per step; `check` raises once after the loop, naming that step."""

    def __init__(self, device: torch.device, then: Callable | None = None):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.then = then

    def __call__(self, i: int, t: int, x: torch.Tensor) -> None:
        bad_now = ~torch.isfinite(x).all()
        self.first_bad = torch.where(bad_now & (self.first_bad < 0), torch.full_like(self.first_bad, i + 1),
                                     self.first_bad)
        if self.then is not None:
            self.then(i, t, x)

    def check(self, steps: int) -> None:
        step = int(self.first_bad)
        if step > 0:
            raise NonFiniteError(f"the latents became NaN or infinite at denoising step {step} of {steps}; the "
                                 "checkpoint's weights may hold NaN/inf values, or the precision overflowed "
                                 "(try --dtype fp32)")


def invert_residuals(backend: Backend, conditioning: Conditioning, residuals: torch.Tensor, steps: int,
                     guidance: float, callback=None, *, counter: CallCounter | None = None) -> torch.Tensor:
    """DDIM inversion of a clip's residual latents (B, 4, F, h, w) under `conditioning` (the clip's own first
    frame and the source prompt) -> the initial latents that carry its motion (docs/METHOD.md); `counter`
    counts the single-image UNet calls."""
    c = conditioning
    dtype = backend.dtype
    return run_with_unet(inversion(residuals.to(backend.device, dtype), z1=c.z1.to(dtype), text=c.text,
                                   text_uncond=c.text_uncond, motion_id=c.motion_id, steps=steps,
                                   guidance=guidance, callback=callback,
                                   prediction_type=backend.info.prediction_type, counter=counter),
                         backend.unet)


def decode_latents(backend: Backend, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, F, h, w) -> images (B, 3, F, H, W) in about [-1, 1]. The division by the
    scaling factor is done in fp32; the temporal decoder sees DECODE_CHUNK frames of one video at a time
    (14 + 2 for 16), exactly as the reference, the SD decoder all frames at once."""
    b, c, f, h, w = latents.shape
    flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w).float() / backend.info.scaling_factor
    if backend.info.temporal_vae:  # chunks inside each video: its temporal layers must not mix two videos
        bounds = [(v * f + s, v * f + min(s + DECODE_CHUNK, f)) for v in range(b) for s in range(0, f, DECODE_CHUNK)]
    else:
        bounds = [(0, b * f)]
    images = torch.cat([backend.vae_decoder(flat[start:end]) for start, end in bounds])
    _, c_out, hh, ww = images.shape
    return images.view(b, f, c_out, hh, ww).permute(0, 2, 1, 3, 4)


def to_uint8(backend: Backend, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) -> uint8 (B, F, H, W, 3): truncation after the temporal decoder, rounding after the SD
    one, as the two reference code paths."""
    return images_to_uint8(images, rounding=not backend.info.temporal_vae)
