"""Microbenchmark of the DCT kernels: median CUDA-event time, achieved bandwidth vs copy.

    python benchmarks/dct_kernels.py [--repeats 100] [--warmup 10] [--dtype float32 float64] [--out DIR]

Ceiling: a device-to-device copy of the same tensor (read + write of N elements) on this device.
Baselines: cupyx.scipy.fft.dctn along the same axis and a torch matrix-multiply DCT.
Writes <out>/dct_kernels-<device>.json and .md (default benchmarks/results/). GPU only: exits 2 without CuPy/CUDA.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = [(1, 4, 15, 40, 64), (8, 4, 16, 128, 128)]  # docs/METHOD.md, DCTInit shape, and a larger batch/latent
RESULTS = ROOT / "benchmarks" / "results"


def median_ms(fn, stream, warmup: int, repeats: int) -> float:
    """Median of per-call CUDA-event times on `stream` after warm-up."""
    import cupy as cp
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def bench_shape(shape, dtype: str, warmup: int, repeats: int) -> list[dict]:
    import cupy as cp
    import cupyx.scipy.fft as cfft
    import torch

    from cinemo_rt._kernels import cupy_dct, reference

    stream = cp.cuda.get_current_stream()
    x = cp.random.standard_normal(shape, dtype=dtype)
    nbytes = x.nbytes
    y = cp.empty_like(x)
    copy_ms = median_ms(lambda: cp.copyto(y, x), stream, warmup, repeats)
    copy_gbs = 2 * nbytes / copy_ms / 1e6
    xt = torch.from_dlpack(x)
    rows = []

    def add(kernel, ms, moved):
        gbs = moved / ms / 1e6
        rows.append({"shape": list(shape), "dtype": dtype, "kernel": kernel, "median_ms": ms,
                     "bytes_moved": moved, "GB_per_s": gbs, "fraction_of_copy": gbs / copy_gbs})

    add("d2d copy (ceiling)", copy_ms, 2 * nbytes)
    for axis in (2, 3, 4):
        n = shape[axis]
        moved = 2 * nbytes + n * n * x.itemsize  # read x, write out, read the basis
        add(f"cinemo dct axis {axis}", median_ms(lambda: cupy_dct.dct(x, axis), stream, warmup, repeats), moved)
        add(f"cinemo idct axis {axis}",
            median_ms(lambda: cupy_dct.dct(x, axis, inverse=True), stream, warmup, repeats), moved)
        add(f"cupyx dctn axis {axis}",
            median_ms(lambda: cfft.dctn(x, axes=[axis], norm="ortho"), stream, warmup, repeats), moved)
        d = torch.as_tensor(reference.dct_matrix(n), device=xt.device, dtype=xt.dtype)
        # torch and cupy both default to the legacy null stream here, so the events time this work too.
        add(f"torch matmul dct axis {axis}",
            median_ms(lambda: torch.movedim(torch.movedim(xt, axis, -1) @ d.T, -1, axis).contiguous(),
                      stream, warmup, repeats), moved)
    z1 = cp.random.standard_normal(shape[:2] + (1,) + shape[3:], dtype=dtype)
    moved = 2 * nbytes + z1.nbytes  # read noise and z1, write out
    add("cinemo dct_init (fused)",
        median_ms(lambda: cupy_dct.dct_init_cuda(z1, x, 6.5173e-5), stream, warmup, repeats), moved)
    return rows


def environment(argv) -> dict:
    import cupy as cp
    import torch
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    return {
        "device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
        "compute_capability": dev.compute_capability,
        "driver": cp.cuda.runtime.driverGetVersion(),
        "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(),
        "cupy": cp.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write(env: dict, rows: list[dict], out: Path = RESULTS) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"dct_kernels-{env['device'].replace(' ', '_')}"
    stem.with_suffix(".json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
    lines = [f"# DCT kernels on {env['device']}", "",
             "  ".join(f"{k}: {v}" for k, v in env.items()), "",
             "| shape | dtype | kernel | median ms | GB/s | of copy |", "|---|---|---|---|---|---|"]
    lines += [f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {r['kernel']} | {r['median_ms']:.4f} | "
              f"{r['GB_per_s']:.1f} | {r['fraction_of_copy']:.0%} |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and Markdown results")
    args = parser.parse_args(argv)
    try:
        import cupy as cp
        if cp.cuda.runtime.getDeviceCount() == 0:
            raise RuntimeError("no CUDA device")
    except Exception as exc:  # ImportError, CUDARuntimeError without a driver, ...
        print(f"dct_kernels: needs CuPy and a CUDA GPU ({exc}); run on the GPU machine", file=sys.stderr)
        return 2
    rows = [r for shape in SHAPES for dtype in args.dtype for r in bench_shape(shape, dtype, args.warmup, args.repeats)]
    stem = write(environment(sys.argv[1:] if argv is None else argv), rows, args.out)
    for r in rows:
        print(f"{'x'.join(map(str, r['shape'])):>16} {r['dtype']:>8} {r['kernel']:<26} {r['median_ms']:8.4f} ms "
              f"{r['GB_per_s']:8.1f} GB/s {r['fraction_of_copy']:6.0%}")
    print(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
