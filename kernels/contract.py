"""The preconditions of the kernels in dct.cu, checked in one place: `check_launch`.

Every launcher in cupy_dct.py calls it before it touches CuPy, and the CPU paths call it on the tensors the
pipeline would hand the kernel (`on_gpu=False`: everything but the device), so a layout the kernel refuses fails
the CPU test suite, not the first GPU run. The kernels index their inputs as dense row-major (B, C, F, H, W)
arrays of float32 or float64 (dct.cu's conventions) and load them as T, so: a torch tensor or a CuPy array, 5-D,
float32/float64, C-contiguous, element-aligned, on a CUDA device, and for DCTInit the relations between z and
noise. No torch or CuPy import here: arrays are recognised by what they carry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

KERNEL_DTYPES = {"float32": 4, "float64": 8}
KERNELS = ("dct", "dct_init")
DCT_AXES = (2, 3, 4, -3, -2, -1)


class KernelContractError(ValueError):
    """An input a kernel in dct.cu cannot take as it is; the message names the input and the fix."""


class KernelTypeError(KernelContractError, TypeError):
    """The input is of a kind or dtype the kernels do not take (a TypeError too, as Python's own)."""


@dataclass(frozen=True)
class ArrayFacts:
    """What the kernels need to know of an input, read without converting it."""

    name: str
    kind: str            # "torch" or "cupy"
    shape: tuple[int, ...]
    dtype: str
    contiguous: bool
    device: str          # "cuda:N" or "cpu"
    address: int

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")


def is_torch(x) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "is_cuda")


def array_facts(x, name: str) -> ArrayFacts:
    """Facts of a torch tensor or a CuPy-like array (one with `.device.id`, `.flags` and `.data.ptr`)."""
    if is_torch(x):
        device = str(x.device) if x.device.type != "cuda" else f"cuda:{x.device.index or 0}"
        return ArrayFacts(name, "torch", tuple(x.shape), str(x.dtype).removeprefix("torch."), x.is_contiguous(),
                          device, x.data_ptr())
    if hasattr(x, "flags") and hasattr(getattr(x, "device", None), "id") and hasattr(x, "data"):
        return ArrayFacts(name, "cupy", tuple(x.shape), str(x.dtype), bool(x.flags.c_contiguous),
                          f"cuda:{x.device.id}", int(x.data.ptr))
    raise KernelTypeError(f"{name} must be a torch tensor or a cupy array, got {type(x).__name__}; "
                              f"for numpy use cinemo_rt._kernels.reference")


def _check_one(f: ArrayFacts, on_gpu: bool) -> None:
    if len(f.shape) != 5:
        raise KernelContractError(f"{f.name} must be 5-D (B, C, F, H, W), got shape {f.shape}")
    if f.dtype not in KERNEL_DTYPES:
        raise KernelTypeError(f"{f.name} has dtype {f.dtype}; the kernels take float32 or float64: "
                                  f"cast with {f.name}.float() or {f.name}.double()")
    if not f.contiguous:
        fix = f"{f.name}.contiguous()" if f.kind == "torch" else f"cupy.ascontiguousarray({f.name})"
        raise KernelContractError(f"{f.name} (shape {f.shape}) is not contiguous: the kernels index it as a "
                                  f"dense row-major array; call {fix} first")
    if on_gpu and not f.on_cuda:
        raise KernelContractError(f"{f.name} is on {f.device}; move it to the GPU with {f.name}.cuda()")
    if math.prod(f.shape) and f.address % KERNEL_DTYPES[f.dtype]:
        raise KernelContractError(f"{f.name} starts at address {f.address:#x}, not aligned to its "
                                  f"{KERNEL_DTYPES[f.dtype]}-byte elements; pass {f.name}.clone()")


def check_launch(kernel: str, inputs: dict, *, on_gpu: bool = True, axis: int | None = None,
                 fraction: float | None = None, z_frames_one: bool = False) -> list[ArrayFacts]:
    """Raise KernelContractError unless `inputs` can be handed to `kernel` as they are.

    kernel "dct": inputs {"x": x}, `axis` one of the last three. kernel "dct_init": inputs {z_name: z,
    "noise": noise}, z (B, C, 1, H, W) or (B, C, F, H, W) (only the first when `z_frames_one`), the same
    dtype, kind and device as noise (B, C, F, H, W), `fraction` in (0, 1]. `on_gpu=False` checks everything
    but the device: the CPU stand-ins of the kernels. Returns the inputs' facts, in order."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; dct.cu has {', '.join(KERNELS)}")
    facts = [array_facts(x, name) for name, x in inputs.items()]
    for f in facts:
        _check_one(f, on_gpu)
    if kernel == "dct":
        if axis not in DCT_AXES:
            raise KernelContractError(f"axis must be one of the last three (2, 3, 4 or -3, -2, -1), got {axis}")
        return facts
    z, noise = facts
    if z.dtype != noise.dtype:
        raise KernelTypeError(f"{z.name} is {z.dtype} but noise is {noise.dtype}; cast one to the other (e.g. "
                                  f"{z.name}.to(noise.dtype)), the kernel computes in one precision")
    if z.kind != noise.kind or z.device != noise.device:
        raise KernelContractError(f"{z.name} ({z.kind} on {z.device}) and noise ({noise.kind} on {noise.device}) "
                                  f"must be the same kind of array on the same device")
    b, c, f, h, w = noise.shape
    allowed = ((b, c, 1, h, w),) if z_frames_one else ((b, c, 1, h, w), (b, c, f, h, w))
    if z.shape not in allowed:
        wanted = "(B, C, 1, H, W)" if z_frames_one else "(B, C, 1, H, W) or (B, C, F, H, W)"
        hint = "; for a per-frame z_tau use dct_init_from_z_tau" if z_frames_one else ""
        raise KernelContractError(f"{z.name} must be {wanted} with noise (B, C, F, H, W) = {noise.shape}, "
                                  f"got {z.shape}{hint}")
    if fraction is None or not 0.0 < fraction <= 1.0:
        raise KernelContractError(f"fraction must be in (0, 1], got {fraction}")
    return facts
