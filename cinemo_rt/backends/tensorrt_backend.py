"""The TensorRT backend (issue 5): one engine per exported component, run with `execute_async_v3`.

Lifecycle (TensorRT demo/Diffusion's: export, optimise, build, load, run): `export/tensorrt_build.py` builds
the engines and records each in `<engines>/tensorrt/engines.json` with its cache key; this file

1. selects, for every component, the engine whose key matches this machine (TensorRT version, GPU name,
   compute capability) and the exported ONNX graph (its SHA-256), or says why none does
   (`tensorrt_unavailable_reason`, so `--backend auto` can fall back to ONNX Runtime);
2. deserialises each engine once, checks its file hash and its I/O names and dtypes against the manifest;
3. creates one execution context per engine with user-managed activation memory, all pointing at one shared
   buffer as large as the largest engine needs (the components run one after another on one stream);
4. binds torch CUDA tensors by tensor name (`set_input_shape`, `set_tensor_address`) and enqueues on the
   backend's own stream, ordered after the caller's stream and before its next work by events (on the legacy
   default stream TensorRT would synchronise every call), so nothing here synchronises the host;
5. optionally captures the UNet call in a CUDA graph (static shapes only) and replays it every step.

Everything above the `TensorRTBackend` class is pure Python (no `tensorrt` import) and unit-tested on CPU:
profile selection, key matching, manifest validation, dtype names. `tensorrt` is imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .base import ModelInfo
from .engines_dir import EnginesDirError, contained_path

log = logging.getLogger(__name__)

ENGINE_SUBDIR = "tensorrt"  # engines, their manifest and the timing cache live in <engines>/tensorrt/
ENGINE_MANIFEST = "engines.json"
MANIFEST_FORMAT = 2  # 2: keys carry the optimisation level and workspace limit
MIN_TENSORRT_MAJOR = 10  # the named-tensor API (execute_async_v3, set_tensor_address) and INT64 I/O

Shape = tuple[int, ...]
Profile = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

# TensorRT DataType member names -> torch dtypes (`trt.DataType.HALF.name == "HALF"`).
TRT_DTYPE_NAMES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
    "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool,
}
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                     torch.int32: "int32", torch.int64: "int64", torch.int8: "int8", torch.uint8: "uint8",
                     torch.bool: "bool"}


class EngineMismatchError(RuntimeError):
    """An engine is missing, corrupt, or was built for another GPU, TensorRT version or ONNX graph."""


class ShapeError(ValueError):
    """A call's input shapes fall outside every optimisation profile of an engine."""


def rebuild_hint(folder: str | os.PathLike) -> str:
    return (f"rebuild the engines on this machine with `python -m export.build_engines --checkpoint CKPT "
            f"--out {folder} --targets tensorrt` (or run with --backend onnxruntime)")


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


def profiles_to_json(profiles: Sequence[Profile]) -> list[dict[str, list[list[int]]]]:
    return [{name: [list(map(int, s)) for s in triple] for name, triple in p.items()} for p in profiles]


def profiles_from_json(data) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    return [{name: tuple(tuple(int(d) for d in s) for s in triple) for name, triple in p.items()} for p in data]


# -------------------------------------------------------------------------------------------------
# Cache keys and the engine manifest
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Platform:
    """What a serialized engine is tied to: the TensorRT release and the GPU model it was built on."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    def describe(self) -> str:
        return f"{self.gpu_name} (sm_{self.compute_capability.replace('.', '')}) with TensorRT {self.tensorrt_version}"


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on. Its digest names the engine file; any change means a rebuild."""

    component: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str  # "fp16" (strongly typed from the fp16 graph), "fp16-flags" or "fp32"
    profiles: str  # canonical JSON of the optimisation profiles
    refit: bool = False
    # Both change which tactics the builder may pick (a smaller workspace rules out some kernels).
    optimization_level: int | None = None  # None: TensorRT's default
    workspace_bytes: int | None = None  # None: TensorRT's default (the GPU's memory)

    @property
    def platform(self) -> Platform:
        return Platform(self.tensorrt_version, self.gpu_name, self.compute_capability)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()

    def mismatches(self, platform: Platform, onnx_sha256: str | None = None) -> list[str]:
        """Human-readable differences between this key and the machine / graph at hand."""
        problems = []
        if self.tensorrt_version != platform.tensorrt_version:
            problems.append(f"TensorRT {self.tensorrt_version} != installed {platform.tensorrt_version}")
        if self.compute_capability != platform.compute_capability:
            problems.append(f"compute capability {self.compute_capability} != this GPU's {platform.compute_capability}")
        if self.gpu_name != platform.gpu_name:
            problems.append(f"GPU {self.gpu_name!r} != this GPU {platform.gpu_name!r}")
        if onnx_sha256 is not None and self.onnx_sha256 != onnx_sha256:
            problems.append(f"ONNX graph changed since the build (sha256 {self.onnx_sha256[:12]} != {onnx_sha256[:12]})")
        return problems


def canonical_profiles(profiles: Sequence[Profile]) -> str:
    return json.dumps(profiles_to_json(profiles), sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class EngineEntry:
    """One engine in `tensorrt/engines.json`."""

    key: EngineKey
    file: str  # relative to the tensorrt/ folder
    engine_sha256: str
    engine_bytes: int
    inputs: dict[str, str]  # name -> dtype name ("float16", "int64", ...), in engine order
    outputs: dict[str, str]
    build: dict = field(default_factory=dict)  # workspace, timing cache, seconds: informative only

    @property
    def component(self) -> str:
        return self.key.component

    @property
    def profiles(self) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
        return profiles_from_json(json.loads(self.key.profiles))

    def to_json(self) -> dict:
        data = asdict(self)
        data["digest"] = self.key.digest()
        return data

    @classmethod
    def from_json(cls, data: Mapping) -> "EngineEntry":
        try:
            key = EngineKey(**data["key"])
            entry = cls(key=key, file=str(data["file"]), engine_sha256=str(data["engine_sha256"]),
                        engine_bytes=int(data["engine_bytes"]), inputs=dict(data["inputs"]),
                        outputs=dict(data["outputs"]), build=dict(data.get("build", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise EngineMismatchError(f"malformed engine manifest entry ({type(err).__name__}: {err})") from err
        if "digest" in data and data["digest"] != key.digest():
            raise EngineMismatchError(f"engine manifest entry for {key.component!r} was edited: its key no longer "
                                      "matches its digest")
        return entry


def manifest_path(folder: str | os.PathLike) -> Path:
    return Path(folder) / ENGINE_SUBDIR / ENGINE_MANIFEST


def read_engine_manifest(folder: str | os.PathLike) -> list[EngineEntry]:
    """Entries of `<folder>/tensorrt/engines.json`; [] when there is none. Malformed -> EngineMismatchError."""
    path = manifest_path(folder)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise EngineMismatchError(f"{path} is unreadable ({err}); {rebuild_hint(folder)}") from err
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("engines"), list):
        raise EngineMismatchError(f"{path} is not a format-{MANIFEST_FORMAT} engine manifest; {rebuild_hint(folder)}")
    return [EngineEntry.from_json(item) for item in data["engines"]]


def write_engine_manifest(folder: str | os.PathLike, entries: Sequence[EngineEntry]) -> Path:
    """Write atomically (temporary file + rename): a crash never leaves a half-written manifest."""
    path = manifest_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": MANIFEST_FORMAT, "engines": [e.to_json() for e in entries]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def upsert_entry(entries: Sequence[EngineEntry], new: EngineEntry) -> list[EngineEntry]:
    """Replace the entry for the same component on the same platform; keep engines for other GPUs."""
    kept = [e for e in entries if not (e.component == new.component and e.key.platform == new.key.platform)]
    return kept + [new]


def select_engines(entries: Sequence[EngineEntry], platform: Platform, components: Sequence[str],
                   onnx_hashes: Mapping[str, str] | None = None) -> tuple[dict[str, EngineEntry], list[str]]:
    """-> (component -> matching entry, problems). A component with no matching entry gets one problem line
    that names what is there and what differs."""
    onnx_hashes = onnx_hashes or {}
    chosen, problems = {}, []
    for component in components:
        candidates = [e for e in entries if e.component == component]
        matching = [e for e in candidates if not e.key.mismatches(platform, onnx_hashes.get(component))]
        if matching:
            chosen[component] = matching[-1]  # the newest build for this platform
        elif not candidates:
            problems.append(f"no TensorRT engine for {component!r}")
        else:
            why = "; ".join(candidates[-1].key.mismatches(platform, onnx_hashes.get(component)))
            problems.append(f"the {component!r} engine does not match: {why}")
    return chosen, problems


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_engine_file(folder: str | os.PathLike, entry: EngineEntry, check_hash: bool = True) -> Path:
    """The engine file exists with the recorded size (and SHA-256): a truncated copy or a file from another
    build is caught before TensorRT is handed it."""
    path = contained_path(Path(folder) / ENGINE_SUBDIR, entry.file)  # no ../ or absolute paths
    if not path.is_file():
        raise EngineMismatchError(f"engine file {path} is missing; {rebuild_hint(folder)}")
    size = path.stat().st_size
    if size != entry.engine_bytes:
        raise EngineMismatchError(f"engine file {path} has {size} bytes, the manifest says {entry.engine_bytes} "
                                  f"(truncated or replaced); {rebuild_hint(folder)}")
    if check_hash and file_sha256(path) != entry.engine_sha256:
        raise EngineMismatchError(f"engine file {path} does not match the SHA-256 in {ENGINE_MANIFEST} "
                                  f"(corrupt or replaced); {rebuild_hint(folder)}")
    return path


# -------------------------------------------------------------------------------------------------
# The components the backend needs, and how it asks the rest of the engines folder about them
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Components:
    """Engine component names (the export specs' names) behind each protocol call."""

    text_encoder: str = "text_encoder"
    vae_encoder: str = "vae_encoder"
    unet: str = "unet"
    vae_decoder: str = "vae_decoder"

    def all(self) -> tuple[str, ...]:
        return (self.text_encoder, self.vae_encoder, self.unet, self.vae_decoder)


COMPONENTS = Components()


def required_components() -> tuple[str, ...]:
    return COMPONENTS.all()


def onnx_hashes(folder: str | os.PathLike) -> dict[str, str]:
    """Component -> SHA-256 of the ONNX graph the folder's main manifest records (what the engines must have
    been built from); {} when it records none."""
    from .engines_dir import onnx_hashes

    return dict(onnx_hashes(folder))


def model_info(folder: str | os.PathLike) -> ModelInfo:
    """The checkpoint facts the pipeline needs (scaling factor, VAE kind), as the engines folder records them."""
    from .engines_dir import model_info as recorded_model_info

    return recorded_model_info(folder)


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


def tensorrt_unavailable_reason(folder: str | os.PathLike, device: torch.device) -> str | None:
    """None when TensorRT can run the engines in `folder` on `device`; otherwise why not, in one line."""
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
        entries = read_engine_manifest(folder)
        if not entries:
            return f"{folder} holds no TensorRT engines; build them with `python -m export.build_engines --targets tensorrt`"
        platform = current_platform(device)
        _, problems = select_engines(entries, platform, required_components(), onnx_hashes(folder))
        if problems:
            return f"{'; '.join(problems)} (this machine: {platform.describe()}); {rebuild_hint(folder)}"
        return None
    except (EngineMismatchError, EnginesDirError) as err:  # engines.json or manifest.json missing or malformed
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

    def __init__(self, trt, runtime, path: Path, entry: EngineEntry, device: torch.device, folder,
                 stream=None):
        self.trt, self.entry, self.device = trt, entry, device
        self.stream = stream if stream is not None else torch.cuda.Stream(device)
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"TensorRT could not deserialise {path} (corrupt, or built by another "
                                      f"TensorRT version or for another GPU); {rebuild_hint(folder)}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: torch_dtype_of(self.engine.get_tensor_dtype(n)) for n in names}
        recorded = {**entry.inputs, **entry.outputs}
        found = {n: TORCH_DTYPE_NAMES.get(self.dtypes[n], str(self.dtypes[n])) for n in names}
        if set(self.inputs) != set(entry.inputs) or set(self.outputs) != set(entry.outputs) or found != recorded:
            raise EngineMismatchError(f"{path} has tensors {found}, the manifest records {recorded}; "
                                      f"{rebuild_hint(folder)}")
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
        """Set shapes and addresses for `feeds` (already on the device, contiguous, in the engine's dtypes) and
        allocate outputs; returns the outputs. Host-side calls only: nothing waits for the GPU."""
        shapes = {name: tuple(t.shape) for name, t in feeds.items()}
        index = select_profile(self.profiles, shapes)
        if index != self.profile_index:
            if not self.context.set_optimization_profile_async(index, stream.cuda_stream):
                raise RuntimeError(f"TensorRT refused optimisation profile {index} of {self.entry.component}")
            self.profile_index = index
        for name in self.inputs:
            tensor = feeds[name]
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ShapeError(f"TensorRT refused shape {_dims(tensor.shape)} for {self.entry.component}.{name}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def cast_feeds(self, feeds: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise ValueError(f"{self.entry.component} needs inputs {sorted(missing)}")
        return {n: feeds[n].to(self.device, self.dtypes[n]).contiguous() for n in self.inputs}

    def enqueue(self, stream: torch.cuda.Stream) -> None:
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.entry.component} (see the TensorRT log above)")

    def __call__(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        caller = torch.cuda.current_stream(self.device)  # the pipeline's stream
        feeds = self.cast_feeds(feeds)
        outputs = self.prepare(feeds, self.stream)  # outputs are allocated on the caller's stream
        enqueue_ordered(self.stream, caller, lambda: self.enqueue(self.stream))
        return outputs


class UNetGraph:
    """The UNet enqueue captured once in a CUDA graph per input-shape signature (static profiles only),
    replayed every denoising step: the step's inputs are copied into the graph's own buffers (device to
    device, on the stream), so the loop launches one graph instead of hundreds of kernels."""

    def __init__(self, runner: EngineRunner):
        self.runner = runner
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, dict]] = {}

    def __call__(self, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        feeds = self.runner.cast_feeds(feeds)
        signature = tuple((n, tuple(t.shape)) for n, t in feeds.items())
        if signature not in self.graphs:
            self.graphs[signature] = self._capture(feeds)
        graph, static_in, static_out = self.graphs[signature]
        for name, tensor in feeds.items():
            static_in[name].copy_(tensor, non_blocking=True)
        graph.replay()
        # Clone: the next replay overwrites the graph's output buffer while the caller may still hold this.
        return {name: out.clone() for name, out in static_out.items()}

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


class TensorRTBackend:
    """The Backend protocol over TensorRT engines built by `python -m export.build_engines --targets tensorrt`."""

    name = "tensorrt"

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cuda",
                 cuda_graph: bool = True, check_hash: bool = True):
        self.folder = Path(folder)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        reason = tensorrt_unavailable_reason(self.folder, self.device)
        if reason is not None:
            raise EngineMismatchError(reason)
        trt = _import_tensorrt()
        platform = current_platform(self.device)
        chosen, _ = select_engines(read_engine_manifest(self.folder), platform, required_components(),
                                   onnx_hashes(self.folder))
        runtime = trt.Runtime(_TrtLogger.get(trt))
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)  # TensorRT's own: never the legacy default stream
            self.runners = {component: EngineRunner(trt, runtime, verify_engine_file(self.folder, entry, check_hash),
                                                    entry, self.device, self.folder, self.stream)
                            for component, entry in chosen.items()}
            # One activation buffer for all engines: they run one after another on one stream.
            size = max(r.activation_bytes for r in self.runners.values())
            self.activation_memory = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            for runner in self.runners.values():
                runner.bind_activation_memory(self.activation_memory)
        log.info("TensorRT %s: %d engines for %s, %.0f MiB shared activation memory", trt.__version__,
                 len(self.runners), platform.gpu_name, size / 2**20)
        self._wiring = _Wiring.from_runners(self.runners)
        unet = self.runners[COMPONENTS.unet]
        use_graph = cuda_graph and all(profile_is_static(p) for p in unet.profiles)
        self._unet_call = UNetGraph(unet) if use_graph else unet
        self.dtype = unet.dtypes[self._wiring.unet_inputs[0]]
        self.info = model_info(self.folder)

    # -- the protocol -------------------------------------------------------------------------------
    def unet(self, x_t, t, text, z1, motion_id):
        w = self._wiring
        feeds = dict(zip(w.unet_inputs, (x_t, t, text, z1, motion_id)))
        return self._unet_call(**feeds)[w.unet_output].to(x_t.dtype)

    def encode_image(self, image):
        w = self._wiring
        out = self.runners[COMPONENTS.vae_encoder](**{w.encoder_input: image})
        return out[w.encoder_outputs[0]], out[w.encoder_outputs[1]]

    def encode_text(self, ids):
        w = self._wiring
        return self.runners[COMPONENTS.text_encoder](**{w.text_input: ids})[w.text_output]

    def decode(self, latents, chunk=14):
        return self._wiring.decode(self.runners[COMPONENTS.vae_decoder], latents, chunk, self.info)

    def close(self) -> None:
        self._unet_call = None
        self.runners = {}
        self.activation_memory = None


@dataclass(frozen=True)
class _Wiring:
    """Which engine tensor each protocol argument goes to: positional, in the ONNX graph's input and output
    order that the manifest records (the export spec's order: UNet (x_t, t, text, z1, motion_id) -> eps;
    VAE encoder image -> (mean, std); text encoder ids -> hidden; VAE decoder latents (N, 4, h, w),
    unscaled, N = frames of one chunk -> images (N, 3, H, W))."""

    unet_inputs: tuple[str, ...]
    unet_output: str
    encoder_input: str
    encoder_outputs: tuple[str, str]
    text_input: str
    text_output: str
    decoder_input: str
    decoder_output: str

    @classmethod
    def from_runners(cls, runners: Mapping[str, EngineRunner]) -> "_Wiring":
        def io(component):
            entry = runners[component].entry
            return list(entry.inputs), list(entry.outputs)

        (u_in, u_out), (e_in, e_out) = io(COMPONENTS.unet), io(COMPONENTS.vae_encoder)
        (t_in, t_out), (d_in, d_out) = io(COMPONENTS.text_encoder), io(COMPONENTS.vae_decoder)
        if len(u_in) != 5 or len(e_out) != 2:
            raise EngineMismatchError(f"unexpected engine I/O: unet inputs {u_in}, VAE encoder outputs {e_out}")
        return cls(tuple(u_in), u_out[0], e_in[0], (e_out[0], e_out[1]), t_in[0], t_out[0], d_in[0], d_out[0])

    def decode(self, runner: EngineRunner, latents: torch.Tensor, chunk: int | None, info: ModelInfo) -> torch.Tensor:
        """As `components.VAE.decode`: the temporal decoder sees `chunk` frames at a time (14 + 2 for 16)."""
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w) / info.scaling_factor  # (B*F, 4, h, w)
        step = chunk if (chunk and info.temporal_vae) else b * f
        parts = [runner(**{self.decoder_input: flat[start:start + step]})[self.decoder_output]
                 for start in range(0, b * f, step)]
        images = torch.cat(parts)  # (B*F, 3, H, W)
        _, c_out, hh, ww = images.shape
        return images.view(b, f, c_out, hh, ww).permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W)
