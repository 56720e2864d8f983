"""Reading the source clip of an edit: a video file (anything PyAV decodes: mp4, webm, mov, gif)
or a folder of frames, and choosing which of its frames the edit inverts.

The original reads frames 0..15 of the clip; a 30 fps phone clip then spans half a second. Here the frames
are `start` seconds in, every `stride`-th frame; the default stride makes the window span about two
seconds (DEFAULT_SPAN_S). Only the window's frames are kept while decoding, so a long video costs little memory.
Every problem with the input raises `InputError` with the fix, before any model work.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .limits import MAX_FRAMES, MAX_SEGMENTS, check_clip_frames
from .settings import DEFAULT_SPAN_S

log = logging.getLogger(__name__)

MAX_START_FRAME = 2**40  # frames into a clip; past this no clip has them, and float rounding stops being exact
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Clip:
    """Frames (T, H, W, 3) uint8 of a source clip and its frame rate (None for a folder or an array)."""

    frames: np.ndarray
    fps: float | None = None
    source: str = "array"


@dataclass(frozen=True)
class Window:
    """Which frames of a clip an edit uses: `count` frames from index `first`, every `stride`-th."""

    first: int
    stride: int
    count: int

    @property
    def indices(self) -> list[int]:
        return [self.first + k * self.stride for k in range(self.count)]

    @property
    def last(self) -> int:
        return self.first + (self.count - 1) * self.stride

    def describe(self, fps: float | None) -> str:
        span = f", {(self.last - self.first) / fps:.2f} s at {fps:g} fps" if fps else ""
        return f"frames {self.first}..{self.last} every {self.stride} ({self.count} frames{span})"


def default_stride(fps: float | None, count: int) -> int:
    """The stride that makes `count` frames span about DEFAULT_SPAN_S seconds (1 without a frame rate)."""
    if not fps or count < 2:
        return 1
    return max(1, round(DEFAULT_SPAN_S * fps / (count - 1)))


def plan_window(available: int | None, fps: float | None, count: int, stride: int | None = None,
                start: float = 0.0, segment_frames: int | None = None) -> Window:
    """The window of `count` frames for a clip of `available` frames (None: not known yet; checked when
    decoding). An explicit stride that does not fit is an error naming the stride that would; the default
    one (spanning DEFAULT_SPAN_S per `segment_frames`, default `count`) shrinks to fit, and says so."""
    if fps is not None and not (math.isfinite(fps) and fps > 0):
        raise InputError(f"the clip's frame rate must be a finite number above 0; got {fps}")
    if available is not None and available < 1:
        raise InputError("the clip has no frames; pass a video with frames or a folder of frames")
    if not start >= 0:  # NaN included
        raise InputError(f"--start must be a number >= 0 seconds; got {start}")
    if start and not fps:
        raise InputError("--start is in seconds, but this clip has no frame rate (a folder of frames or an "
                         "array); drop --start or pass a video file")
    if stride is not None and stride < 1:
        raise InputError(f"--stride must be at least 1; got {stride}")
    first_frame = start * fps if start else 0.0
    if not math.isfinite(first_frame) or first_frame > MAX_START_FRAME:
        raise InputError(f"--start {start} is past the end of any clip ({first_frame:g} frames in); choose an "
                         "earlier --start")
    first = round(first_frame)
    explicit = stride is not None
    stride = stride if explicit else default_stride(fps, segment_frames or count)
    window = Window(first, stride, count)
    if available is not None:
        check_window(window, available, fps, explicit)
        if not explicit and window.last >= available:
            fitting = (available - 1 - first) // (count - 1) if count > 1 else 1
            log.info("the clip is too short for the default stride %d (spanning about %g s over this model's %d "
                     "frames); using stride %d", stride, DEFAULT_SPAN_S, (segment_frames or count) - 1, fitting)
            window = Window(first, fitting, count)
    return window


def check_window(window: Window, available: int, fps: float | None, explicit: bool = True) -> None:
    """InputError when the clip of `available` frames cannot give the window's frames."""
    if window.first >= available:
        at = f" ({available / fps:.2f} s)" if fps else ""
        raise InputError(f"--start is past the end of the clip: it has {available} frames{at}; choose an "
                         "earlier --start")
    room = available - 1 - window.first  # frames after the first one
    need = window.count - 1
    if room >= need * window.stride:
        return
    if not explicit and room >= need:
        return  # the default stride shrinks (plan_window)
    if room < need:
        raise InputError(f"the clip has {available} frames{_from(window)}; the edit needs {window.count} "
                         f"(--segments x --frames + 1); use a longer clip, an earlier --start or fewer "
                         "--frames/--segments")
    fitting = room // need
    raise InputError(f"--stride {window.stride} needs {need * window.stride + 1} frames{_from(window)} but the "
                     f"clip has {available}; --stride {fitting} or less fits")


def _from(window: Window) -> str:
    return f" from frame {window.first}" if window.first else ""


# -------------------------------------------------------------------------------------------------
# Reading
# -------------------------------------------------------------------------------------------------
def read_clip(path: str | os.PathLike, count: int, stride: int | None = None, start: float = 0.0,
              segment_frames: int | None = None) -> tuple[Clip, Window]:
    """The `count` frames of the window (stride, start) of a video file or folder of frames -> (Clip of
    just those frames, Window in the source's frame indices)."""
    path = Path(path)
    if count > MAX_SEGMENTS * MAX_FRAMES + 1:
        raise InputError(f"the edit would read {count} clip frames, over the limit of {MAX_SEGMENTS * MAX_FRAMES + 1}; "
                         "lower --frames/--segments")
    try:
        path.stat()
    except OSError as err:  # a symbolic link loop, a name too long, no permission
        if not isinstance(err, FileNotFoundError):
            raise InputError(f"video {str(path)!r} cannot be opened ({err.strerror or err}); pass a video file "
                             "or a folder of frames") from None
    if path.is_dir():
        names = _frame_names(path)
        window = plan_window(len(names), None, count, stride, start, segment_frames)
        return Clip(_read_frames(path, [names[i] for i in window.indices]), None, str(path)), window
    if not path.is_file():
        raise InputError(f"video {str(path)!r} does not exist; pass --video with a video file (mp4, webm, "
                         "mov, gif) or a folder of frames")
    return _read_video_file(path, count, stride, start, segment_frames)


def _frame_names(folder: Path) -> list[Path]:
    names = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
    if not names:
        raise InputError(f"folder {str(folder)!r} has no frames ({', '.join(FRAME_SUFFIXES)} files); pass a "
                         "folder of frames named in order, or a video file")
    return names


def _read_frames(folder: Path, names: list[Path]) -> np.ndarray:
    """The window's frames only (a long folder costs the memory of `count` frames), all of one size, each
    through the one image decoder (pixel limit from the header, 16-bit and float frames scaled); the memory
    of the whole window is checked from the first frame's header before any frame is decoded."""
    from PIL import Image

    from .image import decode_image_file

    try:
        with Image.open(names[0]) as first:
            width, height = first.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        width = height = 0  # the decoder below names the problem
    if width and height:
        check_clip_frames(len(names), height, width, f"folder {str(folder)!r}")
    frames = []
    for name in names:
        frames.append(decode_image_file(name, f"frame {str(name)!r}"))
        if frames[-1].shape != frames[0].shape:
            raise InputError(f"frames in {str(folder)!r} differ in size: {names[0].name} is "
                             f"{frames[0].shape[1]}x{frames[0].shape[0]}, {name.name} is "
                             f"{frames[-1].shape[1]}x{frames[-1].shape[0]}; resize them to one size")
    return np.stack(frames)


def _read_video_file(path: Path, count: int, stride: int | None, start: float, segment_frames: int | None
                     ) -> tuple[Clip, Window]:
    def plan(available, fps):
        return plan_window(available, fps, count, stride, start, segment_frames)

    fps, window, frames, decoded = _decode_window(path, lambda fps: plan(None, fps))
    if len(frames) < window.count:  # the clip ended first: an error, or a default stride that shrinks to fit
        final = plan(decoded, fps)
        fps, window, frames, decoded = _decode_window(path, lambda _: final)  # a second pass, rarely needed
    shapes = {frame.shape for frame in frames}
    if len(shapes) > 1:
        raise InputError(f"frames of {str(path)!r} change size mid-stream ({sorted(shapes)}); re-encode it")
    return Clip(np.stack(frames), fps, str(path)), window


def _decode_window(path: Path, plan) -> tuple[float | None, Window, list[np.ndarray], int]:
    """Decode `path` up to the last frame of the window `plan(fps)`, keeping only the window's frames (a long
    or high-resolution video costs the memory of `count` frames) -> (fps, window, frames, frames decoded)."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise InputError(f"{str(path)!r} is not a readable video ({err}); pass an mp4, webm, mov or gif file "
                         "or a folder of frames") from err
    with container:
        if not container.streams.video:
            raise InputError(f"{str(path)!r} has no video stream (audio only?); pass a video file")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else None
        window = plan(fps)
        # The stream's size (a GIF's logical screen) is what every decoded frame costs: checked first.
        check_clip_frames(window.count, stream.codec_context.height, stream.codec_context.width, repr(str(path)))
        wanted = set(window.indices)
        frames, decoded = [], 0
        try:
            for index, frame in enumerate(container.decode(stream)):
                decoded = index + 1
                if index in wanted:
                    check_clip_frames(window.count, frame.height, frame.width, repr(str(path)))
                    frames.append(frame.to_ndarray(format="rgb24"))
                if index >= window.last:
                    break
        except av.error.FFmpegError as err:
            raise InputError(f"{str(path)!r} could not be decoded after {decoded} frames ({err})") from err
    if decoded == 0:
        raise InputError(f"{str(path)!r} has a video stream but no decodable frames")
    return fps, window, frames, decoded


def clip_from_array(frames, count: int, stride: int | None = None, fps: float | None = None,
                    start: float = 0.0, segment_frames: int | None = None) -> tuple[Clip, Window]:
    """The same window choice over frames already in memory ((T, H, W, 3) uint8)."""
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise InputError(f"video frames must be uint8 (T, H, W, 3); got {array.dtype} {array.shape}")
    window = plan_window(len(array), fps, count, stride, start, segment_frames)
    return Clip(array[window.indices], fps), window


def open_window(video, request, fps: float | None = None) -> tuple[Clip, Window]:
    """The window an edit request reads (its `clip_frames` at its `stride` from `start` seconds), from a path
    (video file or folder of frames), a `Clip` or a (T, H, W, 3) uint8 array (`fps`: its frame rate)."""
    count, segment_frames = request.clip_frames, request.frames + 1
    if isinstance(video, (str, os.PathLike)):
        return read_clip(video, count, request.stride, request.start, segment_frames)
    if isinstance(video, Clip):
        video, fps = video.frames, video.fps if fps is None else fps
    return clip_from_array(video, count, request.stride, fps, request.start, segment_frames)
