"""The engines folder's one manifest (`manifest.json`), typed, read once per open and written atomically.

Both sides import it downwards: `export/` (the build) writes it, `cinemo_rt/backends/` (ONNX Runtime,
TensorRT) read it. It records

- what the graphs were built for: precision, opset, library versions, the default size, the model facts
  the pipeline needs (`ModelInfo`), the tokenizer and scheduler copied beside them;
- per component: the key of its inputs (weights, spec, options, versions), the ONNX file with its SHA-256,
  and its parity against PyTorch per runtime;
- every TensorRT engine once, with the key it was built under (ONNX hash, TensorRT version, GPU,
  precision, profiles) and its own SHA-256, so the runtime can choose the engines built for this machine
  and say why none match.

Layout of a folder:
    manifest.json, cinemo_rt.json (default size)
    text_encoder.onnx, unet.onnx (+ unet.onnx.data when large), vae_encoder.onnx, vae_decoder.onnx
    tensorrt/<component>-<key digest>.plan, tensorrt/timing-*.cache
    tokenizer/, scheduler/scheduler_config.json
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .backends.base import ModelInfo
from .errors import InputError
from .files import FileFormatError, file_sha256, give_default_mode, read_json
from .graphs import GRAPHS
from .settings import Size

MANIFEST = "manifest.json"
FORMAT = 2  # 1 kept TensorRT engines in tensorrt/engines.json as well
ENGINE_SUBDIR = "tensorrt"

Shape = tuple[int, ...]
Profile = Mapping[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)

# Engine tensor dtypes as the manifest records them.
TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                     torch.int32: "int32", torch.int64: "int64", torch.int8: "int8", torch.uint8: "uint8",
                     torch.bool: "bool"}


class EnginesDirError(InputError):
    """The engines folder is missing, incomplete, or was built for something else."""


class EngineMismatchError(EnginesDirError):
    """An engine is missing, corrupt, or was built for another GPU, TensorRT version or ONNX graph."""


def build_hint(folder: str | os.PathLike) -> str:
    return f"`python -m export.build_engines --checkpoint CKPT --out {folder}`"


def rebuild_hint(folder: str | os.PathLike) -> str:
    return (f"rebuild the engines on this machine with `python -m export.build_engines --checkpoint CKPT "
            f"--out {folder} --targets onnx,tensorrt` (or run with --backend onnxruntime)")


def write_json_atomic(path: Path, data) -> None:
    """Temporary file + rename: a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        give_default_mode(tmp)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def contained_path(folder: str | os.PathLike, relative: object) -> Path:
    """`folder / relative`, refused unless it stays inside the folder: a manifest edited to name an absolute
    path, `../..` or a symbolic link out must not load (and run) a graph or engine from anywhere else."""
    if not isinstance(relative, str) or not relative or os.path.isabs(relative):
        raise EnginesDirError(f"{folder}: {MANIFEST} names file {relative!r}; entries must be paths inside "
                              "the engines folder. Rebuild it with `python -m export.build_engines`")
    root = Path(folder).resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise EnginesDirError(f"{folder}: {MANIFEST} names file {relative!r}, which resolves outside the "
                              "engines folder; refusing to load it. Rebuild with `python -m export.build_engines`")
    return path


# -------------------------------------------------------------------------------------------------
# TensorRT engines: platform, key, entry
# -------------------------------------------------------------------------------------------------
def profiles_to_json(profiles: Sequence[Profile]) -> list[dict[str, list[list[int]]]]:
    return [{name: [list(map(int, s)) for s in triple] for name, triple in p.items()} for p in profiles]


def profiles_from_json(data) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
    return [{name: tuple(tuple(int(d) for d in s) for s in triple) for name, triple in p.items()} for p in data]


def canonical_profiles(profiles: Sequence[Profile]) -> str:
    return json.dumps(profiles_to_json(profiles), sort_keys=True, separators=(",", ":"))


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


@dataclass(frozen=True)
class EngineEntry:
    """One engine: its key, file (relative to tensorrt/), hash, size and I/O (name -> dtype name, in the
    engine's order, which is the graph's)."""

    key: EngineKey
    file: str
    engine_sha256: str
    engine_bytes: int
    inputs: dict[str, str]
    outputs: dict[str, str]
    build: dict = field(default_factory=dict)  # workspace, timing cache, seconds, parity: informative only

    @property
    def component(self) -> str:
        return self.key.component

    @property
    def profiles(self) -> list[dict[str, tuple[Shape, Shape, Shape]]]:
        return profiles_from_json(json.loads(self.key.profiles))

    def to_json(self) -> dict:
        return {**asdict(self), "digest": self.key.digest()}

    @classmethod
    def from_json(cls, data: Mapping) -> "EngineEntry":
        try:
            key = EngineKey(**data["key"])
            entry = cls(key=key, file=str(data["file"]), engine_sha256=str(data["engine_sha256"]),
                        engine_bytes=int(data["engine_bytes"]), inputs=dict(data["inputs"]),
                        outputs=dict(data["outputs"]), build=dict(data.get("build", {})))
        except (KeyError, TypeError, ValueError) as err:
            raise EngineMismatchError(f"malformed engine entry in {MANIFEST} ({type(err).__name__}: {err})") from err
        if "digest" in data and data["digest"] != key.digest():
            raise EngineMismatchError(f"the engine entry for {key.component!r} in {MANIFEST} was edited: its key "
                                      "no longer matches its digest")
        return entry


def verify_engine_file(folder: str | os.PathLike, entry: EngineEntry, check_hash: bool = True) -> Path:
    """The engine file exists with the recorded size (and SHA-256): a truncated copy or a file from another
    build is caught before TensorRT is handed it."""
    path = contained_path(Path(folder) / ENGINE_SUBDIR, entry.file)
    if not path.is_file():
        raise EngineMismatchError(f"engine file {path} is missing; {rebuild_hint(folder)}")
    size = path.stat().st_size
    if size != entry.engine_bytes:
        raise EngineMismatchError(f"engine file {path} has {size} bytes, the manifest says {entry.engine_bytes} "
                                  f"(truncated or replaced); {rebuild_hint(folder)}")
    if check_hash and file_sha256(path) != entry.engine_sha256:
        raise EngineMismatchError(f"engine file {path} does not match the SHA-256 in {MANIFEST} "
                                  f"(corrupt or replaced); {rebuild_hint(folder)}")
    return path


# -------------------------------------------------------------------------------------------------
# The manifest
# -------------------------------------------------------------------------------------------------
@dataclass
class OnnxArtifact:
    """An exported, optimised graph: its file (+ external data), SHA-256 and build details (exporter,
    shapes, profile, op histogram, seconds), recorded for people and tests."""

    file: str
    sha256: str
    extra_files: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**self.details, "file": self.file, "sha256": self.sha256, "extra_files": list(self.extra_files)}

    @classmethod
    def from_json(cls, data: Mapping) -> "OnnxArtifact":
        rest = {k: v for k, v in data.items() if k not in ("file", "sha256", "extra_files")}
        return cls(str(data["file"]), str(data["sha256"]), list(data.get("extra_files", [])), rest)


@dataclass
class Component:
    """One graph's build state: `key` hashes what its ONNX file consumed; `parity` is per runtime."""

    key: str
    weights_sha256: str
    onnx: OnnxArtifact | None = None
    parity: dict = field(default_factory=dict)  # runtime ("onnxruntime", "tensorrt") -> record

    def to_json(self) -> dict:
        return {"key": self.key, "weights_sha256": self.weights_sha256,
                "onnx": self.onnx.to_json() if self.onnx else None, "parity": self.parity}

    @classmethod
    def from_json(cls, data: Mapping) -> "Component":
        onnx = OnnxArtifact.from_json(data["onnx"]) if data.get("onnx") else None
        return cls(str(data["key"]), str(data["weights_sha256"]), onnx, dict(data.get("parity") or {}))


@dataclass
class Manifest:
    precision: str = "fp32"
    opset: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    size: Size = Size()
    info: ModelInfo = ModelInfo()
    vocab_size: int = 49408
    components: dict[str, Component] = field(default_factory=dict)
    engines: list[EngineEntry] = field(default_factory=list)
    side_files: dict[str, str] = field(default_factory=dict)  # "tokenizer"/"scheduler" -> hash of the copy

    # -- reading and writing ------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"format": FORMAT, "precision": self.precision, "opset": self.opset, "versions": self.versions,
                "size": self.size.as_dict(), "model": {"info": asdict(self.info), "vocab_size": self.vocab_size},
                "components": {n: c.to_json() for n, c in self.components.items()},
                "engines": [e.to_json() for e in self.engines], "side_files": self.side_files}

    @classmethod
    def from_json(cls, data: Mapping, where: str = MANIFEST) -> "Manifest":
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise EnginesDirError(f"{where} is not a format-{FORMAT} manifest (built by another version of "
                                  "cinemo-rt); rebuild the folder with python -m export.build_engines")
        try:
            return cls(precision=str(data["precision"]), opset=data.get("opset"), versions=dict(data["versions"]),
                       size=Size(**data["size"]), info=ModelInfo(**data["model"]["info"]),
                       vocab_size=int(data["model"]["vocab_size"]),
                       components={n: Component.from_json(c) for n, c in data["components"].items()},
                       engines=[EngineEntry.from_json(e) for e in data.get("engines", [])],
                       side_files=dict(data.get("side_files", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            if isinstance(err, EnginesDirError):
                raise
            raise EnginesDirError(f"{where} is malformed ({type(err).__name__}: {err}); rebuild the folder "
                                  "with python -m export.build_engines") from None

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.is_file():
            raise EnginesDirError(f"{folder} has no {MANIFEST}; build it with {build_hint(folder)}")
        try:
            data = read_json(path)
        except FileFormatError as err:
            raise EnginesDirError(f"{err}; rebuild with {build_hint(folder)}") from None
        return cls.from_json(data, str(path))

    def write(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / MANIFEST
        write_json_atomic(path, self.to_json())
        return path

    # -- questions the runtime asks -----------------------------------------------------------------
    def onnx_path(self, folder: str | os.PathLike, component: str, verify: bool = False) -> Path:
        """Path of a component's graph; raises if it is not listed, it or its external data leave the folder,
        it is missing, or (`verify`) its SHA-256 is not the one recorded."""
        entry = self.components.get(component)
        if entry is None or entry.onnx is None:
            raise EnginesDirError(f"{folder}: no ONNX graph for {component} in {MANIFEST}; rebuild with "
                                  f"{build_hint(folder)}")
        path = contained_path(folder, entry.onnx.file)
        for extra in entry.onnx.extra_files:
            contained_path(folder, extra)
        if not path.is_file():
            raise EnginesDirError(f"{folder}: {entry.onnx.file} is listed in {MANIFEST} but missing")
        if verify and file_sha256(path) != entry.onnx.sha256:
            raise EnginesDirError(f"{path} does not match the SHA-256 recorded in {MANIFEST} (changed or damaged "
                                  "since the build); rebuild with `python -m export.build_engines`")
        return path

    def onnx_hashes(self) -> dict[str, str]:
        """Component -> SHA-256 of its ONNX file as built (what TensorRT engines must have been built from)."""
        return {n: c.onnx.sha256 for n, c in self.components.items() if c.onnx is not None}

    def select_engines(self, platform: Platform, components: Sequence[str] = tuple(GRAPHS)
                       ) -> tuple[dict[str, EngineEntry], list[str]]:
        """-> (component -> matching engine, problems). A component with no matching engine gets one problem
        line that names what is there and what differs."""
        hashes = self.onnx_hashes()
        chosen, problems = {}, []
        for component in components:
            candidates = [e for e in self.engines if e.component == component]
            matching = [e for e in candidates if not e.key.mismatches(platform, hashes.get(component))]
            if matching:
                chosen[component] = matching[-1]  # the newest build for this platform
            elif not candidates:
                problems.append(f"no TensorRT engine for {component!r}")
            else:
                why = "; ".join(candidates[-1].key.mismatches(platform, hashes.get(component)))
                problems.append(f"the {component!r} engine does not match: {why}")
        return chosen, problems

    # -- what the build changes ----------------------------------------------------------------------
    def upsert_engine(self, new: EngineEntry) -> list[EngineEntry]:
        """Record `new`, replacing the engine for the same component on the same platform (engines for other
        GPUs are kept); returns the replaced entries (their files can go)."""
        replaced = [e for e in self.engines if e.component == new.component and e.key.platform == new.key.platform]
        self.engines = [e for e in self.engines if e not in replaced] + [new]
        return [e for e in replaced if e.file != new.file]
