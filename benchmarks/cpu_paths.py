"""The CPU paths side by side: one UNet call (CFG batch 2) of eager PyTorch, torch-fast and ONNX Runtime.

    python benchmarks/cpu_paths.py                                # full width at 8x8 and 16x16 latents + tiny
    python benchmarks/cpu_paths.py --before e1fe71a               # also the reference model of that commit
    python benchmarks/cpu_paths.py --onnx-full                    # also ONNX Runtime at full width (export ~8 min)
    python benchmarks/cpu_paths.py --sizes 8 --repeats 2 --no-full  # quick: the tiny config only

Every path runs on the same weights, 1 thread, fp32, 16 frames (z1 + 15 generated). Calls are interleaved:
each round runs every path once, in turn, so a change in the machine's load touches all paths alike; the
figure is the median over `--repeats` rounds after `--warmup` rounds. One more call per path runs under
torch's profiler (ONNX Runtime: its own node profiler) for the time per op type. `--before REV` loads
`cinemo_rt/model` of git revision REV from a temporary copy and runs it on the same weight tensors (the
before/after of a model change, in one run). Results: benchmarks/results/cpu_paths.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cinemo_rt.backends.fast_torch import CONV_LAYOUTS, optimize_unet  # noqa: E402
from cinemo_rt.model import UNet3D, full_config  # noqa: E402
from cinemo_rt.parity import relative_error  # noqa: E402

log = logging.getLogger("cpu_paths")
FRAMES = 15  # generated frames; the UNet sees z1 too: 16
TINY = ROOT / "cinemo_rt" / "assets" / "demo" / "unet"


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
def model_before(rev: str, scratch: Path):
    """`cinemo_rt.model` as of git revision `rev`, importable as `cinemo_before.model`."""
    package = scratch / "cinemo_before"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    files = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", rev, "cinemo_rt/model/"],
                           capture_output=True, text=True, check=True).stdout.split()
    for name in [*files, "cinemo_rt/residuals.py"]:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], capture_output=True, text=True,
                              check=True).stdout
        (package / name.removeprefix("cinemo_rt/")).write_text(text)
    sys.path.insert(0, str(scratch))
    return importlib.import_module("cinemo_before.model")


def sharing_weights(model_cls, config, unet: UNet3D) -> torch.nn.Module:
    """A `model_cls` over `unet`'s own tensors (no second copy of the weights)."""
    with torch.device("meta"):
        other = model_cls(config)
    other.load_state_dict(unet.state_dict(), assign=True)
    return other.eval()


def inputs(config, size: int, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, FRAMES, size, size, generator=g), torch.full((batch,), 500),
            torch.randn(batch, 77, config.cross_attention_dim, generator=g),
            torch.randn(batch, 4, 1, size, size, generator=g), torch.full((batch,), 90.0))


def onnx_unet(unet: UNet3D, size: int, folder: Path) -> Path:
    """The UNet exported for `size` latents (reused from `folder` when there); returns the .onnx path."""
    sys.path.insert(0, str(ROOT))
    from cinemo_rt.backends.base import ModelInfo
    from export.build_engines import export_and_optimize
    from export.specs import UNET, Dims

    path = folder / "unet.onnx"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        dims = Dims(height=size * 8, width=size * 8, frames=FRAMES,
                    info=ModelInfo(text_dim=unet.config.cross_attention_dim))
        t0 = time.perf_counter()
        export_and_optimize(UNET, unet, dims, "fp32", folder)
        log.info("exported %s in %.0f s", path, time.perf_counter() - t0)
    return path


class OrtCall:
    """One ONNX Runtime CPU session (with its node profiler) called like the UNet."""

    def __init__(self, path: Path, profile_prefix: str):
        import onnxruntime as ort

        from cinemo_rt.backends.onnxruntime_backend import session_options

        options = session_options()
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
        t0 = time.perf_counter()
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.creation_s = time.perf_counter() - t0
        self.names = [i.name for i in self.session.get_inputs()]
        self.runs = 0

    def __call__(self, *args):
        self.runs += 1
        return torch.from_numpy(self.session.run(None, {n: a.numpy() for n, a in zip(self.names, args)})[0])

    def ms_per_op(self) -> dict[str, float]:
        """Time per op type per call from the node profiler's trace (all runs so far, warm-up included)."""
        events = json.loads(Path(self.session.end_profiling()).read_text())
        totals: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e["args"].get("op_name", "?")
                totals[op] = totals.get(op, 0.0) + e["dur"] / 1000
        return {op: ms / max(self.runs, 1) for op, ms in totals.items()}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------
def torch_ms_per_op(fn, calls: int) -> dict[str, float]:
    """Self CPU time per aten op, per call (mean over `calls` calls)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    return {e.key: e.self_cpu_time_total / 1000 / calls for e in prof.key_averages() if e.self_cpu_time_total > 0}


def top_ops(ms: dict[str, float], n: int = 8) -> dict[str, float]:
    ranked = sorted(ms.items(), key=lambda kv: -kv[1])
    out = {k: round(v, 1) for k, v in ranked[:n]}
    out["other"] = round(sum(v for _, v in ranked[n:]), 1)
    return out


def measure(paths: dict, warmup: int, repeats: int) -> tuple[dict[str, dict[str, list[float]]], dict]:
    """Interleaved: every round runs each path once, in alternating order. Returns per path the timed rounds'
    wall and CPU seconds (process CPU time: with one thread, the time the call computed, not the time it
    waited for a core on a shared machine) and each path's first output (for parity)."""
    seconds = {name: {"wall": [], "cpu": []} for name in paths}
    outputs = {}
    for round_ in range(warmup + repeats):
        order = list(paths) if round_ % 2 == 0 else list(reversed(paths))
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            out = paths[name]()
            if round_ >= warmup:
                seconds[name]["wall"].append(time.perf_counter() - t0)
                seconds[name]["cpu"].append(time.process_time() - c0)
            outputs.setdefault(name, out)
        log.info("round %d/%d: %s", round_ + 1, warmup + repeats,
                 ", ".join(f"{n} {s['cpu'][-1]:.2f} s CPU ({s['wall'][-1]:.2f} wall)"
                           for n, s in seconds.items() if s["cpu"]))
    return seconds, outputs


def compare(name: str, config, unet: UNet3D, before_model, sizes: list[int], args, onnx: bool) -> dict:
    """Every path on `unet`'s weights at each latent size; seconds per call, op profile, parity."""
    eager = unet
    # Each FastUNet over its own module tree sharing `unet`'s tensors: fusing q/k/v or converting conv weights
    # to channels_last re-points that tree's parameters and leaves the eager model's as they are.
    fast = {layout: optimize_unet(sharing_weights(UNet3D, config, unet), conv_layout=layout)
            for layout in CONV_LAYOUTS}
    results = {}
    for size in sizes:
        x_t, t, text, z1, motion = inputs(config, size)
        calls = {}
        if before_model is not None:
            calls["eager (before)"] = lambda: before_model(x_t, t, text, z1, motion)
        calls["eager"] = lambda: eager(x_t, t, text, z1, motion)
        for layout, f in fast.items():
            context = f.prepare(text)  # once per video, as the backend does
            calls[f"torch-fast ({layout})"] = lambda f=f, context=context: f(x_t, t, context, z1, motion)
        ort = None
        if onnx:
            folder = Path(args.work) / f"{name}-{size}"
            ort = OrtCall(onnx_unet(unet, size, folder), str(folder / "ort-profile"))
            calls["onnxruntime"] = lambda: ort(x_t, t, text, z1, motion)
        with torch.inference_mode():
            seconds, outputs = measure(calls, args.warmup, args.repeats)
            parity = {n: relative_error(out, outputs["eager"]) for n, out in outputs.items() if n != "eager"}
            ops = {}
            if size in args.profile_sizes or name == "tiny":
                ops = {n: top_ops(torch_ms_per_op(fn, args.profile_calls))
                       for n, fn in calls.items() if n != "onnxruntime"}
        if ort is not None:
            ops["onnxruntime"] = top_ops(ort.ms_per_op())
        base = median(seconds["eager"]["cpu"])
        results[f"{size}x{size}"] = {
            "latents": [size, size], "frames": FRAMES + 1, "batch": 2,
            "paths": {n: {"median_cpu_s": round(median(s["cpu"]), 4), "min_cpu_s": round(min(s["cpu"]), 4),
                          "max_cpu_s": round(max(s["cpu"]), 4), "median_wall_s": round(median(s["wall"]), 4),
                          "speedup_vs_eager": round(base / median(s["cpu"]), 3),
                          "rel_l2_vs_eager": None if n == "eager" else float(f"{parity[n]:.3g}"),
                          "ms_per_op": ops.get(n), "cpu_s": s["cpu"], "wall_s": s["wall"]}
                      for n, s in seconds.items()},
            "onnxruntime_session_creation_s": None if ort is None else round(ort.creation_s, 1),
            "profile_calls": args.profile_calls if ops else 0,
        }
        log.info("%s %dx%d: %s", name, size, size,
                 ", ".join(f"{n} {median(s['cpu']):.3f} s CPU" for n, s in seconds.items()))
    return results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def environment() -> dict:
    import onnxruntime

    return {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_average_start": os.getloadavg()}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# CPU paths side by side: one UNet call, CFG batch 2, fp32, {env['threads']} thread", "",
             f"Command: `{report['command']}`  ", f"Date: {report['created']}  ",
             f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, Python {env['python']}, {env['cpu']}, "
             f"{env['cores']} cores; load average {env['load_average_start'][0]:.1f} at the start, "
             f"{report['load_average_end'][0]:.1f} at the end (the machine is shared)  ",
             f"Median of {report['repeats']} interleaved rounds after {report['warmup']} warm-up", ""]
    for model, sizes in report["models"].items():
        for size, r in sizes.items():
            lines += [f"## {model}, {size} latents, {r['frames']} frames", "",
                      "| path | median CPU s | min-max CPU s | vs eager (CPU) | median wall s | rel. L2 vs eager |",
                      "|---|---|---|---|---|---|"]
            for n, p in r["paths"].items():
                err = "-" if p["rel_l2_vs_eager"] is None else f"{p['rel_l2_vs_eager']:.1e}"
                lines.append(f"| {n} | {p['median_cpu_s']:.3f} | {p['min_cpu_s']:.3f}-{p['max_cpu_s']:.3f} | "
                             f"{p['speedup_vs_eager']:.2f}x | {p['median_wall_s']:.3f} | {err} |")
            if r["onnxruntime_session_creation_s"] is not None:
                lines += ["", f"ONNX Runtime session creation: {r['onnxruntime_session_creation_s']} s "
                              "(paid once per process, before the first call)"]
            if not r["profile_calls"]:
                lines.append("")
                continue
            lines += ["", f"Time per op type, ms per call (torch: self CPU time per aten op, over "
                          f"{r['profile_calls']} profiled call(s); ONNX Runtime: node time per op type over "
                          "its timed and warm-up calls):", ""]
            for n, p in r["paths"].items():
                if p["ms_per_op"]:
                    lines.append(f"- {n}: " + ", ".join(f"{op} {ms:g}" for op, ms in p["ms_per_op"].items()))
            lines.append("")
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8, 16], help="full-width latent sizes (square)")
    p.add_argument("--no-full", action="store_true", help="the tiny config only")
    p.add_argument("--before", metavar="REV", help="also the reference model of this git revision")
    p.add_argument("--onnx-full", action="store_true", help="also ONNX Runtime at full width (slow export)")
    p.add_argument("--no-onnx", action="store_true", help="no ONNX Runtime, not even at the tiny config")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny-repeats", type=int, default=20)
    p.add_argument("--profile-calls", type=int, default=1, help="calls per path under the profiler")
    p.add_argument("--profile-sizes", type=int, nargs="*", default=[8],
                   help="full-width latent sizes to profile per op type (the tiny config always is)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cinemo_cpu_paths"),
                   help="exported ONNX graphs are kept here and reused")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    report = {"command": "python benchmarks/cpu_paths.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "environment": environment(),
              "warmup": args.warmup, "repeats": args.repeats, "models": {}}
    with tempfile.TemporaryDirectory() as scratch:
        before = model_before(args.before, Path(scratch)) if args.before else None

        tiny_config = UNet3D.from_config(TINY).config
        tiny = UNet3D(tiny_config).eval()
        tiny_args = argparse.Namespace(**{**vars(args), "repeats": args.tiny_repeats, "warmup": 3,
                                           "profile_calls": 10})
        tiny_before = sharing_weights(before.UNet3D, tiny_config, tiny) if before else None
        report["models"]["tiny (demo config)"] = compare("tiny", tiny_config, tiny, tiny_before,
                                                         [tiny_config.sample_size], tiny_args, onnx=not args.no_onnx)
        if not args.no_full:
            config = full_config()
            log.info("building the full-width UNet (911 M parameters, random weights)")
            unet = UNet3D(config).eval().requires_grad_(False)
            full_before = sharing_weights(before.UNet3D, config, unet) if before else None
            report["models"]["full width"] = compare("full", config, unet, full_before, args.sizes, args,
                                                     onnx=args.onnx_full)
    report["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "cpu_paths.json", json.dumps(report, indent=2) + "\n")
    write_atomic(args.out / "cpu_paths.md", markdown(report))
    print(f"wrote {args.out / 'cpu_paths.json'} and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
