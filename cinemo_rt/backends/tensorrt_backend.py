"""The TensorRT backend: one engine per exported component, run with `execute_async_v3`.

Lifecycle (TensorRT demo/Diffusion's: export, optimise, build, load, run): `export/tensorrt_build.py` builds
the engines and the build records each in the folder's manifest (`cinemo_rt.manifest`: keys, platform,
selection, hashes); this file is the runner and the CUDA graph:

1. asks the manifest for the engine of every graph whose key matches this machine (TensorRT version, GPU
   name, compute capability) and the exported ONNX graph, or says why none does
   (`tensorrt_unavailable_reason`, so `--backend auto` can fall back to ONNX Runtime);
2. deserialises each engine once, checks its file hash and its I/O names and dtypes against the manifest;
3. creates one execution context per engine with user-managed activation memory, all pointing at one shared
   buffer as large as the largest engine needs (the components run one after another on one stream);
4. binds torch CUDA tensors by tensor name (`set_input_shape`, `set_tensor_address`) and enqueues on the
   backend's own stream, ordered after the caller's stream and before its next work by events (on the legacy
   default stream TensorRT would synchronise every call), so nothing here synchronises the host;
5. optionally captures the UNet call in a CUDA graph (static shapes only) and replays it every step.

Profile selection and dtype names are pure Python, unit-tested on CPU; `tensorrt` is imported lazily.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..manifest import (
    TORCH_DTYPE_NAMES, EngineEntry, EngineMismatchError, EnginesDirError, Platform, Profile, Shape, rebuild_hint,
    verify_engine_file,
)
from .base import Backend, Port
from .engines_dir import EnginesDir, as_engines_dir

log = logging.getLogger(__name__)

MIN_TENSORRT_MAJOR = 10  # the named-tensor API (execute_async_v3, set_tensor_address) and INT64 I/O

# TensorRT DataType member names -> torch dtypes (`trt.DataType.HALF.name == "HALF"`).
TRT_DTYPE_NAMES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
    "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
}


class ShapeError(ValueError):
    """A call's input shapes fall outside every optimisation profile of an engine."""


# -------------------------------------------------------------------------------------------------
# Profiles
# -------------------------------------------------------------------------------------------------
def profile_is_static(profile: Profile) -> bool:
    return all(lo == opt == hi for lo, opt, hi in profile.values())


def profile_contains(profile: Profile, shapes: Mapping[str, Shape]) -> bool:
    """True when every input named by the profile has a shape inside its [min, max] box."""
    for name, (lo, _, hi) in profile.items():
        shape = tuple(shapes.get(name, ()))
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            return False
    return True


def select_profile(profiles: Sequence[Profile], shapes: Mapping[str, Shape]) -> int:
    """Index of the profile to run `shapes` with: one whose opt shapes are exactly these (the fastest
    kernels were chosen for them), else the first whose [min, max] box holds them."""
    shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    for index, profile in enumerate(profiles):
        if all(shapes.get(name) == tuple(opt) for name, (_, opt, _) in profile.items()):
            return index
    for index, profile in enumerate(profiles):
        if profile_contains(profile, shapes):
            return index
    described = "; ".join(describe_profile(p) for p in profiles) or "none"
    got = ", ".join(f"{n}={_dims(s)}" for n, s in shapes.items())
    raise ShapeError(f"input shapes {got} are outside every optimisation profile of this engine ({described}); "
                     "build a dynamic or matching profile with `python -m export.build_engines --targets tensorrt "
                     "--trt-dynamic` or pass the sizes the engines were built for")


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def describe_profile(profile: Profile) -> str:
    parts = []
    for name, (lo, opt, hi) in profile.items():
        parts.append(f"{name}={_dims(opt)}" if lo == opt == hi else f"{name}={_dims(lo)}..{_dims(opt)}..{_dims(hi)}")
    return ",".join(parts)


# -------------------------------------------------------------------------------------------------
# Availability (no engine is deserialised here)
# -------------------------------------------------------------------------------------------------
def _import_tensorrt():
    import tensorrt  # noqa: PLC0415  (lazy: the library is absent where this project is built and tested)

    return tensorrt


def current_platform(device: torch.device) -> Platform:
    trt = _import_tensorrt()
    props = torch.cuda.get_device_properties(device)
    return Platform(str(trt.__version__), str(props.name), f"{props.major}.{props.minor}")


def tensorrt_unavailable_reason(engines: str | os.PathLike | EnginesDir, device: torch.device | None) -> str | None:
    """None when TensorRT can run the engines of the folder on `device` (None: the current CUDA device);
    otherwise why not, in one line."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type != "cuda":
        return f"TensorRT runs on CUDA devices only (device is {device})"
    if not torch.cuda.is_available():
        return "no CUDA GPU is available"
    try:
        trt = _import_tensorrt()
    except Exception as err:  # a broken CUDA install raises more than ImportError
        return f"the tensorrt Python package does not import ({type(err).__name__}: {err}); pip install 'tensorrt>=10,<11'"
    major = int(str(trt.__version__).split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        return f"TensorRT {trt.__version__} is too old: the engines need TensorRT {MIN_TENSORRT_MAJOR} or newer"
    try:
        engines = as_engines_dir(engines)
        if not engines.manifest.engines:
            return (f"{engines.folder} holds no TensorRT engines; build them with "
                    "`python -m export.build_engines --targets onnx,tensorrt`")
        platform = current_platform(device)
        _, problems = engines.manifest.select_engines(platform)
        if problems:
            return f"{'; '.join(problems)} (this machine: {platform.describe()}); {rebuild_hint(engines.folder)}"
        return None
    except EnginesDirError as err:  # manifest.json missing or malformed, an engine that does not match
        return str(err)


# -------------------------------------------------------------------------------------------------
# The backend (needs tensorrt and a CUDA GPU)
# -------------------------------------------------------------------------------------------------
def torch_dtype_of(trt_dtype) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype)).split(".")[-1]
    if name not in TRT_DTYPE_NAMES:
        raise EngineMismatchError(f"engine tensor of TensorRT type {name} has no torch equivalent here")
    return TRT_DTYPE_NAMES[name]


class _TrtLogger:
    """Built lazily so that importing this module never needs tensorrt."""

    instance = None

    @classmethod
    def get(cls, trt):
        if cls.instance is None:
            cls.instance = trt.Logger(trt.Logger.WARNING)
        return cls.instance


def enqueue_ordered(stream, caller, enqueue) -> None:
    """Run `enqueue()` (work on `stream`) after the caller's pending work and before its next, by events
    (`wait_stream` records an event and waits on it, on the device): no host synchronisation. The caller's
    tensors handed in stay valid: they are freed on the caller's stream, which waits for `stream` first."""
    stream.wait_stream(caller)
    enqueue()
    caller.wait_stream(stream)


class EngineRunner:
    """One deserialised engine and its one execution context, run by tensor name on its own stream (one
    stream shared by all engines of a backend: they share activation memory)."""

    def __init__(self, trt, runtime, path: Path, entry: EngineEntry, device: torch.device, folder, stream=None):
        self.trt, self.entry, self.device = trt, entry, device
        self.stream = stream if stream is not None else torch.cuda.Stream(device)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialise {path} (corrupt, or built by another "
                                      f"TensorRT version or for another GPU); {rebuild_hint(folder)}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype_of(self.engine.get_tensor_dtype(n)) for n in names}
        recorded = {**entry.inputs, **entry.outputs}
        found = {n: TORCH_DTYPE_NAMES.get(self.dtypes[n], str(self.dtypes[n])) for n in names}
        if set(inputs) != set(entry.inputs) or set(self.output_names) != set(entry.outputs) or found != recorded:
            raise EngineMismatchError(f"{path} has tensors {found}, the manifest records {recorded}; "
                                      f"{rebuild_hint(folder)}")
        # -1 marks a dynamic axis in the engine's shapes, as in Port dims.
        self.inputs = tuple(Port(n, self.dtypes[n], tuple(int(d) for d in self.engine.get_tensor_shape(n)))
                            for n in inputs)
        self.profiles = entry.profiles
        if len(self.profiles) != self.engine.num_optimization_profiles:
            raise EngineMismatchError(f"{path} has {self.engine.num_optimization_profiles} optimisation profiles, "
                                      f"the manifest records {len(self.profiles)}; {rebuild_hint(folder)}")
        # USER_MANAGED: no activation memory of its own; `bind_activation_memory` points it at the shared one.
        self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        self.profile_index = 0

    @property
    def activation_bytes(self) -> int:
        # device_memory_size_v2 (10.1+) accounts for weight streaming; 10.0 only has device_memory_size.
        size = getattr(self.engine, "device_memory_size_v2", None)
        return int(size if size is not None else self.engine.device_memory_size)

    def bind_activation_memory(self, memory: torch.Tensor) -> None:
        if hasattr(self.context, "set_device_memory"):  # setDeviceMemoryV2(memory, size), TensorRT 10.1+
            self.context.set_device_memory(memory.data_ptr(), memory.numel())
        else:
            self.context.device_memory = memory.data_ptr()

    def prepare(self, feeds: Mapping[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Set shapes and addresses for `feeds` (on the device, contiguous, in the engine's dtypes) and
        allocate outputs; returns the outputs. Host-side calls only: nothing waits for the GPU."""
        shapes = {name: tuple(t.shape) for name, t in feeds.items()}
        index = select_profile(self.profiles, shapes)
        if index != self.profile_index:
            if not self.context.set_optimization_profile_async(index, stream.cuda_stream):
                raise RuntimeError(f"TensorRT refused optimisation profile {index} of {self.entry.component}")
            self.profile_index = index
        for port in self.inputs:
            tensor = feeds[port.name]
            if not self.context.set_input_shape(port.name, tuple(tensor.shape)):
                raise ShapeError(f"TensorRT refused shape {_dims(tensor.shape)} for {self.entry.component}.{port.name}")
            self.context.set_tensor_address(port.name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def contiguous(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {p.name: feeds[p.name].to(self.device, p.dtype).contiguous() for p in self.inputs}

    def enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.entry.component} (see the TensorRT log above)")

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        caller = torch.cuda.current_stream(self.device)  # the pipeline's stream
        outputs = self.prepare(self.contiguous(feeds), self.stream)  # outputs are allocated on the caller's stream
        enqueue_ordered(self.stream, caller, lambda: self.enqueue(self.stream))
        return tuple(outputs[name] for name in self.output_names)


class UNetGraph:
    """The UNet enqueue captured once in a CUDA graph per input-shape signature (static profiles only),
    replayed every denoising step: the step's inputs are copied into the graph's own buffers (device to
    device, on the stream), so the loop launches one graph instead of hundreds of kernels."""

    def __init__(self, runner: EngineRunner):
        self.runner = runner
        self.inputs = runner.inputs
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, dict]] = {}

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        feeds = self.runner.contiguous(feeds)
        signature = tuple((n, tuple(t.shape)) for n, t in feeds.items())
        if signature not in self.graphs:
            self.graphs[signature] = self._capture(feeds)
        graph, static_in, static_out = self.graphs[signature]
        for name, tensor in feeds.items():
            static_in[name].copy_(tensor, non_blocking=True)
        graph.replay()
        # Clone: the next replay overwrites the graph's output buffer while the caller may still hold this.
        return tuple(static_out[name].clone() for name in self.runner.output_names)

    def _capture(self, feeds: Mapping[str, torch.Tensor]):
        runner = self.runner
        static_in = {name: tensor.clone() for name, tensor in feeds.items()}
        static_out = runner.prepare(static_in, runner.stream)
        # TensorRT's developer guide (CUDA Graphs): enqueue once before capturing, so that deferred
        # shape-dependent work is done outside the capture.
        enqueue_ordered(runner.stream, torch.cuda.current_stream(runner.device), lambda: runner.enqueue(runner.stream))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # captured on torch's capture stream (not the legacy default one)
            runner.enqueue(torch.cuda.current_stream(runner.device))
        log.info("captured the TensorRT UNet call in a CUDA graph for %s",
                 ", ".join(f"{n}={_dims(t.shape)}" for n, t in static_in.items()))
        return graph, static_in, static_out


def open_runners(trt, engines: EnginesDir, chosen: Mapping[str, EngineEntry], device: torch.device,
                 check_hash: bool = True) -> dict[str, EngineRunner]:
    """Deserialise the chosen engines, all on one stream of their own (never the legacy default stream); the
    build loop's parity check uses this too."""
    runtime = trt.Runtime(_TrtLogger.get(trt))
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)
        return {component: EngineRunner(trt, runtime, verify_engine_file(engines.folder, entry, check_hash),
                                        entry, device, engines.folder, stream)
                for component, entry in chosen.items()}


class TensorRTBackend(Backend):
    """The four graphs as TensorRT engines built by `python -m export.build_engines --targets onnx,tensorrt`,
    sharing one activation buffer (they run one after another on one stream)."""

    unavailable_reason = staticmethod(tensorrt_unavailable_reason)

    def __init__(self, engines: str | os.PathLike | EnginesDir, device: torch.device | str | None = "cuda",
                 cuda_graph: bool = True, check_hash: bool = True):
        engines = as_engines_dir(engines)
        self.folder = engines.folder
        device = torch.device(device if device is not None else "cuda")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        reason = tensorrt_unavailable_reason(engines, device)
        if reason is not None:
            raise EngineMismatchError(reason)
        trt = _import_tensorrt()
        platform = current_platform(device)
        chosen, _ = engines.manifest.select_engines(platform)
        runners = open_runners(trt, engines, chosen, device, check_hash)
        size = max(r.activation_bytes for r in runners.values())
        self.activation_memory = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
        for runner in runners.values():
            runner.bind_activation_memory(self.activation_memory)
        log.info("TensorRT %s: %d engines for %s, %.0f MiB shared activation memory", trt.__version__,
                 len(runners), platform.gpu_name, size / 2**20)
        unet = runners["unet"]
        if cuda_graph and all(profile_is_static(p) for p in unet.profiles):
            runners["unet"] = UNetGraph(unet)
        super().__init__("tensorrt", runners, device, engines.manifest.info, on_close=self._release)

    def _release(self) -> None:
        self.activation_memory = None
