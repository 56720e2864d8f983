"""dct.cu executed on the CPU, through the real launchers of cupy_dct.py.

`build()` compiles dct.cu unchanged as C++ with g++ (cuda_on_cpu.h: threadIdx/blockIdx thread-local, one OS
thread per CUDA thread of a block, __syncthreads a std::barrier, dynamic shared memory a NaN-filled buffer of
exactly the launch's size, blocks in turn; cuda_on_cpu.cpp: a cudaLaunchKernel-like entry point). `STAND_IN` is
the few cupy calls the launchers make, over host memory; `installed()` hands it to cupy_dct, so
`cupy_dct.dct(DeviceArray)` runs the same plans, argument lists and shared-memory sizes as on a GPU.
`dct_init_cpu` is DCTInit for torch CPU tensors through that path (`CINEMO_RT_DCTINIT=cuda-on-cpu`).

Sanitizer builds: `CINEMO_CUDA_ON_CPU_SANITIZE=address` or `thread` (the process must preload the runtime,
`sanitizer_env`). What this cannot show: the GPU's memory model beyond barriers (warps, bank conflicts, L2),
NVRTC's compiler, float contraction and `cospi` as the device computes them, speed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import cupy_dct
from .contract import check_launch

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "dct.cu"
SANITIZE_ENV = "CINEMO_CUDA_ON_CPU_SANITIZE"
SANITIZERS = {"address": "libasan.so", "thread": "libtsan.so"}
DEFAULT_SHARED = cupy_dct.DEFAULT_SMEM   # CUDA's dynamic shared memory without the opt-in attribute
OPT_IN_SHARED = 227 * 1024               # an H100's opt-in limit per block
_DYNAMIC_SHARED = re.compile(r"extern\s+__shared__\s+(\w+)\s+(\w+)\s*\[\s*\]")


class BuildError(RuntimeError):
    """The kernel source did not compile as C++ (or no C++20 compiler is installed)."""


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise BuildError("no C++ compiler: install g++ (12 or later, for std::barrier), or set CXX")
    return cxx


def _flags(source: Path, sanitize: str | None) -> list[str]:
    text = source.read_text()
    declared = _DYNAMIC_SHARED.findall(text)
    flags = ["-std=c++20", "-shared", "-fPIC", "-pthread", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
             "-Wno-unused-parameter", f"-DCINEMO_KERNEL_SOURCE=\"{source}\"", f"-I{HERE}"]
    if len(declared) > 1:
        raise BuildError(f"{source} declares {len(declared)} dynamic shared arrays; CUDA gives a kernel one")
    for kind, name in declared:
        flags += [f"-DCINEMO_SHARED_TYPE={kind}", f"-D{name}=(*CINEMO_DYNAMIC_SHARED())"]
    if sanitize is None:
        return flags + ["-O2"]
    if sanitize not in SANITIZERS:
        raise ValueError(f"sanitize must be one of {', '.join(SANITIZERS)}, got {sanitize!r}")
    return flags + ["-O1", "-g", f"-fsanitize={sanitize}", "-fno-omit-frame-pointer"]


def build(source: Path = SOURCE, sanitize: str | None = None, cache: Path | None = None) -> Path:
    """The shared library of `source` (default dct.cu) on the CPU, built once per content and flags (a cached
    file named by their hash, written to a temporary name and renamed)."""
    flags = _flags(Path(source).resolve(), sanitize)
    harness = [HERE / "cuda_on_cpu.h", HERE / "cuda_on_cpu.cpp"]
    digest = hashlib.sha256("\0".join([compiler(), *flags, *(p.read_text() for p in [*harness, Path(source)])])
                            .encode()).hexdigest()[:16]
    cache = cache or cache_dir()
    library = cache / f"{Path(source).stem}-{sanitize or 'plain'}-{digest}.so"
    if library.exists():
        return library
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
    os.close(fd)
    command = [compiler(), *flags, str(HERE / "cuda_on_cpu.cpp"), "-o", tmp]
    log.info("compiling %s for the CPU: %s", source, " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"{source} did not compile as C++:\n{done.stderr[-4000:]}")
    os.replace(tmp, library)
    return library


def sanitizer_env(sanitize: str) -> dict[str, str]:
    """Environment for a Python process that loads a `sanitize` build: the runtime preloaded, leaks off
    (CPython's own allocations are not this code's), the build selected."""
    runtime = subprocess.run([compiler(), f"-print-file-name={SANITIZERS[sanitize]}"], capture_output=True,
                             text=True, check=True).stdout.strip()
    return {"LD_PRELOAD": runtime, SANITIZE_ENV: sanitize, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
            "TSAN_OPTIONS": "halt_on_error=1:report_signal_unsafe=0"}


# ---------------------------------------------------------------------------------------------------------
# The stand-in for cupy: device arrays in host memory, kernels from the CPU library

class DeviceArray:
    """A cupy-like array over host memory: what the launchers read (shape, dtype, size, flags, device, data.ptr)."""

    def __init__(self, host: np.ndarray):
        self.host = host
        self.shape, self.dtype, self.size, self.flags = host.shape, host.dtype, host.size, host.flags
        self.device = SimpleNamespace(id=0)
        self.data = SimpleNamespace(ptr=host.ctypes.data)

    def get(self) -> np.ndarray:
        return self.host


_SCALARS = {np.dtype(np.int32): ctypes.c_int32, np.dtype(np.int64): ctypes.c_int64,
            np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


class Kernel:
    """One kernel of the library, called as a cupy RawKernel: kernel(grid, block, args, shared_mem=0)."""

    def __init__(self, library: ctypes.CDLL, name: str):
        self.library, self.name = library, name
        self.max_dynamic_shared_size_bytes = DEFAULT_SHARED

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        if shared_mem > self.max_dynamic_shared_size_bytes:  # CUDA refuses the launch the same way
            raise RuntimeError(f"{self.name}: {shared_mem} B of dynamic shared memory without the opt-in "
                               f"attribute (max_dynamic_shared_size_bytes = {self.max_dynamic_shared_size_bytes})")
        values = []
        for arg in args:
            if isinstance(arg, DeviceArray):
                values.append(ctypes.c_void_p(arg.data.ptr))
            elif isinstance(arg, np.generic) and arg.dtype in _SCALARS:
                values.append(_SCALARS[arg.dtype](arg.item()))
            else:  # cupy too wants typed scalars for a kernel whose parameters are not all int
                raise TypeError(f"{self.name}: argument {arg!r} is not a device array or a typed numpy scalar")
        pointers = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                     for v in values))
        g, b = (tuple(grid) + (1, 1))[:3], (tuple(block) + (1, 1))[:3]
        rc = self.library.cinemo_cpu_launch(self.name.encode(), *g, *b, ctypes.c_size_t(shared_mem), pointers)
        if rc:
            raise RuntimeError(f"{self.name}: launch refused (code {rc}) for grid {g}, block {b}")


class RawModule:
    """cupy.RawModule: the code the launcher hands over (dct.cu's text), compiled for the CPU instead."""

    def __init__(self, code: str, options=()):
        del options  # NVRTC's; the C++ build has its own (`_flags`)
        self._library = _library(code)

    def get_function(self, name: str) -> Kernel:
        return Kernel(self._library, name)


class _Stream:
    ptr = 0

    def synchronize(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Device:
    attributes = {"MaxSharedMemoryPerBlockOptin": OPT_IN_SHARED}

    def __init__(self, device_id: int = 0):
        if device_id != 0:
            raise ValueError(f"the CPU stand-in has one device, 0; got {device_id}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _empty(shape, dtype) -> DeviceArray:
    return DeviceArray(np.empty(shape, dtype=dtype))


STAND_IN = SimpleNamespace(
    int32=np.int32, int64=np.int64, float32=np.float32, float64=np.float64, RawModule=RawModule,
    empty=_empty, empty_like=lambda x: _empty(x.shape, x.dtype),
    cuda=SimpleNamespace(Device=_Device, get_current_stream=_Stream, ExternalStream=lambda ptr, device_id=0: _Stream()),
)

_LOADED: dict[tuple, ctypes.CDLL] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    folder = Path(tempfile.gettempdir()) / f"cinemo-rt-cuda-on-cpu-{os.getuid()}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _library(code: str) -> ctypes.CDLL:
    """The CPU library of kernel source `code`, built once per content and sanitizer and loaded once."""
    sanitize = os.environ.get(SANITIZE_ENV) or None
    key = (sanitize, hashlib.sha256(code.encode()).hexdigest()[:16])
    with _LOCK:
        if key not in _LOADED:
            source = cache_dir() / f"kernel-{key[1]}.cu"
            if not source.exists():
                fd, tmp = tempfile.mkstemp(dir=source.parent, suffix=".cu.tmp")
                with os.fdopen(fd, "w") as f:
                    f.write(code)
                os.replace(tmp, source)
            library = ctypes.CDLL(str(build(source, sanitize)))
            library.cinemo_cpu_launch.restype = ctypes.c_int
            library.cinemo_cpu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [
                ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p)]
            _LOADED[key] = library
        return _LOADED[key]


_RUNNING = threading.Lock()  # the launchers' caches are per process: one CPU execution at a time


@contextlib.contextmanager
def installed():
    """cupy_dct's launchers on the CPU stand-in for the duration (then on cupy again)."""
    with _RUNNING:
        cupy_dct.use_array_module(STAND_IN)
        try:
            yield STAND_IN
        finally:
            cupy_dct.use_array_module(None)


def to_device(x: np.ndarray) -> DeviceArray:
    """A numpy array as a stand-in device array, sharing its memory (so its layout reaches the contract)."""
    return DeviceArray(x)


def dct(x: np.ndarray, axis: int, inverse: bool = False) -> np.ndarray:
    with installed():
        return cupy_dct.dct(to_device(x), axis, inverse).get()


def dct_init(z1: np.ndarray, noise: np.ndarray, alpha_bar_tau: float, fraction: float = 0.23) -> np.ndarray:
    with installed():
        return cupy_dct.dct_init_cuda(to_device(z1), to_device(noise), alpha_bar_tau, fraction).get()


def dct_init_from_z_tau(z_tau: np.ndarray, noise: np.ndarray, fraction: float = 0.23) -> np.ndarray:
    with installed():
        return cupy_dct.dct_init_from_z_tau(to_device(z_tau), to_device(noise), fraction).get()


def dct_init_cpu(z1, noise, alpha_bar_tau, fraction: float = 0.23):
    """DCTInit of torch CPU tensors through the kernel path: the contract on the tensors as handed over, then
    dct_init_cuda's launcher on the CPU-executed kernel. Same contract as cinemo_rt.dctinit.dct_init."""
    import torch

    check_launch("dct_init", {"z1": z1, "noise": noise}, on_gpu=False, fraction=fraction, z_frames_one=True)
    out = dct_init(z1.detach().numpy(), noise.detach().numpy(), float(alpha_bar_tau), fraction)
    return torch.from_numpy(out)


def self_check(shape=(1, 4, 16, 40, 64)) -> list[str]:
    """dct (every axis, both directions; float32) and DCTInit (float32 and float64) of dct.cu run on the CPU at
    `shape`, against the float64 reference: the lines to print, the last one the verdict."""
    from . import reference

    rng = np.random.default_rng(0)
    lines, worst = [], {}
    for dtype, tolerance in ((np.float32, 1e-5), (np.float64, 1e-12)):
        x = rng.standard_normal(shape).astype(dtype)
        z1 = rng.standard_normal((*shape[:2], 1, *shape[3:])).astype(dtype)
        results = {f"dct axis {axis}{' inverse' if inverse else ''}": (dct(x, axis, inverse),
                                                                      reference.dct(x.astype(np.float64), axis, inverse))
                   for axis in (2, 3, 4) for inverse in (False, True) if dtype == np.float32}  # fp64: same code
        results["dct_init"] = (dct_init(z1, x, 6.5173e-5), reference.dct_init(z1, x, 6.5173e-5))
        for name, (ours, ref) in results.items():
            error = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
            lines.append(f"{np.dtype(dtype).name} {name}: relative L2 {error:.2e} (tolerance {tolerance:.0e})")
            worst[(np.dtype(dtype).name, name)] = error / tolerance
    bad = [f"{d} {n}" for (d, n), ratio in worst.items() if not ratio <= 1.0]
    lines.append(f"dct.cu on the CPU at {shape}: " + ("all within tolerance" if not bad else "FAILED: " + ", ".join(bad)))
    return lines


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    lines = self_check()
    print("\n".join(lines))
    return 0 if lines[-1].endswith("all within tolerance") else 1


if __name__ == "__main__":
    raise SystemExit(main())
