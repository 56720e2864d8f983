"""The ONNX Runtime backend against the PyTorch reference backend, graph by graph and for a whole video,
and its input checks against the sessions' own metadata."""

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

from cinemo_rt.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from cinemo_rt.backends.torch_backend import TorchBackend  # noqa: E402
from cinemo_rt.checkpoint import load_checkpoint  # noqa: E402
from cinemo_rt.errors import InputError  # noqa: E402
from cinemo_rt.manifest import EnginesDirError  # noqa: E402
from cinemo_rt.stages import decode_latents  # noqa: E402
from cinemo_rt.parity import TOLERANCES, psnr, relative_error  # noqa: E402

from conftest import ENGINE_SIZE as SIZE  # noqa: E402

H, W, F = SIZE["height"] // 8, SIZE["width"] // 8, SIZE["frames"]


@pytest.fixture(scope="module")
def backends(tiny_checkpoint_dir, engines_fp32):
    ort_backend = OnnxRuntimeBackend(engines_fp32, device="cpu")
    yield ort_backend, TorchBackend(load_checkpoint(tiny_checkpoint_dir))
    ort_backend.close()


def test_every_call_matches_the_torch_backend(backends):
    ours, ref = backends
    g = torch.Generator().manual_seed(3)
    assert ours.name == "onnxruntime" and ours.dtype == torch.float32 and ours.info == ref.info
    x_t, z1 = torch.randn(2, 4, F, H, W, generator=g), torch.randn(2, 4, 1, H, W, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    args = (x_t, torch.tensor([901, 901]), text, z1, torch.tensor([90.0, 90.0]))
    errors = {"unet": relative_error(ours.unet(*args), ref.unet(*args))}
    # Scalars are broadcast to the batch, as the reference UNet does.
    errors["unet scalar t"] = relative_error(ours.unet(x_t[:1], torch.tensor(901), text[:1], z1[:1], 90.0),
                                             ref.unet(*[a[:1] for a in args]))
    image = torch.rand(1, 3, SIZE["height"], SIZE["width"], generator=g) * 2 - 1
    for got, want, what in zip(ours.vae_encoder(image), ref.vae_encoder(image), ("mean", "std")):
        errors[f"encode {what}"] = relative_error(got, want)
    ids = torch.randint(0, 300, (2, 77), generator=g)
    errors["text"] = relative_error(ours.text_encoder(ids), ref.text_encoder(ids))
    latents = torch.randn(1, 4, F + 1, H, W, generator=g)  # 16 frames: chunks of 14 + 2
    decoded = decode_latents(ours, latents)
    assert decoded.shape == (1, 3, F + 1, SIZE["height"], SIZE["width"])
    errors["decode 14+2"] = relative_error(decoded, decode_latents(ref, latents))
    print("\nORT fp32 vs torch, relative L2: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert max(errors.values()) <= TOLERANCES["fp32"].relative_l2


def test_inputs_are_checked_against_the_session_metadata(backends):
    ours, _ = backends
    good = dict(x_t=torch.zeros(1, 4, F, H, W), t=torch.zeros(1, dtype=torch.int64),
                text=torch.zeros(1, 77, 32), z1=torch.zeros(1, 4, 1, H, W), motion_id=torch.zeros(1))
    assert ours.run("unet", good)[0].shape == (1, 4, F, H, W)
    with pytest.raises(InputError, match=r"axis 3 is fixed at 8 .*rebuild with --height"):
        ours.run("unet", {**good, "x_t": torch.zeros(1, 4, F, 16, W)})
    with pytest.raises(InputError, match="'t' must be torch.int64, got torch.float32"):
        ours.run("unet", {**good, "t": torch.zeros(1)})
    with pytest.raises(InputError, match="'z1' must have rank 5"):
        ours.run("unet", {**good, "z1": torch.zeros(1, 4, H, W)})
    with pytest.raises(InputError, match="takes inputs"):
        ours.run("unet", {k: v for k, v in good.items() if k != "motion_id"})
    with pytest.raises(InputError, match="'x_t' axis 2 is fixed at 15"):
        ours.unet(torch.zeros(1, 4, 7, H, W), torch.tensor(1), torch.zeros(1, 77, 32), torch.zeros(1, 4, 1, H, W),
                  90.0)


def test_engines_folder_errors_are_clear(engines_fp32, tmp_path):
    with pytest.raises(EnginesDirError, match="no manifest.json"):
        OnnxRuntimeBackend(tmp_path)
    with pytest.raises(EnginesDirError, match="built in fp32, not fp16"):
        OnnxRuntimeBackend(engines_fp32, precision="fp16")


def test_fp16_engines_run_in_fp16(engines_fp16, backends):
    ours16, ref = OnnxRuntimeBackend(engines_fp16, device="cpu"), backends[1]
    assert ours16.dtype == torch.float16
    latents = torch.randn(1, 4, F + 1, H, W)
    err = relative_error(decode_latents(ours16, latents), decode_latents(ref, latents))
    print(f"\nORT fp16 decode vs torch fp32: relative L2 {err:.1e}")
    assert err <= TOLERANCES["fp16"].relative_l2


def test_whole_video_matches_the_torch_pipeline(tiny_checkpoint_dir, engines_fp32):
    """Same seed, same image and prompt: the video from the exported graphs against the reference backend.
    4 DDIM steps with CFG keep it quick; the stated bound is PSNR >= 40 dB over the uint8 frames (the tiny
    random model's frames are near-uniform, so relative error on them is stated too)."""
    pipeline = pytest.importorskip("cinemo_rt.pipeline")
    if not hasattr(pipeline.Animator, "from_engines"):
        pytest.skip("cinemo_rt.pipeline.Animator.from_engines is not there yet")
    image = (np.random.default_rng(0).random((SIZE["height"], SIZE["width"], 3)) * 255).astype(np.uint8)
    job = dict(prompt="a cat walking", bucket=9, steps=4, guidance=7.5, seed=11, **SIZE)
    ours = pipeline.Animator.from_engines(engines_fp32, backend="onnxruntime", device="cpu")(image, **job)
    ref = pipeline.Animator.from_checkpoint(tiny_checkpoint_dir, backend="torch", device="cpu")(image, **job)
    assert ours.shape == ref.shape == (F + 1, SIZE["height"], SIZE["width"], 3)
    quality = psnr(ours, ref)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    print(f"\nwhole video ORT fp32 vs torch: PSNR {quality:.1f} dB, relative L2 {relative_error(ours, ref):.1e}, "
          f"{(diff > 1).mean():.2%} of values differ by more than 1 level")
    assert quality >= 40.0


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_and_checkpoint_report_the_same_unet_parameter_count(tiny_checkpoint_dir, precision, request):
    """The CPU-thread log names the parameter count: an engines folder counts its UNet graph as the checkpoint
    counts its UNet (it once summed every graph: 2.0 M against the demo checkpoint's 1.2 M)."""
    from cinemo_rt.limits import checkpoint_estimate_inputs, engines_unet_parameters
    from cinemo_rt.model_facts import ModelFacts

    engines = request.getfixturevalue(f"engines_{precision}")
    expected = checkpoint_estimate_inputs(tiny_checkpoint_dir)["parameters"]
    assert engines_unet_parameters(engines) == pytest.approx(expected, rel=0.05)
    assert ModelFacts.of_folder(engines, engines=True).parameters == engines_unet_parameters(engines)
