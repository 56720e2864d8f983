"""Hostile input, third round (docs/RELIABILITY.md): limits applied before allocating at every entry point,
one image decoder, component configs against their weight headers, and one message instead of a traceback.

In-process and small: a limit that would cost gigabytes is tested with the limit lowered (monkeypatch), so
no test allocates more than a few megabytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cinemo_rt import cli, limits
from cinemo_rt.defaults import DEMO_CHECKPOINT, EXAMPLE_IMAGE
from cinemo_rt.errors import InputError
from cinemo_rt.image import load_image

REPO = Path(__file__).resolve().parent.parent


def run_cli(argv, capsys, caplog) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level("INFO"):
        try:
            code = cli.main(argv)
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
    out, err = capsys.readouterr()
    return code, out + err + caplog.text


def assert_one_message(code, text, fragment):
    assert code == 2, text
    assert "Traceback" not in text, text
    assert fragment in text, text


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "photo.png"
    Image.open(EXAMPLE_IMAGE).convert("RGB").resize((48, 40)).save(path)
    return path


def gif_with_screen(path: Path, width: int, height: int) -> Path:
    """A tiny GIF (one 1x1 frame) whose logical screen claims width x height: a few dozen bytes."""
    body = bytearray(b"GIF89a" + struct.pack("<HH", width, height) + bytes([0x80, 0, 0]) + bytes(6))
    body += b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00" + b"\x3b"
    path.write_bytes(bytes(body))
    return path


# ---------------------------------------------------------------------------------------------
# One size check at every entry point
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, fragment", [
    (["--frames", "8192", "--height", "16", "--width", "16"], "over the limit of 1024"),
    (["--segments", "100000000"], "--segments is 100000000"),
    (["--threads", "10000"], "at most 256 threads"),
])
def test_counts_are_refused_before_work(flags, fragment, image_path, tmp_path, capsys, caplog):
    code, text = run_cli(["run", "--image", str(image_path), "--prompt", "x", "--out", str(tmp_path / "o.mp4"),
                          *flags], capsys, caplog)
    assert_one_message(code, text, fragment)
    assert not (tmp_path / "o.mp4").exists()


def test_edit_segments_are_refused_before_the_clip_is_read(tmp_path, capsys, caplog):
    frames = tmp_path / "frames"
    frames.mkdir()
    code, text = run_cli(["edit", "--video", str(frames), "--prompt", "x", "--segments", "100000000",
                          "--out", str(tmp_path / "o.mp4")], capsys, caplog)
    assert_one_message(code, text, "--segments is 100000000")


def test_python_api_applies_the_same_limits():
    from cinemo_rt.pipeline import Animator

    animator = Animator.from_checkpoint()
    image = load_image(EXAMPLE_IMAGE)
    with pytest.raises(limits.LimitError, match="over the limit of 1024"):
        animator(image, "x", frames=36864, height=16, width=16, steps=1)
    with pytest.raises(limits.LimitError, match="--segments"):
        animator(image, "x", segments=10**8, steps=1)
    with pytest.raises(limits.LimitError, match="8192 px"):
        animator(image, "x", height=16384, width=16, frames=2, steps=1)


def test_temporal_attention_counts_in_the_estimate():
    facts = limits.checkpoint_estimate_inputs(DEMO_CHECKPOINT)
    # frames x frames scores per latent pixel: 8192 frames at 16x16 grew the server past 8 GB
    assert limits.estimate_run_bytes(16, 16, 8192, **facts) > 8 * 2**30
    assert limits.estimate_run_bytes(16, 16, 16, **facts) < 2**30


def test_gif_logical_screen_is_checked_before_decoding(tmp_path, capsys, caplog):
    with pytest.raises(limits.LimitError, match="9000x9000"):
        load_image(gif_with_screen(tmp_path / "still.gif", 9000, 9000))  # the CLI's --image, the server's upload
    gif = gif_with_screen(tmp_path / "screen.gif", 8000, 8000)
    assert gif.stat().st_size < 100
    code, text = run_cli(["edit", "--video", str(gif), "--prompt", "x", "--out", str(tmp_path / "o.mp4"),
                          "--frames", "2", "--stride", "1"], capsys, caplog)
    assert_one_message(code, text, "8000x8000")  # as a clip (PyAV's decoder allocates the logical screen)


def test_frames_folder_pixels_are_checked_from_the_header(tmp_path, monkeypatch, capsys, caplog):
    from cinemo_rt.clip import read_clip

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (200, 100)).save(folder / f"{i:03d}.png")
    monkeypatch.setattr(limits, "MAX_CLIP_FRAME_PIXELS", 10_000)  # 200x100 px stands for a 144 Mpx frame
    with pytest.raises(limits.LimitError, match="Mpx a frame"):
        read_clip(folder, 3)
    monkeypatch.undo()
    monkeypatch.setattr(limits, "available_memory", lambda: 100_000)  # 3 frames of 60 kB each do not fit
    with pytest.raises(limits.LimitError, match="of memory"):
        read_clip(folder, 3)


def test_frames_folder_bomb_is_one_message(tmp_path, monkeypatch, capsys, caplog):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (48, 40)).save(folder / f"{i:03d}.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 48x40 is over 2x Pillow's limit: DecompressionBombError
    code, text = run_cli(["edit", "--video", str(folder), "--prompt", "x", "--frames", "2", "--stride", "1",
                          "--out", str(tmp_path / "o.mp4")], capsys, caplog)
    assert_one_message(code, text, "too large")


# ---------------------------------------------------------------------------------------------
# One image decoder: 16-bit and float images, clean messages
# ---------------------------------------------------------------------------------------------
def sixteen_bit_png(path: Path, value: int = 30000) -> Path:
    Image.fromarray(np.full((40, 48), value, dtype=np.uint16)).save(path)
    return path


def float_tiff(path: Path, value: float) -> Path:
    Image.fromarray(np.full((40, 48), value, dtype=np.float32), mode="F").save(path)
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda p: sixteen_bit_png(p / "i16.png"), round(30000 / 257)),
    (lambda p: float_tiff(p / "unit.tif", 0.5), 128),
    (lambda p: float_tiff(p / "bytes.tif", 100.0), 100),
])
def test_wide_images_decode_the_same_on_every_path(make, expected, tmp_path):
    from cinemo_rt.clip import read_clip
    from cinemo_rt.serve.limits import Limits, read_upload

    path = make(tmp_path)
    from_file = load_image(path)
    assert int(from_file[0, 0, 0]) == expected
    np.testing.assert_array_equal(from_file, read_upload(path.read_bytes(), Limits()))  # the server's path
    if path.suffix == ".png":  # frames folders take PNG, JPEG, WebP and BMP frames
        folder = tmp_path / "frames"
        folder.mkdir()
        for i in range(2):
            shutil.copy(path, folder / f"{i:03d}.png")
        clip, _ = read_clip(folder, 2)
        np.testing.assert_array_equal(clip.frames[0], from_file)


def test_decoder_messages_name_the_problem_not_internals():
    from cinemo_rt.serve.limits import Limits, RequestError, read_upload

    for data in (b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20):
        with pytest.raises(RequestError) as caught:
            read_upload(data, Limits())
        assert caught.value.status == 400
        assert "0x" not in str(caught.value) and "BytesIO" not in str(caught.value), str(caught.value)


# ---------------------------------------------------------------------------------------------
# Component configs against their weight headers
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def demo_copy(tmp_path):
    return Path(shutil.copytree(DEMO_CHECKPOINT, tmp_path / "ckpt"))


def edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("part, changes, fragment", [
    ("vae", {"block_out_channels": [4096, 4096, 4096]}, "block_out_channels[0] is 4096"),
    ("vae", {"layers_per_block": 100000}, "layers_per_block is 100000"),
    ("vae", {"block_out_channels": [64, 128, 256]}, "asks for"),  # within the number rule: built on meta
    ("text_encoder", {"num_hidden_layers": 100000}, "num_hidden_layers is 100000"),
    ("text_encoder", {"hidden_size": 512, "intermediate_size": 2048}, "asks for"),
    ("text_encoder", {"hidden_size": "wide"}, "text_encoder"),
    ("text_encoder", {"num_attention_heads": [2]}, "text_encoder"),
])
def test_component_configs_are_checked_before_building(demo_copy, part, changes, fragment, tmp_path, capsys,
                                                       caplog, image_path):
    edit_json(demo_copy / part / "config.json", **changes)
    code, text = run_cli(["run", "--image", str(image_path), "--prompt", "x", "--checkpoint", str(demo_copy),
                          "--steps", "1", "--out", str(tmp_path / "o.mp4")], capsys, caplog)
    assert_one_message(code, text, fragment)


def test_a_header_that_lies_about_a_shape_blames_the_file(demo_copy, image_path, tmp_path, capsys, caplog):
    weights = demo_copy / "unet" / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [100000, 100000, 3, 3]
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length:])
    code, out = run_cli(["run", "--image", str(image_path), "--prompt", "x", "--checkpoint", str(demo_copy),
                         "--out", str(tmp_path / "o.mp4")], capsys, caplog)
    assert_one_message(code, out, "is damaged")
    assert "--height" not in out


@pytest.mark.parametrize("coefficients", ["abc", [1, "x"], [float("inf")], {"a": 1}, [True], []])
def test_step_cache_coefficients_of_the_wrong_type(demo_copy, coefficients, image_path, tmp_path, capsys, caplog):
    path = demo_copy / "cinemo_rt.json"
    data = json.loads(path.read_text())
    data["step_cache"]["coefficients"] = coefficients
    path.write_text(json.dumps(data).replace("Infinity", "1e999"))
    code, text = run_cli(["run", "--image", str(image_path), "--prompt", "x", "--checkpoint", str(demo_copy),
                          "--steps", "1", "--frames", "2", "--out", str(tmp_path / "o.mp4")], capsys, caplog)
    assert_one_message(code, text, "coefficients must be a list")


# ---------------------------------------------------------------------------------------------
# One message, not a traceback
# ---------------------------------------------------------------------------------------------
def test_symlink_loops_are_one_message(tmp_path, capsys, caplog):
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    code, text = run_cli(["run", "--image", str(loop), "--prompt", "x", "--out", str(tmp_path / "o.mp4")],
                         capsys, caplog)
    assert_one_message(code, text, "loop.png")
    code, text = run_cli(["edit", "--video", str(loop), "--prompt", "x", "--out", str(tmp_path / "o.mp4")],
                         capsys, caplog)
    assert_one_message(code, text, "loop.png")
    code, text = run_cli(["run", "--image", str(EXAMPLE_IMAGE), "--prompt", "x", "--out", str(loop)],
                         capsys, caplog)
    assert_one_message(code, text, "loop.png")


def test_invalid_utf8_prompt_is_one_message(image_path, tmp_path, capsys, caplog):
    prompt = b"a \xff\xfe boat".decode("utf-8", "surrogateescape")  # what Python makes of such argv bytes
    code, text = run_cli(["run", "--image", str(image_path), "--prompt", prompt, "--out",
                          str(tmp_path / "o.mp4")], capsys, caplog)
    assert code == 2 and "not valid UTF-8" in text and "Traceback" not in text


def test_edit_start_past_any_clip(tmp_path, capsys, caplog):
    from cinemo_rt.clip import plan_window

    for start in (1e308, 1e30):
        with pytest.raises(InputError, match="past the end"):
            plan_window(100, 30.0, 3, None, start)


def test_too_long_out_name_is_refused_up_front(image_path, tmp_path, capsys, caplog):
    code, text = run_cli(["run", "--image", str(image_path), "--prompt", "x", "--out",
                          str(tmp_path / ("v" * 250 + ".mp4"))], capsys, caplog)
    assert_one_message(code, text, "too long")


def test_threads_variable_is_checked_before_imports(image_path, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("CINEMO_RT_THREADS", "abc")
    code, text = run_cli(["run", "--image", str(image_path), "--prompt", "x", "--out", str(tmp_path / "o.mp4")],
                         capsys, caplog)
    assert_one_message(code, text, "CINEMO_RT_THREADS must be a whole number")


def cli_process(args, **kw):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CINEMO_RT_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "cinemo_rt.cli", *args], env=env, cwd=REPO, **kw)


@pytest.mark.slow
def test_stdout_full_or_closed_after_the_video_is_written(tmp_path, image_path):
    out = tmp_path / "o.gif"
    args = ["run", "--image", str(image_path), "--prompt", "zoom in", "--steps", "1", "--frames", "2",
            "--height", "32", "--width", "32", "--out", str(out)]
    with open("/dev/full", "w") as full:
        done = cli_process(args, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "stdout is closed or full" in done.stderr
    assert out.is_file()
    out.unlink()
    reader, writer = os.pipe()
    os.close(reader)  # `| head` that has exited
    done = cli_process(args, stdout=writer, stderr=subprocess.PIPE, text=True, timeout=300)
    os.close(writer)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert out.is_file()


def test_sighup_is_handled_like_sigterm():
    from cinemo_rt.interrupts import EXIT_HANGUP, exit_code_for, terminate_as_interrupt

    with terminate_as_interrupt():
        with pytest.raises(KeyboardInterrupt) as caught:
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(1000):  # the handler runs at the next bytecode boundary
                pass
    assert exit_code_for(caught.value) == EXIT_HANGUP == 129


def test_build_engines_on_a_full_disk_is_one_message(tmp_path, tiny_checkpoint_dir, monkeypatch, capsys, caplog):
    import torch

    from export import build_engines as be

    pytest.importorskip("onnx", reason="export extras: pip install -e '.[onnx]'")
    calls = []

    def full_disk(*args, dynamo=True, **kwargs):  # both exporters, as torch wraps the write error
        calls.append(dynamo)
        raise RuntimeError("failed to save the model: [Errno 28] No space left on device")

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    caplog.clear()
    with caplog.at_level("INFO"):
        code = be.main(["--checkpoint", str(tiny_checkpoint_dir), "--out", str(tmp_path / "eng"),
                        "--height", "32", "--width", "32", "--frames", "2"])
    text = capsys.readouterr().err + caplog.text
    assert code == 2 and "No space left on device" in text and "Traceback" not in text, text
    assert calls == [True] and "falling back" not in text  # not reported as the exporter's failure
    assert not [p for p in tmp_path.rglob(".*")]


# ---------------------------------------------------------------------------------------------
# Training: config values and resume files
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, fragment", [
    (["--threads", "-1"], "threads must be at least 0"), (["--steps", "abc"], "steps must be a whole number"),
    (["--batch_size", "0"], "batch_size must be at least 1"), (["--height", "1e9"], "height must be a whole number"),
    (["--height", "1000000000"], "the limit is 8192"), (["--lr", "NaN"], "lr must be a finite number"),
    (["--frame_interval", "[1]"], "frame_interval must be a pair"), (["--bf16", "3"], "bf16 must be true or false"),
])
def test_bad_training_config_values_are_one_message(override, fragment, capsys):
    from cinemo_rt.train.__main__ import main

    with pytest.raises(SystemExit) as stop:  # argparse's error: usage, the message, exit 2
        main(["--unet.sample_size", "8", *override])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def tiny_training_state(tmp_path):
    import torch

    from cinemo_rt.train.loop import EMA, STATE_FILE, _rng_state

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    generator = torch.Generator().manual_seed(0)
    state = {"unet": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_schedule": schedule.state_dict(), "step": 1}
    torch.save(state, tmp_path / STATE_FILE)
    torch.save(_rng_state(generator), tmp_path / "rng_rank0.pt")

    def fresh():
        m = torch.nn.Linear(4, 3)
        o = torch.optim.AdamW(m.parameters(), lr=1e-3)
        return m, EMA(m, 0.9), o, torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0), torch.Generator()

    return fresh


def _tamper(name):
    import torch

    def unet_missing(state, rng):
        del state["unet"]

    def wrong_shape(state, rng):
        state["unet"]["weight"] = torch.zeros(5, 4)

    def optimizer_shape(state, rng):
        state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(7)

    def generator_size(state, rng):
        rng["generator"] = torch.zeros(3, dtype=torch.uint8)

    def no_numpy(state, rng):
        del rng["numpy"]

    def step_text(state, rng):
        state["step"] = "many"

    return {f.__name__: f for f in (unet_missing, wrong_shape, optimizer_shape, generator_size, no_numpy,
                                    step_text)}[name]


@pytest.mark.parametrize("tamper", ["unet_missing", "wrong_shape", "optimizer_shape", "generator_size", "no_numpy",
                                    "step_text"])
def test_tampered_resume_is_one_message(tmp_path, tamper):
    import torch

    from cinemo_rt.train.loop import STATE_FILE, restore_training_state

    fresh = tiny_training_state(tmp_path)
    restore_training_state(tmp_path, 0, *fresh())  # the untampered files resume
    state = torch.load(tmp_path / STATE_FILE, weights_only=True)
    rng = torch.load(tmp_path / "rng_rank0.pt", weights_only=True)
    _tamper(tamper)(state, rng)
    torch.save(state, tmp_path / STATE_FILE)
    torch.save(rng, tmp_path / "rng_rank0.pt")
    with pytest.raises(ValueError, match="cannot resume from .*(training_state|rng_rank0)"):
        restore_training_state(tmp_path, 0, *fresh())


@pytest.mark.parametrize("override, fragment", [
    (["--vae.layers_per_block", "100000"], "vae.layers_per_block is 100000"),
    (["--unet.block_out_channels", "[8192, 8192]"], "unet.block_out_channels[0] is 8192"),
])
def test_from_scratch_model_sizes_are_bounded(override, fragment, capsys):
    from cinemo_rt.train.__main__ import main

    with pytest.raises(SystemExit) as stop:
        main(["--unet.sample_size", "8", *override])
    assert stop.value.code == 2 and fragment in capsys.readouterr().err


def test_from_scratch_models_past_the_memory_are_refused_before_allocating(monkeypatch):
    from cinemo_rt.train import components

    monkeypatch.setattr(limits, "available_memory", lambda: 2**20)
    with pytest.raises(ValueError, match="training config vae asks for .* parameters"):
        components.build_vae({"block_out_channels": [64, 128], "norm_num_groups": 8}, seed=0)
    assert components.build_vae({"block_out_channels": [8], "norm_num_groups": 4}, seed=0) is not None


def test_thread_counts_are_bounded_for_the_python_api_too():
    from cinemo_rt.threads import choose_threads

    with pytest.raises(ValueError, match="at most 256 threads"):
        choose_threads(0, requested=10000)
    assert choose_threads(0, requested=3) == (3, "as requested")
