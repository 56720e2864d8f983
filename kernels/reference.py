"""Float64 numpy references for the kernels in dct.cu (llm.c style: every kernel beside a reference).

Deliberately naive: the 3D DCTInit below is the docs/METHOD.md, DCTInit definition, not the closed form the
fused kernel uses, so the parity tests check the algebra as well as the index arithmetic.
"""

from __future__ import annotations

import numpy as np


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II matrix D[k, i] = s_k cos(pi (2i+1) k / 2n); y = D x, x = D.T y."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def dct(x: np.ndarray, axis: int, inverse: bool = False) -> np.ndarray:
    """Orthonormal DCT-II (or DCT-III with inverse=True) of x along one axis, in float64."""
    d = dct_matrix(x.shape[axis])
    y = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    return np.moveaxis(y @ (d if inverse else d.T), -1, axis)


def dct_init(z1: np.ndarray, noise: np.ndarray, alpha_bar_tau: float, fraction: float = 0.23) -> np.ndarray:
    """DCTInit (docs/METHOD.md): idct_3d(dct_3d(z_tau) * M + dct_3d(noise) * (1 - M)) over (f, h, w), float64.

    z1 (B, C, 1, H, W) is repeated over the F frames of noise (B, C, F, H, W); M is the spatial box
    [:int(H*fraction), :int(W*fraction)], broadcast over all temporal frequencies.
    """
    h, w = noise.shape[-2:]
    z_tau = np.sqrt(alpha_bar_tau) * np.asarray(z1, np.float64) + np.sqrt(1.0 - alpha_bar_tau) * noise
    mask = np.zeros((1, h, w))
    mask[:, : int(h * fraction), : int(w * fraction)] = 1.0

    def dct3(x, inverse=False):
        for axis in (-3, -2, -1):
            x = dct(x, axis, inverse)
        return x

    return dct3(dct3(z_tau) * mask + dct3(noise) * (1.0 - mask), inverse=True)
