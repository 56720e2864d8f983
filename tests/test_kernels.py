"""Tests for kernels/: references, kernel index arithmetic, CMake build, GPU parity.

Tiers: (a) float64 references vs scipy, and a numpy replay of the CUDA kernels' index arithmetic
(tile loops, bounds, shared-memory layout) driven by the launchers' own plans: CPU, always run;
(b) NVRTC compile of dct.cu when libnvrtc is found, and the CMake build + ctest when cmake and nvcc
exist; (c) GPU parity, skipped without CuPy and a device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.fft

from cinemo_rt._kernels import cupy_dct, reference

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(1, 4, 15, 40, 64), (2, 3, 5, 7, 9), (1, 1, 1, 1, 1), (1, 2, 3, 33, 65), (1, 1, 2, 64, 31)]
AXES = (2, 3, 4)
ALPHA_975 = 6.5173e-5  # docs/METHOD.md, DCTInit, linear schedule
# Relative L2 tolerances per dtype; fp32 kernels accumulate in fp32.
RTOL = {"float32": 1e-6, "float64": 1e-12}
GPU_SKIP = "needs CuPy and a CUDA GPU; run on the GPU machine: pytest tests/test_kernels.py"


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def rng_inputs(shape, seed=0, z_frames=1):
    rng = np.random.default_rng(seed)
    z1 = rng.standard_normal(shape[:2] + (z_frames,) + shape[3:])
    return z1, rng.standard_normal(shape)


# ---------------------------------------------------------------------------------------------
# (a) references

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("inverse", [False, True])
def test_reference_dct_matches_scipy(shape, axis, inverse):
    x = np.random.default_rng(1).standard_normal(shape)
    expect = (scipy.fft.idctn if inverse else scipy.fft.dctn)(x, type=2, axes=[axis], norm="ortho")
    assert rel_l2(reference.dct(x, axis, inverse), expect) < 1e-13


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_dct_init_matches_scipy_3d(shape):
    z1, noise = rng_inputs(shape, seed=2)
    a, frac = ALPHA_975, 0.23
    z_tau = np.sqrt(a) * z1 + np.sqrt(1 - a) * noise
    h, w = shape[-2:]
    mask = np.zeros((1, h, w))
    mask[:, : int(h * frac), : int(w * frac)] = 1
    dct3 = lambda x: scipy.fft.dctn(x, axes=[2, 3, 4], norm="ortho")  # noqa: E731
    expect = scipy.fft.idctn(dct3(z_tau) * mask + dct3(noise) * (1 - mask), axes=[2, 3, 4], norm="ortho")
    assert rel_l2(reference.dct_init(z1, noise, a, frac), expect) < 1e-13


@pytest.mark.parametrize("alpha", [ALPHA_975, 0.3, 1.0])
def test_closed_form_identity(alpha):
    """out = noise + sqrt(a) LP2(z1) + (sqrt(1-a) - 1) LP2(noise): the algebra the fused kernel uses."""
    shape = (1, 4, 15, 40, 64)
    z1, noise = rng_inputs(shape, seed=3)
    kh, kw = int(40 * 0.23), int(64 * 0.23)
    uh, uw = reference.dct_matrix(40)[:kh].T, reference.dct_matrix(64)[:kw].T  # (H, kh), (W, kw)
    lp2 = lambda x: uh @ (uh.T @ x @ uw) @ uw.T  # noqa: E731
    zs, ns = cupy_dct.mix_scales(alpha)
    closed = noise + zs * lp2(z1) + ns * lp2(noise)
    assert rel_l2(closed, reference.dct_init(z1, noise, alpha)) < 1e-13


def test_reference_matches_cpu_dct_init():
    """kernels/reference.py and cinemo_rt.dctinit.dct_init (the GPU tests' reference) agree."""
    dctinit = pytest.importorskip("cinemo_rt.dctinit", reason="cinemo_rt.dctinit not written yet")
    torch = pytest.importorskip("torch")
    z1, noise = rng_inputs((1, 4, 15, 40, 64), seed=8)
    got = dctinit.dct_init(torch.from_numpy(z1), torch.from_numpy(noise), ALPHA_975, 0.23)
    assert rel_l2(got.double().numpy(), reference.dct_init(z1, noise, ALPHA_975, 0.23)) < 1e-12


# ---------------------------------------------------------------------------------------------
# (a) numpy replay of dct.cu, with the launch plans from cupy_dct (no GPU needed)

def basis_kernel(n, transpose):
    """dct_basis_*: exact integer phase reduction, then cospi."""
    r, c = np.divmod(np.arange(n * n), n)
    k, j = (c, r) if transpose else (r, c)
    phase = ((2 * j + 1) * k) % (4 * n)
    scale = np.where(k == 0, np.sqrt(1.0 / n), np.sqrt(2.0 / n))
    return scale * np.cos(np.pi * phase / (2 * n))


def gemm_kernel(a, b, c, p: cupy_dct.GemmPlan, grid: int):
    """dct_gemm_*: flat tile loop, shared tiles with zero fill outside M/N/K, 8 row groups per thread."""
    tile, rows = cupy_dct.TILE, cupy_dct.ROWS
    m_tiles, n_tiles = -(-p.m // tile), -(-p.n // tile)
    tx, r = np.meshgrid(np.arange(tile), np.arange(tile))  # tile coordinates [r][tx]
    for block in range(grid):
        for t in range(block, p.batch * m_tiles * n_tiles, grid):
            nt, mt, bi = t % n_tiles, (t // n_tiles) % m_tiles, t // (n_tiles * m_tiles)
            m0, col = mt * tile, nt * tile + tx[0]
            acc = np.zeros((tile, tile))  # acc[ty + i*rows][tx]
            for k0 in range(0, p.k, tile):
                m, ka, kb, cc = m0 + r, k0 + tx, k0 + r, nt * tile + tx
                ok_a, ok_b = (m < p.m) & (ka < p.k), (kb < p.k) & (cc < p.n)
                As = np.where(ok_a, a[np.where(ok_a, bi * p.stride_a + m * p.lda + ka, 0)], 0)
                Bs = np.where(ok_b, b[np.where(ok_b, bi * p.stride_b + kb * p.ldb + cc, 0)], 0)
                acc += As @ Bs
            for ty in range(rows):
                for i in range(tile // rows):
                    m = m0 + ty + i * rows
                    ok = (m < p.m) & (col < p.n)
                    c[bi * p.stride_c + m * p.ldc + col[ok]] = acc[ty + i * rows][ok]


def dct_emulated(x, axis, inverse, grid=None):
    p = cupy_dct.gemm_plan(x.shape, axis, inverse)
    basis = basis_kernel(x.shape[axis], p.basis_transpose)
    out = np.full(x.size, np.nan)
    a, b = (basis, x.ravel()) if p.basis_is_a else (x.ravel(), basis)
    gemm_kernel(a, b, out, p, grid or p.grid)
    return out.reshape(x.shape)


def init_kernel(z, noise, p: cupy_dct.InitPlan, zs, ns, stage, grid):
    """dct_init_*: one flat shared buffer with the kernel's offsets; each step is its idx loop."""
    H, W, kh, kw, F = p.height, p.width, p.kh, p.kw, p.frames
    smem = np.full(p.smem_elements + (p.stage_elements if stage else 0), np.nan)
    o_uh, o_uw = 0, H * kh
    o_g = o_uw + W * kw
    o_y = o_g + H * kw
    o_x = o_y + kh * kw
    o_z = o_x + H * W
    idx = np.arange(H * kh)
    smem[o_uh + idx] = basis_kernel(H, False).reshape(H, H)[idx % kh, idx // kh]  # Uh[h*kh+i] = D[i, h]
    idx = np.arange(W * kw)
    smem[o_uw + idx] = basis_kernel(W, False).reshape(W, W)[idx % kw, idx // kw]
    z, noise = z.ravel(), noise.ravel()
    out = np.full(noise.size, np.nan)
    for block in range(grid):
        for fr in range(block, p.bc * F, grid):
            b, f = divmod(fr, F)
            xg, zg = fr * H * W, (b * p.z_frames + (0 if p.z_frames == 1 else f)) * H * W
            if stage:
                smem[o_x:o_x + H * W] = noise[xg:xg + H * W]
                smem[o_z:o_z + H * W] = z[zg:zg + H * W]
                X, Z, xo, zo = smem, smem, o_x, o_z
            else:
                X, Z, xo, zo = noise, z, xg, zg
            idx = np.arange(H * kw)
            h, j = idx // kw, idx % kw
            w = np.arange(W)[:, None]
            u = smem[o_uw + w * kw + j]
            sz = (Z[zo + h * W + w] * u).sum(0)
            sx = (X[xo + h * W + w] * u).sum(0)
            smem[o_g + idx] = zs * sz + ns * sx
            idx = np.arange(kh * kw)
            i, j = idx // kw, idx % kw
            hh = np.arange(H)[:, None]
            smem[o_y + idx] = (smem[o_uh + hh * kh + i] * smem[o_g + hh * kw + j]).sum(0)
            idx = np.arange(H * kw)
            h, j = idx // kw, idx % kw
            ii = np.arange(kh)[:, None]
            smem[o_g + idx] = (smem[o_uh + h * kh + ii] * smem[o_y + ii * kw + j]).sum(0)
            idx = np.arange(H * W)
            h, w = idx // W, idx % W
            jj = np.arange(kw)[:, None]
            s = (smem[o_g + h * kw + jj] * smem[o_uw + w * kw + jj]).sum(0)
            out[fr * H * W + idx] = X[xo + idx] + s
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("inverse", [False, True])
def test_gemm_index_math_emulated(shape, axis, inverse):
    x = np.random.default_rng(4).standard_normal(shape)
    expect = (scipy.fft.idctn if inverse else scipy.fft.dctn)(x, axes=[axis], norm="ortho")
    assert rel_l2(dct_emulated(x, axis, inverse), expect) < 1e-13


def test_gemm_grid_stride_emulated():
    """Fewer blocks than tiles: the grid-stride loop must still cover every tile exactly."""
    x = np.random.default_rng(5).standard_normal((1, 2, 3, 33, 65))
    for axis in AXES:
        expect = scipy.fft.dctn(x, axes=[axis], norm="ortho")
        assert rel_l2(dct_emulated(x, axis, False, grid=3), expect) < 1e-13


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stage", [True, False])
@pytest.mark.parametrize("z_frames", ["one", "all"])
def test_dct_init_index_math_emulated(shape, stage, z_frames):
    z, noise = rng_inputs(shape, seed=6, z_frames=1 if z_frames == "one" else shape[2])
    p = cupy_dct.init_plan(z.shape, noise.shape, 0.23, 8)
    alpha = ALPHA_975 if z_frames == "one" else 1.0  # alpha = 1: z is z_tau (dct_init_from_z_tau)
    zs, ns = cupy_dct.mix_scales(alpha)
    expect = reference.dct_init(z, noise, alpha)
    got = init_kernel(z, noise, p, zs, ns, stage, grid=min(p.grid, 7)).reshape(shape)
    assert np.isfinite(got).all()
    assert rel_l2(got, expect) < 1e-12


def test_smem_plan_fits_spec_shape():
    """1x4x15x40x64 stages both frames in shared memory: fp32 under 48 KiB, fp64 needs the opt-in."""
    for itemsize, fits_default in ((4, True), (8, False)):
        p = cupy_dct.init_plan((1, 4, 1, 40, 64), (1, 4, 15, 40, 64), 0.23, itemsize)
        assert (p.kh, p.kw) == (9, 14)
        assert (p.smem_bytes(True) <= cupy_dct.DEFAULT_SMEM) == fits_default
        assert p.smem_bytes(True) <= 160 * 1024  # A100 opt-in 163 KiB, H100 227 KiB


# ---------------------------------------------------------------------------------------------
# Import without CuPy, error messages that do not need a GPU

def test_import_without_cupy_is_lazy():
    code = ("import sys; sys.modules['cupy'] = None; import cinemo_rt._kernels.cupy_dct as k, numpy as np\n"
            "try:\n    k._cupy()\nexcept RuntimeError as e:\n    assert 'cuda12' in str(e); print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert res.stdout.strip() == "ok", res.stderr


def test_outputs_used_on_a_callers_stream_are_recorded(monkeypatch):
    """A launch on a stream other than torch's current one records the torch tensors it uses on that stream."""
    torch = pytest.importorskip("torch")
    recorded = []

    class Tensor:
        def record_stream(self, stream):
            recorded.append((self, stream))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 11})())
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda ptr, device=None: ("stream", ptr, device))
    a, b = Tensor(), Tensor()
    cupy_dct.record_for_stream((a, b), 11, 0)  # torch's current stream: nothing to record
    assert recorded == []
    cupy_dct.record_for_stream((a, b), 22, 0)
    assert recorded == [(a, ("stream", 22, 0)), (b, ("stream", 22, 0))]


def test_cpu_torch_tensor_rejected_with_fix():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=r"\.cuda\(\)"):
        cupy_dct.dct(torch.zeros(1, 4, 15, 40, 64), axis=-1)
    with pytest.raises(TypeError, match=r"float\(\)"):
        cupy_dct.dct(torch.zeros(1, 4, 15, 40, 64, dtype=torch.float16), axis=-1)
    with pytest.raises(ValueError, match="5-D"):
        cupy_dct.dct(torch.zeros(4, 40, 64), axis=-1)
    with pytest.raises(TypeError, match="kernels.reference"):
        cupy_dct.dct(np.zeros((1, 4, 15, 40, 64)), axis=-1)


# ---------------------------------------------------------------------------------------------
# (b) NVRTC compile of the exact source RawModule loads, and the CMake build

def find_nvrtc() -> str | None:
    found = ctypes.util.find_library("nvrtc")
    if found:
        return found
    for pattern in ("/usr/local/cuda*/lib64/libnvrtc.so*", "/usr/local/cuda*/targets/*/lib/libnvrtc.so*",
                    f"{sys.prefix}/lib/python3*/site-packages/nvidia/cu*/lib/libnvrtc.so*",
                    f"{sys.prefix}/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so*"):
        hits = [h for h in sorted(glob.glob(pattern)) if "builtins" not in h]
        if hits:
            return hits[0]
    return os.environ.get("CINEMO_NVRTC")


def test_nvrtc_compiles_source():
    path = find_nvrtc()
    if path is None:
        pytest.skip("libnvrtc not found (set CINEMO_NVRTC=/path/libnvrtc.so.13 to run this check)")
    lib = ctypes.CDLL(path)
    prog = ctypes.c_void_p()
    src = cupy_dct.SOURCE.read_bytes()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"dct.cu", 0, None, None) == 0
    for arch in (b"compute_80", b"compute_90"):
        opts = [*(o.encode() for o in cupy_dct.NVRTC_OPTIONS), b"--gpu-architecture=" + arch]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        assert rc == 0, log.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.skipif(not (shutil.which("cmake") and (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc"))),
                    reason="needs cmake and nvcc")
def test_cmake_build_and_ctest(tmp_path):
    """Configure + build (both architectures) and run ctest; without a GPU dct_test exits 77 = skipped."""
    build = tmp_path / "build"
    jobs = str(min(2, os.cpu_count() or 1))
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build)], check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", jobs], check=True, capture_output=True)
    res = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "dct_test" in res.stdout


# ---------------------------------------------------------------------------------------------
# (c) GPU parity

def _gpu_available() -> bool:
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


gpu = pytest.mark.skipif(not _gpu_available(), reason=GPU_SKIP)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("inverse", [False, True])
def test_gpu_dct_matches_scipy(dtype, shape, axis, inverse):
    import cupy
    x = np.random.default_rng().standard_normal(shape).astype(dtype)  # fresh inputs every run
    got = cupy.asnumpy(cupy_dct.dct(cupy.asarray(x), axis, inverse))
    expect = (scipy.fft.idctn if inverse else scipy.fft.dctn)(x.astype(np.float64), axes=[axis], norm="ortho")
    assert got.dtype == np.dtype(dtype)
    assert rel_l2(got, expect) < RTOL[dtype]


def _cpu_dct_init():
    try:
        from cinemo_rt.dctinit import dct_init
    except ImportError:
        return lambda z1, noise, a, fraction: reference.dct_init(z1.numpy(), noise.numpy(), a, fraction)
    return lambda z1, noise, a, fraction: dct_init(z1, noise, a, fraction).double().numpy()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fraction", [0.23, 0.5, 1.0])
def test_gpu_dct_init_matches_cpu_reference(dtype, shape, fraction):
    torch = pytest.importorskip("torch")
    z1, noise = (torch.from_numpy(a) for a in rng_inputs(shape, seed=None))
    expect = _cpu_dct_init()(z1, noise, ALPHA_975, fraction)
    tdt = getattr(torch, dtype)
    got = cupy_dct.dct_init_cuda(z1.to("cuda", tdt), noise.to("cuda", tdt), ALPHA_975, fraction)
    assert isinstance(got, torch.Tensor) and got.dtype == tdt and got.is_cuda
    assert rel_l2(got.double().cpu().numpy(), expect) < RTOL[dtype]


@gpu
@pytest.mark.gpu
def test_gpu_torch_zero_copy_and_stream():
    torch = pytest.importorskip("torch")
    x = torch.randn(1, 4, 15, 40, 64, device="cuda", dtype=torch.float64)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())  # x was written on the default stream
    with torch.cuda.stream(side):  # default stream = torch's current one (side)
        y = cupy_dct.dct(x, -1)
        z = cupy_dct.dct(y, -1, inverse=True, stream=side)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert rel_l2(z.cpu().numpy(), x.cpu().numpy()) < 1e-12
    import cupy
    view = cupy.from_dlpack(x)  # the launcher's view of x shares its memory: no copy
    assert view.data.ptr == x.data_ptr()
    z1 = torch.randn(1, 4, 1, 40, 64, device="cuda", dtype=torch.float64)
    out = cupy_dct.dct_init_cuda(z1, x, ALPHA_975, stream=torch.cuda.current_stream())
    assert out.data_ptr() not in (x.data_ptr(), z1.data_ptr())


@gpu
@pytest.mark.gpu
def test_gpu_error_messages():
    torch = pytest.importorskip("torch")
    x = torch.randn(1, 4, 15, 40, 64, device="cuda")
    with pytest.raises(ValueError, match=r"contiguous\(\)"):
        cupy_dct.dct(x.transpose(3, 4), -1)
    with pytest.raises(ValueError, match="last three"):
        cupy_dct.dct(x, 1)
    with pytest.raises(TypeError, match=r"to\(noise.dtype\)"):
        cupy_dct.dct_init_cuda(x[:, :, :1].double().contiguous(), x, ALPHA_975)
    with pytest.raises(ValueError, match=r"\(B, C, 1, H, W\)"):
        cupy_dct.dct_init_cuda(x, x, ALPHA_975)
    with pytest.raises(ValueError, match="alpha_bar_tau"):
        cupy_dct.dct_init_cuda(x[:, :, :1].contiguous(), x, 1.5)
