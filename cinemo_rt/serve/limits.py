"""What one request may ask for, and the checks that turn a bad request into one clear 4xx message."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .. import validate
from ..files import give_default_mode
from ..image import InputError, load_image
from ..limits import MAX_IMAGE_PIXELS, LimitError, check_job_size, check_scaled_size
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
    """Upload bytes -> RGB uint8 through the one image decoder of every entry point (`image.load_image`:
    the pixel count from the header before decoding, 16-bit and float images scaled)."""
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, f"the image is {len(data)} bytes; the limit is {limits.max_upload_bytes}")
    if not data:
        raise RequestError(400, "the image field is empty; attach a PNG or JPEG file as 'image'")
    try:
        with Image.open(io.BytesIO(data)) as img:  # the server's own, possibly lower, pixel limit
            width, height = img.size
    except (OSError, Image.DecompressionBombError, ValueError, SyntaxError):
        width = height = 0  # the decoder below names the problem
    if width * height > limits.max_image_pixels:
        raise RequestError(413, f"the image is {width}x{height} pixels; the limit is "
                                f"{limits.max_image_pixels} pixels (scale it down first)")
    try:
        return load_image(data, name="the image")
    except LimitError as err:
        raise RequestError(413, str(err)) from err
    except InputError as err:
        raise RequestError(400, str(err)) from err


def bad(message: str):
    raise RequestError(422, message)


def job_sizer(checkpoint: str | None, engines: str | None, dtype: str | None, device: str | None
              ) -> Callable[[int, int, int, int], None]:
    """The CLI's size check (`cinemo_rt.limits.check_job_size`: ceilings, segments, memory estimate) for the
    server's model folder, as `sizing(height, width, frames, segments)`."""
    from ..defaults import default_checkpoint
    from ..preflight import DTYPE_BYTES, runs_on_cpu

    folder = Path(engines or checkpoint or default_checkpoint())
    dtype_bytes, on_cpu = DTYPE_BYTES.get(dtype or "fp32", 4), runs_on_cpu(device)

    def sizing(height: int, width: int, frames: int, segments: int) -> None:
        check_job_size(folder, height, width, frames, segments, engines=bool(engines), dtype_bytes=dtype_bytes,
                       on_cpu=on_cpu)

    return sizing


def check_fields(request: AnimationRequest | EditJobRequest) -> None:
    """Every field of any request type: numbers finite (NaN and infinity give black videos or 500s, and
    cannot be stored as JSON), text valid Unicode without NUL."""
    for item in dataclasses.fields(request):
        value = getattr(request, item.name)
        if isinstance(value, float) and not math.isfinite(value):
            bad(f"{item.name} must be a finite number; got {value}")
        if isinstance(value, str):
            try:
                validate.text(value, item.name)
            except ValueError as err:
                bad(str(err))


def check_request(request: AnimationRequest | EditJobRequest, format: str, limits: Limits,
                  auto_bucket: bool = False, sizing: Callable[[int, int, int, int], None] | None = None) -> None:
    """`request` is resolved (defaults filled in). Raises RequestError(400/422) naming the field and limit.
    `auto_bucket`: no bucket nor motion id means measuring the clip's motion (edits). `sizing` is the
    model's size and memory check (`job_sizer`)."""
    check_fields(request)
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
    try:
        validate.seed(request.seed, request.segments)
        if sizing is not None:
            sizing(request.height, request.width, request.frames, request.segments)
    except ValueError as err:  # LimitError included: the CLI's message, in the API's field names
        bad(str(err).replace("--", ""))


def check_scale(factor: int, filter: str, request: AnimationRequest | EditJobRequest) -> OutputScale:
    """The output scale of the form's `scale` and `scale_filter` (`cinemo_rt.scale`), within the side limit."""
    try:
        scale = OutputScale(factor, filter)
        check_scaled_size(request.height, request.width, scale)
    except ValueError as err:
        bad(str(err))
    return scale


def check_edit(request: EditJobRequest, format: str, limits: Limits,
               sizing: Callable[[int, int, int, int], None] | None = None) -> None:
    """An edit's fields: the animation checks, then the edit's own."""
    check_request(request, format, limits, auto_bucket=True, sizing=sizing)
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
