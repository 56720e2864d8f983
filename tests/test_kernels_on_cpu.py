"""kernels/dct.cu executed on the CPU (kernels/cuda_on_cpu.py): the .cu compiled unchanged as C++, one OS thread per
CUDA thread, barriers as std::barrier, NaN-filled dynamic shared memory, driven through the real launchers of
kernels/cupy_dct.py (plans, argument lists, shared-memory sizes) with a stand-in for cupy. Compared with the
float64 numpy reference (kernels/reference.py). A kernel change that breaks indexing, synchronisation or
shared-memory sizing fails here without a GPU; AddressSanitizer and ThreadSanitizer builds (slow) check the memory
and the barriers, each shown able to fail by a control."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cinemo_rt._kernels import cupy_dct, cuda_on_cpu, reference

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("g++") is None and not os.environ.get("CXX"),
                                reason="needs g++ 12+ (apt-get install g++; .ci/run installs it)")
ALPHA_975 = 6.5173e-5
TOLERANCE = {np.float64: 1e-12, np.float32: 1e-5}  # relative L2 against the float64 reference


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-300))


def data(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 2, 3, 5, 7), (2, 1, 33, 3, 35), (1, 1, 1, 1, 1)])
def test_dct_every_axis_both_directions(shape, dtype):
    x = data(shape, dtype)
    for axis in (2, 3, 4, -1):
        for inverse in (False, True):
            out = cuda_on_cpu.dct(x, axis, inverse)
            assert out.dtype == dtype and out.shape == shape
            assert rel(out, reference.dct(x.astype(np.float64), axis, inverse)) < TOLERANCE[dtype], (axis, inverse)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fraction", [0.1, 0.23, 0.5, 1.0])
def test_dct_init_fractions(fraction, dtype):
    z1, noise = data((2, 3, 1, 9, 13), dtype, 1), data((2, 3, 4, 9, 13), dtype, 2)
    out = cuda_on_cpu.dct_init(z1, noise, ALPHA_975, fraction)
    assert not np.isnan(out).any()
    assert rel(out, reference.dct_init(z1, noise, ALPHA_975, fraction)) < TOLERANCE[dtype]
    # from an already-noised z_tau, per frame
    z_tau = np.sqrt(0.3) * z1.astype(np.float64) + np.sqrt(0.7) * noise
    ref = reference.dct_init(z_tau, noise, 1.0, fraction)  # alpha 1: the reference's z_tau is z_tau itself
    out = cuda_on_cpu.dct_init_from_z_tau(z_tau.astype(dtype), noise, fraction)
    assert rel(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("grid", [1, 3])
def test_forced_grids_cover_every_tile_and_frame(grid, monkeypatch):
    """The grid-stride loops: with 1 or 3 blocks each block walks many tiles/frames, and the shared memory
    (re-used across them) is re-filled correctly."""
    monkeypatch.setattr(cupy_dct, "MAX_GRID", grid)
    x = data((1, 2, 5, 40, 37), np.float64)
    for axis in (2, 3, 4):
        assert rel(cuda_on_cpu.dct(x, axis), reference.dct(x, axis)) < 1e-12
    z1 = data((1, 2, 1, 40, 37), np.float64, 3)
    assert rel(cuda_on_cpu.dct_init(z1, x, ALPHA_975), reference.dct_init(z1, x, ALPHA_975)) < 1e-12


def test_frames_read_from_global_memory_when_shared_memory_is_short(monkeypatch):
    """stage == 0: a frame too large to stage in shared memory is read from global memory instead."""
    z1, noise = data((1, 2, 1, 40, 64), np.float32, 4), data((1, 2, 3, 40, 64), np.float32, 5)
    plan = cupy_dct.init_plan(z1.shape, noise.shape, 0.23, 4)
    monkeypatch.setitem(cuda_on_cpu._Device.attributes, "MaxSharedMemoryPerBlockOptin", plan.smem_bytes(False))
    out = cuda_on_cpu.dct_init(z1, noise, ALPHA_975)
    assert rel(out, reference.dct_init(z1, noise, ALPHA_975)) < 1e-5


def test_shared_memory_over_the_default_needs_the_opt_in():
    """fp64 at the released size stages 2 frames in more than 48 KiB: the launcher sets the opt-in attribute,
    which the stand-in (as CUDA) requires."""
    kernel = cuda_on_cpu.Kernel(None, "dct_init_f64")
    with pytest.raises(RuntimeError, match="opt-in"):
        kernel((1,), (256,), (), shared_mem=cupy_dct.DEFAULT_SMEM + 8)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float32])  # float64 runs the same indexing: the odd shapes above
def test_released_shape(dtype):
    """1x4x16x40x64: the released latent size (15 generated frames + 1)."""
    x = data((1, 4, 16, 40, 64), dtype)
    for axis in (2, 3, 4):
        assert rel(cuda_on_cpu.dct(x, axis), reference.dct(x.astype(np.float64), axis)) < TOLERANCE[dtype]
    assert rel(cuda_on_cpu.dct(x, -1, True), reference.dct(x.astype(np.float64), -1, True)) < TOLERANCE[dtype]
    z1 = data((1, 4, 1, 40, 64), dtype, 1)
    out = cuda_on_cpu.dct_init(z1, x, ALPHA_975)
    assert rel(out, reference.dct_init(z1, x, ALPHA_975)) < TOLERANCE[dtype]


def test_the_launchers_refuse_what_the_contract_refuses():
    x = data((1, 2, 3, 4, 5), np.float32)
    with pytest.raises(ValueError, match="not contiguous"):
        cuda_on_cpu.dct(np.swapaxes(x, 3, 4), -1)
    with pytest.raises(TypeError, match="float32 or float64"):
        cuda_on_cpu.dct(x.astype(np.float16), -1)


def test_a_kernel_that_does_not_compile_says_so(tmp_path):
    broken = tmp_path / "broken.cu"
    broken.write_text(cupy_dct.SOURCE.read_text().replace("__syncthreads();", "__syncthreads(;", 1))
    with pytest.raises(cuda_on_cpu.BuildError, match="did not compile"):
        cuda_on_cpu.build(broken, cache=tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Sanitizers: the same launches in a child process with the runtime preloaded

DRIVER = """
import sys
import numpy as np
from cinemo_rt._kernels import cupy_dct, cuda_on_cpu, reference
control = sys.argv[1]
if control == "smem-8":  # the launcher asks for 8 bytes too few
    smem_bytes = cupy_dct.InitPlan.smem_bytes
    cupy_dct.InitPlan.smem_bytes = lambda self, stage: smem_bytes(self, stage) - 8
if control == "no-barrier":  # one barrier of dct_init removed
    cupy_dct.SOURCE = __import__("pathlib").Path(sys.argv[2])
rng = np.random.default_rng(0)
for dtype in [np.dtype(name).type for name in sys.argv[-1].split(",")]:
    z1 = rng.standard_normal((1, 2, 1, 9, 13)).astype(dtype)
    noise = rng.standard_normal((1, 2, 3, 9, 13)).astype(dtype)
    out = cuda_on_cpu.dct_init(z1, noise, 0.3, 0.5)
    assert np.abs(out - reference.dct_init(z1, noise, 0.3, 0.5)).max() < 1e-4
    for axis in (2, 3, 4):
        assert np.abs(cuda_on_cpu.dct(noise, axis, True) - reference.dct(noise, axis, True)).max() < 1e-4
print("driver done")
"""
BARRIER_AFTER_G = "G[idx] = z_scale * sz + noise_scale * sx;\n        }\n        __syncthreads();"


def _sanitized(sanitize: str, control: str, tmp_path) -> subprocess.CompletedProcess:
    """The driver under `sanitize`; ThreadSanitizer (slower) runs float32 only, the barriers are the same code."""
    args = [control]
    if control == "no-barrier":
        text = cupy_dct.SOURCE.read_text()
        assert BARRIER_AFTER_G in text, "the control's barrier moved: update BARRIER_AFTER_G"
        racy = tmp_path / "dct_no_barrier.cu"
        racy.write_text(text.replace(BARRIER_AFTER_G, BARRIER_AFTER_G.removesuffix("__syncthreads();")))
        args.append(str(racy))
    env = {**os.environ, **cuda_on_cpu.sanitizer_env(sanitize), "PYTHONPATH": str(ROOT)}
    if not Path(env["LD_PRELOAD"]).is_file():
        pytest.skip(f"g++'s {sanitize} sanitizer runtime is not installed (apt-get install libasan8 libtsan2; "
                    ".ci/run installs them)")
    dtypes = "float32" if sanitize == "thread" else "float32,float64"
    return subprocess.run([sys.executable, "-c", DRIVER, *args, dtypes], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("sanitize, control, report", [
    ("address", "smem-8", "heap-buffer-overflow"),
    ("thread", "no-barrier", "data race"),
])
def test_sanitizers_pass_and_their_controls_fail(sanitize, control, report, tmp_path):
    clean = _sanitized(sanitize, "none", tmp_path)
    assert clean.returncode == 0 and "driver done" in clean.stdout, clean.stderr[-3000:]
    assert "Sanitizer" not in clean.stderr, clean.stderr[-3000:]
    broken = _sanitized(sanitize, control, tmp_path)
    assert broken.returncode != 0 and report in broken.stderr, (broken.returncode, broken.stderr[-3000:])
