"""CuPy launchers for the kernels in dct.cu: orthonormal DCT along one axis, and fused DCTInit.

Inputs are torch CUDA tensors or cupy arrays, shared without copies through DLPack; torch inputs give
torch outputs (allocated by torch's caching allocator) and run on torch's current stream unless a
stream is given; then the torch tensors are recorded on that stream (`record_stream`). The caller orders
the given stream after the work that produced the inputs (`stream.wait_stream(...)`). CuPy is imported lazily so that `import cinemo_rt._kernels.cupy_dct` works on CPU-only machines.

The launch geometry lives in the pure functions `gemm_plan` and `init_plan`; tests/test_kernels.py
replays the kernels' index arithmetic in numpy with the same plans, so they are checked without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from .contract import check_launch, is_torch

SOURCE = Path(__file__).with_name("dct.cu")
NVRTC_OPTIONS = ("-std=c++17",)
TILE, ROWS = 32, 8               # CINEMO_TILE, CINEMO_ROWS in dct.cu
INIT_THREADS = 256               # CINEMO_INIT_THREADS in dct.cu
MAX_GRID = 1 << 20               # both kernels grid-stride, so this only caps launch size
DEFAULT_SMEM = 48 * 1024         # dynamic shared memory available without the opt-in attribute
_SUFFIX = {"float32": "f32", "float64": "f64"}
_AXES = {2: 2, 3: 3, 4: 4, -3: 2, -2: 3, -1: 4}


# ---------------------------------------------------------------------------------------------
# Launch plans (pure, no CuPy)

@dataclass(frozen=True)
class GemmPlan:
    """C[b] = A[b] @ B[b] for dct_gemm_*; the basis is A (axis with inner > 1) or B (last axis)."""

    basis_is_a: bool
    basis_transpose: bool  # pass D_N^T instead of D_N
    lda: int
    stride_a: int
    ldb: int
    stride_b: int
    ldc: int
    stride_c: int
    m: int
    n: int
    k: int
    batch: int

    @property
    def grid(self) -> int:
        tiles = self.batch * -(-self.m // TILE) * -(-self.n // TILE)
        return max(1, min(tiles, MAX_GRID))


def gemm_plan(shape: tuple[int, ...], axis: int, inverse: bool) -> GemmPlan:
    """View a contiguous tensor as (outer, N, inner) around `axis` and map the DCT to one GEMM.

    inner > 1:  out[o] (N x inner) = D (N x N) @ x[o]        (D^T for the inverse), batch = outer
    inner == 1: out (outer x N)    = x (outer x N) @ D^T     (D for the inverse),   batch = 1
    Either way the unit-stride dimension of x is the GEMM's column dimension: coalesced.
    """
    axis %= len(shape)
    size = shape[axis]
    inner = math.prod(shape[axis + 1:])
    outer = math.prod(shape[:axis])
    if inner > 1:
        slab = size * inner
        return GemmPlan(True, inverse, size, 0, inner, slab, inner, slab, size, inner, size, outer)
    return GemmPlan(False, not inverse, size, 0, size, 0, size, 0, outer, size, size, 1)


@dataclass(frozen=True)
class InitPlan:
    """Launch of dct_init_*: one block per frame; shared memory in elements (see dct.cu)."""

    bc: int
    frames: int
    height: int
    width: int
    kh: int
    kw: int
    z_frames: int
    itemsize: int

    @property
    def smem_elements(self) -> int:  # Uh, Uw, G, Y
        h, w, kh, kw = self.height, self.width, self.kh, self.kw
        return h * kh + w * kw + h * kw + kh * kw

    @property
    def stage_elements(self) -> int:  # noise and z frames staged in shared memory
        return 2 * self.height * self.width

    def smem_bytes(self, stage: bool) -> int:
        return (self.smem_elements + (self.stage_elements if stage else 0)) * self.itemsize

    @property
    def grid(self) -> int:
        return max(1, min(self.bc * self.frames, MAX_GRID))


def init_plan(z_shape, noise_shape, fraction: float, itemsize: int) -> InitPlan:
    b, c, f, h, w = noise_shape
    return InitPlan(b * c, f, h, w, int(h * fraction), int(w * fraction), z_shape[2], itemsize)


def mix_scales(alpha_bar_tau: float) -> tuple[float, float]:
    """(sqrt(a), sqrt(1-a) - 1): out = noise + LP2(sqrt(a) z1 + (sqrt(1-a) - 1) noise), docs/METHOD.md, DCTInit.

    sqrt(1-a) - 1 is written as -a / (1 + sqrt(1-a)) to avoid cancellation (a_975 = 6.5e-5).
    """
    a = float(alpha_bar_tau)
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha_bar_tau must be in [0, 1], got {a}")
    return math.sqrt(a), -a / (1.0 + math.sqrt(1.0 - a))


# ---------------------------------------------------------------------------------------------
# CuPy plumbing

def _cupy():
    if _ARRAY_MODULE:
        return _ARRAY_MODULE[0]
    try:
        import cupy
    except ImportError as exc:
        raise RuntimeError(
            "cinemo_rt._kernels.cupy_dct needs CuPy and a CUDA GPU: pip install -e '.[cuda12]' (or '.[cuda13]'), "
            "or use the CPU reference cinemo_rt.dctinit.dct_init"
        ) from exc
    return cupy


_ARRAY_MODULE: list = []  # a stand-in for cupy, set by use_array_module (kernels/cuda_on_cpu.py)


def use_array_module(module) -> None:
    """Run the launchers on `module` instead of cupy (None: cupy again): the CPU execution of dct.cu in
    kernels/cuda_on_cpu.py provides the few cupy calls they make. Clears the compiled-module and basis caches."""
    _ARRAY_MODULE[:] = [] if module is None else [module]
    _MODULES.clear()
    _BASES.clear()


_MODULES: dict[int, object] = {}
_BASES: dict[tuple, object] = {}


def _function(name: str, device_id: int):
    """Kernel `name` from dct.cu, compiled by NVRTC once per process and device (CuPy caches on disk)."""
    cp = _cupy()
    if device_id not in _MODULES:
        with cp.cuda.Device(device_id):
            _MODULES[device_id] = cp.RawModule(code=SOURCE.read_text(), options=NVRTC_OPTIONS)
    return _MODULES[device_id].get_function(name)


def _device_id(x) -> int:
    return x.device.index if is_torch(x) else x.device.id


def _stream(stream, torch_input: bool, device_id: int):
    cp = _cupy()
    if stream is None:
        if not torch_input:
            return cp.cuda.get_current_stream()
        import torch
        return cp.cuda.ExternalStream(torch.cuda.current_stream(device_id).cuda_stream, device_id)
    if hasattr(stream, "cuda_stream"):  # torch.cuda.Stream
        return cp.cuda.ExternalStream(stream.cuda_stream, device_id)
    if isinstance(stream, int):
        return cp.cuda.ExternalStream(stream, device_id)
    return stream  # a cupy stream


def record_for_stream(tensors, stream_ptr: int, device_id: int) -> None:
    """Torch tensors allocated on torch's current stream but used by a launch on another stream: tell the caching
    allocator (`record_stream`), so their memory is not handed to new work before that stream is done with them."""
    import torch

    if stream_ptr == torch.cuda.current_stream(device_id).cuda_stream:
        return
    launch = torch.cuda.ExternalStream(stream_ptr, device=device_id)
    for tensor in tensors:
        tensor.record_stream(launch)


def _basis(n: int, dtype, transpose: bool, device_id: int, stream):
    """D_N (or D_N^T) as a device array, built by dct_basis_* once per (device, N, dtype)."""
    cp = _cupy()
    key = (device_id, n, str(dtype), transpose)
    if key not in _BASES:
        basis = cp.empty((n, n), dtype=dtype)
        kern = _function(f"dct_basis_{_SUFFIX[str(dtype)]}", device_id)
        threads = 256
        kern((max(1, min(-(-n * n // threads), MAX_GRID)),), (threads,),
             (basis, cp.int32(n), cp.int32(int(transpose))))
        stream.synchronize()  # cached arrays are shared by all streams: make the fill visible once
        _BASES[key] = basis
    return _BASES[key]


def _empty_like(x, xc, torch_input: bool, cp):
    """A fresh output of x's kind on its device: (its CuPy view, what the launcher returns)."""
    if torch_input:
        import torch

        out = torch.empty_like(x)
        return cp.from_dlpack(out), out
    out = cp.empty_like(xc)
    return out, out


# ---------------------------------------------------------------------------------------------
# Public launchers

def dct(x, axis: int, inverse: bool = False, stream=None):
    """Orthonormal DCT-II (DCT-III if inverse) of a contiguous (B, C, F, H, W) array along axis F, H or W.

    Matches scipy.fft.dct(x, type=2 or 3, axis=axis, norm="ortho"). Returns a new array of the same
    kind (torch in, torch out) on the same device, computed on `stream` (default: the caller's).
    """
    check_launch("dct", {"x": x}, axis=axis)
    axis = _AXES[axis]
    cp = _cupy()
    torch_input = is_torch(x)
    device_id = _device_id(x)
    with cp.cuda.Device(device_id):
        s = _stream(stream, torch_input, device_id)
        with s:
            xc = cp.from_dlpack(x) if torch_input else x
            out_cp, out = _empty_like(x, xc, torch_input, cp)
            if torch_input:
                record_for_stream((x, out), s.ptr, device_id)
            if xc.size == 0:
                return out
            plan = gemm_plan(tuple(xc.shape), axis, inverse)
            basis = _basis(xc.shape[axis], xc.dtype, plan.basis_transpose, device_id, s)
            a, b = (basis, xc) if plan.basis_is_a else (xc, basis)
            i64, i32 = cp.int64, cp.int32
            kern = _function(f"dct_gemm_{_SUFFIX[str(xc.dtype)]}", device_id)
            kern((plan.grid,), (TILE, ROWS),
                 (a, i64(plan.lda), i64(plan.stride_a), b, i64(plan.ldb), i64(plan.stride_b),
                  out_cp, i64(plan.ldc), i64(plan.stride_c), i32(plan.m), i32(plan.n), i32(plan.k),
                  i64(plan.batch)))
    return out


def _dct_mix(z, noise, fraction: float, z_scale: float, noise_scale: float, stream, z_name: str):
    """out = noise + LP2(z_scale * z + noise_scale * noise), LP2 the per-frame 2D box low-pass."""
    check_launch("dct_init", {z_name: z, "noise": noise}, fraction=fraction, z_frames_one=z_name == "z1")
    b, c, f, h, w = noise.shape
    cp = _cupy()
    torch_input = is_torch(noise)
    device_id = _device_id(noise)
    with cp.cuda.Device(device_id):
        s = _stream(stream, torch_input, device_id)
        with s:
            zc = cp.from_dlpack(z) if torch_input else z
            xc = cp.from_dlpack(noise) if torch_input else noise
            out_cp, out = _empty_like(noise, xc, torch_input, cp)
            if torch_input:
                record_for_stream((z, noise, out), s.ptr, device_id)
            if xc.size == 0:
                return out
            plan = init_plan(tuple(zc.shape), tuple(xc.shape), fraction, xc.dtype.itemsize)
            kern = _function(f"dct_init_{_SUFFIX[str(xc.dtype)]}", device_id)
            limit = cp.cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"]
            stage = plan.smem_bytes(True) <= limit
            smem = plan.smem_bytes(stage)
            if smem > limit:
                raise ValueError(f"frame {h}x{w} with mask {plan.kh}x{plan.kw} needs {smem} B of shared "
                                 f"memory, over the device limit {limit} B; lower fraction")
            if smem > DEFAULT_SMEM:
                kern.max_dynamic_shared_size_bytes = smem
            scalar = cp.float32 if xc.dtype == cp.float32 else cp.float64
            i32 = cp.int32
            kern((plan.grid,), (INIT_THREADS,),
                 (zc, i32(plan.z_frames), xc, out_cp, cp.int64(plan.bc), i32(f), i32(h), i32(w),
                  i32(plan.kh), i32(plan.kw), scalar(z_scale), scalar(noise_scale), i32(int(stage))),
                 shared_mem=smem)
    return out


def dct_init_cuda(z1, noise, alpha_bar_tau, fraction: float = 0.23, stream=None):
    """DCTInit (docs/METHOD.md, DCTInit) in one fused kernel; same contract as cinemo_rt.dctinit.dct_init.

    z1 (B, C, 1, H, W), noise (B, C, F, H, W), same dtype (float32/float64) and device. Returns
    idct_3d(dct_3d(z_tau) * M + dct_3d(noise) * (1 - M)) with z_tau = sqrt(a) z1 + sqrt(1 - a) noise
    and M the box [:int(H*fraction), :int(W*fraction)] over all temporal frequencies. Pass
    alpha_bar_tau as a Python float: a CUDA tensor costs a device sync for float().
    """
    z_scale, noise_scale = mix_scales(alpha_bar_tau)
    return _dct_mix(z1, noise, fraction, z_scale, noise_scale, stream, "z1")


def dct_init_from_z_tau(z_tau, noise, fraction: float = 0.23, stream=None):
    """The same mix from an already-noised z_tau (B, C, F, H, W) (or (B, C, 1, H, W))."""
    return _dct_mix(z_tau, noise, fraction, 1.0, -1.0, stream, "z_tau")
