"""The thread policy, checks before any heavy import, memory and size limits, and the
small things a newcomer noticed. Every hostile case asserts the exit code, one message naming the fix, no
traceback, and no output left behind; the rows of docs/RELIABILITY.md point here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cinemo_rt import limits, threads
from cinemo_rt.cli import EXIT_BAD_INPUT, main
from cinemo_rt.defaults import DEMO_CHECKPOINT, EXAMPLE_IMAGE

FAST = ["--steps", "2", "--frames", "3", "--height", "64", "--width", "64", "--seed", "0"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((72, 96, 3)) * 255).astype(np.uint8)).save(path)
    return path


def run_bad(args, tmp_path, caplog, message):
    """main() exits 2 with one ERROR record containing `message`, no traceback, nothing new in tmp_path."""
    before = set(tmp_path.rglob("*"))
    caplog.clear()
    with caplog.at_level("INFO"):
        code = main(["run", *args])
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert code == EXIT_BAD_INPUT, caplog.text
    assert len(errors) == 1 and not errors[0].exc_info, caplog.text
    assert message in errors[0].getMessage(), errors[0].getMessage()
    assert set(tmp_path.rglob("*")) == before
    return errors[0].getMessage()


# -- the thread policy ------------------------------------------------------------------------------------------
def test_thread_policy_order(monkeypatch):
    for name in (threads.ENV_VAR, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    assert threads.choose_threads(1_000_000)[0] == 1                       # small model: one thread
    assert threads.choose_threads(900_000_000)[0] == 6                     # large: one per available core
    assert threads.choose_threads(900_000_000, processes=4)[0] == 1        # four training ranks share six cores
    assert threads.choose_threads(None)[0] == 6                            # unknown size counts as large
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(1_000_000) == (3, "from OMP_NUM_THREADS")
    monkeypatch.setenv(threads.ENV_VAR, "4")
    assert threads.choose_threads(1_000_000) == (4, f"from {threads.ENV_VAR}")
    assert threads.choose_threads(1_000_000, requested=2) == (2, "as requested")
    monkeypatch.setenv(threads.ENV_VAR, "auto")
    assert threads.choose_threads(1_000_000)[0] == 3


def test_available_cores_follow_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    assert threads.available_cores() == 1


@pytest.mark.parametrize("value", ["many", "-2", "1.5"])
def test_bad_thread_counts_are_refused(value, image_path, tmp_path, caplog):
    run_bad(["--image", str(image_path), "--prompt", "x", "--threads", value, "--out", str(tmp_path / "o.mp4")],
            tmp_path, caplog, "--threads must be")


def test_run_uses_the_policy_and_reports_it(tiny_checkpoint_dir, image_path, tmp_path, caplog, monkeypatch):
    import torch

    monkeypatch.delenv(threads.ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO"):
            assert main(["run", "--image", str(image_path), "--prompt", "x", "--checkpoint", str(tiny_checkpoint_dir),
                         "--out", str(tmp_path / "o.gif"), *FAST]) == 0
        assert "CPU threads: 1 (small model" in caplog.text
        with caplog.at_level("INFO"):
            assert main(["run", "--image", str(image_path), "--prompt", "x", "--checkpoint", str(tiny_checkpoint_dir),
                         "--out", str(tmp_path / "o2.gif"), "--threads", "2", *FAST]) == 0
        assert "CPU threads: 2 (as requested" in caplog.text
    finally:
        torch.set_num_threads(before)


# -- start-up: bad input is found before torch, diffusers or PyAV is imported ---------------------------------------
PROBE = """
import sys
from cinemo_rt.cli import main
code = main(sys.argv[1:])
print("HEAVY", sorted(m for m in ("torch", "diffusers", "transformers", "av") if m in sys.modules))
sys.exit(code)
"""


@pytest.mark.parametrize("case", ["missing_image", "huge_height", "bad_checkpoint_folder", "bad_format"])
def test_bad_input_is_reported_before_heavy_imports(case, image_path, tmp_path):
    args = {"missing_image": ["--image", str(tmp_path / "nope.png")],
            "huge_height": ["--image", str(image_path), "--height", "100000"],
            "bad_checkpoint_folder": ["--image", str(image_path), "--checkpoint", str(tmp_path / "nothing")],
            "bad_format": ["--image", str(image_path), "--out", str(tmp_path / "x.avi")]}[case]
    out = [] if case == "bad_format" else ["--out", str(tmp_path / "o.mp4")]
    result = subprocess.run([sys.executable, "-c", PROBE, "run", "--prompt", "x", *args, *out], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert "HEAVY []" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr and result.stderr.count("ERROR") == 1, result.stderr


VALIDATE_ONLY = """
import sys
from cinemo_rt import cli
from cinemo_rt.preflight import plan_run
from cinemo_rt.threads import parse_threads
args = cli.parse_args(sys.argv[1:])
request = cli.build_request(args)
cli._check_output(args)
parse_threads(args.threads)
plan_run(args, request)
print("MOTION", request.motion, "HEAVY", sorted(m for m in ("torch", "diffusers", "transformers", "av")
                                               if m in sys.modules))
"""


def test_validating_a_good_demo_run_imports_no_torch(image_path, tmp_path):
    """The validate phase of `cinemo-rt run` (what `cmd_run` times as "validate") stays light: torch is
    the run's largest import and is timed as its own phase."""
    result = subprocess.run([sys.executable, "-c", VALIDATE_ONLY, "run", "--prompt", "the camera pans left",
                             "--bucket", "15", "--image", str(image_path), "--out", str(tmp_path / "o.mp4")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "MOTION 84.0 HEAVY []" in result.stdout, result.stdout


def test_verbose_run_reports_startup_phases_and_progress(tiny_checkpoint_dir, image_path, tmp_path, caplog, capsys):
    with caplog.at_level("DEBUG"):
        assert main(["-v", "run", "--image", str(image_path), "--prompt", "x", "--checkpoint",
                     str(tiny_checkpoint_dir), "--out", str(tmp_path / "o.mp4"), *FAST]) == 0
    startup = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up:"))
    assert all(phase in startup for phase in ("validate", "import torch", "import libraries", "load model"))
    # Not a terminal here: progress goes to the log instead of a bar.
    assert "denoising: step 2/2" in caplog.text
    # The success line is printed once, height x width.
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote")]
    assert lines == [f"wrote 4 frames of 64x64 (height x width) to {tmp_path / 'o.mp4'}"]


# -- output size and memory -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,message", [
    (["--height", "100000"], "8192 px limit"),
    (["--frames", "100000"], "limit of 1024 per segment"),
    (["--height", "60"], "divisible by 8"),
])
def test_sizes_past_the_ceilings_are_refused(flags, message, tiny_checkpoint_dir, image_path, tmp_path, caplog):
    run_bad(["--image", str(image_path), "--prompt", "x", "--checkpoint", str(tiny_checkpoint_dir),
             "--out", str(tmp_path / "o.mp4"), *flags], tmp_path, caplog, message)


def test_checkpoint_default_size_is_bounded_too(tiny_checkpoint_dir, image_path, tmp_path, caplog):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_dir, checkpoint)
    (checkpoint / limits.DEFAULTS_FILE).write_text(json.dumps({"height": 80000, "width": 80000, "frames": 8}))
    run_bad(["--image", str(image_path), "--prompt", "x", "--checkpoint", str(checkpoint),
             "--out", str(tmp_path / "o.mp4")], tmp_path, caplog, "8192 px limit")
    (checkpoint / limits.DEFAULTS_FILE).write_text(json.dumps({"height": "tall"}))
    run_bad(["--image", str(image_path), "--prompt", "x", "--checkpoint", str(checkpoint),
             "--out", str(tmp_path / "o.mp4")], tmp_path, caplog, "height must be a whole number at least 1")


def test_memory_estimate_refuses_with_the_flags_that_lower_it(tiny_checkpoint_dir, image_path, tmp_path, caplog,
                                                              monkeypatch):
    import cinemo_rt.preflight as preflight

    monkeypatch.setattr(limits, "available_memory", lambda: 2**30)  # where the one size check lives
    monkeypatch.setattr(preflight, "runs_on_cpu", lambda device: True)
    message = run_bad(["--image", str(image_path), "--prompt", "x", "--checkpoint", str(tiny_checkpoint_dir),
                       "--out", str(tmp_path / "o.mp4"), "--height", "2048", "--width", "2048", "--frames", "64"],
                      tmp_path, caplog, "of memory; 1.0 GiB is available")
    assert "Lower --height/--width/--frames" in message


def test_estimate_tracks_size_and_warns_far_from_the_checkpoint(caplog):
    facts = limits.checkpoint_estimate_inputs(DEMO_CHECKPOINT)
    assert facts["latent_factor"] == 4 and facts["base_channels"] == 32 and facts["parameters"] < 5_000_000
    small = limits.estimate_run_bytes(32, 32, 8, **facts)
    large = limits.estimate_run_bytes(512, 512, 8, **facts)
    assert limits.RUNTIME_BYTES < small < large
    assert limits.estimate_run_bytes(512, 512, 8, attention_scores=True, **facts) > large
    defaults = limits.size_defaults(DEMO_CHECKPOINT)
    with caplog.at_level("WARNING"):
        limits.check_output_size(32, 32, 8, estimate=small, defaults=defaults, memory=None)
        assert not caplog.records
        limits.check_output_size(512, 512, 8, estimate=large, defaults=defaults, memory=None)
    assert "far from this checkpoint's 32x32" in caplog.text


# -- images -------------------------------------------------------------------------------------------------------------
def test_decompression_bomb_gets_a_message_not_a_traceback(image_path, tmp_path, caplog):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx in a few kB: over Pillow's own bomb limit
    assert bomb.stat().st_size < 1_000_000
    run_bad(["--image", str(bomb), "--prompt", "x", "--out", str(tmp_path / "o.mp4")], tmp_path, caplog,
            "Mpx limit")


def test_images_over_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    from cinemo_rt.image import load_image

    path = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(path)
    monkeypatch.setattr(limits, "MAX_IMAGE_PIXELS", 50_000)
    with pytest.raises(limits.LimitError, match=r"200x300 \(height x width\).*downscale"):
        load_image(path)


# -- a checkpoint's config is checked against its weights before the model is built --------------------------------------
@pytest.mark.parametrize("change,message", [
    ({"block_out_channels": [4096, 8192]}, "block_out_channels"),
    ({"layers_per_block": 100000}, "layers_per_block is 100000"),
])
def test_config_is_checked_against_the_weight_header(change, message, tiny_checkpoint_dir, image_path, tmp_path,
                                                     caplog):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_dir, checkpoint)
    config_path = checkpoint / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(change)
    config_path.write_text(json.dumps(config))
    run_bad(["--image", str(image_path), "--prompt", "x", "--checkpoint", str(checkpoint),
             "--out", str(tmp_path / "o.mp4"), *FAST], tmp_path, caplog, message)


def test_truncated_safetensors_is_named(tiny_checkpoint_dir, image_path, tmp_path, caplog):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_dir, checkpoint)
    weights = checkpoint / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5])
    run_bad(["--image", str(image_path), "--prompt", "x", "--checkpoint", str(checkpoint),
             "--out", str(tmp_path / "o.mp4"), *FAST], tmp_path, caplog, "not a safetensors file")


def test_header_shapes_match_the_loaded_weights(tiny_checkpoint_dir):
    from safetensors.torch import load_file

    path = tiny_checkpoint_dir / "unet" / "diffusion_pytorch_model.safetensors"
    header = limits.safetensors_header(path)
    state = load_file(str(path))
    assert {k: s for k, (_, s) in header.items()} == {k: tuple(v.shape) for k, v in state.items()}
    assert limits.parameter_count(header) == sum(v.numel() for v in state.values())
    assert limits.check_unet_config(tiny_checkpoint_dir) == []


# -- export.build_engines: the checkpoint's size, and an estimate before exporting -----------------------------------------
def test_build_takes_the_checkpoints_size_and_refuses_past_memory(tmp_path, monkeypatch, caplog):
    from export import build_engines

    options = build_engines.BuildOptions(checkpoint=DEMO_CHECKPOINT, out=tmp_path / "eng")
    assert build_engines.check_build_size(options) == (32, 32, 8)
    # The build the OOM killer ended at 21.8 GB: refused up front with the estimate and the flags.
    monkeypatch.setattr(limits, "available_memory", lambda: 16 * 2**30)
    with caplog.at_level("ERROR"):
        code = build_engines.main(["--checkpoint", str(DEMO_CHECKPOINT), "--out", str(tmp_path / "eng"),
                                   "--height", "320", "--width", "512", "--frames", "15"])
    assert code == 2 and "Lower --height/--width/--frames" in caplog.text and "16.0 GiB is available" in caplog.text
    assert not (tmp_path / "eng").exists()
    with pytest.raises(SystemExit) as exit_info:
        build_engines.main(["--checkpoint", str(DEMO_CHECKPOINT), "--out", str(tmp_path / "e"), "--frames", "0"])
    assert exit_info.value.code == 2


# -- small things a newcomer noticed -----------------------------------------------------------------------------------------
def test_version_and_help_show_defaults(capsys):
    from cinemo_rt import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"cinemo-rt {__version__}"
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: cinemo.mp4)" in text and "(default 9" in text and "--threads" in text


def test_from_checkpoint_without_a_folder_opens_the_demo():
    from cinemo_rt import Animator

    animator = Animator.from_checkpoint(device="cpu")
    assert (animator.defaults.height, animator.defaults.width, animator.defaults.frames) == (32, 32, 8)


def test_words_outside_the_demo_vocabulary_are_named(caplog):
    from cinemo_rt.preflight import plan_run

    from cinemo_rt.request import Request

    args = Namespace(engines=None, checkpoint=str(DEMO_CHECKPOINT), image=str(EXAMPLE_IMAGE), dtype=None,
                     device="cpu")
    with caplog.at_level("WARNING"):
        plan = plan_run(args, Request("a boat pans left"))
    assert plan.folder == DEMO_CHECKPOINT and plan.parameters < 5_000_000
    assert "does not know 'a', 'boat'" in caplog.text or "does not know 'boat'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        plan_run(args, Request("the camera pans left"))
    assert "does not know" not in caplog.text
