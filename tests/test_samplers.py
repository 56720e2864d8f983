"""The sampler seam: DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler on the tiny model,
the v-prediction wrapper, and the registry."""

import pytest
import torch

from cinemo_rt.dpm_solver import dpm_timesteps
from cinemo_rt.parity import relative_error
from cinemo_rt.sampling import SAMPLERS, cfg_model_fn, epsilon_model_fn, sample
from cinemo_rt.schedule import make_schedule
from cinemo_rt.testing import make_tiny_components


@pytest.fixture(scope="module")
def tiny():
    checkpoint = make_tiny_components(seed=3)
    g = torch.Generator().manual_seed(0)
    d = checkpoint.unet.config.cross_attention_dim
    cond = dict(z1=torch.randn(1, 4, 1, 8, 8, generator=g), text=torch.randn(1, 77, d, generator=g),
                text_uncond=torch.randn(1, 77, d, generator=g), motion_id=torch.tensor([90.0]))
    return checkpoint, torch.randn(1, 4, 3, 8, 8, generator=g), cond


def _diffusers_dpm(model_fn, x, steps, prediction_type="epsilon"):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear", prediction_type=prediction_type,
                                            algorithm_type="dpmsolver++", solver_order=2)
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = model_fn(x, t.reshape(1).long())
        x = scheduler.step(out, t, x).prev_sample
    return x, [int(t) for t in scheduler.timesteps]


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
def test_dpm_timesteps_match_diffusers(steps):
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                            beta_schedule="linear")
    scheduler.set_timesteps(steps)
    assert dpm_timesteps(steps) == scheduler.timesteps.tolist()


@pytest.mark.parametrize("steps", [4, 12])
def test_dpmpp_2m_matches_diffusers_on_the_tiny_model(tiny, steps):
    checkpoint, x_T, cond = tiny
    with torch.no_grad():
        ours = sample(checkpoint.unet, x_T, steps=steps, guidance=5.0, sampler="dpmpp-2m", **cond)
        model_fn = cfg_model_fn(checkpoint.unet, guidance=5.0, **cond)
        ref, _ = _diffusers_dpm(model_fn, x_T, steps)
    # diffusers keeps sigmas in float32, we in float64: agreement to fp32 rounding.
    assert relative_error(ours, ref) < 1e-5


def test_v_prediction_wrapper_matches_diffusers_dpm(tiny):
    """The model's output read as v: our eps wrapper + sampler against diffusers' own v conversion."""
    checkpoint, x_T, cond = tiny
    with torch.no_grad():
        ours = sample(checkpoint.unet, x_T, steps=6, guidance=3.0, sampler="dpmpp-2m",
                      prediction_type="v_prediction", **cond)
        ref, _ = _diffusers_dpm(cfg_model_fn(checkpoint.unet, guidance=3.0, **cond), x_T, 6, "v_prediction")
    assert relative_error(ours, ref) < 1e-5


def test_epsilon_wrapper_is_identity_for_epsilon_and_exact_for_v():
    a = make_schedule()
    x, v, t = torch.randn(2, 4, 3, 2, 2), torch.randn(2, 4, 3, 2, 2), torch.tensor([10, 900])
    assert epsilon_model_fn(lambda x_t, t_: v, "epsilon", a)(x, t) is v
    eps = epsilon_model_fn(lambda x_t, t_: v, "v_prediction", a)(x, t)
    for i, ti in enumerate(t.tolist()):
        want = a[ti].sqrt() * v[i].double() + (1 - a[ti]).sqrt() * x[i].double()
        assert torch.allclose(eps[i].double(), want, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type"):
        epsilon_model_fn(lambda x_t, t_: v, "sample", a)


def test_registry_and_errors(tiny):
    checkpoint, x_T, cond = tiny
    assert list(SAMPLERS)[0] == "ddim" and "dpmpp-2m" in SAMPLERS
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(checkpoint.unet, x_T, sampler="euler", **cond)
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        sample(checkpoint.unet, x_T, sampler="dpmpp-2m", eta=0.5, steps=2, **cond)
