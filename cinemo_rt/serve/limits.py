"""What one request may ask for, and the checks that turn a bad request into one clear 4xx message."""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import give_default_mode
from ..image import InputError, load_image
from ..limits import MAX_IMAGE_PIXELS, check_scaled_size
from ..scale import OutputScale
from .runner import AnimationRequest, EditJobRequest

FORMATS = ("mp4", "gif")
MEDIA_TYPES = {"mp4": "video/mp4", "gif": "image/gif"}


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 2**20
    max_video_bytes: int = 64 * 2**20  # an edit's source clip
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


def bad(message: str):
    raise RequestError(422, message)


def check_request(request: AnimationRequest | EditJobRequest, format: str, limits: Limits,
                  auto_bucket: bool = False) -> None:
    """`request` is resolved (defaults filled in). Raises RequestError(400/422) naming the field and limit.
    `auto_bucket`: no bucket nor motion id means measuring the clip's motion (edits)."""
    if len(request.prompt) > limits.max_prompt_chars or len(request.negative_prompt) > limits.max_prompt_chars:
        bad(f"prompts may have at most {limits.max_prompt_chars} characters")
    auto = auto_bucket and request.bucket is None
    if request.motion_id is None and not auto and not (request.bucket is not None and 0 <= request.bucket <= 19):
        bad("bucket must be a whole number in 0..19 (larger = more motion)"
            + (", or auto (measured on the clip)" if auto_bucket else "") + ", or give motion_id")
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


def check_scale(factor: int, filter: str, request: AnimationRequest | EditJobRequest) -> OutputScale:
    """The output scale of the form's `scale` and `scale_filter` (`cinemo_rt.scale`), within the side limit."""
    try:
        scale = OutputScale(factor, filter)
        check_scaled_size(request.height, request.width, scale)
    except ValueError as err:
        bad(str(err))
    return scale


def check_edit(request: EditJobRequest, format: str, limits: Limits) -> None:
    """An edit's fields: the animation checks, then the edit's own."""
    check_request(request, format, limits, auto_bucket=True)
    if len(request.source_prompt) > limits.max_prompt_chars:
        bad(f"prompts may have at most {limits.max_prompt_chars} characters")
    if not -100 <= request.inversion_guidance <= 100:
        bad("inversion_guidance must be in -100..100 (1, the default, turns guidance off while inverting)")
    if request.stride is not None and request.stride < 1:
        bad("stride must be at least 1 (every stride-th frame of the clip)")
    if not request.start >= 0:
        bad("start must be >= 0 seconds into the clip")


def save_clip_upload(upload, path: Path, limits: Limits) -> None:
    """Stream an uploaded clip to `path` (a temp file renamed into place), at most `max_video_bytes`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-", suffix=".clip")
    try:
        size = 0
        with os.fdopen(fd, "wb") as handle:
            while chunk := upload.read(2**20):
                size += len(chunk)
                if size > limits.max_video_bytes:
                    raise RequestError(413, f"the video is over {limits.max_video_bytes} bytes, the limit; send a "
                                            "shorter or smaller clip")
                handle.write(chunk)
        if size == 0:
            raise RequestError(400, "the video field is empty; attach an mp4, webm, mov or gif file as 'video'")
        give_default_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_clip(path: Path, request: EditJobRequest):
    """-> (Clip, Window): the window the edit will read (stride, start, frames) exists in the clip and decodes;
    else RequestError(400) with the reason and the fix (the CLI's message, in the API's field names and without the server's path)."""
    from ..clip import read_clip

    try:
        return read_clip(path, request.clip_frames, request.stride, request.start, request.frames + 1)
    except InputError as err:
        message = str(err).replace(repr(str(path)), "the video").replace("--", "")
        raise RequestError(400, message) from err
