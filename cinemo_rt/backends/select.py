"""Choosing a backend for an engines folder, once, and saying which one was used and why."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import platform
from pathlib import Path

import torch

from ..image import InputError

log = logging.getLogger(__name__)


def open_engines(folder, backend: str, device: torch.device | None):
    """-> (backend, tokenizer) for a folder built by `python -m export.build_engines`.

    auto: TensorRT when the library, a GPU and engines for this GPU are present; ONNX Runtime otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"engines folder {str(folder)!r} does not exist; build it with "
                         "`python -m export.build_engines --checkpoint DIR --out DIR`")
    from .engines_dir import load_engines_tokenizer

    tokenizer = load_engines_tokenizer(folder)
    if backend in ("auto", "tensorrt"):
        from .tensorrt_backend import TensorRTBackend, tensorrt_unavailable_reason

        trt_device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        reason = tensorrt_unavailable_reason(folder, trt_device)
        if reason is None:
            return TensorRTBackend(folder, device=trt_device), tokenizer
        if backend == "tensorrt":
            raise InputError(f"--backend tensorrt cannot run: {reason}")
        log.info("TensorRT not used: %s; falling back to ONNX Runtime", reason)
    if backend in ("auto", "onnxruntime"):
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(folder, device=device), tokenizer
    raise InputError(f"backend {backend!r} cannot run an engines folder; use auto, tensorrt or onnxruntime")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> str | None:
    """None when `module` imports, else the reason it does not."""
    try:
        importlib.import_module(module)
        return None
    except Exception as err:  # a broken CUDA install raises more than ImportError
        return f"{type(err).__name__}: {err}"


def backend_report() -> list[str]:
    lines = [f"cinemo-rt {_version('cinemo-rt') or 'dev'} on Python {platform.python_version()}"]
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
                 "cupy-cuda12x", "cupy-cuda13x"):
        lines.append(f"  {dist:16s} {_version(dist) or '-'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("  CUDA: not available")
    lines.append("backends:")
    lines.append("  torch        usable (reference, always)")
    ort = _importable("onnxruntime")
    if ort is None:
        import onnxruntime

        lines.append(f"  onnxruntime  usable ({', '.join(onnxruntime.get_available_providers())})")
    else:
        lines.append(f"  onnxruntime  not usable: {ort}")
    trt = _importable("tensorrt")
    if trt is None and not torch.cuda.is_available():
        trt = "no CUDA GPU"
    lines.append("  tensorrt     " + ("usable" if trt is None else f"not usable: {trt}"))
    cupy = _importable("cupy")
    lines.append("  DCTInit      " + ("CUDA kernels (CuPy)" if cupy is None and torch.cuda.is_available()
                                      else "CPU float64 reference"))
    return lines
