"""What one upload may be, and the checks that turn a bad job into one clear 4xx message. The request's own
values are checked where every entry point checks them (`cinemo_rt.request`); here are the server's
transport limits (upload sizes) and the model's size check, the CLI's (`limits.check_job_size`)."""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from ..files import give_default_mode
from ..image import InputError, load_image
from ..limits import MAX_IMAGE_PIXELS, LimitError, check_job_size, check_scaled_size
from ..request import EditRequest, Request
from ..scale import OutputScale
from ..settings import Size

FORMATS = ("mp4", "gif")
MEDIA_TYPES = {"mp4": "video/mp4", "gif": "image/gif"}


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 10 * 2**20
    max_video_bytes: int = 64 * 2**20  # an edit's source clip
    max_image_pixels: int = MAX_IMAGE_PIXELS  # decoded size, the CLI's limit: a photo yes, a decompression bomb no


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
              ) -> Callable[[Request | EditRequest], None]:
    """The CLI's size check (`cinemo_rt.limits.check_job_size`: ceilings, segments, memory estimate) for the
    server's model folder, as `sizing(resolved_request)`."""
    from ..defaults import default_checkpoint
    from ..preflight import DTYPE_BYTES, runs_on_cpu

    folder = Path(engines or checkpoint or default_checkpoint())
    dtype_bytes, on_cpu = DTYPE_BYTES.get(dtype or "fp32", 4), runs_on_cpu(device)

    def sizing(request: Request | EditRequest) -> None:
        check_job_size(folder, request.height, request.width, request.frames, request.segments, engines=bool(engines),
                       dtype_bytes=dtype_bytes, on_cpu=on_cpu)

    return sizing


def build_request(kind: type[Request] | type[EditRequest], fields: dict, defaults: Size,
                  sizing: Callable[[Request | EditRequest], None] | None = None) -> Request | EditRequest:
    """The form's fields as the request they name, resolved with the model's defaults (sizes, a drawn seed)
    and sized for the model; what the request or the size check refuses is a 422 with their message."""
    try:
        request = kind(**fields).resolve(defaults)
        if sizing is not None:
            sizing(request)
    except ValueError as err:  # InputError and LimitError: the CLI's message, in the API's field names
        bad(str(err).replace("--", ""))
    return request


def check_format(format: str) -> None:
    if format not in FORMATS:
        bad(f"format must be one of {', '.join(FORMATS)}; got {format!r}")


def check_scale(factor: int, filter: str, request: Request | EditRequest) -> OutputScale:
    """The output scale of the form's `scale` and `scale_filter` (`cinemo_rt.scale`), within the side limit."""
    try:
        scale = OutputScale(factor, filter)
        check_scaled_size(request.height, request.width, scale)
    except ValueError as err:
        bad(str(err))
    return scale


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


def check_clip(path: Path, request: EditRequest):
    """-> (Clip, Window): the window the edit will read (stride, start, frames) exists in the clip and decodes;
    else RequestError(400) with the reason and the fix (the CLI's message, in the API's field names and
    without the server's path)."""
    from ..clip import open_window

    try:
        return open_window(path, request)
    except InputError as err:
        message = str(err).replace(repr(str(path)), "the video").replace("--", "")
        raise RequestError(400, message) from err
