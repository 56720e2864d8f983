"""DCTInit reference against scipy's orthonormal DCT and the closed form of docs/METHOD.md, DCTInit."""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
import scipy.fft
import torch

from cinemo_rt.dctinit import dct_3d, dct_init, dct_matrix, idct_3d, low_pass_mask, select_dct_init
from cinemo_rt.schedule import make_schedule

AXES = (-3, -2, -1)
ALPHA_975 = make_schedule()[975].item()


def scipy_dct_init(z1: np.ndarray, noise: np.ndarray, a: float, fraction: float = 0.23) -> np.ndarray:
    """Independent reference written from docs/METHOD.md, DCTInit with scipy.fft."""
    f, h, w = noise.shape[-3:]
    z_tau = np.sqrt(a) * np.repeat(z1, f, axis=2) + np.sqrt(1 - a) * noise
    mask = np.zeros((1, 1, 1, h, w))
    mask[..., : int(h * fraction), : int(w * fraction)] = 1
    dct_z_tau = scipy.fft.dctn(z_tau, axes=AXES, norm="ortho")
    dct_noise = scipy.fft.dctn(noise, axes=AXES, norm="ortho")
    mixed = dct_z_tau * mask + dct_noise * (1 - mask)
    return scipy.fft.idctn(mixed, axes=AXES, norm="ortho")


@pytest.mark.parametrize("n", [1, 2, 15, 40, 64])
def test_dct_matrix_orthonormal_and_matches_scipy(n):
    d = dct_matrix(n)
    assert d.dtype == torch.float64 and d.shape == (n, n)
    torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-13)
    ref = scipy.fft.dct(np.eye(n), axis=0, norm="ortho")  # column i = transform of unit vector e_i
    np.testing.assert_allclose(d.numpy(), ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape", [(1, 4, 15, 40, 64), (2, 3, 5, 7, 9), (1, 1, 1, 3), (6, 11, 13)])
def test_dct_3d_matches_scipy(shape):
    x = np.random.default_rng(0).standard_normal(shape)
    ours = dct_3d(torch.from_numpy(x))
    np.testing.assert_allclose(ours.numpy(), scipy.fft.dctn(x, axes=AXES, norm="ortho"), rtol=0, atol=1e-11)
    back = idct_3d(ours)
    ref_back = scipy.fft.idctn(ours.numpy(), axes=AXES, norm="ortho")
    np.testing.assert_allclose(back.numpy(), ref_back, rtol=0, atol=1e-11)
    np.testing.assert_allclose(back.numpy(), x, rtol=0, atol=1e-11)


def test_dct_3d_needs_three_dims():
    with pytest.raises(ValueError, match="3 dims"):
        dct_3d(torch.zeros(4, 5))


def test_low_pass_mask_released_size():
    mask = low_pass_mask(40, 64, 0.23)
    assert mask.shape == (40, 64) and mask.dtype == torch.float64
    assert mask.sum().item() == 9 * 14
    assert torch.all(mask[:9, :14] == 1)
    assert mask[9].sum() == 0 and mask[:, 14].sum() == 0


@pytest.mark.parametrize("shape", [(1, 4, 15, 40, 64), (2, 4, 5, 13, 21), (1, 3, 1, 9, 7)])
def test_dct_init_matches_scipy_reference(shape):
    rng = np.random.default_rng(1)
    b, c, f, h, w = shape
    z1 = rng.standard_normal((b, c, 1, h, w))
    noise = rng.standard_normal(shape)
    ours = dct_init(torch.from_numpy(z1), torch.from_numpy(noise), ALPHA_975)
    assert ours.dtype == torch.float64 and ours.shape == shape
    np.testing.assert_allclose(ours.numpy(), scipy_dct_init(z1, noise, ALPHA_975), rtol=0, atol=1e-11)


def test_dct_init_closed_form():
    """The closed form of DCTInit (docs/METHOD.md): x_T = noise + sqrt(a) LP(z1) - (1 - sqrt(1-a)) LP(noise), LP a per-frame 2D box low-pass.

    Holds because z1 is constant over time and H keeps every temporal frequency."""
    rng = np.random.default_rng(2)
    z1 = rng.standard_normal((1, 4, 1, 40, 64))
    noise = rng.standard_normal((1, 4, 15, 40, 64))
    mask = np.zeros((40, 64))
    mask[:9, :14] = 1

    def lp(x):
        return scipy.fft.idctn(scipy.fft.dctn(x, axes=(-2, -1), norm="ortho") * mask, axes=(-2, -1), norm="ortho")

    sqrt_a, shrink = np.sqrt(ALPHA_975), 1 - np.sqrt(1 - ALPHA_975)
    assert abs(sqrt_a - 0.0080730) < 1e-7 and abs(shrink - 3.25e-5) < 1e-7  # docs/METHOD.md's constants
    expected = noise + sqrt_a * lp(z1) - shrink * lp(noise)
    ours = dct_init(torch.from_numpy(z1), torch.from_numpy(noise), ALPHA_975)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-11)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dct_init_returns_noise_dtype(dtype):
    z1 = torch.randn(1, 4, 1, 8, 8, dtype=torch.float64)
    noise = torch.randn(1, 4, 3, 8, 8).to(dtype)
    out = dct_init(z1, noise, ALPHA_975)
    assert out.dtype == dtype and out.device == noise.device
    ref = dct_init(z1, noise.double(), ALPHA_975)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-2 if dtype == torch.float16 else 1e-6)


def test_dct_init_rejects_bad_shapes():
    with pytest.raises(ValueError, match="z1"):
        dct_init(torch.zeros(1, 4, 2, 8, 8), torch.zeros(1, 4, 3, 8, 8), ALPHA_975)
    with pytest.raises(ValueError, match="differ"):
        dct_init(torch.zeros(1, 4, 1, 8, 9), torch.zeros(1, 4, 3, 8, 8), ALPHA_975)


def test_select_cpu_reference(caplog, monkeypatch):
    from cinemo_rt.dctinit import IMPLEMENTATION_ENV

    monkeypatch.delenv(IMPLEMENTATION_ENV, raising=False)
    with caplog.at_level(logging.INFO, logger="cinemo_rt.dctinit"):
        assert select_dct_init("cpu") is dct_init
    assert "CPU" in caplog.text


def test_select_cuda_falls_back_without_kernel(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    assert select_dct_init("cuda:0") is dct_init


def test_select_cuda_uses_kernel_when_importable(monkeypatch, caplog):
    def fake_cuda_kernel(z1, noise, alpha_bar_tau, fraction=0.23):
        return noise

    from cinemo_rt.dctinit import KERNEL_MODULES

    kernel_module = types.ModuleType("cupy_dct")
    kernel_module.dct_init_cuda = fake_cuda_kernel
    monkeypatch.setitem(sys.modules, "cupy", types.ModuleType("cupy"))
    for name in KERNEL_MODULES:  # installed or checkout layout, whichever this run has
        monkeypatch.setitem(sys.modules, name, kernel_module)
    with caplog.at_level(logging.INFO, logger="cinemo_rt.dctinit"):
        assert select_dct_init(torch.device("cuda")) is fake_cuda_kernel
    assert "cupy_dct" in caplog.text
