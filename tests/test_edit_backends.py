"""`edit` through every backend on the tiny checkpoint, like `run`'s parity tests: the 16-frame clip
goes through each backend's VAE-encoder graph (one frame per call, so TensorRT's batch-1 profile serves it),
the inversion and the sampling through its UNet. Every inversion and sampling step's latents are compared
with the PyTorch reference backend."""

import importlib.util

import numpy as np
import pytest
import torch

from cinemo_rt.parity import TOLERANCES, psnr, relative_error
from cinemo_rt.pipeline import Animator

SIZE = dict(height=64, width=64, frames=15)  # the engines' build size (conftest.ENGINE_SIZE)
JOB = dict(prompt="a dog running", source_prompt="the camera pans right", motion_id=86.0, steps=3, seed=3, **SIZE)
# The fp32 tolerance on every one of the 2 x 3 chained steps (measured on the 2-core CPU box: torch-fast 3.7e-6,
# ONNX Runtime 3.4e-6 at worst; video PSNR 88 dB).
CHAINED_FP32 = TOLERANCES["fp32"].relative_l2


@pytest.fixture(scope="module")
def clip_and_photo():
    rng = np.random.default_rng(0)
    scene = (rng.random((72, 120, 3)) * 255).astype(np.uint8)
    clip = np.stack([scene[:, 2 * k: 2 * k + 88] for k in range(16)])
    return clip, (rng.random((70, 90, 3)) * 255).astype(np.uint8)


def _edit(animator, clip_and_photo):
    clip, photo = clip_and_photo
    latents = []
    video = animator.edit(clip, photo, callback=lambda i, t, x: latents.append(x.detach().float().cpu()), **JOB)
    return video, latents


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_dir, clip_and_photo):
    return _edit(Animator.from_checkpoint(tiny_checkpoint_dir, backend="torch", device="cpu"), clip_and_photo)


def _check(name, result, reference, tolerance):
    (video, latents), (ref_video, ref_latents) = result, reference
    assert video.shape == ref_video.shape == (16, 64, 64, 3) and len(latents) == len(ref_latents) == 6
    errors = [relative_error(a, b) for a, b in zip(latents, ref_latents)]
    quality = psnr(video, ref_video)
    print(f"\nedit {name} vs torch: latents relative L2 max {max(errors):.1e} over {len(errors)} steps, "
          f"video PSNR {quality:.1f} dB")
    assert max(errors) <= tolerance, errors
    assert quality >= 40.0


@pytest.mark.slow
def test_edit_torch_fast_matches_the_reference(tiny_checkpoint_dir, clip_and_photo, reference):
    fast = Animator.from_checkpoint(tiny_checkpoint_dir, backend="torch-fast", device="cpu")
    _check("torch-fast", _edit(fast, clip_and_photo), reference, CHAINED_FP32)


@pytest.mark.slow
def test_edit_onnxruntime_matches_the_reference(engines_fp32, clip_and_photo, reference):
    ort = Animator.from_engines(engines_fp32, backend="onnxruntime", device="cpu")
    _check("onnxruntime fp32", _edit(ort, clip_and_photo), reference, CHAINED_FP32)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available(),
                    reason="needs the tensorrt Python package and a CUDA GPU; run `pytest tests/test_edit_backends.py` "
                           "on a GPU machine with TensorRT 10")
def test_edit_tensorrt_matches_the_reference(tiny_checkpoint_dir, tmp_path_factory, clip_and_photo):
    from conftest import build_tiny_engines

    folder = tmp_path_factory.mktemp("edit_engines")
    build_tiny_engines(tiny_checkpoint_dir, folder, "fp16", targets=("onnx", "tensorrt"))
    trt = Animator.from_engines(folder, backend="tensorrt", device="cuda")
    reference = _edit(Animator.from_checkpoint(tiny_checkpoint_dir, device="cuda", dtype="fp32"), clip_and_photo)
    video, latents = _edit(trt, clip_and_photo)
    errors = [relative_error(a, b) for a, b in zip(latents, reference[1])]
    assert max(errors) <= 5 * TOLERANCES["fp16"].relative_l2, errors
    assert relative_error(video, reference[0]) <= 5 * TOLERANCES["fp16"].relative_l2
