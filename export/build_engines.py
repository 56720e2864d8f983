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

from cinemo_rt.files import file_sha256, give_default_mode, swap_in_folder
from cinemo_rt.interrupts import exit_code_for, terminate_as_interrupt
from cinemo_rt.manifest import MANIFEST, Component, Manifest, OnnxArtifact, write_json_atomic
from cinemo_rt.safe_paths import OutputError, check_owned_folder, same_file
from cinemo_rt.settings import SIZE_FILE

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
    # None: the checkpoint's own size (its cinemo_rt.json), else the released 320x512x15.
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    targets: tuple[str, ...] = ("onnx",)
    components: tuple[str, ...] = tuple(SPECS)
    verify: bool = True
    # TensorRT: a dynamic (min, opt, max) profile instead of the static CFG shapes, a workspace
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


def copy_folder_atomic(src: Path, dst: Path, root: Path | None = None) -> None:
    """Copy the files of `src` into `dst` (replaced whole, safely against a concurrent build). Symbolic
    links are followed only to files inside `root` (default `src`): a link to ~/.ssh or /etc would otherwise
    copy that file's contents into a folder the user may share."""
    files = _contained_files(src, root or src)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        give_default_mode(tmp)
        for relative, path in files:
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / relative)
            give_default_mode(tmp / relative)
        swap_in_folder(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _contained_files(src: Path, root: Path) -> list[tuple[Path, Path]]:
    """(relative path, path) of every file under `src`, sorted; a link resolving outside `root` is refused."""
    root_real = root.resolve()
    files = []
    for folder, dirs, names in os.walk(src, followlinks=False):
        for name in sorted(dirs + names):
            path = Path(folder) / name
            if path.is_symlink():
                target = path.resolve()
                if target != root_real and root_real not in target.parents:
                    raise ValueError(f"{path} is a symbolic link to {target}, outside {root}; refusing to copy "
                                     f"it into the engines folder. Copy the real files in (cp -L) and rebuild")
                if target.is_dir():
                    raise ValueError(f"{path} is a symbolic link to a folder; replace it with the real files")
            if path.is_file():
                files.append((path.relative_to(src), path))
    return sorted(files)


# What an engines folder holds; anything else in --out is the user's and makes the build refuse the folder.
_ENGINES_ENTRIES = (MANIFEST, SIZE_FILE, "tokenizer", "scheduler", "tensorrt")
_OUR_TEMPORARIES = tuple(f".{name}." for name in (MANIFEST, SIZE_FILE, "tokenizer", "scheduler", *SPECS))


def owns_engines_entry(name: str) -> bool:
    return (name in _ENGINES_ENTRIES or name.endswith((".onnx", ".onnx.data"))
            or name.startswith(_OUR_TEMPORARIES))


def check_out_folder(checkpoint: Path, out: Path) -> None:
    """--out is written into, so it must be an engines folder (or new, or empty), never the checkpoint."""
    if out.exists() and checkpoint.exists() and same_file(out, checkpoint):
        raise OutputError(f"--out {out} is the checkpoint folder; give a separate folder for the engines "
                          "(e.g. --out engines)")
    check_owned_folder(out, owns_engines_entry, "an engines folder")


def drop_stale_components(manifest: Manifest, precision: str, dims: Dims) -> Manifest:
    """A build at another precision or size replaces every graph; forget the old entries before the new
    top-level fields are saved, so an interrupted rebuild never leaves a manifest that disagrees with its
    graphs (the old entries would claim fp16 graphs under an fp32 header, or the reverse)."""
    if manifest.components and (manifest.precision != precision or manifest.size != dims.size):
        log.info("precision or size changed (%s %s -> %s %s): rebuilding every component",
                 manifest.precision, manifest.size, precision, dims.size)
        manifest.components = {}
    return manifest


def _files_exist(out: Path, onnx: OnnxArtifact | None) -> bool:
    return onnx is not None and all((out / f).is_file() for f in [onnx.file, *onnx.extra_files])


# ---------------------------------------------------------------------------------------------
# The build
# ---------------------------------------------------------------------------------------------
def build(options: BuildOptions) -> Manifest:
    """Run the build; returns the manifest. Raises ParityError, CheckpointError, ValueError."""
    from cinemo_rt.checkpoint import load_checkpoint

    out = options.out
    check_out_folder(options.checkpoint, out)
    trt = _tensorrt_hook(options.targets)
    height, width, frames = check_build_size(options)  # before any model is loaded or folder made
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = load_checkpoint(options.checkpoint)
    dims = dims_for(checkpoint, height, width, frames)
    versions = library_versions()
    manifest = drop_stale_components(read_manifest_or_new(out), options.precision, dims)
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


# Tracing, the exported graph's constant folding and the ONNX Runtime parity run hold about two copies of
# the run's activations; the build that the OOM killer ended at 21.8 GB is estimated at 26 GiB here.
EXPORT_MEMORY_FACTOR = 2


def check_build_size(options: BuildOptions) -> tuple[int, int, int]:
    """(height, width, frames) of the build: the flags, else the checkpoint's `cinemo_rt.json`; refused with
    the estimate when the export would need more memory than is available."""
    from cinemo_rt.limits import (available_memory, check_output_size, checkpoint_estimate_inputs,
                                  estimate_run_bytes, size_defaults)

    if not Path(options.checkpoint).is_dir():
        raise ValueError(f"checkpoint folder {options.checkpoint} does not exist; pass --checkpoint DIR with the "
                         "released layout (see docs/checkpoints.md)")
    defaults = size_defaults(options.checkpoint)
    height, width = options.height or defaults["height"], options.width or defaults["width"]
    frames = options.frames or defaults["frames"]
    estimate = EXPORT_MEMORY_FACTOR * estimate_run_bytes(
        height, width, frames, attention_scores=True, **checkpoint_estimate_inputs(options.checkpoint))
    check_output_size(height, width, frames, estimate=estimate, defaults=defaults, memory=available_memory(),
                      what="exporting and verifying the graphs")
    log.info("building for %dx%d (height x width), %d frames (%s); estimated peak memory %.1f GiB", height, width,
             frames, "from the flags" if options.height or options.width or options.frames else
             f"the checkpoint's {defaults_source(options.checkpoint)}", estimate / 2**30)
    return height, width, frames


def defaults_source(folder: Path) -> str:
    return SIZE_FILE if (Path(folder) / SIZE_FILE).is_file() else "released default size"


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
        for relative, f in _contained_files(src, checkpoint):
            digest.update(relative.as_posix().encode())
            digest.update(f.read_bytes())
        key = digest.hexdigest()
        if manifest.side_files.get(part) == key and (out / part).is_dir():
            continue
        copy_folder_atomic(src, out / part, root=checkpoint)
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
def _size(value: str) -> int:
    number = _frames(value)
    if number % 8:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 (the VAE's factor); got {number}")
    return number


def _frames(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1; got {number}")
    return number


def parse_args(argv: list[str] | None = None) -> BuildOptions:
    p = argparse.ArgumentParser(prog="python -m export.build_engines", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (released layout)")
    p.add_argument("--out", required=True, type=Path, help="engines folder to create or update")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp16")
    p.add_argument("--height", type=_size, default=None,
                   help=f"output height, a multiple of 8 (default: the checkpoint's {SIZE_FILE}, else 320); "
                        "lower it, or --width/--frames, when memory is short")
    p.add_argument("--width", type=_size, default=None,
                   help="output width, a multiple of 8 (default: the checkpoint's, else 512)")
    p.add_argument("--frames", type=_frames, default=None,
                   help="generated frames, x_t's F; the video has one more (default: the checkpoint's, else 15)")
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
    with terminate_as_interrupt():  # SIGTERM cleans up like Ctrl-C: no .unet.export.* or .tmp left behind
        try:
            manifest = build(options)
        except ParityError as err:
            log.error("parity check failed: %s", err)
            return 1
        except (CheckpointError, ValueError) as err:
            log.error("%s", err)
            return 2
        except OSError as err:  # disk full, file too large, read-only place
            log.error("cannot write the engines folder %s: %s; free some space or choose another --out",
                      options.out, err.strerror or err)
            return 2
        except KeyboardInterrupt as interrupt:
            log.error("interrupted; finished components are kept and the next run resumes from them")
            return exit_code_for(interrupt)
    log.info("engines folder %s complete (%s, %s)", options.out, options.precision,
             ", ".join(f"{n}: " + (", ".join(f"{r} ok" for r, p in c.parity.items() if p.get("ok")) or "unverified")
                       for n, c in manifest.components.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
