"""One animation request, built once by the CLI or the Python API and read by every stage (no torch
import here: the CLI builds it before any model is loaded)."""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from dataclasses import dataclass

from . import validate
from .errors import InputError
from .samplers import DEFAULT_SAMPLER, SAMPLERS, needs_unconditional, stochastic_samplers
from .settings import DCT_FRACTION, DCT_TAU, EDIT_DCT_TAU, NUM_TRAIN_TIMESTEPS, Size

log = logging.getLogger(__name__)

CACHE_REUSE = ("extrapolate", "output")
REFERENCE_STEPS = 50  # the original's DDIM steps: the default, and the reference the savings are measured against


@dataclass(frozen=True)
class DCTInit:
    """DCTInit settings (docs/METHOD.md, DCTInit): the low-pass box fraction and the noise level of the kept frequencies."""

    fraction: float = DCT_FRACTION
    tau: int = DCT_TAU

    def __post_init__(self):
        if not 0 < validate.finite(self.fraction, "dct_fraction") <= 1 or not 0 <= self.tau < NUM_TRAIN_TIMESTEPS:
            raise InputError(f"DCTInit fraction must be in (0, 1] and tau in 0..{NUM_TRAIN_TIMESTEPS - 1}; "
                             f"got {self.fraction} and {self.tau}")


@dataclass(frozen=True)
class FewerCalls:
    """How to save UNet calls. `cache`: accumulated estimated relative output change under which a step
    skips the UNet (None: every step calls it); `cache_reuse`: "extrapolate" or "output" (what a skipped
    step returns). `guidance_until`: fraction of the steps, counted from the first, that run both CFG
    branches (1.0: all of them); after it, `guidance_every` N refreshes the guidance direction on every
    N-th step (None: never)."""

    cache: float | None = None
    guidance_until: float = 1.0
    guidance_every: int | None = None
    cache_reuse: str = "extrapolate"

    def __post_init__(self):
        if self.cache is not None and not (math.isfinite(self.cache) and self.cache >= 0):
            raise InputError(f"cache threshold must be a number >= 0 (e.g. 0.1); got {self.cache}")
        if not 0.0 <= self.guidance_until <= 1.0:  # NaN included
            raise InputError(f"guidance_until must be a fraction of the steps in 0..1; got {self.guidance_until}")
        if self.guidance_every is not None and self.guidance_every < 1:
            raise InputError(f"guidance_every must be a whole number of steps >= 1; got {self.guidance_every}")
        if self.cache_reuse not in CACHE_REUSE:
            raise InputError(f"cache_reuse must be one of {CACHE_REUSE}; got {self.cache_reuse!r}")

    @property
    def is_off(self) -> bool:
        return self.cache is None and self.guidance_until >= 1.0


@dataclass(frozen=True)
class Preset:
    steps: int
    fewer_calls: FewerCalls
    sampler: str = DEFAULT_SAMPLER


# Chosen from the measured Pareto front on the demo model (benchmarks/results/fewer_calls.md): 11.5 UNet calls
# (8.7x fewer than 50-step DDIM + CFG) at 38 dB against it; guidance truncation was dominated there.
FAST_PRESET = Preset(steps=20, fewer_calls=FewerCalls(cache=0.5), sampler="dpmpp-2m")
ORIGINAL = Preset(steps=REFERENCE_STEPS, fewer_calls=FewerCalls())


def resolve_options(fast: bool, steps: int | None, sampler: str | None = None, fewer_calls: FewerCalls | None = None,
                    **overrides) -> tuple[int, str, FewerCalls]:
    """Steps, sampler and options of one video: the fast preset's (or the original's), each replaced where
    given (`fewer_calls` whole, then each override that is not None: cache, guidance_until, guidance_every,
    cache_reuse)."""
    base = FAST_PRESET if fast else ORIGINAL
    options = fewer_calls or base.fewer_calls
    options = dataclasses.replace(options, **{k: v for k, v in overrides.items() if v is not None})
    return (base.steps if steps is None else steps), sampler or base.sampler, options


@dataclass(frozen=True)
class Request:
    """What to generate. Sizes left None take the model folder's defaults (`resolve`); a None seed is drawn
    (and logged) there. `dct=None` starts from plain Gaussian noise."""

    prompt: str
    motion_id: float
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    frames: int | None = None  # generated frames; the video has frames + 1
    steps: int = REFERENCE_STEPS
    guidance: float = 7.5
    eta: float = 0.0
    seed: int | None = None
    sampler: str = DEFAULT_SAMPLER
    dct: DCTInit | None = DCTInit()
    fewer_calls: FewerCalls = FewerCalls()  # off: every step calls the UNet with both CFG branches

    def __post_init__(self):
        validate.finite(self.motion_id, "motion_id")
        validate.finite(self.guidance, "guidance")
        validate.finite(self.eta, "eta")
        validate.text(self.prompt, "the prompt")
        validate.text(self.negative_prompt, "the negative prompt")
        if not 1 <= self.steps <= NUM_TRAIN_TIMESTEPS:  # more steps than the schedule has timesteps mean nothing
            raise InputError(f"steps must be in 1..{NUM_TRAIN_TIMESTEPS}; got {self.steps}")
        if self.frames is not None and self.frames < 1:
            raise InputError(f"frames must be at least 1; got {self.frames}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.eta < 0 or (self.eta and not SAMPLERS[self.sampler].stochastic):
            raise InputError(f"eta must be >= 0 and applies to the {' and '.join(stochastic_samplers())} "
                             f"sampler only; got {self.eta} with {self.sampler}")

    @classmethod
    def create(cls, prompt: str, bucket: int | None = 9, motion_id: float | None = None, *, fast: bool = False,
               steps: int | None = None, sampler: str | None = None, fewer_calls: FewerCalls | None = None,
               cache: float | None = None, guidance_until: float | None = None, guidance_every: int | None = None,
               **fields) -> "Request":
        """A request from a user's bucket 0..19 (or a raw motion id, which wins). `fast` takes the steps,
        sampler and options of `FAST_PRESET`; `steps`, `sampler`, `fewer_calls` and the single options
        override them."""
        from .motion import bucket_to_motion_id

        motion = validate.finite(motion_id, "motion_id") if motion_id is not None else bucket_to_motion_id(bucket)
        steps, sampler, options = resolve_options(fast, steps, sampler, fewer_calls, cache=cache,
                                                  guidance_until=guidance_until, guidance_every=guidance_every)
        return cls(prompt=prompt, motion_id=motion, steps=steps, sampler=sampler, fewer_calls=options, **fields)

    @property
    def classifier_free(self) -> bool:
        return needs_unconditional(self.guidance)

    def resolve(self, defaults: Size) -> "Request":
        """Sizes filled from `defaults` and a seed drawn if none was given."""
        seed = self.seed
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            log.info("seed %d (pass --seed %d to reproduce this video)", seed, seed)
        return dataclasses.replace(self, height=self.height or defaults.height, width=self.width or defaults.width,
                                   frames=self.frames or defaults.frames, seed=seed)


@dataclass(frozen=True)
class EditRequest:
    """A video edit (docs/METHOD.md, editing): invert a clip's motion under `source_prompt` (and its own first frame), then
    sample `target` from those latents with a new first frame. The target's DCTInit runs over the inverted
    latents, at tau 985 by default; guidance is 1 in both stages by default, as the original script."""

    target: Request
    source_prompt: str = ""
    inversion_guidance: float = 1.0

    def __post_init__(self):
        validate.finite(self.inversion_guidance, "inversion_guidance")
        validate.text(self.source_prompt, "the source prompt")

    @classmethod
    def create(cls, prompt: str, motion_id: float, *, source_prompt: str = "", inversion_guidance: float = 1.0,
               guidance: float = 1.0, dct: DCTInit | None = DCTInit(DCT_FRACTION, EDIT_DCT_TAU),
               **fields) -> "EditRequest":
        target = Request(prompt=prompt, motion_id=float(motion_id), guidance=guidance, dct=dct, **fields)
        return cls(target, source_prompt, inversion_guidance)

    def resolve(self, defaults: Size) -> "EditRequest":
        return dataclasses.replace(self, target=self.target.resolve(defaults))
