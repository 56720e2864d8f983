"""The ONNX Runtime backend: the exported graphs of an engines folder, one session per graph.

Sessions are created once, at construction; on the CPU from the optimised graph a previous session saved
(`ort_cache`). With onnxruntime-gpu and a CUDA device the CUDA execution
provider runs them and torch CUDA tensors are bound by pointer (IO binding, no host round trip);
otherwise the CPU provider runs them on numpy views. Each runner's ports come from the session's own input
metadata, so `Backend.run` checks every feed (names, rank, dtype, static dims) before it runs.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..graphs import GRAPHS
from ..manifest import EnginesDirError
from .base import Backend, Port
from .engines_dir import EnginesDir, as_engines_dir
from .ort_cache import create_session

log = logging.getLogger(__name__)

_ORT_TO_TORCH = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bfloat16)": torch.bfloat16,
}
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
       torch.float64: np.float64}


def session_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unfoldable CastLike etc. are noise here
    options.intra_op_num_threads = torch.get_num_threads()  # the thread policy's choice (cinemo_rt.threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OrtRunner:
    """One ONNX Runtime session with its I/O metadata: load once, infer by name."""

    def __init__(self, path: Path, providers: list, device: torch.device, graph_sha256: str | None = None):
        self.device = device
        try:
            self.session, self.cache = create_session(path, graph_sha256, providers, session_options)
        except Exception as err:  # onnxruntime's InvalidProtobuf, Fail, NoSuchFile, ...
            raise EnginesDirError(f"ONNX Runtime cannot load {path} ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}); rebuild the engines "
                                  "folder") from err
        self.inputs = tuple(Port(i.name, _ORT_TO_TORCH[i.type], tuple(i.shape)) for i in self.session.get_inputs())
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.io_binding = device.type == "cuda"

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.io_binding:
            return self._run_bound(feeds)
        arrays = {k: v.detach().cpu().contiguous().numpy() for k, v in feeds.items()}
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in self.session.run(None, arrays))

    def _run_bound(self, feeds: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        binding = self.session.io_binding()
        index = self.device.index or 0
        keep = []
        for port in self.inputs:
            x = feeds[port.name].to(self.device).contiguous()
            keep.append(x)
            binding.bind_input(port.name, "cuda", index, _NP[port.dtype], list(x.shape), x.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", index)
        self.session.run_with_iobinding(binding)
        # ORT-allocated outputs reach torch through DLPack (no copy).
        return tuple(torch.from_dlpack(o.to_dlpack()) if hasattr(o, "to_dlpack")
                     else torch.from_numpy(o.numpy()).to(self.device) for o in binding.get_outputs())


def providers_for(device: torch.device | None) -> tuple[list, torch.device]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    want_cuda = device is None or device.type == "cuda"
    if want_cuda and "CUDAExecutionProvider" in available and torch.cuda.is_available():
        device = device if device is not None else torch.device("cuda", 0)
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"], device
    if device is not None and device.type == "cuda":
        raise EnginesDirError("device cuda asked for, but onnxruntime has no CUDAExecutionProvider here "
                              f"(providers: {available}); install onnxruntime-gpu or use device='cpu'")
    return ["CPUExecutionProvider"], torch.device("cpu")


class OnnxRuntimeBackend(Backend):
    def __init__(self, engines: str | os.PathLike | EnginesDir, device: str | torch.device | None = None,
                 precision: str | None = None):
        engines = as_engines_dir(engines)
        self.engines_dir, self.manifest = engines.folder, engines.manifest
        built = self.manifest.precision
        if precision is not None and precision != built:
            raise EnginesDirError(f"{engines.folder} was built in {built}, not {precision}; rebuild with "
                                  f"--precision {precision} or pass precision=None")
        self.precision = built
        providers, device = providers_for(torch.device(device) if device is not None else None)
        hashes = self.manifest.onnx_hashes()
        t0 = time.perf_counter()
        runners = {name: OrtRunner(engines.onnx_path(name), providers, device, hashes.get(name)) for name in GRAPHS}
        super().__init__("onnxruntime", runners, device, self.manifest.info)
        log.info("onnxruntime backend: %s, %s, providers %s; sessions in %.1f s (%s)", engines.folder, built,
                 runners["unet"].session.get_providers(), time.perf_counter() - t0,
                 ", ".join(f"{name} {r.cache}" for name, r in runners.items()))

    @staticmethod
    def unavailable_reason(engines: EnginesDir, device: torch.device | None) -> str | None:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as err:
            return f"onnxruntime does not import ({err}); pip install 'cinemo-rt[onnx]'"
        return None
