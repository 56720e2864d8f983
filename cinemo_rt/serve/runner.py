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

from dataclasses import dataclass, field
from typing import Generator

import numpy as np
import torch

from .. import segments, stages
from ..clip import open_window
from ..fewer_calls import CallCounter
from ..image import load_image, preprocess
from ..model_calls import UNetCall
from ..pipeline import Animator
from ..request import EditRequest, Request
from ..residuals import frames_from_residuals
from ..threads import apply_threads
from .batching import padded_rows


def batch_key(request: Request) -> tuple:
    """Requests with equal keys share UNet calls (same latent shape; same steps, so they finish together)."""
    return (request.height, request.width, request.frames, request.steps, request.sampler)


@dataclass
class Segment:
    """One request's denoising, paused at a UNet call (`pending`) or finished (`x_0`). With fewer UNet calls
    a sampler may pass several steps between two calls (`steps_done` counts them; `counter` the rows it
    asked for), so a segment never waits in a group for a call it will not make."""

    request: Request  # the job's, resolved
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

    @torch.no_grad()
    def prepare(self, image: np.ndarray, request: Request, segment: int = 0,
                frames_so_far: list[np.ndarray] | None = None) -> Segment:
        """Stages 1-4 of the pipeline for one segment of a resolved request, drawing from the generator in
        the animate recipe's order (`modes.animate`); segment k is `request.segment(k)`, as `Animator.run`'s."""
        a, b = self.animator, self.backend
        r = request.segment(segment)
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

    def edit(self, clip_path, image, request: EditRequest, callback=None) -> np.ndarray:
        """One whole edit, un-batched: `Animator.run_edit` over the clip window the request names (its stride
        and motion measured when it was submitted), so the video is the CLI's bit for bit. `callback(i, t, x)`
        runs after every inversion and sampling step (it may raise to stop the edit)."""
        clip, _ = open_window(clip_path, request)
        return self.animator.run_edit(clip.frames, image, request, callback)

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
