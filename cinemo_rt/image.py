"""Loading the user's still image and preparing it as the reference does (docs/METHOD.md, pipeline)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError
from .limits import MAX_IMAGE_PIXELS, LimitError, check_image_pixels

MIN_SIDE = 32


def load_image(source: str | os.PathLike | bytes | Image.Image | np.ndarray, name: str | None = None) -> np.ndarray:
    """A path, the bytes of an image file, a PIL image or an array -> RGB uint8 (H, W, 3). Every entry point
    (CLI, Python, HTTP, frames folders) decodes through here: the pixel limit is checked from the header
    before decoding, 16-bit and float images are scaled (`to_rgb`), and a file that is not an image gets one
    message naming it. `name` says what the source is in messages (default: the path, or "the image")."""
    if isinstance(source, (str, os.PathLike, bytes, bytearray)):
        image = decode_image_file(source, name)
    elif isinstance(source, Image.Image):
        check_image_pixels(*source.size, name=name or "image")
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


def decode_image_file(source: str | os.PathLike | bytes | bytearray, name: str | None) -> np.ndarray:
    if isinstance(source, (bytes, bytearray)):
        name = name or "the image"
        if not source:
            raise InputError(f"{name} is empty; send a PNG or JPEG file")
        opened = io.BytesIO(source)
    else:
        path = Path(source)
        name = name or f"image {str(path)!r}"
        try:
            if path.is_dir():
                raise InputError(f"{name} is a folder; pass --image with a PNG or JPEG file")
            if not path.is_file():
                raise InputError(f"{name} does not exist; pass --image with a PNG or JPEG file")
        except OSError as err:  # a symbolic link loop, a name too long
            raise InputError(f"{name} cannot be opened ({err.strerror or err}); pass a PNG or JPEG file") from None
        opened = path
    try:
        with Image.open(opened) as img:
            check_image_pixels(*img.size, name=name)  # from the header (a GIF's logical screen), before decoding
            return to_rgb(img)
    except Image.DecompressionBombError as err:  # over Pillow's own limit, found when the header is read
        raise InputError(f"{name} is too large: more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} Mpx, over the "
                         f"{MAX_IMAGE_PIXELS / 1e6:.0f} Mpx limit; downscale it first, e.g. to 2048 px a side") from err
    except UnidentifiedImageError as err:
        raise InputError(f"{name} could not be read: it is not a readable image (PNG, JPEG, WebP, BMP, TIFF or "
                         "GIF); send one of those") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if isinstance(err, (InputError, LimitError)):
            raise
        raise InputError(f"{name} could not be read: it is damaged or truncated ({_plain(err)}); send the "
                         "complete file") from err


def _plain(err: BaseException) -> str:
    """An error's text without object addresses (`<_io.BytesIO object at 0x...>`): the reason only."""
    return re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "the data", str(err)) or type(err).__name__


def to_rgb(img: Image.Image) -> np.ndarray:
    """PIL image -> RGB uint8 (H, W, 3) as the photo is meant to be seen: EXIF orientation applied (phones
    store portraits sideways plus a tag); 16-bit grayscale scaled to 8 bits (PIL's convert clips it white);
    float images (`F`, e.g. float TIFFs) read as 0..1 when their values are, else as 0..255 (0..65535 when
    larger), since PIL's convert truncates them to black."""
    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, SyntaxError, TypeError, KeyError):
        pass  # a damaged EXIF block: the pixels as stored
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        wide = np.asarray(img, dtype=np.float64)
        if not np.isfinite(wide).all():
            raise InputError("the image holds NaN or infinite values; save it as an 8- or 16-bit PNG")
        top = float(wide.max(initial=0.0))
        scale = (255.0 if img.mode == "F" and top <= 1.0 else
                 1.0 if img.mode == "F" and top <= 255.0 else 1 / 257.0)
        return np.repeat(np.clip(np.rint(wide * scale), 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
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
