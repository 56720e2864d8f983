"""Motion buckets / ids (docs/METHOD.md: motion intensity, choices) and the torch SSIM against skimage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from cinemo_rt.motion import (
    NUM_BUCKETS,
    bucket_from_motion_id,
    bucket_to_motion_id,
    consecutive_ssim,
    mean_consecutive_ssim,
    motion_id_from_ssim,
    motion_intensity,
)


def luma601(frames: np.ndarray) -> np.ndarray:
    return frames.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def skimage_pairs(video: np.ndarray, data_range: float) -> np.ndarray:
    gray = luma601(video)
    return np.array([structural_similarity(gray[i], gray[i + 1], data_range=data_range) for i in range(len(gray) - 1)])


def smooth_frames(t: int, h: int, w: int, shift: int) -> np.ndarray:
    """A textured image panned by `shift` pixels per frame, plus a little noise: realistic SSIMs."""
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (h // 4 + 1, (w + shift * t) // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)
    frames = np.stack([np.roll(base, -i * shift, axis=1)[:h, :w] for i in range(t)]).astype(np.float64)
    return np.clip(frames + rng.normal(0, 8, frames.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "video",
    [
        np.random.default_rng(0).integers(0, 256, (4, 24, 31, 3), dtype=np.uint8),
        smooth_frames(5, 32, 40, shift=1),
        smooth_frames(3, 17, 9, shift=3),
    ],
    ids=["random", "shifted", "small-odd"],
)
def test_ssim_matches_skimage_uint8(video):
    ours = consecutive_ssim(video)
    ref = skimage_pairs(video, data_range=255)
    assert ours.shape == (len(video) - 1,)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=1e-4)
    assert abs(mean_consecutive_ssim(video) - ref.mean()) < 1e-4


def test_ssim_matches_skimage_float_and_torch_input():
    video = smooth_frames(4, 20, 28, shift=2).astype(np.float32) / 255
    ref = skimage_pairs(video, data_range=1.0)
    np.testing.assert_allclose(consecutive_ssim(torch.from_numpy(video)).numpy(), ref, rtol=0, atol=1e-4)
    # Same content as uint8 or as [0, 1] floats gives the same SSIM.
    assert abs(mean_consecutive_ssim(video) - mean_consecutive_ssim(np.round(video * 255).astype(np.uint8))) < 1e-3


def test_ssim_rejects_bad_videos():
    with pytest.raises(ValueError, match="2 frames"):
        consecutive_ssim(np.zeros((1, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="7x7"):
        consecutive_ssim(np.zeros((3, 6, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="T, H, W, 3"):
        consecutive_ssim(np.zeros((3, 16, 16), np.uint8))


def test_motion_intensity_still_and_busy():
    still = np.repeat(smooth_frames(1, 24, 24, shift=0), 4, axis=0)
    s, motion_id, bucket = motion_intensity(still)
    assert abs(s - 1.0) < 1e-9 and motion_id == 99 and bucket == 0
    busy = np.random.default_rng(5).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    s, motion_id, bucket = motion_intensity(busy)
    assert s < 0.2 and motion_id == 80 and bucket == NUM_BUCKETS - 1


@pytest.mark.parametrize("s, expected", [(0.0, 80), (0.5, 80), (0.805, 80), (0.853, 85), (0.999, 99), (1.0, 99)])
def test_motion_id_from_ssim(s, expected):
    assert motion_id_from_ssim(s) == expected


def test_bucket_mapping():
    assert bucket_to_motion_id(0) == 99.0 and bucket_to_motion_id(19) == 80.0
    assert bucket_to_motion_id(9) == 90.0  # the authors' app default (slider 10 -> id 90)
    assert bucket_to_motion_id(np.int64(3)) == 96.0 and bucket_to_motion_id(3.0) == 96.0
    assert isinstance(bucket_to_motion_id(3), float)
    for b in range(NUM_BUCKETS):
        assert bucket_from_motion_id(bucket_to_motion_id(b)) == b


@pytest.mark.parametrize("bad", [20, -1, 2.5, "3", True, None, float("nan")])
def test_bucket_errors_name_range_and_escape_hatch(bad):
    with pytest.raises(ValueError, match=r"0\.\.19") as err:
        bucket_to_motion_id(bad)
    assert "--motion-id" in str(err.value)


@pytest.mark.parametrize("bad", [79, 100, 90.5])
def test_bucket_from_motion_id_errors(bad):
    with pytest.raises(ValueError, match=r"80\.\.99"):
        bucket_from_motion_id(bad)
