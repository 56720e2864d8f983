"""One animation request, built once by the CLI or the Python API and read by every stage (no torch
import here: the CLI builds it before any model is loaded)."""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass

from . import validate
from .errors import InputError
from .samplers import DEFAULT_SAMPLER, SAMPLERS, needs_unconditional
from .settings import DCT_FRACTION, DCT_TAU, NUM_TRAIN_TIMESTEPS, Size

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DCTInit:
    """DCTInit settings (SPEC 2): the low-pass box fraction and the noise level of the kept frequencies."""

    fraction: float = DCT_FRACTION
    tau: int = DCT_TAU

    def __post_init__(self):
        if not 0 < validate.finite(self.fraction, "dct_fraction") <= 1 or not 0 <= self.tau < NUM_TRAIN_TIMESTEPS:
            raise InputError(f"DCTInit fraction must be in (0, 1] and tau in 0..{NUM_TRAIN_TIMESTEPS - 1}; "
                             f"got {self.fraction} and {self.tau}")


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
    steps: int = 50
    guidance: float = 7.5
    eta: float = 0.0
    seed: int | None = None
    sampler: str = DEFAULT_SAMPLER
    dct: DCTInit | None = DCTInit()

    def __post_init__(self):
        validate.finite(self.motion_id, "motion_id")
        validate.finite(self.guidance, "guidance")
        if self.steps < 1:
            raise InputError(f"steps must be at least 1; got {self.steps}")
        if self.frames is not None and self.frames < 1:
            raise InputError(f"frames must be at least 1; got {self.frames}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.eta < 0 or (self.eta and self.sampler != "ddim"):
            raise InputError(f"eta must be >= 0 and applies to the ddim sampler only; got {self.eta} with "
                             f"{self.sampler}")

    @classmethod
    def create(cls, prompt: str, bucket: int | None = 9, motion_id: float | None = None, **fields) -> "Request":
        """A request from a user's bucket 0..19 (or a raw motion id, which wins)."""
        from .motion import bucket_to_motion_id

        motion = validate.finite(motion_id, "motion_id") if motion_id is not None else bucket_to_motion_id(bucket)
        return cls(prompt=prompt, motion_id=motion, **fields)

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
