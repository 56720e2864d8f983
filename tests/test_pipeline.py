"""The Animator end to end on a tiny checkpoint, and its sampling checked against an independent
re-statement of the reference algorithm (diffusers' DDIMScheduler, scipy's DCT)."""

import numpy as np
import pytest
import torch
from scipy.fft import dctn, idctn

from cinemo_rt.errors import InputError
from cinemo_rt.image import load_image, preprocess
from cinemo_rt.parity import TOLERANCES, relative_error
from cinemo_rt.pipeline import Animator
from cinemo_rt.residuals import frames_from_residuals

SMALL = dict(height=64, width=64, frames=3, steps=3)


@pytest.fixture(scope="module")
def animator(tiny_checkpoint_dir):
    return Animator.from_checkpoint(tiny_checkpoint_dir, device="cpu")


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return (rng.random((70, 90, 3)) * 255).astype(np.uint8)


def test_video_shape_and_dtype(animator, photo):
    video = animator(photo, "the camera pans left", bucket=15, seed=0, **SMALL)
    assert video.shape == (4, 64, 64, 3) and video.dtype == np.uint8
    assert set(animator.last_timings) == {"1 preprocess", "2 encode image", "3 encode text", "4 initial noise",
                                          "5 denoise", "6 decode", "7 to uint8"}


def test_seeded_runs_are_bit_reproducible(animator, photo):
    a = animator(photo, "a boat drifting", bucket=3, seed=7, **SMALL)
    b = animator(photo, "a boat drifting", bucket=3, seed=7, **SMALL)
    c = animator(photo, "a boat drifting", bucket=3, seed=8, **SMALL)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bucket_prompt_and_dct_change_the_video(animator, photo):
    base = animator(photo, "the camera pans left", bucket=0, seed=1, **SMALL)
    assert not np.array_equal(base, animator(photo, "the camera pans left", bucket=19, seed=1, **SMALL))
    assert not np.array_equal(base, animator(photo, "the camera pans right", bucket=0, seed=1, **SMALL))
    assert not np.array_equal(base, animator(photo, "the camera pans left", bucket=0, seed=1, use_dct=False,
                                             **SMALL))


def test_callback_called_once_per_step(animator, photo):
    seen = []
    animator(photo, "zoom in", seed=0, callback=lambda i, t, x: seen.append((i, t)), **SMALL)
    assert seen == [(0, 667), (1, 334), (2, 1)]


def test_segments_chain_last_frame(animator, photo):
    video = animator(photo, "pan left", segments=2, seed=3, **SMALL)
    assert video.shape[0] == 1 + 2 * 3
    first = animator(photo, "pan left", seed=3, **SMALL)
    assert np.array_equal(video[:4], first)


def test_bad_arguments(animator, photo):
    with pytest.raises(ValueError, match="0..19"):
        animator(photo, "x", bucket=20, **SMALL)
    with pytest.raises(InputError, match="steps"):
        animator(photo, "x", **{**SMALL, "steps": 0})
    with pytest.raises(InputError, match="divisible by 8"):
        animator(photo, "x", **{**SMALL, "height": 60})


def test_empty_and_overlong_prompts_warn_but_work(animator, photo, caplog):
    with caplog.at_level("WARNING"):
        assert animator(photo, "", seed=0, **SMALL).shape[0] == 4
        assert animator(photo, "camera " * 200, seed=0, **SMALL).shape[0] == 4
    assert "empty prompt" in caplog.text and "truncated" in caplog.text


# -- preprocessing -----------------------------------------------------------------------------------
def test_preprocess_resize_and_centre_crop():
    image = (np.arange(50 * 70 * 3) % 251).astype(np.uint8).reshape(50, 70, 3)
    out = preprocess(image, 64, 64)
    assert out.shape == (1, 3, 64, 64) and -1 <= out.min() and out.max() <= 1
    x = torch.tensor(image).permute(2, 0, 1)[None].float() / 255
    scale = max(65 / 50, 65 / 70)
    big = torch.nn.functional.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    top, left = round((big.shape[2] - 64) / 2), round((big.shape[3] - 64) / 2)
    assert torch.equal(out, (big[:, :, top:top + 64, left:left + 64] - 0.5) / 0.5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_awkward_image_modes(tmp_path, mode):
    from PIL import Image

    path = tmp_path / f"img_{mode}.png"
    Image.new(mode, (33, 47), color=100 if mode != "RGBA" else (10, 20, 30, 40)).save(path)
    assert load_image(path).shape == (47, 33, 3)


def test_image_errors(tmp_path):
    from PIL import Image

    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match="not a readable image"):
        load_image(tmp_path / "notes.png")
    Image.new("RGB", (31, 100)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="at least 32"):
        load_image(tmp_path / "small.png")


# -- against an independent statement of the reference algorithm -------------------------------------
def _reference_x0(checkpoint, z1, text, text_uncond, motion_id, noise, steps, guidance):
    """Cinemo's loop as the original pipeline writes it: diffusers DDIMScheduler, scipy DCTInit."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(steps)
    # DCTInit with scipy, float64, as docs/METHOD.md, DCTInit
    a = scheduler.alphas_cumprod[975].double()
    z_tau = a.sqrt() * z1.double().repeat(1, 1, noise.shape[2], 1, 1) + (1 - a).sqrt() * noise.double()
    h, w = noise.shape[-2:]
    mask = np.zeros((1, 1, 1, h, w))
    mask[..., : int(h * 0.23), : int(w * 0.23)] = 1
    mixed = dctn(z_tau.numpy(), axes=(2, 3, 4), norm="ortho") * mask + \
        dctn(noise.double().numpy(), axes=(2, 3, 4), norm="ortho") * (1 - mask)
    x = torch.from_numpy(idctn(mixed, axes=(2, 3, 4), norm="ortho")).float()
    for t in scheduler.timesteps:
        eps = checkpoint.unet(torch.cat([x, x]), torch.stack([t, t]), torch.cat([text_uncond, text]),
                              torch.cat([z1, z1]), torch.cat([motion_id, motion_id]))
        eps_u, eps_c = eps.chunk(2)
        x = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, x, eta=0.0).prev_sample
    return x


def test_denoising_matches_reference_algorithm(animator, photo):
    checkpoint = animator.backend.checkpoint
    generator = torch.Generator().manual_seed(5)
    z1 = animator.encode_z1(preprocess(load_image(photo), 64, 64), generator)
    text, text_uncond = animator.encode_prompts("the camera zooms in", "low quality", 7.5)
    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    motion = torch.tensor([84.0])
    from cinemo_rt.sampling import sample

    x_T = animator.dct_init(z1, noise, float(animator.alphas_cumprod[975]), 0.23)
    ours = sample(animator.backend.unet, x_T, z1=z1, text=text, text_uncond=text_uncond, motion_id=motion,
                  steps=4, guidance=7.5)
    with torch.no_grad():
        ref = _reference_x0(checkpoint, z1, text, text_uncond, motion, noise, 4, 7.5)
    # diffusers keeps alphas in float32, we in float64: agreement to fp32 rounding.
    assert relative_error(ours, ref) < 1e-4
    frames = frames_from_residuals(z1, ours)
    assert frames.shape == (1, 4, 4, 8, 8) and torch.equal(frames[:, :, 0], z1[:, :, 0])


def test_fp32_reference_tolerance_is_stated():
    assert TOLERANCES["fp32"].relative_l2 == 1e-5
