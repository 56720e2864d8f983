"""Export one `ExportSpec` to an ONNX file with torch.onnx (the dynamo exporter, opset 18).

Findings behind the choices (torch 2.13, measured on the tiny and full UNet):
- The TorchScript exporter (`dynamo=False`) fails on the UNet ("All tensors must have the same rank" in
  `cat`); the dynamo exporter traces it, so it is the default, with the TorchScript exporter as fallback
  for any component it fails on. The manifest records which exporter produced each graph.
- fp16 graphs are exported from an fp16 copy of the module (no post-hoc conversion), so every op runs in
  the dtype PyTorch runs it in. LayerNorm and the temporal decoder's GroupNorm export as
  LayerNormalization / InstanceNormalization, which accumulate in fp32 in ONNX Runtime and TensorRT.
  The result is checked numerically against fp32 PyTorch at build time (verify.py).
- Graphs are written to a temporary name and renamed into place, so an interrupted export leaves no
  file under the final name; weights go to one external-data file when the model is large.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from .specs import PRECISIONS, Dims, ExportSpec

log = logging.getLogger(__name__)

OPSET = 18
EXTERNAL_DATA_BYTES = 1_500_000_000  # protobuf's hard limit is 2 GB; stay well clear of it


@dataclass(frozen=True)
class ExportResult:
    path: Path
    exporter: str  # "dynamo" or "torchscript"
    external_data: bool


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def prepare_module(spec: ExportSpec, checkpoint, precision: str) -> torch.nn.Module:
    """The wrapper to export, on the CPU in the requested precision (a copy when a cast is needed)."""
    module = spec.module_fn(checkpoint).eval()
    dtype = PRECISIONS[precision]
    first = next(module.parameters())
    if first.dtype != dtype or first.device.type != "cpu":
        module = copy.deepcopy(module).to("cpu", dtype)
    return module.requires_grad_(False)


def export_onnx(spec: ExportSpec, module: torch.nn.Module, dims: Dims, precision: str, path: str | os.PathLike,
                external_data: bool | None = None, exporter: str | None = None) -> ExportResult:
    """Export `module` (from `prepare_module`) to `path` atomically. Returns what was done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = module_bytes(module) > EXTERNAL_DATA_BYTES
    args = tuple(spec.sample_inputs(dims, precision).values())
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        tmp_path = tmp / path.name
        used = _export(spec, module, args, tmp_path, exporter or spec.exporter)
        save_model(onnx.load(str(tmp_path), load_external_data=True), path, external_data)
        return ExportResult(path=path, exporter=used, external_data=external_data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _export(spec: ExportSpec, module, args, path: Path, exporter: str) -> str:
    if exporter == "dynamo":
        try:
            with _quiet():
                program = torch.onnx.export(
                    module, args, None, input_names=list(spec.inputs), output_names=list(spec.outputs),
                    dynamic_shapes=spec.torch_dynamic_shapes(), dynamo=True, opset_version=OPSET,
                    optimize=True, verbose=False)
            program.save(str(path), external_data=True)
            return "dynamo"
        except Exception as err:  # noqa: BLE001 - any exporter failure falls back, and is logged
            _raise_if_disk_error(err)  # a full disk is not the exporter's failure: the fallback would fail too
            log.warning("%s: dynamo exporter failed (%s: %s); falling back to the TorchScript exporter",
                        spec.name, type(err).__name__, str(err).splitlines()[0][:300])
    dynamic_axes = {name: {axis: label for axis, (label, _, _) in axes.items()}
                    for name, axes in spec.dynamic.items()}
    batch_labels = {label for axes in dynamic_axes.values() for label in axes.values()}
    for out in spec.outputs:  # outputs follow the leading dynamic axis
        if batch_labels:
            dynamic_axes[out] = {0: sorted(batch_labels)[0]}
    try:
        with _quiet():
            torch.onnx.export(module, args, str(path), input_names=list(spec.inputs),
                              output_names=list(spec.outputs), dynamic_axes=dynamic_axes, dynamo=False,
                              opset_version=OPSET)
    except Exception as err:
        _raise_if_disk_error(err)
        raise
    return "torchscript"


_DISK_ERRORS = {errno.ENOSPC: "No space left on device", errno.EROFS: "Read-only file system",
                errno.EFBIG: "File too large", errno.EDQUOT: "Disk quota exceeded"}


def _raise_if_disk_error(err: BaseException) -> None:
    """An OSError of writing (disk full, read-only, too large, quota) anywhere in `err`'s chain, or named in
    the text of a library's wrapper exception, raised as the OSError the build reports in one line."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _DISK_ERRORS:
            raise seen
        seen = seen.__cause__ or seen.__context__
    text = str(err)
    for number, words in _DISK_ERRORS.items():
        if words in text:
            raise OSError(number, words) from err


def save_model(model: onnx.ModelProto, path: Path, external_data: bool) -> None:
    """Write `model` to `path` (and `path.data` when external) via a temporary name + rename."""
    path = Path(path)
    data_name = path.name + ".data"
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        if external_data:
            onnx.save_model(model, str(tmp / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
            os.replace(tmp / data_name, path.parent / data_name)
        else:
            onnx.save_model(model, str(tmp / path.name))
            with contextlib.suppress(FileNotFoundError):
                (path.parent / data_name).unlink()
        os.replace(tmp / path.name, path)  # the .onnx appears last: it is what marks the artifact complete
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings by the hundred; keep the build log readable."""
    names = ("torch.onnx", "torch._export", "torch.export", "onnxscript", "onnx_ir")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, \
            contextlib.redirect_stdout(devnull):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
