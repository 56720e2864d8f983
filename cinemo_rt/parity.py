"""Parity measures and the tolerances every backend, export and kernel is held to (one place, per output)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Tolerance:
    relative_l2: float  # ||a - b|| / ||b||
    max_abs: float | None = None


# Relative L2 against the fp32 PyTorch reference on fresh random inputs.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(relative_l2=1e-5),
    "fp16": Tolerance(relative_l2=1e-2),
    "bf16": Tolerance(relative_l2=5e-2),
    # Kernels against scipy's float64 DCT.
    "kernel_fp32": Tolerance(relative_l2=1e-6),
    "kernel_fp64": Tolerance(relative_l2=1e-12),
}


def _as_f64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def relative_error(actual, reference) -> float:
    """Relative L2 error of `actual` against `reference`, in float64."""
    a, b = _as_f64(actual), _as_f64(reference)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_abs_error(actual, reference) -> float:
    a, b = _as_f64(actual), _as_f64(reference)
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def psnr(actual, reference, peak: float = 255.0) -> float:
    mse = float(np.mean((_as_f64(actual) - _as_f64(reference)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak * peak / mse)


def within(actual, reference, precision: str) -> tuple[bool, float]:
    """(passes, relative error) against the named tolerance."""
    err = relative_error(actual, reference)
    return err <= TOLERANCES[precision].relative_l2, err
