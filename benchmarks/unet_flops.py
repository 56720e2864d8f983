"""How close one eager UNet call runs to this CPU's floor: its arithmetic against its time, per layer kind.

    python benchmarks/unet_flops.py                  # full width, 8x8 and 16x16 latents, 16 frames, CFG batch 2
    python benchmarks/unet_flops.py --sizes 16 --repeats 1

The floating-point work of one call is counted from the shapes (a meta-device forward with hooks: 2 * output
elements * inputs per output, per convolution and linear layer); the time is a profiled call on 1 thread
(self CPU time of oneDNN's convolution, and of addmm/mm, which the linear layers and the small-map
convolutions of `model/conv.py` run as). Achieved GFLOP/s per kind says how much faster any implementation
of the same layers could be on this core. Results: benchmarks/results/unet_flops.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cinemo_rt.model import UNet3D, full_config  # noqa: E402

FRAMES = 15  # generated frames; the UNet sees z1 too: 16
CONV_OPS = ("aten::mkldnn_convolution",)
MATMUL_OPS = ("aten::addmm", "aten::mm", "aten::bmm")


def inputs(config, size: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    make = (lambda *shape: torch.randn(*shape, generator=g)) if device == "cpu" else \
        (lambda *shape: torch.empty(*shape, device=device))
    return (make(2, 4, FRAMES, size, size), torch.full((2,), 500, device=device),
            make(2, 77, config.cross_attention_dim), make(2, 4, 1, size, size), torch.full((2,), 90.0, device=device))


def count_flops(config, size: int) -> dict[str, float]:
    """GFLOP of one call by layer kind, from the shapes alone (nothing is computed)."""
    with torch.device("meta"):
        unet = UNet3D(config).eval()
    flops = {"convolution": 0, "linear": 0}

    def conv(module, args, out):
        flops["convolution"] += 2 * out.numel() * module.weight[0].numel()

    def linear(module, args, out):
        flops["linear"] += 2 * out.numel() * module.weight.shape[1]

    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(conv)
        elif isinstance(module, torch.nn.Linear):
            module.register_forward_hook(linear)
    with torch.no_grad():
        unet(*inputs(config, size, "meta"))
    return {kind: value / 1e9 for kind, value in flops.items()}


def measure(unet, config, size: int, repeats: int) -> dict:
    """Median CPU seconds of a call, and a profiled call's self CPU seconds per op group."""
    args = inputs(config, size)
    with torch.no_grad():
        unet(*args)  # warm-up
        seconds = []
        for _ in range(repeats):
            start = time.process_time()
            unet(*args)
            seconds.append(time.process_time() - start)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            unet(*args)
    by_op = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    return {"call_s": median(seconds), "convolution_s": sum(by_op.get(op, 0.0) for op in CONV_OPS),
            "matmul_s": sum(by_op.get(op, 0.0) for op in MATMUL_OPS), "profiled_s": sum(by_op.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = full_config()
    with torch.device("meta"):
        unet = UNet3D(config)
    unet = unet.to_empty(device="cpu").eval()  # random weights: the time does not depend on their values
    for parameter in unet.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    load_start = os.getloadavg()[0]
    rows = []
    for size in args.sizes:
        flops = count_flops(config, size)
        timing = measure(unet, config, size, args.repeats)
        rows.append({"size": size, **{f"{k}_gflop": v for k, v in flops.items()}, **timing})
        print(f"{size}x{size}: {rows[-1]}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cores": os.cpu_count(),
            "load_average": [round(load_start, 1), round(os.getloadavg()[0], 1)], "threads": 1}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "unet_flops.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = ["# One eager UNet call against the arithmetic it does (full width, CFG batch 2, 16 frames, fp32, 1 thread)",
             "", f"Command: `python benchmarks/unet_flops.py --sizes {' '.join(map(str, args.sizes))} --repeats "
             f"{args.repeats}`  ", f"Date: {meta['date']}; torch {meta['torch']}, Python {meta['python']}, "
             f"{meta['machine']}, {meta['cores']} cores; load average {meta['load_average'][0]} at the start, "
             f"{meta['load_average'][1]} at the end (shared machine)", "",
             "| latents | conv GFLOP | linear GFLOP | call CPU s (median) | oneDNN conv s | addmm/mm/bmm s | "
             "conv GFLOP/s | matmul GFLOP/s | all GFLOP/s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        total = r["convolution_gflop"] + r["linear_gflop"]
        lines.append(f"| {r['size']}x{r['size']} | {r['convolution_gflop']:.0f} | {r['linear_gflop']:.0f} | "
                     f"{r['call_s']:.2f} | {r['convolution_s']:.2f} | {r['matmul_s']:.2f} | "
                     f"{r['convolution_gflop'] / max(r['convolution_s'], 1e-9):.0f}* | "
                     f"{r['linear_gflop'] / max(r['matmul_s'], 1e-9):.0f}* | {total / r['call_s']:.0f} |")
    lines += ["", "*Per kind, the GFLOP of that kind over the time of its ops: the small-map convolutions run as "
              "GEMMs (`model/conv.py`), so their work is counted under convolutions but timed under addmm, and their "
              "padding taps are skipped; the last column, all work over the whole call, is the one to read against "
              "the core's peak."]
    (out / "unet_flops.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'unet_flops.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
