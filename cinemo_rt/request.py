"""What to generate: `Request` (animate an image) and `EditRequest` (move a new first frame the way a clip
moves), the one vocabulary of every entry point.

The fields are the vocabulary: the CLI's flags (`--negative-prompt` for `negative_prompt`), the HTTP form
fields, the Ray app's and the Python API's keywords, and the stored job all use these names, and every
value check and limit lives here, once (`__post_init__`), so each entry point refuses exactly the same
values with the same message. What depends on the model (its default size, the memory a size needs) is
checked by `resolve` and `limits.check_job_size`. No torch import: the CLI builds a request before any
model loads.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import numbers
import random
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from . import validate
from .errors import InputError
from .motion import NUM_BUCKETS, bucket_to_motion_id
from .samplers import DEFAULT_SAMPLER, SAMPLERS, needs_unconditional, stochastic_samplers
from .settings import DCT_FRACTION, DCT_TAU, EDIT_DCT_TAU, NUM_TRAIN_TIMESTEPS, Size

log = logging.getLogger(__name__)

CACHE_REUSE = ("extrapolate", "output")
REFERENCE_STEPS = 50  # the original's DDIM steps: the default, and the reference the savings are measured against
DEFAULT_BUCKET = 9
MAX_STEPS = NUM_TRAIN_TIMESTEPS  # more steps than the schedule has timesteps mean nothing
MAX_GUIDANCE = 100.0  # 7.5 is usual; far beyond, every pixel saturates
MAX_PROMPT_CHARS = 10_000  # the text encoder reads 77 tokens (the rest is cut, with a warning); far longer is a mistake
LATENT_MULTIPLE = 8  # output sides must be divisible by the VAE's factor (8 for the released model)
AUTO = "auto"  # an edit's bucket measured on its clip


@dataclass(frozen=True)
class DCTInit:
    """DCTInit settings (docs/METHOD.md, DCTInit): the low-pass box fraction and the noise level of the kept frequencies."""

    fraction: float = DCT_FRACTION
    tau: int = DCT_TAU

    def __post_init__(self):
        if not 0 < validate.finite(self.fraction, "dct_fraction") <= 1:
            raise InputError(f"dct_fraction must be in (0, 1]; got {self.fraction}")
        if not 0 <= self.tau < NUM_TRAIN_TIMESTEPS:
            raise InputError(f"dct_tau must be in 0..{NUM_TRAIN_TIMESTEPS - 1}; got {self.tau}")


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
            raise InputError(f"cache threshold must be a number >= 0 (e.g. 0.5); got {self.cache}")
        if not 0.0 <= self.guidance_until <= 1.0:  # NaN included
            raise InputError(f"guidance_until must be a fraction of the steps in 0..1; got {self.guidance_until}")
        if self.guidance_every is not None and self.guidance_every < 1:
            raise InputError(f"guidance_every must be a whole number of steps >= 1; got {self.guidance_every}")
        if self.cache_reuse not in CACHE_REUSE:
            raise InputError(f"cache_reuse must be one of {', '.join(CACHE_REUSE)}; got {self.cache_reuse!r}")

    @property
    def is_off(self) -> bool:
        return self.cache is None and self.guidance_until >= 1.0

    def as_fields(self) -> dict:
        """These options as a `Request`'s fields (`Request(prompt, **options.as_fields())`)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Preset:
    steps: int
    fewer_calls: FewerCalls
    sampler: str = DEFAULT_SAMPLER


# Chosen from the measured Pareto front on the demo model (benchmarks/results/fewer_calls.md): 11.5 UNet calls
# (8.7x fewer than 50-step DDIM + CFG) at 38 dB against it; guidance truncation was dominated there.
FAST_PRESET = Preset(steps=20, fewer_calls=FewerCalls(cache=0.5), sampler="dpmpp-2m")
ORIGINAL = Preset(steps=REFERENCE_STEPS, fewer_calls=FewerCalls())

# What each field means, for the CLI's --help and the HTTP API's schema alike.
FIELD_HELP = {
    "prompt": "text describing the video (an edit's default: source_prompt)",
    "bucket": f"motion intensity 0..{NUM_BUCKETS - 1}, larger = more motion (default {DEFAULT_BUCKET}; an edit's "
              "default, auto, measures the clip's)",
    "motion_id": "raw motion id instead of bucket, for other checkpoints (the released model uses 99 - bucket)",
    "negative_prompt": "what to steer away from (the unconditional prompt when guidance is not 1)",
    "height": f"output height, a multiple of {LATENT_MULTIPLE} (default: the model's)",
    "width": f"output width, a multiple of {LATENT_MULTIPLE} (default: the model's)",
    "frames": "frames to generate after the first, per segment (default: the model's)",
    "segments": "chain N segments, each starting from the previous one's last frame",
    "steps": f"sampling steps (default {REFERENCE_STEPS}, or {FAST_PRESET.steps} with fast)",
    "guidance": "classifier-free guidance scale (1 turns it off)",
    "seed": "random seed; drawn and reported when absent (segment k uses seed + k)",
    "use_dct": "DCTInit: start from the image's low frequencies (false: plain Gaussian noise)",
    "dct_fraction": "DCTInit low-pass box, a fraction of each side",
    "dct_tau": "DCTInit noise level of the kept frequencies",
    "sampler": f"one of {', '.join(SAMPLERS)} (default {DEFAULT_SAMPLER}, or {FAST_PRESET.sampler} with fast)",
    "eta": "DDIM's fresh noise per step, 0..1 (0: deterministic)",
    "fast": "the preset measured on the demo model: fewer steps, DPM-Solver++(2M) and the step cache "
            "(the fields given override it)",
    "cache": "step cache: skip the UNet while the accumulated estimated output change stays under this "
             "threshold (e.g. 0.5; 0 = off in effect)",
    "cache_reuse": f"what a skipped step returns: {' or '.join(CACHE_REUSE)}",
    "guidance_until": "fraction 0..1 of the steps that run both CFG branches (1: all)",
    "guidance_every": "after guidance_until, refresh the guidance direction every N-th step",
    "source_prompt": "text describing the source clip (for the inversion)",
    "inversion_guidance": "classifier-free guidance of the inversion (1 = off, as the original)",
    "stride": "use every K-th frame of the clip (default: the stride spanning about 2 s per segment)",
    "start": "seconds into the clip to start",
}


@dataclass(frozen=True)
class _Job:
    """The fields every kind of job shares, and their checks."""

    prompt: str | None = None
    bucket: int | None = None
    motion_id: float | None = None
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    frames: int | None = None  # generated frames; the video has frames + 1 per segment
    segments: int = 1
    steps: int | None = None
    guidance: float = 7.5
    seed: int | None = None
    use_dct: bool = True
    dct_fraction: float = DCT_FRACTION
    dct_tau: int = DCT_TAU

    measures_motion = False  # no bucket nor motion id: measured on a clip (edits), not the default bucket
    prompt_fields = ("prompt", "negative_prompt")  # text checked as prompts (valid UTF-8, no NUL, bounded)

    def __post_init__(self):
        _check_types(self)
        for name in self.prompt_fields:
            text = getattr(self, name)
            validate.text(text, name)
            if len(text) > MAX_PROMPT_CHARS:
                raise InputError(f"{name} has {len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
        if self.bucket is not None and self.motion_id is not None:
            raise InputError("give bucket or motion_id, not both (motion_id is the raw id a bucket maps to)")
        if self.bucket is not None and not 0 <= self.bucket < NUM_BUCKETS:
            raise InputError(f"bucket must be a whole number in 0..{NUM_BUCKETS - 1} (larger = more motion)"
                             + (", or auto (measured on the clip)" if self.measures_motion else "")
                             + f"; got {self.bucket}")
        validate.finite(self.motion_id or 0.0, "motion_id")
        # The ceilings (side, frames, segments, memory) depend on the model: `limits.check_job_size`, which
        # every entry point calls on the resolved request.
        for name in ("height", "width"):
            side = getattr(self, name)
            if side is not None and not (side > 0 and side % LATENT_MULTIPLE == 0):
                raise InputError(f"{name} must be positive and divisible by {LATENT_MULTIPLE} (the VAE's factor); "
                                 f"got {side}")
        if self.frames is not None and self.frames < 1:
            raise InputError(f"frames must be at least 1; got {self.frames}")
        if self.segments < 1:
            raise InputError(f"segments must be at least 1; got {self.segments}")
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise InputError(f"steps must be in 1..{MAX_STEPS}; got {self.steps}")
        _check_guidance(self.guidance, "guidance")
        if self.seed is not None:
            validate.seed(self.seed, self.segments)
        DCTInit(self.dct_fraction, self.dct_tau)  # its own checks

    @property
    def motion(self) -> float:
        """The motion id the model sees: `motion_id`, else the bucket's (99 - bucket), else the default bucket's."""
        if self.motion_id is not None:
            return float(self.motion_id)
        if self.bucket is None and self.measures_motion:
            raise InputError("the clip's motion has not been measured; give bucket or motion_id")
        return bucket_to_motion_id(DEFAULT_BUCKET if self.bucket is None else self.bucket)

    @property
    def dct(self) -> DCTInit | None:
        return DCTInit(self.dct_fraction, self.dct_tau) if self.use_dct else None

    @property
    def classifier_free(self) -> bool:
        return needs_unconditional(self.guidance)

    def resolve(self, defaults: Size):
        """Sizes filled from the model's `defaults` and a seed drawn if none was given: the request that
        reproduces the video."""
        seed = self.seed
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
            log.info("seed %d (pass --seed %d to reproduce this video)", seed, seed)
        return dataclasses.replace(self, height=self.height or defaults.height, width=self.width or defaults.width,
                                   frames=self.frames or defaults.frames, seed=seed)

    def segment(self, k: int):
        """The request of segment k of a chained video: seed + k (docs/METHOD.md, longer videos)."""
        from .segments import segment_seed

        return dataclasses.replace(self, seed=segment_seed(self.seed, k), segments=1)

    @property
    def size(self) -> Size:
        return Size(self.height, self.width, self.frames)

    def as_dict(self) -> dict[str, Any]:
        """The fields by name (what a server stores; `from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]):
        """A request from a mapping that may hold other keys (a stored job's format, scale and kind)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names})


@dataclass(frozen=True)
class Request(_Job):
    """Animate an image. `Request("the camera pans left", bucket=3)`; `fast=True` takes the steps, sampler
    and step cache of `FAST_PRESET` where they are not given."""

    prompt: str = ""
    sampler: str | None = None
    eta: float = 0.0
    fast: bool = False
    cache: float | None = None
    cache_reuse: str = "extrapolate"
    guidance_until: float = 1.0
    guidance_every: int | None = None

    def __post_init__(self):
        # The preset fills what was not given, here, so the request (stored, logged) says what runs.
        preset = FAST_PRESET if self.fast else ORIGINAL
        if self.steps is None:
            object.__setattr__(self, "steps", preset.steps)
        if self.sampler is None:
            object.__setattr__(self, "sampler", preset.sampler)
        if self.cache is None and self.fast:
            object.__setattr__(self, "cache", preset.fewer_calls.cache)
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        validate.finite(self.eta, "eta")
        if not 0 <= self.eta <= 1 or (self.eta and not SAMPLERS[self.sampler].stochastic):
            raise InputError(f"eta must be in 0..1 and applies to the {' and '.join(stochastic_samplers())} "
                             f"sampler only; got {self.eta} with {self.sampler}")
        self.fewer_calls  # its own checks

    @property
    def fewer_calls(self) -> FewerCalls:
        return FewerCalls(cache=self.cache, guidance_until=self.guidance_until, guidance_every=self.guidance_every,
                          cache_reuse=self.cache_reuse)


@dataclass(frozen=True)
class EditRequest(_Job):
    """A video edit (docs/METHOD.md, editing): invert a clip's motion under `source_prompt` (and its own first
    frame), then sample `prompt` from those latents with a new first frame. No bucket nor motion id: the
    clip's motion is measured (`measured`). Guidance is 1 in both stages and DCTInit runs over the inverted
    latents at tau 985 by default, as the original script; inversion and sampling are deterministic DDIM."""

    guidance: float = 1.0
    dct_tau: int = EDIT_DCT_TAU
    source_prompt: str = ""
    inversion_guidance: float = 1.0
    stride: int | None = None
    start: float = 0.0

    measures_motion = True
    prompt_fields = ("prompt", "negative_prompt", "source_prompt")
    sampler = DEFAULT_SAMPLER  # not fields: what the stages read of an animation request
    eta = 0.0
    fewer_calls = FewerCalls()

    def __post_init__(self):
        if self.prompt is None:  # re-prompting with the source prompt: reconstruction or motion transfer
            object.__setattr__(self, "prompt", self.source_prompt)
        if self.steps is None:
            object.__setattr__(self, "steps", REFERENCE_STEPS)
        super().__post_init__()
        _check_guidance(self.inversion_guidance, "inversion_guidance")
        if self.stride is not None and self.stride < 1:
            raise InputError(f"stride must be at least 1 (every stride-th frame of the clip); got {self.stride}")
        if not validate.finite(self.start, "start") >= 0:
            raise InputError(f"start must be >= 0 seconds into the clip; got {self.start}")

    @property
    def clip_frames(self) -> int:
        """Frames the edit reads from the clip: each segment's frames + 1, the boundary frames shared."""
        return self.segments * self.frames + 1

    def measured(self, stride: int, motion_id: float | None = None) -> "EditRequest":
        """With the stride the clip's window uses and, for a measured motion, its bucket (or motion id when
        outside the buckets): the request that reproduces the video, stored and shown with the job."""
        from .motion import bucket_from_motion_id

        changes: dict[str, Any] = {"stride": stride}
        if motion_id is not None and self.bucket is None and self.motion_id is None:
            try:
                changes["bucket"] = bucket_from_motion_id(motion_id)
            except ValueError:
                changes["motion_id"] = motion_id
        return dataclasses.replace(self, **changes)


def check_names(kind: type[_Job], names, also: tuple[str, ...] = ()) -> None:
    """Refuse a name that is no field of `kind` (nor one of `also`), naming the nearest field: a misspelt option
    must not be dropped silently (the CLI's parser refuses unknown flags the same way)."""
    import difflib

    known = [item.name for item in dataclasses.fields(kind)] + list(also)
    for name in names:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=1)
            raise InputError(f"unknown field {name!r} for {kind.__name__}"
                             + (f"; did you mean {near[0]!r}?" if near else f"; the fields are {', '.join(known)}"))


def parse_bucket(value: str | int | None) -> int | None:
    """A bucket as text ("3", or "auto" for None: measured on an edit's clip) -> int or None."""
    if value is None or (isinstance(value, str) and value.strip().lower() == AUTO):
        return None
    try:
        return int(value)
    except ValueError:
        raise InputError(f"bucket must be a whole number in 0..{NUM_BUCKETS - 1} or auto; got {value!r}") from None


TRUE_TEXTS, FALSE_TEXTS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_text(kind: type[_Job], name: str, text: str) -> Any:
    """The value of field `name` from the text a user typed: the one decoder of a CLI flag and an HTTP form
    field. Empty text is the field's default (a form's unset field); the request checks the value."""
    text = text.strip() if field_types(kind)[name] is not str else text
    if text == "":
        return next(f.default for f in dataclasses.fields(kind) if f.name == name)
    value_type = field_types(kind)[name]
    if name == "bucket" and kind.measures_motion:
        return parse_bucket(text)
    if value_type is bool:
        if text.lower() not in TRUE_TEXTS + FALSE_TEXTS:
            raise InputError(f"{name} must be true or false; got {text!r}")
        return text.lower() in TRUE_TEXTS
    if value_type is int:
        try:
            return int(text)
        except ValueError:
            raise InputError(f"{name} must be a whole number; got {text!r}") from None
    if value_type is float:
        try:
            return float(text)
        except ValueError:
            raise InputError(f"{name} must be a number; got {text!r}") from None
    return text


@functools.cache
def field_types(kind: type[_Job]) -> dict[str, type]:
    """Each field's value type (None allowed or not aside): int, float, str or bool."""
    hints = typing.get_type_hints(kind)
    return {f.name: next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
            for f in dataclasses.fields(kind)}


def _check_types(request: _Job) -> None:
    """Whole numbers where the field says int (a float step count is a mistake, not a rounding request),
    numbers where it says float, True/False where it says bool; numpy's scalars become Python's (a stored
    request is JSON)."""
    for name, kind in field_types(type(request)).items():
        value = getattr(request, name)
        if value is None:
            continue
        if kind is bool:
            ok, plain = isinstance(value, (bool, numbers.Integral)) and value in (0, 1), bool
        elif kind is int:
            ok, plain = isinstance(value, numbers.Integral) and not isinstance(value, bool), int
        elif kind is float:
            ok, plain = isinstance(value, numbers.Real) and not isinstance(value, bool), float
        else:
            ok, plain = isinstance(value, str), str
        if not ok:
            what = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[kind]
            raise InputError(f"{name} must be {what}; got {value!r}")
        object.__setattr__(request, name, plain(value))


def _check_guidance(value: float, name: str) -> None:
    if not -MAX_GUIDANCE <= validate.finite(value, name) <= MAX_GUIDANCE:
        raise InputError(f"{name} must be in -{MAX_GUIDANCE:g}..{MAX_GUIDANCE:g} (7.5 is usual, 1 turns guidance "
                         f"off); got {value}")
