"""The model context every mode runs in: `Animator` (backend, tokenizer, schedule, DCTInit, the folder's
defaults and facts) and its entry points (docs/METHOD.md, pipeline).

`Animator.run(image, request)` animates and `Animator.run_edit(clip_frames, image, request)` edits; each is a
recipe in `cinemo_rt.modes`, chained over the request's segments. The backend (PyTorch, ONNX Runtime,
TensorRT) is chosen once, when the `Animator` is built (`backends.registry`). The keyword API
(`animator(image, prompt, bucket=3, seed=0)`, `animator.edit(video, image, prompt)`) takes the request's
own field names (`cinemo_rt.request`).
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch

from . import modes, stages
from .backends.base import Backend
from .dctinit import select_dct_init
from .errors import InputError
from .fewer_calls import load_coefficients
from .image import preprocess
from .limits import check_job_size
from .model_facts import EMPTY_PROMPT, ModelFacts
from .request import DCTInit, EditRequest, Request, check_names
from .schedule import make_schedule
from .settings import Size

log = logging.getLogger(__name__)

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

    # -- the modes ------------------------------------------------------------------------------------
    def run(self, image, request: Request, callback: Callable[[int, int, torch.Tensor], None] | None = None
            ) -> np.ndarray:
        """Animate `image`: uint8 (segments * frames + 1, H, W, 3), segment k from segment k-1's last frame."""
        request = self._begin(request)
        return self._keep(modes.chain(request.segments, image, lambda k, first_frame: modes.animate(
            self, first_frame, request.segment(k), callback)))

    def run_edit(self, clip_frames: np.ndarray, image, request: EditRequest,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None) -> np.ndarray:
        """Edit: segment k inverts the clip's k-th window (frames k*F .. (k+1)*F of `clip_frames`, which has
        segments * F + 1) and starts from the previous segment's last frame (`image` for the first; None:
        the clip's own). Returns uint8 (segments * F + 1, H, W, 3)."""
        request = self._begin(request)
        frames = request.frames
        if len(clip_frames) != request.clip_frames:
            raise InputError(f"{request.segments} segments of {frames} frames need {request.clip_frames} clip "
                             f"frames; got {len(clip_frames)}")
        return self._keep(modes.chain(request.segments, image, lambda k, first_frame: modes.edit(
            self, clip_frames[k * frames:(k + 1) * frames + 1], first_frame, request.segment(k), callback)))

    def __call__(self, image, prompt: str = "", bucket: int | None = None, *,
                 callback: Callable[[int, int, torch.Tensor], None] | None = None, **fields) -> np.ndarray:
        """The keyword API: `Request(prompt, bucket, **fields)` run (`fast=True`, `cache=0.5`, `segments=3`,
        ...); the video's UNet calls are in `last_unet_calls`."""
        check_names(Request, fields)
        return self.run(image, Request(prompt, bucket, **fields), callback)

    def edit(self, video, image=None, prompt: str | None = None, *, fps: float | None = None,
             callback: Callable[[int, int, torch.Tensor], None] | None = None, **fields) -> np.ndarray:
        """The keyword API of editing: `video` is a path (video file or folder of frames), a `Clip` or a
        (T, H, W, 3) uint8 array (`fps` gives its frame rate for `start` and the default stride); `fields`
        are `EditRequest`'s (`prompt=None` re-uses `source_prompt`; no bucket nor motion_id measures the
        clip's motion). Returns uint8 (segments * frames + 1, H, W, 3) whose first frame is `image` (or the clip's)."""
        from .clip import open_window

        check_names(EditRequest, fields)
        request = EditRequest(prompt=prompt, **fields).resolve(self.defaults)
        self.check_size(request.size, request.segments)
        clip, window = open_window(video, request, fps)
        return self.run_edit(clip.frames, image, request.measured(window.stride, measured_motion(clip.frames, request)),
                             callback)

    def _begin(self, request):
        """A job's request resolved (sizes, seed), its size checked, its prompt's warnings noted."""
        request = request.resolve(self.defaults)
        self.check_size(request.size, request.segments)
        self._note_warnings(request.prompt, request.negative_prompt)
        return request

    def _keep(self, video: modes.Video) -> np.ndarray:
        self.last_timings, self.last_unet_calls = video.timings, video.unet_calls
        return video.frames

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

    # -- what the recipes and the server's batching use ---------------------------------------------------
    def coefficients_for(self, request) -> tuple[float, ...] | None:
        if request.fewer_calls.cache is not None and self.cache_coefficients is None and not self._warned_uncalibrated:
            self._warned_uncalibrated = True
            log.warning("this checkpoint has no step-cache calibration (cinemo_rt.json \"step_cache\"): the cache "
                        "threshold applies to the raw input change; run benchmarks/calibrate_cache.py")
        return self.cache_coefficients

    def encode_z1(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return stages.encode_z1(self.backend, pixels, generator)

    def encode_prompts(self, prompt: str, negative_prompt: str, guidance: float):
        return stages.encode_prompts(self.backend, self.tokenizer, prompt, negative_prompt, guidance)

    def initial_noise(self, z1: torch.Tensor, frames: int, generator: torch.Generator,
                      dct: DCTInit | None = DCTInit()) -> torch.Tensor:
        return stages.initial_noise(z1, frames, generator, dct, self.dct_init, self.alphas_cumprod)


def measured_motion(clip_frames: np.ndarray, request: EditRequest) -> float | None:
    """The clip's motion id when the request gives neither bucket nor motion id (else None)."""
    if request.bucket is not None or request.motion_id is not None:
        return None
    return clip_motion_id(clip_frames, request.size)


def clip_motion_id(frames: np.ndarray, size: Size) -> float:
    """The motion id of the clip as the model sees it (resized and cropped to `size`), by the training rule
    clamp(floor(100 * mean consecutive SSIM), 80, 99) (docs/METHOD.md, choices); logged with its bucket."""
    from .motion import motion_intensity

    pixels = torch.cat([preprocess(frame, size.height, size.width) for frame in frames])  # (N, 3, H, W)
    ssim, motion_id, bucket = motion_intensity((pixels.permute(0, 2, 3, 1) / 2 + 0.5).clamp(0, 1))
    log.info("the clip's motion: mean consecutive SSIM %.3f -> bucket %d (motion id %d)", ssim, bucket, motion_id)
    return float(motion_id)
