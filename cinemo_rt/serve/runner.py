"""The one place the server touches the pipeline: requests -> prepared latents -> batched denoising -> video.

`Animator.__call__` runs one request start to end. A server wants several requests in one UNet call per
step, each with its own prompt, seed, motion id and guidance, so this adapter drives the pipeline's stages
itself: `prepare` (image and text encoding, initial noise: the Animator's stage methods, same generator
order), `step` (one DDIM step for a group: every request's CFG batch concatenated into one UNet call, then
the per-request guidance and `ddim_step` from `cinemo_rt.sampling`) and `finish` (decode, uint8).

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

import random
from dataclasses import dataclass, field

import numpy as np
import torch

from ..components import images_to_uint8
from ..image import InputError, load_image, preprocess
from ..motion import bucket_to_motion_id
from ..pipeline import DCT_FRACTION, DCT_TAU, DECODE_CHUNK, Animator, Defaults, reconstruct
from ..sampling import PREDICTION_TYPES, _alpha_bar, ddim_step, eps_from_v
from ..schedule import ddim_timesteps


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

    def resolved(self, d: Defaults) -> "AnimationRequest":
        """The model's defaults filled in (and a seed drawn), so the stored request reproduces the video."""
        seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**31)
        return AnimationRequest(**{**self.__dict__, "seed": seed, "height": self.height or d.height,
                                   "width": self.width or d.width, "frames": self.frames or d.frames})

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share a UNet call (same latent shape and step schedule)."""
        return (self.height, self.width, self.frames, self.steps, self.eta > 0)


@dataclass
class Segment:
    """One request's denoising state between steps."""

    request: AnimationRequest
    z1: torch.Tensor
    text: torch.Tensor
    text_uncond: torch.Tensor | None
    motion: torch.Tensor
    x_t: torch.Tensor
    generator: torch.Generator
    timesteps: list[int]
    index: int = 0  # steps done in this segment
    frames_so_far: list[np.ndarray] = field(default_factory=list)
    segment: int = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def rows(self) -> int:
        return 1 if self.text_uncond is None else 2


class Runner:
    """Owns an Animator for the worker thread: prepare, step groups, finish."""

    def __init__(self, animator: Animator, max_batch: int = 1, exact: bool = True):
        self.animator = animator
        self.backend = animator.backend
        self.max_rows = 2 * max_batch
        self.exact = exact  # every UNet call has max_rows rows (see the module docstring)
        if self.backend.info.prediction_type not in PREDICTION_TYPES:
            raise InputError(f"unknown prediction type {self.backend.info.prediction_type!r}")

    @classmethod
    def open(cls, checkpoint=None, engines=None, device=None, dtype=None, max_batch: int = 1,
             exact: bool = True) -> "Runner":
        if engines:
            return cls(Animator.from_engines(engines, device=device), max_batch, exact)
        if checkpoint is None:
            from ..defaults import default_checkpoint

            checkpoint = default_checkpoint()
        return cls(Animator.from_checkpoint(checkpoint, device=device, dtype=dtype), max_batch, exact)

    @property
    def defaults(self):
        return self.animator.defaults

    def check_image(self, image) -> np.ndarray:
        return load_image(image)

    @torch.no_grad()
    def prepare(self, image: np.ndarray, request: AnimationRequest, segment: int = 0,
                frames_so_far: list[np.ndarray] | None = None) -> Segment:
        """Stages 1-4 of the pipeline for one segment, drawing from the generator in the Animator's order.
        Segment k uses seed + k, as `Animator.animate_segments` does."""
        a, r = self.animator, request
        if r.steps < 1 or r.frames < 1:
            raise InputError("steps and frames must be at least 1")
        generator = torch.Generator("cpu").manual_seed(r.seed + segment)
        pixels = preprocess(load_image(image), r.height, r.width)
        z1 = a.encode_z1(pixels, generator)
        text, text_uncond = a.encode_prompts(r.prompt, r.negative_prompt, r.guidance)
        x_T = a.initial_noise(z1, r.frames, generator, True, DCT_FRACTION, DCT_TAU)
        dtype, device = self.backend.dtype, self.backend.device
        motion = float(r.motion_id) if r.motion_id is not None else bucket_to_motion_id(r.bucket)
        return Segment(request=r, z1=z1.to(device, dtype), text=text, text_uncond=text_uncond,
                       motion=torch.full((1,), motion, dtype=torch.float32, device=device),
                       x_t=x_T.to(device, dtype), generator=generator,
                       timesteps=ddim_timesteps(r.steps).tolist(), segment=segment,
                       frames_so_far=list(frames_so_far or []))

    @torch.no_grad()
    def step(self, group: list[Segment]) -> None:
        """One denoising step for every segment in `group` (equal batch keys) in one UNet call. Each
        segment's rows are [uncond, cond] (or [cond] at guidance 1), as `cfg_model_fn` lays them out."""
        xs, ts, texts, z1s, motions = [], [], [], [], []
        for s in group:
            t = s.timesteps[s.index]
            texts += [s.text_uncond, s.text] if s.text_uncond is not None else [s.text]
            for _ in range(s.rows):
                xs.append(s.x_t)
                ts.append(torch.full((1,), t, dtype=torch.long, device=s.x_t.device))
                z1s.append(s.z1)
                motions.append(s.motion)
        if len(xs) > self.max_rows:
            raise ValueError(f"{len(xs)} rows exceed the {self.max_rows} of one UNet call")
        inputs = [xs, ts, texts, z1s, motions]
        for rows in inputs:
            rows += rows[:1] * ((self.max_rows if self.exact else len(xs)) - len(rows))
        out = self.backend.unet(*(torch.cat(rows) for rows in inputs))
        row = 0
        for s in group:
            eps = out[row:row + s.rows]
            row += s.rows
            if s.rows == 2:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + s.request.guidance * (eps_c - eps_u)
            t = s.timesteps[s.index]
            t_prev = s.timesteps[s.index + 1] if s.index + 1 < len(s.timesteps) else -1
            if self.backend.info.prediction_type == "v_prediction":
                eps = eps_from_v(eps, s.x_t, _alpha_bar(self.animator.alphas_cumprod, t))
            s.x_t = ddim_step(eps, t, t_prev, s.x_t, self.animator.alphas_cumprod, eta=s.request.eta,
                              generator=s.generator)
            s.index += 1

    @torch.no_grad()
    def finish(self, s: Segment) -> np.ndarray:
        """Decode a finished segment -> uint8 frames (F + 1, H, W, 3)."""
        info = self.backend.info
        latents = reconstruct(s.z1.to(s.x_t.dtype), s.x_t)
        images = self.backend.decode(latents, chunk=DECODE_CHUNK if info.temporal_vae else None)
        return images_to_uint8(images, rounding=not info.temporal_vae)[0].cpu().numpy()

    def join(self, s: Segment, video: np.ndarray) -> list[np.ndarray]:
        """Frames so far with this segment's appended (the shared boundary frame once)."""
        return s.frames_so_far + [video if s.segment == 0 else video[1:]]
