"""Graph clean-up after export: named passes, each logged with the node count it leaves, and a report.

Passes (in order): onnx-graphsurgeon `cleanup` + `toposort` (dead nodes, unused initializers), graphsurgeon
`fold_constants` with shape folding (Shape/Gather/Reshape chains over static dims become constants; the
constant subgraphs are evaluated with ONNX Runtime), a second cleanup, then ONNX shape inference with
data propagation so every intermediate has a shape for TensorRT and for reading the graph.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

_TWO_GB = 2 ** 31


@dataclass(frozen=True)
class GraphReport:
    nodes: int
    ops: dict[str, int]
    opset: int
    inputs: dict[str, list]  # name -> [elem type, dims]
    outputs: dict[str, list]
    ellipsis_einsums: int = 0
    passes: list[tuple[str, int]] = field(default_factory=list)  # (pass, node count after it)

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "ops": self.ops, "opset": self.opset, "inputs": self.inputs,
                "outputs": self.outputs, "ellipsis_einsums": self.ellipsis_einsums,
                "passes": [list(p) for p in self.passes]}


def _io(values) -> dict[str, list]:
    out = {}
    for v in values:
        t = v.type.tensor_type
        out[v.name] = [onnx.TensorProto.DataType.Name(t.elem_type).lower(),
                       [d.dim_param or d.dim_value for d in t.shape.dim]]
    return out


def report(model: onnx.ModelProto, passes: list[tuple[str, int]] | None = None) -> GraphReport:
    ops = Counter(n.op_type for n in model.graph.node)
    ellipsis = sum(1 for n in model.graph.node if n.op_type == "Einsum"
                   and any(a.name == "equation" and b"..." in a.s for a in n.attribute))
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return GraphReport(nodes=len(model.graph.node), ops=dict(ops.most_common()), opset=opset,
                       inputs=_io(model.graph.input), outputs=_io(model.graph.output),
                       ellipsis_einsums=ellipsis, passes=list(passes or []))


def optimize(model: onnx.ModelProto, name: str = "graph") -> tuple[onnx.ModelProto, GraphReport]:
    """Run the passes on `model` (weights loaded in memory) and return the cleaned model and its report."""
    import onnx_graphsurgeon as gs

    passes: list[tuple[str, int]] = [("exported", len(model.graph.node))]

    def step(pass_name: str, graph) -> None:
        passes.append((pass_name, len(graph.nodes)))
        log.info("%s: %-28s -> %d nodes", name, pass_name, len(graph.nodes))

    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    step("gs.cleanup+toposort", graph)
    try:
        graph.fold_constants(fold_shapes=True, partitioning="basic", error_ok=True)
        graph.cleanup().toposort()
        step("gs.fold_constants", graph)
    except Exception as err:  # noqa: BLE001 - a failed fold leaves a correct graph; say so and go on
        log.warning("%s: gs.fold_constants skipped (%s)", name, err)
    model = gs.export_onnx(graph, do_type_check=True)
    model = infer_shapes(model)
    passes.append(("onnx.shape_inference", len(model.graph.node)))
    log.info("%s: %-28s -> %d nodes", name, "onnx.shape_inference", len(model.graph.node))
    result = report(model, passes)
    if result.ellipsis_einsums:
        raise ValueError(f"{name}: {result.ellipsis_einsums} Einsum nodes with an ellipsis equation remain; "
                         "TensorRT handles them poorly. Rewrite them as MatMul in the model.")
    return model, result


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX shape inference; models over 2 GB go through a file, as the in-memory API cannot take them."""
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights < _TWO_GB - 100_000_000:  # ByteSize() itself fails past 2 GB
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.onnx"), os.path.join(tmp, "out.onnx")
        onnx.save_model(model, src, save_as_external_data=True, location="in.data")
        onnx.shape_inference.infer_shapes_path(src, dst, data_prop=True)
        return onnx.load(dst, load_external_data=True)


def optimize_file(src: str | os.PathLike, dst: str | os.PathLike, external_data: bool,
                  name: str = "graph") -> GraphReport:
    from .onnx_export import save_model

    model = onnx.load(str(src), load_external_data=True)
    model, result = optimize(model, name)
    save_model(model, Path(dst), external_data)
    return result
