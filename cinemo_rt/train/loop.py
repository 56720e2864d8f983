"""Cinemo training, the paper's Algorithm 1 (docs/METHOD.md: motion residuals, choices).

Per sample: frames x_1..x_N at a random stride -> motion id from their mean consecutive SSIM -> latents
z_i = E(x_i) * scaling factor (frozen VAE, posterior sample) -> residuals M = z_{2..N} - z_1 -> t ~ U{0..999},
eps ~ N(0, I), M_t = sqrt(a_t) M + sqrt(1 - a_t) eps -> the UNet sees cat([z_1, z_1 + M_t]) (it forms that
itself from x_t = M_t and z1) and regresses eps on the residual frames. Text is dropped with probability
0.5 so that classifier-free guidance works at inference.

The loop around it: AdamW with linear warm-up, gradient clipping, EMA weights, bf16 autocast on CUDA,
optional gradient checkpointing, DDP over torchrun ranks, periodic checkpoints in the released layout (EMA
UNet) plus `training_state.pt` (raw UNet, EMA, optimiser, step, every RNG) for exact resume.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import (Checkpoint, default_scheduler_config, load_checkpoint, owns_checkpoint_entry,
                          save_checkpoint)
from ..safe_paths import check_outside_package, check_owned_folder
from ..components import TextEncoder, VAE
from ..model import UNet3D, UNetConfig
from ..residuals import residuals_from_frames
from ..settings import SIZE_FILE
from ..schedule import NUM_TRAIN_TIMESTEPS, add_noise, make_schedule
from ..threads import apply_threads
from . import dist as distributed
from .components import build_text_encoder, build_vae, build_within_memory, pretrain_vae, with_scaling_factor
from .config import TrainConfig
from .data import VideoClips, read_captions, to_model_pixels

log = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------
def diffusion_loss(unet: nn.Module, z: torch.Tensor, text: torch.Tensor, motion_id: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
                   high_noise_weight: float = 0.0, prediction_type: str = "epsilon") -> torch.Tensor:
    """Algorithm 1, lines 5-8. z (B, 4, N, h, w) scaled latents of the N sampled frames; t (B,) long;
    noise (B, 4, N-1, h, w); text (B, 77, D); motion_id (B,). Returns the mean squared error on eps.

    high_noise_weight = W > 0 weights each sample by clamp((1 - a_t) / a_t, 1, W): the eps error's weight
    in the error of DDIM's predicted x0 (x0 error = sqrt((1 - a_t) / a_t) eps error), capped. The paper's
    objective is W = 0 (plain eps MSE)."""
    z1, residual = residuals_from_frames(z)  # (B, 4, 1, h, w), M (B, 4, N-1, h, w)
    alpha_bar_t = alphas_cumprod[t.cpu()].view(-1, 1, 1, 1, 1)  # float64
    m_t = add_noise(residual, noise, alpha_bar_t.to(residual.device))
    out = unet(m_t, t, text, z1, motion_id)  # the UNet forms cat([z1, z1 + M_t]) and drops frame 0
    if prediction_type == "v_prediction":
        a = alpha_bar_t.to(residual.device)
        target = (a.sqrt() * noise - (1 - a).sqrt() * residual).to(noise.dtype)
    else:
        target = noise
    if high_noise_weight <= 0:
        return F.mse_loss(out.float(), target.float())
    per_sample = (out.float() - target.float()).square().flatten(1).mean(1)  # (B,)
    inverse_snr = ((1 - alpha_bar_t) / alpha_bar_t).flatten().float().to(per_sample.device)
    return (per_sample * inverse_snr.clamp(1.0, high_noise_weight)).mean()


def scheduler_config(cfg: TrainConfig) -> dict:
    return {**default_scheduler_config(), "prediction_type": cfg.prediction_type}


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant ("warmup" in the original's `models/__init__.py`)
    or a cosine decay to 0 at `steps` ("cosine")."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return warm


def sample_latents(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Posterior sample (`.sample()`, as the original encodes z1) in scaled latent space."""
    return (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor


# ---------------------------------------------------------------------------------------------
# EMA and gradient checkpointing
# ---------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the UNet's weights; decay ramps up as min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach().to(ema_p.dtype), 1 - d)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = int(state["updates"])


def enable_gradient_checkpointing(unet: UNet3D) -> None:
    """Recompute every ResNet and transformer of every block in the backward pass. Their `forward` is
    wrapped per instance, so the state dict and the module tree stay as released. (Whole blocks cannot be
    wrapped: the up blocks pop their skip connections from a list, which a recomputation would find empty.)"""
    from torch.utils.checkpoint import checkpoint

    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for layer in [*block.resnets, *(block.attentions or [])]:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------
@dataclass
class Models:
    unet: UNet3D
    vae: VAE
    text: TextEncoder
    prediction_type: str  # what the UNet is trained to predict (see resolve_prediction_type)


def _rng_state(generator: torch.Generator) -> dict:
    """Every RNG the loop touches, as tensors and Python scalars only, so that resume can read it back with
    torch.load(weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(), "numpy": numpy_state,
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = sorted(p.parent for p in (output_dir / "checkpoints").glob(f"step_*/{STATE_FILE}"))
    return done[-1] if done else None


def write_defaults(folder: Path, cfg: TrainConfig, step: int) -> None:
    data = {"height": cfg.height, "width": cfg.width, "frames": cfg.num_frames - 1, **dict(cfg.defaults),
            "trained_steps": step}
    (folder / SIZE_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_training_checkpoint(folder: Path, cfg: TrainConfig, models: Models, ema: EMA, optimizer,
                             lr_schedule, step: int, generator: torch.Generator, info: distributed.DistInfo
                             ) -> None:
    """Released layout with the EMA UNet, `cinemo_rt.json`, and `training_state.pt` (written last, atomically:
    its presence marks a complete checkpoint). Every rank writes its RNG state beside it."""
    if info.is_main:
        save_checkpoint(folder, Checkpoint(unet=ema.model, vae=models.vae, text_encoder=models.text,
                                           scheduler_config=scheduler_config(cfg)))
        write_defaults(folder, cfg, step)
    distributed.barrier(info)
    torch.save(_rng_state(generator), folder / f"rng_rank{info.rank}.pt")
    distributed.barrier(info)
    if info.is_main:
        state = {"step": step, "unet": models.unet.state_dict(), "ema": ema.state_dict(),
                 "optimizer": optimizer.state_dict(), "lr_schedule": lr_schedule.state_dict(),
                 "config": cfg.to_dict()}
        tmp = folder / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, folder / STATE_FILE)
        log.info("checkpoint step %d -> %s", step, folder)
    distributed.barrier(info)


# ---------------------------------------------------------------------------------------------
# Set-up
# ---------------------------------------------------------------------------------------------
def prepare_data(cfg: TrainConfig, info: distributed.DistInfo) -> None:
    if cfg.make_demo_data and info.is_main and not (Path(cfg.data_dir) / "captions.jsonl").is_file():
        from ..demo_data import make_demo_dataset

        if cfg.height != cfg.width:
            raise ValueError("the demo dataset is square: set height == width")
        make_demo_dataset(cfg.data_dir, num_clips=cfg.demo_clips, frames=cfg.clip_span, size=cfg.height,
                          seed=cfg.demo_seed)
    distributed.barrier(info)


def build_models(cfg: TrainConfig, clips: VideoClips, resume: Path | None, generator: torch.Generator,
                 info: distributed.DistInfo) -> Models:
    """Fine-tune / resume: every part from a checkpoint folder. From scratch: tokenizer + random text
    encoder from the caption vocabulary, VAE pre-trained on the frames (rank 0, then broadcast), new UNet."""
    source = resume or (Path(cfg.init_from) if cfg.init_from else None)
    if source is not None:
        ckpt = load_checkpoint(source)
        stored = ckpt.scheduler_config.get("prediction_type", "epsilon")
        return Models(unet=ckpt.unet, vae=ckpt.vae, text=ckpt.text_encoder,
                      prediction_type=resolve_prediction_type(cfg.prediction_type, stored, source, resume is not None))

    out = Path(cfg.output_dir)
    words = sorted({w for e in read_captions(cfg.data_dir) for c in e["caption"] for w in c.lower().split()})
    text = build_text_encoder(out / f"tokenizer_rank{info.rank}", words, cfg.seed, cfg.text_encoder)
    vae_model = build_vae(cfg.vae, cfg.seed)
    if cfg.vae_steps > 0:
        if info.is_main:
            vae_model, _ = pretrain_vae(vae_model, clips.all_frames(), cfg.vae_steps, cfg.vae_batch, cfg.vae_lr,
                                        cfg.vae_kl_weight, torch.Generator().manual_seed(cfg.seed + 7),
                                        cfg.log_every, cfg.latent_std)
        scale = torch.tensor([float(vae_model.config.scaling_factor)])
        if info.enabled:
            torch.distributed.broadcast(scale, 0)
        vae_model = with_scaling_factor(vae_model, float(scale))
        distributed.broadcast_module(vae_model, info)
    vae = VAE.create(vae_model, temporal=False)

    unet_values = {**cfg.unet, "cross_attention_dim": text.hidden_size}
    torch.manual_seed(cfg.seed)
    unet = build_within_memory(lambda: UNet3D(UNetConfig.from_dict(unet_values)), "unet")
    # The motion embedding starts at zero (docs/METHOD.md, motion intensity: add_embedding.linear_2 zero-initialised for training).
    nn.init.zeros_(unet.add_embedding.linear_2.weight)
    nn.init.zeros_(unet.add_embedding.linear_2.bias)
    return Models(unet=unet, vae=vae, text=text, prediction_type=cfg.prediction_type or "epsilon")


def resolve_prediction_type(requested: str | None, stored: str, source: Path, resuming: bool) -> str:
    """The target for a UNet loaded from `source`, whose scheduler config says `stored`. Unset: keep it.
    Resuming with another target is refused (the optimiser state belongs to the old one); fine-tuning into
    another target is allowed (as SD 2 turned epsilon weights into v) but said out loud."""
    if requested is None or requested == stored:
        return stored
    if resuming:
        raise ValueError(f"{source} was trained with prediction_type {stored!r} but the config asks for "
                         f"{requested!r}; resume with prediction_type {stored!r} (or unset), or fine-tune with "
                         f"init_from to change the target")
    log.warning("fine-tuning %s (prediction_type %r) towards %r: the UNet's output changes meaning and needs "
                "enough steps to re-learn it", source, stored, requested)
    return requested


class LatentSource:
    """Scaled latents of a batch: from a per-frame posterior cache, or by encoding the frames now."""

    def __init__(self, vae: VAE, clips: VideoClips, cache: bool, device: torch.device):
        self.vae, self.device = vae, device
        self.cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if cache:
            self.cache = [self._moments(clip) for clip in clips.clips]

    def _moments(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for chunk in frames.split(64):
            mean, std = self.vae.encode(to_model_pixels(chunk).to(self.device))
            means.append(mean.float().cpu())
            stds.append(std.float().cpu())
        return torch.cat(means), torch.cat(stds)  # (T, 4, h, w) each

    def __call__(self, batch, generator: torch.Generator) -> torch.Tensor:
        if self.cache is not None:
            moments = [(self.cache[c][0][i], self.cache[c][1][i])
                       for c, i in zip(batch.clip_index.tolist(), batch.frame_index)]
            mean, std = torch.stack([m for m, _ in moments]), torch.stack([s for _, s in moments])
        else:
            b, n = batch.frames.shape[:2]
            mean, std = self._moments(batch.frames.flatten(0, 1))
            mean, std = mean.unflatten(0, (b, n)), std.unflatten(0, (b, n))
        z = sample_latents(mean, std, self.vae.scaling_factor, generator)  # (B, N, 4, h, w)
        return z.permute(0, 2, 1, 3, 4).to(self.device)  # (B, 4, N, h, w)


class TextCache:
    """Frozen text encoder: each distinct prompt is encoded once."""

    def __init__(self, text: TextEncoder, device: torch.device):
        self.text, self.device, self.table = text, device, {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.table]
        if missing:
            for p, e in zip(missing, self.text.encode_text(missing)):
                self.table[p] = e.float().cpu()
        return torch.stack([self.table[p] for p in prompts]).to(self.device)  # (B, 77, D)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------
def read_resume_state(path: Path) -> dict:
    """A resume file read with weights_only=True; missing or refused files are one ValueError naming them."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"cannot resume: {path} is missing (the checkpoint was not written completely); "
                         "resume from an earlier step folder or set resume to null") from None
    except Exception as err:  # pickles with code in them, truncated files
        raise ValueError(f"cannot resume from {path}: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    if not isinstance(state, dict):
        raise ValueError(f"cannot resume from {path}: it holds a {type(state).__name__}, not a training state")
    return state


def restore_training_state(folder: Path, rank: int, unet, ema, optimizer, lr_schedule,
                           generator: torch.Generator) -> int:
    """Every piece of a step folder's state put back (model, EMA, optimiser, schedule, step, RNGs); a file
    that lacks a piece or holds one of the wrong shape, size or type is one ValueError naming the file,
    found before the first step (an optimiser state of the wrong shape fails only inside `step` otherwise).
    Returns the step."""
    state_path, rng_path = folder / STATE_FILE, folder / f"rng_rank{rank}.pt"
    path = state_path
    try:
        state = read_resume_state(state_path)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            for param in group["params"]:
                for name, value in optimizer.state.get(param, {}).items():
                    if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                        raise ValueError(f"optimizer {name} has shape {tuple(value.shape)} for a parameter of "
                                         f"{tuple(param.shape)}")
        lr_schedule.load_state_dict(state["lr_schedule"])
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"step is {step}")
        path = rng_path
        _set_rng_state(read_resume_state(rng_path), generator)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError, OverflowError) as err:
        if isinstance(err, ValueError) and str(err).startswith("cannot resume"):
            raise
        what = f"missing {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {str(err).splitlines()[0]}"
        raise ValueError(f"cannot resume from {path}: it is not a complete training state of this model ({what}); "
                         "resume from another step folder or set resume to null") from None
    return step


def train(cfg: TrainConfig, device: str | None = None) -> dict:
    """Run training to `cfg.steps`; returns {"step", "loss" (mean of the last log window), "seconds"}."""
    info = distributed.init(device)
    if cfg.threads:  # data preparation and VAE pre-training already run with the requested count
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    written = {"output_dir": cfg.output_dir, "export_dir": cfg.export_dir,
               "data_dir": cfg.data_dir if cfg.make_demo_data else None}
    for name, folder in written.items():  # refused now, not after hours of training
        if folder:
            check_outside_package(folder, name)
    if cfg.export_dir:
        check_owned_folder(cfg.export_dir, owns_checkpoint_entry, "a checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    prepare_data(cfg, info)

    resume = None
    if cfg.resume == "auto":
        resume = latest_checkpoint(out)
    elif cfg.resume:
        resume = Path(cfg.resume)

    generator = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)  # data, timesteps and noise
    clips = VideoClips(cfg.data_dir, cfg.height, cfg.width, cfg.num_frames, info.rank, info.world)
    models = build_models(cfg, clips, resume, generator, info)
    cfg = dataclasses.replace(cfg, prediction_type=models.prediction_type)  # what the checkpoints will say
    unet = models.unet.to(info.device).train().requires_grad_(True)
    if info.device.type == "cpu":
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's ranks on this node share its cores
        apply_threads(sum(p.numel() for p in unet.parameters()), cfg.threads or None, processes=ranks_here)
    models.vae.model.to(info.device)
    models.text.model.to(info.device)
    ema = EMA(unet, cfg.ema_decay)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(unet)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg))
    step = 0
    if resume is not None:
        step = restore_training_state(resume, info.rank, unet, ema, optimizer, lr_schedule, generator)
        log.info("resumed from %s at step %d", resume, step)
    model = DistributedDataParallel(unet) if info.enabled else unet

    latents = LatentSource(models.vae, clips, cfg.cache_latents, info.device)
    text_cache = TextCache(models.text, info.device)
    alphas_cumprod = make_schedule()
    autocast = torch.autocast(info.device.type, dtype=torch.bfloat16,
                              enabled=cfg.bf16 and info.device.type == "cuda")
    log_path = out / "log.jsonl"
    window: list[float] = []
    loss_value = float("nan")
    start = time.perf_counter()
    start_step = step
    deadline = start + 60 * cfg.max_minutes if cfg.max_minutes else float("inf")
    stop_at = cfg.steps
    while step < stop_at:
        batch = clips.sample(cfg.batch_size, cfg.num_frames, cfg.frame_interval, cfg.text_dropout, generator)
        z = latents(batch, generator)  # (B, 4, N, h, w)
        text = text_cache(batch.captions)
        t = torch.randint(NUM_TRAIN_TIMESTEPS, (z.shape[0],), generator=generator)
        noise = torch.randn((z.shape[0], z.shape[1], z.shape[2] - 1, *z.shape[3:]), generator=generator)
        with autocast:
            loss = diffusion_loss(model, z, text, batch.motion_id.to(info.device), t.to(info.device),
                                  noise.to(info.device), alphas_cumprod, cfg.high_noise_weight,
                                  cfg.prediction_type)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        optimizer.step()
        lr_schedule.step()
        ema.update(unet)
        step += 1
        window.append(loss.item())
        if step % cfg.log_every == 0 and distributed.all_mean(float(time.perf_counter() > deadline), info) > 0:
            # The time budget, agreed by all ranks (any rank over it): stop here, with a checkpoint.
            stop_at = step
            log.warning("max_minutes=%g reached: stopping at step %d of %d", cfg.max_minutes, step, cfg.steps)

        if step % cfg.log_every == 0 or step == stop_at:
            loss_value = distributed.all_mean(sum(window) / len(window), info)
            window = []
            if info.is_main:
                rate = (time.perf_counter() - start) / (step - start_step)
                record = {"step": step, "loss": round(loss_value, 5), "lr": optimizer.param_groups[0]["lr"],
                          "grad_norm": round(float(grad_norm), 4), "s_per_step": round(rate, 3),
                          "elapsed_s": round(time.perf_counter() - start, 1)}
                log.info("step %d loss %.4f lr %.2e grad %.3f %.2f s/step", step, loss_value, record["lr"],
                         record["grad_norm"], rate)
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
        if step % cfg.save_every == 0 or step == stop_at:
            folder = out / "checkpoints" / f"step_{step:06d}"
            save_training_checkpoint(folder, cfg, models, ema, optimizer, lr_schedule, step, generator, info)

    if cfg.export_dir and info.is_main:
        export = Path(cfg.export_dir)
        save_checkpoint(export, Checkpoint(unet=ema.model, vae=models.vae, text_encoder=models.text,
                                           scheduler_config=scheduler_config(cfg)))
        write_defaults(export, cfg, step)
        log.info("exported EMA weights to %s", export)
    distributed.barrier(info)
    seconds = time.perf_counter() - start
    result = {"step": step, "loss": loss_value, "seconds": seconds,
              "unet": unet, "ema": ema.model}
    distributed.shutdown(info)
    return result
