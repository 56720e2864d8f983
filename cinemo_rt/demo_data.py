"""The demo dataset: short clips made on the fly from scikit-image's bundled photographs and drawn scenes.

Each clip moves one source image in one way, at one speed:
- camera pans left / right / up / down (the view slides over the image, so the content moves the other way),
- zoom in / out, rotation clockwise / counterclockwise (about the view centre),
- a ball moving left / right / up / down over a still drawn scene, and a few still clips.
Speeds are log-uniform over a wide range, so the clips' mean consecutive SSIM (and with it the motion id,
docs/METHOD.md, choices) spreads over the 20 buckets. Every clip has several captions that say what moves and in which
direction ("pan left", "the camera pans left", ...); the trainer picks one at random per sample.

Frames are rendered at twice the output size with `grid_sample` and averaged 2x2 down, so sub-pixel motion
stays smooth. Photographs in `HELD_OUT` never enter the dataset: they are the example image and the
evaluation images of `benchmarks/controls.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

# Bundled with scikit-image (no download). Grayscale ones are used as RGB.
TRAIN_PHOTOS = ("astronaut", "brick", "camera", "clock", "coins", "colorwheel", "grass", "gravel",
                "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text", "cell")
HELD_OUT = ("chelsea", "coffee")  # example image and evaluation images: never trained on

CAPTIONS = {
    "pan_left": ("pan left", "the camera pans left", "camera panning left"),
    "pan_right": ("pan right", "the camera pans right", "camera panning right"),
    "pan_up": ("pan up", "the camera pans up", "camera panning up"),
    "pan_down": ("pan down", "the camera pans down", "camera panning down"),
    "zoom_in": ("zoom in", "the camera zooms in", "camera zooming in"),
    "zoom_out": ("zoom out", "the camera zooms out", "camera zooming out"),
    "rotate_cw": ("rotate clockwise", "the scene rotates clockwise", "rotating clockwise"),
    "rotate_ccw": ("rotate counterclockwise", "the scene rotates counterclockwise", "rotating counterclockwise"),
    "ball_left": ("a ball moves left", "ball moving left"),
    "ball_right": ("a ball moves right", "ball moving right"),
    "ball_up": ("a ball moves up", "ball moving up"),
    "ball_down": ("a ball moves down", "ball moving down"),
    "still": ("a still photo", "still scene", "nothing moves"),
}
CAMERA_MOTIONS = tuple(k for k in CAPTIONS if not k.startswith(("ball", "still")))
# (low, high) speed per motion family, log-uniform: fraction of the frame width per frame for pans and the
# ball, relative scale change per frame for zooms, degrees per frame for rotations. Chosen so that clips
# sampled at stride 1-2 spread over the 20 SSIM buckets.
SPEEDS = {"pan": (0.008, 0.045), "zoom": (0.006, 0.04), "rotate": (0.8, 4.5), "ball": (0.02, 0.12)}
STILL_FRACTION = 0.04
BALL_FRACTION = 0.16


def vocabulary() -> list[str]:
    """Every word of every caption: the demo tokenizer gives each one its own token."""
    return sorted({w for variants in CAPTIONS.values() for c in variants for w in c.split()})


def photo(name: str) -> np.ndarray:
    """A scikit-image sample image as RGB uint8 (H, W, 3)."""
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def drawn_scene(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """A procedural still: a two-colour gradient, smooth blotches and random discs and boxes (RGB uint8)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = c0 * (1 - ramp) + c1 * ramp
    blotch = torch.from_numpy(rng.normal(size=(1, 3, size // 16, size // 16))).float()
    blotch = F.interpolate(blotch, size=(size, size), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)
    img = img + 0.15 * blotch.numpy()
    for _ in range(rng.integers(4, 12)):
        colour = rng.uniform(0, 1, 3)
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.2)
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        else:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r * rng.uniform(0.3, 1.5))
        img[mask] = colour
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _to_tensor(image: np.ndarray, side: int) -> torch.Tensor:
    """RGB uint8 -> (1, 3, side, side) float in [0, 1]: centre square, LANCZOS-resized."""
    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    pil = Image.fromarray(image[top:top + s, left:left + s]).resize((side, side), Image.LANCZOS)
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255


def _affine_frames(source: torch.Tensor, motion: str, speed: float, frames: int, size: int,
                   view: float) -> torch.Tensor:
    """Render `frames` views of `source` (1, 3, S, S) -> (T, 3, 2*size, 2*size).

    A view covers `view` of the source (normalised coordinates); frame k is the view moved by k * speed."""
    k = torch.arange(frames, dtype=torch.float32)
    one = torch.ones(frames)
    step = speed * 2.0 * view  # fraction of the view width -> normalised source units
    dx = {"pan_left": -step, "pan_right": step}.get(motion, 0.0) * k
    dy = {"pan_up": -step, "pan_down": step}.get(motion, 0.0) * k
    scale = one
    if motion == "zoom_in":
        scale = (1 - speed) ** k
    elif motion == "zoom_out":
        scale = (1 + speed) ** k
    theta_deg = {"rotate_cw": speed, "rotate_ccw": -speed}.get(motion, 0.0) * k
    theta = theta_deg * math.pi / 180
    cos, sin = torch.cos(theta) * scale * view, torch.sin(theta) * scale * view
    # Source = A @ output + b; rotating the view clockwise turns the content counterclockwise, so the
    # view rotates by -theta for "the scene rotates clockwise" (y points down in grid_sample).
    mats = torch.stack([torch.stack([cos, sin, dx], -1), torch.stack([-sin, cos, dy], -1)], 1)  # (T, 2, 3)
    grid = F.affine_grid(mats, (frames, 3, 2 * size, 2 * size), align_corners=False)
    return F.grid_sample(source.expand(frames, -1, -1, -1), grid, mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def _ball_frames(background: torch.Tensor, motion: str, speed: float, frames: int, size: int,
                 rng: np.random.Generator) -> torch.Tensor:
    """A soft-edged disc crossing a still background -> (T, 3, 2*size, 2*size)."""
    side = 2 * size
    bg = F.interpolate(background, size=(side, side), mode="area")
    radius = rng.uniform(0.08, 0.18) * side
    colour = torch.tensor(rng.uniform(0, 1, 3), dtype=torch.float32)[:, None, None]
    direction = {"ball_left": (-1, 0), "ball_right": (1, 0), "ball_up": (0, -1), "ball_down": (0, 1)}[motion]
    speed = speed * side  # fraction of the width -> pixels of the 2x render
    travel = speed * (frames - 1)
    cx0 = side / 2 - direction[0] * travel / 2 + rng.uniform(-0.15, 0.15) * side
    cy0 = side / 2 - direction[1] * travel / 2 + rng.uniform(-0.15, 0.15) * side
    yy, xx = torch.meshgrid(torch.arange(side) + 0.5, torch.arange(side) + 0.5, indexing="ij")
    out = []
    for k in range(frames):
        cx, cy = cx0 + direction[0] * speed * k, cy0 + direction[1] * speed * k
        alpha = (radius - torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)).clamp(0, 1)  # 1-pixel soft edge
        out.append(bg[0] * (1 - alpha) + colour * alpha)
    return torch.stack(out)


def render_clip(image: np.ndarray, motion: str, speed: float, frames: int, size: int,
                rng: np.random.Generator) -> np.ndarray:
    """One clip (T, size, size, 3) uint8 of `image` moving as `motion` at `speed`."""
    view = 0.55  # the view covers 55% of the source: pans of up to ~0.8 view widths stay inside it
    source = _to_tensor(image, int(round(2 * size / view)))
    if motion.startswith("ball"):
        hi = _ball_frames(source, motion, speed, frames, size, rng)
    else:
        hi = _affine_frames(source, "still" if motion == "still" else motion, speed, frames, size, view)
    lo = F.avg_pool2d(hi, 2)  # (T, 3, size, size), anti-aliased
    return (lo.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@dataclass(frozen=True)
class ClipSpec:
    source: str  # photo name or "scene_<seed>"
    motion: str
    speed: float


def _speed(motion: str, rng: np.random.Generator) -> float:
    family = motion.split("_")[0]
    if family == "still":
        return 0.0
    low, high = SPEEDS[family]
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def plan_clips(num_clips: int, seed: int) -> list[ClipSpec]:
    rng = np.random.default_rng(seed)
    specs = []
    for i in range(num_clips):
        r = rng.random()
        if r < STILL_FRACTION:
            motion = "still"
        elif r < STILL_FRACTION + BALL_FRACTION:
            motion = str(rng.choice([m for m in CAPTIONS if m.startswith("ball")]))
        else:
            motion = CAMERA_MOTIONS[i % len(CAMERA_MOTIONS)]
        if motion.startswith("ball") or rng.random() < 0.35:
            source = f"scene_{seed}_{i}"
        else:
            source = TRAIN_PHOTOS[int(rng.integers(len(TRAIN_PHOTOS)))]
        specs.append(ClipSpec(source, motion, _speed(motion, rng)))
    return specs


def make_demo_dataset(folder: str | os.PathLike, num_clips: int = 600, frames: int = 17, size: int = 48,
                      seed: int = 0) -> Path:
    """Write `num_clips` mp4 clips and `captions.jsonl` ({"file", "caption": [variants], "motion", "speed"})."""
    from .video import write_video

    folder = Path(folder)
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1)
    photos = {name: photo(name) for name in TRAIN_PHOTOS}
    lines = []
    for i, spec in enumerate(plan_clips(num_clips, seed)):
        if spec.source.startswith("scene_"):
            image = drawn_scene(np.random.default_rng([seed, i]))
        else:
            image = photos[spec.source]
        clip = render_clip(image, spec.motion, spec.speed, frames, size, rng)
        name = f"clips/{i:05d}.mp4"
        write_video(clip, folder / name, fps=8, overwrite=True)
        lines.append(json.dumps({"file": name, "caption": list(CAPTIONS[spec.motion]), "motion": spec.motion,
                                 "speed": round(spec.speed, 5), "source": spec.source}))
    tmp = folder / "captions.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "captions.jsonl")  # its presence marks a complete dataset
    log.info("demo dataset: %d clips of %d frames at %dx%d in %s", num_clips, frames, size, size, folder)
    return folder


def write_example_image(path: str | os.PathLike, name: str = "chelsea") -> Path:
    """The bundled example photo `cinemo_rt/assets/example.png`: held out from training, half size."""
    path = Path(path)
    image = Image.fromarray(photo(name))
    image.resize((image.width // 2, image.height // 2), Image.LANCZOS).save(path, optimize=True)
    return path
