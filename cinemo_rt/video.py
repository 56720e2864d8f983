"""Writing and reading frame sequences: mp4 (H.264), gif, or a folder of PNG frames.

Writes are atomic: the output goes to a hidden temporary file or folder in the destination directory and is
renamed into place only once complete, so a crash or an encoder error never leaves a truncated video or a
stray temporary behind.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from . import validate
from .files import give_default_mode, swap_in_folder
from .safe_paths import OutputError, check_file_output

log = logging.getLogger(__name__)

FORMATS = ("mp4", "gif", "png")
_SUFFIX_FORMATS = {".mp4": "mp4", ".gif": "gif", "": "png"}  # no suffix: a folder of PNG frames
_FRAME_NAME = "frame_{:04d}.png"
_FRAME_RE = re.compile(r"frame_\d{4,}\.png")
# The original saves with imageio quality=8, which imageio-ffmpeg turns into libx264 -crf 10
# (crf = int((1 - quality / 10) * 51)).
_MP4_CRF = "10"


_SUFFIX_OF = {"mp4": ".mp4", "gif": ".gif", "png": ""}
# Suffixes that promise a kind of file: a format that disagrees with one of these is refused, not obeyed.
_MEDIA_SUFFIXES = {".mp4", ".gif", ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".mov", ".mkv",
                   ".webm", ".avi", ".apng"}
def check_format_matches(path: str | os.PathLike, fmt: str) -> None:
    """`--format gif --out x.mp4` would write a GIF named .mp4: refuse and say which name fits."""
    suffix = Path(path).suffix.lower()
    if suffix in _MEDIA_SUFFIXES and suffix != _SUFFIX_OF[fmt]:
        fix = (f"a folder name without a suffix (e.g. {Path(path).with_suffix('')})" if fmt == "png"
               else f"a name ending in .{fmt} (e.g. {Path(path).with_suffix('.' + fmt)})")
        raise OutputError(f"--out {str(path)!r} ends in {suffix} but the format is {fmt}; give {fix}, or drop "
                          "--format to follow the suffix")


def resolve_format(path: str | os.PathLike, format: str | None = None) -> str:
    """'mp4', 'gif' or 'png' (a folder of frames), from `format` if given, else from the path's suffix."""
    if format is not None:
        fmt = format.lower().lstrip(".")
        if fmt not in FORMATS:
            raise OutputError(f"unknown video format {format!r}; supported: {', '.join(FORMATS)}")
        check_format_matches(path, fmt)
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_FORMATS:
        raise OutputError(
            f"cannot tell the video format from {str(path)!r}; supported: .mp4, .gif, or a path without "
            f"suffix for a folder of PNG frames (or choose with --format: {', '.join(FORMATS)})"
        )
    return _SUFFIX_FORMATS[suffix]


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if hasattr(frames, "detach"):  # a torch tensor (torch is imported only where used)
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(
            f"expected uint8 frames (T, H, W, 3) with T >= 1; got {frames.dtype} {tuple(frames.shape)}"
        )
    return np.ascontiguousarray(frames)


def _check_output_dir(path: Path) -> Path:
    parent = path.parent
    if not parent.is_dir():
        raise OutputError(f"output folder {str(parent)!r} does not exist (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output folder {str(parent)!r} is not writable")
    return parent


def _encode_mp4(frames: np.ndarray, path: str, fps: float) -> None:
    # yuv420p subsamples chroma 2x2, so libx264 needs even sizes: pad by repeating the last row/column.
    _, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        log.info("mp4: padding %dx%d frames to %dx%d for yuv420p", h, w, h + pad_h, w + pad_w)
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    import av

    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = w + pad_w, h + pad_h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": _MP4_CRF}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush


def _pal8_frame(frame: np.ndarray) -> av.VideoFrame:
    """RGB frame -> PyAV pal8 frame with its own 256-colour adaptive palette (PIL median cut)."""
    quantized = Image.fromarray(frame).quantize(256)
    rgb = np.asarray(quantized.getpalette()[: 256 * 3], dtype=np.uint8).reshape(-1, 3)  # (P, 3)
    # PyAV takes the palette as (256, 4) uint8 rows of (A, R, G, B); tests/test_video.py round-trips it.
    palette = np.full((256, 4), 255, dtype=np.uint8)
    palette[: len(rgb), 1:] = rgb
    import av

    return av.VideoFrame.from_ndarray((np.ascontiguousarray(np.asarray(quantized)), palette), format="pal8")


def _encode_gif(frames: np.ndarray, path: str, fps: float) -> None:
    # PyAV's gif encoder rather than PIL: PIL merges identical consecutive frames into one (changing the
    # frame count of still videos); ffmpeg keeps one GIF frame per input frame.
    _, h, w, _ = frames.shape
    import av

    with av.open(path, mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = w, h
        stream.pix_fmt = "pal8"
        for frame in frames:
            container.mux(stream.encode(_pal8_frame(frame)))
        container.mux(stream.encode())


def _write_png_folder(frames: np.ndarray, folder: str) -> None:
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(os.path.join(folder, _FRAME_NAME.format(i)))


def _only_frames(dest: Path) -> None:
    """An existing frames destination may be replaced only when it holds nothing but our frames."""
    try:
        names = [p.name for p in dest.iterdir()]
    except FileNotFoundError:
        return  # a concurrent writer moved it away: nothing to protect
    except NotADirectoryError:
        names = [dest.name]
    if any(not _FRAME_RE.fullmatch(name) for name in names):
        raise OutputError(
            f"{str(dest)!r} exists and is not a folder of frame_NNNN.png files; refusing to overwrite it"
        )


def write_video(
    frames_uint8: np.ndarray,
    path: str | os.PathLike,
    fps: float = 8,
    format: str | None = None,
    overwrite: bool = False,
    scale: "OutputScale | int | None" = None,
) -> Path:
    """Write (T, H, W, 3) uint8 frames as mp4 (H.264, yuv420p; odd sizes edge-padded to even), gif, or a
    folder of PNG frames (frame_0000.png, ...). Format from `format` or the path's suffix. Returns the path.

    An existing output is replaced only with `overwrite` (a frames folder only when it holds nothing but
    frames); devices, pipes and other non-regular files never. Write errors (disk full, file too large,
    read-only places) raise `OutputError` and leave no temporary behind. `scale` enlarges every frame
    (`cinemo_rt.scale`: a whole factor, or an `OutputScale` with its filter)."""
    from .scale import OutputScale

    fmt = resolve_format(path, format)
    fps = validate.fps(fps)
    frames = OutputScale.of(scale).apply(_check_frames(frames_uint8))
    dest = Path(path)
    parent = _check_output_dir(dest)
    check_file_output(dest, overwrite=overwrite, is_folder_output=fmt == "png")
    if fmt == "png" and dest.is_dir():
        _only_frames(dest)
    import av  # here, not at module level: the CLI checks paths before importing PyAV

    try:
        if fmt == "png":
            _write_png_folder_atomic(frames, dest, parent)
        else:
            _write_file_atomic(frames, dest, parent, fmt, fps, overwrite)
    except (OSError, av.error.FFmpegError) as err:
        raise OutputError(f"could not write {str(dest)!r}: {err.strerror or err}; nothing was written "
                          "(free some space or choose another --out)") from err
    # Debug only: the CLI prints the one success line (it was printed twice).
    log.debug("wrote %d frames of %dx%d (height x width) to %s", frames.shape[0], frames.shape[1],
              frames.shape[2], dest)
    return dest


def _write_png_folder_atomic(frames: np.ndarray, dest: Path, parent: Path) -> None:
    tmp_dir = tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    try:
        give_default_mode(tmp_dir)
        _write_png_folder(frames, tmp_dir)
        swap_in_folder(tmp_dir, dest, _only_frames)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def _write_file_atomic(frames: np.ndarray, dest: Path, parent: Path, fmt: str, fps: float,
                       overwrite: bool) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    try:
        give_default_mode(tmp)
        (_encode_mp4 if fmt == "mp4" else _encode_gif)(frames, tmp, fps)
        _move_into_place(tmp, dest, overwrite)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _move_into_place(tmp: str, dest: Path, overwrite: bool) -> None:
    """Without `overwrite`, a file that appeared at `dest` while we encoded is kept (link fails on it)."""
    if overwrite:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise OutputError(f"--out {str(dest)!r} was created by someone else while this ran; pass --overwrite "
                          "to replace it, or choose another output name") from None
    except OSError:  # file systems without hard links
        os.replace(tmp, dest)
        return
    os.remove(tmp)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decode a video file (anything PyAV reads) or a folder of frame_NNNN.png files -> (T, H, W, 3) uint8."""
    path = Path(path)
    if path.is_dir():
        names = sorted(
            (p for p in path.iterdir() if _FRAME_RE.fullmatch(p.name)), key=lambda p: int(p.stem[len("frame_") :])
        )
        if not names:
            raise ValueError(f"no frame_NNNN.png files in {str(path)!r}")
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in names])
    import av

    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"no video frames in {str(path)!r}")
    return np.stack(frames)
