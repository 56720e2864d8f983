"""Model evaluations as generators of UNet calls: the step protocol every sampler and loop shares.

An *evaluation* answers "eps at (x_t, t)" for a sampler. It is a generator that yields each `UNetCall` it
needs, receives the UNet's output for it, and returns eps:

    def evaluate(x_t, t):                    # an `Evaluate`
        out = yield UNetCall(x_t, t, ...)     # the caller runs the UNet (alone, or batched with others)
        return out                            # eps for the sampler

Wrappers stack on it the way model-function wrappers do in k-diffusion (classifier-free guidance here,
v -> eps here, step caching and guidance truncation in `fewer_calls.py`), but the UNet is never called by
them: whoever drives the generator calls it. So the CLI's loop (`run_with_unet`), inversion and the server's
continuous batching (several requests' pending calls concatenated into one) are plain loops over the same
generators, and the arithmetic of a request is the same in all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator

import torch

from .samplers import needs_unconditional
from .schedule import PREDICTION_TYPES

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class UNetCall:
    """One UNet evaluation in Cinemo's contract: x_t (B, 4, F, h, w), t (B,) long, text (B, 77, D),
    z1 (B, 4, 1, h, w), motion_id (B,) float; B rows."""

    x_t: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    z1: torch.Tensor
    motion_id: torch.Tensor

    @property
    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.x_t, self.t, self.text, self.z1, self.motion_id

    @property
    def rows(self) -> int:
        return int(self.x_t.shape[0])


Evaluation = Generator[UNetCall, torch.Tensor, torch.Tensor]
Evaluate = Callable[[torch.Tensor, torch.Tensor], Evaluation]


def run_with_unet(evaluation: Generator[UNetCall, torch.Tensor, object], unet_fn: UNetFn):
    """Drive a generator of UNet calls with `unet_fn` to its end; returns what it returns."""
    try:
        call = next(evaluation)
        while True:
            call = evaluation.send(unet_fn(*call.inputs))
    except StopIteration as done:
        return done.value


def relay(evaluation: Generator[UNetCall, torch.Tensor, object], on_call: Callable[[UNetCall], None] | None = None,
          on_reply: Callable[[torch.Tensor], None] | None = None):
    """Pass an evaluation's UNet calls through unchanged, showing each call and each reply to the hooks
    (counting calls, reading the raw output); returns what the evaluation returns."""
    try:
        call = next(evaluation)
        while True:
            if on_call is not None:
                on_call(call)
            reply = yield call
            if on_reply is not None:
                on_reply(reply)
            call = evaluation.send(reply)
    except StopIteration as done:
        return done.value


def guided(*, text: torch.Tensor, text_uncond: torch.Tensor | None, z1: torch.Tensor, motion_id: torch.Tensor,
           guidance: float) -> Evaluate:
    """Classifier-free guidance: one doubled UNet call, unconditional half first (as `cat([negative,
    positive])` in the original); z1 and the motion id are in both halves, so the image latent conditions the
    unconditional branch too. eps = eps_u + g (eps_c - eps_u); with g == 1 that is eps_c, one plain call."""
    if not needs_unconditional(guidance):
        def conditional(x_t: torch.Tensor, t: torch.Tensor) -> Evaluation:
            return (yield UNetCall(x_t, t, text, z1, motion_id))

        return conditional
    if text_uncond is None:
        raise ValueError("classifier-free guidance (guidance != 1) needs text_uncond (the negative prompt)")
    # Conditioning is fixed over the loop: double it once.
    text_both = torch.cat([text_uncond, text])  # (2B, 77, D)
    z1_both = torch.cat([z1, z1])  # (2B, 4, 1, h, w)
    motion_both = torch.cat([motion_id, motion_id])  # (2B,)

    def both(x_t: torch.Tensor, t: torch.Tensor) -> Evaluation:
        eps = yield UNetCall(torch.cat([x_t, x_t]), torch.cat([t, t]), text_both, z1_both, motion_both)
        eps_u, eps_c = eps.chunk(2)  # (B, 4, F, h, w) each
        return eps_u + guidance * (eps_c - eps_u)

    return both


def as_epsilon(evaluate: Evaluate, prediction_type: str, alphas_cumprod: torch.Tensor) -> Evaluate:
    """An evaluation returning `prediction_type` -> one returning eps (the samplers' contract):
    eps = sqrt(a_t) v + sqrt(1 - a_t) x_t for a v-predicting model."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}; got {prediction_type!r}")
    if prediction_type == "epsilon":
        return evaluate
    tables: dict[torch.device, torch.Tensor] = {}  # the float64 table, once per device

    def eps_evaluation(x_t: torch.Tensor, t: torch.Tensor) -> Evaluation:
        table = tables.setdefault(x_t.device, alphas_cumprod.to(x_t.device))
        a_t = table[t].view(-1, *([1] * (x_t.dim() - 1)))  # (B, 1, 1, 1, 1) float64, no host sync
        dtype = torch.promote_types(x_t.dtype, torch.float32)
        v = yield from evaluate(x_t, t)
        return (a_t.sqrt().to(dtype) * v + (1.0 - a_t).sqrt().to(dtype) * x_t).to(x_t.dtype)

    return eps_evaluation


# -- the callable (k-diffusion style) faces of the same functions ----------------------------------------
def model_fn_of(evaluate: Evaluate, unet_fn: UNetFn | None = None) -> ModelFn:
    """`model_fn(x_t, t) -> eps` that runs `evaluate`'s UNet calls with `unet_fn` right away."""
    return lambda x_t, t: run_with_unet(evaluate(x_t, t), unet_fn)


def evaluation_of(model_fn: ModelFn) -> Evaluate:
    """A plain `model_fn` as an evaluation that makes no UNet call of its own."""
    def evaluate(x_t: torch.Tensor, t: torch.Tensor) -> Evaluation:
        return model_fn(x_t, t)
        yield  # unreachable: makes this a generator function

    return evaluate


def cfg_model_fn(unet_fn: UNetFn, *, text: torch.Tensor, text_uncond: torch.Tensor | None, z1: torch.Tensor,
                 motion_id: torch.Tensor, guidance: float) -> ModelFn:
    """Classifier-free guidance (`guided`) as a `model_fn(x_t, t) -> eps` closure over `unet_fn`."""
    return model_fn_of(guided(text=text, text_uncond=text_uncond, z1=z1, motion_id=motion_id, guidance=guidance),
                       unet_fn)


def epsilon_model_fn(model_fn: ModelFn, prediction_type: str, alphas_cumprod: torch.Tensor) -> ModelFn:
    """`model_fn` returning `prediction_type` -> a model function returning eps (`as_epsilon`)."""
    evaluate = as_epsilon(evaluation_of(model_fn), prediction_type, alphas_cumprod)
    return model_fn if prediction_type == "epsilon" else model_fn_of(evaluate)
