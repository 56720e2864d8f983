"""The output scale: every frame enlarged by a whole factor just before the video is written.

The demo model makes 32x32 videos, a postage stamp in a video player; a scale of 8 gives 256x256. `nearest`
keeps the model's pixels exactly (each becomes a block), `lanczos` smooths them. One definition, read by the
CLI (`--scale`, `--scale-filter`), the HTTP form (`scale`, `scale_filter`) and `write_video(scale=...)`.
Chained segments start from the unscaled last frame: the scale applies to the written video only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import InputError

FILTERS = ("nearest", "lanczos")
MAX_FACTOR = 16
HELP = (f"enlarge the written video by a whole factor 1..{MAX_FACTOR} (the demo's 32x32 at 8 is 256x256); "
        "the model still runs at its own size")
FILTER_HELP = "how scaled pixels are filled: nearest (the model's pixels as blocks) or lanczos (smooth)"


@dataclass(frozen=True)
class OutputScale:
    factor: int = 1
    filter: str = "nearest"

    def __post_init__(self):
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or not 1 <= self.factor <= MAX_FACTOR:
            raise InputError(f"scale must be a whole number in 1..{MAX_FACTOR}; got {self.factor!r}")
        if self.filter not in FILTERS:
            raise InputError(f"scale filter must be one of {', '.join(FILTERS)}; got {self.filter!r}")

    @classmethod
    def of(cls, scale: "OutputScale | int | None", filter: str | None = None) -> "OutputScale":
        """An `OutputScale` from a factor (and filter), or the one given; None is 1 (no scaling)."""
        if isinstance(scale, OutputScale):
            return scale
        return cls(1 if scale is None else scale, filter or cls.filter)

    def size(self, height: int, width: int) -> tuple[int, int]:
        return height * self.factor, width * self.factor

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, 3) uint8 -> (T, H * factor, W * factor, 3) uint8."""
        if self.factor == 1:
            return frames
        if self.filter == "nearest":  # exact blocks, no resampling
            return frames.repeat(self.factor, axis=1).repeat(self.factor, axis=2)
        from PIL import Image

        height, width = self.size(*frames.shape[1:3])
        return np.stack([np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.LANCZOS))
                         for frame in frames])
