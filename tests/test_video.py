"""Video writing (mp4 / gif / PNG folder) round trips through PyAV, errors, and atomicity."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
import torch

from cinemo_rt import video
from cinemo_rt.video import OutputError, read_video, resolve_format, write_video


def gradient_frames(t: int = 5, h: int = 32, w: int = 48) -> np.ndarray:
    """Smooth moving gradients: lossy codecs reproduce them closely, unlike noise."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [
        np.stack([(x * 255 // w + 10 * i) % 256, y * 255 // h, np.full_like(x, 40 * i % 256)], axis=-1)
        for i in range(t)
    ]
    return np.stack(frames).astype(np.uint8)


def test_mp4_round_trip(tmp_path):
    frames = gradient_frames()
    out = write_video(frames, tmp_path / "clip.mp4", fps=8)
    decoded = read_video(out)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - frames).mean() < 4
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.average_rate == 8
        assert stream.codec_context.pix_fmt == "yuv420p"


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    frames = gradient_frames(3, 31, 45)
    decoded = read_video(write_video(frames, tmp_path / "odd.mp4"))
    assert decoded.shape == (3, 32, 46, 3)
    assert np.abs(decoded[:, :31, :45].astype(int) - frames).mean() < 4


def test_gif_round_trip_keeps_every_frame(tmp_path):
    frames = gradient_frames(4)
    frames[2] = frames[1]  # a repeated frame must stay a frame of its own
    decoded = read_video(write_video(torch.from_numpy(frames), tmp_path / "clip.gif"))
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3  # 256-colour palette per frame


def test_png_folder_round_trip_is_exact(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 9, 11, 3), dtype=np.uint8)
    out = write_video(frames, tmp_path / "frames")
    assert sorted(os.listdir(out)) == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
    assert np.array_equal(read_video(out), frames)
    with av.open(str(out / "frame_0001.png")) as container:  # readable by PyAV too
        assert np.array_equal(next(container.decode(video=0)).to_ndarray(format="rgb24"), frames[1])
    # Rewriting (with overwrite) replaces the folder of frames (here with fewer frames).
    with pytest.raises(OutputError, match="--overwrite"):
        write_video(frames[:2], tmp_path / "frames")
    write_video(frames[:2], tmp_path / "frames", overwrite=True)
    assert len(os.listdir(out)) == 2


def test_format_argument_overrides_suffix(tmp_path):
    out = write_video(gradient_frames(2), tmp_path / "clip.bin", format="gif")
    with av.open(str(out)) as container:
        assert container.format.name == "gif"
    assert resolve_format("x.MP4") == "mp4" and resolve_format("dir") == "png"


@pytest.mark.parametrize("path, fmt", [("clip.avi", None), ("clip.mp4", "webm")])
def test_unknown_format_names_supported(tmp_path, path, fmt):
    with pytest.raises(ValueError, match="mp4.*gif"):
        write_video(gradient_frames(2), tmp_path / path, format=fmt)
    assert os.listdir(tmp_path) == []


def test_missing_folder_is_output_error(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_video(gradient_frames(2), tmp_path / "missing" / "clip.mp4")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_folder_is_output_error(tmp_path):
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            write_video(gradient_frames(2), tmp_path / "clip.mp4")
    finally:
        os.chmod(tmp_path, 0o700)


def test_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="refusing"):
        write_video(gradient_frames(2), tmp_path / "frames", overwrite=True)
    assert os.listdir(tmp_path / "frames") == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["frames"]  # no temporary left behind


def test_bad_frames_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_video(np.zeros((2, 8, 8, 3), np.float32), tmp_path / "clip.mp4")


def test_success_leaves_only_outputs(tmp_path):
    frames = gradient_frames(2)
    for name in ("a.mp4", "a.gif", "a"):
        write_video(frames, tmp_path / name)
    write_video(frames, tmp_path / "a.mp4", overwrite=True)  # overwriting an existing file
    assert sorted(os.listdir(tmp_path)) == ["a", "a.gif", "a.mp4"]


@pytest.mark.parametrize(
    "name, encoder", [("clip.mp4", "_encode_mp4"), ("clip.gif", "_encode_gif"), ("frames", "_write_png_folder")]
)
def test_failure_leaves_nothing_behind(tmp_path, monkeypatch, name, encoder):
    real = getattr(video, encoder)

    def half_written_then_fail(frames, target, *args):
        real(frames[:1], target, *args)
        raise RuntimeError("encoder died")

    monkeypatch.setattr(video, encoder, half_written_then_fail)
    with pytest.raises(RuntimeError, match="encoder died"):
        write_video(gradient_frames(2), tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_outputs_get_ordinary_permissions(tmp_path):
    """Temporary files are 0600; the renamed output must be readable like any file the user writes."""
    import stat

    from cinemo_rt.files import _umask

    frames = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    for name in ("a.mp4", "b.gif", "frames"):
        path = write_video(frames, tmp_path / name)
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = (0o777 if path.is_dir() else 0o666) & ~_umask()
        assert mode == expected, (name, oct(mode))
