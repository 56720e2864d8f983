"""The modes, each a short recipe over the stages (`cinemo_rt.stages`): animate an image, edit a video.

A recipe takes the model context (`pipeline.Animator`: backend, tokenizer, schedule, DCTInit), a resolved
request and its inputs, and returns a `Video`: the uint8 frames with the stage timings and UNet calls of
their making. Chained segments (docs/METHOD.md, longer videos) are one function, `chain`, for every mode.
Adding a mode is a recipe here and a method on `Animator` (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from . import stages
from .backends.base import Backend
from .errors import InputError
from .fewer_calls import CallCounter
from .image import load_image, preprocess
from .request import EditRequest, Request
from .residuals import frames_from_residuals, residuals_from_frames
from .segments import first_frame_of_next, join

log = logging.getLogger(__name__)
StepCallback = Callable[[int, int, torch.Tensor], None]


class Context(Protocol):
    """What a recipe needs of the model context (`pipeline.Animator` is one)."""

    backend: Backend
    dct_init: Callable
    alphas_cumprod: torch.Tensor

    def encode_prompts(self, prompt: str, negative_prompt: str, guidance: float): ...

    def initial_noise(self, z1: torch.Tensor, frames: int, generator: torch.Generator, dct) -> torch.Tensor: ...

    def coefficients_for(self, request) -> tuple[float, ...] | None: ...


@dataclass
class Video:
    """A mode's result: uint8 frames (N, H, W, 3), wall seconds per stage, single-image UNet calls."""

    frames: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    unet_calls: int = 0


@dataclass
class StageTimer:
    """Wall time per stage, in seconds; synchronises CUDA at stage ends so the numbers mean something."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        yield
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def animate(ctx: Context, image, request: Request, callback: StepCallback | None = None) -> Video:
    """One segment: image -> z1 (with its posterior noise), text, initial noise (DCTInit), then
    `denoise_and_decode`. `request` is resolved (sizes and seed set)."""
    generator = torch.Generator("cpu").manual_seed(request.seed)  # one CPU stream of draws: reproducible
    backend = ctx.backend
    timer = StageTimer(backend.device)
    with timer.stage("1 preprocess"):
        pixels = preprocess(load_image(image), request.height, request.width)
    with timer.stage("2 encode image"):
        z1 = stages.encode_z1(backend, pixels, generator)
    with timer.stage("3 encode text"):
        conditioning = stages.Conditioning(z1, *ctx.encode_prompts(request.prompt, request.negative_prompt,
                                                                    request.guidance),
                                           stages.motion_ids(backend, request))
    with timer.stage("4 initial noise"):
        x_T = ctx.initial_noise(z1, request.frames, generator, request.dct)
    return denoise_and_decode(ctx, timer, 5, conditioning, x_T, request, generator, callback, CallCounter())


def edit(ctx: Context, clip_frames: np.ndarray, image, request: EditRequest,
         callback: StepCallback | None = None) -> Video:
    """One edit segment (docs/METHOD.md, editing): invert the clip's residual latents under the source
    prompt, mix the new first frame's low frequencies into them (DCTInit), sample with the prompt.
    `clip_frames` (frames + 1, H0, W0, 3) uint8 are resized and centre-cropped exactly like the image;
    `image=None` keeps the clip's own first frame (reconstruction, or re-prompting the clip)."""
    if len(clip_frames) != request.frames + 1:
        raise InputError(f"the edit needs {request.frames + 1} clip frames (frames + 1); got {len(clip_frames)}")
    generator = torch.Generator("cpu").manual_seed(request.seed)
    backend = ctx.backend
    timer = StageTimer(backend.device)
    with timer.stage("1 preprocess"):
        pixels = torch.cat([preprocess(frame, request.height, request.width) for frame in clip_frames])
        new_pixels = None
        if image is not None:
            picture = load_image(image)
            warn_if_aspect_differs(picture.shape, clip_frames.shape[1:], request.height, request.width)
            new_pixels = preprocess(picture, request.height, request.width)
    with timer.stage("2 encode clip"):
        # Draw order on the one generator: the clip's posterior noise, then the new image's.
        base, residuals = residuals_from_frames(stages.encode_frames(backend, pixels, generator))
    with timer.stage("3 encode image"):
        z1 = base if new_pixels is None else stages.encode_z1(backend, new_pixels, generator)
    with timer.stage("4 encode text"):
        motion = stages.motion_ids(backend, request)
        source = stages.Conditioning(base, *ctx.encode_prompts(request.source_prompt, request.negative_prompt,
                                                                request.inversion_guidance), motion)
        conditioning = stages.Conditioning(z1, *ctx.encode_prompts(request.prompt, request.negative_prompt,
                                                                    request.guidance), motion)
    counter = CallCounter()
    with timer.stage("5 invert"):
        inverted = stages.invert_residuals(backend, source, residuals, request.steps, request.inversion_guidance,
                                           callback, counter=counter)
    with timer.stage("6 initial latents"):
        x_T = stages.mix_low_frequencies(z1, inverted, request.dct, ctx.dct_init, ctx.alphas_cumprod)
    return denoise_and_decode(ctx, timer, 7, conditioning, x_T, request, generator, callback, counter)


def denoise_and_decode(ctx: Context, timer: StageTimer, number: int, conditioning: stages.Conditioning,
                       x_T: torch.Tensor, request: Request | EditRequest, generator: torch.Generator,
                       callback: StepCallback | None, counter: CallCounter) -> Video:
    """The last three stages of every mode, numbered from `number`: denoise, decode the frames
    [z1, z1 + x_0], uint8 (F + 1, H, W, 3)."""
    backend, z1 = ctx.backend, conditioning.z1
    with timer.stage(f"{number} denoise"):
        x_0 = stages.denoise(backend, conditioning, x_T, request, generator, callback, counter=counter,
                             cache_coefficients=ctx.coefficients_for(request))
    with timer.stage(f"{number + 1} decode"):
        images = stages.decode_latents(backend, frames_from_residuals(z1.to(x_0.dtype), x_0))
    with timer.stage(f"{number + 2} to uint8"):
        frames = stages.to_uint8(backend, images)[0].cpu().numpy()
    return Video(frames, timer.seconds, counter.calls)


def chain(segments: int, image, run_segment: Callable[[int, object], Video]) -> Video:
    """`run_segment(k, first_frame)` for k < segments, each starting from the previous one's last frame
    (docs/METHOD.md, longer videos): all frames, the shared boundary frames once, with the stage timings
    and UNet calls summed over the segments."""
    parts: list[np.ndarray] = []
    timings: dict[str, float] = {}
    calls, current = 0, image
    for k in range(segments):
        video = run_segment(k, current)
        parts = join(parts, video.frames)
        current = first_frame_of_next(video.frames)
        for name, seconds in video.timings.items():
            timings[name] = timings.get(name, 0.0) + seconds
        calls += video.unet_calls
    return Video(np.concatenate(parts), timings, calls)


def warn_if_aspect_differs(image_shape, clip_shape, height: int, width: int, tolerance: float = 0.01) -> None:
    """The image and the clip are each centre-cropped to height x width: with different aspect ratios they
    show different parts of their scenes, so the user hears about it."""
    image_aspect, clip_aspect = image_shape[1] / image_shape[0], clip_shape[1] / clip_shape[0]
    if abs(image_aspect / clip_aspect - 1) > tolerance:
        log.warning(
            "the image is %dx%d and the clip %dx%d (aspect %.2f vs %.2f): both are centre-cropped to %dx%d, so "
            "the crops differ", image_shape[1], image_shape[0], clip_shape[1], clip_shape[0], image_aspect,
            clip_aspect, width, height)
