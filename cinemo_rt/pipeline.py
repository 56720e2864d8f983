"""The animation pipeline: image + request -> 16 uint8 frames (SPEC section 1).

`Animator.run(image, request)` reads as numbered stages, each a call into `cinemo_rt.stages`; the backend
(PyTorch, ONNX Runtime, TensorRT) is chosen once, when the `Animator` is built (`backends.registry`), and
the denoising loop only sees its UNet function. `Animator.__call__` keeps the loose-keyword API as a thin
layer that builds a `Request`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import stages
from .backends.base import Backend
from .dctinit import select_dct_init
from .errors import InputError
from .fewer_calls import CallCounter, load_coefficients
from .image import load_image, preprocess
from .request import DCTInit, FewerCalls, Request
from .residuals import frames_from_residuals
from .schedule import make_schedule
from .settings import DCT_FRACTION, DCT_TAU, Size

log = logging.getLogger(__name__)
Defaults = Size  # the name this class had before issue 14


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


class Animator:
    """`Animator.from_checkpoint(folder)(image, prompt, bucket)` -> uint8 video (frames + 1, H, W, 3)."""

    def __init__(self, backend: Backend, tokenizer, defaults: Size = Size(),
                 cache_coefficients: tuple[float, ...] | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.alphas_cumprod = make_schedule()
        self.dct_init = select_dct_init(backend.device)  # chosen once (CUDA kernels or CPU reference)
        self.last_timings: dict[str, float] = {}
        # Step-cache indicator fitted to this checkpoint (cinemo_rt.json "step_cache"; None: not calibrated).
        self.cache_coefficients = cache_coefficients
        self.last_unet_calls = 0  # single-image UNet calls of the last video (a CFG call counts 2)
        self._warned_uncalibrated = False

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, folder: str | os.PathLike | None = None, backend: str = "auto", device=None,
                        dtype=None, **load_options) -> "Animator":
        """A PyTorch backend over a checkpoint folder in the released layout ("torch", "torch-fast"); None is
        the bundled demo checkpoint, as `cinemo-rt run` without --checkpoint."""
        from .backends.registry import open_checkpoint

        if folder is None:
            from .defaults import default_checkpoint

            folder = default_checkpoint()
        opened, tokenizer = open_checkpoint(folder, backend, device, dtype, **load_options)
        return cls(opened, tokenizer, Size.from_folder(folder), load_coefficients(folder))

    @classmethod
    def from_engines(cls, folder: str | os.PathLike, backend: str = "auto", device=None, dtype=None) -> "Animator":
        """Exported graphs / engines built by `python -m export.build_engines`: TensorRT when its library,
        a GPU and engines are present, ONNX Runtime otherwise (`backend` forces one)."""
        from .backends.registry import open_engines

        opened, tokenizer = open_engines(folder, backend, device)
        return cls(opened, tokenizer, Size.from_folder(folder), load_coefficients(folder))

    # -- the job --------------------------------------------------------------------------------------
    def run(self, image, request: Request, callback: Callable[[int, int, torch.Tensor], None] | None = None
            ) -> np.ndarray:
        request = request.resolve(self.defaults)
        generator = torch.Generator("cpu").manual_seed(request.seed)  # one CPU stream of draws: reproducible
        backend = self.backend
        timer = StageTimer(backend.device)
        with timer.stage("1 preprocess"):
            pixels = preprocess(load_image(image), request.height, request.width)
        with timer.stage("2 encode image"):
            z1 = stages.encode_z1(backend, pixels, generator)
        with timer.stage("3 encode text"):
            text, text_uncond = stages.encode_prompts(backend, self.tokenizer, request.prompt,
                                                      request.negative_prompt, request.guidance)
            conditioning = stages.Conditioning(z1, text, text_uncond, stages.motion_ids(backend, request))
        with timer.stage("4 initial noise"):
            x_T = self.initial_noise(z1, request.frames, generator, request.dct)
        with timer.stage("5 denoise"):
            counter = CallCounter()
            x_0 = stages.denoise(backend, conditioning, x_T, request, generator, callback, counter=counter,
                                 cache_coefficients=self.coefficients_for(request))
        with timer.stage("6 decode"):
            images = stages.decode_latents(backend, frames_from_residuals(z1.to(x_0.dtype), x_0))
        with timer.stage("7 to uint8"):
            video = stages.to_uint8(backend, images)[0].cpu().numpy()
        self.last_timings = timer.seconds
        self.last_unet_calls = counter.calls
        return video

    def coefficients_for(self, request: Request) -> tuple[float, ...] | None:
        if request.fewer_calls.cache is not None and self.cache_coefficients is None and not self._warned_uncalibrated:
            self._warned_uncalibrated = True
            log.warning("this checkpoint has no step-cache calibration (cinemo_rt.json \"step_cache\"): the cache "
                        "threshold applies to the raw input change; run benchmarks/calibrate_cache.py")
        return self.cache_coefficients

    def __call__(self, image, prompt: str, bucket: int | None = 9, *, negative_prompt: str = "",
                 steps: int | None = None, guidance: float = Request.guidance, seed: int | None = None,
                 height: int | None = None, width: int | None = None, frames: int | None = None,
                 motion_id: float | None = None, use_dct: bool = True, dct_fraction: float = DCT_FRACTION,
                 dct_tau: int = DCT_TAU, eta: float = Request.eta, sampler: str | None = None,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None, fast: bool = False,
                 fewer_calls: FewerCalls | None = None, cache: float | None = None,
                 guidance_until: float | None = None, guidance_every: int | None = None) -> np.ndarray:
        """The keyword API: builds a `Request` and runs it. `steps` defaults to 50, or the fast preset's with
        `fast=True`; `fewer_calls`, `cache`, `guidance_until`, `guidance_every` set fewer UNet calls
        (`Request.create`); the calls of the video are in `last_unet_calls`."""
        fields = _request_fields(dict(negative_prompt=negative_prompt, steps=steps, guidance=guidance, seed=seed,
                                      height=height, width=width, frames=frames, eta=eta, sampler=sampler,
                                      use_dct=use_dct, dct_fraction=dct_fraction, dct_tau=dct_tau, fast=fast,
                                      fewer_calls=fewer_calls, cache=cache, guidance_until=guidance_until,
                                      guidance_every=guidance_every))
        return self.run(image, Request.create(prompt, bucket, motion_id, **fields), callback)

    # -- stages, bound to this animator (tests and tools call them) ------------------------------------
    def encode_z1(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return stages.encode_z1(self.backend, pixels, generator)

    def encode_prompts(self, prompt: str, negative_prompt: str, guidance: float):
        return stages.encode_prompts(self.backend, self.tokenizer, prompt, negative_prompt, guidance)

    def initial_noise(self, z1: torch.Tensor, frames: int, generator: torch.Generator,
                      dct: DCTInit | None = DCTInit()) -> torch.Tensor:
        return stages.initial_noise(z1, frames, generator, dct, self.dct_init, self.alphas_cumprod)

    # -- long videos ------------------------------------------------------------------------------------
    def animate_segments(self, image, prompt: str, segments: int, *, seed: int | None = None,
                         callback=None, **options) -> np.ndarray:
        """Chain `segments` animations, the last frame of one becoming the input of the next (the authors'
        answer to requests for longer videos, Cinemo issues #9, #13, #14). Returns all frames, the shared
        boundary frames once. `options` are `__call__`'s keywords."""
        return self.run_segments(image, Request.create(prompt, seed=seed, **_request_fields(options)), segments,
                                 callback)

    def run_segments(self, image, request: Request, segments: int, callback=None) -> np.ndarray:
        """`animate_segments` for a request: segment i runs with seed + i."""
        if segments < 1:
            raise InputError(f"segments must be at least 1; got {segments}")
        parts, timings, calls = [], {}, 0
        current = image
        request = request.resolve(self.defaults)
        for index in range(segments):
            video = self.run(current, dataclasses.replace(request, seed=request.seed + index), callback)
            parts.append(video if index == 0 else video[1:])
            current = video[-1]
            for name, sec in self.last_timings.items():
                timings[name] = timings.get(name, 0.0) + sec
            calls += self.last_unet_calls
        self.last_timings = timings
        self.last_unet_calls = calls
        return np.concatenate(parts)


def _request_fields(options: dict) -> dict:
    """`__call__`'s keywords -> `Request.create`'s (DCTInit's three become one `dct`)."""
    options = dict(options)
    use_dct = options.pop("use_dct", True)
    fraction, tau = options.pop("dct_fraction", DCT_FRACTION), options.pop("dct_tau", DCT_TAU)
    return {**options, "dct": DCTInit(fraction, tau) if use_dct else None}
