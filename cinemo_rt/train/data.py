"""Training data: a folder of videos with a caption file, held in memory, sampled as in Algorithm 1.

Folder layout:
    captions.jsonl   one JSON object per line: {"file": "clips/a.mp4", "caption": "text" or ["text", ...]}
                     (several captions: one is drawn per sample)
    clips/...        mp4 / webm / gif / anything PyAV decodes

Each rank reads only its shard (`index % world == rank`). Every video is decoded once, resized so that it
covers (height, width) and centre-cropped (bilinear, antialiased), and kept as uint8. A sample draws a clip,
a frame interval in `frame_interval` and a start, takes `num_frames` frames, and computes the clip's motion
id from the mean SSIM of consecutive sampled frames (docs/METHOD.md, choices, `cinemo_rt.motion`) on exactly those frames.
All randomness comes from one `torch.Generator`, so a resumed run draws the same samples.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..motion import mean_consecutive_ssim, motion_id_from_ssim
from ..video import read_video

log = logging.getLogger(__name__)

CAPTION_FILE = "captions.jsonl"


@dataclass
class Batch:
    frames: torch.Tensor     # (B, T, H, W, 3) uint8, the sampled frames
    clip_index: torch.Tensor  # (B,) long, index into the shard
    frame_index: torch.Tensor  # (B, T) long, frame positions inside each clip
    motion_id: torch.Tensor  # (B,) float, clamp(floor(100 * SSIM), 80, 99)
    captions: list[str]      # B prompts, "" where text was dropped


def read_captions(folder: str | Path) -> list[dict]:
    path = Path(folder) / CAPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CAPTION_FILE} in {folder}: the training folder needs one "
                                '{"file": ..., "caption": ...} line per video')
    entries = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            entry = json.loads(line)
            if "file" not in entry or "caption" not in entry:
                raise ValueError(f"{path}:{n}: each line needs 'file' and 'caption'")
            captions = entry["caption"]
            entry["caption"] = [captions] if isinstance(captions, str) else list(captions)
            entries.append(entry)
    return entries


def resize_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """(T, h, w, 3) uint8 -> (T, height, width, 3) uint8: scale to cover, centre crop."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, h, w)
    h, w = x.shape[-2:]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class VideoClips:
    """One rank's shard of a video folder, decoded into memory."""

    def __init__(self, folder: str | Path, height: int, width: int, min_frames: int, rank: int = 0,
                 world: int = 1):
        folder = Path(folder)
        entries = read_captions(folder)[rank::world]
        self.clips: list[torch.Tensor] = []
        self.captions: list[list[str]] = []
        skipped = 0
        for entry in entries:
            frames = read_video(folder / entry["file"])
            if len(frames) < min_frames:
                skipped += 1
                continue
            self.clips.append(resize_crop(frames, height, width))
            self.captions.append(entry["caption"])
        if not self.clips:
            raise ValueError(f"rank {rank}: no clip in {folder} has the {min_frames} frames a sample needs")
        if skipped:
            log.warning("rank %d: skipped %d clips shorter than %d frames", rank, skipped, min_frames)
        log.info("rank %d: %d clips from %s", rank, len(self.clips), folder)

    def __len__(self) -> int:
        return len(self.clips)

    def sample(self, batch_size: int, num_frames: int, frame_interval: tuple[int, int], text_dropout: float,
               generator: torch.Generator) -> Batch:
        """Algorithm 1, lines 2-4: clips, frame strides, SSIM motion ids, captions with dropout."""
        lo, hi = frame_interval
        frames, clip_ids, positions, motion_ids, captions = [], [], [], [], []
        for _ in range(batch_size):
            c = int(torch.randint(len(self.clips), (1,), generator=generator))
            clip = self.clips[c]
            # Largest stride the clip allows, within the configured range.
            stride_max = min(hi, (len(clip) - 1) // (num_frames - 1))
            stride = int(torch.randint(min(lo, stride_max), stride_max + 1, (1,), generator=generator))
            span = 1 + (num_frames - 1) * stride
            start = int(torch.randint(len(clip) - span + 1, (1,), generator=generator))
            index = torch.arange(num_frames) * stride + start
            sampled = clip[index]  # (T, H, W, 3)
            motion_ids.append(float(motion_id_from_ssim(mean_consecutive_ssim(sampled))))
            options = self.captions[c]
            caption = options[int(torch.randint(len(options), (1,), generator=generator))]
            drop = float(torch.rand((), generator=generator)) < text_dropout
            captions.append("" if drop else caption)
            frames.append(sampled)
            clip_ids.append(c)
            positions.append(index)
        return Batch(frames=torch.stack(frames), clip_index=torch.tensor(clip_ids),
                     frame_index=torch.stack(positions), motion_id=torch.tensor(motion_ids),
                     captions=captions)

    def all_frames(self) -> torch.Tensor:
        """Every frame of the shard, (N, H, W, 3) uint8 (for autoencoder pre-training)."""
        return torch.cat(self.clips)


def to_model_pixels(frames: torch.Tensor) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [-1, 1]."""
    x = frames.float() / 127.5 - 1.0
    return x.movedim(-1, -3)
