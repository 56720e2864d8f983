"""Video editing on the tiny checkpoint: inversion, DCTInit over the inverted latents and sampling
checked step by step against an independent re-statement of the original algorithm (docs/METHOD.md, editing, written from
the method here: float64 alphas from the linear betas, the original's `next_step` arithmetic, scipy's DCT);
then the `Animator.edit` API."""

import logging
import math

import numpy as np
import pytest
import torch
from scipy.fft import dctn, idctn

from cinemo_rt.errors import InputError
from cinemo_rt.image import preprocess
from cinemo_rt.parity import TOLERANCES, max_abs_error, relative_error
from cinemo_rt.pipeline import Animator
from cinemo_rt.request import EditRequest
from cinemo_rt.sampling import invert

SIZE = dict(height=64, width=64, frames=3)
FP32 = TOLERANCES["fp32"].relative_l2  # 1e-5, on every step
DCT_ABS = 1e-5


# -------------------------------------------------------------------------------------------------
# The re-statement (docs/METHOD.md: pipeline, editing), nothing imported from cinemo_rt's sampling or DCT code
# -------------------------------------------------------------------------------------------------
def _alphas_cumprod() -> torch.Tensor:
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return torch.from_numpy(np.cumprod(1.0 - betas))


def _alpha(table, t: int) -> float:
    return float(table[t]) if t >= 0 else float(table[0])  # set_alpha_to_one=False: final alpha 0.9999


def _guided(unet, x, t, text, text_uncond, z1, motion, guidance, prediction_type, table):
    if guidance == 1.0:
        out = unet(x, torch.tensor([t]), text, z1, motion)
    else:
        both = unet(torch.cat([x, x]), torch.tensor([t, t]), torch.cat([text_uncond, text]), torch.cat([z1, z1]),
                    torch.cat([motion, motion]))
        out_u, out_c = both.chunk(2)
        out = out_u + guidance * (out_c - out_u)
    if prediction_type == "v_prediction":  # eps = sqrt(a_t) v + sqrt(1 - a_t) x_t at the model's timestep
        a = _alpha(table, t)
        out = math.sqrt(a) * out + math.sqrt(1 - a) * x
    return out


def reference_invert(unet, motion_latents, base, text, text_uncond, motion, steps, guidance,
                     prediction_type="epsilon"):
    """`VideoGenInversionPipeline`: ascending t_k = k * r + 1; the model at t_k, the latent at t_k - r."""
    table, r = _alphas_cumprod(), 1000 // steps
    x, trajectory = motion_latents, []
    for k in range(steps):
        t = k * r + 1
        eps = _guided(unet, x, t, text, text_uncond, base, motion, guidance, prediction_type, table)
        a_src, a_dst = _alpha(table, t - r), _alpha(table, t)
        pred_x0 = (x - math.sqrt(1 - a_src) * eps) / math.sqrt(a_src)
        x = math.sqrt(a_dst) * pred_x0 + math.sqrt(1 - a_dst) * eps
        trajectory.append(x)
    return trajectory


def reference_dct_mix(z1_new, noise, tau=985, percentage=0.23):
    """`exchanged_mixed_dct_freq` of add_noise(repeat(z1_new), noise, tau) and noise with the (1, C, 1, h, w)
    box low-pass filter, in float64 (scipy's orthonormal DCT-II over (f, h, w))."""
    table = _alphas_cumprod()
    frames = noise.shape[2]
    z = z1_new.double().repeat(1, 1, frames, 1, 1).numpy()
    n = noise.double().numpy()
    a = float(table[tau])
    z_tau = math.sqrt(a) * z + math.sqrt(1 - a) * n
    h, w = n.shape[-2:]
    mask = np.zeros((1, n.shape[1], 1, h, w))
    mask[..., : int(h * percentage), : int(w * percentage)] = 1.0
    mixed = dctn(z_tau, axes=(2, 3, 4), norm="ortho") * mask + dctn(n, axes=(2, 3, 4), norm="ortho") * (1 - mask)
    return torch.from_numpy(idctn(mixed, axes=(2, 3, 4), norm="ortho"))


def reference_sample(unet, x_T, z1, text, text_uncond, motion, steps, guidance, prediction_type="epsilon"):
    """DDIMScheduler.step with eta 0, 'leading' timesteps [..., r + 1, 1], final alpha 0.9999."""
    table, r = _alphas_cumprod(), 1000 // steps
    x, trajectory = x_T, []
    for k in reversed(range(steps)):
        t = k * r + 1
        eps = _guided(unet, x, t, text, text_uncond, z1, motion, guidance, prediction_type, table)
        a_t, a_prev = _alpha(table, t), _alpha(table, t - r)
        pred_x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        x = math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * eps
        trajectory.append(x)
    return trajectory


# -------------------------------------------------------------------------------------------------
# Fixtures
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def animator(tiny_checkpoint_dir):
    return Animator.from_checkpoint(tiny_checkpoint_dir, device="cpu")


@pytest.fixture(scope="module")
def clip():
    """A textured scene panning right by 2 px a frame: (6, 72, 88, 3) uint8."""
    rng = np.random.default_rng(0)
    scene = (rng.random((72, 120, 3)) * 255).astype(np.uint8)
    return np.stack([scene[:, 2 * k: 2 * k + 88] for k in range(6)])


@pytest.fixture(scope="module")
def photo():
    return (np.random.default_rng(1).random((70, 90, 3)) * 255).astype(np.uint8)


def _conditioning(animator, clip, steps_seed=3):
    generator = torch.Generator().manual_seed(steps_seed)
    pixels = torch.cat([preprocess(f, 64, 64) for f in clip[:4]])
    with torch.no_grad():
        latents = animator.backend.checkpoint.vae.encode(pixels)  # (mean, std)
    mean, std = latents
    z = (mean + std * torch.randn(mean.shape, generator=generator)) * 0.18215
    z = z.permute(1, 0, 2, 3).unsqueeze(0)  # (1, 4, 4, 8, 8)
    return z[:, :, :1], z[:, :, 1:] - z[:, :, :1]


def _compare(ours, ref, tolerance=FP32):
    assert len(ours) == len(ref)
    errors = [relative_error(a, b) for a, b in zip(ours, ref)]
    assert max(errors) < tolerance, errors
    return errors


# -------------------------------------------------------------------------------------------------
# Exactness
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inversion_matches_the_original_on_every_step(animator, clip, guidance, prediction_type):
    unet = animator.backend.checkpoint.unet
    base, motion_latents = _conditioning(animator, clip)
    text, text_uncond = animator.encode_prompts("the camera pans right", "low quality", guidance)
    text_uncond = text_uncond if text_uncond is not None else torch.zeros_like(text)
    motion = torch.tensor([88.0])
    seen = []
    with torch.no_grad():
        x_T = invert(animator.backend.unet, motion_latents, z1=base, text=text,
                     text_uncond=text_uncond if guidance != 1.0 else None, motion_id=motion, steps=5,
                     guidance=guidance, callback=lambda i, t, x: seen.append((t, x.clone())),
                     prediction_type=prediction_type)
        ref = reference_invert(unet, motion_latents, base, text, text_uncond, motion, 5, guidance, prediction_type)
    assert [t for t, _ in seen] == [1, 201, 401, 601, 801]  # the example of docs/METHOD.md, editing
    _compare([x for _, x in seen], ref)
    assert torch.equal(x_T, seen[-1][1]) and x_T.dtype == motion_latents.dtype
    assert relative_error(x_T, motion_latents) > 0.1  # it did move away from the clip's residuals


def test_sampling_undoes_inversion_for_a_model_that_predicts_constant_noise():
    """With eps independent of x and t, DDIM's updates are exact along one line: inverting then sampling with
    the same steps returns the input (the ends of both loops use the same final alpha, 0.9999)."""
    eps = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def unet(x_t, t, text, z1, motion_id):
        return eps.expand_as(x_t)

    x_0 = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cond = dict(z1=x_0[:, :, :1], text=torch.zeros(1, 77, 8), text_uncond=None, motion_id=torch.tensor([90.0]))
    from cinemo_rt.sampling import sample

    x_T = invert(unet, x_0, steps=7, **cond)
    assert relative_error(x_T, x_0) > 0.5
    assert relative_error(sample(unet, x_T, steps=7, guidance=1.0, **cond), x_0) < 1e-12


def test_dct_init_over_inverted_latents_matches_the_original(animator, clip):
    base, motion_latents = _conditioning(animator, clip)
    inverted = torch.randn(motion_latents.shape, generator=torch.Generator().manual_seed(4)) * 1.3
    z1_new = base + 0.5
    ours = animator.dct_init(z1_new, inverted, float(animator.alphas_cumprod[985]), 0.23)
    assert max_abs_error(ours, reference_dct_mix(z1_new, inverted)) < DCT_ABS


def test_whole_edit_matches_the_original_on_every_step(animator, clip, photo):
    """`run_edit` against the re-statement from the same encodes: every inversion and sampling step, the
    DCTInit latents, and the decoded video."""
    steps, seed, motion_id = 4, 21, 86.0
    request = EditRequest("a dog running", motion_id=motion_id, source_prompt="the camera pans right", steps=steps,
                          seed=seed, **SIZE)
    seen = []
    video = animator.run_edit(clip[:4], photo, request, callback=lambda i, t, x: seen.append(x.clone()))
    assert video.shape == (4, 64, 64, 3) and len(seen) == 2 * steps

    # The re-statement's own encodes: the clip's frames then the image, posterior noise in that order.
    checkpoint = animator.backend.checkpoint
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mean, std = checkpoint.vae.encode(torch.cat([preprocess(f, 64, 64) for f in clip[:4]]))
        z = ((mean + std * torch.randn(mean.shape, generator=generator)) * 0.18215).permute(1, 0, 2, 3)[None]
        base, motion_latents = z[:, :, :1], z[:, :, 1:] - z[:, :, :1]
        mean, std = checkpoint.vae.encode(preprocess(photo, 64, 64))
        z1_new = ((mean + std * torch.randn(mean.shape, generator=generator)) * 0.18215)[:, :, None]
        source_text = checkpoint.text_encoder.encode_text(["the camera pans right"])
        text = checkpoint.text_encoder.encode_text(["a dog running"])
        motion = torch.tensor([motion_id])
        inverted = reference_invert(checkpoint.unet, motion_latents, base, source_text, None, motion, steps, 1.0)
        x_T = reference_dct_mix(z1_new, inverted[-1]).float()
        sampled = reference_sample(checkpoint.unet, x_T, z1_new, text, None, motion, steps, 1.0)
    errors = _compare(seen, inverted + sampled)
    print(f"\nedit vs the original's algorithm, relative L2 per step: max {max(errors):.1e}")
    with torch.no_grad():
        frames = torch.cat([z1_new, z1_new + sampled[-1]], dim=2)[0].permute(1, 0, 2, 3) / 0.18215
        images = torch.cat([checkpoint.vae.model.decode(frames, num_frames=4).sample])
    ref_video = ((images / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(video.astype(int) - ref_video.astype(int)).max() <= 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: fp16 editing against fp32 runs in "
                    "benchmarks/gpu/run.sh (its `-m gpu` tests) on a CUDA machine")
def test_fp16_edit_matches_fp32_on_a_gpu(tiny_checkpoint_dir, clip, photo):
    job = dict(prompt="a dog running", source_prompt="the camera pans right", motion_id=86.0, steps=4, seed=5,
               **SIZE)
    fp16 = Animator.from_checkpoint(tiny_checkpoint_dir, device="cuda", dtype="fp16")
    fp32 = Animator.from_checkpoint(tiny_checkpoint_dir, device="cuda", dtype="fp32")
    latents = {}
    for name, animator in (("fp16", fp16), ("fp32", fp32)):
        seen = []
        animator.edit(clip[:4], photo, callback=lambda i, t, x: seen.append(x.float().cpu()), **job)
        latents[name] = seen
    errors = [relative_error(a, b) for a, b in zip(latents["fp16"], latents["fp32"])]
    print(f"\nedit fp16 vs fp32 on {torch.cuda.get_device_name()}: relative L2 per step {errors}")
    # 8 chained steps of an fp16 UNet: the fp16 tolerance on the first, 5x it on any (as the TensorRT video test).
    assert errors[0] < TOLERANCES["fp16"].relative_l2 and max(errors) < 5 * TOLERANCES["fp16"].relative_l2, errors


# -------------------------------------------------------------------------------------------------
# The API
# -------------------------------------------------------------------------------------------------
def test_reconstruction_keeps_the_clip_first_frame(animator, clip):
    video = animator.edit(clip[:4], None, source_prompt="the camera pans right", motion_id=88.0, steps=3, seed=2,
                          use_dct=False, **SIZE)
    assert video.shape == (4, 64, 64, 3) and video.dtype == np.uint8
    assert set(animator.last_timings) == {"1 preprocess", "2 encode clip", "3 encode image", "4 encode text",
                                          "5 invert", "6 initial latents", "7 denoise", "8 decode", "9 to uint8"}
    again = animator.edit(clip[:4], None, source_prompt="the camera pans right", motion_id=88.0, steps=3, seed=2,
                          use_dct=False, **SIZE)
    assert np.array_equal(video, again)


def test_image_prompt_and_clip_change_the_edit(animator, clip, photo):
    job = dict(source_prompt="pan right", motion_id=88.0, steps=2, seed=4, **SIZE)
    a = animator.edit(clip[:4], photo, "a dog", **job)
    assert not np.array_equal(a, animator.edit(clip[:4], photo, "a cat", **job))
    assert not np.array_equal(a, animator.edit(clip[:4], photo[::-1].copy(), "a dog", **job))
    assert not np.array_equal(a, animator.edit(clip[2:6], photo, "a dog", **job))


def test_stride_segments_and_automatic_bucket(animator, clip, photo, caplog):
    seen = []
    with caplog.at_level(logging.INFO, logger="cinemo_rt"):
        video = animator.edit(clip, photo, "a dog", steps=2, seed=1, frames=2, segments=2, stride=None,
                              callback=lambda i, t, x: seen.append(i), height=64, width=64)
    assert video.shape == (5, 64, 64, 3) and len(seen) == 2 * 2 * 2
    assert "-> bucket" in caplog.text
    with pytest.raises(InputError, match="--stride 2 or less fits"):
        animator.edit(clip, photo, "a dog", steps=1, seed=1, frames=2, stride=3, **{"height": 64, "width": 64})
    with pytest.raises(InputError, match="the clip has 6 frames"):
        animator.edit(clip, photo, "a dog", steps=1, frames=6, height=64, width=64)


def test_aspect_ratio_difference_is_reported(animator, clip, caplog):
    tall = (np.random.default_rng(2).random((120, 60, 3)) * 255).astype(np.uint8)
    with caplog.at_level(logging.WARNING):
        animator.edit(clip[:4], tall, "a dog", motion_id=88.0, steps=1, seed=0, **SIZE)
    assert "centre-cropped" in caplog.text
