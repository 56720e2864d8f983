"""The registry of samplers, light enough for the CLI to read its choices without importing torch.

A sampler is a generator function `(x_T, steps, alphas_cumprod, *, eta, generator, callback)` that yields
`(x_t, t)` for each model evaluation it needs, receives eps, and returns x_0 (`cinemo_rt.sampling`); adding
one is that function plus an entry here, which also says what the sampler supports (docs/ARCHITECTURE.md
shows one being added).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplerEntry:
    target: str               # "module:function"
    stochastic: bool = False  # takes eta > 0 (fresh noise per step); the request refuses eta for the others


# The first is the default (the original's).
SAMPLERS: dict[str, SamplerEntry] = {
    "ddim": SamplerEntry("cinemo_rt.sampling:ddim", stochastic=True),
    "dpmpp-2m": SamplerEntry("cinemo_rt.dpm_solver:dpmpp_2m"),  # DPM-Solver++(2M): fewer steps, same video
}
DEFAULT_SAMPLER = next(iter(SAMPLERS))


def load_sampler(name: str):
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    module, function = SAMPLERS[name].target.split(":")
    return getattr(importlib.import_module(module), function)


def stochastic_samplers() -> list[str]:
    return [name for name, entry in SAMPLERS.items() if entry.stochastic]


def needs_unconditional(guidance: float) -> bool:
    """Guidance 1 is eps_c exactly: no unconditional half is encoded or run."""
    return guidance != 1.0
