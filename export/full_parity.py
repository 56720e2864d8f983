"""Full-size UNet (released architecture, random weights): export with external data, optimise, and compare
ONNX Runtime (CPU, fp32) with PyTorch at a small latent size.

    python -m export.full_parity --height 64 --width 64 --batch 1 --out /tmp/unet_full

Prints one JSON line with timings, graph report and parity; `benchmarks/results/onnx_full_parity.md`
records a measured run. `--no-run` stops after the graph checks (what the slow test does).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from cinemo_rt.backends.base import ModelInfo
from cinemo_rt.model import UNet3D, full_config

from .build_engines import export_and_optimize
from .specs import UNET, Dims
from .verify import ort_session, verify


def full_unet(seed: int = 0) -> UNet3D:
    torch.manual_seed(seed)
    return UNet3D(full_config()).eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m export.full_parity", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--frames", type=int, default=15)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-run", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    a.out.mkdir(parents=True, exist_ok=True)
    dims = Dims(height=a.height, width=a.width, frames=a.frames, info=ModelInfo(text_dim=768))
    unet = full_unet()
    t0 = time.perf_counter()
    onnx = export_and_optimize(UNET, unet, dims, "fp32", a.out)
    result = {"dims": [a.height, a.width, a.frames], "export_and_optimize_s": round(time.perf_counter() - t0, 1),
              "graph": {k: onnx.details["graph"][k] for k in ("nodes", "opset", "ops", "inputs", "outputs")},
              "files": {f: (a.out / f).stat().st_size for f in [onnx.file, *onnx.extra_files]}}
    if not a.no_run:
        t0 = time.perf_counter()
        session = ort_session(a.out / onnx.file)
        parity = verify(UNET, a.out / onnx.file, unet, dims, "fp32", batches=(a.batch,), session=session)
        result["parity"] = [r.as_dict() for r in parity]
        result["ort_session_and_run_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
