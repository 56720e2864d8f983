"""`cinemo-rt run` end to end on a tiny checkpoint, and one clear message + exit code 2 per bad input."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cinemo_rt.cli import EXIT_BAD_INPUT, main
from cinemo_rt.video import read_video

FAST = ["--steps", "2", "--frames", "3", "--height", "64", "--width", "64", "--seed", "0"]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((72, 96, 3)) * 255).astype(np.uint8)).save(path)
    return path


def run(args):
    return main(["run", *args])


def test_cli_writes_mp4_that_decodes(tiny_checkpoint_dir, image_path, tmp_path, caplog):
    out = tmp_path / "video.mp4"
    with caplog.at_level("INFO"):
        code = run(["--image", str(image_path), "--prompt", "the camera pans left", "--bucket", "15",
                    "--checkpoint", str(tiny_checkpoint_dir), "--out", str(out), *FAST])
    assert code == 0
    frames = read_video(out)
    assert frames.shape == (4, 64, 64, 3)
    assert "5 denoise" in caplog.text and "backend: torch" in caplog.text
    assert list(tmp_path.iterdir()) == [out]  # no temporary left behind


def test_cli_gif_png_and_segments(tiny_checkpoint_dir, image_path, tmp_path):
    gif = tmp_path / "v.gif"
    assert run(["--image", str(image_path), "--prompt", "zoom in", "--checkpoint", str(tiny_checkpoint_dir),
                "--out", str(gif), "--segments", "2", *FAST]) == 0
    assert read_video(gif).shape[0] == 7
    frames_dir = tmp_path / "frames"
    assert run(["--image", str(image_path), "--prompt", "zoom in", "--checkpoint", str(tiny_checkpoint_dir),
                "--out", str(frames_dir), "--motion-id", "85.5", *FAST]) == 0
    assert len(list(frames_dir.glob("frame_*.png"))) == 4


def test_console_script_entry_point(tmp_path):
    exe = shutil.which("cinemo-rt")
    cmd = [exe] if exe else [sys.executable, "-m", "cinemo_rt.cli"]
    result = subprocess.run([*cmd, "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "backends:" in result.stdout


@pytest.mark.parametrize("case", ["missing", "not_image", "too_small", "bad_folder", "bad_format",
                                  "incomplete_checkpoint"])
def test_bad_inputs_exit_2_without_output(case, tiny_checkpoint_dir, image_path, tmp_path, caplog):
    image, out, checkpoint = str(image_path), tmp_path / "out.mp4", tiny_checkpoint_dir
    if case == "missing":
        image = str(tmp_path / "nope.png")
    elif case == "not_image":
        (tmp_path / "text.png").write_text("hello")
        image = str(tmp_path / "text.png")
    elif case == "too_small":
        Image.new("RGB", (20, 200)).save(tmp_path / "small.png")
        image = str(tmp_path / "small.png")
    elif case == "bad_folder":
        out = tmp_path / "no" / "such" / "dir" / "out.mp4"
    elif case == "bad_format":
        out = tmp_path / "out.avi"
    elif case == "incomplete_checkpoint":
        checkpoint = tmp_path / "ckpt"
        shutil.copytree(tiny_checkpoint_dir, checkpoint)
        shutil.rmtree(checkpoint / "text_encoder")
    before = set(tmp_path.rglob("*"))
    with caplog.at_level("ERROR"):
        code = run(["--image", image, "--prompt", "x", "--checkpoint", str(checkpoint), "--out", str(out), *FAST])
    assert code == EXIT_BAD_INPUT
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and not errors[0].exc_info  # a message, no traceback
    assert not out.exists()
    assert set(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("flag,value", [("--bucket", "20"), ("--bucket", "fast"), ("--steps", "0")])
def test_argument_errors_exit_2(flag, value, image_path, capsys, caplog):
    """Text that is no number stops argparse; a number the request refuses stops the request: exit 2 both."""
    try:
        code = run(["--image", str(image_path), "--prompt", "x", flag, value])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    assert flag.lstrip("-").split("-")[0] in capsys.readouterr().err + caplog.text


def test_embedded_default_when_no_checkpoint(image_path, tmp_path, monkeypatch, caplog):
    """No --checkpoint/--engines: the embedded default is used, and the user is told which one."""
    import cinemo_rt.defaults as defaults

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(defaults, "DEMO_CHECKPOINT", tmp_path / "not-bundled")
    out = tmp_path / "default.mp4"
    with caplog.at_level("INFO"):
        assert run(["--image", str(image_path), "--prompt", "pan left", "--steps", "2", "--frames", "2",
                    "--seed", "0", "--out", str(out)]) == 0
    assert "embedded demo checkpoint" in caplog.text and "untrained" in caplog.text
    assert read_video(out).shape == (3, 128, 192, 3)  # the stand-in's own default size


def test_scale_verbose_after_the_subcommand_and_the_readme_quick_start_twice(tiny_checkpoint_dir, image_path,
                                                                           tmp_path, caplog, capsys):
    """`-v` in `run`'s flag table works after the subcommand; `--scale` enlarges the written video (nearest:
    exact blocks of the model's pixels); `--overwrite` makes the documented first command re-runnable."""
    plain, scaled, smooth = tmp_path / "plain", tmp_path / "scaled", tmp_path / "smooth.mp4"
    common = ["--image", str(image_path), "--prompt", "pan left", "--checkpoint", str(tiny_checkpoint_dir), *FAST]
    assert run([*common, "--out", str(plain)]) == 0
    with caplog.at_level("DEBUG"):
        assert run([*common, "--out", str(scaled), "--scale", "3", "-v"]) == 0
    assert "start-up:" in caplog.text  # debug logging is on
    assert "192x192 (height x width, scaled 3x (nearest))" in capsys.readouterr().out
    frames = [np.asarray(Image.open(p)) for p in sorted(plain.glob("*.png"))]
    big = [np.asarray(Image.open(p)) for p in sorted(scaled.glob("*.png"))]
    assert big[0].shape == (192, 192, 3)
    assert all(np.array_equal(b, f.repeat(3, 0).repeat(3, 1)) for b, f in zip(big, frames))
    for _ in range(2):  # the second run replaces the first
        assert run([*common, "--out", str(smooth), "--scale", "2", "--scale-filter", "lanczos", "--overwrite"]) == 0
    assert read_video(smooth).shape == (4, 128, 128, 3)
    with pytest.raises(SystemExit) as exit_:
        run([*common, "--out", str(tmp_path / "x.mp4"), "--scale", "0"])
    assert exit_.value.code == EXIT_BAD_INPUT
    assert "--scale must be a whole number in 1..16" in capsys.readouterr().err


def test_format_message_uses_the_cli_spelling(tiny_checkpoint_dir, image_path, tmp_path, caplog):
    code = run(["--image", str(image_path), "--prompt", "p", "--checkpoint", str(tiny_checkpoint_dir),
                "--out", str(tmp_path / "video.webm"), *FAST])
    assert code == EXIT_BAD_INPUT and "--format" in caplog.text and "format=" not in caplog.text
