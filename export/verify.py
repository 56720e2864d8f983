"""Build-time parity: run an exported graph with ONNX Runtime and compare it with fp32 PyTorch.

Every output is held to the tolerance named by the graph's precision in `cinemo_rt.parity.TOLERANCES`
(relative L2; max abs error is measured and recorded beside it). The reference is always the fp32 module
run on the same input values (fp16 inputs cast up), so an fp16 graph is judged against the model, not
against PyTorch's own fp16 arithmetic.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from cinemo_rt.parity import TOLERANCES, max_abs_error, relative_error

from .specs import Dims, ExportSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputParity:
    output: str
    batch: int
    relative_l2: float
    max_abs: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.relative_l2 <= self.tolerance

    def as_dict(self) -> dict:
        return {"output": self.output, "batch": self.batch, "relative_l2": self.relative_l2,
                "max_abs": self.max_abs, "tolerance": self.tolerance, "ok": self.ok}


class ParityError(RuntimeError):
    def __init__(self, component: str, failures: list[OutputParity]):
        self.failures = failures
        lines = "; ".join(f"{f.output} (batch {f.batch}): rel L2 {f.relative_l2:.3e} > {f.tolerance:.0e}, "
                          f"max abs {f.max_abs:.3e}" for f in failures)
        super().__init__(f"{component}: ONNX Runtime output differs from PyTorch: {lines}")


def ort_session(path, providers=("CPUExecutionProvider",)):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unfoldable CastLike etc. are noise here
    options.intra_op_num_threads = torch.get_num_threads()  # the thread policy's choice (cinemo_rt.threads)
    return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))


def verify(spec: ExportSpec, onnx_path, reference: torch.nn.Module, dims: Dims, precision: str,
           batches: tuple[int, ...] | None = None, seed: int = 1, session=None) -> list[OutputParity]:
    """Compare every output at each batch (default: the nominal one and, if dynamic, the smallest).
    Raises `ParityError` with the numbers when any output is out of tolerance."""
    session = session or ort_session(onnx_path)
    tolerance = TOLERANCES[precision].relative_l2
    if batches is None:
        lows = [r[1] for axes in spec.dynamic.values() for r in axes.values()]
        batches = tuple(dict.fromkeys([spec.nominal_batch] + ([min(lows)] if lows else [])))
    results = []
    for batch in batches:
        feeds = spec.sample_inputs(dims, precision, batch=batch, seed=seed)
        outputs = session.run(list(spec.outputs), {k: v.numpy() for k, v in feeds.items()})
        with torch.no_grad():
            ref = reference(*[v.float() if v.is_floating_point() else v for v in feeds.values()])
        ref = ref if isinstance(ref, tuple) else (ref,)
        for name, actual, expected in zip(spec.outputs, outputs, ref):
            r = OutputParity(name, batch, relative_error(actual, expected), max_abs_error(actual, expected),
                             tolerance)
            log.info("%s %s: %s batch %d rel L2 %.3e max abs %.3e (tol %.0e) %s", spec.name, precision, name,
                     batch, r.relative_l2, r.max_abs, tolerance, "ok" if r.ok else "FAIL")
            results.append(r)
    failures = [r for r in results if not r.ok]
    if failures:
        raise ParityError(spec.name, failures)
    return results
