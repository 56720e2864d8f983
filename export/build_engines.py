"""`python -m export.build_engines --checkpoint DIR --out DIR`: export, optimise, (build), verify.

A flat loop over components (STYLE direction 7). Each artifact is keyed on the sha256 of what it
consumes: the component's weights, its export spec at the build's shapes, the options (precision,
opset) and the versions of the libraries that write it. A component whose key matches the manifest and
whose files exist is "up to date" and skipped; changing one component's weights rebuilds that one only.
Files are written under temporary names and renamed; the manifest is rewritten atomically after each
step, so an interrupted build leaves complete artifacts or none, and the next run resumes.

Exit codes: 0 ok, 1 parity failure, 2 bad input (checkpoint, sizes, targets).

The folder's record is the one typed manifest of `cinemo_rt.manifest` (the runtime reads the same
module). With `--targets onnx,tensorrt`, `export.tensorrt_build.build_engine(...) -> EngineEntry` builds
(or reuses) each engine, the manifest records it once, and the engine is verified against PyTorch like
the ONNX graph (TensorRT needs its library and a GPU; without them the target is refused up front).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cinemo_rt.files import file_sha256, give_default_mode
from cinemo_rt.manifest import Component, Manifest, OnnxArtifact, write_json_atomic
from cinemo_rt.settings import SIZE_FILE, Size

from .onnx_export import EXTERNAL_DATA_BYTES, OPSET, export_onnx, module_bytes, prepare_module
from .optimize import optimize_file
from .specs import PRECISIONS, SPECS, Dims, ExportSpec, dims_for
from .verify import ParityError, verify

log = logging.getLogger("export.build_engines")

TARGETS = ("onnx", "tensorrt")


@dataclass(frozen=True)
class BuildOptions:
    checkpoint: Path
    out: Path
    precision: str = "fp32"
    height: int = Size.height
    width: int = Size.width
    frames: int = Size.frames
    targets: tuple[str, ...] = ("onnx",)
    components: tuple[str, ...] = tuple(SPECS)
    verify: bool = True
    # TensorRT (issue 5): a dynamic (min, opt, max) profile instead of the static CFG shapes, a workspace
    # limit in bytes (None: TensorRT's default), refittable engines.
    trt_dynamic: bool = False
    trt_workspace: int | None = None
    trt_refit: bool = False


# ---------------------------------------------------------------------------------------------
# Hashing and the manifest
# ---------------------------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    import onnx
    import onnx_graphsurgeon
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxscript": onnxscript.__version__,
            "onnx_graphsurgeon": onnx_graphsurgeon.__version__, "onnxruntime": onnxruntime.__version__}


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def artifact_key(spec: ExportSpec, weights: str, dims: Dims, precision: str, versions: dict) -> str:
    blob = json.dumps({"weights": weights, "spec": spec.digest(dims), "precision": precision, "opset": OPSET,
                       "versions": versions}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_manifest_or_new(out: Path) -> Manifest:
    try:
        return Manifest.read(out)
    except ValueError as err:  # none yet, unreadable, or from another format: everything is rebuilt
        if (out / "manifest.json").exists():
            log.warning("%s; rebuilding everything", err)
        return Manifest()


def copy_folder_atomic(src: Path, dst: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        give_default_mode(tmp)
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _files_exist(out: Path, onnx: OnnxArtifact | None) -> bool:
    return onnx is not None and all((out / f).is_file() for f in [onnx.file, *onnx.extra_files])


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------
def build(options: BuildOptions) -> Manifest:
    """Run the build; returns the manifest. Raises ParityError, CheckpointError, ValueError."""
    from cinemo_rt.checkpoint import load_checkpoint

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    trt = _tensorrt_hook(options.targets)
    checkpoint = load_checkpoint(options.checkpoint)
    dims = dims_for(checkpoint, options.height, options.width, options.frames)
    versions = library_versions()
    manifest = read_manifest_or_new(out)
    manifest.precision, manifest.opset, manifest.versions = options.precision, OPSET, versions
    manifest.size, manifest.info, manifest.vocab_size = dims.size, dims.info, dims.vocab_size
    _copy_side_files(options.checkpoint, out, manifest)
    # The pipeline's defaults for this folder: the sizes the graphs were built for.
    write_json_atomic(out / SIZE_FILE, dims.size.as_dict())
    save = lambda: manifest.write(out)  # noqa: E731
    save()

    from tqdm import tqdm

    for name in tqdm(options.components, desc="components", unit="graph", disable=None):
        spec = SPECS[name]
        weights = weights_digest(spec.weights_fn(checkpoint))
        key = artifact_key(spec, weights, dims, options.precision, versions)
        entry = manifest.components.get(name)
        if entry is not None and entry.key == key and _files_exist(out, entry.onnx):
            log.info("%s: onnx up to date (%s)", name, key[:12])
        else:
            module = prepare_module(spec, checkpoint, options.precision)
            entry = Component(key, weights, export_and_optimize(spec, module, dims, options.precision, out))
            del module
            manifest.components[name] = entry
            save()
        runtimes = {"onnxruntime": (key, None, None)}
        if trt is not None:
            engine = _build_tensorrt(trt, spec, dims, options, out, manifest)
            save()
            runtimes["tensorrt"] = (engine.key.digest(), lambda: trt.engine_runner(out, manifest, engine),
                                    trt.profile_batches(engine))
        if options.verify:
            _verify(spec, checkpoint, dims, options.precision, out, entry, runtimes, save)
    return manifest


def _verify(spec: ExportSpec, checkpoint, dims: Dims, precision: str, out: Path, entry: Component,
            runtimes: dict, save) -> None:
    """Parity of each runtime's graph against fp32 PyTorch, once per artifact key (recorded in the manifest).
    `runtimes`: name -> (key of what it runs, a function making its runner (None: ONNX Runtime on the CPU),
    the batches it can run (None: the spec's))."""
    reference = None
    for runtime, (key, make_runner, batches) in runtimes.items():
        if entry.parity.get(runtime, {}).get("key") == key:
            log.info("%s: %s parity up to date", spec.name, runtime)
            continue
        reference = reference or prepare_module(spec, checkpoint, "fp32")
        t0 = time.perf_counter()
        try:
            results = verify(spec, out / entry.onnx.file, reference, dims, precision, batches, runtime=runtime,
                             runner=make_runner() if make_runner else None)
        except ParityError as err:
            entry.parity[runtime] = {"key": None, "ok": False, "outputs": [f.as_dict() for f in err.failures]}
            save()
            raise
        entry.parity[runtime] = {"key": key, "ok": True, "reference": "pytorch fp32, cpu",
                                 "shapes": spec.shapes(dims), "seconds": round(time.perf_counter() - t0, 2),
                                 "outputs": [r.as_dict() for r in results]}
        save()


def export_and_optimize(spec: ExportSpec, module, dims: Dims, precision: str, out: Path) -> OnnxArtifact:
    """Export to a scratch folder inside `out`, optimise into `out/<name>.onnx`; returns its manifest record."""
    final = out / f"{spec.name}.onnx"
    external = module_bytes(module) > EXTERNAL_DATA_BYTES
    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}.export.", dir=out))
    try:
        t0 = time.perf_counter()
        raw = export_onnx(spec, module, dims, precision, scratch / "raw.onnx", external_data=external)
        t_export = time.perf_counter() - t0
        log.info("%s: exported with the %s exporter in %.1f s", spec.name, raw.exporter, t_export)
        t0 = time.perf_counter()
        graph = optimize_file(raw.path, final, external_data=external, name=spec.name)
        t_opt = time.perf_counter() - t0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    top = ", ".join(f"{op} {n}" for op, n in list(graph.ops.items())[:8])
    log.info("%s: %d nodes, opset %d; top ops: %s", spec.name, graph.nodes, graph.opset, top)
    return OnnxArtifact(final.name, file_sha256(final), [final.name + ".data"] if external else [], {
        "exporter": raw.exporter, "external_data": external, "precision": precision,
        "shapes": spec.shapes(dims), "profile": spec.profile(dims),
        "dynamic": {k: {str(a): list(v) for a, v in d.items()} for k, d in spec.dynamic.items()},
        "inputs": list(spec.inputs), "outputs": list(spec.outputs),
        "seconds": {"export": round(t_export, 1), "optimize": round(t_opt, 1)}, "graph": graph.as_dict()})


def _build_tensorrt(trt, spec: ExportSpec, dims: Dims, options: BuildOptions, out: Path, manifest: Manifest):
    """Profiles from the spec's shapes; the engine is keyed on the ONNX file's hash and recorded once."""
    onnx = manifest.components[spec.name].onnx
    trt_options = trt.BuildOptions(precision=options.precision, workspace_bytes=options.trt_workspace,
                                   refit=options.trt_refit)
    engine = trt.build_engine(spec.name, out / onnx.file, out,
                              trt.profiles_for(spec, dims, dynamic=options.trt_dynamic), trt_options,
                              onnx_sha256=onnx.sha256, existing=manifest.engines)
    for stale in manifest.upsert_engine(engine):  # replaced builds for this GPU
        (out / trt.ENGINE_SUBDIR / stale.file).unlink(missing_ok=True)
    return engine


def _copy_side_files(checkpoint: Path, out: Path, manifest: Manifest) -> None:
    """Tokenizer and scheduler config, so the engines folder is all the runtime needs."""
    for part in ("tokenizer", "scheduler"):
        src = checkpoint / part
        if not src.is_dir():
            continue
        digest = hashlib.sha256()
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            digest.update(f.relative_to(src).as_posix().encode())
            digest.update(f.read_bytes())
        key = digest.hexdigest()
        if manifest.side_files.get(part) == key and (out / part).is_dir():
            continue
        copy_folder_atomic(src, out / part)
        manifest.side_files[part] = key


def _tensorrt_hook(targets: tuple[str, ...]):
    if "tensorrt" not in targets:
        return None
    if importlib.util.find_spec("tensorrt") is None:
        raise ValueError("--targets tensorrt: the TensorRT Python package is not installed here "
                         "(pip install 'cinemo-rt[tensorrt]' on a machine with a CUDA GPU); use --targets onnx")
    if not torch.cuda.is_available():
        raise ValueError("--targets tensorrt: no CUDA GPU here (engines are built on the GPU they run on); "
                         "use --targets onnx")
    return importlib.import_module(".tensorrt_build", __package__)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> BuildOptions:
    p = argparse.ArgumentParser(prog="python -m export.build_engines", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (released layout)")
    p.add_argument("--out", required=True, type=Path, help="engines folder to create or update")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp16")
    p.add_argument("--height", type=int, default=Size.height)
    p.add_argument("--width", type=int, default=Size.width)
    p.add_argument("--frames", type=int, default=Size.frames, help="generated frames, x_t's F (the video has one more)")
    p.add_argument("--targets", default="onnx", help="comma-separated: onnx,tensorrt")
    p.add_argument("--components", default=",".join(SPECS), help="comma-separated subset of " + ",".join(SPECS))
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime parity check")
    p.add_argument("--trt-dynamic", action="store_true",
                   help="TensorRT: one dynamic profile (batch 1-2) instead of static CFG shapes")
    p.add_argument("--trt-workspace", type=float, default=None, help="TensorRT workspace limit in GiB")
    p.add_argument("--trt-refit", action="store_true", help="TensorRT: build refittable engines")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    targets = tuple(t.strip() for t in a.targets.split(",") if t.strip())
    components = tuple(c.strip() for c in a.components.split(",") if c.strip())
    bad = [t for t in targets if t not in TARGETS] + [c for c in components if c not in SPECS]
    if bad or "onnx" not in targets:
        p.error(f"unknown targets/components {bad}" if bad else "--targets must include onnx")
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return BuildOptions(checkpoint=a.checkpoint, out=a.out, precision=a.precision, height=a.height,
                        width=a.width, frames=a.frames, targets=targets, components=components,
                        verify=not a.no_verify, trt_dynamic=a.trt_dynamic, trt_refit=a.trt_refit,
                        trt_workspace=int(a.trt_workspace * 2**30) if a.trt_workspace else None)


def main(argv: list[str] | None = None) -> int:
    from cinemo_rt.checkpoint import CheckpointError

    options = parse_args(argv)
    try:
        manifest = build(options)
    except ParityError as err:
        log.error("parity check failed: %s", err)
        return 1
    except (CheckpointError, ValueError) as err:
        log.error("%s", err)
        return 2
    log.info("engines folder %s complete (%s, %s)", options.out, options.precision,
             ", ".join(f"{n}: " + (", ".join(f"{r} ok" for r, p in c.parity.items() if p.get("ok")) or "unverified")
                       for n, c in manifest.components.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
