"""Schedule and DDIM sampler against diffusers.DDIMScheduler (golden reference), and the CFG wrapper."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from cinemo_rt.sampling import cfg_model_fn, ddim_sample, ddim_step, ddim_timesteps, sample
from cinemo_rt.schedule import add_noise, make_schedule

SHAPE = (1, 4, 3, 4, 5)  # (B, C, F, h, w), tiny


def reference_scheduler(alphas_cumprod: torch.Tensor | None = None, prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIMScheduler as configured in Cinemo; optionally with our float64 table swapped in, so that the
    step arithmetic can be compared to float64 precision (diffusers builds its table in float32)."""
    sched = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    if alphas_cumprod is not None:
        sched.alphas_cumprod = alphas_cumprod
        sched.final_alpha_cumprod = alphas_cumprod[0]
    return sched


def toy_eps(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, t-dependent stand-in for the UNet: (B, C, F, h, w) -> same."""
    phase = t.to(x_t.dtype)[:, None, None, None, None] / 1000.0
    return 0.3 * x_t + torch.sin(x_t + phase)


@pytest.mark.parametrize("steps", [1, 7, 10, 25, 30, 50, 1000])
def test_timesteps_match_diffusers(steps):
    sched = reference_scheduler()
    sched.set_timesteps(steps)
    assert torch.equal(ddim_timesteps(steps), sched.timesteps)


def test_timesteps_50_leading():
    assert ddim_timesteps(50).tolist() == list(range(981, 0, -20))


@pytest.mark.parametrize("steps", [0, -3, 1001])
def test_timesteps_reject_bad_counts(steps):
    with pytest.raises(ValueError, match="1..1000"):
        ddim_timesteps(steps)


def test_schedule_matches_diffusers_table():
    ours = make_schedule()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    theirs = reference_scheduler().alphas_cumprod.double()
    # diffusers accumulates in float32; agreement to float32 rounding of a 1000-term product.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert abs(ours[975].item() - 6.5173e-5) < 1e-9  # docs/METHOD.md, DCTInit
    assert abs(ours[0].item() - 0.9999) < 1e-15


def test_add_noise_matches_diffusers():
    ac = make_schedule()
    x0 = torch.randn(2, 4, 1, 5, 6, dtype=torch.float64)
    noise = torch.randn(2, 4, 3, 5, 6, dtype=torch.float64)
    ours = add_noise(x0, noise, ac[975])
    theirs = reference_scheduler(ac).add_noise(x0.expand_as(noise), noise, torch.tensor([975, 975]))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-14)


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("steps", [1, 10, 25, 50])
def test_every_ddim_step_matches_diffusers(steps, eta):
    ac = make_schedule()
    sched = reference_scheduler(ac)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(steps)
    x_ref = x_ours = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    timesteps = ddim_timesteps(steps).tolist()
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < steps else -1
        z = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
        t_batch = torch.full((1,), t)
        x_ref = sched.step(toy_eps(x_ref, t_batch), t, x_ref, eta=eta, variance_noise=z).prev_sample
        x_ours = ddim_step(toy_eps(x_ours, t_batch), t, t_prev, x_ours, ac, eta=eta, variance_noise=z)
        torch.testing.assert_close(x_ours, x_ref, rtol=1e-12, atol=1e-12, msg=f"step {i} (t={t})")


def test_sample_matches_diffusers_cfg_loop():
    """End to end: our sample() == the original pipeline's loop (doubled batch, CFG, DDIM step)."""
    ac = make_schedule()
    sched = reference_scheduler(ac)
    sched.set_timesteps(10)
    g = 7.5
    x_T = torch.randn(SHAPE, dtype=torch.float64)
    text = torch.randn(1, 77, 8, dtype=torch.float64)
    text_u = torch.randn(1, 77, 8, dtype=torch.float64)
    z1 = torch.randn(1, 4, 1, 4, 5, dtype=torch.float64)
    motion = torch.tensor([90.0], dtype=torch.float64)

    def unet_fn(x, t, txt, z, m):
        text_scale = txt.mean(dim=(1, 2))[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        return toy_eps(x, t) + text_scale * z + 1e-3 * m[:, None, None, None, None]

    x_ref = x_T
    for t in sched.timesteps:
        eps = unet_fn(torch.cat([x_ref] * 2), t.repeat(2), torch.cat([text_u, text]), torch.cat([z1] * 2),
                      torch.cat([motion] * 2))
        eps_u, eps_c = eps.chunk(2)
        x_ref = sched.step(eps_u + g * (eps_c - eps_u), t, x_ref, eta=0.0).prev_sample
    ours = sample(unet_fn, x_T, z1=z1, text=text, text_uncond=text_u, motion_id=motion, steps=10, guidance=g)
    torch.testing.assert_close(ours, x_ref, rtol=1e-12, atol=1e-12)


def test_v_prediction_loop_matches_diffusers():
    """A v-predicting model (the bundled demo checkpoint's scheduler config) through the same CFG loop."""
    ac = make_schedule()
    sched = reference_scheduler(ac, prediction_type="v_prediction")
    sched.set_timesteps(12)
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    text, text_u = torch.randn(1, 77, 8, generator=gen, dtype=torch.float64), torch.zeros(1, 77, 8, dtype=torch.float64)
    z1 = torch.randn(1, 4, 1, 4, 5, generator=gen, dtype=torch.float64)
    motion = torch.tensor([90.0], dtype=torch.float64)

    def unet_fn(x, t, txt, z, m):
        return toy_eps(x, t) + txt.mean(dim=(1, 2))[:, None, None, None, None] * z

    x_ref = x_T
    for t in sched.timesteps:
        v = unet_fn(torch.cat([x_ref] * 2), t.repeat(2), torch.cat([text_u, text]), torch.cat([z1] * 2),
                    torch.cat([motion] * 2))
        v_u, v_c = v.chunk(2)
        x_ref = sched.step(v_u + 3.0 * (v_c - v_u), t, x_ref, eta=0.0).prev_sample
    ours = sample(unet_fn, x_T, z1=z1, text=text, text_uncond=text_u, motion_id=motion, steps=12, guidance=3.0,
                  prediction_type="v_prediction")
    torch.testing.assert_close(ours, x_ref, rtol=1e-11, atol=1e-11)
    with pytest.raises(ValueError, match="prediction_type"):
        sample(unet_fn, x_T, z1=z1, text=text, text_uncond=text_u, motion_id=motion, steps=2,
               prediction_type="sample")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_step_runs_in_dtype_of_x_t(dtype):
    ac = make_schedule()
    x64 = torch.randn(SHAPE, dtype=torch.float64)
    eps64 = torch.randn(SHAPE, dtype=torch.float64)
    ref = ddim_step(eps64, 981, 961, x64, ac)
    out = ddim_step(eps64.to(dtype), 981, 961, x64.to(dtype), ac)
    assert out.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_fp16_step_matches_original_fp16_step():
    """Against the original's own fp16 arithmetic (diffusers' fp32 table, fp16 sample): almost bit-equal.

    Only the coefficients' rounding differs (ours from float64, diffusers' from a float32 cumprod)."""
    sched = reference_scheduler()  # its float32 table, as in the original pipeline
    sched.set_timesteps(25)
    ac = make_schedule()
    timesteps = ddim_timesteps(25).tolist()
    gen = torch.Generator().manual_seed(0)
    differing = total = 0
    for i, t in enumerate(timesteps):
        x = torch.randn(1, 4, 15, 16, 16, generator=gen).half()
        eps = torch.randn(1, 4, 15, 16, 16, generator=gen).half()
        theirs = sched.step(eps, t, x).prev_sample
        ours = ddim_step(eps, t, timesteps[i + 1] if i + 1 < 25 else -1, x, ac)
        assert ours.dtype == theirs.dtype == torch.float16
        torch.testing.assert_close(ours, theirs, rtol=2e-3, atol=2e-3)
        differing += (ours != theirs).sum().item()
        total += ours.numel()
    assert differing / total < 1e-3


def test_last_step_uses_alphas_cumprod_0():
    """set_alpha_to_one=False: the final step lands on alpha_bar = 0.9999, not 1 (so x_0 != pred_x0)."""
    ac = make_schedule()
    x = torch.randn(SHAPE, dtype=torch.float64)
    eps = torch.randn(SHAPE, dtype=torch.float64)
    out = ddim_step(eps, 1, -1, x, ac)
    pred_x0 = (x - (1 - ac[1]).sqrt() * eps) / ac[1].sqrt()
    torch.testing.assert_close(out, ac[0].sqrt() * pred_x0 + (1 - ac[0]).sqrt() * eps, rtol=0, atol=1e-14)
    assert not torch.allclose(out, pred_x0)


def test_cfg_scale_one_is_conditional_and_skips_uncond():
    calls = []

    def unet_fn(x, t, txt, z, m):
        calls.append(x.shape[0])
        return toy_eps(x, t) * txt.mean() + z

    x = torch.randn(SHAPE)
    t = torch.full((1,), 981)
    text, z1, motion = torch.randn(1, 77, 8), torch.randn(1, 4, 1, 4, 5), torch.tensor([90.0])
    model_fn = cfg_model_fn(unet_fn, text=text, text_uncond=None, z1=z1, motion_id=motion, guidance=1.0)
    out = model_fn(x, t)
    assert calls == [1]
    assert torch.equal(out, unet_fn(x, t, text, z1, motion))


def test_cfg_doubled_batch_layout():
    B, g = 2, 3.0
    x = torch.randn(B, 4, 3, 4, 5)
    t = torch.tensor([981, 981])
    text, text_u = torch.randn(B, 77, 8), torch.randn(B, 77, 8)
    z1, motion = torch.randn(B, 4, 1, 4, 5), torch.tensor([90.0, 85.0])
    seen = {}

    def unet_fn(xx, tt, txt, z, m):
        seen.update(x=xx, t=tt, text=txt, z1=z, motion=m)
        return xx * txt.mean(dim=(1, 2))[:, None, None, None, None] + z + m[:, None, None, None, None]

    out = cfg_model_fn(unet_fn, text=text, text_uncond=text_u, z1=z1, motion_id=motion, guidance=g)(x, t)
    assert torch.equal(seen["x"], torch.cat([x, x]))
    assert torch.equal(seen["t"], torch.cat([t, t]))
    assert torch.equal(seen["text"], torch.cat([text_u, text]))  # uncond first
    assert torch.equal(seen["z1"], torch.cat([z1, z1]))  # image latent in both branches
    assert torch.equal(seen["motion"], torch.cat([motion, motion]))
    eps_u = unet_fn(x, t, text_u, z1, motion)
    eps_c = unet_fn(x, t, text, z1, motion)
    torch.testing.assert_close(out, eps_u + g * (eps_c - eps_u))


def test_cfg_needs_uncond_text():
    with pytest.raises(ValueError, match="text_uncond"):
        cfg_model_fn(lambda *a: a[0], text=torch.zeros(1, 77, 8), text_uncond=None,
                     z1=torch.zeros(1, 4, 1, 4, 5), motion_id=torch.zeros(1), guidance=7.5)


def test_callback_per_step():
    record = []
    ddim_sample(toy_eps, torch.randn(SHAPE), ddim_timesteps(5).tolist(), make_schedule(),
                callback=lambda i, t, x: record.append((i, t, x.shape)))
    assert record == [(i, t, torch.Size(SHAPE)) for i, t in enumerate([801, 601, 401, 201, 1])]


def test_seeded_determinism_with_eta():
    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return ddim_sample(toy_eps, torch.ones(SHAPE), ddim_timesteps(10).tolist(), make_schedule(),
                           eta=1.0, generator=gen)

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))
