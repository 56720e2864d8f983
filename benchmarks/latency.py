"""Latency of the Cinemo job per stage and per backend, against the matmul ceiling.

    python benchmarks/latency.py                      # full size (16 frames at 320x512, 50 steps, CFG), CUDA
    python benchmarks/latency.py --tiny               # tiny random model on the CPU, under a minute (CI smoke test)
    python benchmarks/latency.py --checkpoint DIR --engines DIR --backends torch-fp16 torch-fast tensorrt

Backends (each built fresh with the same weights, measured one after another, in the order of value: ORDER):
  torch-fp16               the reference, eager, as the original code runs: the baseline of the speed-ups
  torch-fast               FastTorchBackend: fp16, token layout, fused q/k/v, SDPA, K/V once per video, CUDA graph
  onnxruntime, tensorrt    engines from --engines DIR (skipped, with the reason, when absent or not importable)
  torch-fast-compile       the same plus torch.compile of the UNet forward
  torch-fp32               the parity reference, last, and only one UNet call and one loop
Stages (STAGE_DOC says what each times): the first video's one-off costs (cold_first_video, timed once), then
warm medians of text encoding, VAE encode, DCTInit, one UNet call (CFG batch), the denoising loop, VAE decode, end
to end (`Animator.__call__`), end to end --fast, and one video edit (`Animator.run_edit`). A stage that fails is
recorded with its reason and the others still run; with --budget-s a stage that would not fit is reported as not
finished. A failed stage or backend (or a named one that is unavailable) makes the exit status 1. CUDA events on a
GPU, perf_counter on the CPU. Writes <out>/latency-<device>.json and .md atomically, after every stage.
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
# Measured in order of value: the fp16 eager baseline and the optimised path first, the fp32 reference last and
# reduced to what parity needs (a window that runs out of time loses the least).
ORDER = ("torch-fp16", "torch-fast", "tensorrt", "onnxruntime", "torch-fast-compile", "torch-fp32")
REFERENCE_BACKEND = "torch-fp32"
REFERENCE_STAGES = ("unet_call", "denoise_loop")
PARITY_STAGES = {"unet_call": "eps", "denoise_loop": "x_0"}  # stage -> the parity output its last call gives
# What each stage times (the tables' legend); every median is of warm calls after at least one warm-up, the
# first video's one-off costs are `cold_first_video`, timed once.
STAGE_DOC = {
    "cold_first_video": "the first video of a freshly built backend, timed once: one-off costs (torch.compile, "
                        "CUDA graph capture, NVRTC, cuDNN autotuning) plus one video",
    "text_encode": "one text-encoder call, batch 2 (prompt and negative prompt)",
    "vae_encode": "one VAE-encoder call (the input image)",
    "dct_init": "DCTInit of one video's noise (the CUDA kernel on a GPU)",
    "unet_call": "one UNet call at the CFG batch of 2",
    "cache_indicator": "the step cache's per-step decision: a reduction and one host sync",
    "denoise_loop": "the sampling loop: one CFG UNet call per step and the sampler's arithmetic",
    "vae_decode": "decoding one video's latents to pixels",
    "end_to_end": "one video, image to uint8 frames (`Animator.__call__`): encode, DCTInit, loop, decode",
    "end_to_end_fast": "the same with --fast (fewer UNet calls)",
    "edit": "one video edit (`Animator.run_edit`): 16-frame encode, inversion, sampling at guidance 1",
}
STAGES = tuple(STAGE_DOC)
LONG_STAGES = ("cold_first_video", "denoise_loop", "end_to_end", "end_to_end_fast", "edit")
# Stages whose UNet calls all have the CFG batch of 2: one Inductor compile (the others add a batch-1 compile).
CFG_STAGES = ("cold_first_video", "text_encode", "vae_encode", "dct_init", "unet_call", "cache_indicator",
              "denoise_loop", "vae_decode", "end_to_end")
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
            # SD-1.x's CLIP ViT-L/14 text tower and SVD's temporal VAE (docs/checkpoints.md), random weights.
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
def stage_fns(args, shape: JobShape, device: torch.device, backend, tokenizer) -> tuple[dict, dict]:
    """-> (stage name -> the call it times, the calls that give the parity outputs), all on the same inputs."""
    from cinemo_rt.dctinit import select_dct_init
    from cinemo_rt.fewer_calls import REFERENCE_STEPS, relative_l1
    from cinemo_rt.pipeline import Animator
    from cinemo_rt.request import EditRequest
    from cinemo_rt.sampling import sample
    from cinemo_rt.settings import DCT_FRACTION, DCT_TAU
    from cinemo_rt.stages import decode_latents
    from cinemo_rt.schedule import make_schedule
    from cinemo_rt.small_clip import write_tokenizer

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
    # The parity input is the same for every backend: the float64 reference DCTInit, not the device's kernel.
    from cinemo_rt.dctinit import dct_init as reference_dct_init

    x_T = reference_dct_init(z1.cpu(), noise.cpu(), alpha_tau, DCT_FRACTION).to(device, dtype)
    latents = torch.cat([z1, z1 + noise], dim=2).to(device, dtype)
    if tokenizer is None:  # random-weight full model: any CLIP BPE tokenizer will do for timing
        tokenizer_dir = write_tokenizer(Path(tempfile.mkdtemp()) / "tokenizer")
        from transformers import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    animator = Animator(backend, tokenizer, Size(shape.height, shape.width, shape.frames))
    image = (np.random.default_rng(args.seed).random((shape.height, shape.width, 3)) * 255).astype(np.uint8)
    clip = (np.random.default_rng(args.seed).random((shape.frames + 1, shape.height, shape.width, 3)) * 255
            ).astype(np.uint8)
    edit_request = EditRequest("a boat on the sea", motion_id=90.0, source_prompt="a boat", steps=shape.steps,
                               seed=args.seed)

    def loop():
        return sample(backend.unet, x_T, z1=z1_dev, text=text, text_uncond=text_uncond, motion_id=motion,
                      steps=shape.steps, guidance=GUIDANCE, prediction_type=backend.info.prediction_type)

    def video():
        return animator(image, "a boat on the sea", steps=shape.steps, seed=args.seed)

    fns = {
        "cold_first_video": video,
        "text_encode": lambda: backend.text_encoder(ids),
        "vae_encode": lambda: backend.vae_encoder(pixels),
        "dct_init": lambda: dct_init(z1, noise, alpha_tau, DCT_FRACTION),
        "unet_call": lambda: backend.unet(x2, t2, text_both, z1_both, motion2),
        "cache_indicator": lambda: float(relative_l1(x2[:1], x2[1:])),
        "denoise_loop": loop,
        "vae_decode": lambda: decode_latents(backend, latents),
        "end_to_end": video,
        # `cinemo-rt run --fast`: the preset's own steps at the released 50, else this run's steps.
        "end_to_end_fast": lambda: animator(image, "a boat on the sea", fast=True, seed=args.seed,
                                            steps=None if shape.steps == REFERENCE_STEPS else shape.steps),
        # Video editing as the original runs it: guidance 1, inversion + sampling, 16-frame encode.
        "edit": lambda: animator.run_edit(clip, image, edit_request),
    }
    parity_fns = {"eps": lambda: backend.unet(x2, t2, text_both, z1_both, motion2), "x_0": loop}
    fns["_animator"] = animator
    fns["_profile_inputs"] = (x2, t2, text_both, z1_both, motion2)
    return fns, parity_fns


class Budget:
    """The seconds this run may still spend (`--budget-s`); a stage that would not fit is not started."""

    def __init__(self, seconds: float | None):
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


def stage_estimate_s(stage: str, stages: dict, warmup: int, repeats: int) -> float:
    """What a stage will take, from what was measured before it (long stages cost about a warm video)."""
    if stage not in LONG_STAGES:
        return 0.0
    known = [r["median_ms"] for r in stages.values() if r.get("status") == "ok" and r.get("long")]
    return (warmup + repeats) * max(known, default=0.0) * 1e-3


def measure_stage(clock: Clock, fn: Callable, warmup: int, repeats: int, keep: dict | None = None,
                  key: str = "") -> dict:
    """Time `fn`; with `keep`, its last output is kept under `key` (parity needs no second run)."""
    def run():
        out = fn()
        if keep is not None:
            keep[key] = out
        return out

    try:
        return {"status": "ok", **clock.measure(run, warmup=warmup, repeats=repeats)}
    except Exception as err:  # one stage failing must not lose the others' numbers
        log.exception("stage failed")
        return {"status": "failed", "reason": f"{type(err).__name__}: {err}"}


def run_backend(name: str, args, shape: JobShape, device: torch.device, flops_per_call: int,
                ceiling: dict, budget: Budget | None = None, on_stage: Callable[[dict], None] | None = None):
    """Every stage of one backend (torch-fp32: only what parity needs) -> (result, parity outputs). A stage
    that fails is recorded with its reason, one the budget cannot fit as not finished; the others still run.
    `on_stage(result)` after each stage, so a time limit keeps what was measured."""
    budget = budget or Budget(None)
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    backend, tokenizer = make_backend(name, args, device)
    fns, parity_fns = stage_fns(args, shape, device, backend, tokenizer)
    animator, profile_inputs = fns.pop("_animator"), fns.pop("_profile_inputs")
    reduced = name == REFERENCE_BACKEND
    wanted = [s for s in args.stages if s in REFERENCE_STAGES] if reduced else args.stages
    result = {"dtype": str(backend.dtype).removeprefix("torch."), "class": type(backend).__name__,
              "build_s": time.perf_counter() - t0, "stages": {}, "reduced": reduced}
    stages = result["stages"]
    kept: dict = {}  # the last outputs of the parity stages
    with torch.no_grad():
        for stage in STAGES:
            if stage not in wanted:
                continue
            long = stage in LONG_STAGES
            if stage == "cold_first_video":
                warmup, repeats = 0, 1  # the first video of a fresh backend, once: its one-off costs
            elif reduced:
                warmup, repeats = (0, 1) if long else (1, max(args.repeats // 2, 1))  # parity, not speed
            else:
                warmup, repeats = (args.long_warmup, args.loop_repeats) if long else (args.warmup, args.repeats)
            need = stage_estimate_s(stage, stages, warmup, repeats)
            if budget.left() < need or budget.left() <= 0:
                stages[stage] = {"status": "not finished",
                                 "reason": f"{max(budget.left(), 0):.0f} s left of the budget, the stage needs about "
                                           f"{need:.0f} s"}
            else:
                parity_key = PARITY_STAGES.get(stage)
                stages[stage] = {**measure_stage(clock, fns[stage], warmup, repeats, kept if parity_key else None,
                                                 parity_key or ""), "long": long}
            if on_stage:
                on_stage(result)
        outputs = {}
        for key, fn in parity_fns.items():  # from the timed calls, or computed now when their stage did not run
            try:
                outputs[key] = (kept[key] if key in kept else fn()).detach().float().cpu()
            except Exception as err:  # noqa: BLE001 - recorded; parity of the rest still counts
                result.setdefault("parity_failed", {})[key] = f"{type(err).__name__}: {err}"
        kept.clear()
        if args.profile and not reduced and budget.left() > 0:
            result["profile"] = profile_blocks(backend, profile_inputs, clock, max(args.repeats // 2, 1))
    result.update(derived_metrics(stages, flops_per_call, shape.steps, ceiling))
    result["peak_memory_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None
    result["other_memory_gib"] = other_memory(device)
    result["fast_unet_calls"] = animator.last_unet_calls  # of the last video (a CFG call counts 2)
    backend.close()
    del backend, animator
    gc.collect()
    return result, outputs


def derived_metrics(stages: dict, flops_per_call: int, steps: int, ceiling: dict) -> dict:
    out = {}
    if stages.get("unet_call", {}).get("status") == "ok":
        tflops = flops_per_call / (stages["unet_call"]["median_ms"] * 1e-3) / 1e12
        out.update(unet_tflops=tflops, unet_fraction_of_ceiling=tflops / ceiling["tflops"])
    if stages.get("denoise_loop", {}).get("status") == "ok":
        tflops = flops_per_call * steps / (stages["denoise_loop"]["median_ms"] * 1e-3) / 1e12
        out.update(loop_tflops=tflops, loop_fraction_of_ceiling=tflops / ceiling["tflops"])
    return out


def consistency_notes(report: dict) -> list[str]:
    """Rows that contradict each other (a part slower than its whole): a sign of cold calls in a median."""
    notes = []
    steps = report["job"]["steps"]
    for name, r in report["backends"].items():
        ms = {k: v["median_ms"] for k, v in r["stages"].items() if v.get("status") == "ok"}
        for part, whole, times in (("unet_call", "denoise_loop", steps), ("denoise_loop", "end_to_end", 1),
                                   ("unet_call", "end_to_end", steps)):
            if part in ms and whole in ms and ms[part] * times > ms[whole] * 1.05:
                notes.append(f"{name}: {times} x {part} ({ms[part]:.1f} ms) is more than {whole} ({ms[whole]:.1f} ms)")
    return notes


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


def _cell(stats: dict | None) -> str:
    if stats is None:
        return "-"
    if stats["status"] != "ok":
        return stats["status"].upper() if stats["status"] == "failed" else stats["status"]
    if stats["n"] == 1:
        return f"{stats['median_ms']:.2f}"
    return f"{stats['median_ms']:.2f} ({stats['min_ms']:.2f}-{stats['max_ms']:.2f})"


def markdown(report: dict) -> str:
    env, job = report["environment"], report["job"]
    lines = [f"# Cinemo latency: {env['device']}", "",
             f"Command: `{report['command']}`  ", f"Date: {report['created']}  ",
             f"Job: {job['frames'] + 1} frames at {job['height']}x{job['width']}, {job['steps']} steps, CFG "
             f"(guidance {job['guidance']}), {job['weights']} weights{' (tiny model)' if job['tiny'] else ''}  ",
             f"Python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, driver {env['driver']}  ",
             f"UNet GFLOP per CFG call: {report['unet_flops']['total'] / 1e9:.1f} "
             f"(conv {report['unet_flops']['conv'] / 1e9:.1f}, linear {report['unet_flops']['linear'] / 1e9:.1f}, "
             f"attention {report['unet_flops']['attention'] / 1e9:.1f})  ",
             f"Matmul ceiling: {report['matmul_ceiling']['tflops']:.3g} TFLOP/s "
             f"({report['matmul_ceiling']['n']}^3 {report['matmul_ceiling']['dtype']})", "",
             "What each column times (ms; median (min-max) of warm calls after warm-up, one number when timed "
             f"once; {report['settings']['timer']}):", ""]
    lines += [f"- `{stage}`: {doc}" for stage, doc in STAGE_DOC.items()]
    lines += ["", "`-`: not run (the fp32 reference runs only what parity needs); FAILED and not finished: see "
              "below the table.", "",
              "| backend | dtype | build s | " + " | ".join(STAGES)
              + " | UNet TFLOP/s | % ceiling | peak GiB (torch) | e2e speed-up vs torch-fp16 |",
              "|---|---|---|" + "---|" * (len(STAGES) + 4)]
    problems = []
    for name, r in report["backends"].items():
        cells = [_cell(r["stages"].get(s)) for s in STAGES]
        problems += [f"- {name} `{s}`: {v['status']}: {v['reason']}" for s, v in r["stages"].items()
                     if v["status"] != "ok"]
        mem = "-" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.2f}"
        speed = report["speedup_vs_torch_fp16"].get(name)
        tflops = "-" if "unet_tflops" not in r else f"{r['unet_tflops']:.3g}"
        share = "-" if "unet_tflops" not in r else f"{100 * r['unet_fraction_of_ceiling']:.1f}"
        lines.append(f"| {name} | {r['dtype']} | {r['build_s']:.1f} | " + " | ".join(cells) +
                     f" | {tflops} | {share} | {mem} | " + ("-" if speed is None else f"{speed:.2f}x") + " |")
    for name, reason in report["failed"].items():
        lines.append(f"| {name} | FAILED: {reason} |" + " |" * (len(STAGES) + 5))
    for name, reason in report["skipped"].items():
        lines.append(f"| {name} | skipped: {reason} |" + " |" * (len(STAGES) + 5))
    if problems:
        lines += ["", "Stages that did not report:", "", *problems]
    notes = report.get("consistency", [])
    lines += ["", "Consistency (no part slower than its whole): " + ("ok" if not notes else "; ".join(notes))]
    other = {n: r["other_memory_gib"] for n, r in report["backends"].items() if r.get("other_memory_gib")}
    if other:
        lines += ["", "Peak GiB counts torch's allocator only. Outside it (CuPy's pool size; all device memory in "
                  "use at the end of the run, TensorRT's engines included): "
                  + "; ".join(f"{n} {m['cupy_pool']:.2f} / {m['device_used']:.2f}" for n, m in other.items())]
    lines += ["", "Parity, relative L2 against torch-fp32 (same weights and inputs; the reference DCTInit):", "",
              "| backend | eps (one UNet call) | x_0 (whole loop) |", "|---|---|---|"]
    for name, parity in report.get("parity_rel_l2_vs_torch_fp32", {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{parity[k]:.2e}" if k in parity else "-" for k in ("eps", "x_0"))
                     + " |")
    profiled = {n: r["profile"] for n, r in report["backends"].items() if r.get("profile")}
    if profiled:
        lines += ["", "Where one UNet call's time goes (ms per call, share), per block type:", ""]
        groups = sorted({g for prof in profiled.values() for g in prof.get("ms", {})})
        lines += ["| backend | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
        for name, prof in profiled.items():
            if prof.get("note"):
                lines.append(f"| {name} | {prof['note']} |" + " |" * (len(groups) - 1))
            else:
                lines.append(f"| {name} | " + " | ".join(
                    f"{prof['ms'].get(g, 0):.2f} ({100 * prof['share'].get(g, 0):.0f}%)" for g in groups) + " |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_outputs(outputs: dict, folder: Path, name: str) -> None:
    """A backend's parity outputs for a later process (run.sh measures each backend in a step of its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".pt.tmp")
    os.close(fd)
    torch.save(outputs, tmp)
    os.replace(tmp, folder / f"{name}.pt")


def load_outputs(folder: Path | None) -> dict:
    if folder is None or not folder.is_dir():
        return {}
    return {p.stem: torch.load(p, weights_only=True) for p in sorted(folder.glob("*.pt"))}


def write_report(report: dict, out: Path, tag: str, outputs: dict | None = None) -> None:
    """<out>/latency-<tag>.json and .md, with the speed-ups, parity and consistency of what has been measured."""
    def e2e(name):
        stats = report["backends"].get(name, {}).get("stages", {}).get("end_to_end", {})
        return stats.get("median_ms") if stats.get("status") == "ok" else None

    base = e2e("torch-fp16")
    report["speedup_vs_torch_fp16"] = {n: base / e2e(n) for n in report["backends"] if base and e2e(n)}
    outputs = outputs or {}
    reference = outputs.get(REFERENCE_BACKEND)
    if reference:
        report["parity_rel_l2_vs_torch_fp32"] = {
            name: {k: relative_error(v, reference[k]) for k, v in outs.items() if k in reference}
            for name, outs in outputs.items() if name != REFERENCE_BACKEND}
    report["consistency"] = consistency_notes(report)
    write_atomic(out / f"latency-{tag}.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out / f"latency-{tag}.md", markdown(report))
    print(f"wrote {out / f'latency-{tag}.json'} and .md", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true",
                   help="tiny random model on the CPU: a smoke test of every stage in well under a minute, not timings")
    p.add_argument("--checkpoint", help="checkpoint folder (default: random full-size weights)")
    p.add_argument("--engines", help="engines folder for the onnxruntime and tensorrt backends")
    p.add_argument("--backends", nargs="+", choices=TORCH_BACKENDS + ENGINE_BACKENDS, default=None,
                   help="default: all (tiny: torch-fast and torch-fp32); measured in the order "
                        + ", ".join(ORDER) + ", whatever the order given")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                   help="the stages to time (default all; torch-fp32 times only "
                        + " and ".join(REFERENCE_STAGES) + ")")
    p.add_argument("--cfg-stages-only", action="store_true",
                   help="only the stages whose UNet calls have the CFG batch (one torch.compile instead of two)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per short stage (default 20, tiny 1)")
    p.add_argument("--loop-repeats", type=int, default=None,
                   help="timed repeats of the denoising loop, end to end and edit (default 3, tiny 1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing a short stage, at least 1 (default 3, tiny 1); the first "
                        "video's one-off costs are the cold_first_video stage")
    p.add_argument("--long-warmup", type=int, default=1,
                   help="untimed runs before timing a long stage (loop, end to end, edit; default 1). 0 is for a "
                        "rehearsal: the first video has run by then, but a long stage's own first run is timed")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default 50, tiny 2)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds this run may take: stages that would not fit are reported as not finished")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-block-type profile")
    p.add_argument("--merge", action="store_true",
                   help="add to the report already in --out (the same job): one report from several runs")
    p.add_argument("--outputs", default=None,
                   help="folder for each backend's parity outputs, so parity spans several --merge runs")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode for torch-fast-compile (max-autotune: minutes more of compilation)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for torch-fast-compile (eager: dynamo alone, seconds; a rehearsal)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help=f"folder for the JSON and Markdown results (default {RESULTS.relative_to(ROOT)}; with --tiny a "
                        "temporary folder, since a smoke test's numbers are not results)")
    args = p.parse_args(argv)
    if args.warmup is not None and args.warmup < 1:
        p.error("--warmup must be at least 1: a cold call in a median makes a part look slower than its whole "
                "(the first video's one-off costs are timed on their own, as cold_first_video)")
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="cinemo-latency-tiny-") if args.tiny else str(RESULTS)
    args.named = args.backends is not None  # named backends must run: unavailable is a failure then
    args.repeats = args.repeats or (1 if args.tiny else 20)
    args.loop_repeats = args.loop_repeats or (1 if args.tiny else 3)
    args.warmup = args.warmup or (1 if args.tiny else 3)
    if args.cfg_stages_only:
        args.stages = [s for s in args.stages if s in CFG_STAGES]
    if args.backends is None:
        args.backends = ["torch-fast", "torch-fp32"] if args.tiny else list(TORCH_BACKENDS + ENGINE_BACKENDS)
    args.backends = sorted(dict.fromkeys(args.backends), key=ORDER.index)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # dtype-cast notices on every VAE build
    budget = Budget(args.budget_s)
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
    ceiling = matmul_ceiling(device, min(args.repeats, 5))

    report = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) if argv is None
        else "python benchmarks/latency.py " + " ".join(shlex.quote(a) for a in argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "job": {**asdict(shape), "cfg_batch": 2, "guidance": GUIDANCE, "tiny": args.tiny,
                "weights": args.checkpoint or "random"},
        "settings": {"repeats": args.repeats, "loop_repeats": args.loop_repeats, "warmup": args.warmup,
                 "long_warmup": args.long_warmup,
                     "timer": "cuda events" if device.type == "cuda" else "perf_counter"},
        "unet_flops": flops.as_dict(),
        "matmul_ceiling": ceiling,
        "backends": {}, "skipped": {}, "failed": {}, "speedup_vs_torch_fp16": {},
    }
    tag = "tiny-cpu" if args.tiny else report["environment"]["device"].replace(" ", "_")
    out = Path(args.out)
    earlier = out / f"latency-{tag}.json"
    if args.merge and earlier.exists():
        previous = json.loads(earlier.read_text())
        if previous.get("job") == report["job"]:
            for key in ("backends", "skipped", "failed"):
                report[key] = {**previous.get(key, {}), **report[key]}
            report["command"] = previous["command"] + " ; " + report["command"]
    outputs_dir = Path(args.outputs) if args.outputs else None
    outputs = load_outputs(outputs_dir)
    for name in args.backends:
        report["failed"].pop(name, None)
        report["skipped"].pop(name, None)

        def progress(result, name=name):
            report["backends"][name] = result
            write_report(report, out, tag, outputs)

        try:
            result, backend_outputs = run_backend(name, args, shape, device, flops.total, ceiling, budget, progress)
        except Exception as err:  # one backend failing must not lose the others' numbers
            report["backends"].pop(name, None)
            failed = args.named or not isinstance(err, Unavailable)
            report["failed" if failed else "skipped"][name] = f"{type(err).__name__}: {err}"
            log.log(logging.ERROR if failed else logging.INFO, "%s: %s (%s: %s)", name,
                    "FAILED" if failed else "skipped", type(err).__name__, err, exc_info=failed)
            write_report(report, out, tag, outputs)
            continue
        report["backends"][name] = result
        outputs[name] = backend_outputs
        if outputs_dir is not None:
            save_outputs(backend_outputs, outputs_dir, name)
        ms = {k: v.get("median_ms") for k, v in result["stages"].items() if v["status"] == "ok"}
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), file=sys.stderr)
        write_report(report, out, tag, outputs)  # after every backend: a time limit keeps what was measured
    write_report(report, out, tag, outputs)
    stage_failures = [f"{n} {s}" for n, r in report["backends"].items() for s, v in r["stages"].items()
                      if v["status"] == "failed"]
    if report["failed"] or stage_failures:
        print(f"benchmarks/latency.py: failed: {', '.join([*report['failed'], *stage_failures])}", file=sys.stderr)
        return EXIT_BACKEND_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
