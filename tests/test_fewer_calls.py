"""Fewer UNet calls: the default stays bit-exact, calls are counted, guidance truncation and the
step cache do what they say, the calibration round-trips through cinemo_rt.json, CLI and benchmark run."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cinemo_rt.fewer_calls import (
    CALIBRATION_KEY, CallCounter, StepCache, StepClock, load_coefficients, store_calibration, wrap_model_fn,
)
from cinemo_rt.errors import InputError
from cinemo_rt.image import load_image, preprocess
from cinemo_rt.pipeline import Animator
from cinemo_rt.request import FAST_PRESET, FewerCalls, Request
from cinemo_rt.model_calls import evaluation_of, model_fn_of
from cinemo_rt.sampling import cfg_model_fn, ddim_sample, sample
from cinemo_rt.schedule import ddim_timesteps, make_schedule

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SMALL = dict(height=64, width=64, frames=3)
GUIDANCE = 7.5


def fake_unet(x_t, t, text, z1, motion_id):
    """Deterministic, nonlinear in x_t, different per conditioning row (so CFG's halves differ)."""
    scale = text.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
    return torch.tanh(x_t * (1 + scale)) + 1e-3 * t.view(-1, 1, 1, 1, 1) + 0.1 * z1 + 1e-3 * motion_id.view(-1, 1, 1, 1, 1)


def conditioning(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(text=torch.randn(1, 77, 8, generator=g), text_uncond=torch.randn(1, 77, 8, generator=g),
                z1=torch.randn(1, 4, 1, 4, 4, generator=g), motion_id=torch.tensor([90.0]))


def run(unet, options: FewerCalls, steps=10, coefficients=(1.0, 0.0)):
    counter = CallCounter()
    cond = conditioning()
    x_T = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    model_fn = wrap_model_fn(counter.wrap(unet), options, guidance=GUIDANCE, steps=steps, coefficients=coefficients,
                             **cond)
    x_0 = ddim_sample(model_fn, x_T, ddim_timesteps(steps).tolist(), make_schedule())
    return x_0, counter.calls, model_fn


def test_off_is_bit_exact_to_plain_cfg_and_counts_cfg_calls_as_two():
    x_0, calls, _ = run(fake_unet, FewerCalls())
    cond = conditioning()
    x_T = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    plain = ddim_sample(cfg_model_fn(fake_unet, guidance=GUIDANCE, **cond), x_T, ddim_timesteps(10).tolist(),
                        make_schedule())
    assert torch.equal(x_0, plain) and torch.equal(sample(fake_unet, x_T, steps=10, guidance=GUIDANCE, **cond), plain)
    assert calls == 20


def test_animator_default_is_bit_exact_to_the_original_path(tiny_checkpoint_dir):
    """The default Animator call gives the x_0 of `sampling.sample` (today's path) on the same inputs."""
    animator = Animator.from_checkpoint(tiny_checkpoint_dir, device="cpu")
    image = (np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)
    finals = []
    animator(image, "pan left", 9, seed=3, steps=3, callback=lambda i, t, x: finals.append(x), **SMALL)
    assert animator.last_unet_calls == 6

    generator = torch.Generator("cpu").manual_seed(3)
    z1 = animator.encode_z1(preprocess(load_image(image), 64, 64), generator)
    text, text_uncond = animator.encode_prompts("pan left", "", GUIDANCE)
    x_T = animator.initial_noise(z1, 3, generator)
    model_fn = cfg_model_fn(animator.backend.unet, text=text, text_uncond=text_uncond, z1=z1,
                            motion_id=torch.tensor([90.0]), guidance=GUIDANCE)  # today's closure, unwrapped
    x_0 = ddim_sample(model_fn, x_T, ddim_timesteps(3).tolist(), make_schedule())
    assert torch.equal(finals[-1], x_0)


def test_guidance_truncation_halves_late_calls_and_reuses_the_direction():
    steps = 10
    _, calls, _ = run(fake_unet, FewerCalls(guidance_until=0.5), steps)
    assert calls == 5 * 2 + 5 * 1
    _, calls, _ = run(fake_unet, FewerCalls(guidance_until=0.0, guidance_every=3), steps)
    assert calls == 4 * 2 + 6 * 1  # steps 0, 3, 6, 9 guided

    # After the cut-off: eps_c(x_t) + (g - 1) * (eps_c - eps_u) of the last guided step.
    cond = conditioning()
    model_fn = wrap_model_fn(fake_unet, FewerCalls(guidance_until=0.5), guidance=GUIDANCE, steps=2, **cond)
    x = torch.randn(1, 4, 3, 4, 4)
    t = torch.tensor([500])
    first = model_fn(x, t)
    eps_u = fake_unet(x, t, cond["text_uncond"], cond["z1"], cond["motion_id"])
    eps_c = fake_unet(x, t, cond["text"], cond["z1"], cond["motion_id"])
    torch.testing.assert_close(first, eps_u + GUIDANCE * (eps_c - eps_u))
    x2, t2 = x * 0.9, torch.tensor([300])
    second = model_fn(x2, t2)
    expected = fake_unet(x2, t2, cond["text"], cond["z1"], cond["motion_id"]) + (GUIDANCE - 1) * (eps_c - eps_u)
    torch.testing.assert_close(second, expected)


def test_step_cache_skips_and_always_computes_first_and_last():
    steps = 10
    full, calls_full, _ = run(fake_unet, FewerCalls(), steps)
    same, calls_zero, _ = run(fake_unet, FewerCalls(cache=0.0), steps)
    assert calls_zero == calls_full and torch.equal(same, full)  # threshold 0: every step computed
    _, calls_all_skipped, cache = run(fake_unet, FewerCalls(cache=1e9), steps)
    assert calls_all_skipped == 2 * 2  # first and last step only
    _, calls_some, _ = run(fake_unet, FewerCalls(cache=0.3), steps)
    assert calls_all_skipped < calls_some < calls_full


def test_extrapolation_is_exact_for_an_output_linear_in_the_step():
    """A constant estimate of 0.4 per step under threshold 1: steps 0, 3, 6 and the last are computed. Once two
    are, a skipped step gets the linear extrapolation; before that, the last output."""
    clock = StepClock()
    calls = []

    def model_fn(x_t, t):
        calls.append(clock.step)
        return torch.full((1, 4, 1, 2, 2), 2.0 + 0.5 * clock.step)

    cache = model_fn_of(clock.ticking(StepCache(evaluation_of(model_fn), threshold=1.0, steps=9, clock=clock,
                                                coefficients=(0.0, 0.4))))
    x = torch.ones(1, 4, 1, 2, 2)
    outputs = [float(cache(x * (1 + 0.01 * i), torch.tensor([900 - 100 * i]))[0, 0, 0, 0, 0]) for i in range(9)]
    assert calls == [0, 3, 6, 8]
    assert outputs[:3] == [2.0, 2.0, 2.0]  # one output known: held
    assert outputs[3:] == pytest.approx([2.0 + 0.5 * i for i in range(3, 9)])  # extrapolated = the model


def test_polynomial_indicator_changes_the_decisions():
    _, calls_identity, _ = run(fake_unet, FewerCalls(cache=0.2), 10)
    _, calls_flat, _ = run(fake_unet, FewerCalls(cache=0.2), 10, coefficients=(0.0, 0.25))  # 0.25 per step
    assert calls_flat == 2 * 10  # every step's estimate alone crosses the threshold
    assert calls_identity < calls_flat


def test_the_fast_preset_fills_what_is_not_given():
    assert (Request("x").steps, Request("x").sampler, Request("x").fewer_calls) == (50, "ddim", FewerCalls())
    fast = Request("x", fast=True)
    assert (fast.steps, fast.sampler, fast.fewer_calls) == (FAST_PRESET.steps, FAST_PRESET.sampler,
                                                             FAST_PRESET.fewer_calls)
    request = Request("x", fast=True, steps=40, sampler="ddim", cache=0.25)
    assert (request.steps, request.sampler, request.cache) == (40, "ddim", 0.25)
    for bad in (dict(cache=-1.0), dict(guidance_until=1.5), dict(guidance_every=0), dict(cache_reuse="residual")):
        with pytest.raises(ValueError):
            Request("x", **bad)


def test_calibration_merges_into_cinemo_rt_json(tmp_path):
    (tmp_path / "cinemo_rt.json").write_text(json.dumps({"height": 32, "other_key": {"x": 1}}))
    assert load_coefficients(tmp_path) is None
    store_calibration(tmp_path, {"coefficients": [0.5, 1.0, 0.01], "r2": 0.9})
    data = json.loads((tmp_path / "cinemo_rt.json").read_text())
    assert data["height"] == 32 and data["other_key"] == {"x": 1} and CALIBRATION_KEY in data
    assert load_coefficients(tmp_path) == (0.5, 1.0, 0.01)
    assert list(tmp_path.iterdir()) == [tmp_path / "cinemo_rt.json"]
    assert load_coefficients(tmp_path / "missing") is None


@pytest.fixture(scope="module")
def small_checkpoint(tiny_checkpoint_dir, tmp_path_factory):
    """A copy of the tiny checkpoint with a small default size (the calibration uses the defaults)."""
    import shutil

    folder = tmp_path_factory.mktemp("fc") / "tiny"
    shutil.copytree(tiny_checkpoint_dir, folder)
    (folder / "cinemo_rt.json").write_text(json.dumps({"height": 64, "width": 64, "frames": 3}))
    return folder


def test_calibration_script_on_the_tiny_model(small_checkpoint):
    sys.path.insert(0, str(BENCHMARKS))
    import calibrate_cache

    entry = calibrate_cache.calibrate(str(small_checkpoint), steps_list=(4,), images=1, write=True)
    assert len(entry["coefficients"]) == 3 and entry["fitted_on"]["pairs"] == 2 * 2  # 2 prompts x 2 step pairs
    animator = Animator.from_checkpoint(small_checkpoint, device="cpu")
    assert animator.cache_coefficients == tuple(entry["coefficients"])
    assert animator.defaults.height == 64  # the other keys still read


def test_animator_keywords_and_bad_values(small_checkpoint, caplog):
    animator = Animator.from_checkpoint(small_checkpoint, device="cpu")
    image = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    animator(image, "zoom in", 9, seed=0, steps=4, guidance_until=0.5)
    assert animator.last_unet_calls == 2 * 2 + 2
    steps = []
    video = animator(image, "zoom in", 9, seed=0, fast=True, callback=lambda i, t, x: steps.append(i))
    assert video.shape == (4, 64, 64, 3) and len(steps) == FAST_PRESET.steps
    assert animator.last_unet_calls <= 2 * FAST_PRESET.steps
    animator(image, "zoom in", 9, seed=0, fast=True, cache=1e9)  # an override of the preset's threshold
    assert animator.last_unet_calls == 2 * 2
    with pytest.raises(InputError, match="guidance_until"):
        animator(image, "zoom in", 9, seed=0, steps=2, guidance_until=2.0)
    # Any sampler: DPM-Solver++(2M) under the same wrappers, from a request object.
    request = Request("zoom in", 9, seed=0, sampler="dpmpp-2m", steps=5, cache=1e9)
    assert request.fewer_calls == FewerCalls(cache=1e9)
    animator.run(image, request)
    assert animator.last_unet_calls == 2 * 2
    assert Request("zoom in", fast=True).steps == FAST_PRESET.steps


def test_cli_fast_reports_unet_calls(small_checkpoint, tmp_path, caplog):
    from PIL import Image

    from cinemo_rt.cli import EXIT_BAD_INPUT, main

    image = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)
    base = ["run", "--image", str(image), "--prompt", "pan left", "--checkpoint", str(small_checkpoint), "--seed", "0"]
    with caplog.at_level("INFO"):
        assert main(["-v", *base, "--fast", "--out", str(tmp_path / "a.gif")]) == 0
    assert "UNet calls:" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        assert main([*base, "--steps", "4", "--cache", "0.5", "--guidance-until", "0.5",
                     "--out", str(tmp_path / "b.gif")]) == 0
    assert "UNet calls: " in caplog.text
    assert main([*base, "--guidance-until", "1.5"]) == EXIT_BAD_INPUT  # the request's check, as the server's
    assert main([*base, "--cache", "inf", "--out", str(tmp_path / "c.gif")]) == EXIT_BAD_INPUT
    assert not (tmp_path / "c.gif").exists()


def test_benchmark_measures_and_marks_the_pareto_front(small_checkpoint, tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    import fewer_calls as bench

    animator = Animator.from_checkpoint(small_checkpoint, device="cpu")
    image = (np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)
    work = [("noise", image, "pan left", 0)]
    references = [animator(image, "pan left", bench.BUCKET, seed=0, steps=4)]
    rows = [bench.measure(animator, bench.Setting("DDIM steps", 4), work, references),
            bench.measure(animator, bench.Setting("DDIM steps", 2), work, references),
            bench.measure(animator, bench.Setting("step cache", 4, FewerCalls(cache=1e9)), work, references)]
    assert rows[0]["psnr_db"] == 99.0 and rows[0]["unet_calls"] == 8 and rows[1]["unet_calls"] == 4
    assert rows[2]["unet_calls"] == 4 and rows[1]["ssim"] <= 1.0
    bench.pareto(rows)
    assert rows[0]["pareto"]
    assert sum((s.steps, s.options, s.sampler) == (FAST_PRESET.steps, FAST_PRESET.fewer_calls, FAST_PRESET.sampler)
               for s in bench.settings()) == 1


def test_embedded_tiny_fallback_carries_its_calibration(tmp_path, monkeypatch):
    import cinemo_rt.defaults as defaults

    monkeypatch.setattr(defaults, "DEMO_CHECKPOINT", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = defaults.default_checkpoint()
    assert load_coefficients(folder) == tuple(defaults.TINY_STEP_CACHE["coefficients"])


@pytest.mark.slow
def test_tiny_calibration_is_reproduced(tmp_path, monkeypatch):
    """The stored tiny-model fit is what calibrate_cache.py finds (about a minute on one core)."""
    import cinemo_rt.defaults as defaults

    monkeypatch.setattr(defaults, "DEMO_CHECKPOINT", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = defaults.default_checkpoint()
    sys.path.insert(0, str(BENCHMARKS))
    import calibrate_cache

    entry = calibrate_cache.calibrate(str(folder), steps_list=(50, 25, 12), images=2)
    assert entry["coefficients"] == pytest.approx(defaults.TINY_STEP_CACHE["coefficients"], abs=1e-3)
