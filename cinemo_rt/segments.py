"""Longer videos by chaining segments (docs/METHOD.md, "Longer videos"), written once for the CLI, the Python
API and the server: segment k starts from segment k-1's last frame with seed + k, and the joined video keeps
each shared boundary frame once."""

from __future__ import annotations

import numpy as np


def segment_seed(seed: int, k: int) -> int:
    """The seed of segment k: distinct per segment, reproducible from the request's one seed."""
    return seed + k


def first_frame_of_next(video: np.ndarray) -> np.ndarray:
    """The image the next segment animates: this one's last frame (H, W, 3)."""
    return video[-1]


def join(parts: list[np.ndarray], video: np.ndarray) -> list[np.ndarray]:
    """The frames so far with the next segment's appended; its first frame is the previous segment's last,
    kept once."""
    return [*parts, video if not parts else video[1:]]
