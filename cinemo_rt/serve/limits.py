"""What one request may ask for, and the checks that turn a bad request into one clear 4xx message."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..image import InputError, load_image
from ..limits import MAX_IMAGE_PIXELS
from .runner import AnimationRequest

FORMATS = ("mp4", "gif")
MEDIA_TYPES = {"mp4": "video/mp4", "gif": "image/gif"}


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 2**20
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decoded size, the CLI's limit: a photo yes, a decompression bomb no
    max_steps: int = 100
    max_video_pixels: int = 16 * 576 * 1024  # frames x height x width of one segment
    max_segments: int = 8
    max_prompt_chars: int = 1000


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_upload(data: bytes, limits: Limits) -> np.ndarray:
    """Upload bytes -> RGB uint8; the pixel count is read from the header and checked before decoding."""
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, f"the image is {len(data)} bytes; the limit is {limits.max_upload_bytes}")
    if not data:
        raise RequestError(400, "the image field is empty; attach a PNG or JPEG file as 'image'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > limits.max_image_pixels:
                    raise RequestError(413, f"the image is {width}x{height} pixels; the limit is "
                                            f"{limits.max_image_pixels} pixels (scale it down first)")
                rgb = img.convert("RGB")
    except RequestError:
        raise
    except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning, ValueError) as err:
        raise RequestError(400, f"the image could not be read ({err}); send a PNG or JPEG file") from err
    try:
        return load_image(rgb)
    except InputError as err:
        raise RequestError(400, str(err)) from err


def check_request(request: AnimationRequest, format: str, limits: Limits) -> None:
    """`request` is resolved (defaults filled in). Raises RequestError(400/422) naming the field and limit."""
    def bad(message: str):
        raise RequestError(422, message)

    if len(request.prompt) > limits.max_prompt_chars or len(request.negative_prompt) > limits.max_prompt_chars:
        bad(f"prompts may have at most {limits.max_prompt_chars} characters")
    if request.motion_id is None and not (request.bucket is not None and 0 <= request.bucket <= 19):
        bad("bucket must be a whole number in 0..19 (larger = more motion), or give motion_id")
    if not 1 <= request.steps <= limits.max_steps:
        bad(f"steps must be in 1..{limits.max_steps}")
    if not 1 <= request.segments <= limits.max_segments:
        bad(f"segments must be in 1..{limits.max_segments}")
    if request.frames < 1:
        bad("frames must be at least 1")
    if request.height < 8 or request.width < 8 or request.height % 8 or request.width % 8:
        bad(f"size {request.height}x{request.width} must be positive multiples of 8 (the VAE's factor)")
    if request.frames * request.height * request.width > limits.max_video_pixels:
        bad(f"frames x height x width is {request.frames * request.height * request.width}; the limit is "
            f"{limits.max_video_pixels} (fewer frames or a smaller size)")
    if not 0 <= request.eta <= 1:
        bad("eta must be in 0..1")
    if not -100 <= request.guidance <= 100:
        bad("guidance must be in -100..100 (7.5 is usual, 1 turns guidance off)")
    if format not in FORMATS:
        bad(f"format must be one of {', '.join(FORMATS)}")
