"""The request (one frozen description of a job), the backend registry and the stage seam."""

import dataclasses

import numpy as np
import pytest
import torch

from cinemo_rt.backends.registry import AUTO, BACKENDS, CHOICES, open_checkpoint
from cinemo_rt.errors import InputError
from cinemo_rt.request import DCTInit, Request
from cinemo_rt.settings import Size


def test_request_from_bucket_validates_and_resolves(caplog):
    request = Request("pan left", bucket=15, steps=10, sampler="dpmpp-2m")
    assert request.motion == 84.0 and request.classifier_free and request.dct == DCTInit()
    assert Request("x", motion_id=91.5).motion == 91.5 and Request("x").motion == 90.0  # bucket 9 by default
    assert not Request("x", guidance=1.0).classifier_free
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.steps = 3
    with caplog.at_level("INFO"):
        resolved = request.resolve(Size(64, 96, 7))
    assert (resolved.height, resolved.width, resolved.frames) == (64, 96, 7) and resolved.seed is not None
    assert f"seed {resolved.seed}" in caplog.text
    assert dataclasses.replace(request, height=32).resolve(Size()).height == 32
    for bad, match in [(dict(steps=0), "steps"), (dict(frames=0), "frames"), (dict(sampler="euler"), "sampler"),
                       (dict(eta=0.5, sampler="dpmpp-2m"), "eta"), (dict(use_dct=False, eta=-1), "eta"),
                       (dict(bucket=3, motion_id=90.0), "not both"), (dict(steps=2.0), "whole number")]:
        with pytest.raises(InputError, match=match):
            Request("x", **bad)
    with pytest.raises(InputError, match="dct_fraction"):
        DCTInit(fraction=0.0)
    with pytest.raises(ValueError, match="0..19"):
        Request("x", bucket=20)


def test_registry_drives_choices_and_refuses_the_wrong_folder_kind(tiny_checkpoint_dir):
    assert CHOICES[0] == "auto" and set(CHOICES[1:]) == set(BACKENDS)
    assert {e.source for e in BACKENDS.values()} == set(AUTO) == {"checkpoint", "engines"}
    with pytest.raises(InputError, match="runs an engines folder"):
        open_checkpoint(tiny_checkpoint_dir, "onnxruntime", device="cpu")
    with pytest.raises(InputError, match="unknown backend"):
        open_checkpoint(tiny_checkpoint_dir, "cuda-magic", device="cpu")


def test_stages_recombine_with_supplied_initial_latents(tiny_checkpoint_dir):
    """A new mode (e.g. editing) supplies its own x_T to the same stages: run() equals the stages by hand."""
    from cinemo_rt import stages
    from cinemo_rt.image import preprocess
    from cinemo_rt.pipeline import Animator

    animator = Animator.from_checkpoint(tiny_checkpoint_dir, device="cpu")
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    request = Request("zoom in", steps=2, seed=4, height=64, width=64, frames=3)
    video = animator.run(image, request)
    backend, generator = animator.backend, torch.Generator().manual_seed(4)
    z1 = stages.encode_z1(backend, preprocess(image, 64, 64), generator)
    text, text_uncond = stages.encode_prompts(backend, animator.tokenizer, request.prompt, request.negative_prompt,
                                              request.guidance)
    conditioning = stages.Conditioning(z1, text, text_uncond, stages.motion_ids(backend, request))
    x_T = animator.initial_noise(conditioning.z1, 3, generator, request.dct)
    x_0 = stages.denoise(backend, conditioning, x_T, request, generator)
    images = stages.decode_latents(backend, torch.cat([conditioning.z1, conditioning.z1 + x_0], dim=2))
    assert np.array_equal(stages.to_uint8(backend, images)[0].numpy(), video)
