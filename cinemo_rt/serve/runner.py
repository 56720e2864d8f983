"""The one place the server touches the pipeline: requests -> prepared latents -> batched denoising -> video.

`Animator.__call__` runs one request start to end. A server wants several requests in one UNet call per
step, each with its own prompt, seed, motion id and guidance, so this adapter drives the pipeline's stages
itself: `prepare` (image and text encoding, initial noise: the Animator's stage methods, same generator
order), `step` (one UNet call for a group) and `finish` (decode, uint8).

The denoising of each segment is the pipeline's own generator of UNet calls (`stages.denoising`: any
sampler, CFG, v-prediction, fewer UNet calls; the step protocol of `model_calls.py`), paused at its next
call. `step` concatenates the pending calls of a group into one real UNet call and sends each generator its
rows, so each request's arithmetic is exactly the unbatched loop's. A request whose step cache skips a step
simply reaches its next real call before it pauses, and a guidance-truncated step asks for one row (the
conditional one) instead of two; so no request waits in a group for a call it will not make, and requests
finish after different numbers of calls.

Padding (`serve.batching.padded_rows`). CPU kernels (MKL matrix products, oneDNN convolutions) choose their
blocking by batch size, so a row's result can change in the last bits when the batch grows (measured: 4e-6
relative); with a fixed batch size it does not depend on its position or on the other rows (measured, and
tested). By default a UNet call is padded (with copies of its first row) only up to the next power of two rows:
a request served alone pays for no absent rows, and a batched video agrees with the same request alone to within
2 levels of 255 (tested). `exact=True` pads every call to `2 * max_batch` rows instead: a request's video is then
bit for bit the same alone or in any batch, at the price of a lone request computing `max_batch` times its rows
(benchmarks/results/serving.md). `max_batch=1` (batching off) pads nothing for a guided request, and then matches
`Animator` (the `cinemo-rt run` path) bit for bit; so does a lone guided request by default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Generator

import numpy as np
import torch

from .. import stages
from ..image import load_image, preprocess
from ..motion import bucket_from_motion_id
from ..pipeline import Animator, clip_motion_id
from ..fewer_calls import CallCounter
from ..model_calls import UNetCall
from ..request import FewerCalls, Request
from ..residuals import frames_from_residuals
from .. import segments
from ..samplers import DEFAULT_SAMPLER
from ..segments import segment_seed
from ..settings import DCT_FRACTION, EDIT_DCT_TAU, Size
from ..threads import apply_threads
from .batching import padded_rows


@dataclass(frozen=True)
class AnimationRequest:
    """What a client may set; None means the model's default (size, frames) or a drawn seed."""

    prompt: str
    bucket: int | None = 9
    motion_id: float | None = None
    negative_prompt: str = ""
    steps: int = 50
    guidance: float = 7.5
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    segments: int = 1
    eta: float = 0.0
    sampler: str = DEFAULT_SAMPLER
    cache: float | None = None      # fewer UNet calls (`request.FewerCalls`); batch like any other request
    guidance_until: float = 1.0
    guidance_every: int | None = None

    def resolved(self, d: Size) -> "AnimationRequest":
        """The model's defaults filled in (and a seed drawn), so the stored request reproduces the video."""
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**31)
        return AnimationRequest(**{**self.__dict__, "seed": seed, "height": self.height or d.height,
                                   "width": self.width or d.width, "frames": self.frames or d.frames})

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys share UNet calls (same latent shape; same steps, so they finish together)."""
        return (self.height, self.width, self.frames, self.steps, self.sampler)

    @property
    def fewer_calls(self) -> FewerCalls:
        return FewerCalls(cache=self.cache, guidance_until=self.guidance_until, guidance_every=self.guidance_every)


@dataclass(frozen=True)
class EditJobRequest:
    """What a client may set for an edit (`Animator.edit`'s keywords); None means the model's default (size,
    frames), a drawn seed, or for bucket and motion_id together: measured on the clip (auto)."""

    prompt: str
    source_prompt: str = ""
    bucket: int | None = None
    motion_id: float | None = None
    negative_prompt: str = ""
    steps: int = Request.steps
    guidance: float = 1.0
    inversion_guidance: float = 1.0
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    stride: int | None = None
    start: float = 0.0
    segments: int = 1
    use_dct: bool = True
    eta = 0.0  # not a field: inversion and sampling are deterministic DDIM (the checks read it)

    def resolved(self, d: Size) -> "EditJobRequest":
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**31)
        return EditJobRequest(**{**self.__dict__, "seed": seed, "height": self.height or d.height,
                                 "width": self.width or d.width, "frames": self.frames or d.frames})

    def measured(self, clip, window) -> "EditJobRequest":
        """The stride the clip's window uses and, for bucket auto, the bucket measured on its frames (as
        `Animator.edit` would): stored with the job, the status shows them and the request reproduces the video."""
        bucket = self.bucket
        if bucket is None and self.motion_id is None:
            bucket = bucket_from_motion_id(clip_motion_id(clip.frames, Size(self.height, self.width, self.frames)))
        return EditJobRequest(**{**self.__dict__, "bucket": bucket, "stride": window.stride})

    @property
    def clip_frames(self) -> int:
        """Frames the edit reads from the clip: each segment's frames + 1, the boundary frames shared."""
        return self.segments * self.frames + 1


@dataclass
class Segment:
    """One request's denoising, paused at a UNet call (`pending`) or finished (`x_0`). With fewer UNet calls
    a sampler may pass several steps between two calls (`steps_done` counts them; `counter` the rows it
    asked for), so a segment never waits in a group for a call it will not make."""

    request: AnimationRequest
    z1: torch.Tensor
    segment: int = 0
    frames_so_far: list[np.ndarray] = field(default_factory=list)
    denoising: Generator[UNetCall, torch.Tensor, torch.Tensor] | None = None
    pending: UNetCall | None = None   # the UNet call the denoising waits on
    x_0: torch.Tensor | None = None
    steps_done: int = 0
    counter: CallCounter = field(default_factory=CallCounter)

    @property
    def done(self) -> bool:
        return self.x_0 is not None

    @property
    def rows(self) -> int:
        return self.pending.rows

    def advance(self, reply: torch.Tensor | None = None) -> None:
        """Run the denoising with the UNet's rows for its pending call (None: start it) up to its next UNet
        call, or its end."""
        try:
            self.pending = self.denoising.send(reply)
        except StopIteration as done:
            self.pending, self.x_0 = None, done.value


class Runner:
    """Owns an Animator for the worker thread: prepare, step groups, finish."""

    def __init__(self, animator: Animator, max_batch: int = 1, exact: bool = False):
        self.animator = animator
        self.backend = animator.backend
        self.max_rows = 2 * max_batch
        self.exact = exact  # every UNet call has max_rows rows (see the module docstring)

    @classmethod
    def open(cls, checkpoint=None, engines=None, device=None, dtype=None, max_batch: int = 1,
             exact: bool = False, threads: int | None = None) -> "Runner":
        """The model from a checkpoint (default: the embedded demo) or an engines folder, with the CLI's
        CPU thread policy (`cinemo_rt.threads`: one thread for a small model, else one per core)."""
        if engines:
            animator = Animator.from_engines(engines, device=device)
        else:
            if checkpoint is None:
                from ..defaults import default_checkpoint

                checkpoint = default_checkpoint()
            animator = Animator.from_checkpoint(checkpoint, device=device, dtype=dtype)
        unet = getattr(getattr(animator.backend, "checkpoint", None), "unet", None)
        parameters = sum(p.numel() for p in unet.parameters()) if isinstance(unet, torch.nn.Module) else None
        apply_threads(parameters, threads)
        return cls(animator, max_batch, exact)

    @property
    def defaults(self):
        return self.animator.defaults

    @property
    def facts(self):
        return self.animator.facts

    def check_image(self, image) -> np.ndarray:
        return load_image(image)

    @staticmethod
    def pipeline_request(r: AnimationRequest, segment: int = 0) -> Request:
        """The pipeline's `Request` for one segment (seed + k for segment k, as `Animator.run_segments`);
        raises InputError for what the pipeline refuses."""
        return Request.create(r.prompt, r.bucket, r.motion_id, negative_prompt=r.negative_prompt,
                              height=r.height, width=r.width, frames=r.frames, steps=r.steps, guidance=r.guidance,
                              eta=r.eta, seed=segment_seed(r.seed, segment), sampler=r.sampler, fewer_calls=r.fewer_calls)

    @torch.no_grad()
    def prepare(self, image: np.ndarray, request: AnimationRequest, segment: int = 0,
                frames_so_far: list[np.ndarray] | None = None) -> Segment:
        """Stages 1-4 of the pipeline for one segment, drawing from the generator in the Animator's order.
        Segment k uses seed + k, as `Animator.animate_segments` does."""
        a, b = self.animator, self.backend
        r = self.pipeline_request(request, segment)
        generator = torch.Generator("cpu").manual_seed(r.seed)
        pixels = preprocess(load_image(image), r.height, r.width)
        z1 = stages.encode_z1(b, pixels, generator)
        text, text_uncond = stages.encode_prompts(b, a.tokenizer, r.prompt, r.negative_prompt, r.guidance)
        conditioning = stages.Conditioning(z1, text, text_uncond, stages.motion_ids(b, r))
        x_T = a.initial_noise(z1, r.frames, generator, r.dct)
        seg = Segment(request=request, z1=z1, segment=segment, frames_so_far=list(frames_so_far or []))

        def count_step(i: int, t: int, x: torch.Tensor) -> None:
            seg.steps_done = i + 1

        seg.denoising = stages.denoising(b, conditioning, x_T, r, generator, count_step, counter=seg.counter,
                                         cache_coefficients=a.coefficients_for(r))
        seg.advance()
        return seg

    @torch.no_grad()
    def step(self, group: list[Segment]) -> None:
        """One UNet call for every segment in `group` (equal batch keys), each segment's rows as its sampler
        laid them out ([uncond, cond], or [cond] at guidance 1), padded as `padded_rows` says."""
        rows = sum(s.rows for s in group)
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows exceed the {self.max_rows} of one UNet call")
        inputs = [torch.cat(parts) for parts in zip(*(s.pending.inputs for s in group))]
        padded = padded_rows(rows, self.max_rows, self.exact)
        if padded > rows:
            inputs = [torch.cat([x, x[:1].expand(padded - rows, *x.shape[1:])]) for x in inputs]
        try:
            out = self.backend.unet(*inputs)
        except Exception:
            for s in group:
                self.abandon(s)
            raise
        start = 0
        for s in group:
            rows_of_s = s.rows
            s.advance(out[start:start + rows_of_s])
            start += rows_of_s

    def edit(self, clip_path, image, r: EditJobRequest, callback=None) -> np.ndarray:
        """One whole edit, un-batched: `Animator.edit` itself (inversion and sampling call the real UNet),
        so the video is the CLI's bit for bit. `callback(i, t, x)` runs after every inversion and sampling
        step (it may raise to stop the edit)."""
        return self.animator.edit(
            clip_path, image, r.prompt, source_prompt=r.source_prompt, bucket=r.bucket, motion_id=r.motion_id,
            steps=r.steps, guidance=r.guidance, inversion_guidance=r.inversion_guidance, dct_tau=EDIT_DCT_TAU,
            dct_fraction=DCT_FRACTION, use_dct=r.use_dct, seed=r.seed, height=r.height, width=r.width,
            frames=r.frames, stride=r.stride, start=r.start, negative_prompt=r.negative_prompt,
            segments=r.segments, callback=callback)

    def abandon(self, s: Segment) -> None:
        """Drop a segment's denoising (cancelled, or its batch failed)."""
        if s.denoising is not None:
            s.denoising.close()
        s.pending = None

    @torch.no_grad()
    def finish(self, s: Segment) -> np.ndarray:
        """Decode a finished segment -> uint8 frames (F + 1, H, W, 3)."""
        images = stages.decode_latents(self.backend, frames_from_residuals(s.z1.to(s.x_0.dtype), s.x_0))
        return stages.to_uint8(self.backend, images)[0].cpu().numpy()

    def join(self, s: Segment, video: np.ndarray) -> list[np.ndarray]:
        """Frames so far with this segment's appended (the shared boundary frame once)."""
        return segments.join(s.frames_so_far, video)
