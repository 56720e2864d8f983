"""FastTorchBackend against the reference UNet: same function, per dtype, on fresh random inputs."""

import copy

import pytest
import torch

from cinemo_rt.backends.fast_torch import FastTorchBackend, optimize_unet
from cinemo_rt.checkpoint import Checkpoint
from cinemo_rt.parity import TOLERANCES, relative_error
from cinemo_rt.sampling import sample


@pytest.fixture(scope="module")
def components():
    from cinemo_rt.testing import make_tiny_components

    return make_tiny_components(seed=0)


def _fast(components, dtype=torch.float32, **kw) -> FastTorchBackend:
    """A backend over its own copy: it owns and re-lays-out the UNet it is given."""
    ckpt = Checkpoint(unet=copy.deepcopy(components.unet).to(dtype), vae=components.vae,
                      text_encoder=components.text_encoder)
    return FastTorchBackend(ckpt, **kw)


def _inputs(seed, batch=2, frames=5, h=8, w=16, text_dim=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, frames, h, w, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 77, text_dim, generator=g), torch.randn(batch, 4, 1, h, w, generator=g),
            torch.rand(batch, generator=g) * 99)


@pytest.mark.parametrize("shape", [dict(batch=2, frames=5, h=8, w=16), dict(batch=1, frames=3, h=6, w=10)])
def test_fp32_parity_with_reference(components, shape):
    backend = _fast(components)
    inputs = _inputs(1, **shape)  # 6x10: the explicit upsample-size path
    with torch.no_grad():
        reference = components.unet(*inputs)
    err = relative_error(backend.unet(*inputs), reference)
    assert err < TOLERANCES["fp32"].relative_l2, err


def test_bf16_parity_with_fp32_reference(components):
    backend = _fast(components, torch.bfloat16)
    inputs = _inputs(2)
    with torch.no_grad():
        reference = components.unet(*inputs)
        reference_bf16 = copy.deepcopy(components.unet).to(torch.bfloat16)(*inputs)
    err = relative_error(backend.unet(*inputs), reference)
    assert backend.dtype == torch.bfloat16
    assert err < TOLERANCES["bf16"].relative_l2, err
    # no worse than the reference model itself run in bf16 (plus a margin for a different rounding order)
    assert err < 1.5 * relative_error(reference_bf16, reference) + 1e-3


def test_reference_modules_unchanged_by_optimisation(components):
    unet = copy.deepcopy(components.unet)
    inputs = _inputs(3)
    with torch.no_grad():
        before = unet(*inputs)
        optimize_unet(unet)  # fuses q/k/v storage and relays out conv weights in place
        after = unet(*inputs)
    assert relative_error(after, before) < 1e-6


def test_cross_attention_kv_cached_per_text_tensor(components, monkeypatch):
    backend = _fast(components)
    calls = []
    prepare = backend.fast_unet.prepare
    monkeypatch.setattr(backend.fast_unet, "prepare", lambda text: calls.append(1) or prepare(text))
    x_t, t, text, z1, motion = _inputs(4)
    backend.unet(x_t, t, text, z1, motion)
    backend.unet(x_t, t, text, z1, motion)
    assert len(calls) == 1  # same tensor: K/V reused
    text.mul_(2.0)  # modified in place: recomputed
    out = backend.unet(x_t, t, text, z1, motion)
    assert len(calls) == 2
    with torch.no_grad():
        assert relative_error(out, components.unet(x_t, t, text, z1, motion)) < TOLERANCES["fp32"].relative_l2


def test_denoising_loop_matches_reference(components):
    backend = _fast(components)
    g = torch.Generator().manual_seed(5)
    x_T, z1 = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 4, 1, 8, 8, generator=g)
    text, text_uncond = torch.randn(1, 77, 32, generator=g), torch.randn(1, 77, 32, generator=g)
    kwargs = dict(z1=z1, text=text, text_uncond=text_uncond, motion_id=torch.tensor([90.0]), steps=3)
    with torch.no_grad():
        reference = sample(components.unet, x_T, **kwargs)
    assert relative_error(sample(backend.unet, x_T, **kwargs), reference) < TOLERANCES["fp32"].relative_l2


def test_from_checkpoint_backend_choice(tiny_checkpoint_dir):
    from cinemo_rt.pipeline import Animator

    fast = Animator.from_checkpoint(tiny_checkpoint_dir, backend="torch-fast", device="cpu")
    assert fast.backend.name == "torch-fast"
    assert Animator.from_checkpoint(tiny_checkpoint_dir, device="cpu").backend.name == "torch"  # auto on the CPU


def test_compiled_forward_is_one_graph(components):
    """The temporal constants are built before the compiled forward runs: dynamo compiles the UNet once, also
    for a new text of the same shape (on a GPU a second compile would land inside CUDA-graph capture)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()  # counts graphs handed to the compiler backend, runs them eagerly
    backend = _fast(components, compile_mode="default", compile_backend=counter)
    inputs = _inputs(4)
    other_text = _inputs(5)[2]
    with torch.no_grad():
        reference = components.unet(*inputs)
        for _ in range(2):
            out = backend.unet(*inputs)
        backend.unet(inputs[0], inputs[1], other_text, inputs[3], inputs[4])
    assert counter.frame_count == 1, f"{counter.frame_count} graphs compiled"
    assert relative_error(out, reference) < TOLERANCES["fp32"].relative_l2


@pytest.mark.parametrize("mode, manual_graph, expected", [
    ("reduce-overhead", True, "default"), ("max-autotune", True, "max-autotune-no-cudagraphs"),
    ("default", True, "default"), ("reduce-overhead", False, "reduce-overhead")])
def test_inductor_graphs_off_under_the_manual_graph(mode, manual_graph, expected):
    from cinemo_rt.backends.fast_torch import inductor_mode

    assert inductor_mode(mode, manual_graph) == expected


# -- memory layout: chosen per device, weights converted once at load ------------------------------
def test_default_layout_per_device():
    from cinemo_rt.backends.fast_torch import default_conv_layout

    assert default_conv_layout(torch.device("cuda", 0)) == "channels_last"
    assert default_conv_layout(torch.device("cpu")) == "contiguous"


def _strides(shape, layout):
    n, c, h, w = shape
    return (c * h * w, h * w, w, 1) if layout == "contiguous" else (c * h * w, 1, w * c, c)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("h,w", [(6, 10), (2, 2)])  # 2x2: the second level's maps are 1x1
def test_each_layout_matches_reference_and_converts_no_weight_per_call(components, layout, h, w, monkeypatch):
    """Both layouts run on the CPU (the benchmark measures both); every 3x3 convolution's input has exactly its
    weight's strides (at a 1x1 map both layouts count as contiguous, and the convolution follows the strides),
    so the convolution never converts the weight (or the input) on the call."""
    unet = copy.deepcopy(components.unet)
    fast = optimize_unet(unet, conv_layout=layout)
    assert fast.conv_layout == layout
    mismatched, conv2d = [], torch.nn.functional.conv2d

    def checked_conv2d(x, weight, *args, **kwargs):
        if weight.shape[-1] != 1:
            if x.stride() != _strides(x.shape, layout) or weight.stride() != _strides(weight.shape, layout):
                mismatched.append((tuple(x.shape), x.stride(), weight.stride()))
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "conv2d", checked_conv2d)
    x_t, t, text, z1, motion_id = _inputs(4, batch=2, frames=3, h=h, w=w)
    with torch.no_grad():
        out = fast(x_t, t, fast.prepare(text), z1, motion_id)
        monkeypatch.undo()
        reference = components.unet(x_t, t, text, z1, motion_id)
    assert not mismatched, mismatched[:3]
    assert relative_error(out, reference) < TOLERANCES["fp32"].relative_l2


def test_cpu_layout_leaves_reference_weights_alone(components):
    unet = copy.deepcopy(components.unet)
    optimize_unet(unet)
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.is_contiguous() for m in convs)
