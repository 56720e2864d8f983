"""Fewer UNet calls per video: step caching and guidance truncation as evaluation wrappers.

Everything here keeps the step protocol of `model_calls.py` (an evaluation yields the UNet calls it needs and
returns the model output), so it works over any backend and under any sampler that evaluates the model once
per step (DDIM, DPM-Solver++(2M)), in the CLI's loop and in the server's batches alike:

- `CallCounter` counts single-image UNet calls (a batch-2 CFG call counts 2).
- `truncated_guidance`: classifier-free guidance for the first `guidance_until` fraction of the steps
  (and optionally every N-th step after), the conditional branch alone on the others plus the last measured
  guidance direction eps_c - eps_u held fixed (FasterCache-style reuse of the unconditional branch): those
  steps cost one call instead of two.
- `StepCache`: TeaCache-style output caching. A cheap indicator per step, the relative L1 change of the
  model input x_t since the previous step, is rescaled by a polynomial fitted per checkpoint (the estimated
  relative change of the model *output*; `benchmarks/calibrate_cache.py`) and accumulated; while the sum
  stays under `threshold` the UNet is skipped and the output is extrapolated from the last two computed
  ones (TaylorSeer-like, first order) or reused; else the UNet is called and the sum resets. The first and
  the last step are always computed.

The options (`FewerCalls`) and the measured preset behind `cinemo-rt run --fast` (`FAST_PRESET`) live in
`request.py`, which the CLI reads without importing torch. Off (`FewerCalls()`: no cache, guidance on every
step), `fewer_calls_evaluation` is plain guidance (`model_calls.guided`), bit for bit the original's path.

Host synchronisation: the cache decision needs the indicator on the host, one small `.item()` per step
(on CUDA one device sync per step). It is taken here, between UNet calls, never inside the backend's
`unet_fn` (which the torch-fast backend may replay as a captured CUDA graph). Guidance truncation decides
by step index and never syncs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .model_calls import Evaluate, Evaluation, ModelFn, UNetCall, UNetFn, guided, model_fn_of, relay
from .request import FAST_PRESET, REFERENCE_STEPS, FewerCalls  # noqa: F401 (re-exported)
from .settings import SIZE_FILE as CONFIG_FILE
from .settings import STEP_CACHE_KEY as CALIBRATION_KEY

log = logging.getLogger(__name__)

IDENTITY = (1.0, 0.0)  # uncalibrated: the input change itself stands for the output change


@dataclass
class StepClock:
    """The index of the current sampling step, advanced once per model evaluation by the outermost wrapper
    (`ticking`), so the inner ones agree on it even when the cache skips the UNet."""

    step: int = 0

    def ticking(self, evaluate: Evaluate) -> Evaluate:
        def ticked(x_t: torch.Tensor, t: torch.Tensor) -> Evaluation:
            out = yield from evaluate(x_t, t)
            self.step += 1
            return out

        return ticked


@dataclass
class CallCounter:
    """Single-image UNet calls: each call adds its batch size (CFG's doubled batch of one image adds 2)."""

    calls: int = 0

    def count(self, call: UNetCall) -> None:
        self.calls += call.rows

    def wrap(self, unet_fn: UNetFn) -> UNetFn:
        """`unet_fn`, counted (for loops that call a UNet function directly)."""
        def counted(x_t, t, text, z1, motion_id):
            self.calls += int(x_t.shape[0])
            return unet_fn(x_t, t, text, z1, motion_id)

        return counted


def guided_step(step: int, steps: int, options: FewerCalls) -> bool:
    """Whether `step` runs both CFG branches: the first ceil(guidance_until * steps) steps (at least one: the
    direction reused later must have been measured), and then every `guidance_every`-th step if set."""
    if step < max(1, math.ceil(options.guidance_until * steps - 1e-9)):
        return True
    return options.guidance_every is not None and step % options.guidance_every == 0


def truncated_guidance(options: FewerCalls, *, text: torch.Tensor, text_uncond: torch.Tensor | None,
                       z1: torch.Tensor, motion_id: torch.Tensor, guidance: float, steps: int,
                       clock: StepClock) -> Evaluate:
    """CFG on the steps `guided` picks; on the others the conditional branch alone (one call instead of two)
    plus the guidance direction d = eps_c - eps_u of the last guided step, held fixed:
    eps_u + g (eps_c - eps_u) = eps_c + (g - 1) d. With guidance 1, or guidance on every step, it is
    `model_calls.guided` itself."""
    both = guided(text=text, text_uncond=text_uncond, z1=z1, motion_id=motion_id, guidance=guidance)
    if guidance == 1.0 or options.guidance_until >= 1.0:
        return both
    conditional = guided(text=text, text_uncond=None, z1=z1, motion_id=motion_id, guidance=1.0)
    state: dict[str, torch.Tensor] = {}

    def keep_direction(out: torch.Tensor) -> None:  # CFG's doubled output: [eps_u, eps_c]
        eps_u, eps_c = out.chunk(2)
        state["direction"] = eps_c - eps_u

    def evaluate(x_t: torch.Tensor, t: torch.Tensor) -> Evaluation:
        if guided_step(clock.step, steps, options) or "direction" not in state:
            return (yield from relay(both(x_t, t), on_reply=keep_direction))
        eps_c = yield from conditional(x_t, t)
        return eps_c + (guidance - 1.0) * state["direction"]

    return evaluate


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean |a - b| / mean |b| as a 0-d fp32 tensor on a's device."""
    return (a.float() - b.float()).abs().mean() / b.float().abs().mean().clamp_min(1e-12)


def polynomial(coefficients: Sequence[float], x: float) -> float:
    """numpy.polyval on host floats (highest power first)."""
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


@dataclass
class StepCache:
    """TeaCache-style output caching around the evaluation `evaluate` (see the module docstring). Stateful: build one per
    video. `coefficients` (highest power first) map the relative L1 change of the model input between
    consecutive steps to the estimated relative L1 change of the output. A skipped step returns the last
    computed output, or with `reuse="extrapolate"` (the default: +4 to +7 dB at equal calls on the demo
    model, benchmarks/results/fewer_calls.md) its linear extrapolation from the last two computed outputs
    over the step index."""

    evaluate: Evaluate
    threshold: float
    steps: int
    clock: StepClock
    coefficients: Sequence[float] = IDENTITY
    reuse: str = "extrapolate"
    accumulated: float = 0.0
    skipped: list[int] = field(default_factory=list)
    _previous_x: torch.Tensor | None = None
    _computed: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # last two (step, output)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> Evaluation:
        step = self.clock.step
        compute = not self._computed or step >= self.steps - 1
        if not compute:
            # The one host sync per step (a 0-d reduction), taken between UNet calls.
            change = float(relative_l1(x_t, self._previous_x))
            self.accumulated += max(polynomial(self.coefficients, change), 0.0)
            compute = self.accumulated >= self.threshold
        self._previous_x = x_t
        if compute:
            self.accumulated = 0.0
            out = yield from self.evaluate(x_t, t)
            self._computed = [*self._computed[-1:], (step, out)]
            return self._computed[-1][1]
        self.skipped.append(step)
        last_step, last = self._computed[-1]
        if self.reuse != "extrapolate" or len(self._computed) < 2:
            return last
        before_step, before = self._computed[0]
        return last + (last - before) * ((step - last_step) / (last_step - before_step))


def fewer_calls_evaluation(options: FewerCalls, *, text: torch.Tensor, text_uncond: torch.Tensor | None,
                           z1: torch.Tensor, motion_id: torch.Tensor, guidance: float, steps: int,
                           coefficients: Sequence[float] = IDENTITY) -> Evaluate:
    """The evaluation for one video: CFG (truncated per `options`), then step caching. Off (`FewerCalls()`)
    it is `model_calls.guided` itself: the default path is the original's, bit for bit."""
    clock = StepClock()
    evaluate = truncated_guidance(options, text=text, text_uncond=text_uncond, z1=z1, motion_id=motion_id,
                                  guidance=guidance, steps=steps, clock=clock)
    if options.cache is not None:
        evaluate = StepCache(evaluate, threshold=options.cache, steps=steps, clock=clock,
                             coefficients=tuple(coefficients), reuse=options.cache_reuse)
    return evaluate if options.is_off else clock.ticking(evaluate)


def wrap_model_fn(unet_fn: UNetFn, options: FewerCalls, **kwargs) -> ModelFn:
    """`fewer_calls_evaluation` as a `model_fn(x_t, t)` calling `unet_fn` directly (benchmarks, tests)."""
    return model_fn_of(fewer_calls_evaluation(options, **kwargs), unet_fn)


# -- calibration stored with the checkpoint ---------------------------------------------------------------
def load_coefficients(folder: str | os.PathLike | None) -> tuple[float, ...] | None:
    """The fitted indicator polynomial from `folder/cinemo_rt.json` (key "step_cache"), None if absent.
    Other keys of the file are left to their readers."""
    from .files import FileFormatError, read_json

    path = Path(folder) / CONFIG_FILE if folder else None
    if path is None or not path.is_file():
        return None
    entry = read_json(path).get(CALIBRATION_KEY)
    if entry is None:
        return None
    coefficients = entry.get("coefficients") if isinstance(entry, dict) else None
    if (not isinstance(coefficients, list) or not 1 <= len(coefficients) <= MAX_COEFFICIENTS
            or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c)
                   for c in coefficients)):
        raise FileFormatError(f"{path}: {CALIBRATION_KEY}.coefficients must be a list of 1..{MAX_COEFFICIENTS} "
                              f"finite numbers, got {coefficients!r}; run benchmarks/calibrate_cache.py again or "
                              f"remove the {CALIBRATION_KEY!r} entry")
    return tuple(float(c) for c in coefficients)


MAX_COEFFICIENTS = 16  # a fitted polynomial's degree is small (benchmarks/calibrate_cache.py fits 2)


def store_calibration(folder: str | os.PathLike, entry: dict) -> Path:
    """Merge `entry` under "step_cache" into `folder/cinemo_rt.json`, keeping every other key (temp then
    rename: a reader never sees half a file)."""
    path = Path(folder) / CONFIG_FILE
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data[CALIBRATION_KEY] = entry
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
