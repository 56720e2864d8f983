"""Motion intensity: buckets, motion ids and the SSIM measure behind them (docs/METHOD.md: motion intensity, choices).

Conventions (docs/METHOD.md, choices): a user bucket b in 0..19, larger = more motion, maps to the released weights'
motion id 99 - b (the authors' app uses id = 100 - k for its slider k = 1..20). For training, a clip's
motion id is clamp(floor(100 * s), 80, 99) with s the mean SSIM of consecutive frames (paper Eq. 2).

SSIM settings (the paper releases no SSIM code; these are ours, chosen to equal
`skimage.metrics.structural_similarity(gray_a, gray_b, data_range=R)` with its defaults):
- colour: grayscale by ITU-R BT.601 luma, Y = 0.299 R + 0.587 G + 0.114 B (not skimage's rgb2gray,
  which uses BT.709 weights);
- resolution: the frames as given, no resizing;
- window: uniform 7x7, sample covariance (N / (N - 1) = 49/48), K1 = 0.01, K2 = 0.03;
- data range R: 255 for uint8 frames, 1 for float frames (expected in [0, 1]); SSIM does not depend on
  the scale once R follows it, so everything is computed on [0, 1] in float64;
- border: the mean is over the 'valid' positions only (skimage crops (7-1)//2 = 3 pixels per side after
  filtering, so its padding mode never enters the mean).
Implemented in torch and vectorised over frame pairs, so training can run it on the GPU.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch at run time only in the SSIM functions: buckets are converted before it loads
    import numpy as np
    import torch

NUM_BUCKETS = 20
MAX_MOTION_ID = 99  # bucket 0 (least motion); bucket 19 is id 80
MIN_MOTION_ID = MAX_MOTION_ID - (NUM_BUCKETS - 1)

SSIM_WINDOW = 7
SSIM_K1 = 0.01
SSIM_K2 = 0.03
LUMA_BT601 = (0.299, 0.587, 0.114)


def _as_int(value: object) -> int | None:
    """value as an int if it is integer-like (int, numpy/torch integer, integral float), else None."""
    if isinstance(value, (bool, str, bytes)):  # "3" is for the CLI to parse, not for us
        return None
    try:
        return operator.index(value)
    except TypeError:
        pass
    try:
        as_float = float(value)  # numpy / 0-d torch floats
    except (TypeError, ValueError):
        return None
    return int(as_float) if math.isfinite(as_float) and as_float.is_integer() else None


def bucket_to_motion_id(bucket: int) -> float:
    """User motion bucket 0..19 (larger = more motion) -> motion id 99 - bucket for the released weights."""
    b = _as_int(bucket)
    if b is None or not 0 <= b < NUM_BUCKETS:
        raise ValueError(
            f"motion bucket must be an integer in 0..{NUM_BUCKETS - 1} (larger = more motion); got {bucket!r}. "
            "To pass a raw motion id (e.g. for another checkpoint), use --motion-id instead."
        )
    return float(MAX_MOTION_ID - b)


def bucket_from_motion_id(motion_id: int | float) -> int:
    """Inverse of `bucket_to_motion_id`: motion id 80..99 -> bucket 99 - id."""
    m = _as_int(motion_id)
    if m is None or not MIN_MOTION_ID <= m <= MAX_MOTION_ID:
        raise ValueError(
            f"only integer motion ids in {MIN_MOTION_ID}..{MAX_MOTION_ID} have a bucket; got {motion_id!r}"
        )
    return MAX_MOTION_ID - m


def motion_id_from_ssim(s: float) -> int:
    """Training-side motion id of a clip with mean consecutive SSIM s: clamp(floor(100 s), 80, 99) (docs/METHOD.md, choices)."""
    return int(min(max(math.floor(100.0 * float(s)), MIN_MOTION_ID), MAX_MOTION_ID))


def _to_gray(video: torch.Tensor | np.ndarray, data_range: float | None) -> torch.Tensor:
    """(T, H, W, 3) uint8 or float frames -> (T, 1, H, W) float64 BT.601 luma in [0, 1]."""
    import torch

    frames = torch.as_tensor(video)
    if frames.dim() != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected a video (T, H, W, 3); got shape {tuple(frames.shape)}")
    if data_range is None:
        data_range = 255.0 if frames.dtype == torch.uint8 else 1.0
    frames = frames.to(torch.float64) / data_range
    weights = torch.tensor(LUMA_BT601, dtype=torch.float64, device=frames.device)
    gray = torch.einsum("thwc,c->thw", frames, weights)  # (T, H, W)
    return gray[:, None]  # (T, 1, H, W)


def consecutive_ssim(video: torch.Tensor | np.ndarray, data_range: float | None = None) -> torch.Tensor:
    """SSIM of each consecutive frame pair (t, t+1) of a (T, H, W, 3) video -> (T-1,) float64.

    Settings in the module docstring. data_range overrides the default (255 for uint8, 1 for float)."""
    import torch
    import torch.nn.functional as F

    gray = _to_gray(video, data_range)  # (T, 1, H, W)
    t, _, h, w = gray.shape
    if t < 2 or h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs at least 2 frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}; got {t} of {h}x{w}"
        )
    x, y = gray[:-1], gray[1:]  # (T-1, 1, H, W) each
    # All five local moments in one pooling call: (T-1, 5, H, W) -> (T-1, 5, H-6, W-6).
    moments = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], dim=1), SSIM_WINDOW, stride=1)
    mu_x, mu_y, m_xx, m_yy, m_xy = moments.unbind(dim=1)  # (T-1, H-6, W-6) each
    cov_norm = SSIM_WINDOW**2 / (SSIM_WINDOW**2 - 1)  # unbiased, skimage's use_sample_covariance=True
    var_x = cov_norm * (m_xx - mu_x * mu_x)
    var_y = cov_norm * (m_yy - mu_y * mu_y)
    cov_xy = cov_norm * (m_xy - mu_x * mu_y)
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # data range 1 after _to_gray
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    )
    return ssim_map.mean(dim=(1, 2))


def mean_consecutive_ssim(video: torch.Tensor | np.ndarray, data_range: float | None = None) -> float:
    """Paper Eq. 2: mean SSIM of consecutive frames of a (T, H, W, 3) uint8 or [0, 1] float video."""
    return float(consecutive_ssim(video, data_range).mean())


def motion_intensity(video: torch.Tensor | np.ndarray) -> tuple[float, int, int]:
    """(mean consecutive SSIM, training motion id, bucket) of a (T, H, W, 3) video."""
    s = mean_consecutive_ssim(video)
    motion_id = motion_id_from_ssim(s)
    return s, motion_id, bucket_from_motion_id(motion_id)
