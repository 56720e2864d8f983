"""The registry of samplers, light enough for the CLI to read its choices without importing torch.

A sampler is a function `(model_fn, x_T, steps, alphas_cumprod, *, eta, generator, callback) -> x_0` over
an eps model function (`cinemo_rt.sampling`); adding one is that function plus a line here.
"""

from __future__ import annotations

import importlib

# name -> "module:function"; the first is the default (the original's).
SAMPLERS: dict[str, str] = {
    "ddim": "cinemo_rt.sampling:ddim",
    "dpmpp-2m": "cinemo_rt.dpm_solver:dpmpp_2m_sample",  # DPM-Solver++(2M): fewer steps for the same video
}
DEFAULT_SAMPLER = next(iter(SAMPLERS))


def load_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    module, function = SAMPLERS[name].split(":")
    return getattr(importlib.import_module(module), function)


def needs_unconditional(guidance: float) -> bool:
    """Guidance 1 is eps_c exactly: no unconditional half is encoded or run."""
    return guidance != 1.0
