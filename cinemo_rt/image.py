"""Loading the user's still image and preparing it as the reference does (SPEC section 1, step 2)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .limits import MAX_IMAGE_PIXELS, check_image_pixels

MIN_SIDE = 32


def load_image(source: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """A path, PIL image or array -> RGB uint8 (H, W, 3). Grayscale and RGBA are converted, as PIL does."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise InputError(f"image {str(path)!r} is a folder; pass --image with a PNG or JPEG file")
        if not path.is_file():
            raise InputError(f"image {str(path)!r} does not exist; pass --image with a PNG or JPEG file")
        try:
            with Image.open(path) as img:
                check_image_pixels(*img.size, name=f"image {str(path)!r}")  # from the header, before decoding
                image = to_rgb(img)
        except Image.DecompressionBombError as err:  # over Pillow's own limit, found when the header is read
            raise InputError(f"image {str(path)!r} is too large: more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx, "
                             f"over the {MAX_IMAGE_PIXELS / 1e6:.0f} Mpx limit; downscale it first, e.g. to 2048 px "
                             "a side") from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise InputError(f"{str(path)!r} is not a readable image ({err}); pass a PNG or JPEG file") from err
    elif isinstance(source, Image.Image):
        check_image_pixels(*source.size)
        image = to_rgb(source)
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
        raise InputError(f"image is {image.shape[0]}x{image.shape[1]} (height x width); each side must be at least "
                         f"{MIN_SIDE} (it is scaled up to the output size)")
    return np.ascontiguousarray(image)


def to_rgb(img: Image.Image) -> np.ndarray:
    """PIL image -> RGB uint8 (H, W, 3) as the photo is meant to be seen: EXIF orientation applied (phones
    store portraits sideways plus a tag), 16-bit grayscale scaled to 8 bits (PIL's convert clips it white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.float64)  # 16-bit values (PNG loads them as I;16 or I)
        return np.repeat(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
    if img.mode == "F":
        raise InputError("32-bit float images are not supported; save the image as an 8- or 16-bit PNG")
    return np.asarray(img.convert("RGB"))


def preprocess(image: np.ndarray, height: int, width: int) -> "torch.Tensor":
    """RGB uint8 (H0, W0, 3) -> (1, 3, height, width) in [-1, 1].

    As the reference: bilinear resize (align_corners=False, no antialias) by the single scale factor
    max((height+1)/H0, (width+1)/W0), so both sides exceed the target, then a centre crop at
    round((h - height)/2), round((w - width)/2), then (x - 0.5)/0.5."""
    import torch
    import torch.nn.functional as F

    if height % 8 or width % 8:
        raise InputError(f"output size {height}x{width} (height x width) must be divisible by 8 (the VAE's factor)")
    x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255.0  # (1, 3, H0, W0)
    scale = max((height + 1) / x.shape[2], (width + 1) / x.shape[3])
    x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    top = round((x.shape[2] - height) / 2)
    left = round((x.shape[3] - width) / 2)
    x = x[:, :, top:top + height, left:left + width]
    return (x - 0.5) / 0.5
