"""The one place the server touches the pipeline: requests -> prepared latents -> batched denoising -> video.

`Animator.__call__` runs one request start to end. A server wants several requests in one UNet call per
step, each with its own prompt, seed, motion id and guidance, so this adapter drives the pipeline's stages
itself: `prepare` (image and text encoding, initial noise: the Animator's stage methods, same generator
order), `step` (one UNet call for a group) and `finish` (decode, uint8).

The denoising loop is the pipeline's own `sample` (any sampler, CFG, v-prediction), run for each segment in a
thread of its own whose UNet is a stand-in: it hands its (CFG-doubled) UNet inputs to the worker and waits.
`step` concatenates the waiting inputs of a group into one real UNet call and hands each its rows back, so
the threads advance in lockstep, one at a time (never two computing at once), and each request's arithmetic
is exactly the unbatched loop's.

Fewer UNet calls (`request.FewerCalls`: step cache, guidance truncation) need nothing of the worker: they
live in the sampler's model function, above the stand-in UNet. A request whose step cache skips a step
simply passes on to its next real call before it hands anything over, and a guidance-truncated step hands
over one row (the conditional one) instead of two; `step` batches whatever rows each segment hands over.
So no request ever waits in a group for a call it will not make, requests finish after different numbers
of calls, and each still sees exactly the rows it would alone.

Bit-for-bit equality with or without companions: CPU kernels (MKL matrix products, oneDNN convolutions)
choose their blocking by batch size, so a row's result can change in the last bits when the batch grows
(measured: 4e-6 relative). With a fixed batch size the result of a row does not depend on its position or
on the other rows (measured, and tested), so every UNet call gets exactly `2 * max_batch` rows, padded with
copies of the first row: a request's video is the same alone or in any batch. The price is that a lone
request pays for the padding (on a CPU, where cost grows with rows; a GPU has idle width to spare);
`exact=False` skips the padding and batches only the rows there are. `max_batch=1` (batching off) pads
nothing for a guided request, and then matches `Animator` (the `cinemo-rt run` path) bit for bit.
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from .. import stages
from ..image import load_image, preprocess
from ..motion import bucket_from_motion_id
from ..pipeline import Animator, clip_motion_id
from ..fewer_calls import CallCounter
from ..request import FewerCalls, Request
from ..residuals import frames_from_residuals
from ..samplers import DEFAULT_SAMPLER
from ..settings import DCT_FRACTION, EDIT_DCT_TAU, Size
from ..threads import apply_threads


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


class Abandoned(Exception):
    """Raised inside a segment's sampler thread when the worker drops it (cancelled, or its batch failed)."""


@dataclass
class Segment:
    """One request's denoising, paused at a UNet call (`pending`) or finished (`x_0`). With fewer UNet calls
    a sampler may pass several steps between two calls (`steps_done` counts them; `counter` the rows it
    handed over), so a segment never waits in a group for a call it will not make."""

    request: AnimationRequest
    z1: torch.Tensor
    segment: int = 0
    frames_so_far: list[np.ndarray] = field(default_factory=list)
    pending: tuple | None = None      # the UNet inputs the sampler waits on
    x_0: torch.Tensor | None = None
    steps_done: int = 0
    counter: CallCounter = field(default_factory=CallCounter)
    to_worker: queue.Queue = field(default_factory=queue.Queue)
    to_sampler: queue.Queue = field(default_factory=queue.Queue)

    @property
    def done(self) -> bool:
        return self.x_0 is not None

    @property
    def rows(self) -> int:
        return self.pending[0].shape[0]

    def advance(self) -> None:
        """Wait for the sampler thread's next UNet call, or its result."""
        kind, value = self.to_worker.get()
        if kind == "error":
            raise value
        if kind == "call":
            self.pending = value
        else:
            self.pending, self.x_0 = None, value

    def unet(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The sampler thread's UNet: hand the inputs over, wait for the rows of the batched call."""
        self.to_worker.put(("call", inputs))
        reply = self.to_sampler.get()
        if reply is None:
            raise Abandoned()
        return reply


class Runner:
    """Owns an Animator for the worker thread: prepare, step groups, finish."""

    def __init__(self, animator: Animator, max_batch: int = 1, exact: bool = True):
        self.animator = animator
        self.backend = animator.backend
        self.max_rows = 2 * max_batch
        self.exact = exact  # every UNet call has max_rows rows (see the module docstring)

    @classmethod
    def open(cls, checkpoint=None, engines=None, device=None, dtype=None, max_batch: int = 1,
             exact: bool = True, threads: int | None = None) -> "Runner":
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
                              eta=r.eta, seed=r.seed + segment, sampler=r.sampler, fewer_calls=r.fewer_calls)

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
        # the sampler thread's backend: the real one, with the stand-in UNet
        stand_in = SimpleNamespace(unet=seg.unet, device=b.device, dtype=b.dtype, info=b.info)
        coefficients = a.coefficients_for(r)

        def count_step(i: int, t: int, x: torch.Tensor) -> None:
            seg.steps_done = i + 1  # read by the worker once `advance` returns (the queue orders it)

        def run() -> None:
            try:
                with torch.no_grad():
                    x_0 = stages.denoise(stand_in, conditioning, x_T, r, generator, count_step, counter=seg.counter,
                                         cache_coefficients=coefficients)
                    seg.to_worker.put(("done", x_0))
            except Abandoned:
                pass
            except Exception as err:  # noqa: BLE001 - re-raised in the worker by `advance`
                seg.to_worker.put(("error", err))

        threading.Thread(target=run, name="cinemo-sampler", daemon=True).start()
        seg.advance()
        return seg

    @torch.no_grad()
    def step(self, group: list[Segment]) -> None:
        """One UNet call for every segment in `group` (equal batch keys), each segment's rows as its sampler
        laid them out ([uncond, cond], or [cond] at guidance 1), padded to the fixed row count."""
        rows = sum(s.rows for s in group)
        if rows > self.max_rows:
            raise ValueError(f"{rows} rows exceed the {self.max_rows} of one UNet call")
        inputs = [torch.cat([s.pending[i] for s in group]) for i in range(5)]
        if self.exact and rows < self.max_rows:
            inputs = [torch.cat([x, x[:1].expand(self.max_rows - rows, *x.shape[1:])]) for x in inputs]
        try:
            out = self.backend.unet(*inputs)
        except Exception:
            for s in group:
                self.abandon(s)
            raise
        start = 0
        for s in group:
            s.to_sampler.put(out[start:start + s.rows])
            start += s.rows
        for s in group:
            s.advance()

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
        """Stop a segment's sampler thread, waiting on its UNet call (a finished thread ignores this)."""
        s.pending = None
        s.to_sampler.put(None)

    @torch.no_grad()
    def finish(self, s: Segment) -> np.ndarray:
        """Decode a finished segment -> uint8 frames (F + 1, H, W, 3)."""
        images = stages.decode_latents(self.backend, frames_from_residuals(s.z1.to(s.x_0.dtype), s.x_0))
        return stages.to_uint8(self.backend, images)[0].cpu().numpy()

    def join(self, s: Segment, video: np.ndarray) -> list[np.ndarray]:
        """Frames so far with this segment's appended (the shared boundary frame once)."""
        return s.frames_so_far + [video if s.segment == 0 else video[1:]]
