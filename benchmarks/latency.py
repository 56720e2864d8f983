"""Latency of the Cinemo job per stage and per backend, against the matmul ceiling (issue 7).

    python benchmarks/latency.py                      # full size (16 frames at 320x512, 50 steps, CFG), CUDA
    python benchmarks/latency.py --tiny               # tiny random model on the CPU in seconds (CI smoke test)
    python benchmarks/latency.py --checkpoint DIR --engines DIR --backends torch-fp16 torch-fast tensorrt

Backends (each built fresh with the same weights, measured one after another in this process):
  torch-fp32, torch-fp16   the reference, eager, as the original code runs
  torch-fast               FastTorchBackend: fp16, token layout, fused q/k/v, SDPA, K/V once per video, CUDA graph
  torch-fast-compile       the same plus torch.compile of the UNet forward
  onnxruntime, tensorrt    engines from --engines DIR (skipped, with the reason, when absent or not importable)
A backend that fails while being measured (or a named one that is unavailable) makes the exit status 1.
Stages: text encoding, VAE encode, DCTInit, one UNet call (CFG batch), the denoising loop, VAE decode, end to end
(`Animator.__call__`), and one video edit end to end (`Animator.run_edit`: 16-frame encode, inversion, sampling
at guidance 1 as the original). CUDA events on a GPU, perf_counter on the CPU; median, quartiles, min, max over repeats
after warm-up. Writes <out>/latency-<device>.json and .md atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flops import count_unet_flops  # noqa: E402

from cinemo_rt.checkpoint import Checkpoint, default_scheduler_config  # noqa: E402
from cinemo_rt.backends.registry import BACKENDS  # noqa: E402
from cinemo_rt.parity import relative_error  # noqa: E402
from cinemo_rt.settings import Size  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("benchmarks.latency")
TORCH_BACKENDS = ("torch-fp32", "torch-fp16", "torch-fast", "torch-fast-compile")
ENGINE_BACKENDS = tuple(name for name, entry in BACKENDS.items() if entry.source == "engines")
STAGES = ("text_encode", "vae_encode", "dct_init", "unet_call", "cache_indicator", "denoise_loop", "vae_decode",
          "end_to_end", "end_to_end_fast", "edit")
LONG_STAGES = ("denoise_loop", "end_to_end", "end_to_end_fast", "edit")
GUIDANCE = 7.5
EXIT_NO_GPU = 2
EXIT_BACKEND_FAILED = 1


class Unavailable(RuntimeError):
    """A backend this machine or these arguments cannot provide (no --engines folder): skipped, unless named."""


@dataclass(frozen=True)
class JobShape:
    """One video job: `frames` generated residual frames (+ the input frame), pixels, steps."""

    frames: int
    height: int
    width: int
    steps: int

    @property
    def latent(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8


FULL = JobShape(frames=Size.frames, height=Size.height, width=Size.width, steps=50)  # released: 16 x 320 x 512
TINY = JobShape(frames=3, height=64, width=64, steps=2)


# ---------------------------------------------------------------------------------------------
# Models: random full-size weights, the tiny test model, or a checkpoint folder
# ---------------------------------------------------------------------------------------------
def build_checkpoint(args, device: torch.device, dtype: torch.dtype) -> Checkpoint:
    """A fresh Checkpoint at `device`/`dtype`; the same seed gives the same weights for every backend."""
    from cinemo_rt.components import VAE

    if args.checkpoint:
        from cinemo_rt.checkpoint import load_checkpoint

        return load_checkpoint(args.checkpoint, device=device, dtype=dtype)
    if args.tiny:
        from cinemo_rt.testing import make_tiny_components

        ckpt = make_tiny_components(seed=args.seed)
    else:
        from diffusers import AutoencoderKLTemporalDecoder
        from transformers import CLIPTextConfig, CLIPTextModel

        from cinemo_rt.components import TextEncoder
        from cinemo_rt.model import UNet3D, full_config

        torch.manual_seed(args.seed)
        with torch.device(device):  # initialised on the GPU: seconds instead of minutes on the host
            unet = UNet3D(full_config()).eval()
            # SD-1.x's CLIP ViT-L/14 text tower and SVD's temporal VAE (SPEC 5), random weights.
            text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                                num_hidden_layers=12, num_attention_heads=12,
                                                max_position_embeddings=77, projection_dim=768)).eval()
            vae = AutoencoderKLTemporalDecoder(down_block_types=("DownEncoderBlock2D",) * 4,
                                               block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                               latent_channels=4, sample_size=768, scaling_factor=0.18215)
        ckpt = Checkpoint(unet=unet, vae=VAE.create(vae, temporal=True), text_encoder=TextEncoder(None, text),
                          scheduler_config=default_scheduler_config())
    ckpt.unet.to(device, dtype)
    ckpt.text_encoder.model.to(device, dtype)
    # With an fp32 copy for encoding, as load_checkpoint builds it.
    ckpt.vae = VAE.create(ckpt.vae.model.to(device, dtype), temporal=ckpt.vae.temporal, encode_dtype=torch.float32)
    return ckpt


def make_backend(name: str, args, device: torch.device):
    """-> (backend, tokenizer or None)."""
    if name in ENGINE_BACKENDS:
        if not args.engines:
            raise Unavailable("no --engines DIR given")
        from cinemo_rt.backends.engines_dir import EnginesDir
        from cinemo_rt.backends.registry import backend_class

        engines = EnginesDir.open(args.engines)
        return backend_class(name)(engines, device=device), engines.tokenizer()
    on_cpu = device.type == "cpu"
    if name == "torch-fp32":
        dtype = torch.float32
    elif on_cpu and name.startswith("torch-fast"):
        dtype = torch.float32  # the optimised path is testable on the CPU in fp32
    else:
        dtype = torch.float16
    ckpt = build_checkpoint(args, device, dtype)
    if name.startswith("torch-fast"):
        from cinemo_rt.backends.fast_torch import FastTorchBackend

        compile_mode = args.compile_mode if name == "torch-fast-compile" else None
        backend = FastTorchBackend(ckpt, cuda_graph=not on_cpu, compile_mode=compile_mode,
                                   compile_backend=args.compile_backend)
    else:
        from cinemo_rt.backends.torch_backend import TorchBackend

        backend = TorchBackend(ckpt)
    return backend, ckpt.text_encoder.tokenizer


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
class Clock:
    """CUDA events on a GPU (device time of the enqueued work), perf_counter with a sync on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list = []  # (group, start event, end event) of profiled regions, read by collect()

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    def measure(self, fn: Callable[[], object], warmup: int, repeats: int) -> dict:
        for _ in range(warmup):
            fn()
        times = [self.time_ms(fn) for _ in range(max(repeats, 1))]
        q = np.percentile(times, [25, 75]) if len(times) > 1 else (times[0], times[0])
        return {"median_ms": statistics.median(times), "q1_ms": float(q[0]), "q3_ms": float(q[1]),
                "min_ms": min(times), "max_ms": max(times), "n": len(times)}

    @contextlib.contextmanager
    def scope(self, totals: dict[str, float], name: str):
        """Accumulate the time of a region under `name` (the per-block-type profile)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._pending.append((name, start, end))
        else:
            start = time.perf_counter()
            yield
            totals[name] = totals.get(name, 0.0) + (time.perf_counter() - start) * 1e3

    def collect(self, totals: dict[str, float]) -> None:
        torch.cuda.synchronize()
        for name, start, end in self._pending:
            totals[name] = totals.get(name, 0.0) + start.elapsed_time(end)
        self._pending.clear()


def matmul_ceiling(device: torch.device, repeats: int) -> dict:
    """TFLOP/s of a large dense matmul in the job's precision: the ceiling the UNet is compared with."""
    n, dtype = (8192, torch.float16) if device.type == "cuda" else (512, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    stats = Clock(device).measure(lambda: a @ b, warmup=3, repeats=max(repeats, 5))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_ms": stats["median_ms"],
            "tflops": 2 * n**3 / (stats["median_ms"] * 1e-3) / 1e12}


# ---------------------------------------------------------------------------------------------
# Per-block-type profile
# ---------------------------------------------------------------------------------------------
def _reference_groups(unet) -> dict:
    """Module -> profile group for the reference UNet (forward hooks)."""
    from torch import nn

    from cinemo_rt.model.attention import Attention, FeedForward, TemporalAttention

    groups = {}
    for name, module in unet.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Conv2d):
            groups[module] = "conv"
        elif isinstance(module, nn.GroupNorm):
            groups[module] = "groupnorm"
        elif isinstance(module, nn.LayerNorm):
            groups[module] = "layernorm"
        elif isinstance(module, TemporalAttention):
            groups[module] = "temporal_attention"
        elif isinstance(module, Attention):
            groups[module] = "spatial_attention" if leaf == "attn1" else "cross_attention"
        elif isinstance(module, FeedForward):
            groups[module] = "geglu"
    return groups


def profile_blocks(backend, inputs: tuple, clock: Clock, repeats: int) -> dict:
    """Time per block type of one UNet call (eager; hooks/scopes add sync-free events around each block)."""
    from cinemo_rt.backends.fast_torch import FastTorchBackend

    totals: dict[str, float] = {}
    x_t, t, text, z1, motion = inputs
    if isinstance(backend, FastTorchBackend) and backend._forward is not backend.fast_unet:
        # Scopes inside a compiled graph are traced away: timing them would profile the eager path instead.
        return {"note": "not profiled: per-block scopes do not exist inside the compiled graph "
                        "(torch-fast's profile is the same code eager)"}
    if isinstance(backend, FastTorchBackend):
        fast = backend.fast_unet
        context = fast.prepare(text)
        run = lambda: fast(x_t, t, context, z1, motion)  # noqa: E731
        fast.scope_factory = lambda name: clock.scope(totals, name)
        cleanup = [lambda: setattr(fast, "scope_factory", None)]
    elif hasattr(backend, "checkpoint"):
        unet = backend.checkpoint.unet
        run = lambda: unet(x_t, t, text, z1, motion)  # noqa: E731
        scopes: dict = {}
        handles = []
        for module, group in _reference_groups(unet).items():
            def pre(mod, _args, group=group):
                scopes[mod] = clock.scope(totals, group)
                scopes[mod].__enter__()

            def post(mod, _args, _out):
                scopes.pop(mod).__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
        cleanup = [h.remove for h in handles]
    else:
        return {}
    try:
        with torch.no_grad():
            run()  # warm
            if clock.cuda:
                clock.collect({})
            totals.clear()
            whole = []
            for _ in range(repeats):
                whole.append(clock.time_ms(run))
                if clock.cuda:
                    clock.collect(totals)
    finally:
        for fn in cleanup:
            fn()
    total = statistics.median(whole)
    per_call = {k: v / repeats for k, v in totals.items()}
    per_call["other"] = max(total - sum(per_call.values()), 0.0)
    return {"total_ms": total, "ms": per_call, "share": {k: v / total for k, v in per_call.items()}}


# ---------------------------------------------------------------------------------------------
# One backend, every stage
# ---------------------------------------------------------------------------------------------
def run_backend(name: str, args, shape: JobShape, device: torch.device, flops_per_call: int,
                ceiling: dict, reference: dict | None) -> dict:
    from cinemo_rt.dctinit import select_dct_init
    from cinemo_rt.fewer_calls import REFERENCE_STEPS, relative_l1
    from cinemo_rt.pipeline import Animator
    from cinemo_rt.request import EditRequest
    from cinemo_rt.sampling import sample
    from cinemo_rt.settings import DCT_FRACTION, DCT_TAU
    from cinemo_rt.stages import decode_latents
    from cinemo_rt.schedule import make_schedule
    from cinemo_rt.small_clip import write_tokenizer

    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    backend, tokenizer = make_backend(name, args, device)
    dtype, info = backend.dtype, backend.info
    h, w = shape.latent
    g = torch.Generator().manual_seed(args.seed)  # the same inputs for every backend

    ids = torch.randint(0, 400, (2, 77), generator=g)
    pixels = (torch.rand(1, 3, shape.height, shape.width, generator=g) * 2 - 1).to(device)
    # fp32 on the device once, outside every timed stage (the CUDA DCTInit kernel takes device tensors only).
    z1 = torch.randn(1, info.latent_channels, 1, h, w, generator=g).to(device)
    noise = torch.randn(1, info.latent_channels, shape.frames, h, w, generator=g).to(device)
    x2 = torch.randn(2, info.latent_channels, shape.frames, h, w, generator=g).to(device, dtype)
    t2 = torch.tensor([981, 981], device=device)
    motion = torch.full((1,), 90.0, device=device)
    motion2 = torch.full((2,), 90.0, device=device)
    dct_init = select_dct_init(device)
    alpha_tau = float(make_schedule()[DCT_TAU])

    with torch.no_grad():
        text_both = backend.text_encoder(ids).to(dtype)  # (2, 77, D): uncond, cond
    text, text_uncond = text_both[1:], text_both[:1]
    z1_dev, z1_both = z1.to(device, dtype), z1.to(device, dtype).expand(2, -1, -1, -1, -1).contiguous()
    x_T = dct_init(z1, noise, alpha_tau, DCT_FRACTION).to(device, dtype)
    latents = torch.cat([z1, z1 + noise], dim=2).to(device, dtype)
    if tokenizer is None:  # random-weight full model: any CLIP BPE tokenizer will do for timing
        tokenizer_dir = write_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    animator = Animator(backend, tokenizer, Size(shape.height, shape.width, shape.frames))
    image = (np.random.default_rng(args.seed).random((shape.height, shape.width, 3)) * 255).astype(np.uint8)
    clip = (np.random.default_rng(args.seed).random((shape.frames + 1, shape.height, shape.width, 3)) * 255
            ).astype(np.uint8)
    edit_request = EditRequest.create("a boat on the sea", 90.0, source_prompt="a boat", steps=shape.steps,
                                      seed=args.seed)

    def loop():
        return sample(backend.unet, x_T, z1=z1_dev, text=text, text_uncond=text_uncond, motion_id=motion,
                      steps=shape.steps, guidance=GUIDANCE, prediction_type=backend.info.prediction_type)

    stage_fns = {
        "text_encode": lambda: backend.text_encoder(ids),
        "vae_encode": lambda: backend.vae_encoder(pixels),
        "dct_init": lambda: dct_init(z1, noise, alpha_tau, DCT_FRACTION),
        "unet_call": lambda: backend.unet(x2, t2, text_both, z1_both, motion2),
        # The step cache's per-step decision: a reduction and its one host sync (issue 18).
        "cache_indicator": lambda: float(relative_l1(x2[:1], x2[1:])),
        "denoise_loop": loop,
        "vae_decode": lambda: decode_latents(backend, latents),
        "end_to_end": lambda: animator(image, "a boat on the sea", steps=shape.steps, seed=args.seed),
        # `cinemo-rt run --fast` (issue 18): the preset's own steps at the released 50, else this run's steps.
        "end_to_end_fast": lambda: animator(image, "a boat on the sea", fast=True, seed=args.seed,
                                            steps=None if shape.steps == REFERENCE_STEPS else shape.steps),
        # Video editing (issue 15) as the original runs it: guidance 1, inversion + sampling, 16-frame encode.
        "edit": lambda: animator.run_edit(clip, image, edit_request),
    }
    stages = {}
    with torch.no_grad():
        for stage, fn in stage_fns.items():
            long = stage in LONG_STAGES
            stages[stage] = clock.measure(fn, warmup=1 if long else args.warmup,
                                          repeats=args.loop_repeats if long else args.repeats)
        outputs = {"text": backend.text_encoder(ids), "eps": backend.unet(x2, t2, text_both, z1_both, motion2),
                   "x_0": loop(), "decoded": decode_latents(backend, latents)}
        outputs = {k: v.detach().float().cpu() for k, v in outputs.items()}
        profile = profile_blocks(backend, (x2, t2, text_both, z1_both, motion2), clock, max(args.repeats // 2, 1))

    unet_s = stages["unet_call"]["median_ms"] * 1e-3
    loop_s = stages["denoise_loop"]["median_ms"] * 1e-3
    result = {
        "dtype": str(dtype).removeprefix("torch."),
        "class": type(backend).__name__,
        "stages": stages,
        "unet_tflops": flops_per_call / unet_s / 1e12,
        "unet_fraction_of_ceiling": flops_per_call / unet_s / 1e12 / ceiling["tflops"],
        "loop_tflops": flops_per_call * shape.steps / loop_s / 1e12,
        "loop_fraction_of_ceiling": flops_per_call * shape.steps / loop_s / 1e12 / ceiling["tflops"],
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        "other_memory_gib": other_memory(device),
        "profile": profile,
        "fast_unet_calls": animator.last_unet_calls,  # of the last end_to_end_fast video (a CFG call counts 2)
    }
    if reference is not None and (args.checkpoint or name not in ENGINE_BACKENDS):
        result["parity_rel_l2_vs_torch_fp32"] = {k: relative_error(outputs[k], reference[k]) for k in outputs}
    backend.close()
    del backend, animator
    gc.collect()
    return result, outputs


def other_memory(device: torch.device) -> dict | None:
    """Device memory outside torch's allocator, which `peak_memory_gib` does not see: CuPy's pool (DCTInit's
    bases and scratch) and, in `device_used`, everything (TensorRT's engine weights, CUDA contexts, torch's
    cache) in use at the end of the backend's run. Not peaks: the first is the pool's size, the second a
    snapshot."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    cupy = sys.modules.get("cupy")  # imported by the DCTInit kernel if it ran
    return {"cupy_pool": cupy.get_default_memory_pool().total_bytes() / 2**30 if cupy else 0.0,
            "device_used": (total - free) / 2**30}


# ---------------------------------------------------------------------------------------------
# Environment, report, main
# ---------------------------------------------------------------------------------------------
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
           "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    for dist in ("diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cupy-cuda12x",
                 "cupy-cuda13x", "cupy"):
        env[dist] = _version(dist)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
    else:
        env["device"] = platform.processor() or platform.machine()
        env["cpu_threads"] = torch.get_num_threads()
        env["driver"] = None
    return env


def markdown(report: dict) -> str:
    lines = [f"# Cinemo latency: {report['environment']['device']}", "",
             f"Command: `{report['command']}`  ", f"Date: {report['created']}  ",
             f"Job: {report['job']}  ",
             f"torch {report['environment']['torch']}, CUDA {report['environment']['cuda']}, "
             f"driver {report['environment']['driver']}  ",
             f"UNet GFLOP per CFG call: {report['unet_flops']['total'] / 1e9:.1f} "
             f"(conv {report['unet_flops']['conv'] / 1e9:.1f}, linear {report['unet_flops']['linear'] / 1e9:.1f}, "
             f"attention {report['unet_flops']['attention'] / 1e9:.1f})  ",
             f"Matmul ceiling: {report['matmul_ceiling']['tflops']:.3g} TFLOP/s "
             f"({report['matmul_ceiling']['n']}^3 {report['matmul_ceiling']['dtype']})", "",
             "Median ms (min-max) per stage:", "",
             "| backend | dtype | " + " | ".join(STAGES)
             + " | UNet TFLOP/s | % ceiling | peak GiB (torch) | e2e speed-up vs torch-fp16 |",
             "|---|---|" + "---|" * (len(STAGES) + 4)]
    for name, r in report["backends"].items():
        cells = [f"{r['stages'][s]['median_ms']:.2f} ({r['stages'][s]['min_ms']:.2f}-{r['stages'][s]['max_ms']:.2f})"
                 for s in STAGES]
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        speed = report["speedup_vs_torch_fp16"].get(name)
        lines.append(f"| {name} | {r['dtype']} | " + " | ".join(cells) +
                     f" | {r['unet_tflops']:.2f} | {100 * r['unet_fraction_of_ceiling']:.1f} | {mem} | "
                     + ("-" if speed is None else f"{speed:.2f}x") + " |")
    for name, reason in report["failed"].items():
        lines.append(f"| {name} | FAILED: {reason} |" + " |" * (len(STAGES) + 4))
    for name, reason in report["skipped"].items():
        lines.append(f"| {name} | skipped: {reason} |" + " |" * (len(STAGES) + 4))
    other = {n: r["other_memory_gib"] for n, r in report["backends"].items() if r.get("other_memory_gib")}
    if other:
        lines += ["", "Peak GiB counts torch's allocator only. Outside it (CuPy's pool size; all device memory in "
                  "use at the end of the run, TensorRT's engines included): "
                  + "; ".join(f"{n} {m['cupy_pool']:.2f} / {m['device_used']:.2f}" for n, m in other.items())]
    lines += ["", "Parity, relative L2 against torch-fp32 (same weights and inputs):", "",
              "| backend | text | eps (one UNet call) | x_0 (whole loop) | decoded |", "|---|---|---|---|---|"]
    for name, r in report["backends"].items():
        p = r.get("parity_rel_l2_vs_torch_fp32")
        if p:
            lines.append(f"| {name} | {p['text']:.2e} | {p['eps']:.2e} | {p['x_0']:.2e} | {p['decoded']:.2e} |")
    lines += ["", "Where one UNet call's time goes (ms per call, share), per block type:", ""]
    groups = sorted({g for r in report["backends"].values() for g in r["profile"].get("ms", {})})
    lines += ["| backend | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for name, r in report["backends"].items():
        prof = r["profile"]
        if prof.get("note"):
            lines.append(f"| {name} | {prof['note']} |" + " |" * (len(groups) - 1))
        elif prof:
            lines.append(f"| {name} | " + " | ".join(
                f"{prof['ms'].get(g, 0):.2f} ({100 * prof['share'].get(g, 0):.0f}%)" for g in groups) + " |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(report: dict, out: Path, tag: str) -> None:
    """<out>/latency-<tag>.json and .md, with the speed-ups of what has been measured so far."""
    base_fp16 = report["backends"].get("torch-fp16")
    if base_fp16:
        for name, r in report["backends"].items():
            report["speedup_vs_torch_fp16"][name] = (base_fp16["stages"]["end_to_end"]["median_ms"]
                                                     / r["stages"]["end_to_end"]["median_ms"])
    write_atomic(out / f"latency-{tag}.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / f"latency-{tag}.md", markdown(report))
    print(f"wrote {out / f'latency-{tag}.json'} and .md", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model on the CPU: smoke test, not timings")
    p.add_argument("--checkpoint", help="checkpoint folder (default: random full-size weights)")
    p.add_argument("--engines", help="engines folder for the onnxruntime and tensorrt backends")
    p.add_argument("--backends", nargs="+", choices=TORCH_BACKENDS + ENGINE_BACKENDS, default=None,
                   help="default: all (tiny: torch-fp32 and torch-fast; CPU fp16 is supported but slow)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per short stage (default 20, tiny 2)")
    p.add_argument("--loop-repeats", type=int, default=None,
                   help="timed repeats of the denoising loop and end to end (default 3, tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 3, tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50, tiny 2)")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for torch-fast-compile (max-autotune: minutes more of compilation)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for torch-fast-compile (eager: dynamo alone, seconds; a rehearsal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help=f"folder for the JSON and Markdown results (default {RESULTS.relative_to(ROOT)}; with --tiny a "
                        "temporary folder, since a smoke test's numbers are not results)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="cinemo-latency-tiny-") if args.tiny else str(RESULTS)
    args.named = args.backends is not None  # named backends must run: unavailable is a failure then
    args.repeats = args.repeats or (2 if args.tiny else 20)
    args.loop_repeats = args.loop_repeats or (1 if args.tiny else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.backends is None:
        args.backends = ["torch-fp32", "torch-fast"] if args.tiny else \
            list(TORCH_BACKENDS + ENGINE_BACKENDS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # dtype-cast notices on every VAE build
    if args.tiny:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("benchmarks/latency.py: the full-size benchmark needs a CUDA GPU and none is available. "
              "Run `python benchmarks/latency.py --tiny` for the CPU smoke test.", file=sys.stderr)
        return EXIT_NO_GPU
    base = TINY if args.tiny else FULL
    shape = JobShape(base.frames, base.height, base.width, args.steps or base.steps)
    if args.tiny:
        from cinemo_rt.model import tiny_config

        unet_config = tiny_config()  # make_tiny_components' UNet
    elif args.checkpoint:
        from cinemo_rt.model import UNetConfig

        unet_config = UNetConfig.from_file(Path(args.checkpoint) / "unet" / "config.json")
    else:
        from cinemo_rt.model import full_config

        unet_config = full_config()
    h, w = shape.latent
    flops = count_unet_flops(unet_config, batch=2, frames=shape.frames, latent_h=h, latent_w=w)
    ceiling = matmul_ceiling(device, args.repeats)

    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
        else "python benchmarks/latency.py " + " ".join(shlex.quote(a) for a in argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "job": {**asdict(shape), "cfg_batch": 2, "guidance": GUIDANCE, "tiny": args.tiny,
                "weights": args.checkpoint or "random"},
        "settings": {"repeats": args.repeats, "loop_repeats": args.loop_repeats, "warmup": args.warmup,
                     "timer": "cuda events" if device.type == "cuda" else "perf_counter"},
        "unet_flops": flops.as_dict(),
        "matmul_ceiling": ceiling,
        "backends": {}, "skipped": {}, "failed": {}, "speedup_vs_torch_fp16": {},
    }
    reference = None
    order = sorted(args.backends, key=lambda n: n != "torch-fp32")  # the fp32 reference first: parity baseline
    tag = "tiny-cpu" if args.tiny else report["environment"]["device"].replace(" ", "_")
    for name in order:
        try:
            result, outputs = run_backend(name, args, shape, device, flops.total, ceiling, reference)
        except Exception as err:  # one backend failing must not lose the others' numbers
            failed = args.named or not isinstance(err, Unavailable)
            report["failed" if failed else "skipped"][name] = f"{type(err).__name__}: {err}"
            log.log(logging.ERROR if failed else logging.INFO, "%s: %s (%s: %s)", name,
                    "FAILED" if failed else "skipped", type(err).__name__, err, exc_info=failed)
            continue
        report["backends"][name] = result
        if name == "torch-fp32":
            reference = outputs
        print(f"{name}: unet {result['stages']['unet_call']['median_ms']:.2f} ms, loop "
              f"{result['stages']['denoise_loop']['median_ms']:.1f} ms, end to end "
              f"{result['stages']['end_to_end']['median_ms']:.1f} ms", file=sys.stderr)
        write_report(report, Path(args.out), tag)  # after every backend: a time limit keeps what was measured
    write_report(report, Path(args.out), tag)
    if report["failed"]:
        print(f"benchmarks/latency.py: {len(report['failed'])} backend(s) failed: {', '.join(report['failed'])}",
              file=sys.stderr)
        return EXIT_BACKEND_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
