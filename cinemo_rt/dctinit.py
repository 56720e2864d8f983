"""DCTInit (docs/METHOD.md, DCTInit): start the residual frames from noise whose low spatial frequencies come from z1.

    z_tau  = sqrt(a_tau) * repeat(z1, F) + sqrt(1 - a_tau) * noise          (tau = 975 in the original)
    x_T    = idct_3d( dct_3d(z_tau) * H + dct_3d(noise) * (1 - H) )

dct_3d is the orthonormal DCT-II over the last three dims (F, h, w), as `torch_dct.dct_3d(x, 'ortho')` in the
original. H is a binary box keeping the [:int(h*fraction), :int(w*fraction)] spatial coefficients for ALL
temporal frequencies (the original mask has a frame dim of 1 that broadcasts over F).

The reference here runs in float64 with explicit DCT matrices (40x40, 64x64, FxF at the released size),
which is exact to float64 rounding and has an obvious GPU/ONNX counterpart (three small matmuls).
`select_dct_init` picks the CUDA implementation (`kernels/cupy_dct.py`) when one is available. The pipeline hands
DCTInit its tensors through `check_kernel_contract` (the kernel's own precondition check, `kernels/contract.py`,
all but the device) on every device, so a tensor layout the kernel would refuse fails on the CPU too;
`CINEMO_RT_DCTINIT=cuda-on-cpu` runs the CUDA kernel itself, executed on the CPU (`kernels/cuda_on_cpu.py`: the
GPU window's rehearsal).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import torch

from .schedule import add_noise
from .settings import DCT_FRACTION

log = logging.getLogger(__name__)

DEFAULT_FRACTION = DCT_FRACTION  # the name callers used before settings.py
DCTInitFn = Callable[..., torch.Tensor]
# The CUDA kernels' package: the repository's `kernels/` folder, imported under one name, installed or in a
# checkout (`cinemo_rt/_kernels` links to it). A top-level `kernels` would shadow Hugging Face's package of
# that name, which transformers imports.
KERNEL_PACKAGE = "cinemo_rt._kernels"
KERNEL_MODULES = (f"{KERNEL_PACKAGE}.cupy_dct",)
IMPLEMENTATION_ENV = "CINEMO_RT_DCTINIT"  # "cuda-on-cpu": the CUDA kernel executed on the CPU
CUDA_ON_CPU = "cuda-on-cpu"


def import_kernels(module: str = "cupy_dct"):
    """A module of the kernels package (CuPy imports lazily inside it); ImportError when it does not resolve."""
    import importlib

    name = f"{KERNEL_PACKAGE}.{module}"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name not in name:  # a missing dependency inside the module, not the module itself
            raise
        raise ImportError(f"the DCT kernels module {name} is not installed") from err


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): X = D @ x, x = D.T @ X.

    D[k, i] = s_k * cos(pi * (2i + 1) * k / (2n)), s_0 = sqrt(1/n), s_k = sqrt(2/n) (scipy norm='ortho')."""
    k = torch.arange(n, dtype=torch.float64)[:, None]  # (n, 1) frequency
    i = torch.arange(n, dtype=torch.float64)[None, :]  # (1, n) sample
    d = torch.cos(math.pi * (2.0 * i + 1.0) * k / (2.0 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.to(dtype)


def _transform_3d(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Apply the (inverse) orthonormal DCT-II along each of the last three dims of x (..., F, H, W)."""
    if x.dim() < 3:
        raise ValueError(f"dct_3d needs at least 3 dims (..., F, H, W); got shape {tuple(x.shape)}")
    f, h, w = x.shape[-3:]
    mats = [dct_matrix(n, x.dtype).to(x.device) for n in (f, h, w)]
    if inverse:
        # Orthonormal: the inverse is the transpose.
        mats = [m.T for m in mats]
    d_f, d_h, d_w = mats
    y = x.reshape(-1, f, h, w)  # (N, F, H, W), N = prod of leading dims
    y = torch.einsum("kf,nfhw->nkhw", d_f, y)
    y = torch.einsum("kh,nfhw->nfkw", d_h, y)
    y = torch.einsum("kw,nfhw->nfhk", d_w, y)
    return y.reshape(x.shape)


def dct_3d(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 3D DCT-II over the last three dims (= scipy.fft.dctn(x, axes=(-3,-2,-1), norm='ortho'))."""
    return _transform_3d(x, inverse=False)


def idct_3d(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct_3d` (= scipy.fft.idctn(x, axes=(-3,-2,-1), norm='ortho'))."""
    return _transform_3d(x, inverse=True)


def low_pass_mask(h: int, w: int, fraction: float = DEFAULT_FRACTION) -> torch.Tensor:
    """Binary box low-pass H (h, w), float64: ones on [:int(h*fraction), :int(w*fraction)].

    int() truncation as in the original `dct_low_pass_filter`: 40x64 at 0.23 keeps 9x14 coefficients."""
    mask = torch.zeros(h, w, dtype=torch.float64)
    mask[: int(h * fraction), : int(w * fraction)] = 1.0
    return mask


def dct_init(
    z1: torch.Tensor,
    noise: torch.Tensor,
    alpha_bar_tau: float | torch.Tensor,
    fraction: float = DEFAULT_FRACTION,
) -> torch.Tensor:
    """DCTInit reference: z1 (B, 4, 1, h, w), noise (B, 4, F, h, w) -> initial x_T (B, 4, F, h, w).

    Computed on the CPU in float64 (the original encodes z1 and mixes in fp64); returned in noise's dtype
    and on noise's device. alpha_bar_tau is alphas_cumprod[tau] (tau = 975: 6.5173e-5)."""
    if z1.dim() != 5 or noise.dim() != 5 or z1.shape[2] != 1:
        raise ValueError(
            f"dct_init expects z1 (B, C, 1, h, w) and noise (B, C, F, h, w); "
            f"got {tuple(z1.shape)} and {tuple(noise.shape)}"
        )
    if z1.shape[:2] != noise.shape[:2] or z1.shape[3:] != noise.shape[3:]:
        raise ValueError(f"z1 {tuple(z1.shape)} and noise {tuple(noise.shape)} differ in B, C, h or w")
    z1_64 = z1.detach().to("cpu", torch.float64)
    noise_64 = noise.detach().to("cpu", torch.float64)
    # z1 broadcasts over F: the same as repeating it to F frames.
    z_tau = add_noise(z1_64, noise_64, alpha_bar_tau)  # (B, C, F, h, w)
    h, w = noise.shape[-2:]
    mask = low_pass_mask(h, w, fraction)  # (h, w), broadcasts over (B, C, F)
    mixed = dct_3d(z_tau) * mask + dct_3d(noise_64) * (1.0 - mask)
    return idct_3d(mixed).to(device=noise.device, dtype=noise.dtype)


def check_kernel_contract(z1: torch.Tensor, noise: torch.Tensor, fraction: float) -> None:
    """The CUDA kernel's preconditions (kernels/contract.py), all but the device, on the tensors the pipeline hands
    DCTInit: checked on every device, so a layout the kernel would refuse fails on the CPU as on a GPU."""
    import_kernels("contract").check_launch("dct_init", {"z1": z1, "noise": noise}, on_gpu=False,
                                            fraction=fraction, z_frames_one=True)


def select_dct_init(device: torch.device | str) -> DCTInitFn:
    """Choose the DCTInit implementation once for `device`: the CUDA kernel from `kernels/cupy_dct.py` when the
    device is CUDA and CuPy and that module import, else the float64 CPU reference `dct_init`, or with
    CINEMO_RT_DCTINIT=cuda-on-cpu the CUDA kernel executed on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            import cupy  # noqa: F401  (the kernel module needs it; fail here with a clear reason)

            kernels = import_kernels()
        except ImportError as err:
            log.info("DCTInit: CPU float64 reference (CUDA kernel unavailable: %s)", err)
            return dct_init
        log.info("DCTInit: CUDA kernel %s.dct_init_cuda on %s", kernels.__name__, device)
        return kernels.dct_init_cuda
    choice = os.environ.get(IMPLEMENTATION_ENV, "")
    if choice == CUDA_ON_CPU:
        log.info("DCTInit: the CUDA kernel executed on the CPU (%s=%s)", IMPLEMENTATION_ENV, choice)
        return import_kernels("cuda_on_cpu").dct_init_cpu
    if choice:
        raise ValueError(f"{IMPLEMENTATION_ENV}={choice!r} is not known; unset it or set it to {CUDA_ON_CPU!r}")
    log.info("DCTInit: CPU float64 reference (device %s)", device)
    return dct_init
