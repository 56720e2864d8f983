"""Hostile input (docs/RELIABILITY.md): every case ends in one message and its exit code, with no
traceback, nothing of the user's lost and no temporary left behind.

In-process (`cinemo_rt.cli.main`, `export.build_engines.main`) to keep the suite fast; the few cases that
denoise use the tiny checkpoint at 32x32 with 1 step.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cinemo_rt import cli, video
from cinemo_rt.interrupts import EXIT_INTERRUPTED, EXIT_TERMINATED

QUICK = ["--prompt", "zoom in", "--steps", "1", "--frames", "2", "--height", "32", "--width", "32", "--seed", "0"]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def call(entry, argv, capsys, caplog) -> tuple[int, str]:
    """Run a CLI entry point in-process -> (exit code, everything it printed or logged)."""
    caplog.clear()
    with caplog.at_level("INFO"):
        try:
            code = entry(argv)
        except SystemExit as stop:  # argparse's own errors
            code = stop.code
    out, err = capsys.readouterr()
    return code, out + err + caplog.text


def run_cli(argv, capsys, caplog):
    return call(cli.main, ["run", *argv], capsys, caplog)


def build_engines(argv, capsys, caplog):
    from export import build_engines as be

    return call(be.main, argv, capsys, caplog)


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders): 'nothing lost, nothing added'."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
            for p in sorted(folder.rglob("*"))}


def hidden(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*")]


def assert_refused(code, text, expected_code, *words):
    assert code == expected_code, text
    assert "Traceback" not in text, text
    for word in words:
        assert word in text, (word, text)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture
def work(tmp_path, photo) -> Path:
    shutil.copy(photo, tmp_path / "photo.png")
    return tmp_path


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Data loss
# ---------------------------------------------------------------------------------------------
def test_output_over_the_input_is_refused(work, tiny_checkpoint_dir, capsys, caplog):
    Image.open(work / "photo.png").save(work / "photo.gif")
    before = snapshot(work)
    for out, extra in [("photo.gif", []), ("photo.gif", ["--overwrite"]), ("./sub/../photo.gif", ["--overwrite"])]:
        (work / "sub").mkdir(exist_ok=True)
        code, text = run_cli(["--image", str(work / "photo.gif"), "--out", str(work / out), *extra, *QUICK,
                              "--checkpoint", str(tiny_checkpoint_dir)], capsys, caplog)
        assert_refused(code, text, 2, "is the input")
        (work / "sub").rmdir()
    code, text = run_cli(["--image", str(work / "photo.png"), "--format", "mp4", "--out", str(work / "photo.png"),
                          "--overwrite", *QUICK], capsys, caplog)
    assert_refused(code, text, 2, "ends in .png")
    assert snapshot(work) == before


def test_existing_output_needs_overwrite(work, tiny_checkpoint_dir, capsys, caplog):
    out = work / "clip.mp4"
    out.write_bytes(b"the user's own video")
    before = snapshot(work)
    args = ["--image", str(work / "photo.png"), "--out", str(out), "--checkpoint", str(tiny_checkpoint_dir), *QUICK]
    code, text = run_cli(args, capsys, caplog)
    assert_refused(code, text, 2, "already exists", "--overwrite")
    assert snapshot(work) == before
    code, text = run_cli([*args, "--overwrite"], capsys, caplog)
    assert code == 0, text
    assert video.read_video(out).shape == (3, 32, 32, 3) and not hidden(work)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a POSIX fifo")
def test_non_regular_output_is_never_written(work, capsys, caplog):
    fifo = work / "pipe.mp4"
    os.mkfifo(fifo)
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", str(fifo), "--overwrite", *QUICK],
                         capsys, caplog)
    assert_refused(code, text, 2, "not a regular file")
    assert fifo.exists() and not fifo.is_file() and not hidden(work)


def test_save_checkpoint_keeps_the_users_files(tmp_path):
    from cinemo_rt.checkpoint import save_checkpoint
    from cinemo_rt.safe_paths import OutputError
    from cinemo_rt.testing import make_tiny_components

    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    components = make_tiny_components(seed=0)
    with pytest.raises(OutputError, match="thesis.tex"):
        save_checkpoint(target, components)
    assert os.listdir(target) == ["thesis.tex"] and not hidden(tmp_path)
    fresh = save_checkpoint(tmp_path / "ckpt", components)
    (fresh / "cinemo_rt.json").write_text("{}")
    save_checkpoint(fresh, components)  # a checkpoint folder of ours is replaced whole
    assert (fresh / "unet" / "config.json").is_file() and not hidden(tmp_path)


def test_training_refuses_a_foreign_export_dir_before_work(tmp_path, tiny_checkpoint_dir):
    from cinemo_rt.safe_paths import OutputError
    from cinemo_rt.train.config import TrainConfig
    from cinemo_rt.train.loop import train

    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("keep")
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), export_dir=str(export), data_dir=str(tmp_path / "none"),
                      init_from=str(tiny_checkpoint_dir))
    with pytest.raises(OutputError, match="notes.txt"):
        train(cfg, device="cpu")
    assert os.listdir(export) == ["notes.txt"] and not (tmp_path / "run").exists()


def test_training_cli_refusal_is_exit_2(tmp_path, tiny_checkpoint_dir, capsys, caplog):
    from cinemo_rt.train.__main__ import main as train_main

    export = tmp_path / "export"
    export.mkdir()
    (export / "notes.txt").write_text("keep")
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "run"), "export_dir": str(export),
                                  "data_dir": str(tmp_path / "none"), "init_from": str(tiny_checkpoint_dir)}))
    code, text = call(train_main, ["--config", str(config), "--device", "cpu"], capsys, caplog)
    assert_refused(code, text, 2, "notes.txt")
    assert os.listdir(export) == ["notes.txt"]


def test_output_created_during_the_run_is_kept(work, monkeypatch):
    real = video._encode_mp4
    out = work / "clip.mp4"

    def someone_else_writes_meanwhile(frames, path, fps):
        real(frames, path, fps)
        out.write_bytes(b"another program's file")

    monkeypatch.setattr(video, "_encode_mp4", someone_else_writes_meanwhile)
    with pytest.raises(video.OutputError, match="created by someone else"):
        video.write_video(np.zeros((2, 16, 16, 3), np.uint8), out)
    assert out.read_bytes() == b"another program's file" and not hidden(work)


def test_build_engines_out_is_never_the_checkpoint(tmp_path, tiny_checkpoint_dir, capsys, caplog):
    ckpt = copy_checkpoint(tiny_checkpoint_dir, tmp_path / "ckpt")
    (ckpt / "cinemo_rt.json").write_text('{"height": 32, "width": 32, "frames": 7}\n')
    before = snapshot(ckpt)
    code, text = build_engines(["--checkpoint", str(ckpt), "--out", str(ckpt), "--no-verify"], capsys, caplog)
    assert_refused(code, text, 2, "is the checkpoint folder")
    foreign = tmp_path / "holiday"
    foreign.mkdir()
    (foreign / "beach.jpg").write_bytes(b"jpeg")
    code, text = build_engines(["--checkpoint", str(ckpt), "--out", str(foreign), "--no-verify"], capsys, caplog)
    assert_refused(code, text, 2, "beach.jpg", "not an engines folder")
    assert snapshot(ckpt) == before and os.listdir(foreign) == ["beach.jpg"] and not hidden(tmp_path)


def _terminate_midway(real):
    """Wrap a writer: write part of the output, then receive SIGTERM (as from `kill` or a container stop)."""
    def part_then_sigterm(frames, target, *args):
        real(frames[:1], target, *args)
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not turned into an interrupt")
    return part_then_sigterm


@pytest.mark.parametrize("name, writer", [("clip.mp4", "_encode_mp4"), ("frames", "_write_png_folder")])
def test_sigterm_while_writing_leaves_nothing(work, tiny_checkpoint_dir, monkeypatch, capsys, caplog, name, writer):
    monkeypatch.setattr(video, writer, _terminate_midway(getattr(video, writer)))
    before = snapshot(work)
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", str(work / name),
                          "--checkpoint", str(tiny_checkpoint_dir), *QUICK], capsys, caplog)
    assert_refused(code, text, EXIT_TERMINATED, "interrupted")
    assert snapshot(work) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler removed after the run


def test_sigterm_in_build_engines_removes_its_build_folder(tmp_path, tiny_checkpoint_dir, monkeypatch, capsys,
                                                           caplog):
    from export import build_engines as be

    def export_then_sigterm(spec, module, dims, precision, path, external_data=False):
        Path(path).write_bytes(b"half a graph")
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.setattr(be, "export_onnx", export_then_sigterm)
    out = tmp_path / "eng"
    code, text = build_engines(["--checkpoint", str(tiny_checkpoint_dir), "--out", str(out), "--height", "32",
                                "--width", "32", "--frames", "3", "--no-verify"], capsys, caplog)
    assert_refused(code, text, EXIT_TERMINATED, "interrupted")
    assert not hidden(out) and not list(out.glob("*.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["components"] == {}  # nothing claimed that was not built


def test_ctrl_c_in_build_engines_is_exit_130(tmp_path, tiny_checkpoint_dir, monkeypatch, capsys, caplog):
    from export import build_engines as be

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(be, "load_checkpoint", interrupted, raising=False)
    monkeypatch.setattr("cinemo_rt.checkpoint.load_checkpoint", interrupted)
    code, text = build_engines(["--checkpoint", str(tiny_checkpoint_dir), "--out", str(tmp_path / "eng")],
                               capsys, caplog)
    assert_refused(code, text, EXIT_INTERRUPTED, "interrupted")
    assert not hidden(tmp_path)


def test_precision_change_forgets_the_old_graphs():
    from cinemo_rt.manifest import Component, Manifest, OnnxArtifact
    from cinemo_rt.settings import Size
    from export.build_engines import drop_stale_components

    size = Size(64, 64, 15)

    def built():
        return Manifest(precision="fp16", size=size,
                        components={"unet": Component("k", "w", OnnxArtifact("unet.onnx", "0" * 64))})

    same = type("D", (), {"size": size})()
    assert drop_stale_components(built(), "fp16", same).components == built().components
    assert drop_stale_components(built(), "fp32", same).components == {}
    bigger = type("D", (), {"size": Size(128, 64, 15)})()
    assert drop_stale_components(built(), "fp16", bigger).components == {}


# ---------------------------------------------------------------------------------------------
# Escapes and leaks
# ---------------------------------------------------------------------------------------------
def _engines_folder(tmp_path: Path, tiny_checkpoint_dir: Path, manifest) -> Path:
    folder = tmp_path / "eng"
    folder.mkdir()
    shutil.copytree(tiny_checkpoint_dir / "tokenizer", folder / "tokenizer")
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (folder / "manifest.json").write_text(text)
    return folder


def _manifest(files: dict[str, str], sha: str = "0" * 64) -> dict:
    from cinemo_rt.backends.base import ModelInfo
    from cinemo_rt.manifest import Component, Manifest, OnnxArtifact

    return Manifest(info=ModelInfo(text_dim=32),
                    components={c: Component("k", "w", OnnxArtifact(f, sha)) for c, f in files.items()}).to_json()


@pytest.mark.parametrize("case", ["absolute", "dotdot", "symlink_out", "bad_json", "no_model", "wrong_types",
                                  "hash_mismatch", "not_onnx"])
def test_engines_manifest_is_contained_and_verified(case, tmp_path, tiny_checkpoint_dir, capsys, caplog):
    pytest.importorskip("onnxruntime")
    outside = tmp_path / "evil.onnx"
    outside.write_bytes(b"not a graph")
    names = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
    manifest, expect = {
        "absolute": (_manifest({n: str(outside) for n in names}), "inside the engines folder"),
        "dotdot": (_manifest({n: "../evil.onnx" for n in names}), "outside the engines folder"),
        "symlink_out": (_manifest({n: "link.onnx" for n in names}), "outside the engines folder"),
        "bad_json": ('{"format": 2,', "manifest.json is not valid JSON"),
        "no_model": ({k: v for k, v in _manifest({}).items() if k != "model"}, "malformed (KeyError: 'model')"),
        "wrong_types": ({**_manifest({}), "components": []}, "malformed"),
        "hash_mismatch": (_manifest({n: f"{n}.onnx" for n in names}), "does not match the SHA-256"),
        "not_onnx": (None, "ONNX Runtime cannot load"),
    }[case]
    if case == "not_onnx":
        from cinemo_rt.files import file_sha256

        manifest = _manifest({n: f"{n}.onnx" for n in names}, sha=file_sha256(outside))
    folder = _engines_folder(tmp_path, tiny_checkpoint_dir, manifest)
    for n in names:
        if case in ("hash_mismatch", "not_onnx"):
            shutil.copy(outside, folder / f"{n}.onnx")
    if case == "symlink_out":
        (folder / "link.onnx").symlink_to(outside)
    code, text = run_cli(["--image", str(tmp_path / "nope.png"), "--out", str(tmp_path / "o.mp4"), *QUICK,
                          "--engines", str(folder), "--backend", "onnxruntime"], capsys, caplog)
    if code == 2 and "does not exist" in text:  # the image is checked first; give a real one
        Image.new("RGB", (40, 40)).save(tmp_path / "nope.png")
        code, text = run_cli(["--image", str(tmp_path / "nope.png"), "--out", str(tmp_path / "o.mp4"), *QUICK,
                              "--engines", str(folder), "--backend", "onnxruntime"], capsys, caplog)
    assert_refused(code, text, 2, expect)
    assert not (tmp_path / "o.mp4").exists() and not hidden(tmp_path)


def test_tensorrt_engine_paths_are_contained(tmp_path):
    from cinemo_rt.backends.engines_dir import EnginesDirError, contained_path

    engines = tmp_path / "eng" / "tensorrt"
    engines.mkdir(parents=True)
    assert contained_path(engines, "unet.plan") == (engines / "unet.plan").resolve()
    for escape in ("../../secret.plan", "/etc/passwd", "", None):
        with pytest.raises(EnginesDirError, match="inside the engines folder|outside the engines folder"):
            contained_path(engines, escape)


def test_tokenizer_symlinks_to_outside_are_not_copied(tmp_path, tiny_checkpoint_dir, capsys, caplog):
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    ckpt = copy_checkpoint(tiny_checkpoint_dir, tmp_path / "ckpt")
    (ckpt / "tokenizer" / "notes.txt").symlink_to(secret)
    out = tmp_path / "eng"
    code, text = build_engines(["--checkpoint", str(ckpt), "--out", str(out), "--height", "32", "--width", "32",
                                "--frames", "3", "--no-verify"], capsys, caplog)
    assert_refused(code, text, 2, "symbolic link", "cp -L")
    assert not any("PRIVATE KEY" in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file())
    assert not hidden(out)


def test_tokenizer_symlinks_inside_the_checkpoint_are_copied_as_files(tmp_path):
    from export.build_engines import copy_folder_atomic

    ckpt = tmp_path / "ckpt"
    (ckpt / "tokenizer").mkdir(parents=True)
    (ckpt / "blobs").mkdir()
    (ckpt / "blobs" / "vocab").write_text("{}")
    (ckpt / "tokenizer" / "vocab.json").symlink_to(ckpt / "blobs" / "vocab")
    (tmp_path / "eng").mkdir()
    copy_folder_atomic(ckpt / "tokenizer", tmp_path / "eng" / "tokenizer", root=ckpt)
    copied = tmp_path / "eng" / "tokenizer" / "vocab.json"
    assert copied.is_file() and not copied.is_symlink() and copied.read_text() == "{}"


# ---------------------------------------------------------------------------------------------
# Silently wrong
# ---------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied(tmp_path):
    from cinemo_rt.image import load_image

    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[:, :8] = 255  # a white band on the left of the stored (landscape) pixels
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone portrait stored sideways
    image.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "portrait.jpg")
    assert loaded.shape == (64, 40, 3)  # displayed as a portrait
    assert loaded[:8].mean() > 200 and loaded[-8:].mean() < 50  # the band is now at the top


def test_16_bit_grayscale_png_keeps_its_tones(tmp_path):
    from cinemo_rt.image import load_image

    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    Image.fromarray(ramp).save(tmp_path / "gray16.png")
    loaded = load_image(tmp_path / "gray16.png")
    assert loaded.shape == (48, 64, 3)
    assert loaded[0, 0, 0] == 0 and loaded[0, -1, 0] == 255 and 120 <= loaded[0, 32, 0] <= 135


@pytest.mark.parametrize("flag, value, words", [
    ("--guidance", "nan", "finite"), ("--motion-id", "inf", "finite"), ("--dct-fraction", "nan", "finite"),
    ("--fps", "0", "fps must be"), ("--fps", "inf", "finite"), ("--fps", "-8", "fps must be"),
    ("--seed", str(2**70), "seed must be"), ("--seed", "-1", "seed must be"), ("--device", "tpu9", "unknown device"),
])
def test_bad_numbers_are_refused_before_any_work(flag, value, words, work, capsys, caplog):
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", str(work / "o.mp4"), *QUICK, flag, value],
                         capsys, caplog)
    assert_refused(code, text, 2, words)
    assert not (work / "o.mp4").exists()


def test_library_refuses_non_finite_guidance(tiny_checkpoint_dir, photo):
    from cinemo_rt.pipeline import Animator

    animator = Animator.from_checkpoint(tiny_checkpoint_dir, device="cpu")
    for kwargs in (dict(guidance=float("nan")), dict(motion_id=float("inf"))):
        with pytest.raises(ValueError, match="finite"):
            animator(photo, "zoom in", steps=1, frames=2, height=32, width=32, seed=0, **kwargs)


def test_nan_weights_fail_with_the_step(tmp_path, tiny_checkpoint_dir, work, capsys, caplog):
    from safetensors.torch import load_file, save_file

    ckpt = copy_checkpoint(tiny_checkpoint_dir, tmp_path / "nan_ckpt")
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, weights)
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", str(work / "o.mp4"),
                          "--checkpoint", str(ckpt), *QUICK], capsys, caplog)
    assert_refused(code, text, 2, "NaN or infinite at denoising step 1 of 1")
    assert not (work / "o.mp4").exists() and not hidden(work)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_or_bool_weights_are_refused(dtype, tmp_path, tiny_checkpoint_dir, work, capsys, caplog):
    from safetensors.torch import load_file, save_file

    ckpt = copy_checkpoint(tiny_checkpoint_dir, tmp_path / "int_ckpt")
    weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    state["conv_out.weight"] = state["conv_out.weight"].to(dtype)
    save_file(state, weights)
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", str(work / "o.mp4"),
                          "--checkpoint", str(ckpt), *QUICK], capsys, caplog)
    assert_refused(code, text, 2, "wrong dtypes", "conv_out.weight", str(dtype).removeprefix("torch."))


@pytest.mark.parametrize("out, fmt, words", [
    ("x.mp4", "gif", "ends in .mp4 but the format is gif"),
    ("clip.mp4", "png", "folder name without a suffix"),
    ("photo2.png", "mp4", "a name ending in .mp4"),
])
def test_format_and_suffix_must_agree(out, fmt, words, work, capsys, caplog):
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", str(work / out), "--format", fmt, *QUICK],
                         capsys, caplog)
    assert_refused(code, text, 2, words)
    assert not (work / out).exists()


# ---------------------------------------------------------------------------------------------
# One message and exit 2, not a traceback
# ---------------------------------------------------------------------------------------------
def _break_checkpoint(ckpt: Path, case: str) -> str:
    """Damage a copy of the tiny checkpoint; returns words the error must contain."""
    unet_weights = ckpt / "unet" / "diffusion_pytorch_model.safetensors"
    if case == "truncated_safetensors":
        unet_weights.write_bytes(unet_weights.read_bytes()[:1000])
        return "diffusion_pytorch_model.safetensors"
    if case == "random_safetensors":
        unet_weights.write_bytes(os.urandom(4096))
        return "diffusion_pytorch_model.safetensors"
    if case == "unet_config_json":
        (ckpt / "unet" / "config.json").write_text("{not json")
        return "unet/config.json is not valid JSON"
    if case == "vae_config_json":
        (ckpt / "vae_temporal_decoder" / "config.json").write_text("[1, 2")
        return "vae_temporal_decoder/config.json is not valid JSON"
    if case == "text_config_json":
        (ckpt / "text_encoder" / "config.json").write_text("")
        return "text_encoder/config.json is not valid JSON"
    if case == "scheduler_json":
        (ckpt / "scheduler" / "scheduler_config.json").write_text("{")
        return "scheduler_config.json is not valid JSON"
    if case == "defaults_json":
        (ckpt / "cinemo_rt.json").write_text("{'height': 32}")
        return "cinemo_rt.json is not valid JSON"
    if case == "defaults_negative":
        (ckpt / "cinemo_rt.json").write_text('{"height": -32}')
        return "at least 1"
    if case == "tokenizer_vocab":
        for name in ("vocab.json", "tokenizer.json"):
            (ckpt / "tokenizer" / name).write_text("{\"a\": ")
        return "tokenizer"
    if case == "zero_groups":
        config = json.loads((ckpt / "unet" / "config.json").read_text())
        config["norm_num_groups"] = 0
        (ckpt / "unet" / "config.json").write_text(json.dumps(config))
        return "norm_num_groups must be whole numbers >= 1"
    if case == "negative_vae_channels":
        config = json.loads((ckpt / "vae_temporal_decoder" / "config.json").read_text())
        config["block_out_channels"] = [-16] * len(config["block_out_channels"])
        (ckpt / "vae_temporal_decoder" / "config.json").write_text(json.dumps(config))
        return "vae_temporal_decoder"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["truncated_safetensors", "random_safetensors", "unet_config_json",
                                  "vae_config_json", "text_config_json", "scheduler_json", "defaults_json",
                                  "defaults_negative", "tokenizer_vocab", "zero_groups", "negative_vae_channels"])
def test_damaged_checkpoint_files_are_named(case, tmp_path, tiny_checkpoint_dir, work, capsys, caplog):
    ckpt = copy_checkpoint(tiny_checkpoint_dir, tmp_path / "ckpt")
    words = _break_checkpoint(ckpt, case)
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", str(work / "o.mp4"),
                          "--checkpoint", str(ckpt), *QUICK], capsys, caplog)
    assert_refused(code, text, 2, words)
    assert not (work / "o.mp4").exists() and not hidden(work)


def test_folder_given_as_image(work, capsys, caplog):
    code, text = run_cli(["--image", str(work), "--out", str(work / "o.mp4"), *QUICK], capsys, caplog)
    assert_refused(code, text, 2, "is a folder")


def test_decompression_bomb_is_one_message(work, monkeypatch):
    from cinemo_rt.image import InputError, load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 48x40 is then > 2x the limit: PIL raises
    with pytest.raises(InputError, match="too large"):
        load_image(work / "photo.png")


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EIO])
def test_write_errors_are_one_message(err, work, tiny_checkpoint_dir, monkeypatch, capsys, caplog):
    real = video._encode_mp4

    def fails_midway(frames, path, fps):
        real(frames[:1], path, fps)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(video, "_encode_mp4", fails_midway)
    before = snapshot(work)
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", str(work / "o.mp4"),
                          "--checkpoint", str(tiny_checkpoint_dir), *QUICK], capsys, caplog)
    assert_refused(code, text, 2, os.strerror(err), "nothing was written")
    assert snapshot(work) == before


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="Linux /proc")
@pytest.mark.parametrize("out", ["/proc/cinemo.mp4", "/proc/self/cinemo.gif", "/sys/cinemo"])
def test_pseudo_file_systems_are_one_message(out, work, tiny_checkpoint_dir, capsys, caplog):
    if not os.path.isdir(os.path.dirname(out)):
        pytest.skip(f"{os.path.dirname(out)} is not mounted here")
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", out, "--checkpoint",
                          str(tiny_checkpoint_dir), *QUICK], capsys, caplog)
    assert_refused(code, text, 2)
    assert not os.path.exists(out)


def test_interrupt_during_imports_is_exit_130(work, monkeypatch, capsys, caplog):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_quiet_libraries", interrupted)
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", str(work / "o.mp4"), *QUICK], capsys, caplog)
    assert_refused(code, text, EXIT_INTERRUPTED, "interrupted")


def test_allocator_failure_is_one_message(work, tiny_checkpoint_dir, monkeypatch, capsys, caplog):
    from cinemo_rt.pipeline import Animator

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 73014444032 bytes.")

    monkeypatch.setattr(Animator, "run", no_memory)
    code, text = run_cli(["--image", str(work / "photo.png"), "--out", str(work / "o.mp4"),
                          "--checkpoint", str(tiny_checkpoint_dir), *QUICK], capsys, caplog)
    assert_refused(code, text, 2, "out of memory", "--height")
    assert not (work / "o.mp4").exists()


@pytest.mark.parametrize("argv, words", [
    (["--height", "-32"], "--height: must be at least 1"), (["--width", "36"], "multiple of 8"),
    (["--frames", "0"], "--frames: must be at least 1"), (["--height", "abc"], "whole number"),
])
def test_build_engines_sizes_are_checked(argv, words, tmp_path, tiny_checkpoint_dir, capsys, caplog):
    code, text = build_engines(["--checkpoint", str(tiny_checkpoint_dir), "--out", str(tmp_path / "eng"), *argv],
                               capsys, caplog)
    assert_refused(code, text, 2, words)
    assert not (tmp_path / "eng").exists()


@pytest.mark.parametrize("content", [None, b"not a pickle at all", b"PK\x03\x04not a zip"])
def test_refused_training_resume_is_one_message(content, tmp_path):
    from cinemo_rt.train.loop import read_resume_state

    path = tmp_path / "training_state.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="resume"):
        read_resume_state(path)


# ---------------------------------------------------------------------------------------------
# Races: concurrent writers of one destination end with one complete result and no temporaries
# ---------------------------------------------------------------------------------------------
def _race(count: int, job) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(count)

    def worker(i):
        start.wait()
        try:
            job(i)
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_concurrent_png_folder_writers(tmp_path):
    frames = [np.full((3, 8, 8, 3), i * 20, np.uint8) for i in range(6)]
    dest = tmp_path / "frames"
    for _ in range(3):
        errors = _race(6, lambda i: video.write_video(frames[i], dest, overwrite=True))
        assert errors == []
        result = video.read_video(dest)
        assert result.shape == (3, 8, 8, 3) and len(np.unique(result)) == 1  # one writer's complete frames
        assert sorted(os.listdir(tmp_path)) == ["frames"]


def test_concurrent_copy_folder_atomic(tmp_path):
    from export.build_engines import copy_folder_atomic

    sources = []
    for i in range(6):
        src = tmp_path / f"src{i}"
        (src / "sub").mkdir(parents=True)
        for name in ("vocab.json", "merges.txt", "sub/extra.txt"):
            (src / name).write_text(str(i))
        sources.append(src)
    (tmp_path / "out").mkdir()
    dst = tmp_path / "out" / "tokenizer"
    for _ in range(3):
        assert _race(6, lambda i: copy_folder_atomic(sources[i], dst)) == []
        contents = {p.read_text() for p in dst.rglob("*") if p.is_file()}
        assert len(contents) == 1 and len(list(dst.rglob("*.*"))) == 3  # one source, whole
        assert os.listdir(tmp_path / "out") == ["tokenizer"]
