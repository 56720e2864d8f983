"""The animation pipeline: image + request -> 16 uint8 frames (docs/METHOD.md, pipeline).

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
from .model_facts import EMPTY_PROMPT, ModelFacts
from .limits import check_job_size, check_segments
from .motion import bucket_to_motion_id
from .request import DCTInit, EditRequest, FewerCalls, Request
from .residuals import frames_from_residuals, residuals_from_frames
from .schedule import make_schedule
from .segments import first_frame_of_next, join, segment_seed
from .settings import DCT_FRACTION, DCT_TAU, EDIT_DCT_TAU, Size

log = logging.getLogger(__name__)


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
                 cache_coefficients: tuple[float, ...] | None = None, facts: ModelFacts | None = None,
                 folder: str | os.PathLike | None = None):
        self.backend = backend
        self.facts = facts  # the folder's size, vocabulary, training (None: built without a folder)
        self.last_warnings: list[str] = []  # what the model could not read in the last job's prompt
        self.log_warnings = True  # the CLI logs them itself, before the model loads
        self.folder = folder  # the checkpoint or engines folder: its facts size the memory estimate
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
        return cls(opened, tokenizer, Size.from_folder(folder), load_coefficients(folder),
                   ModelFacts.of_folder(folder), folder)

    @classmethod
    def from_engines(cls, folder: str | os.PathLike, backend: str = "auto", device=None, dtype=None) -> "Animator":
        """Exported graphs / engines built by `python -m export.build_engines`: TensorRT when its library,
        a GPU and engines are present, ONNX Runtime otherwise (`backend` forces one)."""
        from .backends.registry import open_engines

        opened, tokenizer = open_engines(folder, backend, device)
        animator = cls(opened, tokenizer, Size.from_folder(folder), load_coefficients(folder),
                       ModelFacts.of_folder(folder, engines=True), folder)
        animator.engines = True
        return animator

    engines = False

    def check_size(self, size: Size, segments: int = 1) -> None:
        """The size check of every entry point (`limits.check_job_size`), before anything is allocated."""
        check_job_size(self.folder, size.height, size.width, size.frames, segments, engines=self.engines,
                       dtype_bytes=torch.finfo(self.backend.dtype).bits // 8 if self.backend.dtype.is_floating_point
                       else 4, on_cpu=torch.device(self.backend.device).type == "cpu", defaults=self.defaults.as_dict())

    # -- the job --------------------------------------------------------------------------------------
    def run(self, image, request: Request, callback: Callable[[int, int, torch.Tensor], None] | None = None
            ) -> np.ndarray:
        self._note_warnings(request.prompt, request.negative_prompt)
        return self._run(image, request, callback)

    def _note_warnings(self, prompt: str, negative_prompt: str = "") -> None:
        """Once per job: what the model cannot read in the prompt (empty, unknown words), logged and kept in
        `last_warnings`."""
        if self.facts is not None:
            self.last_warnings = self.facts.prompt_warnings(prompt, negative_prompt)
        else:
            self.last_warnings = [] if prompt and prompt.strip() else [EMPTY_PROMPT]
        if self.log_warnings:
            for message in self.last_warnings:
                log.warning("%s", message)

    def _run(self, image, request: Request, callback: Callable[[int, int, torch.Tensor], None] | None = None
             ) -> np.ndarray:
        request = request.resolve(self.defaults)
        self.check_size(Size(request.height, request.width, request.frames))
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
        return self._denoise_and_decode(timer, 5, conditioning, x_T, request, generator, callback, CallCounter())

    def coefficients_for(self, request: Request) -> tuple[float, ...] | None:
        if request.fewer_calls.cache is not None and self.cache_coefficients is None and not self._warned_uncalibrated:
            self._warned_uncalibrated = True
            log.warning("this checkpoint has no step-cache calibration (cinemo_rt.json \"step_cache\"): the cache "
                        "threshold applies to the raw input change; run benchmarks/calibrate_cache.py")
        return self.cache_coefficients

    def _denoise_and_decode(self, timer: StageTimer, number: int, conditioning: stages.Conditioning,
                            x_T: torch.Tensor, request: Request, generator: torch.Generator, callback,
                            counter: CallCounter) -> np.ndarray:
        """The last three stages of every mode, numbered from `number`: denoise, decode the frames
        [z1, z1 + x_0], uint8 (F + 1, H, W, 3); the timings and UNet calls are kept in `last_*`."""
        backend, z1 = self.backend, conditioning.z1
        with timer.stage(f"{number} denoise"):
            x_0 = stages.denoise(backend, conditioning, x_T, request, generator, callback, counter=counter,
                                 cache_coefficients=self.coefficients_for(request))
        with timer.stage(f"{number + 1} decode"):
            images = stages.decode_latents(backend, frames_from_residuals(z1.to(x_0.dtype), x_0))
        with timer.stage(f"{number + 2} to uint8"):
            video = stages.to_uint8(backend, images)[0].cpu().numpy()
        self.last_timings = timer.seconds
        self.last_unet_calls = counter.calls
        return video

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

    # -- video editing and motion transfer (docs/METHOD.md, editing) -------------------------------------------------------
    def run_edit(self, clip_frames: np.ndarray, image, request: EditRequest,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None) -> np.ndarray:
        """One edit segment (`_run_edit`), its prompt warnings noted first."""
        self._note_warnings(request.target.prompt, request.target.negative_prompt)
        return self._run_edit(clip_frames, image, request, callback)

    def _run_edit(self, clip_frames: np.ndarray, image, request: EditRequest,
                  callback: Callable[[int, int, torch.Tensor], None] | None = None) -> np.ndarray:
        """Move `image` the way `clip_frames` (frames + 1, H0, W0, 3) uint8 move: invert the clip's residual
        latents under the source prompt, mix the new first frame's low frequencies in (DCTInit over the
        inverted latents), sample with the target prompt. `image=None` keeps the clip's own first frame
        (reconstruction, or re-prompting the clip). The clip's frames are resized and centre-cropped exactly
        like the image (the original feeds them uncropped at the model's size)."""
        request = request.resolve(self.defaults)
        target = request.target
        self.check_size(Size(target.height, target.width, target.frames))
        if len(clip_frames) != target.frames + 1:
            raise InputError(f"the edit needs {target.frames + 1} clip frames (frames + 1); got {len(clip_frames)}")
        generator = torch.Generator("cpu").manual_seed(target.seed)
        backend = self.backend
        timer = StageTimer(backend.device)
        with timer.stage("1 preprocess"):
            pixels = torch.cat([preprocess(frame, target.height, target.width) for frame in clip_frames])
            new_pixels = None
            if image is not None:
                picture = load_image(image)
                warn_if_aspect_differs(picture.shape, clip_frames.shape[1:], target.height, target.width)
                new_pixels = preprocess(picture, target.height, target.width)
        with timer.stage("2 encode clip"):
            # Draw order on the one generator: the clip's posterior noise, then the new image's.
            base, residuals = residuals_from_frames(stages.encode_frames(backend, pixels, generator))
        with timer.stage("3 encode image"):
            z1 = base if new_pixels is None else stages.encode_z1(backend, new_pixels, generator)
        with timer.stage("4 encode text"):
            motion = stages.motion_ids(backend, target)
            source = stages.Conditioning(base, *self.encode_prompts(request.source_prompt, target.negative_prompt,
                                                                     request.inversion_guidance), motion)
            conditioning = stages.Conditioning(z1, *self.encode_prompts(target.prompt, target.negative_prompt,
                                                                         target.guidance), motion)
        counter = CallCounter()
        with timer.stage("5 invert"):
            inverted = stages.invert_residuals(backend, source, residuals, target.steps, request.inversion_guidance,
                                               callback, counter=counter)
        with timer.stage("6 initial latents"):
            x_T = stages.mix_low_frequencies(z1, inverted, target.dct, self.dct_init, self.alphas_cumprod)
        return self._denoise_and_decode(timer, 7, conditioning, x_T, target, generator, callback, counter)

    def run_edit_segments(self, clip_frames: np.ndarray, image, request: EditRequest, segments: int,
                          callback=None) -> np.ndarray:
        """`segments` chained edits: segment k inverts the clip's k-th window (frames k*F .. (k+1)*F of
        `clip_frames`, which has segments * F + 1) and starts from the previous segment's last frame."""
        request = request.resolve(self.defaults)
        frames = request.target.frames
        if segments < 1 or len(clip_frames) != segments * frames + 1:
            raise InputError(f"{segments} segments of {frames} frames need {segments * frames + 1} clip frames; "
                             f"got {len(clip_frames)}")
        self._note_warnings(request.target.prompt, request.target.negative_prompt)

        def segment(k: int, first_frame) -> np.ndarray:
            target = dataclasses.replace(request.target, seed=segment_seed(request.target.seed, k))
            return self._run_edit(clip_frames[k * frames:(k + 1) * frames + 1], first_frame,
                                 dataclasses.replace(request, target=target), callback)

        return self._chain(segments, image, segment)

    def edit(self, video, image=None, prompt: str | None = None, *, source_prompt: str = "",
             bucket: int | None = None, motion_id: float | None = None, steps: int = Request.steps,
             guidance: float = 1.0,
             inversion_guidance: float = 1.0, dct_tau: int = EDIT_DCT_TAU, dct_fraction: float = DCT_FRACTION,
             use_dct: bool = True, seed: int | None = None, height: int | None = None, width: int | None = None,
             frames: int | None = None, stride: int | None = None, start: float = 0.0, fps: float | None = None,
             negative_prompt: str = "", segments: int = 1, callback=None) -> np.ndarray:
        """The keyword API of editing: `video` is a path (video file or folder of frames), a `Clip` or a
        (T, H, W, 3) uint8 array (`fps` gives its frame rate for `start` and the default stride). Frames are
        taken `start` seconds in, every `stride`-th (default: spanning about 2 s). `prompt=None` re-uses the
        source prompt; `bucket=None` and `motion_id=None` measure the clip's motion (SSIM rule, docs/METHOD.md, choices).
        Returns uint8 (segments * frames + 1, H, W, 3) whose first frame is `image` (or the clip's)."""
        from .clip import Clip, clip_from_array, read_clip

        size = Size(height or self.defaults.height, width or self.defaults.width, frames or self.defaults.frames)
        self.check_size(size, segments)
        count = segments * size.frames + 1
        if isinstance(video, (str, os.PathLike)):
            clip, _ = read_clip(video, count, stride, start, size.frames + 1)
        else:
            if isinstance(video, Clip):
                video, fps = video.frames, video.fps if fps is None else fps
            clip, _ = clip_from_array(video, count, stride, fps, start, size.frames + 1)
        if motion_id is None:
            motion_id = clip_motion_id(clip.frames, size) if bucket is None else bucket_to_motion_id(bucket)
        request = EditRequest.create(
            source_prompt if prompt is None else prompt, motion_id, source_prompt=source_prompt,
            inversion_guidance=inversion_guidance, guidance=guidance, steps=steps, seed=seed, height=size.height,
            width=size.width, frames=size.frames, negative_prompt=negative_prompt,
            dct=DCTInit(dct_fraction, dct_tau) if use_dct else None)
        return self.run_edit_segments(clip.frames, image, request, segments, callback)

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
        check_segments(segments)
        request = request.resolve(self.defaults)
        self._note_warnings(request.prompt, request.negative_prompt)
        return self._chain(segments, image, lambda k, first_frame: self._run(
            first_frame, dataclasses.replace(request, seed=segment_seed(request.seed, k)), callback))

    def _chain(self, segments: int, image, run_segment: Callable[[int, object], np.ndarray]) -> np.ndarray:
        """`run_segment(k, first_frame)` for k < segments, each starting from the previous one's last frame;
        all frames once (shared boundary frames once), stage timings and UNet calls summed over the segments."""
        parts, timings, calls, current = [], {}, 0, image
        for k in range(segments):
            video = run_segment(k, current)
            parts = join(parts, video)
            current = first_frame_of_next(video)
            for name, sec in self.last_timings.items():
                timings[name] = timings.get(name, 0.0) + sec
            calls += self.last_unet_calls
        self.last_timings = timings
        self.last_unet_calls = calls
        return np.concatenate(parts)


def clip_motion_id(frames: np.ndarray, size: Size) -> float:
    """The motion id of the clip as the model sees it (resized and cropped to `size`), by the training rule
    clamp(floor(100 * mean consecutive SSIM), 80, 99) (docs/METHOD.md, choices); logged with its bucket."""
    from .motion import motion_intensity

    pixels = torch.cat([preprocess(frame, size.height, size.width) for frame in frames])  # (N, 3, H, W)
    ssim, motion_id, bucket = motion_intensity((pixels.permute(0, 2, 3, 1) / 2 + 0.5).clamp(0, 1))
    log.info("the clip's motion: mean consecutive SSIM %.3f -> bucket %d (motion id %d)", ssim, bucket, motion_id)
    return float(motion_id)


def warn_if_aspect_differs(image_shape, clip_shape, height: int, width: int, tolerance: float = 0.01) -> None:
    """The image and the clip are each centre-cropped to height x width: with different aspect ratios they
    show different parts of their scenes, so the user hears about it."""
    image_aspect, clip_aspect = image_shape[1] / image_shape[0], clip_shape[1] / clip_shape[0]
    if abs(image_aspect / clip_aspect - 1) > tolerance:
        log.warning("the image is %dx%d and the clip %dx%d (aspect %.2f vs %.2f): both are centre-cropped to "
                    "%dx%d, so the crops differ", image_shape[1], image_shape[0], clip_shape[1], clip_shape[0],
                    image_aspect, clip_aspect, width, height)


def _request_fields(options: dict) -> dict:
    """`__call__`'s keywords -> `Request.create`'s (DCTInit's three become one `dct`)."""
    options = dict(options)
    use_dct = options.pop("use_dct", True)
    fraction, tau = options.pop("dct_fraction", DCT_FRACTION), options.pop("dct_tau", DCT_TAU)
    return {**options, "dct": DCTInit(fraction, tau) if use_dct else None}
