"""Extending cinemo-rt, each way shown by adding a toy one (docs/ARCHITECTURE.md, "Adding a sampler, a backend
or a mode"): a sampler is a generator plus a registry entry and runs in the Python API and in the server's
batches; a backend is a class plus a registry entry; a mode is a short recipe over the stages."""

from collections import Counter

import numpy as np
import pytest
import torch

from cinemo_rt import Animator, Request, stages
from cinemo_rt.backends import registry
from cinemo_rt.backends.torch_backend import TorchBackend
from cinemo_rt.image import load_image, preprocess
from cinemo_rt.parity import relative_error
from cinemo_rt.residuals import frames_from_residuals
from cinemo_rt.samplers import SAMPLERS, SamplerEntry
from cinemo_rt.sampling import sample
from cinemo_rt.schedule import ddim_timesteps
from cinemo_rt.serve.runner import Runner
from cinemo_rt.testing import make_tiny_components

EXAMPLE = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
SMALL = dict(height=32, width=32, frames=3)  # the tiny test checkpoint has no size of its own: keep videos small


# -- a sampler --------------------------------------------------------------------------------------------
def euler(x_T, steps, alphas_cumprod, *, eta=0.0, generator=None, callback=None):
    """Euler steps of the probability-flow ODE in sigma = sqrt((1 - a) / a) (Karras et al. 2022, Alg. 1
    without its correction) on DDIM's timesteps. DDIM with eta 0 is exactly this Euler step (Song et al.
    2021, section 4.3), so it must agree with the built-in sampler to rounding."""
    timesteps = ddim_timesteps(steps, len(alphas_cumprod)).tolist()
    alphas = [float(alphas_cumprod[t]) for t in timesteps] + [float(alphas_cumprod[0])]
    sigmas = [((1.0 - a) / a) ** 0.5 for a in alphas]
    x = x_T
    for i, t in enumerate(timesteps):
        eps = yield x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = ((x / alphas[i] ** 0.5 + (sigmas[i + 1] - sigmas[i]) * eps) * alphas[i + 1] ** 0.5).to(x_T.dtype)
        if callback is not None:
            callback(i, t, x)
    return x


@pytest.fixture
def toy_sampler(monkeypatch):
    monkeypatch.setitem(SAMPLERS, "toy-euler", SamplerEntry(f"{__name__}:euler"))
    return "toy-euler"


def test_a_new_sampler_matches_its_mathematical_twin(toy_sampler):
    components = make_tiny_components(seed=3)
    g = torch.Generator().manual_seed(0)
    d = components.unet.config.cross_attention_dim
    cond = dict(z1=torch.randn(1, 4, 1, 8, 8, generator=g), text=torch.randn(1, 77, d, generator=g),
                text_uncond=torch.randn(1, 77, d, generator=g), motion_id=torch.tensor([90.0]))
    x_T = torch.randn(1, 4, 3, 8, 8, generator=g)
    with torch.no_grad():
        ours = sample(components.unet, x_T, steps=6, guidance=4.0, sampler=toy_sampler, **cond)
        ddim = sample(components.unet, x_T, steps=6, guidance=4.0, sampler="ddim", **cond)
    assert relative_error(ours, ddim) < 1e-5


def test_a_new_sampler_runs_in_the_python_api_and_in_server_batches(toy_sampler, tiny_checkpoint_dir):
    with pytest.raises(ValueError, match="eta"):  # the entry says it is deterministic
        Request("pans left", sampler=toy_sampler, eta=0.5)
    animator = Animator.from_checkpoint(tiny_checkpoint_dir)
    video = animator(EXAMPLE, "pans left", steps=4, seed=1, sampler=toy_sampler, **SMALL)
    assert video.shape == (4, 32, 32, 3) and animator.last_unet_calls == 8
    runner = Runner(animator, max_batch=2, exact=True)  # bit-exact batching: a fixed row count per call
    requests = [Request(prompt=p, seed=s, steps=4, sampler=toy_sampler, **SMALL).resolve(animator.defaults)
                for p, s in [("pans left", 1), ("zooms in", 2)]]

    def run(group):
        segments = [runner.prepare(EXAMPLE, r) for r in group]
        while live := [s for s in segments if not s.done]:
            runner.step(live)
        return [runner.finish(s) for s in segments]

    together = run(requests)
    for r, batched in zip(requests, together):
        assert np.array_equal(run([r])[0], batched)  # bit for bit, alone or batched


# -- a backend --------------------------------------------------------------------------------------------
class RecordingBackend(TorchBackend):
    """The reference modules, counting the rows each graph is run on."""

    def __init__(self, checkpoint):
        super().__init__(checkpoint, name="toy-recording")
        self.rows = Counter()

    def run(self, graph, feeds):
        self.rows[graph] += int(next(iter(feeds.values())).shape[0])
        return super().run(graph, feeds)


def test_a_new_backend_is_a_class_and_a_registry_entry(monkeypatch, tiny_checkpoint_dir):
    entry = registry.BackendEntry("toy-recording", "checkpoint", __name__, "RecordingBackend", "counts rows")
    monkeypatch.setitem(registry.BACKENDS, entry.name, entry)
    toy = Animator.from_checkpoint(tiny_checkpoint_dir, backend="toy-recording")
    reference = Animator.from_checkpoint(tiny_checkpoint_dir)
    assert isinstance(toy.backend, RecordingBackend)
    video = toy(EXAMPLE, "pans left", steps=3, seed=4, **SMALL)
    assert np.array_equal(video, reference(EXAMPLE, "pans left", steps=3, seed=4, **SMALL))
    assert toy.backend.rows["unet"] == toy.last_unet_calls == 6  # 3 steps x CFG's 2 rows


# -- a mode -----------------------------------------------------------------------------------------------
def variations(animator: Animator, image, request: Request, seeds: list[int]) -> list[np.ndarray]:
    """A toy mode: one image, one video per seed, denoised together as one batch. Each seed draws its
    posterior sample and noise as `Animator.run` does; the stages work on the batch."""
    request = request.resolve(animator.defaults)
    backend = animator.backend
    pixels = preprocess(load_image(image), request.height, request.width)
    text, text_uncond = stages.encode_prompts(backend, animator.tokenizer, request.prompt,
                                              request.negative_prompt, request.guidance)
    z1s, noises = [], []
    for seed in seeds:
        generator = torch.Generator("cpu").manual_seed(seed)
        z1s.append(stages.encode_z1(backend, pixels, generator))
        noises.append(animator.initial_noise(z1s[-1], request.frames, generator, request.dct))
    z1, batch = torch.cat(z1s), len(seeds)
    conditioning = stages.Conditioning(z1, text.expand(batch, -1, -1), None if text_uncond is None else
                                       text_uncond.expand(batch, -1, -1), stages.motion_ids(backend, request, batch))
    x_0 = stages.denoise(backend, conditioning, torch.cat(noises), request, None)
    images = stages.decode_latents(backend, frames_from_residuals(z1.to(x_0.dtype), x_0))
    return list(stages.to_uint8(backend, images).cpu().numpy())


def test_a_new_mode_is_a_recipe_over_the_stages(tiny_checkpoint_dir):
    animator = Animator.from_checkpoint(tiny_checkpoint_dir)
    request = Request("pans left", bucket=12, steps=3, **SMALL)
    with torch.no_grad():
        videos = variations(animator, EXAMPLE, request, [5, 6])
    for seed, video in zip([5, 6], videos):
        alone = animator.run(EXAMPLE, Request("pans left", bucket=12, steps=3, seed=seed, **SMALL))
        # batched rows may differ from a lone run in the last bits (CPU kernels block by batch size)
        assert np.abs(alone.astype(int) - video).max() <= 2
    assert not np.array_equal(videos[0], videos[1])


def test_the_decoder_stage_keeps_a_batch_s_videos_apart(tiny_checkpoint_dir):
    """The temporal decoder's chunks never span two videos of a batch: each decodes as it would alone."""
    animator = Animator.from_checkpoint(tiny_checkpoint_dir)
    latents = torch.randn(2, 4, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    assert animator.backend.info.temporal_vae
    with torch.no_grad():
        together = stages.decode_latents(animator.backend, latents)
        alone = torch.cat([stages.decode_latents(animator.backend, latents[i:i + 1]) for i in range(2)])
    assert relative_error(together, alone) < 1e-6
