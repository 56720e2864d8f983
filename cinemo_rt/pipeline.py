"""The animation pipeline: image + prompt + motion bucket -> 16 uint8 frames (SPEC section 1).

Orchestration reads as numbered stages, each a call; the backend (PyTorch, ONNX Runtime, TensorRT) is
chosen once, when the `Animator` is built, and the denoising loop only sees its UNet function.
"""

from __future__ import annotations

import logging
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import validate
from .backends.base import Backend
from .components import images_to_uint8, tokenize
from .dctinit import select_dct_init
from .image import InputError, load_image, preprocess
from .limits import size_defaults
from .motion import bucket_to_motion_id
from .sampling import sample
from .schedule import make_schedule

log = logging.getLogger(__name__)

DCT_TAU = 975  # noise level of the low frequencies kept from z1 (SPEC 2)
DCT_FRACTION = 0.23
DECODE_CHUNK = 14


@dataclass(frozen=True)
class Defaults:
    height: int = 320
    width: int = 512
    frames: int = 15

    @classmethod
    def from_folder(cls, folder: str | os.PathLike | None) -> "Defaults":
        return cls(**size_defaults(folder))  # FileFormatError naming the file for a bad cinemo_rt.json


@dataclass
class StageTimer:
    """Wall time per stage, in seconds; synchronises CUDA at stage ends so the numbers mean something."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(validate.device_name(str(device)))
    except (ValueError, RuntimeError) as err:
        raise InputError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for but CUDA is not available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32  # fp16 as the original, on GPUs
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise InputError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return names[dtype]


class Animator:
    """`Animator.from_checkpoint(folder)(image, prompt, bucket)` -> uint8 video (frames + 1, H, W, 3)."""

    def __init__(self, backend: Backend, tokenizer, defaults: Defaults = Defaults()):
        self.backend = backend
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.alphas_cumprod = make_schedule()
        self.dct_init = select_dct_init(backend.device)  # chosen once (CUDA kernels or CPU reference)
        self.last_timings: dict[str, float] = {}

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, folder: str | os.PathLike | None = None, backend: str = "auto", device=None,
                        dtype=None, **load_options) -> "Animator":
        """A PyTorch backend over a checkpoint folder in the released layout (None: the bundled demo
        checkpoint, as `cinemo-rt run` without --checkpoint): "torch" is the reference,
        "torch-fast" the optimised path (issue 7). "auto" is the reference for now: the fast path's CUDA
        graphs and compile have passed CPU parity only, and become the CUDA default once measured on a GPU."""
        from .checkpoint import load_checkpoint

        if folder is None:
            from .defaults import default_checkpoint

            folder = default_checkpoint()
        if backend not in ("auto", "torch", "torch-fast"):
            raise InputError(f"backend {backend!r} runs exported engines: use Animator.from_engines / --engines DIR")
        device = resolve_device(device)
        checkpoint = load_checkpoint(folder, device=device, dtype=resolve_dtype(dtype, device), **load_options)
        if backend == "torch-fast":
            from .backends.fast_torch import FastTorchBackend as chosen
        else:
            from .backends.torch_backend import TorchBackend as chosen
        return cls(chosen(checkpoint), checkpoint.text_encoder.tokenizer, Defaults.from_folder(folder))

    @classmethod
    def from_engines(cls, folder: str | os.PathLike, backend: str = "auto", device=None, dtype=None) -> "Animator":
        """Exported graphs / engines built by `python -m export.build_engines`: TensorRT when its library,
        a GPU and engines are present, ONNX Runtime otherwise (`backend` forces one)."""
        from .backends.select import open_engines

        # device None stays None: each engine backend picks what it can run on (ORT without its CUDA
        # provider runs on the CPU even where a GPU exists).
        engine_backend, tokenizer = open_engines(folder, backend, None if device is None else resolve_device(device))
        return cls(engine_backend, tokenizer, Defaults.from_folder(folder))

    # -- the job --------------------------------------------------------------------------------------
    def __call__(self, image, prompt: str, bucket: int | None = 9, *, negative_prompt: str = "", steps: int = 50,
                 guidance: float = 7.5, seed: int | None = None, height: int | None = None,
                 width: int | None = None, frames: int | None = None, motion_id: float | None = None,
                 use_dct: bool = True, dct_fraction: float = DCT_FRACTION, dct_tau: int = DCT_TAU,
                 eta: float = 0.0, callback: Callable[[int, int, torch.Tensor], None] | None = None) -> np.ndarray:
        height = height or self.defaults.height
        width = width or self.defaults.width
        frames = frames or self.defaults.frames
        motion = validate.finite(motion_id, "motion_id") if motion_id is not None else bucket_to_motion_id(bucket)
        guidance = validate.finite(guidance, "guidance")
        if steps < 1:
            raise InputError(f"steps must be at least 1; got {steps}")
        if frames < 1:
            raise InputError(f"frames must be at least 1; got {frames}")
        if not 0 < validate.finite(dct_fraction, "dct_fraction") <= 1 or not 0 <= dct_tau < len(self.alphas_cumprod):
            raise InputError("DCTInit fraction must be in (0, 1] and tau in 0..999")
        if not prompt or not prompt.strip():
            log.warning("empty prompt: the animation is guided by the image and motion bucket only")
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            log.info("seed %d (pass --seed %d to reproduce this video)", seed, seed)
        generator = torch.Generator("cpu").manual_seed(seed)  # one CPU stream of draws: bit-reproducible
        timer = StageTimer(self.backend.device)

        with timer.stage("1 preprocess"):
            pixels = preprocess(load_image(image), height, width)
        with timer.stage("2 encode image"):
            z1 = self.encode_z1(pixels, generator)
        with timer.stage("3 encode text"):
            text, text_uncond = self.encode_prompts(prompt, negative_prompt, guidance)
        with timer.stage("4 initial noise"):
            x_T = self.initial_noise(z1, frames, generator, use_dct, dct_fraction, dct_tau)
        with timer.stage("5 denoise"):
            dtype, device = self.backend.dtype, self.backend.device
            motion_ids = torch.full((1,), motion, dtype=torch.float32, device=device)
            watch = NonFiniteWatch(device, callback)
            x_0 = sample(self.backend.unet, x_T.to(device, dtype), z1=z1.to(device, dtype), text=text,
                         text_uncond=text_uncond, motion_id=motion_ids, steps=steps, guidance=guidance, eta=eta,
                         generator=generator, callback=watch, prediction_type=self.backend.info.prediction_type)
            watch.check(steps)
        with timer.stage("6 decode"):
            latents = reconstruct(z1.to(x_0.dtype), x_0)
            chunk = DECODE_CHUNK if self.backend.info.temporal_vae else None
            images = self.backend.decode(latents, chunk=chunk)
        with timer.stage("7 to uint8"):
            video = images_to_uint8(images, rounding=not self.backend.info.temporal_vae)[0].cpu().numpy()
        self.last_timings = timer.seconds
        return video

    # -- stages -----------------------------------------------------------------------------------------
    def encode_z1(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Posterior *sample* (as the reference's `.sample()`), scaled: (1, 4, 1, h, w)."""
        mean, std = self.backend.encode_image(pixels.to(self.backend.device))
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return ((mean + std * eps) * self.backend.info.scaling_factor).unsqueeze(2)

    def encode_prompts(self, prompt: str, negative_prompt: str, guidance: float):
        """-> (text, text_uncond) each (1, 77, D); uncond is None when guidance is 1 (no CFG)."""
        prompts = [prompt] if guidance == 1.0 else [negative_prompt or "", prompt]
        ids, _ = tokenize(self.tokenizer, prompts)
        embeddings = self.backend.encode_text(ids).to(self.backend.dtype)
        if guidance == 1.0:
            return embeddings, None
        return embeddings[1:], embeddings[:1]

    def initial_noise(self, z1: torch.Tensor, frames: int, generator: torch.Generator, use_dct: bool,
                      fraction: float, tau: int) -> torch.Tensor:
        b, c, _, h, w = z1.shape
        # Drawn on the CPU generator whatever the device, so a seed means the same video everywhere.
        noise = torch.randn((b, c, frames, h, w), generator=generator, dtype=torch.float32).to(z1.device)
        if not use_dct:
            return noise
        return self.dct_init(z1.float(), noise, float(self.alphas_cumprod[tau]), fraction)

    # -- long videos ------------------------------------------------------------------------------------
    def animate_segments(self, image, prompt: str, segments: int, *, seed: int | None = None,
                         **options) -> np.ndarray:
        """Chain `segments` animations, the last frame of one becoming the input of the next (the authors'
        answer to requests for longer videos, Cinemo issues #9, #13, #14). Returns all frames, the shared
        boundary frames once."""
        if segments < 1:
            raise InputError(f"segments must be at least 1; got {segments}")
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            log.info("seed %d (pass --seed %d to reproduce this video)", seed, seed)
        parts, timings = [], {}
        current = image
        for index in range(segments):
            video = self(current, prompt, seed=seed + index, **options)
            parts.append(video if index == 0 else video[1:])
            current = video[-1]
            for name, sec in self.last_timings.items():
                timings[name] = timings.get(name, 0.0) + sec
        self.last_timings = timings
        return np.concatenate(parts)


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


def reconstruct(z1: torch.Tensor, x_0: torch.Tensor) -> torch.Tensor:
    """Residuals back to frames: [z1, z1 + x_0] over the frame axis -> (B, 4, 1 + F, h, w)."""
    return torch.cat([z1, z1 + x_0], dim=2)
