"""GPU tier of the torch-fast backend and the pipeline: what only a CUDA GPU can check.

- torch-fast in fp16 with its CUDA graph against the fp16 and fp32 reference on the tiny model, for a new prompt
  (the graph's static K/V are reloaded) and a new shape (a second graph);
- `Animator` end to end on CUDA with the CuPy DCTInit kernel, torch-fast against torch;
- one full-size CFG UNet call (16 frames at 320x512, batch 2), fast against the reference, as relative L2.

Skipped without CUDA; `benchmarks/gpu/run.sh` runs this file on the GPU machine (its rehearsal runs it on the CPU,
where it reports the skips)."""

from __future__ import annotations

import copy

import pytest
import torch

from cinemo_rt.parity import TOLERANCES, relative_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; runs in benchmarks/gpu/run.sh on a CUDA machine")]
FP16 = TOLERANCES["fp16"].relative_l2


def _inputs(seed, batch=2, frames=5, h=8, w=16, text_dim=32, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    tensors = (torch.randn(batch, 4, frames, h, w, generator=g), torch.randint(0, 1000, (batch,), generator=g),
               torch.randn(batch, 77, text_dim, generator=g), torch.randn(batch, 4, 1, h, w, generator=g),
               torch.rand(batch, generator=g) * 99)
    return tuple(t.to(device) for t in tensors)


def _fast_backend(unet: torch.nn.Module, components, **kw):
    from cinemo_rt.backends.fast_torch import FastTorchBackend
    from cinemo_rt.checkpoint import Checkpoint

    return FastTorchBackend(Checkpoint(unet=unet, vae=components.vae, text_encoder=components.text_encoder), **kw)


def test_fast_fp16_cuda_graph_matches_reference():
    from cinemo_rt.testing import make_tiny_components

    components = make_tiny_components(seed=0)
    ref32 = copy.deepcopy(components.unet).cuda()
    ref16 = copy.deepcopy(components.unet).cuda().half()
    fast = _fast_backend(copy.deepcopy(components.unet).cuda().half(), components, cuda_graph=True)
    assert fast.cuda_graph
    cases = [("first prompt", _inputs(1)), ("new prompt, same shape", _inputs(1)[:2] + _inputs(2)[2:3] + _inputs(1)[3:]),
             ("new shape", _inputs(3, batch=1, frames=3, h=6, w=10))]
    with torch.no_grad():
        for what, inputs in cases:
            got = fast.unet(*inputs)
            again = fast.unet(*inputs)  # a replay of the same graph
            err32 = relative_error(got.float().cpu(), ref32(*inputs).float().cpu())
            err16 = relative_error(got.float().cpu(), ref16(*inputs).float().cpu())
            print(f"{what}: rel L2 vs fp32 {err32:.2e}, vs fp16 reference {err16:.2e}")
            assert err32 < FP16 and err16 < FP16, (what, err32, err16)
            assert torch.equal(got, again), what
    assert len(fast._graphs) == 2  # one per shape; the new prompt reused the first graph


def test_animator_end_to_end_fast_vs_torch_with_cupy_dctinit(tiny_checkpoint_dir):
    pytest.importorskip("cupy", reason="CuPy (cupy-cuda12x/13x) is part of the GPU machine's setup")
    from cinemo_rt._kernels.cupy_dct import dct_init_cuda

    from cinemo_rt.pipeline import Animator

    image = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)).mul(255).to(torch.uint8).numpy()
    options = dict(steps=4, seed=0, height=64, width=64, frames=15)
    videos = {}
    for backend, dtype in (("torch-fast", "fp16"), ("torch", "fp16"), ("torch", "fp32")):
        animator = Animator.from_checkpoint(tiny_checkpoint_dir, backend=backend, device="cuda", dtype=dtype)
        assert animator.dct_init is dct_init_cuda, "DCTInit must run the CUDA kernel on a GPU"
        videos[backend, dtype] = animator(image, "the camera zooms in", 9, **options)
    fast = videos["torch-fast", "fp16"]
    assert fast.shape == (16, 64, 64, 3)
    err16 = relative_error(fast, videos["torch", "fp16"])
    err32 = relative_error(fast, videos["torch", "fp32"])
    print(f"uint8 video, torch-fast fp16: rel L2 vs torch fp16 {err16:.2e}, vs torch fp32 {err32:.2e}")
    # uint8 frames after 4 fp16 steps: the fp16 tolerance on the frames as a whole (as the TensorRT video test).
    assert err16 <= 5 * FP16 and err32 <= 5 * FP16


def test_full_size_cfg_unet_call_fast_vs_reference():
    """One CFG call at the released size: 16 frames (15 generated) at 320x512, batch 2, random weights."""
    from cinemo_rt.model import UNet3D, full_config
    from cinemo_rt.testing import make_tiny_components

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet = UNet3D(full_config()).eval()
    inputs = _inputs(7, batch=2, frames=15, h=40, w=64, text_dim=768)
    with torch.no_grad():
        ref32 = unet(*inputs).float().cpu()
        unet.half()
        ref16 = unet(*inputs).float().cpu()
        fast = _fast_backend(unet, make_tiny_components(seed=0), cuda_graph=True)
        got = fast.unet(*inputs).float().cpu()
    assert torch.isfinite(got).all()
    err, err_ref16 = relative_error(got, ref32), relative_error(ref16, ref32)
    print(f"full-size CFG UNet call: torch-fast fp16 rel L2 vs fp32 {err:.2e} (fp16 reference: {err_ref16:.2e}), "
          f"vs fp16 reference {relative_error(got, ref16):.2e}")
    assert err < FP16 and err < 1.5 * err_ref16 + 1e-3, (err, err_ref16)
