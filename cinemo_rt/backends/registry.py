"""The one list of backends: it drives `--backend` choices, `cinemo-rt info` and the choice of a backend for
a folder, made once and logged with the reason. Adding a backend is a module plus one line in BACKENDS.
torch and the backends themselves are imported only when a folder is opened (the CLI reads the list first)."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendEntry:
    name: str
    source: str  # what it opens: "checkpoint" (a folder in the released layout) or "engines" (exported graphs)
    module: str  # the module's dotted path; imported only when chosen or reported
    cls: str
    summary: str
    requires: str | None = None  # a module that must import for the backend to be usable


BACKENDS: dict[str, BackendEntry] = {e.name: e for e in (
    BackendEntry("torch", "checkpoint", f"{__package__}.torch_backend", "TorchBackend", "PyTorch reference"),
    BackendEntry("torch-fast", "checkpoint", f"{__package__}.fast_torch", "FastTorchBackend",
                 "optimised PyTorch path (not yet measured on a GPU)"),
    BackendEntry("tensorrt", "engines", f"{__package__}.tensorrt_backend", "TensorRTBackend", "TensorRT engines",
                 "tensorrt"),
    BackendEntry("onnxruntime", "engines", f"{__package__}.onnxruntime_backend", "OnnxRuntimeBackend",
                 "ONNX Runtime", "onnxruntime"),
)}
# "auto", per source, in order of preference: the first usable one runs. The fast path becomes the CUDA
# default for checkpoints once measured on a GPU.
AUTO = {"checkpoint": ("torch",), "engines": ("tensorrt", "onnxruntime")}
CHOICES = ("auto", *BACKENDS)


def backend_class(name: str):
    entry = BACKENDS[name]
    return getattr(importlib.import_module(entry.module), entry.cls)


def _check_choice(backend: str, source: str) -> None:
    if backend == "auto":
        return
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {', '.join(CHOICES)}")
    if BACKENDS[backend].source != source:
        other = "a checkpoint folder (--checkpoint DIR)" if source == "engines" else \
            "an engines folder (--engines DIR, built by `python -m export.build_engines`)"
        raise InputError(f"backend {backend!r} runs {other}")


# ---------------------------------------------------------------------------------------------
# Opening a folder
# ---------------------------------------------------------------------------------------------
def resolve_device(device):
    import torch

    from .. import validate

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(validate.device_name(str(device)))
    except (ValueError, RuntimeError) as err:
        raise InputError(f"unknown device {str(device)!r}; use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device} was asked for but CUDA is not available; use --device cpu")
    return device


DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "bf16": "bfloat16",
          "bfloat16": "bfloat16"}


def resolve_dtype(dtype, device):
    import torch

    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32  # fp16 as the original, on GPUs
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16")
    return getattr(torch, DTYPES[dtype])


def open_checkpoint(folder, backend: str = "auto", device=None, dtype=None, **load_options):
    """-> (backend, tokenizer) over a checkpoint folder in the released layout."""
    from ..checkpoint import load_checkpoint

    _check_choice(backend, "checkpoint")
    name = AUTO["checkpoint"][0] if backend == "auto" else backend
    device = resolve_device(device)
    checkpoint = load_checkpoint(folder, device=device, dtype=resolve_dtype(dtype, device), **load_options)
    return backend_class(name)(checkpoint), checkpoint.text_encoder.tokenizer


def open_engines(folder, backend: str = "auto", device=None):
    """-> (backend, tokenizer) for a folder built by `python -m export.build_engines`: the first backend in
    AUTO["engines"] that can run it, or the one asked for (with the reason when it cannot)."""
    _check_choice(backend, "engines")
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"engines folder {str(folder)!r} does not exist; build it with "
                         "`python -m export.build_engines --checkpoint DIR --out DIR`")
    from .engines_dir import EnginesDir

    engines = EnginesDir.open(folder)  # the manifest, read and checked once
    # device None stays None: each engine backend picks what it can run on (ORT without its CUDA provider
    # runs on the CPU even where a GPU exists).
    device = None if device is None else resolve_device(device)
    candidates = AUTO["engines"] if backend == "auto" else (backend,)
    for name in candidates:
        cls = backend_class(name)
        reason = cls.unavailable_reason(engines, device)
        if reason is None:
            return cls(engines, device=device), engines.tokenizer()
        if backend != "auto":
            raise InputError(f"--backend {name} cannot run: {reason}")
        log.info("%s not used: %s", name, reason)
    raise InputError(f"no backend can run {folder}")


# ---------------------------------------------------------------------------------------------
# `cinemo-rt info`
# ---------------------------------------------------------------------------------------------
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
    import torch

    lines = [f"cinemo-rt {_version('cinemo-rt') or 'dev'} on Python {platform.python_version()}"]
    for dist in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt",
                 "cupy-cuda12x", "cupy-cuda13x"):
        lines.append(f"  {dist:16s} {_version(dist) or '-'}")
    cuda = torch.cuda.is_available()
    if cuda:
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("  CUDA: not available")
    lines.append("backends:")
    for entry in BACKENDS.values():
        problem = _importable(entry.requires) if entry.requires else None
        if problem is None and entry.name == "tensorrt" and not cuda:
            problem = "no CUDA GPU"
        if problem is None and entry.name == "onnxruntime":
            import onnxruntime

            status = f"usable ({', '.join(onnxruntime.get_available_providers())})"
        else:
            status = "usable" if problem is None else f"not usable: {problem}"
        lines.append(f"  {entry.name:12s} {status} - {entry.summary}, runs {entry.source} folders")
    cupy = _importable("cupy")
    lines.append("  DCTInit      " + ("CUDA kernels (CuPy)" if cupy is None and cuda else "CPU float64 reference"))
    return lines
