"""Building one TensorRT engine from one exported ONNX graph, for `python -m export.build_engines
--targets tensorrt`.

    build_engine(component, onnx_path, out_dir, profiles, options) -> EngineEntry

- Profiles come from the component's export spec (`profiles_from_shapes`): static by default (min = opt = max
  = the 16x320x512 CFG shapes), or a dynamic range as an option. Several profiles per engine are allowed
  (e.g. the temporal VAE decoder's 14- and 2-frame chunks).
- Precision "fp16" parses the fp16 graph into a strongly typed network: every tensor keeps the type the
  graph gives it, so normalisation that the optimiser left in fp32 (Cast around InstanceNormalization:
  ~410k elements per group at 40x64x16) stays fp32. "fp16-flags" parses an fp32 graph with the FP16 builder
  flag and pins normalisation layers to fp32 (OBEY_PRECISION_CONSTRAINTS). "fp32" disables TF32 too.
- A persistent timing cache per TensorRT version and GPU in `<out>/tensorrt/`, a workspace limit and
  refittable engines as options.
- The engine is written atomically under a name carrying its key's digest; the build loop records the
  returned `EngineEntry` in the folder's one manifest (`cinemo_rt.manifest`: the key and its checks).

TensorRT 10 Python API only (`tensorrt` is imported inside the functions that need it).
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from cinemo_rt.files import file_sha256
from cinemo_rt.manifest import (
    ENGINE_SUBDIR, TORCH_DTYPE_NAMES, EngineEntry, EngineKey, Manifest, Platform, Profile, canonical_profiles,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp16", "fp16-flags", "fp32")


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp16"
    workspace_bytes: int | None = None  # None: TensorRT's default (the GPU's memory)
    refit: bool = False
    optimization_level: int | None = None  # TensorRT's builder_optimization_level, 0..5 (default 3)
    timing_cache: bool = True
    force: bool = False  # rebuild even if an engine with the same key exists

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {self.precision!r}")


class EngineBuildError(RuntimeError):
    """The ONNX graph did not parse, or TensorRT could not build an engine from it."""


# -------------------------------------------------------------------------------------------------
# Profiles from the export spec's single shapes function (pure Python)
# -------------------------------------------------------------------------------------------------
def static_batches(spec, dims) -> tuple[int, ...]:
    """The values of a spec's dynamic axis the pipeline actually runs, each a static profile by default:
    the UNet at 2 (CFG: both halves in one call), the text encoder at 2 and 1 (guidance 1), the VAE encoder at 1
    (an edit's clip too: `cinemo_rt.stages.encode_frames` encodes one frame per call),
    and the temporal decoder at its chunk lengths (14 + 2 for 16 frames, docs/METHOD.md, pipeline step 8)."""
    if spec.name == "vae_decoder":
        frames, chunk = dims.video_frames, spec.nominal_batch  # z1 + generated frames
        return tuple(dict.fromkeys(min(chunk, frames - start) for start in range(0, frames, chunk)))
    if spec.name == "vae_encoder":
        return (1,)
    if spec.name == "unet":
        return (spec.nominal_batch,)  # the UNet is the long build; B=1 (guidance 1) via --trt-dynamic
    return (spec.nominal_batch, 1) if spec.nominal_batch != 1 else (2, 1)


def profiles_for(spec, dims, dynamic: bool = False, batches: Sequence[int] | None = None) -> list[dict]:
    """Optimisation profiles from the export spec's single shapes function: one static profile (min = opt =
    max) per batch in `batches` (default `static_batches`), or with `dynamic` the spec's own (min, opt, max)
    range as one profile."""
    if dynamic:
        return [dict(spec.profile(dims))]
    profiles = []
    for batch in batches or static_batches(spec, dims):
        shapes = spec.shapes(dims, batch)
        profiles.append({name: (tuple(shapes[name]),) * 3 for name in spec.inputs})
    return profiles


def check_profiles_against_graph(graph_inputs: Mapping[str, Sequence[int | str | None]],
                                 profiles: Sequence[Profile]) -> list[str]:
    """Problems between the graph's declared input shapes (ints, or names/None/-1 for dynamic axes) and the
    profiles: a missing or unknown input, a rank mismatch, or a profile that moves a static axis."""
    problems = []
    for index, profile in enumerate(profiles):
        missing, unknown = set(graph_inputs) - set(profile), set(profile) - set(graph_inputs)
        if missing:
            problems.append(f"profile {index} has no shapes for inputs {sorted(missing)}")
        if unknown:
            problems.append(f"profile {index} names inputs the graph does not have: {sorted(unknown)}")
        for name in set(graph_inputs) & set(profile):
            dims = list(graph_inputs[name])
            for which, shape in zip(("min", "opt", "max"), profile[name]):
                if len(shape) != len(dims):
                    problems.append(f"profile {index} {which} shape of {name} has rank {len(shape)}, graph {len(dims)}")
                    break
                for axis, (d, s) in enumerate(zip(dims, shape)):
                    if isinstance(d, int) and d >= 0 and d != s:
                        problems.append(f"profile {index} {which} {name}[{axis}] = {s}, but the graph fixes it at {d}")
    return problems


def engine_key(component: str, onnx_sha256: str, platform: Platform, profiles: Sequence[Profile],
               options: BuildOptions) -> EngineKey:
    return EngineKey(component=component, onnx_sha256=onnx_sha256, tensorrt_version=platform.tensorrt_version,
                     gpu_name=platform.gpu_name, compute_capability=platform.compute_capability,
                     precision=options.precision, profiles=canonical_profiles(profiles), refit=options.refit,
                     optimization_level=options.optimization_level, workspace_bytes=options.workspace_bytes)


def engine_file_name(key: EngineKey) -> str:
    return f"{key.component}-{key.digest()[:16]}.plan"


def timing_cache_path(out_dir: str | os.PathLike, platform: Platform) -> Path:
    """Timing caches are only valid for one TensorRT version and GPU model: one file per pair, named by the GPU
    as well as its compute capability (an H100 and an H200 are both sm_90 but time kernels differently)."""
    gpu = re.sub(r"[^A-Za-z0-9.]+", "_", platform.gpu_name).strip("_")
    return (Path(out_dir) / ENGINE_SUBDIR
            / f"timing-trt{platform.tensorrt_version}-{gpu}-sm{platform.compute_capability}.cache")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------------------
# Building (needs tensorrt and a CUDA GPU)
# -------------------------------------------------------------------------------------------------
def _platform() -> Platform:
    """This machine's TensorRT version and GPU, as the runtime reads them (the tests replace this)."""
    import torch

    from cinemo_rt.backends.tensorrt_backend import current_platform

    return current_platform(torch.device("cuda", torch.cuda.current_device()))


def _parse(trt, builder, logger, onnx_path: Path, strongly_typed: bool):
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # Keep InstanceNormalization as TensorRT's INormalizationLayer (the 10.x default, made explicit): the
    # 5D GroupNorm over frames exports as InstanceNormalization, and the precision pinning below
    # finds it by layer type.
    parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)
    # parse_from_file resolves external data (the UNet is > 2 GB in fp32) relative to the file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT could not parse {onnx_path}:\n{errors}")
    return network, parser


def _pin_normalization_fp32(trt, network) -> int:
    """Weakly typed fp16 builds: run normalisation layers in fp32 (accumulating ~410k fp16 values per group
    overflows or loses precision). Returns how many layers were pinned."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.precision = trt.float32
            layer.set_output_type(0, trt.float32)
            pinned += 1
    return pinned


def _normalization_compute_fp32(trt, network) -> int:
    """Strongly typed builds: I/O types come from the graph, but a normalisation layer's *compute* precision
    is its own setting (INormalizationLayer.setComputePrecision); pin it to fp32 so that the mean/variance
    over ~410k fp16 elements per group accumulate in fp32. Layers are downcast to their class as
    Polygraphy does (`get_layer` returns the ILayer base)."""
    if not hasattr(trt.INormalizationLayer, "compute_precision"):  # removed in TensorRT 11
        log.warning("TensorRT %s has no INormalizationLayer.compute_precision: normalisation compute precision "
                    "is left to the builder (check fp16 parity)", trt.__version__)
        return 0
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.__class__ = trt.INormalizationLayer
            layer.compute_precision = trt.float32
            count += 1
    return count


def _network_io(trt, network) -> tuple[dict[str, tuple], dict[str, str], dict[str, str]]:
    from cinemo_rt.backends.tensorrt_backend import torch_dtype_of  # the runtime's dtype table

    def describe(tensor):
        return TORCH_DTYPE_NAMES.get(torch_dtype_of(tensor.dtype), str(tensor.dtype))

    ins = [network.get_input(i) for i in range(network.num_inputs)]
    outs = [network.get_output(i) for i in range(network.num_outputs)]
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in ins}  # -1 marks a dynamic axis
    return shapes, {t.name: describe(t) for t in ins}, {t.name: describe(t) for t in outs}


def _configure(trt, builder, network, profiles: Sequence[Profile], options: BuildOptions):
    config = builder.create_builder_config()
    if options.workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_bytes))
    if options.refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.optimization_level is not None:
        config.builder_optimization_level = int(options.optimization_level)
    if options.precision == "fp16-flags":
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _pin_normalization_fp32(trt, network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log.info("fp16 builder flags; %d normalisation layers pinned to fp32", pinned)
    elif options.precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # honest fp32: parity at the fp32 tolerance
    else:
        log.info("strongly typed fp16; %d normalisation layers compute in fp32", _normalization_compute_fp32(trt, network))
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            trt_profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(trt_profile)
    return config


def _attach_timing_cache(config, path: Path):
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(component: str, onnx_path: str | os.PathLike, out_dir: str | os.PathLike,
                 profiles: Sequence[Profile], options: BuildOptions = BuildOptions(),
                 onnx_sha256: str | None = None, existing: Sequence[EngineEntry] = ()) -> EngineEntry:
    """Build (or reuse) the engine of one component; returns its manifest entry (the caller records it).
    Idempotent: an engine among `existing` whose key and file hash match is kept."""
    import tensorrt as trt

    onnx_path, out_dir = Path(onnx_path), Path(out_dir)
    engine_dir = out_dir / ENGINE_SUBDIR
    engine_dir.mkdir(parents=True, exist_ok=True)
    onnx_sha256 = onnx_sha256 or file_sha256(onnx_path)
    platform = _platform()
    key = engine_key(component, onnx_sha256, platform, profiles, options)
    for entry in existing:
        path = engine_dir / entry.file
        if (entry.key == key and not options.force and path.is_file()
                and path.stat().st_size == entry.engine_bytes and file_sha256(path) == entry.engine_sha256):
            log.info("%s: engine %s is up to date", component, entry.file)
            return entry

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path, strongly_typed=options.precision == "fp16")
    graph_shapes, input_dtypes, output_dtypes = _network_io(trt, network)
    problems = check_profiles_against_graph(graph_shapes, profiles)
    if problems:
        raise EngineBuildError(f"{component}: optimisation profiles do not fit {onnx_path}: " + "; ".join(problems))
    config = _configure(trt, builder, network, profiles, options)
    cache_path = timing_cache_path(out_dir, platform)
    cache = _attach_timing_cache(config, cache_path) if options.timing_cache else None

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build an engine for {component} from {onnx_path} "
                               "(see the TensorRT log above; a larger --trt-workspace may help)")
    data = bytes(serialized)
    path = engine_dir / engine_file_name(key)
    write_atomic(path, data)
    if cache is not None:
        write_atomic(cache_path, bytes(cache.serialize()))
    entry = EngineEntry(key=key, file=path.name, engine_sha256=file_sha256(path), engine_bytes=len(data),
                        inputs=input_dtypes, outputs=output_dtypes,
                        build={"seconds": round(seconds, 1), "workspace_bytes": options.workspace_bytes,
                               "optimization_level": options.optimization_level,
                               "timing_cache": cache_path.name if cache is not None else None,
                               "onnx": onnx_path.name})
    log.info("%s: built %s (%.1f MiB) in %.0f s for %s", component, path.name, len(data) / 2**20, seconds,
             platform.describe())
    return entry


def engine_runner(out_dir: str | os.PathLike, manifest: Manifest, entry: EngineEntry):
    """The runtime's runner over one just-built engine, for the build's parity check."""
    import tensorrt as trt
    import torch

    from cinemo_rt.backends.engines_dir import EnginesDir
    from cinemo_rt.backends.tensorrt_backend import open_runners

    device = torch.device("cuda", torch.cuda.current_device())
    runner = open_runners(trt, EnginesDir(Path(out_dir), manifest), {entry.component: entry}, device)[entry.component]
    runner.activation_memory = torch.empty(max(runner.activation_bytes, 1), dtype=torch.uint8, device=device)
    runner.bind_activation_memory(runner.activation_memory)
    return runner


def profile_batches(entry: EngineEntry) -> tuple[int, ...]:
    """The batch (axis 0 of the first input) of each profile's opt shapes: what parity can run."""
    return tuple(dict.fromkeys(next(iter(p.values()))[1][0] for p in entry.profiles))
