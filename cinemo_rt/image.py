"""Loading the user's still image and preparing it as the reference does (SPEC section 1, step 2)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import InputError

MIN_SIDE = 32


def load_image(source: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """A path, PIL image or array -> RGB uint8 (H, W, 3). Grayscale and RGBA are converted, as PIL does."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise InputError(f"image {str(path)!r} does not exist; pass --image with a PNG or JPEG file")
        try:
            with Image.open(path) as img:
                image = np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError) as err:
            raise InputError(f"{str(path)!r} is not a readable image ({err}); pass a PNG or JPEG file") from err
    elif isinstance(source, Image.Image):
        image = np.asarray(source.convert("RGB"))
    else:
        array = np.asarray(source)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        if array.ndim != 3 or array.shape[-1] not in (3, 4):
            raise InputError(f"image array must be (H, W), (H, W, 3) or (H, W, 4); got {array.shape}")
        if array.dtype != np.uint8:
            raise InputError(f"image array must be uint8; got {array.dtype}")
        image = array[..., :3]
    if min(image.shape[:2]) < MIN_SIDE:
        raise InputError(f"image is {image.shape[1]}x{image.shape[0]} pixels; each side must be at least "
                         f"{MIN_SIDE} (it is scaled up to the output size)")
    return np.ascontiguousarray(image)


def preprocess(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """RGB uint8 (H0, W0, 3) -> (1, 3, height, width) in [-1, 1].

    As the reference: bilinear resize (align_corners=False, no antialias) by the single scale factor
    max((height+1)/H0, (width+1)/W0), so both sides exceed the target, then a centre crop at
    round((h - height)/2), round((w - width)/2), then (x - 0.5)/0.5."""
    if height % 8 or width % 8:
        raise InputError(f"output size {height}x{width} must be divisible by 8 (the VAE's factor)")
    x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H0, W0)
    scale = max((height + 1) / x.shape[2], (width + 1) / x.shape[3])
    x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    top = round((x.shape[2] - height) / 2)
    left = round((x.shape[3] - width) / 2)
    x = x[:, :, top:top + height, left:left + width]
    return (x - 0.5) / 0.5
