"""`cinemo-rt edit` end to end on a tiny checkpoint: every video container, the frame window (stride,
start, default stride), --bucket auto, --segments, and one clear message + exit code 2 per bad input."""

import logging
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from cinemo_rt.cli import EXIT_BAD_INPUT, main
from cinemo_rt.clip import default_stride, read_clip
from cinemo_rt.video import read_video, write_video

FAST = ["--steps", "2", "--frames", "3", "--height", "64", "--width", "64", "--seed", "0"]
CONTAINERS = {"webm": ("webm", "libvpx-vp9"), "mov": ("mov", "mpeg4")}  # + mp4, gif by the project's writer


def _scene_frames(count: int, height: int = 72, width: int = 88) -> np.ndarray:
    """Smooth bands panning right 2 px a frame (smooth, so lossy codecs keep it)."""
    y, x = np.mgrid[0:height, 0:width + 2 * count]
    scene = np.stack([128 + 100 * np.sin(x / 7.0), 128 + 100 * np.cos(y / 5.0), 128 + 60 * np.sin((x + y) / 9.0)],
                     -1).astype(np.uint8)
    return np.stack([scene[:, 2 * k: 2 * k + width] for k in range(count)])


def write_clip(path, frames: np.ndarray, fps: int = 8) -> None:
    if path.suffix in (".mp4", ".gif"):
        write_video(frames, path, fps=fps)
        return
    fmt, codec = CONTAINERS[path.suffix.lstrip(".")]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    frames = _scene_frames(12)
    paths = {}
    for suffix in ("mp4", "webm", "mov", "gif"):
        paths[suffix] = root / f"clip.{suffix}"
        write_clip(paths[suffix], frames)
    paths["folder"] = root / "frames"
    paths["folder"].mkdir()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(paths["folder"] / f"{i:03d}.png")
    Image.fromarray((np.random.default_rng(0).random((72, 96, 3)) * 255).astype(np.uint8)).save(root / "photo.png")
    paths["image"] = root / "photo.png"
    paths["frames"] = frames
    return paths


def edit(args):
    return main(["edit", *args])


@pytest.mark.parametrize("kind", ["mp4", "webm", "mov", "gif", "folder"])
def test_every_container_reads_the_same_window(media, kind):
    clip, window = read_clip(media[kind], 4, stride=3, start=0.25 if kind != "folder" else 0.0)
    first = 2 if kind != "folder" else 0  # 0.25 s at 8 fps
    assert window.indices == [first, first + 3, first + 6, first + 9]
    assert clip.frames.shape == (4, 72, 88, 3)
    expected = media["frames"][window.indices].astype(float)
    assert np.abs(clip.frames - expected).mean() < (1 if kind == "folder" else 12)  # lossy codecs
    assert clip.fps == (None if kind == "folder" else pytest.approx(8.0, rel=0.05))  # gif: 12 cs a frame


def test_default_stride_spans_about_two_seconds():
    assert default_stride(30, 16) == 4 and default_stride(24, 16) == 3 and default_stride(8, 16) == 1
    assert default_stride(None, 16) == 1


def test_cli_edit_writes_the_video(media, tiny_checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "edit.mp4"
    code = edit(["--video", str(media["mp4"]), "--image", str(media["image"]), "--prompt", "a dog",
                 "--source-prompt", "pan right", "--checkpoint", str(tiny_checkpoint_dir), "--out", str(out), *FAST])
    assert code == 0
    assert read_video(out).shape == (4, 64, 64, 3)
    printed = capsys.readouterr().out
    assert "every 3 (4 frames" in printed and "default stride" in printed  # 2 s at 8 fps > the clip: shrunk
    assert "measured on the clip (--bucket auto)" in printed
    assert list(tmp_path.iterdir()) == [out]


def test_cli_reconstruction_segments_and_stride(media, tiny_checkpoint_dir, tmp_path):
    out = tmp_path / "frames"
    code = edit(["--video", str(media["folder"]), "--prompt", "pan right", "--bucket", "4", "--segments", "2",
                 "--stride", "2", "--checkpoint", str(tiny_checkpoint_dir), "--out", str(out), *FAST,
                 "--frames", "2"])
    assert code == 0 and len(list(out.glob("frame_*.png"))) == 5


def _audio_only(path):
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        container.mux(stream.encode())


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"), ("unreadable", "not a readable video"), ("audio_only", "no video stream"),
    ("too_short", "the clip has 12 frames"), ("absurd_stride", "--stride 3 or less fits"),
    ("late_start", "past the end"), ("mixed_sizes", "differ in size"), ("empty_folder", "has no frames"),
])
def test_bad_clips_exit_2_without_output(case, message, media, tiny_checkpoint_dir, tmp_path, caplog):
    video, extra = media["mp4"], []
    if case == "missing":
        video = tmp_path / "nope.mp4"
    elif case == "unreadable":
        video = tmp_path / "text.mp4"
        video.write_text("not a video")
    elif case == "audio_only":
        video = tmp_path / "sound.wav"
        _audio_only(video)
    elif case == "too_short":
        extra = ["--frames", "15"]
    elif case == "absurd_stride":
        extra = ["--stride", "1000"]
    elif case == "late_start":
        extra = ["--start", "60"]
    elif case == "mixed_sizes":
        video = tmp_path / "mixed"
        video.mkdir()
        for i in range(5):
            Image.new("RGB", (80 if i == 2 else 64, 64)).save(video / f"{i}.png")
    elif case == "empty_folder":
        video = tmp_path / "empty"
        video.mkdir()
    out = tmp_path / "out.mp4"
    before = set(tmp_path.rglob("*"))
    with caplog.at_level(logging.ERROR):
        code = edit(["--video", str(video), "--image", str(media["image"]), "--prompt", "x",
                     "--checkpoint", str(tiny_checkpoint_dir), "--out", str(out), *FAST, *extra])
    assert code == EXIT_BAD_INPUT
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and not errors[0].exc_info and message in errors[0].getMessage()
    assert not out.exists() and set(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("flag,value", [("--bucket", "fast"), ("--stride", "0"), ("--start", "-1")])
def test_edit_argument_errors_exit_2(flag, value, media, capsys, caplog):
    try:
        code = edit(["--video", str(media["mp4"]), "--prompt", "x", flag, value])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    assert flag.lstrip("-").split("-")[0] in capsys.readouterr().err + caplog.text


def test_out_naming_the_clip_is_refused(media, tiny_checkpoint_dir, tmp_path, caplog):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(media["mp4"].read_bytes())
    with caplog.at_level(logging.ERROR):
        code = edit(["--video", str(clip), "--prompt", "x", "--checkpoint", str(tiny_checkpoint_dir), "--out",
                     str(clip), "--overwrite", *FAST])
    assert code == EXIT_BAD_INPUT and "is the input" in caplog.text
    assert clip.read_bytes() == media["mp4"].read_bytes()
