"""The CUDA kernels' preconditions (`kernels/contract.py`) on the CPU: every pipeline mode, on every backend that
runs on the CPU, hands DCTInit tensors the kernel would take as they are. The pipeline passes them through the
kernel's own check on every device (`stages.mix_low_frequencies` -> `dctinit.check_kernel_contract`), and with
`CINEMO_RT_DCTINIT=cuda-on-cpu` DCTInit is the CUDA kernel itself executed on the CPU, so a layout the kernel
refuses fails here, not on the first GPU.

The edit path once handed the kernel the inverted clip latents in the frames-first layout of the VAE encoder's
output (a permuted view): `test_every_mode_hands_the_kernel_what_it_takes[...edit...]` fails on that."""

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cinemo_rt.dctinit import (CUDA_ON_CPU, IMPLEMENTATION_ENV, check_kernel_contract, dct_init, import_kernels,
                                select_dct_init)
from cinemo_rt.pipeline import Animator
from cinemo_rt.request import EditRequest, Request
from cinemo_rt.residuals import residuals_from_frames

# The modules the runtime imports (installed: cinemo_rt._kernels; a checkout: kernels), so classes compare equal.
contract, cuda_on_cpu = import_kernels("contract"), import_kernels("cuda_on_cpu")
KernelContractError, check_launch = contract.KernelContractError, contract.check_launch

SIZE = dict(height=64, width=64, frames=3)
ENGINE_SIZE = dict(height=64, width=64, frames=15)  # conftest.ENGINE_SIZE: the engines' static shape
STEPS = 2


# ---------------------------------------------------------------------------------------------------------
# The check itself, by classes of input

@settings(max_examples=60, deadline=None)
@given(order=st.permutations(range(5)), sizes=st.lists(st.integers(1, 4), min_size=5, max_size=5))
def test_any_layout_but_dense_row_major_is_refused(order, sizes):
    """A permuted view passes exactly when it is dense row-major (torch's is_contiguous: size-1 dims are free)."""
    x = torch.zeros(sizes).permute(*order)
    if x.is_contiguous():
        check_launch("dct", {"x": x}, on_gpu=False, axis=-1)
    else:
        with pytest.raises(KernelContractError, match=r"not contiguous.*x\.contiguous\(\)"):
            check_launch("dct", {"x": x}, on_gpu=False, axis=-1)


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.int32, torch.int64, torch.uint8,
                              torch.complex64, torch.bool]))
def test_dtypes_other_than_float32_and_float64_are_refused(dtype):
    with pytest.raises(TypeError, match=r"float32 or float64"):
        check_launch("dct", {"x": torch.zeros(1, 2, 3, 4, 5, dtype=dtype)}, on_gpu=False, axis=-1)


@settings(max_examples=40, deadline=None)
@given(z_frames=st.integers(0, 5), frames=st.integers(1, 4), dh=st.integers(-1, 1), dw=st.integers(-1, 1),
       db=st.integers(0, 1))
def test_dct_init_shapes(z_frames, frames, dh, dw, db):
    """z1 must be (B, C, 1, H, W) of noise (B, C, F, H, W); z_tau may also be (B, C, F, H, W)."""
    noise = torch.zeros(1, 2, frames, 6, 7)
    z = torch.zeros(1 + db, 2, z_frames, 6 + dh, 7 + dw)
    same = db == dh == dw == 0
    for z_name, allowed in (("z1", (1,)), ("z_tau", (1, frames))):
        ok = same and z_frames in allowed
        if ok:
            check_launch("dct_init", {z_name: z, "noise": noise}, on_gpu=False, fraction=0.23,
                         z_frames_one=z_name == "z1")
        else:
            with pytest.raises(KernelContractError, match=z_name):
                check_launch("dct_init", {z_name: z, "noise": noise}, on_gpu=False, fraction=0.23,
                             z_frames_one=z_name == "z1")


def test_device_alignment_fraction_and_pairs():
    x = torch.zeros(1, 2, 3, 4, 5)
    with pytest.raises(KernelContractError, match=r"\.cuda\(\)"):
        check_launch("dct", {"x": x}, axis=-1)  # on_gpu: a CPU tensor is refused
    with pytest.raises(KernelContractError, match="last three"):
        check_launch("dct", {"x": x}, on_gpu=False, axis=1)
    with pytest.raises(KernelContractError, match="fraction"):
        check_launch("dct_init", {"z1": x[:, :, :1].contiguous(), "noise": x}, on_gpu=False, fraction=0.0)
    with pytest.raises(TypeError, match=r"to\(noise.dtype\)"):
        check_launch("dct_init", {"z1": x[:, :, :1].double().contiguous(), "noise": x}, on_gpu=False, fraction=0.5)
    raw = np.zeros(4 * 2 * 3 * 4 * 5 + 1, dtype=np.uint8)
    misaligned = np.frombuffer(raw.data, dtype=np.float32, offset=1, count=2 * 3 * 4 * 5).reshape(1, 2, 3, 4, 5)
    with pytest.raises(KernelContractError, match="aligned"):
        check_launch("dct", {"x": cuda_on_cpu.to_device(misaligned)}, axis=-1)


def test_the_frames_first_layout_of_the_edit_path_is_refused():
    """What the edit path used to hand the kernel: residuals of frame latents in the VAE's frames-first order."""
    frames_first = torch.randn(4, 4, 8, 8).permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, N, h, w), a view
    z1, residuals = residuals_from_frames(frames_first)
    assert z1.is_contiguous() and residuals.is_contiguous()  # the fix: the pipeline's layout from here on
    with pytest.raises(KernelContractError, match="noise .* not contiguous"):
        check_kernel_contract(z1, frames_first[:, :, 1:], 0.5)


def test_cpu_implementation_is_chosen_by_the_environment(monkeypatch):
    monkeypatch.delenv(IMPLEMENTATION_ENV, raising=False)
    assert select_dct_init("cpu") is dct_init
    monkeypatch.setenv(IMPLEMENTATION_ENV, CUDA_ON_CPU)
    assert select_dct_init("cpu") is cuda_on_cpu.dct_init_cpu
    monkeypatch.setenv(IMPLEMENTATION_ENV, "gpu-please")
    with pytest.raises(ValueError, match=CUDA_ON_CPU):
        select_dct_init("cpu")


# ---------------------------------------------------------------------------------------------------------
# Every pipeline mode, every CPU backend

def _clip(frames: int, rng) -> np.ndarray:
    scene = (rng.random((72, 88 + 2 * frames, 3)) * 255).astype(np.uint8)  # a pan, 2 pixels a frame
    return np.stack([scene[:, 2 * k: 2 * k + 88] for k in range(frames + 1)])


def _serving_batch(animator, image, size):
    from cinemo_rt.request import Request
    from cinemo_rt.serve.runner import Runner

    runner = Runner(animator, max_batch=2)
    requests = [Request(prompt=p, seed=s, steps=STEPS, **size).resolve(animator.defaults)
                for p, s in (("waves", 1), ("clouds", 2))]
    segments = [runner.prepare(image, r) for r in requests]
    while live := [s for s in segments if not s.done]:
        runner.step(live)
    return [runner.finish(s) for s in segments]


def _modes(size):
    rng = np.random.default_rng(0)
    image = (rng.random((70, 90, 3)) * 255).astype(np.uint8)
    clip = _clip(size["frames"], rng)
    clip2 = _clip(2 * size["frames"], rng)
    edit = EditRequest("a dog", motion_id=86.0, source_prompt="a cat", steps=STEPS, seed=3, **size)
    return {
        "run": lambda a: a.run(image, Request("waves", 9, steps=STEPS, seed=1, **size)),
        "fast": lambda a: a.run(image, Request("waves", 9, steps=STEPS, seed=1, fast=True, **size)),
        "segments": lambda a: a.run(image, Request("waves", 9, steps=STEPS, seed=1, segments=2, **size)),
        "edit-new-image": lambda a: a.run_edit(clip, image, edit),
        "edit-own-first-frame": lambda a: a.run_edit(clip, None, edit),
        "edit-segments": lambda a: a.run_edit(clip2, image, dataclasses.replace(edit, segments=2)),
        "serving-batch": lambda a: _serving_batch(a, image, size),
    }


# Modes that only recombine what others hand DCTInit (more steps, chained segments, the new image's z1 in place
# of the clip's): on the slow 15-frame ONNX engines the modes with their own DCTInit inputs are enough.
BACKEND_FREE = ("fast", "segments", "edit-segments", "edit-new-image")


def _animator(backend: str, tiny_checkpoint_dir, request):
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
        return Animator.from_engines(request.getfixturevalue("engines_fp32"), backend="onnxruntime", device="cpu")
    return Animator.from_checkpoint(tiny_checkpoint_dir, backend=backend, device="cpu")


def _spy(animator):
    """Record the tensors each DCTInit call receives, then run the chosen implementation on them."""
    calls, chosen = [], animator.dct_init

    def spy(z1, noise, alpha_bar_tau, fraction):
        calls.append((tuple(z1.shape), z1.is_contiguous(), tuple(noise.shape), noise.is_contiguous()))
        return chosen(z1, noise, alpha_bar_tau, fraction)

    animator.dct_init = spy
    return calls


@pytest.mark.parametrize("backend", ["torch", "torch-fast", pytest.param("onnxruntime", marks=pytest.mark.slow)])
def test_every_mode_hands_the_kernel_what_it_takes(backend, tiny_checkpoint_dir, request, monkeypatch):
    monkeypatch.delenv(IMPLEMENTATION_ENV, raising=False)
    animator = _animator(backend, tiny_checkpoint_dir, request)
    assert animator.dct_init is dct_init
    size = ENGINE_SIZE if backend == "onnxruntime" else SIZE
    for mode, run in _modes(size).items():
        if backend == "onnxruntime" and mode in BACKEND_FREE:
            continue
        calls = _spy(animator)
        run(animator)  # the stage raises KernelContractError on a tensor the kernel refuses
        assert calls, f"{mode}: no DCTInit call seen"
        assert all(c[1] and c[3] for c in calls), (mode, calls)


def test_every_mode_runs_the_cpu_executed_kernel(tiny_checkpoint_dir, monkeypatch):
    """The same modes with DCTInit computed by dct.cu itself, through cupy_dct's launcher: the videos match the
    float64 reference path within fp32 rounding (the kernel mixes in float32 here)."""
    reference = Animator.from_checkpoint(tiny_checkpoint_dir, backend="torch", device="cpu")
    monkeypatch.setenv(IMPLEMENTATION_ENV, CUDA_ON_CPU)
    kernel = Animator.from_checkpoint(tiny_checkpoint_dir, backend="torch", device="cpu")
    assert kernel.dct_init is cuda_on_cpu.dct_init_cpu
    for mode, run in _modes(SIZE).items():
        if mode == "edit-segments":
            continue  # two chained edits: nothing a single edit does not already hand the kernel
        calls = _spy(kernel)
        ours, theirs = run(kernel), run(reference)
        assert calls, mode
        for a, b in zip(ours if isinstance(ours, list) else [ours], theirs if isinstance(theirs, list) else [theirs]):
            assert np.abs(a.astype(int) - b).max() <= 2, mode  # uint8 frames: fp32 vs fp64 mixing


def test_cpu_executed_dct_init_matches_the_reference_in_fp32():
    g = torch.Generator().manual_seed(0)
    z1, noise = torch.randn(2, 4, 1, 8, 8, generator=g), torch.randn(2, 4, 3, 8, 8, generator=g)
    ours, ref = cuda_on_cpu.dct_init_cpu(z1, noise, 6.5e-5, 0.5), dct_init(z1, noise.double(), 6.5e-5, 0.5)
    assert ours.dtype == torch.float32
    assert float((ours.double() - ref).norm() / ref.norm()) < 1e-6
